//! Run records, written by the machine beside the cache (never into the pipeline file):
//! `runs/<id>/record.json`, `runs/<id>/logs/<stage>.log`, `runs/<id>/summary.md` if a stage
//! writes one, and `index/<pipeline>.json` with the latest record of every stage of a pipeline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::key::KeyParts;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ran,
    Cached,
    Skipped,
    Failed,
    /// Selected, but left alone after an earlier stage failed.
    #[serde(rename = "not_run")]
    NotRun,
    /// In flight when the record was written; a record that still says so after the run
    /// ended belongs to a killed process.
    Running,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub kind: String,
    pub status: Status,
    pub key: Option<String>,
    pub outputs: BTreeMap<String, String>,
    pub seconds: f64,
    pub resumed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<KeyParts>,
    #[serde(default)]
    pub run: String,
    /// When it started (Unix seconds, to the millisecond): stages of one run may overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix: Option<f64>,
    /// The Slurm job that ran it, under the Slurm executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<u64>,
}

impl StageRecord {
    /// The record of a stage of run `run` before anything happened to it (as if skipped).
    pub fn new(stage: &crate::pipeline::Stage, run: &str) -> StageRecord {
        StageRecord {
            name: stage.name.clone(),
            kind: stage.kind.clone(),
            status: Status::Skipped,
            key: None,
            outputs: BTreeMap::new(),
            seconds: 0.0,
            resumed: false,
            error: None,
            parts: None,
            run: run.to_string(),
            started_unix: None,
            slurm_job: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: String,
    /// The pipeline file's path as it was given (relative to where the run started), for show.
    pub pipeline: String,
    /// The pipeline file's absolute path ([`absolute`]), to find the run from any directory;
    /// `None` in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_absolute: Option<String>,
    pub started_unix: u64,
    pub seconds: f64,
    pub stages: Vec<StageRecord>,
}

impl RunRecord {
    /// The `--json` form that scripts read: the record without key components.
    pub fn to_json_line(&self) -> String {
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| {
                let mut v = serde_json::json!({
                    "name": s.name, "kind": s.kind, "status": s.status, "key": s.key,
                    "outputs": s.outputs, "seconds": s.seconds, "resumed": s.resumed,
                });
                if let Some(t) = s.started_unix {
                    v["started_unix"] = serde_json::json!(t);
                }
                if let Some(job) = s.slurm_job {
                    v["slurm_job"] = serde_json::json!(job);
                }
                if let Some(e) = &s.error {
                    v["error"] = serde_json::Value::String(e.clone());
                }
                v
            })
            .collect();
        serde_json::json!({ "run": self.run, "stages": stages }).to_string()
    }
}

/// Where records live under a cache root.
#[derive(Debug, Clone)]
pub struct Records {
    root: PathBuf,
}

impl Records {
    pub fn new(cache_root: &Path) -> Records {
        Records {
            root: cache_root.to_path_buf(),
        }
    }

    /// A new run id, sortable by time to the millisecond: `20261122T041512.345-12345` (so that
    /// `gc --keep-runs` keeps the newest of two runs started in one second).
    pub fn new_run_id() -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.{:03}-{}",
            utc_stamp(now.as_secs()),
            now.subsec_millis(),
            std::process::id()
        )
    }

    pub fn run_dir(&self, run: &str) -> PathBuf {
        self.root.join("runs").join(run)
    }

    pub fn log_path(&self, run: &str, stage: &str) -> PathBuf {
        self.run_dir(run).join("logs").join(format!("{stage}.log"))
    }

    pub fn write_run(&self, record: &RunRecord) -> anyhow::Result<()> {
        write_json(&self.run_dir(&record.run).join("record.json"), record)
    }

    /// Every run record, oldest first.
    pub fn runs(&self) -> Vec<RunRecord> {
        self.run_dirs()
            .iter()
            .filter_map(|d| read_json(&d.join("record.json")))
            .collect()
    }

    /// Run directories, oldest first (run ids sort by time).
    fn run_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.root.join("runs"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        dirs.sort();
        dirs
    }

    /// The newest run record of `pipeline`, matched by absolute path. A record written before
    /// records kept the absolute path has only the path as it was given, relative to where
    /// that run started, which is resolved against the current directory (so it may not match
    /// from elsewhere); the newest run the pipeline's index names (indexes are keyed by
    /// absolute path) is taken when newer.
    pub fn latest_run(&self, pipeline: &Path) -> Option<RunRecord> {
        let want = absolute(pipeline);
        let by_path = self
            .run_dirs()
            .iter()
            .rev()
            .filter_map(|d| read_json::<RunRecord>(&d.join("record.json")))
            .find(|r| {
                let path = r.pipeline_absolute.as_deref().unwrap_or(&r.pipeline);
                absolute(Path::new(path)) == want
            });
        let by_index = self
            .index(pipeline)
            .into_values()
            .map(|s| s.run)
            .max()
            .and_then(|run| read_json(&self.run_dir(&run).join("record.json")));
        [by_path, by_index]
            .into_iter()
            .flatten()
            .max_by(|a: &RunRecord, b| a.run.cmp(&b.run))
    }

    /// The index file of `pipeline`, named by its [`absolute`] path (symlinks and `..`
    /// resolved), so every spelling of one file shares one index.
    fn index_path(&self, pipeline: &Path) -> PathBuf {
        self.index_file(pipeline, &absolute(pipeline))
    }

    /// Where indexes were kept before symlinks and `..` were resolved, read when the current
    /// one does not exist yet.
    fn legacy_index_path(&self, pipeline: &Path) -> PathBuf {
        let abs = std::path::absolute(pipeline).unwrap_or_else(|_| pipeline.to_path_buf());
        self.index_file(pipeline, &abs)
    }

    fn index_file(&self, pipeline: &Path, abs: &Path) -> PathBuf {
        let id = blake3::hash(abs.display().to_string().as_bytes()).to_hex();
        let stem = pipeline
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("pipeline");
        self.root
            .join("index")
            .join(format!("{stem}-{}.json", &id[..12]))
    }

    /// The latest record of each stage of `pipeline`, by stage name.
    pub fn index(&self, pipeline: &Path) -> BTreeMap<String, StageRecord> {
        read_json(&self.index_path(pipeline))
            .or_else(|| read_json(&self.legacy_index_path(pipeline)))
            .unwrap_or_default()
    }

    /// Merges a run's stage records into the pipeline's index (stages that failed, did not run
    /// or are still running keep their last good record).
    pub fn update_index(&self, pipeline: &Path, run: &RunRecord) -> anyhow::Result<()> {
        // Read, merge, write: several processes (Slurm jobs of one pipeline) do this at once.
        let locks = self.root.join("locks");
        std::fs::create_dir_all(&locks)?;
        let _lock = dagrun_cache::Lock::acquire(
            &locks.join("index.lock"),
            dagrun_cache::LockMode::Exclusive,
        )?;
        let mut index = self.index(pipeline);
        for s in &run.stages {
            if matches!(s.status, Status::Ran | Status::Cached | Status::Skipped) {
                index.insert(s.name.clone(), s.clone());
            }
        }
        write_json(&self.index_path(pipeline), &index)
    }

    /// Every index, for gc: what each pipeline currently points at stays.
    pub fn all_indexes(&self) -> Vec<BTreeMap<String, StageRecord>> {
        let Ok(rd) = std::fs::read_dir(self.root.join("index")) else {
            return Vec::new();
        };
        rd.filter_map(|e| read_json(&e.ok()?.path())).collect()
    }
}

/// `path` made absolute against the current directory, with symbolic links and `..` resolved
/// when the file exists (so `p.yaml` from its directory and `../x/p.yaml` from a sibling name
/// the same file).
pub fn absolute(path: &Path) -> PathBuf {
    path.canonicalize()
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Records are written like the cache's own: to a temporary file, then renamed.
fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    Ok(dagrun_cache::write_json_atomic(path, value)?)
}

/// `YYYYMMDDTHHMMSS` in UTC, from days since the epoch (Howard Hinnant's civil-from-days).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(run: &str, given: &str, absolute: Option<&Path>) -> RunRecord {
        RunRecord {
            run: run.into(),
            pipeline: given.into(),
            pipeline_absolute: absolute.map(|p| p.display().to_string()),
            started_unix: 0,
            seconds: 0.0,
            stages: vec![],
        }
    }

    #[test]
    fn the_latest_run_is_found_by_absolute_path_whatever_the_directory_it_started_in() {
        let root = std::env::temp_dir().join(format!("dagrun-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, b) = (root.join("a"), root.join("b"));
        for dir in [&a, &b] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("p.yaml"), "stages: {}\n").unwrap();
        }
        let records = Records::new(&root.join("cache"));
        // Two runs of two files both given as `p.yaml`, each from its own directory.
        let in_a = record(
            "20260101T000000.000-1",
            "p.yaml",
            Some(&absolute(&a.join("p.yaml"))),
        );
        let in_b = record(
            "20260101T000001.000-1",
            "p.yaml",
            Some(&absolute(&b.join("p.yaml"))),
        );
        records.write_run(&in_a).unwrap();
        records.write_run(&in_b).unwrap();
        // Looked up from here (neither directory), by a path that is not the one given.
        let found = |p: &Path| records.latest_run(p).map(|r| r.run);
        assert_eq!(found(&a.join("p.yaml")), Some(in_a.run.clone()));
        assert_eq!(found(&b.join("../b/p.yaml")), Some(in_b.run.clone()));
        // `p.yaml` here is neither of them, though both runs were given that path.
        assert_eq!(found(Path::new("p.yaml")), None);
        // A record from before absolute paths were kept still resolves against the current
        // directory.
        let here = std::env::current_dir().unwrap().join("old-p.yaml");
        records
            .write_run(&record("20260101T000002.000-1", "old-p.yaml", None))
            .unwrap();
        assert_eq!(found(&here), Some("20260101T000002.000-1".into()));
        let json = serde_json::to_string(&record("r", "p.yaml", None)).unwrap();
        assert!(!json.contains("pipeline_absolute"), "{json}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn stage(name: &str) -> StageRecord {
        StageRecord {
            name: name.into(),
            kind: "mix".into(),
            status: Status::Ran,
            key: None,
            outputs: BTreeMap::new(),
            seconds: 0.0,
            resumed: false,
            error: None,
            parts: None,
            started_unix: None,
            slurm_job: None,
            run: "r".into(),
        }
    }

    #[test]
    fn every_spelling_of_a_pipeline_path_shares_its_index() {
        let root = std::env::temp_dir().join(format!("dagrun-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("a");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), "stages: {}\n").unwrap();
        let records = Records::new(&root.join("cache"));
        let mut run = record("r", "p.yaml", None);
        run.stages = vec![stage("first")];
        records
            .update_index(&dir.join("../a/p.yaml"), &run)
            .unwrap();
        assert!(records.index(&dir.join("p.yaml")).contains_key("first"));
        // An index written under the old name (`..` kept) is still read, and the next update
        // carries it over.
        let old = dir.join("../a/./p.yaml");
        let mut legacy = BTreeMap::new();
        legacy.insert("second".to_string(), stage("second"));
        let other = root.join("b.yaml");
        std::fs::write(&other, "stages: {}\n").unwrap();
        write_json(&records.legacy_index_path(&other), &legacy).unwrap();
        assert!(records.index(&other).contains_key("second"));
        records.update_index(&other, &run).unwrap();
        let index = records.index(&root.join("a/../b.yaml"));
        assert!(index.contains_key("first") && index.contains_key("second"));
        assert!(records.index(&old).contains_key("first"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn utc_stamp_matches_known_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000");
        assert_eq!(utc_stamp(1_795_320_000), "20261122T040000");
    }
}
