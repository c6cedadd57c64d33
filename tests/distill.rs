//! The `distill` stage end to end on a tiny teacher (a `nano` model after a short SFT) and a
//! `pico` student: both modes train (the loss falls), a curriculum goes from easy to hard, a
//! student with another tokenizer is refused at its place in the pipeline file (`file:line:col`)
//! naming both stages, and a killed run resumes to the bytes of an uninterrupted one.

mod common;

use std::path::Path;

use common::{Project, batches, floats, strings};

/// Problems of difficulty 1 to 3 and a teacher that has seen their worked solutions.
const TEACHER: &str = "\
seed: 4
stages:
  problems:
    kind: cot_generate
    params: { families: [arithmetic], difficulty: [1, 3], n_train: 400, n_test: 20 }
  base:
    kind: init_model
    params: { preset: nano }
  teacher:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 40, batch_size: 16, lr: 3e-3 }
";

/// The teacher's solutions are not checked: a teacher this small solves few problems, and the
/// verification itself has a unit test.
const SEQUENCE: &str = "
  student:
    kind: distill
    inputs: { teacher: teacher, problems: problems.train }
    params: { preset: pico, require_correct: false, curriculum: true, limit: 48, max_new_tokens: 96, epochs: 3, batch_size: 8, lr: 3e-3, log_every: 1 }
";

const LOGITS: &str = "
  student:
    kind: distill
    inputs: { teacher: teacher, problems: problems.train }
    params: { mode: logits, preset: pico, temperature: 3.0, beta: 0.5, lambda: 0.5, require_correct: false, limit: 64, max_new_tokens: 64, max_steps: 24, batch_size: 8, lr: 3e-3, log_every: 4, checkpoint_every: 4 }
";

/// The values of one metric of a metrics table, in step order.
fn values(cache: &Path, digest: &str, metric: &str) -> Vec<f64> {
    batches(cache, digest)
        .iter()
        .flat_map(|b| strings(b, "metric").into_iter().zip(floats(b, "value")))
        .filter(|(name, _)| name == metric)
        .map(|(_, value)| value)
        .collect()
}

#[test]
fn sequence_mode_trains_a_student_on_teacher_solutions_from_easy_to_hard() {
    let p = Project::new("distill-sequence");
    p.write("p.yaml", &format!("{TEACHER}{SEQUENCE}"));
    let run = p.run("p.yaml", &[]);
    let metrics = run.output("student", "metrics");
    let (cache, size) = (p.cache(), |m: &str| values(&p.cache(), &metrics, m)[0]);
    assert!(
        2.0 * size("student/params") <= size("teacher/params"),
        "the student has at most half the teacher's parameters"
    );
    let loss = values(&cache, &metrics, "loss");
    assert!(loss[0] > 1.5 * loss[loss.len() - 1], "{loss:?}");
    // One row per step; every epoch's steps go from easy to hard, then the next starts over.
    let kept = size("teacher/kept") as usize;
    assert!(kept > 8, "the teacher wrote too little: {kept}");
    let difficulty = values(&cache, &metrics, "difficulty");
    let per_epoch = kept.div_ceil(8);
    assert_eq!(difficulty.len(), 3 * per_epoch);
    for epoch in difficulty.chunks(per_epoch) {
        assert!(epoch.windows(2).all(|w| w[0] <= w[1]), "{difficulty:?}");
        assert!(epoch[0] < epoch[per_epoch - 1], "{difficulty:?}");
    }
}

#[test]
fn logits_mode_lowers_the_loss_and_a_killed_run_resumes_to_the_same_student() {
    let text = format!("{TEACHER}{LOGITS}");
    let whole = Project::new("distill-logits-whole");
    whole.write("p.yaml", &text);
    let run = whole.run("p.yaml", &[]);
    let metrics = run.output("student", "metrics");
    let cache = whole.cache();
    let loss = values(&cache, &metrics, "loss");
    assert_eq!(loss.len(), 6);
    assert!(loss[0] > 1.2 * loss[5], "{loss:?}");
    let agreement = values(&cache, &metrics, "agreement");
    assert!(agreement.iter().all(|a| (0.0..=1.0).contains(a)));
    let on_policy = values(&cache, &metrics, "on_policy");
    let mean = on_policy.iter().sum::<f64>() / on_policy.len() as f64;
    assert!(
        mean > 0.0 && mean < 1.0,
        "lambda 0.5 mixes the student's own sequences with the teacher's: {on_policy:?}"
    );
    assert_eq!(run.stage("student")["resumed"], false);

    let p = Project::new("distill-logits-killed");
    p.write("p.yaml", &text);
    p.run("p.yaml", &["--until", "teacher"]);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "ckpt/state.json")
    });
    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("student"), "ran");
    assert_eq!(resumed.stage("student")["resumed"], true);
    assert_eq!(
        resumed.output("student", "model"),
        run.output("student", "model"),
        "distillation is deterministic across a resume"
    );
    assert_eq!(resumed.output("student", "metrics"), metrics);
}

#[test]
fn a_student_with_another_tokenizer_is_refused_at_its_input_naming_both_stages() {
    let p = Project::new("distill-tokenizer");
    let text = "\
stages:
  problems:
    kind: cot_generate
    params: { families: [arithmetic], n_train: 20, n_test: 5 }
  big:
    kind: init_model
    params: { preset: nano }
  small:
    kind: init_model
    params: { preset: pico, alphabet: \"0123456789+-*=<>/ \\nabcdefghijklmnopqrstuvwxyz\" }
  distilled:
    kind: distill
    inputs: { teacher: big, student: small, problems: problems.train }
    params: { max_steps: 1 }
";
    p.write("p.yaml", text);
    let out = p.output(&["run", "p.yaml", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let run = common::Run::parse(&out);
    assert_eq!(run.status("distilled"), "failed");
    let error = run.stage("distilled")["error"].as_str().unwrap();
    // Located where the student is wired, as a wiring error would be: the key `student` of
    // `    inputs: { teacher: big, student: small, … }` on line 13.
    assert!(
        error.starts_with("p.yaml:13:29: stage `distilled`: the student"),
        "{error}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("p.yaml:13:29: stage `distilled`"),
        "{stderr}"
    );
    for part in [
        "different tokenizers",
        "stage `small`",
        "stage `big`",
        "tokenizer.json",
    ] {
        assert!(error.contains(part), "{part}: {error}");
    }
}
