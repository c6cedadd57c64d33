//! Sampling completions for problems, shared by the stages that generate (`eval`,
//! `rejection_filter`; `grpo` uses [`prompts_of`] and [`reward_set`]), and the chunked
//! checkpoints they resume from.
//!
//! - [`sample_groups`]: `n` completions for each of many prompts, generated `batch_size`
//!   sequences per call of the runtime's batched KV-cache [`generate`]. The result is grouped
//!   per prompt and is a pure function of (model, prompts, n, params, batch_size): batch `b`
//!   is sampled with seed [`mix_seed`]`(params.seed, [b])`.
//! - [`prompts_of`]: problems → prompt ids in the model's chat format.
//! - [`reward_set`]: a `rewards` weights param → a [`RewardSet`] tuned to `max_new_tokens`.
//! - [`think_steps`]: the reasoning lines of a completion, for `dataset<chat>`'s `steps`.
//! - [`Shards`]: numbered Parquet files in a resume directory, one per [`CHUNK`] of problems,
//!   each written atomically, so a killed stage redoes only the chunk it was in.
//! - [`SampleChunks`]: the loop that samples the chunks a stage still lacks into their shards.
//!
//! Completions carry their token count (`token_ids.len()`, including the end-of-turn token when
//! generation stopped on it) and `truncated`, which is what [`crate::rewards::Judged`] needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use arrow::array::RecordBatch;
use burn::tensor::backend::{AutodiffBackend, Backend};
use dagrun_engine::Progress;
use dagrun_engine::dataset::{read_parquet, write_parquet_atomic};
use dagrun_engine::kind::{ParamSpec, ParamType};
use dagrun_model::device::BackendTask;
use dagrun_model::generate::{Completion, SamplingParams, generate};
use dagrun_model::{CausalLm, load_model};

use serde_json::json;

use crate::chat::ChatFormat;
use crate::rewards::{RewardParams, RewardSet};
use crate::tables::ProblemRow;

/// The names of the reward functions of [`crate::rewards`], for a `rewards` weights param
/// (`ParamType::Weights { keys: REWARD_NAMES }`).
pub const REWARD_NAMES: &[&str] = &[
    "code_tests",
    "consistency",
    "correctness",
    "format",
    "length",
    "repetition",
    "steps",
];

/// A seed derived from `seed` and a path of indices (chunk, batch, …), independent for every
/// distinct path.
pub fn mix_seed(seed: u64, path: &[u64]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    for x in path {
        h.update(&x.to_le_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The prompt ids of each problem's `prompt`, as a user turn of `format`.
pub fn prompts_of(format: &ChatFormat, problems: &[ProblemRow]) -> anyhow::Result<Vec<Vec<u32>>> {
    problems
        .iter()
        .map(|p| {
            format
                .prompt_ids(&p.prompt)
                .with_context(|| format!("encoding the prompt of problem `{}`", p.id))
        })
        .collect()
}

/// `n` completions for every prompt: `out[i][j]` is the `j`-th sample for `prompts[i]`.
///
/// The prompts are repeated `n` times each (prompt-major) and generated `batch_size`
/// sequences per call; generation stops at `format.stop_ids` or `params.max_new_tokens`.
/// Temperature 0 is greedy (then `n` copies are identical: ask for `n = 1`).
pub fn sample_groups<B: Backend>(
    model: &CausalLm<B>,
    format: &ChatFormat,
    prompts: &[Vec<u32>],
    n: usize,
    params: &SamplingParams,
    batch_size: usize,
) -> anyhow::Result<Vec<Vec<Completion>>> {
    let flat: Vec<(usize, &Vec<u32>)> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| std::iter::repeat_n((i, p), n))
        .collect();
    let mut groups: Vec<Vec<Completion>> = prompts.iter().map(|_| Vec::with_capacity(n)).collect();
    for (b, batch) in flat.chunks(batch_size.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = batch.iter().map(|(_, p)| (*p).clone()).collect();
        let call = SamplingParams {
            seed: mix_seed(params.seed, &[b as u64]),
            ..params.clone()
        };
        let completions = generate(
            model,
            Some(&format.tokenizer),
            &ids,
            &format.stop_ids,
            &call,
        )?;
        for ((i, _), mut c) in batch.iter().zip(completions) {
            c.text = format.reply_text(&c.text);
            groups[*i].push(c);
        }
    }
    Ok(groups)
}

/// The rewards named in a `rewards` weights param, with the `length` reward's limit set to
/// the stage's `max_new_tokens` (its soft zone is the last quarter, at most 64 tokens).
pub fn reward_set(
    weights: &BTreeMap<String, f64>,
    max_new_tokens: usize,
) -> anyhow::Result<RewardSet> {
    // In name order (a BTreeMap's): the key does not see the order they are written in.
    let weights: Vec<(String, f64)> = weights.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let params = RewardParams {
        max_completion_len: max_new_tokens,
        soft_punish_cache: RewardParams::default()
            .soft_punish_cache
            .min(max_new_tokens / 4),
        ..RewardParams::default()
    };
    RewardSet::with_params(&weights, params).map_err(|e| anyhow::anyhow!("param `rewards`: {e}"))
}

/// The `code_tests` reward's params, for stages that score with rewards: read back by
/// [`CodeRewardParams`].
pub fn code_reward_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new(
            "code_bonus",
            ParamType::Float {
                min: 0.0,
                max: 100.0,
            },
            json!(0.5),
            "code_tests: added to the share of tests passed when all pass (open-r1 pays the share alone: 0)",
        ),
        ParamSpec::new(
            "code_timeout",
            ParamType::Float {
                min: 0.01,
                max: 3600.0,
            },
            json!(2.0),
            "code_tests: wall-clock seconds a program may run (all its asserts share one run; each input/output pair has its own)",
        ),
        ParamSpec::new(
            "code_memory_mb",
            ParamType::Int {
                min: 16,
                max: 1 << 20,
            },
            json!(512),
            "code_tests: address-space limit of a program's process, in MiB",
        ),
    ]
}

/// The params [`code_reward_params`] declare, read once (flattened into a stage's params).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CodeRewardParams {
    pub code_bonus: f64,
    pub code_timeout: f64,
    pub code_memory_mb: u64,
}

impl CodeRewardParams {
    /// The sandbox limits of a program under test.
    pub fn limits(&self) -> crate::code_exec::Limits {
        crate::code_exec::Limits {
            timeout: std::time::Duration::from_secs_f64(self.code_timeout),
            memory_bytes: self.code_memory_mb << 20,
            ..crate::code_exec::Limits::default()
        }
    }
}

/// The non-blank lines inside a completion's first `<think>…</think>` block, trimmed; none
/// when there is no closed block.
pub fn think_steps(completion: &str) -> Vec<String> {
    let Some(inside) = crate::tasks::think_block(completion) else {
        return Vec::new();
    };
    inside
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Problems are sampled and checkpointed in chunks of this many.
pub const CHUNK: usize = 32;

/// Chunk `c` of `items`.
pub fn chunk<T>(items: &[T], c: usize) -> &[T] {
    &items[c * CHUNK..((c + 1) * CHUNK).min(items.len())]
}

/// Numbered Parquet checkpoints in a directory of a stage's resume directory. A shard exists
/// whole or not at all (written to a temporary name, then renamed).
pub struct Shards {
    dir: PathBuf,
}

impl Shards {
    pub fn new(dir: &Path) -> anyhow::Result<Shards> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Shards {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("shard-{index:05}.parquet"))
    }

    /// Whether shard `index` was written whole. One whose footer cannot be read (a truncated
    /// file) is removed with a warning, so that its chunk is made again rather than failing
    /// the key for good.
    pub fn exists(&self, index: usize) -> bool {
        dagrun_engine::dataset::checkpoint_intact(&self.path(index))
    }

    /// The batches of shard `index`, if it was written.
    pub fn load(&self, index: usize) -> anyhow::Result<Option<Vec<RecordBatch>>> {
        let path = self.path(index);
        if !path.is_file() {
            return Ok(None);
        }
        Ok(Some(read_parquet(&path)?.1))
    }

    pub fn save(&self, index: usize, batch: &RecordBatch) -> anyhow::Result<()> {
        write_parquet_atomic(&self.path(index), batch)
    }

    /// For `n_items` items in [`CHUNK`]s: the chunks without a shard yet, and how many items
    /// the saved ones hold.
    pub fn missing_chunks(&self, n_items: usize) -> (Vec<usize>, usize) {
        let (mut missing, mut done) = (Vec::new(), 0);
        for c in 0..n_items.div_ceil(CHUNK) {
            if self.exists(c) {
                done += ((c + 1) * CHUNK).min(n_items) - c * CHUNK;
            } else {
                missing.push(c);
            }
        }
        (missing, done)
    }

    /// The rows of every chunk's shard, in order, each read with `read`.
    pub fn read_all<T>(
        &self,
        n_items: usize,
        read: impl Fn(&[RecordBatch]) -> anyhow::Result<Vec<T>>,
    ) -> anyhow::Result<Vec<T>> {
        let mut rows = Vec::with_capacity(n_items);
        for c in 0..n_items.div_ceil(CHUNK) {
            let batches = self
                .load(c)?
                .with_context(|| format!("checkpoint shard {c} is missing"))?;
            rows.extend(read(&batches)?);
        }
        Ok(rows)
    }
}

/// `n` completions for every prompt of the chunks `chunks` of `prompts` (user turns), sampled
/// by the model in `model_dir` with seed [`mix_seed`]`(params.seed, [chunk])` and saved as the
/// chunk's shard, which `shard` makes from the chunk's index and its completion groups. Run it
/// with `run_on`.
pub struct SampleChunks<'a, F> {
    pub model_dir: PathBuf,
    pub prompts: &'a [String],
    pub chunks: Vec<usize>,
    pub shards: &'a Shards,
    pub params: SamplingParams,
    pub n: usize,
    pub batch_size: usize,
    pub progress: &'a Progress,
    pub shard: F,
}

impl<F> BackendTask for SampleChunks<'_, F>
where
    F: Fn(usize, Vec<Vec<Completion>>) -> anyhow::Result<RecordBatch>,
{
    type Output = ();

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let model = load_model::<B::InnerBackend>(&self.model_dir, &device)?;
        let format = ChatFormat::load(&self.model_dir)?;
        for c in self.chunks {
            let texts = chunk(self.prompts, c);
            let ids = texts
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    format
                        .prompt_ids(text)
                        .with_context(|| format!("encoding prompt {}", c * CHUNK + i))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let params = SamplingParams {
                seed: mix_seed(self.params.seed, &[c as u64]),
                ..self.params.clone()
            };
            let groups = sample_groups(&model, &format, &ids, self.n, &params, self.batch_size)?;
            self.shards.save(c, &(self.shard)(c, groups)?)?;
            self.progress.inc(texts.len() as u64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_steps_are_the_nonblank_lines_of_the_think_block() {
        let c = "<think>\n7+5=12 carry 1\n\n 1+1=2 \n</think>\n<answer>22</answer>";
        assert_eq!(think_steps(c), vec!["7+5=12 carry 1", "1+1=2"]);
        assert!(think_steps("<think>\nunclosed").is_empty());
        assert!(think_steps("<answer>3</answer>").is_empty());
    }

    #[test]
    fn reward_names_are_the_reward_kinds() {
        let kinds: Vec<&str> = crate::rewards::RewardKind::ALL
            .iter()
            .map(|k| k.name())
            .collect();
        assert_eq!(kinds, REWARD_NAMES);
    }

    #[test]
    fn mixed_seeds_differ_by_path() {
        assert_ne!(mix_seed(1, &[0]), mix_seed(1, &[1]));
        assert_ne!(mix_seed(1, &[0]), mix_seed(2, &[0]));
        assert_eq!(mix_seed(7, &[3, 4]), mix_seed(7, &[3, 4]));
    }

    #[test]
    fn reward_set_fits_short_limits() {
        let w = BTreeMap::from([
            ("correctness".to_string(), 1.0),
            ("length".to_string(), 0.5),
        ]);
        assert!(reward_set(&w, 16).is_ok());
        assert_eq!(reward_set(&w, 256).unwrap().params().soft_punish_cache, 64);
        assert!(reward_set(&BTreeMap::new(), 256).is_err());
    }
}
