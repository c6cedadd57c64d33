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
//! `max_per_problem`. Whatever the rewards, a truncated completion is never kept, nor (with
//! `require_correct`, the default) one whose answer does not verify. With a `prm` input (a
//! process reward model) and `min_step_score`, the PRM scores the completions that pass those
//! filters, and one whose weakest step scores below it is dropped too ([`crate::prm_score`]). Sampling is checkpointed per chunk of [`CHUNK`]
//! problems.
//!
//! Which inputs go together is checked when the graph is built ([`wiring`]), before anything
//! runs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use anyhow::bail;
use dagrun_engine::Params;
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
    WiringError,
};
use dagrun_model::device::{Devices, run_on};
use dagrun_model::generate::{Completion, SamplingParams};
use serde::Deserialize;
use serde_json::json;

use crate::dedupe::{Diversity, select_diverse};
use crate::prm_score::{prm_wiring, score_on};
use crate::rewards::{Judged, RewardSet};
use crate::sampling::{
    CHUNK, CodeRewardParams, REWARD_NAMES, SampleChunks, Shards, chunk, reward_set, think_steps,
};
use crate::tables::{
    ChatRow, Message, ProblemRow, SampleRow, chat_batch, metrics_batch, read_problems,
    read_samples, samples_batch,
};
use crate::tasks;

pub struct RejectionFilter;

/// The stage's params, read once.
#[derive(Debug, Clone, Deserialize)]
struct RejectionParams {
    num_samples: usize,
    temperature: f32,
    top_p: f32,
    max_new_tokens: usize,
    rewards: BTreeMap<String, f64>,
    min_reward: f64,
    require_correct: bool,
    answer_fallback: bool,
    keep: Keep,
    top_k: usize,
    max_per_problem: usize,
    diversity_lambda: f64,
    max_similarity: f64,
    limit: Option<usize>,
    batch_size: usize,
    min_step_score: Option<f64>,
    #[serde(flatten)]
    code: CodeRewardParams,
}

/// Which passing completions of a problem are kept.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Keep {
    Best,
    AllPassing,
    TopK,
}

impl RejectionParams {
    fn read(params: &Params) -> anyhow::Result<RejectionParams> {
        params.read_into("`rejection_filter`")
    }

    /// How many passing completions a problem keeps at most.
    fn kept_per_problem(&self) -> usize {
        match self.keep {
            Keep::Best => 1,
            Keep::TopK => self.top_k.min(self.max_per_problem),
            Keep::AllPassing => self.max_per_problem,
        }
    }
}

impl StageKind for RejectionFilter {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "rejection_filter",
            version: 4,
            doc: "sample N completions per problem (or take existing samples), keep the best-rewarded distinct ones as SFT chats",
            inputs: vec![
                PortSpec::optional(
                    "model",
                    ArtifactType::Model,
                    "the model to sample from (with `problems`)",
                ),
                PortSpec::optional(
                    "problems",
                    ArtifactType::Dataset(Some("problems")),
                    "the problems to sample for (with `model`)",
                ),
                PortSpec::optional(
                    "samples",
                    ArtifactType::Dataset(Some("samples")),
                    "existing samples to filter instead of sampling (e.g. grpo's)",
                ),
                PortSpec::optional(
                    "prm",
                    ArtifactType::Model,
                    "a process reward model (a `prm` stage's), for `min_step_score`",
                ),
            ],
            outputs: vec![
                PortSpec::one(
                    "data",
                    ArtifactType::Dataset(Some("chat")),
                    "the kept completions as user/assistant chats",
                ),
                PortSpec::one(
                    "samples",
                    ArtifactType::Dataset(Some("samples")),
                    "every completion with its rewards",
                ),
                PortSpec::one(
                    "metrics",
                    ArtifactType::Dataset(Some("metrics")),
                    "counts and shares (correct, truncated, passing, solved, kept), reward means and stds, as one step",
                ),
            ],
            params: vec![
                ParamSpec::new(
                    "num_samples",
                    ParamType::Int { min: 1, max: 4096 },
                    json!(8),
                    "completions sampled per problem",
                ),
                ParamSpec::new(
                    "temperature",
                    ParamType::Float {
                        min: 0.0,
                        max: 100.0,
                    },
                    json!(1.0),
                    "sampling temperature",
                ),
                ParamSpec::new(
                    "top_p",
                    ParamType::Float {
                        min: 1e-6,
                        max: 1.0,
                    },
                    json!(1.0),
                    "nucleus sampling",
                ),
                ParamSpec::new(
                    "max_new_tokens",
                    ParamType::Int {
                        min: 1,
                        max: 1_000_000,
                    },
                    json!(256),
                    "completion length limit",
                ),
                ParamSpec::new(
                    "rewards",
                    ParamType::Weights { keys: REWARD_NAMES },
                    json!({"correctness": 1.0, "format": 0.2}),
                    "reward functions and their weights",
                ),
                ParamSpec::new(
                    "min_reward",
                    ParamType::Float {
                        min: -1e12,
                        max: 1e12,
                    },
                    json!(1.0),
                    "keep only completions whose weighted reward is at least this",
                ),
                ParamSpec::new(
                    "require_correct",
                    ParamType::Bool,
                    json!(true),
                    "keep only completions whose answer verifies, whatever the rewards (truncated ones are never kept)",
                ),
                ParamSpec::new(
                    "answer_fallback",
                    ParamType::Bool,
                    json!(false),
                    "read the last \\boxed{} (else the last number) of a completion without an <answer> block as its answer",
                ),
                ParamSpec::new(
                    "keep",
                    ParamType::Str {
                        choices: &["best", "all_passing", "top_k"],
                    },
                    json!("all_passing"),
                    "per problem: the best, every passing one, or the top_k",
                ),
                ParamSpec::new(
                    "top_k",
                    ParamType::Int { min: 1, max: 4096 },
                    json!(2),
                    "completions kept per problem with `keep: top_k`",
                ),
                ParamSpec::new(
                    "max_per_problem",
                    ParamType::Int { min: 1, max: 4096 },
                    json!(4),
                    "cap on kept completions per problem",
                ),
                ParamSpec::new(
                    "diversity_lambda",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(0.7),
                    "MMR weight of reward against novelty",
                ),
                ParamSpec::new(
                    "max_similarity",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    json!(0.9),
                    "drop completions more similar than this (5-gram Jaccard) to a kept one",
                ),
                ParamSpec::unset(
                    "limit",
                    ParamType::Int {
                        min: 1,
                        max: 100_000_000,
                    },
                    "use the first N problems only (unset: all)",
                ),
                ParamSpec::new(
                    "batch_size",
                    ParamType::Int {
                        min: 1,
                        max: 65_536,
                    },
                    json!(64),
                    "sequences per generation call",
                ),
                ParamSpec::unset(
                    "min_step_score",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    "drop completions whose weakest step the `prm` input scores below this (unset: no PRM)",
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
        let error = |e: anyhow::Error| ParamError {
            param: "rewards".into(),
            message: e.to_string(),
        };
        let weights: BTreeMap<String, f64> = params.get_as("rewards").map_err(error)?;
        reward_set(&weights, params.i64("max_new_tokens") as usize)
            .map(|_| ())
            .map_err(error)
    }

    fn check_wiring(&self, wired: &[&str], params: &Params) -> Result<(), WiringError> {
        let has = |port: &str| wired.contains(&port);
        wiring(has("model"), has("problems"), has("samples"))?;
        prm_wiring(
            "min_step_score",
            params.opt_f64("min_step_score").is_some(),
            has("prm"),
        )
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let p = RejectionParams::read(&ctx.params)?;
        let fallback = p.answer_fallback;
        let limits = p.code.limits();
        let rewards = reward_set(&p.rewards, p.max_new_tokens)?
            .with_answer_fallback(fallback)
            .with_code(p.code.code_bonus, limits.clone());
        let limit = p.limit.unwrap_or(usize::MAX);
        let (model, problems, given) = (
            ctx.input_opt("model").cloned(),
            ctx.input_opt("problems").cloned(),
            ctx.input_opt("samples").cloned(),
        );
        let samples = match (model, problems, given) {
            (Some(model), Some(problems), None) => {
                let mut problems = read_problems(&read_parquet(&problems.path)?.1)?;
                problems.truncate(limit);
                if problems.is_empty() {
                    bail!("input `problems` has no rows to sample for");
                }
                sample_from_model(ctx, &p, &model.path, &problems, &rewards)?
            }
            (None, None, Some(given)) => {
                let mut rows = read_samples(&read_parquet(&given.path)?.1)?;
                let mut ids: HashMap<String, usize> = HashMap::new();
                rows.retain(|r| {
                    let next = ids.len();
                    *ids.entry(r.id.clone()).or_insert(next) < limit
                });
                // Samples carry no reference steps: `steps` cannot judge them and
                // `repetition` is TRL's.
                let judged: Vec<Judged> = rows
                    .iter()
                    .map(|r| Judged {
                        task: &r.task,
                        answer: &r.answer,
                        steps: &[],
                        completion: &r.completion,
                        completion_tokens: r.length.max(0) as usize,
                        truncated: r.truncated,
                    })
                    .collect();
                let scores = rewards.score_all(&judged);
                drop(judged); // it borrows `rows`, which the loop below changes
                for (r, scored) in rows.iter_mut().zip(scores) {
                    r.reward = scored.total.unwrap_or(f64::NAN);
                    r.components = scored
                        .components
                        .into_iter()
                        .map(|(n, v)| (n.to_string(), v))
                        .collect();
                    r.advantage = 0.0;
                }
                rows
            }
            // The graph rejects these before anything runs; this covers callers that skip it.
            (model, problems, given) => {
                let message = wiring(model.is_some(), problems.is_some(), given.is_some())
                    .err()
                    .map(|e| e.message)
                    .unwrap_or_default();
                bail!("stage `{}`: {message}", ctx.node)
            }
        };
        let diversity = Diversity {
            k: p.kept_per_problem(),
            lambda: p.diversity_lambda,
            max_similarity: p.max_similarity,
            ..Diversity::default()
        };
        // Code samples are judged by running them: all at once, on every core.
        crate::code_exec::prejudge(
            samples
                .iter()
                .map(|s| (s.task.as_str(), s.answer.as_str(), s.completion.as_str())),
            &limits,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let mut filter = Filter {
            code_limits: limits.clone(),
            min_reward: p.min_reward,
            require_correct: p.require_correct,
            fallback,
            steps: None,
        };
        match (p.min_step_score, ctx.input_opt("prm")) {
            (Some(min), Some(prm)) => {
                let device = ctx.device.parse::<Devices>()?.first();
                let batch = p.batch_size;
                let score = |requests| {
                    let scores = score_on(&device, &prm.path, requests, batch)?;
                    Ok(scores.into_iter().map(|s| s.map(|s| s.weakest_score)))
                };
                filter.steps = Some(StepFilter::judge(&samples, &filter, min, score)?);
            }
            (min, prm) => {
                prm_wiring("min_step_score", min.is_some(), prm.is_some())
                    .map_err(|e| anyhow::anyhow!("stage `{}`: {}", ctx.node, e.message))?;
            }
        }
        let (data, tally) = select(&samples, &filter, &diversity);
        ctx.write_dataset("data", &[chat_batch(&data)?])?;
        ctx.write_dataset("samples", &[samples_batch(&samples)?])?;
        let mut metrics = tally.metrics(&samples, &rewards.names());
        let mut report = tally.report(&filter);
        if let Some(steps) = &filter.steps {
            metrics.extend(steps.metrics(&tally));
            report.push_str(&format!(
                "\n{} completions passed the other filters but had a step the PRM scores below {}.\n",
                tally.prm_dropped, steps.min
            ));
        }
        ctx.write_dataset("metrics", &[metrics_batch(&metrics)?])?;
        ctx.set_report(report);
        Ok(())
    }
}

/// Samples `num_samples` completions per problem, chunk by chunk, resuming from the chunks a
/// killed run checkpointed.
fn sample_from_model(
    ctx: &mut StageContext,
    p: &RejectionParams,
    model_dir: &std::path::Path,
    problems: &[ProblemRow],
    rewards: &RewardSet,
) -> anyhow::Result<Vec<SampleRow>> {
    // Sampling runs on one device: the first of a list.
    let device = ctx.device.parse::<Devices>()?.first();
    let shards = Shards::new(&ctx.resume_dir().join("samples"))?;
    let n_chunks = problems.len().div_ceil(CHUNK);
    let (missing, done) = shards.missing_chunks(problems.len());
    let progress = ctx.progress(problems.len() as u64, "problems");
    progress.inc(done as u64);
    let params = SamplingParams {
        temperature: p.temperature,
        top_k: 0,
        top_p: p.top_p,
        max_new_tokens: p.max_new_tokens,
        stop_strings: vec![],
        seed: ctx.seed,
    };
    let (n, batch_size) = (p.num_samples, p.batch_size);
    if missing.len() < n_chunks {
        ctx.mark_resumed();
        ctx.info(format!(
            "resuming: {} of {n_chunks} chunks were sampled before",
            n_chunks - missing.len()
        ));
    }
    if !missing.is_empty() {
        let prompts: Vec<String> = problems.iter().map(|q| q.prompt.clone()).collect();
        let task = SampleChunks {
            model_dir: model_dir.to_path_buf(),
            prompts: &prompts,
            chunks: missing,
            shards: &shards,
            params,
            n,
            batch_size,
            progress: &progress,
            shard: |c, groups| samples_batch(&judge_chunk(chunk(problems, c), groups, rewards)),
        };
        run_on(&device, task)?;
    }
    shards.read_all(problems.len(), read_samples)
}

/// One chunk's sampled completions as sample rows, scored by `rewards`.
fn judge_chunk(
    problems: &[ProblemRow],
    groups: Vec<Vec<Completion>>,
    rewards: &RewardSet,
) -> Vec<SampleRow> {
    let pairs: Vec<(&ProblemRow, Completion)> = problems
        .iter()
        .zip(groups)
        .flat_map(|(problem, group)| group.into_iter().map(move |c| (problem, c)))
        .collect();
    let judged: Vec<Judged> = pairs
        .iter()
        .map(|(problem, completion)| Judged {
            task: &problem.task,
            answer: &problem.answer,
            steps: &problem.steps,
            completion: &completion.text,
            completion_tokens: completion.token_ids.len(),
            truncated: completion.truncated,
        })
        .collect();
    let scores = rewards.score_all(&judged);
    drop(judged); // it borrows `pairs`, which the loop below consumes
    let mut rows = Vec::new();
    for ((problem, completion), scored) in pairs.into_iter().zip(scores) {
        let length = completion.token_ids.len();
        rows.push(SampleRow {
            step: 0,
            id: problem.id.clone(),
            task: problem.task.clone(),
            prompt: problem.prompt.clone(),
            answer: problem.answer.clone(),
            completion: completion.text,
            reward: scored.total.unwrap_or(f64::NAN),
            components: scored
                .components
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            advantage: 0.0,
            length: length as i32,
            truncated: completion.truncated,
        });
    }
    rows
}

/// Which combinations of inputs make sense: `model` with `problems` (sample), or `samples`
/// alone (filter existing samples). Errors name the port to fix.
pub fn wiring(model: bool, problems: bool, samples: bool) -> Result<(), WiringError> {
    match (model, problems, samples) {
        (true, true, false) | (false, false, true) => Ok(()),
        (true, _, true) => Err(WiringError::at(
            &["inputs", "samples"],
            "wire either `model` (with `problems`) or `samples`, not both",
        )),
        (true, false, false) => Err(WiringError::at(
            &["inputs", "model"],
            "input `model` needs `problems` to sample for",
        )),
        (false, true, _) => Err(WiringError::at(
            &["inputs", "problems"],
            "input `problems` is only used with `model`; wire `model` to sample, or only `samples` to filter existing samples",
        )),
        (false, false, false) => Err(WiringError::at(
            &["inputs"],
            "needs `model` and `problems` to sample from, or an existing `samples` dataset",
        )),
    }
}

/// Which completions may be kept, before diversity picks among them.
struct Filter {
    min_reward: f64,
    require_correct: bool,
    /// Read untagged answers when checking correctness.
    fallback: bool,
    /// How a code problem's program is run when checking correctness (the reward's limits).
    code_limits: crate::code_exec::Limits,
    /// The PRM's verdicts, when `min_step_score` is set.
    steps: Option<StepFilter>,
}

/// `min_step_score` and the weakest step's score of each sample (in sample order; `None` for a
/// completion without steps, which never passes, and for one the other filters drop).
struct StepFilter {
    min: f64,
    weakest: Vec<Option<f64>>,
}

impl StepFilter {
    /// The weakest step scores of the samples that pass `filter`'s other filters, from `score`
    /// given their (prompt, completion) in sample order: the PRM judges only what it could
    /// keep, not every sample (what the others drop it would score in vain).
    fn judge<I: IntoIterator<Item = Option<f64>>>(
        samples: &[SampleRow],
        filter: &Filter,
        min: f64,
        score: impl FnOnce(Vec<(String, String)>) -> anyhow::Result<I>,
    ) -> anyhow::Result<StepFilter> {
        let judged: Vec<usize> = (0..samples.len())
            .filter(|&i| filter.passes(&samples[i]))
            .collect();
        let requests = judged
            .iter()
            .map(|&i| (samples[i].prompt.clone(), samples[i].completion.clone()))
            .collect();
        let mut weakest = vec![None; samples.len()];
        for (i, w) in judged.iter().zip(score(requests)?) {
            weakest[*i] = w;
        }
        Ok(StepFilter { min, weakest })
    }

    /// `prm_dropped` (a share of the samples) and the mean and std of the weakest step scores
    /// of the samples the PRM judged.
    fn metrics(&self, tally: &Tally) -> Vec<(i64, String, f64)> {
        let mut rows = vec![(
            0,
            "prm_dropped".to_string(),
            tally.prm_dropped as f64 / tally.samples.max(1) as f64,
        )];
        if let Some((mean, std)) = mean_std(self.weakest.iter().flatten().copied()) {
            rows.push((0, "prm/weakest_step/mean".into(), mean));
            rows.extend(std.map(|std| (0, "prm/weakest_step/std".into(), std)));
        }
        rows
    }
}

impl Filter {
    fn correct(&self, s: &SampleRow) -> bool {
        if s.task == crate::code_exec::CODE_TASK {
            return crate::code_exec::passes(&s.answer, &s.completion, &self.code_limits);
        }
        tasks::verify_with(&s.task, &s.answer, &s.completion, self.fallback)
    }

    /// Whether sample `s` passes the reward, truncation and correctness filters.
    fn passes(&self, s: &SampleRow) -> bool {
        // Rewards are sums of floats (1.0 + 0.2·1.0): allow rounding at the threshold.
        let rewarded = s.reward.is_finite() && s.reward >= self.min_reward - 1e-9;
        rewarded && !s.truncated && (!self.require_correct || self.correct(s))
    }

    /// Whether sample `i`'s weakest step is good enough (always, without a PRM).
    fn steps_pass(&self, i: usize) -> bool {
        self.steps.as_ref().is_none_or(|f| {
            f.weakest
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|w| w >= f.min)
        })
    }
}

/// What [`select`] saw and kept.
struct Tally {
    problems: usize,
    samples: usize,
    correct: usize,
    truncated: usize,
    passing: usize,
    solved: usize,
    kept: usize,
    mean_reward: f64,
    /// Samples that passed every other filter but not `min_step_score`.
    prm_dropped: usize,
}

/// The kept completions of every problem (problems in order of first appearance), and counts
/// of how many were correct, passed and were kept.
fn select(samples: &[SampleRow], filter: &Filter, diversity: &Diversity) -> (Vec<ChatRow>, Tally) {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<(usize, &SampleRow)>> = HashMap::new();
    for (i, s) in samples.iter().enumerate() {
        groups
            .entry(s.id.as_str())
            .or_insert_with(|| {
                order.push(s.id.as_str());
                Vec::new()
            })
            .push((i, s));
    }
    let (mut data, mut passing, mut solved, mut prm_dropped) = (Vec::new(), 0usize, 0usize, 0usize);
    for id in &order {
        let group = &groups[id];
        let passed: Vec<(usize, &SampleRow)> = group
            .iter()
            .copied()
            .filter(|(_, s)| filter.passes(s))
            .collect();
        let candidates: Vec<&SampleRow> = passed
            .iter()
            .filter(|(i, _)| filter.steps_pass(*i))
            .map(|(_, s)| *s)
            .collect();
        prm_dropped += passed.len() - candidates.len();
        passing += candidates.len();
        solved += usize::from(!candidates.is_empty());
        let scored: Vec<(&str, f64)> = candidates
            .iter()
            .map(|s| (s.completion.as_str(), s.reward))
            .collect();
        for (j, pick) in select_diverse(&scored, diversity).into_iter().enumerate() {
            let s = candidates[pick];
            data.push(ChatRow {
                id: format!("{}-{j}", s.id),
                task: s.task.clone(),
                answer: s.answer.clone(),
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: s.prompt.clone(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: s.completion.clone(),
                    },
                ],
                steps: think_steps(&s.completion),
            });
        }
    }
    let rewards: Vec<f64> = samples
        .iter()
        .map(|s| s.reward)
        .filter(|r| r.is_finite())
        .collect();
    let tally = Tally {
        problems: order.len(),
        samples: samples.len(),
        correct: samples.iter().filter(|s| filter.correct(s)).count(),
        truncated: samples.iter().filter(|s| s.truncated).count(),
        passing,
        solved,
        kept: data.len(),
        mean_reward: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
        prm_dropped,
    };
    (data, tally)
}

/// Mean and sample standard deviation (`None` below two values), over the finite values.
fn mean_std(values: impl Iterator<Item = f64>) -> Option<(f64, Option<f64>)> {
    let values: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    let mean = crate::eval_math::mean(&values)?;
    let std = (values.len() >= 2).then(|| {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64).sqrt()
    });
    Some((mean, std))
}

impl Tally {
    /// A Markdown table of the counts.
    fn report(&self, filter: &Filter) -> String {
        let share = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
        let correct = if filter.require_correct {
            ", correct"
        } else {
            ""
        };
        let mut report = String::new();
        let _ = writeln!(
            report,
            "| problems | samples | mean reward | correct | truncated | passing (reward ≥ {}{correct}, not truncated) | problems with a pass | kept |",
            filter.min_reward
        );
        let _ = writeln!(report, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            report,
            "| {} | {} | {:.3} | {} ({:.1}%) | {} ({:.1}%) | {} ({:.1}%) | {} ({:.1}%) | {} |",
            self.problems,
            self.samples,
            self.mean_reward,
            self.correct,
            share(self.correct, self.samples),
            self.truncated,
            share(self.truncated, self.samples),
            self.passing,
            share(self.passing, self.samples),
            self.solved,
            share(self.solved, self.problems),
            self.kept
        );
        report
    }

    /// The `metrics` rows (all at step 0): counts, shares, and the mean and std of the total
    /// reward and of each component (`rewards/NAME/mean`, `rewards/NAME/std`, as TRL logs them).
    fn metrics(&self, samples: &[SampleRow], names: &[&str]) -> Vec<(i64, String, f64)> {
        let share = |a: usize, b: usize| a as f64 / b.max(1) as f64;
        let mut rows: Vec<(String, f64)> = vec![
            ("problems".into(), self.problems as f64),
            ("samples".into(), self.samples as f64),
            ("correct".into(), share(self.correct, self.samples)),
            ("truncated".into(), share(self.truncated, self.samples)),
            ("passing".into(), share(self.passing, self.samples)),
            ("solved".into(), share(self.solved, self.problems)),
            ("kept".into(), self.kept as f64),
        ];
        let mut stats = |name: &str, values: Vec<f64>| {
            if let Some((mean, std)) = mean_std(values.into_iter()) {
                rows.push((format!("{name}/mean"), mean));
                if let Some(std) = std {
                    rows.push((format!("{name}/std"), std));
                }
            }
        };
        stats("reward", samples.iter().map(|s| s.reward).collect());
        for name in names {
            let values = samples
                .iter()
                .filter_map(|s| {
                    s.components
                        .iter()
                        .find(|(n, _)| n == name)
                        .and_then(|(_, v)| *v)
                })
                .collect();
            stats(&format!("rewards/{name}"), values);
        }
        rows.into_iter()
            .map(|(metric, value)| (0, metric, value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, completion: &str, reward: f64, truncated: bool) -> SampleRow {
        SampleRow {
            step: 0,
            id: id.into(),
            task: "arithmetic".into(),
            prompt: "3+4=".into(),
            answer: "7".into(),
            completion: completion.into(),
            reward,
            components: vec![("format".into(), Some(reward)), ("length".into(), None)],
            advantage: 0.0,
            length: 10,
            truncated,
        }
    }

    fn kept(samples: &[SampleRow], filter: &Filter) -> Vec<String> {
        let diversity = Diversity {
            k: 8,
            ..Diversity::default()
        };
        select(samples, filter, &diversity)
            .0
            .into_iter()
            .map(|c| c.messages[1].content.clone())
            .collect()
    }

    #[test]
    fn only_correct_untruncated_completions_are_kept_whatever_the_rewards() {
        let right = "<think>\n3+4=7 write 7\n</think>\n<answer>7</answer>";
        let samples = vec![
            sample("a", right, 1.0, false),
            sample(
                "a",
                "<think>\n3+4=8 write 8\n</think>\n<answer>8</answer>",
                1.0,
                false,
            ),
            sample(
                "a",
                "<think>\n3+4=7\n</think>\n<answer>7</answer> and on",
                1.0,
                true,
            ),
            sample("b", "the answer is 7", 1.0, false),
        ];
        // Format alone pays every one of them, and every one clears min_reward.
        let strict = Filter {
            min_reward: 0.0,
            require_correct: true,
            fallback: false,
            code_limits: Default::default(),
            steps: None,
        };
        assert_eq!(kept(&samples, &strict), [right]);
        // With the fallback the untagged answer counts as correct.
        let lenient = Filter {
            fallback: true,
            code_limits: Default::default(),
            ..strict
        };
        assert_eq!(kept(&samples, &lenient), [right, "the answer is 7"]);
        // Without require_correct the wrong answer may stay; a truncated one never does.
        let any = Filter {
            min_reward: 0.0,
            require_correct: false,
            fallback: false,
            code_limits: Default::default(),
            steps: None,
        };
        let all = kept(&samples, &any);
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|c| !c.ends_with("and on")));
        // The reward threshold still applies.
        let high = Filter {
            min_reward: 2.0,
            require_correct: false,
            fallback: false,
            code_limits: Default::default(),
            steps: None,
        };
        assert!(kept(&samples, &high).is_empty());
    }

    #[test]
    fn metrics_count_and_average_without_timings() {
        let right = "<think>\n3+4=7\n</think>\n<answer>7</answer>";
        let samples = vec![
            sample("a", right, 1.0, false),
            sample("a", right, 0.0, true),
            sample("b", "x", 0.5, false),
        ];
        let filter = Filter {
            min_reward: 0.0,
            require_correct: true,
            fallback: false,
            code_limits: Default::default(),
            steps: None,
        };
        let (_, tally) = select(&samples, &filter, &Diversity::default());
        let metrics = tally.metrics(&samples, &["format", "length"]);
        let get = |name: &str| metrics.iter().find(|m| m.1 == name).map(|m| m.2);
        assert_eq!(get("problems"), Some(2.0));
        assert_eq!(get("correct"), Some(2.0 / 3.0));
        assert_eq!(get("truncated"), Some(1.0 / 3.0));
        assert_eq!(get("passing"), Some(1.0 / 3.0));
        assert_eq!(get("solved"), Some(0.5));
        assert_eq!(get("kept"), Some(1.0));
        assert_eq!(get("reward/mean"), Some(0.5));
        assert_eq!(get("rewards/format/mean"), Some(0.5));
        assert_eq!(get("rewards/format/std"), Some(0.5));
        assert_eq!(get("rewards/length/mean"), None, "never judged");
        assert!(
            metrics
                .iter()
                .all(|m| m.0 == 0 && !m.1.contains("per_s") && !m.1.contains("time"))
        );
        assert_eq!(metrics, tally.metrics(&samples, &["format", "length"]));
    }

    #[test]
    fn a_weak_step_drops_a_sample_that_passes_everything_else() {
        let right = "<think>\n3+4=7 write 7\n</think>\n<answer>7</answer>";
        let samples = vec![
            sample("a", right, 1.0, false),
            sample("a", &format!("{right} "), 1.0, false),
            sample("b", right, 1.0, false),
        ];
        let filter = |weakest: Vec<Option<f64>>| Filter {
            min_reward: 0.0,
            require_correct: true,
            fallback: false,
            code_limits: Default::default(),
            steps: Some(StepFilter { min: 0.5, weakest }),
        };
        let strict = filter(vec![Some(0.9), Some(0.2), None]);
        let (data, tally) = select(
            &samples,
            &strict,
            &Diversity {
                k: 8,
                ..Diversity::default()
            },
        );
        assert_eq!(
            data.len(),
            1,
            "only the first sample's steps all score 0.5 or more"
        );
        assert_eq!(tally.prm_dropped, 2, "a low step, and no steps at all");
        let metrics = strict.steps.as_ref().unwrap().metrics(&tally);
        assert_eq!(metrics[0], (0, "prm_dropped".to_string(), 2.0 / 3.0));
        let lenient = filter(vec![Some(0.9), Some(0.5), Some(0.5)]);
        assert_eq!(
            select(&samples, &lenient, &Diversity::default())
                .1
                .prm_dropped,
            0
        );
    }

    #[test]
    fn the_prm_scores_only_the_samples_that_pass_the_other_filters() {
        let right = "<think>\n3+4=7 write 7\n</think>\n<answer>7</answer>";
        let wrong = "<think>\n3+4=8 write 8\n</think>\n<answer>8</answer>";
        let samples = vec![
            sample("a", wrong, 1.0, false),
            sample("a", right, 1.0, false),
            sample("a", right, 1.0, true),
            sample("b", right, -1.0, false),
            sample("b", &format!("{right} "), 1.0, false),
        ];
        let filter = Filter {
            min_reward: 0.0,
            require_correct: true,
            fallback: false,
            code_limits: Default::default(),
            steps: None,
        };
        let mut asked = Vec::new();
        let steps = StepFilter::judge(&samples, &filter, 0.5, |requests| {
            asked = requests;
            Ok([Some(0.25), Some(0.75)])
        })
        .unwrap();
        let completions: Vec<&str> = asked.iter().map(|(_, c)| c.as_str()).collect();
        assert_eq!(completions, [right, &format!("{right} ")]);
        assert_eq!(steps.weakest, [None, Some(0.25), None, None, Some(0.75)]);
        let filter = Filter {
            steps: Some(steps),
            ..filter
        };
        let (_, tally) = select(&samples, &filter, &Diversity::default());
        assert_eq!((tally.passing, tally.prm_dropped), (1, 1));
        let metrics = filter.steps.as_ref().unwrap().metrics(&tally);
        assert_eq!(metrics[1], (0, "prm/weakest_step/mean".to_string(), 0.5));
    }

    #[test]
    fn wiring_names_the_port_to_fix() {
        assert!(wiring(true, true, false).is_ok());
        assert!(wiring(false, false, true).is_ok());
        let at = |m, p, s| wiring(m, p, s).unwrap_err().at;
        assert_eq!(at(true, true, true), ["inputs", "samples"]);
        assert_eq!(at(true, false, true), ["inputs", "samples"]);
        assert_eq!(at(true, false, false), ["inputs", "model"]);
        assert_eq!(at(false, true, false), ["inputs", "problems"]);
        assert_eq!(at(false, true, true), ["inputs", "problems"]);
        assert_eq!(at(false, false, false), ["inputs"]);
    }

    #[test]
    fn params_are_read_into_their_struct() {
        let spec = RejectionFilter.spec();
        let params = dagrun_engine::params::resolve(&spec, &serde_json::Map::new()).unwrap();
        let p = RejectionParams::read(&params).unwrap();
        assert!(matches!(p.keep, Keep::AllPassing));
        assert!(p.limit.is_none() && p.min_step_score.is_none());
        assert_eq!(p.kept_per_problem(), p.max_per_problem);
        // Every declared `keep` choice is a variant, keeping what it says.
        for (choice, kept) in [("best", 1), ("all_passing", 5), ("top_k", 3)] {
            let mut given = serde_json::Map::new();
            given.insert("keep".into(), serde_json::json!(choice));
            given.insert("top_k".into(), serde_json::json!(3));
            given.insert("max_per_problem".into(), serde_json::json!(5));
            let params = dagrun_engine::params::resolve(&spec, &given).unwrap();
            let p = RejectionParams::read(&params).unwrap();
            assert_eq!(p.kept_per_problem(), kept, "{choice}");
        }
    }
}
