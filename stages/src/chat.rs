//! How problems and chats become token ids, the same way for every stage that trains or
//! samples: the prompt is the user turn rendered by the model's chat template with the
//! generation prompt; the completion is the assistant text followed by the turn's end token.

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
        Ok(ChatFormat {
            tokenizer,
            end_id,
            stop_ids,
            pad_id,
        })
    }

    /// The prompt ids for a user message, ready for the assistant's answer.
    pub fn prompt_ids(&self, user: &str) -> anyhow::Result<Vec<u32>> {
        let text = self
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", user)], true)?;
        self.tokenizer.encode(&text, false)
    }

    /// The training target for an assistant message: its ids and the end-of-turn id.
    pub fn completion_ids(&self, assistant: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(assistant, false)?;
        ids.push(self.end_id);
        Ok(ids)
    }
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
}
