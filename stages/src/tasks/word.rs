//! Multi-step word problems from a handful of templates (shopping, change, sharing, ages,
//! savings). Each step is one `left op right=value` line, so the chain of thought is the
//! sequence of operations a person would do; every answer is a non-negative integer.

use rand::Rng;
use rand::seq::IndexedRandom;

use super::Solved;

/// Difficulty = more steps and larger numbers.
pub(super) const DIFFICULTY: (u32, u32) = (1, 3);

const NAMES: [&str; 10] = [
    "Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hal", "Ivy", "Jon",
];
const GOODS: [&str; 8] = [
    "pens", "books", "cups", "apples", "toys", "cards", "plates", "balls",
];
const SHAREABLE: [&str; 5] = ["apples", "stickers", "marbles", "cookies", "cards"];

pub(super) fn generate(difficulty: u32, rng: &mut impl Rng) -> Solved {
    let scale = Scale::of(difficulty);
    match rng.random_range(0..5) {
        0 => shopping(difficulty, scale, rng),
        1 => change(difficulty, scale, rng),
        2 => sharing(difficulty, scale, rng),
        3 => ages(difficulty, scale, rng),
        _ => savings(difficulty, scale, rng),
    }
}

/// How large the numbers of one difficulty level get.
#[derive(Clone, Copy)]
struct Scale {
    max_count: i64,
    max_price: i64,
}

impl Scale {
    fn of(difficulty: u32) -> Scale {
        match difficulty {
            1 => Scale {
                max_count: 5,
                max_price: 9,
            },
            2 => Scale {
                max_count: 9,
                max_price: 20,
            },
            _ => Scale {
                max_count: 12,
                max_price: 50,
            },
        }
    }
}

/// Records each operation as a step and returns its value, so templates read like the
/// calculation they describe.
#[derive(Default)]
struct Work {
    steps: Vec<String>,
}

impl Work {
    fn add(&mut self, left: i64, right: i64) -> i64 {
        self.record(left, '+', right, left + right)
    }
    fn subtract(&mut self, left: i64, right: i64) -> i64 {
        self.record(left, '-', right, left - right)
    }
    fn multiply(&mut self, left: i64, right: i64) -> i64 {
        self.record(left, '*', right, left * right)
    }
    fn divide(&mut self, left: i64, right: i64) -> i64 {
        debug_assert_eq!(left % right, 0, "templates only divide exactly");
        self.record(left, '/', right, left / right)
    }
    fn record(&mut self, left: i64, operator: char, right: i64, value: i64) -> i64 {
        self.steps.push(format!("{left}{operator}{right}={value}"));
        value
    }
    fn finish(self, prompt: String, answer: i64) -> Solved {
        Solved {
            prompt,
            answer: answer.to_string(),
            steps: self.steps,
        }
    }
}

/// `count` distinct entries of `pool`.
fn distinct<'a>(pool: &[&'a str], count: usize, rng: &mut impl Rng) -> Vec<&'a str> {
    pool.choose_multiple(rng, count).copied().collect()
}

fn name(rng: &mut impl Rng) -> &'static str {
    NAMES.choose(rng).copied().unwrap_or("Ann")
}

/// Purchases as `(quantity, goods, unit price)`; quantities start at 2 so plurals read right.
fn purchases(count: usize, scale: Scale, rng: &mut impl Rng) -> Vec<(i64, &'static str, i64)> {
    distinct(&GOODS, count, rng)
        .into_iter()
        .map(|goods| {
            (
                rng.random_range(2..=scale.max_count),
                goods,
                rng.random_range(2..=scale.max_price),
            )
        })
        .collect()
}

/// "3 pens at 4 dollars each, 2 books at 7 dollars each and 5 cups at 3 dollars each".
fn describe_purchases(purchases: &[(i64, &str, i64)]) -> String {
    let phrases: Vec<String> = purchases
        .iter()
        .map(|(quantity, goods, price)| format!("{quantity} {goods} at {price} dollars each"))
        .collect();
    match phrases.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Prices every purchase, then adds up the subtotals.
fn total_cost(work: &mut Work, purchases: &[(i64, &str, i64)]) -> i64 {
    let subtotals: Vec<i64> = purchases
        .iter()
        .map(|&(quantity, _, price)| work.multiply(quantity, price))
        .collect();
    let (&first, rest) = subtotals.split_first().expect("at least one purchase");
    rest.iter()
        .fold(first, |total, &subtotal| work.add(total, subtotal))
}

fn shopping(difficulty: u32, scale: Scale, rng: &mut impl Rng) -> Solved {
    let buyer = name(rng);
    let bought = purchases(difficulty as usize + 1, scale, rng);
    let mut work = Work::default();
    let total = total_cost(&mut work, &bought);
    let prompt = format!(
        "{buyer} buys {}. How many dollars does {buyer} spend?",
        describe_purchases(&bought)
    );
    work.finish(prompt, total)
}

fn change(difficulty: u32, scale: Scale, rng: &mut impl Rng) -> Solved {
    let buyer = name(rng);
    let bought = purchases(difficulty as usize, scale, rng);
    let mut work = Work::default();
    let cost = total_cost(&mut work, &bought);
    let money = cost + rng.random_range(0..=scale.max_price * 2);
    let left = work.subtract(money, cost);
    let prompt = format!(
        "{buyer} has {money} dollars and buys {}. How many dollars does {buyer} have left?",
        describe_purchases(&bought)
    );
    work.finish(prompt, left)
}

/// Built backwards from the share per friend so the division is exact.
fn sharing(difficulty: u32, scale: Scale, rng: &mut impl Rng) -> Solved {
    let owner = name(rng);
    let goods = SHAREABLE.choose(rng).copied().unwrap_or("apples");
    let share = rng.random_range(2..=scale.max_count + 3);
    let friends = rng.random_range(2..=scale.max_count.min(8));
    let shared = share * friends;
    let given_away = if difficulty >= 2 {
        rng.random_range(1..=scale.max_price)
    } else {
        0
    };
    let before_giving = shared + given_away;
    let bought = if difficulty >= 3 {
        rng.random_range(2..=(before_giving - 2).min(scale.max_price))
    } else {
        0
    };
    let start = before_giving - bought;

    let mut work = Work::default();
    let mut held = start;
    let mut story = format!("{owner} has {start} {goods}");
    if bought > 0 {
        held = work.add(held, bought);
        story.push_str(&format!(", buys {bought} more"));
    }
    if given_away > 0 {
        held = work.subtract(held, given_away);
        story.push_str(&format!(", gives {given_away} away and shares the rest"));
    } else {
        story.push_str(" and shares them");
    }
    let each = work.divide(held, friends);
    let prompt =
        format!("{story} equally among {friends} friends. How many {goods} does each friend get?");
    work.finish(prompt, each)
}

/// A chain of people, each described relative to the one before.
fn ages(difficulty: u32, scale: Scale, rng: &mut impl Rng) -> Solved {
    let people = distinct(&NAMES, difficulty as usize + 1, rng);
    let mut age = rng.random_range(2..=scale.max_price.min(30));
    let mut work = Work::default();
    let mut story = format!("{} is {age} years old.", people[0]);
    for pair in people.windows(2) {
        let (known, next) = (pair[0], pair[1]);
        let factor = rng.random_range(2..=3);
        let relation = rng.random_range(0..3);
        if relation == 0 && age * factor <= 99 {
            age = work.multiply(age, factor);
            story.push_str(&format!(" {next} is {factor} times as old as {known}."));
        } else if relation == 1 && age > 2 {
            let gap = rng.random_range(1..age);
            age = work.subtract(age, gap);
            story.push_str(&format!(" {next} is {gap} years younger than {known}."));
        } else {
            let gap = rng.random_range(1..=scale.max_price);
            age = work.add(age, gap);
            story.push_str(&format!(" {next} is {gap} years older than {known}."));
        }
    }
    let last = people[people.len() - 1];
    work.finish(format!("{story} How old is {last}?"), age)
}

fn savings(difficulty: u32, scale: Scale, rng: &mut impl Rng) -> Solved {
    let saver = name(rng);
    let weekly = rng.random_range(2..=scale.max_price);
    let weeks = rng.random_range(2..=scale.max_count + 3);
    let mut work = Work::default();
    let saved = work.multiply(weekly, weeks);
    let plan = format!("saves {weekly} dollars each week for {weeks} weeks");
    if difficulty == 1 {
        let prompt = format!("{saver} {plan}. How many dollars does {saver} save?");
        return work.finish(prompt, saved);
    }
    let start = rng.random_range(2..=scale.max_price * 2);
    let held = work.add(start, saved);
    if difficulty == 2 {
        let prompt = format!(
            "{saver} has {start} dollars and {plan}. How many dollars does {saver} have then?"
        );
        return work.finish(prompt, held);
    }
    let spent = rng.random_range(1..=held);
    let left = work.subtract(held, spent);
    let prompt = format!(
        "{saver} has {start} dollars, {plan} and then spends {spent} dollars. How many dollars does {saver} have left?"
    );
    work.finish(prompt, left)
}

#[cfg(test)]
mod tests {
    use super::super::expr::evaluate;
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn numbers_in(text: &str) -> Vec<i128> {
        text.split(|c: char| !c.is_ascii_digit())
            .filter(|part| !part.is_empty())
            .map(|part| part.parse().unwrap())
            .collect()
    }

    #[test]
    fn steps_are_correct_and_only_use_known_numbers() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        for difficulty in DIFFICULTY.0..=DIFFICULTY.1 {
            for _ in 0..500 {
                let solved = generate(difficulty, &mut rng);
                let mut known = numbers_in(&solved.prompt);
                for step in &solved.steps {
                    let (left, value) = step.split_once('=').unwrap();
                    let evaluated = evaluate(left).unwrap();
                    assert_eq!(
                        evaluated.value.to_string(),
                        value,
                        "{step} in {}",
                        solved.prompt
                    );
                    for literal in &evaluated.literals {
                        assert!(
                            known.contains(literal),
                            "{step}: {literal} comes from nowhere in {}",
                            solved.prompt
                        );
                    }
                    known.push(evaluated.value);
                }
                let last_value = solved.steps.last().unwrap().rsplit('=').next().unwrap();
                assert_eq!(last_value, solved.answer, "{}", solved.prompt);
                assert!(solved.answer.parse::<i64>().unwrap() >= 0);
                assert!(solved.prompt.ends_with('?'));
            }
        }
    }

    #[test]
    fn harder_levels_take_more_steps() {
        let mut rng = ChaCha8Rng::seed_from_u64(32);
        let mean_steps = |difficulty, rng: &mut ChaCha8Rng| {
            (0..400)
                .map(|_| generate(difficulty, rng).steps.len())
                .sum::<usize>() as f64
                / 400.0
        };
        let means: Vec<f64> = (1..=3)
            .map(|difficulty| mean_steps(difficulty, &mut rng))
            .collect();
        assert!(means[0] < means[1] && means[1] < means[2], "{means:?}");
    }

    #[test]
    fn a_worked_example_reads_naturally() {
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        let solved = shopping(1, Scale::of(1), &mut rng);
        assert!(
            solved.prompt.contains(" buys ") && solved.prompt.contains(" and "),
            "{}",
            solved.prompt
        );
        assert_eq!(solved.steps.len(), 3);
    }
}
