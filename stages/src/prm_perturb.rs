//! Planting a bad step in a reference solution, for the `prm` stage's labels (seed 000: "a
//! corrupted number or operation in one step").
//!
//! [`perturb`] corrupts one step of a reference solution and keeps the rest of the reasoning
//! after it, so the planted step is the first wrong one wherever it sits: the steps before it are
//! good, and a PRM that finds it scores it lowest. (Cutting the solution after the planted step
//! would make it always the last one, a position a PRM could learn instead of the error.) The
//! steps after it are the reference's, no longer consistent with the corrupted value. The
//! corruptions ([`Corruption`]) work on the steps of every
//! task family (`L=V write W carry C` columns, `3x=22-7=15`, `a+b=v`) without knowing which.
//! Labels for the corrupted solution still come from rollouts (`prm_labels.rs`), which is what
//! says whether the corruption derailed the completer.

use rand::Rng;

/// How a reference step is corrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// The last digit of the step's result (the number after its last `=`) becomes another
    /// digit, and a `write` of that result or digit follows it: the wrong digit reaches the
    /// answer, as a slip would.
    Number,
    /// An operator left of the step's first `=` is swapped (`+`↔`-`, `*`→`+`, `/`→`*`); the
    /// result is left as it was, so the step states a false equation.
    Operation,
}

impl Corruption {
    pub const NAMES: &'static [&'static str] = &["number", "operation"];

    pub fn parse(name: &str) -> Option<Corruption> {
        match name {
            "number" => Some(Corruption::Number),
            "operation" => Some(Corruption::Operation),
            _ => None,
        }
    }

    /// The step corrupted this way with `rng`, or `None` when it has nothing to corrupt.
    pub fn apply(self, step: &str, rng: &mut impl Rng) -> Option<String> {
        match self {
            Corruption::Number => corrupt_number(step, rng),
            Corruption::Operation => corrupt_operation(step, rng),
        }
    }
}

fn corrupt_number(step: &str, rng: &mut impl Rng) -> Option<String> {
    let after = step.rfind('=')? + 1;
    let rest = &step[after..];
    let start = after + (rest.len() - rest.trim_start().len());
    let unsigned = start + usize::from(step[start..].starts_with('-'));
    let digits = step[unsigned..]
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(step.len() - unsigned);
    if digits == 0 {
        return None;
    }
    let end = unsigned + digits;
    let old_digit = step.as_bytes()[end - 1] - b'0';
    let new_digit = (old_digit + rng.random_range(1..10u8)) % 10;
    let old_value = &step[unsigned..end];
    let new_value = format!("{}{new_digit}", &old_value[..digits - 1]);
    // `write N` after the result writes it whole or its last digit: keep it consistent.
    let mut tail = Vec::new();
    let mut words = step[end..].split(' ').peekable();
    while let Some(word) = words.next() {
        tail.push(word.to_string());
        if word == "write"
            && let Some(next) = words.next()
        {
            tail.push(if next == old_value {
                new_value.clone()
            } else if next == old_digit.to_string() {
                new_digit.to_string()
            } else {
                next.to_string()
            });
        }
    }
    Some(format!(
        "{}{new_value}{}",
        &step[..unsigned],
        tail.join(" ")
    ))
}

fn corrupt_operation(step: &str, rng: &mut impl Rng) -> Option<String> {
    let left = &step[..step.find('=')?];
    let bytes = left.as_bytes();
    // Binary operators only: one that follows an operand, not a leading minus sign.
    let at: Vec<usize> = (1..bytes.len())
        .filter(|&i| b"+-*/".contains(&bytes[i]))
        .filter(|&i| bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b')')
        .collect();
    if at.is_empty() {
        return None;
    }
    let i = at[rng.random_range(0..at.len())];
    let swapped = match bytes[i] {
        b'+' => '-',
        b'-' => '+',
        b'*' => '+',
        _ => '*',
    };
    Some(format!("{}{swapped}{}", &step[..i], &step[i + 1..]))
}

/// A reference solution with one corrupted step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perturbed {
    /// The reference's steps, step `bad` corrupted.
    pub steps: Vec<String>,
    /// The index of the corrupted step in `steps` (a reference step, which need not be one
    /// step of the solution's text: see [`crate::prm_labels::Solution::perturbed`]).
    pub bad: usize,
    /// The byte offset in `steps[bad]` of the first byte the corruption changed.
    pub at: usize,
}

/// A reference solution with one step corrupted by `corruption` (the other steps as they were);
/// `None` when no step can be corrupted that way.
pub fn perturb(steps: &[String], corruption: Corruption, rng: &mut impl Rng) -> Option<Perturbed> {
    let candidates: Vec<usize> = (0..steps.len())
        .filter(|&i| corruption.apply(&steps[i], &mut NoRandom).is_some())
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let bad = candidates[rng.random_range(0..candidates.len())];
    let mut out = steps.to_vec();
    out[bad] = corruption.apply(&steps[bad], rng)?;
    let at = first_difference(&steps[bad], &out[bad]);
    Some(Perturbed {
        steps: out,
        bad,
        at,
    })
}

/// The byte offset of the first byte where `a` and `b` differ (the shorter one's length when
/// one starts the other).
pub fn first_difference(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// A generator for asking whether a corruption applies at all (its draws are not used).
struct NoRandom;

impl rand::RngCore for NoRandom {
    fn next_u32(&mut self) -> u32 {
        0
    }
    fn next_u64(&mut self) -> u64 {
        0
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        dst.fill(0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Two column steps of `17+25+39=81`-like work, shared with `prm_labels`' tests.
    pub(crate) fn reference() -> Vec<String> {
        ["7+5+9=21 write 1 carry 2", "2+3+4+2=11 write 11"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn number_corruption_changes_the_result_digit_and_what_writes_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            let c = Corruption::Number
                .apply("7+5+9=21 write 1 carry 2", &mut rng)
                .unwrap();
            let d = c.as_bytes()[7];
            assert_ne!(d, b'1', "{c}");
            assert_eq!(
                c,
                format!("7+5+9=2{} write {} carry 2", d as char, d as char)
            );
            let last = Corruption::Number.apply("2+3=5 write 5", &mut rng).unwrap();
            assert_ne!(last, "2+3=5 write 5");
            assert_eq!(&last[4..5], &last[12..13], "{last}");
            let linear = Corruption::Number.apply("x=20/-4=-5", &mut rng).unwrap();
            assert!(
                linear.starts_with("x=20/-4=-") && linear != "x=20/-4=-5",
                "{linear}"
            );
        }
        assert_eq!(Corruption::Number.apply("no result here", &mut rng), None);
    }

    #[test]
    fn operation_corruption_swaps_a_binary_operator_only() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let c = Corruption::Operation.apply("-4x=15+5=20", &mut rng);
        assert_eq!(
            c, None,
            "the leading minus is a sign, and right of `=` is the result"
        );
        let c = Corruption::Operation.apply("6*7=42", &mut rng).unwrap();
        assert_eq!(c, "6+7=42");
    }

    #[test]
    fn perturb_corrupts_one_step_and_keeps_the_rest_of_the_reasoning() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let steps = reference();
        let mut seen = [false; 2];
        for _ in 0..40 {
            let Perturbed {
                steps: out,
                bad,
                at,
            } = perturb(&steps, Corruption::Number, &mut rng).unwrap();
            seen[bad] = true;
            assert_eq!(out[bad][..at], steps[bad][..at]);
            assert_ne!(out[bad].as_bytes()[at], steps[bad].as_bytes()[at]);
            assert_eq!(out.len(), steps.len(), "not cut after the planted step");
            assert_eq!(out[..bad], steps[..bad]);
            assert_ne!(out[bad], steps[bad]);
            assert_eq!(out[bad + 1..], steps[bad + 1..]);
        }
        assert_eq!(seen, [true, true], "either step may be planted");
        assert_eq!(
            perturb(&["words".to_string()], Corruption::Number, &mut rng),
            None
        );
    }
}
