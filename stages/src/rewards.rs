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
//! | `code_tests`  | share of a `code` problem's tests its program passes, + bonus if all    |
//! | `consistency` | 1.0 if the answer equals the result the `<think>` reasoning reached     |
//! | `correctness` | 1.0 if [`crate::tasks::verify_with`] accepts the answer, else 0.0       |
//! | `format`      | 1.0 if [`crate::tasks::has_format`], else 0.0                           |
//! | `length`      | DAPO soft overlong penalty in `[-1, 0]`                                 |
//! | `repetition`  | n-gram repetition beyond the reference solution's, in `[max_penalty, 0]`|
//! | `steps`       | share of the reference steps the reasoning states correctly             |
//!
//! The rewards are applied in name order whatever order they are given in, so the
//! components of a score (and every table holding them) do not depend on the order a
//! pipeline writes its `rewards` map in, which its key ignores.

use std::collections::HashMap;
use std::fmt;

use crate::{code_exec, tasks};

/// One reward function, by the name pipelines use for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RewardKind {
    CodeTests,
    Consistency,
    Correctness,
    Format,
    Length,
    Repetition,
    Steps,
}

impl RewardKind {
    /// Every reward, in name order.
    pub const ALL: [RewardKind; 7] = [
        RewardKind::CodeTests,
        RewardKind::Consistency,
        RewardKind::Correctness,
        RewardKind::Format,
        RewardKind::Length,
        RewardKind::Repetition,
        RewardKind::Steps,
    ];

    /// The name used in pipeline params, metrics and sample columns.
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::CodeTests => "code_tests",
            RewardKind::Consistency => "consistency",
            RewardKind::Correctness => "correctness",
            RewardKind::Format => "format",
            RewardKind::Length => "length",
            RewardKind::Repetition => "repetition",
            RewardKind::Steps => "steps",
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
    /// `correctness`: read the last `\boxed{}` (else the last number) of a completion without
    /// an answer block as its answer ([`crate::tasks::extract_answer_with`]). Off by default:
    /// it pays unformatted and truncated completions.
    pub answer_fallback: bool,
    /// `code_tests`: added to the pass rate when every test passes. TRL/open-r1 pay the pass
    /// rate alone (bonus 0); 0.5 makes a fully correct program stand out from a nearly
    /// correct one, which is what pass@k counts.
    pub code_bonus: f64,
    /// `code_tests`: the sandbox's time, memory and output limits.
    pub code_limits: code_exec::Limits,
}

impl Default for RewardParams {
    fn default() -> Self {
        Self {
            max_completion_len: 256,
            soft_punish_cache: 64,
            ngram_size: 3,
            max_penalty: -1.0,
            ngram_unit: NgramUnit::Chars,
            answer_fallback: false,
            code_bonus: 0.5,
            code_limits: code_exec::Limits::default(),
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
    /// The reference solution's reasoning steps (a problem's `steps`); empty when unknown.
    pub steps: &'a [String],
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
    /// Each chosen reward's own (unweighted) value, in name order.
    pub components: Vec<(&'static str, Option<f64>)>,
}

/// The weighted rewards a stage scores completions with.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSet {
    /// In name order.
    weighted: Vec<(RewardKind, f64)>,
    params: RewardParams,
}

impl RewardSet {
    /// Rewards by name and weight, with default [`RewardParams`].
    pub fn from_weights(weights: &[(String, f64)]) -> Result<Self, RewardError> {
        Self::with_params(weights, RewardParams::default())
    }

    /// Rewards by name and weight, with the given tuning. The order of `weights` does not
    /// matter.
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
        weighted.sort_by_key(|(kind, _)| kind.name());
        validate(&params)?;
        if weighted
            .iter()
            .any(|(kind, _)| *kind == RewardKind::CodeTests)
        {
            code_exec::python().map_err(RewardError::BadParam)?;
        }
        Ok(Self { weighted, params })
    }

    /// The same rewards, reading untagged answers as `answer_fallback` says.
    pub fn with_answer_fallback(mut self, answer_fallback: bool) -> Self {
        self.params.answer_fallback = answer_fallback;
        self
    }

    /// The `code_tests` reward's bonus and sandbox limits.
    pub fn with_code(mut self, bonus: f64, limits: code_exec::Limits) -> Self {
        self.params.code_bonus = bonus;
        self.params.code_limits = limits;
        self
    }

    /// The chosen rewards' names, in name order.
    pub fn names(&self) -> Vec<&'static str> {
        self.weighted.iter().map(|(kind, _)| kind.name()).collect()
    }

    pub fn params(&self) -> &RewardParams {
        &self.params
    }

    /// Every chosen reward of `judged`, and their weighted sum (added in name order).
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

    /// [`Self::score`] of each completion, in order; on all cores when a reward runs
    /// programs (`code_tests`, or `correctness` of a code problem), else on this thread.
    pub fn score_all(&self, judged: &[Judged]) -> Vec<Scored> {
        let runs_programs = self.names().contains(&RewardKind::CodeTests.name())
            || judged.iter().any(|j| j.task == code_exec::CODE_TASK);
        if runs_programs {
            code_exec::parallel_map(judged, |j| self.score(j))
        } else {
            judged.iter().map(|j| self.score(j)).collect()
        }
    }
}

fn validate(params: &RewardParams) -> Result<(), RewardError> {
    let bad = |message: String| Err(RewardError::BadParam(message));
    if params.ngram_size == 0 {
        return bad("ngram_size must be at least 1".into());
    }
    if !(params.max_penalty.is_finite() && params.max_penalty <= 0.0) {
        return bad(format!(
            "max_penalty is {}; it must be finite and not positive (TRL's convention)",
            params.max_penalty
        ));
    }
    if !params.code_bonus.is_finite() || params.code_limits.timeout.is_zero() {
        return bad("code_bonus must be finite and the code timeout above 0".into());
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
        RewardKind::CodeTests => code_exec::reward(
            judged.task,
            judged.answer,
            judged.completion,
            &params.code_limits,
            params.code_bonus,
        ),
        RewardKind::Consistency => Some(consistency(judged.task, judged.completion)),
        // A code problem is correct when every test passes under the configured limits (the
        // same run `code_tests` makes, so the memo serves both).
        RewardKind::Correctness if judged.task == code_exec::CODE_TASK => Some(indicator(
            code_exec::passes(judged.answer, judged.completion, &params.code_limits),
        )),
        RewardKind::Correctness => correctness(
            judged.task,
            judged.answer,
            judged.completion,
            params.answer_fallback,
        ),
        RewardKind::Format => Some(indicator(tasks::has_format(judged.completion))),
        RewardKind::Steps => steps(judged.steps, judged.completion),
        RewardKind::Length => Some(soft_overlong_penalty(
            judged.completion_tokens,
            judged.truncated,
            params.max_completion_len,
            params.soft_punish_cache,
        )),
        RewardKind::Repetition => {
            // The reference solution's own repeats are allowed: without it, TRL's penalty.
            let reference = (!judged.steps.is_empty())
                .then(|| tasks::format_completion(judged.steps, judged.answer));
            Some(repetition_beyond(
                judged.completion,
                reference.as_deref().unwrap_or(""),
                params.ngram_size,
                params.max_penalty,
                params.ngram_unit,
            ))
        }
    }
}

fn indicator(yes: bool) -> f64 {
    if yes { 1.0 } else { 0.0 }
}

/// 1.0 if the completion's answer verifies against `reference` (reading an untagged answer
/// only with `fallback`); `None` when there is no reference to check against (the only case
/// the verifier cannot judge).
pub fn correctness(task: &str, reference: &str, completion: &str, fallback: bool) -> Option<f64> {
    if reference.trim().is_empty() {
        return None;
    }
    Some(indicator(tasks::verify_with(
        task, reference, completion, fallback,
    )))
}

/// 1.0 when the completion's answer block states the value its reasoning reached
/// ([`tasks::reasoning_result`]), compared as values ([`tasks::canonical_answer`]: `0741`
/// equals `741`, a countdown expression equals its value); else 0.0, also when either is
/// missing. Whether that value is right is `correctness`'s business.
pub fn consistency(task: &str, completion: &str) -> f64 {
    let reached =
        tasks::reasoning_result(completion).and_then(|r| tasks::canonical_answer(task, &r));
    let answered =
        tasks::extract_answer(task, completion).and_then(|a| tasks::canonical_answer(task, &a));
    indicator(reached.is_some() && reached == answered)
}

/// A process reward: the share of the reference solution's `steps` whose claim the
/// reasoning inside `<think>…</think>` states, each at most as often as the reference has
/// it. A step's claim is its equation (`7+5+9=21` of `7+5+9=21 write 1 carry 2`,
/// `3x=22-7=15`); a reasoning line states it when it contains it with nothing that would
/// change it on either side (spaces and `×`/`÷`/`−` spellings aside), so lines that are
/// merely present ("a", "b", "c") or equations with a wrong result earn nothing.
///
/// `None` without reference steps (nothing to judge against). 0.0 without a closed think
/// block, so rambling until the length limit is not rewarded. Being a comparison with one
/// worked solution, it does not pay for a different correct route (another countdown
/// expression): pair it with `correctness`.
pub fn steps(reference: &[String], completion: &str) -> Option<f64> {
    if reference.is_empty() {
        return None;
    }
    let Some(think) = tasks::think_block(completion) else {
        return Some(0.0);
    };
    let lines: Vec<Vec<char>> = think.lines().map(normalize).collect();
    let mut wanted: Vec<(Vec<char>, usize)> = Vec::new();
    for step in reference {
        let claim = claim_of(step);
        match wanted.iter_mut().find(|(c, _)| *c == claim) {
            Some((_, count)) => *count += 1,
            None => wanted.push((claim, 1)),
        }
    }
    let stated: usize = wanted
        .iter()
        .map(|(claim, count)| {
            let found: usize = lines.iter().map(|line| occurrences(line, claim)).sum();
            found.min(*count)
        })
        .sum();
    Some(stated as f64 / reference.len() as f64)
}

/// With the typographic operators as ASCII and without the spaces around operators (`7 + 5 =
/// 12` reads `7+5=12`); other runs of whitespace become one space, so a word before an
/// equation stays apart from it.
fn normalize(text: &str) -> Vec<char> {
    let is_operator = |c: char| "+-*/=()".contains(c);
    let mut out: Vec<char> = Vec::with_capacity(text.len());
    let mut gap = false;
    for c in text.chars() {
        let c = match c {
            '\u{00d7}' | '\u{00b7}' => '*',
            '\u{00f7}' => '/',
            '\u{2212}' => '-',
            c => c,
        };
        if c.is_whitespace() {
            gap = true;
            continue;
        }
        if gap && out.last().is_some_and(|&last| !is_operator(last)) && !is_operator(c) {
            out.push(' ');
        }
        gap = false;
        out.push(c);
    }
    out
}

/// The equation a reference step claims: its first word holding `=`, else the whole step.
fn claim_of(step: &str) -> Vec<char> {
    let step = normalize(step);
    let claim = step
        .split(|&c| c == ' ')
        .find(|word| word.contains(&'='))
        .map(<[char]>::to_vec);
    claim.unwrap_or(step)
}

/// How often `claim` stands in `line` as a whole: not continued by a digit (`=21` in `=210`)
/// nor preceded by part of a longer expression (`2+3=5` in `12+3=5`, `x=5` in `2x=5`).
fn occurrences(line: &[char], claim: &[char]) -> usize {
    if claim.is_empty() || claim.len() > line.len() {
        return 0;
    }
    let continues = |c: char| c.is_alphanumeric() || ".,+-*/()=".contains(c);
    (0..=line.len() - claim.len())
        .filter(|&at| line[at..at + claim.len()] == *claim)
        .filter(|&at| at == 0 || !continues(line[at - 1]))
        .filter(|&at| {
            let after = &line[at + claim.len()..];
            match after {
                [] => true,
                [c, ..] if c.is_ascii_digit() => false,
                ['.' | ',', d, ..] if d.is_ascii_digit() => false,
                _ => true,
            }
        })
        .count()
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
    repetition_beyond(completion, "", n, max_penalty, unit)
}

/// [`repetition_penalty`] that allows each n-gram as many repeats as `reference` (the
/// reference solution) has: `max_penalty × Σ max(0, count − max(1, count in reference)) /
/// total`. Worked solutions repeat short n-grams by nature (`write`, `carry`, the tags, a
/// column of zeros), which TRL's penalty charges: −0.24 for a correct 3-digit sum. With its
/// reference a correct solution scores 0; with an empty reference this is TRL's penalty.
pub fn repetition_beyond(
    completion: &str,
    reference: &str,
    n: usize,
    max_penalty: f64,
    unit: NgramUnit,
) -> f64 {
    let fraction = match unit {
        NgramUnit::Chars => {
            let (units, allowed): (Vec<char>, Vec<char>) =
                (completion.chars().collect(), reference.chars().collect());
            repeated_fraction(&units, &allowed, n)
        }
        NgramUnit::Words => {
            let (units, allowed): (Vec<&str>, Vec<&str>) = (
                completion.split_whitespace().collect(),
                reference.split_whitespace().collect(),
            );
            repeated_fraction(&units, &allowed, n)
        }
    };
    // Spelled out so a completion without repeats scores +0.0, never -0.0.
    if fraction > 0.0 {
        fraction * max_penalty
    } else {
        0.0
    }
}

/// The share of the n-grams of `units` that repeat one beyond what `allowed` has (at least
/// one occurrence each); 0.0 when there is no n-gram.
fn repeated_fraction<T: Eq + std::hash::Hash>(units: &[T], allowed: &[T], n: usize) -> f64 {
    if n == 0 || units.len() < n {
        return 0.0;
    }
    let (seen, allowed) = (ngram_counts(units, n), ngram_counts(allowed, n));
    let excess: usize = seen
        .iter()
        .map(|(gram, &c)| c.saturating_sub(allowed.get(gram).copied().unwrap_or(0).max(1)))
        .sum();
    excess as f64 / (units.len() - n + 1) as f64
}

fn ngram_counts<T: Eq + std::hash::Hash>(units: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut counts: HashMap<&[T], usize> = HashMap::new();
    if units.len() >= n {
        for gram in units.windows(n) {
            *counts.entry(gram).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use crate::tasks::Family;

    const GOOD: &str =
        "<think>\n7+5=12 write 2 carry 1\n1+1=2 write 2\n</think>\n<answer>22</answer>";

    fn judged(completion: &str) -> Judged<'_> {
        Judged {
            task: "arithmetic",
            answer: "22",
            steps: &[],
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

    fn lines(steps: &[&str]) -> Vec<String> {
        steps.iter().map(|s| s.to_string()).collect()
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
        assert_eq!(unformatted.total, Some(0.0), "no answer block, no fallback");
        let lenient = rewards.clone().with_answer_fallback(true);
        assert_eq!(lenient.score(&judged("the answer is 22")).total, Some(1.0));
        assert_eq!(lenient.score(&judged("<think>\n20+2=22")).total, Some(1.0));
        assert_eq!(
            rewards.score(&judged("<think>\n20+2=22")).total,
            Some(0.0),
            "truncated"
        );
    }

    #[test]
    fn the_order_rewards_are_given_in_does_not_matter() {
        let names = [
            "repetition",
            "correctness",
            "steps",
            "length",
            "format",
            "consistency",
        ];
        let weights: Vec<(String, f64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), 0.1 + i as f64))
            .collect();
        let mut reversed = weights.clone();
        reversed.reverse();
        let mut rotated = weights.clone();
        rotated.rotate_left(2);
        let (a, b, c) = (
            RewardSet::from_weights(&weights).unwrap(),
            RewardSet::from_weights(&reversed).unwrap(),
            RewardSet::from_weights(&rotated).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(
            a.names(),
            [
                "consistency",
                "correctness",
                "format",
                "length",
                "repetition",
                "steps"
            ]
        );
        for completion in [
            GOOD,
            "<think>\n1+1=3\n</think>\n<answer>5</answer>",
            "eeeeeeee",
        ] {
            let (x, y) = (a.score(&judged(completion)), b.score(&judged(completion)));
            assert_eq!(x.components, y.components);
            // Same bits, not just close: the sum is taken in one order.
            assert_eq!(x.total.map(f64::to_bits), y.total.map(f64::to_bits));
        }
    }

    #[test]
    fn unknown_duplicate_and_bad_configs_are_errors() {
        let err = RewardSet::from_weights(&[("accuracy".into(), 1.0)]).unwrap_err();
        assert_eq!(err, RewardError::Unknown("accuracy".into()));
        assert!(
            err.to_string()
                .contains("consistency, correctness, format, length, repetition, steps")
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
    fn code_tests_judges_code_problems_only() {
        if let Err(e) = crate::code_exec::python() {
            eprintln!("skipped: {e}");
            return;
        }
        let rewards = set(&[("code_tests", 1.0)]);
        let spec = r#"{"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}"#;
        let right = "<think>\nsum\n</think>\n```python\ndef add(a, b):\n    return a + b\n```";
        let wrong = right.replace("a + b", "a * b");
        let code = |completion| Judged {
            task: "code",
            answer: spec,
            ..judged(completion)
        };
        let scored = rewards.score_all(&[code(right), code(&wrong), code("no code"), judged(GOOD)]);
        let values: Vec<Option<f64>> = scored.iter().map(|s| s.components[0].1).collect();
        // All pass: 1 + the default bonus 0.5; half pass: 0.5; an arithmetic problem: no say.
        assert_eq!(values, [Some(1.5), Some(0.5), Some(0.0), None]);
    }

    #[test]
    fn steps_pays_for_reference_steps_stated_correctly() {
        let reference = lines(&["7+5=12 write 2 carry 1", "1+1=2 write 2"]);
        assert_eq!(steps(&reference, GOOD), Some(1.0));
        // Lines that are merely present earn nothing.
        assert_eq!(
            steps(
                &reference,
                "<think>\na\nb\nc\n</think>\n<answer>22</answer>"
            ),
            Some(0.0)
        );
        // A wrong intermediate result does not count; the right one still does.
        let half = "<think>\n7+5=13 write 3 carry 1\n1+1=2 write 2\n</think>\n<answer>23</answer>";
        assert_eq!(steps(&reference, half), Some(0.5));
        // Spaces and typographic operators do not matter; what surrounds the claim does.
        assert_eq!(
            steps(
                &reference,
                "<think>\n7 + 5 = 12, write 2\n1+1 = 2\n</think>"
            ),
            Some(1.0)
        );
        assert_eq!(
            steps(&reference, "<think>\n17+5=12\n1+1=21\n</think>"),
            Some(0.0)
        );
        let worded = "<think>\nfirst 7 + 5 = 12\nthen 1+1=2\n</think>";
        assert_eq!(steps(&reference, worded), Some(1.0));
        assert_eq!(steps(&reference, "<think>\n7+5=1 2\n</think>"), Some(0.0));
        // Unclosed (truncated) reasoning earns nothing; no reference, no judgement.
        assert_eq!(
            steps(
                &reference,
                "<think>\n7+5=12 write 2 carry 1\n1+1=2 write 2\n"
            ),
            Some(0.0)
        );
        assert_eq!(steps(&[], GOOD), None);
        // A repeated reference step must be stated as often as the reference has it.
        let zeros = lines(&["0+0=0 write 0", "0+0=0 write 0", "1+2=3 write 3"]);
        assert_eq!(
            steps(&zeros, "<think>\n0+0=0 write 0\n1+2=3 write 3\n</think>"),
            Some(2.0 / 3.0)
        );
        assert_eq!(
            steps(&zeros, "<think>\n0+0=0\n0+0=0\n0+0=0\n0+0=0\n</think>"),
            Some(2.0 / 3.0)
        );
        // Linear and countdown steps: the whole chain is the claim.
        let linear = lines(&["3x=22-7=15", "x=15/3=5"]);
        assert_eq!(
            steps(&linear, "<think>\n3x = 22 − 7 = 15\nx = 15/3 = 5\n</think>"),
            Some(1.0)
        );
        assert_eq!(
            steps(&linear, "<think>\n3x=22-7=15\n2x=15/3=5\n</think>"),
            Some(0.5)
        );
    }

    #[test]
    fn consistency_compares_the_answer_with_the_reasoning_result() {
        assert_eq!(consistency("arithmetic", GOOD), 1.0);
        let column = "<think>\n7+5+9=21 write 1 carry 2\n4+8+0+2=14 write 4 carry 1\n3+2+1+1=7 write 7\n</think>\n<answer>741</answer>";
        assert_eq!(consistency("addition", column), 1.0);
        assert_eq!(
            consistency("addition", &column.replace("741<", "742<")),
            0.0
        );
        assert_eq!(
            consistency(
                "linear",
                "<think>\n3x=22-7=15\nx=15/3=5\n</think>\n<answer>x = 5</answer>"
            ),
            1.0
        );
        assert_eq!(
            consistency(
                "linear",
                "<think>\n3x=22-7=15\nx=15/3=5\n</think>\n<answer>6</answer>"
            ),
            0.0
        );
        let countdown = "<think>\n5*7=35\n35-3=32\n5*7-3=32\n</think>\n<answer>7*5-3</answer>";
        assert_eq!(consistency("countdown", countdown), 1.0);
        assert_eq!(
            consistency("countdown", &countdown.replace("7*5-3<", "7*5+3<")),
            0.0
        );
        // Without an answer block or a result in the reasoning there is nothing consistent.
        assert_eq!(consistency("word", "<think>\n3*4=12\n</think>\n12"), 0.0);
        assert_eq!(
            consistency("word", "<think>\nthink hard\n</think>\n<answer>12</answer>"),
            0.0
        );
        assert_eq!(consistency("word", "<answer>12</answer>"), 0.0);
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
    fn repetition_allows_what_the_reference_repeats() {
        // "abab" repeats "ab" once; a reference with two "ab" allows it.
        assert_eq!(
            repetition_beyond("abab", "abab", 2, -1.0, NgramUnit::Chars),
            0.0
        );
        assert_eq!(
            repetition_beyond("abab", "xy", 2, -1.0, NgramUnit::Chars),
            repetition_penalty("abab", 2, -1.0, NgramUnit::Chars)
        );
        // Looping past the reference is charged for the excess only: "ab" ×4 of 7 bigrams,
        // "ba" ×3; the reference allows 2 and 1 (at least 1): excess 2 + 2 = 4.
        let value = repetition_beyond("abababab", "abab", 2, -1.0, NgramUnit::Chars);
        assert!((value - (-4.0 / 7.0)).abs() < 1e-12, "{value}");
        assert_eq!(
            repetition_beyond("a a a", "a a a", 1, -1.0, NgramUnit::Words),
            0.0
        );
    }

    /// Every family and difficulty: the reference solution (the chat `cot_generate` writes)
    /// scores full marks on every reward and no penalty, where TRL's character 3-gram
    /// penalty charged it (−0.24 for a correct 3-digit sum).
    #[test]
    fn reference_solutions_earn_every_reward_and_no_penalty() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let rewards = set(&[
            ("consistency", 1.0),
            ("correctness", 1.0),
            ("format", 1.0),
            ("length", 1.0),
            ("repetition", 1.0),
            ("steps", 1.0),
        ]);
        let mut trl_charged = 0;
        for family in Family::ALL {
            let (low, high) = tasks::difficulty_range(family);
            for difficulty in low..=high {
                for _ in 0..100 {
                    let problem = tasks::generate(family, difficulty, &mut rng);
                    let completion = problem.completion();
                    let judged = Judged {
                        task: family.as_str(),
                        answer: &problem.answer,
                        steps: &problem.steps,
                        completion: &completion,
                        completion_tokens: completion.chars().count().min(100),
                        truncated: false,
                    };
                    let p = RewardParams::default();
                    let scored = rewards.score(&judged);
                    assert_eq!(
                        scored.components,
                        [
                            ("consistency", Some(1.0)),
                            ("correctness", Some(1.0)),
                            ("format", Some(1.0)),
                            ("length", Some(0.0)),
                            ("repetition", Some(0.0)),
                            ("steps", Some(1.0)),
                        ],
                        "{completion}"
                    );
                    assert!(scored.components[4].1.unwrap().is_sign_positive());
                    trl_charged += usize::from(
                        repetition_penalty(&completion, p.ngram_size, p.max_penalty, p.ngram_unit)
                            < 0.0,
                    );
                }
            }
        }
        assert!(trl_charged > 0, "TRL's penalty charges worked solutions");
        let sum = "<think>\n7+5=12 write 2 carry 1\n4+8+1=13 write 3 carry 1\n3+2+1=6 write 6\n</think>\n<answer>632</answer>";
        assert!(repetition_penalty(sum, 3, -1.0, NgramUnit::Chars) < -0.2);
    }

    #[test]
    fn steps_and_repetition_read_the_reference_steps_of_judged() {
        let rewards = set(&[("steps", 1.0), ("repetition", 1.0)]);
        let reference = lines(&["7+5=12 write 2 carry 1", "1+1=2 write 2"]);
        let with = Judged {
            steps: &reference,
            ..judged(GOOD)
        };
        assert_eq!(
            rewards.score(&with).components,
            [("repetition", Some(0.0)), ("steps", Some(1.0))]
        );
        // Without reference steps, `steps` cannot judge and `repetition` is TRL's.
        let without = rewards.score(&judged(GOOD));
        assert_eq!(without.components[1], ("steps", None));
        let trl = repetition_penalty(GOOD, 3, -1.0, NgramUnit::Chars);
        assert!(trl < 0.0);
        assert_eq!(without.components[0], ("repetition", Some(trl)));
        // "a/b/c" against the reference: nothing.
        let listed = Judged {
            steps: &reference,
            ..judged("<think>\na\nb\nc\n</think>\n<answer>22</answer>")
        };
        assert_eq!(rewards.score(&listed).components[1], ("steps", Some(0.0)));
    }

    #[test]
    fn length_and_repetition_through_the_set() {
        let params = RewardParams {
            max_completion_len: 100,
            soft_punish_cache: 20,
            ngram_size: 2,
            ..RewardParams::default()
        };
        let weights = [("repetition".to_string(), 2.0), ("length".to_string(), 1.0)];
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
