//! Training stages: the loss falls, and a killed run resumes from its checkpoint to the same
//! outputs an uninterrupted run makes (model, samples and `metrics`, byte for byte: no
//! wall-clock figure reaches an output), LoRA runs included; a truncated checkpoint costs a
//! warning and some steps, never the key.

mod common;

use std::path::{Path, PathBuf};

use common::{Project, batches, floats, strings};

const SFT: &str = "\
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
    params: { max_steps: 40, batch_size: 16, lr: 3e-3, log_every: 5, checkpoint_every: 10 }
";

fn losses(cache: &Path, digest: &str) -> Vec<f64> {
    batches(cache, digest)
        .iter()
        .flat_map(|b| strings(b, "metric").into_iter().zip(floats(b, "value")))
        .filter(|(metric, _)| metric == "loss")
        .map(|(_, value)| value)
        .collect()
}

fn checkpointed(cache: &Path) -> bool {
    common::resume_has(cache, "ckpt/state.json")
}

#[test]
fn sft_lowers_the_loss_and_a_killed_run_resumes_to_the_same_model() {
    let whole = Project::new("sft-whole");
    whole.write("p.yaml", SFT);
    let run = whole.run("p.yaml", &[]);
    let curve = losses(&whole.cache(), &run.output("cold_start", "metrics"));
    assert_eq!(curve.len(), 8);
    assert!(
        curve[0] > 2.0 * curve[7],
        "loss should fall clearly: {curve:?}"
    );
    assert_eq!(run.stage("cold_start")["resumed"], false);

    let p = Project::new("sft-killed");
    p.write("p.yaml", SFT);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        checkpointed(&p.cache())
    });
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("cold_start"), "ran");
    assert_eq!(resumed.stage("cold_start")["resumed"], true);
    assert_eq!(
        resumed.output("cold_start", "model"),
        run.output("cold_start", "model"),
        "training is deterministic across a resume"
    );
    assert_eq!(
        resumed.output("cold_start", "metrics"),
        run.output("cold_start", "metrics"),
        "metrics hold no timings, and survive a resume exactly"
    );
}

const SFT_LORA: &str = "\
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
    params: { max_steps: 30, batch_size: 16, lr: 1e-2, log_every: 4, checkpoint_every: 10, lora_rank: 4, lora_targets: [q_proj, v_proj, up_proj] }
";

#[test]
fn a_killed_lora_run_resumes_on_its_own_adapters() {
    let whole = Project::new("lora-whole");
    whole.write("p.yaml", SFT_LORA);
    let run = whole.run("p.yaml", &[]);
    let curve = losses(&whole.cache(), &run.output("cold_start", "metrics"));
    assert!(
        curve[0] > curve[curve.len() - 1],
        "the adapters learn: {curve:?}"
    );

    let p = Project::new("lora-killed");
    p.write("p.yaml", SFT_LORA);
    p.run("p.yaml", &["--until", "base"]);
    // Killed after the second checkpoint, so the resumed run has trained adapters to go on with.
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "ckpt.old/state.json") && checkpointed(&p.cache())
    });
    assert!(
        checkpoint_file(&p.cache(), "adapters.safetensors").is_some(),
        "a LoRA checkpoint keeps the adapters unmerged"
    );
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.stage("cold_start")["resumed"], true);
    assert_eq!(
        resumed.output("cold_start", "model"),
        run.output("cold_start", "model"),
        "a resumed LoRA run equals an uninterrupted one"
    );
    assert_eq!(
        resumed.output("cold_start", "metrics"),
        run.output("cold_start", "metrics")
    );
}

/// `rel` inside the `ckpt/` of the only resume directory in `cache`.
fn checkpoint_file(cache: &Path, rel: &str) -> Option<PathBuf> {
    let dirs = std::fs::read_dir(cache.join("resume")).ok()?;
    dirs.filter_map(|e| e.ok())
        .map(|e| e.path().join("ckpt").join(rel))
        .find(|f| f.is_file())
}

/// Every stage log in `cache`, concatenated.
fn logs(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            text += &logs(&path);
        } else if path.extension().is_some_and(|e| e == "log") {
            text += &std::fs::read_to_string(&path).unwrap_or_default();
        }
    }
    text
}

/// Truncates the newest checkpoint's model file to half its length.
fn truncate_checkpoint(cache: &Path) {
    let file = checkpoint_file(cache, "model/model.safetensors").expect("a checkpoint to corrupt");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

#[test]
fn a_truncated_checkpoint_costs_a_warning_not_the_key() {
    let whole = Project::new("sft-reference");
    whole.write("p.yaml", SFT);
    let reference = whole.run("p.yaml", &[]).output("cold_start", "model");

    // The only checkpoint is truncated: the stage starts over and still makes the same model.
    let p = Project::new("sft-truncated");
    p.write("p.yaml", SFT);
    p.run("p.yaml", &["--until", "base"]);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        checkpointed(&p.cache())
    });
    truncate_checkpoint(&p.cache());
    let run = p.run("p.yaml", &[]);
    assert_eq!(run.status("cold_start"), "ran");
    assert_eq!(run.stage("cold_start")["resumed"], false);
    assert_eq!(run.output("cold_start", "model"), reference);
    let log = logs(&p.cache());
    assert!(
        log.contains("cannot be used") && log.contains("starting this stage over"),
        "the stage log warns: {log}"
    );

    // The newest of two is truncated: the run falls back to the one before.
    let p = Project::new("sft-truncated-newest");
    p.write("p.yaml", SFT);
    p.run("p.yaml", &["--until", "base"]);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "ckpt.old/state.json") && checkpointed(&p.cache())
    });
    truncate_checkpoint(&p.cache());
    let run = p.run("p.yaml", &[]);
    assert_eq!(
        run.stage("cold_start")["resumed"],
        true,
        "resumed from the previous checkpoint"
    );
    assert_eq!(run.output("cold_start", "model"), reference);
    assert!(logs(&p.cache()).contains("falling back to the previous checkpoint"));
}

const GRPO: &str = "\
seed: 2
stages:
  problems:
    kind: cot_generate
    params: { families: [arithmetic], difficulty: [1, 1], n_train: 300, n_test: 20 }
  base:
    kind: init_model
    params: { preset: nano }
  cold_start:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 20, batch_size: 16, lr: 3e-3 }
  rl:
    kind: grpo
    inputs: { model: cold_start.model, problems: problems.train }
    params: { steps: 12, batch_prompts: 4, group_size: 4, max_new_tokens: 48, lr: 1e-4, beta: 0.04, checkpoint_every: 3 }
";

#[test]
fn a_killed_grpo_stage_resumes_from_its_checkpoint_to_the_same_result() {
    let whole = Project::new("grpo-whole");
    whole.write("p.yaml", GRPO);
    let run = whole.run("p.yaml", &[]);
    assert_eq!(run.stage("rl")["resumed"], false);

    let p = Project::new("grpo-killed");
    p.write("p.yaml", GRPO);
    p.run("p.yaml", &["--until", "cold_start"]);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        checkpointed(&p.cache())
    });
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("rl"), "ran");
    assert_eq!(
        resumed.stage("rl")["resumed"],
        true,
        "continued from a checkpoint, not from step 0"
    );
    assert_eq!(resumed.output("rl", "model"), run.output("rl", "model"));
    assert_eq!(
        resumed.output("rl", "samples"),
        run.output("rl", "samples"),
        "every step's samples are kept once"
    );
    assert_eq!(
        resumed.output("rl", "metrics"),
        run.output("rl", "metrics"),
        "metrics hold no timings, and survive a resume exactly"
    );
}
