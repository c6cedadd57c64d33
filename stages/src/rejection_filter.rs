//! Stage kind `rejection_filter`: sample completions, score them with the reward functions,
//! keep the good and mutually different ones as chats for a further SFT round.
//!
//! Completions come from a `model` (`num_samples` per problem of `problems`, at `temperature`
//! / `top_p`) or from an existing `samples` dataset (re-scored here with this stage's
//! `rewards`). Per problem, the candidates with a reward of at least `min_reward` are picked
//! by [`select_diverse`] (best reward first, then MMR: `diversity_lambda`·reward −
//! (1 − `diversity_lambda`)·similarity, dropping candidates more than `max_similarity` similar
//! to a pick by character 5-gram Jaccard): one for `keep: best`, up to `top_k` for `top_k`,
//! every one that is not a near-duplicate for `all_passing`; never more than
//! `max_per_problem`. Sampling is checkpointed per chunk of [`CHUNK`] problems.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::bail;
use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::kind::{ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind};
use dagrun_engine::{Params, Progress};
use dagrun_model::device::{run_on, BackendTask, DeviceSpec};
use dagrun_model::generate::SamplingParams;
use dagrun_model::load_model;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::dedupe::{select_diverse, Diversity};
use crate::rewards::{Judged, RewardSet};
use crate::sampling::{chunk, mix_seed, prompts_of, reward_set, sample_groups, think_steps, Shards, CHUNK, REWARD_NAMES};
use crate::tables::{chat_batch, read_problems, read_samples, samples_batch, ChatRow, Message, ProblemRow, SampleRow};

/// Problems per checkpoint shard (and per sampling seed).

pub struct RejectionFilter;

impl StageKind for RejectionFilter {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "rejection_filter",
            version: 1,
            doc: "sample N completions per problem (or take existing samples), keep the best-rewarded distinct ones as SFT chats",
            inputs: vec![
                PortSpec::optional("model", ArtifactType::Model, "the model to sample from (with `problems`)"),
                PortSpec::optional("problems", ArtifactType::Dataset(Some("problems")), "the problems to sample for (with `model`)"),
                PortSpec::optional("samples", ArtifactType::Dataset(Some("samples")), "existing samples to filter instead of sampling (e.g. grpo's)"),
            ],
            outputs: vec![
                PortSpec::one("data", ArtifactType::Dataset(Some("chat")), "the kept completions as user/assistant chats"),
                PortSpec::one("samples", ArtifactType::Dataset(Some("samples")), "every completion with its rewards"),
            ],
            params: vec![
                ParamSpec::new("num_samples", ParamType::Int { min: 1, max: 4096 }, json!(8), "completions sampled per problem"),
                ParamSpec::new("temperature", ParamType::Float { min: 0.0, max: 100.0 }, json!(1.0), "sampling temperature"),
                ParamSpec::new("top_p", ParamType::Float { min: 1e-6, max: 1.0 }, json!(1.0), "nucleus sampling"),
                ParamSpec::new("max_new_tokens", ParamType::Int { min: 1, max: 1_000_000 }, json!(256), "completion length limit"),
                ParamSpec::new("rewards", ParamType::Weights { keys: REWARD_NAMES }, json!({"correctness": 1.0, "format": 0.2}), "reward functions and their weights"),
                ParamSpec::new("min_reward", ParamType::Float { min: -1e12, max: 1e12 }, json!(1.0), "keep only completions whose weighted reward is at least this"),
                ParamSpec::new("keep", ParamType::Str { choices: &["best", "all_passing", "top_k"] }, json!("all_passing"), "per problem: the best, every passing one, or the top_k"),
                ParamSpec::new("top_k", ParamType::Int { min: 1, max: 4096 }, json!(2), "completions kept per problem with `keep: top_k`"),
                ParamSpec::new("max_per_problem", ParamType::Int { min: 1, max: 4096 }, json!(4), "cap on kept completions per problem"),
                ParamSpec::new("diversity_lambda", ParamType::Float { min: 0.0, max: 1.0 }, json!(0.7), "MMR weight of reward against novelty"),
                ParamSpec::new("max_similarity", ParamType::Float { min: 0.0, max: 1.0 }, json!(0.9), "drop completions more similar than this (5-gram Jaccard) to a kept one"),
                ParamSpec::unset("limit", ParamType::Int { min: 1, max: 100_000_000 }, "use the first N problems only (unset: all)"),
                ParamSpec::new("batch_size", ParamType::Int { min: 1, max: 65_536 }, json!(64), "sequences per generation call"),
            ],
            device_dependent: true,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        reward_set(&params.weights("rewards"), params.i64("max_new_tokens") as usize).map(|_| ()).map_err(|e| ParamError { param: "rewards".into(), message: e.to_string() })
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let p = ctx.params.clone();
        let max_new_tokens = p.i64("max_new_tokens") as usize;
        let rewards = reward_set(&p.weights("rewards"), max_new_tokens)?;
        let limit = p.opt_i64("limit").map(|l| l as usize).unwrap_or(usize::MAX);
        let (model, problems, given) = (ctx.input_opt("model").cloned(), ctx.input_opt("problems").cloned(), ctx.input_opt("samples").cloned());
        let samples = match (model, problems, given) {
            (Some(model), Some(problems), None) => {
                let mut problems = read_problems(&read_parquet(&problems.path)?.1)?;
                problems.truncate(limit);
                if problems.is_empty() {
                    bail!("input `problems` has no rows to sample for");
                }
                sample_from_model(ctx, &model.path, &problems, &rewards)?
            }
            (None, None, Some(given)) => {
                let mut rows = read_samples(&read_parquet(&given.path)?.1)?;
                let mut ids: HashMap<String, usize> = HashMap::new();
                rows.retain(|r| {
                    let next = ids.len();
                    *ids.entry(r.id.clone()).or_insert(next) < limit
                });
                for r in &mut rows {
                    let scored = rewards.score(&Judged { task: &r.task, answer: &r.answer, completion: &r.completion, completion_tokens: r.length.max(0) as usize, truncated: r.truncated });
                    r.reward = scored.total.unwrap_or(f64::NAN);
                    r.components = scored.components.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
                    r.advantage = 0.0;
                }
                rows
            }
            (Some(_), _, Some(_)) => bail!("stage `{}`: wire either `model` (with `problems`) or `samples`, not both", ctx.node),
            (Some(_), None, None) => bail!("stage `{}`: input `model` needs `problems` to sample for", ctx.node),
            (None, Some(_), _) => bail!("stage `{}`: input `problems` is only used with `model`; wire `model` to sample, or only `samples` to filter existing samples", ctx.node),
            (None, None, None) => bail!("stage `{}` needs `model` and `problems` to sample from, or an existing `samples` dataset", ctx.node),
        };
        let cap = p.i64("max_per_problem") as usize;
        let k = match p.str("keep") {
            "best" => 1,
            "top_k" => (p.i64("top_k") as usize).min(cap),
            _ => cap,
        };
        let diversity = Diversity { k, lambda: p.f64("diversity_lambda"), max_similarity: p.f64("max_similarity"), ..Diversity::default() };
        let (data, report) = select(&samples, p.f64("min_reward"), &diversity);
        ctx.write_dataset("data", &[chat_batch(&data)?])?;
        ctx.write_dataset("samples", &[samples_batch(&samples)?])?;
        ctx.set_report(report);
        Ok(())
    }
}

/// Samples `num_samples` completions per problem, chunk by chunk, resuming from the chunks a
/// killed run checkpointed.
fn sample_from_model(ctx: &mut StageContext, model_dir: &std::path::Path, problems: &[ProblemRow], rewards: &RewardSet) -> anyhow::Result<Vec<SampleRow>> {
    let device: DeviceSpec = ctx.device.parse()?;
    let p = &ctx.params;
    let shards = Shards::new(&ctx.resume_dir().join("samples"))?;
    let n_chunks = problems.len().div_ceil(CHUNK);
    let (missing, done) = shards.missing_chunks(problems.len());
    let progress = ctx.progress(problems.len() as u64, "problems");
    progress.inc(done as u64);
    let params = SamplingParams {
        temperature: p.f64("temperature") as f32,
        top_k: 0,
        top_p: p.f64("top_p") as f32,
        max_new_tokens: p.i64("max_new_tokens") as usize,
        stop_strings: vec![],
        seed: ctx.seed,
    };
    let (n, batch_size) = (p.i64("num_samples") as usize, p.i64("batch_size") as usize);
    if missing.len() < n_chunks {
        ctx.mark_resumed();
        ctx.info(format!("resuming: {} of {n_chunks} chunks were sampled before", n_chunks - missing.len()));
    }
    if !missing.is_empty() {
        let task = SampleTask {
            model_dir: model_dir.to_path_buf(),
            problems,
            chunks: missing,
            shards: &shards,
            rewards,
            params,
            n,
            batch_size,
            progress: &progress,
        };
        run_on(&device, task)?;
    }
    shards.read_all(problems.len(), read_samples)
}

struct SampleTask<'a> {
    model_dir: PathBuf,
    problems: &'a [ProblemRow],
    chunks: Vec<usize>,
    shards: &'a Shards,
    rewards: &'a RewardSet,
    params: SamplingParams,
    n: usize,
    batch_size: usize,
    progress: &'a Progress,
}

impl BackendTask for SampleTask<'_> {
    type Output = ();

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let model = load_model::<B::InnerBackend>(&self.model_dir, &device)?;
        let format = ChatFormat::load(&self.model_dir)?;
        for c in self.chunks {
            let chunk = chunk(self.problems, c);
            let prompts = prompts_of(&format, chunk)?;
            let params = SamplingParams { seed: mix_seed(self.params.seed, &[c as u64]), ..self.params.clone() };
            let groups = sample_groups(&model, &format, &prompts, self.n, &params, self.batch_size)?;
            let mut rows = Vec::with_capacity(chunk.len() * self.n);
            for (problem, group) in chunk.iter().zip(groups) {
                for completion in group {
                    let length = completion.token_ids.len();
                    let judged = Judged { task: &problem.task, answer: &problem.answer, completion: &completion.text, completion_tokens: length, truncated: completion.truncated };
                    let scored = self.rewards.score(&judged);
                    rows.push(SampleRow {
                        step: 0,
                        id: problem.id.clone(),
                        task: problem.task.clone(),
                        prompt: problem.prompt.clone(),
                        answer: problem.answer.clone(),
                        completion: completion.text,
                        reward: scored.total.unwrap_or(f64::NAN),
                        components: scored.components.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
                        advantage: 0.0,
                        length: length as i32,
                        truncated: completion.truncated,
                    });
                }
            }
            self.shards.save(c, &samples_batch(&rows)?)?;
            self.progress.inc(chunk.len() as u64);
        }
        Ok(())
    }
}

/// The kept completions of every problem (problems in order of first appearance), and a
/// Markdown report of how many passed and were kept.
fn select(samples: &[SampleRow], min_reward: f64, diversity: &Diversity) -> (Vec<ChatRow>, String) {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<&SampleRow>> = HashMap::new();
    for s in samples {
        groups
            .entry(s.id.as_str())
            .or_insert_with(|| {
                order.push(s.id.as_str());
                Vec::new()
            })
            .push(s);
    }
    // Rewards are sums of floats (1.0 + 0.2·1.0): allow rounding at the threshold.
    let passes = |r: f64| r.is_finite() && r >= min_reward - 1e-9;
    let (mut data, mut passing, mut solved) = (Vec::new(), 0usize, 0usize);
    for id in &order {
        let group = &groups[id];
        let candidates: Vec<&SampleRow> = group.iter().copied().filter(|s| passes(s.reward)).collect();
        passing += candidates.len();
        solved += usize::from(!candidates.is_empty());
        let scored: Vec<(&str, f64)> = candidates.iter().map(|s| (s.completion.as_str(), s.reward)).collect();
        for (j, pick) in select_diverse(&scored, diversity).into_iter().enumerate() {
            let s = candidates[pick];
            data.push(ChatRow {
                id: format!("{}-{j}", s.id),
                task: s.task.clone(),
                answer: s.answer.clone(),
                messages: vec![Message { role: "user".into(), content: s.prompt.clone() }, Message { role: "assistant".into(), content: s.completion.clone() }],
                steps: think_steps(&s.completion),
            });
        }
    }
    let rewards: Vec<f64> = samples.iter().map(|s| s.reward).filter(|r| r.is_finite()).collect();
    let mean_reward = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
    let mut report = String::new();
    let _ = writeln!(report, "| problems | samples | mean reward | passing (reward ≥ {min_reward}) | problems with a pass | kept |");
    let _ = writeln!(report, "|---:|---:|---:|---:|---:|---:|");
    let share = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    let _ = writeln!(
        report,
        "| {} | {} | {mean_reward:.3} | {passing} ({:.1}%) | {solved} ({:.1}%) | {} |",
        order.len(),
        samples.len(),
        share(passing, samples.len()),
        share(solved, order.len()),
        data.len()
    );
    (data, report)
}
