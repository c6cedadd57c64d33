//! The decoder-only transformer of Hugging Face `LlamaForCausalLM` and `Qwen2ForCausalLM`.
//!
//! Struct and field names follow transformers' module tree, so a parameter's path in the burn
//! module (`model.layers.0.self_attn.q_proj.weight`) is exactly its safetensors name; `params.rs`
//! relies on that for loading, saving, optimizer state and LoRA.
//!
//! Linear weights are stored transposed, `[in, out]`, and applied as `x · W`: the CPU gemm packs
//! a transposed view on every call, which made single-token decoding 7× slower. Checkpoint I/O
//! transposes to and from PyTorch's `[out, in]` (see [`is_linear_weight`]). Rotary embeddings use HF's rotate-half convention, and
//! the cos/sin tables are computed on the host per call (cheap, exact in f64, and lets dynamic NTK
//! depend on the positions actually present, as transformers does).

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::config::{ModelConfig, RopeKind, RopeSpec};
use crate::fused;
use crate::lora::LoraAdapter;

/// Additive bias for masked attention scores. Finite (like transformers' `finfo.min` masks) so
/// a row with every key masked (a left-pad query) gets a uniform softmax instead of NaN.
const MASKED: f32 = -1.0e9;

/// Whether the tensor named `name` (transformers naming) is a linear weight, which this crate
/// keeps transposed relative to the checkpoint.
pub fn is_linear_weight(name: &str) -> bool {
    name == "lm_head.weight" || name.ends_with("_proj.weight")
}

/// `y = x · W + b` (PyTorch's `x · Wᵀ + b` with `W` stored transposed), optionally plus LoRA.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[in_features, out_features]`: the transpose of PyTorch's layout.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    /// `weight` is `[in, out]`.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Linear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            lora: None,
        }
    }

    /// `x`: `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut y = fused::linear_matmul(x.clone(), self.weight.val());
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze::<2>();
        }
        if let Some(lora) = &self.lora {
            y = y + lora.delta(x);
        }
        y
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `x`: `[tokens, hidden]`; statistics in f32 like transformers.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        fused::rms_norm(x, self.weight.val(), self.eps)
    }
}

#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]`.
    pub weight: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let hidden = fused::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(hidden)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// `LlamaForCausalLM` / `Qwen2ForCausalLM`. `lm_head` is `None` when the embeddings are tied.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: LlamaModel<B>,
    pub lm_head: Option<Linear<B>>,
    pub config: ModelConfig,
}

/// Per-call device inputs derived from a host batch: rotary tables and the attention bias.
pub struct StepInput<B: Backend> {
    /// `[batch, seq]` token ids.
    pub ids: Tensor<B, 2, Int>,
    /// Rotary tables for the `batch*seq` tokens.
    pub rope: RopeTables<B>,
    /// `[batch, 1, seq, keys]`: 0 where attention is allowed, `MASKED` elsewhere. `None` when
    /// there is nothing to mask (one query attending to every key of an unpadded cache).
    pub bias: Option<Tensor<B, 4>>,
    pub batch: usize,
    pub seq: usize,
}

/// Token ids padded to a rectangle plus which entries are real tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq: usize,
    /// Row-major `[batch, seq]`.
    pub ids: Vec<u32>,
    /// `true` for real tokens, `false` for padding.
    pub mask: Vec<bool>,
    /// Explicit position ids; `None` derives them from the mask (see [`TokenBatch::positions`]).
    pub positions: Option<Vec<usize>>,
}

impl TokenBatch {
    /// Left-pads sequences of different lengths (what generation wants: every row ends at the
    /// last column).
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32) -> Self {
        Self::padded(seqs, pad_id, true)
    }

    /// Right-pads (what training and scoring usually want).
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32) -> Self {
        Self::padded(seqs, pad_id, false)
    }

    fn padded(seqs: &[Vec<u32>], pad_id: u32, left: bool) -> Self {
        let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * seq);
        let mut mask = Vec::with_capacity(seqs.len() * seq);
        for s in seqs {
            let pad = seq - s.len();
            if left {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(false, pad));
            }
            ids.extend_from_slice(s);
            mask.extend(std::iter::repeat_n(true, s.len()));
            if !left {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(false, pad));
            }
        }
        TokenBatch {
            batch: seqs.len(),
            seq,
            ids,
            mask,
            positions: None,
        }
    }

    /// Position ids as transformers' `generate` derives them: `cumsum(mask) - 1`, with padding
    /// at position 1 (its value never matters, it is masked).
    pub fn positions(&self) -> Vec<usize> {
        if let Some(p) = &self.positions {
            return p.clone();
        }
        let mut out = Vec::with_capacity(self.ids.len());
        for row in self.mask.chunks(self.seq.max(1)) {
            let mut count = 0usize;
            for &m in row {
                if m {
                    out.push(count);
                    count += 1;
                } else {
                    out.push(1);
                }
            }
        }
        out
    }

    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        ensure!(
            self.ids.len() == self.batch * self.seq,
            "token batch: ids length != batch * seq"
        );
        ensure!(
            self.mask.len() == self.ids.len(),
            "token batch: mask length != ids length"
        );
        if let Some(p) = &self.positions {
            ensure!(
                p.len() == self.ids.len(),
                "token batch: positions length != ids length"
            );
        }
        if let Some(bad) = self.ids.iter().find(|&&id| id as usize >= vocab_size) {
            bail!("token id {bad} is outside the vocabulary (size {vocab_size})");
        }
        Ok(())
    }
}

/// Inverse frequencies and the cos/sin scale for RoPE, as transformers computes them.
pub struct Rope {
    spec: RopeSpec,
    dim: usize,
    max_position_embeddings: usize,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Result<Self> {
        Ok(Rope {
            spec: config.rope()?,
            dim: config.head_dim(),
            max_position_embeddings: config.max_position_embeddings,
        })
    }

    fn default_inv_freq(&self, base: f64) -> Vec<f64> {
        let d = self.dim as f64;
        (0..self.dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / d))
            .collect()
    }

    /// `(inv_freq, attention_factor)` for sequences whose largest position is `max_pos`.
    pub fn inv_freq(&self, max_pos: usize) -> (Vec<f64>, f64) {
        let base = self.spec.theta;
        let dim = self.dim as f64;
        match &self.spec.kind {
            RopeKind::Default => (self.default_inv_freq(base), 1.0),
            RopeKind::Linear { factor } => (
                self.default_inv_freq(base)
                    .into_iter()
                    .map(|f| f / factor)
                    .collect(),
                1.0,
            ),
            RopeKind::Dynamic { factor } => {
                // transformers recomputes the base once the sequence outgrows the trained length.
                let seq_len = (max_pos + 1).max(self.max_position_embeddings) as f64;
                let max = self.max_position_embeddings as f64;
                let scaled =
                    base * ((factor * seq_len / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
                (self.default_inv_freq(scaled), 1.0)
            }
            RopeKind::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(all)) if *m != 0.0 && *all != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *all)
                    }
                    _ => get_mscale(*factor, 1.0),
                });
                let orig = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv = (0..self.dim / 2)
                    .map(|i| {
                        let pos_freq = base.powf((2 * i) as f64 / dim);
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (1.0 / (factor * pos_freq)) * (1.0 - extrapolation)
                            + (1.0 / pos_freq) * extrapolation
                    })
                    .collect();
                (inv, attention)
            }
            RopeKind::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let inv = self
                    .default_inv_freq(base)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }

    /// cos and sin tables `[positions.len(), dim/2]`, rounded the way transformers' f32 math
    /// rounds (f32 inverse frequency times f32 position), so logits match to ~1e-6.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let max_pos = positions.iter().copied().max().unwrap_or(0);
        let (inv_freq, scale) = self.inv_freq(max_pos);
        let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let half = inv_freq.len();
        // Rows of a batch share positions: compute each distinct position once.
        let mut by_position: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; max_pos + 1];
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let (c, s) = by_position[p].get_or_insert_with(|| {
                inv_freq
                    .iter()
                    .map(|&f| {
                        let angle = (f * p as f32) as f64;
                        ((angle.cos() * scale) as f32, (angle.sin() * scale) as f32)
                    })
                    .unzip()
            });
            cos.extend_from_slice(c);
            sin.extend_from_slice(s);
        }
        (cos, sin)
    }
}

/// Preallocated keys and values of every layer, `[batch, kv_heads, capacity, head_dim]`, written
/// in place as tokens arrive (burn writes a uniquely owned tensor without copying it).
pub struct KvCache<B: Backend> {
    pub keys: Vec<Tensor<B, 4>>,
    pub values: Vec<Tensor<B, 4>>,
    /// Columns filled so far (shared by all rows: prompts are left-padded).
    pub len: usize,
    pub capacity: usize,
    pub batch: usize,
    /// Row-major `[batch, capacity]`: which cached columns are real tokens.
    pub key_mask: Vec<bool>,
}

impl<B: Backend> KvCache<B> {
    /// Bytes of the keys and values [`KvCache::new`] allocates for `batch` rows of `capacity`
    /// positions (f32; u128 so absurd sizes cannot overflow).
    pub fn bytes(config: &ModelConfig, batch: usize, capacity: usize) -> u128 {
        let per_position = (config.num_kv_heads() * config.head_dim()) as u128 * 4;
        2 * config.num_hidden_layers as u128 * batch as u128 * capacity as u128 * per_position
    }

    pub fn new(config: &ModelConfig, batch: usize, capacity: usize, device: &B::Device) -> Self {
        let shape = [batch, config.num_kv_heads(), capacity, config.head_dim()];
        let layers = config.num_hidden_layers;
        KvCache {
            keys: (0..layers).map(|_| Tensor::zeros(shape, device)).collect(),
            values: (0..layers).map(|_| Tensor::zeros(shape, device)).collect(),
            len: 0,
            capacity,
            batch,
            key_mask: vec![false; batch * capacity],
        }
    }

    /// Keeps only the given rows (finished sequences leave the batch and stop costing compute).
    pub fn retain_rows(&mut self, rows: &[usize]) {
        if rows.len() == self.batch {
            return;
        }
        let device = self.keys.first().map(|k| k.device());
        if let Some(device) = device {
            let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
            for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
                *t = t.clone().select(0, index.clone());
            }
        }
        let mut mask = Vec::with_capacity(rows.len() * self.capacity);
        for &r in rows {
            mask.extend_from_slice(&self.key_mask[r * self.capacity..(r + 1) * self.capacity]);
        }
        self.key_mask = mask;
        self.batch = rows.len();
    }

    /// Stacks caches into one (rows in order), `len` filled columns and room for `capacity`.
    ///
    /// Every row's real tokens are the last columns of its cache (prompts are left-padded and
    /// each step appends a column to every row), so each cache keeps its last `len` columns
    /// (none of its rows may hold more) and is right-aligned, with masked padding before it.
    /// What lies before a row's tokens is masked, and positions are explicit, so moving the
    /// columns does not change what a row attends to. Used to add sequences to a running batch.
    pub fn join(parts: Vec<KvCache<B>>, len: usize, capacity: usize) -> Result<Self> {
        ensure!(
            0 < len && len <= capacity,
            "KV cache join: {len} columns, capacity {capacity}"
        );
        let first = parts.first().context("KV cache join: no caches")?;
        let layers = first.keys.len();
        let batch: usize = parts.iter().map(|p| p.batch).sum();
        let mut key_mask = Vec::with_capacity(batch * capacity);
        let mut keys: Vec<Vec<Tensor<B, 4>>> = vec![Vec::new(); layers];
        let mut values: Vec<Vec<Tensor<B, 4>>> = vec![Vec::new(); layers];
        for part in parts {
            ensure!(
                part.keys.len() == layers,
                "KV cache join: layer counts differ"
            );
            let kept = part.len.min(len);
            let from = part.len - kept;
            for r in 0..part.batch {
                let row = &part.key_mask[r * part.capacity..(r + 1) * part.capacity];
                ensure!(
                    !row[..from].contains(&true),
                    "KV cache join: a row holds more than {len} tokens"
                );
                key_mask.extend(std::iter::repeat_n(false, len - kept));
                key_mask.extend_from_slice(&row[from..part.len]);
                key_mask.extend(std::iter::repeat_n(false, capacity - len));
            }
            let place = |t: Tensor<B, 4>| {
                let [b, h, _, d] = t.dims();
                let device = t.device();
                // Zero-width pieces are left out: not every backend takes empty tensors.
                let pieces = [
                    (len - kept, None),
                    (kept, Some(from..part.len)),
                    (capacity - len, None),
                ];
                let pieces: Vec<Tensor<B, 4>> = pieces
                    .into_iter()
                    .filter(|(width, _)| *width > 0)
                    .map(|(width, cols)| match cols {
                        Some(cols) => t.clone().slice([0..b, 0..h, cols, 0..d]),
                        None => Tensor::zeros([b, h, width, d], &device),
                    })
                    .collect();
                Tensor::cat(pieces, 2)
            };
            for (l, (k, v)) in part.keys.into_iter().zip(part.values).enumerate() {
                keys[l].push(place(k));
                values[l].push(place(v));
            }
        }
        let stack = |per_layer: Vec<Vec<Tensor<B, 4>>>| -> Vec<Tensor<B, 4>> {
            per_layer.into_iter().map(|t| Tensor::cat(t, 0)).collect()
        };
        Ok(KvCache {
            keys: stack(keys),
            values: stack(values),
            len,
            capacity,
            batch,
            key_mask,
        })
    }
}

impl<B: Backend> Attention<B> {
    /// `x`: `[batch*seq, hidden]` → `[batch*seq, hidden]`. With a cache, the new keys/values are
    /// written at columns `cache.len..cache.len+seq` and attention runs over all filled columns.
    fn forward(
        &self,
        x: Tensor<B, 2>,
        input: &StepInput<B>,
        cache: Option<(&mut Tensor<B, 4>, &mut Tensor<B, 4>, usize)>,
    ) -> Tensor<B, 2> {
        let (b, t) = (input.batch, input.seq);
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = input.rope.apply(self.q_proj.forward(x.clone()), h);
        let k = input.rope.apply(self.k_proj.forward(x.clone()), kvh);
        let v = self.v_proj.forward(x);
        let heads = move |y: Tensor<B, 2>, n: usize| y.reshape([b, t, n, d]).swap_dims(1, 2);
        let out = match cache {
            None => {
                // Whole sequences: the fused kernel works on the projections' own layout.
                let shape = fused::AttnShape {
                    batch: b,
                    queries: t,
                    keys: t,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: d,
                    scale: 1.0 / (d as f32).sqrt(),
                };
                fused::attention(q, k, v, input.bias.clone(), shape, |q, k, v, bias| {
                    let out = attend(heads(q, h), heads(k, kvh), heads(v, kvh), bias, kvh);
                    out.swap_dims(1, 2).reshape([b * t, h * d])
                })
            }
            Some((k_cache, v_cache, past)) => {
                let cols = past..past + t;
                // Move the cache out rather than cloning it: a uniquely owned tensor is written in
                // place, a shared one would be copied whole on every token.
                let device = k.device();
                let placeholder = || Tensor::<B, 4>::empty([1, 1, 1, 1], &device);
                *k_cache = fused::write_cache(
                    std::mem::replace(k_cache, placeholder()),
                    heads(k, kvh),
                    cols.start,
                );
                *v_cache = fused::write_cache(
                    std::mem::replace(v_cache, placeholder()),
                    heads(v, kvh),
                    cols.start,
                );
                let keys = past + t;
                let k = k_cache.clone().slice([0..b, 0..kvh, 0..keys, 0..d]);
                let v = v_cache.clone().slice([0..b, 0..kvh, 0..keys, 0..d]);
                attend(heads(q, h), k, v, input.bias.clone(), kvh)
                    .swap_dims(1, 2)
                    .reshape([b * t, h * d])
            }
        };
        self.o_proj.forward(out)
    }
}

/// Device-side rotary tables for one call: `cos` and `sin` are `[tokens, 1, d]` with both halves
/// filled (HF's `cat(freqs, freqs)`), and `rotate` is the `[d, d]` signed permutation with
/// `x · rotate = rotate_half(x) = [-x2, x1]`, so RoPE is `x·cos + (x·rotate)·sin`: one small
/// matmul and three elementwise ops, with no narrow/cat copies (and simple gradients).
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 3>,
    pub sin: Tensor<B, 3>,
    pub rotate: Tensor<B, 2>,
    /// The same tables on the host, `[tokens, d/2]`, for the fused CPU kernel.
    pub host: fused::RopeHost,
}

impl<B: Backend> RopeTables<B> {
    fn new(
        cos_half: Vec<f32>,
        sin_half: Vec<f32>,
        tokens: usize,
        d: usize,
        device: &B::Device,
    ) -> Self {
        let half = d / 2;
        let full = |src: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(tokens * d);
            for row in src.chunks(half) {
                out.extend_from_slice(row);
                out.extend_from_slice(row);
            }
            out
        };
        let mut rotate = vec![0f32; d * d];
        for j in 0..half {
            rotate[(j + half) * d + j] = -1.0; // out[j] = -x[j + half]
            rotate[j * d + j + half] = 1.0; // out[j + half] = x[j]
        }
        RopeTables {
            cos: Tensor::from_data(TensorData::new(full(&cos_half), [tokens, 1, d]), device),
            sin: Tensor::from_data(TensorData::new(full(&sin_half), [tokens, 1, d]), device),
            rotate: Tensor::from_data(TensorData::new(rotate, [d, d]), device),
            host: fused::RopeHost {
                cos: Arc::new(cos_half),
                sin: Arc::new(sin_half),
                half,
            },
        }
    }

    /// RoPE on projections `[tokens, heads*d]`.
    pub fn apply(&self, x: Tensor<B, 2>, heads: usize) -> Tensor<B, 2> {
        fused::rope(x, &self.host, |x| self.apply_plain(x, heads))
    }

    fn apply_plain(&self, x: Tensor<B, 2>, heads: usize) -> Tensor<B, 2> {
        let [tokens, width] = x.dims();
        let d = width / heads;
        let rotated = x
            .clone()
            .reshape([tokens * heads, d])
            .matmul(self.rotate.clone())
            .reshape([tokens, heads, d]);
        let x = x.reshape([tokens, heads, d]);
        let (cos, sin) = if heads == 1 {
            (self.cos.clone(), self.sin.clone())
        } else {
            // Same-shape elementwise ops are much faster than broadcasting ones on the CPU backend.
            (
                self.cos.clone().repeat_dim(1, heads),
                self.sin.clone().repeat_dim(1, heads),
            )
        };
        (x * cos + rotated * sin).reshape([tokens, width])
    }
}

/// Grouped-query attention without materialising repeated K/V: the `g = heads/kv_heads` query
/// heads sharing a KV head are stacked along the sequence axis, so one batched matmul serves them.
fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    kvh: usize,
) -> Tensor<B, 4> {
    let [b, h, t, d] = q.dims();
    let keys = k.dims()[2];
    let g = h / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let q = if g == 1 {
        q
    } else {
        q.reshape([b, kvh, g * t, d])
    };
    let scores = q.matmul(k.transpose()).reshape([b, h, t, keys]);
    let probs = fused::scaled_softmax(scores, scale, bias).reshape([b, kvh, g * t, keys]);
    probs.matmul(v).reshape([b, h, t, d])
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 2>,
        input: &StepInput<B>,
        cache: Option<(&mut Tensor<B, 4>, &mut Tensor<B, 4>, usize)>,
    ) -> Tensor<B, 2> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), input, cache);
        let x = x + attn;
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x + mlp
    }
}

impl<B: Backend> CausalLm<B> {
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.val().device()
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Device inputs for `batch`, whose tokens occupy columns `past..past+seq` after `past`
    /// cached columns whose padding mask is `past_mask` (row-major `[batch, past]`).
    pub fn step_input(
        &self,
        batch: &TokenBatch,
        past: usize,
        past_mask: Option<&[bool]>,
    ) -> Result<StepInput<B>> {
        batch.validate(self.config.vocab_size)?;
        let (b, t) = (batch.batch, batch.seq);
        let device = self.device();
        let rope = Rope::new(&self.config)?;
        let (cos, sin) = rope.tables(&batch.positions());
        let keys = past + t;
        let needs_bias = t > 1
            || batch.mask.iter().any(|m| !m)
            || past_mask.is_some_and(|m| m.iter().any(|m| !m));
        let bias = needs_bias.then(|| {
            let mut bias = vec![0f32; b * t * keys];
            for row in 0..b {
                for qi in 0..t {
                    for kj in 0..keys {
                        let real = if kj < past {
                            past_mask.is_none_or(|m| m[row * past + kj])
                        } else {
                            batch.mask[row * t + kj - past]
                        };
                        if !real || kj > past + qi {
                            bias[(row * t + qi) * keys + kj] = MASKED;
                        }
                    }
                }
            }
            Tensor::from_data(TensorData::new(bias, [b, 1, t, keys]), &device)
        });
        let ids: Vec<i64> = batch.ids.iter().map(|&i| i as i64).collect();
        Ok(StepInput {
            ids: Tensor::from_data(TensorData::new(ids, [b, t]), &device),
            rope: RopeTables::new(cos, sin, b * t, self.config.head_dim(), &device),
            bias,
            batch: b,
            seq: t,
        })
    }

    /// Final hidden states `[batch*seq, hidden]` (after the last norm).
    pub fn hidden(&self, input: &StepInput<B>, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 2> {
        let (b, t) = (input.batch, input.seq);
        let hidden = self.config.hidden_size;
        let mut x = burn::tensor::module::embedding(
            self.model.embed_tokens.weight.val(),
            input.ids.clone(),
        )
        .reshape([b * t, hidden]);
        let past = cache.as_ref().map_or(0, |c| c.len);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| {
                let KvCache { keys, values, .. } = &mut **c;
                (&mut keys[i], &mut values[i], past)
            });
            x = layer.forward(x, input, layer_cache);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.model.norm.forward(x)
    }

    /// Logits `[tokens, vocab]` for hidden states `[tokens, hidden]`.
    pub fn logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(self.model.embed_tokens.weight.val().transpose()),
        }
    }

    /// Full forward without a cache: logits `[batch, seq, vocab]`.
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor<B, 3>> {
        let input = self.step_input(batch, 0, None)?;
        let logits = self.logits(self.hidden(&input, None));
        Ok(logits.reshape([batch.batch, batch.seq, self.config.vocab_size]))
    }

    /// Feeds `batch` through the model on top of `cache` and returns the logits of each row's
    /// last column `[batch, vocab]` (left padding puts every row's newest token there).
    pub fn forward_cached(
        &self,
        batch: &TokenBatch,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 2>> {
        ensure!(
            batch.batch == cache.batch,
            "batch of {} rows does not match the cache's {}",
            batch.batch,
            cache.batch
        );
        ensure!(
            cache.len + batch.seq <= cache.capacity,
            "KV cache full: {} + {} tokens > capacity {}",
            cache.len,
            batch.seq,
            cache.capacity
        );
        let past_mask: Vec<bool> = (0..batch.batch)
            .flat_map(|r| {
                cache.key_mask[r * cache.capacity..r * cache.capacity + cache.len]
                    .iter()
                    .copied()
            })
            .collect();
        let input = self.step_input(batch, cache.len, Some(&past_mask))?;
        for r in 0..batch.batch {
            for c in 0..batch.seq {
                cache.key_mask[r * cache.capacity + cache.len + c] = batch.mask[r * batch.seq + c];
            }
        }
        let (b, t) = (batch.batch, batch.seq);
        let hidden = self
            .hidden(&input, Some(cache))
            .reshape([b, t, self.config.hidden_size]);
        let last = hidden
            .slice([0..b, t - 1..t])
            .reshape([b, self.config.hidden_size]);
        Ok(self.logits(last))
    }
}
