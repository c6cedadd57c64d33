//! The one answer checker every reward, filter and evaluation uses.
//!
//! It reads model output, so it is total: any string, however long or malformed, gives an
//! answer without panicking. It is lenient about presentation and strict about content: an
//! answer that hedges between several numbers, expressions or options is wrong. The answer
//! is the content of an `<answer>…</answer>` block; reading an untagged response's last
//! `\boxed{}` or last number instead is opt-in (`fallback`), since it lets unformatted and
//! truncated completions count as correct.
//!
//! Answers to numeric problems are compared as exact values (`number`): `1,234`, `0.5`,
//! `\frac{1}{2}`, `50\%`, `-3`, `\$18`, `x = 5`, `\text{12 cm}`, `2+3` are all read, from
//! `<answer>` blocks, GSM8K `#### 42` lines and MATH `\boxed{}`s (`latex`). A reference that
//! is one option letter `A`–`E` asks for that option (`choice`). `countdown` answers are
//! expressions judged by the countdown rules.

mod choice;
mod latex;
mod number;

use super::{countdown, expr};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const ANSWER_OPEN: &str = "<answer>";
const ANSWER_CLOSE: &str = "</answer>";
const COUNTDOWN: &str = "countdown";

/// The answer a response gives: the trimmed content of its last complete
/// `<answer>…</answer>` block. `None` when there is none or it is empty.
pub fn extract_answer(task: &str, response: &str) -> Option<String> {
    extract_answer_with(task, response, false)
}

/// [`extract_answer`]; with `fallback`, a response without an answer block gives the
/// content of its `\boxed{}` (none when the last box is left open or boxes differ), else its
/// last number (for `countdown`, its last expression).
pub fn extract_answer_with(task: &str, response: &str, fallback: bool) -> Option<String> {
    let non_empty = |content: &str| {
        let content = content.trim();
        (!content.is_empty()).then(|| content.to_owned())
    };
    if let Some(content) = last_answer_block(response) {
        return non_empty(content);
    }
    if !fallback {
        None
    } else if let Some(boxed) = latex::boxed(response) {
        // A truncated box is an unfinished answer, not a cue to read some other number.
        boxed.and_then(non_empty)
    } else if task == COUNTDOWN {
        last_expression(response).map(str::to_owned)
    } else {
        numbers_in(response).pop()
    }
}

/// Whether `response` answers a problem of `task` whose reference answer is `reference`, by
/// its answer block (see [`extract_answer`]). `countdown` evaluates the response's expression
/// against the reference expression's value and numbers (see `countdown::verify_solution`).
/// Every other task compares option letters when the reference is one (`B`, `(B)`), else
/// exact values when the reference states a number (see the module documentation), else
/// the texts with LaTeX wrappers and whitespace removed.
pub fn verify(task: &str, reference: &str, response: &str) -> bool {
    verify_with(task, reference, response, false)
}

/// [`verify`], reading the answer as [`extract_answer_with`] does.
pub fn verify_with(task: &str, reference: &str, response: &str, fallback: bool) -> bool {
    // A code problem's reference is its test spec: correct means every test passes.
    if task == crate::code_exec::CODE_TASK {
        return crate::code_exec::verify(reference, response);
    }
    let Some(answer) = extract_answer_with(task, response, fallback) else {
        return false;
    };
    if task == COUNTDOWN {
        return countdown_matches(reference, &answer);
    }
    answers_match(reference, &answer)
}

/// The value an extracted answer stands for, as text that is equal exactly for equal values:
/// a number in canonical form (`1,234`, `1234.0` and `x = 1234` give `1234`; `26 dollars`
/// gives `26`; `0.5` and `\frac{1}{2}` give `1/2`; `50\%` gives `50%`), an option as `(B)`,
/// for `countdown` the value of the expression (`5*7-3` and `7*5-3` give `32`). `None` when
/// the answer states no single value. (A percentage keeps its sign: `50%` matches both `50`
/// and `0.5`, which do not match each other, so no one text can stand for all three.)
pub fn canonical_answer(task: &str, answer: &str) -> Option<String> {
    // Programs have no value to vote on.
    if task == crate::code_exec::CODE_TASK {
        return None;
    }
    if task == COUNTDOWN {
        return countdown_value(answer).map(|value| value.to_string());
    }
    number::value_of(answer)
        .map(|value| value.canonical())
        .or_else(|| choice::answer_option(answer).map(|option| format!("({option})")))
}

/// The text between the first `<think>` and the `</think>` after it.
pub fn think_block(response: &str) -> Option<&str> {
    let (_, after_open) = response.split_once(THINK_OPEN)?;
    let (inside, _) = after_open.split_once(THINK_CLOSE)?;
    Some(inside)
}

/// The result the reasoning in a response's `<think>` block reaches. For column work
/// (`4+8+2=14 write 4 carry 1` lines, as the `arithmetic` and `addition` solutions are
/// written) that is the written digits read from the last column back; otherwise the number
/// after the last `=` of the last line that has one (`x=15/3=5` gives `5`). `None` without a
/// closed think block or a result in it.
pub fn reasoning_result(response: &str) -> Option<String> {
    let lines: Vec<&str> = think_block(response)?
        .lines()
        .map(str::trim)
        .filter(|l| l.contains('='))
        .collect();
    let last = *lines.last()?;
    if written_digits(last).is_some() {
        let mut digits = String::new();
        for line in lines.iter().rev() {
            match written_digits(line) {
                Some(written) => digits.push_str(written),
                None => break,
            }
        }
        return Some(digits);
    }
    let (_, after) = last.rsplit_once('=')?;
    numbers_in(after).into_iter().next()
}

/// The digits a column step writes: `d` in `…=n write d [carry|borrow c]`.
fn written_digits(line: &str) -> Option<&str> {
    let (_, after) = line.split_once(" write ")?;
    let written = after.split_whitespace().next()?;
    written
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then_some(written)
}

/// Whether `response` is exactly `<think>…</think>` then `<answer>…</answer>` (surrounding
/// whitespace allowed), with no stray tags inside and a non-empty answer.
pub fn has_format(response: &str) -> bool {
    let Some(rest) = response.trim().strip_prefix(THINK_OPEN) else {
        return false;
    };
    let Some((thinking, rest)) = rest.split_once(THINK_CLOSE) else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix(ANSWER_OPEN) else {
        return false;
    };
    let Some(answer) = rest.strip_suffix(ANSWER_CLOSE) else {
        return false;
    };
    let has_tag = |text: &str| {
        [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
            .iter()
            .any(|tag| text.contains(tag))
    };
    !has_tag(thinking) && !has_tag(answer) && !answer.trim().is_empty()
}

fn last_answer_block(response: &str) -> Option<&str> {
    let start = response.rfind(ANSWER_OPEN)? + ANSWER_OPEN.len();
    let rest = &response[start..];
    rest.find(ANSWER_CLOSE).map(|end| &rest[..end])
}

fn answers_match(reference: &str, answer: &str) -> bool {
    if let Some(option) = choice::reference_option(reference) {
        return choice::answer_option(answer) == Some(option);
    }
    match number::value_of(reference) {
        Some(expected) => number::value_of(answer).is_some_and(|value| expected.matches(&value)),
        None => same_text(reference, answer),
    }
}

/// For references that state no number (`\sqrt{2}`, `\text{Evelyn}`): equal once LaTeX
/// wrappers, whitespace and a final full stop are gone.
fn same_text(reference: &str, answer: &str) -> bool {
    let normal = |text: &str| {
        let plain = latex::plain(latex::final_part(text)?)?;
        let squeezed: String = plain.split_whitespace().collect();
        let squeezed = squeezed.strip_suffix('.').unwrap_or(&squeezed).to_owned();
        (!squeezed.is_empty()).then_some(squeezed)
    };
    normal(reference).is_some_and(|reference| normal(answer) == Some(reference))
}

/// The value of a countdown answer: its expression before any `=`, or the one expression
/// among words ("it is 5*7-3").
fn countdown_value(answer: &str) -> Option<i128> {
    let before_equals = answer.split('=').next().unwrap_or_default();
    if let Some(evaluated) = expr::evaluate(before_equals) {
        return Some(evaluated.value);
    }
    match expression_runs(before_equals).as_slice() {
        [only] => expr::evaluate(only).map(|evaluated| evaluated.value),
        _ => None,
    }
}

fn countdown_matches(reference: &str, answer: &str) -> bool {
    if countdown::verify_solution(reference, answer) {
        return true;
    }
    // Tolerates words around a single expression ("it is 5*7-3"), but not alternatives.
    let before_equals = answer.split('=').next().unwrap_or_default();
    match expression_runs(before_equals).as_slice() {
        [only] => *only != answer && countdown::verify_solution(reference, only),
        _ => false,
    }
}

/// Every number in `text`, in order, as written minus thousands separators: `-5`, `1234`,
/// `2.5`. A `-` is a sign only where it cannot be subtraction (not after a digit, letter
/// or closing parenthesis), so `10-5` holds `10` and `5` but `x = -5` holds `-5`.
fn numbers_in(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let is_digit = |index: usize| chars.get(index).is_some_and(char::is_ascii_digit);
    let mut numbers = Vec::new();
    let mut index = 0;
    while index < chars.len() {
        if !is_digit(index) {
            index += 1;
            continue;
        }
        let start = index;
        let mut number = String::new();
        if start >= 1 && matches!(chars[start - 1], '-' | '\u{2212}') {
            let before = start.checked_sub(2).map(|before| chars[before]);
            if !before.is_some_and(|c| c.is_alphanumeric() || c == ')') {
                number.push('-');
            }
        }
        while is_digit(index) {
            number.push(chars[index]);
            index += 1;
        }
        // After a first group of at most three digits, ",ddd" not followed by another digit
        // continues the number (thousands separators).
        let is_group = |at: usize| {
            chars.get(at) == Some(&',')
                && (1..=3).all(|offset| is_digit(at + offset))
                && !is_digit(at + 4)
        };
        if index - start <= 3 {
            while is_group(index) {
                number.extend(&chars[index + 1..index + 4]);
                index += 4;
            }
        }
        if chars.get(index) == Some(&'.') && is_digit(index + 1) {
            number.push('.');
            index += 1;
            while is_digit(index) {
                number.push(chars[index]);
                index += 1;
            }
        }
        numbers.push(number);
    }
    numbers
}

fn is_expression_char(c: char) -> bool {
    c.is_ascii_digit() || " +-*/()\u{2212}\u{00d7}\u{00f7}\u{00b7}".contains(c)
}

/// Maximal stretches of expression characters in `text` that contain a digit, trimmed.
/// Letters, `=`, newlines and other punctuation separate them.
fn expression_runs(text: &str) -> Vec<&str> {
    text.split(|c: char| !is_expression_char(c))
        .map(str::trim)
        .filter(|run| run.chars().any(|c| c.is_ascii_digit()))
        .collect()
}

/// The last stretch that combines numbers with an operator, else the last number-bearing
/// one: in `35-3=32 so 5*7-3=32` that is `5*7-3`.
fn last_expression(text: &str) -> Option<&str> {
    let runs = expression_runs(text);
    let has_operator = |run: &str| {
        run.chars()
            .any(|c| "+-*/\u{2212}\u{00d7}\u{00f7}\u{00b7}".contains(c))
    };
    runs.iter()
        .rev()
        .copied()
        .find(|run| has_operator(run))
        .or(runs.last().copied())
}

#[cfg(test)]
mod tests;
