//! Inside a Slurm job: `dagrun stage-job` runs one stage of the submitted pipeline against the
//! shared cache, like `dagrun run FILE --only STAGE`, and leaves a result file for the head.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cli::{EXIT_OK, EXIT_STAGE_FAILED, GlobalArgs, cache_root_for, open_store};
use crate::diag::{Diagnostic, Diagnostics};
use crate::exec::RunOptions;
use crate::kind::Registry;
use crate::progress::ProgressMode;
use crate::records::Status;

/// `dagrun stage-job`: what a submitted job runs (not meant to be typed).
#[derive(Debug, Args)]
pub struct StageJobArgs {
    /// The pipeline file, as submitted.
    pub file: PathBuf,
    /// The stage to run.
    #[arg(long)]
    pub stage: String,
    /// The submission's directory (`<cache>/slurm/<id>`), where the result file goes.
    #[arg(long)]
    pub submission: PathBuf,
    /// The blake3 of the pipeline file when it was submitted: a file edited since is not run.
    #[arg(long)]
    pub pipeline_digest: String,
    /// Re-run the stage even if its result is cached (`--force` on the head).
    #[arg(long)]
    pub force: bool,
    /// The head's `--set` overrides.
    #[arg(long = "set")]
    pub set: Vec<String>,
}

/// What a job leaves for the head: `<submission>/<stage>.result.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    /// The run id the job recorded (its logs are under `runs/<run>/`).
    pub run: Option<String>,
    pub status: Status,
    pub error: Option<String>,
    pub seconds: f64,
    pub resumed: bool,
}

pub fn result_path(submission: &Path, stage: &str) -> PathBuf {
    submission.join(format!("{stage}.result.json"))
}

pub fn read_result(submission: &Path, stage: &str) -> Option<JobResult> {
    serde_json::from_slice(&std::fs::read(result_path(submission, stage)).ok()?).ok()
}

pub fn stage_job(a: StageJobArgs, g: &GlobalArgs, registry: &Registry) -> i32 {
    let failed = |error: String| JobResult {
        run: None,
        status: Status::Failed,
        error: Some(error),
        seconds: 0.0,
        resumed: false,
    };
    let result = match run_stage(&a, g, registry) {
        Ok(r) => r,
        Err(d) => {
            eprintln!("{d}");
            failed(d.to_string())
        }
    };
    if let Err(e) = dagrun_cache::write_json_atomic(&result_path(&a.submission, &a.stage), &result)
    {
        eprintln!(
            "cannot write the job's result into {}: {e}",
            a.submission.display()
        );
    }
    match result.status {
        Status::Ran | Status::Cached | Status::Skipped => EXIT_OK,
        _ => EXIT_STAGE_FAILED,
    }
}

fn run_stage(
    a: &StageJobArgs,
    g: &GlobalArgs,
    registry: &Registry,
) -> Result<JobResult, Diagnostics> {
    let pl = match super::load_submitted(&a.file, &a.pipeline_digest, &a.set, registry) {
        Ok(pl) => pl,
        Err(super::Unloadable::Bad(d)) => return Err(d),
        Err(super::Unloadable::Changed) => {
            return Err(Diagnostic::at_file(
                &a.file.display().to_string(),
                crate::diag::Pos::START,
                "the pipeline file changed since this job was submitted; run `dagrun` again to submit the new version",
            )
            .into());
        }
    };
    let graph = crate::graph::build(&pl, registry)?;
    let root = cache_root_for(g, &a.file);
    if !root.join("objects").is_dir() && !root.join("runs").is_dir() {
        return Err(Diagnostic::at_field(
            "--cache-dir",
            format!(
                "{} is not a dagrun cache on node {}: is it on a filesystem every node mounts at the same path?",
                root.display(),
                super::shared_fs::short_hostname()
            ),
        )
        .into());
    }
    let store = open_store(&root)?;
    let opts = RunOptions {
        only: vec![a.stage.clone()],
        force: if a.force {
            vec![a.stage.clone()]
        } else {
            Vec::new()
        },
        progress: Some(ProgressMode::Log),
        ..Default::default()
    };
    let record = crate::scheduler::run(&graph, registry, &store, &opts)?;
    let stage = record.stages.iter().find(|s| s.name == a.stage);
    Ok(JobResult {
        run: Some(record.run.clone()),
        status: stage.map_or(Status::Failed, |s| s.status),
        error: stage.and_then(|s| s.error.clone()),
        seconds: stage.map_or(0.0, |s| s.seconds),
        resumed: stage.is_some_and(|s| s.resumed),
    })
}
