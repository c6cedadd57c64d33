//! Training utilities: AdamW (PyTorch semantics, decoupled weight decay), linear warmup + cosine
//! schedule, gradient accumulation, global-norm clipping (burn's clipping is per parameter), and
//! optimizer state saved to / resumed from a directory.
//!
//! Accumulation *sums* the micro-batches' gradients and the optimizer applies that sum as it is:
//! a caller splitting a batch scales each micro-batch's loss so that the losses add up to the
//! whole batch's (e.g. divides a token sum by the whole batch's token count). The gradient, its
//! logged norm and the clip threshold are then those of the whole batch, however it was split.
//!
//! Gradients and moments are kept per parameter *name* (the transformers tensor name), flattened
//! to 1-D on the inner backend. Keying by name rather than burn's random `ParamId` is what lets a
//! resumed run find its state again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Gradients summed over micro-batches, by parameter name (never averaged: see the module doc).
pub struct GradAccumulator<B: AutodiffBackend> {
    grads: BTreeMap<String, Tensor<Inner<B>, 1>>,
    /// Number of micro-batches accumulated.
    pub micro_batches: usize,
}

/// One micro-batch's gradients by parameter name, flattened, on the device that computed them.
pub type Gradients<B> = BTreeMap<String, Tensor<Inner<B>, 1>>;

struct GradCollector<'a, B: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a B::Gradients,
    out: &'a mut Gradients<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = param.val().grad(self.grads) {
            let n = grad.shape().num_elements();
            self.out.insert(self.path.join("."), grad.reshape([n]));
        }
    }
}

impl<B: AutodiffBackend> Default for GradAccumulator<B> {
    fn default() -> Self {
        GradAccumulator {
            grads: BTreeMap::new(),
            micro_batches: 0,
        }
    }
}

impl<B: AutodiffBackend> GradAccumulator<B> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients of `loss` (back-propagated here) for every trainable parameter.
    pub fn backward<M: AutodiffModule<B>>(&mut self, loss: Tensor<B, 1>, module: &M) {
        self.add(Self::gradients(loss, module), None);
    }

    /// The gradients of `loss` for every trainable parameter of `module`, not yet added: what a
    /// data-parallel worker computes on its own device (see `parallel`).
    pub fn gradients<M: AutodiffModule<B>>(loss: Tensor<B, 1>, module: &M) -> Gradients<B> {
        let grads = loss.backward();
        let mut out = BTreeMap::new();
        module.visit(&mut GradCollector::<B> {
            path: Vec::new(),
            grads: &grads,
            out: &mut out,
        });
        out
    }

    /// Adds one micro-batch's gradients (moved to `device` first, if given): `sum + grad` per
    /// parameter, the one addition [`GradAccumulator::backward`] does too, so the sum does not
    /// depend on which device computed a micro-batch.
    pub fn add(&mut self, grads: Gradients<B>, device: Option<&B::Device>) {
        for (name, grad) in grads {
            let grad = match device {
                Some(device) => grad.to_device(device),
                None => grad,
            };
            let sum = match self.grads.remove(&name) {
                Some(prev) => prev + grad,
                None => grad,
            };
            self.grads.insert(name, sum);
        }
        self.micro_batches += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Global L2 norm of all gradients (one device→host read).
    pub fn global_norm(&self) -> f64 {
        crate::fused::sum_of_squares(self.grads.values()).sqrt()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub step: u64,
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Completed steps.
    pub step: u64,
    moments: HashMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

struct Updater<'a, B: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a BTreeMap<String, Tensor<Inner<B>, 1>>,
    opt: &'a mut AdamW<Inner<B>>,
    lr: f64,
    grad_scale: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Updater<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join(".");
        let Some(grad) = self.grads.get(&name) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let shape: [usize; D] = tensor.dims();
        let flat = tensor.inner().reshape([shape.iter().product::<usize>()]);
        let updated = self
            .opt
            .update(&name, flat, grad.clone(), self.lr, self.grad_scale)
            .reshape(shape);
        Param::from_mapped_value(id, Tensor::from_inner(updated).require_grad(), mapper)
    }
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// One AdamW update of a flattened parameter (step counter already advanced); the gradient
    /// is multiplied by `grad_scale` first.
    fn update(
        &mut self,
        name: &str,
        p: Tensor<B, 1>,
        g: Tensor<B, 1>,
        lr: f64,
        grad_scale: f64,
    ) -> Tensor<B, 1> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.config;
        let (m, v) = match self.moments.remove(name) {
            Some(mv) => mv,
            None => (g.zeros_like(), g.zeros_like()),
        };
        let t = self.step as i32;
        let step = crate::kernels::AdamWStep {
            lr: lr as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            bias_correction1: (1.0 - beta1.powi(t)) as f32,
            bias_correction2: (1.0 - beta2.powi(t)) as f32,
            grad_scale: grad_scale as f32,
        };
        let [p, m, v] = crate::fused::adamw(p, g, m, v, &step);
        self.moments.insert(name.to_string(), (m, v));
        p
    }

    /// Applies the accumulated gradients (their sum over micro-batches, clipped to the global
    /// norm) to `module` with learning rate `lr`, and clears the accumulator.
    pub fn step<AB, M>(
        &mut self,
        module: M,
        acc: &mut GradAccumulator<AB>,
        lr: f64,
    ) -> Result<(M, StepStats)>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        ensure!(
            acc.micro_batches > 0,
            "optimizer step without any accumulated gradients"
        );
        let grad_norm = acc.global_norm();
        ensure!(
            grad_norm.is_finite(),
            "gradient norm is {grad_norm}: the loss diverged"
        );
        // Clipping scales the gradients inside the update, not as an extra pass.
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let grads = std::mem::take(&mut acc.grads);
        acc.micro_batches = 0;
        let module = module.map(&mut Updater::<AB> {
            path: Vec::new(),
            grads: &grads,
            opt: self,
            lr,
            grad_scale: clip,
        });
        Ok((
            module,
            StepStats {
                lr,
                grad_norm,
                step: self.step,
            },
        ))
    }

    /// Writes `optimizer.safetensors` (moments) and `optimizer.json` (step, config) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut buffers: BTreeMap<String, (usize, Vec<u8>)> = BTreeMap::new();
        for (name, (m, v)) in &self.moments {
            for (kind, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let values = t
                    .to_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                buffers.insert(format!("{name}.{kind}"), (values.len(), bytes));
            }
        }
        let views = buffers
            .iter()
            .map(|(k, (n, bytes))| {
                Ok((
                    k.clone(),
                    safetensors::tensor::TensorView::new(Dtype::F32, vec![*n], bytes)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join("optimizer.safetensors");
        safetensors::serialize_to_file(views, None, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        let meta = serde_json::json!({ "step": self.step, "config": self.config });
        let path = dir.join("optimizer.json");
        std::fs::write(&path, serde_json::to_string_pretty(&meta)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Restores what [`AdamW::save`] wrote.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let path = dir.join("optimizer.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let step = meta["step"]
            .as_u64()
            .with_context(|| format!("{}: no `step`", path.display()))?;
        let config: AdamWConfig = serde_json::from_value(meta["config"].clone())
            .with_context(|| format!("{}: bad `config`", path.display()))?;
        let path = dir.join("optimizer.safetensors");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let mut moments = HashMap::new();
        let read = |key: &str| -> Result<Tensor<B, 1>> {
            let view = st
                .tensor(key)
                .with_context(|| format!("{}: missing {key}", path.display()))?;
            if view.dtype() != Dtype::F32 {
                bail!("{}: {key} is not f32", path.display());
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let n = values.len();
            Ok(Tensor::from_data(TensorData::new(values, [n]), device))
        };
        for key in st.names() {
            if let Some(name) = key.strip_suffix(".exp_avg") {
                moments.insert(
                    name.to_string(),
                    (read(key)?, read(&format!("{name}.exp_avg_sq"))?),
                );
            }
        }
        Ok(AdamW {
            config,
            step,
            moments,
        })
    }
}

/// Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay to
/// `min_lr_ratio · peak_lr` at `total_steps` (the schedule of transformers'
/// `get_cosine_schedule_with_warmup` when `min_lr_ratio` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    #[serde(default)]
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn constant(lr: f64) -> Self {
        LrSchedule {
            peak_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 1.0,
        }
    }

    /// Learning rate for the step with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.total_steps <= self.warmup_steps {
            return self.peak_lr;
        }
        let progress = ((step - self.warmup_steps) as f64
            / (self.total_steps - self.warmup_steps) as f64)
            .min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            min_lr_ratio: 0.1,
        };
        assert!((s.lr(0) - 0.25).abs() < 1e-12);
        assert!((s.lr(3) - 1.0).abs() < 1e-12);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(9) - 0.55).abs() < 1e-12);
        assert!((s.lr(14) - 0.1).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
        assert_eq!(LrSchedule::constant(0.3).lr(50), 0.3);
    }
}
