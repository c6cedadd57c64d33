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
//! Returned log-probs are the model's own (temperature 1, unfiltered) log-probabilities of the
//! chosen tokens: what policy-gradient methods compare against.

use anyhow::{Result, ensure};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::llama::{CausalLm, KvCache, TokenBatch};
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
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens: 128, stop_strings: Vec::new(), seed: 0 }
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

struct Row {
    index: usize,
    rng: ChaCha8Rng,
    next_position: usize,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
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
    ensure!(params.top_p > 0.0 && params.top_p <= 1.0, "top_p must be in (0, 1]");
    ensure!(params.stop_strings.is_empty() || tokenizer.is_some(), "stop strings need a tokenizer");
    ensure!(prompts.iter().all(|p| !p.is_empty()), "every prompt needs at least one token");
    let mut results: Vec<Option<Completion>> = vec![None; prompts.len()];
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let batch = TokenBatch::left_padded(prompts, 0);
    let capacity = batch.seq + params.max_new_tokens;
    let mut cache = KvCache::<B>::new(&model.config, batch.batch, capacity, &model.device());
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(index, p)| Row {
            index,
            rng: ChaCha8Rng::seed_from_u64(params.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            next_position: p.len(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
        })
        .collect();

    if params.max_new_tokens == 0 {
        for row in rows {
            let index = row.index;
            results[index] = Some(finish(row, tokenizer, FinishReason::Length, None)?);
        }
        return Ok(results.into_iter().map(|r| r.expect("every row finished")).collect());
    }

    let mut logits = model.forward_cached(&batch, &mut cache)?;
    loop {
        let picks = pick_tokens(logits, &mut rows, params)?;
        let mut keep = Vec::with_capacity(rows.len());
        let mut still_running = Vec::with_capacity(rows.len());
        for (slot, (mut row, (token, logprob))) in rows.drain(..).zip(picks).enumerate() {
            row.tokens.push(token);
            row.logprobs.push(logprob);
            row.next_position += 1;
            let reason = if eos_ids.contains(&token) {
                Some((FinishReason::Eos, None))
            } else if let Some(cut) = stop_string_cut(&row, tokenizer, &params.stop_strings)? {
                Some((FinishReason::StopString, Some(cut)))
            } else if row.tokens.len() >= params.max_new_tokens {
                Some((FinishReason::Length, None))
            } else {
                None
            };
            match reason {
                Some((reason, cut)) => {
                    let index = row.index;
                    results[index] = Some(finish(row, tokenizer, reason, cut)?);
                }
                None => {
                    keep.push(slot);
                    still_running.push(row);
                }
            }
        }
        rows = still_running;
        if rows.is_empty() {
            break;
        }
        cache.retain_rows(&keep);
        let step = TokenBatch {
            batch: rows.len(),
            seq: 1,
            ids: rows.iter().map(|r| *r.tokens.last().expect("a token was just pushed")).collect(),
            mask: vec![true; rows.len()],
            positions: Some(rows.iter().map(|r| r.next_position - 1).collect()),
        };
        logits = model.forward_cached(&step, &mut cache)?;
    }
    Ok(results.into_iter().map(|r| r.expect("every row finished")).collect())
}

/// Chooses the next token of every row from `logits` `[rows, vocab]`; returns (id, log-prob).
fn pick_tokens<B: Backend>(logits: Tensor<B, 2>, rows: &mut [Row], params: &SamplingParams) -> Result<Vec<(u32, f32)>> {
    let [n, vocab] = logits.dims();
    let logp = log_softmax(logits, 1);
    if params.temperature == 0.0 {
        let ids: Tensor<B, 2, Int> = logp.clone().argmax(1);
        let chosen = logp.gather(1, ids.clone());
        let ids = ids.into_data().convert::<i64>().to_vec::<i64>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let lps = chosen.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        return Ok(ids.into_iter().map(|i| i as u32).zip(lps).collect());
    }
    let all = logp.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut out = Vec::with_capacity(n);
    for (r, row) in rows.iter_mut().enumerate() {
        let lp = &all[r * vocab..(r + 1) * vocab];
        let id = sample(lp, params, &mut row.rng);
        out.push((id as u32, lp[id]));
    }
    Ok(out)
}

/// Samples from `softmax(logp / temperature)` restricted by top-k and top-p.
fn sample(logp: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> usize {
    let mut order: Vec<usize> = (0..logp.len()).collect();
    order.sort_unstable_by(|&a, &b| logp[b].total_cmp(&logp[a]).then(a.cmp(&b)));
    if params.top_k > 0 {
        order.truncate(params.top_k.min(order.len()));
    }
    let max = logp[order[0]] as f64;
    let t = params.temperature as f64;
    let weights: Vec<f64> = order.iter().map(|&i| ((logp[i] as f64 - max) / t).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if params.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        for (k, w) in weights.iter().enumerate() {
            mass += w / total;
            if mass >= params.top_p as f64 {
                keep = k + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut u = rng.random::<f64>() * kept_total;
    for k in 0..keep {
        u -= weights[k];
        if u <= 0.0 {
            return order[k];
        }
    }
    order[keep - 1]
}

/// Byte offset in the completion text where a stop string starts, if one has appeared.
fn stop_string_cut(row: &Row, tokenizer: Option<&Tokenizer>, stops: &[String]) -> Result<Option<usize>> {
    let (Some(tok), false) = (tokenizer, stops.is_empty()) else { return Ok(None) };
    let text = tok.decode(&row.tokens, true)?;
    Ok(stops.iter().filter_map(|s| text.find(s.as_str())).min())
}

fn finish(row: Row, tokenizer: Option<&Tokenizer>, reason: FinishReason, cut: Option<usize>) -> Result<Completion> {
    let mut text = match tokenizer {
        Some(tok) => tok.decode(&row.tokens, true)?,
        None => String::new(),
    };
    if let Some(cut) = cut {
        text.truncate(cut);
    }
    Ok(Completion {
        token_ids: row.tokens,
        text,
        logprobs: row.logprobs,
        truncated: reason == FinishReason::Length,
        finish_reason: reason,
    })
}
