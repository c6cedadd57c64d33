//! A local model artifact as the teacher (`teacher: {model: teacher}` with the `teacher` input
//! wired): the problems' solutions sampled through the batched KV-cache sampler, and journaled
//! a chunk of problems at a time in the same `teacher.jsonl` an endpoint's replies go to. Chunks
//! are fixed over all problems and seeded by their first, and a chunk with any answer missing
//! is sampled again whole, so a killed run resumes and writes what an uninterrupted one would.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::Progress;
use dagrun_model::device::BackendTask;
use dagrun_model::generate::SamplingParams;
use dagrun_model::load_model;

use super::{Answered, Answers, Job, Journal, Usage, read_journal};
use crate::chat::ChatFormat;
use crate::sampling::{CHUNK, mix_seed, sample_groups};

/// How the local teacher samples.
pub struct LocalTeacher<'a> {
    pub model_dir: PathBuf,
    /// One job per (problem, sample), samples of a problem together and in order.
    pub jobs: &'a [Job],
    pub samples: usize,
    pub temperature: f64,
    pub max_tokens: usize,
    pub seed: u64,
    pub resume: &'a Path,
    pub progress: &'a Progress,
}

impl BackendTask for LocalTeacher<'_> {
    type Output = (Answers, Usage);

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<(Answers, Usage)> {
        let journal_path = self.resume.join("teacher.jsonl");
        let mut answers = read_journal(&journal_path)?;
        let mut usage = Usage {
            resumed: answers.len() as u64,
            ..Usage::default()
        };
        // Chunks of whole problems, fixed over all of them (so seeds and batches do not depend
        // on where a run stopped); a chunk with any answer missing is sampled again whole.
        let problems: Vec<&[Job]> = self.jobs.chunks(self.samples.max(1)).collect();
        let missing = |p: &&[Job]| {
            p.iter()
                .any(|j| !answers.contains_key(&(j.id.clone(), j.sample)))
        };
        let pending: Vec<&[&[Job]]> = problems
            .chunks(CHUNK)
            .filter(|chunk| chunk.iter().any(missing))
            .collect();
        let redo: usize = pending.iter().map(|c| c.len() * self.samples).sum();
        self.progress.inc((self.jobs.len() - redo) as u64);
        if !pending.is_empty() {
            self.sample::<B>(&device, &pending, &mut answers, &mut usage, &journal_path)?;
        }
        usage.count_tokens(&answers);
        Ok((answers, usage))
    }
}

impl LocalTeacher<'_> {
    /// Samples the `pending` problems' solutions, journaling each chunk.
    fn sample<B: AutodiffBackend>(
        &self,
        device: &B::Device,
        pending: &[&[&[Job]]],
        answers: &mut Answers,
        usage: &mut Usage,
        journal_path: &Path,
    ) -> anyhow::Result<()> {
        let format = ChatFormat::load(&self.model_dir)?;
        let model = load_model::<B::InnerBackend>(&self.model_dir, device)?;
        let mut journal = Journal::open(journal_path)?;
        for &chunk in pending {
            let prompts: Vec<Vec<u32>> = chunk
                .iter()
                .map(|p| format.prompt_ids(&p[0].prompt))
                .collect::<anyhow::Result<_>>()?;
            // Seeded by the chunk's first problem, so a resumed run draws what this one would.
            let first = blake3::hash(chunk[0][0].id.as_bytes());
            let params = SamplingParams {
                temperature: self.temperature as f32,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: self.max_tokens,
                stop_strings: Vec::new(),
                seed: mix_seed(
                    self.seed,
                    &[u64::from_le_bytes(first.as_bytes()[..8].try_into()?)],
                ),
            };
            let groups = sample_groups(&model, &format, &prompts, self.samples, &params, 64)?;
            for ((problem, prompt), group) in chunk.iter().zip(&prompts).zip(groups) {
                for (job, c) in problem.iter().zip(group) {
                    let answered = Answered {
                        id: job.id.clone(),
                        sample: job.sample,
                        reasoning: None,
                        content: c.text,
                        prompt_tokens: prompt.len() as u64,
                        completion_tokens: c.token_ids.len() as u64,
                        attempts: 1,
                    };
                    journal.append(&answered).map_err(anyhow::Error::msg)?;
                    usage.requests += 1;
                    answers.insert((job.id.clone(), job.sample), answered);
                }
            }
            self.progress.inc((chunk.len() * self.samples) as u64);
        }
        Ok(())
    }
}
