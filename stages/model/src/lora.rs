//! LoRA adapters: `W x + (alpha / r) · B A dropout(x)` on chosen projections, training only A and
//! B, and merging `W += (alpha / r) · B A` for export (the merged model is a plain HF checkpoint).
//! A training checkpoint keeps the adapters unmerged ([`save_adapters`], [`load_adapters`]), so a
//! resumed run continues on the very adapters its optimizer moments belong to.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::llama::{CausalLm, Linear};

/// The projections LoRA may target, by their transformers names.
pub const TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module names from [`TARGETS`].
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.rank > 0, "lora rank must be > 0");
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora dropout must be in [0, 1)"
        );
        ensure!(
            !self.target_modules.is_empty(),
            "lora target_modules is empty"
        );
        for t in &self.target_modules {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "lora target module `{t}` is unknown (known: {})",
                    TARGETS.join(", ")
                );
            }
        }
        Ok(())
    }

    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// `lora_A` `[r, in]` (Kaiming-uniform init like PEFT) and `lora_B` `[out, r]` (zeros, so a fresh
/// adapter leaves the model unchanged).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    pub scaling: f64,
    pub dropout: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// The adapter's contribution for `x` `[tokens, in]`. Dropout is active only when the
    /// backend tracks gradients (training), like `nn.Dropout` in train mode.
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = x.random_like(Distribution::Bernoulli(1.0 - self.dropout));
            x * keep.div_scalar(1.0 - self.dropout)
        } else {
            x
        };
        x.matmul(self.lora_a.val().transpose())
            .matmul(self.lora_b.val().transpose())
            .mul_scalar(self.scaling)
    }

    /// `(alpha/r) · (B A)ᵀ`, shaped like the stored base weight `[in, out]`.
    pub fn merged_delta(&self) -> Tensor<B, 2> {
        self.lora_a
            .val()
            .transpose()
            .matmul(self.lora_b.val().transpose())
            .mul_scalar(self.scaling)
    }
}

fn kaiming_uniform(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    // PEFT: kaiming_uniform_(a=sqrt(5)) → bound = 1/sqrt(fan_in).
    let bound = 1.0 / (cols as f64).sqrt();
    (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

fn targets_of<B: Backend>(model: &mut CausalLm<B>) -> Vec<(&'static str, &mut Linear<B>)> {
    named_targets(model)
        .into_iter()
        .map(|(kind, _, linear)| (kind, linear))
        .collect()
}

/// Every projection LoRA may target: (module kind, transformers path, the layer).
fn named_targets<B: Backend>(
    model: &mut CausalLm<B>,
) -> Vec<(&'static str, String, &mut Linear<B>)> {
    let mut out = Vec::new();
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        let attn = &mut layer.self_attn;
        let mlp = &mut layer.mlp;
        for (kind, linear) in [
            ("q_proj", &mut attn.q_proj),
            ("k_proj", &mut attn.k_proj),
            ("v_proj", &mut attn.v_proj),
            ("o_proj", &mut attn.o_proj),
        ] {
            out.push((kind, format!("model.layers.{i}.self_attn.{kind}"), linear));
        }
        for (kind, linear) in [
            ("gate_proj", &mut mlp.gate_proj),
            ("up_proj", &mut mlp.up_proj),
            ("down_proj", &mut mlp.down_proj),
        ] {
            out.push((kind, format!("model.layers.{i}.mlp.{kind}"), linear));
        }
    }
    out
}

/// Adds fresh adapters to the targeted projections and freezes every base parameter, so only the
/// adapters receive gradients.
pub fn add_lora<B: Backend>(
    model: CausalLm<B>,
    config: &LoraConfig,
    seed: u64,
) -> Result<CausalLm<B>> {
    config.validate()?;
    let mut model = model.no_grad();
    let device = model.device();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, linear) in targets_of(&mut model) {
        if !config.target_modules.iter().any(|t| t == name) {
            continue;
        }
        ensure!(linear.lora.is_none(), "{name} already has a LoRA adapter");
        let [inp, out] = linear.weight.shape().dims::<2>();
        let a = kaiming_uniform(config.rank, inp, &mut rng);
        let a = Tensor::from_data(TensorData::new(a, [config.rank, inp]), &device);
        let b = Tensor::zeros([out, config.rank], &device);
        linear.lora = Some(LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling: config.scaling(),
            dropout: config.dropout,
        });
    }
    Ok(model)
}

/// Folds every adapter into its base weight and removes it: the result is a plain model.
pub fn merge_lora<B: Backend>(model: CausalLm<B>) -> CausalLm<B> {
    let mut model = model;
    for (_, linear) in targets_of(&mut model) {
        if let Some(lora) = linear.lora.take() {
            let merged = linear.weight.val() + lora.merged_delta();
            linear.weight = Param::from_tensor(merged.detach());
        }
    }
    model
}

/// The model's adapters.
fn adapters<B: Backend>(model: &CausalLm<B>) -> impl Iterator<Item = &LoraAdapter<B>> {
    model
        .model
        .layers
        .iter()
        .flat_map(|l| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
        })
        .filter_map(|lin| lin.lora.as_ref())
}

/// Number of trainable adapter parameters.
pub fn lora_param_count<B: Backend>(model: &CausalLm<B>) -> usize {
    adapters(model)
        .map(|l| l.lora_a.shape().num_elements() + l.lora_b.shape().num_elements())
        .sum()
}

/// Whether training draws dropout masks (from the backend's random generator).
pub fn uses_dropout<B: Backend>(model: &CausalLm<B>) -> bool {
    adapters(model).any(|l| l.dropout > 0.0)
}

/// Writes the adapters of `model`, unmerged, to the safetensors file `path` (f32, PEFT's names and
/// layouts: `….q_proj.lora_A.weight` `[r, in]`, `….lora_B.weight` `[out, r]`).
pub fn save_adapters<B: Backend>(model: &CausalLm<B>, path: &Path) -> Result<()> {
    let mut model = model.clone();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (_, name, linear) in named_targets(&mut model) {
        let Some(lora) = &linear.lora else { continue };
        for (part, tensor) in [("lora_A", lora.lora_a.val()), ("lora_B", lora.lora_b.val())] {
            let shape = tensor.dims().to_vec();
            let values = tensor
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("reading {name}.{part}: {e:?}"))?;
            tensors.insert(
                format!("{name}.{part}.weight"),
                (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            );
        }
    }
    ensure!(
        !tensors.is_empty(),
        "the model has no LoRA adapters to save"
    );
    let views = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Replaces the values of `model`'s adapters by those [`save_adapters`] wrote to `path`. The model
/// must carry adapters of the same shapes on the same projections (see [`add_lora`]).
pub fn load_adapters<B: Backend>(model: CausalLm<B>, path: &Path) -> Result<CausalLm<B>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file =
        SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let mut model = model;
    let device = model.device();
    let mut used = 0;
    for (_, name, linear) in named_targets(&mut model) {
        let Some(lora) = &mut linear.lora else {
            continue;
        };
        for (part, param) in [("lora_A", &mut lora.lora_a), ("lora_B", &mut lora.lora_b)] {
            let key = format!("{name}.{part}.weight");
            let view = file
                .tensor(&key)
                .with_context(|| format!("{}: no tensor {key}", path.display()))?;
            let shape: [usize; 2] = param.shape().dims();
            ensure!(
                view.dtype() == Dtype::F32 && view.shape() == shape,
                "{}: {key} is {:?} {:?}, expected F32 {shape:?}",
                path.display(),
                view.dtype(),
                view.shape()
            );
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            *param = Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), &device));
            used += 1;
        }
    }
    ensure!(
        used == file.len(),
        "{}: holds {} tensors, the model has {used} adapter tensors",
        path.display(),
        file.len()
    );
    Ok(model)
}
