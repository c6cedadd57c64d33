//! Where each key and value of a YAML document sits, so that problems found after parsing
//! (an unknown param, a wrong wire, a cycle) can still point at `file:line:col`.
//!
//! serde_yaml parses the document and reports syntax errors; this index comes from a second,
//! event-level pass (yaml-rust2), since serde_yaml exposes no positions for parsed values.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use crate::diag::Pos;

/// Positions by path from the document root: `["stages", "rl", "params", "lr"]`; sequence
/// items are numbered from `"0"`.
#[derive(Debug, Default, Clone)]
pub struct Locator {
    keys: HashMap<Vec<String>, Pos>,
    values: HashMap<Vec<String>, Pos>,
}

impl Locator {
    /// Indexes `text`; a document the event parser cannot read yields an empty index (every
    /// lookup then falls back to the start of the file).
    pub fn new(text: &str) -> Locator {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut builder, false);
        builder.locator
    }

    /// Whether the document has a key at `path`.
    pub fn has(&self, path: &[String]) -> bool {
        self.keys.contains_key(path)
    }

    /// The position of the key at `path`, else of the nearest enclosing key.
    pub fn key(&self, path: &[String]) -> Pos {
        self.nearest(path, true)
    }

    /// The position of the value at `path`, else of its key, else of the nearest enclosing one.
    pub fn value(&self, path: &[String]) -> Pos {
        self.nearest(path, false)
    }

    fn nearest(&self, path: &[String], prefer_key: bool) -> Pos {
        let mut p = path.to_vec();
        loop {
            let (first, second) = if prefer_key {
                (&self.keys, &self.values)
            } else {
                (&self.values, &self.keys)
            };
            if let Some(pos) = first.get(&p).or_else(|| second.get(&p)) {
                return *pos;
            }
            if p.pop().is_none() {
                return Pos::START;
            }
        }
    }
}

enum Frame {
    Map {
        next_is_key: bool,
        key: Option<String>,
    },
    Seq {
        index: usize,
    },
}

#[derive(Default)]
struct Builder {
    locator: Locator,
    stack: Vec<Frame>,
    path: Vec<String>,
}

impl Builder {
    /// Called at the start of every node. Returns true if the node is a mapping key.
    fn begin_node(&mut self, pos: Pos, scalar: Option<&str>) -> bool {
        match self.stack.last_mut() {
            Some(Frame::Map { next_is_key, key }) if *next_is_key => {
                let name = scalar.unwrap_or("").to_string();
                *key = Some(name.clone());
                *next_is_key = false;
                let mut p = self.path.clone();
                p.push(name);
                self.locator.keys.insert(p, pos);
                true
            }
            Some(Frame::Map { next_is_key, key }) => {
                *next_is_key = true;
                self.path.push(key.clone().unwrap_or_default());
                self.locator.values.insert(self.path.clone(), pos);
                false
            }
            Some(Frame::Seq { index }) => {
                self.path.push(index.to_string());
                *index += 1;
                self.locator.values.insert(self.path.clone(), pos);
                false
            }
            None => {
                self.locator.values.insert(Vec::new(), pos);
                false
            }
        }
    }

    /// Called when a value node (scalar or finished container) ends.
    fn end_value(&mut self) {
        if !self.stack.is_empty() {
            self.path.pop();
        }
    }
}

impl MarkedEventReceiver for Builder {
    // Each arm calls `begin_node` for its side effect; folding the calls into match guards
    // would hide that.
    #[allow(clippy::collapsible_match)]
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos {
            line: mark.line(),
            col: mark.col() + COL_BASE,
        };
        match ev {
            Event::Scalar(value, ..) => {
                if !self.begin_node(pos, Some(&value)) {
                    self.end_value();
                }
            }
            Event::Alias(_) => {
                if !self.begin_node(pos, None) {
                    self.end_value();
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A container used as a mapping key has no name we could index; it is rare
                // enough that its contents are simply indexed under an empty key.
                if self.begin_node(pos, None) {
                    self.path.push(String::new());
                }
                let frame = if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map {
                        next_is_key: true,
                        key: None,
                    }
                } else {
                    Frame::Seq { index: 0 }
                };
                self.stack.push(frame);
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.end_value();
            }
            _ => {}
        }
    }
}

/// yaml-rust2 0.10 reports 0-based columns (despite its doc comment); we print 1-based ones.
const COL_BASE: usize = 1;

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_keys_and_values_in_block_and_flow_style() {
        let text = "stages:\n  gen:\n    kind: cot_generate\n    params: { n_train: 10, families: [a, b] }\n";
        let loc = Locator::new(text);
        assert_eq!(loc.key(&path(&["stages", "gen"])), Pos { line: 2, col: 3 });
        assert_eq!(
            loc.value(&path(&["stages", "gen", "kind"])),
            Pos { line: 3, col: 11 }
        );
        assert_eq!(
            loc.key(&path(&["stages", "gen", "params", "n_train"])),
            Pos { line: 4, col: 15 }
        );
        assert_eq!(
            loc.value(&path(&["stages", "gen", "params", "families", "1"])),
            Pos { line: 4, col: 42 }
        );
        // Unknown paths fall back to the nearest known ancestor.
        assert_eq!(
            loc.key(&path(&["stages", "gen", "params", "nope"])),
            Pos { line: 4, col: 5 }
        );
    }
}
