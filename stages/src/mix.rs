//! Stage kind `mix`: combines and selects datasets of one schema, as the R1 recipe mixes
//! reasoning and non-reasoning data. Works on any schema; filters use the `task` and
//! `difficulty` columns where they exist.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::{anyhow, bail};
use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::{Int32Type, Schema};
use dagrun_engine::Params;
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::diag::did_you_mean;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
    WiringError,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;

pub struct Mix;

/// The stage's params, read once.
#[derive(Debug, Clone, Deserialize)]
struct MixParams {
    counts: Option<BTreeMap<String, u64>>,
    weights: Option<BTreeMap<String, f64>>,
    tasks: Option<Vec<String>>,
    difficulty: Option<Vec<i64>>,
    limit: Option<usize>,
    dedupe: bool,
    shuffle: bool,
}

impl MixParams {
    fn read(params: &Params) -> anyhow::Result<MixParams> {
        params.read_into("`mix`")
    }
}

impl StageKind for Mix {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "mix",
            version: 2,
            doc: "combine datasets of one schema: per-input counts or weights, task/difficulty filters, dedupe, shuffle, limit",
            inputs: vec![PortSpec::one(
                "a",
                ArtifactType::Dataset(None),
                "a dataset; name further inputs freely (b, c, reasoning, …)",
            )],
            outputs: vec![PortSpec::one(
                "data",
                ArtifactType::Dataset(None),
                "the mixed rows, same schema as the inputs",
            )],
            params: vec![
                ParamSpec::unset(
                    "counts",
                    ParamType::Map(Box::new(ParamType::Int {
                        min: 0,
                        max: i64::MAX,
                    })),
                    "rows to take per input (default: all rows)",
                ),
                ParamSpec::unset(
                    "weights",
                    ParamType::Map(Box::new(ParamType::Float { min: 0.0, max: 1e9 })),
                    "relative share per input of `limit` rows (needs `limit`)",
                ),
                ParamSpec::unset(
                    "tasks",
                    ParamType::List(Box::new(ParamType::Str { choices: &[] })),
                    "keep rows whose `task` is one of these",
                ),
                ParamSpec::unset(
                    "difficulty",
                    ParamType::List(Box::new(ParamType::Int {
                        min: i64::MIN,
                        max: i64::MAX,
                    })),
                    "keep rows with `difficulty` in [min, max]",
                ),
                ParamSpec::unset(
                    "limit",
                    ParamType::Int {
                        min: 0,
                        max: i64::MAX,
                    },
                    "at most this many rows in all",
                ),
                ParamSpec::new(
                    "shuffle",
                    ParamType::Bool,
                    json!(true),
                    "shuffle rows (seeded)",
                ),
                ParamSpec::new(
                    "dedupe",
                    ParamType::Bool,
                    json!(true),
                    "drop rows whose `id` was already taken",
                ),
            ],
            device_dependent: false,
            variadic_inputs: true,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        if !params.get("weights").is_null() && params.get("limit").is_null() {
            return Err(ParamError {
                param: "weights".into(),
                message: "param `weights` needs `limit` (the total the weights share)".into(),
            });
        }
        if !params.get("weights").is_null() && !params.get("counts").is_null() {
            return Err(ParamError {
                param: "weights".into(),
                message: "give `counts` or `weights`, not both".into(),
            });
        }
        let range: Option<Vec<i64>> = params.get_as("difficulty").ok();
        if let Some(r) = range
            && (r.len() != 2 || r[0] > r[1])
        {
            return Err(ParamError {
                param: "difficulty".into(),
                message: format!("param `difficulty` must be [min, max] with min ≤ max, got {r:?}"),
            });
        }
        Ok(())
    }

    fn check_wiring(&self, wired: &[&str], params: &Params) -> Result<(), WiringError> {
        let mut ports = wired.to_vec();
        ports.sort_unstable();
        for key in ["counts", "weights"] {
            if let Some(m) = params.get(key).as_object()
                && let Some(bad) = m.keys().find(|k| !ports.contains(&k.as_str()))
            {
                let hint = did_you_mean(bad, &ports)
                    .map(|p| format!("; did you mean `{p}`?"))
                    .unwrap_or_default();
                let message = format!(
                    "param `{key}` names `{bad}`, which is not an input (inputs: {}){hint}",
                    ports.join(", ")
                );
                return Err(WiringError::at(&["params", key, bad], message));
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let p = MixParams::read(&ctx.params)?;
        // Sorted port names: the key does not see the order they are written in.
        let ports: Vec<String> = ctx.input_ports().into_iter().map(str::to_string).collect();
        let tasks: Option<HashSet<String>> = p.tasks.clone().map(|v| v.into_iter().collect());
        let difficulty = p.difficulty.as_deref();
        let limit = p.limit;
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed);

        let mut schema: Option<Arc<Schema>> = None;
        let mut parts = Vec::new();
        for port in &ports {
            let input = ctx.input(port)?;
            let (s, batches) = read_parquet(&input.path)?;
            let s = Arc::new(Schema::new(s.fields().clone()));
            match &schema {
                None => schema = Some(s.clone()),
                Some(first) if first.fields() != s.fields() => {
                    bail!("input `{port}` has different columns from `{}`", ports[0])
                }
                Some(_) => {}
            }
            let batch = concat_batches(&s, &batches)?;
            let mut rows = keep_rows(&batch, tasks.as_ref(), difficulty)?;
            rows.shuffle(&mut rng);
            parts.push((port.clone(), batch, rows));
        }
        let schema = schema.ok_or_else(|| anyhow!("mix needs at least one input"))?;

        // How many rows each input contributes.
        let quota = |port: &str, available: usize| -> usize {
            if let Some(&n) = p.counts.as_ref().and_then(|c| c.get(port)) {
                return (n as usize).min(available);
            }
            if let (Some(w), Some(total)) = (&p.weights, limit) {
                // Summed in name order (a BTreeMap's): float addition depends on order, and the
                // key ignores it.
                let sum: f64 = w.values().sum();
                let mine = w.get(port).copied().unwrap_or(0.0);
                return if sum > 0.0 {
                    ((total as f64 * mine / sum).round() as usize).min(available)
                } else {
                    0
                };
            }
            available
        };
        let mut taken = Vec::new();
        let mut seen_ids = HashSet::new();
        for (port, batch, rows) in &parts {
            let ids = batch
                .column_by_name("id")
                .and_then(|c| c.as_string_opt::<i32>().cloned());
            let want = quota(port, rows.len());
            let mut picked = Vec::with_capacity(want);
            for &r in rows {
                if picked.len() == want {
                    break;
                }
                if p.dedupe
                    && let Some(ids) = &ids
                    && !seen_ids.insert(ids.value(r as usize).to_string())
                {
                    continue;
                }
                picked.push(r);
            }
            if !p.shuffle {
                picked.sort_unstable();
            }
            let picked = take_record_batch(batch, &UInt32Array::from(picked))?;
            taken.push(RecordBatch::try_new(
                schema.clone(),
                picked.columns().to_vec(),
            )?);
        }
        let mut all = concat_batches(&schema, &taken)?;
        if p.shuffle {
            let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
            order.shuffle(&mut rng);
            all = take_record_batch(&all, &UInt32Array::from(order))?;
        }
        if let Some(l) = limit {
            all = all.slice(0, l.min(all.num_rows()));
        }
        ctx.info(format!(
            "mixed {} rows from {} inputs",
            all.num_rows(),
            parts.len()
        ));
        ctx.write_dataset("data", &[all])
    }
}

/// Row indices that pass the task and difficulty filters, in order.
fn keep_rows(
    batch: &RecordBatch,
    tasks: Option<&HashSet<String>>,
    difficulty: Option<&[i64]>,
) -> anyhow::Result<Vec<u32>> {
    let task_col = match tasks {
        Some(_) => Some(
            batch
                .column_by_name("task")
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(|| anyhow!("param `tasks` needs a string column `task`"))?,
        ),
        None => None,
    };
    let diff_col = match difficulty {
        Some(_) => Some(
            batch
                .column_by_name("difficulty")
                .and_then(|c| c.as_primitive_opt::<Int32Type>())
                .ok_or_else(|| anyhow!("param `difficulty` needs an int32 column `difficulty`"))?,
        ),
        None => None,
    };
    Ok((0..batch.num_rows())
        .filter(|&i| {
            let task_ok = match (tasks, task_col) {
                (Some(t), Some(c)) => !c.is_null(i) && t.contains(c.value(i)),
                _ => true,
            };
            let diff_ok = match (difficulty, diff_col) {
                (Some(r), Some(c)) => {
                    !c.is_null(i) && (r[0]..=r[1]).contains(&i64::from(c.value(i)))
                }
                _ => true,
            };
            task_ok && diff_ok
        })
        .map(|i| i as u32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_read_into_their_struct() {
        let params = dagrun_engine::params::resolve(&Mix.spec(), &serde_json::Map::new()).unwrap();
        let p = MixParams::read(&params).unwrap();
        assert!(p.counts.is_none() && p.weights.is_none() && p.limit.is_none());
        assert!(p.dedupe && p.shuffle);
        let mut given = serde_json::Map::new();
        given.insert("limit".into(), json!(10));
        given.insert("weights".into(), json!({"b": 1, "a": 2.5}));
        let params = dagrun_engine::params::resolve(&Mix.spec(), &given).unwrap();
        let p = MixParams::read(&params).unwrap();
        let weights: Vec<(&str, f64)> = p
            .weights
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(weights, [("a", 2.5), ("b", 1.0)]);
    }
}
