//! Running a pipeline in this process: stages start as soon as their inputs are settled, up to
//! `--jobs` at once and within the machine's CPUs, memory and GPUs (each stage's
//! `resources`), so independent branches of the DAG overlap. Keys, locks and publishing are
//! [`crate::exec`]'s; this module only decides what starts when and collects the record.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::Duration;

use dagrun_cache::Store;

use crate::diag::{Diagnostic, Diagnostics};
use crate::exec::{
    self, Available, Finished, PathDigests, RunLog, RunOptions, cached, cached_outputs, key_parts,
};
use crate::graph::{Graph, Source};
use crate::kind::Registry;
use crate::records::{Records, RunRecord, StageRecord, Status};
use crate::resources::Resources;

/// What a stage holds of the budget while it runs.
#[derive(Debug, Clone, Copy, Default)]
struct Claim {
    cpus: u32,
    mem_mb: u64,
    gpus: u32,
}

/// The machine's capacity and what running stages hold of it.
struct Budget {
    jobs: usize,
    total: Claim,
    used: Claim,
    running: usize,
}

impl Budget {
    fn new(jobs: usize) -> Budget {
        Budget {
            jobs: jobs.max(1),
            total: Claim {
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                mem_mb: total_memory_mb().unwrap_or(u64::MAX),
                gpus: gpu_count(),
            },
            used: Claim::default(),
            running: 0,
        }
    }

    /// A request, capped at the machine's size (a stage that asks for more than there is runs
    /// alone rather than never).
    fn claim(&self, r: &Resources) -> Claim {
        Claim {
            cpus: r.cpus_or_one().min(self.total.cpus),
            mem_mb: r.mem_mb.unwrap_or(0).min(self.total.mem_mb),
            gpus: r.gpus.unwrap_or(0).min(self.total.gpus),
        }
    }

    fn admits(&self, c: &Claim) -> bool {
        self.running == 0
            || (self.running < self.jobs
                && self.used.cpus + c.cpus <= self.total.cpus
                && self.used.mem_mb + c.mem_mb <= self.total.mem_mb
                && self.used.gpus + c.gpus <= self.total.gpus)
    }

    fn take(&mut self, c: &Claim) {
        self.running += 1;
        self.used.cpus += c.cpus;
        self.used.mem_mb += c.mem_mb;
        self.used.gpus += c.gpus;
    }

    fn give_back(&mut self, c: &Claim) {
        self.running -= 1;
        self.used.cpus -= c.cpus;
        self.used.mem_mb -= c.mem_mb;
        self.used.gpus -= c.gpus;
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

fn total_memory_mb() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// NVIDIA GPUs the driver lists (0 without one).
fn gpu_count() -> u32 {
    std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |d| d.count() as u32)
}

/// A stage that finished in a worker thread.
struct Done {
    stage: usize,
    /// When it took its key's lock (Unix seconds), and how long it ran from there.
    started_unix: f64,
    seconds: f64,
    outcome: Result<anyhow::Result<(Status, Finished)>, Diagnostic>,
}

/// Executes the selected stages of `graph`. Returns the run's record; a stage failure is a
/// `Failed` status in it, not an error. Errors are problems with the input (exit code 2).
pub fn run(
    graph: &Graph,
    registry: &Registry,
    store: &Store,
    opts: &RunOptions,
) -> Result<RunRecord, Diagnostics> {
    let selected = exec::select(graph, opts)?;
    let _store_lock = crate::cli::lock_store_shared(store)?;
    let mut run = Run {
        graph,
        store,
        opts,
        selected,
        records: Records::new(store.root()),
        log: RunLog::start(),
        settled: vec![false; graph.pipeline.stages.len()],
        done: vec![None; graph.pipeline.stages.len()],
        running: BTreeMap::new(),
        available: HashMap::new(),
        path_digests: PathDigests::new(store),
        failed: BTreeSet::new(),
        stop: false,
        fatal: None,
        budget: Budget::new(opts.jobs),
    };
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Done>();
        loop {
            for start in run.settle() {
                let tx = tx.clone();
                let (graph, store) = (run.graph, run.store);
                let progress = run
                    .opts
                    .progress
                    .unwrap_or(crate::progress::ProgressMode::Log);
                let run_id = run.log.run.clone();
                let records = run.records.clone();
                scope.spawn(move || {
                    let mut locked = None;
                    // Stages catch their own panics; this covers the engine's code around them,
                    // so that every worker reports back and the loop never waits forever.
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        exec::lock_and_execute(
                            graph,
                            registry,
                            store,
                            &records,
                            &run_id,
                            start.stage,
                            &start.key,
                            start.forced,
                            &start.inputs,
                            progress,
                            &mut locked,
                        )
                    }))
                    .unwrap_or_else(|_| {
                        Ok(Err(anyhow::anyhow!("dagrun panicked running this stage")))
                    });
                    let ran = locked.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    let _ = tx.send(Done {
                        stage: start.stage,
                        started_unix: unix_now() - ran,
                        seconds: ran,
                        outcome,
                    });
                });
            }
            if run.running.is_empty() {
                break;
            }
            // Every worker sends exactly once, so this cannot wait forever.
            match rx.recv_timeout(Duration::from_secs(3600)) {
                Ok(done) => run.finish(done),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    if let Some(fatal) = run.fatal {
        return Err(fatal);
    }
    let stages = run.in_order();
    run.log.save(&run.records, graph, &stages, Vec::new());
    Ok(run.log.record(graph, stages))
}

/// A stage to start in a worker.
struct Start {
    stage: usize,
    key: String,
    forced: bool,
    inputs: HashMap<Source, Available>,
}

/// The state of one run while it goes.
struct Run<'a> {
    graph: &'a Graph<'a>,
    store: &'a Store,
    opts: &'a RunOptions,
    selected: BTreeSet<usize>,
    records: Records,
    log: RunLog,
    /// Stages whose outcome is known (or that will not run).
    settled: Vec<bool>,
    /// Records of settled, selected stages, by stage index.
    done: Vec<Option<StageRecord>>,
    /// Stages in workers: their record so far and what they hold of the budget.
    running: BTreeMap<usize, (StageRecord, Claim)>,
    available: HashMap<Source, Available>,
    path_digests: PathDigests,
    failed: BTreeSet<usize>,
    /// An earlier stage failed without --keep-going: start nothing more.
    stop: bool,
    fatal: Option<Diagnostics>,
    budget: Budget,
}

impl Run<'_> {
    /// Settles every stage that can be settled without running it (skipped, unselected,
    /// cached, not runnable) and returns the stages to start now, in DAG order.
    fn settle(&mut self) -> Vec<Start> {
        let mut starts = Vec::new();
        for &i in &self.graph.order {
            if self.settled[i] || self.running.contains_key(&i) || self.fatal.is_some() {
                continue;
            }
            let upstream_settled = self.graph.nodes[i]
                .inputs
                .iter()
                .flat_map(|x| &x.sources)
                .all(|s| self.settled[s.node]);
            if !upstream_settled {
                continue;
            }
            if let Some(start) = self.consider(i) {
                starts.push(start);
            }
        }
        starts
    }

    fn record_of(&self, i: usize) -> StageRecord {
        StageRecord::new(&self.graph.pipeline.stages[i], &self.log.run)
    }

    fn settle_with(&mut self, i: usize, record: Option<StageRecord>) {
        self.settled[i] = true;
        if self.selected.contains(&i) {
            self.done[i] = record;
        }
    }

    /// Decides stage `i`, whose inputs are settled: a [`Start`] if it must run and the budget
    /// has room now.
    fn consider(&mut self, i: usize) -> Option<Start> {
        let (graph, store) = (self.graph, self.store);
        let stage = &graph.pipeline.stages[i];
        let node = &graph.nodes[i];
        let mut record = self.record_of(i);
        if stage.skip {
            if self.selected.contains(&i) {
                tracing::info!(stage = %stage.name, "skipped (passing its input through)");
            }
            self.settle_with(i, Some(record));
            return None;
        }
        let parts = match key_parts(graph, i, &self.available, &mut self.path_digests) {
            Ok(p) => p,
            Err(e) => {
                self.fatal = Some(e.into());
                return None;
            }
        };
        self.path_digests.save();
        if !self.selected.contains(&i) || self.stop {
            // Not ours to run, but its cached outputs may feed selected stages.
            if let Some(parts) = &parts {
                for (name, a) in cached_outputs(store, &parts.key()).unwrap_or_default() {
                    self.available.insert(
                        Source {
                            node: i,
                            output: name,
                        },
                        a,
                    );
                }
            }
            record.status = Status::NotRun;
            record.key = parts.map(|p| p.key());
            record.error = Some("not run: an earlier stage failed (--keep-going runs the stages that do not depend on it)".into());
            self.settle_with(i, Some(record));
            return None;
        }
        let Some(parts) = parts else {
            let sources = || node.inputs.iter().flat_map(|x| &x.sources);
            let missing: Vec<String> = sources()
                .filter(|s| !self.available.contains_key(s))
                .map(|s| format!("{}.{}", graph.name(s.node), s.output))
                .collect();
            let upstream_failed = sources().any(|s| self.failed.contains(&s.node));
            record.status = Status::Failed;
            record.error = Some(if upstream_failed {
                format!("not run: its input {} failed", missing.join(", "))
            } else {
                format!(
                    "not run: {} is not in the cache; run the stages that make it first",
                    missing.join(", ")
                )
            });
            tracing::error!(stage = %stage.name, "{}", record.error.as_deref().unwrap_or_default());
            self.failed.insert(i);
            self.settle_with(i, Some(record));
            return None;
        };
        let key = parts.key();
        record.key = Some(key.clone());
        record.parts = Some(parts);
        let forced = self.opts.force.iter().any(|f| f == &stage.name);
        if !forced && let Some(found) = cached(store, &key) {
            record.status = Status::Cached;
            tracing::info!(stage = %stage.name, "cached");
            self.publish(i, &mut record, found);
            self.settle_with(i, Some(record));
            return None;
        }
        let claim = self.budget.claim(&stage.resources);
        if !self.budget.admits(&claim) {
            return None;
        }
        self.budget.take(&claim);
        // Say which key is in flight before starting, so that `gc` keeps its checkpoints if
        // this process dies.
        record.status = Status::Running;
        self.running.insert(i, (record, claim));
        self.save_progress();
        Some(Start {
            stage: i,
            key,
            forced,
            inputs: self.available.clone(),
        })
    }

    /// Makes a finished stage's outputs available to its consumers.
    fn publish(&mut self, i: usize, record: &mut StageRecord, found: Finished) {
        record.resumed = found.resumed;
        for (name, a) in found.outputs {
            record.outputs.insert(name.clone(), a.digest.clone());
            self.available.insert(
                Source {
                    node: i,
                    output: name,
                },
                a,
            );
        }
        if let Some(report) = &found.report {
            exec::append_summary(
                &self.records,
                &self.log.run,
                &self.graph.pipeline.stages[i].name,
                report,
            );
        }
    }

    fn finish(&mut self, done: Done) {
        let i = done.stage;
        let Some((mut record, claim)) = self.running.remove(&i) else {
            return;
        };
        self.budget.give_back(&claim);
        record.seconds = done.seconds;
        record.started_unix = Some(done.started_unix);
        let stage = &self.graph.pipeline.stages[i];
        match done.outcome {
            Err(fatal) => {
                record.status = Status::Failed;
                record.error = Some(fatal.to_string());
                self.failed.insert(i);
                self.fatal = Some(fatal.into());
            }
            Ok(Ok((status, finished))) => {
                record.status = status;
                self.publish(i, &mut record, finished);
                let verb = if status == Status::Cached {
                    "cached"
                } else {
                    "ran"
                };
                tracing::info!(stage = %stage.name, "{verb} in {:.2}s", record.seconds);
            }
            Ok(Err(e)) => {
                let message = exec::located_message(self.graph, i, &e);
                tracing::error!(stage = %stage.name, "failed: {message}");
                record.status = Status::Failed;
                record.error = Some(message);
                self.failed.insert(i);
                self.stop = !self.opts.keep_going;
            }
        }
        self.settle_with(i, Some(record));
        // After every stage that did work, not only at the end: a killed run keeps what it
        // finished.
        self.save_progress();
    }

    /// Selected stages' records in DAG order.
    fn in_order(&self) -> Vec<StageRecord> {
        self.graph
            .order
            .iter()
            .filter_map(|&i| self.done[i].clone())
            .collect()
    }

    fn save_progress(&self) {
        let running = self.running.values().map(|(r, _)| r.clone()).collect();
        self.log
            .save(&self.records, self.graph, &self.in_order(), running);
    }
}
