//! The `dagrun` command line: argument types (clap) and what each command does.
//!
//! The binary adds commands of its own (model tools) beside these; exit codes are 0 for
//! success, 1 when a stage failed, 2 for a bad file or usage.

mod inspect;
mod maintain;
mod run;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use crate::diag::{Diagnostic, Diagnostics};
use crate::kind::Registry;
use crate::progress::ProgressMode;

pub const EXIT_OK: i32 = 0;
pub const EXIT_STAGE_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
/// Ctrl-C (128 + SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Log lines as text or as JSON objects.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// The cache root (default: `.dagrun/` beside the pipeline file).
    #[arg(long, env = "DAGRUN_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline (`dagrun FILE` is short for `dagrun run FILE`).
    Run(run::RunArgs),
    /// Show what a run would do for every stage, and why.
    Plan(run::PlanArgs),
    /// Show whether each stage's result is up to date.
    Status(run::FileArg),
    /// Draw the stage graph.
    Dag(inspect::DagArgs),
    /// Show a stage's output: a dataset's schema and first rows, or a model's config.
    Show(inspect::ShowArgs),
    /// Copy a stage's output out of the cache.
    Export(inspect::ExportArgs),
    /// Remove leftovers of interrupted work and, with --keep-runs, old results.
    Gc(maintain::GcArgs),
    /// Re-hash every object in the cache and report corrupt ones.
    Verify(maintain::VerifyArgs),
    /// List every stage kind with its ports and params.
    Stages,
    /// Print the digest the cache gives files or directories (`digest  path`, like b3sum).
    Hash(maintain::HashArgs),
    /// Print the JSON Schema of pipeline files.
    Schema,
    /// Run one stage inside a Slurm job (what `--executor slurm` submits).
    #[command(hide = true)]
    StageJob(crate::slurm::StageJobArgs),
}

/// Names of the engine's commands, for the `dagrun FILE` shorthand.
pub const COMMANDS: &[&str] = &[
    "run",
    "plan",
    "status",
    "dag",
    "show",
    "export",
    "gc",
    "verify",
    "stages",
    "schema",
    "hash",
    "help",
    "stage-job",
];

/// Turns `dagrun FILE …` into `dagrun run FILE …` when FILE is not a command name.
pub fn expand_shorthand(args: Vec<OsString>, extra_commands: &[&str]) -> Vec<OsString> {
    let first_positional = args
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'));
    let Some(pos) = first_positional.map(|p| p + 1) else {
        return args;
    };
    let word = args[pos].to_string_lossy().to_string();
    if COMMANDS.contains(&word.as_str()) || extra_commands.contains(&word.as_str()) {
        return args;
    }
    // Only flags without values may come before the file (`-v`, `-q`).
    if args[1..pos].iter().any(|a| {
        !matches!(
            a.to_string_lossy().as_ref(),
            "-v" | "-vv" | "-vvv" | "-q" | "--verbose" | "--quiet"
        )
    }) {
        return args;
    }
    let mut out = args;
    out.insert(pos, OsString::from("run"));
    out
}

/// Sets up tracing on stderr and returns how progress should be shown.
pub fn init_logging(g: &GlobalArgs) -> ProgressMode {
    let level = match (g.quiet, g.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DAGRUN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::progress::LogWriter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match g.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.without_time().try_init(),
    };
    if g.quiet {
        ProgressMode::Off
    } else if std::io::stderr().is_terminal() && g.log_format == LogFormat::Text {
        ProgressMode::Bar
    } else {
        ProgressMode::Log
    }
}

/// What a finished `run` hands to the binary's hook (the run report): called whether stages
/// failed or not, never after a bad pipeline file or a `--dry-run`.
pub struct RunDone<'a> {
    pub graph: &'a crate::graph::Graph<'a>,
    pub store: &'a dagrun_cache::Store,
    pub record: &'a crate::records::RunRecord,
    pub globals: &'a GlobalArgs,
}

/// Runs an engine command; returns the process exit code.
pub fn execute(cmd: Command, g: &GlobalArgs, registry: &Registry) -> i32 {
    execute_with(cmd, g, registry, &|_| {})
}

/// [`execute`], calling `after_run` at the end of a `run` (after its summary, before its
/// `--json` line). The hook reports its own problems: it cannot change the exit code.
pub fn execute_with(
    cmd: Command,
    g: &GlobalArgs,
    registry: &Registry,
    after_run: &dyn Fn(&RunDone),
) -> i32 {
    let progress = init_logging(g);
    let result = match cmd {
        Command::Run(a) => run::run(a, g, registry, progress, after_run),
        Command::Plan(a) => run::plan(a, g, registry),
        Command::Status(a) => run::status(a, g, registry),
        Command::Dag(a) => inspect::dag(a, registry),
        Command::Show(a) => inspect::show(a, g),
        Command::Export(a) => inspect::export(a, g),
        Command::Gc(a) => maintain::gc(a, g),
        Command::Verify(a) => maintain::verify(a, g),
        Command::Stages => inspect::stages(registry),
        Command::Hash(a) => maintain::hash(a),
        Command::StageJob(a) => Ok(crate::slurm::stage_job(a, g, registry)),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::schema::pipeline_schema(registry))
                    .unwrap_or_default()
            );
            Ok(EXIT_OK)
        }
    };
    report(result)
}

/// Prints diagnostics, one line each, and maps them to exit code 2.
pub fn report(result: Result<i32, Diagnostics>) -> i32 {
    match result {
        Ok(code) => code,
        Err(d) => {
            eprintln!("{d}");
            EXIT_USAGE
        }
    }
}

/// The cache root for a pipeline file: the flag or variable, else `.dagrun/` beside the file.
pub fn cache_root_for(g: &GlobalArgs, pipeline: &Path) -> PathBuf {
    g.cache_dir
        .clone()
        .unwrap_or_else(|| pipeline.parent().unwrap_or(Path::new("")).join(".dagrun"))
}

/// The cache root when no pipeline file is named: the flag or variable, a given pipeline's
/// cache, `./.dagrun`, or `./pipelines/.dagrun`.
pub fn find_cache_root(g: &GlobalArgs, pipeline: Option<&Path>) -> Result<PathBuf, Diagnostic> {
    if let Some(p) = pipeline {
        return Ok(cache_root_for(g, p));
    }
    if let Some(d) = &g.cache_dir {
        return Ok(d.clone());
    }
    for candidate in [".dagrun", "pipelines/.dagrun"] {
        if Path::new(candidate).is_dir() {
            return Ok(PathBuf::from(candidate));
        }
    }
    Err(Diagnostic::at_field(
        "--cache-dir",
        "no cache found here (looked for .dagrun/ and pipelines/.dagrun/); pass --cache-dir or --pipeline",
    ))
}

/// An artifact a command reads: its path, and for one in the cache the store lock that keeps
/// `gc` from removing it while it is read.
pub struct Artifact {
    pub path: PathBuf,
    _lock: Option<dagrun_cache::Lock>,
}

/// The path of `node.output` (or `node` with one output) in the cache, from the latest
/// recorded run of that stage, or `target` itself when it is an existing directory: for
/// commands that take `NODE.model|DIR`.
pub fn resolve_artifact(
    target: &str,
    pipeline: Option<&Path>,
    g: &GlobalArgs,
) -> Result<Artifact, Diagnostics> {
    if Path::new(target).is_dir() {
        return Ok(Artifact {
            path: PathBuf::from(target),
            _lock: None,
        });
    }
    let mut found = inspect::resolve(target, pipeline, g, true)?;
    Ok(Artifact {
        path: found.outputs.remove(0).1,
        _lock: Some(found._lock),
    })
}

/// The store lock in shared mode, as runs and readers hold it; waits (saying so) while `gc`
/// holds it exclusively.
pub fn lock_store_shared(store: &dagrun_cache::Store) -> Result<dagrun_cache::Lock, Diagnostic> {
    let busy = |e: dagrun_cache::Error| Diagnostic::at_field("--cache-dir", e.to_string());
    if let Some(lock) = store
        .try_lock_store(dagrun_cache::LockMode::Shared)
        .map_err(busy)?
    {
        return Ok(lock);
    }
    tracing::info!(
        "waiting for `dagrun gc` to finish with {}",
        store.root().display()
    );
    store
        .lock_store(dagrun_cache::LockMode::Shared)
        .map_err(busy)
}

pub fn open_store(root: &Path) -> Result<dagrun_cache::Store, Diagnostic> {
    dagrun_cache::Store::open(root)
        .map_err(|e| Diagnostic::at_field("--cache-dir", format!("cannot open the cache: {e}")))
}
