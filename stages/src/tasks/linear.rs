//! Solve `a*x+b=c` for an integer `x`.
//!
//! Prompt `3x+7=22`; steps `3x=22-7=15` (move `b` across) and `x=15/3=5` (divide by `a`);
//! answer `5`. Built backwards from `x` so the solution is always an integer.

use rand::Rng;

use super::Solved;

/// Difficulty = size of the numbers: non-negative `x` and positive `a`, `b` at 1, negative
/// values from 2, negative `a` from 3.
pub(super) const DIFFICULTY: (u32, u32) = (1, 4);

/// Inclusive bounds for one difficulty level.
struct Level {
    max_coefficient: i64,
    min_solution: i64,
    max_solution: i64,
    min_offset: i64,
    max_offset: i64,
    negative_coefficients: bool,
}

fn level(difficulty: u32) -> Level {
    match difficulty {
        1 => Level {
            max_coefficient: 5,
            min_solution: 0,
            max_solution: 9,
            min_offset: 1,
            max_offset: 9,
            negative_coefficients: false,
        },
        2 => Level {
            max_coefficient: 9,
            min_solution: -9,
            max_solution: 9,
            min_offset: -20,
            max_offset: 20,
            negative_coefficients: false,
        },
        3 => Level {
            max_coefficient: 12,
            min_solution: -20,
            max_solution: 20,
            min_offset: -50,
            max_offset: 50,
            negative_coefficients: true,
        },
        _ => Level {
            max_coefficient: 25,
            min_solution: -50,
            max_solution: 50,
            min_offset: -200,
            max_offset: 200,
            negative_coefficients: true,
        },
    }
}

pub(super) fn generate(difficulty: u32, rng: &mut impl Rng) -> Solved {
    let level = level(difficulty);
    // |a| >= 2 and b != 0 so that both steps always do real work.
    let mut a = rng.random_range(2..=level.max_coefficient);
    if level.negative_coefficients && rng.random_bool(0.5) {
        a = -a;
    }
    let x = rng.random_range(level.min_solution..=level.max_solution);
    let b = loop {
        let b = rng.random_range(level.min_offset..=level.max_offset);
        if b != 0 {
            break b;
        }
    };
    solve(a, b, a * x + b)
}

/// The worked solution of `a*x+b=c`; the caller guarantees `a` divides `c-b`.
fn solve(a: i64, b: i64, c: i64) -> Solved {
    let moved = c - b;
    let x = moved / a;
    let undo_offset = if b > 0 {
        format!("{c}-{b}")
    } else {
        format!("{c}+{}", -b)
    };
    Solved {
        prompt: format!("{a}x{}={c}", signed_term(b)),
        answer: x.to_string(),
        steps: vec![
            format!("{a}x={undo_offset}={moved}"),
            format!("x={moved}/{a}={x}"),
        ],
    }
}

/// `+7` or `-7`, as a term following another.
fn signed_term(value: i64) -> String {
    if value < 0 {
        value.to_string()
    } else {
        format!("+{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn worked_examples() {
        let solved = solve(3, 7, 22);
        assert_eq!(solved.prompt, "3x+7=22");
        assert_eq!(solved.steps, ["3x=22-7=15", "x=15/3=5"]);
        assert_eq!(solved.answer, "5");

        let negative = solve(-4, -5, 15);
        assert_eq!(negative.prompt, "-4x-5=15");
        assert_eq!(negative.steps, ["-4x=15+5=20", "x=20/-4=-5"]);
        assert_eq!(negative.answer, "-5");
    }

    /// Reads `a`, `b`, `c` back from a prompt such as `-4x-5=15`.
    fn parse_prompt(prompt: &str) -> (i64, i64, i64) {
        let (left, c) = prompt.split_once('=').unwrap();
        let (a, b) = left.split_once('x').unwrap();
        (a.parse().unwrap(), b.parse().unwrap(), c.parse().unwrap())
    }

    #[test]
    fn the_answer_solves_the_equation_and_steps_follow() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for difficulty in DIFFICULTY.0..=DIFFICULTY.1 {
            for _ in 0..300 {
                let solved = generate(difficulty, &mut rng);
                let (a, b, c) = parse_prompt(&solved.prompt);
                let x: i64 = solved.answer.parse().unwrap();
                assert_eq!(a * x + b, c, "{}", solved.prompt);
                assert!(a.abs() >= 2 && b != 0);

                let first: Vec<&str> = solved.steps[0].split('=').collect();
                assert_eq!(first[0], format!("{a}x"));
                assert_eq!(first[2].parse::<i64>().unwrap(), c - b);
                let second: Vec<&str> = solved.steps[1].split('=').collect();
                assert_eq!(second[1], format!("{}/{a}", c - b));
                assert_eq!(second[2], solved.answer);
                if difficulty == 1 {
                    assert!(a > 0 && b > 0 && x >= 0, "{}", solved.prompt);
                }
            }
        }
    }
}
