//! The head's last step: turn a finished submission into a run record, from the cache and
//! the jobs' results; and `dagrun status`'s view of the latest submission.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use dagrun_cache::Store;

use super::follow::{JobEnd, failure_message, is_final, poll};
use super::submit::{SubmissionRecord, submissions_of};
use crate::diag::Diagnostics;
use crate::exec::{Available, PathDigests, RunLog, cached, key_parts};
use crate::graph::{Graph, Source};
use crate::kind::Registry;
use crate::records::{Records, RunRecord, StageRecord, Status};

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
        let mut record = StageRecord::new(stage, &log.run);
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
            (None, _, None) => match sub.unrunnable.iter().find(|(n, _)| n == &stage.name) {
                Some((_, e)) => {
                    record.error = Some(e.clone());
                    Status::Failed
                }
                None => {
                    record.error = Some("not run: the submission was interrupted before it".into());
                    Status::NotRun
                }
            },
            (Some(_), Some(end), None) if end.succeeded() => {
                record.error = Some(
                    "its job finished, but its result is not in the cache under this key (the cache or its inputs changed since)".into(),
                );
                Status::Failed
            }
            (Some(j), Some(end), Some(_)) if end.succeeded() => {
                let result = end.result.as_ref();
                record.seconds = result.map_or(0.0, |r| r.seconds);
                record.resumed = result.is_some_and(|r| r.resumed);
                if let Some(run) = result.and_then(|r| r.run.clone()) {
                    record.run = run;
                }
                if j.adopted_from.is_some() {
                    record.error = Some(format!(
                        "made by Slurm job {} of an earlier run, which this one followed",
                        j.job
                    ));
                }
                match result.map(|r| r.status) {
                    Some(Status::Cached) => Status::Cached,
                    _ => Status::Ran,
                }
            }
            (Some(j), end, _) => {
                let end = end.cloned().unwrap_or(JobEnd {
                    state: None,
                    result: None,
                    left: false,
                });
                let message = failure_message(j, &end);
                let not_run = message.starts_with("not run");
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

/// The graph a submission's jobs ran: its file with its `--set` overrides, if the file has
/// not changed since (its keys are those of the file as submitted).
fn submitted_graph<'a>(
    sub: &SubmissionRecord,
    registry: &Registry,
    holder: &'a mut Option<crate::pipeline::Pipeline>,
) -> Result<Graph<'a>, String> {
    let path = Path::new(&sub.pipeline_absolute);
    let pl = match super::load_submitted(path, &sub.pipeline_digest, &sub.set, registry) {
        Ok(pl) => pl,
        Err(super::Unloadable::Bad(d)) => return Err(d.to_string()),
        Err(super::Unloadable::Changed) => {
            return Err(format!(
                "{} changed since submission {}; its jobs' results are in the cache, but no run record is written for it",
                sub.pipeline, sub.id
            ));
        }
    };
    let pl = holder.insert(pl);
    crate::graph::build(pl, registry).map_err(|d| d.to_string())
}

/// `dagrun status` lines about `pipeline`'s Slurm submissions: the newest one's jobs and their
/// states. A submission whose jobs have all ended and that no head collected (`--detach`, or
/// a head that died) is collected into a run record.
pub fn status_lines(
    pipeline: &Path,
    registry: &Registry,
    store: &Store,
) -> Result<Vec<String>, Diagnostics> {
    let subs = submissions_of(store, pipeline);
    let mut lines = Vec::new();
    for (n, sub) in subs.iter().enumerate() {
        let newest = n + 1 == subs.len();
        let dir = sub.dir(store);
        let collected = dir.join("collected.json").exists();
        if collected && !newest {
            continue;
        }
        // A head still submitting or following holds this lock; it will write the record.
        let head = dagrun_cache::Lock::try_acquire(
            &dir.join("head.lock"),
            dagrun_cache::LockMode::Exclusive,
        )
        .ok()
        .flatten();
        let ids: Vec<u64> = sub.jobs.iter().map(|j| j.job).collect();
        let polled = match poll(sub, &dir, &ids) {
            Ok(p) => p,
            Err(e) => {
                if newest {
                    lines.push(format!(
                        "Slurm submission {}: cannot ask Slurm about its jobs: {}",
                        sub.id,
                        crate::exec::one_line(&e)
                    ));
                }
                continue;
            }
        };
        let all_final = ids.iter().all(|id| is_final(&polled[id]));
        if newest {
            lines.push(format!(
                "Slurm submission {} ({} jobs{}, {} stages cached then):",
                sub.id,
                sub.jobs.len(),
                if sub.complete {
                    ""
                } else {
                    ", submission cut short"
                },
                sub.cached.len()
            ));
            let width = sub.jobs.iter().map(|j| j.stage.len()).max().unwrap_or(0);
            for j in &sub.jobs {
                let end = &polled[&j.job];
                let state = match (&end.state, &end.result) {
                    (Some(s), _) if !s.is_final() => {
                        format!("{} ({})", s.state.to_lowercase(), s.reason)
                    }
                    (_, Some(r)) if end.succeeded() => {
                        format!("done ({:?}, {:.1}s)", r.status, r.seconds).to_lowercase()
                    }
                    _ => failure_message(j, end),
                };
                lines.push(format!("  {:<width$}  job {:<8} {state}", j.stage, j.job));
            }
        }
        if all_final && !collected && head.is_some() {
            let mut holder = None;
            match submitted_graph(sub, registry, &mut holder) {
                Ok(graph) => {
                    let ends: BTreeMap<String, JobEnd> = sub
                        .jobs
                        .iter()
                        .map(|j| (j.stage.clone(), polled[&j.job].clone()))
                        .collect();
                    let record = collect(&graph, store, sub, &ends)?;
                    lines.push(format!(
                        "submission {}: every job has ended; recorded as run {}",
                        sub.id, record.run
                    ));
                }
                Err(why) => {
                    lines.push(why);
                    // Said once: later calls skip it.
                    let _ = dagrun_cache::write_json_atomic(
                        &dir.join("collected.json"),
                        &serde_json::json!({ "run": null, "skipped": "the pipeline file changed" }),
                    );
                }
            }
        }
    }
    Ok(lines)
}
