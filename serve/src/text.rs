//! Completion text as it grows: token ids → text deltas for streaming, and the split of a
//! reply's `<think>…</think>` into `reasoning_content`.
//!
//! Streamed deltas must concatenate to the text a non-streamed request returns, so a delta
//! holds back what may still change: a trailing partial UTF-8 character (the tokenizer decodes
//! it as U+FFFD) and a tail that could be the start of a stop string (the stop string and
//! what follows are cut from the final text). The final text settles the rest.

use dagrun_model::Tokenizer;

/// One choice's streamed text.
pub struct ChoiceText {
    /// The chat template's reply opening (`<think>\n`), which the text starts with.
    prefix: String,
    stops: Vec<String>,
    tokens: Vec<u32>,
    /// Bytes of the text (prefix included) already sent.
    sent: usize,
}

impl ChoiceText {
    pub fn new(prefix: &str, stops: &[String]) -> ChoiceText {
        ChoiceText {
            prefix: prefix.to_string(),
            stops: stops.to_vec(),
            tokens: Vec::new(),
            sent: 0,
        }
    }

    /// Adds a generated token; returns the text that is now certain and was not sent yet.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let generated = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        let mut safe = generated.len();
        if let Some(at) = generated.rfind('\u{FFFD}') {
            safe = safe.min(at);
        }
        for stop in &self.stops {
            if let Some(at) = generated.find(stop.as_str()) {
                safe = safe.min(at);
            }
            // The longest tail of the text that a stop string starts with.
            for (at, _) in generated.char_indices().rev().take(stop.len()) {
                if stop.starts_with(&generated[at..]) {
                    safe = safe.min(at);
                }
            }
        }
        let text = format!("{}{}", self.prefix, &generated[..safe]);
        self.advance(&text)
    }

    /// The rest of the choice's final text (prefix included), once it is done.
    pub fn finish(&mut self, final_text: &str) -> String {
        self.advance(final_text)
    }

    fn advance(&mut self, text: &str) -> String {
        // Decoded text only grows at its end in practice; if an earlier part ever changed, the
        // difference cannot be unsent, so nothing is sent until it matches again.
        match text.get(self.sent..) {
            Some(new) if text.len() > self.sent => {
                let new = new.to_string();
                self.sent = text.len();
                new
            }
            _ => String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Nothing but whitespace seen: the reply may still open with `<think>`.
    Start,
    /// Inside the think block; `started` once text other than leading whitespace came.
    Thinking { started: bool },
    /// After `</think>` (or a reply that did not open with `<think>`).
    Answer { skip_space: bool },
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Splits a reply that opens with `<think>` into reasoning (without the tags and the
/// whitespace next to them) and the answer after `</think>`. A reply that does not open with
/// `<think>` is all answer; one whose `</think>` never came is all reasoning. Fed deltas, it
/// returns (reasoning, answer) deltas; fed the whole text once, the same split.
pub struct ReasoningSplit {
    part: Part,
    pending: String,
}

impl Default for ReasoningSplit {
    fn default() -> Self {
        ReasoningSplit {
            part: Part::Start,
            pending: String::new(),
        }
    }
}

impl ReasoningSplit {
    pub fn push(&mut self, delta: &str) -> (String, String) {
        self.pending.push_str(delta);
        let (mut reasoning, mut answer) = (String::new(), String::new());
        loop {
            match self.part {
                Part::Start => {
                    let trimmed = self.pending.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.pending = rest.to_string();
                        self.part = Part::Thinking { started: false };
                    } else if OPEN.starts_with(trimmed) {
                        return (reasoning, answer); // wait: it may still become `<think>`
                    } else {
                        self.part = Part::Answer { skip_space: false };
                    }
                }
                Part::Thinking { started } => {
                    if !started {
                        // Whitespace right after `<think>` is not reasoning.
                        let kept = self.pending.trim_start().len();
                        self.pending.drain(..self.pending.len() - kept);
                        if self.pending.is_empty() {
                            return (reasoning, answer);
                        }
                        self.part = Part::Thinking { started: true };
                    }
                    if let Some(at) = self.pending.find(CLOSE) {
                        reasoning.push_str(self.pending[..at].trim_end());
                        self.pending.drain(..at + CLOSE.len());
                        self.part = Part::Answer { skip_space: true };
                        continue;
                    }
                    // Send what cannot be the start of `</think>` or whitespace before it.
                    let mut safe = self.pending.len();
                    for (at, _) in self.pending.char_indices().rev().take(CLOSE.len()) {
                        if CLOSE.starts_with(&self.pending[at..]) {
                            safe = safe.min(at);
                        }
                    }
                    let safe = self.pending[..safe].trim_end().len();
                    reasoning.extend(self.pending.drain(..safe));
                    return (reasoning, answer);
                }
                Part::Answer { skip_space } => {
                    if skip_space {
                        let kept = self.pending.trim_start().len();
                        self.pending.drain(..self.pending.len() - kept);
                        if self.pending.is_empty() {
                            return (reasoning, answer);
                        }
                        self.part = Part::Answer { skip_space: false };
                    }
                    answer.push_str(&self.pending);
                    self.pending.clear();
                    return (reasoning, answer);
                }
            }
        }
    }

    /// What is left once the text is complete.
    pub fn finish(&mut self) -> (String, String) {
        let rest = std::mem::take(&mut self.pending);
        match self.part {
            Part::Start => (String::new(), rest),
            Part::Thinking { .. } => (rest.trim_end().to_string(), String::new()),
            Part::Answer { .. } => (String::new(), rest),
        }
    }
}

/// The whole text split at once: (reasoning, answer); reasoning is `None` for a reply that did
/// not open with `<think>`.
pub fn split_reasoning(text: &str) -> (Option<String>, String) {
    let mut split = ReasoningSplit::default();
    let (mut reasoning, mut answer) = split.push(text);
    let (r, a) = split.finish();
    reasoning.push_str(&r);
    answer.push_str(&a);
    let opened = text.trim_start().starts_with(OPEN);
    (opened.then_some(reasoning), answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        // Cargo's run-time value first: a test binary reused from another checkout's build
        // still reads this checkout's fixture.
        let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        );
        let dir = crate_dir.join("../tests/fixtures/qwen2-bpe");
        Tokenizer::load(&dir).unwrap()
    }

    /// Streams `text`'s tokens through a [`ChoiceText`] until `stop` shows up, as the decoder
    /// would; returns the deltas and the final text.
    fn stream(text: &str, stop: &str) -> (Vec<String>, String) {
        let tok = tokenizer();
        let ids = tok.encode(text, false).unwrap();
        let mut choice = ChoiceText::new("<p>", &[stop.to_string()]);
        let mut deltas = Vec::new();
        let mut made = Vec::new();
        for &id in &ids {
            made.push(id);
            deltas.push(choice.push(&tok, id));
            if tok.decode(&made, true).unwrap().contains(stop) {
                break;
            }
        }
        let generated = tok.decode(&made, true).unwrap();
        let cut = generated
            .find(stop)
            .map_or(generated.as_str(), |at| &generated[..at]);
        let final_text = format!("<p>{cut}");
        deltas.push(choice.finish(&final_text));
        (deltas, final_text)
    }

    #[test]
    fn streamed_deltas_add_up_to_the_final_text_and_never_pass_a_stop_string() {
        let (deltas, final_text) = stream("Sum: 12 + 30 = 42 apples", "= 42");
        assert_eq!(final_text, "<p>Sum: 12 + 30 ");
        assert_eq!(deltas.concat(), final_text);
        // Split characters are held back until whole.
        let (deltas, final_text) = stream("I like 🍎 and é a lot", "never");
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        assert_eq!(deltas.concat(), final_text);
        assert_eq!(final_text, "<p>I like 🍎 and é a lot");
    }

    fn streamed(pieces: &[&str]) -> (String, String) {
        let mut split = ReasoningSplit::default();
        let (mut r, mut a) = (String::new(), String::new());
        for p in pieces {
            let (dr, da) = split.push(p);
            r.push_str(&dr);
            a.push_str(&da);
        }
        let (dr, da) = split.finish();
        (r + &dr, a + &da)
    }

    #[test]
    fn think_blocks_split_the_same_whole_or_streamed() {
        let text = "<think>\n2+2 is 4.\n</think>\n<answer>4</answer>";
        let (r, a) = split_reasoning(text);
        assert_eq!(r.as_deref(), Some("2+2 is 4."));
        assert_eq!(a, "<answer>4</answer>");
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(
            streamed(&pieces),
            ("2+2 is 4.".into(), "<answer>4</answer>".into())
        );
        assert_eq!(
            streamed(&["<thi", "nk>a b </th", "ink> c"]),
            ("a b".into(), "c".into())
        );
        assert_eq!(
            streamed(&["<think> a ", " b\n", "c</think>d"]),
            ("a  b\nc".into(), "d".into())
        );
    }

    #[test]
    fn replies_without_a_think_block_are_all_answer_and_unclosed_ones_all_reasoning() {
        assert_eq!(split_reasoning("just 4"), (None, "just 4".into()));
        assert_eq!(split_reasoning("<th"), (None, "<th".into()));
        assert_eq!(
            split_reasoning("<think>still going"),
            (Some("still going".into()), String::new())
        );
        assert_eq!(
            streamed(&["  4 ", "<think>x"]),
            (String::new(), "  4 <think>x".into())
        );
    }
}
