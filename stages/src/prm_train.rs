//! Training the `prm` stage's model on its step labels, and the figures the stage reports.
//!
//! The PRM starts as the completer's decoder with a fresh head ([`ProcessRewardModel::from_lm`]).
//! Each optimizer step takes `batch_size` labelled solutions in a seeded per-epoch order and
//! minimises the binary cross-entropy of the head's logit at every step end against the step's
//! label, averaged over the steps of the batch. With head `likelihood` a step is instead
//! `reference_batch_size` reference solutions (their own seeded per-epoch order) and the
//! language-model loss on them; after the last step the head's weight and bias are fitted to
//! the labels by BCE on the trained decoder's step log-likelihoods ([`fit_logistic`]).
//! Checkpoints (the PRM, AdamW's moments, the step, the metrics so far and the running loss
//! sums) go to the resume directory every `checkpoint_every` steps, so a resumed run writes
//! the bytes an uninterrupted one does.
//! After the last step the PRM scores the held-out solutions: step-level accuracy (a score of
//! at least 0.5 against a label of at least 0.5), BCE, and on perturbed solutions how often the
//! weakest step is the planted one, over all of them and over those whose planted step is not
//! their last (where a PRM cannot find it by its position).
//!
//! Labelling and the stage's params are `prm.rs`; the model side is `dagrun_model::prm`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use dagrun_engine::{Progress, StageContext};
use dagrun_model::load_model;
use dagrun_model::optim::{AdamW, AdamWConfig, GradAccumulator, LrSchedule};
use dagrun_model::prm::{
    PrmConfig, PrmHead, ProcessRewardModel, StepItem, aggregate, bce_with_logits, fit_logistic,
    load_prm, save_prm,
};
use dagrun_model::score::{ScoreItem, score};
use rand::seq::SliceRandom;

use crate::chat::ChatFormat;
use crate::checkpoint::{Checkpoint, Speed, TrainState, epoch_rng, scalar};
use crate::prm::PrmParams;
use crate::prm_labels::StepLabelRow;
use crate::prm_score::{StepLayout, separator_id, step_item};
use crate::sft::train_item;

/// One labelled solution as the PRM reads it.
struct Example {
    item: StepItem,
    labels: Vec<f64>,
    bad_step: Option<usize>,
}

pub struct TrainTask {
    train: Vec<Example>,
    /// Reference solutions for the language-model loss (head `likelihood`).
    references: Vec<ScoreItem>,
    heldout: Vec<Example>,
    params: PrmParams,
    prm: PrmConfig,
    completer: PathBuf,
    resume: PathBuf,
    out: PathBuf,
    progress: Progress,
    pad_id: u32,
    seed: u64,
}

pub struct Outcome {
    /// loss, lr, grad_norm per logged step.
    pub metrics: Vec<(i64, String, f64)>,
    /// The held-out figures, at the last step.
    pub heldout: Vec<(i64, String, f64)>,
    pub resumed_from: u64,
    /// Checkpoint warnings, for the stage log.
    pub notes: Vec<String>,
    pub speed: Speed,
}

impl TrainTask {
    /// The training and held-out examples of `rows`, tokenized with the completer's `format`;
    /// steps that end past `max_length` tokens are left out.
    pub fn new(
        ctx: &StageContext,
        params: &PrmParams,
        format: &ChatFormat,
        rows: &[StepLabelRow],
        references: &[(String, String)],
        completer: &std::path::Path,
    ) -> anyhow::Result<TrainTask> {
        let separator = separator_id(&format.tokenizer)?;
        // What the PRM's config.json will say, and the layout it trains on, from one place.
        let prm = PrmConfig {
            step_token_id: separator,
            step_separator: "\n".into(),
            aggregation: params.aggregate,
            activation: "sigmoid".into(),
            estimation: params.estimation.as_str().into(),
            input: PrmConfig::INPUT_LAYOUT.into(),
            think_block: true,
            head: params.head,
        };
        let layout = StepLayout::new(format, separator, prm.think_block)?;
        let mut prompts: HashMap<&str, Vec<u32>> = HashMap::new();
        let (mut train, mut heldout) = (Vec::new(), Vec::new());
        for row in rows {
            if !prompts.contains_key(row.prompt.as_str()) {
                let ids = format
                    .prompt_ids(&row.prompt)
                    .with_context(|| format!("encoding the prompt of `{}`", row.id))?;
                prompts.insert(&row.prompt, ids);
            }
            let mut item = step_item(
                &format.tokenizer,
                separator,
                &layout,
                &prompts[row.prompt.as_str()],
                &row.steps,
            )?;
            let kept = item.ends.iter().filter(|&&e| e < params.max_length).count();
            if kept == 0 {
                continue;
            }
            item.ends.truncate(kept);
            item.starts.truncate(kept);
            item.ids.truncate(item.ends[kept - 1] + 1);
            let example = Example {
                item,
                labels: row.labels[..kept.min(row.labels.len())].to_vec(),
                bad_step: row.bad_step.map(|b| b as usize),
            };
            if example.labels.len() != example.item.ends.len() {
                bail!(
                    "labels of `{}` solution {}: {} labels for {} steps",
                    row.id,
                    row.solution,
                    row.labels.len(),
                    row.steps.len()
                );
            }
            if row.heldout {
                heldout.push(example);
            } else {
                train.push(example);
            }
        }
        if train.is_empty() {
            bail!(
                "no labelled step fits in `max_length` ({}) tokens",
                params.max_length
            );
        }
        let references = references
            .iter()
            .map(|(user, assistant)| train_item(format, user, assistant, params.max_length))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("encoding the reference solutions")?;
        let total = total_steps(params, train.len(), references.len());
        Ok(TrainTask {
            train,
            references,
            heldout,
            params: params.clone(),
            prm,
            completer: completer.to_path_buf(),
            resume: ctx.resume_dir().join("train"),
            out: ctx.output_path("model")?.to_path_buf(),
            progress: ctx.progress(total, "steps"),
            pad_id: format.pad_id,
            seed: ctx.seed,
        })
    }

    /// Optimizer steps: over the labelled solutions (head `hidden`) or the references
    /// (`likelihood`; none without references: the head is only fitted).
    pub fn total_steps(&self) -> u64 {
        total_steps(&self.params, self.train.len(), self.references.len())
    }

    /// The labelled examples of optimizer step `step` (head `hidden`).
    fn batch(&self, step: u64, order: &mut EpochOrder) -> Vec<usize> {
        let size = self.params.batch_size;
        epoch_batch(self.train.len(), size, self.seed, step, order)
    }

    /// The reference solutions of optimizer step `step` (head `likelihood`), from their own
    /// seeded order.
    fn reference_batch(&self, step: u64, order: &mut EpochOrder) -> Vec<ScoreItem> {
        let (n, size) = (self.references.len(), self.params.reference_batch_size);
        epoch_batch(n, size, self.seed ^ REFERENCE_ORDER, step, order)
            .into_iter()
            .map(|i| self.references[i].clone())
            .collect()
    }

    /// A likelihood head fitted exactly to the training labels (BCE, [`fit_logistic`]) on the
    /// trained decoder's step log-likelihoods (the loop trains only the decoder). Returns the
    /// PRM and the head's figures.
    fn calibrated<B: burn::tensor::backend::Backend>(
        &self,
        prm: ProcessRewardModel<B>,
        step: i64,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<(ProcessRewardModel<B>, Vec<Figure>)> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for chunk in self.train.chunks(4 * self.params.batch_size.max(1)) {
            let items: Vec<StepItem> = chunk.iter().map(|e| e.item.clone()).collect();
            x.extend(
                prm.step_loglik(&items, self.pad_id)?
                    .into_iter()
                    .map(f64::from),
            );
            y.extend(chunk.iter().flat_map(|e| e.labels.iter().copied()));
        }
        if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
            bail!(
                "fitting the likelihood head: a step's log-likelihood is {bad}; the decoder diverged, a lower `lr` is a new key that starts this stage over"
            );
        }
        let (weight, bias) = fit_logistic(&x, &y);
        if weight <= 0.0 {
            // Reported, not refused: on tiny or odd labels it is what BCE says.
            notes.push(format!("the fitted likelihood head's weight is {weight:.3}: on these labels a step the decoder finds likelier is a worse one, so the PRM ranks likelier solutions lower"));
        }
        let figures = vec![
            (step, "head/weight".to_string(), weight),
            (step, "head/bias".to_string(), bias),
        ];
        Ok((
            prm.with_likelihood_head(weight as f32, bias as f32)?,
            figures,
        ))
    }
}

/// One metrics row: step, name, value.
type Figure = (i64, String, f64);

/// Salts the reference solutions' shuffle, so that it is not the labelled solutions' order.
const REFERENCE_ORDER: u64 = 0x7265_6665_7265_6e63;

/// The current epoch and its shuffled order, cached between steps.
type EpochOrder = Option<(u64, Vec<usize>)>;

/// Batches of `size` a pass over `n` items takes.
fn per_epoch(n: usize, size: usize) -> u64 {
    n.div_ceil(size).max(1) as u64
}

/// Indices of optimizer step `step`'s batch: batch `step mod per_epoch` of its epoch's shuffle
/// of `0..n`, seeded by `seed` and the epoch (`order` caches the current epoch's).
fn epoch_batch(n: usize, size: usize, seed: u64, step: u64, order: &mut EpochOrder) -> Vec<usize> {
    let per_epoch = per_epoch(n, size);
    let epoch = step / per_epoch;
    if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
        let mut all: Vec<usize> = (0..n).collect();
        all.shuffle(&mut epoch_rng(seed, epoch));
        *order = Some((epoch, all));
    }
    let all = &order.as_ref().expect("just set").1;
    let b = (step % per_epoch) as usize * size;
    all[b..(b + size).min(all.len())].to_vec()
}

/// `max_steps`, or `epochs` passes over what the head trains on: the labelled solutions
/// (`hidden`) or the references (`likelihood`, which without references trains nothing).
fn total_steps(params: &PrmParams, labelled: usize, references: usize) -> u64 {
    let per_epoch = match params.head {
        PrmHead::Hidden => per_epoch(labelled, params.batch_size),
        PrmHead::Likelihood if references == 0 => return 0,
        PrmHead::Likelihood => per_epoch(references, params.reference_batch_size),
    };
    match params.max_steps {
        Some(steps) => steps,
        None => (params.epochs * per_epoch as f64).ceil().max(1.0) as u64,
    }
}

impl dagrun_model::BackendTask for TrainTask {
    type Output = Outcome;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<Outcome> {
        let p = &self.params;
        let ckpt = Checkpoint::new(&self.resume);
        let mut notes = Vec::new();
        let restored = ckpt.restore_with(
            |dir| {
                let prm = load_prm::<B>(&dir.join("model"), &device)?;
                let opt = AdamW::<B::InnerBackend>::load(&dir.join("optimizer"), &device)?;
                let path = dir.join("state.json");
                let state: TrainState = serde_json::from_slice(&std::fs::read(&path)?)
                    .with_context(|| format!("parsing {}", path.display()))?;
                Ok((prm, opt, state))
            },
            &mut notes,
        )?;
        let (mut prm, mut opt, mut state) = match restored {
            Some(restored) => restored,
            None => {
                let lm = load_model::<B>(&self.completer, &device)?;
                let config = AdamWConfig {
                    weight_decay: p.weight_decay,
                    max_grad_norm: (p.max_grad_norm > 0.0).then_some(p.max_grad_norm),
                    ..AdamWConfig::default()
                };
                (
                    ProcessRewardModel::from_lm(lm, &self.prm, self.seed, p.extra_layers)?,
                    AdamW::new(config),
                    TrainState::default(),
                )
            }
        };
        let resumed_from = state.step;
        let total = self.total_steps();
        let schedule = LrSchedule {
            peak_lr: p.lr,
            warmup_steps: (p.warmup_ratio * total as f64).round() as u64,
            total_steps: total,
            min_lr_ratio: p.min_lr_ratio,
        };
        // The loss summed over the steps since the last metrics row (per labelled step for the
        // BCE, per optimizer step for the references' NLL), and its count: kept in the
        // checkpoint, so a resumed run logs what an uninterrupted one does.
        let saved = |name: &str| {
            state
                .window
                .iter()
                .find(|r| r.1 == name)
                .map_or(0.0, |r| r.2)
        };
        let (mut loss_sum, mut count) = (saved("loss"), saved("count"));
        let mut order = None;
        let mut speed = Speed::default();
        self.progress.set_position(state.step);
        while state.step < total {
            let started = Instant::now();
            let (loss, weight, tokens) = match self.prm.head {
                PrmHead::Hidden => {
                    let picked = self.batch(state.step, &mut order);
                    let items: Vec<StepItem> =
                        picked.iter().map(|&i| self.train[i].item.clone()).collect();
                    let targets: Vec<f32> = picked
                        .iter()
                        .flat_map(|&i| self.train[i].labels.iter().map(|&l| l as f32))
                        .collect();
                    let n = targets.len();
                    let loss = bce_with_logits(prm.step_logits(&items, self.pad_id)?, &targets)
                        .div_scalar(n as f64);
                    (loss, n as f64, items.iter().map(|i| i.ids.len()).sum())
                }
                // The decoder learns the references; the head is fitted after the last step.
                PrmHead::Likelihood => {
                    let refs = self.reference_batch(state.step, &mut order);
                    let loss = score(&prm.lm, &refs, self.pad_id, false)?.mean_nll();
                    let tokens = refs.iter().map(|r| r.prompt.len() + r.completion.len());
                    (loss, 1.0, tokens.sum::<usize>())
                }
            };
            let value = scalar(loss.clone()) as f64;
            if !value.is_finite() {
                bail!(
                    "loss is {value} at step {}: training diverged; a lower `lr` is a new key that starts this stage over",
                    state.step + 1
                );
            }
            loss_sum += value * weight;
            count += weight;
            let mut acc = GradAccumulator::<B>::new();
            acc.backward(loss, &prm);
            let lr = schedule.lr(state.step);
            let (next, stats) = opt
                .step(prm, &mut acc, lr)
                .with_context(|| format!("optimizer step {}", state.step + 1))?;
            prm = next;
            state.step += 1;
            speed.add(tokens as f64, started.elapsed().as_secs_f64());
            self.progress.set_position(state.step);
            if state.step % p.log_every == 0 || state.step == total {
                let s = state.step as i64;
                let mean = loss_sum / count.max(1.0);
                state.metrics.extend([
                    (s, "loss".to_string(), mean),
                    (s, "lr".to_string(), lr),
                    (s, "grad_norm".to_string(), stats.grad_norm),
                ]);
                self.progress.set_message(&format!("loss {mean:.4}"));
                (loss_sum, count) = (0.0, 0.0);
            }
            if state.step % p.checkpoint_every == 0 && state.step < total {
                state.window = vec![(0, "loss".into(), loss_sum), (0, "count".into(), count)];
                ckpt.save_with(|tmp| {
                    save_prm(&prm.valid(), &tmp.join("model"))?;
                    opt.save(&tmp.join("optimizer"))?;
                    std::fs::write(tmp.join("state.json"), serde_json::to_vec(&state)?)?;
                    Ok(())
                })?;
            }
        }
        let mut prm = prm.valid();
        let mut figures = Vec::new();
        if self.prm.head == PrmHead::Likelihood {
            (prm, figures) = self.calibrated(prm, total as i64, &mut notes)?;
        }
        save_prm(&prm, &self.out)?;
        let mut heldout =
            heldout_metrics(&prm, &self.heldout, self.pad_id, p.batch_size, total as i64)?;
        heldout.extend(figures);
        Ok(Outcome {
            metrics: state.metrics,
            heldout,
            resumed_from,
            notes,
            speed,
        })
    }
}

/// The trained PRM on the held-out solutions: `heldout/…` rows at step `step`.
fn heldout_metrics<B: burn::tensor::backend::Backend>(
    prm: &ProcessRewardModel<B>,
    examples: &[Example],
    pad_id: u32,
    batch_size: usize,
    step: i64,
) -> anyhow::Result<Vec<(i64, String, f64)>> {
    let mut scores = Vec::with_capacity(examples.len());
    for batch in examples.chunks(batch_size.max(1)) {
        let items: Vec<StepItem> = batch.iter().map(|e| e.item.clone()).collect();
        scores.extend(prm.step_scores(&items, pad_id)?);
    }
    Ok(heldout_figures(examples, &scores, step))
}

/// The `heldout/…` rows of `examples` whose step scores are `scores`: step accuracy and BCE,
/// and on perturbed solutions whether the weakest step is the planted one, over all of them
/// (`weakest_is_bad`) and over those whose planted step is not the last one scored
/// (`weakest_is_bad_not_last`: there a PRM that learned "the last step is the bad one" fails).
fn heldout_figures(
    examples: &[Example],
    scores: &[Vec<f64>],
    step: i64,
) -> Vec<(i64, String, f64)> {
    let mut sums: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut add = |name: &'static str, value: f64| {
        let e = sums.entry(name).or_default();
        e.0 += value;
        e.1 += 1.0;
    };
    for (example, scores) in examples.iter().zip(scores) {
        add("heldout/solutions", 1.0);
        for (&score, &label) in scores.iter().zip(&example.labels) {
            let hit = f64::from(u8::from((score >= 0.5) == (label >= 0.5)));
            let q = score.clamp(1e-7, 1.0 - 1e-7);
            add("heldout/step_accuracy", hit);
            add(
                "heldout/loss",
                -(label * q.ln() + (1.0 - label) * (1.0 - q).ln()),
            );
            if example.bad_step.is_some() {
                add("heldout/perturbed/step_accuracy", hit);
            }
        }
        let weakest = aggregate(scores, dagrun_model::prm::Aggregate::Min).map(|s| s.weakest);
        if let Some(bad) = example.bad_step.filter(|&b| b < scores.len()) {
            let found = f64::from(u8::from(weakest == Some(bad)));
            add("heldout/perturbed/weakest_is_bad", found);
            if bad + 1 < scores.len() {
                add("heldout/perturbed/weakest_is_bad_not_last", found);
            }
            add(
                "heldout/perturbed/bad_step_below_half",
                f64::from(u8::from(scores[bad] < 0.5)),
            );
        }
    }
    sums.into_iter()
        .map(|(name, (sum, n))| {
            let value = if name == "heldout/solutions" {
                sum
            } else {
                sum / n
            };
            (step, name.to_string(), value)
        })
        .collect()
}

/// What the labels say, as `labels/…` rows at step `step`: counts, mean label and value, per
/// source, how many samples were dropped as truncated (`truncated`, when samples were asked
/// for), and how the planted bad steps and the steps before them were labelled.
pub fn label_metrics(
    rows: &[StepLabelRow],
    truncated: Option<usize>,
    step: i64,
) -> Vec<(i64, String, f64)> {
    let mean = |v: &[f64]| crate::eval_math::mean(v);
    let mut out = vec![
        (step, "labels/solutions".to_string(), rows.len() as f64),
        (
            step,
            "labels/steps".to_string(),
            rows.iter().map(|r| r.steps.len()).sum::<usize>() as f64,
        ),
    ];
    let all_labels: Vec<f64> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
    let all_values: Vec<f64> = rows.iter().flat_map(|r| r.values.iter().copied()).collect();
    let mut push = |name: &str, value: Option<f64>| {
        if let Some(v) = value {
            out.push((step, name.to_string(), v));
        }
    };
    push("labels/label_mean", mean(&all_labels));
    push("labels/value_mean", mean(&all_values));
    for source in ["data", "perturbed", "sample"] {
        let n = rows.iter().filter(|r| r.source == source).count();
        push(
            &format!("labels/{source}/solutions"),
            (n > 0).then_some(n as f64),
        );
    }
    let correct: Vec<f64> = rows
        .iter()
        .filter(|r| r.source == "sample")
        .filter_map(|r| r.correct.map(|c| f64::from(u8::from(c))))
        .collect();
    push("labels/sample/correct", mean(&correct));
    push("labels/sample/truncated", truncated.map(|n| n as f64));
    let planted = |r: &&StepLabelRow| {
        r.bad_step
            .map(|b| b as usize)
            .filter(|&b| b < r.labels.len())
    };
    let bad: Vec<f64> = rows
        .iter()
        .filter_map(|r| Some(r.labels[planted(&r)?]))
        .collect();
    let before: Vec<f64> = rows
        .iter()
        .filter_map(|r| Some(&r.labels[..planted(&r)?]))
        .flatten()
        .copied()
        .collect();
    push("labels/perturbed/bad_step_label", mean(&bad));
    push("labels/perturbed/before_bad_label", mean(&before));
    out
}

/// The stage report: the figures at the last step, one per line of a Markdown table.
pub fn report(metrics: &[(i64, String, f64)], step: i64) -> String {
    let mut out = String::from("| figure | value |\n|---|---:|\n");
    for (_, name, value) in metrics.iter().filter(|m| m.0 == step) {
        if name.starts_with("labels/") || name.starts_with("heldout/") || name == "loss" {
            let _ = writeln!(out, "| {name} | {value:.4} |");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(source: &str, labels: &[f64], bad_step: Option<i32>) -> StepLabelRow {
        StepLabelRow {
            id: "a".into(),
            task: "addition".into(),
            prompt: "1+2+3=".into(),
            answer: "6".into(),
            source: source.into(),
            solution: 0,
            steps: labels.iter().map(|l| format!("step {l}")).collect(),
            labels: labels.to_vec(),
            values: labels.to_vec(),
            bad_step,
            correct: (source == "sample").then_some(true),
            heldout: false,
        }
    }

    fn example(labels: &[f64], bad_step: Option<usize>) -> Example {
        Example {
            item: StepItem {
                ids: vec![],
                starts: (0..labels.len()).collect(),
                ends: (0..labels.len()).collect(),
            },
            labels: labels.to_vec(),
            bad_step,
        }
    }

    #[test]
    fn heldout_figures_say_whether_the_weakest_step_is_the_planted_one_away_from_the_end() {
        let examples = [
            // Planted last: found by a PRM that scores the last step lowest.
            example(&[1.0, 0.0], Some(1)),
            // Planted in the middle, each scored lowest by the PRM ...
            example(&[1.0, 0.0, 0.0], Some(1)),
            // ... or not (it picks the last step).
            example(&[0.0, 0.0, 0.0], Some(0)),
            example(&[1.0, 1.0], None),
        ];
        let scores = [
            vec![0.9, 0.1],
            vec![0.9, 0.2, 0.3],
            vec![0.4, 0.3, 0.1],
            vec![0.8, 0.7],
        ];
        let m = heldout_figures(&examples, &scores, 5);
        let get = |name: &str| m.iter().find(|r| r.1 == name).map(|r| (r.0, r.2));
        assert_eq!(get("heldout/solutions"), Some((5, 4.0)));
        assert_eq!(
            get("heldout/perturbed/weakest_is_bad"),
            Some((5, 2.0 / 3.0))
        );
        assert_eq!(
            get("heldout/perturbed/weakest_is_bad_not_last"),
            Some((5, 0.5)),
            "over the two solutions planted before their last step"
        );
        assert_eq!(get("heldout/perturbed/bad_step_below_half"), Some((5, 1.0)));
        // Without a perturbed solution planted before its end, there is no such row.
        let m = heldout_figures(&examples[..1], &scores[..1], 5);
        assert!(
            m.iter()
                .all(|r| r.1 != "heldout/perturbed/weakest_is_bad_not_last")
        );
    }

    #[test]
    fn label_metrics_report_how_planted_steps_were_labelled() {
        let rows = [
            row("perturbed", &[1.0, 1.0, 0.0], Some(2)),
            row("perturbed", &[1.0, 0.0], Some(1)),
            row("sample", &[1.0, 0.0, 1.0], None),
        ];
        let m = label_metrics(&rows, Some(3), 9);
        let get = |name: &str| m.iter().find(|r| r.1 == name).map(|r| (r.0, r.2));
        assert_eq!(get("labels/solutions"), Some((9, 3.0)));
        assert_eq!(get("labels/steps"), Some((9, 8.0)));
        assert_eq!(get("labels/perturbed/bad_step_label"), Some((9, 0.0)));
        assert_eq!(get("labels/perturbed/before_bad_label"), Some((9, 1.0)));
        assert_eq!(get("labels/sample/correct"), Some((9, 1.0)));
        assert_eq!(get("labels/sample/truncated"), Some((9, 3.0)));
        assert_eq!(get("labels/data/solutions"), None);
        assert_eq!(get("labels/label_mean"), Some((9, 5.0 / 8.0)));
    }
}
