//! The charts, drawn with plotters' SVG backend into strings that the HTML inlines.
//!
//! Every chart takes plain numbers and labels; which metrics they show is decided in
//! `lib.rs`. Non-finite values are dropped before drawing (plotters asserts on NaN ranges).

use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub const FONT: &str = "sans-serif";
pub const INK: RGBColor = RGBColor(51, 51, 51);
pub const MUTED: RGBColor = RGBColor(110, 110, 110);
const GRID: RGBColor = RGBColor(236, 236, 236);
const AXIS: RGBColor = RGBColor(190, 190, 190);

/// Tableau 10: distinct, and readable on white.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(89, 161, 79),
    RGBColor(225, 87, 89),
    RGBColor(176, 122, 161),
    RGBColor(118, 183, 178),
    RGBColor(237, 201, 72),
    RGBColor(156, 117, 95),
    RGBColor(255, 157, 167),
    RGBColor(186, 176, 172),
];

pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Renders `draw` into an SVG string of `size` pixels, ready to inline in HTML: the namespace
/// attribute is dropped (HTML's parser supplies it, and the file should name no URL).
pub fn svg(
    size: (u32, u32),
    draw: impl FnOnce(&Area) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    Ok(buf.replace(r#" xmlns="http://www.w3.org/2000/svg""#, ""))
}

/// plotters' errors borrow nothing but are not `Sync`; keep their message.
pub fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

/// Axis numbers: short, without trailing zeros.
pub fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// A range around `values` with some air, never empty.
fn span(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let width = hi - lo;
    if width <= f64::EPSILON * hi.abs().max(1.0) {
        let d = (hi.abs() * 0.1).max(1e-3);
        return (lo - d, hi + d);
    }
    (lo - width * pad, hi + width * pad)
}

/// Text `px` CSS pixels high (plotters writes `font-size` as the size it is given / 1.24).
pub fn text(px: f64, color: RGBColor) -> TextStyle<'static> {
    (FONT, px * 1.24).into_font().color(&color)
}

pub fn bold(px: f64, color: RGBColor) -> TextStyle<'static> {
    (FONT, px * 1.24, FontStyle::Bold).into_font().color(&color)
}

pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Half-widths (a standard deviation) to shade around the line, by point.
    pub band: Option<Vec<f64>>,
    pub dashed: bool,
}

impl Line {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Line {
        Line {
            label: label.into(),
            points,
            color,
            band: None,
            dashed: false,
        }
    }
}

/// Exponential moving average with TensorBoard's bias correction, for noisy RL curves.
fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let (mut acc, mut norm) = (0.0, 0.0);
    points
        .iter()
        .map(|&(x, y)| {
            acc = acc * weight + (1.0 - weight) * y;
            norm = norm * weight + (1.0 - weight);
            (x, acc / norm)
        })
        .collect()
}

/// Points past which a curve is drawn faint with a smoothed line over it.
pub const SMOOTH_FROM: usize = 40;

/// Line chart of `lines` over steps (one panel of a training stage).
pub fn lines(lines: &[Line], x_desc: &str, size: (u32, u32)) -> anyhow::Result<String> {
    let lines: Vec<Line> = lines
        .iter()
        .map(|l| {
            let keep: Vec<usize> = (0..l.points.len())
                .filter(|&i| l.points[i].0.is_finite() && l.points[i].1.is_finite())
                .collect();
            Line {
                label: l.label.clone(),
                points: keep.iter().map(|&i| l.points[i]).collect(),
                color: l.color,
                band: l.band.as_ref().map(|b| {
                    keep.iter()
                        .map(|&i| b.get(i).copied().unwrap_or(0.0))
                        .collect()
                }),
                dashed: l.dashed,
            }
        })
        .collect();
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x0, x1) = span(xs, 0.0);
    let ys = lines.iter().flat_map(|l| {
        let band = l.band.clone().unwrap_or_default();
        l.points.iter().enumerate().flat_map(move |(i, p)| {
            let d = band
                .get(i)
                .copied()
                .filter(|d| d.is_finite())
                .unwrap_or(0.0);
            [p.1 - d, p.1 + d]
        })
    });
    let (y0, mut y1) = span(ys, 0.06);
    if lines.len() > 1 {
        // Headroom for the legend, so that it covers no line.
        y1 += (y1 - y0) * (0.13 * lines.len() as f64).min(0.8);
    }
    svg(size, |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .margin_right(18)
            .x_label_area_size(34)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_error)?;
        axes(&mut chart.configure_mesh())
            .x_desc(x_desc)
            .x_labels(6)
            .y_labels(5)
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(plot_error)?;
        for l in &lines {
            if let Some(band) = &l.band {
                let upper = l.points.iter().zip(band).map(|(p, d)| (p.0, p.1 + d));
                let lower = l.points.iter().zip(band).rev().map(|(p, d)| (p.0, p.1 - d));
                let outline: Vec<(f64, f64)> = upper.chain(lower).collect();
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        outline,
                        l.color.mix(0.15).filled(),
                    )))
                    .map_err(plot_error)?;
            }
            let noisy = l.points.len() >= SMOOTH_FROM;
            let main = if noisy {
                chart
                    .draw_series(LineSeries::new(
                        l.points.clone(),
                        l.color.mix(0.3).stroke_width(1),
                    ))
                    .map_err(plot_error)?;
                smooth(&l.points, 0.8)
            } else {
                l.points.clone()
            };
            let style = l.color.stroke_width(2);
            let drawn = if l.dashed {
                chart.draw_series(DashedLineSeries::new(main, 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(main, style))
            }
            .map_err(plot_error)?;
            if lines.len() > 1 {
                let c = l.color;
                drawn.label(l.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            }
            if l.points.len() == 1 {
                chart
                    .draw_series(
                        l.points
                            .iter()
                            .map(|&p| Circle::new(p, 3, l.color.filled())),
                    )
                    .map_err(plot_error)?;
            }
        }
        if lines.len() > 1 {
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    })
}

/// The look all axes share: grey labels, a light grid at the labelled values, nothing finer.
fn axes<'m, 'a, 'b, DB: DrawingBackend>(
    mesh: &'m mut MeshStyle<'a, 'b, RangedCoordf64, RangedCoordf64, DB>,
) -> &'m mut MeshStyle<'a, 'b, RangedCoordf64, RangedCoordf64, DB> {
    mesh.label_style(text(12.0, MUTED))
        .axis_desc_style(text(12.0, MUTED))
        .axis_style(AXIS)
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
}

/// Room right of a plot for a legend that must not cover bars or points.
const LEGEND_W: u32 = 150;

/// How a legend entry shows its series.
#[derive(Clone, Copy)]
enum Mark {
    Block,
    Line,
    Dashed,
}

/// A legend in the room right of the plot (see [`LEGEND_W`]), drawn on the whole picture:
/// plotters' own legend clips its markers to the plotting area.
fn legend_outside(
    root: &Area,
    width: u32,
    entries: &[(String, RGBColor, Mark)],
) -> anyhow::Result<()> {
    let x = width as i32 - LEGEND_W as i32 + 14;
    let style = text(12.0, INK).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (label, c, mark)) in entries.iter().enumerate() {
        let y = 22 + 20 * i as i32;
        match mark {
            Mark::Block => root.draw(&Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled())),
            Mark::Line => root.draw(&PathElement::new(
                vec![(x - 2, y), (x + 14, y)],
                c.stroke_width(2),
            )),
            Mark::Dashed => root
                .draw(&PathElement::new(
                    vec![(x - 2, y), (x + 4, y)],
                    c.stroke_width(2),
                ))
                .and_then(|_| {
                    root.draw(&PathElement::new(
                        vec![(x + 8, y), (x + 14, y)],
                        c.stroke_width(2),
                    ))
                }),
        }
        .map_err(plot_error)?;
        root.draw(&Text::new(label.clone(), (x + 20, y), style.clone()))
            .map_err(plot_error)?;
    }
    Ok(())
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(GRID)
        .label_font(text(12.0, INK))
        .draw()
        .map_err(plot_error)
}

/// Category labels under an x axis whose categories sit at 0.5, 1.5, … (drawn as text
/// elements, since numeric axes put their ticks at round numbers).
fn category_labels(chart: &mut Chart, labels: &[(f64, String)], y: f64) -> anyhow::Result<()> {
    let style = text(13.0, INK).pos(Pos::new(HPos::Center, VPos::Top));
    chart
        .draw_series(labels.iter().map(|(x, name)| {
            EmptyElement::at((*x, y)) + Text::new(name.clone(), (0, 8), style.clone())
        }))
        .map_err(plot_error)?;
    Ok(())
}

/// One bar of a grouped chart: its value and standard error, if known.
pub type Bar = Option<(f64, Option<f64>)>;

/// Bars grouped by category (models), one colour per series (metrics), with error bars and
/// values written above them.
pub fn grouped_bars(
    categories: &[String],
    series: &[(String, Vec<Bar>)],
    size: (u32, u32),
) -> anyhow::Result<String> {
    let top = series
        .iter()
        .flat_map(|(_, bars)| bars.iter().flatten())
        .map(|(v, se)| v + se.unwrap_or(0.0))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    // Shares read best on 0–1; anything else gets headroom for its value labels.
    let y1 = if top <= 1.0 { 1.0 } else { top * 1.15 };
    let n = categories.len().max(1) as f64;
    let per = series.len().max(1) as f64;
    svg(size, |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .margin_right(LEGEND_W)
            .margin_top(16)
            .x_label_area_size(30)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..n, 0.0..y1)
            .map_err(plot_error)?;
        axes(&mut chart.configure_mesh())
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(6)
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(plot_error)?;
        let width = 0.8 / per;
        for (j, (_, bars)) in series.iter().enumerate() {
            let c = color(j);
            let x_of = |m: usize| m as f64 + 0.1 + width * j as f64;
            let present: Vec<(usize, f64, Option<f64>)> = bars
                .iter()
                .enumerate()
                .filter_map(|(m, b)| b.filter(|(v, _)| v.is_finite()).map(|(v, se)| (m, v, se)))
                .collect();
            chart
                .draw_series(present.iter().map(|&(m, v, _)| {
                    Rectangle::new(
                        [(x_of(m) + width * 0.06, 0.0), (x_of(m) + width * 0.94, v)],
                        c.filled(),
                    )
                }))
                .map_err(plot_error)?;
            chart
                .draw_series(present.iter().filter_map(|&(m, v, se)| {
                    let se = se.filter(|s| s.is_finite() && *s > 0.0)?;
                    let x = x_of(m) + width / 2.0;
                    Some(ErrorBar::new_vertical(
                        x,
                        (v - se).max(0.0),
                        v,
                        v + se,
                        INK.stroke_width(1),
                        6,
                    ))
                }))
                .map_err(plot_error)?;
            let label = text(11.0, INK).pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(present.iter().filter(|p| p.1 > 0.0).map(|&(m, v, se)| {
                    let y = v + se.filter(|s| s.is_finite()).unwrap_or(0.0);
                    EmptyElement::at((x_of(m) + width / 2.0, y))
                        + Text::new(format!("{v:.2}"), (0, -3), label.clone())
                }))
                .map_err(plot_error)?;
        }
        let labels: Vec<(f64, String)> = categories
            .iter()
            .enumerate()
            .map(|(m, c)| (m as f64 + 0.5, c.clone()))
            .collect();
        category_labels(&mut chart, &labels, 0.0)?;
        let entries: Vec<(String, RGBColor, Mark)> = series
            .iter()
            .enumerate()
            .map(|(j, (name, _))| (name.clone(), color(j), Mark::Block))
            .collect();
        legend_outside(root, size.0, &entries)
    })
}

/// Lines over a few categorical x positions (N of best-of-N), each labelled under the axis.
pub fn lines_over_categories(
    xs: &[String],
    lines: &[Line],
    y_desc: &str,
    size: (u32, u32),
) -> anyhow::Result<String> {
    let n = xs.len().max(1) as f64;
    let (y0, y1) = span(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)), 0.1);
    let (y0, y1) = (
        y0.max(0.0),
        if y1 > 1.0 && y0 < 1.0 {
            y1
        } else {
            y1.min(1.0)
        },
    );
    svg(size, |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .margin_right(LEGEND_W)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..n, y0..y1)
            .map_err(plot_error)?;
        axes(&mut chart.configure_mesh())
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(6)
            .y_desc(y_desc)
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(plot_error)?;
        for l in lines {
            let pts: Vec<(f64, f64)> = l
                .points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(i, y)| (i + 0.5, y))
                .collect();
            let style = l.color.stroke_width(2);
            let c = l.color;
            let dashed = l.dashed;
            if dashed {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style))
            }
            .map_err(plot_error)?;
            let marker = if dashed {
                c.stroke_width(2)
            } else {
                c.filled()
            };
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, marker)))
                .map_err(plot_error)?;
        }
        let labels: Vec<(f64, String)> = xs
            .iter()
            .enumerate()
            .map(|(i, x)| (i as f64 + 0.5, x.clone()))
            .collect();
        category_labels(&mut chart, &labels, y0)?;
        let entries: Vec<(String, RGBColor, Mark)> = lines
            .iter()
            .map(|l| {
                (
                    l.label.clone(),
                    l.color,
                    if l.dashed { Mark::Dashed } else { Mark::Line },
                )
            })
            .collect();
        legend_outside(root, size.0, &entries)
    })
}

/// Horizontal bars, one per row, top to bottom: a label left of the axis, a colour and a
/// value written at the bar's end.
pub fn horizontal_bars(
    rows: &[(String, f64, RGBColor, String)],
    x_desc: &str,
    width: u32,
) -> anyhow::Result<String> {
    let n = rows.len().max(1);
    let label_width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(4) as u32 * 7 + 16;
    let x1 = rows
        .iter()
        .map(|r| r.1)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-3)
        * 1.18;
    let height = 26 * n as u32 + 56;
    svg((width, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(34)
            .y_label_area_size(label_width.min(width / 3))
            .build_cartesian_2d(0.0..x1, 0.0..n as f64)
            .map_err(plot_error)?;
        axes(&mut chart.configure_mesh())
            .disable_y_mesh()
            .y_labels(0)
            .x_labels(6)
            .x_desc(x_desc)
            .x_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(plot_error)?;
        let y_of = |i: usize| (n - 1 - i) as f64;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let v = if r.1.is_finite() { r.1 } else { 0.0 };
                Rectangle::new([(0.0, y_of(i) + 0.18), (v, y_of(i) + 0.82)], r.2.filled())
            }))
            .map_err(plot_error)?;
        let value = text(12.0, INK).pos(Pos::new(HPos::Left, VPos::Center));
        let name = text(13.0, INK).pos(Pos::new(HPos::Right, VPos::Center));
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let v = if r.1.is_finite() { r.1 } else { 0.0 };
                EmptyElement::at((v, y_of(i) + 0.5)) + Text::new(r.3.clone(), (5, 0), value.clone())
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                EmptyElement::at((0.0, y_of(i) + 0.5))
                    + Text::new(r.0.clone(), (-8, 0), name.clone())
            }))
            .map_err(plot_error)?;
        Ok(())
    })
}
