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
//!
//! `distill` trains its student with the same loop: the params ([`TrainParams`], declared by
//! [`schedule_params`] and [`checkpoint_params`]), the data order ([`TrainPlan`], optionally easy
//! to hard) and the step loop ([`StepLoop`]) live here; what differs, which sequences a
//! micro-batch holds and their loss, is a [`StepLoss`] ([`Nll`] for SFT).
//!
//! With several GPUs (`device: cuda:0,1`) the micro-batches of a step are spread over them
//! (`dagrun_model::parallel`): the same gradient sums, so the same result as one GPU. The
//! sequences of a step are still chosen on the first device, before the micro-batches go out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
};
use dagrun_engine::{Params, Progress};
use dagrun_model::device::{Devices, MultiDeviceTask, run_on_all};
use dagrun_model::lora::{LoraConfig, uses_dropout};
use dagrun_model::optim::LrSchedule;
use dagrun_model::parallel::DataParallel;
use dagrun_model::score::{ScoreItem, score};
use dagrun_model::{CausalLm, save_model};
use rand::seq::SliceRandom;
use serde::Deserialize;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::checkpoint::{
    Checkpoint, Lora, OptimizerParams, Speed, Start, epoch_rng, finish_training, scalar,
};
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
            params: [
                schedule_params(),
                vec![
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
                ],
                checkpoint_params(),
            ]
            .concat(),
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
        let devices: Devices = ctx.device.parse()?;
        let train = TrainParams::read(&ctx.params)?;
        let own = SftParams::read(&ctx.params)?;
        let model_dir = ctx.input("model")?.path.clone();
        let format = ChatFormat::load(&model_dir)?;
        let (_, batches) = read_parquet(&ctx.input("data")?.path)?;
        let rows = read_chat(&batches)?;
        let answer_only = own.target == "answer";
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
            items.push(train_item(
                &format,
                &user.content,
                &target,
                train.max_length,
            )?);
        }
        if items.is_empty() {
            bail!("input `data` has no user/assistant pairs to train on");
        }
        let plan = TrainPlan::new(&train, &items, ctx.seed);
        let task = SftTask {
            optimizer: OptimizerParams::read(&ctx.params)?,
            lora: own.lora(),
            steps: StepLoop::new(ctx, train, plan)?,
            items,
            model_dir,
            pad_id: format.pad_id,
        };
        let trained = run_on_all(&devices, task)?;
        trained.log(ctx);
        finish_training(ctx, trained.resumed_from, &trained.metrics)?;
        ctx.info(format!("final loss {:.4}", last_loss(&trained.metrics)));
        Ok(())
    }
}

/// The params of the step loop's schedule and batches, shared with `distill` (before a kind's
/// own params in `dagrun stages`).
pub(crate) fn schedule_params() -> Vec<ParamSpec> {
    vec![
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
    ]
}

/// The params of the step loop's checkpoints and metrics rows, shared with `distill` (after a
/// kind's own params).
pub(crate) fn checkpoint_params() -> Vec<ParamSpec> {
    vec![
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
    ]
}

/// The step loop's params, read once.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TrainParams {
    pub epochs: f64,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub max_length: usize,
    pub checkpoint_every: u64,
    pub log_every: u64,
}

impl TrainParams {
    /// The step loop's params among a kind's resolved params (which declare them with
    /// [`schedule_params`] and [`checkpoint_params`]).
    pub(crate) fn read(params: &Params) -> anyhow::Result<TrainParams> {
        params.read_into("the training loop")
    }
}

/// A (prompt, completion) pair in `format`, the completion cut so that both fit in `max_length`
/// tokens (keeping at least one completion token).
pub(crate) fn train_item(
    format: &ChatFormat,
    user: &str,
    assistant: &str,
    max_length: usize,
) -> anyhow::Result<ScoreItem> {
    let prompt = format.prompt_ids(user)?;
    let mut completion = format.completion_ids(assistant)?;
    completion.truncate(max_length.saturating_sub(prompt.len()).max(1));
    Ok(ScoreItem { prompt, completion })
}

/// The last `loss` row of a metrics table (NaN if none), for the stage log.
pub(crate) fn last_loss(metrics: &[(i64, String, f64)]) -> f64 {
    metrics
        .iter()
        .rev()
        .find(|m| m.1 == "loss")
        .map_or(f64::NAN, |m| m.2)
}

/// How many steps, in what order.
#[derive(Debug, Clone)]
pub(crate) struct TrainPlan {
    pub total_steps: u64,
    batch_size: usize,
    grad_accum: usize,
    /// Tokens of each item, for length bucketing.
    lengths: Vec<usize>,
    /// Each item's difficulty, when batches go from easy to hard.
    curriculum: Option<Vec<i32>>,
    seed: u64,
}

impl TrainPlan {
    pub(crate) fn new(t: &TrainParams, items: &[ScoreItem], seed: u64) -> TrainPlan {
        let per_epoch = items.len().div_ceil(t.batch_size * t.grad_accum).max(1) as f64;
        let total_steps = match t.max_steps {
            Some(s) => s,
            None => (t.epochs * per_epoch).ceil().max(1.0) as u64,
        };
        TrainPlan {
            total_steps,
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            lengths: items
                .iter()
                .map(|i| i.prompt.len() + i.completion.len())
                .collect(),
            curriculum: None,
            seed,
        }
    }

    /// Every epoch goes from easy to hard: items in order of `difficulty` (one per item), a
    /// seeded shuffle within each difficulty.
    pub(crate) fn with_curriculum(mut self, difficulty: Vec<i32>) -> TrainPlan {
        self.curriculum = Some(difficulty);
        self
    }

    /// One line for the stage log.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} examples, {} steps of {}×{} sequences",
            self.lengths.len(),
            self.total_steps,
            self.batch_size,
            self.grad_accum
        )
    }

    /// Micro-batches of one epoch. Without a curriculum: a seeded shuffle, bucketed by length
    /// in windows of 8 batches so that padding stays small, then the batches shuffled again.
    /// With one: the shuffle sorted by difficulty (stable), cut into batches in that order.
    fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = epoch_rng(self.seed, epoch);
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        order.shuffle(&mut rng);
        if let Some(difficulty) = &self.curriculum {
            order.sort_by_key(|&i| difficulty[i]);
            return order
                .chunks(self.batch_size)
                .map(<[usize]>::to_vec)
                .collect();
        }
        let mut batches = Vec::new();
        for window in order.chunks(self.batch_size * 8) {
            let mut w = window.to_vec();
            w.sort_by_key(|&i| self.lengths[i]);
            batches.extend(w.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// The micro-batch with global index `k`, across epochs.
    fn micro_batch(&self, k: u64, cache: &mut Option<(u64, Vec<Vec<usize>>)>) -> Vec<usize> {
        loop {
            let (epoch, batches) = cache.get_or_insert_with(|| (0, self.epoch(0)));
            let start: u64 = *epoch * batches.len() as u64;
            if k < start + batches.len() as u64 {
                return batches[(k - start) as usize].clone();
            }
            let next = *epoch + 1;
            *cache = Some((next, self.epoch(next)));
        }
    }
}

/// What differs between the kinds that train with [`StepLoop`]: the sequences a micro-batch
/// holds, and their loss. `Send`: with several devices each has its own, in its own thread.
pub(crate) trait StepLoss<B: AutodiffBackend>: Send + Sized {
    /// The sequences of the micro-batch of items `batch` (indices into the plan's items), the
    /// `micro`-th of optimizer step `step` (from 0). Figures to log go to `window`.
    fn sequences(
        &mut self,
        model: &CausalLm<B>,
        step: u64,
        micro: usize,
        batch: &[usize],
        window: &mut Window,
    ) -> anyhow::Result<Vec<ScoreItem>>;

    /// The same loss for a replica of the model on `device` (another GPU of the stage's list).
    fn replica(&self, device: &B::Device) -> anyhow::Result<Self>;

    /// The loss of `items` summed over their completion tokens, with gradients; the loop
    /// divides it by the step's token count. Figures to log go to `window`, at most one
    /// [`Window::add`] per figure (the loop sums each call's window into the step's in
    /// micro-batch order, which is then the order one device adds in).
    fn loss(
        &mut self,
        model: &CausalLm<B>,
        items: &[ScoreItem],
        window: &mut Window,
    ) -> anyhow::Result<Tensor<B, 1>>;
}

/// SFT's loss: the negative log-likelihood of the items' completions.
#[derive(Clone, Copy)]
pub(crate) struct Nll<'a> {
    pub items: &'a [ScoreItem],
    pub pad_id: u32,
}

impl<B: AutodiffBackend> StepLoss<B> for Nll<'_> {
    fn sequences(
        &mut self,
        _: &CausalLm<B>,
        _: u64,
        _: usize,
        batch: &[usize],
        _: &mut Window,
    ) -> anyhow::Result<Vec<ScoreItem>> {
        Ok(batch.iter().map(|&i| self.items[i].clone()).collect())
    }

    fn replica(&self, _: &B::Device) -> anyhow::Result<Self> {
        Ok(*self)
    }

    fn loss(
        &mut self,
        model: &CausalLm<B>,
        items: &[ScoreItem],
        _: &mut Window,
    ) -> anyhow::Result<Tensor<B, 1>> {
        let scores = score(model, items, self.pad_id, false)?;
        Ok((scores.logprobs * scores.mask).sum().neg())
    }
}

/// The optimizer steps of a training stage, from wherever its checkpoint left off to
/// `plan.total_steps`: warmup + cosine, AdamW, checkpoints every `checkpoint_every` steps in
/// the resume directory and a metrics row every `log_every`; the trained model goes to the
/// stage's `model` output.
pub(crate) struct StepLoop {
    train: TrainParams,
    plan: TrainPlan,
    progress: Progress,
    resume: PathBuf,
    out: PathBuf,
    seed: u64,
}

/// What a [`StepLoop`] run leaves besides the saved model.
pub(crate) struct Trained {
    pub metrics: Vec<(i64, String, f64)>,
    /// The step the run started from (0: from the start).
    pub resumed_from: u64,
    /// Checkpoint warnings, for the stage log.
    pub notes: Vec<String>,
    pub speed: Speed,
}

impl Trained {
    /// Puts the checkpoint warnings and the speed in the stage log.
    pub(crate) fn log(&self, ctx: &StageContext) {
        for note in &self.notes {
            ctx.info(note);
        }
        ctx.info(format!("training: {}", self.speed));
    }
}

impl StepLoop {
    /// The loop for `ctx`'s stage, with its progress bar (after a line about `plan` in the log).
    pub(crate) fn new(
        ctx: &StageContext,
        train: TrainParams,
        plan: TrainPlan,
    ) -> anyhow::Result<StepLoop> {
        ctx.info(plan.describe());
        Ok(StepLoop {
            progress: ctx.progress(plan.total_steps, "steps"),
            resume: ctx.resume_dir().to_path_buf(),
            out: ctx.output_path("model")?.to_path_buf(),
            seed: ctx.seed,
            train,
            plan,
        })
    }

    /// The checkpoints of the stage's resume directory.
    pub(crate) fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(&self.resume)
    }

    /// The stage's seed.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// Tokens per sequence (`max_length`).
    pub(crate) fn max_length(&self) -> usize {
        self.train.max_length
    }

    /// Trains `start`'s model (on `devices[0]`) on `devices`, and saves it as the stage's
    /// `model` output.
    pub(crate) fn run<B: AutodiffBackend, L: StepLoss<B>>(
        &self,
        devices: &[B::Device],
        start: Start<B>,
        step_loss: &mut L,
    ) -> anyhow::Result<Trained> {
        let ckpt = self.checkpoint();
        let (mut model, mut opt, mut state) = (start.model, start.optimizer, start.state);
        if devices.len() > 1 && uses_dropout(&model) {
            bail!(
                "`lora_dropout` needs one device: its masks come from the backend's one random generator, which several GPUs' threads would draw from in a racy order (a key would not give one result); use `device: cuda:N` or `lora_dropout: 0`"
            );
        }
        let device = &devices[0];
        let mut replicas = devices[1..]
            .iter()
            .map(|d| step_loss.replica(d))
            .collect::<anyhow::Result<Vec<L>>>()?;
        let mut parallel = DataParallel::new(&model, devices.to_vec())?;
        let resumed_from = state.step;
        let (plan, t) = (&self.plan, &self.train);
        let schedule = LrSchedule {
            peak_lr: t.lr,
            warmup_steps: (t.warmup_ratio * plan.total_steps as f64).round() as u64,
            total_steps: plan.total_steps,
            min_lr_ratio: t.min_lr_ratio,
        };
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
                device,
                self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ state.step,
            );
            let started = Instant::now();
            let mut batches = Vec::with_capacity(plan.grad_accum);
            for micro in 0..plan.grad_accum {
                let k = state.step * plan.grad_accum as u64 + micro as u64;
                let indices = plan.micro_batch(k, &mut order_cache);
                batches.push(step_loss.sequences(
                    &model,
                    state.step,
                    micro,
                    &indices,
                    &mut window,
                )?);
            }
            // Every micro-batch's token sum is divided by the step's token count: the summed
            // gradient is the step's token mean.
            let step_tokens: usize = batches.iter().flatten().map(|i| i.completion.len()).sum();
            let losses = std::iter::once(&mut *step_loss)
                .chain(&mut replicas)
                .collect();
            let (next, mut acc) = parallel.accumulate(
                model,
                losses,
                batches.len(),
                |step_loss, model, k| {
                    let mut figures = Window::default();
                    let loss = step_loss
                        .loss(model, &batches[k], &mut figures)?
                        .mul_scalar(1.0 / step_tokens.max(1) as f64);
                    let value = scalar(loss.clone());
                    Ok((loss, (value, figures)))
                },
                |_, (value, figures)| {
                    if !value.is_finite() {
                        bail!(
                            "loss is {value} at step {}: training diverged; these params diverge again on a re-run, and a lower `lr` is a new key that starts this stage over",
                            state.step + 1
                        );
                    }
                    window.nll += value as f64 * step_tokens as f64;
                    window.merge(&figures);
                    Ok(())
                },
            )?;
            model = next;
            window.tokens += step_tokens as f64;
            let lr = schedule.lr(state.step);
            let (next, stats) = opt
                .step(model, &mut acc, lr)
                .with_context(|| format!("optimizer step {}", state.step + 1))?;
            model = next;
            parallel.sync(&model);
            state.step += 1;
            speed.add(step_tokens as f64, started.elapsed().as_secs_f64());
            self.progress.set_position(state.step);
            if state.step % t.log_every == 0 || state.step == plan.total_steps {
                let rows = window.take(state.step, lr, stats.grad_norm);
                self.progress.set_message(&format!(
                    "loss {:.4}, {:.0} tok/s",
                    rows[0].2,
                    speed.last_rate()
                ));
                state.metrics.extend(rows);
            }
            if state.step % t.checkpoint_every == 0 && state.step < plan.total_steps {
                state.window = window.save();
                ckpt.save(&model, &opt, &state)?;
            }
        }
        save_model(&model.valid(), &self.out)?;
        Ok(Trained {
            metrics: state.metrics,
            resumed_from,
            notes: start.notes,
            speed,
        })
    }
}

/// The params of `sft` beyond the step loop's and the optimizer's, read once.
#[derive(Debug, Clone, Deserialize)]
struct SftParams {
    target: String,
    lora_rank: Option<usize>,
    lora_alpha: f64,
    lora_dropout: f64,
    #[serde(default)]
    lora_targets: Vec<String>,
}

impl SftParams {
    fn read(params: &Params) -> anyhow::Result<SftParams> {
        params.read_into("`sft`")
    }

    /// The adapters to train, when `lora_rank` is set.
    fn lora(&self) -> Option<LoraConfig> {
        self.lora_rank.map(|rank| LoraConfig {
            rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.lora_targets.clone(),
        })
    }
}

struct SftTask {
    optimizer: OptimizerParams,
    lora: Option<LoraConfig>,
    steps: StepLoop,
    items: Vec<ScoreItem>,
    model_dir: PathBuf,
    pad_id: u32,
}

impl MultiDeviceTask for SftTask {
    type Output = Trained;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> anyhow::Result<Trained> {
        let device = devices[0].clone();
        let start = self.steps.checkpoint().restore_or_start::<B>(
            &self.model_dir,
            &self.optimizer,
            &device,
            self.lora.as_ref().map(|config| Lora {
                config,
                seed: self.steps.seed(),
            }),
        )?;
        let mut loss = Nll {
            items: &self.items,
            pad_id: self.pad_id,
        };
        self.steps.run(&devices, start, &mut loss)
    }
}

/// Sums between two metrics rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Window {
    /// Loss summed over target tokens (the negative log-likelihood, for SFT).
    nll: f64,
    tokens: f64,
    /// Further figures, logged as numerator ÷ denominator after `loss`, `lr` and `grad_norm`, in
    /// name order.
    ratios: BTreeMap<String, (f64, f64)>,
}

impl Window {
    /// Adds to the figure `name`, logged as the sum of numerators ÷ the sum of denominators.
    pub(crate) fn add(&mut self, name: &str, numerator: f64, denominator: f64) {
        let sums = self.ratios.entry(name.to_string()).or_default();
        sums.0 += numerator;
        sums.1 += denominator;
    }

    /// Adds the figures of one micro-batch's loss (its [`StepLoss::loss`] window).
    fn merge(&mut self, figures: &Window) {
        for (name, (numerator, denominator)) in &figures.ratios {
            self.add(name, *numerator, *denominator);
        }
    }

    fn take(&mut self, step: u64, lr: f64, grad_norm: f64) -> Vec<(i64, String, f64)> {
        let s = step as i64;
        let mut rows = vec![
            (s, "loss".to_string(), self.nll / self.tokens.max(1.0)),
            (s, "lr".to_string(), lr),
            (s, "grad_norm".to_string(), grad_norm),
        ];
        for (name, (numerator, denominator)) in &self.ratios {
            if *denominator > 0.0 {
                rows.push((s, name.clone(), numerator / denominator));
            }
        }
        *self = Window::default();
        rows
    }

    /// As [`TrainState::window`] rows: the loss sums at step 0, each figure's numerator at 1
    /// and denominator at 2.
    fn save(&self) -> Vec<(i64, String, f64)> {
        let mut rows = vec![
            (0, "nll".into(), self.nll),
            (0, "tokens".into(), self.tokens),
        ];
        for (name, (numerator, denominator)) in &self.ratios {
            rows.push((1, name.clone(), *numerator));
            rows.push((2, name.clone(), *denominator));
        }
        rows
    }

    fn restore(saved: &[(i64, String, f64)]) -> Window {
        let get = |name: &str| {
            saved
                .iter()
                .find(|r| r.0 == 0 && r.1 == name)
                .map_or(0.0, |r| r.2)
        };
        let mut window = Window {
            nll: get("nll"),
            tokens: get("tokens"),
            ratios: BTreeMap::new(),
        };
        for (tag, name, value) in saved {
            let sums = match tag {
                1 | 2 => window.ratios.entry(name.clone()).or_default(),
                _ => continue,
            };
            if *tag == 1 {
                sums.0 = *value;
            } else {
                sums.1 = *value;
            }
        }
        window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(batch_size: usize, n: usize) -> TrainPlan {
        let train = TrainParams {
            epochs: 1.0,
            max_steps: None,
            batch_size,
            grad_accum: 1,
            lr: 1e-3,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.1,
            max_length: 64,
            checkpoint_every: 10,
            log_every: 1,
        };
        let items: Vec<ScoreItem> = (0..n)
            .map(|i| ScoreItem {
                prompt: vec![1; 1 + i % 3],
                completion: vec![2; 1 + i % 5],
            })
            .collect();
        TrainPlan::new(&train, &items, 7)
    }

    #[test]
    fn a_curriculum_goes_from_easy_to_hard_every_epoch() {
        let difficulty: Vec<i32> = (0..20).map(|i| [3, 1, 2, 1][i % 4]).collect();
        let plan = plan_of(3, 20).with_curriculum(difficulty.clone());
        for epoch in 0..2 {
            let order: Vec<usize> = plan.epoch(epoch).concat();
            let levels: Vec<i32> = order.iter().map(|&i| difficulty[i]).collect();
            assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
            let mut seen = order.clone();
            seen.sort();
            assert_eq!(seen, (0..20).collect::<Vec<_>>(), "every item once");
        }
        // Within a difficulty the order is a seeded shuffle: it changes between epochs.
        assert_ne!(plan.epoch(0), plan.epoch(1));
        // Without a curriculum, batches are shuffled, so difficulty is not sorted.
        let shuffled: Vec<i32> = plan_of(3, 20)
            .epoch(0)
            .concat()
            .iter()
            .map(|&i| difficulty[i])
            .collect();
        assert!(shuffled.windows(2).any(|w| w[0] > w[1]));
    }

    #[test]
    fn the_window_survives_a_checkpoint_exactly() {
        let mut w = Window {
            nll: 12.5,
            tokens: 7.0,
            ..Window::default()
        };
        w.add("agreement", 0.1 + 0.2, 3.0);
        w.add("difficulty", 5.0, 2.0);
        assert_eq!(Window::restore(&w.save()), w);
        let rows = w.take(4, 1e-3, 0.5);
        let names: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(
            names,
            ["loss", "lr", "grad_norm", "agreement", "difficulty"]
        );
        assert_eq!(rows[3].2, (0.1 + 0.2) / 3.0);
        assert_eq!(w, Window::default());
        // An SFT window (no figures) saves as it always did.
        assert_eq!(Window::default().save().len(), 2);
    }

    #[test]
    fn params_are_read_into_their_struct() {
        let params = dagrun_engine::params::resolve(&Sft.spec(), &serde_json::Map::new()).unwrap();
        let p = SftParams::read(&params).unwrap();
        assert!(p.lora().is_none());
        assert_eq!(p.target, "completion");
        crate::checkpoint::OptimizerParams::read(&params).unwrap();
    }
}
