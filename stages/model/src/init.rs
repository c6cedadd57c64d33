//! Building a `CausalLm` from a config: from a tensor source (a checkpoint) or randomly
//! initialised like transformers (`normal(0, initializer_range)`, zero biases, unit norms),
//! seeded on the host so the same seed gives the same model on every backend.

use anyhow::{Context, Result, ensure};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ModelConfig;
use crate::llama::{
    Attention, CausalLm, DecoderLayer, Embedding, Linear, LlamaModel, Mlp, RmsNorm,
};
use burn::module::Param;

/// Supplies the tensor named `name` (transformers naming) with the given shape, as f32.
pub trait TensorSource {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl<F: FnMut(&str, &[usize]) -> Result<Vec<f32>>> TensorSource for F {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self(name, shape)
    }
}

struct Builder<'a, B: Backend> {
    source: &'a mut dyn TensorSource,
    device: B::Device,
}

impl<B: Backend> Builder<'_, B> {
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let data = self.source.tensor(name, &shape)?;
        ensure!(
            data.len() == shape.iter().product::<usize>(),
            "tensor {name}: got {} values for shape {shape:?}",
            data.len()
        );
        Ok(Tensor::from_data(
            TensorData::new(data, shape),
            &self.device,
        ))
    }

    /// Reads a `[out, in]` checkpoint weight and stores it transposed (see `llama::Linear`).
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear<B>> {
        let key = format!("{name}.weight");
        let data = self.source.tensor(&key, &[out, inp])?;
        ensure!(
            data.len() == out * inp,
            "tensor {key}: got {} values for shape [{out}, {inp}]",
            data.len()
        );
        let weight = Tensor::from_data(
            TensorData::new(transpose(&data, out, inp), [inp, out]),
            &self.device,
        );
        let bias = if bias {
            Some(self.tensor(&format!("{name}.bias"), [out])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    fn norm(&mut self, name: &str, size: usize, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: Param::from_tensor(self.tensor(&format!("{name}.weight"), [size])?),
            eps,
        })
    }
}

impl<B: Backend> CausalLm<B> {
    /// Builds the model asking `source` for every tensor by its transformers name.
    pub fn from_source(
        config: &ModelConfig,
        source: &mut dyn TensorSource,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let mut b = Builder::<B> {
            source,
            device: device.clone(),
        };
        let (h, i, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let (heads, kvh, d) = (
            config.num_attention_heads,
            config.num_kv_heads(),
            config.head_dim(),
        );
        let eps = config.rms_norm_eps;
        let embed = b.tensor("model.embed_tokens.weight", [v, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let self_attn = Attention {
                q_proj: b.linear(
                    &format!("{p}.self_attn.q_proj"),
                    heads * d,
                    h,
                    config.qkv_bias(),
                )?,
                k_proj: b.linear(
                    &format!("{p}.self_attn.k_proj"),
                    kvh * d,
                    h,
                    config.qkv_bias(),
                )?,
                v_proj: b.linear(
                    &format!("{p}.self_attn.v_proj"),
                    kvh * d,
                    h,
                    config.qkv_bias(),
                )?,
                o_proj: b.linear(
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    heads * d,
                    config.o_bias(),
                )?,
                num_heads: heads,
                num_kv_heads: kvh,
                head_dim: d,
            };
            let mlp = Mlp {
                gate_proj: b.linear(&format!("{p}.mlp.gate_proj"), i, h, config.mlp_bias())?,
                up_proj: b.linear(&format!("{p}.mlp.up_proj"), i, h, config.mlp_bias())?,
                down_proj: b.linear(&format!("{p}.mlp.down_proj"), h, i, config.mlp_bias())?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: b.norm(&format!("{p}.input_layernorm"), h, eps)?,
                post_attention_layernorm: b.norm(
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                )?,
            });
        }
        let norm = b.norm("model.norm", h, eps)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(b.linear("lm_head", v, h, false)?)
        };
        Ok(CausalLm {
            model: LlamaModel {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(embed),
                },
                layers,
                norm,
            },
            lm_head,
            config: config.clone(),
        })
    }

    /// Random initialisation as transformers does it, reproducible from `seed`.
    pub fn init_random(config: &ModelConfig, seed: u64, device: &B::Device) -> Result<Self> {
        let std = config
            .extra
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut source = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let n = shape.iter().product();
            Ok(if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                normal(&mut rng, n, std)
            })
        };
        Self::from_source(config, &mut source, device).context("initialising model")
    }
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// `n` samples of N(0, std²) by Box–Muller.
pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}
