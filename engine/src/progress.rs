//! Progress of a running stage: a bar on a terminal, a throttled log line otherwise.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown, chosen once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Bar,
    Log,
    Off,
}

fn bars() -> &'static MultiProgress {
    static BARS: std::sync::OnceLock<MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Where log lines go: stderr, above the progress bars rather than through them.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A shared log sink: the stage's own log file in the run directory.
pub type LogSink = Arc<Mutex<Option<std::fs::File>>>;

/// A stage's progress counter. Cheap to clone and to call from worker threads.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    unit: String,
    bar: Option<ProgressBar>,
    total: AtomicU64,
    position: AtomicU64,
    started: Instant,
    last_line: Mutex<Instant>,
    mode: ProgressMode,
    log: LogSink,
}

impl Progress {
    pub(crate) fn new(
        node: &str,
        total: u64,
        unit: &str,
        mode: ProgressMode,
        log: LogSink,
    ) -> Progress {
        let bar = (mode == ProgressMode::Bar).then(|| {
            // One display for the process: stages running at once each get a line of it.
            let bar = bars().add(ProgressBar::new(total));
            let style = ProgressStyle::with_template(&format!(
                "{{prefix:>14}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}} {{msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(node.to_string());
            bar
        });
        Progress {
            inner: Arc::new(Inner {
                node: node.to_string(),
                unit: unit.to_string(),
                bar,
                total: AtomicU64::new(total),
                position: AtomicU64::new(0),
                started: Instant::now(),
                last_line: Mutex::new(Instant::now()),
                mode,
                log,
            }),
        }
    }

    pub fn inc(&self, n: u64) {
        let pos = self.inner.position.fetch_add(n, Ordering::Relaxed) + n;
        self.update(pos, None);
    }

    pub fn set_position(&self, pos: u64) {
        self.inner.position.store(pos, Ordering::Relaxed);
        self.update(pos, None);
    }

    /// Shows a short status next to the counter (`loss 1.23`).
    pub fn set_message(&self, msg: &str) {
        if let Some(bar) = &self.inner.bar {
            bar.set_message(msg.to_string());
        }
        let pos = self.inner.position.load(Ordering::Relaxed);
        self.update(pos, Some(msg));
    }

    fn update(&self, pos: u64, msg: Option<&str>) {
        if let Some(bar) = &self.inner.bar {
            bar.set_position(pos);
        }
        let total = self.inner.total.load(Ordering::Relaxed);
        let mut last = self
            .inner
            .last_line
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < Duration::from_secs(5) && pos < total {
            return;
        }
        *last = Instant::now();
        let secs = self.inner.started.elapsed().as_secs_f64().max(1e-9);
        let rate = pos as f64 / secs;
        let eta = if rate > 0.0 && total > pos {
            format!(", eta {:.0}s", (total - pos) as f64 / rate)
        } else {
            String::new()
        };
        let line = format!(
            "{}/{} {} ({:.1}/s{eta}){}",
            pos,
            total,
            self.inner.unit,
            rate,
            msg.map(|m| format!(" {m}")).unwrap_or_default()
        );
        if self.inner.mode == ProgressMode::Log {
            tracing::info!(stage = %self.inner.node, "{line}");
        }
        if let Some(f) = self
            .inner
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = writeln!(f, "progress: {line}");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
