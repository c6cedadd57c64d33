//! The JSON Schema of the pipeline file, so editors can complete and check `pipelines/*.yaml`.
//! The structure comes from the Rust types below (schemars); the kinds and their params come
//! from the registry, so the schema always matches what `dagrun` accepts.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde_json::{Map, Value, json};

use crate::kind::{Default, ParamType, Registry};

/// A dagrun pipeline: a DAG of stages whose outputs are cached by content.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)] // describes the file; the reader in `pipeline` checks it with positions
struct PipelineFile {
    /// A name for the pipeline (defaults to the file name).
    name: Option<String>,
    /// The default seed of every stage.
    seed: Option<u64>,
    /// Where burn stages compute: `cpu`, `cuda`, `cuda:N`, or GPUs `cuda:N,M` (training stages
    /// use them all, data-parallel; the others the first).
    device: Option<String>,
    /// Where stages run: `local` (this process; the default) or `slurm` (one job per stage).
    executor: Option<ExecutorName>,
    /// Stages the local executor runs at once when their inputs allow (`--jobs` overrides it;
    /// default 1).
    #[schemars(range(min = 1, max = 1024))]
    jobs: Option<u32>,
    /// Every stage's default `resources`.
    resources: Option<ResourcesDecl>,
    /// Stage name → stage. Order does not matter: edges come from `inputs`.
    stages: BTreeMap<String, StageDecl>,
}

/// One stage of the pipeline.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
struct StageDecl {
    /// The stage kind (`dagrun stages` lists them).
    kind: String,
    /// Input port → `node.output` (or `node`), or a list of them for list ports.
    inputs: Option<BTreeMap<String, InputRefs>>,
    /// The kind's params; unset ones take their defaults.
    params: Option<Map<String, Value>>,
    /// Pass the stage's input of the same type through to its consumers instead of running it.
    skip: Option<bool>,
    /// This stage's seed (default: the pipeline's).
    seed: Option<u64>,
    /// This stage's device (default: the pipeline's).
    device: Option<String>,
    /// What the stage asks of the machine or the scheduler (default: the pipeline's).
    resources: Option<ResourcesDecl>,
    /// A note for people reading the pipeline.
    doc: Option<String>,
}

#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum ExecutorName {
    Local,
    Slurm,
}

/// A stage's requests; they never change its key.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
struct ResourcesDecl {
    /// CPU cores (local `--jobs` budget; Slurm `--cpus-per-task`; the stage's thread count).
    cpus: Option<u32>,
    /// Memory: `500M`, `4G` or megabytes (Slurm `--mem`; local budget).
    mem: Option<SizeDecl>,
    /// GPUs (Slurm `--gres=gpu:N`).
    gpus: Option<u32>,
    /// Slurm time limit: minutes, `HH:MM:SS` or `D-HH:MM:SS`.
    time: Option<SizeDecl>,
    /// Slurm partition.
    partition: Option<String>,
}

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum SizeDecl {
    Number(u64),
    Text(String),
}

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum InputRefs {
    One(String),
    Many(Vec<String>),
}

/// The JSON Schema of pipeline files for the kinds in `registry`.
pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut schema =
        serde_json::to_value(schemars::schema_for!(PipelineFile)).unwrap_or(Value::Null);
    let names: Vec<&str> = registry.names();
    let per_kind: Vec<Value> = registry
        .specs()
        .map(|spec| {
            let props: Map<String, Value> = spec.params.iter().map(|p| {
                let mut s = param_schema(&p.ty);
                s["description"] = Value::String(p.doc.to_string());
                if let Default::Value(v) = &p.default {
                    s["default"] = v.clone();
                }
                (p.name.to_string(), s)
            }).collect();
            let ports: Map<String, Value> = spec.inputs.iter().map(|p| (p.name.to_string(), json!({"description": format!("{} — {}", p.ty, p.doc)}))).collect();
            json!({
                "if": { "properties": { "kind": { "const": spec.name } }, "required": ["kind"] },
                "then": { "properties": {
                    "params": { "type": "object", "properties": props, "additionalProperties": false },
                    "inputs": { "type": "object", "properties": ports, "additionalProperties": spec.variadic_inputs }
                } }
            })
        })
        .collect();
    if let Some(stage) = schema.pointer_mut("/$defs/StageDecl") {
        stage["properties"]["kind"]["enum"] = json!(names);
        stage["allOf"] = Value::Array(per_kind);
    }
    schema
}

fn param_schema(ty: &ParamType) -> Value {
    match ty {
        ParamType::Int { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        ParamType::Float { min, max } => json!({"type": "number", "minimum": min, "maximum": max}),
        ParamType::Bool => json!({"type": "boolean"}),
        ParamType::Str { choices: [] } => json!({"type": "string"}),
        ParamType::Str { choices } => json!({"enum": choices}),
        ParamType::Path => json!({"type": "string"}),
        ParamType::List(item) => {
            json!({"anyOf": [{"type": "array", "items": param_schema(item)}, param_schema(item)]})
        }
        ParamType::Weights { keys } => {
            let name = if keys.is_empty() {
                json!({"type": "string"})
            } else {
                json!({"enum": keys})
            };
            json!({"anyOf": [
                {"type": "array", "items": name},
                {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
            ]})
        }
        ParamType::Map(v) => json!({"type": "object", "additionalProperties": param_schema(v)}),
    }
}
