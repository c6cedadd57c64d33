//! The head's side: decide what must run, submit it as jobs in DAG order, follow the jobs,
//! and turn their results into the run's record.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dagrun_cache::Store;
use serde::{Deserialize, Serialize};

use super::commands::{self, JobState, Submission};
use super::job::{self, JobResult};
use crate::diag::{Diagnostic, Diagnostics};
use crate::exec::{self, Available, PathDigests, RunLog, RunOptions, cached, key_parts};
use crate::graph::{Graph, Source};
use crate::records::{Records, RunRecord, StageRecord, Status};

/// How the head submits.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// Submit and exit; `dagrun status` follows the jobs.
    pub detach: bool,
    /// Extra `sbatch` arguments for every job (`--account=…`, `--qos=…`).
    pub sbatch_args: Vec<String>,
    /// The `--set` overrides, handed to every job.
    pub set: Vec<String>,
    /// Accept a cache on a local filesystem of a cluster with other nodes.
    pub allow_local_cache: bool,
}

/// `<cache>/slurm/<id>/submission.json`: what one head submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmissionRecord {
    pub id: String,
    pub pipeline: String,
    pub pipeline_absolute: String,
    pub pipeline_digest: String,
    pub submitted_unix: u64,
    pub jobs: Vec<SubmittedJob>,
    /// Selected stages found in the cache when submitting.
    pub cached: Vec<String>,
    /// Selected stages that cannot run: an input is neither cached nor made by a job.
    pub unrunnable: Vec<(String, String)>,
    /// The stages `--only`/`--until`/`--from` selected, by name.
    pub selected: Vec<String>,
    pub keep_going: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmittedJob {
    pub stage: String,
    pub job: u64,
    /// The jobs it waits for (`afterok`).
    pub after: Vec<u64>,
    /// Slurm's output file of the job.
    pub log: PathBuf,
}

impl SubmissionRecord {
    pub fn dir(&self, store: &Store) -> PathBuf {
        submissions_dir(store).join(&self.id)
    }
}

fn submissions_dir(store: &Store) -> PathBuf {
    store.root().join("slurm")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn executor_error(message: impl Into<String>) -> Diagnostics {
    Diagnostic::at_field("--executor slurm", message).into()
}

/// Checks the Slurm clients are here and the cache can be seen from every node.
fn preflight(root: &Path, allow_local: bool) -> Result<(), Diagnostics> {
    for tool in ["sbatch", "scontrol", "scancel", "sinfo"] {
        if !commands::on_path(tool) {
            return Err(executor_error(format!(
                "`{tool}` is not on PATH: run the head on a machine with the Slurm clients (a login node)"
            )));
        }
    }
    let Some(fs) = super::shared_fs::local_filesystem(root) else {
        return Ok(());
    };
    if allow_local {
        return Ok(());
    }
    let nodes = commands::node_names().map_err(|e| executor_error(exec::one_line(&e)))?;
    let me = super::shared_fs::short_hostname();
    let others: Vec<&String> = nodes.iter().filter(|n| **n != me).collect();
    if others.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = others.iter().take(3).map(|s| s.as_str()).collect();
    Err(Diagnostic::at_field(
        "--cache-dir",
        format!(
            "{} is on a local filesystem ({fs}) that jobs on other nodes ({}{}) cannot see; put the cache on a shared filesystem (NFS, Lustre, GPFS, BeeGFS, CephFS) with --cache-dir, or pass --allow-local-cache if every node mounts it",
            root.display(),
            shown.join(", "),
            if others.len() > 3 { ", …" } else { "" }
        ),
    )
    .into())
}

/// Submits every selected stage that is not cached, in DAG order; returns the submission.
pub fn submit(
    graph: &Graph,
    store: &Store,
    opts: &RunOptions,
    slurm: &SlurmOptions,
) -> Result<SubmissionRecord, Diagnostics> {
    let selected = exec::select(graph, opts)?;
    let root = std::path::absolute(store.root()).unwrap_or_else(|_| store.root().to_path_buf());
    preflight(&root, slurm.allow_local_cache)?;
    let pipeline_abs = crate::records::absolute(&graph.pipeline.path);
    let text = std::fs::read(&pipeline_abs)
        .map_err(|e| executor_error(format!("cannot read {}: {e}", pipeline_abs.display())))?;
    let exe = std::env::current_exe()
        .map_err(|e| executor_error(format!("cannot find the dagrun executable: {e}")))?;
    let workdir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut sub = SubmissionRecord {
        id: Records::new_run_id(),
        pipeline: graph.pipeline.path.display().to_string(),
        pipeline_absolute: pipeline_abs.display().to_string(),
        pipeline_digest: blake3::hash(&text).to_hex().to_string(),
        submitted_unix: now_unix(),
        jobs: Vec::new(),
        cached: Vec::new(),
        unrunnable: Vec::new(),
        selected: selected
            .iter()
            .map(|&i| graph.pipeline.stages[i].name.clone())
            .collect(),
        keep_going: opts.keep_going,
    };
    let dir = root.join("slurm").join(&sub.id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| executor_error(format!("cannot create {}: {e}", dir.display())))?;

    let mut available: HashMap<Source, Available> = HashMap::new();
    let mut path_digests = PathDigests::new(store);
    let mut job_of: HashMap<usize, u64> = HashMap::new();
    let mut blocked: BTreeSet<usize> = BTreeSet::new();
    for &i in &graph.order {
        let stage = &graph.pipeline.stages[i];
        if stage.skip {
            continue;
        }
        let parts = key_parts(graph, i, &available, &mut path_digests)?;
        let sources: Vec<usize> = graph.nodes[i]
            .inputs
            .iter()
            .flat_map(|x| &x.sources)
            .map(|s| s.node)
            .collect();
        let mut after: Vec<u64> = sources
            .iter()
            .filter_map(|n| job_of.get(n))
            .copied()
            .collect();
        after.sort_unstable();
        after.dedup();
        let forced = opts.force.iter().any(|f| f == &stage.name);
        let found = parts
            .as_ref()
            .and_then(|p| cached(store, &p.key()))
            .filter(|_| !forced || !selected.contains(&i));
        if let Some(found) = found {
            for (name, a) in found.outputs {
                available.insert(
                    Source {
                        node: i,
                        output: name,
                    },
                    a,
                );
            }
            if selected.contains(&i) {
                sub.cached.push(stage.name.clone());
            }
            continue;
        }
        if !selected.contains(&i) {
            continue;
        }
        if sources.iter().any(|n| blocked.contains(n)) || (parts.is_none() && after.is_empty()) {
            let missing: Vec<String> = graph.nodes[i]
                .inputs
                .iter()
                .flat_map(|x| &x.sources)
                .filter(|s| !available.contains_key(s) && !job_of.contains_key(&s.node))
                .map(|s| format!("{}.{}", graph.name(s.node), s.output))
                .collect();
            sub.unrunnable.push((
                stage.name.clone(),
                format!(
                    "not run: {} is not in the cache; run the stages that make it first",
                    missing.join(", ")
                ),
            ));
            blocked.insert(i);
            continue;
        }
        let script = dir.join(format!("{}.sh", stage.name));
        let log = dir.join(format!("{}.out", stage.name));
        let mut command = vec![
            exe.display().to_string(),
            format!("--cache-dir={}", root.display()),
            "stage-job".to_string(),
            pipeline_abs.display().to_string(),
            format!("--stage={}", stage.name),
            format!("--submission={}", dir.display()),
            format!("--pipeline-digest={}", sub.pipeline_digest),
        ];
        if forced {
            command.push("--force".into());
        }
        command.extend(slurm.set.iter().map(|s| format!("--set={s}")));
        let body = format!(
            "#!/bin/sh\n# dagrun: stage `{}` of {} (submission {})\n# One thread per CPU Slurm gave the job.\nexport RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-1}}\"\n# exec: the stage is the job's process, so `scancel` signals it directly.\nexec {}\n",
            stage.name,
            pipeline_abs.display(),
            sub.id,
            command
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let written = std::fs::write(&script, body).and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        });
        if let Err(e) = written {
            cancel_all(&sub);
            return Err(executor_error(format!(
                "cannot write {}: {e}",
                script.display()
            )));
        }
        let r = &stage.resources;
        let job_name = format!("dagrun-{}-{}", graph.pipeline.name, stage.name);
        let submission = Submission {
            job_name: &job_name,
            script: &script,
            output: &log,
            workdir: &workdir,
            cpus: r.cpus_or_one(),
            mem_mb: r.mem_mb,
            gpus: r.gpus,
            time: r.time.as_deref(),
            partition: r.partition.as_deref(),
            after_ok: after.clone(),
            extra: &slurm.sbatch_args,
        };
        let id = match commands::sbatch(&submission) {
            Ok(id) => id,
            Err(e) => {
                cancel_all(&sub);
                return Err(executor_error(format!(
                    "stage `{}`: {}",
                    stage.name,
                    exec::one_line(&e)
                )));
            }
        };
        tracing::info!(stage = %stage.name, "submitted as Slurm job {id}{}", if after.is_empty() { String::new() } else { format!(" (after {})", after.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")) });
        job_of.insert(i, id);
        sub.jobs.push(SubmittedJob {
            stage: stage.name.clone(),
            job: id,
            after,
            log,
        });
    }
    path_digests.save();
    if let Err(e) = dagrun_cache::write_json_atomic(&dir.join("submission.json"), &sub) {
        cancel_all(&sub);
        return Err(executor_error(format!("cannot record the submission: {e}")));
    }
    Ok(sub)
}

fn cancel_all(sub: &SubmissionRecord) {
    let ids: Vec<u64> = sub.jobs.iter().map(|j| j.job).collect();
    if let Err(e) = commands::scancel(&ids) {
        tracing::warn!("could not cancel jobs {ids:?}: {}", exec::one_line(&e));
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// How a job ended, as far as the head can tell.
#[derive(Debug, Clone)]
pub struct JobEnd {
    pub state: Option<JobState>,
    pub result: Option<JobResult>,
}

impl JobEnd {
    fn succeeded(&self) -> bool {
        match &self.result {
            Some(r) => matches!(r.status, Status::Ran | Status::Cached | Status::Skipped),
            None => false,
        }
    }
}

/// The latest known state of each job: `scontrol` while the controller remembers it, else
/// the job's result file.
fn poll(sub: &SubmissionRecord, dir: &Path, ids: &[u64]) -> BTreeMap<u64, JobEnd> {
    let states = commands::job_states(ids).unwrap_or_default();
    sub.jobs
        .iter()
        .filter(|j| ids.contains(&j.job))
        .map(|j| {
            let result = job::read_result(dir, &j.stage);
            let state = states.get(&j.job).cloned();
            (j.job, JobEnd { state, result })
        })
        .collect()
}

fn is_final(end: &JobEnd) -> bool {
    match &end.state {
        Some(s) => s.is_final(),
        // Forgotten by the controller: over, with or without a result.
        None => true,
    }
}

/// Follows the jobs until every one has ended; Ctrl-C cancels them. Without `keep_going`, a
/// failed job cancels the jobs that have not started.
pub fn follow(store: &Store, sub: &SubmissionRecord) -> BTreeMap<String, JobEnd> {
    super::catch_interrupts();
    let dir = sub.dir(store);
    let mut ends: BTreeMap<String, JobEnd> = BTreeMap::new();
    let mut shown: HashMap<u64, String> = HashMap::new();
    let mut cancelled = false;
    let mut last_summary = Instant::now();
    loop {
        let open: Vec<u64> = sub
            .jobs
            .iter()
            .filter(|j| !ends.contains_key(&j.stage))
            .map(|j| j.job)
            .collect();
        if open.is_empty() {
            break;
        }
        if super::interrupted() && !cancelled {
            tracing::warn!("interrupted: cancelling jobs {}", list(&open));
            let _ = commands::scancel(&open);
            cancelled = true;
        }
        let polled = poll(sub, &dir, &open);
        let mut running = Vec::new();
        let mut failed_now = false;
        for j in sub.jobs.iter().filter(|j| open.contains(&j.job)) {
            let Some(end) = polled.get(&j.job) else {
                continue;
            };
            let state = end.state.as_ref().map_or("ENDED", |s| s.state.as_str());
            if shown.get(&j.job).map(String::as_str) != Some(state) {
                shown.insert(j.job, state.to_string());
                if !is_final(end) {
                    tracing::info!(stage = %j.stage, "Slurm job {} {}", j.job, state.to_lowercase());
                }
            }
            if state == "RUNNING" {
                running.push(format!("{} (job {}): {}", j.stage, j.job, last_line(&j.log)));
            }
            if !is_final(end) {
                continue;
            }
            if end.succeeded() {
                tracing::info!(stage = %j.stage, "Slurm job {} completed", j.job);
            } else {
                failed_now = true;
                tracing::error!(stage = %j.stage, "{}", failure_message(j, end));
            }
            ends.insert(j.stage.clone(), end.clone());
        }
        if failed_now && !sub.keep_going && !cancelled {
            let waiting: Vec<u64> = sub
                .jobs
                .iter()
                .filter(|j| !ends.contains_key(&j.stage))
                .filter(|j| {
                    polled
                        .get(&j.job)
                        .and_then(|e| e.state.as_ref())
                        .is_some_and(|s| s.state == "PENDING")
                })
                .map(|j| j.job)
                .collect();
            if !waiting.is_empty() {
                tracing::warn!(
                    "a stage failed: cancelling jobs that have not started ({}); --keep-going lets them run",
                    list(&waiting)
                );
                let _ = commands::scancel(&waiting);
            }
        }
        if last_summary.elapsed() > Duration::from_secs(15) && !running.is_empty() {
            for line in &running {
                tracing::info!("running {line}");
            }
            last_summary = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    ends
}

/// The last line a job wrote (its stage's latest progress line), shortened.
fn last_line(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    // The tail only: a long stage's output grows to megabytes.
    let mut tail = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = f.read_to_end(&mut tail);
    }
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let line = line.trim();
    match line.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

fn list(ids: &[u64]) -> String {
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line saying why a job's stage did not finish, with the job id and its log.
fn failure_message(j: &SubmittedJob, end: &JobEnd) -> String {
    let state = end.state.as_ref();
    let how = match state {
        Some(s) if s.reason == "DependencyNeverSatisfied" && end.result.is_none() => {
            return format!(
                "not run: an input's job failed or was cancelled (Slurm job {} {})",
                j.job,
                s.state.to_lowercase()
            );
        }
        // Slurm gives a job cancelled while pending its cancel time as start and end.
        Some(s) if s.state == "CANCELLED" && end.result.is_none() && s.start == s.end => {
            return format!(
                "not run: Slurm job {} was cancelled before it started",
                j.job
            );
        }
        Some(s) if s.state == "CANCELLED" && end.result.is_none() => {
            return format!(
                "cancelled mid-stage (Slurm job {}, log {}); the next run resumes it from its checkpoints",
                j.job,
                j.log.display()
            );
        }
        Some(s) => format!(
            "{} (exit {})",
            s.state.to_lowercase(),
            s.exit_code.as_deref().unwrap_or("?")
        ),
        None => "ended".to_string(),
    };
    let error = end
        .result
        .as_ref()
        .and_then(|r| r.error.clone())
        .unwrap_or_else(|| format!("Slurm job {} {how} without a result", j.job));
    format!("{error} [Slurm job {}, log {}]", j.job, j.log.display())
}

/// The run record of a finished submission, from the cache and the jobs' results; written
/// to the run records like a local run's.
pub fn collect(
    graph: &Graph,
    store: &Store,
    sub: &SubmissionRecord,
    ends: &BTreeMap<String, JobEnd>,
) -> Result<RunRecord, Diagnostics> {
    let selected: BTreeSet<usize> = (0..graph.pipeline.stages.len())
        .filter(|&i| sub.selected.contains(&graph.pipeline.stages[i].name))
        .collect();
    let records = Records::new(store.root());
    let log = RunLog::started_at(sub.submitted_unix);
    let mut available: HashMap<Source, Available> = HashMap::new();
    let mut path_digests = PathDigests::new(store);
    let mut stages = Vec::new();
    for &i in &graph.order {
        let stage = &graph.pipeline.stages[i];
        let mut record = StageRecord {
            name: stage.name.clone(),
            kind: stage.kind.clone(),
            status: Status::Skipped,
            key: None,
            outputs: BTreeMap::new(),
            seconds: 0.0,
            resumed: false,
            error: None,
            parts: None,
            run: log.run.clone(),
            started_unix: None,
            slurm_job: None,
        };
        if stage.skip {
            if selected.contains(&i) {
                stages.push(record);
            }
            continue;
        }
        let parts = key_parts(graph, i, &available, &mut path_digests)?;
        let found = parts.as_ref().and_then(|p| cached(store, &p.key()));
        if let Some(found) = &found {
            for (name, a) in &found.outputs {
                available.insert(
                    Source {
                        node: i,
                        output: name.clone(),
                    },
                    a.clone(),
                );
                record.outputs.insert(name.clone(), a.digest.clone());
            }
        }
        if !selected.contains(&i) {
            continue;
        }
        record.key = parts.as_ref().map(|p| p.key());
        record.parts = parts;
        let job = sub.jobs.iter().find(|j| j.stage == stage.name);
        let end = ends.get(&stage.name);
        record.slurm_job = job.map(|j| j.job);
        record.started_unix = end
            .and_then(|e| e.state.as_ref())
            .and_then(|s| s.start)
            .map(|t| t as f64);
        record.status = match (job, end, &found) {
            (None, _, Some(_)) => Status::Cached,
            (None, _, None) => {
                record.error = sub
                    .unrunnable
                    .iter()
                    .find(|(n, _)| n == &stage.name)
                    .map(|(_, e)| e.clone());
                Status::Failed
            }
            (Some(j), Some(end), Some(_)) if end.succeeded() => {
                let result = end.result.as_ref();
                record.seconds = result.map_or(0.0, |r| r.seconds);
                record.resumed = result.is_some_and(|r| r.resumed);
                if let Some(run) = result.and_then(|r| r.run.clone()) {
                    record.run = run;
                }
                let _ = j;
                match result.map(|r| r.status) {
                    Some(Status::Cached) => Status::Cached,
                    _ => Status::Ran,
                }
            }
            (Some(j), end, _) => {
                let end = end.cloned().unwrap_or(JobEnd {
                    state: None,
                    result: None,
                });
                let message = failure_message(j, &end);
                let not_run = message.starts_with("not run:");
                record.started_unix = record.started_unix.filter(|_| !not_run);
                record.error = Some(message);
                if not_run {
                    Status::NotRun
                } else {
                    Status::Failed
                }
            }
        };
        stages.push(record);
    }
    path_digests.save();
    log.save(&records, graph, &stages, Vec::new());
    let _ = dagrun_cache::write_json_atomic(
        &sub.dir(store).join("collected.json"),
        &serde_json::json!({ "run": log.run }),
    );
    Ok(log.record(graph, stages))
}

/// The newest submission of `pipeline` in this cache, if any.
pub fn latest_submission(store: &Store, pipeline: &Path) -> Option<SubmissionRecord> {
    let want = crate::records::absolute(pipeline).display().to_string();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(submissions_dir(store))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    dirs.iter().rev().find_map(|d| {
        let s: SubmissionRecord =
            serde_json::from_slice(&std::fs::read(d.join("submission.json")).ok()?).ok()?;
        (s.pipeline_absolute == want).then_some(s)
    })
}

/// `dagrun status` lines for the newest submission of `pipeline`: each job's state. Once
/// every job has ended and no head collected them (`--detach`), collects them into a run
/// record.
pub fn status_lines(graph: &Graph, store: &Store) -> Result<Vec<String>, Diagnostics> {
    let Some(sub) = latest_submission(store, &graph.pipeline.path) else {
        return Ok(Vec::new());
    };
    let dir = sub.dir(store);
    let ids: Vec<u64> = sub.jobs.iter().map(|j| j.job).collect();
    let polled = poll(&sub, &dir, &ids);
    let mut lines = vec![format!(
        "Slurm submission {} ({} jobs, {} stages cached then):",
        sub.id,
        sub.jobs.len(),
        sub.cached.len()
    )];
    let width = sub.jobs.iter().map(|j| j.stage.len()).max().unwrap_or(0);
    let mut all_final = true;
    for j in &sub.jobs {
        let end = &polled[&j.job];
        all_final &= is_final(end);
        let state = match (&end.state, &end.result) {
            (Some(s), _) if !s.is_final() => format!("{} ({})", s.state.to_lowercase(), s.reason),
            (_, Some(r)) if end.succeeded() => {
                format!("done ({:?}, {:.1}s)", r.status, r.seconds).to_lowercase()
            }
            _ => failure_message(j, end),
        };
        lines.push(format!("  {:<width$}  job {:<8} {state}", j.stage, j.job));
    }
    if all_final && !dir.join("collected.json").exists() {
        let ends: BTreeMap<String, JobEnd> = sub
            .jobs
            .iter()
            .map(|j| (j.stage.clone(), polled[&j.job].clone()))
            .collect();
        let record = collect(graph, store, &sub, &ends)?;
        lines.push(format!(
            "every job has ended: recorded as run {}",
            record.run
        ));
    }
    Ok(lines)
}
