//! Checking a stage's params against its kind's spec, and the resolved params a stage reads.

use serde_json::{Map, Number, Value};

use crate::diag::did_you_mean;
use crate::kind::{Default, KindSpec, ParamSpec, ParamType};

/// Fully resolved params: every declared param present (defaults filled in, `null` for unset
/// optional ones), values normalised to their declared type.
#[derive(Debug, Clone, PartialEq)]
pub struct Params(pub(crate) Map<String, Value>);

impl Params {
    pub fn from_map(map: Map<String, Value>) -> Params {
        Params(map)
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The value of `name` (null if it is an unset optional param).
    pub fn get(&self, name: &str) -> &Value {
        self.0.get(name).unwrap_or(&Value::Null)
    }

    /// All the params read into a stage's typed struct (one field per param it uses; the
    /// values are already checked and normalized against the kind's spec). `what` names the
    /// reader in the error: "`grpo`", "the optimizer".
    pub fn read_into<T: serde::de::DeserializeOwned>(&self, what: &str) -> anyhow::Result<T> {
        serde_json::from_value(Value::Object(self.0.clone()))
            .map_err(|e| anyhow::anyhow!("reading the params of {what}: {e}"))
    }

    /// Deserializes a param into any type: `params.get_as::<Vec<String>>("families")`.
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, name: &str) -> anyhow::Result<T> {
        serde_json::from_value(self.get(name).clone())
            .map_err(|e| anyhow::anyhow!("param `{name}`: {e}"))
    }

    pub fn i64(&self, name: &str) -> i64 {
        self.get(name)
            .as_i64()
            .unwrap_or_else(|| unchecked(name, "int"))
    }

    pub fn f64(&self, name: &str) -> f64 {
        self.get(name)
            .as_f64()
            .unwrap_or_else(|| unchecked(name, "float"))
    }

    pub fn bool(&self, name: &str) -> bool {
        self.get(name)
            .as_bool()
            .unwrap_or_else(|| unchecked(name, "bool"))
    }

    pub fn str(&self, name: &str) -> &str {
        self.get(name)
            .as_str()
            .unwrap_or_else(|| unchecked(name, "string"))
    }

    pub fn opt_i64(&self, name: &str) -> Option<i64> {
        self.get(name).as_i64()
    }

    pub fn opt_f64(&self, name: &str) -> Option<f64> {
        self.get(name).as_f64()
    }

    pub fn opt_str(&self, name: &str) -> Option<&str> {
        self.get(name).as_str()
    }

    /// A `Weights` param as (name, weight) pairs sorted by name: keys ignore the order a map
    /// is written in, so results must not depend on it either.
    pub fn weights(&self, name: &str) -> Vec<(String, f64)> {
        let mut pairs: Vec<(String, f64)> = match self.get(name) {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                .collect(),
            _ => Vec::new(),
        };
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs
    }
}

/// Reading a param that the spec check guarantees: failing here is a bug in a stage kind.
fn unchecked(name: &str, ty: &str) -> ! {
    panic!("stage kind read param `{name}` as {ty}, which its spec does not declare")
}

/// A problem with one param, located by its path below `params` (e.g. `["families", "2"]`).
#[derive(Debug, Clone)]
pub struct ParamProblem {
    pub path: Vec<String>,
    pub message: String,
    /// The problem is the key itself (unknown name), not its value.
    pub at_key: bool,
}

/// Checks `raw` against the kind's params and fills in defaults.
pub fn resolve(spec: &KindSpec, raw: &Map<String, Value>) -> Result<Params, Vec<ParamProblem>> {
    let mut problems = Vec::new();
    let names: Vec<&str> = spec.params.iter().map(|p| p.name).collect();
    for key in raw.keys() {
        if !names.contains(&key.as_str()) {
            let hint = match did_you_mean(key, &names) {
                Some(n) => format!("; did you mean `{n}`?"),
                None if names.is_empty() => "; it takes no params".to_string(),
                None => format!("; valid params: {}", names.join(", ")),
            };
            problems.push(ParamProblem {
                path: vec![key.clone()],
                message: format!("unknown param `{key}` for kind `{}`{hint}", spec.name),
                at_key: true,
            });
        }
    }
    let mut out = Map::new();
    for p in &spec.params {
        match (raw.get(p.name), &p.default) {
            (Some(v), _) => {
                if let Some(v) =
                    normalize(p, &p.ty, v, &mut vec![p.name.to_string()], &mut problems)
                {
                    out.insert(p.name.to_string(), v);
                }
            }
            (None, Default::Value(v)) => {
                out.insert(p.name.to_string(), v.clone());
            }
            (None, Default::Unset) => {
                out.insert(p.name.to_string(), Value::Null);
            }
            (None, Default::Required) => problems.push(ParamProblem {
                path: vec![],
                message: format!(
                    "missing required param `{}` ({}) for kind `{}`",
                    p.name, p.ty, spec.name
                ),
                at_key: true,
            }),
        }
    }
    if problems.is_empty() {
        Ok(Params(out))
    } else {
        Err(problems)
    }
}

fn normalize(
    p: &ParamSpec,
    ty: &ParamType,
    v: &Value,
    path: &mut Vec<String>,
    problems: &mut Vec<ParamProblem>,
) -> Option<Value> {
    let mut fail = |message: String| {
        problems.push(ParamProblem {
            path: path.clone(),
            message,
            at_key: false,
        });
        None
    };
    let shown = short(v);
    let name = path.join(".");
    if v.is_null() && matches!(p.default, Default::Unset) && path.len() == 1 {
        return Some(Value::Null);
    }
    match ty {
        ParamType::Int { min, max } => {
            let Some(i) = v.as_i64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            }) else {
                return fail(format!("param `{name}` must be an integer, got {shown}"));
            };
            if i < *min || i > *max {
                return fail(format!(
                    "param `{name}` = {i} is out of range {}",
                    range(*min as f64, *max as f64)
                ));
            }
            Some(Value::from(i))
        }
        ParamType::Float { min, max } => {
            let f = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse::<f64>().ok()));
            let Some(f) = f.filter(|f| f.is_finite()) else {
                return fail(format!("param `{name}` must be a number, got {shown}"));
            };
            if f < *min || f > *max {
                return fail(format!(
                    "param `{name}` = {f} is out of range {}",
                    range(*min, *max)
                ));
            }
            Some(Value::Number(Number::from_f64(f)?))
        }
        ParamType::Bool => match v.as_bool() {
            Some(b) => Some(Value::Bool(b)),
            None => fail(format!("param `{name}` must be true or false, got {shown}")),
        },
        ParamType::Str { choices } => {
            let Some(s) = v.as_str() else {
                return fail(format!("param `{name}` must be a string, got {shown}"));
            };
            if !choices.is_empty() && !choices.contains(&s) {
                let hint = did_you_mean(s, choices)
                    .map(|c| format!("; did you mean `{c}`?"))
                    .unwrap_or_default();
                return fail(format!(
                    "param `{name}` must be one of {}, got `{s}`{hint}",
                    choices.join(", ")
                ));
            }
            Some(Value::String(s.to_string()))
        }
        ParamType::Path => match v.as_str() {
            Some(s) if !s.is_empty() => Some(Value::String(s.to_string())),
            _ => fail(format!("param `{name}` must be a path, got {shown}")),
        },
        ParamType::List(item) => {
            let items: Vec<Value> = match v {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()], // a single value is a list of one
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                path.push(i.to_string());
                out.push(normalize(p, item, it, path, problems));
                path.pop();
            }
            out.into_iter()
                .collect::<Option<Vec<_>>>()
                .map(Value::Array)
        }
        ParamType::Weights { keys } => {
            let pairs: Vec<(String, Value)> = match v {
                Value::Object(m) => m.iter().map(|(k, w)| (k.clone(), w.clone())).collect(),
                Value::Array(a) if a.iter().all(|x| x.is_string()) => a
                    .iter()
                    .map(|x| (x.as_str().unwrap_or_default().to_string(), Value::from(1.0)))
                    .collect(),
                Value::String(s) => vec![(s.clone(), Value::from(1.0))],
                _ => {
                    return fail(format!(
                        "param `{name}` must be a list of names or a map of name: weight, got {shown}"
                    ));
                }
            };
            if pairs.is_empty() {
                return fail(format!("param `{name}` must name at least one entry"));
            }
            let mut out = Map::new();
            let mut ok = true;
            for (k, w) in pairs {
                path.push(k.clone());
                if !keys.is_empty() && !keys.contains(&k.as_str()) {
                    let hint = did_you_mean(&k, keys)
                        .map(|c| format!("; did you mean `{c}`?"))
                        .unwrap_or_else(|| format!("; valid: {}", keys.join(", ")));
                    problems.push(ParamProblem {
                        path: path.clone(),
                        message: format!("param `{name}`: unknown entry `{k}`{hint}"),
                        at_key: true,
                    });
                    ok = false;
                } else {
                    match w.as_f64().filter(|w| w.is_finite() && *w >= 0.0) {
                        Some(w) => {
                            out.insert(k, Value::Number(Number::from_f64(w)?));
                        }
                        None => {
                            problems.push(ParamProblem {
                                path: path.clone(),
                                message: format!(
                                    "param `{name}.{k}`: weight must be a number ≥ 0, got {}",
                                    short(&w)
                                ),
                                at_key: false,
                            });
                            ok = false;
                        }
                    }
                }
                path.pop();
            }
            ok.then_some(Value::Object(out))
        }
        ParamType::Map(value_ty) => {
            let Value::Object(m) = v else {
                return fail(format!("param `{name}` must be a map, got {shown}"));
            };
            let mut out = Map::new();
            let mut ok = true;
            for (k, x) in m {
                path.push(k.clone());
                match normalize(p, value_ty, x, path, problems) {
                    Some(x) => {
                        out.insert(k.clone(), x);
                    }
                    None => ok = false,
                }
                path.pop();
            }
            ok.then_some(Value::Object(out))
        }
    }
}

fn range(min: f64, max: f64) -> String {
    let big = 1e15;
    match (min <= -big, max >= big) {
        (true, true) => "(any)".into(),
        (true, false) => format!("≤ {max}"),
        (false, true) => format!("≥ {min}"),
        (false, false) => format!("[{min}, {max}]"),
    }
}

/// A value as shown in a message: short, on one line.
pub(crate) fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("\"{s}\""),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a map".into(),
        other => other.to_string(),
    };
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> KindSpec {
        KindSpec {
            name: "k",
            version: 1,
            doc: "",
            inputs: vec![],
            outputs: vec![],
            params: vec![
                ParamSpec::new(
                    "group_size",
                    ParamType::Int { min: 2, max: 64 },
                    json!(8),
                    "",
                ),
                ParamSpec::new(
                    "lr",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(1e-5),
                    "",
                ),
                ParamSpec::new(
                    "families",
                    ParamType::Weights {
                        keys: &["arithmetic", "linear"],
                    },
                    json!({"arithmetic": 1.0}),
                    "",
                ),
                ParamSpec::unset(
                    "limit",
                    ParamType::Int {
                        min: 1,
                        max: i64::MAX,
                    },
                    "",
                ),
            ],
            device_dependent: false,
            variadic_inputs: false,
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn fills_defaults_and_normalizes() {
        let p = resolve(&spec(), &obj(json!({"lr": 1, "families": ["linear"]}))).unwrap();
        assert_eq!(p.i64("group_size"), 8);
        assert_eq!(p.get("lr"), &json!(1.0));
        assert_eq!(p.weights("families"), vec![("linear".to_string(), 1.0)]);
        assert!(p.get("limit").is_null());
    }

    #[test]
    fn weights_come_sorted_by_name_whatever_the_order_written() {
        let a = resolve(
            &spec(),
            &obj(json!({"families": {"linear": 2, "arithmetic": 1}})),
        )
        .unwrap();
        let b = resolve(&spec(), &obj(json!({"families": ["arithmetic", "linear"]}))).unwrap();
        let c = resolve(&spec(), &obj(json!({"families": ["linear", "arithmetic"]}))).unwrap();
        assert_eq!(
            a.weights("families"),
            vec![("arithmetic".to_string(), 1.0), ("linear".to_string(), 2.0)]
        );
        assert_eq!(b.weights("families"), c.weights("families"));
    }

    #[test]
    fn reports_unknown_names_with_a_suggestion_and_bad_values() {
        let errs = resolve(
            &spec(),
            &obj(json!({"group_sise": 4, "lr": "fast", "families": {"algebra": 1}})),
        )
        .unwrap_err();
        let text: Vec<_> = errs.iter().map(|e| e.message.clone()).collect();
        assert!(
            text.iter().any(|m| m.contains("did you mean `group_size`")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|m| m.contains("`lr` must be a number")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|m| m.contains("unknown entry `algebra`")),
            "{text:?}"
        );
    }

    #[test]
    fn rejects_out_of_range() {
        let errs = resolve(&spec(), &obj(json!({"group_size": 1}))).unwrap_err();
        assert!(
            errs[0].message.contains("out of range [2, 64]"),
            "{}",
            errs[0].message
        );
    }
}
