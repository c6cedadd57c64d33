//! `gc` and `verify`.

use std::collections::HashSet;
use std::path::PathBuf;

use clap::Args;

use super::{EXIT_OK, EXIT_STAGE_FAILED, GlobalArgs, find_cache_root, open_store};
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
    /// How long to wait for runs using the cache to finish before giving up, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
}

pub fn gc(a: GcArgs, g: &GlobalArgs) -> Result<i32, Diagnostics> {
    let root = find_cache_root(g, a.pipeline.as_deref())?;
    let store = open_store(&root)?;
    let _lock = wait_for_exclusive(&store, a.timeout)?;
    let records = Records::new(&root);
    // Checkpoints of keys that some kept run was working on stay; the rest belong to work
    // nobody will resume (its pipeline changed since).
    let resume_keys: HashSet<String> = {
        let runs = records.runs();
        let kept = a.keep_runs.unwrap_or(runs.len());
        runs.iter()
            .rev()
            .take(kept)
            .flat_map(|r| r.stages.iter().filter_map(|s| s.key.clone()))
            .collect()
    };
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
    let report = store
        .gc(keep.as_ref(), &resume_keys)
        .map_err(|e| Diagnostic::at_field("gc", e.to_string()))?;
    println!(
        "removed {} objects, {} action records, {} leftovers; freed {:.1} MiB",
        report.removed_objects,
        report.removed_actions,
        report.removed_leftovers,
        report.freed_bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(EXIT_OK)
}

/// The store lock, exclusively: waits for running work (polling, so the wait can end).
fn wait_for_exclusive(
    store: &dagrun_cache::Store,
    timeout_secs: u64,
) -> Result<dagrun_cache::Lock, Diagnostic> {
    let err = |e: dagrun_cache::Error| Diagnostic::at_field("--cache-dir", e.to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    let mut said = false;
    loop {
        if let Some(lock) = store.try_lock_store(LockMode::Exclusive).map_err(err)? {
            return Ok(lock);
        }
        if std::time::Instant::now() >= deadline {
            return Err(Diagnostic::at_field(
                "--timeout",
                format!(
                    "runs were still using {} after {timeout_secs}s; gc removed nothing",
                    store.root().display()
                ),
            ));
        }
        if !said {
            eprintln!(
                "gc: waiting for the runs using {} to finish (at most {timeout_secs}s; see --timeout)",
                store.root().display()
            );
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn verify(a: VerifyArgs, g: &GlobalArgs) -> Result<i32, Diagnostics> {
    let root = find_cache_root(g, a.pipeline.as_deref())?;
    let store = open_store(&root)?;
    let _lock = super::lock_store_shared(&store)?;
    let report = store
        .verify()
        .map_err(|e| Diagnostic::at_field("verify", e.to_string()))?;
    for d in &report.corrupt {
        println!("corrupt: {d} (moved to quarantine; the next run recomputes it)");
    }
    for p in &report.incomplete {
        println!(
            "incomplete: {} (left by an interrupted publish; `dagrun gc` removes it)",
            p.display()
        );
    }
    println!(
        "checked {} objects: {} corrupt, {} incomplete",
        report.checked,
        report.corrupt.len(),
        report.incomplete.len()
    );
    Ok(if report.corrupt.is_empty() {
        EXIT_OK
    } else {
        EXIT_STAGE_FAILED
    })
}

#[derive(Debug, Args)]
pub struct HashArgs {
    /// Files or directories.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn hash(a: HashArgs) -> Result<i32, Diagnostics> {
    for path in &a.paths {
        let digest = dagrun_cache::hash_path(path)
            .map_err(|e| Diagnostic::at_field(&path.display().to_string(), e.to_string()))?;
        println!("{digest}  {}", path.display());
    }
    Ok(EXIT_OK)
}
