//! The inspection commands people and scripts use.

mod common;

use common::Project;

const PIPELINE: &str = "stages:\n  gen:\n    kind: cot_generate\n    params: { n_train: 20, n_test: 5 }\n  picked:\n    kind: mix\n    inputs: { a: gen.cot }\n    params: { limit: 7 }\n";

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_committed_json_schema_matches_the_registry() {
    let p = Project::new("schema");
    let generated = stdout(&p.output(&["schema"]));
    let committed =
        std::fs::read_to_string(common::repo_dir().join("schemas/pipeline.schema.json")).unwrap();
    assert_eq!(
        generated.trim(),
        committed.trim(),
        "run `dagrun schema > schemas/pipeline.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&generated).unwrap();
    let kinds = &schema["$defs"]["StageDecl"]["properties"]["kind"]["enum"];
    assert!(
        kinds
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == "cot_generate"),
        "{kinds}"
    );
}

#[test]
fn a_bare_file_argument_means_run() {
    let p = Project::new("shorthand");
    p.write("p.yaml", PIPELINE);
    let out = p.output(&["p.yaml", "--json"]);
    let run = common::Run::parse(&out);
    assert_eq!(run.status("picked"), "ran");
    assert!(
        p.cache().join("runs").is_dir(),
        "records live beside the pipeline file"
    );
    let log = std::fs::read_dir(p.cache().join("runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("logs/picked.log");
    assert!(
        std::fs::read_to_string(log)
            .unwrap()
            .contains("mixed 7 rows")
    );
}

#[test]
fn show_export_and_dag_describe_artifacts_and_the_graph() {
    let p = Project::new("inspect");
    p.write("p.yaml", PIPELINE);
    p.run("p.yaml", &[]);
    let shown = stdout(&p.output(&["show", "picked.data"]));
    assert!(
        shown.contains("rows: 7") && shown.contains("messages: List"),
        "{shown}"
    );
    let out = p.output(&["export", "gen.test", "out/test.parquet"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = p.dir.join("out/test.parquet");
    assert!(
        !std::fs::metadata(&exported)
            .unwrap()
            .permissions()
            .readonly()
    );
    let dot = stdout(&p.output(&["dag", "p.yaml", "--format", "dot"]));
    assert!(
        dot.contains("\"gen\" -> \"picked\" [label=\"cot\"]"),
        "{dot}"
    );
    let mermaid = stdout(&p.output(&["dag", "p.yaml", "--format", "mermaid"]));
    assert!(mermaid.contains("gen -->|cot| picked"), "{mermaid}");
    let status = stdout(&p.output(&["status", "p.yaml"]));
    assert!(status.lines().all(|l| l.contains("up to date")), "{status}");
    let out = p.output(&["show", "nosuch.data"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn stages_lists_every_kind_with_ports_and_params() {
    let p = Project::new("stages");
    let text = stdout(&p.output(&["stages"]));
    for needle in [
        "cot_generate (v3)",
        "out  cot            dataset<chat>",
        "param n_train",
        "mix (v2)",
        "param limit",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn the_shipped_pipelines_are_valid() {
    let dir = common::repo_dir().join("pipelines");
    let cache = std::env::temp_dir().join(format!("dagrun-shipped-{}", std::process::id()));
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_dagrun"))
                .arg("plan")
                .arg(&path)
                .arg("--cache-dir")
                .arg(&cache)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
}
