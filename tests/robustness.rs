//! Killed runs, concurrent runs, corrupted caches, and what Parquet outputs carry.

mod common;

use common::{Project, Run, object_path};

/// Big enough that generation takes a few seconds and writes many checkpoint shards.
const SLOW: &str = "\
seed: 9
stages:
  gen:
    kind: cot_generate
    params: { families: [arithmetic, word], difficulty: [3, 5], n_train: 600000, n_test: 100 }
";

fn shard_count(cache: &std::path::Path) -> usize {
    let Ok(keys) = std::fs::read_dir(cache.join("resume")) else {
        return 0;
    };
    keys.filter_map(|k| k.ok())
        .filter_map(|k| std::fs::read_dir(k.path()).ok())
        .flatten()
        .filter_map(|f| f.ok())
        .filter(|f| f.file_name().to_string_lossy().starts_with("train-"))
        .count()
}

#[test]
fn a_run_killed_mid_stage_resumes_and_matches_an_uninterrupted_run() {
    let reference = Project::new("resume-ref");
    reference.write("p.yaml", SLOW);
    let whole = reference.run("p.yaml", &[]);

    let p = Project::new("resume");
    p.write("p.yaml", SLOW);
    common::kill_when(&p, &["run", "p.yaml", "--json"], || {
        shard_count(&p.cache()) >= 3
    });
    let done_before = shard_count(&p.cache());

    // Nothing that looks finished was left behind.
    let status = p.output(&["status", "p.yaml"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("needs run"));

    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.status("gen"), "ran");
    assert_eq!(
        resumed.stage("gen")["resumed"],
        true,
        "continued from {done_before} shards"
    );
    assert_eq!(
        resumed.stage("gen")["outputs"],
        whole.stage("gen")["outputs"]
    );
    assert_eq!(whole.stage("gen")["resumed"], false);
    // Once published, the checkpoints are gone.
    assert_eq!(shard_count(&p.cache()), 0);
}

#[test]
fn two_concurrent_runs_on_one_cache_both_succeed_and_the_stage_runs_once() {
    let p = Project::new("concurrent");
    p.write("p.yaml", &SLOW.replace("600000", "150000"));
    let a = p.spawn(&["run", "p.yaml", "--json"]);
    let b = p.spawn(&["run", "p.yaml", "--json"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let (ra, rb) = (Run::parse(&a), Run::parse(&b));
    let mut statuses = vec![ra.status("gen"), rb.status("gen")];
    statuses.sort();
    assert_eq!(statuses, vec!["cached", "ran"]);
    // The one that waited said for whom.
    let waited = if ra.status("gen") == "cached" { &a } else { &b };
    let log = String::from_utf8_lossy(&waited.stderr);
    assert!(
        log.contains("waiting for process") && log.contains("stage `gen`"),
        "{log}"
    );
    assert_eq!(ra.stage("gen")["outputs"], rb.stage("gen")["outputs"]);
}

#[test]
fn verify_reports_a_corrupted_object_and_the_next_run_recomputes_it() {
    let p = Project::new("corrupt");
    p.write("p.yaml", &SLOW.replace("600000", "2000"));
    let first = p.run("p.yaml", &[]);
    let digest = first.output("gen", "train");
    let path = object_path(&p.cache(), &digest);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
    std::fs::write(&path, &bytes).unwrap();

    let out = p.output(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("corrupt: {digest}")), "{text}");

    let again = p.run("p.yaml", &[]);
    assert_eq!(again.status("gen"), "ran");
    assert_eq!(again.output("gen", "train"), digest);
    let out = p.output(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_edited_object_is_recomputed_even_without_verify() {
    let p = Project::new("edited");
    p.write("p.yaml", &SLOW.replace("600000", "2000"));
    let first = p.run("p.yaml", &[]);
    let path = object_path(&p.cache(), &first.output("gen", "test"));
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
    std::fs::write(&path, b"not parquet").unwrap();
    let again = p.run("p.yaml", &[]);
    assert_eq!(again.status("gen"), "ran");
    assert_eq!(again.output("gen", "test"), first.output("gen", "test"));
}

#[test]
fn every_parquet_output_round_trips_and_keeps_provenance_out_of_its_bytes() {
    let p = Project::new("provenance");
    p.write("p.yaml", "stages:\n  gen:\n    kind: cot_generate\n    params: { n_train: 64, n_test: 16 }\n  mixed:\n    kind: mix\n    inputs: { a: gen.train, b: gen.test }\n");
    let run = p.run("p.yaml", &[]);
    for (stage, output, rows) in [
        ("gen", "train", 64),
        ("gen", "test", 16),
        ("gen", "cot", 64),
        ("mixed", "data", 80),
    ] {
        let digest = run.output(stage, output);
        let file = std::fs::File::open(object_path(&p.cache(), &digest)).unwrap();
        let builder =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let keys: Vec<String> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| kv.iter().map(|e| e.key.clone()).collect())
            .unwrap_or_default();
        // Only what the rows themselves decide: a key or a stage name here would give equal
        // rows made under another key other bytes, and re-run every consumer.
        assert!(
            keys.iter()
                .all(|k| k == "dagrun.schema" || k == "ARROW:schema"),
            "{stage}.{output}: {keys:?}"
        );
        let n: usize = builder
            .build()
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum();
        assert_eq!(n, rows, "{stage}.{output}");
    }
    // The records hold it instead, and `show` prints it.
    let shown = p.output(&["show", "mixed.data"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(run.stage("mixed")["key"].as_str().unwrap()),
        "{text}"
    );
    assert!(
        text.contains(&run.output("gen", "train")),
        "inputs are shown: {text}"
    );
}

#[test]
fn gc_removes_leftovers_of_a_killed_run_but_keeps_results() {
    let p = Project::new("gc");
    p.write("p.yaml", &SLOW.replace("600000", "2000"));
    let run = p.run("p.yaml", &[]);
    std::fs::create_dir_all(p.cache().join("tmp/gen-1-2")).unwrap();
    std::fs::write(p.cache().join("tmp/gen-1-2/train.parquet"), b"half").unwrap();
    let out = p.output(&["gc"]);
    assert!(out.status.success());
    assert!(!p.cache().join("tmp/gen-1-2").exists());
    assert!(object_path(&p.cache(), &run.output("gen", "train")).exists());
    assert!(
        p.run("p.yaml", &[])
            .statuses()
            .iter()
            .all(|(_, s)| s == "cached")
    );
}
