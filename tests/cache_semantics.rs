//! The cache's promises: one key, one set of bytes; equal rows keep consumers cached whatever
//! made them; records survive a killed run; labels that reach outputs are in the key.

mod common;

use std::collections::BTreeMap;

use common::{Project, batches, strings};

/// Generation and mixing only: seconds.
const MIXED: &str = "\
seed: 4
stages:
  gen:
    kind: cot_generate
    params: { families: [arithmetic, linear, word], difficulty: [1, 2], n_train: 200, n_test: 20 }
  both:
    kind: mix
    inputs: { a: gen.train, b: gen.test }
    params: { counts: { a: 30, b: 10 } }
";

/// Every output digest of a run, by `stage.output`.
fn digests(run: &common::Run) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in run.0["stages"].as_array().unwrap() {
        for (name, d) in s["outputs"].as_object().unwrap() {
            out.insert(
                format!("{}.{name}", s["name"].as_str().unwrap()),
                d.as_str().unwrap().to_string(),
            );
        }
    }
    out
}

#[test]
fn reordering_a_list_a_map_or_input_ports_gives_the_same_key_and_the_same_bytes() {
    let p = Project::new("permute");
    p.write("p.yaml", MIXED);
    let first = p.run("p.yaml", &[]);
    let permuted = [
        MIXED.replace("[arithmetic, linear, word]", "[word, arithmetic, linear]"),
        MIXED.replace(
            "{ a: gen.train, b: gen.test }",
            "{ b: gen.test, a: gen.train }",
        ),
        MIXED.replace("{ a: 30, b: 10 }", "{ b: 10, a: 30 }"),
    ];
    for (i, text) in permuted.iter().enumerate() {
        // A fresh cache each time: equal keys must come from equal bytes, not from a cache hit.
        let q = Project::new(&format!("permute-{i}"));
        q.write("p.yaml", text);
        let run = q.run("p.yaml", &[]);
        for stage in ["gen", "both"] {
            assert_eq!(
                run.stage(stage)["key"],
                first.stage(stage)["key"],
                "permutation {i}, {stage}"
            );
        }
        assert_eq!(digests(&run), digests(&first), "permutation {i}");
        // And in the first cache, the permuted file is all cached.
        p.write("p.yaml", text);
        assert!(
            p.run("p.yaml", &[])
                .statuses()
                .iter()
                .all(|(_, s)| s == "cached"),
            "permutation {i}"
        );
    }
}

#[test]
fn a_param_change_that_keeps_the_rows_reruns_the_stage_but_not_its_consumers() {
    let p = Project::new("early-cutoff");
    let text = "\
stages:
  gen:
    kind: cot_generate
    params: { n_train: 50, n_test: 5 }
  capped:
    kind: mix
    inputs: { a: gen.train }
    params: { limit: 100 }
  after:
    kind: mix
    inputs: { a: capped }
";
    p.write("p.yaml", text);
    let first = p.run("p.yaml", &[]);
    // 50 rows under a cap of 100 or 200: the same rows, under another key.
    p.write("p.yaml", &text.replace("limit: 100", "limit: 200"));
    let second = p.run("p.yaml", &[]);
    assert_eq!(second.status("capped"), "ran");
    assert_ne!(second.stage("capped")["key"], first.stage("capped")["key"]);
    assert_eq!(
        second.output("capped", "data"),
        first.output("capped", "data"),
        "same rows, same bytes"
    );
    assert_eq!(second.status("after"), "cached", "early cutoff");
}

#[test]
fn gc_after_a_killed_run_keeps_what_it_finished_and_its_checkpoints() {
    let p = Project::new("gc-killed");
    let text = "\
seed: 9
stages:
  quick:
    kind: cot_generate
    params: { n_train: 100, n_test: 10 }
  slow:
    kind: cot_generate
    params: { families: [arithmetic, word], difficulty: [3, 5], n_train: 600000, n_test: 100 }
";
    p.write("p.yaml", text);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "train-00001.parquet")
    });
    let out = p.output(&["gc", "--keep-runs", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        common::resume_has(&p.cache(), "train-00001.parquet"),
        "the killed stage's checkpoints stay"
    );
    let run = p.run("p.yaml", &[]);
    assert_eq!(
        run.status("quick"),
        "cached",
        "finished before the kill, kept by gc"
    );
    assert_eq!(run.status("slow"), "ran");
    assert_eq!(run.stage("slow")["resumed"], true);

    // Checkpoints of a key that no kept run uses any more are removed: a run killed under one
    // key, then the file edited and run to the end under another.
    p.write(
        "p.yaml",
        &text.replace("n_train: 600000", "n_train: 600001"),
    );
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        common::resume_has(&p.cache(), "train-00001.parquet")
    });
    p.write("p.yaml", &text.replace("n_train: 600000", "n_train: 3000"));
    p.run("p.yaml", &[]);
    let out = p.output(&["gc", "--keep-runs", "1"]);
    assert!(out.status.success());
    assert!(
        !common::resume_has(&p.cache(), "train-00001.parquet"),
        "orphaned checkpoints go"
    );
}

#[test]
fn a_failed_run_lists_every_stage_and_what_became_of_it() {
    let p = Project::new("json-failed");
    let text = "stages:\n  bad:\n    kind: cot_generate\n    params: { families: [linear], difficulty: [1, 1], n_test: 1000 }\n  later:\n    kind: cot_generate\n    params: { n_train: 5, n_test: 1 }\n  after_bad:\n    kind: mix\n    inputs: { a: bad.cot }\n";
    p.write("p.yaml", text);
    let out = p.output(&["run", "p.yaml", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let run = common::Run::parse(&out);
    assert_eq!(run.status("bad"), "failed");
    assert_eq!(run.status("later"), "not_run");
    assert_eq!(run.status("after_bad"), "not_run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 not run"));
}

#[test]
fn show_and_export_take_a_node_with_one_output_and_export_carries_provenance() {
    let p = Project::new("export-one");
    p.write("p.yaml", "stages:\n  gen:\n    kind: cot_generate\n    params: { n_train: 20, n_test: 5 }\n  picked:\n    kind: mix\n    inputs: { a: gen.cot }\n    params: { limit: 7 }\n");
    let run = p.run("p.yaml", &[]);
    let out = p.output(&["export", "picked", "picked.parquet"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::File::open(p.dir.join("picked.parquet")).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let kv: BTreeMap<String, String> = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .map(|e| (e.key.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(kv["dagrun.node"], "picked");
    assert_eq!(
        kv["dagrun.key"],
        run.stage("picked")["key"].as_str().unwrap()
    );
    assert_eq!(kv["dagrun.kind"], "mix");
    assert!(kv["dagrun.params"].contains("\"limit\":7"), "{kv:?}");
    assert!(
        kv["dagrun.inputs"].contains(&run.output("gen", "cot")),
        "{kv:?}"
    );
    let n: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(n, 7);
    let shown = p.output(&["show", "picked"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("rows: 7"));
    // A node with several outputs still needs the output named.
    let out = p.output(&["export", "gen", "gen.parquet"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`gen.train`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_full_disk_fails_the_stage_in_one_line_naming_the_path_and_loses_nothing() {
    let p = Project::new("full-disk");
    let mount = p.dir.join("small-disk");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mount)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIPPED a_full_disk_fails_the_stage…: cannot mount a small tmpfs here (needs root)"
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let cache = mount.join("cache");
    let text = "stages:\n  small:\n    kind: cot_generate\n    params: { n_train: 50, n_test: 5 }\n  big:\n    kind: cot_generate\n    params: { families: [word], difficulty: [5, 5], n_train: 200000, n_test: 5 }\n";
    p.write("p.yaml", text);
    let out = p.output(&[
        "run",
        "p.yaml",
        "--json",
        "--keep-going",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = common::Run::parse(&out);
    assert_eq!(run.status("small"), "ran");
    assert_eq!(run.status("big"), "failed");
    let error = run.stage("big")["error"].as_str().unwrap().to_string();
    assert_eq!(
        error.matches("No space left on device").count(),
        1,
        "{error}"
    );
    assert!(
        error.contains(cache.to_str().unwrap()),
        "names the path: {error}"
    );
    assert!(!error.contains('\n'));
    // What finished is intact and still served.
    let verify = p.output(&["verify", "--cache-dir", cache.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let again = p.output(&[
        "run",
        "p.yaml",
        "--json",
        "--only",
        "small",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(common::Run::parse(&again).status("small"), "cached");
}

#[test]
fn gc_waits_for_a_running_run_instead_of_refusing() {
    let p = Project::new("gc-waits");
    p.write("p.yaml", "stages:\n  slow:\n    kind: cot_generate\n    params: { families: [arithmetic, word], difficulty: [3, 5], n_train: 200000, n_test: 10 }\n");
    let run = p.spawn(&["run", "p.yaml", "--json"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !common::resume_has(&p.cache(), "test.parquet") {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let gc = p.output(&["gc"]);
    let run = run.wait_with_output().unwrap();
    assert!(run.status.success());
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(
        String::from_utf8_lossy(&gc.stderr).contains("waiting for the runs"),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    // The run's result survived the gc that waited for it.
    assert_eq!(p.run("p.yaml", &[]).status("slow"), "cached");
}

#[test]
fn a_rename_that_reaches_an_output_reruns_the_stage_that_writes_it() {
    let p = Project::new("rename-label");
    let text = "\
stages:
  problems:
    kind: cot_generate
    params: { families: [addition], difficulty: [1, 1], n_train: 64, n_test: 4 }
  base:
    kind: init_model
    params: { preset: nano, config: { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2 } }
  score:
    kind: eval
    inputs: { models: [base], problems: problems.test }
    params: { k: 1, max_new_tokens: 8 }
";
    p.write("p.yaml", text);
    p.run("p.yaml", &[]);
    p.write(
        "p.yaml",
        &text
            .replace("  base:", "  start:")
            .replace("models: [base]", "models: [start]"),
    );
    let run = p.run("p.yaml", &[]);
    assert_eq!(
        run.status("start"),
        "cached",
        "the model itself did not change"
    );
    assert_eq!(run.status("score"), "ran", "its table names the model");
    let table = batches(&p.cache(), &run.output("score", "results"));
    assert!(
        strings(&table[0], "model").iter().all(|m| m == "start"),
        "{:?}",
        strings(&table[0], "model")
    );
}

#[cfg(unix)]
#[test]
fn a_hugging_face_snapshot_of_symlinks_imports_like_the_plain_directory() {
    let p = Project::new("snapshot");
    p.write("make.yaml", "stages:\n  base:\n    kind: init_model\n    params: { preset: nano, config: { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2 } }\n");
    p.run("make.yaml", &[]);
    let out = p.output(&["export", "base.model", "plain"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The hub cache layout: snapshots/<rev>/<file> → ../../blobs/<hash>.
    let (blobs, snap) = (p.dir.join("hub/blobs"), p.dir.join("hub/snapshots/abc123"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(p.dir.join("plain")).unwrap() {
        let e = e.unwrap();
        let blob = blobs.join(
            blake3::hash(e.file_name().as_encoded_bytes())
                .to_hex()
                .as_str(),
        );
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(
            format!(
                "../../blobs/{}",
                blob.file_name().unwrap().to_str().unwrap()
            ),
            snap.join(e.file_name()),
        )
        .unwrap();
    }
    let hash = |dir: &str| {
        String::from_utf8_lossy(&p.output(&["hash", dir]).stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(hash("hub/snapshots/abc123"), hash("plain"));
    let import = "stages:\n  imported:\n    kind: init_model\n    params: { from: DIR }\n";
    p.write("a.yaml", &import.replace("DIR", "plain"));
    p.write("b.yaml", &import.replace("DIR", "hub/snapshots/abc123"));
    let (a, b) = (p.run("a.yaml", &[]), p.run("b.yaml", &[]));
    assert_eq!(a.stage("imported")["key"], b.stage("imported")["key"]);
    assert_eq!(a.output("imported", "model"), b.output("imported", "model"));
    let files = std::fs::read_dir(common::object_path(
        &p.cache(),
        &b.output("imported", "model"),
    ))
    .unwrap()
    .count();
    assert_eq!(
        files,
        std::fs::read_dir(p.dir.join("plain")).unwrap().count(),
        "every file imported"
    );
}
