//! Stage kind `prm`: a process reward model, labelled the Math-Shepherd way and trained on the
//! completer's own decoder.
//!
//! 1. Solutions, per problem of `problems`: `samples_per_problem` of the completer's own
//!    completions (those that ran out of `max_new_tokens` are dropped, not labelled as finished
//!    solutions, and counted in the `labels/sample/truncated` metric) and `perturbations`
//!    reference solutions (the problem's `steps`) with one corrupted step and the rest of the
//!    reference reasoning after it, without an answer ([`crate::prm_perturb::perturb`]); each
//!    assistant turn of the optional `data` input is one more solution. Good and bad steps both
//!    occur, and the planted one is recorded; it is not always the last step, so its position
//!    gives it away only when it is.
//! 2. Labels ([`crate::prm_labels::label`]): every step prefix is continued `n_rollouts` times by
//!    the completer, all of a chunk's prefixes batched through the KV-cache sampler, and the
//!    continuations' answers verified by the shared verifier; `estimation: hard` labels a step
//!    1 if any continuation verifies, `soft` with the share that do. Labelling is checkpointed
//!    per chunk of [`CHUNK`] problems, like `eval`.
//! 3. Training ([`crate::prm_train`]): the completer's decoder with a scalar head read at each
//!    step's separator, binary cross-entropy against the labels, AdamW with warmup and cosine
//!    decay, checkpoints every `checkpoint_every` steps. The head reads the hidden state there
//!    (`head: hidden`) or the decoder's log-likelihood of the step (`head: likelihood`); the
//!    latter learns through the decoder's next-token predictions, which a small decoder
//!    already makes well, where a hidden-state head must learn to re-check a step from a few
//!    hundred labels (README, "What `r1.yaml` learns"). Its decoder trains on `references`
//!    reference solutions of unlabelled problems with the language-model loss, then the head's
//!    weight and bias are fitted to the labels by BCE. A share `heldout` of the problems is
//!    kept out of training; the `metrics` output reports the PRM's step-level accuracy on them
//!    and how often its weakest step is the planted one (`heldout/perturbed/weakest_is_bad`),
//!    also over the solutions whose planted step is not their last
//!    (`heldout/perturbed/weakest_is_bad_not_last`), where position cannot give it away.
//!
//! The `model` output is a Hugging Face directory that transformers loads as
//! `LlamaForTokenClassification` (head `hidden`) or `LlamaForCausalLM` (`likelihood`) (see
//! `dagrun_model::prm` and the README); other stages score with it through
//! [`crate::prm_score`]. Sampling seeds depend on the stage seed and the chunk only; nothing
//! in an output depends on timing.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use anyhow::{Context, bail};
use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
    WiringError,
};
use dagrun_engine::{Params, Progress};
use dagrun_model::device::{BackendTask, Devices, run_on};
use dagrun_model::generate::{Completion, SamplingParams};
use dagrun_model::load_model;
use dagrun_model::prm::{Aggregate, PrmHead};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::checkpoint::finish_training;
use crate::prm_labels::{
    Estimation, ModelRollouts, Solution, Source, StepLabelRow, is_heldout, label, read_step_labels,
    step_labels_batch,
};
use crate::prm_perturb::{Corruption, perturb};
use crate::prm_score::separator_id;
use crate::prm_train::{TrainTask, label_metrics};
use crate::sampling::{CHUNK, Shards, chunk, mix_seed, sample_groups};
use crate::tables::{ProblemRow, read_chat, read_problems};
use crate::tasks;

pub struct Prm;

/// The stage's params, read once.
#[derive(Debug, Clone, Deserialize)]
pub struct PrmParams {
    pub samples_per_problem: usize,
    pub perturbations: usize,
    pub perturb: BTreeMap<String, f64>,
    pub n_rollouts: usize,
    pub estimation: Estimation,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub answer_fallback: bool,
    pub limit: Option<usize>,
    pub heldout: f64,
    pub aggregate: Aggregate,
    pub head: PrmHead,
    pub references: usize,
    pub reference_batch_size: usize,
    pub extra_layers: usize,
    pub epochs: f64,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_length: usize,
    pub checkpoint_every: u64,
    pub log_every: u64,
    pub generation_batch: usize,
}

impl PrmParams {
    pub fn read(params: &Params) -> anyhow::Result<PrmParams> {
        params.read_into("`prm`")
    }
}

fn int(min: i64, max: i64) -> ParamType {
    ParamType::Int { min, max }
}

fn float(min: f64, max: f64) -> ParamType {
    ParamType::Float { min, max }
}

impl StageKind for Prm {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "prm",
            version: 6,
            doc: "a process reward model: steps labelled by the completer's rollouts (Math-Shepherd), a scalar head on its decoder (reading the hidden state or the step's likelihood) trained with BCE",
            inputs: vec![
                PortSpec::one(
                    "model",
                    ArtifactType::Model,
                    "the completer: it writes solutions and continues step prefixes; the PRM starts from its decoder",
                ),
                PortSpec::one(
                    "problems",
                    ArtifactType::Dataset(Some("problems")),
                    "problems with reference steps, to sample and perturb solutions for",
                ),
                PortSpec::optional(
                    "data",
                    ArtifactType::Dataset(Some("chat")),
                    "more solutions to label: each chat's assistant turn",
                ),
            ],
            outputs: vec![
                PortSpec::one(
                    "model",
                    ArtifactType::Model,
                    "the PRM (transformers' LlamaForTokenClassification layout, or LlamaForCausalLM with head `likelihood`; `prm` block in config.json)",
                ),
                PortSpec::one(
                    "labels",
                    ArtifactType::Dataset(Some("step_labels")),
                    "every solution's steps with their labels and Monte-Carlo values",
                ),
                PortSpec::one(
                    "metrics",
                    ArtifactType::Dataset(Some("metrics")),
                    "loss, lr, grad_norm per logged step; label counts and held-out step accuracy at the last step",
                ),
            ],
            params: vec![
                ParamSpec::new(
                    "samples_per_problem",
                    int(0, 4096),
                    json!(4),
                    "the completer's own solutions sampled per problem",
                ),
                ParamSpec::new(
                    "perturbations",
                    int(0, 64),
                    json!(1),
                    "reference solutions per problem with one corrupted step",
                ),
                ParamSpec::new(
                    "perturb",
                    ParamType::Weights {
                        keys: Corruption::NAMES,
                    },
                    json!({"number": 1.0}),
                    "how a reference step is corrupted: `number` (its result's last digit) or `operation` (a swapped operator), with weights",
                ),
                ParamSpec::new(
                    "n_rollouts",
                    int(1, 1024),
                    json!(4),
                    "continuations per step prefix",
                ),
                ParamSpec::new(
                    "estimation",
                    ParamType::Str {
                        choices: &["hard", "soft"],
                    },
                    json!("hard"),
                    "a step's label: 1 if any continuation verifies (hard), or the share that do (soft)",
                ),
                ParamSpec::new(
                    "temperature",
                    float(0.0, 100.0),
                    json!(0.8),
                    "sampling temperature of solutions and rollouts",
                ),
                ParamSpec::new(
                    "top_p",
                    float(1e-6, 1.0),
                    json!(1.0),
                    "nucleus sampling of solutions and rollouts",
                ),
                ParamSpec::new(
                    "max_new_tokens",
                    int(1, 1_000_000),
                    json!(128),
                    "length limit of a solution or a continuation",
                ),
                ParamSpec::new(
                    "answer_fallback",
                    ParamType::Bool,
                    json!(false),
                    "read the last \\boxed{} (else the last number) of a completion without an <answer> block as its answer",
                ),
                ParamSpec::unset(
                    "limit",
                    int(1, 100_000_000),
                    "label the first N problems only (unset: all)",
                ),
                ParamSpec::new(
                    "heldout",
                    float(0.0, 0.5),
                    json!(0.1),
                    "share of problems kept out of training, for the held-out metrics",
                ),
                ParamSpec::new(
                    "aggregate",
                    ParamType::Str {
                        choices: Aggregate::NAMES,
                    },
                    json!("min"),
                    "how scorers combine step scores into a solution score (written to config.json)",
                ),
                ParamSpec::new(
                    "head",
                    ParamType::Str {
                        choices: PrmHead::NAMES,
                    },
                    json!("hidden"),
                    "what the scalar head reads at a step's end: the decoder's hidden state (`hidden`), or its log-likelihood of the step (`likelihood`: a step the decoder would not write scores low; the decoder learns `references` and the head's weight and bias are then fitted to the labels by BCE)",
                ),
                ParamSpec::new(
                    "references",
                    int(0, 100_000_000),
                    json!(0),
                    "with head `likelihood`: reference solutions the decoder trains on with the language-model loss, so that it knows the right steps better than the completer: the first N problems after the `limit` labelled ones (the head is then fitted to the labels)",
                ),
                ParamSpec::new(
                    "reference_batch_size",
                    int(1, 65_536),
                    json!(32),
                    "reference solutions per optimizer step (with `references`)",
                ),
                ParamSpec::new(
                    "extra_layers",
                    int(0, 64),
                    json!(0),
                    "copies of the completer's top layers stacked on the PRM's decoder before training: a completer of a few layers finishes a step's arithmetic in its last one and leaves none to check it with",
                ),
                ParamSpec::new(
                    "epochs",
                    float(0.0, 1e6),
                    json!(2.0),
                    "passes over what the head trains on, the labelled solutions (`hidden`) or the references (`likelihood`), when max_steps is unset",
                ),
                ParamSpec::unset(
                    "max_steps",
                    int(1, 100_000_000),
                    "optimizer steps (overrides epochs; `likelihood` without references takes none)",
                ),
                ParamSpec::new(
                    "batch_size",
                    int(1, 65_536),
                    json!(16),
                    "labelled solutions per optimizer step (`hidden`), and per forward pass when scoring held-out solutions and fitting the `likelihood` head",
                ),
                ParamSpec::new("lr", float(0.0, 10.0), json!(1e-3), "peak learning rate"),
                ParamSpec::new(
                    "warmup_ratio",
                    float(0.0, 1.0),
                    json!(0.05),
                    "share of steps with linear warmup",
                ),
                ParamSpec::new(
                    "min_lr_ratio",
                    float(0.0, 1.0),
                    json!(0.1),
                    "cosine decay floor, as a share of lr",
                ),
                ParamSpec::new(
                    "weight_decay",
                    float(0.0, 10.0),
                    json!(0.01),
                    "AdamW weight decay",
                ),
                ParamSpec::new(
                    "max_grad_norm",
                    float(0.0, 1e6),
                    json!(1.0),
                    "global gradient norm clip (0: off)",
                ),
                ParamSpec::new(
                    "max_length",
                    int(2, 1_000_000),
                    json!(512),
                    "tokens per PRM input; steps past it are not trained on",
                ),
                ParamSpec::new(
                    "checkpoint_every",
                    int(1, 100_000_000),
                    json!(50),
                    "steps between checkpoints in the resume directory",
                ),
                ParamSpec::new(
                    "log_every",
                    int(1, 100_000_000),
                    json!(10),
                    "steps between metrics rows",
                ),
                ParamSpec::new(
                    "generation_batch",
                    int(1, 65_536),
                    json!(64),
                    "sequences per generation call",
                ),
            ],
            device_dependent: true,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        let fail = |param: &str, message: String| {
            Err(ParamError {
                param: param.into(),
                message,
            })
        };
        let n = params.i64("n_rollouts");
        if params.f64("temperature") == 0.0 && n > 1 {
            return fail(
                "temperature",
                format!(
                    "param `temperature` is 0, so the {n} rollouts of a step would be one greedy continuation {n} times; raise it or set `n_rollouts: 1`"
                ),
            );
        }
        let likelihood = params.str("head") == "likelihood";
        if !likelihood && params.i64("references") > 0 {
            return fail(
                "references",
                "param `references` trains the decoder's language-model head, which only `head: likelihood` keeps and reads; set `head: likelihood` or `references: 0`".into(),
            );
        }
        if params.i64("references") > 0 && params.opt_i64("limit").is_none() {
            return fail(
                "references",
                "param `references` takes the problems after the `limit` labelled ones, and `limit` is unset, so every problem is labelled; set `limit`".into(),
            );
        }
        if likelihood && params.i64("extra_layers") > 0 {
            return fail(
                "extra_layers",
                "param `extra_layers` with `head: likelihood` would change the decoder's predictions before training; set it to 0".into(),
            );
        }
        if params.i64("perturbations") > 0
            && params.weights("perturb").iter().all(|(_, w)| *w <= 0.0)
        {
            return fail(
                "perturb",
                "param `perturb`: at least one weight must be positive while `perturbations` is above 0".into(),
            );
        }
        Ok(())
    }

    fn check_wiring(&self, wired: &[&str], params: &Params) -> Result<(), WiringError> {
        let nothing = params.i64("samples_per_problem") == 0 && params.i64("perturbations") == 0;
        if nothing && !wired.contains(&"data") {
            return Err(WiringError::at(
                &["params", "samples_per_problem"],
                "params `samples_per_problem` and `perturbations` are both 0 and no `data` is wired: there are no solutions to label",
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        // Labelling samples and the PRM (one micro-batch a step) trains on one device: the
        // first of a list.
        let device = ctx.device.parse::<Devices>()?.first();
        let p = PrmParams::read(&ctx.params)?;
        let model_dir = ctx.input("model")?.path.clone();
        let format = ChatFormat::load(&model_dir)?;
        separator_id(&format.tokenizer).context("input `model`")?;
        let problems = read_problems(&read_parquet(&ctx.input("problems")?.path)?.1)?;
        // The reference solutions the decoder reads with head `likelihood`: none of the
        // labelled problems, on which the head is fitted and judged, so that it is fitted to
        // how the decoder reads problems it has not learnt.
        let labelled = p.limit.unwrap_or(usize::MAX).min(problems.len());
        let references = reference_solutions(&problems, labelled, p.references);
        if p.references > 0 {
            if references.is_empty() {
                bail!(
                    "param `references`: all {} problems of input `problems` are labelled (`limit`), so none is left for the decoder to learn; set `limit` below the number of problems",
                    problems.len()
                );
            }
            ctx.info(format!(
                "{} reference solutions of problems {labelled}.. for the decoder ({} asked)",
                references.len(),
                p.references
            ));
        }
        let mut jobs: Vec<Job> = problems
            .into_iter()
            .take(labelled)
            .map(|problem| Job {
                problem,
                given: None,
            })
            .collect();
        check_answers(&jobs)?;
        if let Some(data) = ctx.input_opt("data") {
            jobs.extend(jobs_of_chats(&read_parquet(&data.path)?.1)?);
        }
        if jobs.is_empty() {
            bail!("inputs `problems` and `data` have no rows to label");
        }
        let shards = Shards::new(&ctx.resume_dir().join("labels"))?;
        let (missing, done) = shards.missing_chunks(jobs.len());
        if done > 0 {
            ctx.mark_resumed();
            ctx.info(format!("resuming: {done} problems were labelled before"));
        }
        if !missing.is_empty() {
            let progress = ctx.progress(jobs.len() as u64, "problems labelled");
            progress.inc(done as u64);
            let task = LabelTask {
                model_dir: model_dir.clone(),
                jobs: &jobs,
                chunks: missing,
                shards: &shards,
                params: &p,
                seed: ctx.seed,
                progress: &progress,
            };
            run_on(&device, task)?;
        }
        let rows = shards.read_all(jobs.len(), read_step_labels)?;
        let truncated = read_truncated(&shards, jobs.len())?;
        if rows.iter().all(|r| r.heldout || r.steps.is_empty()) {
            bail!(
                "no solution with steps outside the held-out problems to train on ({} labelled); label more problems or lower `heldout`",
                rows.len()
            );
        }
        let mut metrics_rows = Vec::new();
        let train = TrainTask::new(ctx, &p, &format, &rows, &references, &model_dir)?;
        let total_steps = train.total_steps();
        let (batch, of_what) = match p.head {
            PrmHead::Hidden => (p.batch_size, "labelled solutions"),
            PrmHead::Likelihood => (p.reference_batch_size, "reference solutions"),
        };
        ctx.info(format!(
            "{} labelled solutions, {total_steps} training steps of {batch} {of_what}",
            rows.len(),
        ));
        let outcome = run_on(&device, train)?;
        for note in &outcome.notes {
            ctx.info(note);
        }
        ctx.info(format!("training: {}", outcome.speed));
        metrics_rows.extend(outcome.metrics);
        let truncated = (p.samples_per_problem > 0).then_some(truncated);
        metrics_rows.extend(label_metrics(&rows, truncated, total_steps as i64));
        metrics_rows.extend(outcome.heldout);
        ctx.write_dataset("labels", &[step_labels_batch(&rows)?])?;
        finish_training(ctx, outcome.resumed_from, &metrics_rows)?;
        ctx.set_report(crate::prm_train::report(&metrics_rows, total_steps as i64));
        Ok(())
    }
}

/// One problem to find solutions for: its own, or a `data` chat with a given solution.
struct Job {
    problem: ProblemRow,
    given: Option<String>,
}

/// Every problem to label needs an answer: with none, nothing could verify its rollouts and
/// every step would be labelled 0. The error names the first such problem and its row.
fn check_answers(jobs: &[Job]) -> anyhow::Result<()> {
    match jobs.iter().position(|j| j.problem.answer.trim().is_empty()) {
        Some(row) => bail!(
            "input `problems`: problem `{}` (row {row}) has no answer; PRM labels need a verifiable answer",
            jobs[row].problem.id
        ),
        None => Ok(()),
    }
}

/// The chats of `data` as jobs: the last user turn is the prompt, the last assistant turn the
/// given solution, the chat's steps the reference to perturb. A chat to label without an
/// `answer` is an error naming it and its row (counted from 0): nothing could verify its
/// rollouts, so every step would be labelled 0.
fn jobs_of_chats(batches: &[arrow::array::RecordBatch]) -> anyhow::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for (row, chat) in read_chat(batches)?.into_iter().enumerate() {
        let turn = |role: &str| chat.messages.iter().rev().find(|m| m.role == role);
        let (Some(user), Some(assistant)) = (turn("user"), turn("assistant")) else {
            continue;
        };
        if chat.answer.trim().is_empty() {
            bail!(
                "input `data`: chat `{}` (row {row}) has no answer; PRM labels need a verifiable answer",
                chat.id
            );
        }
        jobs.push(Job {
            problem: ProblemRow {
                id: chat.id.clone(),
                task: chat.task.clone(),
                difficulty: 0,
                prompt: user.content.clone(),
                answer: chat.answer.clone(),
                steps: chat.steps.clone(),
            },
            given: Some(assistant.content.clone()),
        });
    }
    Ok(jobs)
}

struct LabelTask<'a> {
    model_dir: PathBuf,
    jobs: &'a [Job],
    chunks: Vec<usize>,
    shards: &'a Shards,
    params: &'a PrmParams,
    seed: u64,
    progress: &'a Progress,
}

impl BackendTask for LabelTask<'_> {
    type Output = ();

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let model = load_model::<B::InnerBackend>(&self.model_dir, &device)?;
        let format = ChatFormat::load(&self.model_dir)?;
        let p = self.params;
        let sampling = |path: &[u64]| SamplingParams {
            temperature: p.temperature,
            top_k: 0,
            top_p: p.top_p,
            max_new_tokens: p.max_new_tokens,
            stop_strings: vec![],
            seed: mix_seed(self.seed, path),
        };
        let corruptions: Vec<(Corruption, f64)> = p
            .perturb
            .iter()
            .filter_map(|(name, w)| Some((Corruption::parse(name)?, *w)))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        let (mut solved, mut positive, mut steps) = (0usize, 0.0, 0usize);
        for c in self.chunks {
            let jobs = chunk(self.jobs, c);
            let prompts: Vec<Vec<u32>> = jobs
                .iter()
                .map(|j| format.prompt_ids(&j.problem.prompt))
                .collect::<anyhow::Result<_>>()?;
            // The completer samples for problems; a `data` chat brings its own solution.
            let own: Vec<usize> = (0..jobs.len())
                .filter(|&j| jobs[j].given.is_none())
                .collect();
            let mut sampled = vec![Vec::new(); jobs.len()];
            if p.samples_per_problem > 0 && !own.is_empty() {
                let asked: Vec<Vec<u32>> = own.iter().map(|&j| prompts[j].clone()).collect();
                let groups = sample_groups(
                    &model,
                    &format,
                    &asked,
                    p.samples_per_problem,
                    &sampling(&[c as u64, 0]),
                    p.generation_batch,
                )?;
                for (&j, group) in own.iter().zip(groups) {
                    sampled[j] = group;
                }
            }
            // (job in the chunk, its solution)
            let mut solutions: Vec<(usize, Solution)> = Vec::new();
            let mut truncated = 0;
            for (j, (job, samples)) in jobs.iter().zip(sampled).enumerate() {
                let problem = &job.problem;
                let (complete, dropped) = complete_solutions(job, &samples, p.answer_fallback);
                truncated += dropped;
                solutions.extend(complete.into_iter().map(|s| (j, s)));
                let mut rng =
                    ChaCha8Rng::seed_from_u64(mix_seed(self.seed, &[2, (c * CHUNK + j) as u64]));
                for _ in 0..p.perturbations {
                    let corruption = pick(&corruptions, &mut rng);
                    if let Some(perturbed) = perturb(&problem.steps, corruption, &mut rng) {
                        solutions.push((j, Solution::perturbed(&perturbed)));
                    }
                }
            }
            solutions.retain(|(_, s)| !s.steps.texts.is_empty());
            let only: Vec<Solution> = solutions.iter().map(|(_, s)| s.clone()).collect();
            let mut rollouts = ModelRollouts {
                model: &model,
                format: &format,
                prompts: &prompts,
                answers: jobs
                    .iter()
                    .map(|j| (j.problem.task.as_str(), j.problem.answer.as_str()))
                    .collect(),
                owner: solutions.iter().map(|(j, _)| *j).collect(),
                params: sampling(&[c as u64, 1]),
                batch_size: p.generation_batch,
                fallback: p.answer_fallback,
            };
            let labels = label(&only, &mut rollouts, p.n_rollouts, p.estimation)?;
            let mut rows = Vec::with_capacity(solutions.len());
            let mut index = vec![0i32; jobs.len()];
            for ((j, solution), labels) in solutions.into_iter().zip(labels) {
                let problem = &jobs[j].problem;
                positive += labels.labels.iter().sum::<f64>();
                steps += labels.labels.len();
                rows.push(StepLabelRow {
                    id: problem.id.clone(),
                    task: problem.task.clone(),
                    prompt: problem.prompt.clone(),
                    answer: problem.answer.clone(),
                    source: solution.source.as_str().to_string(),
                    solution: index[j],
                    steps: solution.steps.texts,
                    labels: labels.labels,
                    values: labels.values,
                    bad_step: solution.bad_step.map(|b| b as i32),
                    correct: solution.correct,
                    heldout: is_heldout(self.seed, &problem.id, p.heldout),
                });
                index[j] += 1;
            }
            // The count first: a chunk whose shard exists has its count too.
            save_truncated(self.shards, c, truncated)?;
            self.shards.save(c, &step_labels_batch(&rows)?)?;
            solved += jobs.len();
            self.progress.inc(jobs.len() as u64);
            self.progress.set_message(&format!(
                "{solved} problems, mean step label {:.3}",
                positive / steps.max(1) as f64
            ));
        }
        Ok(())
    }
}

/// A job's complete solutions, each text once: its given one, then the completer's samples
/// that stopped by themselves, each judged by the verifier; and how many samples were dropped
/// because they hit `max_new_tokens` (a truncated sample is no finished solution: its last
/// line would be labelled as an answer it never wrote).
fn complete_solutions(job: &Job, samples: &[Completion], fallback: bool) -> (Vec<Solution>, usize) {
    let problem = &job.problem;
    let verify = |text: &str| tasks::verify_with(&problem.task, &problem.answer, text, fallback);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let finished = samples.iter().filter(|s| !s.truncated);
    for (source, text) in job
        .given
        .iter()
        .map(|g| (Source::Data, g.as_str()))
        .chain(finished.map(|s| (Source::Sample, s.text.as_str())))
    {
        if seen.insert(text) {
            out.push(Solution::complete(source, text, verify(text)));
        }
    }
    (out, samples.iter().filter(|s| s.truncated).count())
}

/// Where chunk `c`'s count of truncated samples is kept, beside its shard.
fn truncated_path(shards: &Shards, c: usize) -> PathBuf {
    shards.path(c).with_extension("truncated")
}

/// Saves chunk `c`'s count of truncated samples whole or not at all (a temporary file, flushed,
/// then renamed), before the chunk's shard.
fn save_truncated(shards: &Shards, c: usize, count: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let path = truncated_path(shards, c);
    let tmp = path.with_extension("truncated.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(count.to_string().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot move {} into place", tmp.display()))
}

/// The truncated samples of every chunk of `n_jobs` jobs, dropped from labelling.
fn read_truncated(shards: &Shards, n_jobs: usize) -> anyhow::Result<usize> {
    let mut total = 0;
    for c in 0..n_jobs.div_ceil(CHUNK) {
        let path = truncated_path(shards, c);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("checkpoint count {} is missing", path.display()))?;
        total += text
            .trim()
            .parse::<usize>()
            .with_context(|| format!("{} is not a count", path.display()))?;
    }
    Ok(total)
}

/// A corruption drawn by weight (`choices` are sorted by name and their weights positive).
fn pick(choices: &[(Corruption, f64)], rng: &mut impl Rng) -> Corruption {
    let total: f64 = choices.iter().map(|(_, w)| w).sum();
    let mut x = rng.random::<f64>() * total;
    for &(c, w) in choices {
        if x < w {
            return c;
        }
        x -= w;
    }
    choices.last().map_or(Corruption::Number, |(c, _)| *c)
}

/// Up to `n` (prompt, completion) reference solutions, from the problems after the first
/// `labelled` (those with worked steps).
fn reference_solutions(
    problems: &[ProblemRow],
    labelled: usize,
    n: usize,
) -> Vec<(String, String)> {
    problems[labelled.min(problems.len())..]
        .iter()
        .filter(|r| !r.steps.is_empty())
        .take(n)
        .map(|r| {
            (
                r.prompt.clone(),
                tasks::format_completion(&r.steps, &r.answer),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(raw: serde_json::Value) -> Params {
        dagrun_engine::params::resolve(&Prm.spec(), raw.as_object().unwrap()).unwrap()
    }

    #[test]
    fn params_read_into_their_struct_with_defaults() {
        let p = PrmParams::read(&params(
            json!({"estimation": "soft", "aggregate": "product"}),
        ))
        .unwrap();
        assert_eq!(p.estimation, Estimation::Soft);
        assert_eq!(p.aggregate, Aggregate::Product);
        assert_eq!((p.n_rollouts, p.samples_per_problem, p.limit), (4, 4, None));
        assert_eq!(p.perturb.get("number"), Some(&1.0));
    }

    #[test]
    fn cross_field_checks_name_the_param() {
        assert!(Prm.check(&params(json!({}))).is_ok());
        let err = Prm.check(&params(json!({"temperature": 0.0}))).unwrap_err();
        assert_eq!(err.param, "temperature");
        assert!(
            Prm.check(&params(json!({"temperature": 0.0, "n_rollouts": 1})))
                .is_ok()
        );
        let err = Prm
            .check(&params(json!({"perturb": {"number": 0.0}})))
            .unwrap_err();
        assert_eq!(err.param, "perturb");
        let err = Prm.check(&params(json!({"references": 10}))).unwrap_err();
        assert_eq!(err.param, "references");
        let likelihood = json!({"head": "likelihood", "references": 10, "limit": 5});
        assert!(Prm.check(&params(likelihood)).is_ok());
        let unlimited = json!({"head": "likelihood", "references": 10});
        let err = Prm.check(&params(unlimited)).unwrap_err();
        assert_eq!(err.param, "references");
        let stacked = json!({"head": "likelihood", "extra_layers": 1});
        let err = Prm.check(&params(stacked)).unwrap_err();
        assert_eq!(err.param, "extra_layers");
        let none = params(json!({"samples_per_problem": 0, "perturbations": 0}));
        let err = Prm.check_wiring(&["model", "problems"], &none).unwrap_err();
        assert_eq!(err.at, ["params", "samples_per_problem"]);
        assert!(
            Prm.check_wiring(&["model", "problems", "data"], &none)
                .is_ok()
        );
    }

    fn sample(text: &str, truncated: bool) -> Completion {
        Completion {
            token_ids: vec![],
            text: text.into(),
            logprobs: vec![],
            truncated,
            finish_reason: if truncated {
                dagrun_model::generate::FinishReason::Length
            } else {
                dagrun_model::generate::FinishReason::Eos
            },
        }
    }

    #[test]
    fn references_come_from_the_problems_after_the_labelled_ones() {
        let problem = |i: usize, steps: bool| ProblemRow {
            id: format!("p{i}"),
            task: "addition".into(),
            difficulty: 1,
            prompt: format!("{i}+1="),
            answer: format!("{}", i + 1),
            steps: if steps {
                vec![format!("{i}+1={} write {}", i + 1, i + 1)]
            } else {
                Vec::new()
            },
        };
        // Problem 4 has no worked steps, so there is nothing to learn from it.
        let problems: Vec<ProblemRow> = (0..8).map(|i| problem(i, i != 4)).collect();
        let refs = reference_solutions(&problems, 3, 3);
        let prompts: Vec<&str> = refs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(prompts, ["3+1=", "5+1=", "6+1="]);
        assert_eq!(
            refs[0].1,
            "<think>\n3+1=4 write 4\n</think>\n<answer>4</answer>"
        );
        // Every problem labelled: none left; more asked than there are: what there is.
        assert!(reference_solutions(&problems, 8, 5).is_empty());
        assert!(reference_solutions(&problems, 100, 5).is_empty());
        assert_eq!(reference_solutions(&problems, 0, 100).len(), 7);
    }

    #[test]
    fn truncated_samples_are_dropped_and_counted_not_labelled_as_finished() {
        let job = Job {
            problem: ProblemRow {
                id: "p".into(),
                task: "addition".into(),
                difficulty: 1,
                prompt: "1+2+3=".into(),
                answer: "6".into(),
                steps: vec!["1+2+3=6 write 6".into()],
            },
            given: None,
        };
        let done = "<think>\n1+2+3=6 write 6\n</think>\n<answer>6</answer>";
        // Cut off mid-reasoning: its last line would otherwise be judged as its answer.
        let cut = "<think>\n1+2+3=6 wr";
        let samples = [
            sample(done, false),
            sample(cut, true),
            sample(done, false),
            sample("<think>\n1+2+3=", true),
        ];
        let (solutions, truncated) = complete_solutions(&job, &samples, false);
        assert_eq!(truncated, 2);
        assert_eq!(solutions.len(), 1, "the finished sample, once");
        assert_eq!(solutions[0].text, done);
        assert_eq!(solutions[0].correct, Some(true));
        assert!(solutions.iter().all(|s| s.text != cut));
    }

    fn chat(id: &str, answer: &str) -> crate::tables::ChatRow {
        let message = |role: &str, content: &str| crate::tables::Message {
            role: role.into(),
            content: content.into(),
        };
        crate::tables::ChatRow {
            id: id.into(),
            task: "addition".into(),
            answer: answer.into(),
            messages: vec![
                message("user", "1+2+3="),
                message(
                    "assistant",
                    "<think>\n1+2+3=6\n</think>\n<answer>6</answer>",
                ),
            ],
            steps: vec!["1+2+3=6".into()],
        }
    }

    #[test]
    fn a_data_chat_without_an_answer_is_an_error_naming_it() {
        let good = crate::tables::chat_batch(&[chat("a", "6"), chat("b", "6")]).unwrap();
        let jobs = jobs_of_chats(&[good]).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].problem.answer, "6");
        let bad = crate::tables::chat_batch(&[chat("a", "6"), chat("b", " ")]).unwrap();
        let err = jobs_of_chats(&[bad]).err().expect("no answer to verify");
        assert_eq!(
            err.to_string(),
            "input `data`: chat `b` (row 1) has no answer; PRM labels need a verifiable answer"
        );
    }

    #[test]
    fn a_problem_without_an_answer_is_an_error_naming_it() {
        let job = |id: &str, answer: &str| Job {
            problem: ProblemRow {
                id: id.into(),
                task: "addition".into(),
                difficulty: 1,
                prompt: "1+2+3=".into(),
                answer: answer.into(),
                steps: vec!["1+2+3=6".into()],
            },
            given: None,
        };
        assert!(check_answers(&[job("a", "6"), job("b", "6")]).is_ok());
        let err = check_answers(&[job("a", "6"), job("b", ""), job("c", "")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `problems`: problem `b` (row 1) has no answer; PRM labels need a verifiable answer"
        );
    }

    #[test]
    fn corruptions_are_drawn_by_weight() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let both = [(Corruption::Number, 3.0), (Corruption::Operation, 1.0)];
        let numbers = (0..4000)
            .filter(|_| pick(&both, &mut rng) == Corruption::Number)
            .count();
        assert!((2800..3200).contains(&numbers), "{numbers}");
        assert_eq!(
            pick(&[(Corruption::Operation, 1.0)], &mut rng),
            Corruption::Operation
        );
    }
}
