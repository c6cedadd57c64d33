//! One-line diagnostics that point into the pipeline file: `file:line:col: message`.

use std::fmt;

/// A problem with user input, located where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// `file:line:col`, or the flag or field the problem came from.
    pub at: String,
    pub message: String,
}

impl Diagnostic {
    pub fn at_file(file: &str, pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            at: format!("{file}:{}:{}", pos.line, pos.col),
            message: message.into(),
        }
    }

    pub fn at_field(field: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            at: field.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Messages are one line: newlines from underlying parsers are folded.
        let message = self
            .message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        write!(f, "{}: {}", self.at, message)
    }
}

/// Every problem found in one pass over the input; the CLI prints one line each and exits 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Diagnostics {
        Diagnostics(vec![d])
    }
}

/// A 1-based line and column in a text file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, col: 1 };
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(&word.to_lowercase(), &c.to_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["group_size", "epsilon", "beta"];
        assert_eq!(did_you_mean("group_sise", &names), Some("group_size"));
        assert_eq!(did_you_mean("groupsize", &names), Some("group_size"));
        assert_eq!(did_you_mean("temperature", &names), None);
    }

    #[test]
    fn display_is_one_line() {
        let d = Diagnostic::at_file("p.yaml", Pos { line: 3, col: 5 }, "bad\n  value");
        assert_eq!(d.to_string(), "p.yaml:3:5: bad value");
    }
}
