//! The one answer checker every reward and evaluation uses.
//!
//! It reads model output, so it is total: any string, however long or malformed, gives an
//! answer without panicking. It is lenient about presentation (whitespace, `+5`, `x=5`,
//! `5.0`, `1,000`, `26 dollars`) and strict about content: an answer that hedges between
//! several numbers or expressions is wrong. The answer is the content of an
//! `<answer>…</answer>` block; reading the last number of an untagged response instead is
//! opt-in (`fallback`), since it lets unformatted and truncated completions count as correct.

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

/// [`extract_answer`]; with `fallback`, a response without an answer block gives its last
/// number instead (for `countdown`, its last expression).
pub fn extract_answer_with(task: &str, response: &str, fallback: bool) -> Option<String> {
    if let Some(content) = last_answer_block(response) {
        let content = content.trim();
        return (!content.is_empty()).then(|| content.to_owned());
    }
    if !fallback {
        None
    } else if task == COUNTDOWN {
        last_expression(response).map(str::to_owned)
    } else {
        numbers_in(response).pop()
    }
}

/// Whether `response` answers a problem of `task` whose reference answer is `reference`, by
/// its answer block (see [`extract_answer`]). Numeric tasks compare numbers; `countdown`
/// evaluates the response's expression against the reference expression's value and numbers
/// (see `countdown::verify_solution`). Unknown tasks are compared as numbers, or as trimmed
/// text when the reference is not one.
pub fn verify(task: &str, reference: &str, response: &str) -> bool {
    verify_with(task, reference, response, false)
}

/// [`verify`], reading the answer as [`extract_answer_with`] does.
pub fn verify_with(task: &str, reference: &str, response: &str, fallback: bool) -> bool {
    let Some(answer) = extract_answer_with(task, response, fallback) else {
        return false;
    };
    if task == COUNTDOWN {
        return countdown_matches(reference, &answer);
    }
    numbers_match(reference, &answer)
}

/// The value an extracted answer stands for, as text that is equal exactly for equal values:
/// a number in canonical form (`1,234`, `1234.0` and `x = 1234` give `1234`; `26 dollars`
/// gives `26`), for `countdown` the value of the expression (`5*7-3` and `7*5-3` give `32`).
/// `None` when the answer states no single value.
pub fn canonical_answer(task: &str, answer: &str) -> Option<String> {
    if task == COUNTDOWN {
        return countdown_value(answer).map(|value| value.to_string());
    }
    single_number(answer)
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

fn numbers_match(reference: &str, answer: &str) -> bool {
    let Some(expected) = canonical_number(reference) else {
        return reference.trim() == answer.trim();
    };
    single_number(answer).as_deref() == Some(expected.as_str())
}

/// `answer` as a canonical number; tolerates units and words around a single number
/// ("26 dollars"), not several.
fn single_number(answer: &str) -> Option<String> {
    canonical_number(answer).or_else(|| {
        let mut numbers = numbers_in(answer);
        if numbers.len() == 1 {
            numbers.pop().and_then(|number| canonical_number(&number))
        } else {
            None
        }
    })
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

/// A number written as `answer` in canonical form (`-5`, `1234`, `2.5`), or `None` if
/// `answer` is anything more than a number. Works on text, so size is unlimited.
fn canonical_number(answer: &str) -> Option<String> {
    let compact: String = answer
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| if c == '\u{2212}' { '-' } else { c })
        .collect();
    let mut text = compact.as_str();
    // "x=5": a variable name and equals sign in front of the number.
    if let Some((name, value)) = text.split_once('=')
        && name.chars().count() == 1
        && name.chars().all(|c| c.is_ascii_alphabetic())
    {
        text = value;
    }
    // A sentence-ending full stop.
    text = text.strip_suffix('.').unwrap_or(text);
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let whole = without_thousands_separators(whole)?;
    if (whole.is_empty() && fraction.is_empty()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    let mut canonical = String::new();
    let is_zero = whole.is_empty() && fraction.is_empty();
    if negative && !is_zero {
        canonical.push('-');
    }
    canonical.push_str(if whole.is_empty() { "0" } else { whole });
    if !fraction.is_empty() {
        canonical.push('.');
        canonical.push_str(fraction);
    }
    Some(canonical)
}

/// Digits, optionally grouped as `1,234,567`; `None` for anything else.
fn without_thousands_separators(whole: &str) -> Option<String> {
    let groups: Vec<&str> = whole.split(',').collect();
    let digits_only = |group: &str| group.bytes().all(|b| b.is_ascii_digit());
    let well_grouped = groups.len() == 1
        || (!groups[0].is_empty()
            && groups[0].len() <= 3
            && groups[1..].iter().all(|group| group.len() == 3));
    (well_grouped && groups.iter().all(|group| digits_only(group))).then(|| groups.concat())
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
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn answered(answer: &str) -> String {
        format!("<think>\nwork\n</think>\n<answer>{answer}</answer>")
    }

    #[test]
    fn extracts_from_the_last_answer_block() {
        assert_eq!(
            extract_answer("arithmetic", &answered(" 741 ")),
            Some("741".into())
        );
        assert_eq!(
            extract_answer("arithmetic", "<answer>1</answer> then <answer>2</answer>"),
            Some("2".into())
        );
        assert_eq!(extract_answer("arithmetic", "<answer> </answer> 5"), None);
        assert_eq!(
            extract_answer("countdown", &answered("5*7-3")),
            Some("5*7-3".into())
        );
    }

    #[test]
    fn falls_back_to_the_last_number_only_when_asked() {
        let fallback = |task, text| extract_answer_with(task, text, true);
        assert_eq!(
            fallback("arithmetic", "7+5=12 so the total is 1,234."),
            Some("1234".into())
        );
        assert_eq!(fallback("linear", "so x = -5"), Some("-5".into()));
        assert_eq!(fallback("linear", "x=-5"), Some("-5".into()));
        assert_eq!(fallback("arithmetic", "10-5"), Some("5".into()));
        assert_eq!(
            fallback("word", "it costs 2.50 dollars"),
            Some("2.50".into())
        );
        assert_eq!(
            fallback("word", "<answer>7 (unterminated"),
            Some("7".into())
        );
        assert_eq!(fallback("word", "no numbers here"), None);
        assert_eq!(fallback("word", ""), None);
        // By default an untagged or truncated response has no answer.
        for text in [
            "the total is 1,234.",
            "x=-5",
            "<answer>7 (unterminated",
            "<think>\n3+4=7\n",
        ] {
            assert_eq!(extract_answer("arithmetic", text), None, "{text:?}");
        }
        assert_eq!(
            extract_answer("arithmetic", "x <answer> 7 </answer>"),
            Some("7".into())
        );
    }

    #[test]
    fn falls_back_to_the_last_expression_for_countdown() {
        let fallback = |text| extract_answer_with("countdown", text, true);
        assert_eq!(fallback("5*7=35\n35-3=32\n5*7-3=32"), Some("5*7-3".into()));
        assert_eq!(fallback("use (9-4)*3 here"), Some("(9-4)*3".into()));
        assert_eq!(fallback("just 15"), Some("15".into()));
        assert_eq!(fallback("nothing"), None);
        assert_eq!(
            extract_answer("countdown", "5*7=35\n35-3=32\n5*7-3=32"),
            None
        );
    }

    #[test]
    fn numeric_answers_compare_as_numbers() {
        for good in [
            "741",
            " 741 ",
            "+741",
            "x=741",
            "x = 741",
            "0741",
            "741.0",
            "741.",
            "741 dollars",
            "X=741",
        ] {
            assert!(verify("arithmetic", "741", &answered(good)), "{good:?}");
        }
        for bad in [
            "742",
            "-741",
            "74.1",
            "741 or 742",
            "7,41",
            "",
            "x=",
            "seven hundred",
        ] {
            assert!(!verify("arithmetic", "741", &answered(bad)), "{bad:?}");
        }
        assert!(
            verify("linear", "-5", &answered("x=−5")),
            "typographic minus"
        );
        assert!(verify("linear", "0", &answered("-0")));
        assert!(verify("word", "1234567", &answered("1,234,567")));
        assert!(!verify("word", "1234567", &answered("1234,567,")));
        assert!(
            !verify("word", "26", "I think the answer is 26."),
            "no tags: no answer"
        );
        assert!(
            verify_with("word", "26", "I think the answer is 26.", true),
            "no tags, with the fallback: last number"
        );
        assert!(!verify("word", "26", "<think>\n20+6=26\n"), "truncated");
        let huge = "123456789012345678901234567890123456789012345678901234567890";
        assert!(verify("arithmetic", huge, &answered(huge)));
        assert!(!verify("arithmetic", huge, &answered(&format!("{huge}1"))));
    }

    #[test]
    fn non_numeric_references_compare_as_text() {
        assert!(verify("other", "yes", &answered(" yes ")));
        assert!(!verify("other", "yes", &answered("no")));
    }

    #[test]
    fn countdown_answers_are_evaluated() {
        assert!(verify("countdown", "5*7-3", &answered("7*5-3")));
        assert!(verify("countdown", "5*7-3", &answered("5 × 7 − 3 = 32")));
        assert!(verify("countdown", "5*7-3", &answered("it is 5*7-3")));
        assert!(!verify(
            "countdown",
            "5*7-3",
            "so 35-3=32, that is 7*5-3=32"
        ));
        assert!(verify_with(
            "countdown",
            "5*7-3",
            "so 35-3=32, that is 7*5-3=32",
            true
        ));
        assert!(!verify("countdown", "5*7-3", &answered("32")));
        assert!(
            !verify("countdown", "5*7-3", &answered("3+5 or 5*7-3")),
            "hedging is wrong"
        );
        assert!(!verify("countdown", "5*7-3", &answered("5*7-3*1")));
    }

    #[test]
    fn format_requires_think_then_answer() {
        assert!(has_format("<think>\nsteps\n</think>\n<answer>5</answer>"));
        assert!(has_format("  <think></think><answer>5</answer>\n"));
        for bad in [
            "",
            "<answer>5</answer>",
            "<think>x</think>",
            "<think>x</think>\n<answer></answer>",
            "<think>x</think>\n<answer>5</answer> trailing",
            "leading <think>x</think>\n<answer>5</answer>",
            "<think>x</think> gap <answer>5</answer>",
            "<think>a<think>b</think><answer>5</answer>",
            "<think>x</think><answer>5</answer><answer>6</answer>",
            "<answer>5</answer><think>x</think>",
            "<think>x</think><answer>5",
        ] {
            assert!(!has_format(bad), "{bad:?}");
        }
    }

    #[test]
    fn canonical_answers_are_values() {
        for (text, want) in [
            ("1,234", "1234"),
            ("1234", "1234"),
            ("1234.0", "1234"),
            ("x = 5", "5"),
            ("5", "5"),
            ("+5", "5"),
            ("26 dollars", "26"),
            ("-0", "0"),
        ] {
            assert_eq!(
                canonical_answer("arithmetic", text).as_deref(),
                Some(want),
                "{text:?}"
            );
        }
        for text in ["", "5 or 6", "five", "1,23"] {
            assert_eq!(canonical_answer("word", text), None, "{text:?}");
        }
        for (text, want) in [
            ("5*7-3", "32"),
            ("7*5-3", "32"),
            ("32", "32"),
            ("5 × 7 − 3 = 32", "32"),
            ("it is (9-4)*3", "15"),
        ] {
            assert_eq!(
                canonical_answer("countdown", text).as_deref(),
                Some(want),
                "{text:?}"
            );
        }
        assert_eq!(canonical_answer("countdown", "3+5 or 5*7-3"), None);
        assert_eq!(
            canonical_answer("countdown", "7/2"),
            None,
            "inexact division"
        );
    }

    #[test]
    fn reasoning_results_follow_the_worked_solutions() {
        let think = |lines: &str| format!("<think>\n{lines}\n</think>\n<answer>0</answer>");
        let column = "7+5+9=21 write 1 carry 2\n4+8+0+2=14 write 4 carry 1\n3+2+1+1=7 write 7";
        assert_eq!(reasoning_result(&think(column)).as_deref(), Some("741"));
        let borrowing = "15-8=7 write 7 borrow 1\n10-9-1=0 write 0 borrow 1\n1-0-1=0 write 0";
        assert_eq!(reasoning_result(&think(borrowing)).as_deref(), Some("007"));
        assert_eq!(
            reasoning_result(&think("3x=22-7=15\nx=15/3=5")).as_deref(),
            Some("5")
        );
        assert_eq!(
            reasoning_result(&think("x=-15/3=-5")).as_deref(),
            Some("-5")
        );
        assert_eq!(
            reasoning_result(&think("5*7=35\n35-3=32\n5*7-3=32")).as_deref(),
            Some("32")
        );
        assert_eq!(
            reasoning_result(&think("3*4=12\nso the total is\n")).as_deref(),
            Some("12")
        );
        assert_eq!(reasoning_result(&think("no equations")), None);
        assert_eq!(reasoning_result("<think>\n3+4=7\n"), None, "unclosed");
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        let pieces = [
            "<think>",
            "</think>",
            "<answer>",
            "</answer>",
            "<answer",
            "answer>",
            "0",
            "7",
            "99999999999999999999999999",
            "-",
            "+",
            "*",
            "/",
            "(",
            ")",
            "=",
            ".",
            ",",
            "x",
            " ",
            "\n",
            "é",
            "数",
            "🦀",
            "\u{2212}",
            "×",
            "÷",
            "1,000",
            "\u{0}",
            "ß",
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(51);
        let tasks = ["arithmetic", "linear", "word", "countdown", "", "??"];
        let references = [
            "741",
            "-5",
            "5*7-3",
            "(9-4)*3",
            "",
            "garbage",
            "99999999999999999999999999",
        ];
        for _ in 0..20_000 {
            let length = rng.random_range(0..40);
            let mut text: String = (0..length)
                .map(|_| pieces[rng.random_range(0..pieces.len())])
                .collect();
            if rng.random_bool(0.2) {
                text.extend((0..rng.random_range(0..20)).map(|_| rng.random::<char>()));
            }
            let task = tasks[rng.random_range(0..tasks.len())];
            let reference = references[rng.random_range(0..references.len())];
            let _ = extract_answer_with(task, &text, true);
            let _ = canonical_answer(task, &text);
            let _ = reasoning_result(&text);
            let _ = has_format(&text);
            let _ = verify(task, reference, &text);
            let _ = verify_with(task, &text, &text, true);
        }
        let long = "(".repeat(100_000) + &"9".repeat(100_000);
        for task in tasks {
            assert!(!verify_with(task, "1", &long, true));
            assert!(!verify(task, &long, "1"));
            let _ = canonical_answer(task, &long);
        }
    }
}
