//! The Slurm executor: every stage that must run becomes one `sbatch` job that runs
//! `dagrun stage-job` on it against the shared cache, with `--dependency=afterok:` on the jobs
//! of its inputs, so the whole DAG is queued at once and the scheduler runs independent
//! branches side by side. Cached stages are never submitted.
//!
//! The head (this process) writes `<cache>/slurm/<id>/submission.json` and the job scripts,
//! then follows the jobs with `squeue` until they end (or exits at once with
//! `--detach`; `dagrun status` follows later). The cache stays the source of truth: a job
//! publishes its stage like a local run does, under the key's lock, so a cancelled job leaves
//! only its checkpoints, which the next run resumes, and two heads never run one key twice.

mod collect;
pub mod commands;
mod follow;
pub mod job;
mod shared_fs;
mod submit;

pub use collect::{collect, status_lines};
pub use follow::follow;
pub use job::{StageJobArgs, stage_job};
pub use submit::{SlurmOptions, SubmissionRecord, submit};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::diag::{Diagnostic, Diagnostics};
use crate::kind::Registry;
use crate::pipeline::{self, Override, Pipeline};

/// Why a submitted pipeline cannot be read back.
pub(crate) enum Unloadable {
    /// The file's blake3 is no longer the submitted one.
    Changed,
    Bad(Diagnostics),
}

/// The pipeline a submission's jobs run: the file, if it is byte for byte what was submitted
/// (`digest`), with the submission's `--set` overrides.
pub(crate) fn load_submitted(
    path: &Path,
    digest: &str,
    set: &[String],
    registry: &Registry,
) -> Result<Pipeline, Unloadable> {
    let bytes = std::fs::read(path).map_err(|e| {
        Unloadable::Bad(
            Diagnostic::at_file(
                &path.display().to_string(),
                crate::diag::Pos::START,
                format!("cannot read pipeline file on this node: {e}"),
            )
            .into(),
        )
    })?;
    if blake3::hash(&bytes).to_hex().as_str() != digest {
        return Err(Unloadable::Changed);
    }
    let overrides = set
        .iter()
        .map(|s| Override::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|d| Unloadable::Bad(d.into()))?;
    pipeline::load(path, registry, &overrides).map_err(Unloadable::Bad)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(sig: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // The second Ctrl-C: stop now, even while a Slurm command hangs.
        // SAFETY: signal() and raise() are async-signal-safe; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// Makes Ctrl-C (and SIGTERM) set a flag the head checks, so it cancels its jobs before it
/// exits instead of leaving them queued.
pub(crate) fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions;
        // the function pointer lives for the whole program.
        unsafe {
            libc::signal(sig, on_interrupt as *const () as libc::sighandler_t);
        }
    }
}

/// Whether the head was interrupted (its jobs were cancelled).
pub fn interrupted_run() -> bool {
    interrupted()
}

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
