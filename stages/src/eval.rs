//! Stage kind `eval`: every model on held-out problems, measured the way DeepSeek-R1 reports.
//!
//! Per model and problem: one greedy completion (`correct`) and `n` ≥ `k` samples at
//! `temperature` / `top_p` (`pass1` = the share of samples that verify, `passk` = pass@k by
//! the unbiased estimator of Chen et al. from the `n` samples, `majk` = whether the majority
//! answer of the first `k` samples, voting by value, verifies), the share of samples in the
//! R1 format and their mean length. Answers are read from `<answer>` blocks only unless
//! `answer_fallback` is set. The summary table (per model, then per task family and
//! difficulty) is the stage's report; the `metrics` output holds the same means per model
//! (`step` = the model's position in `models`) and nothing that varies between runs.
//! With `rerank: prm` and a `prm` input (a process reward model), the first `k` samples are
//! also ranked by the PRM's solution score: `prm_correct` says whether the best one verifies,
//! next to `maj_correct` (= `majk`), and `maj_at_n` / `prm_at_n` hold the same over the first
//! N samples for N = 1, 2, 4, … and k, which `metrics` averages as `maj@N` and `prm@N`.
//! Sampling seeds depend on the stage seed and the problem chunk only, so every model is
//! evaluated with the same random streams. Results are checkpointed per model and chunk of
//! [`CHUNK`](crate::sampling::CHUNK) problems in the resume directory.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use dagrun_engine::dataset::read_parquet;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
    WiringError,
};
use dagrun_engine::{Params, Progress};
use dagrun_model::device::{BackendTask, Devices, run_on};
use dagrun_model::generate::{Completion, SamplingParams};
use dagrun_model::load_model;
use dagrun_model::prm::SolutionScore;
use serde::Deserialize;
use serde_json::json;

use crate::chat::ChatFormat;
use crate::eval_math::{at_n, at_n_sizes, estimate, majority_vote, mean, pass_at_k};
use crate::prm_score::{Scorer, prm_wiring, score_groups};
use crate::sampling::{Shards, chunk, mix_seed, prompts_of, sample_groups};
use crate::tables::{EvalRow, ProblemRow, eval_batch, metrics_batch, read_eval, read_problems};
use crate::tasks;

pub struct Eval;

/// The stage's params, read once.
#[derive(Debug, Clone, Deserialize)]
struct EvalParams {
    k: usize,
    n: Option<usize>,
    answer_fallback: bool,
    temperature: f32,
    top_p: f32,
    max_new_tokens: usize,
    limit: Option<usize>,
    batch_size: usize,
    rerank: String,
}

impl EvalParams {
    fn read(params: &Params) -> anyhow::Result<EvalParams> {
        params.read_into("`eval`")
    }
}

impl StageKind for Eval {
    /// The `model` column names each model by the stage that made it.
    fn labels_outputs_with_producers(&self) -> bool {
        true
    }

    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "eval",
            version: 4,
            doc: "greedy accuracy, pass@1 over n samples, pass@k, maj@k, PRM best-of-k (rerank: prm), format rate and length of each model on held-out problems",
            inputs: vec![
                PortSpec::list(
                    "models",
                    ArtifactType::Model,
                    "the models to compare (named by the stage that made each)",
                ),
                PortSpec::one(
                    "problems",
                    ArtifactType::Dataset(Some("problems")),
                    "held-out problems",
                ),
                PortSpec::optional(
                    "prm",
                    ArtifactType::Model,
                    "a process reward model (a `prm` stage's) to rank the samples with `rerank: prm`",
                ),
            ],
            outputs: vec![
                PortSpec::one(
                    "results",
                    ArtifactType::Dataset(Some("eval")),
                    "one row per model × problem",
                ),
                PortSpec::one(
                    "metrics",
                    ArtifactType::Dataset(Some("metrics")),
                    "greedy, pass1, passk, majk, format, length, maj@N (and prm@N with a PRM) per model (step = its position in `models`), overall and per task",
                ),
            ],
            params: vec![
                ParamSpec::new(
                    "k",
                    ParamType::Int { min: 1, max: 4096 },
                    json!(8),
                    "the k of pass@k and maj@k",
                ),
                ParamSpec::unset(
                    "n",
                    ParamType::Int { min: 1, max: 4096 },
                    "samples per problem, at least k (unset: k); pass@k is estimated from them without bias",
                ),
                ParamSpec::new(
                    "answer_fallback",
                    ParamType::Bool,
                    json!(false),
                    "read the last \\boxed{} (else the last number) of a completion without an <answer> block as its answer",
                ),
                ParamSpec::new(
                    "temperature",
                    ParamType::Float {
                        min: 0.0,
                        max: 100.0,
                    },
                    json!(0.6),
                    "sampling temperature of the k samples",
                ),
                ParamSpec::new(
                    "top_p",
                    ParamType::Float {
                        min: 1e-6,
                        max: 1.0,
                    },
                    json!(0.95),
                    "nucleus sampling of the k samples",
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
                ParamSpec::unset(
                    "limit",
                    ParamType::Int {
                        min: 1,
                        max: 100_000_000,
                    },
                    "evaluate the first N problems only (unset: all)",
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
                ParamSpec::new(
                    "rerank",
                    ParamType::Str {
                        choices: &["none", "prm"],
                    },
                    json!("none"),
                    "`prm`: also pick the best of the first k samples (and of the first N) by the `prm` input's score",
                ),
            ],
            device_dependent: true,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        let k = params.i64("k");
        match params.opt_i64("n") {
            Some(n) if n < k => Err(ParamError {
                param: "n".into(),
                message: format!(
                    "param `n` ({n}) must be at least `k` ({k}): pass@k draws k of the n samples"
                ),
            }),
            _ => Ok(()),
        }
    }

    fn check_wiring(&self, wired: &[&str], params: &Params) -> Result<(), WiringError> {
        prm_wiring(
            "rerank: prm",
            params.str("rerank") == "prm",
            wired.contains(&"prm"),
        )
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        // Evaluation runs on one device: the first of a list.
        let device = ctx.device.parse::<Devices>()?.first();
        let p = EvalParams::read(&ctx.params)?;
        let prm = ctx.input_opt("prm").map(|a| a.path.clone());
        if let Err(e) = prm_wiring("rerank: prm", p.rerank == "prm", prm.is_some()) {
            // The graph rejects this before anything runs; this covers callers that skip it.
            bail!("stage `{}`: {}", ctx.node, e.message);
        }
        let mut problems = read_problems(&read_parquet(&ctx.input("problems")?.path)?.1)?;
        if let Some(limit) = p.limit {
            problems.truncate(limit);
        }
        if problems.is_empty() {
            bail!("input `problems` has no rows to evaluate on");
        }
        let models = ctx.inputs("models").to_vec();
        if models.is_empty() {
            bail!("input `models` lists no model");
        }
        let cfg = Config {
            k: p.k,
            n: p.n.unwrap_or(p.k),
            fallback: p.answer_fallback,
            batch_size: p.batch_size,
            prm,
            greedy: SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: p.max_new_tokens,
                stop_strings: vec![],
                seed: 0,
            },
            sampled: SamplingParams {
                temperature: p.temperature,
                top_k: 0,
                top_p: p.top_p,
                max_new_tokens: p.max_new_tokens,
                stop_strings: vec![],
                seed: ctx.seed,
            },
        };
        let progress = ctx.progress((models.len() * problems.len()) as u64, "problems");
        let mut names: Vec<String> = Vec::new();
        let mut rows = Vec::with_capacity(models.len() * problems.len());
        let mut resumed = false;
        for (m, artifact) in models.iter().enumerate() {
            // The same model listed twice gets a distinct name.
            let name = if names.contains(&artifact.producer) {
                format!("{}#{}", artifact.producer, m + 1)
            } else {
                artifact.producer.clone()
            };
            names.push(name.clone());
            let shards = Shards::new(&ctx.resume_dir().join(format!("model-{m:03}")))?;
            let (missing, done) = shards.missing_chunks(problems.len());
            resumed |= done > 0;
            progress.inc(done as u64);
            if !missing.is_empty() {
                ctx.info(format!(
                    "evaluating `{name}` on {} problems",
                    problems.len()
                ));
                let task = EvalTask {
                    model_dir: artifact.path.clone(),
                    name: name.clone(),
                    problems: &problems,
                    chunks: missing,
                    shards: &shards,
                    cfg: &cfg,
                    progress: &progress,
                };
                run_on(&device, task)?;
            }
            rows.extend(
                shards
                    .read_all(problems.len(), read_eval)
                    .with_context(|| format!("model `{name}`"))?,
            );
        }
        if resumed {
            ctx.mark_resumed();
            ctx.info("resumed from checkpointed chunks");
        }
        ctx.write_dataset("results", &[eval_batch(&rows)?])?;
        ctx.write_dataset("metrics", &[metrics_batch(&metrics(&rows, &names))?])?;
        let report = summary(&rows, &names, &cfg);
        ctx.set_report(report);
        Ok(())
    }
}

struct Config {
    k: usize,
    /// Samples per problem, ≥ k.
    n: usize,
    /// Read untagged answers (see `tasks::extract_answer_with`).
    fallback: bool,
    batch_size: usize,
    /// The PRM directory of `rerank: prm`.
    prm: Option<PathBuf>,
    greedy: SamplingParams,
    sampled: SamplingParams,
}

struct EvalTask<'a> {
    model_dir: PathBuf,
    name: String,
    problems: &'a [ProblemRow],
    chunks: Vec<usize>,
    shards: &'a Shards,
    cfg: &'a Config,
    progress: &'a Progress,
}

impl BackendTask for EvalTask<'_> {
    type Output = ();

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let model = load_model::<B::InnerBackend>(&self.model_dir, &device)?;
        let format = ChatFormat::load(&self.model_dir)?;
        let cfg = self.cfg;
        let scorer = match &cfg.prm {
            Some(dir) => Some(
                Scorer::<B::InnerBackend>::load(dir, &device)
                    .with_context(|| format!("input `prm` ({})", dir.display()))?,
            ),
            None => None,
        };
        let (mut seen, mut correct) = (0.0, 0.0);
        for c in self.chunks {
            let chunk = chunk(self.problems, c);
            let prompts = prompts_of(&format, chunk)?;
            let greedy = sample_groups(&model, &format, &prompts, 1, &cfg.greedy, cfg.batch_size)?;
            let sampled_params = SamplingParams {
                seed: mix_seed(cfg.sampled.seed, &[c as u64]),
                ..cfg.sampled.clone()
            };
            let sampled = sample_groups(
                &model,
                &format,
                &prompts,
                cfg.n,
                &sampled_params,
                cfg.batch_size,
            )?;
            // Code problems are judged by running programs: all of the chunk's at once, on
            // every core; the verdicts below come from the memo.
            crate::code_exec::prejudge(
                chunk
                    .iter()
                    .zip(&greedy)
                    .zip(&sampled)
                    .flat_map(|((p, g), s)| {
                        g.iter()
                            .chain(s)
                            .map(move |c| (p.task.as_str(), p.answer.as_str(), c.text.as_str()))
                    }),
                &crate::code_exec::Limits::default(),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            // Each sample's verdict, once: the PRM needs them to skip problems, the rows to count.
            let verdicts: Vec<Vec<bool>> = chunk
                .iter()
                .zip(&sampled)
                .map(|(p, group)| {
                    group
                        .iter()
                        .map(|s| tasks::verify_with(&p.task, &p.answer, &s.text, cfg.fallback))
                        .collect()
                })
                .collect();
            let ranked: Vec<Option<Vec<_>>> = match &scorer {
                Some(scorer) => rank_mixed(scorer, chunk, &sampled, &verdicts, cfg)?
                    .into_iter()
                    .map(Some)
                    .collect(),
                None => vec![None; chunk.len()],
            };
            let mut rows = Vec::with_capacity(chunk.len());
            for ((((problem, greedy), samples), scores), verdicts) in chunk
                .iter()
                .zip(greedy)
                .zip(sampled)
                .zip(ranked)
                .zip(&verdicts)
            {
                let g = &greedy[0];
                let (task, answer) = (problem.task.as_str(), problem.answer.as_str());
                let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
                let n_correct = verdicts.iter().filter(|&&v| v).count();
                let n = texts.len();
                let first_k = &texts[..cfg.k.min(n)];
                let majk = majority_vote(task, answer, first_k, cfg.fallback).correct;
                let (maj_at_n, prm_at_n) = at_n(
                    task,
                    answer,
                    first_k,
                    scores.as_deref(),
                    cfg.k,
                    cfg.fallback,
                );
                rows.push(EvalRow {
                    model: self.name.clone(),
                    id: problem.id.clone(),
                    task: problem.task.clone(),
                    difficulty: problem.difficulty,
                    correct: tasks::verify_with(task, answer, &g.text, cfg.fallback),
                    pass1: n_correct as f64 / n as f64,
                    k: cfg.k as i32,
                    n: n as i32,
                    n_correct: n_correct as i32,
                    passk: pass_at_k(n, n_correct, cfg.k).unwrap_or(0.0),
                    majk,
                    format: texts.iter().filter(|t| tasks::has_format(t)).count() as f64 / n as f64,
                    length: samples
                        .iter()
                        .map(|s| s.token_ids.len() as f64)
                        .sum::<f64>()
                        / n as f64,
                    greedy_answer: tasks::extract_answer_with(task, &g.text, cfg.fallback)
                        .unwrap_or_default(),
                    greedy_format: tasks::has_format(&g.text),
                    greedy_length: g.token_ids.len() as i32,
                    greedy_completion: g.text.clone(),
                    maj_correct: majk,
                    prm_correct: prm_at_n.last().copied(),
                    maj_at_n,
                    prm_at_n,
                });
            }
            seen += rows.len() as f64;
            correct += rows.iter().map(|r| r.pass1).sum::<f64>();
            self.shards.save(c, &eval_batch(&rows)?)?;
            self.progress.inc(rows.len() as u64);
            self.progress
                .set_message(&format!("{}: pass@1 {:.3}", self.name, correct / seen));
        }
        Ok(())
    }
}

/// Means of one group of rows, as the summary prints them.
struct Figures {
    n: usize,
    greedy: String,
    pass1: String,
    passk: f64,
    majk: f64,
    format: f64,
    length: f64,
}

fn figures(rows: &[&EvalRow]) -> Figures {
    let of = |f: fn(&EvalRow) -> f64| rows.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let avg = |f: fn(&EvalRow) -> f64| mean(&of(f)).unwrap_or(f64::NAN);
    Figures {
        n: rows.len(),
        greedy: show(of(|r| r.correct as u8 as f64), false),
        pass1: show(of(|r| r.pass1), false),
        passk: avg(|r| r.passk),
        majk: avg(|r| r.majk as u8 as f64),
        format: avg(|r| r.format),
        length: avg(|r| r.length),
    }
}

/// A mean ± its standard error (with a sign when `signed`), or a dash for no values.
fn show(values: Vec<f64>, signed: bool) -> String {
    match estimate(&values) {
        Some(e) => {
            let mean = if signed {
                format!("{:+.3}", e.mean)
            } else {
                format!("{:.3}", e.mean)
            };
            match e.stderr {
                Some(se) => format!("{mean} ± {se:.3}"),
                None => mean,
            }
        }
        None => "–".to_string(),
    }
}

/// The Markdown report: one row per model, then per model, task family and difficulty.
fn summary(rows: &[EvalRow], names: &[String], cfg: &Config) -> String {
    let (k, n) = (cfg.k, cfg.n);
    let n_problems = rows.len() / names.len().max(1);
    let mut out = String::new();
    let answers = if cfg.fallback {
        "answers from <answer> blocks, else the last \\boxed{} or number"
    } else {
        "answers from <answer> blocks"
    };
    let _ = writeln!(
        out,
        "{n_problems} held-out problems; {answers}; greedy accuracy; pass@1 = mean correctness of n = {n} samples at T = {}, top_p = {} (± standard error over problems); pass@{k} unbiased from the {n} samples; maj@{k} majority vote by value of the first {k}; format = share of samples in the R1 format; length = mean sampled tokens.\n",
        cfg.sampled.temperature, cfg.sampled.top_p
    );
    let _ = writeln!(
        out,
        "| model | n | greedy | pass@1 | pass@{k} | maj@{k} | format | length |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for name in names {
        let mine: Vec<&EvalRow> = rows.iter().filter(|r| &r.model == name).collect();
        let f = figures(&mine);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.1} |",
            f.n, f.greedy, f.pass1, f.passk, f.majk, f.format, f.length
        );
    }
    if let Some((first, rest)) = names.split_first().filter(|(_, rest)| !rest.is_empty()) {
        let _ = writeln!(
            out,
            "\nPaired differences from `{first}` over the same problems (± standard error of the per-problem differences):\n"
        );
        let _ = writeln!(
            out,
            "| model | Δ greedy | Δ pass@1 | Δ pass@{k} | Δ maj@{k} |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        let base: HashMap<&str, &EvalRow> = rows
            .iter()
            .filter(|r| &r.model == first)
            .map(|r| (r.id.as_str(), r))
            .collect();
        for name in rest {
            let pairs: Vec<(&EvalRow, &EvalRow)> = rows
                .iter()
                .filter(|r| &r.model == name)
                .filter_map(|r| Some((r, *base.get(r.id.as_str())?)))
                .collect();
            let delta = |f: fn(&EvalRow) -> f64| {
                show(pairs.iter().map(|(a, b)| f(a) - f(b)).collect(), true)
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} |",
                delta(|r| r.correct as u8 as f64),
                delta(|r| r.pass1),
                delta(|r| r.passk),
                delta(|r| r.majk as u8 as f64)
            );
        }
    }
    if rows.iter().any(|r| r.prm_correct.is_some()) {
        let _ = writeln!(
            out,
            "\nBest of the first N samples by the PRM's score (prm@N) against their majority vote (maj@N):\n"
        );
        let _ = writeln!(out, "| model | N | maj@N | prm@N |");
        let _ = writeln!(out, "|---|---:|---:|---:|");
        for name in names {
            let mine: Vec<&EvalRow> = rows.iter().filter(|r| &r.model == name).collect();
            let figures: BTreeMap<String, f64> = at_n_figures(&mine)
                .into_iter()
                .filter_map(|(metric, values)| Some((metric, mean(&values)?)))
                .collect();
            for n in at_n_sizes(k) {
                let get = |m: &str| {
                    figures
                        .get(&format!("{m}@{n}"))
                        .copied()
                        .unwrap_or(f64::NAN)
                };
                let _ = writeln!(
                    out,
                    "| {name} | {n} | {:.3} | {:.3} |",
                    get("maj"),
                    get("prm")
                );
            }
        }
    }
    let _ = writeln!(out, "\nBy task family and difficulty:\n");
    let _ = writeln!(
        out,
        "| model | task | difficulty | n | greedy | pass@1 | pass@{k} | maj@{k} | format |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for name in names {
        let mut groups: BTreeMap<(&str, i32), Vec<&EvalRow>> = BTreeMap::new();
        for r in rows.iter().filter(|r| &r.model == name) {
            groups
                .entry((r.task.as_str(), r.difficulty))
                .or_default()
                .push(r);
        }
        for ((task, difficulty), group) in groups {
            let f = figures(&group);
            let _ = writeln!(
                out,
                "| {name} | {task} | {difficulty} | {} | {} | {} | {:.3} | {:.3} | {:.3} |",
                f.n, f.greedy, f.pass1, f.passk, f.majk, f.format
            );
        }
    }
    out
}

/// The PRM's scores of each problem's first `k` samples, for the problems whose first `k`
/// samples do not all verify alike. For the others any pick has the same verdict, so the
/// PRM does not score them (`None` scores: the first sample is picked) — at eval's usual
/// accuracies, most problems.
fn rank_mixed<B: Backend>(
    scorer: &Scorer<B>,
    chunk: &[ProblemRow],
    sampled: &[Vec<Completion>],
    verdicts: &[Vec<bool>],
    cfg: &Config,
) -> anyhow::Result<Vec<Vec<Option<SolutionScore>>>> {
    let mixed: Vec<bool> = verdicts
        .iter()
        .map(|v| {
            let first_k = &v[..cfg.k.min(v.len())];
            first_k.contains(&true) && first_k.contains(&false)
        })
        .collect();
    let (mut prompts, mut texts) = (Vec::new(), Vec::new());
    for ((p, group), _) in chunk.iter().zip(sampled).zip(&mixed).filter(|(_, m)| **m) {
        prompts.push(p.prompt.as_str());
        texts.push(group.iter().map(|s| s.text.as_str()).collect::<Vec<_>>());
    }
    let mut scored = score_groups(scorer, &prompts, &texts, cfg.k, cfg.batch_size)?.into_iter();
    Ok(sampled
        .iter()
        .zip(&mixed)
        .map(|(group, &m)| match m {
            true => scored
                .next()
                .expect("score_groups returns one list per group"),
            false => vec![None; group.len().min(cfg.k)],
        })
        .collect())
}

/// `maj@N` and, with a PRM, `prm@N` per problem (0 or 1) for every N of the rows' `k`.
fn at_n_figures(rows: &[&EvalRow]) -> Vec<(String, Vec<f64>)> {
    let k = rows.first().map_or(1, |r| r.k.max(1) as usize);
    let mut out = Vec::new();
    for (i, n) in at_n_sizes(k).into_iter().enumerate() {
        let at = |list: fn(&EvalRow) -> &[bool]| -> Vec<f64> {
            rows.iter()
                .filter_map(|r| list(r).get(i))
                .map(|&b| b as u8 as f64)
                .collect()
        };
        for (name, values) in [
            ("maj", at(|r| r.maj_at_n.as_slice())),
            ("prm", at(|r| r.prm_at_n.as_slice())),
        ] {
            if !values.is_empty() {
                out.push((format!("{name}@{n}"), values));
            }
        }
    }
    out
}

/// The `metrics` rows: per model (`step` = its position in `models`), the means of the
/// summary and their standard errors, then per task family; nothing that varies between
/// runs of one key.
fn metrics(rows: &[EvalRow], names: &[String]) -> Vec<(i64, String, f64)> {
    let mut out = Vec::new();
    for (m, name) in names.iter().enumerate() {
        let step = m as i64;
        let mine: Vec<&EvalRow> = rows.iter().filter(|r| &r.model == name).collect();
        let mut push = |metric: String, values: Vec<f64>, with_stderr: bool| {
            if let Some(e) = estimate(&values) {
                out.push((step, metric.clone(), e.mean));
                if let (true, Some(se)) = (with_stderr, e.stderr) {
                    out.push((step, format!("{metric}_stderr"), se));
                }
            }
        };
        let figures = |rows: &[&EvalRow]| -> [(&'static str, Vec<f64>, bool); 6] {
            let of = |f: fn(&EvalRow) -> f64| rows.iter().map(|r| f(r)).collect::<Vec<f64>>();
            [
                ("greedy", of(|r| r.correct as u8 as f64), true),
                ("pass1", of(|r| r.pass1), true),
                ("passk", of(|r| r.passk), true),
                ("majk", of(|r| r.majk as u8 as f64), true),
                ("format", of(|r| r.format), false),
                ("length", of(|r| r.length), false),
            ]
        };
        push("problems".into(), vec![mine.len() as f64], false);
        for (metric, values, with_stderr) in figures(&mine) {
            push(metric.into(), values, with_stderr);
        }
        for (metric, values) in at_n_figures(&mine) {
            push(metric, values, false);
        }
        let mut by_task: BTreeMap<&str, Vec<&EvalRow>> = BTreeMap::new();
        for r in &mine {
            by_task.entry(r.task.as_str()).or_default().push(r);
        }
        for (task, group) in by_task {
            for (metric, values, _) in figures(&group).into_iter().take(4) {
                push(format!("{task}/{metric}"), values, false);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, task: &str, correct: bool, pass1: f64) -> EvalRow {
        EvalRow {
            model: model.into(),
            id: format!("{task}-{pass1}"),
            task: task.into(),
            difficulty: 1,
            correct,
            pass1,
            k: 2,
            n: 4,
            n_correct: (pass1 * 4.0) as i32,
            passk: pass_at_k(4, (pass1 * 4.0) as usize, 2).unwrap(),
            majk: pass1 > 0.5,
            format: 1.0,
            length: 10.0,
            greedy_answer: String::new(),
            greedy_format: true,
            greedy_length: 10,
            greedy_completion: String::new(),
            maj_correct: pass1 > 0.5,
            prm_correct: Some(pass1 > 0.0),
            maj_at_n: vec![pass1 > 0.5, pass1 > 0.5],
            prm_at_n: vec![pass1 >= 0.5, pass1 > 0.0],
        }
    }

    #[test]
    fn metrics_hold_each_models_means_by_position() {
        let rows = vec![
            row("a", "linear", true, 0.5),
            row("a", "word", false, 0.25),
            row("b", "linear", true, 1.0),
            row("b", "word", true, 0.75),
        ];
        let names = vec!["a".to_string(), "b".to_string()];
        let metrics = metrics(&rows, &names);
        let get = |step: i64, name: &str| {
            metrics
                .iter()
                .find(|m| m.0 == step && m.1 == name)
                .map(|m| m.2)
        };
        assert_eq!(get(0, "problems"), Some(2.0));
        assert_eq!(get(0, "greedy"), Some(0.5));
        assert_eq!(get(0, "pass1"), Some(0.375));
        assert_eq!(get(1, "pass1"), Some(0.875));
        assert_eq!(get(1, "majk"), Some(1.0));
        assert_eq!(get(0, "word/pass1"), Some(0.25));
        assert_eq!(get(1, "linear/passk"), Some(1.0));
        assert!(get(0, "pass1_stderr").is_some());
        // k = 2: N = 1 and 2, majority and PRM best-of-N.
        assert_eq!(get(0, "maj@1"), Some(0.0));
        assert_eq!(get(1, "maj@2"), Some(1.0));
        assert_eq!(get(0, "prm@1"), Some(0.5));
        assert_eq!(get(0, "prm@2"), Some(1.0));
        assert_eq!(get(0, "prm@4"), None);
        assert_eq!(metrics, super::metrics(&rows, &names), "deterministic");
    }

    #[test]
    fn n_must_be_at_least_k() {
        let spec = Eval.spec();
        let params = |raw: serde_json::Value| {
            dagrun_engine::params::resolve(&spec, raw.as_object().unwrap()).unwrap()
        };
        assert!(Eval.check(&params(json!({"k": 4}))).is_ok());
        assert!(Eval.check(&params(json!({"k": 4, "n": 4}))).is_ok());
        let err = Eval.check(&params(json!({"k": 4, "n": 3}))).unwrap_err();
        assert_eq!(err.param, "n");
        assert!(
            err.message.contains("must be at least `k` (4)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn params_are_read_into_their_struct() {
        let params = dagrun_engine::params::resolve(&Eval.spec(), &serde_json::Map::new()).unwrap();
        let p = EvalParams::read(&params).unwrap();
        assert!(p.n.is_none() && p.limit.is_none());
        assert_eq!(p.rerank, "none");
    }
}
