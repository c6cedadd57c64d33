//! What the training stages (`sft`, `grpo`, `distill`) share: checkpoints in a stage's resume
//! directory (the model, the optimizer state and the stage's [`TrainState`]), the seeded
//! per-epoch shuffle, and the wrap-up that turns a trained model into the stage's outputs.
//!
//! A checkpoint is written to `ckpt.tmp/`, fsynced (files and directories), and swapped in by
//! renames: the newest is `ckpt/`, the one before it stays as `ckpt.old/`. A LoRA run keeps its
//! adapters unmerged (the frozen base is the stage's input model), so a resumed run continues on
//! the very adapters its optimizer moments belong to. A checkpoint that cannot be read (say, a
//! truncated file) never breaks its key: it is set aside (`ckpt.unusable`) with a warning, and the run falls back
//! to the previous checkpoint, or starts the stage over.

use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::{Params, StageContext};
use dagrun_model::lora::{LoraConfig, add_lora, load_adapters, lora_param_count, save_adapters};
use dagrun_model::optim::{AdamW, AdamWConfig};
use dagrun_model::{CausalLm, load_model, save_model};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::tables::metrics_batch;

/// The file of a LoRA checkpoint's unmerged adapters (in place of a `model/` directory).
const ADAPTERS: &str = "adapters.safetensors";

/// A training stage's own progress: the step reached and the metrics recorded so far.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    /// Stored bit-exact, so a resumed run writes the same `metrics` bytes as an uninterrupted one.
    #[serde(with = "exact")]
    pub metrics: Vec<(i64, String, f64)>,
    /// Running sums a stage carries between two metrics rows (bit-exact too).
    #[serde(default, with = "exact")]
    pub window: Vec<(i64, String, f64)>,
}

/// `f64` values as their bit patterns: JSON's decimal text does not round-trip every `f64`
/// through serde_json's default parser, and cannot hold NaN.
mod exact {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(rows: &[(i64, String, f64)], s: S) -> Result<S::Ok, S::Error> {
        rows.iter()
            .map(|(step, name, value)| (*step, name.as_str(), value.to_bits()))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(i64, String, f64)>, D::Error> {
        let rows = Vec::<(i64, String, u64)>::deserialize(d)?;
        Ok(rows
            .into_iter()
            .map(|(step, name, bits)| (step, name, f64::from_bits(bits)))
            .collect())
    }
}

/// The random generator of epoch `epoch`'s shuffle: the same for a resumed run.
pub fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

pub struct Checkpoint {
    root: PathBuf,
}

/// AdamW's settings among a training kind's params.
#[derive(Debug, Clone, Deserialize)]
pub struct OptimizerParams {
    pub weight_decay: f64,
    /// 0: no clipping.
    pub max_grad_norm: f64,
}

impl OptimizerParams {
    pub fn read(params: &Params) -> anyhow::Result<OptimizerParams> {
        params.read_into("the optimizer")
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            weight_decay: self.weight_decay,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            ..AdamWConfig::default()
        }
    }
}

/// Where a training loop starts: a checkpoint or the input model.
pub struct Start<B: AutodiffBackend> {
    pub model: CausalLm<B>,
    pub optimizer: AdamW<B::InnerBackend>,
    pub state: TrainState,
    /// Warnings about checkpoints that could not be used, for the stage log.
    pub notes: Vec<String>,
}

/// LoRA adapters to train: their config and the seed of their initialisation.
#[derive(Debug, Clone, Copy)]
pub struct Lora<'a> {
    pub config: &'a LoraConfig,
    pub seed: u64,
}

impl Checkpoint {
    pub fn new(resume_dir: &Path) -> Checkpoint {
        Checkpoint {
            root: resume_dir.to_path_buf(),
        }
    }

    /// The newest usable checkpoint, or a fresh start: the model in `model_dir` (with fresh
    /// `lora` adapters, if given), an AdamW configured by `optimizer`, step 0. Unusable
    /// checkpoints are set aside (`NAME.unusable`), each with a note.
    pub fn restore_or_start<B: AutodiffBackend>(
        &self,
        model_dir: &Path,
        optimizer: &OptimizerParams,
        device: &B::Device,
        lora: Option<Lora>,
    ) -> anyhow::Result<Start<B>> {
        let mut notes = Vec::new();
        // The frozen base of a LoRA run is the input model, never a checkpoint's.
        let base = match lora {
            Some(l) => Some(add_lora(
                load_model::<B>(model_dir, device)?,
                l.config,
                l.seed,
            )?),
            None => None,
        };
        if let Some((model, optimizer, state)) =
            self.restore_with(|dir| self.load::<B>(dir, base.clone(), device), &mut notes)?
        {
            return Ok(Start {
                model,
                optimizer,
                state,
                notes,
            });
        }
        let model = match base {
            Some(model) => model,
            None => load_model::<B>(model_dir, device)?,
        };
        Ok(Start {
            model,
            optimizer: AdamW::new(optimizer.adamw()),
            state: TrainState::default(),
            notes,
        })
    }

    /// Reads the checkpoint in `dir`; `lora_base` is the model with fresh adapters that a LoRA
    /// checkpoint's adapters go into.
    fn load<B: AutodiffBackend>(
        &self,
        dir: &Path,
        lora_base: Option<CausalLm<B>>,
        device: &B::Device,
    ) -> anyhow::Result<(CausalLm<B>, AdamW<B::InnerBackend>, TrainState)> {
        let state_path = dir.join("state.json");
        let bytes = std::fs::read(&state_path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", state_path.display()))?;
        let state: TrainState = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("parsing {}: {e}", state_path.display()))?;
        let model = match lora_base {
            Some(base) => load_adapters(base, &dir.join(ADAPTERS))?,
            None => load_model::<B>(&dir.join("model"), device)?,
        };
        let optimizer = AdamW::<B::InnerBackend>::load(&dir.join("optimizer"), device)?;
        Ok((model, optimizer, state))
    }

    pub fn save<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        opt: &AdamW<B::InnerBackend>,
        state: &TrainState,
    ) -> anyhow::Result<()> {
        self.save_with(|tmp| {
            let model = model.valid();
            if lora_param_count(&model) > 0 {
                save_adapters(&model, &tmp.join(ADAPTERS))?;
            } else {
                save_model(&model, &tmp.join("model"))?;
            }
            opt.save(&tmp.join("optimizer"))?;
            std::fs::write(tmp.join("state.json"), serde_json::to_vec(state)?)?;
            Ok(())
        })
    }

    /// Writes a checkpoint of any trained model: `write` fills the directory it is given (the
    /// `prm` stage writes its PRM there), which is then fsynced and swapped in as `ckpt/`, the
    /// previous one becoming `ckpt.old/`.
    pub fn save_with(&self, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let tmp = self.root.join("ckpt.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        write(&tmp)?;
        // On disk before the renames publish it: a power loss cannot leave a renamed checkpoint
        // with empty files.
        sync_tree(&tmp)?;
        let (cur, old) = (self.root.join("ckpt"), self.root.join("ckpt.old"));
        if cur.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(&cur, &old)?;
        }
        std::fs::rename(&tmp, &cur)?;
        sync_path(&self.root)
    }

    /// What `read` makes of the newest usable checkpoint (`ckpt/`, else `ckpt.old/`), or `None`.
    /// One it cannot read is set aside (`NAME.unusable`) with a note in `notes`.
    pub fn restore_with<T>(
        &self,
        read: impl Fn(&Path) -> anyhow::Result<T>,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<Option<T>> {
        let candidates: Vec<PathBuf> = ["ckpt", "ckpt.old"]
            .iter()
            .map(|n| self.root.join(n))
            .filter(|d| d.exists())
            .collect();
        for (i, dir) in candidates.iter().enumerate() {
            match read(dir) {
                Ok(restored) => return Ok(Some(restored)),
                Err(e) => {
                    let next = if i + 1 < candidates.len() {
                        "falling back to the previous checkpoint"
                    } else {
                        "starting this stage over"
                    };
                    let note = format!(
                        "warning: checkpoint {} cannot be used ({e:#}); {next}",
                        dir.display()
                    );
                    notes.push(note);
                    // Set aside, not deleted: the error may be passing (a full disk, a busy
                    // device), and a person may want the state back. gc removes it with the key.
                    // `ckpt` and `ckpt.old` each get their own name, so both can be kept.
                    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("ckpt");
                    let aside = dir.with_file_name(format!("{name}.unusable"));
                    let _ = std::fs::remove_dir_all(&aside);
                    std::fs::rename(dir, &aside).map_err(|e| {
                        anyhow::anyhow!(
                            "setting aside the unusable checkpoint {}: {e}",
                            dir.display()
                        )
                    })?;
                }
            }
        }
        Ok(None)
    }
}

/// Fsyncs a file, or a directory's entries.
pub fn sync_path(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| anyhow::anyhow!("syncing {}: {e}", path.display()))
}

/// Fsyncs every file and directory under `dir`, and `dir`.
fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            sync_path(&entry.path())?;
        }
    }
    sync_path(dir)
}

/// Tokens processed and the seconds they took, for the stage log only: wall-clock time differs
/// between two runs of one key, so it never reaches an output.
#[derive(Debug, Default, Clone, Copy)]
pub struct Speed {
    tokens: f64,
    secs: f64,
    last: (f64, f64),
}

impl Speed {
    pub fn add(&mut self, tokens: f64, secs: f64) {
        self.tokens += tokens;
        self.secs += secs;
        self.last = (tokens, secs);
    }

    /// Tokens per second of the last [`Speed::add`].
    pub fn last_rate(&self) -> f64 {
        self.last.0 / self.last.1.max(1e-9)
    }
}

impl fmt::Display for Speed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0} tokens in {:.1} s ({:.0} tokens/s)",
            self.tokens,
            self.secs,
            self.tokens / self.secs.max(1e-9)
        )
    }
}

/// After a training stage's loop: notes a resume, gives the `model` output the input model's
/// tokenizer and generation files, and writes the `metrics` output.
pub fn finish_training(
    ctx: &mut StageContext,
    resumed_from: u64,
    metrics: &[(i64, String, f64)],
) -> anyhow::Result<()> {
    let from = ctx.input("model")?.path.clone();
    finish_training_from(ctx, &from, resumed_from, metrics)
}

/// [`finish_training`] for a stage whose model did not start as its `model` input (`distill`'s
/// student): the tokenizer and generation files come from the model directory `from`.
pub fn finish_training_from(
    ctx: &mut StageContext,
    from: &Path,
    resumed_from: u64,
    metrics: &[(i64, String, f64)],
) -> anyhow::Result<()> {
    if resumed_from > 0 {
        ctx.mark_resumed();
        ctx.info(format!(
            "resumed from the checkpoint at step {resumed_from}"
        ));
    }
    let to = ctx.output_path("model")?.to_path_buf();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name))?;
        }
    }
    ctx.write_dataset("metrics", &[metrics_batch(metrics)?])
}

/// A one-element tensor's value on the host (NaN if it cannot be read).
pub fn scalar<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> f32 {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN)
}
