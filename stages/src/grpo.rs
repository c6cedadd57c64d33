//! Stage kind `grpo`: reinforcement learning with verifiable rewards, as TRL's GRPOTrainer.
//!
//! Each step samples `group_size` completions for each of `batch_prompts` problems with the
//! batched KV-cache sampler, scores them with the chosen rewards, turns rewards into
//! group-relative advantages, and takes `num_iterations` optimizer steps on the clipped
//! surrogate loss (see [`crate::grpo_math`]). The input model is also the frozen reference for
//! the KL term. Problems are visited in a seeded shuffle, so a resumed run continues exactly.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use dagrun_engine::dataset::{read_parquet, write_parquet_atomic};
use dagrun_engine::kind::{ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind};
use dagrun_engine::{Params, Progress};
use dagrun_model::device::{run_on, BackendTask, DeviceSpec};
use dagrun_model::generate::{generate, SamplingParams};
use dagrun_model::optim::{GradAccumulator, LrSchedule};
use dagrun_model::score::{score_host, score_with, Entropy, ScoreItem};
use dagrun_model::{load_model, save_model};
use rand::seq::SliceRandom;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::checkpoint::{epoch_rng, finish_training, scalar, Checkpoint};
use crate::grpo_math::{completion_mask, compute_advantages, entropy_bonus, grpo_loss, LossConfig, LossType, ScaleRewards};
use crate::rewards::{Judged, RewardSet};
use crate::tables::{read_problems, samples_batch, ProblemRow, SampleRow};

pub struct Grpo;

impl StageKind for Grpo {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "grpo",
            version: 1,
            doc: "GRPO with verifiable rewards (TRL's losses: grpo, bnpo, dr_grpo, dapo)",
            inputs: vec![
                PortSpec::one("model", ArtifactType::Model, "the policy to train, also the frozen KL reference"),
                PortSpec::one("problems", ArtifactType::Dataset(Some("problems")), "prompts with reference answers"),
            ],
            outputs: vec![
                PortSpec::one("model", ArtifactType::Model, "the trained policy"),
                PortSpec::one("metrics", ArtifactType::Dataset(Some("metrics")), "rewards, KL, clip ratios, entropy, lengths, speeds per step"),
                PortSpec::one("samples", ArtifactType::Dataset(Some("samples")), "every sampled completion with its rewards and advantage"),
            ],
            params: vec![
                ParamSpec::new("steps", ParamType::Int { min: 1, max: 10_000_000 }, json!(100), "generation rounds"),
                ParamSpec::new("batch_prompts", ParamType::Int { min: 1, max: 65_536 }, json!(16), "problems per step"),
                ParamSpec::new("group_size", ParamType::Int { min: 2, max: 1024 }, json!(8), "completions per problem"),
                ParamSpec::new("rewards", ParamType::Weights { keys: crate::sampling::REWARD_NAMES }, json!({"correctness": 1.0, "format": 0.1}), "weighted reward functions"),
                ParamSpec::new("lr", ParamType::Float { min: 0.0, max: 10.0 }, json!(5e-5), "learning rate (constant after warmup)"),
                ParamSpec::new("warmup_steps", ParamType::Int { min: 0, max: 10_000_000 }, json!(0), "optimizer steps of linear warmup"),
                ParamSpec::new("beta", ParamType::Float { min: 0.0, max: 100.0 }, json!(0.0), "weight of the k3 KL to the reference"),
                ParamSpec::new("epsilon", ParamType::Float { min: 0.0, max: 1.0 }, json!(0.2), "lower clip of the ratio"),
                ParamSpec::new("epsilon_high", ParamType::Float { min: 0.0, max: 10.0 }, json!(0.28), "upper clip of the ratio (DAPO clip-higher)"),
                ParamSpec::new("num_iterations", ParamType::Int { min: 1, max: 64 }, json!(1), "optimizer steps per generation round (μ)"),
                ParamSpec::new("loss_type", ParamType::Str { choices: &["grpo", "bnpo", "dr_grpo", "dapo"] }, json!("dapo"), "loss normalisation, as TRL"),
                ParamSpec::new("scale_rewards", ParamType::Str { choices: &["group", "batch", "none"] }, json!("group"), "divide advantages by the group's, the batch's or no std"),
                ParamSpec::new("mask_truncated_completions", ParamType::Bool, json!(false), "leave truncated completions out of the loss"),
                ParamSpec::new("temperature", ParamType::Float { min: 0.0, max: 10.0 }, json!(1.0), "sampling temperature at the first step"),
                ParamSpec::unset("temperature_end", ParamType::Float { min: 0.0, max: 10.0 }, "sampling temperature at the last step (linear schedule; default: constant)"),
                ParamSpec::new("top_p", ParamType::Float { min: 0.0, max: 1.0 }, json!(1.0), "nucleus sampling"),
                ParamSpec::new("max_new_tokens", ParamType::Int { min: 1, max: 1_000_000 }, json!(192), "completion length limit"),
                ParamSpec::new("entropy_coef", ParamType::Float { min: 0.0, max: 10.0 }, json!(0.0), "entropy bonus coefficient"),
                ParamSpec::new("micro_batch", ParamType::Int { min: 1, max: 65_536 }, json!(64), "sequences per backward pass"),
                ParamSpec::new("max_grad_norm", ParamType::Float { min: 0.0, max: 1e6 }, json!(1.0), "global gradient norm clip (0: off)"),
                ParamSpec::new("weight_decay", ParamType::Float { min: 0.0, max: 10.0 }, json!(0.0), "AdamW weight decay"),
                ParamSpec::new("checkpoint_every", ParamType::Int { min: 1, max: 10_000_000 }, json!(10), "steps between checkpoints"),
            ],
            device_dependent: true,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        let weights = params.weights("rewards");
        if weights.iter().all(|(_, w)| *w == 0.0) {
            return Err(ParamError { param: "rewards".into(), message: "param `rewards` needs a positive weight".into() });
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let device: DeviceSpec = ctx.device.parse()?;
        let model_dir = ctx.input("model")?.path.clone();
        let format = ChatFormat::load(&model_dir)?;
        let problems = read_problems(&read_parquet(&ctx.input("problems")?.path)?.1)?;
        if problems.is_empty() {
            bail!("input `problems` is empty");
        }
        let prompts = crate::sampling::prompts_of(&format, &problems)?;
        let params = ctx.params.clone();
        let rewards = crate::sampling::reward_set(&params.weights("rewards"), params.i64("max_new_tokens") as usize)?;
        let progress = ctx.progress(params.i64("steps") as u64, "steps");
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
        let outcome = run_on(&device, task)?;
        finish_training(ctx, outcome.resumed_from, &outcome.metrics)?;
        let mut samples = Vec::new();
        for shard in outcome.sample_shards {
            samples.extend(read_parquet(&shard)?.1);
        }
        ctx.write_dataset("samples", &samples)?;
        Ok(())
    }
}

struct GrpoTask {
    params: Params,
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
}

impl GrpoTask {
    /// Problem indices of step `step`: consecutive slices of per-epoch seeded shuffles.
    fn batch(&self, step: u64) -> Vec<usize> {
        let b = self.params.i64("batch_prompts") as usize;
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

    fn temperature(&self, step: u64, steps: u64) -> f32 {
        let start = self.params.f64("temperature");
        let end = self.params.opt_f64("temperature_end").unwrap_or(start);
        let t = if steps > 1 { step as f64 / (steps - 1) as f64 } else { 0.0 };
        (start + (end - start) * t) as f32
    }
}

impl BackendTask for GrpoTask {
    type Output = Outcome;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<Outcome> {
        let p = &self.params;
        let steps = p.i64("steps") as u64;
        let group = p.i64("group_size") as usize;
        let beta = p.f64("beta");
        let ckpt = Checkpoint::new(&self.resume);
        let (mut model, mut opt, mut state) = ckpt.restore_or_start::<B>(&self.model_dir, p, &device)?;
        let reference = if beta > 0.0 { Some(load_model::<B::InnerBackend>(&self.model_dir, &device)?) } else { None };
        let resumed_from = state.step;
        let schedule = LrSchedule { warmup_steps: p.i64("warmup_steps") as u64, ..LrSchedule::constant(p.f64("lr")) };
        let (top_p, mask_truncated, entropy_coef) = (p.f64("top_p") as f32, p.bool("mask_truncated_completions"), p.f64("entropy_coef"));
        let checkpoint_every = p.i64("checkpoint_every") as u64;
        let loss_type: LossType = p.str("loss_type").parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let scale: ScaleRewards = p.str("scale_rewards").parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let max_new = p.i64("max_new_tokens") as usize;
        let micro = p.i64("micro_batch") as usize;
        let iterations = p.i64("num_iterations") as u64;
        let shard_path = |step: u64| self.resume.join(format!("samples-{step:07}.parquet"));
        let mut pending: Vec<SampleRow> = Vec::new();
        self.progress.set_position(state.step);

        while state.step < steps {
            let step = state.step;
            let chosen = self.batch(step);
            let temperature = self.temperature(step, steps);
            // 1. Sample a group of completions per problem.
            let t0 = Instant::now();
            let policy = model.valid();
            let prompts: Vec<Vec<u32>> = chosen.iter().flat_map(|&i| std::iter::repeat_n(self.prompts[i].clone(), group)).collect();
            let sampling = SamplingParams { temperature, top_k: 0, top_p, max_new_tokens: max_new, stop_strings: Vec::new(), seed: self.seed.wrapping_add(step.wrapping_mul(0x2545_F491_4F6C_DD1D)) };
            let completions = generate(&policy, Some(&self.format.tokenizer), &prompts, &self.format.stop_ids, &sampling)?;
            let gen_tokens: usize = completions.iter().map(|c| c.token_ids.len()).sum();
            let gen_secs = t0.elapsed().as_secs_f64();

            // 2. Rewards and advantages.
            let scored: Vec<_> = completions
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    let prob = &self.problems[chosen[k / group]];
                    self.rewards.score(&Judged { task: &prob.task, answer: &prob.answer, completion: &c.text, completion_tokens: c.token_ids.len(), truncated: c.truncated })
                })
                .collect();
            let totals: Vec<Option<f64>> = scored.iter().map(|s| s.total).collect();
            let adv = compute_advantages(&totals, group, scale).map_err(|e| anyhow::anyhow!("{e}"))?;
            let items: Vec<ScoreItem> = prompts.iter().zip(&completions).map(|(pr, c)| ScoreItem { prompt: pr.clone(), completion: if c.token_ids.is_empty() { vec![self.format.end_id] } else { c.token_ids.clone() } }).collect();
            let shapes: Vec<(usize, bool)> = items.iter().zip(&completions).map(|(it, c)| (it.completion.len(), c.truncated)).collect();
            let total_tokens: f64 = shapes.iter().filter(|(_, t)| !(mask_truncated && *t)).map(|(l, _)| *l as f64).sum();

            // 3. Log-probs that do not change during the iterations.
            let ref_lp = match &reference {
                Some(r) => Some(score_host(r, &items, self.format.pad_id, false)?.logprobs),
                None => None,
            };
            let old_lp = if iterations > 1 { Some(score_host(&policy, &items, self.format.pad_id, false)?.logprobs) } else { None };

            // 4. Optimise.
            let t1 = Instant::now();
            let chunks: Vec<std::ops::Range<usize>> = (0..items.len()).step_by(micro).map(|s| s..(s + micro).min(items.len())).collect();
            let cfg = LossConfig {
                loss_type,
                epsilon_low: p.f64("epsilon"),
                epsilon_high: p.f64("epsilon_high"),
                beta,
                max_completion_length: max_new,
                num_items_in_batch: Some(total_tokens),
                gradient_accumulation_steps: chunks.len(),
            };
            let mut sums = Sums::default();
            let lr = schedule.lr(opt.step);
            for _ in 0..iterations {
                let mut acc = GradAccumulator::<B>::new();
                for r in &chunks {
                    let part = &items[r.clone()];
                    // Entropy is always a metric; it joins the graph only as a bonus term.
                    let entropy = if entropy_coef > 0.0 { Entropy::Tracked } else { Entropy::Detached };
                    let scores = score_with(&model, part, self.format.pad_id, entropy)?;
                    let [rows, width] = scores.logprobs.dims();
                    let mask = host_tensor::<B>(&completion_mask(&shapes[r.clone()], width, mask_truncated), [rows, width], &device);
                    let old = match &old_lp {
                        Some(o) => host_tensor::<B>(&pad_rows(&o[r.clone()], width), [rows, width], &device),
                        None => scores.logprobs.clone().detach(),
                    };
                    let reference = ref_lp.as_ref().map(|o| host_tensor::<B>(&pad_rows(&o[r.clone()], width), [rows, width], &device));
                    let advantages: Vec<f32> = adv.advantages[r.clone()].iter().map(|a| *a as f32).collect();
                    let advantages = Tensor::<B, 1>::from_data(TensorData::new(advantages, [rows]), &device);
                    let (mut loss, stats) = grpo_loss(scores.logprobs.clone(), old, reference, advantages, mask.clone(), &cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
                    if let Some(entropy) = scores.entropy {
                        sums.entropy += scalar((entropy.clone() * mask.clone()).sum().detach()) as f64;
                        if entropy_coef > 0.0 {
                            loss = loss - entropy_bonus(entropy, mask, entropy_coef, &cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
                        }
                    }
                    let value = scalar(loss.clone());
                    if !value.is_finite() {
                        bail!("loss is {value} at step {}; the last good checkpoint (step {}) is kept", step + 1, ckpt.saved_step());
                    }
                    sums.add(&stats, value as f64);
                    acc.backward(loss, &model);
                }
                let (next, st) = opt.step(model, &mut acc, lr).with_context(|| format!("optimizer step at GRPO step {}", step + 1))?;
                model = next;
                sums.grad_norm = st.grad_norm;
            }
            let train_secs = t1.elapsed().as_secs_f64();

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
                    components: scored[k].components.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
                    advantage: adv.advantages[k],
                    length: c.token_ids.len() as i32,
                    truncated: c.truncated,
                });
            }
            let s = step as i64 + 1;
            let judged: Vec<f64> = totals.iter().flatten().copied().collect();
            let mean = judged.iter().sum::<f64>() / judged.len().max(1) as f64;
            let std = (judged.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (judged.len().max(2) - 1) as f64).sqrt();
            let mut row = |name: &str, v: f64| state.metrics.push((s, name.to_string(), v));
            row("reward", mean);
            row("reward_std", std);
            for (name, _) in &scored[0].components {
                let vals: Vec<f64> = scored.iter().filter_map(|x| x.components.iter().find(|c| c.0 == *name).and_then(|c| c.1)).collect();
                row(&format!("rewards/{name}"), vals.iter().sum::<f64>() / vals.len().max(1) as f64);
            }
            let n = completions.len() as f64;
            row("frac_reward_zero_std", adv.frac_reward_zero_std);
            row("completion_length", gen_tokens as f64 / n);
            row("truncated_frac", completions.iter().filter(|c| c.truncated).count() as f64 / n);
            row("temperature", temperature as f64);
            row("lr", lr);
            row("grad_norm", sums.grad_norm);
            let per = (sums.calls.max(1)) as f64;
            row("loss", sums.loss / per);
            row("clip_ratio/low", sums.clip_low / per);
            row("clip_ratio/high", sums.clip_high / per);
            row("clip_ratio/region", sums.clip_region / per);
            if beta > 0.0 {
                row("kl", sums.kl / per);
            }
            row("entropy", sums.entropy / (total_tokens.max(1.0) * iterations as f64));
            row("gen_tokens_per_s", gen_tokens as f64 / gen_secs.max(1e-9));
            row("train_tokens_per_s", total_tokens * iterations as f64 / train_secs.max(1e-9));
            state.step += 1;
            self.progress.set_position(state.step);
            self.progress.set_message(&format!("reward {mean:.3}"));
            if state.step % checkpoint_every == 0 || state.step == steps {
                // Samples first: a checkpoint never points past the samples it has.
                write_parquet_atomic(&shard_path(state.step), &samples_batch(&pending)?)?;
                pending.clear();
                if state.step < steps {
                    ckpt.save(&model, &opt, &state)?;
                }
            }
        }
        save_model(&model.valid(), &self.out)?;
        let mut shards: Vec<PathBuf> = std::fs::read_dir(&self.resume)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("samples-") && n.ends_with(".parquet")))
            .collect();
        shards.sort();
        Ok(Outcome { metrics: state.metrics, sample_shards: shards, resumed_from })
    }
}

/// Loss statistics summed over the micro-batches of a step.
#[derive(Default)]
struct Sums {
    calls: usize,
    loss: f64,
    clip_low: f64,
    clip_high: f64,
    clip_region: f64,
    kl: f64,
    entropy: f64,
    grad_norm: f64,
}

impl Sums {
    fn add(&mut self, s: &crate::grpo_math::LossStats, loss: f64) {
        self.calls += 1;
        self.loss += loss;
        self.clip_low += s.clip_ratio_low;
        self.clip_high += s.clip_ratio_high;
        self.clip_region += s.clip_ratio_region;
        self.kl += s.kl.unwrap_or(0.0);
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
