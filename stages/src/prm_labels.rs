//! Step labels the Math-Shepherd way (Wang et al. 2023, "Math-Shepherd: Verify and Reinforce
//! LLMs Step-by-step without Human Annotations"), for the `prm` stage.
//!
//! A [`Solution`] is a completion cut into steps ([`crate::prm_score::steps_of`]). Every step
//! whose prefix can be continued is continued `n` times by a completer ([`Rollouts`]) and the
//! continuations' answers verified: the step's Monte-Carlo value is the share that verify, its
//! label 1 if any does (`hard`) or the value itself (`soft`). The last step of a complete
//! solution (its answer) is labelled by whether the solution itself verifies: there is nothing
//! left to continue. Solutions come from the completer's samples and from reference solutions
//! with one planted error ([`crate::prm_perturb`]), so both good and bad steps occur and the
//! bad one is known.
//!
//! This file owns solutions, the labelling rule, the model as a completer ([`ModelRollouts`])
//! and the `step_labels` rows. The stage (which solutions, checkpoints, training) is `prm.rs`;
//! the tests below label with a fake completer whose verdicts are known.

use std::sync::Arc;

use anyhow::{Context, ensure};
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int32Array, RecordBatch};
use arrow::datatypes::Float64Type;
use burn::tensor::backend::Backend;
use dagrun_model::CausalLm;
use dagrun_model::generate::SamplingParams;
use serde::Deserialize;

use crate::chat::ChatFormat;
use crate::prm_perturb::Perturbed;
use crate::prm_score::{Steps, steps_of};
use crate::sampling::sample_groups;
use crate::tables::{
    bool_column, int32_column, list_array, list_column, str_at, str_column, strings,
};
use crate::tasks;

/// Where a solution came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Sampled from the completer.
    Sample,
    /// A reference solution with one corrupted step (the rest of its reasoning kept).
    Perturbed,
    /// An assistant turn of the `data` input.
    Data,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Sample => "sample",
            Source::Perturbed => "perturbed",
            Source::Data => "data",
        }
    }
}

/// A solution to label.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub source: Source,
    /// The completion text (for a perturbed reference, its whole think block, without an
    /// answer).
    pub text: String,
    pub steps: Steps,
    /// Whether the solution's own answer verifies; `None` when it stops before an answer (a
    /// perturbed reference), so that every step is labelled by rollouts.
    pub correct: Option<bool>,
    /// Index of the planted bad step among `steps`.
    pub bad_step: Option<usize>,
}

impl Solution {
    /// A complete solution (a sample or a given chat), judged by `correct`.
    pub fn complete(source: Source, text: &str, correct: bool) -> Solution {
        Solution {
            source,
            text: text.to_string(),
            steps: steps_of(text),
            correct: Some(correct),
            bad_step: None,
        }
    }

    /// A perturbed reference's steps as an open think block of all of them (no answer: every
    /// step is labelled by rollouts).
    ///
    /// Its bad step is counted in the text's own steps ([`steps_of`]), which are the labels'
    /// steps: the one holding the corrupted byte. That need not be the reference step's index:
    /// a blank or tag-only reference step is no step of the text, and one with a line break is
    /// two.
    pub fn perturbed(perturbed: &Perturbed) -> Solution {
        let text = format!("<think>\n{}\n", perturbed.steps.join("\n"));
        let start: usize = "<think>\n".len()
            + perturbed.steps[..perturbed.bad]
                .iter()
                .map(|s| s.len() + 1)
                .sum::<usize>();
        let changed = start + perturbed.at;
        let steps = steps_of(&text);
        // The first step whose line ends past the changed byte holds it (a corruption changes
        // a digit or an operator, never a blank or a tag).
        let bad_step = steps.ends.iter().position(|&end| end > changed);
        Solution {
            source: Source::Perturbed,
            steps,
            text,
            correct: None,
            bad_step,
        }
    }

    /// The steps continued by rollouts: all but a complete solution's last.
    fn rolled_out(&self) -> usize {
        let n = self.steps.texts.len();
        if self.correct.is_some() {
            n.saturating_sub(1)
        } else {
            n
        }
    }
}

/// `estimation`: what a step's label is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimation {
    /// 1 when some continuation verifies, else 0.
    Hard,
    /// The share of continuations that verify.
    Soft,
}

impl Estimation {
    pub fn as_str(self) -> &'static str {
        match self {
            Estimation::Hard => "hard",
            Estimation::Soft => "soft",
        }
    }
}

/// Continues step prefixes and verifies the continuations' answers.
pub trait Rollouts {
    /// For each request `(solution index, prefix text)`, `n` verdicts: whether each of `n`
    /// continuations of the prefix reaches an answer that verifies.
    fn verdicts(&mut self, requests: &[(usize, &str)], n: usize) -> anyhow::Result<Vec<Vec<bool>>>;
}

/// A solution's labels: one label and one Monte-Carlo value per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub labels: Vec<f64>,
    pub values: Vec<f64>,
}

/// Labels every step of every solution, asking `rollouts` once for all the prefixes (so a real
/// completer batches them).
pub fn label(
    solutions: &[Solution],
    rollouts: &mut dyn Rollouts,
    n: usize,
    estimation: Estimation,
) -> anyhow::Result<Vec<Labels>> {
    let mut requests: Vec<(usize, &str)> = Vec::new();
    for (s, solution) in solutions.iter().enumerate() {
        for &end in &solution.steps.ends[..solution.rolled_out()] {
            requests.push((s, &solution.text[..end]));
        }
    }
    let verdicts = if requests.is_empty() {
        Vec::new()
    } else {
        rollouts.verdicts(&requests, n)?
    };
    ensure!(
        verdicts.len() == requests.len() && verdicts.iter().all(|v| v.len() == n),
        "rollouts returned {} verdict groups for {} prefixes",
        verdicts.len(),
        requests.len()
    );
    let mut verdicts = verdicts.into_iter();
    let mut out = Vec::with_capacity(solutions.len());
    for solution in solutions {
        let mut values: Vec<f64> = verdicts
            .by_ref()
            .take(solution.rolled_out())
            .map(|v| v.iter().filter(|&&ok| ok).count() as f64 / n.max(1) as f64)
            .collect();
        if let (Some(correct), false) = (solution.correct, solution.steps.texts.is_empty()) {
            values.push(if correct { 1.0 } else { 0.0 });
        }
        let labels = match estimation {
            Estimation::Hard => values
                .iter()
                .map(|&v| if v > 0.0 { 1.0 } else { 0.0 })
                .collect(),
            Estimation::Soft => values.clone(),
        };
        out.push(Labels { labels, values });
    }
    Ok(out)
}

/// The completer as [`Rollouts`]: every prefix after its problem's prompt (one problem per
/// "job"), `n` times, sampled in batches of similar lengths; a continuation is judged with the
/// prefix before it.
pub struct ModelRollouts<'a, B: Backend> {
    pub model: &'a CausalLm<B>,
    pub format: &'a ChatFormat,
    /// Each job's prompt ids.
    pub prompts: &'a [Vec<u32>],
    /// Each job's task and reference answer, for the verifier.
    pub answers: Vec<(&'a str, &'a str)>,
    /// The job of each solution.
    pub owner: Vec<usize>,
    pub params: SamplingParams,
    pub batch_size: usize,
    /// Read untagged answers (see `tasks::extract_answer_with`).
    pub fallback: bool,
}

impl<B: Backend> Rollouts for ModelRollouts<'_, B> {
    fn verdicts(&mut self, requests: &[(usize, &str)], n: usize) -> anyhow::Result<Vec<Vec<bool>>> {
        let mut inputs = Vec::with_capacity(requests.len());
        for (s, prefix) in requests {
            let mut ids = self.prompts[self.owner[*s]].clone();
            // The prompt may already open the reply (`<think>`): continue it, not repeat it.
            ids.extend(
                self.format
                    .tokenizer
                    .encode(self.format.reply_body(prefix), false)?,
            );
            inputs.push(ids);
        }
        // Similar lengths share a batch, so left padding costs little.
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].len());
        let sorted: Vec<Vec<u32>> = order.iter().map(|&i| inputs[i].clone()).collect();
        let groups = sample_groups(
            self.model,
            self.format,
            &sorted,
            n,
            &self.params,
            self.batch_size,
        )?;
        let wholes: Vec<Vec<String>> = order
            .iter()
            .zip(&groups)
            .map(|(&i, group)| {
                let prefix = requests[i].1;
                // `sample_groups` put the reply's opening before each continuation; here the
                // prefix holds it already.
                let opening = self.format.reply_prefix.as_str();
                group
                    .iter()
                    .map(|c| {
                        format!(
                            "{prefix}{}",
                            c.text.strip_prefix(opening).unwrap_or(&c.text)
                        )
                    })
                    .collect()
            })
            .collect();
        crate::code_exec::prejudge(
            order.iter().zip(&wholes).flat_map(|(&i, group)| {
                let (task, answer) = self.answers[self.owner[requests[i].0]];
                group.iter().map(move |w| (task, answer, w.as_str()))
            }),
            &crate::code_exec::Limits::default(),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let mut out = vec![Vec::new(); requests.len()];
        for (&i, group) in order.iter().zip(wholes) {
            let (task, answer) = self.answers[self.owner[requests[i].0]];
            out[i] = group
                .iter()
                .map(|whole| tasks::verify_with(task, answer, whole, self.fallback))
                .collect();
        }
        Ok(out)
    }
}

/// Whether problem `id` is held out from training: a share `heldout` of ids, by a hash of the
/// seed and the id (so the split does not depend on order or chunking).
pub fn is_heldout(seed: u64, id: &str, heldout: f64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(id.as_bytes());
    let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < heldout
}

/// A row of `dataset<step_labels>`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLabelRow {
    pub id: String,
    pub task: String,
    pub prompt: String,
    pub answer: String,
    pub source: String,
    pub solution: i32,
    pub steps: Vec<String>,
    pub labels: Vec<f64>,
    pub values: Vec<f64>,
    pub bad_step: Option<i32>,
    pub correct: Option<bool>,
    pub heldout: bool,
}

pub fn step_labels_batch(rows: &[StepLabelRow]) -> anyhow::Result<RecordBatch> {
    let floats = |f: fn(&StepLabelRow) -> &Vec<f64>| -> anyhow::Result<ArrayRef> {
        let values = Float64Array::from_iter_values(rows.iter().flat_map(|r| f(r).iter().copied()));
        Ok(Arc::new(list_array(
            rows.iter().map(|r| f(r).len()),
            Arc::new(values),
        )?))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| r.id.as_str())),
        strings(rows.iter().map(|r| r.task.as_str())),
        strings(rows.iter().map(|r| r.prompt.as_str())),
        strings(rows.iter().map(|r| r.answer.as_str())),
        strings(rows.iter().map(|r| r.source.as_str())),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.solution),
        )),
        Arc::new(list_array(
            rows.iter().map(|r| r.steps.len()),
            strings(rows.iter().flat_map(|r| r.steps.iter().map(String::as_str))),
        )?),
        floats(|r| &r.labels)?,
        floats(|r| &r.values)?,
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.bad_step))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| r.correct))),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.heldout)),
        )),
    ];
    Ok(RecordBatch::try_new(
        dagrun_schemas::step_labels().schema,
        columns,
    )?)
}

pub fn read_step_labels(batches: &[RecordBatch]) -> anyhow::Result<Vec<StepLabelRow>> {
    let mut out = Vec::new();
    for b in batches {
        let s = |n: &str| str_column(b, n);
        let (id, task, prompt, answer, source) = (
            s("id")?,
            s("task")?,
            s("prompt")?,
            s("answer")?,
            s("source")?,
        );
        let (solution, bad_step) = (int32_column(b, "solution")?, int32_column(b, "bad_step")?);
        let (correct, heldout) = (bool_column(b, "correct")?, bool_column(b, "heldout")?);
        let (steps, labels, values) = (
            list_column(b, "steps")?,
            list_column(b, "labels")?,
            list_column(b, "values")?,
        );
        let floats_at = |l: &arrow::array::ListArray, i: usize, n: &str| {
            let v = l.value(i);
            v.as_primitive_opt::<Float64Type>()
                .map(|v| v.values().to_vec())
                .with_context(|| format!("`{n}` items are not float64"))
        };
        for i in 0..b.num_rows() {
            let st = steps.value(i);
            let st = st
                .as_string_opt::<i32>()
                .context("`steps` items are not strings")?;
            out.push(StepLabelRow {
                id: str_at(id, i),
                task: str_at(task, i),
                prompt: str_at(prompt, i),
                answer: str_at(answer, i),
                source: str_at(source, i),
                solution: solution.value(i),
                steps: (0..st.len()).map(|j| str_at(st, j)).collect(),
                labels: floats_at(labels, i, "labels")?,
                values: floats_at(values, i, "values")?,
                bad_step: (!bad_step.is_null(i)).then(|| bad_step.value(i)),
                correct: (!correct.is_null(i)).then(|| correct.value(i)),
                heldout: heldout.value(i),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prm_perturb::tests::reference;
    use crate::prm_perturb::{Corruption, first_difference, perturb};
    use rand::SeedableRng;

    /// A completer that reaches the right answer `good_of_4` times in 4 from a prefix without
    /// the planted error, and never from one with it.
    fn completer(good_of_4: usize) -> impl FnMut(usize, &str) -> Vec<bool> {
        let reference = reference();
        move |_, prefix: &str| {
            let clean = steps_of(prefix)
                .texts
                .iter()
                .all(|s| reference.contains(s) || s.starts_with("<answer>"));
            (0..4).map(|i| clean && i < good_of_4).collect()
        }
    }

    impl<F: FnMut(usize, &str) -> Vec<bool>> Rollouts for F {
        fn verdicts(
            &mut self,
            requests: &[(usize, &str)],
            n: usize,
        ) -> anyhow::Result<Vec<Vec<bool>>> {
            assert_eq!(n, 4);
            Ok(requests.iter().map(|(s, p)| self(*s, p)).collect())
        }
    }

    fn planted(bad: usize) -> Solution {
        let mut steps = reference();
        steps[bad] = steps[bad].replace("=21 write 1", "=23 write 3");
        steps[bad] = steps[bad].replace("=11 write 11", "=13 write 13");
        let at = first_difference(&reference()[bad], &steps[bad]);
        Solution::perturbed(&Perturbed { steps, bad, at })
    }

    #[test]
    fn the_bad_step_is_counted_in_the_texts_steps_not_the_references() {
        // A blank and a tag-only step are no steps of the text; a step with a line break is two.
        let reference: Vec<String> = [
            "",
            "<think>",
            "7+5+9=21 write 1 carry 2",
            "tens:\n2+3+4+2=11 write 11",
            "so 111",
        ]
        .map(String::from)
        .to_vec();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..60 {
            let p = perturb(&reference, Corruption::Number, &mut rng).unwrap();
            let solution = Solution::perturbed(&p);
            let clean = steps_of(&format!("<think>\n{}\n", reference.join("\n"))).texts;
            let texts = &solution.steps.texts;
            let bad = solution.bad_step.unwrap();
            // The labelled bad step is the first of the text's steps that is not the reference's.
            assert_eq!(texts[..bad], clean[..bad]);
            assert_ne!(texts[bad], clean[bad], "{texts:?} at {bad}");
            assert_eq!(texts[bad + 1..], clean[bad + 1..]);
            seen.insert((p.bad, bad));
        }
        // Reference step 2 is the text's step 0, reference step 3's second line its step 2.
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [(2, 0), (3, 2)]);
    }

    #[test]
    fn a_planted_bad_step_gets_label_0_and_the_steps_before_it_1() {
        let solutions = [planted(1), planted(0)];
        let hard = label(&solutions, &mut completer(1), 4, Estimation::Hard).unwrap();
        assert_eq!(hard[0].labels, [1.0, 0.0]);
        assert_eq!(hard[0].values, [0.25, 0.0]);
        // The step after the planted one is kept, and rolled out like the others.
        assert_eq!(hard[1].labels, [0.0, 0.0]);
        let soft = label(&solutions, &mut completer(3), 4, Estimation::Soft).unwrap();
        assert_eq!(soft[0].labels, [0.75, 0.0]);
        assert_eq!(soft[0].values, soft[0].labels);
        assert_eq!(solutions[0].bad_step, Some(1));
    }

    #[test]
    fn a_complete_solutions_answer_step_is_labelled_by_its_own_verdict() {
        let text = "<think>\n7+5+9=21 write 1 carry 2\n2+3+4+2=11 write 11\n</think>\n<answer>111</answer>";
        let right = Solution::complete(Source::Sample, text, true);
        let wrong = Solution::complete(Source::Sample, text, false);
        let mut asked = Vec::new();
        let mut spy = |s: usize, p: &str| {
            asked.push((s, p.to_string()));
            vec![true; 4]
        };
        let labels = label(&[right, wrong], &mut spy, 4, Estimation::Hard).unwrap();
        assert_eq!(labels[0].labels, [1.0, 1.0, 1.0]);
        assert_eq!(labels[1].labels, [1.0, 1.0, 0.0]);
        // Two rollout prefixes each, ending with the reasoning line and its line break.
        assert_eq!(asked.len(), 4);
        assert_eq!(
            asked[1],
            (
                0,
                "<think>\n7+5+9=21 write 1 carry 2\n2+3+4+2=11 write 11\n".to_string()
            )
        );
    }

    #[test]
    fn the_heldout_share_is_about_right_and_stable() {
        let ids: Vec<String> = (0..2000).map(|i| format!("p{i}")).collect();
        let held = ids.iter().filter(|id| is_heldout(7, id, 0.1)).count();
        assert!((150..250).contains(&held), "{held}");
        assert_eq!(is_heldout(7, "p1", 0.1), is_heldout(7, "p1", 0.1));
        assert!(!is_heldout(7, "p1", 0.0));
    }

    #[test]
    fn rows_round_trip_through_arrow() {
        let rows = vec![StepLabelRow {
            id: "a".into(),
            task: "addition".into(),
            prompt: "1+2+3=".into(),
            answer: "6".into(),
            source: "perturbed".into(),
            solution: 2,
            steps: vec!["1+2+3=7 write 7".into()],
            labels: vec![0.0],
            values: vec![0.0],
            bad_step: Some(0),
            correct: None,
            heldout: true,
        }];
        let batch = step_labels_batch(&rows).unwrap();
        assert!(dagrun_schemas::step_labels().check(&batch.schema()).is_ok());
        assert_eq!(read_step_labels(&[batch]).unwrap(), rows);
    }
}
