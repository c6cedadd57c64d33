//! Training checkpoints in a stage's resume directory: the model, the optimizer state and the
//! stage's own state (step, metrics so far). `ckpt/` is always complete: a new checkpoint is
//! written beside it and swapped in by renames, so a kill at any moment leaves a usable one.

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use dagrun_model::optim::AdamW;
use dagrun_model::{load_model, save_model, CausalLm};
use serde::de::DeserializeOwned;
use serde::Serialize;

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

/// A one-element tensor's value on the host (NaN if it cannot be read).
pub fn scalar<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> f32 {
    t.into_data().convert::<f32>().to_vec::<f32>().ok().and_then(|v| v.first().copied()).unwrap_or(f32::NAN)
}
