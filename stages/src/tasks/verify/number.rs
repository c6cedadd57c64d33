//! The number an answer states, as an exact value, and when two such values are one answer.
//!
//! An answer states a number when, once its LaTeX is plain text ([`super::latex`]), it holds
//! one arithmetic expression (`923`, `-3`, `1,234.5`, `(1)/(2)`, `5*10^3`) with at most words
//! around it (`26 dollars`, `12 cm^2`, `the answer is 5.`) and nothing between its numbers
//! (`3 or 4` and `3, 4` state none). Before an `=`, only a name (`x = 5`) or an equal value
//! (`2+3 = 5`) may stand. Values are exact fractions: `0.5` is `1/2`, `0.333` is not `1/3`.
//!
//! Percentages: `50%` (also `50\%`, `50 percent`) equals both `50` and `0.5`, as the MATH
//! grader (which drops `\%`) and math-verify (which reads `50%` as `50/100`) each accept one
//! of them; a bare `50` never equals `0.5`, and `50%` never equals `0.5%`.

use super::latex;
use crate::tasks::expr;
use crate::tasks::rational::Rational;

/// Words that make a number part of a formula (`2pi`, `3 sqrt`) rather than a quantity.
const MATH_WORDS: [&str; 8] = ["pi", "sqrt", "log", "ln", "sin", "cos", "tan", "exp"];
/// Characters that give an answer a structure this reader does not understand (sets,
/// intervals, inequalities, subscripts, leftover LaTeX), so it states no single number.
const STRUCTURE: &str = "\\<>[]{}|_&#~@=≈≤≥≠±∓∞√∑∏∫→⇒";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Value {
    number: Number,
    percent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Number {
    Exact(Rational),
    /// A numeral too long for [`Rational`], as canonical decimal text (`-1234…`, `0.5…`):
    /// equal only to the same numeral, however written.
    Numeral(String),
}

impl Value {
    /// Whether `self` and `other` are the same answer (see the module documentation).
    pub(super) fn matches(&self, other: &Value) -> bool {
        if self.percent == other.percent {
            return self.number == other.number;
        }
        let (percentage, plain) = if self.percent {
            (self, other)
        } else {
            (other, self)
        };
        plain.number == percentage.number || percentage.fraction().as_ref() == Some(&plain.number)
    }

    /// `50%` as the fraction `1/2`.
    fn fraction(&self) -> Option<Number> {
        match self.number {
            Number::Exact(value) => value.checked_div(Rational::integer(100)).map(Number::Exact),
            Number::Numeral(_) => None,
        }
    }

    /// Text that is equal exactly for equal values: `1234`, `-5`, `5/2`, `50%`.
    pub(super) fn canonical(&self) -> String {
        let mut text = match &self.number {
            Number::Exact(value) => value.to_string(),
            Number::Numeral(numeral) => numeral.clone(),
        };
        if self.percent {
            text.push('%');
        }
        text
    }
}

/// The number `text` states, if it states exactly one.
pub(super) fn value_of(text: &str) -> Option<Value> {
    let plain = latex::plain(latex::final_part(text)?)?;
    let sides: Vec<&str> = plain.split('=').collect();
    let (last, before) = sides.split_last()?;
    let value = side_value(last)?;
    // `x = 5` names the value, `2+3 = 5` computes it; `3 = 4` or `x = 3 or x = 4` hedges.
    let consistent = before
        .iter()
        .filter(|side| side.contains(|c: char| c.is_ascii_digit()))
        .all(|side| side_value(side).as_ref() == Some(&value));
    consistent.then_some(value)
}

/// One side of an equation: an expression with at most words before and after it.
fn side_value(side: &str) -> Option<Value> {
    let text = without_unit_powers(side);
    if text.contains(|c: char| STRUCTURE.contains(c)) {
        return None;
    }
    let chars: Vec<char> = text.chars().collect();
    let first = chars.iter().position(char::is_ascii_digit)?;
    let last = chars.iter().rposition(char::is_ascii_digit)?;
    // A sign, decimal point or parenthesis written against the number belongs to it.
    let mut start = first;
    while start > 0 && "-+.(".contains(chars[start - 1]) {
        start -= 1;
    }
    let mut end = last + 1;
    while chars.get(end) == Some(&')') {
        end += 1;
    }
    let expression: String = chars[start..end].iter().collect();
    let is_math = |c: char| c.is_ascii_digit() || c.is_whitespace() || "+-*/^().,".contains(c);
    if !expression.chars().all(is_math) {
        return None;
    }
    let (before, after) = (&chars[..start], &chars[end..]);
    let (percent, after) = percent_sign(after);
    // `x5`, `f(x)5`, `5(x)` and `5!` make the number part of a formula.
    let glued_before = before
        .last()
        .is_some_and(|c| c.is_alphanumeric() || *c == ')');
    let glued_after = matches!(after.first(), Some('(' | '!'));
    if glued_before || glued_after || !is_prose(before) || !is_prose(after) {
        return None;
    }
    // `12cm` is a quantity, `2x` or `3pi` a formula.
    let glued_word: String = after.iter().take_while(|c| c.is_alphabetic()).collect();
    let glued_word_is_math = glued_word.chars().count() == 1 || MATH_WORDS.contains(&&*glued_word);
    if !percent && !glued_word.is_empty() && glued_word_is_math {
        return None;
    }
    let number = number(expression.trim())?;
    Some(Value { number, percent })
}

/// Whether a `%`, `percent` or `pct` follows the number, and the text after it.
fn percent_sign(after: &[char]) -> (bool, &[char]) {
    let skipped = after.iter().take_while(|c| c.is_whitespace()).count();
    let rest = &after[skipped..];
    if rest.first() == Some(&'%') {
        return (true, &rest[1..]);
    }
    let word: String = rest.iter().take_while(|c| c.is_alphabetic()).collect();
    match word.to_lowercase().as_str() {
        "percent" | "pct" => (true, &rest[word.chars().count()..]),
        _ => (false, after),
    }
}

/// Words, punctuation and remarks in parentheses (`741 (final)`) only: no arithmetic (`x + 5`
/// is a formula, not `5`) except `-` or `/` inside a word (`km/h`), and no formula words such
/// as `pi`.
fn is_prose(chars: &[char]) -> bool {
    let letter = |at: Option<usize>| {
        at.and_then(|at| chars.get(at))
            .is_some_and(|c| c.is_alphabetic())
    };
    let operators_in_words = chars.iter().enumerate().all(|(at, c)| match c {
        '-' | '/' => letter(at.checked_sub(1)) && letter(at.checked_add(1)),
        c => !"+*^%".contains(*c),
    });
    let text: String = chars.iter().collect::<String>().to_lowercase();
    let formula_word = text
        .split(|c: char| !c.is_alphabetic())
        .any(|word| MATH_WORDS.contains(&word));
    operators_in_words && !formula_word
}

/// Drops the power of a unit (`cm^2`, `m^(3)`, `m²`), so it is not read as a number.
fn without_unit_powers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    // Whether the last character other than whitespace is a letter.
    let mut after_letter = false;
    while let Some(&c) = chars.get(index) {
        let exponent = match c {
            '²' | '³' if after_letter => 1,
            '^' if after_letter => {
                let rest = &chars[index + 1..];
                let open = usize::from(rest.first() == Some(&'('));
                let digits = rest[open..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                let close = usize::from(open == 1 && rest.get(open + digits) == Some(&')'));
                if digits > 0 && open == close {
                    1 + open + digits + close
                } else {
                    0
                }
            }
            _ => 0,
        };
        if exponent == 0 {
            out.push(c);
            if !c.is_whitespace() {
                after_letter = c.is_alphabetic();
            }
            index += 1;
        } else {
            index += exponent;
        }
    }
    out
}

/// A plain numeral of any length, else the value of an expression.
fn number(expression: &str) -> Option<Number> {
    numeral(expression).or_else(|| expr::evaluate_math(expression).map(Number::Exact))
}

/// `-1,234.50` and the like: an optional sign, digits (optionally grouped by thousands) and
/// an optional decimal part. Works on text, so its length is unlimited.
fn numeral(text: &str) -> Option<Number> {
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
    let (whole, fraction) = (
        whole.trim_start_matches('0'),
        fraction.trim_end_matches('0'),
    );
    if let Some(value) = Rational::from_decimal(whole, fraction) {
        let value = if negative {
            value.checked_neg()?
        } else {
            value
        };
        return Some(Number::Exact(value));
    }
    let mut canonical = String::from(if negative { "-" } else { "" });
    canonical.push_str(if whole.is_empty() { "0" } else { whole });
    if !fraction.is_empty() {
        canonical.push('.');
        canonical.push_str(fraction);
    }
    Some(Number::Numeral(canonical))
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
