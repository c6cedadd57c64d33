//! The run report: every run writes `report.html` and `report.md` into its directory, with a
//! chart for each training curve and evaluation, the eval table per model, and nothing the
//! HTML would fetch; `dagrun report FILE --out DIR` writes the same; a pipeline with a
//! skipped stage, a stage moved elsewhere in the graph, or a run whose stages failed, still gets
//! a whole report.

mod common;

use std::path::{Path, PathBuf};

use common::{Project, Run};

const PIPELINE: &str = "\
seed: 3
stages:
  problems:
    kind: cot_generate
    params: { families: [arithmetic], difficulty: [1, 1], n_train: 200, n_test: 20 }
  base:
    kind: init_model
    params: { preset: nano }
  cold_start:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 12, batch_size: 8, lr: 3e-3, log_every: 2 }
  rl:
    kind: grpo
    inputs: { model: cold_start.model, problems: problems.train }
    params: { steps: 4, batch_prompts: 2, group_size: 2, max_new_tokens: 16, beta: 0.04, rewards: { correctness: 1.0, repetition: 1.0 } }
  filter:
    kind: rejection_filter
    inputs: { model: rl.model, problems: problems.train }
    params: { num_samples: 2, limit: 4, max_new_tokens: 16 }
  eval:
    kind: eval
    inputs: { models: [base, cold_start, rl], problems: problems.test }
    params: { k: 2, limit: 4, max_new_tokens: 16 }
";

/// Runs `dagrun run FILE --json`; returns the run and the report path it printed.
fn run_with_report(p: &Project, file: &str, expect_success: bool) -> (Run, PathBuf) {
    let out = p.output(&["run", file, "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.success(), expect_success, "{stderr}");
    let run = Run::parse(&out);
    let id = run.0["run"].as_str().unwrap().to_string();
    let path = p.cache().join("runs").join(&id).join("report.html");
    let printed = stderr
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .unwrap_or_else(|| panic!("no `report:` line in {stderr}"));
    assert_eq!(
        Path::new(printed),
        path,
        "the printed path is the run's report"
    );
    (run, path)
}

/// The `<figure id="ID" …>…</figure>` element, or a failure naming the ids that exist.
fn figure<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("<figure id=\"{id}\""))
        .unwrap_or_else(|| {
            let ids: Vec<&str> = html
                .match_indices("<figure id=\"")
                .map(|(i, m)| html[i + m.len()..].split('"').next().unwrap())
                .collect();
            panic!("no figure `{id}`; the report has {ids:?}")
        });
    let end = html[start..].find("</figure>").unwrap() + start;
    &html[start..end]
}

/// A chart that was drawn: an inline SVG with lines, bars or boxes in it.
fn assert_chart(html: &str, id: &str) {
    let f = figure(html, id);
    assert!(
        f.contains("<svg") && !f.contains("plot empty"),
        "{id} is not a chart: {f:.300}"
    );
    assert!(
        f.contains("<polyline")
            || f.contains("<path")
            || f.contains("<rect")
            || f.contains("<polygon"),
        "{id} draws nothing"
    );
}

/// Nothing in the page is loaded from elsewhere: no URLs, links, scripts or sources.
fn assert_self_contained(html: &str) {
    let lower = html.to_lowercase();
    for bad in [
        "http:", "https:", "src=", "<link", "<script", "url(", "@import", "href=", "<img",
    ] {
        assert!(
            !lower.contains(bad),
            "the report references something outside itself: `{bad}`"
        );
    }
    assert!(lower.starts_with("<!doctype html>") && lower.trim_end().ends_with("</html>"));
}

/// The text elements of an SVG, trimmed.
fn texts(svg: &str) -> Vec<&str> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split("</text>").next()?.trim()))
        .collect()
}

fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("<section id=\"{id}\""))
        .unwrap_or_else(|| panic!("no section {id}"));
    let end = html[start..].find("</section>").unwrap() + start;
    &html[start..end]
}

#[test]
fn every_run_writes_a_whole_self_contained_report() {
    let p = Project::new("report");
    p.write("p.yaml", PIPELINE);
    let (run, path) = run_with_report(&p, "p.yaml", true);
    assert_eq!(run.status("rl"), "ran");
    let html = std::fs::read_to_string(&path).unwrap();
    assert_self_contained(&html);
    for id in [
        "plot-dag",
        "plot-times",
        "plot-sft-loss-cold_start",
        "plot-grpo-reward-rl",
        "plot-grpo-rewards-rl",
        "plot-grpo-kl-rl",
        "plot-grpo-entropy-rl",
        "plot-grpo-completion_length-rl",
        "plot-accuracy-eval",
    ] {
        assert_chart(&html, id);
    }
    // No PRM in this pipeline: the place of that chart says so.
    let prm = figure(&html, "plot-prm-eval");
    assert!(prm.contains("no PRM reranking in this pipeline"), "{prm}");
    // Every stage is in the DAG and the stage table, with what the run did.
    let dag = texts(figure(&html, "plot-dag"));
    let stages = section(&html, "stages");
    for s in ["problems", "base", "cold_start", "rl", "filter", "eval"] {
        assert!(dag.contains(&s), "{s} missing from the DAG: {dag:?}");
        assert!(
            stages.contains(&format!("<td><b>{s}</b></td>")),
            "{s} missing from the table"
        );
    }
    assert!(stages.contains(">ran</span>"));
    // The eval table has a row per model, with pass@k named by its k.
    let eval = section(&html, "eval-eval");
    for m in ["base", "cold_start", "rl"] {
        assert!(eval.contains(&format!("<td>{m}</td>")), "no row for {m}");
    }
    assert!(
        eval.contains("<th class=\"num\">pass@2</th>"),
        "{eval:.2000}"
    );
    // The rejection filter's one-off figures are shown as a table.
    assert!(section(&html, "figures").contains("filter"));

    let md = std::fs::read_to_string(path.with_file_name("report.md")).unwrap();
    assert!(md.contains("| model | problems | greedy |"), "{md}");
    for m in ["base", "cold_start", "rl"] {
        assert!(
            md.contains(&format!("\n| {m} | 4 | ")),
            "no eval row for {m} in\n{md}"
        );
    }
    assert!(
        md.contains("### cold_start (sft)") && md.contains("| loss | 6 |"),
        "{md}"
    );
    assert!(md.contains("no PRM reranking in this pipeline"));

    // A second run is all cached, and its report still has every chart.
    let (second, path2) = run_with_report(&p, "p.yaml", true);
    assert_eq!(second.status("rl"), "cached");
    assert_ne!(path, path2);
    let html2 = std::fs::read_to_string(&path2).unwrap();
    assert_chart(&html2, "plot-grpo-reward-rl");
    assert!(section(&html2, "stages").contains(">cached</span>"));

    // `dagrun report FILE --out DIR` writes both files there, about the latest run.
    let out = p.output(&["report", "p.yaml", "--out", "out"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("report.html") && printed.contains("report.md"),
        "{printed}"
    );
    let html3 = std::fs::read_to_string(p.dir.join("out/report.html")).unwrap();
    assert!(html3.contains(second.0["run"].as_str().unwrap()));
    assert_self_contained(&html3);
    assert_chart(&html3, "plot-sft-loss-cold_start");
    assert!(
        std::fs::read_to_string(p.dir.join("out/report.md"))
            .unwrap()
            .contains("| rl |")
    );

    // Skipping GRPO re-runs what depends on it and still gives a whole report, without it.
    p.write(
        "p.yaml",
        &PIPELINE.replace("    kind: grpo\n", "    kind: grpo\n    skip: true\n"),
    );
    let (third, path) = run_with_report(&p, "p.yaml", true);
    for s in ["problems", "base", "cold_start"] {
        assert_eq!(third.status(s), "cached", "{s}");
    }
    assert_eq!(third.status("rl"), "skipped");
    assert_ne!(
        run.output("rl", "model"),
        run.output("cold_start", "model"),
        "GRPO changed the weights (the repetition reward varies within a group)"
    );
    for s in ["filter", "eval"] {
        assert_eq!(
            third.status(s),
            "ran",
            "{s} reads what the skipped stage passes on"
        );
    }
    let html = std::fs::read_to_string(&path).unwrap();
    assert_self_contained(&html);
    for id in [
        "plot-dag",
        "plot-times",
        "plot-sft-loss-cold_start",
        "plot-accuracy-eval",
    ] {
        assert_chart(&html, id);
    }
    assert!(
        !html.contains("plot-grpo-"),
        "a skipped stage has no curves"
    );
    assert!(section(&html, "stages").contains(">skipped</span>"));
    let eval = section(&html, "eval-eval");
    assert!(eval.contains("<td>cold_start</td>") && !eval.contains("<td>rl</td>"));
}

#[test]
fn moving_rejection_sampling_before_grpo_reruns_only_it_and_the_report_stays_whole() {
    let p = Project::new("report-moved");
    p.write("p.yaml", PIPELINE);
    let (first, before) = run_with_report(&p, "p.yaml", true);
    let before = std::fs::read_to_string(before).unwrap();
    assert!(section(&before, "stages").contains("model ← rl.model"));
    assert_ne!(
        first.output("rl", "model"),
        first.output("cold_start", "model"),
        "GRPO changed the weights, so the move changes the filter's input"
    );
    // Rejection sampling moved before GRPO (from the cold-start model): only it re-runs, and
    // the report is whole, GRPO's curves included.
    p.write(
        "p.yaml",
        &PIPELINE.replace(
            "inputs: { model: rl.model, problems: problems.train }",
            "inputs: { model: cold_start.model, problems: problems.train }",
        ),
    );
    let (moved, path) = run_with_report(&p, "p.yaml", true);
    for s in ["problems", "base", "cold_start", "rl", "eval"] {
        assert_eq!(moved.status(s), "cached", "{s}");
    }
    assert_eq!(moved.status("filter"), "ran");
    let html = std::fs::read_to_string(&path).unwrap();
    assert_self_contained(&html);
    for id in [
        "plot-dag",
        "plot-sft-loss-cold_start",
        "plot-grpo-reward-rl",
        "plot-accuracy-eval",
    ] {
        assert_chart(&html, id);
    }
    let stages = section(&html, "stages");
    assert!(
        !stages.contains("model ← rl.model"),
        "the filter's row shows its new input: {stages:.3000}"
    );
}

#[test]
fn a_failed_run_still_gets_a_report_and_report_needs_a_run() {
    let p = Project::new("report-failed");
    p.write("p.yaml", PIPELINE);
    // Nothing is cached, so the selected stage cannot start: the run fails.
    let out = p.output(&["report", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no run of this pipeline is recorded"), "{err}");

    p.write("only.yaml", PIPELINE);
    let out = p.output(&["run", "only.yaml", "--only", "eval", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let run = Run::parse(&out);
    assert_eq!(run.status("eval"), "failed");
    let dir = p.cache().join("runs").join(run.0["run"].as_str().unwrap());
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_self_contained(&html);
    assert_chart(&html, "plot-dag");
    let stages = section(&html, "stages");
    assert!(stages.contains(">failed</span>") && stages.contains("is not in the cache"));
    assert!(
        stages.contains(">no record</span>"),
        "stages never run are listed too"
    );
    assert!(
        std::fs::read_to_string(dir.join("report.md"))
            .unwrap()
            .contains("| eval | eval | failed |")
    );
}

#[test]
fn report_finds_the_latest_run_from_another_directory() {
    let p = Project::new("report-elsewhere");
    p.write("p.yaml", PIPELINE);
    let ok = p.run("p.yaml", &["--only", "problems"]);
    // The newest run fails, so the pipeline's index (stages that ran) still names the first.
    let out = p.output(&["run", "p.yaml", "--only", "eval", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let failed = Run::parse(&out);
    let elsewhere = p.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = p
        .command(&["report", "../p.yaml"])
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let run = |r: &Run| r.0["run"].as_str().unwrap().to_string();
    assert!(
        printed.contains(&run(&failed)) && !printed.contains(&run(&ok)),
        "the report of the newest run ({}), not of the newest in the index: {printed}",
        run(&failed)
    );
}
