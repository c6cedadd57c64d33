//! Batched generation with a KV cache.
//!
//! Prompts of different lengths are left-padded into one batch and prefilled together; then one
//! token per step is decoded for every unfinished row. Rows that finish (EOS, a stop string, or
//! `max_new_tokens`) leave the batch and the cache, so they stop costing compute.
//!
//! Greedy decoding (temperature 0) takes the argmax and its log-prob on the device: only the ids
//! and log-probs cross to the host. Sampling brings each step's log-softmax row to the host,
//! where top-k / top-p filtering and the draw happen with a per-sequence ChaCha RNG seeded from
//! `(seed, index)`, so a sequence's completion does not depend on the rest of the batch or on
//! the backend.
//!
//! The step-wise machinery (a running batch that sequences join and leave, one token per step)
//! is [`crate::decoder`]; this is its whole-batch form.
//!
//! Returned log-probs are the model's own (temperature 1, unfiltered) log-probabilities of the
//! chosen tokens: what policy-gradient methods compare against.

use anyhow::{Context, Result, ensure};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::decoder::{Decoder, Sequence};
use crate::device::{human_bytes, memory_limit};
use crate::llama::{CausalLm, KvCache};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// Generation stops (per sequence) when the completion text contains one of these; the text
    /// is cut before it.
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 128,
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Generated ids, including the EOS token when generation ended on one.
    pub token_ids: Vec<u32>,
    /// Decoded completion without special tokens, cut before a matched stop string.
    pub text: String,
    /// Log-prob of each generated token under the model.
    pub logprobs: Vec<f32>,
    /// True when `max_new_tokens` ran out before EOS or a stop string.
    pub truncated: bool,
    pub finish_reason: FinishReason,
}

/// The RNG seed of the `index`-th sequence of a call seeded with `seed`: what [`generate`] gives
/// each row, so a row's samples depend on its index and not on the rest of the batch.
pub fn row_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Generates a completion for every prompt (token ids). `tokenizer` decodes the text and is
/// needed for stop strings; `eos_ids` end a sequence. Pass an inference model: for a model being
/// trained, `model.valid()` (generating on an autodiff backend would build graphs that are never
/// back-propagated).
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    eos_ids: &[u32],
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    ensure!(params.temperature >= 0.0, "temperature must be >= 0");
    ensure!(
        params.top_p > 0.0 && params.top_p <= 1.0,
        "top_p must be in (0, 1]"
    );
    ensure!(
        params.stop_strings.is_empty() || tokenizer.is_some(),
        "stop strings need a tokenizer"
    );
    ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "every prompt needs at least one token"
    );
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Checked before the sequences are built: absurd sizes fail here, not in an allocation.
    check_memory(
        &model.config,
        prompts.len(),
        longest,
        params.max_new_tokens,
        memory_limit::<B>(),
    )?;
    if params.max_new_tokens == 0 {
        let text = match tokenizer {
            Some(tok) => tok.decode(&[], true)?,
            None => String::new(),
        };
        let empty = Completion {
            token_ids: Vec::new(),
            text,
            logprobs: Vec::new(),
            truncated: true,
            finish_reason: FinishReason::Length,
        };
        return Ok(vec![empty; prompts.len()]);
    }
    let mut decoder = Decoder::new(model, tokenizer);
    decoder.add(
        prompts
            .iter()
            .enumerate()
            .map(|(index, prompt)| Sequence {
                key: index as u64,
                prompt: prompt.clone(),
                params: SamplingParams {
                    seed: row_seed(params.seed, index),
                    ..params.clone()
                },
                stop_ids: eos_ids.to_vec(),
            })
            .collect(),
    )?;
    let mut results: Vec<Option<Completion>> = vec![None; prompts.len()];
    while !decoder.is_empty() {
        for token in decoder.step()? {
            if let Some(done) = token.finished {
                results[token.key as usize] = Some(done);
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.context("a sequence never finished"))
        .collect()
}

/// A generation call whose buffers would not fit in memory. Allocating them would abort the
/// process (an allocation failure is not a panic), so [`generate`] returns this first.
#[derive(Debug, Clone, PartialEq)]
pub struct TooLarge {
    pub sequences: usize,
    pub longest_prompt: usize,
    pub max_new_tokens: usize,
    /// Estimated peak bytes, and the KV cache's share of them.
    pub needed: u128,
    pub kv_cache: u128,
    pub limit: u128,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max_new_tokens {} × batch {} (longest prompt {} tokens) needs about {} ({} of KV cache), more than the {} of memory available; lower `max_new_tokens` or `batch_size`",
            self.max_new_tokens,
            self.sequences,
            self.longest_prompt,
            human_bytes(self.needed),
            human_bytes(self.kv_cache),
            human_bytes(self.limit)
        )
    }
}

impl std::error::Error for TooLarge {}

/// Fails with [`TooLarge`] when generating `sequences` rows from prompts of up to `longest`
/// tokens plus `max_new_tokens` needs more than `limit` bytes: the KV cache, the prefill's
/// activations (attention scores and probabilities, MLP and hidden states of every prompt
/// token) or a decoding step's (its attention row over the whole cache, the padding bias), and
/// the last position's logits. A rough upper bound; it errs on the large side.
pub(crate) fn check_memory(
    config: &ModelConfig,
    sequences: usize,
    longest: usize,
    max_new_tokens: usize,
    limit: u128,
) -> Result<()> {
    let capacity = longest as u128 + max_new_tokens as u128;
    let kv_cache = KvCache::<burn::backend::Flex>::bytes(
        config,
        sequences,
        longest.saturating_add(max_new_tokens),
    );
    let [b, t, heads, hidden, ffn, vocab] = [
        sequences,
        longest,
        config.num_attention_heads,
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    ]
    .map(|v| v as u128);
    let layer = kv_cache / (config.num_hidden_layers.max(1) as u128); // a layer's K and V copied once
    let prefill = 4 * b * t * ((2 * heads + 1) * t + 3 * ffn + 6 * hidden);
    let decode = 4 * b * (2 * heads + 1) * capacity;
    let masks = 2 * b * capacity;
    let needed = kv_cache + layer + masks + prefill.max(decode) + 4 * 3 * b * vocab;
    if needed > limit {
        return Err(TooLarge {
            sequences,
            longest_prompt: longest,
            max_new_tokens,
            needed,
            kv_cache,
            limit,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::llama(16, 8, 16, 1, 2, 1, 64)
    }

    #[test]
    fn oversized_generation_is_refused_before_allocating() {
        let config = tiny();
        // The largest values the stages' params allow: petabytes, refused without an abort.
        let model =
            CausalLm::<burn::backend::Flex>::init_random(&config, 0, &Default::default()).unwrap();
        let prompts = vec![vec![1u32, 2, 3]; 65_536];
        let params = SamplingParams {
            max_new_tokens: 1_000_000,
            ..SamplingParams::default()
        };
        let err = generate(&model, None, &prompts, &[], &params).unwrap_err();
        let too_large = err.downcast_ref::<TooLarge>().expect("a TooLarge error");
        assert_eq!(
            (
                too_large.sequences,
                too_large.longest_prompt,
                too_large.max_new_tokens
            ),
            (65_536, 3, 1_000_000)
        );
        assert_eq!(too_large.kv_cache, 2 * 65_536 * 1_000_003 * 4 * 4);
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "max_new_tokens 1000000 × batch 65536 (longest prompt 3 tokens) needs about "
            ),
            "{msg}"
        );
        assert!(
            msg.contains("TiB of KV cache")
                && msg.ends_with("lower `max_new_tokens` or `batch_size`"),
            "{msg}"
        );

        // Against a fixed limit: the same call fits in a terabyte-sized one and not in 1 GiB.
        assert!(check_memory(&config, 64, 3, 1000, 1 << 30).is_ok());
        assert!(check_memory(&config, 65_536, 3, 1000, 1 << 30).is_err());
        // A long prompt's prefill counts even when few tokens are generated.
        assert!(check_memory(&config, 4096, 4096, 1, 1 << 30).is_err());
    }
}
