//! How problems and chats become token ids, the same way for every stage that trains or
//! samples: the prompt is the user turn rendered by the model's chat template with the
//! generation prompt; the completion is the assistant text followed by the turn's end token.

use anyhow::Context;
use dagrun_model::tokenizer::{ChatMessage, Tokenizer};

/// Token conventions of one model directory.
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    /// Ends an assistant turn: `<|im_end|>` for ChatML templates, else the first EOS.
    pub end_id: u32,
    /// Every id that stops generation.
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
}

impl ChatFormat {
    pub fn load(model_dir: &std::path::Path) -> anyhow::Result<ChatFormat> {
        let tokenizer = Tokenizer::load(model_dir)?;
        let end_id = tokenizer
            .token_id("<|im_end|>")
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
