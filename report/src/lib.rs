//! The run report: `report.html` (one self-contained file: inline CSS and SVG, no scripts,
//! nothing fetched) and `report.md`, written at the end of every `dagrun run` into the run's
//! directory, and by `dagrun report FILE [--out DIR]`.
//!
//! What it owns: reading a run record and the cached outputs it names ([`collect`]), choosing
//! figures by metric names ([`figures`]), drawing them with plotters' SVG backend ([`plots`],
//! [`dag`]) and laying out the two documents ([`html`], [`markdown`]), and the command
//! ([`cli`]).
//!
//! What it does not know: any stage kind. It reads what the engine records (status, times,
//! output digests) and datasets by their declared schema (`metrics`, `eval`); a stage kind
//! that writes a `metrics` table gets curves without a change here. It never writes into the
//! cache's objects, and it holds the store lock shared while it reads them.

pub mod cli;
mod collect;
mod dag;
mod figures;
mod html;
mod markdown;
mod plots;

use std::path::{Path, PathBuf};

use anyhow::Context;
use dagrun_cache::Store;
use dagrun_engine::graph::Graph;
use dagrun_engine::records::{RunRecord, Status};
use plotters::style::RGBColor;

use crate::collect::Run;
use crate::figures::{Eval, Figure, Table};

/// Where a report was written.
pub struct Written {
    pub html: PathBuf,
    pub markdown: PathBuf,
}

/// Writes `report.html` and `report.md` about `record` into `dir`.
pub fn write(
    graph: &Graph,
    store: &Store,
    record: &RunRecord,
    dir: &Path,
) -> anyhow::Result<Written> {
    let run = {
        // Held while objects are read, so that `gc` cannot remove them meanwhile.
        let _lock =
            dagrun_engine::cli::lock_store_shared(store).map_err(|d| anyhow::anyhow!("{d}"))?;
        collect::collect(graph, store, record)
    };
    let report = Report::build(run);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Absolute, so that the printed path opens from anywhere (a browser wants file:///…).
    let dir = &std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let written = Written {
        html: dir.join("report.html"),
        markdown: dir.join("report.md"),
    };
    replace(&written.html, &html::render(&report))?;
    replace(&written.markdown, &markdown::render(&report))?;
    Ok(written)
}

/// Writes beside `path` then renames, so a reader never sees half a report.
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Everything both documents show, computed once.
struct Report {
    run: Run,
    dag: Figure,
    times: Figure,
    /// Index of the stage, and its evaluation.
    evals: Vec<(usize, Eval)>,
    /// Index of the stage, and its curves.
    curves: Vec<(usize, Vec<Figure>)>,
    /// Index of the stage, and its one-off figures.
    tables: Vec<(usize, Table)>,
}

impl Report {
    fn build(run: Run) -> Report {
        let drawn = |id: &str, caption: &str, svg| figures::figure(id.into(), caption.into(), svg);
        let dag = drawn(
            "plot-dag",
            "the pipeline: producers left of consumers, coloured by what this run did",
            dag::draw(&run),
        );
        let bars: Vec<(String, f64, RGBColor, String)> = run
            .stages
            .iter()
            .map(|s| {
                let what = match (s.status, &s.earlier_run) {
                    (Some(st), None) => {
                        format!("{}  {}", seconds(s.seconds), status_word(Some(st)))
                    }
                    (st, _) => status_word(st).to_string(),
                };
                let secs = if s.earlier_run.is_some() {
                    0.0
                } else {
                    s.seconds
                };
                (s.name.clone(), secs, status_color(s.status), what)
            })
            .collect();
        let times = drawn(
            "plot-times",
            "wall time of each stage in this run",
            plots::horizontal_bars(&bars, "seconds", 640),
        );
        let mut report = Report {
            dag,
            times,
            evals: Vec::new(),
            curves: Vec::new(),
            tables: Vec::new(),
            run,
        };
        for (i, stage) in report.run.stages.iter().enumerate() {
            if let Some(e) = figures::eval(stage) {
                report.evals.push((i, e));
            }
            let c = figures::curves(stage);
            if !c.is_empty() {
                report.curves.push((i, c));
            }
            if let Some(t) = figures::figures_table(stage) {
                report.tables.push((i, t));
            }
        }
        report
    }

    fn count(&self, status: Status) -> usize {
        self.run
            .stages
            .iter()
            .filter(|s| s.status == Some(status) && s.earlier_run.is_none())
            .count()
    }
}

/// A duration as people read it.
pub(crate) fn seconds(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "–".into();
    }
    if s < 1.0 {
        return format!("{:.0} ms", s * 1000.0);
    }
    if s < 60.0 {
        return format!("{s:.1} s");
    }
    let t = s.round() as u64;
    if t < 3600 {
        format!("{}m {:02}s", t / 60, t % 60)
    } else {
        format!("{}h {:02}m", t / 3600, t % 3600 / 60)
    }
}

pub(crate) fn status_word(s: Option<Status>) -> &'static str {
    match s {
        Some(Status::Ran) => "ran",
        Some(Status::Cached) => "cached",
        Some(Status::Skipped) => "skipped",
        Some(Status::Failed) => "failed",
        Some(Status::NotRun) => "not run",
        Some(Status::Running) => "running",
        None => "no record",
    }
}

pub(crate) fn status_color(s: Option<Status>) -> RGBColor {
    match s {
        Some(Status::Ran) => RGBColor(60, 140, 64),
        Some(Status::Cached) => RGBColor(78, 121, 167),
        Some(Status::Failed) => RGBColor(214, 60, 62),
        Some(Status::Running) => RGBColor(230, 130, 20),
        Some(Status::Skipped) | Some(Status::NotRun) | None => RGBColor(150, 150, 150),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::{EvalModels, Metrics, Stage};

    fn stage(name: &str, kind: &str, status: Status) -> Stage {
        Stage {
            status: Some(status),
            seconds: 1.5,
            ..Stage::new(name, kind)
        }
    }

    /// A run as a pipeline with PRM reranking would record it, made up.
    fn run() -> Run {
        let mut sft = stage("cold_start", "sft", Status::Ran);
        let loss = (1..=60).map(|s| (s, "loss".to_string(), 3.0 / (1.0 + s as f64 / 8.0)));
        sft.metrics.push((
            "metrics".into(),
            Metrics {
                rows: loss.collect(),
            },
        ));
        let mut rl = stage("rl", "grpo", Status::Cached);
        let mut rows = Vec::new();
        for s in 1..=50 {
            let x = s as f64;
            rows.push((
                s,
                "reward".to_string(),
                0.3 + 0.5 * (1.0 - (-x / 15.0).exp()),
            ));
            rows.push((s, "reward_std".to_string(), 0.2));
            rows.push((s, "rewards/correctness/mean".to_string(), 0.2 + x / 100.0));
            rows.push((s, "rewards/format/mean".to_string(), 0.9));
            rows.push((s, "entropy".to_string(), 0.7 - x / 200.0));
            rows.push((
                s,
                "completion_length".to_string(),
                60.0 + (x * 0.7).sin() * 5.0,
            ));
        }
        rl.metrics.push(("metrics".into(), Metrics { rows }));
        let mut eval = stage("eval", "eval", Status::Ran);
        let models = vec!["cold_start".to_string(), "rl".to_string()];
        let mut rows = Vec::new();
        for (m, base) in [(0_i64, 0.6), (1, 0.7)] {
            rows.push((m, "problems".to_string(), 500.0));
            for (name, v) in [
                ("greedy", base),
                ("pass1", base - 0.05),
                ("passk", base + 0.15),
                ("majk", base + 0.02),
            ] {
                rows.push((m, name.to_string(), v));
                rows.push((m, format!("{name}_stderr"), 0.02));
            }
            rows.push((m, "arithmetic/pass1".to_string(), base));
            for (i, n) in [1, 2, 4, 8].into_iter().enumerate() {
                rows.push((m, format!("prm@{n}"), base - 0.05 + 0.03 * i as f64));
                rows.push((m, format!("maj@{n}"), base - 0.05 + 0.015 * i as f64));
            }
        }
        eval.metrics.push(("metrics".into(), Metrics { rows }));
        eval.evals
            .push(("results".into(), EvalModels { models, k: Some(8) }));
        let mut skipped = stage("filter", "rejection_filter", Status::Skipped);
        skipped.seconds = 0.0;
        let missing = Stage {
            status: None,
            ..stage("distill", "distill", Status::Ran)
        };
        Run {
            pipeline: "r1".into(),
            run: "20261122T041512.345-1".into(),
            started_unix: 1_795_320_000,
            seconds: 95.0,
            stages: vec![sft, rl, skipped, eval, missing],
            edges: vec![
                (0, 1, "model".into()),
                (1, 2, "model".into()),
                (0, 3, "model".into()),
                (1, 3, "model".into()),
                (2, 4, "data".into()),
            ],
        }
    }

    #[test]
    fn prm_rows_give_a_best_of_n_chart_and_table() {
        let report = Report::build(run());
        let html = html::render(&report);
        for id in [
            "plot-dag",
            "plot-times",
            "plot-sft-loss-cold_start",
            "plot-grpo-reward-rl",
            "plot-grpo-rewards-rl",
            "plot-accuracy-eval",
            "plot-prm-eval",
        ] {
            let at = html
                .find(&format!("<figure id=\"{id}\""))
                .unwrap_or_else(|| panic!("no {id}"));
            let figure = html[at..].split("</figure>").next().unwrap();
            assert!(
                figure.contains("<svg") && !figure.contains("plot empty"),
                "{id} is drawn"
            );
        }
        // Absent metrics are absent charts, not empty ones.
        assert!(!html.contains("plot-grpo-kl-rl"));
        assert!(html.contains("<th class=\"num\">pass@8</th>") && html.contains("PRM best-of-8"));
        assert!(html.contains("0.600 ± 0.020"));
        assert!(
            !html.contains("http"),
            "the SVG namespace is left to the HTML parser"
        );
        let md = markdown::render(&report);
        assert!(
            md.contains("| N | cold_start PRM | cold_start maj | rl PRM | rl maj |"),
            "{md}"
        );
        assert!(md.contains("| 8 | 0.640 | 0.595 | 0.740 | 0.695 |"), "{md}");
        if let Ok(path) = std::env::var("DAGRUN_REPORT_SAMPLE") {
            std::fs::write(path, &html).unwrap();
        }
    }

    #[test]
    fn without_prm_rows_the_chart_is_a_note() {
        let mut run = run();
        for (_, m) in &mut run.stages[3].metrics {
            m.rows.retain(|r| !r.1.starts_with("prm@"));
        }
        let report = Report::build(run);
        let html = html::render(&report);
        assert!(html.contains("<figure id=\"plot-prm-eval\" class=\"plot empty\"><figcaption>"));
        assert!(html.contains("no PRM reranking in this pipeline"));
        assert!(markdown::render(&report).contains("_no PRM reranking in this pipeline._"));
    }
}
