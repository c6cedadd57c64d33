//! What the training stages (`sft`, `grpo`) share: checkpoints in a stage's resume directory
//! (the model, the optimizer state and the stage's [`TrainState`]), the seeded per-epoch
//! shuffle, and the wrap-up that turns a trained model into the stage's outputs.
//!
//! `ckpt/` is always complete: a new checkpoint is written beside it and swapped in by renames,
//! so a kill at any moment leaves a usable one.

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::{Params, StageContext};
use dagrun_model::optim::{AdamW, AdamWConfig};
use dagrun_model::{load_model, save_model, CausalLm};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::tables::metrics_batch;

/// A training stage's own progress: the step reached and the metrics recorded so far.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub metrics: Vec<(i64, String, f64)>,
}

/// The random generator of epoch `epoch`'s shuffle: the same for a resumed run.
pub fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

pub struct Checkpoint {
    root: PathBuf,
}

/// What a checkpoint restores.
pub struct Restored<B: AutodiffBackend, S> {
    pub model: CausalLm<B>,
    pub optimizer: AdamW<B::InnerBackend>,
    pub state: S,
}

impl Checkpoint {
    pub fn new(resume_dir: &Path) -> Checkpoint {
        Checkpoint { root: resume_dir.to_path_buf() }
    }

    fn latest(&self) -> Option<PathBuf> {
        ["ckpt", "ckpt.old"].iter().map(|n| self.root.join(n)).find(|d| d.join("state.json").is_file())
    }

    /// The newest complete checkpoint, if any.
    pub fn restore<B: AutodiffBackend, S: DeserializeOwned>(&self, device: &B::Device) -> anyhow::Result<Option<Restored<B, S>>> {
        let Some(dir) = self.latest() else { return Ok(None) };
        let model = load_model::<B>(&dir.join("model"), device)?;
        let optimizer = AdamW::<B::InnerBackend>::load(&dir.join("optimizer"), device)?;
        let state = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        Ok(Some(Restored { model, optimizer, state }))
    }

    /// The newest checkpoint, or a fresh start: the model in `model_dir`, an AdamW configured by
    /// the stage's `weight_decay` and `max_grad_norm` params (0: no clipping), step 0.
    pub fn restore_or_start<B: AutodiffBackend>(&self, model_dir: &Path, params: &Params, device: &B::Device) -> anyhow::Result<(CausalLm<B>, AdamW<B::InnerBackend>, TrainState)> {
        if let Some(r) = self.restore::<B, TrainState>(device)? {
            return Ok((r.model, r.optimizer, r.state));
        }
        let clip = params.f64("max_grad_norm");
        let config = AdamWConfig { weight_decay: params.f64("weight_decay"), max_grad_norm: (clip > 0.0).then_some(clip), ..AdamWConfig::default() };
        Ok((load_model::<B>(model_dir, device)?, AdamW::new(config), TrainState::default()))
    }

    /// The step recorded in the newest checkpoint (0 when there is none), for messages.
    pub fn saved_step(&self) -> u64 {
        self.latest()
            .and_then(|d| std::fs::read(d.join("state.json")).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0)
    }

    pub fn save<B: AutodiffBackend, S: Serialize>(&self, model: &CausalLm<B>, opt: &AdamW<B::InnerBackend>, state: &S) -> anyhow::Result<()> {
        let tmp = self.root.join("ckpt.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        save_model(&model.valid(), &tmp.join("model"))?;
        opt.save(&tmp.join("optimizer"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_vec(state)?)?;
        let (cur, old) = (self.root.join("ckpt"), self.root.join("ckpt.old"));
        let _ = std::fs::remove_dir_all(&old);
        if cur.exists() {
            std::fs::rename(&cur, &old)?;
        }
        std::fs::rename(&tmp, &cur)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

/// After a training stage's loop: notes a resume, gives the `model` output the input model's
/// tokenizer and generation files, and writes the `metrics` output.
pub fn finish_training(ctx: &mut StageContext, resumed_from: u64, metrics: &[(i64, String, f64)]) -> anyhow::Result<()> {
    if resumed_from > 0 {
        ctx.mark_resumed();
        ctx.info(format!("resumed from the checkpoint at step {resumed_from}"));
    }
    let (from, to) = (ctx.input("model")?.path.clone(), ctx.output_path("model")?.to_path_buf());
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja", "special_tokens_map.json"] {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name))?;
        }
    }
    ctx.write_dataset("metrics", &[metrics_batch(metrics)?])
}

/// A one-element tensor's value on the host (NaN if it cannot be read).
pub fn scalar<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> f32 {
    t.into_data().convert::<f32>().to_vec::<f32>().ok().and_then(|v| v.first().copied()).unwrap_or(f32::NAN)
}
