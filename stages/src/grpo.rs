//! Stage kind `grpo`: reinforcement learning with verifiable rewards, as TRL's GRPOTrainer.
//!
//! Each step samples `group_size` completions for each of `batch_prompts` problems with the
//! batched KV-cache sampler, scores them with the chosen rewards, turns rewards into
//! group-relative advantages, and takes `num_iterations` optimizer steps on the clipped
//! surrogate loss (see [`crate::grpo_math`]). The input model is also the frozen reference for
//! the KL term. Problems are visited in a seeded shuffle, so a resumed run continues exactly.
//!
//! As TRL: the policy, the old policy and the reference are scored at the step's sampling
//! temperature (logits ÷ T). The gradient of an optimizer step is that of the whole round's
//! batch (`batch_prompts × group_size` completions) in one piece: `micro_batch` only sets how
//! many sequences go through one backward pass. Metrics per step: the loss is the whole batch's
//! (averaged over the `num_iterations` optimizer steps, as are `lr` and `grad_norm`); KL, clip
//! fractions and entropy are token means over the batch and the iterations; each reward
//! component has its `rewards/NAME/mean` and `rewards/NAME/std`. Speeds go to the stage log, not
//! to the `metrics` table, whose bytes depend only on the key.
//!
//! With several GPUs (`device: cuda:0,1`) the micro-batches of each optimizer step are spread
//! over them (`dagrun_model::parallel`), with the gradient sums of one GPU; sampling and the
//! reference's scoring run on the first.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use dagrun_engine::dataset::{read_parquet, write_parquet_atomic};
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
};
use dagrun_engine::{Params, Progress};
use dagrun_model::device::{Devices, MultiDeviceTask, run_on_all};
use dagrun_model::generate::{SamplingParams, generate};
use dagrun_model::optim::{AdamW, LrSchedule};
use dagrun_model::parallel::DataParallel;
use dagrun_model::score::{Entropy, ScoreItem, score_host, score_with};
use dagrun_model::{CausalLm, load_model, save_model};
use rand::seq::SliceRandom;
use serde::Deserialize;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::checkpoint::{
    Checkpoint, OptimizerParams, Speed, epoch_rng, finish_training, scalar, sync_path,
};
use crate::grpo_math::{
    LossConfig, LossStats, ScaleRewards, WholeBatch, completion_mask, compute_advantages,
    entropy_bonus, grpo_loss,
};
use crate::rewards::{Judged, RewardSet};
use crate::sampling::CodeRewardParams;
use crate::tables::{ProblemRow, SampleRow, read_problems, samples_batch};

pub struct Grpo;

/// The stage's params, read once.
#[derive(Debug, Clone, Deserialize)]
struct GrpoParams {
    steps: u64,
    batch_prompts: usize,
    group_size: usize,
    rewards: BTreeMap<String, f64>,
    answer_fallback: bool,
    lr: f64,
    warmup_steps: u64,
    beta: f64,
    epsilon: f64,
    epsilon_high: f64,
    num_iterations: u64,
    loss_type: String,
    scale_rewards: String,
    mask_truncated_completions: bool,
    temperature: f64,
    temperature_end: Option<f64>,
    top_p: f32,
    max_new_tokens: usize,
    entropy_coef: f64,
    micro_batch: usize,
    checkpoint_every: u64,
    #[serde(flatten)]
    optimizer: OptimizerParams,
    #[serde(flatten)]
    code: CodeRewardParams,
}

impl GrpoParams {
    fn read(params: &Params) -> anyhow::Result<GrpoParams> {
        params.read_into("`grpo`")
    }
}

impl StageKind for Grpo {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "grpo",
            version: 3,
            doc: "GRPO with verifiable rewards (TRL's losses: grpo, bnpo, dr_grpo, dapo)",
            inputs: vec![
                PortSpec::one(
                    "model",
                    ArtifactType::Model,
                    "the policy to train, also the frozen KL reference",
                ),
                PortSpec::one(
                    "problems",
                    ArtifactType::Dataset(Some("problems")),
                    "prompts with reference answers",
                ),
            ],
            outputs: vec![
                PortSpec::one("model", ArtifactType::Model, "the trained policy"),
                PortSpec::one(
                    "metrics",
                    ArtifactType::Dataset(Some("metrics")),
                    "rewards (and each component's mean and std), loss, lr, grad_norm, KL, clip ratios, entropy, lengths per step",
                ),
                PortSpec::one(
                    "samples",
                    ArtifactType::Dataset(Some("samples")),
                    "every sampled completion with its rewards and advantage",
                ),
            ],
            params: vec![
                ParamSpec::new(
                    "steps",
                    ParamType::Int {
                        min: 1,
                        max: 10_000_000,
                    },
                    json!(100),
                    "generation rounds",
                ),
                ParamSpec::new(
                    "batch_prompts",
                    ParamType::Int {
                        min: 1,
                        max: 65_536,
                    },
                    json!(16),
                    "problems per step",
                ),
                ParamSpec::new(
                    "group_size",
                    ParamType::Int { min: 2, max: 1024 },
                    json!(8),
                    "completions per problem",
                ),
                ParamSpec::new(
                    "rewards",
                    ParamType::Weights {
                        keys: crate::sampling::REWARD_NAMES,
                    },
                    json!({"correctness": 1.0, "format": 0.1}),
                    "weighted reward functions",
                ),
                ParamSpec::new(
                    "answer_fallback",
                    ParamType::Bool,
                    json!(false),
                    "read the last \\boxed{} (else the last number) of a completion without an <answer> block as its answer",
                ),
                ParamSpec::new(
                    "lr",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    json!(5e-5),
                    "learning rate (constant after warmup)",
                ),
                ParamSpec::new(
                    "warmup_steps",
                    ParamType::Int {
                        min: 0,
                        max: 10_000_000,
                    },
                    json!(0),
                    "optimizer steps of linear warmup",
                ),
                ParamSpec::new(
                    "beta",
                    ParamType::Float {
                        min: 0.0,
                        max: 100.0,
                    },
                    json!(0.0),
                    "weight of the k3 KL to the reference",
                ),
                ParamSpec::new(
                    "epsilon",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(0.2),
                    "lower clip of the ratio",
                ),
                ParamSpec::new(
                    "epsilon_high",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    json!(0.28),
                    "upper clip of the ratio (DAPO clip-higher)",
                ),
                ParamSpec::new(
                    "num_iterations",
                    ParamType::Int { min: 1, max: 64 },
                    json!(1),
                    "optimizer steps per generation round (μ)",
                ),
                ParamSpec::new(
                    "loss_type",
                    ParamType::Str {
                        choices: &["grpo", "bnpo", "dr_grpo", "dapo"],
                    },
                    json!("dapo"),
                    "loss normalisation, as TRL",
                ),
                ParamSpec::new(
                    "scale_rewards",
                    ParamType::Str {
                        choices: &["group", "batch", "none"],
                    },
                    json!("group"),
                    "divide advantages by the group's, the batch's or no std",
                ),
                ParamSpec::new(
                    "mask_truncated_completions",
                    ParamType::Bool,
                    json!(false),
                    "leave truncated completions out of the loss",
                ),
                ParamSpec::new(
                    "temperature",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    json!(1.0),
                    "sampling temperature at the first step (above 0; the log-probs are scored at it too)",
                ),
                ParamSpec::unset(
                    "temperature_end",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    "sampling temperature at the last step (linear schedule; default: constant)",
                ),
                ParamSpec::new(
                    "top_p",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(1.0),
                    "nucleus sampling",
                ),
                ParamSpec::new(
                    "max_new_tokens",
                    ParamType::Int {
                        min: 1,
                        max: 1_000_000,
                    },
                    json!(192),
                    "completion length limit",
                ),
                ParamSpec::new(
                    "entropy_coef",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    json!(0.0),
                    "entropy bonus coefficient",
                ),
                ParamSpec::new(
                    "micro_batch",
                    ParamType::Int {
                        min: 1,
                        max: 65_536,
                    },
                    json!(64),
                    "sequences per backward pass",
                ),
                ParamSpec::new(
                    "max_grad_norm",
                    ParamType::Float { min: 0.0, max: 1e6 },
                    json!(1.0),
                    "global gradient norm clip (0: off)",
                ),
                ParamSpec::new(
                    "weight_decay",
                    ParamType::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    json!(0.0),
                    "AdamW weight decay",
                ),
                ParamSpec::new(
                    "checkpoint_every",
                    ParamType::Int {
                        min: 1,
                        max: 10_000_000,
                    },
                    json!(10),
                    "steps between checkpoints",
                ),
            ]
            .into_iter()
            .chain(crate::sampling::code_reward_params())
            .collect(),
            device_dependent: true,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        let weights = params.weights("rewards");
        if weights.iter().all(|(_, w)| *w == 0.0) {
            return Err(ParamError {
                param: "rewards".into(),
                message: "param `rewards` needs a positive weight".into(),
            });
        }
        for name in ["temperature", "temperature_end"] {
            if params.opt_f64(name) == Some(0.0) {
                let message = format!(
                    "param `{name}` must be above 0: at 0 every completion of a group is the same, so there is no signal to learn from"
                );
                return Err(ParamError {
                    param: name.into(),
                    message,
                });
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let devices: Devices = ctx.device.parse()?;
        let model_dir = ctx.input("model")?.path.clone();
        let format = ChatFormat::load(&model_dir)?;
        let problems = read_problems(&read_parquet(&ctx.input("problems")?.path)?.1)?;
        if problems.is_empty() {
            bail!("input `problems` is empty");
        }
        let prompts = crate::sampling::prompts_of(&format, &problems)?;
        let params = GrpoParams::read(&ctx.params)?;
        let rewards = crate::sampling::reward_set(&params.rewards, params.max_new_tokens)?
            .with_answer_fallback(params.answer_fallback)
            .with_code(params.code.code_bonus, params.code.limits());
        let progress = ctx.progress(params.steps, "steps");
        let task = GrpoTask {
            params,
            rewards,
            problems,
            prompts,
            format,
            model_dir,
            resume: ctx.resume_dir().to_path_buf(),
            out: ctx.output_path("model")?.to_path_buf(),
            progress,
            seed: ctx.seed,
        };
        let outcome = run_on_all(&devices, task)?;
        for note in &outcome.notes {
            ctx.info(note);
        }
        ctx.info(format!("generation: {}", outcome.generation));
        ctx.info(format!("training: {}", outcome.training));
        finish_training(ctx, outcome.resumed_from, &outcome.metrics)?;
        let mut samples = Vec::new();
        for shard in outcome.sample_shards {
            match read_parquet(&shard) {
                Ok((_, batches)) => samples.extend(batches),
                Err(e) => {
                    // The steps behind it cannot be sampled again from a later checkpoint:
                    // clear them, so the next run starts this stage over instead of failing here
                    // for good.
                    let resume = ctx.resume_dir().to_path_buf();
                    for entry in std::fs::read_dir(&resume)?.flatten() {
                        let _ = if entry.path().is_dir() {
                            std::fs::remove_dir_all(entry.path())
                        } else {
                            std::fs::remove_file(entry.path())
                        };
                    }
                    bail!(
                        "samples checkpoint {} is unreadable ({e:#}); its checkpoints were cleared, so the next run starts this stage over",
                        shard.display()
                    );
                }
            }
        }
        ctx.write_dataset("samples", &samples)?;
        Ok(())
    }
}

struct GrpoTask {
    params: GrpoParams,
    rewards: RewardSet,
    problems: Vec<ProblemRow>,
    prompts: Vec<Vec<u32>>,
    format: ChatFormat,
    model_dir: PathBuf,
    resume: PathBuf,
    out: PathBuf,
    progress: Progress,
    seed: u64,
}

struct Outcome {
    metrics: Vec<(i64, String, f64)>,
    sample_shards: Vec<PathBuf>,
    resumed_from: u64,
    /// Checkpoint warnings, for the stage log.
    notes: Vec<String>,
    generation: Speed,
    training: Speed,
}

impl GrpoTask {
    /// Problem indices of step `step`: consecutive slices of per-epoch seeded shuffles.
    fn batch(&self, step: u64) -> Vec<usize> {
        let b = self.params.batch_prompts;
        let n = self.problems.len();
        // A step spans at most two epochs: shuffle each once, not once per prompt.
        let mut shuffled: Option<(usize, Vec<usize>)> = None;
        (0..b)
            .map(|j| {
                let k = step as usize * b + j;
                let (epoch, pos) = (k / n, k % n);
                if shuffled.as_ref().map(|s| s.0) != Some(epoch) {
                    let mut order: Vec<usize> = (0..n).collect();
                    order.shuffle(&mut epoch_rng(self.seed, epoch as u64));
                    shuffled = Some((epoch, order));
                }
                shuffled.as_ref().expect("just set").1[pos]
            })
            .collect()
    }

    /// The sampling temperature of step `step`, also the one its log-probs are scored at.
    fn temperature(&self, step: u64, steps: u64) -> f64 {
        let start = self.params.temperature;
        let end = self.params.temperature_end.unwrap_or(start);
        let t = if steps > 1 {
            step as f64 / (steps - 1) as f64
        } else {
            0.0
        };
        // Generation samples at the f32 value: score at exactly that value too.
        f64::from((start + (end - start) * t) as f32)
    }
}

impl MultiDeviceTask for GrpoTask {
    type Output = Outcome;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> anyhow::Result<Outcome> {
        let device = devices[0].clone();
        let p = &self.params;
        let (steps, group, beta) = (p.steps, p.group_size, p.beta);
        let ckpt = Checkpoint::new(&self.resume);
        let start = ckpt.restore_or_start::<B>(&self.model_dir, &p.optimizer, &device, None)?;
        let (mut model, mut opt, mut state) = (start.model, start.optimizer, start.state);
        let mut parallel = DataParallel::new(&model, devices)?;
        let reference = if beta > 0.0 {
            Some(load_model::<B::InnerBackend>(&self.model_dir, &device)?)
        } else {
            None
        };
        let resumed_from = state.step;
        let (top_p, checkpoint_every, max_new) = (p.top_p, p.checkpoint_every, p.max_new_tokens);
        let trainer = Trainer {
            loss: LossConfig {
                loss_type: p.loss_type.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
                epsilon_low: p.epsilon,
                epsilon_high: p.epsilon_high,
                beta,
                max_completion_length: max_new,
                whole_batch: None,
            },
            mask_truncated: p.mask_truncated_completions,
            entropy_coef: p.entropy_coef,
            micro_batch: p.micro_batch,
            iterations: p.num_iterations,
            schedule: LrSchedule {
                warmup_steps: p.warmup_steps,
                ..LrSchedule::constant(p.lr)
            },
            pad_id: self.format.pad_id,
        };
        let scale: ScaleRewards = p
            .scale_rewards
            .parse()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let shard_path = |step: u64| self.resume.join(format!("samples-{step:07}.parquet"));
        let mut pending: Vec<SampleRow> = Vec::new();
        let (mut generation, mut training) = (Speed::default(), Speed::default());
        self.progress.set_position(state.step);

        while state.step < steps {
            let step = state.step;
            let chosen = self.batch(step);
            let temperature = self.temperature(step, steps);
            // 1. Sample a group of completions per problem.
            let t0 = Instant::now();
            let policy = model.valid();
            let prompts: Vec<Vec<u32>> = chosen
                .iter()
                .flat_map(|&i| std::iter::repeat_n(self.prompts[i].clone(), group))
                .collect();
            let sampling = SamplingParams {
                temperature: temperature as f32,
                top_k: 0,
                top_p,
                max_new_tokens: max_new,
                stop_strings: Vec::new(),
                seed: self
                    .seed
                    .wrapping_add(step.wrapping_mul(0x2545_F491_4F6C_DD1D)),
            };
            let mut completions = generate(
                &policy,
                Some(&self.format.tokenizer),
                &prompts,
                &self.format.stop_ids,
                &sampling,
            )
            .map_err(|e| match e.downcast_ref::<dagrun_model::generate::TooLarge>() {
                // grpo generates every group of a step at once: name its own params.
                Some(big) => anyhow::anyhow!(
                    "{} sequences (batch_prompts × group_size) of up to {} new tokens would need about {} MiB, more than the {} MiB available; lower `batch_prompts`, `group_size` or `max_new_tokens`",
                    big.sequences,
                    big.max_new_tokens,
                    big.needed >> 20,
                    big.limit >> 20
                ),
                None => e,
            })?;
            for c in &mut completions {
                c.text = self.format.reply_text(&c.text);
            }
            let gen_tokens: usize = completions.iter().map(|c| c.token_ids.len()).sum();
            generation.add(gen_tokens as f64, t0.elapsed().as_secs_f64());

            // 2. Rewards and advantages.
            let judged: Vec<Judged> = completions
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    let prob = &self.problems[chosen[k / group]];
                    Judged {
                        task: &prob.task,
                        answer: &prob.answer,
                        steps: &prob.steps,
                        completion: &c.text,
                        completion_tokens: c.token_ids.len(),
                        truncated: c.truncated,
                    }
                })
                .collect();
            let scored = self.rewards.score_all(&judged);
            let totals: Vec<Option<f64>> = scored.iter().map(|s| s.total).collect();
            let adv =
                compute_advantages(&totals, group, scale).map_err(|e| anyhow::anyhow!("{e}"))?;
            let items: Vec<ScoreItem> = prompts
                .iter()
                .zip(&completions)
                .map(|(pr, c)| ScoreItem {
                    prompt: pr.clone(),
                    completion: if c.token_ids.is_empty() {
                        vec![self.format.end_id]
                    } else {
                        c.token_ids.clone()
                    },
                })
                .collect();
            let shapes: Vec<(usize, bool)> = items
                .iter()
                .zip(&completions)
                .map(|(it, c)| (it.completion.len(), c.truncated))
                .collect();

            // 3. Log-probs that do not change during the iterations, at the sampling temperature.
            let ref_lp = match &reference {
                Some(r) => {
                    Some(score_host(r, &items, self.format.pad_id, false, temperature)?.logprobs)
                }
                None => None,
            };
            let old_lp = if trainer.iterations > 1 {
                Some(score_host(&policy, &items, self.format.pad_id, false, temperature)?.logprobs)
            } else {
                None
            };
            let round = Round {
                items,
                shapes,
                advantages: adv.advantages.clone(),
                old_lp,
                ref_lp,
                temperature,
            };

            // 4. Optimise.
            let t1 = Instant::now();
            let (next, stats) = trainer.optimise(model, &mut opt, &round, step, &mut parallel)?;
            model = next;
            training.add(
                stats.tokens * trainer.iterations as f64,
                t1.elapsed().as_secs_f64(),
            );

            // 5. Record.
            for (k, c) in completions.iter().enumerate() {
                let prob = &self.problems[chosen[k / group]];
                pending.push(SampleRow {
                    step: step as i64 + 1,
                    id: prob.id.clone(),
                    task: prob.task.clone(),
                    prompt: prob.prompt.clone(),
                    answer: prob.answer.clone(),
                    completion: c.text.clone(),
                    reward: scored[k].total.unwrap_or(f64::NAN),
                    components: scored[k]
                        .components
                        .iter()
                        .map(|(n, v)| (n.to_string(), *v))
                        .collect(),
                    advantage: adv.advantages[k],
                    length: c.token_ids.len() as i32,
                    truncated: c.truncated,
                });
            }
            let s = step as i64 + 1;
            let (mean, std) = mean_std(&totals.iter().flatten().copied().collect::<Vec<_>>());
            let mut row = |name: &str, v: f64| state.metrics.push((s, name.to_string(), v));
            row("reward", mean);
            row("reward_std", std);
            for (name, _) in &scored[0].components {
                let vals: Vec<f64> = scored
                    .iter()
                    .filter_map(|x| x.components.iter().find(|c| c.0 == *name).and_then(|c| c.1))
                    .collect();
                let (mean, std) = mean_std(&vals);
                row(&format!("rewards/{name}/mean"), mean);
                row(&format!("rewards/{name}/std"), std);
            }
            let n = completions.len() as f64;
            row("frac_reward_zero_std", adv.frac_reward_zero_std);
            row("completion_length", gen_tokens as f64 / n);
            row(
                "truncated_frac",
                completions.iter().filter(|c| c.truncated).count() as f64 / n,
            );
            row("temperature", temperature);
            row("lr", stats.lr);
            row("grad_norm", stats.grad_norm);
            row("loss", stats.loss);
            row("clip_ratio/low", stats.clip_low);
            row("clip_ratio/high", stats.clip_high);
            row("clip_ratio/region", stats.clip_region);
            if beta > 0.0 {
                row("kl", stats.kl);
            }
            row("entropy", stats.entropy);
            state.step += 1;
            self.progress.set_position(state.step);
            self.progress.set_message(&format!(
                "reward {mean:.3}, generation {:.0} tok/s, training {:.0} tok/s",
                generation.last_rate(),
                training.last_rate()
            ));
            if state.step % checkpoint_every == 0 || state.step == steps {
                // Samples first: a checkpoint never points past the samples it has.
                write_parquet_atomic(&shard_path(state.step), &samples_batch(&pending)?)?;
                sync_path(&shard_path(state.step))?;
                pending.clear();
                if state.step < steps {
                    ckpt.save(&model, &opt, &state)?;
                }
            }
        }
        save_model(&model.valid(), &self.out)?;
        let mut shards: Vec<PathBuf> = std::fs::read_dir(&self.resume)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                f.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("samples-") && n.ends_with(".parquet"))
            })
            .collect();
        shards.sort();
        Ok(Outcome {
            metrics: state.metrics,
            sample_shards: shards,
            resumed_from,
            notes: start.notes,
            generation,
            training,
        })
    }
}

/// Mean and Bessel-corrected std of `values` (0 for fewer than two values, not NaN).
fn mean_std(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let std = (values.iter().map(|r| (r - mean).powi(2)).sum::<f64>()
        / (values.len().max(2) - 1) as f64)
        .sqrt();
    (mean, std)
}

/// One generation round's batch, fixed during its `num_iterations` optimizer steps.
struct Round {
    items: Vec<ScoreItem>,
    /// (completion length, truncated) per item.
    shapes: Vec<(usize, bool)>,
    advantages: Vec<f64>,
    /// The sampling policy's log-probs (with one iteration, the policy's own, detached).
    old_lp: Option<Vec<Vec<f32>>>,
    /// The reference's log-probs, when `beta` > 0.
    ref_lp: Option<Vec<Vec<f32>>>,
    temperature: f64,
}

/// How rounds are optimised: the same for every round of a stage.
struct Trainer {
    /// `whole_batch` is set per round.
    loss: LossConfig,
    mask_truncated: bool,
    entropy_coef: f64,
    micro_batch: usize,
    iterations: u64,
    schedule: LrSchedule,
    pad_id: u32,
}

/// What one round's optimisation did.
#[derive(Debug, Default, Clone, PartialEq)]
struct RoundStats {
    /// The whole batch's loss, mean over the iterations.
    loss: f64,
    /// Mean over the iterations (each optimizer step has its own).
    lr: f64,
    /// Global gradient norm before clipping, mean over the iterations.
    grad_norm: f64,
    /// Token means over the batch and the iterations.
    clip_low: f64,
    clip_high: f64,
    clip_region: f64,
    kl: f64,
    entropy: f64,
    /// Completion tokens that count in the loss.
    tokens: f64,
}

impl Trainer {
    /// `num_iterations` optimizer steps on `round`, each on the gradient of the whole batch,
    /// `micro_batch` sequences per backward pass, spread over `parallel`'s devices (`model` is
    /// on the first). `step` (0-based) is for messages.
    fn optimise<B: AutodiffBackend>(
        &self,
        model: CausalLm<B>,
        opt: &mut AdamW<B::InnerBackend>,
        round: &Round,
        step: u64,
        parallel: &mut DataParallel<B, CausalLm<B>>,
    ) -> anyhow::Result<(CausalLm<B>, RoundStats)> {
        let mut model = model;
        let n = round.items.len();
        let tokens: f64 = round
            .shapes
            .iter()
            .filter(|(_, t)| !(self.mask_truncated && *t))
            .map(|(l, _)| *l as f64)
            .sum();
        let cfg = LossConfig {
            whole_batch: Some(WholeBatch {
                sequences: n,
                tokens,
            }),
            ..self.loss.clone()
        };
        let chunks: Vec<std::ops::Range<usize>> = (0..n)
            .step_by(self.micro_batch)
            .map(|s| s..(s + self.micro_batch).min(n))
            .collect();
        let mut stats = RoundStats {
            tokens,
            ..RoundStats::default()
        };
        let mut weighted = WeightedStats::default();
        let mut workers = vec![(); parallel.devices().len()];
        for _ in 0..self.iterations {
            let lr = self.schedule.lr(opt.step);
            let mut loss_sum = 0.0;
            let (next, mut acc) = parallel.accumulate(
                model,
                workers.iter_mut().collect(),
                chunks.len(),
                |_, model, k| self.micro_loss(model, round, chunks[k].clone(), &cfg),
                |_, (value, part, entropy)| {
                    weighted.entropy += entropy;
                    if !value.is_finite() {
                        bail!(
                            "loss is {value} at step {}: training diverged; these params diverge again on a re-run, and a lower `lr` is a new key that starts this stage over",
                            step + 1
                        );
                    }
                    loss_sum += value as f64;
                    weighted.add(&part);
                    Ok(())
                },
            )?;
            let (next, st) = opt
                .step(next, &mut acc, lr)
                .with_context(|| format!("optimizer step at GRPO step {}", step + 1))?;
            parallel.sync(&next);
            model = next;
            stats.loss += loss_sum;
            stats.lr += lr;
            stats.grad_norm += st.grad_norm;
        }
        let iterations = self.iterations as f64;
        let per_token = |sum: f64| sum / weighted.tokens.max(1.0);
        Ok((
            model,
            RoundStats {
                loss: stats.loss / iterations,
                lr: stats.lr / iterations,
                grad_norm: stats.grad_norm / iterations,
                clip_low: per_token(weighted.clip_low),
                clip_high: per_token(weighted.clip_high),
                clip_region: per_token(weighted.clip_region),
                kl: per_token(weighted.kl),
                entropy: per_token(weighted.entropy),
                tokens,
            },
        ))
    }

    /// The loss of the sequences `r` of `round` (on `model`'s device), its value, its
    /// statistics and its entropy summed over the completion tokens.
    fn micro_loss<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        round: &Round,
        r: std::ops::Range<usize>,
        cfg: &LossConfig,
    ) -> anyhow::Result<(Tensor<B, 1>, (f32, LossStats, f64))> {
        let device = &model.device();
        // Entropy is always a metric; it joins the graph only as a bonus term.
        let entropy_mode = if self.entropy_coef > 0.0 {
            Entropy::Tracked
        } else {
            Entropy::Detached
        };
        let scores = score_with(
            model,
            &round.items[r.clone()],
            self.pad_id,
            entropy_mode,
            round.temperature,
        )?;
        let [rows, width] = scores.logprobs.dims();
        let mask = host_tensor::<B>(
            &completion_mask(&round.shapes[r.clone()], width, self.mask_truncated),
            [rows, width],
            device,
        );
        let old = match &round.old_lp {
            Some(o) => host_tensor::<B>(&pad_rows(&o[r.clone()], width), [rows, width], device),
            None => scores.logprobs.clone().detach(),
        };
        let reference = round
            .ref_lp
            .as_ref()
            .map(|o| host_tensor::<B>(&pad_rows(&o[r.clone()], width), [rows, width], device));
        let advantages: Vec<f32> = round.advantages[r].iter().map(|a| *a as f32).collect();
        let advantages = Tensor::<B, 1>::from_data(TensorData::new(advantages, [rows]), device);
        let (mut loss, part) = grpo_loss(
            scores.logprobs.clone(),
            old,
            reference,
            advantages,
            mask.clone(),
            cfg,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut entropy_sum = 0.0;
        if let Some(entropy) = scores.entropy {
            entropy_sum = scalar((entropy.clone() * mask.clone()).sum().detach()) as f64;
            if self.entropy_coef > 0.0 {
                loss = loss
                    - entropy_bonus(entropy, mask, self.entropy_coef, cfg)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        let value = scalar(loss.clone());
        Ok((loss, (value, part, entropy_sum)))
    }
}

/// Loss statistics of micro-batches, each weighted by its token count.
#[derive(Default)]
struct WeightedStats {
    tokens: f64,
    clip_low: f64,
    clip_high: f64,
    clip_region: f64,
    kl: f64,
    /// A plain sum over tokens already.
    entropy: f64,
}

impl WeightedStats {
    fn add(&mut self, s: &LossStats) {
        self.tokens += s.tokens;
        self.clip_low += s.clip_ratio_low * s.tokens;
        self.clip_high += s.clip_ratio_high * s.tokens;
        self.clip_region += s.clip_ratio_region * s.tokens;
        self.kl += s.kl.unwrap_or(0.0) * s.tokens;
    }
}

fn host_tensor<B: Backend>(values: &[f32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// Rows of different lengths as one `[rows, width]` block, zero-padded.
fn pad_rows(rows: &[Vec<f32>], width: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows.len() * width];
    for (i, r) in rows.iter().enumerate() {
        let n = r.len().min(width);
        out[i * width..i * width + n].copy_from_slice(&r[..n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use dagrun_model::optim::AdamWConfig;
    use dagrun_model::params::visit_params;
    use dagrun_model::preset;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::grpo_math::LossType;

    type Ad = Autodiff<Flex>;

    fn params_of<B: Backend>(model: &CausalLm<B>) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        visit_params(model, |name, _, t, _| {
            out.push((name.to_string(), t.into_data().to_vec::<f32>().unwrap()))
        });
        out
    }

    /// A round of 32 random completions of uneven lengths on a random nano model, scored at T = 0.8.
    fn round(model: &CausalLm<Ad>, vocab: u32) -> Round {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let items: Vec<ScoreItem> = (0..32)
            .map(|_| {
                let prompt = (0..rng.random_range(2..6))
                    .map(|_| rng.random_range(1..vocab))
                    .collect();
                let completion = (0..rng.random_range(1..=10))
                    .map(|_| rng.random_range(1..vocab))
                    .collect();
                ScoreItem { prompt, completion }
            })
            .collect();
        let shapes = items
            .iter()
            .map(|i| (i.completion.len(), i.completion.len() == 10))
            .collect();
        let advantages = (0..items.len())
            .map(|_| rng.random_range(-1.5..1.5))
            .collect();
        let temperature = 0.8;
        let old_lp = Some(
            score_host(&model.valid(), &items, 0, false, temperature)
                .unwrap()
                .logprobs,
        );
        // A reference a little off the policy, so the KL term has a gradient from the start.
        let other = CausalLm::<Flex>::init_random(
            &preset("nano", vocab as usize).unwrap(),
            9,
            &Default::default(),
        )
        .unwrap();
        let ref_lp = Some(
            score_host(&other, &items, 0, false, temperature)
                .unwrap()
                .logprobs,
        );
        Round {
            items,
            shapes,
            advantages,
            old_lp,
            ref_lp,
            temperature,
        }
    }

    fn trainer(loss_type: LossType, micro_batch: usize) -> Trainer {
        Trainer {
            loss: LossConfig {
                loss_type,
                epsilon_low: 0.2,
                epsilon_high: 0.28,
                beta: 0.04,
                max_completion_length: 12,
                whole_batch: None,
            },
            mask_truncated: true,
            entropy_coef: 0.01,
            micro_batch,
            iterations: 2,
            schedule: LrSchedule {
                warmup_steps: 3,
                ..LrSchedule::constant(1e-3)
            },
            pad_id: 0,
        }
    }

    #[test]
    fn micro_batch_is_a_memory_setting_only() {
        let vocab = 16;
        let device = Default::default();
        let model =
            CausalLm::<Ad>::init_random(&preset("nano", vocab as usize).unwrap(), 1, &device)
                .unwrap();
        let round = round(&model, vocab as u32);
        for loss_type in LossType::ALL {
            let run_on = |micro: usize, devices: usize| {
                let mut opt = AdamW::<Flex>::new(AdamWConfig {
                    max_grad_norm: Some(1e6),
                    ..AdamWConfig::default()
                });
                let mut parallel = DataParallel::new(&model, vec![device; devices]).unwrap();
                let (model, stats) = trainer(loss_type, micro)
                    .optimise(model.clone(), &mut opt, &round, 0, &mut parallel)
                    .unwrap();
                (params_of(&model), stats)
            };
            let run = |micro| run_on(micro, 1);
            // Two CPU replicas in their own threads: the same bits as one device (see
            // `dagrun_model::parallel`), micro-batches 0, 2, 4 on one and 1, 3, 5 on the other.
            let (one, one_stats) = run(6);
            let (two, two_stats) = run_on(6, 2);
            assert_eq!(two_stats, one_stats, "{loss_type:?}: two replicas");
            assert!(two == one, "{loss_type:?}: two replicas' weights");
            let (whole, whole_stats) = run(32);
            for micro in [5, 16] {
                let (split, stats) = run(micro);
                let close = |what: &str, a: f64, b: f64| {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
                        "{loss_type:?} micro {micro} {what}: {a} vs {b}"
                    )
                };
                close("grad_norm", stats.grad_norm, whole_stats.grad_norm);
                close("loss", stats.loss, whole_stats.loss);
                close("kl", stats.kl, whole_stats.kl);
                close("entropy", stats.entropy, whole_stats.entropy);
                close(
                    "clip_ratio/region",
                    stats.clip_region,
                    whole_stats.clip_region,
                );
                assert_eq!(stats.lr, whole_stats.lr);
                // Two Adam steps of lr 1e-3 each: agreement to 1% of one step. (Adam's update
                // barely depends on the gradient's scale; the norm above is what pins it.)
                for ((name, a), (_, b)) in split.iter().zip(&whole) {
                    let diff = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(diff < 1e-5, "{loss_type:?} micro {micro} {name}: {diff}");
                }
            }
            assert!(whole_stats.kl > 0.0 && whole_stats.grad_norm > 0.0);
            // One lr per optimizer step: warmup gives 1/3 and 2/3 of the peak to the two iterations.
            assert!(
                (whole_stats.lr - 0.5e-3).abs() < 1e-12,
                "{}",
                whole_stats.lr
            );
        }
    }

    #[test]
    fn the_policy_is_scored_at_the_rounds_temperature() {
        // Old and reference log-probs are the policy's own at T = 0.8: scored at that same
        // temperature, every ratio is 1 and the KL is 0 (at T = 1 neither would be).
        let vocab = 16;
        let device = Default::default();
        let model =
            CausalLm::<Ad>::init_random(&preset("nano", vocab).unwrap(), 1, &device).unwrap();
        let mut round = round(&model, vocab as u32);
        round.ref_lp = round.old_lp.clone();
        let trainer = Trainer {
            iterations: 1,
            ..trainer(LossType::Dapo, 8)
        };
        let mut parallel = DataParallel::new(&model, vec![device]).unwrap();
        let (_, stats) = trainer
            .optimise(
                model,
                &mut AdamW::<Flex>::new(AdamWConfig::default()),
                &round,
                0,
                &mut parallel,
            )
            .unwrap();
        assert!(stats.kl.abs() < 1e-6, "kl {}", stats.kl);
        assert_eq!(stats.clip_region, 0.0);
    }

    #[test]
    fn zero_temperatures_are_param_errors() {
        let spec = Grpo.spec();
        let params = |extra: serde_json::Value| {
            let mut map = serde_json::Map::new();
            for p in &spec.params {
                let value = match &p.default {
                    dagrun_engine::kind::Default::Value(v) => v.clone(),
                    _ => serde_json::Value::Null,
                };
                map.insert(p.name.to_string(), value);
            }
            for (k, v) in extra.as_object().unwrap() {
                map.insert(k.clone(), v.clone());
            }
            Params::from_map(map)
        };
        assert!(Grpo.check(&params(json!({}))).is_ok());
        let err = Grpo
            .check(&params(json!({"temperature": 0.0})))
            .unwrap_err();
        assert_eq!(err.param, "temperature");
        let err = Grpo
            .check(&params(json!({"temperature_end": 0.0})))
            .unwrap_err();
        assert_eq!(err.param, "temperature_end");
    }

    #[test]
    fn params_are_read_into_their_struct() {
        let params = dagrun_engine::params::resolve(&Grpo.spec(), &serde_json::Map::new()).unwrap();
        let p = GrpoParams::read(&params).unwrap();
        assert_eq!((p.group_size, p.temperature_end), (8, None));
        assert!(p.optimizer.max_grad_norm > 0.0 && p.code.code_memory_mb > 0);
        p.loss_type.parse::<crate::grpo_math::LossType>().unwrap();
        p.scale_rewards.parse::<ScaleRewards>().unwrap();
    }
}
