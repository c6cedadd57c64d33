//! Helpers for end-to-end tests: a scratch project directory and the real `dagrun` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Float64Type;
use serde_json::Value;

/// A scratch directory holding pipeline files and their `.dagrun/` cache.
pub struct Project {
    pub dir: PathBuf,
}

impl Project {
    pub fn new(name: &str) -> Project {
        let dir = std::env::temp_dir().join(format!("dagrun-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Project { dir }
    }

    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn write_bytes(&self, file: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.join(file);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.join(".dagrun")
    }

    /// `dagrun ARGS` in the project directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dagrun"));
        c.current_dir(&self.dir)
            .args(args)
            .env_remove("DAGRUN_CACHE_DIR")
            .stdin(Stdio::null());
        c
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs `dagrun run FILE --json EXTRA…`, asserts success, returns the run's JSON.
    pub fn run(&self, file: &str, extra: &[&str]) -> Run {
        let mut args = vec!["run", file, "--json"];
        args.extend_from_slice(extra);
        let out = self.output(&args);
        assert!(
            out.status.success(),
            "dagrun {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Run::parse(&out)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = make_writable(&self.dir);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn make_writable(p: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(p)?;
    let mut perms = meta.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(p, perms)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(p)? {
            make_writable(&e?.path())?;
        }
    }
    Ok(())
}

/// Runs `dagrun ARGS` and SIGKILLs it as soon as `ready()` holds (polled every few ms), as a
/// crash or an impatient user would; fails if the run ends first or nothing happens in time.
pub fn kill_when(project: &Project, args: &[&str], ready: impl Fn() -> bool) {
    let mut child = project.spawn(args);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "the awaited checkpoint never appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
}

/// The JSON line `dagrun run --json` ends with.
pub struct Run(pub Value);

impl Run {
    pub fn parse(out: &Output) -> Run {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_else(|| {
            panic!(
                "no output; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Run(serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}")))
    }

    pub fn stage(&self, name: &str) -> &Value {
        self.0["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no stage {name} in {}", self.0))
    }

    pub fn status(&self, name: &str) -> String {
        self.stage(name)["status"].as_str().unwrap().to_string()
    }

    /// Stage name → status, for whole-run assertions.
    pub fn statuses(&self) -> Vec<(String, String)> {
        self.0["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn output(&self, stage: &str, output: &str) -> String {
        self.stage(stage)["outputs"][output]
            .as_str()
            .unwrap_or_else(|| panic!("{stage} has no output {output}"))
            .to_string()
    }
}

/// The path of a published object in a cache.
pub fn object_path(cache: &Path, digest: &str) -> PathBuf {
    cache.join("objects").join(&digest[..2]).join(digest)
}

/// Whether some stage's resume directory in `cache` holds the file `rel` (a checkpoint to kill at).
pub fn resume_has(cache: &Path, rel: &str) -> bool {
    std::fs::read_dir(cache.join("resume"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.path().join(rel).is_file())
        })
        .unwrap_or(false)
}

/// The record batches of a cached Parquet object.
pub fn batches(cache: &Path, digest: &str) -> Vec<RecordBatch> {
    let file = std::fs::File::open(object_path(cache, digest)).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    reader.map(Result::unwrap).collect()
}

pub fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
    let a = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_string::<i32>();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

pub fn floats(b: &RecordBatch, name: &str) -> Vec<f64> {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_primitive::<Float64Type>()
        .values()
        .to_vec()
}

/// The repository root. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test, so a test binary
/// reused from a checkout at another path (a shared `CARGO_TARGET_DIR`) still reads this
/// checkout's files; the compile-time value is only the fallback for running the binary by hand.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
