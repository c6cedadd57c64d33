//! Response bodies in OpenAI's shapes: `chat.completion`, `text_completion`, their stream
//! chunks, `usage` and log-probs.

use dagrun_model::Tokenizer;
use dagrun_model::generate::{Completion, FinishReason};
use serde_json::{Value, json};

use crate::request::{Endpoint, GenerationRequest};
use crate::text::split_reasoning;

/// What every body of one response shares.
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Header {
    pub fn new(endpoint: Endpoint, model: &str) -> Header {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Header {
            id: format!("{prefix}-{:016x}", rand::random::<u64>()),
            created,
            model: model.to_string(),
        }
    }

    /// The envelope of a response or chunk around `choices`.
    pub fn body(&self, endpoint: Endpoint, stream: bool, choices: Vec<Value>) -> Value {
        let object = match (endpoint, stream) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

pub fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    }
}

/// `usage`: the prompts once each, and every generated token (a final stop token included).
pub fn usage(request: &GenerationRequest, completion_tokens: usize) -> Value {
    let prompt: usize = request.prompts.iter().map(Vec::len).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    })
}

/// A non-streamed response; `completions` in choice order.
pub fn complete(
    header: &Header,
    request: &GenerationRequest,
    tokenizer: &Tokenizer,
    completions: &[Completion],
) -> Value {
    let choices = completions
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let tokens = request.logprobs.then(|| token_logprobs(tokenizer, c));
            match request.endpoint {
                Endpoint::Chat => {
                    let text = format!("{}{}", request.reply_prefix, c.text);
                    let mut message = json!({"role": "assistant", "content": text});
                    if request.reasoning {
                        let (reasoning, answer) = split_reasoning(&text);
                        message["content"] = answer.into();
                        message["reasoning_content"] = reasoning.into();
                    }
                    json!({
                        "index": index,
                        "message": message,
                        "logprobs": tokens.map(|t| chat_logprobs(&t)),
                        "finish_reason": finish_reason(&c.finish_reason),
                    })
                }
                Endpoint::Completion => json!({
                    "index": index,
                    "text": c.text,
                    "logprobs": tokens.map(|t| completion_logprobs(&t)),
                    "finish_reason": finish_reason(&c.finish_reason),
                }),
            }
        })
        .collect();
    let mut body = header.body(request.endpoint, false, choices);
    let generated = completions.iter().map(|c| c.token_ids.len()).sum();
    body["usage"] = usage(request, generated);
    body
}

/// (token text, log-prob) of each generated token the text shows: a completion that ended on a
/// stop id leaves that id out, as its text does.
pub fn token_logprobs(tokenizer: &Tokenizer, c: &Completion) -> Vec<(String, f32)> {
    let shown = match c.finish_reason {
        FinishReason::Eos => c.token_ids.len().saturating_sub(1),
        _ => c.token_ids.len(),
    };
    c.token_ids[..shown]
        .iter()
        .zip(&c.logprobs)
        .map(|(&id, &lp)| (token_text(tokenizer, id), lp))
        .collect()
}

pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tokens: &[(String, f32)]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|(token, lp)| {
            json!({"token": token, "logprob": lp, "bytes": token.as_bytes(), "top_logprobs": []})
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs`: parallel lists; `top_logprobs` is not computed.
pub fn completion_logprobs(tokens: &[(String, f32)]) -> Value {
    let mut offset = 0;
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|(t, _)| {
            let at = offset;
            offset += t.len();
            at
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|(_, lp)| *lp).collect::<Vec<_>>(),
        "top_logprobs": Value::Null,
        "text_offset": offsets,
    })
}
