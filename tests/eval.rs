//! The `eval` and `rejection_filter` stages on a tiny pipeline: the results follow the
//! contract scripts read, the summary reaches `summary.md`, rejection-sampled chats verify
//! and were not cut off, both write `metrics`, and a killed eval resumes from its
//! checkpointed chunks to the same results. (Wiring errors are in tests/malformed/.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, Int64Type};
use common::{Project, batches, floats, strings};

const PIPELINE: &str = "\
seed: 1
stages:
  problems:
    kind: cot_generate
    params: { families: [arithmetic], difficulty: [1, 2], n_train: 800, n_test: 50 }
  base:
    kind: init_model
    params: { preset: nano }
  cold_start:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 30, batch_size: 16, lr: 3e-3, log_every: 10, checkpoint_every: 100 }
  eval:
    kind: eval
    inputs: { models: [base, cold_start], problems: problems.test }
    params: { k: 2, n: 4, limit: 20, max_new_tokens: 96 }
  filter:
    kind: rejection_filter
    inputs: { model: cold_start, problems: problems.train }
    params: { num_samples: 2, limit: 20, max_new_tokens: 96, rewards: { correctness: 1.0, steps: 0.0 }, min_reward: 1.0 }
  refilter:
    kind: rejection_filter
    inputs: { samples: filter.samples }
    params: { rewards: { format: 0.5, correctness: 1.0 }, min_reward: 0.0, keep: best, require_correct: false }
";

/// (step, metric, value) of every row of a `metrics` table.
fn metrics(cache: &Path, digest: &str) -> Vec<(i64, String, f64)> {
    let mut out = Vec::new();
    for b in batches(cache, digest) {
        let steps = b
            .column_by_name("step")
            .unwrap()
            .as_primitive::<Int64Type>();
        for ((i, metric), value) in strings(&b, "metric")
            .into_iter()
            .enumerate()
            .zip(floats(&b, "value"))
        {
            out.push((steps.value(i), metric, value));
        }
    }
    out
}

/// (user, assistant, answer, task) of every chat row.
fn chats(cache: &Path, digest: &str) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for b in batches(cache, digest) {
        let (answers, tasks) = (strings(&b, "answer"), strings(&b, "task"));
        let messages = b.column_by_name("messages").unwrap().as_list::<i32>();
        for i in 0..b.num_rows() {
            let m = messages.value(i);
            let m = m.as_struct();
            let content = m.column_by_name("content").unwrap().as_string::<i32>();
            assert_eq!(m.len(), 2);
            out.push((
                content.value(0).to_string(),
                content.value(1).to_string(),
                answers[i].clone(),
                tasks[i].clone(),
            ));
        }
    }
    out
}

#[test]
fn eval_and_rejection_filter_on_a_tiny_pipeline() {
    let p = Project::new("eval");
    p.write("p.yaml", PIPELINE);
    let run = p.run("p.yaml", &[]);
    let cache = p.cache();

    // eval: one row per model × problem, with the contract columns.
    let results = batches(&cache, &run.output("eval", "results"));
    let mut per_model: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut rows = 0;
    for b in &results {
        let (models, ids) = (strings(b, "model"), strings(b, "id"));
        let tasks = strings(b, "task");
        let correct = b.column_by_name("correct").unwrap().as_boolean();
        let difficulty = b
            .column_by_name("difficulty")
            .unwrap()
            .as_primitive::<Int32Type>();
        let (pass1, passk) = (floats(b, "pass1"), floats(b, "passk"));
        let (k, n, n_correct) = (
            b.column_by_name("k").unwrap().as_primitive::<Int32Type>(),
            b.column_by_name("n").unwrap().as_primitive::<Int32Type>(),
            b.column_by_name("n_correct")
                .unwrap()
                .as_primitive::<Int32Type>(),
        );
        for i in 0..b.num_rows() {
            assert_eq!((k.value(i), n.value(i)), (2, 4), "pass@2 from 4 samples");
            // The unbiased estimator from n = 4: 1 − C(4−c, 2)/C(4, 2).
            let c = n_correct.value(i);
            let expected = [0.0, 0.5, 5.0 / 6.0, 1.0, 1.0][c as usize];
            assert!(
                (passk[i] - expected).abs() < 1e-12,
                "pass@2 {} with {c} of 4 correct",
                passk[i]
            );
            assert_eq!(pass1[i], c as f64 / 4.0);
            assert!(
                per_model
                    .entry(models[i].clone())
                    .or_default()
                    .insert(ids[i].clone()),
                "duplicate row {} {}",
                models[i],
                ids[i]
            );
            assert_eq!(tasks[i], "arithmetic");
            assert!((1..=2).contains(&difficulty.value(i)));
            assert!(!correct.is_null(i));
            assert!((0.0..=1.0).contains(&pass1[i]), "pass1 {}", pass1[i]);
            assert!(passk[i] >= pass1[i] - 1e-12, "pass@k below pass@1");
        }
        rows += b.num_rows();
    }
    assert_eq!(rows, 40);
    assert_eq!(
        per_model.keys().cloned().collect::<Vec<_>>(),
        ["base", "cold_start"],
        "models are named by their stages"
    );
    assert!(per_model.values().all(|ids| ids.len() == 20));

    // The summary is in the run's summary.md (and printed at the end of the run).
    let summary = std::fs::read_to_string(
        cache
            .join("runs")
            .join(run.0["run"].as_str().unwrap())
            .join("summary.md"),
    )
    .unwrap();
    for needle in [
        "## eval",
        "| base |",
        "| cold_start |",
        "pass@1",
        "maj@2",
        "of n = 4 samples",
        "| cold_start | arithmetic | 2 |",
        "Paired differences from `base`",
        "## filter",
        "## refilter",
    ] {
        assert!(
            summary.contains(needle),
            "summary.md lacks {needle:?}:\n{summary}"
        );
    }

    // eval's metrics: the summary's means per model, by position in `models`.
    let eval_metrics = metrics(&cache, &run.output("eval", "metrics"));
    let pass1 = |step: i64| {
        eval_metrics
            .iter()
            .find(|m| m.0 == step && m.1 == "pass1")
            .map(|m| m.2)
            .unwrap()
    };
    let all_pass1: Vec<f64> = results.iter().flat_map(|b| floats(b, "pass1")).collect();
    assert!((pass1(0) - all_pass1[..20].iter().sum::<f64>() / 20.0).abs() < 1e-12);
    assert!((pass1(1) - all_pass1[20..].iter().sum::<f64>() / 20.0).abs() < 1e-12);
    assert!(
        eval_metrics
            .iter()
            .any(|m| m.0 == 1 && m.1 == "arithmetic/majk")
    );

    // rejection_filter: every completion is in `samples`; every kept chat verifies and was not
    // cut off at the length limit.
    let samples = batches(&cache, &run.output("filter", "samples"));
    assert_eq!(
        samples.iter().map(RecordBatch::num_rows).sum::<usize>(),
        20 * 2
    );
    let completions: Vec<(String, bool)> = samples
        .iter()
        .flat_map(|b| {
            let truncated = b.column_by_name("truncated").unwrap().as_boolean();
            strings(b, "completion")
                .into_iter()
                .enumerate()
                .map(|(i, c)| (c, truncated.value(i)))
                .collect::<Vec<_>>()
        })
        .collect();
    let rewards: Vec<f64> = samples.iter().flat_map(|b| floats(b, "reward")).collect();
    let passing = rewards.iter().filter(|&&r| r >= 1.0).count();
    let kept = chats(&cache, &run.output("filter", "data"));
    assert!(
        kept.len() <= passing,
        "{} kept of {passing} passing",
        kept.len()
    );
    for (user, assistant, answer, task) in &kept {
        assert!(user.contains('='), "{user}");
        assert!(
            dagrun_stages::tasks::verify(task, answer, assistant),
            "kept a wrong completion {assistant:?} for {user} = {answer}"
        );
        assert!(
            completions
                .iter()
                .any(|(c, truncated)| c == assistant && !truncated),
            "kept a truncated completion {assistant:?}"
        );
    }
    // The problems carry their reference steps, which the `steps` reward judges against.
    for b in batches(&cache, &run.output("problems", "test")) {
        let steps = b.column_by_name("steps").unwrap().as_list::<i32>();
        assert!(
            (0..b.num_rows()).all(|i| !steps.value(i).is_empty()),
            "a problem without reference steps"
        );
    }
    for b in &samples {
        let components = b
            .column_by_name("reward_components")
            .unwrap()
            .as_list::<i32>();
        for i in 0..b.num_rows() {
            let c = components.value(i);
            let c = c.as_struct();
            let (names, values) = (
                c.column_by_name("name").unwrap().as_string::<i32>(),
                c.column_by_name("value").unwrap(),
            );
            let at = (0..c.len())
                .find(|&j| names.value(j) == "steps")
                .expect("a steps component");
            assert!(
                !values.is_null(at),
                "`steps` judged every sampled completion"
            );
        }
    }
    let filter_metrics = metrics(&cache, &run.output("filter", "metrics"));
    let get = |name: &str| filter_metrics.iter().find(|m| m.1 == name).map(|m| m.2);
    assert_eq!(get("samples"), Some(40.0));
    assert_eq!(get("kept"), Some(kept.len() as f64));
    assert!(get("rewards/correctness/mean").is_some());

    // Filtering the samples again with other rewards and without require_correct: one chat per
    // problem that has a completion not cut off (keep: best, min_reward 0 lets the rest
    // pass), the samples re-scored.
    let again = chats(&cache, &run.output("refilter", "data"));
    let mut whole: BTreeSet<String> = BTreeSet::new();
    for b in &samples {
        let truncated = b.column_by_name("truncated").unwrap().as_boolean();
        for (i, id) in strings(b, "id").into_iter().enumerate() {
            if !truncated.value(i) {
                whole.insert(id);
            }
        }
    }
    assert_eq!(again.len(), whole.len());
    let rescored = batches(&cache, &run.output("refilter", "samples"));
    assert_eq!(
        rescored.iter().map(RecordBatch::num_rows).sum::<usize>(),
        40
    );
    assert!(
        rescored
            .iter()
            .flat_map(|b| floats(b, "reward"))
            .all(|r| (0.0..=1.5).contains(&r))
    );
}

const RESUME: &str = "\
seed: 3
stages:
  problems:
    kind: cot_generate
    params: { families: [arithmetic], difficulty: [1, 2], n_train: 10, n_test: 96 }
  base:
    kind: init_model
    params: { preset: nano }
  eval:
    kind: eval
    inputs: { models: base, problems: problems.test }
    params: { k: 2, max_new_tokens: 48 }
";

#[test]
fn a_killed_eval_resumes_from_its_chunks_to_the_same_results() {
    let whole = Project::new("eval-whole");
    whole.write("p.yaml", RESUME);
    let expected = whole.run("p.yaml", &[]);
    assert_eq!(expected.stage("eval")["resumed"], false);

    let p = Project::new("eval-killed");
    p.write("p.yaml", RESUME);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "model-000/shard-00000.parquet")
    });
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("eval"), "ran");
    assert_eq!(resumed.stage("eval")["resumed"], true);
    assert_eq!(
        resumed.output("eval", "results"),
        expected.output("eval", "results"),
        "eval is deterministic across a resume"
    );
    assert_eq!(
        resumed.output("eval", "metrics"),
        expected.output("eval", "metrics"),
        "eval's metrics hold nothing that varies between runs"
    );
}
