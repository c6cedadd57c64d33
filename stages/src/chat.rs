//! How problems and chats become token ids, the same way for every stage that trains or
//! samples: the prompt is the user turn rendered by the model's chat template with the
//! generation prompt; the completion is the assistant text followed by the turn's end token.
//!
//! Some templates open the reply themselves (QwQ's and DeepSeek-R1-Distill's generation prompt
//! ends in `<think>\n`; Qwen3's non-thinking mode in an empty think block): the model then
//! writes only the rest. [`ChatFormat::reply_prefix`] is that opening; generated text gets it
//! back ([`ChatFormat::reply_text`]) so rewards and verifiers see whole replies, and training
//! targets drop it ([`ChatFormat::completion_ids`]) so the prompt does not say it twice.

use anyhow::Context;
use dagrun_model::tokenizer::{ChatMessage, Tokenizer};

/// Turn-end tokens of common chat templates: ChatML (Qwen), Llama 3, Gemma.
const TURN_ENDS: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"];

/// Token conventions of one model directory.
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    /// Ends an assistant turn: the template's turn-end token ([`TURN_ENDS`]), else the first EOS.
    pub end_id: u32,
    /// Every id that stops generation.
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
    /// The start of the reply that the generation prompt already holds: from the `<think>`
    /// the generation prompt adds to its end; empty for templates that leave the reply open.
    pub reply_prefix: String,
}

impl ChatFormat {
    pub fn load(model_dir: &std::path::Path) -> anyhow::Result<ChatFormat> {
        let tokenizer = Tokenizer::load(model_dir)?;
        // A chat template's turn-end token, where the vocabulary has one; an EOS id otherwise.
        // Llama 3 lists `<|end_of_text|>` among its EOS ids too, but its turns end in
        // `<|eot_id|>`, so the lowest EOS id is not the turn end.
        let end_id = TURN_ENDS
            .iter()
            .find_map(|t| tokenizer.token_id(t))
            .or_else(|| tokenizer.eos_ids.first().copied())
            .context("the tokenizer has no end-of-turn or EOS token")?;
        let mut stop_ids = tokenizer.eos_ids.clone();
        if !stop_ids.contains(&end_id) {
            stop_ids.push(end_id);
        }
        let pad_id = tokenizer.pad_id().unwrap_or(end_id);
        let reply_prefix = reply_prefix(&tokenizer);
        Ok(ChatFormat {
            tokenizer,
            end_id,
            stop_ids,
            pad_id,
            reply_prefix,
        })
    }

    /// A generated reply as a whole: the template's [`reply_prefix`](Self::reply_prefix)
    /// followed by what the model wrote.
    pub fn reply_text(&self, generated: &str) -> String {
        format!("{}{generated}", self.reply_prefix)
    }

    /// The prompt ids for a user message, ready for the assistant's answer.
    pub fn prompt_ids(&self, user: &str) -> anyhow::Result<Vec<u32>> {
        let text = self
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", user)], true)?;
        self.tokenizer.encode(&text, false)
    }

    /// The training target for an assistant message: its ids and the end-of-turn id. The
    /// part the generation prompt already holds ([`reply_prefix`](Self::reply_prefix)) is
    /// left out, so the model learns to continue the prompt it will be given.
    pub fn completion_ids(&self, assistant: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(self.reply_body(assistant), false)?;
        ids.push(self.end_id);
        Ok(ids)
    }

    /// `assistant` without the reply prefix (compared up to whitespace after it).
    pub fn reply_body<'a>(&self, assistant: &'a str) -> &'a str {
        let prefix = self.reply_prefix.trim_end();
        if prefix.is_empty() {
            return assistant;
        }
        match assistant.trim_start().strip_prefix(prefix) {
            Some(rest) => rest.trim_start_matches([' ', '\n', '\r', '\t']),
            None => assistant,
        }
    }
}

/// What a tokenizer's chat template puts after the assistant header: the text from the last
/// `<think>` in what `add_generation_prompt` adds. Empty without a template or a `<think>`.
fn reply_prefix(tokenizer: &Tokenizer) -> String {
    let user = [ChatMessage::new("user", "?")];
    let (Ok(open), Ok(closed)) = (
        tokenizer.apply_chat_template(&user, true),
        tokenizer.apply_chat_template(&user, false),
    ) else {
        return String::new();
    };
    let Some(added) = open.strip_prefix(closed.as_str()) else {
        return String::new();
    };
    added
        .rfind("<think>")
        .map_or_else(String::new, |at| added[at..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Llama 3–like tokenizer: EOS ids `<|end_of_text|>` (0) and `<|eot_id|>` (1).
    fn llama3_like(dir: &std::path::Path) {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<|end_of_text|>"), special(1, "<|eot_id|>")],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]",
                "vocab": {"<|end_of_text|>": 0, "<|eot_id|>": 1, "hi": 2, "[UNK]": 3}}
        });
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<|eot_id|>"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [1, 0]}"#,
        )
        .unwrap();
    }

    #[test]
    fn a_llama3_turn_ends_in_eot_id_not_the_lowest_eos_id() {
        let dir = std::env::temp_dir().join(format!("dagrun-chat-llama3-{}", std::process::id()));
        llama3_like(&dir);
        let format = ChatFormat::load(&dir).unwrap();
        assert_eq!(format.tokenizer.eos_ids, vec![0, 1]);
        assert_eq!(format.end_id, 1, "<|eot_id|> ends the turn");
        assert_eq!(format.completion_ids("hi").unwrap(), vec![2, 1]);
        assert!(format.stop_ids.contains(&0) && format.stop_ids.contains(&1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_template_that_opens_the_think_block_is_continued_not_repeated() {
        let dir = std::env::temp_dir().join(format!("dagrun-chat-think-{}", std::process::id()));
        llama3_like(&dir);
        let template = "{% for m in messages %}<|start|>{{ m.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start|><think>\n{% endif %}";
        let config = serde_json::json!({"eos_token": "<|eot_id|>", "chat_template": template});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let format = ChatFormat::load(&dir).unwrap();
        assert_eq!(format.reply_prefix, "<think>\n");
        assert_eq!(format.reply_text("hi\n</think>"), "<think>\nhi\n</think>");
        let body = format.tokenizer.encode("hi", false).unwrap();
        let expected: Vec<u32> = body.iter().copied().chain([1]).collect();
        assert_eq!(format.completion_ids("<think>\nhi").unwrap(), expected);
        assert_eq!(
            format.completion_ids("hi").unwrap(),
            expected,
            "a reply without the opening is trained as it is"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
