//! Same key, same bytes — across builds, runs and core counts.
//!
//! A key holds each kind's `version`, not dagrun's build: a change to what a kind writes that
//! forgets to bump the version would make every existing cache serve the old bytes. So the
//! output digests of every kind on a tiny fixed pipeline are committed in
//! `tests/snapshots/kind_digests.json`; when a stage's key is unchanged but its bytes are not,
//! the test names the kind whose `version` must be bumped. Regenerate the file after a bump
//! with `DAGRUN_UPDATE_SNAPSHOT=1 cargo test --release --test snapshots`.
//!
//! Floats are not the same bytes on every CPU: the matmul kernels burn's CPU backend calls
//! (gemm) pick AVX-512 where it exists, and their sums round differently from AVX2's. So the
//! file holds one set of digests per CPU class ([`cpu_class`]), and a key may differ between
//! classes too (it holds its inputs' digests). A machine of a class the file lacks says on
//! stderr that it compared nothing; regenerating ([`update`]) replaces this class's digests and
//! keeps another class's only for the stages this one shows unchanged.

mod common;

use std::collections::BTreeMap;
use std::io::Write;

use common::Project;
use serde_json::{Value, json};

/// Every stage kind, as small as each can be and still do its work.
const EVERY_KIND: &str = "\
seed: 3
stages:
  problems:
    kind: cot_generate
    params: { families: [addition, arithmetic], difficulty: [1, 1], n_train: 64, n_test: 6 }
  data:
    kind: mix
    inputs: { a: problems.cot }
    params: { limit: 32 }
  base:
    kind: init_model
    params: { preset: nano, config: { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2 } }
  tune:
    kind: sft
    inputs: { model: base, data: data }
    params: { max_steps: 4, batch_size: 4, lr: 1e-3, log_every: 1, checkpoint_every: 2 }
  rl:
    kind: grpo
    inputs: { model: tune, problems: problems.train }
    params: { steps: 2, batch_prompts: 2, group_size: 2, max_new_tokens: 12, micro_batch: 2, checkpoint_every: 1 }
  small:
    kind: distill
    inputs: { teacher: tune.model, problems: problems.train }
    params: { mode: logits, preset: pico, config: { hidden_size: 16, intermediate_size: 32, num_attention_heads: 2, num_key_value_heads: 2 }, limit: 4, max_new_tokens: 12, require_correct: false, max_steps: 2, batch_size: 2, lambda: 0.5, checkpoint_every: 1, log_every: 1 }
  copied:
    kind: distill
    inputs: { teacher: rl.model, student: base, data: data }
    params: { limit: 4, num_samples: 4, max_new_tokens: 64, require_correct: false, max_steps: 2, batch_size: 2 }
  rejection:
    kind: rejection_filter
    inputs: { model: rl.model, problems: problems.train }
    params: { num_samples: 2, limit: 4, max_new_tokens: 12 }
  scores:
    kind: eval
    inputs: { models: [tune.model, rl.model], problems: problems.test }
    params: { k: 2, max_new_tokens: 12 }
  reward:
    kind: prm
    inputs: { model: tune.model, problems: problems.train }
    params: { limit: 6, samples_per_problem: 1, n_rollouts: 2, max_new_tokens: 12, heldout: 0.25, max_steps: 2, batch_size: 4, checkpoint_every: 1 }
  reranked:
    kind: eval
    inputs: { models: [tune.model], problems: problems.test, prm: reward }
    params: { k: 2, max_new_tokens: 12, rerank: prm }
  imported:
    kind: dataset
    params: { path: gsm8k.jsonl, split: 0.25 }
  judged:
    kind: rejection_filter
    inputs: { model: rl.model, problems: problems.train, prm: reward }
    params: { num_samples: 2, limit: 4, max_new_tokens: 12, min_reward: 0.0, require_correct: false, min_step_score: 0.5 }
";

/// Training at the `nano` size, big enough that kernels split their work across threads.
const THREADED: &str = "\
seed: 5
stages:
  problems:
    kind: cot_generate
    params: { families: [addition], difficulty: [2, 2], n_train: 128, n_test: 4 }
  base:
    kind: init_model
    params: { preset: nano }
  tune:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 3, batch_size: 16, lr: 1e-3, log_every: 1 }
  rl:
    kind: grpo
    inputs: { model: tune, problems: problems.train }
    params: { steps: 1, batch_prompts: 4, group_size: 4, max_new_tokens: 24, micro_batch: 8 }
";

fn run_with_threads(p: &Project, threads: &str) -> common::Run {
    run_pipeline(p, EVERY_KIND, threads)
}

/// The file the `dataset` stage imports.
const GSM8K: &str = r#"{"question": "Ann has 3 pens and buys 2. How many pens?", "answer": "3+2 = <<3+2=5>>5\n#### 5"}
{"question": "Bob has 7 cups and breaks 3. How many cups?", "answer": "7-3 = <<7-3=4>>4\n#### 4"}
{"question": "Cy reads 4 pages a day for 3 days. How many pages?", "answer": "4*3 = <<4*3=12>>12\n#### 12"}
{"question": "Di has 10 coins and gives away 6. How many coins?", "answer": "10-6 = <<10-6=4>>4\n#### 4"}
"#;

fn run_pipeline(p: &Project, text: &str, threads: &str) -> common::Run {
    p.write("gsm8k.jsonl", GSM8K);
    p.write("p.yaml", text);
    let out = p
        .command(&["run", "p.yaml", "--json"])
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::Run::parse(&out)
}

/// stage → {kind, key, outputs}.
fn stages(run: &common::Run) -> BTreeMap<String, Value> {
    run.0["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                json!({ "kind": s["kind"], "key": s["key"], "outputs": s["outputs"] }),
            )
        })
        .collect()
}

#[test]
fn every_kind_writes_the_committed_bytes_for_its_version() {
    let p = Project::new("snapshot");
    let now = stages(&run_with_threads(&p, "2"));
    let kinds: Vec<&str> = now.values().map(|s| s["kind"].as_str().unwrap()).collect();
    for kind in [
        "cot_generate",
        "dataset",
        "mix",
        "init_model",
        "sft",
        "distill",
        "grpo",
        "rejection_filter",
        "eval",
        "prm",
    ] {
        assert!(
            kinds.contains(&kind),
            "the snapshot pipeline lacks kind `{kind}`"
        );
    }
    let file = common::repo_dir().join("tests/snapshots/kind_digests.json");
    let mut classes: Classes = match std::fs::read_to_string(&file) {
        Ok(text) => serde_json::from_str(&text).unwrap(),
        Err(_) => Classes::new(),
    };
    let class = cpu_class();
    if std::env::var_os("DAGRUN_UPDATE_SNAPSHOT").is_some_and(|v| v != "0") {
        update(&mut classes, class, now);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(
            &file,
            serde_json::to_string_pretty(&classes).unwrap() + "\n",
        )
        .unwrap();
        return;
    }
    let Some(committed) = classes.get(class) else {
        let _ = writeln!(
            std::io::stderr(),
            "snapshot: bytes not compared: no digests for CPU class `{class}` (have {:?}); add them with DAGRUN_UPDATE_SNAPSHOT=1",
            classes.keys().collect::<Vec<_>>()
        );
        return;
    };
    let (mut stale, mut unknown) = (Vec::new(), Vec::new());
    for (stage, got) in &now {
        let Some(want) = committed.get(stage) else {
            unknown.push(stage.as_str());
            continue;
        };
        if got["key"] == want["key"] && got["outputs"] != want["outputs"] {
            panic!(
                "stage `{stage}`: kind `{}` now writes other bytes under the same key on a `{class}` CPU; bump its `version` (then regenerate the snapshot)",
                got["kind"].as_str().unwrap()
            );
        }
        if got["key"] != want["key"] {
            stale.push(format!(
                "{stage} ({}): key changed",
                got["kind"].as_str().unwrap()
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "the snapshot is out of date ({}); regenerate: DAGRUN_UPDATE_SNAPSHOT=1 cargo test --release --test snapshots",
        stale.join("; ")
    );
    if !unknown.is_empty() {
        // Left out when another class's regeneration could not vouch for them.
        let _ = writeln!(
            std::io::stderr(),
            "snapshot: no `{class}` digests for {unknown:?}, not compared; add them with DAGRUN_UPDATE_SNAPSHOT=1 on such a CPU"
        );
    }
}

/// CPU class → stage → {kind, key, outputs}.
type Classes = BTreeMap<String, BTreeMap<String, Value>>;

/// `now` becomes `class`'s digests. Another class keeps a stage's digests only where this
/// class's stage kept its key and its bytes: a new key (a version bump, changed inputs) or new
/// bytes under the old key (a dependency's arithmetic) may have changed that class's bytes
/// too, and only a machine of that class can say. A class seen for the first time vouches for
/// nothing, and leaves the others as they are.
fn update(classes: &mut Classes, class: &str, now: BTreeMap<String, Value>) {
    if let Some(before) = classes.get(class).cloned() {
        let unchanged = |stage: &String| {
            before.get(stage).is_some_and(|b| {
                now.get(stage)
                    .is_some_and(|n| n["key"] == b["key"] && n["outputs"] == b["outputs"])
            })
        };
        for (other, stages) in classes.iter_mut() {
            if other != class {
                stages.retain(|stage, _| unchanged(stage));
            }
        }
        classes.retain(|_, stages| !stages.is_empty());
    }
    classes.insert(class.to_string(), now);
}

/// Which float kernels this CPU gets: gemm dispatches on AVX-512F, then AVX2 + FMA.
fn cpu_class() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "x86_64-avx512f";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "x86_64-avx2-fma";
        }
        "x86_64"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}

#[test]
fn two_clean_runs_with_one_and_two_threads_write_identical_bytes() {
    let one = stages(&run_pipeline(&Project::new("threads-1"), THREADED, "1"));
    let two = stages(&run_pipeline(&Project::new("threads-2"), THREADED, "2"));
    for (stage, a) in &one {
        assert_eq!(a["key"], two[stage]["key"], "{stage}");
        assert_eq!(
            a["outputs"], two[stage]["outputs"],
            "stage `{stage}` ({}): every output, metrics included",
            a["kind"]
        );
    }
}

#[test]
fn regenerating_keeps_another_class_only_where_this_one_is_unchanged() {
    let entry = |key: &str, out: &str| json!({ "kind": "k", "key": key, "outputs": { "o": out } });
    let stages = |list: &[(&str, Value)]| -> BTreeMap<String, Value> {
        list.iter()
            .map(|(s, v)| (s.to_string(), v.clone()))
            .collect()
    };
    let mut classes = Classes::new();
    classes.insert(
        "a".into(),
        stages(&[
            ("same", entry("1", "x")),
            ("bumped", entry("2", "x")),
            ("drift", entry("3", "x")),
        ]),
    );
    // Another class's keys need not be this one's (a key holds its inputs' digests).
    classes.insert(
        "b".into(),
        stages(&[
            ("same", entry("1b", "y")),
            ("bumped", entry("2b", "y")),
            ("drift", entry("3b", "y")),
        ]),
    );
    let now = stages(&[
        ("same", entry("1", "x")),
        ("bumped", entry("9", "z")),
        ("drift", entry("3", "z")),
    ]);
    update(&mut classes, "a", now.clone());
    assert_eq!(classes["a"], now);
    assert_eq!(classes["b"], stages(&[("same", entry("1b", "y"))]));

    // A class seen for the first time leaves the others alone.
    update(&mut classes, "c", now.clone());
    assert_eq!(classes["b"], stages(&[("same", entry("1b", "y"))]));
    assert_eq!(classes.len(), 3);
}
