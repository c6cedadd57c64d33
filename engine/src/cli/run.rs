//! `run`, `plan` and `status`.

use std::path::PathBuf;

use clap::Args;

use super::{
    EXIT_INTERRUPTED, EXIT_OK, EXIT_STAGE_FAILED, GlobalArgs, RunDone, cache_root_for, open_store,
};
use crate::diag::Diagnostics;
use crate::exec::RunOptions;
use crate::graph;
use crate::kind::Registry;
use crate::pipeline::{self, Override, Pipeline};
use crate::plan::{self, Action};
use crate::progress::ProgressMode;
use crate::records::{Records, Status};
use crate::slurm::{self, SlurmOptions};

#[derive(Debug, Args)]
pub struct FileArg {
    /// The pipeline file.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct Selection {
    /// Run only these stages (their inputs must be cached).
    #[arg(long, num_args = 1..)]
    pub only: Vec<String>,
    /// Run this stage and what it needs, nothing downstream.
    #[arg(long)]
    pub until: Option<String>,
    /// Run this stage and everything downstream of it (its inputs must be cached).
    #[arg(long)]
    pub from: Option<String>,
    /// Re-run these stages even if their results are cached.
    #[arg(long, num_args = 1..)]
    pub force: Vec<String>,
    /// Override a param: `--set rl.lr=2e-5` (the value is read as YAML).
    #[arg(long = "set", value_name = "NODE.PARAM=VALUE")]
    pub set: Vec<String>,
}

impl Selection {
    fn options(&self) -> RunOptions {
        RunOptions {
            only: self.only.clone(),
            until: self.until.clone(),
            from: self.from.clone(),
            force: self.force.clone(),
            ..Default::default()
        }
    }

    fn overrides(&self) -> Result<Vec<Override>, Diagnostics> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for s in &self.set {
            match Override::parse(s) {
                Ok(o) => out.push(o),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(Diagnostics(errors))
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file.
    pub file: PathBuf,
    #[command(flatten)]
    pub selection: Selection,
    /// Print the plan instead of running.
    #[arg(long)]
    pub dry_run: bool,
    /// After a stage fails, go on with the stages that do not depend on it.
    #[arg(long)]
    pub keep_going: bool,
    /// End with one JSON line describing the run.
    #[arg(long)]
    pub json: bool,
    /// Stages run at once in this process, within the machine's CPUs and memory (each
    /// stage's `resources`). Default: the file's `jobs:`, else 1 (one model stage already uses
    /// every core of a CPU machine).
    #[arg(short = 'j', long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub jobs: Option<u32>,
    /// Where stages run: here (`local`), or one Slurm job each (`slurm`). Default: the file's
    /// `executor:`, else local.
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorArg>,
    /// With `--executor slurm`: submit and exit; `dagrun status FILE` follows the jobs.
    #[arg(long)]
    pub detach: bool,
    /// With `--executor slurm`: an extra `sbatch` argument for every job (repeatable), e.g.
    /// `--sbatch-arg=--account=nlp`.
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// With `--executor slurm`: accept a cache on a local filesystem although the cluster has
    /// other nodes (when every node mounts it at the same path by other means).
    #[arg(long)]
    pub allow_local_cache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The pipeline file.
    pub file: PathBuf,
    #[command(flatten)]
    pub selection: Selection,
    /// Print the plan as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn load(
    file: &std::path::Path,
    registry: &Registry,
    selection: Option<&Selection>,
) -> Result<Pipeline, Diagnostics> {
    let overrides = match selection {
        Some(s) => s.overrides()?,
        None => Vec::new(),
    };
    pipeline::load(file, registry, &overrides)
}

pub fn run(
    a: RunArgs,
    g: &GlobalArgs,
    registry: &Registry,
    progress: ProgressMode,
    after_run: &dyn Fn(&RunDone),
) -> Result<i32, Diagnostics> {
    if a.dry_run {
        let plan_args = PlanArgs {
            file: a.file,
            selection: a.selection,
            json: a.json,
        };
        return plan(plan_args, g, registry);
    }
    let pl = load(&a.file, registry, Some(&a.selection))?;
    let graph = graph::build(&pl, registry)?;
    let store = open_store(&cache_root_for(g, &a.file))?;
    let jobs = a.jobs.or(pl.jobs).unwrap_or(1);
    let opts = RunOptions {
        keep_going: a.keep_going,
        progress: Some(progress),
        jobs: jobs as usize,
        ..a.selection.options()
    };
    let slurm = match a.executor {
        Some(ExecutorArg::Slurm) => true,
        Some(ExecutorArg::Local) => false,
        None => pl.executor == Some(pipeline::Executor::Slurm),
    };
    if a.detach && !slurm {
        return Err(crate::diag::Diagnostic::at_field(
            "--detach",
            "only with the Slurm executor (`--executor slurm` or `executor: slurm` in the file)",
        )
        .into());
    }
    if slurm && a.jobs.is_some_and(|j| j > 1) {
        tracing::warn!("--jobs applies to the local executor; Slurm decides what runs at once");
    }
    let record = if slurm {
        let _store_lock = super::lock_store_shared(&store)?;
        let options = SlurmOptions {
            detach: a.detach,
            sbatch_args: a.sbatch_args.clone(),
            set: a.selection.set.clone(),
            allow_local_cache: a.allow_local_cache,
        };
        let (sub, _head) = slurm::submit(&graph, &store, &opts, &options)?;
        if a.detach && (!sub.complete || slurm::interrupted_run()) {
            eprintln!("interrupted while submitting: this run's jobs are cancelled");
            return Ok(EXIT_INTERRUPTED);
        }
        if a.detach {
            let ids = |adopted: bool| -> Vec<String> {
                sub.jobs
                    .iter()
                    .filter(|j| j.adopted_from.is_some() == adopted)
                    .map(|j| j.job.to_string())
                    .collect()
            };
            let (own, followed) = (ids(false), ids(true));
            let followed = if followed.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} already queued ({})",
                    followed.len(),
                    followed.join(", ")
                )
            };
            let own = if own.is_empty() {
                "submitted no jobs".to_string()
            } else {
                format!("submitted {} jobs ({})", own.len(), own.join(", "))
            };
            eprintln!(
                "{own}{followed} for {}; {} stages cached. `dagrun status {}` follows them.",
                a.file.display(),
                sub.cached.len(),
                a.file.display()
            );
            return Ok(EXIT_OK);
        }
        let ends = match slurm::follow(&store, &sub) {
            Ok(ends) => ends,
            Err(why) => {
                eprintln!("{why}");
                return Ok(EXIT_STAGE_FAILED);
            }
        };
        let record = slurm::collect(&graph, &store, &sub, &ends)?;
        if slurm::interrupted_run() {
            eprintln!("{}", summary_line(&record));
            return Ok(EXIT_INTERRUPTED);
        }
        record
    } else {
        crate::scheduler::run(&graph, registry, &store, &opts)?
    };
    let failed = record.stages.iter().any(|s| s.status == Status::Failed);
    if !g.quiet {
        eprintln!("{}", summary_line(&record));
        let summary = Records::new(store.root())
            .run_dir(&record.run)
            .join("summary.md");
        if let Ok(text) = std::fs::read_to_string(&summary) {
            eprintln!("{text}");
        }
    }
    after_run(&RunDone {
        graph: &graph,
        store: &store,
        record: &record,
        globals: g,
    });
    if a.json {
        println!("{}", record.to_json_line());
    }
    Ok(if failed { EXIT_STAGE_FAILED } else { EXIT_OK })
}

fn summary_line(record: &crate::records::RunRecord) -> String {
    let count = |s: Status| record.stages.iter().filter(|x| x.status == s).count();
    let not_run = match count(Status::NotRun) {
        0 => String::new(),
        n => format!(", {n} not run"),
    };
    format!(
        "run {}: {} ran, {} cached, {} skipped, {} failed{not_run} in {:.1}s",
        record.run,
        count(Status::Ran),
        count(Status::Cached),
        count(Status::Skipped),
        count(Status::Failed),
        record.seconds
    )
}

pub fn plan(a: PlanArgs, g: &GlobalArgs, registry: &Registry) -> Result<i32, Diagnostics> {
    let pl = load(&a.file, registry, Some(&a.selection))?;
    let graph = graph::build(&pl, registry)?;
    let store = open_store(&cache_root_for(g, &a.file))?;
    let planned = plan::plan(&graph, &store, &a.selection.options())?;
    if a.json {
        println!("{}", serde_json::json!({ "stages": planned }));
        return Ok(EXIT_OK);
    }
    let width = planned.iter().map(|p| p.name.len()).max().unwrap_or(0);
    for p in &planned {
        let action = match p.action {
            Action::Cached => "cached",
            Action::Run => "run",
            Action::Skipped => "skipped",
            Action::Unselected => "-",
        };
        let why = if p.reasons.is_empty() {
            String::new()
        } else {
            format!("  ({})", p.reasons.join("; "))
        };
        println!("{:<width$}  {:<8} {}{}", p.name, action, p.kind, why);
    }
    Ok(EXIT_OK)
}

pub fn status(a: FileArg, g: &GlobalArgs, registry: &Registry) -> Result<i32, Diagnostics> {
    let pl = load(&a.file, registry, None)?;
    let graph = graph::build(&pl, registry)?;
    let store = open_store(&cache_root_for(g, &a.file))?;
    let planned = plan::plan(&graph, &store, &RunOptions::default())?;
    let index = Records::new(store.root()).index(&a.file);
    let width = planned.iter().map(|p| p.name.len()).max().unwrap_or(0);
    for p in &planned {
        let state = match p.action {
            Action::Cached => "up to date",
            Action::Run => "needs run",
            Action::Skipped => "skipped",
            Action::Unselected => "-",
        };
        let last = index
            .get(&p.name)
            .map(|r| format!("last run {} ({:.1}s)", r.run, r.seconds))
            .unwrap_or_else(|| "never run".into());
        println!("{:<width$}  {:<10} {:<16} {}", p.name, state, p.kind, last);
    }
    for line in slurm::status_lines(&a.file, registry, &store)? {
        println!("{line}");
    }
    Ok(EXIT_OK)
}
