//! The `prm` stage on a tiny pipeline: it writes step labels with planted bad steps and a PRM
//! directory whose config.json says how to read it; `eval` with `rerank: prm` writes
//! `prm_correct`, `maj_correct` and `prm@N` / `maj@N` rows (with a likelihood-head PRM too,
//! which saves as a causal LM whose loss on reference solutions falls); `rejection_filter` with
//! `min_step_score` drops more than without (with either head); and a prm stage (either
//! head) killed while labelling and again while training resumes from its checkpoint to the
//! bytes of an uninterrupted run. (The labelling rule itself is
//! tested exactly, with a fake completer, in `stages/src/prm_labels.rs`; wiring and param
//! errors are in tests/malformed/.)

mod common;

use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int32Type};
use common::{Project, batches, floats, strings};

const PIPELINE: &str = "\
seed: 4
stages:
  problems:
    kind: cot_generate
    params: { families: [addition], difficulty: [1, 1], n_train: 600, n_test: 12 }
  base:
    kind: init_model
    params: { preset: nano }
  cold_start:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 120, batch_size: 16, lr: 3e-3 }
  reward:
    kind: prm
    inputs: { model: cold_start, problems: problems.train }
    params: { limit: 40, samples_per_problem: 2, n_rollouts: 4, max_new_tokens: 64, heldout: 0.25, max_steps: 6, batch_size: 8, checkpoint_every: 2, log_every: 2 }
  scores:
    kind: eval
    inputs: { models: [cold_start], problems: problems.test, prm: reward }
    params: { k: 4, max_new_tokens: 64, rerank: prm }
  verifier:
    kind: prm
    inputs: { model: cold_start, problems: problems.train }
    params: { limit: 40, samples_per_problem: 2, n_rollouts: 4, max_new_tokens: 64, heldout: 0.25, head: likelihood, references: 300, reference_batch_size: 16, max_steps: 6, batch_size: 8, lr: 3e-3, log_every: 2 }
  checked:
    kind: eval
    inputs: { models: [cold_start], problems: problems.test, prm: verifier }
    params: { k: 4, max_new_tokens: 64, rerank: prm }
  plain:
    kind: rejection_filter
    inputs: { model: cold_start, problems: problems.train }
    params: { num_samples: 4, limit: 12, max_new_tokens: 64, min_reward: 0.0, require_correct: false }
  judged:
    kind: rejection_filter
    inputs: { model: cold_start, problems: problems.train, prm: reward }
    params: { num_samples: 4, limit: 12, max_new_tokens: 64, min_reward: 0.0, require_correct: false, min_step_score: 0.9 }
  vetted:
    kind: rejection_filter
    inputs: { model: cold_start, problems: problems.train, prm: verifier }
    params: { num_samples: 4, limit: 12, max_new_tokens: 64, min_reward: 0.0, require_correct: false, min_step_score: 0.3 }
";

fn column<'a>(b: &'a RecordBatch, name: &str) -> &'a dyn Array {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_ref()
}

/// (metric, value) of every row of a `metrics` table.
fn metrics(cache: &Path, digest: &str) -> Vec<(String, f64)> {
    batches(cache, digest)
        .iter()
        .flat_map(|b| strings(b, "metric").into_iter().zip(floats(b, "value")))
        .collect()
}

/// A tensor of a model directory's `model.safetensors`, read as little-endian f32 values.
fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn f32_tensor(dir: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let at = &header[name]["data_offsets"];
    let (start, end) = (
        at[0].as_u64().unwrap() as usize,
        at[1].as_u64().unwrap() as usize,
    );
    bytes[8 + header_len + start..8 + header_len + end]
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn prm_labels_trains_and_serves_eval_and_rejection_filter() {
    let p = Project::new("prm");
    p.write("p.yaml", PIPELINE);
    let run = p.run("p.yaml", &[]);
    let cache = p.cache();

    // Labels: one row per solution, one label and value per step, a planted step in each
    // perturbed one.
    let labels = batches(&cache, &run.output("reward", "labels"));
    let (mut sources, mut heldout, mut planted) = (Vec::new(), 0, 0);
    let (mut ones, mut zeros) = (0, 0);
    for b in &labels {
        let steps = b.column_by_name("steps").unwrap().as_list::<i32>();
        let (labels, values) = (
            b.column_by_name("labels").unwrap().as_list::<i32>(),
            b.column_by_name("values").unwrap().as_list::<i32>(),
        );
        let bad = column(b, "bad_step").as_primitive::<Int32Type>();
        let held = column(b, "heldout").as_boolean();
        let source = strings(b, "source");
        for (i, origin) in source.iter().enumerate() {
            let n = steps.value(i).len();
            let l = labels.value(i);
            let l = l.as_primitive::<Float64Type>().values();
            let v = values.value(i);
            let v = v.as_primitive::<Float64Type>().values();
            assert!(n > 0 && l.len() == n && v.len() == n, "row {i}");
            assert!(
                l.iter().all(|&x| x == 0.0 || x == 1.0),
                "hard labels: {l:?}"
            );
            assert!(v.iter().all(|&x| (0.0..=1.0).contains(&x)));
            // A hard label is 1 exactly when some rollout verified.
            assert!(
                l.iter()
                    .zip(v.iter())
                    .all(|(l, v)| (*l == 1.0) == (*v > 0.0))
            );
            ones += l.iter().filter(|&&x| x == 1.0).count();
            zeros += l.iter().filter(|&&x| x == 0.0).count();
            if origin == "perturbed" {
                // One reasoning step per 1-digit sum: the planted step is the only one.
                assert!(
                    (bad.value(i) as usize) < n,
                    "the planted step is one of them"
                );
                planted += 1;
            } else {
                assert!(bad.is_null(i));
            }
            heldout += usize::from(held.value(i));
        }
        sources.extend(source);
    }
    assert!(sources.iter().any(|s| s == "sample"), "{sources:?}");
    assert!(
        ones > 0 && zeros > 0,
        "good and bad steps both occur: {ones} and {zeros}"
    );
    assert!(planted > 20, "a perturbed reference per problem: {planted}");
    assert!(heldout > 0 && heldout < sources.len(), "{heldout}");

    // The PRM directory: decoder + score head, and how to read it.
    let dir = common::object_path(&cache, &run.output("reward", "model"));
    let config = config_json(&dir);
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForTokenClassification"])
    );
    assert_eq!(config["num_labels"], 1);
    assert_eq!(config["prm"]["aggregation"], "min");
    assert!(config["prm"]["step_token_id"].is_u64());
    assert!(dir.join("tokenizer.json").is_file());
    let m = metrics(&cache, &run.output("reward", "metrics"));
    for name in [
        "loss",
        "labels/solutions",
        "labels/perturbed/bad_step_label",
        "labels/sample/truncated",
        "heldout/step_accuracy",
        "heldout/perturbed/weakest_is_bad",
    ] {
        assert!(m.iter().any(|(n, _)| n == name), "no `{name}` in {m:?}");
    }

    // A likelihood head: a causal LM whose decoder learnt the reference solutions.
    let dir = common::object_path(&cache, &run.output("verifier", "model"));
    let config = config_json(&dir);
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
    assert_eq!(config["prm"]["head"], "likelihood");
    let m = metrics(&cache, &run.output("verifier", "metrics"));
    // Its loss is the decoder's on the reference solutions, which it learns.
    let nll: Vec<f64> = m
        .iter()
        .filter(|(n, _)| n == "loss")
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(nll.len(), 3, "one per log_every of 6 steps: {m:?}");
    assert!(nll[2] < nll[0] * 0.9, "the references' loss falls: {nll:?}");
    // The head is fitted to the labels: it has left its start, (1, 0).
    let figure = |name: &str| m.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let weight = figure("head/weight").expect("the fitted head's weight");
    let bias = figure("head/bias").expect("the fitted head's bias");
    assert!(
        weight.is_finite() && bias.is_finite() && (weight, bias) != (1.0, 0.0),
        "fitted: {weight}, {bias}"
    );
    // ... and the saved head is the fitted one.
    let saved = (
        f32_tensor(&dir, "score.weight"),
        f32_tensor(&dir, "score.bias"),
    );
    assert_eq!(saved, (vec![weight as f32], vec![bias as f32]));
    assert!(figure("heldout/step_accuracy").is_some());
    let checked = batches(&cache, &run.output("checked", "results"));
    assert!(
        checked
            .iter()
            .all(|b| column(b, "prm_correct").null_count() == 0)
    );

    // eval with rerank: prm.
    let results = batches(&cache, &run.output("scores", "results"));
    for b in &results {
        let (majk, maj, prm) = (
            column(b, "majk").as_boolean(),
            column(b, "maj_correct").as_boolean(),
            column(b, "prm_correct").as_boolean(),
        );
        let prm_at = b.column_by_name("prm_at_n").unwrap().as_list::<i32>();
        for i in 0..b.num_rows() {
            assert_eq!(maj.value(i), majk.value(i));
            assert!(!prm.is_null(i), "every problem is reranked");
            assert_eq!(prm_at.value(i).len(), 3, "N = 1, 2, 4");
            let last = prm_at.value(i);
            assert_eq!(
                last.as_boolean().value(2),
                prm.value(i),
                "prm@4 is prm_correct"
            );
        }
    }
    let m = metrics(&cache, &run.output("scores", "metrics"));
    for name in ["maj@1", "maj@2", "maj@4", "prm@1", "prm@2", "prm@4"] {
        assert!(
            m.iter().any(|(n, _)| n == name),
            "no `{name}` in eval metrics"
        );
    }
    // Best of one sample is that sample, by majority or by the PRM.
    let get = |name: &str| m.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(get("maj@1"), get("prm@1"));

    // rejection_filter: the PRM drops completions the rewards alone keep.
    let kept = |stage: &str| {
        metrics(&cache, &run.output(stage, "metrics"))
            .into_iter()
            .find(|(n, _)| n == "kept")
            .unwrap()
            .1
    };
    let dropped = metrics(&cache, &run.output("judged", "metrics"))
        .into_iter()
        .find(|(n, _)| n == "prm_dropped")
        .unwrap()
        .1;
    assert!(
        kept("judged") < kept("plain") && dropped > 0.0,
        "kept {} with the PRM, {} without",
        kept("judged"),
        kept("plain")
    );
    // ... and so does the likelihood-head PRM, by scores that tell samples apart: it keeps
    // some and drops some (a step scores at most sigmoid(b), ℓ ≤ 0, hence the lower threshold).
    let vetted = metrics(&cache, &run.output("vetted", "metrics"));
    let figure = |name: &str| vetted.iter().find(|(n, _)| n == name).map(|m| m.1);
    let spread = figure("prm/weakest_step/std").expect("weakest step scores vary");
    assert!(
        figure("prm/weakest_step/mean").is_some_and(f64::is_finite) && spread > 0.0,
        "{vetted:?}"
    );
    assert!(
        0.0 < kept("vetted") && kept("vetted") < kept("plain"),
        "kept {} with the likelihood PRM, {} without: {vetted:?}",
        kept("vetted"),
        kept("plain")
    );
}

const PRM_ONLY: &str = "\
seed: 6
stages:
  problems:
    kind: cot_generate
    params: { families: [addition], difficulty: [1, 1], n_train: 200, n_test: 4 }
  base:
    kind: init_model
    params: { preset: nano }
  cold_start:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 20, batch_size: 16, lr: 3e-3 }
  reward:
    kind: prm
    inputs: { model: cold_start, problems: problems.train }
    params: { limit: 48, samples_per_problem: 1, n_rollouts: 2, max_new_tokens: 64, estimation: soft, max_steps: 8, batch_size: 8, checkpoint_every: 2, log_every: 2 }
";

#[test]
fn a_killed_prm_stage_resumes_to_the_same_labels_model_and_metrics() {
    killed_twice_equals_whole("prm", PRM_ONLY);
}

/// The likelihood head's loop (the decoder on reference solutions, then the fitted head)
/// checkpoints and resumes like the hidden head's.
#[test]
fn a_killed_likelihood_prm_resumes_to_the_same_labels_model_and_metrics() {
    let likelihood = PRM_ONLY.replace(
        "estimation: soft, max_steps: 8, batch_size: 8,",
        "head: likelihood, references: 100, reference_batch_size: 8, max_steps: 8,",
    );
    assert_ne!(likelihood, PRM_ONLY);
    killed_twice_equals_whole("prm-likelihood", &likelihood);
}

fn killed_twice_equals_whole(name: &str, pipeline: &str) {
    let whole = Project::new(&format!("{name}-whole"));
    whole.write("p.yaml", pipeline);
    let reference = whole.run("p.yaml", &[]);
    assert_eq!(reference.stage("reward")["resumed"], false);

    let p = Project::new(&format!("{name}-killed"));
    p.write("p.yaml", pipeline);
    p.run("p.yaml", &["--until", "cold_start"]);
    // Killed after the first of two labelling chunks, then after the first training checkpoint.
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "labels/shard-00000.parquet")
    });
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "train/ckpt/state.json")
    });
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("reward"), "ran");
    assert_eq!(resumed.stage("reward")["resumed"], true);
    // Training went on from the checkpoint (a checkpoint it could not read would be set
    // aside and training restarted, to the same bytes).
    let logs: String = std::fs::read_dir(p.cache().join("runs"))
        .unwrap()
        .filter_map(|run| std::fs::read_to_string(run.unwrap().path().join("logs/reward.log")).ok())
        .collect();
    assert!(
        logs.contains("resumed from the checkpoint at step") && !logs.contains("cannot be used"),
        "{logs}"
    );
    for output in ["labels", "model", "metrics"] {
        assert_eq!(
            resumed.output("reward", output),
            reference.output("reward", output),
            "`{output}` after two kills equals an uninterrupted run's"
        );
    }
}
