//! `report.md`: the same report as text, for terminals, diffs and issue comments. Charts
//! become the numbers behind them (a curve's first, last, lowest and highest value).

use std::fmt::Write as _;

use crate::figures::{Body, Table};
use crate::html::started;
use crate::{Report, seconds, status_word};

/// Pipes and line breaks would end a cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn table(out: &mut String, t: &Table) {
    let _ = writeln!(
        out,
        "| {} |",
        t.header
            .iter()
            .map(|h| cell(h))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let rule: Vec<&str> = (0..t.header.len())
        .map(|j| if j == 0 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", rule.join("|"));
    for row in &t.rows {
        let _ = writeln!(
            out,
            "| {} |",
            row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    out.push('\n');
}

pub fn render(r: &Report) -> String {
    let run = &r.run;
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", run.pipeline);
    let _ = writeln!(
        out,
        "Run {}, started {}, {} wall time. The charts are in `report.html` beside this file.\n",
        run.run,
        started(run.started_unix),
        seconds(run.seconds)
    );

    let _ = writeln!(out, "## Stages\n");
    let rows = run
        .stages
        .iter()
        .map(|s| {
            let time = match &s.earlier_run {
                Some(earlier) => format!("run {earlier}"),
                None if s.status.is_some() => {
                    seconds(s.seconds) + if s.resumed { ", resumed" } else { "" }
                }
                None => String::new(),
            };
            let mut notes: Vec<String> = s.error.iter().chain(&s.notes).cloned().collect();
            notes.insert(0, s.inputs.join(", "));
            vec![
                s.name.clone(),
                s.kind.clone(),
                status_word(s.status).to_string(),
                time,
                notes.join("; "),
            ]
        })
        .collect();
    table(
        &mut out,
        &Table {
            header: ["stage", "kind", "status", "time", "inputs"]
                .map(String::from)
                .to_vec(),
            rows,
        },
    );

    for (i, e) in &r.evals {
        let s = &run.stages[*i];
        let _ = writeln!(out, "## Evaluation: {}\n", s.name);
        table(&mut out, &e.table);
        match &e.prm {
            Some(t) => {
                let _ = writeln!(out, "Best-of-N by PRM score and majority vote of N:\n");
                table(&mut out, t);
            }
            None => {
                if let Some(Body::Note(n)) = e
                    .figures
                    .iter()
                    .find(|f| f.id.starts_with("plot-prm-"))
                    .map(|f| &f.body)
                {
                    let _ = writeln!(out, "_{n}._\n");
                }
            }
        }
    }

    let summaries: Vec<(usize, Table)> = r
        .curves
        .iter()
        .filter_map(|(i, _)| Some((*i, crate::figures::curve_summary(&run.stages[*i])?)))
        .collect();
    if !summaries.is_empty() {
        let _ = writeln!(out, "## Training curves\n");
        for (i, t) in &summaries {
            let s = &run.stages[*i];
            let _ = writeln!(out, "### {} ({})\n", s.name, s.kind);
            table(&mut out, t);
        }
    }

    if !r.tables.is_empty() {
        let _ = writeln!(out, "## Other figures\n");
        for (i, t) in &r.tables {
            let s = &run.stages[*i];
            let _ = writeln!(out, "### {} ({})\n", s.name, s.kind);
            table(&mut out, t);
        }
    }

    let reports: Vec<_> = run
        .stages
        .iter()
        .filter_map(|s| Some((s, s.report.as_ref()?)))
        .collect();
    if !reports.is_empty() {
        let _ = writeln!(out, "## Stage reports\n");
        for (s, text) in reports {
            let _ = writeln!(out, "### {} ({})\n\n{}\n", s.name, s.kind, text.trim_end());
        }
    }
    out
}
