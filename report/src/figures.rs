//! Which figures and tables each stage gets, chosen by the names of its metrics, never by
//! its kind: a stage whose `metrics` change over steps gets curves; a stage with an `eval`
//! table gets the per-model table and charts from its `metrics` (step = model position);
//! other `metrics` tables are shown as figures. Missing metrics are left out, not errors.

use crate::collect::{EvalModels, Metrics, Stage};
use crate::plots::{self, Bar, Line, color};

/// A chart in the report, under a stable id (`plot-…`) that tests and links can find; a
/// chart that cannot be drawn from this run carries a note instead.
pub struct Figure {
    pub id: String,
    pub caption: String,
    pub body: Body,
}

pub enum Body {
    Svg(String),
    Note(String),
}

/// A table: a header row and rows of cells, already formatted.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// Panels of a training stage: (id, caption, series picker). Listed in the order shown.
type Picker = fn(&Metrics) -> Vec<(String, String)>;

const PANELS: &[(&str, &str, Picker)] = &[
    ("loss", "loss", |m| exact(m, "loss")),
    ("reward", "reward (mean ± std over samples)", |m| {
        exact(m, "reward")
    }),
    ("rewards", "rewards by component (mean)", |m| {
        matching(m, |n| n.strip_prefix("rewards/")?.strip_suffix("/mean"))
    }),
    ("kl", "KL divergence from the reference model", |m| {
        exact(m, "kl")
    }),
    ("entropy", "entropy (nats per token)", |m| {
        exact(m, "entropy")
    }),
    ("completion_length", "completion length (tokens)", |m| {
        exact(m, "completion_length")
    }),
    ("accuracy", "accuracy", |m| {
        matching(m, |n| {
            (n == "accuracy" || n.ends_with("_accuracy") || n.ends_with("/accuracy")).then_some(n)
        })
    }),
];

/// `(metric, legend label)` pairs of a panel.
fn exact(m: &Metrics, name: &str) -> Vec<(String, String)> {
    m.names()
        .into_iter()
        .filter(|n| *n == name)
        .map(|n| (n.to_string(), n.to_string()))
        .collect()
}

fn matching(m: &Metrics, label: impl Fn(&str) -> Option<&str>) -> Vec<(String, String)> {
    m.names()
        .into_iter()
        .filter_map(|n| Some((n.to_string(), label(n)?.to_string())))
        .collect()
}

pub fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Curves of a stage's metrics tables that change over steps. Beside an `eval` table the
/// steps number models, not training steps: those figures belong to [`eval`].
pub fn curves(stage: &Stage) -> Vec<Figure> {
    let mut out = Vec::new();
    if !stage.evals.is_empty() {
        return out;
    }
    for (_, m) in stage.metrics.iter().filter(|(_, m)| m.is_curve()) {
        // (id, caption, the (metric, legend label) pairs it draws)
        type Panel = (String, String, Vec<(String, String)>);
        let mut panels: Vec<Panel> = PANELS
            .iter()
            .map(|(id, caption, pick)| (id.to_string(), caption.to_string(), pick(m)))
            .filter(|p| !p.2.is_empty())
            .collect();
        if panels.is_empty() {
            // Nothing known by name: show the first few metrics rather than nothing.
            panels = m
                .names()
                .into_iter()
                .filter(|n| !n.ends_with("_std") && !n.ends_with("/std"))
                .take(4)
                .map(|n| {
                    (
                        n.to_string(),
                        n.to_string(),
                        vec![(n.to_string(), n.to_string())],
                    )
                })
                .collect();
        }
        for (k, (panel, caption, series)) in panels.into_iter().enumerate() {
            let id = format!(
                "plot-{}-{}-{}",
                slug(&stage.kind),
                slug(&panel),
                slug(&stage.name)
            );
            if out.iter().any(|f: &Figure| f.id == id) {
                continue; // a second metrics output with the same panel
            }
            let lines: Vec<Line> = series
                .iter()
                .enumerate()
                .map(|(j, (metric, label))| {
                    let pts = m.series(metric);
                    let c = if series.len() == 1 {
                        color(k)
                    } else {
                        color(j)
                    };
                    let mut line = Line::new(
                        label.clone(),
                        pts.iter().map(|&(s, v)| (s as f64, v)).collect(),
                        c,
                    );
                    let std = m.series(&format!("{metric}_std"));
                    if series.len() == 1 && std.len() == pts.len() {
                        line.band = Some(std.iter().map(|p| p.1).collect());
                    }
                    line
                })
                .collect();
            let noisy = lines.iter().any(|l| l.points.len() >= plots::SMOOTH_FROM);
            let caption = if noisy {
                format!("{caption} by step (faint: each step; bold: smoothed)")
            } else {
                format!("{caption} by step")
            };
            out.push(figure(
                id,
                caption,
                plots::lines(&lines, "step", (460, 270)),
            ));
        }
    }
    out
}

pub fn figure(id: String, caption: String, svg: anyhow::Result<String>) -> Figure {
    let body = match svg {
        Ok(s) => Body::Svg(s),
        Err(e) => Body::Note(format!("could not draw this chart: {e:#}")),
    };
    Figure { id, caption, body }
}

/// Metrics tables of a stage that are one set of figures (no steps, no eval table beside).
pub fn figures_table(stage: &Stage) -> Option<Table> {
    if !stage.evals.is_empty() {
        return None;
    }
    let rows: Vec<Vec<String>> = stage
        .metrics
        .iter()
        .filter(|(_, m)| !m.is_curve())
        .flat_map(|(_, m)| {
            m.rows
                .iter()
                .map(|(_, name, v)| vec![name.clone(), number(*v)])
        })
        .collect();
    (!rows.is_empty()).then(|| Table {
        header: vec!["metric".into(), "value".into()],
        rows,
    })
}

/// What a curve did, for the Markdown report: first, last, lowest and highest value.
pub fn curve_summary(stage: &Stage) -> Option<Table> {
    let mut rows = Vec::new();
    for (_, m) in stage.metrics.iter().filter(|(_, m)| m.is_curve()) {
        for (metric, _) in PANELS.iter().flat_map(|p| (p.2)(m)) {
            let s: Vec<f64> = m.series(&metric).into_iter().map(|p| p.1).collect();
            let (Some(first), Some(last)) = (s.first(), s.last()) else {
                continue;
            };
            let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            rows.push(vec![
                metric,
                s.len().to_string(),
                number(*first),
                number(*last),
                number(lo),
                number(hi),
            ]);
        }
    }
    (!rows.is_empty()).then(|| Table {
        header: ["metric", "rows", "first", "last", "min", "max"]
            .map(String::from)
            .to_vec(),
        rows,
    })
}

/// Counts as integers; shares and means with three decimals, larger values with one.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.fract() == 0.0 && (2.0..1e15).contains(&v.abs()) {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// An evaluation: the models' table and its charts.
pub struct Eval {
    pub table: Table,
    pub figures: Vec<Figure>,
    /// Best-of-N by PRM and majority vote by N, for Markdown.
    pub prm: Option<Table>,
}

/// `prm@N` / `maj@N` → N.
fn at_n(name: &str, prefix: &str) -> Option<i64> {
    name.strip_prefix(prefix)?.strip_prefix('@')?.parse().ok()
}

pub fn eval(stage: &Stage) -> Option<Eval> {
    let (_, models) = stage.evals.first()?;
    let empty = Metrics { rows: Vec::new() };
    let m = stage.metrics.first().map_or(&empty, |(_, m)| m);
    let EvalModels { models, k } = models;
    let k = k.map_or("k".to_string(), |k| k.to_string());
    let value = |i: usize, name: &str| m.value(i as i64, name);
    let names = m.names();
    let max_n = |prefix: &str| names.iter().filter_map(|n| at_n(n, prefix)).max();
    let (prm_top, maj_top) = (max_n("prm"), max_n("maj"));
    // Per-model figures: top-level names (per-task ones hold a `/`); of the by-N series only
    // the largest N, and no `maj@N` beside `majk`, which is the same vote.
    let has_majk = names.contains(&"majk");
    let columns: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !n.contains('/') && !n.ends_with("_stderr") && *n != "problems")
        .filter(|n| match (at_n(n, "prm"), at_n(n, "maj")) {
            (Some(x), _) => Some(x) == prm_top,
            (_, Some(x)) => !has_majk && Some(x) == maj_top,
            _ => true,
        })
        .collect();
    let label = |n: &str| match n {
        "pass1" => "pass@1".to_string(),
        "passk" => format!("pass@{k}"),
        "majk" => format!("maj@{k}"),
        other => other.replace("prm@", "PRM best-of-"),
    };
    let cell = |i: usize, n: &str| match value(i, n) {
        None => "–".to_string(),
        Some(v) => match value(i, &format!("{n}_stderr")) {
            Some(se) => format!("{v:.3} ± {se:.3}"),
            None => number(v),
        },
    };
    let mut header = vec!["model".to_string(), "problems".to_string()];
    header.extend(columns.iter().map(|n| label(n)));
    let rows = models
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut row = vec![
                name.clone(),
                value(i, "problems").map_or("–".into(), number),
            ];
            row.extend(columns.iter().map(|n| cell(i, n)));
            row
        })
        .collect();
    let table = Table { header, rows };

    let mut figures = Vec::new();
    let prm_name = prm_top.map(|n| format!("prm@{n}"));
    let wanted = ["greedy", "pass1", "majk"]
        .into_iter()
        .chain(prm_name.as_deref())
        .chain(["passk"]);
    let series: Vec<(String, Vec<Bar>)> = wanted
        .filter(|n| names.contains(n))
        .map(|n| {
            let bars = (0..models.len())
                .map(|i| value(i, n).map(|v| (v, value(i, &format!("{n}_stderr")))))
                .collect();
            (label(n), bars)
        })
        .collect();
    let id = format!("plot-accuracy-{}", slug(&stage.name));
    let caption = "accuracy by model (± standard error over problems)".to_string();
    figures.push(if series.is_empty() {
        Figure {
            id,
            caption,
            body: Body::Note("no accuracy figures in this evaluation's metrics".into()),
        }
    } else {
        figure(
            id,
            caption,
            plots::grouped_bars(models, &series, (640, 340)),
        )
    });

    let mut ns: Vec<i64> = names.iter().filter_map(|n| at_n(n, "prm")).collect();
    ns.sort_unstable();
    ns.dedup();
    let id = format!("plot-prm-{}", slug(&stage.name));
    let caption =
        "best-of-N by PRM score (solid) and majority vote of N (dashed), by N".to_string();
    let mut prm = None;
    if ns.is_empty() {
        figures.push(Figure {
            id,
            caption,
            body: Body::Note("no PRM reranking in this pipeline".into()),
        });
    } else {
        // One line (and one Markdown column) per model and method that has any value.
        let mut cols: Vec<(usize, &str, String)> = Vec::new();
        let mut lines = Vec::new();
        for (i, model) in models.iter().enumerate() {
            for (prefix, dashed, what) in [("prm", false, "PRM"), ("maj", true, "maj")] {
                let pts: Vec<(f64, f64)> = ns
                    .iter()
                    .enumerate()
                    .filter_map(|(x, n)| Some((x as f64, value(i, &format!("{prefix}@{n}"))?)))
                    .collect();
                if !pts.is_empty() {
                    let mut line = Line::new(format!("{model} {what}"), pts, color(i));
                    line.dashed = dashed;
                    lines.push(line);
                    cols.push((i, prefix, format!("{model} {what}")));
                }
            }
        }
        let xs: Vec<String> = ns.iter().map(|n| format!("N = {n}")).collect();
        figures.push(figure(
            id,
            caption,
            plots::lines_over_categories(&xs, &lines, "accuracy", (640, 340)),
        ));
        let mut header = vec!["N".to_string()];
        header.extend(cols.iter().map(|c| c.2.clone()));
        let rows = ns
            .iter()
            .map(|n| {
                let mut row = vec![n.to_string()];
                row.extend(cols.iter().map(|(i, prefix, _)| {
                    value(*i, &format!("{prefix}@{n}")).map_or("–".into(), |v| format!("{v:.3}"))
                }));
                row
            })
            .collect();
        prm = Some(Table { header, rows });
    }
    Some(Eval {
        table,
        figures,
        prm,
    })
}
