//! `dagrun report FILE [--out DIR]`, and the hook that writes a report after every run.

use std::path::PathBuf;

use clap::Args;
use dagrun_engine::cli::{
    self, EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE, GlobalArgs, RunDone, cache_root_for, open_store,
};
use dagrun_engine::kind::Registry;
use dagrun_engine::records::Records;
use dagrun_engine::{graph, pipeline};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The pipeline file; the report is of its latest recorded run.
    pub file: PathBuf,
    /// Where to write report.html and report.md (default: the run's directory in the cache).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn report_command(a: ReportArgs, g: &GlobalArgs, registry: &Registry) -> i32 {
    cli::init_logging(g);
    let pl = match pipeline::load(&a.file, registry, &[]) {
        Ok(p) => p,
        Err(d) => return cli::report(Err(d)),
    };
    let graph = match graph::build(&pl, registry) {
        Ok(gr) => gr,
        Err(d) => return cli::report(Err(d)),
    };
    let root = cache_root_for(g, &a.file);
    let store = match open_store(&root) {
        Ok(s) => s,
        Err(d) => return cli::report(Err(d.into())),
    };
    let records = Records::new(&root);
    let Some(record) = records.latest_run(&a.file) else {
        eprintln!(
            "{}: no run of this pipeline is recorded in {}; run it first",
            a.file.display(),
            root.display()
        );
        return EXIT_USAGE;
    };
    let dir = a.out.unwrap_or_else(|| records.run_dir(&record.run));
    match crate::write(&graph, &store, &record, &dir) {
        Ok(w) => {
            println!("{}\n{}", w.html.display(), w.markdown.display());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_STAGE_FAILED
        }
    }
}

/// After a run, whatever its outcome: the report goes into the run's directory and its path
/// to stderr. A report that cannot be written is a warning; the run's exit code stands.
pub fn after_run(done: &RunDone) {
    let dir = Records::new(done.store.root()).run_dir(&done.record.run);
    let started = std::time::Instant::now();
    let written = crate::write(done.graph, done.store, done.record, &dir);
    // Every run pays for this, a no-op re-run included: keep an eye on it.
    tracing::debug!(
        "report written in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    match written {
        Ok(w) if !done.globals.quiet => eprintln!("report: {}", w.html.display()),
        Ok(_) => {}
        Err(e) => tracing::warn!("could not write the run report: {e:#}"),
    }
}
