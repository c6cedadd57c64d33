//! Running a pipeline: decide per stage whether its result is cached, run it under its key's
//! lock if not, publish its outputs atomically, and record what happened.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dagrun_cache::{ActionRecord, Store};

use crate::context::{InputArtifact, OutputSlot, StageContext};
use crate::diag::{Diagnostic, Diagnostics};
use crate::graph::{Graph, Source, find_stage};
use crate::key::{InputPart, KeyParts, device_class};
use crate::kind::{ArtifactType, ParamType, Registry};
use crate::progress::ProgressMode;
use crate::records::{Records, RunRecord, StageRecord, Status};

/// Which stages a run considers, and how.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub only: Vec<String>,
    pub until: Option<String>,
    pub from: Option<String>,
    pub force: Vec<String>,
    pub keep_going: bool,
    pub progress: Option<ProgressMode>,
    /// Stages run at once (0 and 1: one at a time).
    pub jobs: usize,
}

/// An artifact known to exist in the store.
#[derive(Debug, Clone)]
pub(crate) struct Available {
    pub digest: String,
    pub path: PathBuf,
}

/// The stages selected by `--only`, `--until` and `--from` (all of them by default).
pub fn select(graph: &Graph, opts: &RunOptions) -> Result<BTreeSet<usize>, Diagnostics> {
    let pl = graph.pipeline;
    let mut selected: BTreeSet<usize> = (0..pl.stages.len()).collect();
    let mut errors = Vec::new();
    if !opts.only.is_empty() {
        selected.clear();
        for n in &opts.only {
            match find_stage(pl, "--only", n) {
                Ok(i) => {
                    selected.insert(i);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    if let Some(n) = &opts.until {
        match find_stage(pl, "--until", n) {
            Ok(i) => {
                selected = selected
                    .intersection(&graph.ancestors(i))
                    .copied()
                    .collect()
            }
            Err(e) => errors.push(e),
        }
    }
    if let Some(n) = &opts.from {
        match find_stage(pl, "--from", n) {
            Ok(i) => {
                selected = selected
                    .intersection(&graph.descendants(i))
                    .copied()
                    .collect()
            }
            Err(e) => errors.push(e),
        }
    }
    for n in &opts.force {
        if let Err(e) = find_stage(pl, "--force", n) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(selected)
    } else {
        Err(Diagnostics(errors))
    }
}

/// The key components of stage `i`, if every input is available.
pub(crate) fn key_parts(
    graph: &Graph,
    i: usize,
    available: &HashMap<Source, Available>,
    path_digests: &mut PathDigests,
) -> Result<Option<KeyParts>, Diagnostic> {
    let stage = &graph.pipeline.stages[i];
    let node = &graph.nodes[i];
    let mut inputs = BTreeMap::new();
    for input in &node.inputs {
        let mut parts = Vec::new();
        for src in &input.sources {
            let Some(a) = available.get(src) else {
                return Ok(None);
            };
            parts.push(InputPart {
                digest: a.digest.clone(),
                producer: graph.name(src.node).to_string(),
            });
        }
        inputs.insert(input.port.clone(), parts);
    }
    let mut params = stage.params.as_map().clone();
    for p in node.spec.params.iter().filter(|p| !p.keyed) {
        params.remove(p.name);
    }
    for p in node
        .spec
        .params
        .iter()
        .filter(|p| p.keyed && matches!(p.ty, ParamType::Path))
    {
        let Some(path) = params
            .get(p.name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
        else {
            continue;
        };
        let digest = path_digests.digest(&path).map_err(|e| {
            let at = ["stages", &stage.name, "params", p.name].map(String::from);
            graph
                .pipeline
                .diag(&at, false, format!("param `{}`: {e}", p.name))
        })?;
        // The content decides, not where it lies; a file's name too, since a stage may read
        // it (an import's ids come from the file's stem, its type from the extension).
        let file_name = std::path::Path::new(&path)
            .is_file()
            .then(|| std::path::Path::new(&path).file_name())
            .flatten()
            .map(|n| n.to_string_lossy().into_owned());
        let keyed = match file_name {
            Some(name) => serde_json::json!({ "content": digest, "name": name }),
            None => serde_json::json!({ "content": digest }),
        };
        params.insert(p.name.to_string(), keyed);
    }
    let output_schemas = node
        .outputs
        .iter()
        .filter_map(|(n, t)| match t {
            ArtifactType::Dataset(Some(s)) => {
                dagrun_schemas::by_name(s).map(|t| (n.clone(), t.tag()))
            }
            _ => None,
        })
        .collect();
    Ok(Some(KeyParts {
        kind: stage.kind.clone(),
        kind_version: node.spec.version,
        params,
        seed: stage.seed,
        device: node
            .spec
            .device_dependent
            .then(|| device_class(&stage.device).to_string()),
        output_schemas,
        inputs,
        producers_in_key: node.producers_in_key,
    }))
}

/// Digests of path params: once per run, and from the store's memo while files are unchanged.
pub(crate) struct PathDigests {
    seen: HashMap<String, String>,
    memo: dagrun_cache::DigestMemo,
}

impl PathDigests {
    pub fn new(store: &Store) -> PathDigests {
        PathDigests {
            seen: HashMap::new(),
            memo: store.digest_memo(),
        }
    }

    fn digest(&mut self, path: &str) -> dagrun_cache::Result<String> {
        if let Some(d) = self.seen.get(path) {
            return Ok(d.clone());
        }
        let d = self.memo.hash_path(std::path::Path::new(path))?;
        self.seen.insert(path.to_string(), d.clone());
        Ok(d)
    }

    /// Keeps what was learnt for the next run (a failure only costs a re-hash then).
    pub fn save(&mut self) {
        if let Err(e) = self.memo.save() {
            tracing::debug!("could not save the digest memo: {e}");
        }
    }
}

/// A stage's result, found in the cache or just made.
pub(crate) struct Finished {
    pub outputs: BTreeMap<String, Available>,
    /// The stage's Markdown report, if it wrote one.
    pub report: Option<String>,
    pub resumed: bool,
}

/// The result recorded for `key`, if the record exists and every object checks out.
pub(crate) fn cached(store: &Store, key: &str) -> Option<Finished> {
    let action = store.action(key)?;
    let outputs = action
        .outputs
        .iter()
        .map(|(name, digest)| {
            Some((
                name.clone(),
                Available {
                    digest: digest.clone(),
                    path: store.object(digest)?,
                },
            ))
        })
        .collect::<Option<_>>()?;
    let report = action
        .extra
        .get("report")
        .and_then(|r| r.as_str())
        .map(str::to_string);
    Some(Finished {
        outputs,
        report,
        resumed: false,
    })
}

/// The outputs recorded for `key`, if the record exists and every object checks out.
pub(crate) fn cached_outputs(store: &Store, key: &str) -> Option<BTreeMap<String, Available>> {
    cached(store, key).map(|f| f.outputs)
}

/// Runs stage `i` under its key's lock, unless another process finished the key while this
/// one waited for the lock; `locked` gets the moment the lock was taken. An error outside the
/// stage (the lock) is a [`Diagnostic`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn lock_and_execute(
    graph: &Graph,
    registry: &Registry,
    store: &Store,
    records: &Records,
    run_id: &str,
    i: usize,
    key: &str,
    forced: bool,
    available: &HashMap<Source, Available>,
    progress: ProgressMode,
    locked: &mut Option<Instant>,
) -> Result<anyhow::Result<(Status, Finished)>, Diagnostic> {
    let stage = &graph.pipeline.stages[i];
    let note = format!(
        "stage `{}` of {}",
        stage.name,
        graph.pipeline.path.display()
    );
    let _lock = store
        .lock_key(key, &note, |holder| {
            let who = holder
                .map(|h| format!("process {h}"))
                .unwrap_or_else(|| "another process".into());
            tracing::info!(stage = %stage.name, "waiting for {who}, which is running this stage's key {}", &key[..12]);
        })
        .map_err(|e| Diagnostic::at_field("--cache-dir", e.to_string()))?;
    // The stage's time starts here, not while it waited for another process.
    *locked = Some(Instant::now());
    if !forced && let Some(found) = cached(store, key) {
        return Ok(Ok((Status::Cached, found)));
    }
    Ok(execute(
        graph, registry, store, records, run_id, i, key, available, progress,
    )
    .map(|made| (Status::Ran, made)))
}

/// A stage's error as one line; an error located in its params names the file:line:col.
pub(crate) fn located_message(graph: &Graph, i: usize, e: &anyhow::Error) -> String {
    let stage = &graph.pipeline.stages[i];
    match e.downcast_ref::<crate::kind::LocatedError>() {
        Some(located) => {
            let mut path = vec!["stages".to_string(), stage.name.clone()];
            path.extend(located.at.iter().cloned());
            let message = format!("stage `{}`: {}", stage.name, located.message);
            graph.pipeline.diag(&path, true, message).to_string()
        }
        None => one_line(e),
    }
}

/// The run record as it grows: written after every stage.
pub(crate) struct RunLog {
    pub run: String,
    started: Instant,
    started_unix: u64,
}

impl RunLog {
    pub fn start() -> RunLog {
        RunLog {
            run: Records::new_run_id(),
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// A record, with a new id, of a run that began at `started_unix` (a Slurm submission
    /// collected when its jobs have ended).
    pub fn started_at(started_unix: u64) -> RunLog {
        let mut log = RunLog::start();
        let ago = log.started_unix.saturating_sub(started_unix);
        log.started = Instant::now()
            .checked_sub(std::time::Duration::from_secs(ago))
            .unwrap_or(log.started);
        log.started_unix = started_unix;
        log
    }

    pub fn record(&self, graph: &Graph, stages: Vec<StageRecord>) -> RunRecord {
        RunRecord {
            run: self.run.clone(),
            pipeline: graph.pipeline.path.display().to_string(),
            pipeline_absolute: Some(
                crate::records::absolute(&graph.pipeline.path)
                    .display()
                    .to_string(),
            ),
            started_unix: self.started_unix,
            seconds: self.started.elapsed().as_secs_f64(),
            stages,
        }
    }

    /// Writes the record and merges it into the pipeline's index; `running` are the stages in
    /// flight.
    pub fn save(
        &self,
        records: &Records,
        graph: &Graph,
        done: &[StageRecord],
        running: Vec<StageRecord>,
    ) {
        let mut stages = done.to_vec();
        stages.extend(running);
        let run = self.record(graph, stages);
        let write = records
            .write_run(&run)
            .and_then(|_| records.update_index(&graph.pipeline.path, &run));
        if let Err(e) = write {
            tracing::warn!("could not write the run record: {e:#}");
        }
    }
}

/// Runs stage `i` in a scratch directory and publishes its outputs.
#[allow(clippy::too_many_arguments)]
fn execute(
    graph: &Graph,
    registry: &Registry,
    store: &Store,
    records: &Records,
    run_id: &str,
    i: usize,
    key: &str,
    available: &HashMap<Source, Available>,
    progress: ProgressMode,
) -> anyhow::Result<Finished> {
    let stage = &graph.pipeline.stages[i];
    let node = &graph.nodes[i];
    let (_, kind) = registry
        .get(&stage.kind)
        .expect("kinds are checked when the file is read");
    let scratch = store.scratch(&stage.name)?;
    let mut outputs = Vec::new();
    for (name, ty) in &node.outputs {
        let path = match ty {
            ArtifactType::Model => {
                let dir = scratch.join(name);
                std::fs::create_dir_all(&dir)?;
                dir
            }
            ArtifactType::Dataset(_) => scratch.join(format!("{name}.parquet")),
        };
        outputs.push(OutputSlot {
            name: name.clone(),
            ty: ty.clone(),
            path,
        });
    }
    let inputs = node
        .inputs
        .iter()
        .map(|x| {
            let arts = x
                .sources
                .iter()
                .map(|s| {
                    let a = &available[s];
                    InputArtifact {
                        path: a.path.clone(),
                        digest: a.digest.clone(),
                        producer: graph.name(s.node).to_string(),
                        ty: x.ty.clone(),
                    }
                })
                .collect();
            (x.port.clone(), arts)
        })
        .collect::<Vec<_>>();
    let provenance = provenance(graph, i, &inputs);
    let log_path = records.log_path(run_id, &stage.name);
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut ctx = StageContext {
        node: stage.name.clone(),
        kind: stage.kind.clone(),
        params: stage.params.clone(),
        seed: stage.seed,
        device: stage.device.clone(),
        inputs,
        outputs: outputs.clone(),
        resume_dir: store.resume_dir(key)?,
        resumed: false,
        report: None,
        log: StageContext::new_log(Some(&log_path)),
        progress_mode: progress,
    };
    tracing::info!(stage = %stage.name, kind = %stage.kind, "running (key {})", &key[..12]);
    let cpus = stage.resources.cpus;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        with_threads(cpus, || kind.run(&mut ctx))
    }));
    let result = match result {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(anyhow::anyhow!(
                "stage panicked: {}",
                msg.unwrap_or_else(|| "(no message)".into())
            ))
        }
    };
    if let Err(e) = result {
        ctx.info(format!("failed: {}", one_line(&e)));
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(e);
    }
    let mut published = BTreeMap::new();
    for slot in &outputs {
        let exists = match slot.ty {
            ArtifactType::Model => std::fs::read_dir(&slot.path)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false),
            ArtifactType::Dataset(_) => slot.path.is_file(),
        };
        if !exists {
            let _ = std::fs::remove_dir_all(&scratch);
            anyhow::bail!(
                "stage kind `{}` finished without writing its output `{}`",
                stage.kind,
                slot.name
            );
        }
        let digest = store.publish(&slot.path)?;
        let path = store
            .object(&digest)
            .ok_or_else(|| anyhow::anyhow!("published object {digest} is not readable"))?;
        published.insert(slot.name.clone(), Available { digest, path });
    }
    let action = ActionRecord {
        outputs: published
            .iter()
            .map(|(n, a)| (n.clone(), a.digest.clone()))
            .collect(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        seconds: 0.0,
        // Provenance lives here, not in the artifacts' bytes: an output with the same rows under
        // another key must keep its digest so that its consumers stay cached.
        extra: serde_json::json!({ "node": stage.name, "kind": stage.kind, "report": ctx.report, "provenance": provenance }),
    };
    store.put_action(key, &action)?;
    store.clear_resume(key)?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Finished {
        outputs: published,
        report: ctx.report,
        resumed: ctx.resumed,
    })
}

/// Runs `work` on a thread pool of `cpus` threads when the stage asked for a number of CPUs
/// (its data-parallel work then uses that many), else on the process's global pool.
fn with_threads<T: Send>(
    cpus: Option<u32>,
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let Some(n) = cpus else {
        return work();
    };
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1) as usize)
        .build()
    {
        Ok(pool) => pool.install(work),
        Err(e) => {
            tracing::warn!("could not start {n} threads ({e}); using the shared pool");
            work()
        }
    }
}

/// What made a result, kept in its action record; `dagrun export` writes it into an exported
/// Parquet file's footer.
fn provenance(
    graph: &Graph,
    i: usize,
    inputs: &[(String, Vec<InputArtifact>)],
) -> serde_json::Value {
    let stage = &graph.pipeline.stages[i];
    let node = &graph.nodes[i];
    let input_digests: BTreeMap<&str, Vec<&str>> = inputs
        .iter()
        .map(|(p, a)| (p.as_str(), a.iter().map(|x| x.digest.as_str()).collect()))
        .collect();
    serde_json::json!({
        "kind": stage.kind,
        "kind_version": node.spec.version,
        "params": serde_json::Value::Object(stage.params.as_map().clone()),
        "seed": stage.seed,
        "inputs": input_digests,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// An error and its causes on one line, leaving out a cause that its wrapper already quotes
/// (`External: No space left on device: No space left on device`).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

/// Adds a stage's report to the run's `summary.md`.
pub(crate) fn append_summary(records: &Records, run_id: &str, stage: &str, report: &str) {
    use std::io::Write;
    let path = records.run_dir(run_id).join("summary.md");
    let _ = std::fs::create_dir_all(records.run_dir(run_id));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        let _ = writeln!(f, "## {stage}\n\n{}\n", report.trim_end());
    }
}
