//! Bad input gets one clear line naming file:line:col (or the flag), exit code 2, no panic,
//! and leaves nothing in the cache.

mod common;

use common::Project;

/// Every file in tests/malformed/ starts with `# expect: LINE:COL: message`, the first line
/// dagrun must print for it.
#[test]
fn every_malformed_pipeline_gets_a_located_one_line_error_and_exit_2() {
    let dir = common::repo_dir().join("tests/malformed");
    let cache = std::env::temp_dir().join(format!("dagrun-malformed-{}", std::process::id()));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 30, "only {} malformed files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .expect("first line is `# expect: …`");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dagrun"))
            .current_dir(&dir)
            .args(["run", name, "--cache-dir"])
            .arg(&cache)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or("");
        let want = format!("{name}:{expect}");
        if out.status.code() != Some(2) || first != want || stderr.contains("panicked") {
            failures.push(format!(
                "{name}: exit {:?}\n  want: {want}\n  got:  {first}",
                out.status.code()
            ));
        }
        for line in stderr.lines() {
            assert!(
                line.starts_with(&format!("{name}:")),
                "{name}: every line is located: {line}"
            );
        }
    }
    assert!(
        !cache.join("objects").exists(),
        "a bad file must not create cache objects"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bad_flags_name_the_flag_and_exit_2() {
    let p = Project::new("flags");
    p.write(
        "p.yaml",
        "stages:\n  gen:\n    kind: cot_generate\n    params: { n_train: 5, n_test: 1 }\n",
    );
    let cases: [(&[&str], &str); 5] = [
        (
            &["run", "p.yaml", "--set", "gne.n_train=3"],
            "--set gne.n_train=3: no stage named `gne`; did you mean `gen`?",
        ),
        (
            &["run", "p.yaml", "--set", "gen"],
            "--set gen: expected node.param=value",
        ),
        (
            &["run", "p.yaml", "--set", "gen.n_train=zero"],
            "--set gen.n_train=zero: param `n_train` must be an integer, got \"zero\"",
        ),
        (
            &["run", "p.yaml", "--only", "gem"],
            "--only gem: no stage named `gem` in p.yaml; did you mean `gen`?",
        ),
        (
            &["run", "missing.yaml"],
            "missing.yaml:1:1: cannot read pipeline file: No such file or directory (os error 2)",
        ),
    ];
    for (args, want) in cases {
        let out = p.output(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or(""),
            want,
            "{args:?}"
        );
    }
}

#[test]
fn a_failing_stage_exits_1_and_keep_going_runs_independent_stages() {
    let p = Project::new("fail");
    // 4 distinct 1-digit linear prompts cannot fill a 1000-problem test split.
    let text = "stages:\n  bad:\n    kind: cot_generate\n    params: { families: [linear], difficulty: [1, 1], n_test: 1000 }\n  good:\n    kind: cot_generate\n    params: { n_train: 5, n_test: 1 }\n  after_bad:\n    kind: mix\n    inputs: { a: bad.cot }\n";
    p.write("p.yaml", text);
    let out = p.output(&["run", "p.yaml", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let run = common::Run::parse(&out);
    assert_eq!(run.status("bad"), "failed");
    assert!(
        run.stage("bad")["error"]
            .as_str()
            .unwrap()
            .contains("distinct test problems"),
        "{}",
        run.0
    );
    let out = p.output(&["run", "p.yaml", "--json", "--keep-going"]);
    assert_eq!(out.status.code(), Some(1));
    let run = common::Run::parse(&out);
    assert_eq!(run.status("good"), "ran");
    assert_eq!(run.status("after_bad"), "failed");
    assert!(
        run.stage("after_bad")["error"]
            .as_str()
            .unwrap()
            .contains("failed")
    );
}
