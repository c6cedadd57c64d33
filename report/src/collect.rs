//! What the report shows, gathered from the pipeline's graph, a run record and the cache.
//!
//! Nothing here knows a stage kind: an output is read when its Parquet footer says it holds
//! a `metrics` table (curves or figures) or an `eval` table (the models' names, in the order
//! the matching `metrics` rows number them). Anything unreadable becomes a note on its stage;
//! the report goes on without it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use dagrun_cache::Store;
use dagrun_engine::graph::Graph;
use dagrun_engine::records::{Records, RunRecord, StageRecord, Status};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A run as the report shows it.
pub struct Run {
    pub pipeline: String,
    pub run: String,
    pub started_unix: u64,
    pub seconds: f64,
    /// Every stage of the pipeline, producers before consumers.
    pub stages: Vec<Stage>,
    /// Producer → consumer (indices into `stages`) and the output carried, as written.
    pub edges: Vec<(usize, usize, String)>,
}

pub struct Stage {
    pub name: String,
    pub kind: String,
    /// `port ← node.output`, as the pipeline file wires it.
    pub inputs: Vec<String>,
    /// None: the stage is in no record (never run, or not since it was added).
    pub status: Option<Status>,
    /// Set when the stage was not part of this run and its latest record is shown instead.
    pub earlier_run: Option<String>,
    pub seconds: f64,
    pub resumed: bool,
    pub error: Option<String>,
    pub metrics: Vec<(String, Metrics)>,
    pub evals: Vec<(String, EvalModels)>,
    /// The stage's own Markdown report, if it wrote one.
    pub report: Option<String>,
    /// Outputs that could not be read, one line each.
    pub notes: Vec<String>,
}

impl Stage {
    /// A stage with no record yet.
    pub fn new(name: &str, kind: &str) -> Stage {
        Stage {
            name: name.into(),
            kind: kind.into(),
            inputs: Vec::new(),
            status: None,
            earlier_run: None,
            seconds: 0.0,
            resumed: false,
            error: None,
            metrics: Vec::new(),
            evals: Vec::new(),
            report: None,
            notes: Vec::new(),
        }
    }
}

/// A `metrics` table: `(step, metric, value)` rows in file order.
pub struct Metrics {
    pub rows: Vec<(i64, String, f64)>,
}

impl Metrics {
    /// Metric names in order of first appearance.
    pub fn names(&self) -> Vec<&str> {
        let mut seen = Vec::new();
        for (_, m, _) in &self.rows {
            if !seen.contains(&m.as_str()) {
                seen.push(m.as_str());
            }
        }
        seen
    }

    /// `(step, value)` of one metric, in file order.
    pub fn series(&self, name: &str) -> Vec<(i64, f64)> {
        self.rows
            .iter()
            .filter(|(_, m, _)| m == name)
            .map(|(s, _, v)| (*s, *v))
            .collect()
    }

    pub fn value(&self, step: i64, name: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|(s, m, _)| *s == step && m == name)
            .map(|r| r.2)
    }

    /// Whether the rows trace something over steps (a curve) rather than one set of figures.
    pub fn is_curve(&self) -> bool {
        self.rows
            .first()
            .is_some_and(|first| self.rows.iter().any(|r| r.0 != first.0))
    }
}

/// The models of an `eval` table, in order of first appearance (their `metrics` step), and
/// its `k` when it has one.
pub struct EvalModels {
    pub models: Vec<String>,
    pub k: Option<i64>,
}

pub fn collect(graph: &Graph, store: &Store, record: &RunRecord) -> Run {
    let index = Records::new(store.root()).index(&graph.pipeline.path);
    let position: BTreeMap<usize, usize> = graph
        .order
        .iter()
        .enumerate()
        .map(|(pos, &i)| (i, pos))
        .collect();
    let stages = graph
        .order
        .iter()
        .map(|&i| stage(graph, i, store, record, &index))
        .collect();
    let edges = graph
        .edges
        .iter()
        .map(|(p, c, o)| (position[p], position[c], o.clone()))
        .collect();
    Run {
        pipeline: graph.pipeline.name.clone(),
        run: record.run.clone(),
        started_unix: record.started_unix,
        seconds: record.seconds,
        stages,
        edges,
    }
}

fn stage(
    graph: &Graph,
    i: usize,
    store: &Store,
    record: &RunRecord,
    index: &BTreeMap<String, StageRecord>,
) -> Stage {
    let st = &graph.pipeline.stages[i];
    let inputs = st
        .inputs
        .iter()
        .flat_map(|(port, refs)| {
            refs.iter().map(move |r| match &r.output {
                Some(o) => format!("{port} ← {}.{o}", r.node),
                None => format!("{port} ← {}", r.node),
            })
        })
        .collect();
    let mut out = Stage {
        inputs,
        ..Stage::new(&st.name, &st.kind)
    };
    // A stage this run did not select is shown from its latest good record, and says so.
    let rec = match record.stages.iter().find(|s| s.name == st.name) {
        Some(r) => r,
        None => match index.get(&st.name) {
            Some(r) => {
                out.earlier_run = Some(r.run.clone());
                r
            }
            None => return out,
        },
    };
    out.kind = rec.kind.clone();
    out.status = Some(rec.status);
    out.seconds = rec.seconds;
    out.resumed = rec.resumed;
    out.error = rec.error.clone();
    if !matches!(rec.status, Status::Ran | Status::Cached) {
        return out;
    }
    out.report = rec
        .key
        .as_deref()
        .and_then(|k| store.action(k))
        .and_then(|a| a.extra.get("report")?.as_str().map(str::to_string));
    for (name, digest) in &rec.outputs {
        let Some(path) = store.object(digest) else {
            out.notes
                .push(format!("output `{name}` is missing from the cache"));
            continue;
        };
        if !path.is_file() {
            continue; // a model directory: nothing to plot
        }
        let read = schema_of(&path).and_then(|schema| match schema.as_deref() {
            Some("metrics") => read_metrics(&path).map(|m| out.metrics.push((name.clone(), m))),
            Some("eval") => read_eval(&path).map(|e| out.evals.push((name.clone(), e))),
            _ => Ok(()),
        });
        if let Err(e) = read {
            out.notes
                .push(format!("output `{name}` is unreadable: {e:#}"));
        }
    }
    out
}

/// The schema name a dataset's footer declares (`dagrun.schema = NAME/VERSION`).
fn schema_of(path: &Path) -> anyhow::Result<Option<String>> {
    let (kv, _, _) = dagrun_engine::dataset::footer(path)?;
    Ok(kv
        .get("dagrun.schema")
        .map(|tag| tag.split('/').next().unwrap_or_default().to_string()))
}

/// Reads only `columns` of a Parquet file (an eval table's completions are most of its bytes).
fn read_columns(path: &Path, columns: &[&str]) -> anyhow::Result<Vec<RecordBatch>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let have: Vec<&str> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let wanted: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| have.contains(c))
        .collect();
    let mask = ProjectionMask::columns(builder.parquet_schema(), wanted);
    let reader = builder.with_projection(mask).build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// A column as `ty` (writers may choose `LargeUtf8` or `Int32`), or an error naming it.
fn column(
    batch: &RecordBatch,
    name: &str,
    ty: &DataType,
) -> anyhow::Result<arrow::array::ArrayRef> {
    let Some(col) = batch.column_by_name(name) else {
        bail!("no column `{name}`");
    };
    cast(col, ty).with_context(|| format!("column `{name}`"))
}

fn read_metrics(path: &Path) -> anyhow::Result<Metrics> {
    let mut rows = Vec::new();
    for b in read_columns(path, &["step", "metric", "value"])? {
        let step = column(&b, "step", &DataType::Int64)?;
        let metric = column(&b, "metric", &DataType::Utf8)?;
        let value = column(&b, "value", &DataType::Float64)?;
        let (step, metric, value) = (
            step.as_primitive::<Int64Type>(),
            metric.as_string::<i32>(),
            value.as_primitive::<Float64Type>(),
        );
        for r in 0..b.num_rows() {
            if step.is_valid(r) && metric.is_valid(r) && value.is_valid(r) {
                rows.push((step.value(r), metric.value(r).to_string(), value.value(r)));
            }
        }
    }
    Ok(Metrics { rows })
}

fn read_eval(path: &Path) -> anyhow::Result<EvalModels> {
    let mut models: Vec<String> = Vec::new();
    let mut k = None;
    for b in read_columns(path, &["model", "k"])? {
        let names = column(&b, "model", &DataType::Utf8)?;
        let names = names.as_string::<i32>();
        for r in 0..b.num_rows() {
            if names.is_valid(r) && !models.iter().any(|m| m == names.value(r)) {
                models.push(names.value(r).to_string());
            }
        }
        if k.is_none() && b.num_rows() > 0 && b.column_by_name("k").is_some() {
            let ks = column(&b, "k", &DataType::Int64)?;
            k = Some(ks.as_primitive::<Int64Type>().value(0));
        }
    }
    Ok(EvalModels { models, k })
}
