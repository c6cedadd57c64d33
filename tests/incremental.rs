//! Re-runs recompute exactly what changed: params, wiring, skips; never comments or names.

mod common;

use common::Project;

const PIPELINE: &str = "\
seed: 5
stages:
  gen:
    kind: cot_generate
    params: { families: [arithmetic, linear], n_train: 300, n_test: 50 }
  small:
    kind: mix
    inputs: { a: gen.cot }
    params: { limit: 40 }
  train_only:
    kind: mix
    inputs: { a: gen.train }
  final:
    kind: mix
    inputs: { a: small }
";

fn all(statuses: &[(String, String)], want: &str) -> bool {
    statuses.iter().all(|(_, s)| s == want)
}

#[test]
fn a_second_run_is_all_cached_with_the_same_outputs() {
    let p = Project::new("cached");
    p.write("p.yaml", PIPELINE);
    let first = p.run("p.yaml", &[]);
    assert!(all(&first.statuses(), "ran"), "{:?}", first.statuses());
    let second = p.run("p.yaml", &[]);
    assert!(all(&second.statuses(), "cached"), "{:?}", second.statuses());
    for s in ["gen", "small", "train_only", "final"] {
        assert_eq!(first.stage(s)["outputs"], second.stage(s)["outputs"]);
        assert_eq!(first.stage(s)["key"], second.stage(s)["key"]);
    }
}

#[test]
fn changing_one_param_reruns_that_stage_and_its_dependents_only() {
    let p = Project::new("param");
    p.write("p.yaml", PIPELINE);
    p.run("p.yaml", &[]);
    p.write("p.yaml", &PIPELINE.replace("limit: 40", "limit: 30"));
    let plan = p.output(&["plan", "p.yaml", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let small = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "small")
        .unwrap();
    assert_eq!(small["action"], "run");
    assert_eq!(small["reasons"][0], "params.limit: 40 → 30", "{plan}");
    let fin = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "final")
        .unwrap();
    assert_eq!(fin["reasons"][0], "input a: changed (node small)", "{plan}");

    let run = p.run("p.yaml", &[]);
    let want = [
        ("gen", "cached"),
        ("small", "ran"),
        ("train_only", "cached"),
        ("final", "ran"),
    ];
    for (stage, status) in want {
        assert_eq!(run.status(stage), status, "{stage}: {:?}", run.statuses());
    }
}

#[test]
fn set_overrides_a_param_like_an_edit_would() {
    let p = Project::new("set");
    p.write("p.yaml", PIPELINE);
    p.run("p.yaml", &[]);
    let run = p.run("p.yaml", &["--set", "small.limit=30"]);
    assert_eq!(run.status("small"), "ran");
    assert_eq!(run.status("train_only"), "cached");
}

#[test]
fn comments_formatting_key_order_and_renames_rerun_nothing() {
    let p = Project::new("cosmetic");
    p.write("p.yaml", PIPELINE);
    p.run("p.yaml", &[]);
    let edited = "\
# The same pipeline, written differently.
stages:
  final:                       # consumers may come first
    inputs: {a: small}
    kind: mix
  train_rows:                  # renamed from train_only
    kind: mix
    inputs:
      a: gen.train
  gen:
    params:
      n_test: 50
      n_train: 300
      families:
        - arithmetic
        - linear
    kind: cot_generate
  small: {kind: mix, inputs: {a: gen.cot}, params: {limit: 40}}
seed: 5
";
    p.write("p.yaml", edited);
    let run = p.run("p.yaml", &[]);
    assert!(all(&run.statuses(), "cached"), "{:?}", run.statuses());
}

#[test]
fn forcing_a_stage_that_writes_the_same_bytes_keeps_its_consumers_cached() {
    let p = Project::new("cutoff");
    p.write("p.yaml", PIPELINE);
    let first = p.run("p.yaml", &[]);
    let run = p.run("p.yaml", &["--force", "small"]);
    assert_eq!(run.status("small"), "ran");
    assert_eq!(run.output("small", "data"), first.output("small", "data"));
    assert_eq!(
        run.status("final"),
        "cached",
        "early cutoff: same bytes, same key downstream"
    );
}

#[test]
fn skip_passes_the_input_through_and_rewiring_reruns_the_consumer() {
    let p = Project::new("skip");
    p.write("p.yaml", PIPELINE);
    let first = p.run("p.yaml", &[]);
    let skipped = PIPELINE.replace(
        "    inputs: { a: gen.cot }\n",
        "    skip: true\n    inputs: { a: gen.cot }\n",
    );
    p.write("p.yaml", &skipped);
    let run = p.run("p.yaml", &[]);
    assert_eq!(run.status("small"), "skipped");
    assert_eq!(run.status("final"), "ran");
    // `final` now mixes all of gen.cot: the same rows as a direct wire would give.
    let rewired = PIPELINE.replace("inputs: { a: small }", "inputs: { a: gen.cot }");
    p.write("p.yaml", &rewired);
    let direct = p.run("p.yaml", &[]);
    assert_eq!(
        direct.status("final"),
        "cached",
        "skip and a direct wire give the same key"
    );
    assert_eq!(direct.output("final", "data"), run.output("final", "data"));
    assert_ne!(
        direct.output("final", "data"),
        first.output("final", "data")
    );
}

#[test]
fn skipping_a_stage_with_nothing_to_pass_on_names_its_consumers() {
    let p = Project::new("skiperr");
    p.write(
        "p.yaml",
        &PIPELINE.replace(
            "    kind: cot_generate\n",
            "    kind: cot_generate\n    skip: true\n",
        ),
    );
    let out = p.output(&["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.yaml:5:5: stage `gen` is skipped"), "{err}");
    assert!(
        err.contains("`small`") && err.contains("`train_only`"),
        "{err}"
    );
}

#[test]
fn only_until_and_from_select_stages() {
    let p = Project::new("select");
    p.write("p.yaml", PIPELINE);
    let run = p.run("p.yaml", &["--until", "small"]);
    let names: Vec<String> = run.statuses().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["gen", "small"]);
    let run = p.run("p.yaml", &["--only", "final"]);
    assert_eq!(
        run.statuses(),
        vec![("final".to_string(), "ran".to_string())]
    );
    let run = p.run("p.yaml", &["--from", "small"]);
    assert_eq!(
        run.statuses(),
        vec![
            ("small".to_string(), "cached".to_string()),
            ("final".to_string(), "cached".to_string())
        ]
    );
}
