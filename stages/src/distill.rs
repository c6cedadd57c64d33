//! Stage kind `distill`: a smaller student learns from a teacher model.
//!
//! The student is made from a `preset` (with its `config` changes, initialised from the seed,
//! with the teacher's tokenizer) or comes in on the `student` input, whose tokenizer must then be
//! the teacher's: both modes compare the two models token by token.
//!
//! - `mode: sequence`, what DeepSeek-R1 did for its distilled models: the teacher writes
//!   `num_samples` solutions per prompt (the `problems`, or the user turns of `data`) at
//!   `sample_temperature`; untruncated ones whose answer verifies are kept (every untruncated one
//!   for a prompt without an answer, or with `require_correct: false`), and the student is
//!   trained on them by SFT, in `sft`'s step loop ([`crate::sft::StepLoop`]).
//! - `mode: logits`, TRL's `GKDTrainer`: the loss of every completion token is the generalised
//!   JSD of [`crate::distill_math`] between the two models' next-token distributions at
//!   `temperature`. That is the `temperature` argument of TRL's `generalized_jsd_loss`, which
//!   divides both logits, and not `GKDConfig.temperature`: GKDTrainer samples at that one and
//!   calls the loss at 1.0; our sampling temperature is `sample_temperature`. A micro-batch holds, with probability `lambda`, the student's own completions
//!   of its prompts (on-policy, sampled at `sample_temperature`); otherwise `data`'s assistant
//!   turns, or with `problems` the teacher's solutions written as in sequence mode (TRL's
//!   `seq_kd`).
//!
//! `curriculum: true` orders every epoch's batches from easy to hard by the problems'
//! `difficulty`. The teacher's solutions are checkpointed per chunk of prompts and training as
//! `sft`'s, so a killed run resumes to the outputs of an uninterrupted one. `metrics`: step-0 rows
//! about the models and the teacher's solutions, then per logged step `loss`, `lr`,
//! `grad_norm`, the mean `difficulty` of the sequences trained on (with `problems`) and, in
//! logits mode, `agreement` (share of completion tokens on which both models' most likely token
//! is the same) and `on_policy` (share of sequences the student wrote).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
    WiringError,
};
use dagrun_engine::{InputArtifact, LocatedError, Params};
use dagrun_model::device::{DeviceSpec, Devices, MultiDeviceTask, run_on, run_on_all};
use dagrun_model::generate::{Completion, SamplingParams};
use dagrun_model::score::{ScoreItem, completion_logits};
use dagrun_model::{CausalLm, ModelConfig, load_model};
use serde::Deserialize;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::checkpoint::{OptimizerParams, finish_training_from};
use crate::distill_math::{agreement, jsd_sum};
use crate::init_model::{config_param, init_preset, preset_config};
use crate::sampling::{SampleChunks, Shards, chunk, mix_seed, sample_groups};
use crate::sft::{
    Nll, StepLoop, StepLoss, TrainParams, TrainPlan, Trained, Window, checkpoint_params, last_loss,
    schedule_params, train_item,
};
use crate::tables::{SampleRow, read_chat, read_problems, read_samples, samples_batch};
use crate::tasks;

pub struct Distill;

impl StageKind for Distill {
    fn spec(&self) -> KindSpec {
        let own = vec![
            ParamSpec::new(
                "mode",
                ParamType::Str {
                    choices: &["sequence", "logits"],
                },
                json!("sequence"),
                "`sequence`: SFT on the teacher's verified solutions (DeepSeek-R1's distilled models); `logits`: match the teacher's next-token distributions (TRL's GKD)",
            ),
            ParamSpec::unset(
                "preset",
                ParamType::Str {
                    choices: dagrun_model::config::PRESETS,
                },
                "a new student of this size (initialised from the seed, with the teacher's tokenizer); leave unset when `student` is wired",
            ),
            config_param(),
            ParamSpec::new(
                "beta",
                ParamType::Float { min: 0.0, max: 1.0 },
                json!(0.5),
                "logits mode: 0 is forward KL(teacher‖student), 1 reverse KL, between the generalised JSD (TRL's beta)",
            ),
            ParamSpec::new(
                "lambda",
                ParamType::Float { min: 0.0, max: 1.0 },
                json!(0.5),
                "logits mode: share of micro-batches the student writes itself, on-policy (TRL's lmbda)",
            ),
            ParamSpec::new(
                "temperature",
                ParamType::Float {
                    min: 0.0,
                    max: 100.0,
                },
                json!(1.0),
                "logits mode: the loss temperature of TRL's generalized_jsd_loss, dividing both models' logits; not GKDConfig's `temperature` (GKDTrainer samples on-policy completions at it and leaves the loss at 1), which is `sample_temperature` here",
            ),
            ParamSpec::new(
                "sample_temperature",
                ParamType::Float {
                    min: 0.0,
                    max: 100.0,
                },
                json!(0.9),
                "sampling temperature of the teacher's solutions and the student's on-policy sequences (0: greedy; TRL's GKD default)",
            ),
            ParamSpec::new(
                "num_samples",
                ParamType::Int { min: 1, max: 4096 },
                json!(1),
                "solutions the teacher writes per prompt",
            ),
            ParamSpec::new(
                "max_new_tokens",
                ParamType::Int {
                    min: 1,
                    max: 1_000_000,
                },
                json!(256),
                "length limit of generated solutions (the teacher's and the student's)",
            ),
            ParamSpec::new(
                "require_correct",
                ParamType::Bool,
                json!(true),
                "keep only teacher solutions whose answer verifies (a prompt without an answer keeps every untruncated one)",
            ),
            ParamSpec::new(
                "curriculum",
                ParamType::Bool,
                json!(false),
                "order each epoch's batches from easy to hard by the problems' difficulty (needs `problems`)",
            ),
            ParamSpec::unset(
                "limit",
                ParamType::Int {
                    min: 1,
                    max: 100_000_000,
                },
                "use the first N prompts only (unset: all)",
            ),
            ParamSpec::new(
                "sample_batch_size",
                ParamType::Int {
                    min: 1,
                    max: 65_536,
                },
                json!(64),
                "sequences per generation call",
            ),
        ];
        KindSpec {
            name: "distill",
            version: 2,
            doc: "train a smaller student on a teacher's verified solutions (sequence) or next-token distributions (logits, TRL's GKD)",
            inputs: vec![
                PortSpec::one("teacher", ArtifactType::Model, "the model to learn from"),
                PortSpec::optional(
                    "student",
                    ArtifactType::Model,
                    "the student to train (instead of a `preset`); it must use the teacher's tokenizer",
                ),
                PortSpec::optional(
                    "data",
                    ArtifactType::Dataset(Some("chat")),
                    "prompts (the last user turn), answers and, for logits mode, sequences (the last assistant turn)",
                ),
                PortSpec::optional(
                    "problems",
                    ArtifactType::Dataset(Some("problems")),
                    "problems for the teacher to solve (instead of `data`)",
                ),
            ],
            outputs: vec![
                PortSpec::one("model", ArtifactType::Model, "the trained student"),
                PortSpec::one(
                    "metrics",
                    ArtifactType::Dataset(Some("metrics")),
                    "model sizes and teacher solutions at step 0; loss, lr, grad_norm, difficulty, and in logits mode agreement and on_policy per logged step",
                ),
            ],
            params: [schedule_params(), own, checkpoint_params()].concat(),
            device_dependent: true,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        if params.opt_f64("temperature") == Some(0.0) {
            return Err(ParamError {
                param: "temperature".into(),
                message: "param `temperature` must be above 0: it divides the logits".into(),
            });
        }
        let changes = params.get("config");
        match params.opt_str("preset") {
            // The vocabulary is the teacher's, known at run time; any size checks the shape.
            Some(preset) => preset_config(preset, changes, 100).map(|_| ()),
            None if changes.as_object().is_some_and(|m| !m.is_empty()) => Err(ParamError {
                param: "config".into(),
                message: "param `config` changes a preset, but `preset` is not set".into(),
            }),
            None => Ok(()),
        }
    }

    fn check_wiring(&self, wired: &[&str], params: &Params) -> Result<(), WiringError> {
        let has = |port: &str| wired.contains(&port);
        wiring(
            has("data"),
            has("problems"),
            has("student"),
            params.opt_str("preset").is_some(),
            params.get("curriculum").as_bool() == Some(true),
        )
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let (p, train) = (
            DistillParams::read(&ctx.params)?,
            TrainParams::read(&ctx.params)?,
        );
        let devices: Devices = ctx.device.parse()?;
        // The teacher samples on one device; the student trains on all of them.
        let device = devices.first();
        let teacher = ctx.input("teacher")?.clone();
        let format = ChatFormat::load(&teacher.path)?;
        let teacher_config = ModelConfig::load(&teacher.path.join("config.json"))?;
        let (student_dir, files_from) = student(ctx, &p, &teacher, &format)?;
        let student_config = ModelConfig::load(&student_dir.join("config.json"))?;
        let sizes = (teacher_config.num_params(), student_config.num_params());
        ctx.info(format!(
            "teacher {} parameters, student {} ({:.2}×)",
            sizes.0,
            sizes.1,
            sizes.1 as f64 / sizes.0.max(1) as f64
        ));
        let mut head = vec![
            (0, "teacher/params".to_string(), sizes.0 as f64),
            (0, "student/params".to_string(), sizes.1 as f64),
        ];
        let prompts = read_prompts(ctx, p.limit)?;
        let pairs = sequences(ctx, &device, &teacher.path, &prompts, &p, &mut head)?;
        let mut items = Vec::with_capacity(pairs.len());
        let mut difficulty = Vec::with_capacity(pairs.len());
        for (i, completion) in &pairs {
            items.push(train_item(
                &format,
                &prompts[*i].user,
                completion,
                train.max_length,
            )?);
            difficulty.push(prompts[*i].difficulty);
        }
        let difficulty: Option<Vec<i32>> = difficulty.into_iter().collect();
        let mut plan = TrainPlan::new(&train, &items, ctx.seed);
        if p.curriculum {
            let levels = difficulty
                .clone()
                .context("param `curriculum` needs the problems' difficulty")?;
            plan = plan.with_curriculum(levels);
        }
        let task = DistillTask {
            optimizer: OptimizerParams::read(&ctx.params)?,
            steps: StepLoop::new(ctx, train, plan)?,
            p,
            items,
            difficulty,
            teacher_dir: teacher.path.clone(),
            student_dir,
        };
        let trained = run_on_all(&devices, task)?;
        trained.log(ctx);
        head.extend(trained.metrics);
        finish_training_from(ctx, &files_from, trained.resumed_from, &head)?;
        ctx.info(format!("final loss {:.4}", last_loss(&head)));
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Sequence,
    Logits,
}

/// This kind's own params, read once (the step loop's are [`TrainParams`]).
#[derive(Debug, Clone, Deserialize)]
struct DistillParams {
    mode: Mode,
    preset: Option<String>,
    config: serde_json::Value,
    beta: f64,
    lambda: f64,
    temperature: f64,
    sample_temperature: f64,
    num_samples: usize,
    max_new_tokens: usize,
    require_correct: bool,
    curriculum: bool,
    limit: Option<usize>,
    sample_batch_size: usize,
}

impl DistillParams {
    fn read(params: &Params) -> anyhow::Result<DistillParams> {
        params.read_into("`distill`")
    }

    fn sampling(&self, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.sample_temperature as f32,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: self.max_new_tokens,
            stop_strings: vec![],
            seed,
        }
    }
}

/// The student's directory (the `student` input, or a `preset` made in the resume directory)
/// and the directory its tokenizer and generation files come from.
fn student(
    ctx: &StageContext,
    p: &DistillParams,
    teacher: &InputArtifact,
    format: &ChatFormat,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let Some(student) = ctx.input_opt("student") {
        same_tokenizer(teacher, student)?;
        return Ok((student.path.clone(), student.path.clone()));
    }
    let dir = ctx.resume_dir().join("student");
    // Made again by every run: it is a pure function of the key, and a killed run may have
    // left it half written.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let preset = p.preset.as_deref().context("param `preset` is not set")?;
    let vocab = ModelConfig::load(&teacher.path.join("config.json"))?.vocab_size;
    init_preset(preset, &p.config, &format.tokenizer, vocab, ctx.seed, &dir)?;
    Ok((dir, teacher.path.clone()))
}

/// The (prompt index, completion) pairs to train on: `data`'s assistant turns in logits mode,
/// else the teacher's kept solutions (with step-0 rows about them added to `head`).
fn sequences(
    ctx: &mut StageContext,
    device: &DeviceSpec,
    teacher: &Path,
    prompts: &[Prompt],
    p: &DistillParams,
    head: &mut Vec<(i64, String, f64)>,
) -> anyhow::Result<Vec<(usize, String)>> {
    if p.mode == Mode::Logits && prompts.iter().all(|q| q.reference.is_some()) {
        return Ok(prompts
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.reference.clone().map(|r| (i, r)))
            .collect());
    }
    let samples = teacher_solutions(ctx, device, teacher, prompts, p)?;
    crate::code_exec::prejudge(
        samples
            .iter()
            .map(|s| (s.task.as_str(), s.answer.as_str(), s.completion.as_str())),
        &crate::code_exec::Limits::default(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let kept = keep_solutions(prompts, &samples, p.num_samples, p.require_correct)?;
    let judged: Vec<&SampleRow> = samples.iter().filter(|s| !s.answer.is_empty()).collect();
    let correct = judged
        .iter()
        .filter(|s| tasks::verify(&s.task, &s.answer, &s.completion))
        .count();
    ctx.info(format!(
        "the teacher wrote {} solutions to {} prompts: {correct} of {} with an answer verify, {} kept",
        samples.len(),
        prompts.len(),
        judged.len(),
        kept.len()
    ));
    head.extend([
        (0, "teacher/solutions".to_string(), samples.len() as f64),
        (
            0,
            "teacher/correct".to_string(),
            correct as f64 / judged.len().max(1) as f64,
        ),
        (0, "teacher/kept".to_string(), kept.len() as f64),
    ]);
    if kept.is_empty() {
        bail!(
            "none of the teacher's {} solutions can be trained on (truncated, or their answers do not verify with `require_correct`)",
            samples.len()
        );
    }
    Ok(kept)
}

/// Which inputs and params go together: `data` or `problems`, a `student` input or a `preset`,
/// and a curriculum only with `problems` (chats have no difficulty). Errors name what to fix.
fn wiring(
    data: bool,
    problems: bool,
    student: bool,
    preset: bool,
    curriculum: bool,
) -> Result<(), WiringError> {
    match (data, problems) {
        (true, true) => {
            return Err(WiringError::at(
                &["inputs", "problems"],
                "wire either `data` (chats) or `problems`, not both",
            ));
        }
        (false, false) => {
            return Err(WiringError::at(
                &["inputs"],
                "needs `data` (chats) or `problems` for the teacher to solve",
            ));
        }
        _ => {}
    }
    match (student, preset) {
        (true, true) => {
            return Err(WiringError::at(
                &["params", "preset"],
                "param `preset` makes a new student, but input `student` is wired too: use one of them",
            ));
        }
        (false, false) => {
            return Err(WiringError::at(
                &["inputs"],
                "needs a student: a `preset` param (with its `config` changes) or a `student` input",
            ));
        }
        _ => {}
    }
    if curriculum && data {
        return Err(WiringError::at(
            &["params", "curriculum"],
            "param `curriculum` orders problems by difficulty, which input `data` (chats) does not have: wire `problems` instead",
        ));
    }
    Ok(())
}

/// A run-time error unless the student's tokenizer (and so its vocabulary) is the teacher's,
/// located at the stage's `student` input in the pipeline file.
fn same_tokenizer(teacher: &InputArtifact, student: &InputArtifact) -> anyhow::Result<()> {
    let differs = |what: String| {
        anyhow::Error::new(LocatedError::at(
            &["inputs", "student"],
            format!(
                "the student (input `student`, from stage `{}`) and the teacher (input `teacher`, from stage `{}`) have different tokenizers ({what}): distillation compares them token by token, so the student must use the teacher's tokenizer",
                student.producer, teacher.producer
            ),
        ))
    };
    // Compared as JSON, so formatting alone never counts as a difference.
    let read = |dir: &Path, file: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(dir.join(file)).ok()?).ok()
    };
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        if read(&teacher.path, file) != read(&student.path, file) {
            return Err(differs(format!("{file} differs")));
        }
    }
    let vocab = |dir: &Path| ModelConfig::load(&dir.join("config.json")).map(|c| c.vocab_size);
    let (t, s) = (vocab(&teacher.path)?, vocab(&student.path)?);
    if t != s {
        return Err(differs(format!("vocab_size {s} against {t}")));
    }
    Ok(())
}

/// A prompt to distill on, from `problems` or from `data`.
#[derive(Debug, Clone)]
struct Prompt {
    id: String,
    task: String,
    answer: String,
    user: String,
    /// The problem's difficulty; `None` for chats.
    difficulty: Option<i32>,
    /// A chat's assistant turn.
    reference: Option<String>,
}

/// The prompts of the `problems` or `data` input, the first `limit` of them.
fn read_prompts(ctx: &StageContext, limit: Option<usize>) -> anyhow::Result<Vec<Prompt>> {
    let mut prompts: Vec<Prompt> = if let Some(problems) = ctx.input_opt("problems") {
        read_problems(&read_parquet(&problems.path)?.1)?
            .into_iter()
            .map(|r| Prompt {
                id: r.id,
                task: r.task,
                answer: r.answer,
                user: r.prompt,
                difficulty: Some(r.difficulty),
                reference: None,
            })
            .collect()
    } else {
        read_chat(&read_parquet(&ctx.input("data")?.path)?.1)?
            .into_iter()
            .filter_map(|r| {
                let last = |role: &str| {
                    r.messages
                        .iter()
                        .rev()
                        .find(|m| m.role == role)
                        .map(|m| m.content.clone())
                };
                Some(Prompt {
                    user: last("user")?,
                    reference: last("assistant"),
                    id: r.id,
                    task: r.task,
                    answer: r.answer,
                    difficulty: None,
                })
            })
            .collect()
    };
    prompts.truncate(limit.unwrap_or(usize::MAX));
    if prompts.is_empty() {
        bail!("no prompts to distill on (the input has no rows, or no chat has a user turn)");
    }
    Ok(prompts)
}

/// `num_samples` teacher solutions per prompt, chunk by chunk, resuming from the chunks a
/// killed run checkpointed.
fn teacher_solutions(
    ctx: &mut StageContext,
    device: &DeviceSpec,
    teacher: &Path,
    prompts: &[Prompt],
    p: &DistillParams,
) -> anyhow::Result<Vec<SampleRow>> {
    let shards = Shards::new(&ctx.resume_dir().join("teacher"))?;
    let (missing, done) = shards.missing_chunks(prompts.len());
    if done > 0 {
        ctx.mark_resumed();
        ctx.info(format!(
            "resuming: the teacher solved {done} of {} prompts before",
            prompts.len()
        ));
    }
    if !missing.is_empty() {
        let progress = ctx.progress(prompts.len() as u64, "prompts");
        progress.inc(done as u64);
        let users: Vec<String> = prompts.iter().map(|q| q.user.clone()).collect();
        let task = SampleChunks {
            model_dir: teacher.to_path_buf(),
            prompts: &users,
            chunks: missing,
            shards: &shards,
            params: p.sampling(ctx.seed),
            n: p.num_samples,
            batch_size: p.sample_batch_size,
            progress: &progress,
            shard: |c, groups: Vec<Vec<Completion>>| {
                let mut rows = Vec::new();
                for (q, group) in chunk(prompts, c).iter().zip(groups) {
                    rows.extend(group.into_iter().map(|completion| SampleRow {
                        step: 0,
                        id: q.id.clone(),
                        task: q.task.clone(),
                        prompt: q.user.clone(),
                        answer: q.answer.clone(),
                        length: completion.token_ids.len() as i32,
                        completion: completion.text,
                        // Judged when the solutions are kept, not here.
                        reward: f64::NAN,
                        components: vec![],
                        advantage: 0.0,
                        truncated: completion.truncated,
                    }));
                }
                samples_batch(&rows)
            },
        };
        run_on(device, task)?;
    }
    shards.read_all(prompts.len(), read_samples)
}

/// The teacher's solutions to train on, as (prompt index, solution): untruncated, verified when
/// `require_correct` and the prompt has an answer, each distinct solution of a prompt once.
/// `samples` are `num_samples` per prompt in prompt order, as [`teacher_solutions`] writes them,
/// so a sample's prompt is found by its position (ids need not be unique: `data` may repeat one).
fn keep_solutions(
    prompts: &[Prompt],
    samples: &[SampleRow],
    num_samples: usize,
    require_correct: bool,
) -> anyhow::Result<Vec<(usize, String)>> {
    if samples.len() != prompts.len() * num_samples {
        bail!(
            "the teacher's checkpointed solutions are {} rows, not {num_samples} for each of {} prompts",
            samples.len(),
            prompts.len()
        );
    }
    let mut kept = Vec::new();
    let mut seen: HashSet<(usize, &str)> = HashSet::new();
    for (index, (q, group)) in prompts
        .iter()
        .zip(samples.chunks(num_samples.max(1)))
        .enumerate()
    {
        for s in group {
            let verified = q.answer.is_empty()
                || !require_correct
                || tasks::verify(&q.task, &q.answer, &s.completion);
            if !s.truncated && verified && seen.insert((index, s.completion.as_str())) {
                kept.push((index, s.completion.clone()));
            }
        }
    }
    Ok(kept)
}

struct DistillTask {
    optimizer: OptimizerParams,
    steps: StepLoop,
    p: DistillParams,
    items: Vec<ScoreItem>,
    difficulty: Option<Vec<i32>>,
    teacher_dir: PathBuf,
    student_dir: PathBuf,
}

impl MultiDeviceTask for DistillTask {
    type Output = Trained;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> anyhow::Result<Trained> {
        let device = devices[0].clone();
        let start = self.steps.checkpoint().restore_or_start::<B>(
            &self.student_dir,
            &self.optimizer,
            &device,
            None,
        )?;
        let format = ChatFormat::load(&self.teacher_dir)?;
        let teacher = match self.p.mode {
            Mode::Logits => Some(load_model::<B::InnerBackend>(&self.teacher_dir, &device)?),
            Mode::Sequence => None,
        };
        let mut loss = DistillLoss {
            nll: Nll {
                items: &self.items,
                pad_id: format.pad_id,
            },
            difficulty: self.difficulty.as_deref(),
            teacher,
            format: &format,
            p: &self.p,
            max_length: self.steps.max_length(),
            seed: self.steps.seed(),
        };
        self.steps.run(&devices, start, &mut loss)
    }
}

/// The sequences and the loss of a distillation step (see [`StepLoss`]).
struct DistillLoss<'a, B: AutodiffBackend> {
    /// The items, and sequence mode's loss.
    nll: Nll<'a>,
    difficulty: Option<&'a [i32]>,
    /// Logits mode's frozen teacher; `None` in sequence mode.
    teacher: Option<CausalLm<B::InnerBackend>>,
    format: &'a ChatFormat,
    p: &'a DistillParams,
    max_length: usize,
    seed: u64,
}

impl<B: AutodiffBackend> DistillLoss<'_, B> {
    /// Whether micro-batch `micro` of step `step` is on-policy: a seeded draw below `lambda`,
    /// the same in a resumed run.
    fn on_policy(&self, step: u64, micro: usize) -> bool {
        let draw = (mix_seed(self.seed, &[step, micro as u64]) >> 11) as f64 / (1u64 << 53) as f64;
        draw < self.p.lambda
    }

    /// The student's own completions of `items`' prompts.
    fn student_samples(
        &self,
        model: &CausalLm<B>,
        items: &[ScoreItem],
        step: u64,
        micro: usize,
    ) -> anyhow::Result<Vec<ScoreItem>> {
        let prompts: Vec<Vec<u32>> = items.iter().map(|i| i.prompt.clone()).collect();
        let sampling = self
            .p
            .sampling(mix_seed(self.seed, &[step, micro as u64, 1]));
        let groups = sample_groups(
            &model.valid(),
            self.format,
            &prompts,
            1,
            &sampling,
            self.p.sample_batch_size,
        )?;
        Ok(prompts
            .into_iter()
            .zip(groups)
            .map(|(prompt, mut group)| {
                let mut completion = group.pop().map(|c| c.token_ids).unwrap_or_default();
                if completion.is_empty() {
                    completion.push(self.format.end_id);
                }
                completion.truncate(self.max_length.saturating_sub(prompt.len()).max(1));
                ScoreItem { prompt, completion }
            })
            .collect())
    }
}

impl<B: AutodiffBackend> StepLoss<B> for DistillLoss<'_, B> {
    fn sequences(
        &mut self,
        model: &CausalLm<B>,
        step: u64,
        micro: usize,
        batch: &[usize],
        window: &mut Window,
    ) -> anyhow::Result<Vec<ScoreItem>> {
        let items = self.nll.sequences(model, step, micro, batch, window)?;
        if let Some(levels) = self.difficulty {
            let sum: i64 = batch.iter().map(|&i| i64::from(levels[i])).sum();
            window.add("difficulty", sum as f64, batch.len() as f64);
        }
        if self.teacher.is_none() {
            return Ok(items);
        }
        let on_policy = self.on_policy(step, micro);
        window.add(
            "on_policy",
            if on_policy { items.len() as f64 } else { 0.0 },
            items.len() as f64,
        );
        if on_policy {
            self.student_samples(model, &items, step, micro)
        } else {
            Ok(items)
        }
    }

    fn replica(&self, device: &B::Device) -> anyhow::Result<Self> {
        Ok(DistillLoss {
            teacher: self.teacher.clone().map(|t| t.to_device(device)),
            ..*self
        })
    }

    fn loss(
        &mut self,
        model: &CausalLm<B>,
        items: &[ScoreItem],
        window: &mut Window,
    ) -> anyhow::Result<Tensor<B, 1>> {
        let Some(teacher) = &self.teacher else {
            return self.nll.loss(model, items, window);
        };
        let pad = self.format.pad_id;
        let student = completion_logits(model, items, pad)?;
        let teacher = Tensor::<B, 2>::from_inner(completion_logits(teacher, items, pad)?.logits);
        let width = student.width;
        let mask: Vec<f32> = items
            .iter()
            .flat_map(|i| (0..width).map(move |k| if k < i.completion.len() { 1.0 } else { 0.0 }))
            .collect();
        let tokens: f32 = mask.iter().sum();
        window.add(
            "agreement",
            agreement(student.logits.clone(), teacher.clone(), &mask),
            f64::from(tokens),
        );
        let rows = mask.len();
        let mask = Tensor::<B, 1>::from_data(TensorData::new(mask, [rows]), &model.device());
        Ok(jsd_sum(
            student.logits,
            teacher,
            mask,
            self.p.beta,
            self.p.temperature,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: &str, answer: &str) -> Prompt {
        Prompt {
            id: id.into(),
            task: "arithmetic".into(),
            answer: answer.into(),
            user: "3+4=".into(),
            difficulty: Some(1),
            reference: None,
        }
    }

    fn sample(id: &str, completion: &str, truncated: bool) -> SampleRow {
        SampleRow {
            step: 0,
            id: id.into(),
            task: "arithmetic".into(),
            prompt: "3+4=".into(),
            answer: String::new(),
            completion: completion.into(),
            reward: f64::NAN,
            components: vec![],
            advantage: 0.0,
            length: 5,
            truncated,
        }
    }

    #[test]
    fn verified_distinct_untruncated_solutions_are_kept() {
        let right = "<think>\n3+4=7\n</think>\n<answer>7</answer>";
        let wrong = "<think>\n3+4=8\n</think>\n<answer>8</answer>";
        let prompts = [prompt("a", "7"), prompt("b", ""), prompt("c", "7")];
        let samples = [
            sample("a", right, false),
            sample("a", right, false),
            sample("a", wrong, false),
            sample("b", wrong, false),
            sample("b", wrong, false),
            sample("b", wrong, false),
            sample("c", right, true),
            sample("c", wrong, false),
            sample("c", wrong, true),
        ];
        let kept = keep_solutions(&prompts, &samples, 3, true).unwrap();
        // Once per distinct solution; no answer to check keeps it; truncated never.
        assert_eq!(kept, [(0, right.to_string()), (1, wrong.to_string())]);
        let lenient = keep_solutions(&prompts, &samples, 3, false).unwrap();
        assert_eq!(
            lenient,
            [
                (0, right.to_string()),
                (0, wrong.to_string()),
                (1, wrong.to_string()),
                (2, wrong.to_string())
            ]
        );
        assert!(keep_solutions(&prompts, &samples[..8], 3, true).is_err());
    }

    #[test]
    fn prompts_that_share_an_id_keep_their_own_solutions() {
        let seven = "<think>\n3+4=7\n</think>\n<answer>7</answer>";
        let eight = "<think>\n4+4=8\n</think>\n<answer>8</answer>";
        // Two `data` chats with one id, different problems: each sample is its own prompt's.
        let prompts = [prompt("x", "7"), prompt("x", "8")];
        let samples = [
            sample("x", seven, false),
            sample("x", eight, false),
            sample("x", eight, false),
            sample("x", seven, false),
        ];
        let kept = keep_solutions(&prompts, &samples, 2, true).unwrap();
        assert_eq!(kept, [(0, seven.to_string()), (1, eight.to_string())]);
    }

    #[test]
    fn wiring_names_what_to_fix() {
        let at = |d, p, s, preset, c| wiring(d, p, s, preset, c).err().map(|e| e.at.join("."));
        assert_eq!(at(false, true, false, true, true), None);
        assert_eq!(at(true, false, true, false, false), None);
        assert_eq!(
            at(true, true, false, true, false).unwrap(),
            "inputs.problems"
        );
        assert_eq!(at(false, false, false, true, false).unwrap(), "inputs");
        assert_eq!(at(false, true, true, true, false).unwrap(), "params.preset");
        assert_eq!(at(false, true, false, false, false).unwrap(), "inputs");
        assert_eq!(
            at(true, false, false, true, true).unwrap(),
            "params.curriculum"
        );
    }

    #[test]
    fn the_temperature_doc_says_it_is_the_loss_temperature_not_gkds_sampling_one() {
        let spec = Distill.spec();
        let doc = spec
            .params
            .iter()
            .find(|p| p.name == "temperature")
            .unwrap()
            .doc;
        assert!(doc.contains("loss temperature") && doc.contains("`sample_temperature`"));
    }

    #[test]
    fn params_are_read_into_their_struct() {
        let spec = Distill.spec();
        let params = dagrun_engine::params::resolve(&spec, &serde_json::Map::new()).unwrap();
        let p = DistillParams::read(&params).unwrap();
        assert_eq!(p.mode, Mode::Sequence);
        assert_eq!((p.beta, p.lambda, p.temperature), (0.5, 0.5, 1.0));
        assert!(p.preset.is_none() && p.limit.is_none());
        let t = TrainParams::read(&params).unwrap();
        assert_eq!(t.max_steps, None);
        assert_eq!(t.batch_size, 32);
    }
}
