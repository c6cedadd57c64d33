//! Request bodies of `/v1/chat/completions` and `/v1/completions` → what to generate.
//!
//! Bodies are read as JSON values field by field rather than deserialised into structs, so that
//! every problem becomes an OpenAI-shaped 400 naming the field (`param`). Unknown fields are
//! ignored, as OpenAI-compatible servers do; fields we cannot honour (`echo`, `best_of`,
//! alternatives in `logprobs`) are refused rather than silently dropped.

use dagrun_model::ChatMessage;
use dagrun_model::generate::SamplingParams;
use serde_json::{Map, Value};

use crate::errors::ApiError;
use crate::model::ServedModel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// A validated request: prompts as token ids and how to sample them.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub endpoint: Endpoint,
    /// One prompt for chat; one or more for completions. Each gets `n` choices.
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    /// `seed` here is the request's; choice `i` of prompt `p` samples with
    /// `row_seed(seed, p * n + i)`.
    pub params: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub stream: bool,
    /// `stream_options.include_usage`: usage in a last chunk with no choices, as OpenAI sends
    /// it; otherwise usage rides on each choice's finishing chunk.
    pub include_usage: bool,
    pub logprobs: bool,
    /// Split `<think>…</think>` into `reasoning_content` (chat only).
    pub reasoning: bool,
    /// Text the chat template already opened the reply with (`<think>\n`); every choice's text
    /// starts with it.
    pub reply_prefix: String,
}

/// Most choices (`n` × prompts) one request may ask for.
const MAX_CHOICES: usize = 128;
/// Chat's `max_tokens` when a request does not say: the decoder reserves KV cache for every
/// token a sequence may make, so "the rest of a 32k context" would reserve gigabytes per row.
const DEFAULT_CHAT_MAX_TOKENS: usize = 4096;
/// OpenAI's limit on `stop` strings.
const MAX_STOPS: usize = 4;

pub fn parse(
    body: &[u8],
    endpoint: Endpoint,
    model: &ServedModel,
) -> Result<GenerationRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    match body.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) if model.answers_to(name) => {}
        Some(Value::String(name)) => return Err(ApiError::model_not_found(name)),
        Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a string")),
    }
    let (prompts, stop_ids, reply_prefix) = match endpoint {
        Endpoint::Chat => {
            let messages = chat_messages(&body)?;
            let ids = model
                .chat_prompt(&messages)
                .map_err(|e| ApiError::invalid(Some("messages"), format!("{e:#}")))?;
            let format = &model.format;
            (
                vec![ids],
                format.stop_ids.clone(),
                format.reply_prefix.clone(),
            )
        }
        Endpoint::Completion => {
            let prompts = completion_prompts(&body)?
                .iter()
                .map(|p| model.raw_prompt(p))
                .collect::<anyhow::Result<Vec<_>>>()
                .map_err(|e| ApiError::invalid(Some("prompt"), format!("{e:#}")))?;
            (
                prompts,
                model.format.tokenizer.eos_ids.clone(),
                String::new(),
            )
        }
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let context = model.context;
    if longest >= context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the prompt has {longest}"
        )));
    }
    let max_key = match (endpoint, body.contains_key("max_completion_tokens")) {
        (Endpoint::Chat, true) => "max_completion_tokens",
        _ => "max_tokens",
    };
    let max_tokens = match uint(&body, max_key)? {
        Some(0) => return Err(ApiError::invalid(Some(max_key), "must be at least 1")),
        Some(m) => m,
        // OpenAI's defaults: the rest of the context for chat (capped: the KV cache is sized
        // for `max_tokens` up front), 16 tokens for completions.
        None if endpoint == Endpoint::Chat => (context - longest).min(DEFAULT_CHAT_MAX_TOKENS),
        None => 16.min(context - longest),
    };
    if longest.saturating_add(max_tokens) > context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the prompt has {longest} \
             and {max_key} asks for {max_tokens} more"
        )));
    }
    let temperature = number(&body, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("{temperature} is not in [0, 2]"),
        ));
    }
    let top_p = number(&body, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("{top_p} is not in (0, 1]"),
        ));
    }
    let top_k = match body.get("top_k").and_then(Value::as_i64) {
        Some(-1) => 0, // vLLM's "off"
        _ => uint(&body, "top_k")?.unwrap_or(0),
    };
    let n = uint(&body, "n")?.unwrap_or(1);
    let choices = n.saturating_mul(prompts.len());
    if n == 0 || choices > MAX_CHOICES || choices > model.max_batch {
        let most = MAX_CHOICES.min(model.max_batch);
        return Err(ApiError::invalid(
            Some("n"),
            format!("n × prompts must be between 1 and {most} (this server's --max-batch)"),
        ));
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => rand::random::<u64>(),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|s| s as u64))
            .ok_or_else(|| ApiError::invalid(Some("seed"), "`seed` must be an integer"))?,
    };
    let logprobs = logprobs(&body, endpoint)?;
    if flag(&body, "echo")? {
        return Err(ApiError::invalid(Some("echo"), "`echo` is not supported"));
    }
    if let Some(best_of) = uint(&body, "best_of")?
        && best_of != n
    {
        return Err(ApiError::invalid(
            Some("best_of"),
            "`best_of` is not supported",
        ));
    }
    // vLLM's extension: generate until max_tokens or a stop string (for benchmarks).
    let stop_ids = if flag(&body, "ignore_eos")? {
        Vec::new()
    } else {
        stop_ids
    };
    let reasoning = endpoint == Endpoint::Chat
        && (flag(&body, "include_reasoning")? || body.contains_key("reasoning_effort"));
    Ok(GenerationRequest {
        endpoint,
        prompts,
        n,
        params: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            max_new_tokens: max_tokens,
            stop_strings: stops(&body)?,
            seed,
        },
        stop_ids,
        stream: flag(&body, "stream")?,
        include_usage: body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        logprobs,
        reasoning,
        reply_prefix,
    })
}

fn chat_messages(body: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("messages"), m);
    let list = match body.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => return Err(bad("`messages` must not be empty")),
        Some(_) => return Err(bad("`messages` must be a list")),
        None => return Err(bad("`messages` is required")),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("messages[{i}] needs a `role` string")))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                // Content parts: the text ones, joined (images and audio are not supported).
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type"), p.get("text")) {
                        (Some(t), Some(Value::String(text))) if t == "text" => Ok(text.as_str()),
                        _ => Err(bad(&format!(
                            "messages[{i}]: only text content parts are supported"
                        ))),
                    })
                    .collect::<Result<String, _>>()?,
                None | Some(Value::Null) => String::new(),
                Some(_) => {
                    return Err(bad(&format!(
                        "messages[{i}].content must be a string or a list of parts"
                    )));
                }
            };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

fn completion_prompts(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("prompt"), m);
    match body.get("prompt") {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("`prompt` must be a string or a list of strings"))
            })
            .collect(),
        None => Err(bad("`prompt` is required")),
        Some(_) => Err(bad(
            "`prompt` must be a string or a non-empty list of strings",
        )),
    }
}

/// `logprobs`: chat's boolean (with `top_logprobs` 0), or completions' integer (0 or 1). Only
/// the chosen tokens' log-probs are returned, so asking for alternatives is refused.
fn logprobs(body: &Map<String, Value>, endpoint: Endpoint) -> Result<bool, ApiError> {
    let unsupported = |param: &str| {
        ApiError::invalid(
            Some(param),
            "only the chosen tokens' log-probs are returned; alternatives are not supported",
        )
    };
    match endpoint {
        Endpoint::Chat => {
            if uint(body, "top_logprobs")?.is_some_and(|k| k > 0) {
                return Err(unsupported("top_logprobs"));
            }
            flag(body, "logprobs")
        }
        Endpoint::Completion => match uint(body, "logprobs")? {
            None => Ok(false),
            Some(k) if k <= 1 => Ok(true),
            Some(_) => Err(unsupported("logprobs")),
        },
    }
}

fn stops(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("stop"),
            "`stop` must be a string or a list of up to 4 strings",
        )
    };
    let stops = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) if list.len() <= MAX_STOPS => list
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop"),
            "stop strings must not be empty",
        ));
    }
    Ok(stops)
}

fn number(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::invalid(Some(key), format!("`{key}` must be a number"))),
    }
}

fn uint(body: &Map<String, Value>, key: &str) -> Result<Option<usize>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(Some(key), format!("`{key}` must be a non-negative integer"))
            }),
    }
}

fn flag(body: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(
            Some(key),
            format!("`{key}` must be true or false"),
        )),
    }
}
