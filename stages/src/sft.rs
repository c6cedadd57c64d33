//! Stage kind `sft`: supervised fine-tuning on chats, with the loss on assistant tokens only.
//!
//! Full fine-tuning or LoRA (merged into the saved model). Batches are length-bucketed from a
//! seeded shuffle, so the data order is a pure function of (seed, epoch): a resumed run
//! regenerates it and skips to where the checkpoint stopped. Every `checkpoint_every` steps the
//! model (for LoRA, the unmerged adapters), optimizer state, step and metrics go to the resume
//! directory.
//!
//! The loss of an optimizer step is the mean negative log-likelihood over all the target tokens
//! of its `grad_accum` micro-batches (as transformers' Trainer with `num_items_in_batch`), so a
//! token weighs the same whichever micro-batch it lands in. The logged `loss` is the same token
//! mean over the steps since the last row. Speeds go to the stage log, not to `metrics`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
};
use dagrun_engine::{Params, Progress};
use dagrun_model::device::{BackendTask, DeviceSpec, run_on};
use dagrun_model::lora::LoraConfig;
use dagrun_model::optim::{GradAccumulator, LrSchedule};
use dagrun_model::save_model;
use dagrun_model::score::{ScoreItem, score};
use rand::seq::SliceRandom;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::checkpoint::{Checkpoint, Lora, Speed, epoch_rng, finish_training, scalar};
use crate::tables::read_chat;

pub struct Sft;

impl StageKind for Sft {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "sft",
            version: 2,
            doc: "supervised fine-tuning on chats (loss on assistant tokens), full or LoRA",
            inputs: vec![
                PortSpec::one("model", ArtifactType::Model, "the model to fine-tune"),
                PortSpec::one(
                    "data",
                    ArtifactType::Dataset(Some("chat")),
                    "conversations; the last assistant turn is the target",
                ),
            ],
            outputs: vec![
                PortSpec::one(
                    "model",
                    ArtifactType::Model,
                    "the fine-tuned model (LoRA merged)",
                ),
                PortSpec::one(
                    "metrics",
                    ArtifactType::Dataset(Some("metrics")),
                    "loss (token mean since the last row), lr, grad_norm per logged step",
                ),
            ],
            params: vec![
                ParamSpec::new(
                    "epochs",
                    ParamType::Float { min: 0.0, max: 1e6 },
                    json!(1.0),
                    "passes over the data (when max_steps is unset)",
                ),
                ParamSpec::unset(
                    "max_steps",
                    ParamType::Int {
                        min: 1,
                        max: 100_000_000,
                    },
                    "optimizer steps (overrides epochs)",
                ),
                ParamSpec::new(
                    "batch_size",
                    ParamType::Int {
                        min: 1,
                        max: 65_536,
                    },
                    json!(32),
                    "sequences per micro-batch",
                ),
                ParamSpec::new(
                    "grad_accum",
                    ParamType::Int { min: 1, max: 1024 },
                    json!(1),
                    "micro-batches per optimizer step",
                ),
                ParamSpec::new(
                    "lr",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    json!(1e-3),
                    "peak learning rate",
                ),
                ParamSpec::new(
                    "warmup_ratio",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(0.05),
                    "share of steps with linear warmup",
                ),
                ParamSpec::new(
                    "min_lr_ratio",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(0.1),
                    "cosine decay floor, as a share of lr",
                ),
                ParamSpec::new(
                    "weight_decay",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    json!(0.01),
                    "AdamW weight decay",
                ),
                ParamSpec::new(
                    "max_grad_norm",
                    ParamType::Float { min: 0.0, max: 1e6 },
                    json!(1.0),
                    "global gradient norm clip (0: off)",
                ),
                ParamSpec::new(
                    "max_length",
                    ParamType::Int {
                        min: 2,
                        max: 1_000_000,
                    },
                    json!(512),
                    "tokens per sequence; longer completions are cut",
                ),
                ParamSpec::unset(
                    "lora_rank",
                    ParamType::Int { min: 1, max: 4096 },
                    "train LoRA adapters of this rank instead of all weights",
                ),
                ParamSpec::new(
                    "lora_alpha",
                    ParamType::Float { min: 0.0, max: 1e6 },
                    json!(16.0),
                    "LoRA scaling numerator",
                ),
                ParamSpec::new(
                    "lora_dropout",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(0.0),
                    "LoRA input dropout",
                ),
                ParamSpec::new(
                    "lora_targets",
                    ParamType::List(Box::new(ParamType::Str {
                        choices: dagrun_model::lora::TARGETS,
                    })),
                    json!(["q_proj", "k_proj", "v_proj", "o_proj"]),
                    "modules that get adapters",
                ),
                ParamSpec::new(
                    "target",
                    ParamType::Str {
                        choices: &["completion", "answer"],
                    },
                    json!("completion"),
                    "train on the whole assistant turn, or on `<answer>…</answer>` only (no reasoning)",
                ),
                ParamSpec::new(
                    "checkpoint_every",
                    ParamType::Int {
                        min: 1,
                        max: 100_000_000,
                    },
                    json!(50),
                    "steps between checkpoints in the resume directory",
                ),
                ParamSpec::new(
                    "log_every",
                    ParamType::Int {
                        min: 1,
                        max: 100_000_000,
                    },
                    json!(10),
                    "steps between metrics rows",
                ),
            ],
            device_dependent: true,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        if params.get("lora_rank").is_null() {
            return Ok(());
        }
        let targets: Vec<String> = params.get_as("lora_targets").unwrap_or_default();
        if targets.is_empty() {
            return Err(ParamError {
                param: "lora_targets".into(),
                message: "param `lora_targets` needs at least one module".into(),
            });
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let device: DeviceSpec = ctx.device.parse()?;
        let model_dir = ctx.input("model")?.path.clone();
        let format = ChatFormat::load(&model_dir)?;
        let (_, batches) = read_parquet(&ctx.input("data")?.path)?;
        let rows = read_chat(&batches)?;
        let answer_only = ctx.params.str("target") == "answer";
        let max_len = ctx.params.i64("max_length") as usize;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let (Some(user), Some(assistant)) = (
                row.messages.iter().rev().find(|m| m.role == "user"),
                row.messages.iter().rev().find(|m| m.role == "assistant"),
            ) else {
                continue;
            };
            let target = if answer_only {
                format!("<answer>{}</answer>", row.answer)
            } else {
                assistant.content.clone()
            };
            let prompt = format.prompt_ids(&user.content)?;
            let mut completion = format.completion_ids(&target)?;
            completion.truncate(max_len.saturating_sub(prompt.len()).max(1));
            items.push(ScoreItem { prompt, completion });
        }
        if items.is_empty() {
            bail!("input `data` has no user/assistant pairs to train on");
        }
        let plan = TrainPlan::new(&ctx.params, items.len(), ctx.seed);
        ctx.info(format!(
            "{} examples, {} steps of {}×{} sequences",
            items.len(),
            plan.total_steps,
            plan.batch_size,
            plan.grad_accum
        ));
        let resume = ctx.resume_dir().to_path_buf();
        let progress = ctx.progress(plan.total_steps, "steps");
        let task = SftTask {
            params: ctx.params.clone(),
            plan,
            items,
            model_dir,
            resume,
            out: ctx.output_path("model")?.to_path_buf(),
            progress,
            pad_id: format.pad_id,
            seed: ctx.seed,
        };
        let outcome = run_on(&device, task)?;
        for note in &outcome.notes {
            ctx.info(note);
        }
        ctx.info(format!("training: {}", outcome.speed));
        finish_training(ctx, outcome.resumed_from, &outcome.metrics)?;
        let last = outcome
            .metrics
            .iter()
            .rev()
            .find(|m| m.1 == "loss")
            .map(|m| m.2)
            .unwrap_or(f64::NAN);
        ctx.info(format!("final loss {last:.4}"));
        Ok(())
    }
}

/// How many steps, in what order.
#[derive(Debug, Clone)]
struct TrainPlan {
    total_steps: u64,
    batch_size: usize,
    grad_accum: usize,
    n_items: usize,
    seed: u64,
}

impl TrainPlan {
    fn new(p: &Params, n_items: usize, seed: u64) -> TrainPlan {
        let batch_size = p.i64("batch_size") as usize;
        let grad_accum = p.i64("grad_accum") as usize;
        let per_epoch = n_items.div_ceil(batch_size * grad_accum).max(1) as f64;
        let total_steps = match p.opt_i64("max_steps") {
            Some(s) => s as u64,
            None => (p.f64("epochs") * per_epoch).ceil().max(1.0) as u64,
        };
        TrainPlan {
            total_steps,
            batch_size,
            grad_accum,
            n_items,
            seed,
        }
    }

    /// Micro-batches of one epoch: a seeded shuffle, bucketed by length in windows of 8
    /// batches so that padding stays small, then the batches shuffled again.
    fn epoch(&self, epoch: u64, lengths: &[usize]) -> Vec<Vec<usize>> {
        let mut rng = epoch_rng(self.seed, epoch);
        let mut order: Vec<usize> = (0..self.n_items).collect();
        order.shuffle(&mut rng);
        let mut batches = Vec::new();
        for window in order.chunks(self.batch_size * 8) {
            let mut w = window.to_vec();
            w.sort_by_key(|&i| lengths[i]);
            batches.extend(w.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// The micro-batch with global index `k`, across epochs.
    fn micro_batch(
        &self,
        k: u64,
        lengths: &[usize],
        cache: &mut Option<(u64, Vec<Vec<usize>>)>,
    ) -> Vec<usize> {
        loop {
            let (epoch, batches) = cache.get_or_insert_with(|| (0, self.epoch(0, lengths)));
            let start: u64 = *epoch * batches.len() as u64;
            if k < start + batches.len() as u64 {
                return batches[(k - start) as usize].clone();
            }
            let next = *epoch + 1;
            *cache = Some((next, self.epoch(next, lengths)));
        }
    }
}

struct SftTask {
    params: Params,
    plan: TrainPlan,
    items: Vec<ScoreItem>,
    model_dir: PathBuf,
    resume: PathBuf,
    out: PathBuf,
    progress: Progress,
    pad_id: u32,
    seed: u64,
}

struct Outcome {
    metrics: Vec<(i64, String, f64)>,
    resumed_from: u64,
    /// Checkpoint warnings, for the stage log.
    notes: Vec<String>,
    speed: Speed,
}

impl BackendTask for SftTask {
    type Output = Outcome;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<Outcome> {
        let p = &self.params;
        let ckpt = Checkpoint::new(&self.resume);
        let lora = p.opt_i64("lora_rank").map(|rank| LoraConfig {
            rank: rank as usize,
            alpha: p.f64("lora_alpha"),
            dropout: p.f64("lora_dropout"),
            target_modules: p.get_as("lora_targets").unwrap_or_default(),
        });
        let start = ckpt.restore_or_start::<B>(
            &self.model_dir,
            p,
            &device,
            lora.as_ref().map(|config| Lora {
                config,
                seed: self.seed,
            }),
        )?;
        let (mut model, mut opt, mut state) = (start.model, start.optimizer, start.state);
        let resumed_from = state.step;
        let plan = &self.plan;
        let schedule = LrSchedule {
            peak_lr: p.f64("lr"),
            warmup_steps: (p.f64("warmup_ratio") * plan.total_steps as f64).round() as u64,
            total_steps: plan.total_steps,
            min_lr_ratio: p.f64("min_lr_ratio"),
        };
        let lengths: Vec<usize> = self
            .items
            .iter()
            .map(|i| i.prompt.len() + i.completion.len())
            .collect();
        let (log_every, ckpt_every) = (p.i64("log_every") as u64, p.i64("checkpoint_every") as u64);
        let mut order_cache = None;
        // The sums since the last metrics row live in the checkpoint: a resume logs what an
        // uninterrupted run logs.
        let mut window = Window::restore(&state.window);
        let mut speed = Speed::default();
        self.progress.set_position(state.step);
        while state.step < plan.total_steps {
            // LoRA dropout draws from the backend's RNG: seeded per step from the stage seed,
            // so a key gives one result and a resumed run draws what an uninterrupted one did.
            B::seed(
                &device,
                self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ state.step,
            );
            let started = Instant::now();
            let batches: Vec<Vec<ScoreItem>> = (0..plan.grad_accum as u64)
                .map(|micro| {
                    plan.micro_batch(
                        state.step * plan.grad_accum as u64 + micro,
                        &lengths,
                        &mut order_cache,
                    )
                    .iter()
                    .map(|&i| self.items[i].clone())
                    .collect()
                })
                .collect();
            // Every micro-batch's token sum is divided by the step's token count: the summed
            // gradient is the step's token mean.
            let step_tokens: usize = batches.iter().flatten().map(|i| i.completion.len()).sum();
            let mut acc = GradAccumulator::<B>::new();
            for items in &batches {
                let scores = score(&model, items, self.pad_id, false)?;
                let nll = (scores.logprobs.clone() * scores.mask.clone()).sum().neg();
                let loss = nll.mul_scalar(1.0 / step_tokens.max(1) as f64);
                let value = scalar(loss.clone());
                if !value.is_finite() {
                    bail!(
                        "loss is {value} at step {}: training diverged; these params diverge again on a re-run, and a lower `lr` is a new key that starts this stage over",
                        state.step + 1
                    );
                }
                window.nll += value as f64 * step_tokens as f64;
                acc.backward(loss, &model);
            }
            window.tokens += step_tokens as f64;
            let lr = schedule.lr(state.step);
            let (next, stats) = opt
                .step(model, &mut acc, lr)
                .with_context(|| format!("optimizer step {}", state.step + 1))?;
            model = next;
            state.step += 1;
            speed.add(step_tokens as f64, started.elapsed().as_secs_f64());
            self.progress.set_position(state.step);
            if state.step % log_every == 0 || state.step == plan.total_steps {
                let row = window.take(state.step, lr, stats.grad_norm);
                self.progress.set_message(&format!(
                    "loss {:.4}, {:.0} tok/s",
                    row[0].2,
                    speed.last_rate()
                ));
                state.metrics.extend(row);
            }
            if state.step % ckpt_every == 0 && state.step < plan.total_steps {
                state.window = window.save();
                ckpt.save(&model, &opt, &state)?;
            }
        }
        save_model(&model.valid(), &self.out)?;
        Ok(Outcome {
            metrics: state.metrics,
            resumed_from,
            notes: start.notes,
            speed,
        })
    }
}

/// Sums between two metrics rows.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Window {
    /// Negative log-likelihood summed over target tokens.
    nll: f64,
    tokens: f64,
}

impl Window {
    fn take(&mut self, step: u64, lr: f64, grad_norm: f64) -> Vec<(i64, String, f64)> {
        let s = step as i64;
        let rows = vec![
            (s, "loss".to_string(), self.nll / self.tokens.max(1.0)),
            (s, "lr".to_string(), lr),
            (s, "grad_norm".to_string(), grad_norm),
        ];
        *self = Window::default();
        rows
    }

    fn save(&self) -> Vec<(i64, String, f64)> {
        vec![
            (0, "nll".into(), self.nll),
            (0, "tokens".into(), self.tokens),
        ]
    }

    fn restore(saved: &[(i64, String, f64)]) -> Window {
        let get = |name: &str| saved.iter().find(|r| r.1 == name).map_or(0.0, |r| r.2);
        Window {
            nll: get("nll"),
            tokens: get("tokens"),
        }
    }
}
