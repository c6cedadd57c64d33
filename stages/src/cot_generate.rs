//! Stage kind `cot_generate`: a programmatic teacher that writes verifiable problems and
//! step-by-step solutions in the R1 chat format; with `teacher:`, an OpenAI-compatible
//! endpoint writes the solutions instead (see [`crate::teacher`]).
//!
//! Every problem is drawn from its own RNG stream (seed, split, index), so the output does not
//! depend on how the work was split up: a run resumed from its shards writes the same bytes as
//! one that never stopped.

use std::collections::HashSet;

use anyhow::bail;
use dagrun_engine::Params;
use dagrun_engine::dataset::{read_checkpoint, write_parquet_atomic};
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
    WiringError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::tables::{ChatRow, Message, ProblemRow, chat_batch, metrics_batch, problems_batch};
use crate::tasks::{self, Family};
use crate::teacher::{self, Endpoint, Job, Teacher, TeacherSpec};

/// Problems per checkpoint shard.
const SHARD_ROWS: usize = 4096;
/// Draws allowed per problem before giving up on finding one not seen before.
const MAX_ATTEMPTS: u64 = 1000;

pub struct CotGenerate;

impl StageKind for CotGenerate {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "cot_generate",
            version: 3,
            doc: "generate verifiable problems (train/test) and chain-of-thought chats for the train split, written by the built-in teacher or an OpenAI-compatible endpoint",
            inputs: vec![PortSpec::optional(
                teacher::TEACHER_PORT,
                ArtifactType::Model,
                "a model that writes the solutions, with `teacher: {model: teacher}`",
            )],
            outputs: vec![
                PortSpec::one(
                    "train",
                    ArtifactType::Dataset(Some("problems")),
                    "training problems",
                ),
                PortSpec::one(
                    "test",
                    ArtifactType::Dataset(Some("problems")),
                    "held-out problems, none of which appears in train",
                ),
                PortSpec::one(
                    "cot",
                    ArtifactType::Dataset(Some("chat")),
                    "the train problems as user/assistant chats with <think> steps",
                ),
                PortSpec::one(
                    "metrics",
                    ArtifactType::Dataset(Some("metrics")),
                    "chats kept, and with a teacher endpoint: requests, resumed, retries, verified share, prompt and completion tokens",
                ),
            ],
            params: vec![
                ParamSpec::new(
                    "families",
                    ParamType::Weights {
                        keys: &["arithmetic", "addition", "linear", "word", "countdown"],
                    },
                    json!({"arithmetic": 1.0}),
                    "task families, as a list or with weights",
                ),
                ParamSpec::new(
                    "difficulty",
                    ParamType::List(Box::new(ParamType::Int { min: 1, max: 100 })),
                    json!([1, 3]),
                    "[min, max] difficulty (clamped to each family's range)",
                ),
                ParamSpec::new(
                    "n_train",
                    ParamType::Int {
                        min: 1,
                        max: 100_000_000,
                    },
                    json!(1000),
                    "training problems",
                ),
                ParamSpec::new(
                    "n_test",
                    ParamType::Int {
                        min: 0,
                        max: 10_000_000,
                    },
                    json!(200),
                    "held-out problems (unique prompts)",
                ),
                ParamSpec::unset(
                    "teacher",
                    ParamType::Map(Box::new(ParamType::Str { choices: &[] })),
                    "who writes the solutions: an OpenAI-compatible endpoint {endpoint: URL, model: NAME, api_key_env: VAR} (the key is read from that variable only), or {model: teacher} for the model on the `teacher` input; unset: the built-in teacher",
                ),
                ParamSpec::new(
                    "samples_per_problem",
                    ParamType::Int { min: 1, max: 64 },
                    json!(1),
                    "teacher: solutions asked for per problem",
                ),
                ParamSpec::new(
                    "verify",
                    ParamType::Bool,
                    json!(true),
                    "teacher: keep only solutions whose answer verifies",
                ),
                ParamSpec::new(
                    "temperature",
                    ParamType::Float { min: 0.0, max: 2.0 },
                    json!(0.6),
                    "teacher: sampling temperature",
                ),
                ParamSpec::new(
                    "max_tokens",
                    ParamType::Int {
                        min: 1,
                        max: 1_000_000,
                    },
                    json!(4096),
                    "teacher: longest reply, in tokens",
                ),
                ParamSpec::new(
                    "concurrency",
                    ParamType::Int { min: 1, max: 1024 },
                    json!(4),
                    "teacher: requests in flight (not in the key)",
                )
                .unkeyed(),
                ParamSpec::new(
                    "request_timeout",
                    ParamType::Float {
                        min: 0.001,
                        max: 86_400.0,
                    },
                    json!(300.0),
                    "teacher: seconds one request may take (not in the key)",
                )
                .unkeyed(),
                ParamSpec::new(
                    "max_retries",
                    ParamType::Int { min: 0, max: 1000 },
                    json!(6),
                    "teacher: retries of a request after 429, 5xx, a timeout or a dropped connection (not in the key)",
                )
                .unkeyed(),
                ParamSpec::new(
                    "retry_backoff",
                    ParamType::Float {
                        min: 0.0,
                        max: 600.0,
                    },
                    json!(1.0),
                    "teacher: seconds before the first retry, doubled each time, with jitter; a Retry-After header wins (not in the key)",
                )
                .unkeyed(),
            ],
            // Not in the key: the built-in and endpoint teachers do not use it, and switching it
            // must not re-ask a paid API. A local teacher samples on the device, and its samples
            // from one device are reused on another.
            device_dependent: false,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        if let Err(message) = teacher_spec(params) {
            return Err(ParamError {
                param: "teacher".into(),
                message,
            });
        }
        let range: Vec<i64> = params.get_as("difficulty").unwrap_or_default();
        match range.as_slice() {
            [lo, hi] if lo <= hi => Ok(()),
            _ => Err(ParamError {
                param: "difficulty".into(),
                message: format!(
                    "param `difficulty` must be [min, max] with min ≤ max, got {range:?}"
                ),
            }),
        }
    }

    fn check_wiring(&self, wired: &[&str], params: &Params) -> Result<(), WiringError> {
        let local = matches!(teacher_spec(params), Ok(Some(Teacher::Local(_))));
        let has = wired.contains(&teacher::TEACHER_PORT);
        match (local, has) {
            (true, false) => Err(WiringError {
                at: vec!["params".into(), "teacher".into()],
                message: "`teacher: {model: teacher}` needs a model on the `teacher` input".into(),
            }),
            (false, true) => Err(WiringError {
                at: vec!["inputs".into(), teacher::TEACHER_PORT.into()],
                message: "the `teacher` input is read only with `teacher: {model: teacher}`".into(),
            }),
            _ => Ok(()),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let families: Vec<(Family, f64)> = ctx
            .params
            .weights("families")
            .into_iter()
            .map(|(name, w)| Ok((name.parse::<Family>()?, w)))
            .collect::<anyhow::Result<_>>()?;
        if families.iter().all(|(_, w)| *w <= 0.0) {
            bail!("param `families`: at least one weight must be positive");
        }
        let range: Vec<i64> = ctx.params.get_as("difficulty")?;
        let plan = Plan {
            seed: ctx.seed,
            families,
            difficulty: (range[0] as u32, range[1] as u32),
        };
        let n_train = ctx.params.i64("n_train") as usize;
        let n_test = ctx.params.i64("n_test") as usize;
        let progress = ctx.progress((n_train + n_test) as u64, "problems");
        let resume = ctx.resume_dir().to_path_buf();

        // The test split first: train must avoid its prompts.
        let test_file = resume.join("test.parquet");
        // A checkpoint that cannot be read (a truncated file) is made again, not fatal.
        let saved = if test_file.exists() {
            read_checkpoint(&test_file)
                .map(|b| crate::tables::read_problems(&b))
                .transpose()?
        } else {
            None
        };
        let test = match saved {
            Some(test) => {
                ctx.mark_resumed();
                test
            }
            None => {
                let test = plan.test_split(n_test)?;
                write_parquet_atomic(
                    &test_file,
                    &problems_batch(&test.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>())?,
                )?;
                test.into_iter().map(|(p, _)| p).collect()
            }
        };
        progress.inc(n_test as u64);
        let test_prompts: HashSet<String> = test.iter().map(|p| p.prompt.clone()).collect();

        let shards = n_train.div_ceil(SHARD_ROWS);
        let (mut train_batches, mut cot_batches) = (Vec::new(), Vec::new());
        for shard in 0..shards {
            let (problems_file, cot_file) = (
                resume.join(format!("train-{shard:05}.parquet")),
                resume.join(format!("cot-{shard:05}.parquet")),
            );
            let range = shard * SHARD_ROWS..((shard + 1) * SHARD_ROWS).min(n_train);
            let rows = range.len() as u64;
            let saved = match problems_file.exists() && cot_file.exists() {
                true => read_checkpoint(&problems_file).zip(read_checkpoint(&cot_file)),
                false => None,
            };
            if let Some((problems, chats)) = saved {
                ctx.mark_resumed();
                train_batches.extend(problems);
                cot_batches.extend(chats);
            } else {
                let (problems, chats) = plan.train_shard(range, &test_prompts)?;
                let (problems, chats) = (problems_batch(&problems)?, chat_batch(&chats)?);
                // The cot file first: a shard counts as done once its problems file exists.
                write_parquet_atomic(&cot_file, &chats)?;
                write_parquet_atomic(&problems_file, &problems)?;
                train_batches.push(problems);
                cot_batches.push(chats);
            }
            progress.inc(rows);
        }
        let metrics = match teacher_spec(&ctx.params).map_err(anyhow::Error::msg)? {
            None => vec![(0, "kept".to_string(), n_train as f64)],
            Some(teacher) => {
                let problems = crate::tables::read_problems(&train_batches)?;
                let (chats, metrics) = ask_teacher(ctx, &teacher, &problems)?;
                cot_batches = vec![chat_batch(&chats)?];
                metrics
            }
        };
        ctx.write_dataset("test", &[problems_batch(&test)?])?;
        ctx.write_dataset("train", &train_batches)?;
        ctx.write_dataset("cot", &cot_batches)?;
        ctx.write_dataset("metrics", &[metrics_batch(&metrics)?])?;
        ctx.info(format!(
            "{n_train} train and {n_test} test problems in {shards} shards"
        ));
        Ok(())
    }
}

/// Metric rows: (step, name, value).
type Metrics = Vec<(i64, String, f64)>;

/// The `teacher` param, checked: `None` for the built-in teacher.
fn teacher_spec(params: &Params) -> Result<Option<Teacher>, String> {
    let value = params.get("teacher");
    if value.is_null() {
        return Ok(None);
    }
    Teacher::parse(value).map(Some)
}

/// The teacher's chats for `problems` (`samples_per_problem` each, in problem order; only
/// verified ones with `verify`), and the stage's metrics.
fn ask_teacher(
    ctx: &StageContext,
    teacher: &Teacher,
    problems: &[ProblemRow],
) -> anyhow::Result<(Vec<ChatRow>, Metrics)> {
    let p = &ctx.params;
    let samples = p.i64("samples_per_problem") as usize;
    let jobs: Vec<Job> = problems
        .iter()
        .flat_map(|q| {
            (0..samples).map(|sample| Job {
                id: q.id.clone(),
                sample,
                prompt: q.prompt.clone(),
            })
        })
        .collect();
    let progress = ctx.progress(jobs.len() as u64, "requests");
    let (name, (answers, usage)) = match teacher {
        Teacher::Endpoint(spec) => {
            let endpoint = endpoint(spec, p)?;
            let asked = teacher::ask_all(
                &endpoint,
                &jobs,
                p.i64("concurrency") as usize,
                ctx.resume_dir(),
                &progress,
            )?;
            (format!("{} ({})", spec.model, endpoint.url), asked)
        }
        Teacher::Local(port) => {
            let input = ctx.input(port)?;
            let local = teacher::local::LocalTeacher {
                model_dir: input.path.clone(),
                jobs: &jobs,
                samples,
                temperature: p.f64("temperature"),
                max_tokens: p.i64("max_tokens") as usize,
                seed: ctx.seed,
                resume: ctx.resume_dir(),
                progress: &progress,
            };
            // Sampling runs on one device: the first of a list.
            let device = ctx.device.parse::<dagrun_model::device::Devices>()?.first();
            let sampled = dagrun_model::device::run_on(&device, local)?;
            (format!("the `{port}` model"), sampled)
        }
    };
    let verify = p.bool("verify");
    let (mut chats, mut verified) = (Vec::new(), 0usize);
    for q in problems {
        for sample in 0..samples {
            let Some(a) = answers.get(&(q.id.clone(), sample)) else {
                continue;
            };
            let completion = a.completion();
            let ok = tasks::verify_with(&q.task, &q.answer, &completion, true);
            verified += usize::from(ok);
            if verify && !ok {
                continue;
            }
            chats.push(ChatRow {
                id: format!("{}-{sample}", q.id),
                task: q.task.clone(),
                answer: q.answer.clone(),
                steps: crate::sampling::think_steps(&completion),
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: q.prompt.clone(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: completion,
                    },
                ],
            });
        }
    }
    ctx.info(format!(
        "teacher {name}: {} requests ({} from an earlier run, {} retries), {verified} of {} verify, {} chats kept; {} prompt and {} completion tokens",
        usage.requests,
        usage.resumed,
        usage.retries,
        jobs.len(),
        chats.len(),
        usage.prompt_tokens,
        usage.completion_tokens
    ));
    let metrics = [
        ("kept", chats.len() as f64),
        ("requests", usage.requests as f64),
        ("resumed", usage.resumed as f64),
        ("retries", usage.retries as f64),
        ("verified", verified as f64 / jobs.len().max(1) as f64),
        ("prompt_tokens", usage.prompt_tokens as f64),
        ("completion_tokens", usage.completion_tokens as f64),
    ];
    Ok((
        chats,
        metrics
            .iter()
            .map(|(m, v)| (0, m.to_string(), *v))
            .collect(),
    ))
}

/// The endpoint a spec and the stage's params describe.
fn endpoint(spec: &TeacherSpec, p: &Params) -> anyhow::Result<Endpoint> {
    Ok(Endpoint {
        url: spec.chat_url(),
        model: spec.model.clone(),
        api_key: spec.api_key()?,
        timeout: std::time::Duration::from_secs_f64(p.f64("request_timeout")),
        max_retries: p.i64("max_retries") as u32,
        backoff: std::time::Duration::from_secs_f64(p.f64("retry_backoff")),
        temperature: p.f64("temperature"),
        max_tokens: p.i64("max_tokens") as u64,
    })
}

struct Plan {
    seed: u64,
    families: Vec<(Family, f64)>,
    difficulty: (u32, u32),
}

impl Plan {
    /// The RNG of one draw: independent of every other draw.
    fn rng(&self, split: u64, index: u64, attempt: u64) -> ChaCha8Rng {
        let mut h = blake3::Hasher::new();
        for x in [self.seed, split, index, attempt] {
            h.update(&x.to_le_bytes());
        }
        ChaCha8Rng::from_seed(*h.finalize().as_bytes())
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> tasks::Problem {
        let total: f64 = self.families.iter().map(|(_, w)| w).sum();
        let mut pick = rng.random::<f64>() * total;
        let mut family = self.families[0].0;
        for (f, w) in &self.families {
            if pick < *w {
                family = *f;
                break;
            }
            pick -= w;
        }
        let (flo, fhi) = tasks::difficulty_range(family);
        let lo = self.difficulty.0.clamp(flo, fhi);
        let hi = self.difficulty.1.clamp(lo, fhi);
        let difficulty = rng.random_range(lo..=hi);
        tasks::generate(family, difficulty, rng)
    }

    fn test_split(&self, n: usize) -> anyhow::Result<Vec<(ProblemRow, tasks::Problem)>> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut attempt = 0;
            let p = loop {
                let p = self.draw(&mut self.rng(1, i as u64, attempt));
                if seen.insert(p.prompt.clone()) {
                    break p;
                }
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    bail!(
                        "cannot draw {n} distinct test problems from these families and difficulties (got {i}); widen `difficulty` or lower `n_test`"
                    );
                }
            };
            out.push((row("test", i, &p), p));
        }
        Ok(out)
    }

    fn train_shard(
        &self,
        range: std::ops::Range<usize>,
        avoid: &HashSet<String>,
    ) -> anyhow::Result<(Vec<ProblemRow>, Vec<ChatRow>)> {
        let mut problems = Vec::with_capacity(range.len());
        let mut chats = Vec::with_capacity(range.len());
        for i in range {
            let mut attempt = 0;
            let p = loop {
                let p = self.draw(&mut self.rng(0, i as u64, attempt));
                if !avoid.contains(&p.prompt) {
                    break p;
                }
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    bail!(
                        "cannot draw training problems that differ from the test split; widen `difficulty` or lower `n_test`"
                    );
                }
            };
            let r = row("train", i, &p);
            chats.push(ChatRow {
                id: r.id.clone(),
                task: r.task.clone(),
                answer: r.answer.clone(),
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: p.prompt.clone(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: p.completion(),
                    },
                ],
                steps: p.steps.clone(),
            });
            problems.push(r);
        }
        Ok((problems, chats))
    }
}

fn row(split: &str, i: usize, p: &tasks::Problem) -> ProblemRow {
    ProblemRow {
        id: format!("{split}-{i:07}"),
        task: p.task.as_str().to_string(),
        difficulty: p.difficulty as i32,
        prompt: p.prompt.clone(),
        answer: p.answer.clone(),
        steps: p.steps.clone(),
    }
}
