//! Per-token log-probs and entropies of completions given prompts.
//!
//! [`score`] is backend-generic: on an autodiff backend its outputs carry the graph (the policy
//! being trained). [`score_frozen`] is for a frozen reference or old policy: it runs the inner
//! backend of an autodiff model (`AutodiffModule::valid`), so no graph is built at all (burn keeps
//! the memory of graphs that are never back-propagated) and it returns plain host vectors.
//!
//! Only the positions that predict completion tokens go through the LM head, which saves most of
//! its cost when prompts are long or the vocabulary is large. [`completion_logits`] returns those
//! positions' logits themselves, for losses over whole distributions (distillation).
//!
//! [`score_with`] and [`score_host`] take a sampling temperature: logits are divided by it before
//! the log-softmax, for log-probs and entropy alike, as TRL's GRPOTrainer scores the policy, the
//! old policy and the reference at the temperature the completions were sampled at.

use anyhow::{Result, ensure};
use burn::module::AutodiffModule;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::fused;
use crate::llama::{CausalLm, TokenBatch};

/// A (prompt, completion) pair of token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreItem {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// Scores aligned to completion tokens: row `i`, column `k` is completion token `k` of item `i`.
pub struct TokenScores<B: Backend> {
    /// `[items, max_completion]` log p(token | prefix); 0 in padding.
    pub logprobs: Tensor<B, 2>,
    /// `[items, max_completion]` entropy of the predictive distribution (nats), when requested.
    pub entropy: Option<Tensor<B, 2>>,
    /// `[items, max_completion]` 1.0 for real completion tokens, 0.0 for padding.
    pub mask: Tensor<B, 2>,
}

impl<B: Backend> TokenScores<B> {
    /// Mean negative log-likelihood over real completion tokens (the SFT loss).
    pub fn mean_nll(&self) -> Tensor<B, 1> {
        let total = self.mask.clone().sum();
        (self.logprobs.clone() * self.mask.clone()).sum().neg() / total.clamp_min(1.0)
    }
}

/// Host copy of [`TokenScores`]: one vector per item, as long as its completion.
#[derive(Debug, Clone, PartialEq)]
pub struct HostScores {
    pub logprobs: Vec<Vec<f32>>,
    pub entropy: Option<Vec<Vec<f32>>>,
}

/// Whether and how [`score_with`] computes per-token entropy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entropy {
    None,
    /// As a metric only: outside the autodiff graph, so an unused branch is never recorded.
    Detached,
    /// With gradients, for an entropy bonus in the loss.
    Tracked,
}

/// Scores `items` with `model` at temperature 1. `pad_id` fills padding (its value never matters).
/// `with_entropy` adds per-token entropy with gradients ([`Entropy::Tracked`]).
pub fn score<B: Backend>(
    model: &CausalLm<B>,
    items: &[ScoreItem],
    pad_id: u32,
    with_entropy: bool,
) -> Result<TokenScores<B>> {
    score_with(
        model,
        items,
        pad_id,
        if with_entropy {
            Entropy::Tracked
        } else {
            Entropy::None
        },
        1.0,
    )
}

/// The logits of the positions that predict completion tokens, for a loss over whole
/// distributions (distillation) rather than the sampled tokens' log-probs.
pub struct CompletionLogits<B: Backend> {
    /// `[items · width, vocab]`: row `i · width + k` predicts completion token `k` of item `i`;
    /// rows past an item's completion hold some position's logits and are 0 in `mask`.
    pub logits: Tensor<B, 2>,
    /// `[items · width]` the completion token each row predicts (0 in padding).
    pub targets: Vec<u32>,
    /// `[items, width]` 1.0 for real completion tokens, 0.0 for padding.
    pub mask: Tensor<B, 2>,
    /// The longest completion.
    pub width: usize,
}

/// Runs `model` on `items` (right-padded with `pad_id`) and keeps only the logits of the
/// positions that predict completion tokens.
pub fn completion_logits<B: Backend>(
    model: &CausalLm<B>,
    items: &[ScoreItem],
    pad_id: u32,
) -> Result<CompletionLogits<B>> {
    ensure!(!items.is_empty(), "score: no items");
    for (i, item) in items.iter().enumerate() {
        ensure!(
            !item.prompt.is_empty(),
            "score: item {i} has an empty prompt"
        );
    }
    let device = model.device();
    let sequences: Vec<Vec<u32>> = items
        .iter()
        .map(|it| it.prompt.iter().chain(&it.completion).copied().collect())
        .collect();
    let batch = TokenBatch::right_padded(&sequences, pad_id);
    let width = items
        .iter()
        .map(|it| it.completion.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let n = items.len();

    // Hidden state at position p predicts token p+1: completion token k of item i is predicted
    // at row i, column prompt_len - 1 + k.
    let mut rows = Vec::with_capacity(n * width);
    let mut targets = Vec::with_capacity(n * width);
    let mut mask = Vec::with_capacity(n * width);
    for (i, item) in items.iter().enumerate() {
        for k in 0..width {
            let real = k < item.completion.len();
            rows.push(if real {
                (i * batch.seq + item.prompt.len() - 1 + k) as i64
            } else {
                0
            });
            targets.push(if real { item.completion[k] } else { 0 });
            mask.push(if real { 1.0f32 } else { 0.0 });
        }
    }
    let input = model.step_input(&batch, 0, None)?;
    let hidden = model.hidden(&input, None);
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n * width]), &device);
    Ok(CompletionLogits {
        logits: model.logits(hidden.select(0, rows)),
        targets,
        mask: Tensor::<B, 2>::from_data(TensorData::new(mask, [n, width]), &device),
        width,
    })
}

/// [`score`] with a choice of how entropy is computed, at sampling temperature `temperature`
/// (logits ÷ temperature before the log-softmax).
pub fn score_with<B: Backend>(
    model: &CausalLm<B>,
    items: &[ScoreItem],
    pad_id: u32,
    entropy: Entropy,
    temperature: f64,
) -> Result<TokenScores<B>> {
    ensure!(
        temperature.is_finite() && temperature > 0.0,
        "score: temperature is {temperature}; it must be above 0"
    );
    let CompletionLogits {
        logits,
        targets,
        mask,
        width,
    } = completion_logits(model, items, pad_id)?;
    let n = items.len();
    let logits = tempered(logits, temperature);
    let entropy = (entropy != Entropy::None).then(|| {
        let logits = if entropy == Entropy::Detached {
            logits.clone().detach()
        } else {
            logits.clone()
        };
        entropies(logits, 1.0).reshape([n, width]) * mask.clone()
    });
    let logprobs = fused::token_logprobs(logits, &targets).reshape([n, width]) * mask.clone();
    Ok(TokenScores {
        logprobs,
        entropy,
        mask,
    })
}

fn tempered<B: Backend>(logits: Tensor<B, 2>, temperature: f64) -> Tensor<B, 2> {
    // Exactly 1 is the common case: no extra op in the graph.
    if temperature == 1.0 {
        logits
    } else {
        logits.div_scalar(temperature)
    }
}

/// `log_softmax(logits / temperature)[row, targets[row]]` for `logits` `[rows, vocab]` → `[rows]`:
/// what [`score_with`] computes per completion token (exposed for golden tests).
pub fn token_logprobs<B: Backend>(
    logits: Tensor<B, 2>,
    targets: &[u32],
    temperature: f64,
) -> Tensor<B, 1> {
    fused::token_logprobs(tempered(logits, temperature), targets)
}

/// Entropy (nats) of `softmax(logits / temperature)` per row, `[rows, vocab]` → `[rows]`.
pub fn entropies<B: Backend>(logits: Tensor<B, 2>, temperature: f64) -> Tensor<B, 1> {
    let logp = log_softmax(tempered(logits, temperature), 1);
    let rows = logp.dims()[0];
    (logp.clone().exp() * logp).sum_dim(1).neg().reshape([rows])
}

fn rows_to_host<B: Backend>(t: Tensor<B, 2>, items: &[ScoreItem]) -> Result<Vec<Vec<f32>>> {
    let [_, width] = t.dims();
    let flat = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, it)| flat[i * width..i * width + it.completion.len()].to_vec())
        .collect())
}

/// Scores without building an autodiff graph, for frozen models; returns host vectors.
pub fn score_frozen<B: AutodiffBackend>(
    model: &CausalLm<B>,
    items: &[ScoreItem],
    pad_id: u32,
    with_entropy: bool,
) -> Result<HostScores> {
    score_host(&model.valid(), items, pad_id, with_entropy, 1.0)
}

/// Scores on a non-autodiff model at `temperature` and copies the results to the host.
pub fn score_host<B: Backend>(
    model: &CausalLm<B>,
    items: &[ScoreItem],
    pad_id: u32,
    with_entropy: bool,
    temperature: f64,
) -> Result<HostScores> {
    let entropy = if with_entropy {
        Entropy::Tracked
    } else {
        Entropy::None
    };
    let scores = score_with(model, items, pad_id, entropy, temperature)?;
    Ok(HostScores {
        logprobs: rows_to_host(scores.logprobs, items)?,
        entropy: scores.entropy.map(|e| rows_to_host(e, items)).transpose()?,
    })
}
