//! `kind: dataset` imports local files: every layout and file type maps to `problems` and
//! worked-solution chats, splits keep a prompt on one side, an edited file re-runs what reads
//! it, malformed files fail in one line naming the file and line with nothing half-written in
//! the cache, and an imported GSM8K file trains with `sft` and `grpo` as it is.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use common::{Project, batches, strings};

/// GSM8K's layout: the reasoning, then `#### answer`.
fn gsm8k_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            let (a, b) = (i + 2, 3 * i + 1);
            serde_json::json!({
                "question": format!("Tom has {a} apples and buys {b} more. How many apples?"),
                "answer": format!("He buys {b} more: {a}+{b} = <<{a}+{b}={}>>{}\n#### {}", a + b, a + b, a + b),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

fn rows_of(cache: &Path, digest: &str) -> Vec<RecordBatch> {
    batches(cache, digest)
}

/// A string column over every batch.
fn column(batches: &[RecordBatch], name: &str) -> Vec<String> {
    batches.iter().flat_map(|b| strings(b, name)).collect()
}

/// The assistant turns of a chat table.
fn assistant_turns(batches: &[RecordBatch]) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let messages = b.column_by_name("messages").unwrap().as_list::<i32>();
        for i in 0..b.num_rows() {
            let turns = messages.value(i);
            let turns = turns.as_struct();
            let role = turns.column_by_name("role").unwrap().as_string::<i32>();
            let content = turns.column_by_name("content").unwrap().as_string::<i32>();
            let last = (0..turns.len())
                .rev()
                .find(|&j| role.value(j) == "assistant");
            out.push(content.value(last.unwrap()).to_string());
        }
    }
    out
}

fn write_openr1_parquet(path: &Path) {
    let col = |v: Vec<&str>| Arc::new(StringArray::from(v)) as Arc<dyn Array>;
    let batch = RecordBatch::try_from_iter([
        ("problem", col(vec!["Find 2+2.", "Find 3*3."])),
        (
            "solution",
            col(vec![
                "Add them.\nSo \\boxed{4}.",
                "Multiply: 3*3=9.\n$\\boxed{9}$",
            ]),
        ),
        ("answer", col(vec!["4", "9"])),
        ("problem_type", col(vec!["Algebra", "Number Theory"])),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn every_layout_and_file_type_maps_to_problems_and_chats() {
    let p = Project::new("dataset-layouts");
    p.write("gsm8k.jsonl", &gsm8k_lines(4));
    let math = r#"[
  {"problem": "What is $1+1$?", "solution": "We add.\nThe sum is $\\boxed{2}$.", "level": "Level 2", "type": "Prealgebra"},
  {"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?", "solution": "It is $\\boxed{1}$.", "level": "Level 1", "type": "Algebra"}
]"#;
    p.write("math.json", math);
    p.write(
        "wrapped.json",
        &format!("{{\"version\": 1, \"data\": {math}}}"),
    );
    write_openr1_parquet(&p.dir.join("openr1.parquet"));
    p.write(
        "chat.jsonl",
        concat!(
            r#"{"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>\n2+3=5\n</think>\nSo \\boxed{5}."}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "4+4?"}, {"role": "assistant", "content": "<answer>8</answer>", "reasoning_content": "4+4=8"}]}"#,
            "\n",
        ),
    );
    p.write(
        "code_asserts.jsonl",
        concat!(
            r#"{"prompt": "def add(a, b):", "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "entry_point": "add", "solution": "    return a + b"}"#,
            "\n"
        ),
    );
    p.write(
        "code_io.jsonl",
        concat!(
            r#"{"prompt": "Read two numbers, print their sum.", "tests": [{"input": "1 2\n", "output": "3\n"}]}"#,
            "\n"
        ),
    );
    p.write(
        "quiz.csv",
        "passage,question,label,subject\n\"Ann has 3 pens.\nShe loses 1.\",How many pens?,2,count\nBob runs 5 km.,How far?,5,distance\n",
    );
    // A directory of shards, read in name order; other files are left alone.
    std::fs::create_dir_all(p.dir.join("shards")).unwrap();
    p.write("shards/part-2.jsonl", &gsm8k_lines(1).replace("Tom", "Sue"));
    p.write("shards/part-1.jsonl", &gsm8k_lines(2));
    p.write("shards/README.md", "GSM8K-style shards\n");
    let text = "\
stages:
  gsm8k:
    kind: dataset
    params: { path: gsm8k.jsonl }
  shards:
    kind: dataset
    params: { path: shards }
  math:
    kind: dataset
    params: { path: math.json }
  wrapped:
    kind: dataset
    params: { path: wrapped.json, records: data, format: math }
  openr1:
    kind: dataset
    params: { path: openr1.parquet }
  chats:
    kind: dataset
    params: { path: chat.jsonl }
  asserts:
    kind: dataset
    params: { path: code_asserts.jsonl }
  pairs:
    kind: dataset
    params: { path: code_io.jsonl, format: code }
  quiz:
    kind: dataset
    params: { path: quiz.csv, prompt: \"{passage} {question}\", answer: label, task: \"quiz/{subject}\" }
";
    p.write("p.yaml", text);
    let out = p.output(&["run", "p.yaml", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = common::Run::parse(&out);
    let cache = p.cache();
    let table = |stage: &str, port: &str| rows_of(&cache, &run.output(stage, port));

    // GSM8K: steps without calculator calls, the answer after ####, an R1-format chat; auto
    // says what it chose and why.
    assert!(
        stderr.contains(
            "Format **gsm8k** (auto: columns question+answer and 100% of answers end in '#### n')"
        ),
        "{stderr}"
    );
    let train = table("gsm8k", "train");
    assert_eq!(column(&train, "answer"), vec!["3", "7", "11", "15"]);
    assert_eq!(column(&train, "task"), vec!["gsm8k"; 4]);
    assert_eq!(column(&train, "id")[0], "gsm8k-000001");
    let chat = table("gsm8k", "chat");
    assert_eq!(
        assistant_turns(&chat)[0],
        "<think>\nHe buys 1 more: 2+1 = 3\n</think>\n<answer>3</answer>"
    );
    assert_eq!(
        rows_of(&cache, &run.output("gsm8k", "test"))
            .iter()
            .map(RecordBatch::num_rows)
            .sum::<usize>(),
        0
    );

    let t = table("shards", "train");
    assert_eq!(
        column(&t, "id"),
        vec!["part-1-000001", "part-1-000002", "part-2-000001"]
    );
    assert!(column(&t, "prompt")[2].starts_with("Sue"));

    // MATH, from a list and from under `records:`: the last \boxed{}, level and type.
    for stage in ["math", "wrapped"] {
        let t = table(stage, "train");
        assert_eq!(column(&t, "answer"), vec!["2", "1"], "{stage}");
        assert_eq!(column(&t, "task"), vec!["math/prealgebra", "math/algebra"]);
        let difficulty = t[0].column_by_name("difficulty").unwrap();
        assert_eq!(
            difficulty
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(0),
            2
        );
    }
    assert!(
        stderr.contains("Format **math** (set by `format`)"),
        "{stderr}"
    );

    // OpenR1 from Parquet: the answer column wins, problem_type is the task.
    let t = table("openr1", "train");
    assert_eq!(column(&t, "answer"), vec!["4", "9"]);
    assert_eq!(
        column(&t, "task"),
        vec!["math/algebra", "math/number_theory"]
    );
    assert_eq!(
        assistant_turns(&table("openr1", "chat"))[1],
        "<think>\nMultiply: 3*3=9.\n$\\boxed{9}$\n</think>\n<answer>9</answer>"
    );

    // Chats: <think> and reasoning_content both become the think block.
    let t = table("chats", "train");
    assert_eq!(column(&t, "prompt"), vec!["2+3?", "4+4?"]);
    assert_eq!(column(&t, "answer"), vec!["5", "8"]);
    assert_eq!(
        assistant_turns(&table("chats", "chat")),
        vec![
            "<think>\n2+3=5\n</think>\n<answer>5</answer>",
            "<think>\n4+4=8\n</think>\n<answer>8</answer>"
        ]
    );

    // Code: the answer holds the tests; a reference solution makes a chat.
    let t = table("asserts", "train");
    assert_eq!(column(&t, "task"), vec!["code"]);
    assert_eq!(
        column(&t, "answer"),
        vec![r#"{"entry_point":"add","tests":["assert add(1, 2) == 3","assert add(0, 0) == 0"]}"#]
    );
    assert_eq!(assistant_turns(&table("asserts", "chat")).len(), 1);
    assert_eq!(
        column(&table("pairs", "train"), "answer"),
        vec![r#"{"io":[{"input":"1 2\n","output":"3\n"}]}"#]
    );
    assert!(
        assistant_turns(&table("pairs", "chat")).is_empty(),
        "no solution, no chat"
    );

    // A generic CSV: the template over columns (a quoted line break kept), a task template.
    let t = table("quiz", "train");
    assert_eq!(
        column(&t, "prompt"),
        vec![
            "Ann has 3 pens.\nShe loses 1. How many pens?",
            "Bob runs 5 km. How far?"
        ]
    );
    assert_eq!(column(&t, "answer"), vec!["2", "5"]);
    assert_eq!(column(&t, "task"), vec!["quiz/count", "quiz/distance"]);
    assert!(assistant_turns(&table("quiz", "chat")).is_empty());
    assert!(
        stderr.contains("Format **generic** (auto: the `prompt` param is set)"),
        "{stderr}"
    );
}

#[test]
fn a_split_keeps_every_prompt_on_one_side_and_follows_the_seed() {
    let p = Project::new("dataset-split");
    // Every prompt twice: copies must land together.
    let lines = gsm8k_lines(60);
    p.write("g.jsonl", &format!("{lines}{lines}"));
    let pipeline = |seed: u64| {
        format!(
            "seed: {seed}\nstages:\n  import:\n    kind: dataset\n    params: {{ path: g.jsonl, split: 0.25 }}\n"
        )
    };
    let sides = |p: &Project, run: &common::Run| {
        let prompts = |port: &str, col: &str| -> Vec<String> {
            column(&rows_of(&p.cache(), &run.output("import", port)), col)
        };
        (
            prompts("train", "prompt"),
            prompts("test", "prompt"),
            prompts("chat", "id"),
        )
    };
    p.write("p.yaml", &pipeline(1));
    let first = p.run("p.yaml", &[]);
    let (train, test, chat) = sides(&p, &first);
    assert_eq!(train.len() + test.len(), 120);
    assert!((10..60).contains(&test.len()), "{}", test.len());
    assert_eq!(train.len() % 2 + test.len() % 2, 0, "copies together");
    let train_set: BTreeSet<_> = train.iter().collect();
    assert!(
        test.iter().all(|t| !train_set.contains(t)),
        "no prompt on both sides"
    );
    assert_eq!(chat.len(), train.len(), "chats for train problems only");
    // The same seed splits the same way; another seed otherwise.
    p.write("q.yaml", &pipeline(1));
    assert_eq!(p.run("q.yaml", &[]).status("import"), "cached");
    p.write("p.yaml", &pipeline(2));
    let other = p.run("p.yaml", &[]);
    assert_ne!(sides(&p, &other).1, test);
    // `split_seed` holds the test set still while the pipeline's seed moves.
    let pinned = |seed: u64| pipeline(seed).replace("split: 0.25", "split: 0.25, split_seed: 1");
    p.write("p.yaml", &pinned(2));
    let pinned_2 = p.run("p.yaml", &[]);
    assert_eq!(sides(&p, &pinned_2).1, test);
    p.write("p.yaml", &pinned(3));
    assert_eq!(sides(&p, &p.run("p.yaml", &[])).1, test);

    // A split column decides per row; a train row whose prompt is in test is dropped.
    p.write(
        "s.jsonl",
        concat!(
            r#"{"question": "A?", "answer": "a\n#### 1", "split": "train"}"#,
            "\n",
            r#"{"question": "B?", "answer": "b\n#### 2", "split": "test"}"#,
            "\n",
            r#"{"question": "B?", "answer": "b\n#### 2", "split": "train"}"#,
            "\n",
            r#"{"question": "C?", "answer": "c\n#### 3", "split": "validation"}"#,
            "\n"
        ),
    );
    p.write(
        "s.yaml",
        "stages:\n  import:\n    kind: dataset\n    params: { path: s.jsonl, split_column: split }\n",
    );
    let out = p.output(&["run", "s.yaml", "--json"]);
    assert!(out.status.success());
    let run = common::Run::parse(&out);
    let (train, test, _) = sides(&p, &run);
    assert_eq!(train, vec!["A?"]);
    assert_eq!(test, vec!["B?", "C?"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("1 train rows dropped: their prompt is also in test."),
    );
}

#[test]
fn editing_the_file_reruns_the_import_and_what_reads_it_only() {
    let p = Project::new("dataset-edit");
    p.write("a.jsonl", &gsm8k_lines(5));
    p.write("b.jsonl", &gsm8k_lines(3));
    let text = "\
stages:
  a:
    kind: dataset
    params: { path: a.jsonl }
  a_mixed:
    kind: mix
    inputs: { a: a.train }
  b:
    kind: dataset
    params: { path: b.jsonl }
  b_mixed:
    kind: mix
    inputs: { a: b.train }
";
    p.write("p.yaml", text);
    p.write(
        "other.yaml",
        "stages:\n  b:\n    kind: dataset\n    params: { path: b.jsonl }\n  chats:\n    kind: mix\n    inputs: { a: b.chat }\n",
    );
    let first = p.run("p.yaml", &[]);
    p.run("other.yaml", &[]);
    assert_eq!(
        p.run("p.yaml", &[])
            .statuses()
            .iter()
            .filter(|s| s.1 == "cached")
            .count(),
        4
    );
    p.write("a.jsonl", &gsm8k_lines(6));
    let edited = p.run("p.yaml", &[]);
    assert_eq!(edited.status("a"), "ran");
    assert_eq!(edited.status("a_mixed"), "ran");
    assert_eq!(edited.status("b"), "cached");
    assert_eq!(edited.status("b_mixed"), "cached");
    assert_ne!(edited.output("a", "train"), first.output("a", "train"));
    let untouched = p.run("other.yaml", &[]);
    assert!(
        untouched.statuses().iter().all(|s| s.1 == "cached"),
        "{:?}",
        untouched.statuses()
    );
}

/// Every file below `dir`, for checking that nothing was published.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

#[test]
fn malformed_files_fail_in_one_line_naming_the_line_and_publish_nothing() {
    let cases: [(&str, &[u8], &str, &str); 5] = [
        (
            "bad.jsonl",
            b"{\"question\": \"A?\", \"answer\": \"a\\n#### 1\"}\n{\"question\": \"B?\", \"answer\": }\n",
            "",
            "bad.jsonl:2:30: expected value",
        ),
        (
            "missing.jsonl",
            b"{\"question\": \"A?\", \"solution\": \"a\"}\n",
            ", format: gsm8k",
            "missing.jsonl: column `answer` is missing: format gsm8k reads question, answer (the file has: question, solution)",
        ),
        (
            "ragged.csv",
            b"question,answer\nA?,\"a\n#### 1\"\nB?\n",
            ", format: gsm8k",
            "ragged.csv:4: 1 fields where the header has 2",
        ),
        (
            "latin1.jsonl",
            b"{\"question\": \"A?\", \"answer\": \"a\\n#### 1\"}\n{\"question\": \"caf\xe9?\", \"answer\": \"a\\n#### 1\"}\n",
            "",
            "latin1.jsonl:2:18: not UTF-8 (byte 0xe9)",
        ),
        (
            "noanswer.jsonl",
            b"{\"question\": \"A?\", \"answer\": \"a\\n#### 1\"}\n{\"question\": \"B?\", \"answer\": \"no marker\"}\n",
            ", format: gsm8k",
            "noanswer.jsonl:2: `answer` does not end in a `#### n` line",
        ),
    ];
    for (file, bytes, params, want) in cases {
        let p = Project::new(&format!("dataset-bad-{file}"));
        std::fs::write(p.dir.join(file), bytes).unwrap();
        p.write(
            "p.yaml",
            &format!(
                "stages:\n  import:\n    kind: dataset\n    params: {{ path: {file}{params} }}\n"
            ),
        );
        let out = p.output(&["run", "p.yaml", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        let run = common::Run::parse(&out);
        let error = run.stage("import")["error"].as_str().unwrap().to_string();
        assert!(!error.contains('\n'), "{error}");
        assert_eq!(error, want, "{file}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
        let key = run.stage("import")["key"].as_str().unwrap().to_string();
        assert!(
            files_under(&p.cache().join("actions"))
                .iter()
                .all(|f| !f.contains(&key)),
            "{file}: no action for the failed key"
        );
        assert!(files_under(&p.cache().join("objects")).is_empty(), "{file}");
        assert!(files_under(&p.cache().join("tmp")).is_empty(), "{file}");
    }
}

#[test]
fn dropping_bad_rows_reports_how_many_and_the_first_lines() {
    let p = Project::new("dataset-drop");
    let mut text = gsm8k_lines(3);
    text.push_str("{\"question\": \"B?\", \"answer\": }\n");
    text.push_str("{\"question\": \"C?\", \"answer\": \"no marker\"}\n");
    text.push_str(&gsm8k_lines(1).replace("Tom", "Sue"));
    p.write("g.jsonl", &text);
    p.write(
        "p.yaml",
        "stages:\n  import:\n    kind: dataset\n    params: { path: g.jsonl, on_bad_row: drop }\n",
    );
    let out = p.output(&["run", "p.yaml", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = common::Run::parse(&out);
    assert_eq!(
        column(
            &rows_of(&p.cache(), &run.output("import", "train")),
            "answer"
        )
        .len(),
        4
    );
    assert!(stderr.contains("| 6 | 2 | 4 | 0 | 4 |"), "{stderr}");
    assert!(
        stderr.contains("2 bad rows dropped; the first:"),
        "{stderr}"
    );
    assert!(stderr.contains("g.jsonl:4:30: expected value"), "{stderr}");
    assert!(
        stderr.contains("g.jsonl:5: `answer` does not end in a `#### n` line"),
        "{stderr}"
    );
}

#[test]
fn dropping_bad_rows_steps_over_ragged_and_non_utf8_csv_records() {
    let p = Project::new("dataset-drop-csv");
    p.write_bytes(
        "g.csv",
        b"question,answer\nA?,1\nB?\nC?,3\ncaf\xe9?,4\nD?,5,extra\nE?,6\n",
    );
    p.write(
        "p.yaml",
        "stages:\n  import:\n    kind: dataset\n    params: { path: g.csv, format: generic, prompt: '{question}', answer: answer, on_bad_row: drop }\n",
    );
    let out = p.output(&["run", "p.yaml", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = common::Run::parse(&out);
    let train = rows_of(&p.cache(), &run.output("import", "train"));
    assert_eq!(column(&train, "answer"), vec!["1", "3", "6"]);
    assert!(
        stderr.contains("3 bad rows dropped; the first:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("g.csv:3: 1 fields where the header has 2"),
        "{stderr}"
    );
    assert!(
        stderr.contains("g.csv:5: field 1: not UTF-8 (byte 0xe9)"),
        "{stderr}"
    );
}

#[test]
fn a_template_column_the_file_lacks_is_reported_at_the_param() {
    let p = Project::new("dataset-template");
    p.write("q.csv", "question,label\nA?,1\n");
    p.write(
        "p.yaml",
        "stages:\n  import:\n    kind: dataset\n    params: { path: q.csv, prompt: \"{passage} {question}\", answer: label }\n",
    );
    let out = p.output(&["run", "p.yaml", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let error = common::Run::parse(&out).stage("import")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        error,
        "p.yaml:4:28: stage `import`: q.csv: param `prompt` reads column `passage`, which the file does not have (it has: question, label)"
    );
}

const FEEDS_TRAINING: &str = "\
seed: 3
stages:
  import:
    kind: dataset
    params: { path: gsm8k.jsonl, split: 0.2 }
  base:
    kind: init_model
    params: { preset: pico, config: { hidden_size: 16, intermediate_size: 32, num_attention_heads: 2, num_key_value_heads: 2 } }
  tune:
    kind: sft
    inputs: { model: base, data: import.chat }
    params: { max_steps: 2, batch_size: 4, max_length: 96, log_every: 1 }
  rl:
    kind: grpo
    inputs: { model: tune, problems: import.train }
    params: { steps: 1, batch_prompts: 2, group_size: 2, max_new_tokens: 8, micro_batch: 2 }
  scores:
    kind: eval
    inputs: { models: [rl.model], problems: import.test }
    params: { k: 1, max_new_tokens: 8 }
";

#[test]
fn an_imported_gsm8k_file_feeds_sft_grpo_and_eval_as_it_is() {
    let p = Project::new("dataset-feeds");
    p.write("gsm8k.jsonl", &gsm8k_lines(20));
    p.write("p.yaml", FEEDS_TRAINING);
    let run = p.run("p.yaml", &[]);
    for stage in ["import", "base", "tune", "rl", "scores"] {
        assert_eq!(run.status(stage), "ran", "{stage}");
    }
}

#[test]
fn the_shipped_code_problems_import_with_reference_solutions_that_pass_their_tests() {
    let p = Project::new("dataset-code-mini");
    let fixture = common::repo_dir().join("tests/fixtures/code-mini.jsonl");
    p.write(
        "p.yaml",
        &format!(
            "stages:\n  import:\n    kind: dataset\n    params: {{ path: {}, format: code }}\n",
            fixture.display()
        ),
    );
    let run = p.run("p.yaml", &[]);
    let chats = rows_of(&p.cache(), &run.output("import", "chat"));
    let answers = column(&chats, "answer");
    let replies = assistant_turns(&chats);
    assert_eq!(replies.len(), 40, "pipelines/code.yaml trains on all 40");
    if dagrun_stages::code_exec::python().is_err() {
        eprintln!("SKIPPED running the reference solutions: no Python 3 here");
        return;
    }
    for (answer, reply) in answers.iter().zip(&replies) {
        assert!(
            dagrun_stages::tasks::verify_with("code", answer, reply, false),
            "the reference {reply:?} fails its own tests {answer}"
        );
        // A wrong program fails them: the tests test something.
        let spec: serde_json::Value = serde_json::from_str(answer).unwrap();
        let entry = spec["entry_point"].as_str().unwrap();
        let broken = format!("<answer>def {entry}(*a):\n    return None</answer>");
        assert!(!dagrun_stages::tasks::verify_with(
            "code", answer, &broken, false
        ));
    }
}

#[test]
fn a_copy_under_another_name_is_imported_under_its_own_name() {
    let p = Project::new("dataset-copy");
    let lines = gsm8k_lines(3);
    p.write("a.jsonl", &lines);
    p.write("b.jsonl", &lines);
    let import = |file: &str| {
        format!("stages:\n  import:\n    kind: dataset\n    params: {{ path: {file} }}\n")
    };
    p.write("p.yaml", &import("a.jsonl"));
    let first = p.run("p.yaml", &[]);
    let ids = column(&rows_of(&p.cache(), &first.output("import", "train")), "id");
    assert!(ids.iter().all(|id| id.starts_with("a-")), "{ids:?}");
    // The same bytes under another name: ids come from the name, so the stage runs again.
    p.write("p.yaml", &import("b.jsonl"));
    let second = p.run("p.yaml", &[]);
    assert_eq!(second.status("import"), "ran");
    let ids = column(
        &rows_of(&p.cache(), &second.output("import", "train")),
        "id",
    );
    assert!(ids.iter().all(|id| id.starts_with("b-")), "{ids:?}");
}
