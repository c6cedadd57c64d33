//! `dag`, `show`, `export` and `stages`: looking at pipelines, artifacts and kinds.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::{EXIT_OK, GlobalArgs, find_cache_root, open_store};
use crate::diag::{Diagnostic, Diagnostics};
use crate::kind::{Arity, Default, Registry};
use crate::records::{Records, StageRecord};
use crate::{dataset, graph, pipeline};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Ascii,
    Dot,
    Mermaid,
}

#[derive(Debug, Args)]
pub struct DagArgs {
    /// The pipeline file.
    pub file: PathBuf,
    #[arg(long, value_enum, default_value_t = DagFormat::Ascii)]
    pub format: DagFormat,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// `node` or `node.output`.
    pub target: String,
    /// The pipeline whose stage to show (default: the most recent run that has it).
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
    /// Rows to print.
    #[arg(short = 'n', long, default_value_t = 5)]
    pub rows: usize,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// `node.output`, or `node` when it has one output.
    pub target: String,
    /// Where to copy it.
    pub dest: PathBuf,
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
}

pub fn dag(a: DagArgs, registry: &Registry) -> Result<i32, Diagnostics> {
    let pl = pipeline::load(&a.file, registry, &[])?;
    let g = graph::build(&pl, registry)?;
    let label = |i: usize| {
        let s = &pl.stages[i];
        format!(
            "{} ({}{})",
            s.name,
            s.kind,
            if s.skip { ", skipped" } else { "" }
        )
    };
    match a.format {
        DagFormat::Ascii => {
            for &i in &g.order {
                let ins: Vec<String> = g
                    .edges
                    .iter()
                    .filter(|(_, c, _)| *c == i)
                    .map(|(p, _, o)| format!("{}.{o}", g.name(*p)))
                    .collect();
                let arrow = if ins.is_empty() {
                    String::new()
                } else {
                    format!("  ← {}", ins.join(", "))
                };
                println!("{}{arrow}", label(i));
            }
        }
        DagFormat::Dot => {
            println!("digraph \"{}\" {{\n  rankdir=LR;", pl.name);
            for &i in &g.order {
                let style = if pl.stages[i].skip {
                    ", style=dashed"
                } else {
                    ""
                };
                println!("  \"{}\" [label=\"{}\"{style}];", g.name(i), label(i));
            }
            for (p, c, o) in &g.edges {
                println!(
                    "  \"{}\" -> \"{}\" [label=\"{o}\"];",
                    g.name(*p),
                    g.name(*c)
                );
            }
            println!("}}");
        }
        DagFormat::Mermaid => {
            println!("flowchart LR");
            for &i in &g.order {
                println!("  {}[\"{}\"]", g.name(i), label(i));
            }
            for (p, c, o) in &g.edges {
                println!("  {} -->|{o}| {}", g.name(*p), g.name(*c));
            }
        }
    }
    Ok(EXIT_OK)
}

/// The latest record of stage `node`, from the given pipeline's index or any index.
fn find_record(records: &Records, pipeline: Option<&Path>, node: &str) -> Option<StageRecord> {
    let candidates: Vec<StageRecord> = match pipeline {
        Some(p) => records.index(p).remove(node).into_iter().collect(),
        None => records
            .all_indexes()
            .into_iter()
            .filter_map(|mut i| i.remove(node))
            .collect(),
    };
    candidates.into_iter().max_by(|a, b| a.run.cmp(&b.run))
}

/// A stage's recorded outputs, resolved to paths in the cache.
pub(crate) struct Resolved {
    pub outputs: Vec<(String, PathBuf)>,
    /// What made them (from the action record), if known.
    pub provenance: Option<serde_json::Value>,
    pub record: StageRecord,
    /// Held while the caller reads the objects, so that `gc` cannot remove them meanwhile.
    pub _lock: dagrun_cache::Lock,
}

/// Finds `node` or `node.output`; with `one`, the target must name a single output (a node
/// with one output may leave its name out).
pub(crate) fn resolve(
    target: &str,
    pipeline: Option<&Path>,
    g: &GlobalArgs,
    one: bool,
) -> Result<Resolved, Diagnostics> {
    let root = find_cache_root(g, pipeline)?;
    let store = open_store(&root)?;
    let lock = super::lock_store_shared(&store)?;
    let records = Records::new(&root);
    let (node, output) = match target.split_once('.') {
        Some((n, o)) => (n, Some(o)),
        None => (target, None),
    };
    let rec = find_record(&records, pipeline, node).ok_or_else(|| {
        Diagnostic::at_field(
            target,
            format!("no recorded run of stage `{node}` in {}", root.display()),
        )
    })?;
    if one && output.is_none() && rec.outputs.len() > 1 {
        let names: Vec<&str> = rec.outputs.keys().map(String::as_str).collect();
        return Err(Diagnostic::at_field(
            target,
            format!(
                "stage `{node}` has {} outputs; name one: {}",
                names.len(),
                names
                    .iter()
                    .map(|n| format!("`{node}.{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .into());
    }
    let mut out = Vec::new();
    for (name, digest) in &rec.outputs {
        if output.is_some_and(|o| o != name) {
            continue;
        }
        let path = store.object(digest).ok_or_else(|| Diagnostic::at_field(target, format!("output `{name}` ({}) is missing or corrupt in the cache; run the pipeline again", &digest[..12])))?;
        out.push((name.clone(), path));
    }
    if out.is_empty() {
        let names: Vec<&str> = rec.outputs.keys().map(String::as_str).collect();
        return Err(Diagnostic::at_field(
            target,
            format!(
                "stage `{node}` has no output `{}`; its outputs are: {}",
                output.unwrap_or(""),
                names.join(", ")
            ),
        )
        .into());
    }
    let provenance = rec
        .key
        .as_deref()
        .and_then(|k| store.action(k))
        .and_then(|a| a.extra.get("provenance").cloned());
    Ok(Resolved {
        outputs: out,
        provenance,
        record: rec,
        _lock: lock,
    })
}

/// Provenance as Parquet footer entries (`dagrun.node`, `dagrun.key`, …) for an exported file.
fn footer_entries(r: &Resolved) -> Vec<(String, String)> {
    let mut kv = vec![("dagrun.node".to_string(), r.record.name.clone())];
    if let Some(key) = &r.record.key {
        kv.push(("dagrun.key".into(), key.clone()));
    }
    if let Some(serde_json::Value::Object(p)) = &r.provenance {
        for (k, v) in p {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => crate::key::canonical_json(other),
            };
            kv.push((format!("dagrun.{k}"), text));
        }
    }
    kv
}

pub fn show(a: ShowArgs, g: &GlobalArgs) -> Result<i32, Diagnostics> {
    let found = resolve(&a.target, a.pipeline.as_deref(), g, false)?;
    println!(
        "stage: {} ({}), key {}",
        found.record.name,
        found.record.kind,
        found.record.key.as_deref().unwrap_or("-")
    );
    if let Some(p) = &found.provenance {
        println!("params: {}", crate::key::canonical_json(&p["params"]));
        println!("inputs: {}", crate::key::canonical_json(&p["inputs"]));
    }
    for (name, path) in &found.outputs {
        let path = path.clone();
        println!("== {name}: {}", path.display());
        if path.is_dir() {
            show_model_dir(&path);
        } else {
            show_dataset(&path, a.rows)
                .map_err(|e| Diagnostic::at_field(&a.target, format!("{e:#}")))?;
        }
    }
    Ok(EXIT_OK)
}

fn show_dataset(path: &Path, rows: usize) -> anyhow::Result<()> {
    let (meta, count, schema) = dataset::footer(path)?;
    println!("rows: {count}");
    println!("schema:");
    for f in schema.fields() {
        println!("  {}: {}", f.name(), f.data_type());
    }
    if let Some(v) = meta.get("dagrun.schema") {
        println!("dagrun.schema: {v}");
    }
    let (_, batches) = dataset::read_parquet(path)?;
    let mut head = Vec::new();
    let mut left = rows;
    for b in batches {
        if left == 0 {
            break;
        }
        let take = left.min(b.num_rows());
        head.push(b.slice(0, take));
        left -= take;
    }
    println!("{}", arrow::util::pretty::pretty_format_batches(&head)?);
    Ok(())
}

fn show_model_dir(path: &Path) {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().to_string(),
                        e.metadata().map(|m| m.len()).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for (f, size) in &files {
        println!("  {f}  ({size} bytes)");
    }
    let config: Option<serde_json::Value> = std::fs::read(path.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(serde_json::Value::Object(m)) = config {
        println!("config.json:");
        for (k, v) in m.iter().filter(|(_, v)| !v.is_object()) {
            println!("  {k}: {v}");
        }
    }
}

pub fn export(a: ExportArgs, g: &GlobalArgs) -> Result<i32, Diagnostics> {
    let found = resolve(&a.target, a.pipeline.as_deref(), g, true)?;
    let (_, src) = &found.outputs[0];
    let dest_err = |e: String| {
        Diagnostic::at_field(&a.dest.display().to_string(), format!("cannot export: {e}"))
    };
    if src.is_file() {
        // A dataset leaves the cache with its provenance in the footer.
        let (schema, batches) =
            dataset::read_parquet(src).map_err(|e| dest_err(format!("{e:#}")))?;
        let (mut kv, _, _) = dataset::footer(src).map_err(|e| dest_err(format!("{e:#}")))?;
        let mut entries: Vec<(String, String)> = kv.drain().collect();
        entries.sort();
        entries.extend(footer_entries(&found));
        if let Some(parent) = a.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| dest_err(e.to_string()))?;
        }
        // Whole or not at all: a failed export leaves no half-written file under its name.
        let tmp = a.dest.with_extension("dagrun-export.tmp");
        let written = dataset::write_parquet(&tmp, schema, &batches, &entries)
            .and_then(|_| Ok(std::fs::rename(&tmp, &a.dest)?));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(dest_err(format!("{e:#}")).into());
        }
    } else {
        copy_out(src, &a.dest).map_err(|e| dest_err(e.to_string()))?;
    }
    eprintln!("exported {} to {}", a.target, a.dest.display());
    Ok(EXIT_OK)
}

/// Copies a file or directory; copies are writable, unlike the cache's objects.
fn copy_out(src: &Path, dest: &Path) -> std::io::Result<()> {
    if src.is_dir() {
        std::fs::create_dir_all(dest)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_out(&e.path(), &dest.join(e.file_name()))?;
        }
        Ok(())
    } else {
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(src, dest)?;
        let mut perms = std::fs::metadata(dest)?.permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(dest, perms)
    }
}

pub fn stages(registry: &Registry) -> Result<i32, Diagnostics> {
    for spec in registry.specs() {
        println!("{} (v{}): {}", spec.name, spec.version, spec.doc);
        for p in &spec.inputs {
            let arity = match p.arity {
                Arity::One => "",
                Arity::Optional => " (optional)",
                Arity::List => " (list)",
            };
            println!("  in   {:<14} {}{arity}: {}", p.name, p.ty, p.doc);
        }
        if spec.variadic_inputs {
            println!("  in   (any name)     further inputs of the same type");
        }
        for p in &spec.outputs {
            println!("  out  {:<14} {}: {}", p.name, p.ty, p.doc);
        }
        for p in &spec.params {
            let default = match &p.default {
                Default::Required => "required".to_string(),
                Default::Unset => "default: unset".to_string(),
                Default::Value(v) => format!("default: {v}"),
            };
            println!("  param {:<13} {} ({default}): {}", p.name, p.ty, p.doc);
        }
        println!();
    }
    Ok(EXIT_OK)
}
