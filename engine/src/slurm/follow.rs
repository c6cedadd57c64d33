//! The head's second step: follow the jobs until they end, cancel them on Ctrl-C, and say
//! why a job's stage did not finish.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use dagrun_cache::Store;

use super::commands::{self, JobState};
use super::job::{self, JobResult};
use super::submit::{SubmissionRecord, SubmittedJob};
use crate::records::Status;

/// How often the controller is asked (one `squeue` for every open job).
const POLL: Duration = Duration::from_secs(2);

/// How a job ended, as far as the head can tell.
#[derive(Debug, Clone)]
pub struct JobEnd {
    pub state: Option<JobState>,
    pub result: Option<JobResult>,
    /// A job of an earlier run that this head followed and left running when interrupted.
    pub left: bool,
}

impl JobEnd {
    pub(crate) fn succeeded(&self) -> bool {
        match &self.result {
            Some(r) => matches!(r.status, Status::Ran | Status::Cached | Status::Skipped),
            None => false,
        }
    }
}

/// The latest known state of each job: the controller's while it remembers the job, and the
/// job's result file. An error means the controller could not be asked (not that jobs ended).
pub(crate) fn poll(
    sub: &SubmissionRecord,
    dir: &Path,
    ids: &[u64],
) -> anyhow::Result<BTreeMap<u64, JobEnd>> {
    let states = commands::job_states(ids)?;
    Ok(sub
        .jobs
        .iter()
        .filter(|j| ids.contains(&j.job))
        .map(|j| {
            let result = job::read_result(&j.result_dir(dir), &j.stage);
            let state = states.get(&j.job).cloned().flatten();
            (
                j.job,
                JobEnd {
                    state,
                    result,
                    left: false,
                },
            )
        })
        .collect())
}

pub(crate) fn is_final(end: &JobEnd) -> bool {
    match &end.state {
        Some(s) => s.is_final(),
        // Forgotten by the controller: over, with or without a result.
        None => true,
    }
}

/// Follows the jobs until every one has ended; Ctrl-C cancels this head's own jobs and stops
/// following those of an earlier run. Without `keep_going`, a failed job cancels this head's
/// jobs that have not started. An error: Slurm stopped answering (the jobs may still run).
pub fn follow(store: &Store, sub: &SubmissionRecord) -> Result<BTreeMap<String, JobEnd>, String> {
    super::catch_interrupts();
    let dir = sub.dir(store);
    let mut ends: BTreeMap<String, JobEnd> = BTreeMap::new();
    let mut shown: HashMap<u64, String> = HashMap::new();
    let mut cancelled = false;
    let mut last_summary = Instant::now();
    let mut unreachable_since: Option<Instant> = None;
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
            let own: Vec<u64> = sub
                .jobs
                .iter()
                .filter(|j| open.contains(&j.job) && j.adopted_from.is_none())
                .map(|j| j.job)
                .collect();
            tracing::warn!(
                "interrupted: cancelling jobs {} (Ctrl-C again exits at once)",
                list(&own)
            );
            if let Err(e) = commands::scancel(&own) {
                tracing::error!("{}", crate::exec::one_line(&e));
            }
            cancelled = true;
            // Another run's jobs are not ours to cancel, nor to wait for.
            for j in sub
                .jobs
                .iter()
                .filter(|j| open.contains(&j.job) && j.adopted_from.is_some())
            {
                ends.insert(
                    j.stage.clone(),
                    JobEnd {
                        state: None,
                        result: None,
                        left: true,
                    },
                );
            }
            continue;
        }
        let polled = match poll(sub, &dir, &open) {
            Ok(p) => {
                unreachable_since = None;
                p
            }
            Err(e) => {
                // A busy or restarting controller: the jobs go on; ask again.
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(3600) {
                    return Err(format!(
                        "gave up following the jobs after an hour without an answer from Slurm ({}); they may still run: `dagrun status` follows them later",
                        crate::exec::one_line(&e)
                    ));
                }
                tracing::warn!(
                    "cannot ask Slurm about the jobs (will retry): {}",
                    crate::exec::one_line(&e)
                );
                std::thread::sleep(POLL * 5);
                continue;
            }
        };
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
                running.push(format!(
                    "{} (job {}): {}",
                    j.stage,
                    j.job,
                    last_line(&j.log)
                ));
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
                .filter(|j| !ends.contains_key(&j.stage) && j.adopted_from.is_none())
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
        std::thread::sleep(POLL);
    }
    Ok(ends)
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
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
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
pub(crate) fn failure_message(j: &SubmittedJob, end: &JobEnd) -> String {
    if end.left {
        return format!(
            "not run here: left running as Slurm job {} of an earlier run when this one was interrupted",
            j.job
        );
    }
    let state = end.state.as_ref();
    let how = match state {
        Some(s) if s.reason == "DependencyNeverSatisfied" && end.result.is_none() => {
            return format!(
                "not run: an input's job failed or was cancelled (Slurm job {} {})",
                j.job,
                s.state.to_lowercase()
            );
        }
        // Slurm creates a job's output file when it starts: without one, it never ran.
        Some(s) if s.state == "CANCELLED" && end.result.is_none() && !j.log.exists() => {
            return format!(
                "not run: Slurm job {} was cancelled before it started",
                j.job
            );
        }
        Some(s)
            if s.reason == "JobLaunchFailure"
                || s.exit_code.as_deref() == Some("0:53")
                || s.held_after_launch_failure() =>
        {
            return format!(
                "Slurm job {} could not start on its node: it could not open its log {} — is the cache mounted at the same path on every node?",
                j.job,
                j.log.display()
            );
        }
        Some(s) if s.state == "TIMEOUT" && end.result.is_none() => {
            return format!(
                "hit its time limit (Slurm job {}, log {}); the next run resumes it from its checkpoints — raise `resources.time`",
                j.job,
                j.log.display()
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
