//! Multiple-choice answers: a reference that is one option letter `A`–`E`.

use super::latex;

fn is_option(letter: char) -> bool {
    ('A'..='E').contains(&letter)
}

/// The option a multiple-choice reference names: `B`, `(B)`, `B)`, `B.`, `\text{(B)}`,
/// `\boxed{B}`. `None` for any other reference.
pub(super) fn reference_option(reference: &str) -> Option<char> {
    let text = latex::plain(latex::final_part(reference)?)?;
    lone_letter(&text).filter(|&letter| is_option(letter))
}

/// The one option an answer picks: a lone letter in either case (`b`, `(B)`), or the one
/// capital `A`–`E` standing as a word in it (`answer is B`, `(B) 12`). `None` when it
/// names two different options (`B or C`) or none.
pub(super) fn answer_option(answer: &str) -> Option<char> {
    let text = latex::plain(latex::final_part(answer)?)?;
    if let Some(letter) = lone_letter(&text).map(|letter| letter.to_ascii_uppercase()) {
        return is_option(letter).then_some(letter);
    }
    let mut picked = None;
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        let mut chars = word.chars();
        if let (Some(letter), None) = (chars.next(), chars.next())
            && is_option(letter)
        {
            if picked.is_some_and(|earlier| earlier != letter) {
                return None;
            }
            picked = Some(letter);
        }
    }
    picked
}

/// The letter in `B`, `(B)`, `B)` or `B.`, with nothing else but whitespace.
fn lone_letter(text: &str) -> Option<char> {
    let text = text.trim();
    let text = text.strip_suffix('.').unwrap_or(text).trim();
    let text = text.strip_prefix('(').unwrap_or(text);
    let text = text.strip_suffix(')').unwrap_or(text).trim();
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(letter), None) if letter.is_ascii_alphabetic() => Some(letter),
        _ => None,
    }
}
