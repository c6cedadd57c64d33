//! Stage keys: what a stage's result depends on, hashed.
//!
//! The key covers the kind and its implementation version, the fully resolved params, the seed,
//! the device class when the kind's results depend on it, the digests of its inputs (the names
//! of the stages that made them only for kinds that write those names into their outputs), and
//! the key format. Comments, key order and layout of
//! the YAML never reach it, and neither does the stage's own name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Bump when the encoding below changes: every key changes with it.
pub const KEY_FORMAT: u32 = 1;

/// The components of a key, kept in run records so `dagrun plan` can say what changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    pub kind: String,
    pub kind_version: u32,
    pub params: Map<String, Value>,
    pub seed: u64,
    pub device: Option<String>,
    /// Schema tags of the outputs: a changed table layout re-runs its producers.
    pub output_schemas: BTreeMap<String, String>,
    pub inputs: BTreeMap<String, Vec<InputPart>>,
    /// Producer names are hashed too: the kind writes them into its outputs.
    #[serde(default)]
    pub producers_in_key: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputPart {
    pub digest: String,
    /// The stage that produced it; shown in messages, not hashed.
    pub producer: String,
}

impl KeyParts {
    /// The key: blake3 over the canonical JSON of the hashed components.
    pub fn key(&self) -> String {
        let inputs: Map<String, Value> = self
            .inputs
            .iter()
            .map(|(port, parts)| {
                let part = |p: &InputPart| {
                    if self.producers_in_key {
                        Value::from(vec![p.digest.clone(), p.producer.clone()])
                    } else {
                        Value::from(p.digest.clone())
                    }
                };
                (
                    port.clone(),
                    Value::from(parts.iter().map(part).collect::<Vec<_>>()),
                )
            })
            .collect();
        let hashed = serde_json::json!({
            "key_format": KEY_FORMAT,
            "kind": self.kind,
            "kind_version": self.kind_version,
            "params": self.params,
            "seed": self.seed,
            "device": self.device,
            "output_schemas": self.output_schemas,
            "inputs": inputs,
        });
        blake3::hash(canonical_json(&hashed).as_bytes())
            .to_hex()
            .to_string()
    }

    /// What differs from `old`, one human-readable line per component.
    pub fn changes_from(&self, old: &KeyParts) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind != old.kind {
            out.push(format!("kind: {} → {}", old.kind, self.kind));
        } else if self.kind_version != old.kind_version {
            out.push(format!(
                "{} implementation: v{} → v{}",
                self.kind, old.kind_version, self.kind_version
            ));
        }
        let names: std::collections::BTreeSet<&String> =
            self.params.keys().chain(old.params.keys()).collect();
        for name in names {
            let (a, b) = (old.params.get(name), self.params.get(name));
            if a != b {
                out.push(format!("params.{name}: {} → {}", show(a), show(b)));
            }
        }
        if self.seed != old.seed {
            out.push(format!("seed: {} → {}", old.seed, self.seed));
        }
        if self.device != old.device {
            out.push(format!(
                "device: {} → {}",
                old.device.as_deref().unwrap_or("-"),
                self.device.as_deref().unwrap_or("-")
            ));
        }
        if self.output_schemas != old.output_schemas {
            out.push("output schema changed".to_string());
        }
        let ports: std::collections::BTreeSet<&String> =
            self.inputs.keys().chain(old.inputs.keys()).collect();
        for port in ports {
            let (a, b) = (old.inputs.get(port), self.inputs.get(port));
            let digests = |x: Option<&Vec<InputPart>>| {
                x.map(|v| v.iter().map(|p| p.digest.clone()).collect::<Vec<_>>())
            };
            let names = |x: Option<&Vec<InputPart>>| {
                x.map(|v| v.iter().map(|p| p.producer.clone()).collect::<Vec<_>>())
            };
            if digests(a) != digests(b) {
                out.push(format!(
                    "input {port}: changed (node {})",
                    names(b).unwrap_or_default().join(", ")
                ));
            } else if self.producers_in_key && names(a) != names(b) {
                out.push(format!(
                    "input {port}: renamed {} → {}",
                    names(a).unwrap_or_default().join(", "),
                    names(b).unwrap_or_default().join(", ")
                ));
            }
        }
        out
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "(unset)".to_string(),
        Some(v) => canonical_json(v),
    }
}

/// JSON with object keys sorted at every level and no whitespace: one text per value.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `cuda:1` and `cuda` compute alike; cpu differs from both. A GPU list (`cuda:0,1`) is class
/// `cuda` too: data-parallel training adds the micro-batches' gradients on the first GPU in the
/// order one GPU adds them (`dagrun_model::parallel`; an all-reduce of per-GPU partial sums
/// would change the float bits and would need a class of its own). It trains the same bits as
/// one GPU as far as the kernels do: burn's autotune picks CUDA kernels per device by timing,
/// which can already differ between two single-GPU runs (not verified on GPUs).
pub fn device_class(device: &str) -> &str {
    device.split(':').next().unwrap_or(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts() -> KeyParts {
        KeyParts {
            kind: "mix".into(),
            kind_version: 1,
            params: json!({"b": 1, "a": [1.5, "x"]})
                .as_object()
                .unwrap()
                .clone(),
            seed: 3,
            device: None,
            output_schemas: BTreeMap::new(),
            inputs: BTreeMap::from([(
                "a".to_string(),
                vec![InputPart {
                    digest: "d1".into(),
                    producer: "gen".into(),
                }],
            )]),
            producers_in_key: false,
        }
    }

    #[test]
    fn a_gpu_list_is_the_cuda_class() {
        assert_eq!(device_class("cuda:0,1"), "cuda");
        assert_eq!(device_class("cuda:1"), device_class("cuda"));
        assert_eq!(device_class("cpu"), "cpu");
    }

    #[test]
    fn producer_names_count_only_for_kinds_that_write_them() {
        let mut a = parts();
        a.producers_in_key = true;
        let mut b = a.clone();
        b.inputs.get_mut("a").unwrap()[0].producer = "renamed".into();
        assert_ne!(a.key(), b.key());
        assert_eq!(
            b.changes_from(&a),
            vec!["input a: renamed gen → renamed".to_string()]
        );
    }

    #[test]
    fn key_ignores_param_order_and_producer_names() {
        let a = parts();
        let mut b = parts();
        b.params = json!({"a": [1.5, "x"], "b": 1})
            .as_object()
            .unwrap()
            .clone();
        b.inputs.get_mut("a").unwrap()[0].producer = "renamed".into();
        assert_eq!(a.key(), b.key());
        b.seed = 4;
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn changes_name_each_component() {
        let a = parts();
        let mut b = parts();
        b.params.insert("b".into(), json!(2));
        b.inputs.get_mut("a").unwrap()[0].digest = "d2".into();
        assert_eq!(
            b.changes_from(&a),
            vec![
                "params.b: 1 → 2".to_string(),
                "input a: changed (node gen)".to_string()
            ]
        );
    }
}
