//! Multi-digit `+`, `-`, `*` worked column by column, as taught on paper.
//!
//! Prompt `347+285+109=`; one step per column from the ones digit up, e.g.
//! `7+5+9=21 write 1 carry 2`, `4+8+0+2=14 write 4 carry 1`, `3+2+1+1=7 write 7`; the answer
//! is the written digits read from the last column back. The wording is deliberately tiny and
//! identical for every column so a character-level model of a few million parameters can
//! learn it: each step only needs the column's digits and the previous carry.

use rand::Rng;

use super::Solved;

/// Difficulty = digits per operand.
pub(super) const DIFFICULTY: (u32, u32) = (1, 6);

pub(super) fn generate(digits: u32, rng: &mut impl Rng) -> Solved {
    match rng.random_range(0..4) {
        0 => addition(&random_operands(2, digits, rng)),
        1 => addition(&random_operands(3, digits, rng)),
        2 => {
            let [a, b] = random_operands(2, digits, rng)[..] else {
                unreachable!()
            };
            subtraction(a.max(b), a.min(b))
        }
        _ => {
            let [a] = random_operands(1, digits, rng)[..] else {
                unreachable!()
            };
            multiplication(a, rng.random_range(2..=9))
        }
    }
}

/// `count` numbers of exactly `digits` digits (one-digit operands may be 0).
pub(super) fn random_operands(count: usize, digits: u32, rng: &mut impl Rng) -> Vec<u64> {
    let low = if digits == 1 {
        0
    } else {
        10u64.pow(digits - 1)
    };
    let high = 10u64.pow(digits) - 1;
    (0..count).map(|_| rng.random_range(low..=high)).collect()
}

/// Decimal digits, ones first.
fn digits_of(mut value: u64) -> Vec<u64> {
    let mut digits = vec![value % 10];
    while value >= 10 {
        value /= 10;
        digits.push(value % 10);
    }
    digits
}

fn join_terms(terms: &[u64], operator: &str) -> String {
    terms
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(operator)
}

/// Column addition. Operands have equal length here, but shorter ones are padded with zeros.
pub(super) fn addition(operands: &[u64]) -> Solved {
    let columns_of: Vec<Vec<u64>> = operands.iter().map(|&operand| digits_of(operand)).collect();
    let width = columns_of.iter().map(Vec::len).max().unwrap_or(1);
    let mut steps = Vec::with_capacity(width);
    let mut carry = 0;
    for column in 0..width {
        let mut terms: Vec<u64> = columns_of
            .iter()
            .map(|digits| digits.get(column).copied().unwrap_or(0))
            .collect();
        if carry > 0 {
            terms.push(carry);
        }
        let sum: u64 = terms.iter().sum();
        let is_last = column + 1 == width;
        steps.push(column_step(&join_terms(&terms, "+"), sum, is_last, "carry"));
        carry = sum / 10;
    }
    Solved {
        prompt: format!("{}=", join_terms(operands, "+")),
        answer: operands.iter().sum::<u64>().to_string(),
        steps,
    }
}

/// Column subtraction of `smaller` from `larger`. A column that would go negative borrows
/// ten, written as a leading 1 on its top digit (`14-8=6 write 6 borrow 1`); the next
/// column pays it back with a trailing `-1`.
fn subtraction(larger: u64, smaller: u64) -> Solved {
    let top = digits_of(larger);
    let bottom = digits_of(smaller);
    let mut steps = Vec::with_capacity(top.len());
    let mut borrowed = false;
    for (column, &top_digit) in top.iter().enumerate() {
        let bottom_digit = bottom.get(column).copied().unwrap_or(0);
        let owed = u64::from(borrowed);
        let borrows_now = top_digit < bottom_digit + owed;
        let minuend = if borrows_now {
            top_digit + 10
        } else {
            top_digit
        };
        let difference = minuend - bottom_digit - owed;
        let mut step = format!("{minuend}-{bottom_digit}");
        if borrowed {
            step.push_str("-1");
        }
        step.push_str(&format!("={difference} write {difference}"));
        if borrows_now {
            step.push_str(" borrow 1");
        }
        steps.push(step);
        borrowed = borrows_now;
    }
    Solved {
        prompt: format!("{larger}-{smaller}="),
        answer: (larger - smaller).to_string(),
        steps,
    }
}

/// Long multiplication by a one-digit `factor`, one column of `number` at a time.
fn multiplication(number: u64, factor: u64) -> Solved {
    let digits = digits_of(number);
    let mut steps = Vec::with_capacity(digits.len());
    let mut carry = 0;
    for (column, &digit) in digits.iter().enumerate() {
        let product = digit * factor + carry;
        let mut left = format!("{digit}*{factor}");
        if carry > 0 {
            left.push_str(&format!("+{carry}"));
        }
        steps.push(column_step(
            &left,
            product,
            column + 1 == digits.len(),
            "carry",
        ));
        carry = product / 10;
    }
    Solved {
        prompt: format!("{number}*{factor}="),
        answer: (number * factor).to_string(),
        steps,
    }
}

/// `left=value write d carry c`; the last column writes its whole value.
fn column_step(left: &str, value: u64, is_last: bool, carry_word: &str) -> String {
    if is_last {
        return format!("{left}={value} write {value}");
    }
    let (written, carried) = (value % 10, value / 10);
    if carried > 0 {
        format!("{left}={value} write {written} {carry_word} {carried}")
    } else {
        format!("{left}={value} write {written}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::expr::evaluate;
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// One parsed step: `left=value write written [carry|borrow n]`.
    struct Step {
        left: String,
        value: i128,
        written: String,
        passed_on: Option<(String, u64)>,
    }

    fn parse_step(step: &str) -> Step {
        let (equation, rest) = step.split_once(" write ").expect(step);
        let (left, value) = equation.split_once('=').expect(step);
        let mut words = rest.split(' ');
        let written = words.next().unwrap().to_owned();
        let passed_on = words
            .next()
            .map(|word| (word.to_owned(), words.next().unwrap().parse().unwrap()));
        assert_eq!(words.next(), None, "{step}");
        Step {
            left: left.to_owned(),
            value: value.parse().unwrap(),
            written,
            passed_on,
        }
    }

    /// Checks every step's arithmetic, the carry/borrow chain, and that the written digits
    /// spell the answer, which in turn is the value of the prompt.
    fn assert_consistent(solved: &Solved) {
        let prompt_value = evaluate(solved.prompt.trim_end_matches('=')).unwrap().value;
        assert_eq!(solved.answer, prompt_value.to_string(), "{}", solved.prompt);
        let mut written_digits = String::new();
        let mut incoming: Option<(String, u64)> = None;
        for (index, text) in solved.steps.iter().enumerate() {
            let step = parse_step(text);
            assert_eq!(evaluate(&step.left).unwrap().value, step.value, "{text}");
            let is_last = index + 1 == solved.steps.len();
            let expected_written = if is_last { step.value } else { step.value % 10 };
            assert_eq!(step.written, expected_written.to_string(), "{text}");
            // What the previous column passed on must be taken up as the last term here.
            match &incoming {
                Some((word, _)) if word == "borrow" => assert!(step.left.ends_with("-1"), "{text}"),
                Some((_, carried)) => {
                    assert!(step.left.ends_with(&format!("+{carried}")), "{text}")
                }
                None => {}
            }
            if let Some((word, amount)) = &step.passed_on {
                assert!(!is_last, "{text}");
                if word == "carry" {
                    assert_eq!(i128::from(*amount), step.value / 10, "{text}");
                } else {
                    assert_eq!((word.as_str(), *amount), ("borrow", 1), "{text}");
                    let minuend = step.left.split('-').next().unwrap();
                    assert!(minuend.len() == 2 && minuend.starts_with('1'), "{text}");
                }
            }
            incoming = step.passed_on;
            written_digits.insert_str(0, &step.written);
        }
        let spelled = written_digits.trim_start_matches('0');
        let spelled = if spelled.is_empty() { "0" } else { spelled };
        assert_eq!(spelled, solved.answer, "{:?}", solved.steps);
    }

    #[test]
    fn worked_examples() {
        let sum = addition(&[347, 285, 109]);
        assert_eq!(sum.prompt, "347+285+109=");
        assert_eq!(sum.answer, "741");
        assert_eq!(
            sum.steps,
            [
                "7+5+9=21 write 1 carry 2",
                "4+8+0+2=14 write 4 carry 1",
                "3+2+1+1=7 write 7"
            ]
        );

        let difference = subtraction(503, 278);
        assert_eq!(difference.answer, "225");
        assert_eq!(
            difference.steps,
            [
                "13-8=5 write 5 borrow 1",
                "10-7-1=2 write 2 borrow 1",
                "5-2-1=2 write 2"
            ]
        );

        let product = multiplication(347, 6);
        assert_eq!(product.answer, "2082");
        assert_eq!(
            product.steps,
            [
                "7*6=42 write 2 carry 4",
                "4*6+4=28 write 8 carry 2",
                "3*6+2=20 write 20"
            ]
        );

        assert_eq!(
            addition(&[999, 999]).steps.last().unwrap(),
            "9+9+1=19 write 19"
        );
        assert_eq!(subtraction(347, 345).answer, "2");
    }

    #[test]
    fn steps_are_consistent_at_every_difficulty() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for digits in DIFFICULTY.0..=DIFFICULTY.1 {
            for _ in 0..300 {
                let solved = generate(digits, &mut rng);
                assert_consistent(&solved);
                let operand_lengths: Vec<usize> = solved
                    .prompt
                    .trim_end_matches('=')
                    .split(['+', '-', '*'])
                    .map(str::len)
                    .collect();
                assert_eq!(operand_lengths[0], digits as usize, "{}", solved.prompt);
            }
        }
    }

    #[test]
    fn three_digit_problems_stay_short() {
        // The budget that keeps the task learnable by a tiny character-level model.
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for _ in 0..300 {
            let solved = generate(3, &mut rng);
            let completion = super::super::format_completion(&solved.steps, &solved.answer);
            assert!(solved.prompt.len() <= 12, "{}", solved.prompt);
            assert!(completion.len() <= 120, "{completion}");
        }
    }
}
