//! Reading a pipeline file: YAML syntax, structure, stage kinds and their params.
//! Wiring between stages is checked in [`crate::graph`].

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::diag::{Diagnostic, Diagnostics, Pos, did_you_mean};
use crate::kind::{ParamType, Registry};
use crate::locate::Locator;
use crate::params::{self, Params};
use crate::resources::{self, Resources};

const TOP_LEVEL: &[&str] = &[
    "name",
    "seed",
    "device",
    "executor",
    "jobs",
    "resources",
    "stages",
];
const STAGE_FIELDS: &[&str] = &[
    "kind",
    "inputs",
    "params",
    "skip",
    "seed",
    "device",
    "resources",
    "doc",
];

/// Where the stages run: in this process (`local`) or as Slurm jobs (`slurm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Executor {
    #[default]
    Local,
    Slurm,
}

/// A checked pipeline file.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub path: PathBuf,
    /// Relative paths in params are relative to this directory.
    pub dir: PathBuf,
    pub name: String,
    /// `executor:` in the file (`--executor` overrides it).
    pub executor: Option<Executor>,
    /// `jobs:` in the file: stages run at once by the local executor (`--jobs` overrides it).
    pub jobs: Option<u32>,
    pub stages: Vec<Stage>,
    pub(crate) locator: Locator,
    /// Paths set with `--set`, and the flag text: problems there are reported against the flag.
    overridden: Vec<(Vec<String>, String)>,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub kind: String,
    /// Input port → references, in file order.
    pub inputs: Vec<(String, Vec<InputRef>)>,
    pub params: Params,
    pub skip: bool,
    pub seed: u64,
    pub device: String,
    /// Its own `resources`, with unset fields from the pipeline's.
    pub resources: Resources,
    pub doc: Option<String>,
}

/// `node` or `node.output`, as written in `inputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    pub node: String,
    pub output: Option<String>,
    /// Where the reference is written, for messages.
    pub path: Vec<String>,
}

impl std::fmt::Display for InputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.output {
            Some(o) => write!(f, "{}.{o}", self.node),
            None => write!(f, "{}", self.node),
        }
    }
}

impl Pipeline {
    /// A diagnostic located at the key (`at_key`) or value of `path` in this file.
    pub fn diag(&self, path: &[String], at_key: bool, message: impl Into<String>) -> Diagnostic {
        if let Some((_, flag)) = self.overridden.iter().find(|(p, _)| path.starts_with(p)) {
            return Diagnostic::at_field(&format!("--set {flag}"), message);
        }
        let pos = if at_key {
            self.locator.key(path)
        } else {
            self.locator.value(path)
        };
        Diagnostic::at_file(&self.path.display().to_string(), pos, message)
    }

    /// Where a stage's device is written: its own `device`, else the pipeline's.
    pub fn device_path(&self, stage: &str) -> Vec<String> {
        let own = vec![
            "stages".to_string(),
            stage.to_string(),
            "device".to_string(),
        ];
        if self.locator.has(&own) {
            own
        } else {
            vec!["device".to_string()]
        }
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.name.as_str()).collect()
    }
}

/// A `--set node.param=value` override, applied before params are checked.
#[derive(Debug, Clone)]
pub struct Override {
    pub node: String,
    pub param: Vec<String>,
    pub value: Value,
    pub text: String,
}

impl Override {
    /// Parses `node.param=value`; the value is read as YAML (`2e-5`, `true`, `[a, b]`).
    pub fn parse(text: &str) -> Result<Override, Diagnostic> {
        let field = format!("--set {text}");
        let Some((lhs, rhs)) = text.split_once('=') else {
            return Err(Diagnostic::at_field(&field, "expected node.param=value"));
        };
        let mut parts = lhs.trim().split('.').map(str::to_string);
        let node = parts.next().unwrap_or_default();
        let param: Vec<String> = parts.collect();
        if node.is_empty() || param.is_empty() || param.iter().any(String::is_empty) {
            return Err(Diagnostic::at_field(&field, "expected node.param=value"));
        }
        let value: serde_yaml::Value = serde_yaml::from_str(rhs)
            .map_err(|e| Diagnostic::at_field(&field, format!("value is not valid YAML: {e}")))?;
        let value = yaml_to_json(&value, &mut Vec::new())
            .map_err(|(_, m)| Diagnostic::at_field(&field, m))?;
        Ok(Override {
            node,
            param,
            value,
            text: text.to_string(),
        })
    }
}

/// Reads, parses and checks a pipeline file.
pub fn load(
    path: &Path,
    registry: &Registry,
    overrides: &[Override],
) -> Result<Pipeline, Diagnostics> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostic::at_file(
            &shown,
            Pos::START,
            format!("cannot read pipeline file: {e}"),
        )
    })?;
    parse(path, &text, registry, overrides)
}

/// Parses and checks pipeline text as if it were read from `path`.
pub fn parse(
    path: &Path,
    text: &str,
    registry: &Registry,
    overrides: &[Override],
) -> Result<Pipeline, Diagnostics> {
    let shown = path.display().to_string();
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line(),
                col: l.column(),
            })
            .unwrap_or(Pos::START);
        let msg = e.to_string();
        // serde_yaml appends " at line L column C"; the location is already in front.
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        Diagnostic::at_file(&shown, pos, format!("invalid YAML: {msg}"))
    })?;
    let locator = Locator::new(text);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let overridden = overrides
        .iter()
        .map(|o| {
            let mut p = vec!["stages".to_string(), o.node.clone(), "params".to_string()];
            p.extend(o.param.iter().cloned());
            (p, o.text.clone())
        })
        .collect();
    let mut pipeline = Pipeline {
        path: path.to_path_buf(),
        dir,
        name: String::new(),
        executor: None,
        jobs: None,
        stages: Vec::new(),
        locator,
        overridden,
    };
    let root = match yaml_to_json(&yaml, &mut Vec::new()) {
        Ok(Value::Object(m)) => m,
        Ok(Value::Null) => {
            return Err(Diagnostic::at_file(
                &shown,
                Pos::START,
                "the pipeline file is empty; it needs a `stages:` map",
            )
            .into());
        }
        Ok(_) => {
            return Err(pipeline
                .diag(
                    &[],
                    false,
                    "the pipeline file must be a map with a `stages:` key",
                )
                .into());
        }
        Err((path, m)) => return Err(pipeline.diag(&path, false, m).into()),
    };
    let mut errors = Vec::new();
    let p = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    check_fields(
        &pipeline,
        &root,
        &[],
        TOP_LEVEL,
        "top-level key",
        "",
        &mut errors,
    );

    pipeline.name = match root.get("name") {
        None => path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("pipeline")
            .to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            errors.push(pipeline.diag(&p(&["name"]), false, "`name` must be a string"));
            String::new()
        }
    };
    let seed = match root.get("seed") {
        None => 0,
        Some(v) => v.as_u64().unwrap_or_else(|| {
            errors.push(pipeline.diag(
                &p(&["seed"]),
                false,
                format!(
                    "`seed` must be a non-negative integer, got {}",
                    params::short(v)
                ),
            ));
            0
        }),
    };
    let device = match root.get("device") {
        None => "cpu".to_string(),
        Some(v) => check_device(&pipeline, v, &p(&["device"]), &mut errors),
    };
    pipeline.executor = match root.get("executor") {
        None => None,
        Some(Value::String(s)) if s == "local" => Some(Executor::Local),
        Some(Value::String(s)) if s == "slurm" => Some(Executor::Slurm),
        Some(v) => {
            errors.push(pipeline.diag(
                &p(&["executor"]),
                false,
                format!(
                    "`executor` must be local or slurm, got {}",
                    params::short(v)
                ),
            ));
            None
        }
    };
    pipeline.jobs = match root.get("jobs") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=1024) => Some(n as u32),
            _ => {
                errors.push(pipeline.diag(
                    &p(&["jobs"]),
                    false,
                    format!(
                        "`jobs` must be an integer from 1 to 1024 (stages run at once), got {}",
                        params::short(v)
                    ),
                ));
                None
            }
        },
    };
    let default_resources = resources::check(
        &pipeline,
        root.get("resources"),
        &p(&["resources"]),
        &mut errors,
    );

    let stages = match root.get("stages") {
        Some(Value::Object(m)) if !m.is_empty() => m.clone(),
        Some(Value::Object(_)) => {
            errors.push(pipeline.diag(
                &p(&["stages"]),
                true,
                "`stages` is empty; add at least one stage",
            ));
            Map::new()
        }
        Some(v) => {
            errors.push(pipeline.diag(
                &p(&["stages"]),
                false,
                format!(
                    "`stages` must be a map of stage name to stage, got {}",
                    params::short(v)
                ),
            ));
            Map::new()
        }
        None => {
            errors.push(Diagnostic::at_file(
                &shown,
                Pos::START,
                "missing `stages:` map",
            ));
            Map::new()
        }
    };
    let mut stages = stages;
    apply_overrides(&mut stages, overrides, &mut errors);

    for (name, decl) in &stages {
        if let Some(stage) =
            check_stage(&pipeline, registry, name, decl, seed, &device, &mut errors)
        {
            let mut stage = stage;
            stage.resources = stage.resources.or(&default_resources);
            pipeline.stages.push(stage);
        }
    }
    if errors.is_empty() {
        Ok(pipeline)
    } else {
        Err(Diagnostics(errors))
    }
}

fn check_fields(
    pl: &Pipeline,
    map: &Map<String, Value>,
    at: &[String],
    valid: &[&str],
    what: &str,
    place: &str,
    errors: &mut Vec<Diagnostic>,
) {
    for key in map.keys() {
        if !valid.contains(&key.as_str()) {
            let mut path = at.to_vec();
            path.push(key.clone());
            let hint = match did_you_mean(key, valid) {
                Some(v) => format!("did you mean `{v}`?"),
                None => format!("expected one of: {}", valid.join(", ")),
            };
            errors.push(pl.diag(
                &path,
                true,
                format!("unknown {what} `{key}`{place}; {hint}"),
            ));
        }
    }
}

fn check_device(pl: &Pipeline, v: &Value, path: &[String], errors: &mut Vec<Diagnostic>) -> String {
    let Some(s) = v.as_str() else {
        return device_error(pl, v, path, errors);
    };
    let index = |n: &str| n.trim().parse::<u32>().ok();
    if s == "cpu" || s == "cuda" {
        return s.to_string();
    }
    let Some(list) = s.strip_prefix("cuda:") else {
        return device_error(pl, v, path, errors);
    };
    // `cuda:0,1`: training stages use every GPU of the list, the others its first.
    let mut seen = Vec::new();
    for n in list.split(',') {
        match index(n) {
            Some(i) if seen.contains(&i) => {
                errors.push(pl.diag(path, false, format!("`device` {s:?} lists cuda:{i} twice")));
                return "cpu".to_string();
            }
            Some(i) => seen.push(i),
            None => return device_error(pl, v, path, errors),
        }
    }
    s.to_string()
}

fn device_error(pl: &Pipeline, v: &Value, path: &[String], errors: &mut Vec<Diagnostic>) -> String {
    errors.push(pl.diag(
        path,
        false,
        format!(
            "`device` must be cpu, cuda, cuda:N or a list of GPUs cuda:N,M, got {}",
            params::short(v)
        ),
    ));
    "cpu".to_string()
}

fn apply_overrides(
    stages: &mut Map<String, Value>,
    overrides: &[Override],
    errors: &mut Vec<Diagnostic>,
) {
    for o in overrides {
        let field = format!("--set {}", o.text);
        let names: Vec<&str> = stages.keys().map(String::as_str).collect();
        let hint = did_you_mean(&o.node, &names)
            .map(|n| format!("; did you mean `{n}`?"))
            .unwrap_or_default();
        let Some(Value::Object(stage)) = stages.get_mut(&o.node) else {
            errors.push(Diagnostic::at_field(
                &field,
                format!("no stage named `{}`{hint}", o.node),
            ));
            continue;
        };
        let params = stage
            .entry("params")
            .or_insert_with(|| Value::Object(Map::new()));
        let mut slot = params;
        for (i, part) in o.param.iter().enumerate() {
            let Value::Object(m) = slot else {
                errors.push(Diagnostic::at_field(
                    &field,
                    format!("`{}` is not a map", o.param[..i].join(".")),
                ));
                break;
            };
            slot = m.entry(part.clone()).or_insert(Value::Null);
        }
        *slot = o.value.clone();
    }
}

fn check_stage(
    pl: &Pipeline,
    registry: &Registry,
    name: &str,
    decl: &Value,
    default_seed: u64,
    default_device: &str,
    errors: &mut Vec<Diagnostic>,
) -> Option<Stage> {
    let at = vec!["stages".to_string(), name.to_string()];
    let sub = |k: &str| {
        let mut p = at.clone();
        p.push(k.to_string());
        p
    };
    let before = errors.len();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        errors.push(pl.diag(
            &at,
            true,
            format!("stage name `{name}` may contain only letters, digits, `_` and `-`"),
        ));
    }
    let Value::Object(decl) = decl else {
        errors.push(pl.diag(
            &at,
            false,
            format!("stage `{name}` must be a map with at least `kind:`"),
        ));
        return None;
    };
    check_fields(
        pl,
        decl,
        &at,
        STAGE_FIELDS,
        "field",
        &format!(" in stage `{name}`"),
        errors,
    );
    let kind = match decl.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(v) => {
            errors.push(pl.diag(
                &sub("kind"),
                false,
                format!("`kind` must be a string, got {}", params::short(v)),
            ));
            return None;
        }
        None => {
            errors.push(pl.diag(
                &at,
                true,
                format!("stage `{name}` has no `kind` (`dagrun stages` lists the kinds)"),
            ));
            return None;
        }
    };
    let Some((spec, kind_impl)) = registry.get(&kind) else {
        let hint = match did_you_mean(&kind, &registry.names()) {
            Some(k) => format!("did you mean `{k}`?"),
            None => format!("known kinds: {}", registry.names().join(", ")),
        };
        errors.push(pl.diag(
            &sub("kind"),
            false,
            format!("unknown stage kind `{kind}`; {hint}"),
        ));
        return None;
    };

    let skip = match decl.get("skip") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            errors.push(pl.diag(
                &sub("skip"),
                false,
                format!("`skip` must be true or false, got {}", params::short(v)),
            ));
            false
        }
    };
    let seed = match decl.get("seed") {
        None => default_seed,
        Some(v) => v.as_u64().unwrap_or_else(|| {
            errors.push(pl.diag(
                &sub("seed"),
                false,
                format!(
                    "`seed` must be a non-negative integer, got {}",
                    params::short(v)
                ),
            ));
            0
        }),
    };
    let device = match decl.get("device") {
        None => default_device.to_string(),
        Some(v) => check_device(pl, v, &sub("device"), errors),
    };
    let doc = decl.get("doc").and_then(Value::as_str).map(str::to_string);
    let resources = resources::check(pl, decl.get("resources"), &sub("resources"), errors);
    let inputs = check_inputs(pl, name, decl.get("inputs"), &sub("inputs"), errors);

    let raw_params = match decl.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => {
            errors.push(pl.diag(
                &sub("params"),
                false,
                format!("`params` must be a map, got {}", params::short(v)),
            ));
            Map::new()
        }
    };
    let params = match params::resolve(spec, &raw_params) {
        Ok(p) => match kind_impl.check(&p) {
            Ok(()) => Some(p),
            Err(e) => {
                let mut path = sub("params");
                path.push(e.param.clone());
                errors.push(pl.diag(&path, false, e.message));
                None
            }
        },
        Err(problems) => {
            for pr in problems {
                let mut path = sub("params");
                path.extend(pr.path);
                errors.push(pl.diag(&path, pr.at_key, pr.message));
            }
            None
        }
    };
    let mut params = params?;
    // Paths are relative to the pipeline file, whatever the working directory.
    for p in spec
        .params
        .iter()
        .filter(|p| matches!(p.ty, ParamType::Path))
    {
        if let Some(rel) = params.get(p.name).as_str() {
            let abs = pl.dir.join(rel);
            params
                .0
                .insert(p.name.to_string(), Value::String(abs.display().to_string()));
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Stage {
        name: name.to_string(),
        kind,
        inputs,
        params,
        skip,
        seed,
        device,
        resources,
        doc,
    })
}

fn check_inputs(
    pl: &Pipeline,
    stage: &str,
    v: Option<&Value>,
    at: &[String],
    errors: &mut Vec<Diagnostic>,
) -> Vec<(String, Vec<InputRef>)> {
    let map = match v {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Object(m)) => m,
        Some(v) => {
            errors.push(pl.diag(
                at,
                false,
                format!(
                    "`inputs` of `{stage}` must be a map of port: node.output, got {}",
                    params::short(v)
                ),
            ));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (port, refs) in map {
        let mut path = at.to_vec();
        path.push(port.clone());
        let items: Vec<(Vec<String>, &Value)> = match refs {
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut p = path.clone();
                    p.push(i.to_string());
                    (p, r)
                })
                .collect(),
            other => vec![(path.clone(), other)],
        };
        let mut parsed = Vec::new();
        for (p, item) in items {
            match item.as_str().and_then(parse_ref) {
                Some((node, output)) => parsed.push(InputRef {
                    node,
                    output,
                    path: p,
                }),
                None => errors.push(pl.diag(
                    &p,
                    false,
                    format!(
                        "input `{port}` must be `node` or `node.output`, got {}",
                        params::short(item)
                    ),
                )),
            }
        }
        if matches!(refs, Value::Array(a) if a.is_empty()) {
            errors.push(pl.diag(&path, false, format!("input `{port}` lists no stages")));
        }
        out.push((port.clone(), parsed));
    }
    out
}

fn parse_ref(s: &str) -> Option<(String, Option<String>)> {
    let valid = |x: &str| {
        !x.is_empty()
            && x.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    match s.trim().split_once('.') {
        Some((n, o)) if valid(n) && valid(o) => Some((n.to_string(), Some(o.to_string()))),
        None if valid(s.trim()) => Some((s.trim().to_string(), None)),
        _ => None,
    }
}

/// YAML to JSON values: map keys must be strings (or numbers and booleans, read as text).
/// On failure, returns the path of the offending value.
pub(crate) fn yaml_to_json(
    v: &serde_yaml::Value,
    path: &mut Vec<String>,
) -> Result<Value, (Vec<String>, String)> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| (path.clone(), format!("number {f} is not finite")))?
            }
        }
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                out.push(yaml_to_json(item, path)?);
                path.pop();
            }
            Value::Array(out)
        }
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err((path.clone(), "map keys must be plain strings".to_string())),
                };
                path.push(key.clone());
                out.insert(key, yaml_to_json(v, path)?);
                path.pop();
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            return Err((
                path.clone(),
                format!("YAML tags such as `{}` are not supported", t.tag),
            ));
        }
    })
}
