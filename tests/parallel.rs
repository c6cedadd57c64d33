//! `--jobs N`: independent branches of the DAG run at once in one process, with the same
//! results as one at a time.

mod common;

use common::Project;
use serde_json::Value;

/// Two SFT branches from one base model and one dataset: nothing orders them.
const BRANCHES: &str = "
name: branches
seed: 3
stages:
  problems:
    kind: cot_generate
    params: { families: [addition], difficulty: [1, 1], n_train: 64, n_test: 8 }
  base:
    kind: init_model
    params: { preset: pico }
  left:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 24, batch_size: 8, lr: 3e-3 }
    resources: { cpus: 1 }
  right:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 24, batch_size: 8, lr: 1e-3 }
    resources: { cpus: 1, mem: 1G }
";

/// (start, end) of a stage in a `--json` run line, in Unix seconds.
fn span(run: &Value, stage: &str) -> (f64, f64) {
    let s = run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap_or_else(|| panic!("no stage {stage} in {run}"));
    assert_eq!(s["status"], "ran", "{stage}: {s}");
    let start = s["started_unix"]
        .as_f64()
        .unwrap_or_else(|| panic!("{stage} has no start time: {s}"));
    (start, start + s["seconds"].as_f64().unwrap())
}

fn outputs(run: &Value) -> Vec<(String, Value)> {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["outputs"].clone(),
            )
        })
        .collect()
}

fn run_json(p: &Project, args: &[&str]) -> Value {
    let out = p.output(args);
    assert!(
        out.status.success(),
        "dagrun {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `jobs: 2` in the file runs like `--jobs 2`, and the flag overrides it.
#[test]
fn two_jobs_run_independent_branches_at_once_with_the_same_digests() {
    let p = Project::new("parallel-jobs");
    let file = BRANCHES.replace("seed: 3\n", "seed: 3\njobs: 2\n");
    assert_ne!(file, BRANCHES);
    p.write("p.yaml", &file);
    let one = run_json(
        &p,
        &[
            "run",
            "p.yaml",
            "--json",
            "--jobs",
            "1",
            "--cache-dir",
            "one",
        ],
    );
    let two = run_json(&p, &["run", "p.yaml", "--json", "--cache-dir", "two"]);
    assert_eq!(outputs(&one), outputs(&two), "jobs: 2 changed results");

    let overlap = |run: &Value| {
        let (l0, l1) = span(run, "left");
        let (r0, r1) = span(run, "right");
        l0 < r1 && r0 < l1
    };
    assert!(
        overlap(&two),
        "jobs: 2 ran the branches one after the other: {two}"
    );
    assert!(!overlap(&one), "--jobs 1 ran two stages at once: {one}");
    // Both SFT stages waited for their inputs.
    for run in [&one, &two] {
        for branch in ["left", "right"] {
            let (start, _) = span(run, branch);
            assert!(
                start >= span(run, "base").1 - 1e-3,
                "{branch} started before base ended"
            );
        }
    }
}

#[test]
fn a_failed_branch_leaves_the_others_running_with_keep_going() {
    let p = Project::new("parallel-keep-going");
    // A third branch whose file is cut off mid-record: it fails when it runs.
    p.write(
        "broken.jsonl",
        "{\"question\": \"1+1?\", \"answer\": \"2\"}\n{\"question\": \"2+",
    );
    p.write(
        "p.yaml",
        &format!("{BRANCHES}  broken:\n    kind: dataset\n    params: {{ path: broken.jsonl }}\n"),
    );
    let out = p.output(&["run", "p.yaml", "--json", "--jobs", "2", "--keep-going"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let status = |n: &str| {
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .map(|s| s["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status("broken").as_deref(), Some("failed"), "{run}");
    assert_eq!(status("left").as_deref(), Some("ran"), "{run}");
    assert_eq!(status("right").as_deref(), Some("ran"), "{run}");
}

#[test]
fn bad_resources_are_located_errors() {
    let p = Project::new("parallel-resources");
    p.write(
        "p.yaml",
        &BRANCHES.replace(
            "resources: { cpus: 1, mem: 1G }",
            "resources: { cpu: 1, mem: lots }",
        ),
    );
    let out = p.output(&["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml:20:18:")
            && err.contains("unknown resource `cpu`; did you mean `cpus`?"),
        "{err}"
    );
    assert!(err.contains("`mem` must be a size"), "{err}");
}
