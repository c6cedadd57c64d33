//! Countdown: reach a target from given numbers with `+ - * /`, each number used at most once.
//!
//! Prompt `3 5 7 make 32`. The generator guarantees a solution by composing a random
//! expression over all the numbers and taking its value as the target. Steps are that
//! expression's operations bottom-up, then the whole expression: `5*7=35`, `35-3=32`,
//! `5*7-3=32`; the answer is `5*7-3`.
//!
//! The reference answer doubles as the instance: it uses every given number exactly once,
//! so [`verify_solution`] recovers the numbers from its literals and the target from its
//! value. That keeps `verify(task, reference, response)` self-contained.

use rand::Rng;
use rand::seq::IndexedRandom;

use super::Solved;
use super::expr::evaluate;

/// Difficulty = how many numbers are given; 2 is a warm-up level for curricula.
pub(super) const DIFFICULTY: (u32, u32) = (2, 4);

const MIN_NUMBER: i64 = 2;
const MAX_NUMBER: i64 = 12;
/// Keeps targets short; products of several numbers would otherwise dominate.
const MAX_TARGET: i64 = 999;
const ATTEMPTS: usize = 100;

pub(super) fn generate(count: u32, rng: &mut impl Rng) -> Solved {
    let count = count as usize;
    for _ in 0..ATTEMPTS {
        let numbers: Vec<i64> = (0..count)
            .map(|_| rng.random_range(MIN_NUMBER..=MAX_NUMBER))
            .collect();
        let solution = compose(&numbers, rng);
        let target = solution.value();
        // Keep targets short, and reject targets equal to a given number (trivial puzzles).
        if (1..=MAX_TARGET).contains(&target) && !numbers.contains(&target) {
            return solved(&numbers, &solution);
        }
    }
    // Practically unreachable. A sum of two or more numbers >= 2 exceeds each of them, so it
    // is always a valid target.
    let numbers: Vec<i64> = (0..count)
        .map(|_| rng.random_range(MIN_NUMBER..=MAX_NUMBER))
        .collect();
    let sum = numbers[1..]
        .iter()
        .fold(Node::Number(numbers[0]), |left, &number| {
            Node::combine(Operator::Add, left, Node::Number(number))
        });
    solved(&numbers, &sum)
}

fn solved(numbers: &[i64], solution: &Node) -> Solved {
    let expression = solution.render();
    let target = solution.value();
    let mut steps = Vec::new();
    solution.collect_steps(&mut steps);
    if steps.len() > 1 {
        steps.push(format!("{expression}={target}"));
    }
    let listed: Vec<String> = numbers.iter().map(i64::to_string).collect();
    Solved {
        prompt: format!("{} make {target}", listed.join(" ")),
        answer: expression,
        steps,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    Add,
    Subtract,
    Multiply,
    Divide,
}

impl Operator {
    fn symbol(self) -> char {
        match self {
            Operator::Add => '+',
            Operator::Subtract => '-',
            Operator::Multiply => '*',
            Operator::Divide => '/',
        }
    }

    fn precedence(self) -> u8 {
        match self {
            Operator::Add | Operator::Subtract => 1,
            Operator::Multiply | Operator::Divide => 2,
        }
    }

    /// `a - (b - c)` and `a / (b / c)` need their parentheses; `a + (b + c)` does not.
    fn groups_right_operand(self) -> bool {
        matches!(self, Operator::Subtract | Operator::Divide)
    }

    /// Keeps every intermediate result a positive integer, as in the game.
    fn allowed(self, left: i64, right: i64) -> bool {
        match self {
            Operator::Add => true,
            Operator::Subtract => left > right,
            Operator::Multiply => left * right <= MAX_TARGET,
            Operator::Divide => right > 1 && left % right == 0,
        }
    }

    fn apply(self, left: i64, right: i64) -> i64 {
        match self {
            Operator::Add => left + right,
            Operator::Subtract => left - right,
            Operator::Multiply => left * right,
            Operator::Divide => left / right,
        }
    }
}

/// An expression tree with each operation's value cached.
#[derive(Debug, Clone)]
enum Node {
    Number(i64),
    Operation {
        operator: Operator,
        left: Box<Node>,
        right: Box<Node>,
        value: i64,
    },
}

impl Node {
    fn combine(operator: Operator, left: Node, right: Node) -> Node {
        let value = operator.apply(left.value(), right.value());
        Node::Operation {
            operator,
            left: Box::new(left),
            right: Box::new(right),
            value,
        }
    }

    fn value(&self) -> i64 {
        match self {
            Node::Number(value) | Node::Operation { value, .. } => *value,
        }
    }

    /// Infix with only the parentheses precedence requires.
    fn render(&self) -> String {
        match self {
            Node::Number(value) => value.to_string(),
            Node::Operation {
                operator,
                left,
                right,
                ..
            } => {
                let left_text = left.render_under(*operator, false);
                let right_text = right.render_under(*operator, true);
                format!("{left_text}{}{right_text}", operator.symbol())
            }
        }
    }

    fn render_under(&self, parent: Operator, is_right: bool) -> String {
        let text = self.render();
        let Node::Operation { operator, .. } = self else {
            return text;
        };
        let binds_looser = operator.precedence() < parent.precedence();
        let same_level_on_right = is_right
            && operator.precedence() == parent.precedence()
            && parent.groups_right_operand();
        if binds_looser || same_level_on_right {
            format!("({text})")
        } else {
            text
        }
    }

    /// One `left op right=value` step per operation, operands before the operation using them.
    fn collect_steps(&self, steps: &mut Vec<String>) {
        if let Node::Operation {
            operator,
            left,
            right,
            value,
        } = self
        {
            left.collect_steps(steps);
            right.collect_steps(steps);
            steps.push(format!(
                "{}{}{}={value}",
                left.value(),
                operator.symbol(),
                right.value()
            ));
        }
    }
}

/// A random expression using every number once: repeatedly join two random subtrees with an
/// operator that keeps the intermediate result a positive integer (`+` always qualifies).
fn compose(numbers: &[i64], rng: &mut impl Rng) -> Node {
    let mut pool: Vec<Node> = numbers.iter().map(|&number| Node::Number(number)).collect();
    while pool.len() > 1 {
        let left = pool.swap_remove(rng.random_range(0..pool.len()));
        let right = pool.swap_remove(rng.random_range(0..pool.len()));
        let (a, b) = (left.value(), right.value());
        // Weighted so products and quotients are common enough to need real search.
        let candidates = [
            (Operator::Add, 3),
            (Operator::Subtract, 3),
            (Operator::Multiply, 3),
            (Operator::Divide, 2),
        ];
        let allowed: Vec<(Operator, u32)> = candidates
            .into_iter()
            .filter(|(operator, _)| operator.allowed(a, b))
            .collect();
        let operator = allowed
            .choose_weighted(rng, |(_, weight)| *weight)
            .map(|(operator, _)| *operator)
            .unwrap_or(Operator::Add);
        pool.push(Node::combine(operator, left, right));
    }
    pool.pop().unwrap_or(Node::Number(0))
}

/// True when `candidate` (an expression, optionally followed by `=...`) evaluates to the value
/// of `reference` and uses each of `reference`'s numbers at most once.
pub(super) fn verify_solution(reference: &str, candidate: &str) -> bool {
    let Some(instance) = evaluate(reference) else {
        return false;
    };
    // "5*7-3=32" states its value; judge the expression, not the claim.
    let expression = candidate.split('=').next().unwrap_or_default();
    let Some(attempt) = evaluate(expression) else {
        return false;
    };
    attempt.value == instance.value && is_sub_multiset(&attempt.literals, &instance.literals)
}

fn is_sub_multiset(used: &[i128], available: &[i128]) -> bool {
    let mut remaining = available.to_vec();
    used.iter().all(
        |number| match remaining.iter().position(|candidate| candidate == number) {
            Some(index) => {
                remaining.swap_remove(index);
                true
            }
            None => false,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn parse_prompt(prompt: &str) -> (Vec<i128>, i128) {
        let (numbers, target) = prompt.split_once(" make ").unwrap();
        (
            numbers
                .split(' ')
                .map(|number| number.parse().unwrap())
                .collect(),
            target.parse().unwrap(),
        )
    }

    #[test]
    fn solutions_reach_the_target_using_exactly_the_given_numbers() {
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        for count in DIFFICULTY.0..=DIFFICULTY.1 {
            for _ in 0..500 {
                let solved = generate(count, &mut rng);
                let (numbers, target) = parse_prompt(&solved.prompt);
                assert_eq!(numbers.len(), count as usize);
                assert!(
                    !numbers.contains(&target) && (1..=999).contains(&target),
                    "{}",
                    solved.prompt
                );
                let evaluated = evaluate(&solved.answer).unwrap();
                assert_eq!(
                    evaluated.value, target,
                    "{} -> {}",
                    solved.prompt, solved.answer
                );
                let (mut used, mut given) = (evaluated.literals.clone(), numbers.clone());
                used.sort();
                given.sort();
                assert_eq!(used, given, "{} -> {}", solved.prompt, solved.answer);
                assert!(verify_solution(&solved.answer, &solved.answer));
            }
        }
    }

    #[test]
    fn steps_are_the_operations_of_the_solution() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        for count in DIFFICULTY.0..=DIFFICULTY.1 {
            for _ in 0..200 {
                let solved = generate(count, &mut rng);
                let (_, target) = parse_prompt(&solved.prompt);
                let operations = count as usize - 1;
                let expected_steps = if operations > 1 {
                    operations + 1
                } else {
                    operations
                };
                assert_eq!(solved.steps.len(), expected_steps, "{:?}", solved.steps);
                for step in &solved.steps {
                    let (left, value) = step.split_once('=').unwrap();
                    let value: i128 = value.parse().unwrap();
                    assert_eq!(evaluate(left).unwrap().value, value, "{step}");
                    assert!(value > 0, "intermediate results stay positive: {step}");
                }
                assert_eq!(
                    solved.steps.last().unwrap().rsplit('=').next().unwrap(),
                    target.to_string()
                );
            }
        }
    }

    #[test]
    fn rendering_keeps_only_needed_parentheses() {
        let n = Node::Number;
        let minus = Node::combine(Operator::Subtract, n(9), n(4));
        assert_eq!(
            Node::combine(Operator::Multiply, minus.clone(), n(3)).render(),
            "(9-4)*3"
        );
        assert_eq!(
            Node::combine(Operator::Subtract, n(12), minus.clone()).render(),
            "12-(9-4)"
        );
        assert_eq!(
            Node::combine(Operator::Add, n(12), minus).render(),
            "12+9-4"
        );
        let quotient = Node::combine(Operator::Divide, n(8), n(4));
        assert_eq!(
            Node::combine(Operator::Divide, n(12), quotient.clone()).render(),
            "12/(8/4)"
        );
        assert_eq!(
            Node::combine(Operator::Multiply, n(3), quotient).render(),
            "3*8/4"
        );
    }

    #[test]
    fn verification_rules() {
        let reference = "5*7-3"; // numbers 5 7 3, target 32
        assert!(verify_solution(reference, "7*5-3"));
        assert!(verify_solution(reference, "(7*5)-3"));
        assert!(verify_solution(reference, "5*7-3=32"));
        assert!(verify_solution("(2+2)*8", "8*(2+2)"));
        assert!(
            !verify_solution(reference, "32"),
            "the target is not a given number"
        );
        assert!(!verify_solution(reference, "5*7-3-0"), "0 is not given");
        assert!(!verify_solution(reference, "5*7-3+3-3"), "3 is given once");
        assert!(
            !verify_solution(reference, "5*7-2"),
            "wrong value and 2 is not given"
        );
        assert!(!verify_solution(reference, "7*(5-3/3)"), "3 is given once");
        assert!(
            verify_solution(reference, "5*7-3=31"),
            "the expression is judged, not the claimed value"
        );
        assert!(!verify_solution(reference, "(5*7-3"));
        assert!(!verify_solution("garbage", "5*7-3"));
        // Exact division only, even when the final value would come out right.
        assert!(verify_solution("8/4+3", "8/4+3"));
        assert!(!verify_solution("7/2*2", "7/2*2"));
    }
}
