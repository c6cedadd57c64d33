//! Step-wise batched decoding with a KV cache: the machinery under [`generate`](crate::generate).
//!
//! A [`Decoder`] holds a running batch. [`Decoder::add`] prefills new sequences (left-padded,
//! together) and joins them to the batch; [`Decoder::step`] picks one token for every sequence
//! and feeds it back, returning the tokens as they are made; finished sequences leave the batch
//! and the cache. A server adds requests between steps (continuous batching) and streams each
//! step's tokens; `generate` adds everything once and steps until the batch is empty.
//!
//! Every sequence carries its own sampling settings, stop ids and RNG (ChaCha seeded with its
//! `params.seed` as given), so its samples do not depend on what else is in the batch.

use anyhow::{Result, bail, ensure};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::device::memory_limit;
use crate::generate::{Completion, FinishReason, SamplingParams, check_memory};
use crate::llama::{CausalLm, KvCache, TokenBatch};
use crate::tokenizer::Tokenizer;

/// A sequence to decode: its prompt, how to sample it (`params.seed` seeds its own RNG) and the
/// ids that end it.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// The caller's name for the sequence; [`StepToken::key`] repeats it.
    pub key: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop_ids: Vec<u32>,
}

/// One token a [`Decoder::step`] chose for one sequence.
#[derive(Debug, Clone)]
pub struct StepToken {
    pub key: u64,
    pub token: u32,
    pub logprob: f32,
    /// The whole completion, when this token ended the sequence.
    pub finished: Option<Completion>,
}

struct Row {
    key: u64,
    params: SamplingParams,
    stop_ids: Vec<u32>,
    rng: ChaCha8Rng,
    /// Tokens of this row in the cache: the prompt and every generated token fed back.
    next_position: usize,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
}

/// A running batch of sequences on one model.
pub struct Decoder<'a, B: Backend> {
    model: &'a CausalLm<B>,
    tokenizer: Option<&'a Tokenizer>,
    cache: Option<KvCache<B>>,
    rows: Vec<Row>,
    /// `[rows, vocab]` next-token logits of every row, waiting for the next step.
    logits: Option<Tensor<B, 2>>,
}

impl<'a, B: Backend> Decoder<'a, B> {
    /// `tokenizer` decodes completions and is needed for stop strings. Pass an inference model
    /// (for a model being trained, `model.valid()`).
    pub fn new(model: &'a CausalLm<B>, tokenizer: Option<&'a Tokenizer>) -> Self {
        Decoder {
            model,
            tokenizer,
            cache: None,
            rows: Vec::new(),
            logits: None,
        }
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prefills `sequences` together and adds them to the batch; their first tokens come with
    /// the next [`step`](Self::step). On an error (a bad sequence, or a batch that would not fit
    /// in memory: [`TooLarge`](crate::generate::TooLarge)) the batch is left as it was, except
    /// when the running batch itself cannot go on (an earlier step failed): then it is dropped,
    /// which [`len`](Self::len) shows.
    pub fn add(&mut self, mut sequences: Vec<Sequence>) -> Result<()> {
        if sequences.is_empty() {
            return Ok(());
        }
        for s in &sequences {
            check_sequence(s, self.tokenizer)?;
        }
        let longest_new = sequences.iter().map(|s| s.prompt.len()).max().unwrap_or(0);
        let longest = self
            .rows
            .iter()
            .map(|r| r.next_position)
            .max()
            .unwrap_or(0)
            .max(longest_new);
        let remaining = |max_new: usize, made: usize| max_new.saturating_sub(made);
        let most_new = self
            .rows
            .iter()
            .map(|r| remaining(r.params.max_new_tokens, r.tokens.len()))
            .chain(sequences.iter().map(|s| s.params.max_new_tokens))
            .max()
            .unwrap_or(0);
        check_memory(
            &self.model.config,
            self.rows.len() + sequences.len(),
            longest,
            most_new,
            memory_limit::<B>(),
        )?;
        // The rows keep only their lengths, so the prompts move into the prefill batch.
        let prompts: Vec<Vec<u32>> = (sequences.iter_mut())
            .map(|s| std::mem::take(&mut s.prompt))
            .collect();
        let batch = TokenBatch::left_padded(&prompts, 0);
        let new_most = sequences.iter().map(|s| s.params.max_new_tokens).max();
        // Alone, the prefill's cache is the batch's (room for every new token); joining a
        // running batch, it only needs the prompts, and the join makes room.
        let capacity = match self.rows.is_empty() {
            true => batch.seq + new_most.unwrap_or(0),
            false => batch.seq,
        };
        let mut cache = KvCache::<B>::new(
            &self.model.config,
            batch.batch,
            capacity,
            &self.model.device(),
        );
        let logits = self.model.forward_cached(&batch, &mut cache)?;
        let (cache, logits) = if self.rows.is_empty() {
            (cache, logits)
        } else {
            let (Some(running), Some(waiting)) = (self.cache.take(), self.logits.take()) else {
                self.rows.clear();
                bail!("the running batch lost its cache or logits (an earlier step failed)");
            };
            match KvCache::join(vec![running, cache], longest, longest + most_new) {
                Ok(joined) => (joined, Tensor::cat(vec![waiting, logits], 0)),
                Err(e) => {
                    // `join` consumed the running cache; without it the batch is lost.
                    self.rows.clear();
                    return Err(e);
                }
            }
        };
        self.cache = Some(cache);
        self.logits = Some(logits);
        self.rows
            .extend(sequences.into_iter().zip(&prompts).map(|(s, prompt)| Row {
                key: s.key,
                rng: ChaCha8Rng::seed_from_u64(s.params.seed),
                next_position: prompt.len(),
                params: s.params,
                stop_ids: s.stop_ids,
                tokens: Vec::new(),
                logprobs: Vec::new(),
            }));
        Ok(())
    }

    /// Chooses the next token of every sequence and feeds it back; sequences that end (a stop
    /// id, a stop string, `max_new_tokens`) leave the batch with their completion.
    pub fn step(&mut self) -> Result<Vec<StepToken>> {
        let Some(logits) = self.logits.take() else {
            return Ok(Vec::new());
        };
        let picks = pick_tokens(logits, &mut self.rows)?;
        let mut out = Vec::with_capacity(self.rows.len());
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut still_running = Vec::with_capacity(self.rows.len());
        for (slot, (mut row, (token, logprob))) in self.rows.drain(..).zip(picks).enumerate() {
            row.tokens.push(token);
            row.logprobs.push(logprob);
            row.next_position += 1;
            let reason = if row.stop_ids.contains(&token) {
                Some((FinishReason::Eos, None))
            } else if let Some(cut) = stop_string_cut(&row, self.tokenizer)? {
                Some((FinishReason::StopString, Some(cut)))
            } else if row.tokens.len() >= row.params.max_new_tokens {
                Some((FinishReason::Length, None))
            } else {
                None
            };
            let key = row.key;
            let finished = match reason {
                Some((reason, cut)) => Some(finish(row, self.tokenizer, reason, cut)?),
                None => {
                    keep.push(slot);
                    still_running.push(row);
                    None
                }
            };
            out.push(StepToken {
                key,
                token,
                logprob,
                finished,
            });
        }
        self.rows = still_running;
        if self.rows.is_empty() {
            self.cache = None;
            return Ok(out);
        }
        let Some(cache) = self.cache.as_mut() else {
            anyhow::bail!("decoder: rows without a cache");
        };
        cache.retain_rows(&keep);
        let step = TokenBatch {
            batch: self.rows.len(),
            seq: 1,
            ids: self
                .rows
                .iter()
                .map(|r| *r.tokens.last().expect("a token was just pushed"))
                .collect(),
            mask: vec![true; self.rows.len()],
            positions: Some(self.rows.iter().map(|r| r.next_position - 1).collect()),
        };
        self.logits = Some(self.model.forward_cached(&step, cache)?);
        Ok(out)
    }

    /// Drops the sequences named by `keys` (say, a request whose client went away).
    pub fn remove(&mut self, keys: &[u64]) {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&i| !keys.contains(&self.rows[i].key))
            .collect();
        if keep.len() == self.rows.len() {
            return;
        }
        if keep.is_empty() {
            self.rows.clear();
            self.cache = None;
            self.logits = None;
            return;
        }
        if let Some(cache) = self.cache.as_mut() {
            cache.retain_rows(&keep);
        }
        if let Some(logits) = self.logits.take() {
            let device = logits.device();
            let idx: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [keep.len()]), &device);
            self.logits = Some(logits.select(0, index));
        }
        let mut slot = 0;
        self.rows.retain(|_| {
            let kept = keep.contains(&slot);
            slot += 1;
            kept
        });
    }
}

pub(crate) fn check_sequence(s: &Sequence, tokenizer: Option<&Tokenizer>) -> Result<()> {
    let p = &s.params;
    ensure!(p.temperature >= 0.0, "temperature must be >= 0");
    ensure!(p.top_p > 0.0 && p.top_p <= 1.0, "top_p must be in (0, 1]");
    ensure!(
        p.stop_strings.is_empty() || tokenizer.is_some(),
        "stop strings need a tokenizer"
    );
    ensure!(
        !s.prompt.is_empty(),
        "every prompt needs at least one token"
    );
    ensure!(p.max_new_tokens > 0, "max_new_tokens must be at least 1");
    Ok(())
}

/// Chooses the next token of every row from `logits` `[rows, vocab]`; returns (id, log-prob).
/// When every row is greedy the argmax is taken on the device and only ids and log-probs cross
/// to the host; otherwise the log-softmax rows come to the host and each row is picked by its
/// own settings (a greedy row by the first largest log-prob, as the device's argmax does).
fn pick_tokens<B: Backend>(logits: Tensor<B, 2>, rows: &mut [Row]) -> Result<Vec<(u32, f32)>> {
    let [n, vocab] = logits.dims();
    let logp = log_softmax(logits, 1);
    if rows.iter().all(|r| r.params.temperature == 0.0) {
        let ids: Tensor<B, 2, Int> = logp.clone().argmax(1);
        let chosen = logp.gather(1, ids.clone());
        let ids = ids
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let lps = chosen
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        return Ok(ids.into_iter().map(|i| i as u32).zip(lps).collect());
    }
    let all = logp
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut out = Vec::with_capacity(n);
    for (r, row) in rows.iter_mut().enumerate() {
        let lp = &all[r * vocab..(r + 1) * vocab];
        let id = if row.params.temperature == 0.0 {
            first_argmax(lp)
        } else {
            sample(lp, &row.params, &mut row.rng)
        };
        out.push((id as u32, lp[id]));
    }
    Ok(out)
}

fn first_argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
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
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logp[i] as f64 - max) / t).exp())
        .collect();
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
fn stop_string_cut(row: &Row, tokenizer: Option<&Tokenizer>) -> Result<Option<usize>> {
    let stops = &row.params.stop_strings;
    let (Some(tok), false) = (tokenizer, stops.is_empty()) else {
        return Ok(None);
    };
    let text = tok.decode(&row.tokens, true)?;
    Ok(stops.iter().filter_map(|s| text.find(s.as_str())).min())
}

fn finish(
    row: Row,
    tokenizer: Option<&Tokenizer>,
    reason: FinishReason,
    cut: Option<usize>,
) -> Result<Completion> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    type Cpu = burn::backend::Flex;

    fn model() -> CausalLm<Cpu> {
        let config = ModelConfig::llama(32, 16, 32, 2, 2, 1, 128);
        CausalLm::<Cpu>::init_random(&config, 7, &Default::default()).unwrap()
    }

    fn sequence(key: u64, prompt: &[u32], temperature: f32, max_new_tokens: usize) -> Sequence {
        Sequence {
            key,
            prompt: prompt.to_vec(),
            params: SamplingParams {
                temperature,
                max_new_tokens,
                seed: 100 + key,
                ..SamplingParams::default()
            },
            stop_ids: Vec::new(),
        }
    }

    /// Steps until every sequence is done, adding `late` after `after` steps; the tokens of
    /// each key in order.
    fn run(
        decoder: &mut Decoder<'_, Cpu>,
        mut late: Option<Vec<Sequence>>,
        after: usize,
    ) -> std::collections::BTreeMap<u64, Vec<u32>> {
        let mut out = std::collections::BTreeMap::<u64, Vec<u32>>::new();
        let mut steps = 0;
        while !decoder.is_empty() || late.is_some() {
            if steps == after
                && let Some(l) = late.take()
            {
                decoder.add(l).unwrap();
            }
            for t in decoder.step().unwrap() {
                out.entry(t.key).or_default().push(t.token);
                if let Some(done) = t.finished {
                    assert_eq!(done.token_ids, out[&t.key]);
                }
            }
            steps += 1;
        }
        out
    }

    fn alone(s: Sequence) -> Vec<u32> {
        let model = model();
        let mut decoder = Decoder::new(&model, None);
        let key = s.key;
        decoder.add(vec![s]).unwrap();
        run(&mut decoder, None, 0).remove(&key).unwrap()
    }

    #[test]
    fn a_sequence_that_joins_a_running_batch_decodes_as_it_would_alone() {
        for temperature in [0.0, 1.0] {
            let early = [
                sequence(1, &[3, 4, 5], temperature, 12),
                sequence(2, &[6, 7, 8, 9, 10, 11, 12], temperature, 5),
            ];
            // Longer than what the running rows hold by then, and shorter.
            let late = [
                sequence(3, &[1; 20], temperature, 9),
                sequence(4, &[2], temperature, 14),
            ];
            let model = model();
            let mut decoder = Decoder::new(&model, None);
            decoder.add(early.to_vec()).unwrap();
            let together = run(&mut decoder, Some(late.to_vec()), 3);
            for s in early.iter().chain(&late) {
                assert_eq!(
                    together[&s.key],
                    alone(s.clone()),
                    "sequence {} at T {temperature}",
                    s.key
                );
                assert_eq!(together[&s.key].len(), s.params.max_new_tokens);
            }
        }
    }

    #[test]
    fn removed_sequences_leave_the_others_undisturbed() {
        let model = model();
        let mut decoder = Decoder::new(&model, None);
        let a = sequence(1, &[3, 4, 5], 1.0, 10);
        let b = sequence(2, &[9, 8], 1.0, 10);
        decoder.add(vec![a, b.clone()]).unwrap();
        let mut tokens = Vec::new();
        for step in 0..10 {
            if step == 4 {
                decoder.remove(&[1]);
                assert_eq!(decoder.len(), 1);
            }
            for t in decoder.step().unwrap() {
                assert!(step < 4 || t.key == 2, "a removed sequence came back");
                if t.key == 2 {
                    tokens.push(t.token);
                }
            }
        }
        assert!(decoder.is_empty());
        assert_eq!(tokens, alone(b));
    }
}
