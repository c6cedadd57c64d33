//! Stage kind `cot_generate`: a programmatic teacher that writes verifiable problems and
//! step-by-step solutions in the R1 chat format.
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
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::tables::{ChatRow, Message, ProblemRow, chat_batch, problems_batch};
use crate::tasks::{self, Family};

/// Problems per checkpoint shard.
const SHARD_ROWS: usize = 4096;
/// Draws allowed per problem before giving up on finding one not seen before.
const MAX_ATTEMPTS: u64 = 1000;

pub struct CotGenerate;

impl StageKind for CotGenerate {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "cot_generate",
            version: 2,
            doc: "generate verifiable problems (train/test) and chain-of-thought chats for the train split",
            inputs: vec![],
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
            ],
            device_dependent: false,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
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
        ctx.write_dataset("test", &[problems_batch(&test)?])?;
        ctx.write_dataset("train", &train_batches)?;
        ctx.write_dataset("cot", &cot_batches)?;
        ctx.info(format!(
            "{n_train} train and {n_test} test problems in {shards} shards"
        ));
        Ok(())
    }
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
