//! `report.html`: one file that opens anywhere without a network. Styles are inline, charts
//! are inline SVG, there is no script, and nothing is linked or fetched.

use std::fmt::Write as _;

use dagrun_engine::records::Status;

use crate::collect::Stage;
use crate::figures::{Body, Figure, Table};
use crate::{Report, seconds, status_color, status_word};

const STYLE: &str = r#"
:root { --ink: #2f3437; --muted: #6b7075; --line: #e3e6ea; --bg: #f4f6f8; --card: #fff; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 32px 56px; }
h1 { font-size: 26px; margin: 0 0 2px; letter-spacing: -0.01em; }
h2 { font-size: 18px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 10px; }
.kind { color: var(--muted); font-weight: 400; font-size: 13px; margin-left: 6px; }
.sub { color: var(--muted); margin: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0 0; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 10px 18px; min-width: 112px; }
.card b { display: block; font-size: 24px; line-height: 1.2; }
.card span { color: var(--muted); font-size: 12.5px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px 8px; min-width: 0; }
figure svg { display: block; width: 100%; height: auto; }
figure.wide svg { width: auto; max-width: 100%; margin: 0 auto; }
.kv { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); background: var(--card); border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
.kv div { display: flex; justify-content: space-between; gap: 10px; padding: 6px 12px; border-bottom: 1px solid var(--line); font-size: 13px; }
.kv span { color: var(--muted); overflow-wrap: anywhere; }
.kv b { font-weight: 600; font-variant-numeric: tabular-nums; }
figcaption { color: var(--muted); font-size: 12.5px; margin: 0 0 6px; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; }
.pair { display: grid; grid-template-columns: minmax(0, 1.15fr) minmax(0, 1fr); gap: 14px; align-items: start; }
.pair.even { grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); }
@media (max-width: 1000px) { .pair, .pair.even { grid-template-columns: 1fr; } }
.table { background: var(--card); border: 1px solid var(--line); border-radius: 10px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 7px 12px; text-align: left; border-bottom: 1px solid var(--line); vertical-align: top; }
tr:last-child td { border-bottom: 0; }
th { background: #f8f9fb; color: #555b61; font-weight: 600; font-size: 12.5px; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.inputs { color: var(--muted); font-size: 12.5px; }
td.error { color: #b3261e; font-size: 12.5px; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 999px; color: #fff; font-size: 12px; white-space: nowrap; }
.legend { display: flex; gap: 14px; flex-wrap: wrap; margin: 8px 2px 0; color: var(--muted); font-size: 12.5px; }
.note { color: var(--muted); font-style: italic; text-align: center; padding: 48px 16px; margin: 0; }
details { margin-top: 12px; }
summary { cursor: pointer; color: var(--muted); }
pre { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; overflow: auto; font-size: 12px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"#;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn css_color(s: Option<Status>) -> String {
    let c = status_color(s);
    format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
}

fn pill(s: Option<Status>) -> String {
    format!(
        r#"<span class="pill" style="background:{}">{}</span>"#,
        css_color(s),
        status_word(s)
    )
}

fn figure(out: &mut String, f: &Figure, class: &str) {
    let (class, inner) = match &f.body {
        Body::Svg(svg) => (format!("plot {class}"), svg.clone()),
        Body::Note(note) => (
            format!("plot empty {class}"),
            format!(r#"<p class="note">{}</p>"#, escape(note)),
        ),
    };
    let _ = write!(
        out,
        r#"<figure id="{}" class="{}"><figcaption>{}</figcaption>{inner}</figure>"#,
        escape(&f.id),
        class.trim(),
        escape(&f.caption)
    );
}

/// A stage's name and, quieter, its kind.
fn heading(out: &mut String, s: &Stage) {
    let _ = write!(
        out,
        r#"<h3>{}<span class="kind">{}</span></h3>"#,
        escape(&s.name),
        escape(&s.kind)
    );
}

/// A cell is numeric when it starts like a number (`0.700 ± 0.021`, `12`, `–`).
fn is_num(cell: &str) -> bool {
    cell.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '–')
}

fn table(out: &mut String, t: &Table) {
    out.push_str(r#"<div class="table"><table><thead><tr>"#);
    for (j, h) in t.header.iter().enumerate() {
        let num = j > 0 && t.rows.iter().all(|r| r.get(j).is_some_and(|c| is_num(c)));
        let class = if num { r#" class="num""# } else { "" };
        let _ = write!(out, "<th{class}>{}</th>", escape(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in &t.rows {
        out.push_str("<tr>");
        for (j, cell) in row.iter().enumerate() {
            let class = if j > 0 && is_num(cell) {
                r#" class="num""#
            } else {
                ""
            };
            let _ = write!(out, "<td{class}>{}</td>", escape(cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
}

pub fn render(r: &Report) -> String {
    let run = &r.run;
    let mut out = String::with_capacity(256 * 1024);
    let _ = write!(
        out,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{} · dagrun report</title><style>{STYLE}</style></head><body><main>"#,
        escape(&run.pipeline)
    );
    let _ = write!(
        out,
        r#"<header><h1>{}</h1><p class="sub">run {} · started {} · {} wall time</p><div class="cards">"#,
        escape(&run.pipeline),
        escape(&run.run),
        started(run.started_unix),
        seconds(run.seconds)
    );
    let cards = [
        (run.stages.len(), "stages", true),
        (r.count(Status::Ran), "ran", true),
        (r.count(Status::Cached), "cached", true),
        (r.count(Status::Skipped), "skipped", false),
        (r.count(Status::Failed), "failed", false),
        (r.count(Status::NotRun), "not run", false),
    ];
    for (n, what, always) in cards {
        if always || n > 0 {
            let _ = write!(
                out,
                r#"<div class="card"><b>{n}</b><span>{what}</span></div>"#
            );
        }
    }
    out.push_str("</div></header>");

    out.push_str(r#"<section id="pipeline"><h2>Pipeline</h2>"#);
    figure(&mut out, &r.dag, "wide");
    out.push_str(r#"<div class="legend">"#);
    for s in [
        Status::Ran,
        Status::Cached,
        Status::Skipped,
        Status::Failed,
        Status::NotRun,
    ] {
        out.push_str(&pill(Some(s)));
    }
    out.push_str("</div></section>");

    out.push_str(r#"<section id="stages"><h2>Stages</h2><div class="pair"><div class="table"><table><thead><tr><th>stage</th><th>kind</th><th>status</th><th class="num">time</th><th>inputs</th></tr></thead><tbody>"#);
    for s in &run.stages {
        let time = match &s.earlier_run {
            Some(earlier) => format!("run {}", escape(earlier)),
            None if s.status.is_some() => {
                seconds(s.seconds) + if s.resumed { ", resumed" } else { "" }
            }
            None => String::new(),
        };
        let _ = write!(
            out,
            r#"<tr><td><b>{}</b></td><td>{}</td><td>{}</td><td class="num">{time}</td><td class="inputs">{}</td></tr>"#,
            escape(&s.name),
            escape(&s.kind),
            pill(s.status),
            s.inputs
                .iter()
                .map(|i| escape(i))
                .collect::<Vec<_>>()
                .join("<br>")
        );
        let problems = s.error.iter().chain(&s.notes);
        for p in problems {
            let _ = write!(
                out,
                r#"<tr><td></td><td colspan="4" class="error">{}</td></tr>"#,
                escape(p)
            );
        }
    }
    out.push_str("</tbody></table></div>");
    figure(&mut out, &r.times, "");
    out.push_str("</div></section>");

    for (i, e) in &r.evals {
        let s = &run.stages[*i];
        let _ = write!(
            out,
            r#"<section id="eval-{}"><h2>Evaluation <span class="kind">{} · {}</span></h2>"#,
            escape(&crate::figures::slug(&s.name)),
            escape(&s.name),
            escape(&s.kind)
        );
        table(&mut out, &e.table);
        out.push_str(r#"<div class="pair even" style="margin-top:14px">"#);
        for f in &e.figures {
            figure(&mut out, f, "");
        }
        out.push_str("</div>");
        if let Some(text) = &s.report {
            let _ = write!(
                out,
                "<details><summary>{}'s own report (per task and difficulty)</summary><pre>{}</pre></details>",
                escape(&s.name),
                escape(text)
            );
        }
        out.push_str("</section>");
    }

    if !r.curves.is_empty() {
        out.push_str(r#"<section id="training"><h2>Training curves</h2>"#);
        for (i, figs) in &r.curves {
            let s = &run.stages[*i];
            heading(&mut out, s);
            out.push_str(r#"<div class="grid">"#);
            for f in figs {
                figure(&mut out, f, "");
            }
            out.push_str("</div>");
        }
        out.push_str("</section>");
    }

    if !r.tables.is_empty() {
        out.push_str(r#"<section id="figures"><h2>Other figures</h2>"#);
        for (i, t) in &r.tables {
            let s = &run.stages[*i];
            heading(&mut out, s);
            out.push_str(r#"<div class="kv">"#);
            // Name and value pairs flow in columns: a stage's figures are many and short.
            for row in &t.rows {
                if let [name, value] = row.as_slice() {
                    let _ = write!(
                        out,
                        "<div><span>{}</span><b>{}</b></div>",
                        escape(name),
                        escape(value)
                    );
                }
            }
            out.push_str("</div>");
        }
        out.push_str("</section>");
    }

    out.push_str("<footer>Written by <code>dagrun report</code> from the run record and the cached outputs it names. Self-contained: no scripts, nothing fetched.</footer></main></body></html>\n");
    out
}

/// `2026-11-22 04:15:12 UTC`.
pub fn started(unix: u64) -> String {
    let s = dagrun_engine::records::utc_stamp(unix);
    if s.len() != 15 {
        return s;
    }
    format!(
        "{}-{}-{} {}:{}:{} UTC",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}
