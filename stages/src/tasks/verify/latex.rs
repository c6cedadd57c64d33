//! From the way an answer is typeset to plain text the number reader understands.
//!
//! [`final_part`] picks the part of a text that states its final answer: what follows a
//! GSM8K `####`, else the content of MATH-style `\boxed{}`. [`plain`] rewrites the LaTeX
//! found around answers (`$…$`, `\text{}`, `\frac{3}{4}`, `\dfrac34`, mixed numbers like
//! `2\frac12`, `\%`, `\$`, `{,}`, `\,`, `^\circ`, `\cdot`) as plain text. Commands it does not
//! know (`\sqrt`, `\pi`) are kept, so no number is read out of `\sqrt{2}`. Malformed input (an
//! unclosed box or brace group) gives `None`: a truncated answer states nothing.

/// Bounds recursion into nested `\frac` and `\text` arguments.
const MAX_DEPTH: usize = 32;
const BOX_COMMANDS: [&str; 2] = ["\\boxed", "\\fbox"];

/// The part of `text` that states its final answer: after its last `####`, and there the
/// content of its boxes if it has any (see [`boxed`]); else all of it.
pub(super) fn final_part(text: &str) -> Option<&str> {
    let text = match text.rfind("####") {
        Some(at) => &text[at + "####".len()..],
        None => text,
    };
    boxed(text).unwrap_or(Some(text))
}

/// What the boxes in `text` say: `None` when it has none; `Some(None)` when the last is
/// left open (a truncated answer) or two boxes differ (hedging); else the last box's content.
pub(super) fn boxed(text: &str) -> Option<Option<&str>> {
    let mut contents: Vec<&str> = Vec::new();
    let mut rest = text;
    while let Some((at, command)) = BOX_COMMANDS
        .iter()
        .filter_map(|command| rest.find(command).map(|at| (at, command)))
        .min()
    {
        let after = rest[at + command.len()..].trim_start();
        let Some((content, remaining)) = after.strip_prefix('{').and_then(braced) else {
            return Some(None);
        };
        contents.push(content);
        rest = remaining;
    }
    let last = *contents.last()?;
    let squeezed = |text: &str| -> String { text.split_whitespace().collect() };
    let agree = contents.iter().all(|c| squeezed(c) == squeezed(last));
    Some(agree.then_some(last))
}

/// `text` with its LaTeX rewritten as plain text (see the module documentation); `None`
/// when a brace group or a `\frac` is left incomplete.
pub(super) fn plain(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    write_plain(text, &mut out, 0)?;
    Some(out)
}

fn write_plain(text: &str, out: &mut String, depth: usize) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '\\' => rest = command(rest, out, depth)?,
            // `14{,}916`: LaTeX's way to write a thousands separator.
            '{' if rest.starts_with(",}") => {
                out.push(',');
                rest = &rest[2..];
            }
            '{' => out.push('('),
            '}' => out.push(')'),
            '^' => match degrees(rest) {
                Some(after) => rest = after,
                None => out.push('^'),
            },
            // Math delimiters and currency, degree signs, thin spaces grouping digits.
            '$' | '\u{00b0}' | '\u{2009}' | '\u{202f}' => {}
            '\u{2212}' => out.push('-'),
            '\u{00d7}' | '\u{00b7}' | '\u{22c5}' => out.push('*'),
            '\u{00f7}' => out.push('/'),
            _ => out.push(c),
        }
    }
    Some(())
}

/// Writes the command after a backslash; returns the text after it.
fn command<'a>(rest: &'a str, out: &mut String, depth: usize) -> Option<&'a str> {
    let length = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
    if length == 0 {
        let Some(symbol) = rest.chars().next() else {
            out.push('\\');
            return Some(rest);
        };
        match symbol {
            '%' => out.push('%'),
            // Currency, thin spaces (also used to group digits) and math delimiters.
            '$' | ',' | '!' | '(' | ')' | '[' | ']' => {}
            ';' | ':' | ' ' | '\\' => out.push(' '),
            // `\{`, `\}` and the like stay, so a set is not read as a number.
            _ => {
                out.push('\\');
                out.push(symbol);
            }
        }
        return Some(&rest[symbol.len_utf8()..]);
    }
    let (name, rest) = rest.split_at(length);
    match name {
        "left" | "right" | "displaystyle" | "textstyle" | "big" | "Big" | "bigl" | "bigr"
        | "Bigl" | "Bigr" | "circ" | "degree" => Some(rest),
        "quad" | "qquad" => {
            out.push(' ');
            Some(rest)
        }
        "times" | "cdot" | "ast" => {
            out.push('*');
            Some(rest)
        }
        "div" => {
            out.push('/');
            Some(rest)
        }
        "text" | "textbf" | "textit" | "textrm" | "textnormal" | "mathrm" | "mathbf" | "mathit"
        | "mbox" | "boxed" | "fbox" => {
            let (content, rest) = argument(rest)?;
            // Spaces keep `12\text{cm}` from gluing a word to the number.
            out.push(' ');
            write_plain(content, out, depth + 1)?;
            out.push(' ');
            Some(rest)
        }
        "frac" | "dfrac" | "tfrac" | "cfrac" => {
            let (numerator, rest) = argument(rest)?;
            let (denominator, rest) = argument(rest)?;
            let whole = mixed_number_whole(out);
            out.push('(');
            if let Some(whole) = whole {
                out.push_str(&whole);
                out.push('+');
            }
            out.push('(');
            write_plain(numerator, out, depth + 1)?;
            out.push_str(")/(");
            write_plain(denominator, out, depth + 1)?;
            out.push_str("))");
            Some(rest)
        }
        _ => {
            out.push('\\');
            out.push_str(name);
            Some(rest)
        }
    }
}

/// `2\frac{1}{2}` is two and a half: when the fraction follows a whole number directly,
/// takes that number off `out` to be added to the fraction.
fn mixed_number_whole(out: &mut String) -> Option<String> {
    let trimmed = out.trim_end();
    let digits = trimmed
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .count();
    let start = trimmed.len() - digits;
    // Only a number standing on its own: not `1.5`, `x2`, `3*2` or `2^3` before the fraction.
    let joined = trimmed[..start]
        .chars()
        .next_back()
        .is_some_and(|c| !(c.is_whitespace() || "+-(=".contains(c)));
    if digits == 0 || joined {
        return None;
    }
    let whole = trimmed[start..].to_owned();
    out.truncate(start);
    Some(whole)
}

/// A command's argument: a brace group, another command (`\frac\pi2`) or one character.
fn argument(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    let first = text.chars().next()?;
    match first {
        '{' => braced(&text[1..]),
        '}' => None,
        '\\' => {
            let length = 1 + text[1..]
                .bytes()
                .take_while(u8::is_ascii_alphabetic)
                .count();
            let length = match length {
                1 => 1 + text[1..].chars().next()?.len_utf8(),
                _ => length,
            };
            Some(text.split_at(length))
        }
        _ => Some(text.split_at(first.len_utf8())),
    }
}

/// Splits the text after a `{` at its matching `}`: (inside, after). `None` if unclosed.
fn braced(text: &str) -> Option<(&str, &str)> {
    let mut depth = 0usize;
    let mut escaped = false;
    for (at, byte) in text.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'{' => depth += 1,
            b'}' if depth == 0 => return Some((&text[..at], &text[at + 1..])),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The text after a degree sign written as a power (`^\circ`, `^{\circ}`), if it is one.
fn degrees(after_caret: &str) -> Option<&str> {
    let rest = after_caret.trim_start();
    let rest = rest
        .strip_prefix("{\\circ}")
        .or_else(|| rest.strip_prefix("\\circ"))?;
    (!rest.starts_with(|c: char| c.is_ascii_alphabetic())).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_parts_follow_gsm8k_and_math_conventions() {
        assert_eq!(final_part("so 6*7 = 42\n#### 42"), Some(" 42"));
        assert_eq!(
            final_part("thus $\\boxed{\\frac{3}{4}}$."),
            Some("\\frac{3}{4}")
        );
        assert_eq!(final_part("\\boxed{5} and again \\boxed{ 5 }"), Some(" 5 "));
        assert_eq!(final_part("\\boxed{3} or \\boxed{4}"), None, "hedging");
        assert_eq!(final_part("so \\boxed{12"), None, "truncated");
        assert_eq!(final_part("so \\boxed 12"), None, "not a box we read");
        assert_eq!(final_part("\\fbox{7}"), Some("7"));
        assert_eq!(final_part("plain 7"), Some("plain 7"));
        assert_eq!(boxed("plain 7"), None);
    }

    #[test]
    fn latex_becomes_plain_text() {
        for (latex, want) in [
            ("$1{,}234$", "1,234"),
            ("10\\,000", "10000"),
            ("\\frac{3}{4}", "((3)/(4))"),
            ("\\dfrac34", "((3)/(4))"),
            ("-2\\frac{1}{2}", "-(2+(1)/(2))"),
            ("3\\cdot\\frac12", "3*((1)/(2))"),
            ("1.5\\frac12", "1.5((1)/(2))"),
            ("50\\%", "50%"),
            ("\\$18", "18"),
            ("90^\\circ", "90"),
            ("90^{\\circ}", "90"),
            ("\\text{12 cm}", " 12 cm "),
            ("\\left( 3 \\right)", "( 3 )"),
            ("2^{10}", "2^(10)"),
            ("\\sqrt{2}", "\\sqrt(2)"),
            ("\\{1,2\\}", "\\{1,2\\}"),
            ("6 × 7 − 2 ÷ 2", "6 * 7 - 2 / 2"),
        ] {
            assert_eq!(plain(latex).as_deref(), Some(want), "{latex:?}");
        }
        for broken in ["\\frac{1}{", "\\frac1", "\\text{12", "\\frac}"] {
            assert_eq!(plain(broken), None, "{broken:?}");
        }
        let deep = format!("{}1{}", "\\frac{".repeat(100), "}{2}".repeat(100));
        assert_eq!(plain(&deep), None);
    }
}
