//! The runtime benchmark behind `dagrun bench`: AdamW training steps and KV-cache greedy
//! generation of a randomly initialised Llama of a given shape, like llama.cpp's llama-bench.
//! `bench/runtime.sh` runs the same shape in PyTorch for comparison.

use std::time::Instant;

use anyhow::{Result, bail, ensure};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::device::{BackendTask, DeviceSpec, available_memory, human_bytes, run_on};
use crate::generate::{SamplingParams, generate};
use crate::llama::CausalLm;
use crate::optim::{AdamW, AdamWConfig, GradAccumulator};
use crate::score::{ScoreItem, score};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BenchShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub batch: usize,
    pub seq: usize,
    pub new_tokens: usize,
    /// Prompt length for the generation benchmark.
    pub prompt_len: usize,
    /// Timed training steps (after one warm-up step).
    pub train_steps: usize,
}

impl Default for BenchShape {
    fn default() -> Self {
        BenchShape {
            layers: 4,
            hidden: 256,
            heads: 4,
            kv_heads: 4,
            ffn: 688,
            vocab: 512,
            batch: 16,
            seq: 128,
            new_tokens: 128,
            prompt_len: 8,
            train_steps: 3,
        }
    }
}

impl BenchShape {
    pub fn config(&self) -> ModelConfig {
        let mut config = ModelConfig::llama(
            self.vocab,
            self.hidden,
            self.ffn,
            self.layers,
            self.heads,
            self.kv_heads,
            4096,
        );
        config.tie_word_embeddings = false;
        config
    }

    /// Checks the shape before anything is allocated: a one-line error naming the `dagrun bench`
    /// flag at fault, instead of a panic or an out-of-memory abort mid-run.
    pub fn check(&self) -> Result<()> {
        let positive = [
            ("--layers", self.layers),
            ("--hidden", self.hidden),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--ffn", self.ffn),
            ("--vocab", self.vocab),
            ("--batch", self.batch),
            ("--new-tokens", self.new_tokens),
            ("--steps", self.train_steps),
            ("prompt length", self.prompt_len),
        ];
        for (flag, value) in positive {
            ensure!(value > 0, "{flag} must be at least 1");
        }
        // Each training sequence is one prompt token and at least one completion token.
        ensure!(self.seq >= 2, "--seq must be at least 2 (got {})", self.seq);
        ensure!(
            self.hidden.is_multiple_of(self.heads),
            "--hidden {} is not a multiple of --heads {}",
            self.hidden,
            self.heads
        );
        ensure!(
            self.heads.is_multiple_of(self.kv_heads),
            "--heads {} is not a multiple of --kv-heads {}",
            self.heads,
            self.kv_heads
        );
        ensure!(
            (self.hidden / self.heads).is_multiple_of(2),
            "--hidden / --heads = {} must be even (rotary embeddings)",
            self.hidden / self.heads
        );
        let needed = self.train_bytes();
        if let Some(available) = available_memory()
            && needed > available as u128
        {
            bail!(
                "this shape needs about {} for a training step, more than the {} of memory available; lower --batch, --seq, --vocab or the model size",
                human_bytes(needed),
                human_bytes(available as u128)
            );
        }
        Ok(())
    }

    /// Rough peak bytes of a training step: parameters with their gradients and two AdamW
    /// moments, plus the activations autodiff keeps per token (per layer: the projections, the
    /// MLP's three `ffn`-wide tensors and the attention probabilities; then the logits).
    fn train_bytes(&self) -> u128 {
        let [layers, hidden, ffn, heads, vocab, batch, seq] = [
            self.layers,
            self.hidden,
            self.ffn,
            self.heads,
            self.vocab,
            self.batch,
            self.seq,
        ]
        .map(|v| v as u128);
        // At most: q, k, v, o of hidden² each, three MLP matrices, embedding and LM head.
        let params = layers * (4 * hidden * hidden + 3 * hidden * ffn) + 2 * vocab * hidden;
        let per_token = layers * (8 * hidden + 4 * ffn + 2 * heads * seq) + 3 * vocab;
        4 * (4 * params + batch * seq * per_token)
    }

    /// Matmul FLOPs of one training step (forward + backward ≈ 3× forward): 6 per weight per
    /// token for the projections and LM head, plus causal attention scores and mixing.
    pub fn train_flops(&self) -> f64 {
        let config = self.config();
        let linear = config.num_params() - config.vocab_size * config.hidden_size; // all but the embedding lookup
        let tokens = (self.batch * self.seq) as f64;
        let attention = 6.0 * self.layers as f64 * self.seq as f64 * self.hidden as f64;
        tokens * (6.0 * linear as f64 + attention)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Training tokens per second (batch × seq per AdamW step).
    pub train_tok_s: f64,
    /// Generated tokens per second (batch × new_tokens, prefill included in the time).
    pub gen_tok_s: f64,
    /// Achieved matmul GFLOP/s during training.
    pub gflops: f64,
    pub train_step_s: f64,
    pub gen_s: f64,
}

struct Bench(BenchShape);

impl BackendTask for Bench {
    type Output = BenchReport;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<BenchReport> {
        let shape = self.0;
        let config = shape.config();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut model = CausalLm::<B>::init_random(&config, 0, &device)?;
        let mut opt = AdamW::<B::InnerBackend>::new(AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        });
        let items: Vec<ScoreItem> = (0..shape.batch)
            .map(|_| {
                let seq: Vec<u32> = (0..shape.seq)
                    .map(|_| rng.random_range(0..shape.vocab as u32))
                    .collect();
                ScoreItem {
                    prompt: seq[..1].to_vec(),
                    completion: seq[1..].to_vec(),
                }
            })
            .collect();
        let mut train_step = |model: CausalLm<B>| -> Result<CausalLm<B>> {
            let loss = score(&model, &items, 0, false)?.mean_nll();
            let mut acc = GradAccumulator::<B>::new();
            acc.backward(loss, &model);
            Ok(opt.step(model, &mut acc, 1e-4)?.0)
        };
        model = train_step(model)?; // warm-up: allocations, thread pool
        let start = Instant::now();
        for _ in 0..shape.train_steps {
            model = train_step(model)?;
        }
        let train_step_s = start.elapsed().as_secs_f64() / shape.train_steps as f64;

        let inference = model.valid();
        let prompts: Vec<Vec<u32>> = (0..shape.batch)
            .map(|_| {
                (0..shape.prompt_len)
                    .map(|_| rng.random_range(0..shape.vocab as u32))
                    .collect()
            })
            .collect();
        let params = SamplingParams {
            max_new_tokens: shape.new_tokens,
            ..SamplingParams::default()
        };
        let warm = SamplingParams {
            max_new_tokens: 2,
            ..params.clone()
        };
        generate(&inference, None, &prompts, &[], &warm)?;
        let start = Instant::now();
        let out = generate(&inference, None, &prompts, &[], &params)?;
        let gen_s = start.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|c| c.token_ids.len()).sum();

        Ok(BenchReport {
            train_tok_s: (shape.batch * shape.seq) as f64 / train_step_s,
            gen_tok_s: generated as f64 / gen_s,
            gflops: shape.train_flops() / train_step_s / 1e9,
            train_step_s,
            gen_s,
        })
    }
}

/// Times training and generation for `shape` on `device`; [`BenchShape::check`]s it first.
pub fn run_bench(shape: &BenchShape, device: &DeviceSpec) -> Result<BenchReport> {
    shape.check()?;
    run_on(device, Bench(*shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(shape: BenchShape) -> String {
        run_bench(&shape, &DeviceSpec::Cpu).unwrap_err().to_string()
    }

    #[test]
    fn bad_shapes_are_one_line_errors_naming_the_flag() {
        let d = BenchShape::default();
        assert_eq!(
            err(BenchShape { seq: 0, ..d }),
            "--seq must be at least 2 (got 0)"
        );
        assert_eq!(
            err(BenchShape { seq: 1, ..d }),
            "--seq must be at least 2 (got 1)"
        );
        assert_eq!(
            err(BenchShape { vocab: 0, ..d }),
            "--vocab must be at least 1"
        );
        assert_eq!(
            err(BenchShape { heads: 0, ..d }),
            "--heads must be at least 1"
        );
        assert_eq!(
            err(BenchShape { kv_heads: 3, ..d }),
            "--heads 4 is not a multiple of --kv-heads 3"
        );
        assert_eq!(
            err(BenchShape {
                hidden: 100,
                heads: 8,
                kv_heads: 8,
                ..d
            }),
            "--hidden 100 is not a multiple of --heads 8"
        );
        assert_eq!(
            err(BenchShape { new_tokens: 0, ..d }),
            "--new-tokens must be at least 1"
        );
        let huge = err(BenchShape {
            batch: 1 << 20,
            seq: 1 << 16,
            ..d
        });
        assert!(
            huge.starts_with("this shape needs about ")
                && huge.contains("lower --batch")
                && !huge.contains('\n'),
            "{huge}"
        );
    }

    #[test]
    fn a_small_shape_runs() {
        let shape = BenchShape {
            layers: 1,
            hidden: 16,
            heads: 2,
            kv_heads: 1,
            ffn: 24,
            vocab: 11,
            batch: 2,
            seq: 2,
            new_tokens: 1,
            prompt_len: 1,
            train_steps: 1,
        };
        let r = run_bench(&shape, &DeviceSpec::Cpu).unwrap();
        assert!(r.train_tok_s > 0.0 && r.gen_tok_s > 0.0);
    }
}
