//! Training stages: the loss falls, and a killed run resumes from its checkpoint to the same
//! model an uninterrupted run makes.

mod common;

use std::path::Path;

use common::{batches, floats, strings, Project};

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
    assert!(curve[0] > 2.0 * curve[7], "loss should fall clearly: {curve:?}");
    assert_eq!(run.stage("cold_start")["resumed"], false);

    let p = Project::new("sft-killed");
    p.write("p.yaml", SFT);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || checkpointed(&p.cache()));
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("cold_start"), "ran");
    assert_eq!(resumed.stage("cold_start")["resumed"], true);
    assert_eq!(resumed.output("cold_start", "model"), run.output("cold_start", "model"), "training is deterministic across a resume");
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
    common::kill_when(&p, &["run", "p.yaml", "--json"], || checkpointed(&p.cache()));
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("rl"), "ran");
    assert_eq!(resumed.stage("rl")["resumed"], true, "continued from a checkpoint, not from step 0");
    assert_eq!(resumed.output("rl", "model"), run.output("rl", "model"));
    assert_eq!(resumed.output("rl", "samples"), run.output("rl", "samples"), "every step's samples are kept once");
}
