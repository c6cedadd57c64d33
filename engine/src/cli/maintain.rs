//! `gc` and `verify`.

use std::collections::HashSet;
use std::path::PathBuf;

use clap::Args;

use super::{find_cache_root, open_store, GlobalArgs, EXIT_OK, EXIT_STAGE_FAILED};
use crate::diag::{Diagnostic, Diagnostics};
use crate::records::Records;
use dagrun_cache::LockMode;

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Also remove results that neither the last N runs nor any pipeline's current state use.
    #[arg(long)]
    pub keep_runs: Option<usize>,
    /// The pipeline whose cache to clean (default: --cache-dir, ./.dagrun or ./pipelines/.dagrun).
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
}

pub fn gc(a: GcArgs, g: &GlobalArgs) -> Result<i32, Diagnostics> {
    let root = find_cache_root(g, a.pipeline.as_deref())?;
    let store = open_store(&root)?;
    let Some(_lock) = store.try_lock_store(LockMode::Exclusive).map_err(|e| Diagnostic::at_field("--cache-dir", e.to_string()))? else {
        return Err(Diagnostic::at_field("gc", format!("a run is using {}; try again when it ends", root.display())).into());
    };
    let records = Records::new(&root);
    let keep = a.keep_runs.map(|n| {
        let runs = records.runs();
        let mut keep: HashSet<String> = HashSet::new();
        for run in runs.iter().rev().take(n) {
            keep.extend(run.stages.iter().flat_map(|s| s.outputs.values().cloned()));
        }
        for index in records.all_indexes() {
            keep.extend(index.values().flat_map(|s| s.outputs.values().cloned()));
        }
        // Older run directories go too; their logs describe results that are gone.
        for run in runs.iter().rev().skip(n) {
            let _ = std::fs::remove_dir_all(records.run_dir(&run.run));
        }
        keep
    });
    let report = store.gc(keep.as_ref()).map_err(|e| Diagnostic::at_field("gc", e.to_string()))?;
    println!(
        "removed {} objects, {} action records, {} leftovers; freed {:.1} MiB",
        report.removed_objects,
        report.removed_actions,
        report.removed_leftovers,
        report.freed_bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(EXIT_OK)
}

pub fn verify(a: VerifyArgs, g: &GlobalArgs) -> Result<i32, Diagnostics> {
    let root = find_cache_root(g, a.pipeline.as_deref())?;
    let store = open_store(&root)?;
    let report = store.verify().map_err(|e| Diagnostic::at_field("verify", e.to_string()))?;
    for d in &report.corrupt {
        println!("corrupt: {d} (moved to quarantine; the next run recomputes it)");
    }
    for p in &report.incomplete {
        println!("incomplete: {} (left by an interrupted publish; `dagrun gc` removes it)", p.display());
    }
    println!("checked {} objects: {} corrupt, {} incomplete", report.checked, report.corrupt.len(), report.incomplete.len());
    Ok(if report.corrupt.is_empty() { EXIT_OK } else { EXIT_STAGE_FAILED })
}

#[derive(Debug, Args)]
pub struct HashArgs {
    /// Files or directories.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn hash(a: HashArgs) -> Result<i32, Diagnostics> {
    for path in &a.paths {
        let digest = dagrun_cache::hash_path(path).map_err(|e| Diagnostic::at_field(&path.display().to_string(), e.to_string()))?;
        println!("{digest}  {}", path.display());
    }
    Ok(EXIT_OK)
}
