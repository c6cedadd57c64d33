//! The one model a server serves: its name, chat format and context length, shared by the
//! request handlers (which tokenize) and the scheduler (which decodes).

use std::path::Path;

use anyhow::Context;
use dagrun_model::{ChatMessage, ModelConfig};
use dagrun_stages::chat::ChatFormat;

pub struct ServedModel {
    /// The name clients pass as `model` and `/v1/models` lists: the command line's target
    /// (`cold_start.model` or the directory as given).
    pub id: String,
    pub format: ChatFormat,
    /// `max_position_embeddings`: prompt plus completion must fit in it.
    pub context: usize,
    /// Most sequences generated together (`--max-batch`).
    pub max_batch: usize,
}

impl ServedModel {
    pub fn load(id: &str, dir: &Path, max_batch: usize) -> anyhow::Result<ServedModel> {
        let config = ModelConfig::load(&dir.join("config.json"))?;
        let format = ChatFormat::load(dir)
            .with_context(|| format!("reading the tokenizer of {}", dir.display()))?;
        Ok(ServedModel {
            id: id.to_string(),
            format,
            context: config.max_position_embeddings,
            max_batch,
        })
    }

    /// Whether `name` means this model: its id, or the last part of a path-like id.
    pub fn answers_to(&self, name: &str) -> bool {
        let id = self.id.trim_end_matches('/');
        name == self.id || name == id || Path::new(id).file_name().is_some_and(|f| f == name)
    }

    /// A conversation rendered by the model's chat template, ready for the assistant's turn, as
    /// ids (for one user message, exactly [`ChatFormat::prompt_ids`]).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
        let tokenizer = &self.format.tokenizer;
        let text = tokenizer.apply_chat_template(messages, true)?;
        let ids = tokenizer.encode(&text, false)?;
        anyhow::ensure!(!ids.is_empty(), "the prompt has no tokens");
        Ok(ids)
    }

    /// A raw completion prompt, tokenized as `dagrun generate` without `--chat` does.
    pub fn raw_prompt(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        let ids = self.format.tokenizer.encode(prompt, true)?;
        anyhow::ensure!(!ids.is_empty(), "the prompt has no tokens");
        Ok(ids)
    }
}
