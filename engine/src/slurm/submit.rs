//! The head's first step: decide what must run and submit it as jobs in DAG order.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use dagrun_cache::Store;
use serde::{Deserialize, Serialize};

use super::commands::{self, Submission};
use crate::diag::{Diagnostic, Diagnostics};
use crate::exec::{self, Available, PathDigests, RunOptions, cached, key_parts};
use crate::graph::{Graph, Source};
use crate::records::Records;

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
    /// The `--set` overrides the jobs run with (collecting needs them for the keys).
    #[serde(default)]
    pub set: Vec<String>,
    /// Every job was submitted (false while submitting, or after an interrupted submission).
    #[serde(default)]
    pub complete: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmittedJob {
    pub stage: String,
    pub job: u64,
    /// The jobs it waits for (`afterok`).
    pub after: Vec<u64>,
    /// Slurm's output file of the job.
    pub log: PathBuf,
    /// The stage's key when it was submitted, if its inputs were in the cache then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Set for a job of an earlier submission that this one follows instead of submitting
    /// the stage again: that submission's directory, where the job leaves its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<PathBuf>,
}

impl SubmittedJob {
    /// Where the job leaves its result file.
    pub fn result_dir(&self, own: &Path) -> PathBuf {
        self.adopted_from
            .clone()
            .unwrap_or_else(|| own.to_path_buf())
    }
}

impl SubmissionRecord {
    /// Absolute: job scripts, and other heads' `adopted_from`, name it from anywhere.
    pub fn dir(&self, store: &Store) -> PathBuf {
        let dir = submissions_dir(store).join(&self.id);
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// Written after every `sbatch`, so a head that dies mid-way leaves its jobs findable.
    fn save(&self, dir: &Path) -> Result<(), Diagnostics> {
        dagrun_cache::write_json_atomic(&dir.join("submission.json"), self)
            .map_err(|e| executor_error(format!("cannot record the submission: {e}")))
    }
}

pub(crate) fn submissions_dir(store: &Store) -> PathBuf {
    store.root().join("slurm")
}

/// Every submission of `pipeline` in this cache, oldest first.
pub(crate) fn submissions_of(store: &Store, pipeline: &Path) -> Vec<SubmissionRecord> {
    let want = crate::records::absolute(pipeline).display().to_string();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(submissions_dir(store))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.iter()
        .filter_map(|d| {
            let s: SubmissionRecord =
                serde_json::from_slice(&std::fs::read(d.join("submission.json")).ok()?).ok()?;
            (s.pipeline_absolute == want).then_some(s)
        })
        .collect()
}

/// Jobs of earlier submissions of the same file and overrides that are still queued or
/// running, by stage, with the states of every job of those submissions: a new head may
/// follow them rather than queue the stages again (see [`adoptable`]).
fn in_flight(
    store: &Store,
    sub: &SubmissionRecord,
) -> (
    HashMap<String, SubmittedJob>,
    HashMap<u64, commands::JobState>,
) {
    let earlier: Vec<SubmissionRecord> = submissions_of(store, Path::new(&sub.pipeline_absolute))
        .into_iter()
        .filter(|s| s.pipeline_digest == sub.pipeline_digest && s.set == sub.set)
        .filter(|s| !s.dir(store).join("collected.json").exists())
        .collect();
    let ids: Vec<u64> = earlier
        .iter()
        .flat_map(|s| s.jobs.iter().map(|j| j.job))
        .collect();
    let Ok(states) = commands::job_states(&ids) else {
        return (HashMap::new(), HashMap::new());
    };
    let states: HashMap<u64, commands::JobState> = states
        .into_iter()
        .filter_map(|(id, st)| Some((id, st?)))
        .collect();
    let mut out = HashMap::new();
    for s in &earlier {
        for j in &s.jobs {
            if states.get(&j.job).is_some_and(|st| !st.is_final()) {
                let mut adopted = j.clone();
                adopted.adopted_from = Some(j.result_dir(&s.dir(store)));
                out.insert(j.stage.clone(), adopted);
            }
        }
    }
    (out, states)
}

/// Whether an earlier run's queued `job` computes what this run would: its key (when known
/// now) is this run's, and each job it waits for is followed here too or completed — not a
/// job whose input failed, which Slurm is about to cancel.
fn adoptable(
    job: &SubmittedJob,
    key: Option<&str>,
    followed: &HashMap<usize, u64>,
    states: &HashMap<u64, commands::JobState>,
) -> bool {
    let key_matches = match (key, job.key.as_deref()) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => false,
        (None, _) => true,
    };
    let doomed = states
        .get(&job.job)
        .is_some_and(|s| s.reason == "DependencyNeverSatisfied");
    let parents_hold = job
        .after
        .iter()
        .all(|p| followed.values().any(|f| f == p) || states.get(p).is_some_and(|s| s.succeeded()));
    key_matches && !doomed && parents_hold
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
    for tool in ["sbatch", "squeue", "scancel", "sinfo", "scontrol"] {
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

/// Submits every selected stage that is not cached, in DAG order; returns the submission
/// (`complete` false if Ctrl-C cut it short: its jobs are cancelled then) and the lock that
/// tells `dagrun status` a head owns it.
pub fn submit(
    graph: &Graph,
    store: &Store,
    opts: &RunOptions,
    slurm: &SlurmOptions,
) -> Result<(SubmissionRecord, dagrun_cache::Lock), Diagnostics> {
    super::catch_interrupts();
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
        set: slurm.set.clone(),
        complete: false,
    };
    let (in_flight, earlier_states) = in_flight(store, &sub);
    let dir = root.join("slurm").join(&sub.id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| executor_error(format!("cannot create {}: {e}", dir.display())))?;
    // Held while this head submits and follows, so `dagrun status` leaves the record to it.
    let head =
        dagrun_cache::Lock::acquire(&dir.join("head.lock"), dagrun_cache::LockMode::Exclusive)
            .map_err(|e| executor_error(e.to_string()))?;

    let mut available: HashMap<Source, Available> = HashMap::new();
    let mut path_digests = PathDigests::new(store);
    let mut job_of: HashMap<usize, u64> = HashMap::new();
    let mut blocked: BTreeSet<usize> = BTreeSet::new();
    for &i in &graph.order {
        let stage = &graph.pipeline.stages[i];
        if stage.skip {
            continue;
        }
        let parts = match key_parts(graph, i, &available, &mut path_digests) {
            Ok(p) => p,
            Err(e) => {
                cancel_own(&sub);
                return Err(e.into());
            }
        };
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
        let key = parts.as_ref().map(|p| p.key());
        if let Some(job) = in_flight
            .get(&stage.name)
            .filter(|j| !forced && adoptable(j, key.as_deref(), &job_of, &earlier_states))
        {
            tracing::info!(stage = %stage.name, "already queued as Slurm job {} by an earlier run: following it", job.job);
            job_of.insert(i, job.job);
            sub.jobs.push(job.clone());
            if let Err(e) = sub.save(&dir) {
                cancel_own(&sub);
                return Err(e);
            }
            continue;
        }
        if super::interrupted() {
            tracing::warn!("interrupted while submitting: cancelling what was submitted");
            cancel_own(&sub);
            return Ok((sub, head));
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
            cancel_own(&sub);
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
                cancel_own(&sub);
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
            key,
            adopted_from: None,
        });
        if let Err(e) = sub.save(&dir) {
            cancel_own(&sub);
            return Err(e);
        }
    }
    path_digests.save();
    if super::interrupted() {
        tracing::warn!("interrupted while submitting: cancelling what was submitted");
        cancel_own(&sub);
        return Ok((sub, head));
    }
    sub.complete = true;
    if let Err(e) = sub.save(&dir) {
        cancel_own(&sub);
        return Err(e);
    }
    Ok((sub, head))
}

/// Cancels the jobs this submission queued itself (not those it follows for another head).
fn cancel_own(sub: &SubmissionRecord) {
    let ids: Vec<u64> = sub
        .jobs
        .iter()
        .filter(|j| j.adopted_from.is_none())
        .map(|j| j.job)
        .collect();
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
