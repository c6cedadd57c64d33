//! Model-free problem generators and the shared answer verifier.
//!
//! This is the "programmatic teacher" behind the `cot_generate` stage: each task family
//! generates problems with a known answer and a short, regular chain of reasoning steps, and
//! [`verify`] is the single checker every reward and evaluation uses. Nothing here does I/O;
//! the stage wrapper owns params, Parquet output and resume.
//!
//! Everything is deterministic for a given random-number-generator state, so a seed fully
//! determines a dataset.

mod addition;
mod arithmetic;
mod countdown;
mod expr;
mod linear;
mod rational;
mod verify;
mod word;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use verify::{
    canonical_answer, extract_answer, extract_answer_with, has_format, reasoning_result,
    think_block, verify, verify_with,
};

/// A task family: one kind of problem with its own generator and answer type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Multi-digit `+`, `-`, `*` worked column by column; difficulty = digits per operand.
    Arithmetic,
    /// Sums of three numbers worked column by column; difficulty = digits per operand.
    Addition,
    /// Solve `a*x+b=c` for an integer `x`; difficulty = size of the numbers.
    Linear,
    /// Multi-step word problems from templates; difficulty = steps and size of the numbers.
    Word,
    /// Reach a target from given numbers with `+ - * /`; difficulty = how many numbers.
    Countdown,
}

impl Family {
    pub const ALL: [Family; 5] = [
        Family::Arithmetic,
        Family::Addition,
        Family::Linear,
        Family::Word,
        Family::Countdown,
    ];

    /// The name used in pipeline params and in the `task` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Arithmetic => "arithmetic",
            Family::Addition => "addition",
            Family::Linear => "linear",
            Family::Word => "word",
            Family::Countdown => "countdown",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a family name that is not one of [`Family::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFamily(pub String);

impl fmt::Display for UnknownFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = Family::ALL.iter().map(|family| family.as_str()).collect();
        write!(
            f,
            "unknown task family `{}` (expected one of: {})",
            self.0,
            known.join(", ")
        )
    }
}

impl std::error::Error for UnknownFamily {}

impl FromStr for Family {
    type Err = UnknownFamily;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Family::ALL
            .into_iter()
            .find(|family| family.as_str() == name)
            .ok_or_else(|| UnknownFamily(name.to_owned()))
    }
}

/// One generated problem with its reference answer and worked solution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub task: Family,
    pub difficulty: u32,
    /// What the model sees, e.g. `347+285+109=`.
    pub prompt: String,
    /// The reference answer as [`verify`] expects it: an integer, or for countdown one
    /// solving expression that uses every given number exactly once.
    pub answer: String,
    /// The reasoning steps, one line each, without the think/answer tags.
    pub steps: Vec<String>,
}

impl Problem {
    /// The assistant turn a supervised model is trained on (see [`format_completion`]).
    pub fn completion(&self) -> String {
        format_completion(&self.steps, &self.answer)
    }
}

/// The inclusive range of difficulties a family supports.
pub fn difficulty_range(family: Family) -> (u32, u32) {
    match family {
        Family::Arithmetic => arithmetic::DIFFICULTY,
        Family::Addition => addition::DIFFICULTY,
        Family::Linear => linear::DIFFICULTY,
        Family::Word => word::DIFFICULTY,
        Family::Countdown => countdown::DIFFICULTY,
    }
}

/// Generates one problem. A difficulty outside [`difficulty_range`] is clamped into it, so
/// the generator never fails; the stage validates the requested range up front.
pub fn generate(family: Family, difficulty: u32, rng: &mut impl rand::Rng) -> Problem {
    let (low, high) = difficulty_range(family);
    let difficulty = difficulty.clamp(low, high);
    let solved = match family {
        Family::Arithmetic => arithmetic::generate(difficulty, rng),
        Family::Addition => addition::generate(difficulty, rng),
        Family::Linear => linear::generate(difficulty, rng),
        Family::Word => word::generate(difficulty, rng),
        Family::Countdown => countdown::generate(difficulty, rng),
    };
    Problem {
        task: family,
        difficulty,
        prompt: solved.prompt,
        answer: solved.answer,
        steps: solved.steps,
    }
}

/// The assistant turn in the R1 format:
/// `<think>\n` + steps joined by newlines + `\n</think>\n<answer>` + answer + `</answer>`.
pub fn format_completion(steps: &[String], answer: &str) -> String {
    format!(
        "<think>\n{}\n</think>\n<answer>{}</answer>",
        steps.join("\n"),
        answer
    )
}

/// What a family generator returns; [`generate`] adds the family and difficulty.
struct Solved {
    prompt: String,
    answer: String,
    steps: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn all_levels() -> impl Iterator<Item = (Family, u32)> {
        Family::ALL.into_iter().flat_map(|family| {
            let (low, high) = difficulty_range(family);
            (low..=high).map(move |difficulty| (family, difficulty))
        })
    }

    #[test]
    fn family_names_round_trip() {
        for family in Family::ALL {
            assert_eq!(family.as_str().parse::<Family>(), Ok(family));
            assert_eq!(family.to_string(), family.as_str());
            let json = serde_json::to_string(&family).unwrap();
            assert_eq!(json, format!("\"{}\"", family.as_str()));
        }
        let error = "algebra".parse::<Family>().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("arithmetic, addition, linear, word, countdown")
        );
    }

    #[test]
    fn every_reference_completion_verifies_and_has_format() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (family, difficulty) in all_levels() {
            for _ in 0..200 {
                let problem = generate(family, difficulty, &mut rng);
                let completion = problem.completion();
                assert!(has_format(&completion), "{completion}");
                assert!(
                    verify(family.as_str(), &problem.answer, &completion),
                    "{problem:?}"
                );
                assert_eq!(
                    extract_answer(family.as_str(), &completion),
                    Some(problem.answer.clone())
                );
                assert_eq!(problem.difficulty, difficulty);
                assert!(!problem.steps.is_empty());
                assert!(
                    problem
                        .steps
                        .iter()
                        .all(|step| !step.contains('\n') && !step.is_empty())
                );
            }
        }
    }

    #[test]
    fn a_wrong_answer_does_not_verify() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for (family, difficulty) in all_levels() {
            for _ in 0..50 {
                let problem = generate(family, difficulty, &mut rng);
                let wrong = match family {
                    // Countdown: a bare number that is not a given number is never a solution.
                    Family::Countdown => "1000000".to_owned(),
                    _ => (problem.answer.parse::<i64>().unwrap() + 1).to_string(),
                };
                let completion = format_completion(&problem.steps, &wrong);
                assert!(
                    !verify(family.as_str(), &problem.answer, &completion),
                    "{problem:?}"
                );
            }
        }
    }

    #[test]
    fn same_seed_gives_same_problems() {
        let batch = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            all_levels()
                .flat_map(|(family, difficulty)| {
                    (0..20)
                        .map(|_| generate(family, difficulty, &mut rng))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(batch(7), batch(7));
        assert_ne!(batch(7), batch(8));
    }

    #[test]
    fn out_of_range_difficulty_is_clamped() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for family in Family::ALL {
            let (low, high) = difficulty_range(family);
            assert!(low >= 1 && low <= high);
            assert_eq!(generate(family, 0, &mut rng).difficulty, low);
            assert_eq!(generate(family, 1000, &mut rng).difficulty, high);
        }
    }

    #[test]
    fn completion_layout_is_exact() {
        let steps = vec![
            "7+5=12 write 2 carry 1".to_owned(),
            "1+1+1=3 write 3".to_owned(),
        ];
        assert_eq!(
            format_completion(&steps, "32"),
            "<think>\n7+5=12 write 2 carry 1\n1+1+1=3 write 3\n</think>\n<answer>32</answer>"
        );
    }

    #[test]
    fn numeric_prompts_use_a_small_alphabet() {
        // Tiny character-level models: arithmetic, linear and countdown prompts and steps
        // stay within digits, operators, a few letters, space and newline.
        let allowed = |c: char| c.is_ascii_digit() || "+-*/=() x writecaybomk".contains(c);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for (family, difficulty) in all_levels().filter(|(family, _)| *family != Family::Word) {
            for _ in 0..50 {
                let problem = generate(family, difficulty, &mut rng);
                let text = format!(
                    "{}{}{}",
                    problem.prompt,
                    problem.steps.join(""),
                    problem.answer
                );
                assert!(text.chars().all(allowed), "{text:?}");
            }
        }
    }
}
