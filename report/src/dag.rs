//! The pipeline's graph as a picture: stages in columns by depth (producers left of their
//! consumers), coloured by what the run did with them, drawn with plotters' primitives.
//!
//! A layered layout in the Sugiyama manner, kept small: an edge that spans several columns
//! passes through invisible waypoints, one per column, so it goes around the stages in
//! between; a few barycentre sweeps order each column to uncross edges, then each column
//! slides towards its neighbours so edges run as straight as spacing allows.

use dagrun_engine::records::Status;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::collect::Run;
use crate::plots::{INK, MUTED, bold, plot_error, svg, text};
use crate::{seconds, status_color, status_word};

const NODE_W: i32 = 150;
const NODE_H: i32 = 62;
const COLUMN_GAP: i32 = 50;
const ROW_GAP: i32 = 18;
/// The height a waypoint takes in its column.
const WAY_H: i32 = 10;
const MARGIN: i32 = 16;

#[derive(Clone, Copy, PartialEq)]
enum Slot {
    Stage(usize),
    /// The `n`th waypoint of drawn edge `e`.
    Way(usize, usize),
}

/// A drawn edge: producer, consumer, the outputs it carries.
struct Wire {
    from: usize,
    to: usize,
    label: String,
}

pub fn draw(run: &Run) -> anyhow::Result<String> {
    let n = run.stages.len();
    // Stages come in run order, so every producer's depth is known before its consumers'.
    let mut depth = vec![0usize; n];
    for c in 0..n {
        for (p, _, _) in run.edges.iter().filter(|e| e.1 == c) {
            depth[c] = depth[c].max(depth[*p] + 1);
        }
    }
    let mut wires: Vec<Wire> = Vec::new();
    for (p, c, output) in &run.edges {
        match wires.iter_mut().find(|w| w.from == *p && w.to == *c) {
            Some(w) if !w.label.split(", ").any(|l| l == output) => {
                w.label += &format!(", {output}")
            }
            Some(_) => {}
            None => wires.push(Wire {
                from: *p,
                to: *c,
                label: output.clone(),
            }),
        }
    }
    let columns = depth.iter().max().map_or(1, |d| d + 1);
    let mut layers: Vec<Vec<Slot>> = vec![Vec::new(); columns];
    for (i, d) in depth.iter().enumerate() {
        layers[*d].push(Slot::Stage(i));
    }
    for (e, w) in wires.iter().enumerate() {
        for (k, layer) in layers
            .iter_mut()
            .enumerate()
            .take(depth[w.to])
            .skip(depth[w.from] + 1)
        {
            layer.push(Slot::Way(e, k));
        }
    }
    let chain = |e: usize| -> Vec<Slot> {
        let w = &wires[e];
        let mut s = vec![Slot::Stage(w.from)];
        s.extend((depth[w.from] + 1..depth[w.to]).map(|k| Slot::Way(e, k)));
        s.push(Slot::Stage(w.to));
        s
    };
    // Neighbours of every slot in the previous and the next column.
    let links: Vec<(Slot, Slot)> = (0..wires.len())
        .flat_map(|e| {
            let c = chain(e);
            c.windows(2).map(|p| (p[0], p[1])).collect::<Vec<_>>()
        })
        .collect();
    order(&mut layers, &links);
    let ys = place(&layers, &links);
    let height_of = |s: &Slot| {
        if matches!(s, Slot::Stage(_)) {
            NODE_H
        } else {
            WAY_H
        }
    };
    let bottom = layers
        .iter()
        .enumerate()
        .flat_map(|(l, slots)| slots.iter().enumerate().map(move |(k, s)| (l, k, s)))
        .map(|(l, k, s)| ys[l][k] + height_of(s) / 2)
        .max()
        .unwrap_or(NODE_H);
    let width = MARGIN * 2 + columns as i32 * NODE_W + (columns as i32 - 1) * COLUMN_GAP;
    let height = bottom + MARGIN;
    let x_of = |l: usize| MARGIN + l as i32 * (NODE_W + COLUMN_GAP);
    let centre = |s: Slot| -> (i32, i32) {
        for (l, slots) in layers.iter().enumerate() {
            if let Some(k) = slots.iter().position(|x| *x == s) {
                return (x_of(l), ys[l][k]);
            }
        }
        (0, 0)
    };
    svg((width as u32, height as u32), |root| {
        for (e, w) in wires.iter().enumerate() {
            let stops: Vec<(i32, i32)> = chain(e).into_iter().map(centre).collect();
            let mut path = Vec::new();
            for pair in stops.windows(2) {
                // Leave each stage or waypoint from its right side, enter the next on its left
                // (a waypoint's two sides are joined by a straight stretch).
                path.extend(bezier((pair[0].0 + NODE_W, pair[0].1), pair[1]));
            }
            let end = *path.last().unwrap_or(&(0, 0));
            let grey = RGBColor(150, 150, 150);
            root.draw(&PathElement::new(path.clone(), grey.stroke_width(2)))
                .map_err(plot_error)?;
            root.draw(&Polygon::new(
                vec![
                    (end.0, end.1),
                    (end.0 - 9, end.1 - 5),
                    (end.0 - 9, end.1 + 5),
                ],
                grey.filled(),
            ))
            .map_err(plot_error)?;
            // The label sits on the first stretch, where edges from one stage fan out.
            let at = path[path.len().min(24) * 2 / 3];
            let style = text(11.0, MUTED).pos(Pos::new(HPos::Center, VPos::Bottom));
            root.draw(&Text::new(w.label.clone(), (at.0, at.1 - 3), style))
                .map_err(plot_error)?;
        }
        for (i, stage) in run.stages.iter().enumerate() {
            let (x, y) = centre(Slot::Stage(i));
            let (top, bot) = (y - NODE_H / 2, y + NODE_H / 2);
            let c = status_color(stage.status);
            root.draw(&Polygon::new(
                rounded(x, top, x + NODE_W, bot, 7),
                c.mix(0.12).filled(),
            ))
            .map_err(plot_error)?;
            let mut outline = rounded(x, top, x + NODE_W, bot, 7);
            outline.push(outline[0]);
            root.draw(&PathElement::new(outline, c.stroke_width(2)))
                .map_err(plot_error)?;
            root.draw(&Polygon::new(rounded(x, top, x + 6, bot, 3), c.filled()))
                .map_err(plot_error)?;
            let left = Pos::new(HPos::Left, VPos::Center);
            let bold = bold(14.0, INK).pos(left);
            let small = text(12.0, MUTED).pos(left);
            let fits = |s: &str, size: usize| -> String {
                let max = (NODE_W as usize - 18) / size;
                if s.chars().count() > max {
                    s.chars().take(max.saturating_sub(1)).collect::<String>() + "…"
                } else {
                    s.to_string()
                }
            };
            root.draw(&Text::new(fits(&stage.name, 8), (x + 14, y - 17), bold))
                .map_err(plot_error)?;
            root.draw(&Text::new(fits(&stage.kind, 7), (x + 14, y), small.clone()))
                .map_err(plot_error)?;
            let what = match stage.status {
                Some(s) if stage.earlier_run.is_some() => {
                    format!("{} earlier", status_word(Some(s)))
                }
                Some(s @ (Status::Ran | Status::Cached | Status::Failed)) => {
                    format!("{} · {}", status_word(Some(s)), seconds(stage.seconds))
                }
                s => status_word(s).to_string(),
            };
            let status = text(12.0, c).pos(left);
            root.draw(&Text::new(fits(&what, 7), (x + 14, y + 17), status))
                .map_err(plot_error)?;
        }
        Ok(())
    })
}

/// Orders each column by the mean position of its neighbours, sweeping right then left.
fn order(layers: &mut [Vec<Slot>], links: &[(Slot, Slot)]) {
    for sweep in 0..6 {
        let forward = sweep % 2 == 0;
        let ls: Vec<usize> = if forward {
            (1..layers.len()).collect()
        } else {
            (0..layers.len().saturating_sub(1)).rev().collect()
        };
        for l in ls {
            let fixed = if forward {
                &layers[l - 1]
            } else {
                &layers[l + 1]
            };
            let pos = |s: &Slot| fixed.iter().position(|x| x == s);
            let mut keyed: Vec<(f64, usize, Slot)> = layers[l]
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let near: Vec<usize> = links
                        .iter()
                        .filter_map(|(a, b)| {
                            if forward {
                                (b == s).then(|| pos(a))?
                            } else {
                                (a == s).then(|| pos(b))?
                            }
                        })
                        .collect();
                    let key = if near.is_empty() {
                        k as f64
                    } else {
                        near.iter().sum::<usize>() as f64 / near.len() as f64
                    };
                    (key, k, *s)
                })
                .collect();
            keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            layers[l] = keyed.into_iter().map(|k| k.2).collect();
        }
    }
}

/// Centre heights of every slot: stacked in order, then each column slid (as a whole, its
/// spacing kept) towards the mean height of its slots' neighbours, a few times over.
fn place(layers: &[Vec<Slot>], links: &[(Slot, Slot)]) -> Vec<Vec<i32>> {
    let h = |s: &Slot| {
        if matches!(s, Slot::Stage(_)) {
            NODE_H
        } else {
            WAY_H
        }
    };
    let mut ys: Vec<Vec<i32>> = layers
        .iter()
        .map(|slots| {
            let mut y = MARGIN;
            slots
                .iter()
                .map(|s| {
                    let c = y + h(s) / 2;
                    y += h(s) + ROW_GAP;
                    c
                })
                .collect()
        })
        .collect();
    let find = |ys: &[Vec<i32>], s: &Slot| -> Option<i32> {
        layers
            .iter()
            .enumerate()
            .find_map(|(l, slots)| slots.iter().position(|x| x == s).map(|k| ys[l][k]))
    };
    for _ in 0..8 {
        for l in 0..layers.len() {
            let mut pulls = Vec::new();
            for (k, s) in layers[l].iter().enumerate() {
                for (a, b) in links {
                    let other = if a == s {
                        b
                    } else if b == s {
                        a
                    } else {
                        continue;
                    };
                    if let Some(y) = find(&ys, other) {
                        pulls.push(y - ys[l][k]);
                    }
                }
            }
            if !pulls.is_empty() {
                let shift = pulls.iter().sum::<i32>() / pulls.len() as i32;
                ys[l].iter_mut().for_each(|y| *y += shift);
            }
        }
    }
    // Back inside the picture.
    let top = layers
        .iter()
        .zip(&ys)
        .flat_map(|(slots, y)| slots.iter().zip(y).map(|(s, y)| y - h(s) / 2))
        .min()
        .unwrap_or(MARGIN);
    ys.iter_mut().flatten().for_each(|y| *y += MARGIN - top);
    ys
}

/// A cubic curve from `a` to `b`, leaving and arriving horizontally.
fn bezier(a: (i32, i32), b: (i32, i32)) -> Vec<(i32, i32)> {
    let (ax, ay, bx, by) = (a.0 as f64, a.1 as f64, b.0 as f64, b.1 as f64);
    let dx = (bx - ax) / 2.0;
    (0..=24)
        .map(|i| {
            let t = i as f64 / 24.0;
            let u = 1.0 - t;
            let x = u * u * u * ax
                + 3.0 * u * u * t * (ax + dx)
                + 3.0 * u * t * t * (bx - dx)
                + t * t * t * bx;
            let y = u * u * u * ay + 3.0 * u * u * t * ay + 3.0 * u * t * t * by + t * t * t * by;
            (x.round() as i32, y.round() as i32)
        })
        .collect()
}

/// The outline of a rectangle with rounded corners, as a polygon.
fn rounded(x0: i32, y0: i32, x1: i32, y1: i32, r: i32) -> Vec<(i32, i32)> {
    let r = r.min((x1 - x0) / 2).min((y1 - y0) / 2) as f64;
    let corners = [
        (x1 as f64 - r, y0 as f64 + r, -90.0),
        (x1 as f64 - r, y1 as f64 - r, 0.0),
        (x0 as f64 + r, y1 as f64 - r, 90.0),
        (x0 as f64 + r, y0 as f64 + r, 180.0),
    ];
    corners
        .iter()
        .flat_map(|&(cx, cy, start): &(f64, f64, f64)| {
            (0..=4).map(move |i| {
                let a = (start + 22.5 * i as f64).to_radians();
                (
                    (cx + r * a.cos()).round() as i32,
                    (cy + r * a.sin()).round() as i32,
                )
            })
        })
        .collect()
}
