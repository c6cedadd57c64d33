//! What a running stage sees: its params, its input artifacts, where to write its outputs, a
//! resume directory, progress and a log. Nothing about keys or the cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::Schema;

use crate::dataset;
use crate::kind::ArtifactType;
use crate::params::Params;
use crate::progress::{LogSink, Progress, ProgressMode};

/// An input artifact: a Parquet file or a model directory.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    pub path: PathBuf,
    pub digest: String,
    /// The stage that produced it (after passing through skipped stages).
    pub producer: String,
    pub ty: ArtifactType,
}

#[derive(Debug, Clone)]
pub(crate) struct OutputSlot {
    pub name: String,
    pub ty: ArtifactType,
    pub path: PathBuf,
}

pub struct StageContext {
    pub node: String,
    pub kind: String,
    pub params: Params,
    pub seed: u64,
    pub device: String,
    pub(crate) inputs: Vec<(String, Vec<InputArtifact>)>,
    pub(crate) outputs: Vec<OutputSlot>,
    pub(crate) resume_dir: PathBuf,
    pub(crate) resumed: bool,
    pub(crate) report: Option<String>,
    pub(crate) log: LogSink,
    pub(crate) progress_mode: ProgressMode,
}

impl StageContext {
    /// The single artifact on input `port`.
    pub fn input(&self, port: &str) -> anyhow::Result<&InputArtifact> {
        self.input_opt(port)
            .ok_or_else(|| anyhow!("stage `{}` has no input `{port}`", self.node))
    }

    /// The artifact on an optional input port, if wired.
    pub fn input_opt(&self, port: &str) -> Option<&InputArtifact> {
        self.inputs(port).first()
    }

    /// Every artifact on input `port` (list ports), in the order written.
    pub fn inputs(&self, port: &str) -> &[InputArtifact] {
        self.inputs
            .iter()
            .find(|(p, _)| p == port)
            .map(|(_, a)| a.as_slice())
            .unwrap_or(&[])
    }

    /// The names of the wired input ports, sorted (for kinds with free port names): keys ignore
    /// the order ports are written in, so results must not depend on it either.
    pub fn input_ports(&self) -> Vec<&str> {
        let mut ports: Vec<&str> = self.inputs.iter().map(|(p, _)| p.as_str()).collect();
        ports.sort_unstable();
        ports
    }

    fn slot(&self, port: &str) -> anyhow::Result<&OutputSlot> {
        self.outputs
            .iter()
            .find(|o| o.name == port)
            .ok_or_else(|| anyhow!("stage kind `{}` declares no output `{port}`", self.kind))
    }

    /// Where to write output `port`: a file path for a dataset, an existing empty directory
    /// for a model.
    pub fn output_path(&self, port: &str) -> anyhow::Result<&Path> {
        Ok(&self.slot(port)?.path)
    }

    /// Writes dataset output `port`, checking its columns against the port's schema. The footer
    /// holds the schema tag only: provenance is kept in the cache's records, so the same rows
    /// are the same bytes whatever made them.
    pub fn write_dataset(&self, port: &str, batches: &[RecordBatch]) -> anyhow::Result<()> {
        let slot = self.slot(port)?;
        let ArtifactType::Dataset(schema_name) = slot.ty else {
            bail!("output `{port}` is a model, not a dataset")
        };
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => match schema_name.and_then(dagrun_schemas::by_name) {
                Some(t) => t.schema.clone(),
                None => bail!("output `{port}`: no rows and no schema to write"),
            },
        };
        let mut metadata = Vec::new();
        if let Some(table) = schema_name.and_then(dagrun_schemas::by_name) {
            table
                .check(&schema)
                .map_err(|e| anyhow!("output `{port}` (dataset<{}>): {e}", table.name))?;
            metadata.push(("dagrun.schema".to_string(), table.tag()));
        }
        dataset::write_parquet(&slot.path, strip_metadata(&schema), batches, &metadata)
    }

    /// This stage's private checkpoint directory. It survives a killed run and is handed to the
    /// next run of the same key only; it is removed once the stage's outputs are published.
    pub fn resume_dir(&self) -> &Path {
        &self.resume_dir
    }

    /// Says that this run continued from a checkpoint (reported as `resumed` in run records).
    pub fn mark_resumed(&mut self) {
        self.resumed = true;
    }

    /// A Markdown report (an eval's summary table): kept with the result in the cache and
    /// printed at the end of every run that produces or reuses it.
    pub fn set_report(&mut self, markdown: impl Into<String>) {
        self.report = Some(markdown.into());
    }

    /// A progress counter for `total` units of work.
    pub fn progress(&self, total: u64, unit: &str) -> Progress {
        Progress::new(
            &self.node,
            total,
            unit,
            self.progress_mode,
            Arc::clone(&self.log),
        )
    }

    /// A line for the stage's log file and the run's log.
    pub fn info(&self, msg: impl std::fmt::Display) {
        tracing::info!(stage = %self.node, "{msg}");
        if let Some(f) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = writeln!(f, "{msg}");
        }
    }

    pub(crate) fn new_log(path: Option<&Path>) -> LogSink {
        Arc::new(Mutex::new(path.and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })))
    }
}

/// Batches keep their own schema metadata out of the file.
fn strip_metadata(schema: &Arc<Schema>) -> Arc<Schema> {
    Arc::new(Schema::new(schema.fields().clone()))
}
