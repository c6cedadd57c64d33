//! Named reward functions for GRPO and rejection sampling, and their weighted sum.
//!
//! A pipeline picks rewards by name with a weight each (`rewards: {correctness: 1.0,
//! format: 0.2}`); [`RewardSet::from_weights`] turns that into a scorer. Every reward returns
//! `Option<f64>`: `None` means "cannot judge this completion", and it is left out of the sum
//! the way TRL's GRPOTrainer leaves out a reward function's `None` (a NaN under `nansum`).
//! A completion no reward could judge has no total at all, so GRPO leaves it out of its
//! group's baseline (see [`crate::grpo_math::compute_advantages`]).
//!
//! | name          | value                                                                   |
//! |---------------|-------------------------------------------------------------------------|
//! | `correctness` | 1.0 if [`crate::tasks::verify`] accepts the answer, else 0.0            |
//! | `format`      | 1.0 if [`crate::tasks::has_format`], else 0.0                           |
//! | `steps`       | non-empty lines inside `<think>…</think>` ÷ `steps_cap`, at most 1.0    |
//! | `length`      | DAPO soft overlong penalty in `[-1, 0]`                                 |
//! | `repetition`  | n-gram repetition penalty in `[max_penalty, 0]`                         |

use std::fmt;

use crate::tasks;

/// One reward function, by the name pipelines use for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RewardKind {
    Correctness,
    Format,
    Steps,
    Length,
    Repetition,
}

impl RewardKind {
    pub const ALL: [RewardKind; 5] = [
        RewardKind::Correctness,
        RewardKind::Format,
        RewardKind::Steps,
        RewardKind::Length,
        RewardKind::Repetition,
    ];

    /// The name used in pipeline params, metrics and sample columns.
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::Correctness => "correctness",
            RewardKind::Format => "format",
            RewardKind::Steps => "steps",
            RewardKind::Length => "length",
            RewardKind::Repetition => "repetition",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// What the `repetition` reward counts n-grams of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NgramUnit {
    /// Characters: the tokens of this project's character-level models, so this matches
    /// TRL, which counts n-grams of token ids.
    Chars,
    /// Whitespace-separated words, as open-r1's text version does.
    Words,
}

/// Tuning of the rewards that have any. The defaults follow TRL/open-r1 where they exist.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardParams {
    /// `steps` reaches 1.0 at this many reasoning lines.
    pub steps_cap: usize,
    /// `length`: the longest completion, in tokens, before the full penalty (DAPO's L_max);
    /// normally the stage's `max_completion_length`.
    pub max_completion_len: usize,
    /// `length`: the soft zone below `max_completion_len` where the penalty ramps from 0 to
    /// -1 (DAPO's L_cache).
    pub soft_punish_cache: usize,
    /// `repetition`: n-gram size.
    pub ngram_size: usize,
    /// `repetition`: the reward of a fully repetitive completion; non-positive, as in TRL.
    pub max_penalty: f64,
    /// `repetition`: what an n-gram is made of.
    pub ngram_unit: NgramUnit,
}

impl Default for RewardParams {
    fn default() -> Self {
        Self {
            steps_cap: 3,
            max_completion_len: 256,
            soft_punish_cache: 64,
            ngram_size: 3,
            max_penalty: -1.0,
            ngram_unit: NgramUnit::Chars,
        }
    }
}

/// Why a reward configuration was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardError {
    Unknown(String),
    Duplicate(String),
    BadWeight { name: String, weight: f64 },
    Empty,
    BadParam(String),
}

impl fmt::Display for RewardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RewardError::Unknown(name) => {
                let known: Vec<&str> = RewardKind::ALL.iter().map(|kind| kind.name()).collect();
                write!(
                    f,
                    "unknown reward `{name}` (expected one of: {})",
                    known.join(", ")
                )
            }
            RewardError::Duplicate(name) => write!(f, "reward `{name}` is listed twice"),
            RewardError::BadWeight { name, weight } => {
                write!(f, "reward `{name}` has weight {weight}; it must be finite")
            }
            RewardError::Empty => f.write_str("no rewards chosen: name at least one"),
            RewardError::BadParam(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for RewardError {}

/// A completion to score, with what the rewards need to know about it.
#[derive(Debug, Clone, Copy)]
pub struct Judged<'a> {
    /// Task family name, as [`crate::tasks::verify`] takes it.
    pub task: &'a str,
    /// The reference answer; empty when there is none.
    pub answer: &'a str,
    pub completion: &'a str,
    /// Length of the completion in model tokens.
    pub completion_tokens: usize,
    /// Whether generation stopped at the length limit rather than at end-of-sequence.
    pub truncated: bool,
}

/// The rewards of one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Weighted sum of the components that judged; `None` iff every component is `None`.
    pub total: Option<f64>,
    /// Each chosen reward's own (unweighted) value, in the order they were chosen.
    pub components: Vec<(&'static str, Option<f64>)>,
}

/// The weighted rewards a stage scores completions with.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSet {
    weighted: Vec<(RewardKind, f64)>,
    params: RewardParams,
}

impl RewardSet {
    /// Rewards by name and weight, with default [`RewardParams`].
    pub fn from_weights(weights: &[(String, f64)]) -> Result<Self, RewardError> {
        Self::with_params(weights, RewardParams::default())
    }

    /// Rewards by name and weight, with the given tuning.
    pub fn with_params(
        weights: &[(String, f64)],
        params: RewardParams,
    ) -> Result<Self, RewardError> {
        if weights.is_empty() {
            return Err(RewardError::Empty);
        }
        let mut weighted: Vec<(RewardKind, f64)> = Vec::with_capacity(weights.len());
        for (name, weight) in weights {
            let kind =
                RewardKind::from_name(name).ok_or_else(|| RewardError::Unknown(name.clone()))?;
            if weighted.iter().any(|(seen, _)| *seen == kind) {
                return Err(RewardError::Duplicate(name.clone()));
            }
            if !weight.is_finite() {
                return Err(RewardError::BadWeight {
                    name: name.clone(),
                    weight: *weight,
                });
            }
            weighted.push((kind, *weight));
        }
        validate(&params)?;
        Ok(Self { weighted, params })
    }

    /// The chosen rewards' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.weighted.iter().map(|(kind, _)| kind.name()).collect()
    }

    pub fn params(&self) -> &RewardParams {
        &self.params
    }

    /// Every chosen reward of `judged`, and their weighted sum.
    pub fn score(&self, judged: &Judged) -> Scored {
        let mut total: Option<f64> = None;
        let mut components = Vec::with_capacity(self.weighted.len());
        for &(kind, weight) in &self.weighted {
            let value = reward(kind, judged, &self.params);
            if let Some(value) = value {
                total = Some(total.unwrap_or(0.0) + weight * value);
            }
            components.push((kind.name(), value));
        }
        Scored { total, components }
    }
}

fn validate(params: &RewardParams) -> Result<(), RewardError> {
    let bad = |message: String| Err(RewardError::BadParam(message));
    if params.steps_cap == 0 {
        return bad("steps_cap must be at least 1".into());
    }
    if params.ngram_size == 0 {
        return bad("ngram_size must be at least 1".into());
    }
    if !(params.max_penalty.is_finite() && params.max_penalty <= 0.0) {
        return bad(format!(
            "max_penalty is {}; it must be finite and not positive (TRL's convention)",
            params.max_penalty
        ));
    }
    if params.soft_punish_cache > params.max_completion_len {
        return bad(format!(
            "soft_punish_cache ({}) exceeds max_completion_len ({})",
            params.soft_punish_cache, params.max_completion_len
        ));
    }
    Ok(())
}

/// One reward of one completion.
pub fn reward(kind: RewardKind, judged: &Judged, params: &RewardParams) -> Option<f64> {
    match kind {
        RewardKind::Correctness => correctness(judged.task, judged.answer, judged.completion),
        RewardKind::Format => Some(indicator(tasks::has_format(judged.completion))),
        RewardKind::Steps => Some(steps(judged.completion, params.steps_cap)),
        RewardKind::Length => Some(soft_overlong_penalty(
            judged.completion_tokens,
            judged.truncated,
            params.max_completion_len,
            params.soft_punish_cache,
        )),
        RewardKind::Repetition => Some(repetition_penalty(
            judged.completion,
            params.ngram_size,
            params.max_penalty,
            params.ngram_unit,
        )),
    }
}

fn indicator(yes: bool) -> f64 {
    if yes { 1.0 } else { 0.0 }
}

/// 1.0 if the completion's answer verifies against `reference`; `None` when there is no
/// reference to check against (the only case the verifier cannot judge).
pub fn correctness(task: &str, reference: &str, completion: &str) -> Option<f64> {
    if reference.trim().is_empty() {
        return None;
    }
    Some(indicator(tasks::verify(task, reference, completion)))
}

/// Number of non-blank lines between the first `<think>` and the `</think>` after it,
/// divided by `cap` and capped at 1.0.
///
/// A completion without a closed think block scores 0.0, not `None`: "no visible reasoning"
/// is a judgement. `None` would take such completions out of the group baseline (when
/// `steps` is the only reward) and give them advantage 0 instead of the negative advantage
/// they earn. An unclosed block (usually a truncated completion) also scores 0.0, so
/// rambling until the length limit is not rewarded.
pub fn steps(completion: &str, cap: usize) -> f64 {
    let Some(lines) = think_block(completion).map(count_nonblank_lines) else {
        return 0.0;
    };
    (lines as f64 / cap.max(1) as f64).min(1.0)
}

/// The text between the first `<think>` and the `</think>` after it.
pub(crate) fn think_block(completion: &str) -> Option<&str> {
    let (_, after_open) = completion.split_once("<think>")?;
    let (inside, _) = after_open.split_once("</think>")?;
    Some(inside)
}

fn count_nonblank_lines(text: &str) -> usize {
    text.lines().filter(|line| !line.trim().is_empty()).count()
}

/// DAPO's soft overlong punishment (Eq. 13; TRL's `get_soft_overlong_punishment`):
/// 0 up to `max_len - cache` tokens, then a linear ramp to -1 at `max_len`, -1 beyond.
/// A truncated completion was cut at the limit, so its real length exceeds `max_len`:
/// -1. (TRL gets the same -1 because a truncated completion has exactly `max_len` tokens.)
pub fn soft_overlong_penalty(tokens: usize, truncated: bool, max_len: usize, cache: usize) -> f64 {
    let free = max_len.saturating_sub(cache);
    if truncated || tokens > max_len {
        -1.0
    } else if tokens <= free {
        0.0
    } else {
        // Here free < tokens <= max_len, so cache > 0.
        (free as f64 - tokens as f64) / cache as f64
    }
}

/// TRL's `get_repetition_penalty_reward`: `max_penalty × (1 − unique/total n-grams)`,
/// 0.0 for completions shorter than `n` units. `max_penalty` is non-positive.
pub fn repetition_penalty(completion: &str, n: usize, max_penalty: f64, unit: NgramUnit) -> f64 {
    let fraction = match unit {
        NgramUnit::Chars => {
            let chars: Vec<char> = completion.chars().collect();
            repeated_fraction(&chars, n)
        }
        NgramUnit::Words => {
            let words: Vec<&str> = completion.split_whitespace().collect();
            repeated_fraction(&words, n)
        }
    };
    // Spelled out so a completion without repeats scores +0.0, never -0.0.
    if fraction > 0.0 {
        fraction * max_penalty
    } else {
        0.0
    }
}

/// `1 − unique/total` over the n-grams of `units`; 0.0 when there is no n-gram.
fn repeated_fraction<T: Eq + std::hash::Hash>(units: &[T], n: usize) -> f64 {
    if n == 0 || units.len() < n {
        return 0.0;
    }
    let ngrams: Vec<&[T]> = units.windows(n).collect();
    let unique: std::collections::HashSet<&[T]> = ngrams.iter().copied().collect();
    1.0 - unique.len() as f64 / ngrams.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "<think>\n7+5=12 write 2 carry 1\n1+1=2 write 2\n</think>\n<answer>22</answer>";

    fn judged(completion: &str) -> Judged<'_> {
        Judged {
            task: "arithmetic",
            answer: "22",
            completion,
            completion_tokens: completion.chars().count(),
            truncated: false,
        }
    }

    fn set(weights: &[(&str, f64)]) -> RewardSet {
        let weights: Vec<(String, f64)> =
            weights.iter().map(|(n, w)| (n.to_string(), *w)).collect();
        RewardSet::from_weights(&weights).unwrap()
    }

    #[test]
    fn weighted_sum_of_correctness_and_format() {
        let rewards = set(&[("correctness", 1.0), ("format", 0.2)]);
        let scored = rewards.score(&judged(GOOD));
        assert_eq!(scored.total, Some(1.2));
        assert_eq!(
            scored.components,
            vec![("correctness", Some(1.0)), ("format", Some(1.0))]
        );

        let wrong = rewards.score(&judged("<think>\nx\n</think>\n<answer>23</answer>"));
        assert_eq!(wrong.total, Some(0.2));
        let unformatted = rewards.score(&judged("the answer is 22"));
        assert_eq!(unformatted.total, Some(1.0));
    }

    #[test]
    fn unknown_duplicate_and_bad_configs_are_errors() {
        let err = RewardSet::from_weights(&[("accuracy".into(), 1.0)]).unwrap_err();
        assert_eq!(err, RewardError::Unknown("accuracy".into()));
        assert!(
            err.to_string()
                .contains("correctness, format, steps, length, repetition")
        );
        let dup = [("format".to_string(), 1.0), ("format".to_string(), 2.0)];
        assert_eq!(
            RewardSet::from_weights(&dup).unwrap_err(),
            RewardError::Duplicate("format".into())
        );
        assert!(matches!(
            RewardSet::from_weights(&[("format".into(), f64::NAN)]),
            Err(RewardError::BadWeight { .. })
        ));
        assert_eq!(RewardSet::from_weights(&[]), Err(RewardError::Empty));
        let params = RewardParams {
            max_penalty: 0.5,
            ..RewardParams::default()
        };
        assert!(matches!(
            RewardSet::with_params(&[("repetition".into(), 1.0)], params),
            Err(RewardError::BadParam(_))
        ));
    }

    #[test]
    fn total_is_none_only_when_nothing_judged() {
        let rewards = set(&[("correctness", 1.0)]);
        let no_reference = Judged {
            answer: " ",
            ..judged(GOOD)
        };
        let scored = rewards.score(&no_reference);
        assert_eq!(scored.total, None);
        assert_eq!(scored.components, vec![("correctness", None)]);

        // One judging component is enough for a total, like TRL's nansum.
        let rewards = set(&[("correctness", 1.0), ("format", 0.5)]);
        assert_eq!(rewards.score(&no_reference).total, Some(0.5));
    }

    #[test]
    fn steps_counts_nonblank_think_lines_up_to_the_cap() {
        assert_eq!(steps(GOOD, 3), 2.0 / 3.0);
        assert_eq!(steps(GOOD, 2), 1.0);
        assert_eq!(steps(GOOD, 1), 1.0);
        assert_eq!(steps("<think>\n a \n\n  \nb\n</think>", 4), 0.5);
        assert_eq!(steps("<think></think><answer>1</answer>", 3), 0.0);
        assert_eq!(steps("no think at all", 3), 0.0);
        assert_eq!(steps("<think>\na\nb\nc (truncated", 3), 0.0);
        assert_eq!(steps("<think>\na\n</think>", 0), 1.0); // cap 0 treated as 1, no division by zero
    }

    #[test]
    fn soft_overlong_penalty_matches_trl_docstring() {
        // TRL: max_completion_len=100, soft_punish_cache=20, 90 tokens -> -0.5.
        assert_eq!(soft_overlong_penalty(90, false, 100, 20), -0.5);
        assert_eq!(soft_overlong_penalty(80, false, 100, 20), 0.0);
        assert_eq!(soft_overlong_penalty(81, false, 100, 20), -0.05);
        assert_eq!(soft_overlong_penalty(100, false, 100, 20), -1.0);
        assert_eq!(soft_overlong_penalty(101, false, 100, 20), -1.0);
        assert_eq!(soft_overlong_penalty(10, true, 100, 20), -1.0);
        // No soft zone: a step from 0 to -1, never a division by zero.
        assert_eq!(soft_overlong_penalty(100, false, 100, 0), 0.0);
        assert_eq!(soft_overlong_penalty(101, false, 100, 0), -1.0);
        assert_eq!(soft_overlong_penalty(0, false, 0, 0), 0.0);
    }

    #[test]
    fn repetition_penalty_matches_trl_docstring() {
        // TRL, ngram_size=2 over ids: [1,2,3,4] -> 0.0, [5,5,5,5,5] -> -0.75.
        assert_eq!(repetition_penalty("abcd", 2, -1.0, NgramUnit::Chars), 0.0);
        assert_eq!(
            repetition_penalty("eeeee", 2, -1.0, NgramUnit::Chars),
            -0.75
        );
        assert_eq!(
            repetition_penalty("a b c d", 2, -1.0, NgramUnit::Words),
            0.0
        );
        assert_eq!(
            repetition_penalty("e e e e e", 2, -1.0, NgramUnit::Words),
            -0.75
        );
        // Shorter than n: 0.0. Scales with max_penalty.
        assert_eq!(repetition_penalty("ab", 3, -1.0, NgramUnit::Chars), 0.0);
        assert_eq!(repetition_penalty("", 3, -1.0, NgramUnit::Words), 0.0);
        assert_eq!(
            repetition_penalty("eeeee", 2, -0.5, NgramUnit::Chars),
            -0.375
        );
        // "abab": bigrams ab, ba, ab -> 2 unique of 3.
        let value = repetition_penalty("abab", 2, -1.0, NgramUnit::Chars);
        assert!((value - (-1.0 / 3.0)).abs() < 1e-12);
        assert!(repetition_penalty("abc", 3, -1.0, NgramUnit::Chars).is_sign_positive());
    }

    #[test]
    fn length_and_repetition_through_the_set() {
        let params = RewardParams {
            max_completion_len: 100,
            soft_punish_cache: 20,
            ngram_size: 2,
            ..RewardParams::default()
        };
        let weights = [("length".to_string(), 1.0), ("repetition".to_string(), 2.0)];
        let rewards = RewardSet::with_params(&weights, params).unwrap();
        let long = Judged {
            completion_tokens: 90,
            ..judged("eeeee")
        };
        let scored = rewards.score(&long);
        assert_eq!(scored.total, Some(-0.5 + 2.0 * -0.75));
        assert_eq!(rewards.names(), vec!["length", "repetition"]);
    }
}
