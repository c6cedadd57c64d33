//! The process reward model (PRM): the runtime's decoder with a scalar head read at the end of
//! every reasoning step. The head reads one of two things ([`PrmHead`]):
//! - `hidden`: the decoder's final hidden state at the step's end, in the layout of
//!   transformers' `LlamaForTokenClassification` / `Qwen2ForTokenClassification` with
//!   `num_labels = 1`;
//! - `likelihood`: the decoder's own log-likelihood of the step's tokens (a generative
//!   verifier: a step it would not have written scores low), through a weight and a bias. The
//!   decoder keeps its language-model head and loads as transformers' `…ForCausalLM`.
//!
//! A PRM input is the prompt followed by each step's tokens and one separator token
//! ([`PrmConfig::step_token_id`]); the head's logit at a separator is the step's score before the
//! sigmoid: the estimated chance that a solution continued from that step reaches a correct
//! answer. The directory holds `config.json` (with `architectures`, `num_labels`, `id2label` and
//! a `prm` block saying how to read it), `model.safetensors` with the decoder's tensors under
//! transformers' names and the head as `score.weight` `[1, hidden]` (`[1, 1]` for `likelihood`)
//! and `score.bias` `[1]` (transformers' `nn.Linear(in, num_labels)`), and the completer's
//! tokenizer files (copied by the stage).
//!
//! This file owns the module, its forward at step ends, the BCE loss, saving and loading, and
//! how per-step scores become a solution's score ([`Aggregate`], [`SolutionScore`]). What a step
//! is in text, where labels come from and the training loop belong to the stages crate.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Architecture, ModelConfig};
use crate::hf_dir::{CONFIG_FILE, load_model_with_config, load_tensor, save_model_with};
use crate::init::normal;
use crate::llama::{CausalLm, Linear, TokenBatch};
use crate::score::{ScoreItem, score_host};

/// The head's tensor names, as transformers' token-classification models call them.
pub const SCORE_WEIGHT: &str = "score.weight";
pub const SCORE_BIAS: &str = "score.bias";

/// How a solution's score comes from its steps' scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// The weakest step's score: a solution is as good as its worst step.
    Min,
    /// The product of the step scores.
    Product,
    /// The last step's score (an outcome reward read through the PRM).
    Last,
}

impl Aggregate {
    pub const NAMES: &'static [&'static str] = &["min", "product", "last"];

    pub fn parse(name: &str) -> Result<Aggregate> {
        match name {
            "min" => Ok(Aggregate::Min),
            "product" => Ok(Aggregate::Product),
            "last" => Ok(Aggregate::Last),
            other => bail!("aggregation `{other}` is not one of min, product, last"),
        }
    }
}

/// What the head reads at a step's end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrmHead {
    /// The final hidden state at the separator after the step.
    #[default]
    Hidden,
    /// The sum of the decoder's log-probabilities of the step's tokens (separator excluded):
    /// `logit = score.weight · Σ log p(token | everything before it) + score.bias`.
    Likelihood,
}

impl PrmHead {
    pub const NAMES: &'static [&'static str] = &["hidden", "likelihood"];
}

/// The `prm` block of a PRM's `config.json`: how to read the head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrmConfig {
    /// The token placed after every step; the head is read at these positions.
    pub step_token_id: u32,
    /// Its text (a line break for dagrun's PRMs).
    pub step_separator: String,
    /// How a solution score is formed from the step scores.
    pub aggregation: Aggregate,
    /// Applied to the head's logit to get a step score in [0, 1].
    pub activation: String,
    /// What the head was trained on: `hard` labels (some continuation verifies) or `soft`
    /// values (the share of continuations that verify).
    pub estimation: String,
    /// How a PRM input is laid out, for readers of the directory.
    pub input: String,
    /// The steps sit in a think block as the completer writes them: `<think>` and a line break
    /// before the first step (unless the generation prompt opened the block), `</think>` and a
    /// line break before a step that starts with `<answer>`. False in PRMs made before it was
    /// kept, which read the steps straight after the prompt.
    #[serde(default)]
    pub think_block: bool,
    /// What the head reads; PRMs made before it was kept read the hidden state.
    #[serde(default)]
    pub head: PrmHead,
}

impl PrmConfig {
    pub const INPUT_LAYOUT: &'static str = "the chat template's user turn with the generation prompt; with think_block, `<think>` and the separator token unless the generation prompt already holds `<think>`; then for every step its text followed by the separator token, with think_block `</think>` and the separator going before a step that starts with `<answer>` (unless the generation prompt already holds `</think>`); a step's score is sigmoid(logit) at the separator after it, the logit being score.weight · (the final hidden state there) + score.bias with head `hidden`, or score.weight · (the sum of the model's log-probabilities of the step's tokens, separator excluded) + score.bias with head `likelihood`";

    /// Reads the `prm` block of a loaded `config.json`.
    pub fn from_model_config(config: &ModelConfig) -> Result<PrmConfig> {
        let block = config
            .extra
            .get("prm")
            .context("config.json has no `prm` block: this is not a process reward model (the `prm` stage makes one)")?;
        serde_json::from_value(block.clone()).context("config.json: the `prm` block is malformed")
    }
}

/// A decoder with a one-output linear head read at step ends.
#[derive(Module, Debug)]
pub struct ProcessRewardModel<B: Backend> {
    /// The decoder. With head `hidden` its `lm_head` is `None` (it reads hidden states, never
    /// logits); with `likelihood` it is the completer's (or tied, as the completer's was).
    pub lm: CausalLm<B>,
    /// `[in, 1]` in memory (transposed like every [`Linear`]), `[1, in]` on disk, `in` being
    /// the hidden size (head `hidden`) or 1 (`likelihood`); a bias `[1]`.
    pub score: Linear<B>,
}

/// One PRM input: token ids, and for every step where its tokens start and its end (the
/// separator token after it).
#[derive(Debug, Clone, PartialEq)]
pub struct StepItem {
    pub ids: Vec<u32>,
    pub starts: Vec<usize>,
    pub ends: Vec<usize>,
}

/// A solution's score: each step's, the aggregate, and the weakest step.
#[derive(Debug, Clone, PartialEq)]
pub struct SolutionScore {
    pub steps: Vec<f64>,
    pub score: f64,
    /// Index of the lowest-scoring step (the first of equals).
    pub weakest: usize,
    pub weakest_score: f64,
}

/// The solution score of per-step scores; `None` for a solution without steps.
pub fn aggregate(steps: &[f64], how: Aggregate) -> Option<SolutionScore> {
    let last = *steps.last()?;
    let (mut weakest, mut weakest_score) = (0, steps[0]);
    for (i, &s) in steps.iter().enumerate() {
        // Strictly lower: the first of equal scores stays the weakest.
        if s < weakest_score {
            (weakest, weakest_score) = (i, s);
        }
    }
    let score = match how {
        Aggregate::Min => weakest_score,
        Aggregate::Product => steps.iter().product(),
        Aggregate::Last => last,
    };
    Some(SolutionScore {
        steps: steps.to_vec(),
        score,
        weakest,
        weakest_score,
    })
}

/// A likelihood head: `[1, 1]` weight and `[1]` bias.
fn likelihood_head<B: Backend>(weight: f32, bias: f32, device: &B::Device) -> Linear<B> {
    Linear::new(
        Tensor::from_data(TensorData::new(vec![weight], [1, 1]), device),
        Some(Tensor::from_data(TensorData::new(vec![bias], [1]), device)),
    )
}

/// The architecture name transformers loads a PRM of `config` with.
fn token_classification(config: &ModelConfig) -> Result<&'static str> {
    Ok(match config.architecture()? {
        Architecture::Llama => "LlamaForTokenClassification",
        Architecture::Qwen2 => "Qwen2ForTokenClassification",
    })
}

impl<B: Backend> ProcessRewardModel<B> {
    /// A PRM on `lm`'s decoder with a fresh head; its config gains the `prm` block.
    /// `extra_layers` copies of the decoder's top layers are stacked on it first (see
    /// [`stack_copied_layers`]).
    ///
    /// Head `hidden`: weight normal(0, initializer_range) from `seed` and bias 0, as
    /// transformers initialises `score`; the config gains the token-classification fields and
    /// the language-model head is dropped. Head `likelihood`: weight 1 and bias 0 (the score
    /// starts as the step's probability under the completer); the model stays a causal LM.
    pub fn from_lm(
        mut lm: CausalLm<B>,
        prm: &PrmConfig,
        seed: u64,
        extra_layers: usize,
    ) -> Result<Self> {
        stack_copied_layers(&mut lm, extra_layers)?;
        let device = lm.device();
        if prm.head == PrmHead::Likelihood {
            lm.config
                .extra
                .insert("prm".into(), serde_json::to_value(prm)?);
            let score = likelihood_head(1.0, 0.0, &device);
            return Ok(ProcessRewardModel { lm, score });
        }
        let config = &mut lm.config;
        config.architectures = vec![token_classification(config)?.to_string()];
        // No output embeddings to tie or to keep: the head replaces them.
        config.tie_word_embeddings = true;
        config.extra.insert("num_labels".into(), json!(1));
        config
            .extra
            .insert("id2label".into(), json!({"0": "LABEL_0"}));
        config
            .extra
            .insert("label2id".into(), json!({"LABEL_0": 0}));
        config
            .extra
            .insert("prm".into(), serde_json::to_value(prm)?);
        lm.lm_head = None;
        let std = config
            .extra
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        let hidden = config.hidden_size;
        let weight = normal(&mut ChaCha8Rng::seed_from_u64(seed), hidden, std);
        let score = Linear::new(
            Tensor::from_data(TensorData::new(weight, [hidden, 1]), &device),
            Some(Tensor::zeros([1], &device)),
        );
        Ok(ProcessRewardModel { lm, score })
    }

    /// This PRM with a likelihood head of `weight` and `bias` (see [`PrmHead::Likelihood`]).
    pub fn with_likelihood_head(mut self, weight: f32, bias: f32) -> Result<Self> {
        ensure!(
            self.head()? == PrmHead::Likelihood,
            "only a likelihood head has one weight"
        );
        self.score = likelihood_head(weight, bias, &self.lm.device());
        Ok(self)
    }

    /// The `prm` block of this model's config.
    pub fn prm_config(&self) -> Result<PrmConfig> {
        PrmConfig::from_model_config(&self.lm.config)
    }

    /// What this PRM's head reads.
    pub fn head(&self) -> Result<PrmHead> {
        Ok(self.prm_config()?.head)
    }

    /// The head's logits at every step end of every item, item after item: `[Σ ends]`. With
    /// head `likelihood` the log-likelihoods come from the host, so only the head's weight and
    /// bias carry gradients: the decoder learns from other losses (the `prm` stage's
    /// language-model loss on reference solutions).
    pub fn step_logits(&self, items: &[StepItem], pad_id: u32) -> Result<Tensor<B, 1>> {
        ensure!(!items.is_empty(), "PRM forward: no items");
        if self.head()? == PrmHead::Likelihood {
            return self.likelihood_logits(self.step_loglik(items, pad_id)?);
        }
        let seqs: Vec<Vec<u32>> = items.iter().map(|i| i.ids.clone()).collect();
        let batch = TokenBatch::right_padded(&seqs, pad_id);
        let mut rows = Vec::new();
        for (i, item) in items.iter().enumerate() {
            for &end in &item.ends {
                ensure!(
                    end < item.ids.len(),
                    "PRM forward: step end {end} is past item {i}'s {} tokens",
                    item.ids.len()
                );
                rows.push((i * batch.seq + end) as i64);
            }
        }
        ensure!(!rows.is_empty(), "PRM forward: no step ends to score");
        let n = rows.len();
        let input = self.lm.step_input(&batch, 0, None)?;
        let hidden = self.lm.hidden(&input, None);
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &self.lm.device());
        Ok(self.score.forward(hidden.select(0, rows)).reshape([n]))
    }

    /// Head `likelihood`'s logits of steps whose log-likelihoods are `loglik` (from
    /// [`step_loglik`](Self::step_loglik), perhaps of this model's inference copy).
    pub fn likelihood_logits(&self, loglik: Vec<f32>) -> Result<Tensor<B, 1>> {
        ensure!(!loglik.is_empty(), "PRM forward: no step ends to score");
        let n = loglik.len();
        let x = Tensor::<B, 2>::from_data(TensorData::new(loglik, [n, 1]), &self.lm.device());
        Ok(self.score.forward(x).reshape([n]))
    }

    /// Every step's summed log-probability of its tokens under the decoder (separator
    /// excluded), item after item, on the host. Run it on an inference backend: on an autodiff
    /// one it records a graph nobody back-propagates.
    pub fn step_loglik(&self, items: &[StepItem], pad_id: u32) -> Result<Vec<f32>> {
        let (mut scored, mut firsts) = (Vec::with_capacity(items.len()), Vec::new());
        for (i, item) in items.iter().enumerate() {
            ensure!(
                item.starts.len() == item.ends.len(),
                "PRM forward: item {i} has {} step starts for {} ends",
                item.starts.len(),
                item.ends.len()
            );
            let first = item.starts.first().copied().unwrap_or(item.ids.len());
            let mut previous = 1;
            for (&start, &end) in item.starts.iter().zip(&item.ends) {
                ensure!(
                    previous <= start && start <= end && end < item.ids.len(),
                    "PRM forward: item {i}'s step {start}..{end} is out of order or outside its {} tokens",
                    item.ids.len()
                );
                previous = end;
            }
            scored.push(ScoreItem {
                prompt: item.ids[..first].to_vec(),
                completion: item.ids[first..].to_vec(),
            });
            firsts.push(first);
        }
        let logprobs = score_host(&self.lm, &scored, pad_id, false, 1.0)?.logprobs;
        let mut out = Vec::new();
        for ((item, lp), first) in items.iter().zip(&logprobs).zip(firsts) {
            for (&start, &end) in item.starts.iter().zip(&item.ends) {
                out.push(lp[start - first..end - first].iter().sum());
            }
        }
        Ok(out)
    }

    /// Each item's step scores (sigmoid of the logits) on the host.
    pub fn step_scores(&self, items: &[StepItem], pad_id: u32) -> Result<Vec<Vec<f64>>> {
        let probs = sigmoid(self.step_logits(items, pad_id)?)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading PRM scores: {e:?}"))?;
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for item in items {
            let n = item.ends.len();
            out.push(probs[at..at + n].iter().map(|&p| p as f64).collect());
            at += n;
        }
        Ok(out)
    }
}

/// Stacks `extra` copies of `lm`'s top layers on its decoder, the top layer's copy last (a
/// 2-layer decoder with 2 extra becomes layers 0, 1, 0, 1; with 3 extra, 0, 1, 1, 0, 1), each
/// with fresh parameter ids so it trains on its own.
///
/// Why: a completer this small finishes a step's arithmetic in its last layer, so a head on it
/// has no layer left to compare the result with the digits written after it. Measured, the
/// extra layers learn a copy mismatch inside a step (`bench/prm_probe.py shortcut=1`: 0.974
/// held-out step accuracy after 500 steps) but not a wrong sum (0.72 after 1,000; README).
pub fn stack_copied_layers<B: Backend>(lm: &mut CausalLm<B>, extra: usize) -> Result<()> {
    let n = lm.model.layers.len();
    if extra == 0 {
        return Ok(());
    }
    ensure!(n > 0, "cannot copy layers of a decoder without layers");
    for i in 0..extra {
        let source = n - 1 - (extra - 1 - i) % n;
        let copy = lm.model.layers[source].clone().map(&mut FreshIds);
        lm.model.layers.push(copy);
        // Qwen2 configs list a type per layer; the copy has its source's.
        if let Some(serde_json::Value::Array(types)) = lm.config.extra.get_mut("layer_types")
            && let Some(t) = types.get(source).cloned()
        {
            types.push(t);
        }
    }
    lm.config.num_hidden_layers = lm.model.layers.len();
    Ok(())
}

/// Gives every parameter a new id (same values): a copied layer must not share its original's
/// gradients or optimizer state.
struct FreshIds;

impl<B: Backend> ModuleMapper<B> for FreshIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        Param::from_tensor(param.val())
    }
}

/// The `(weight, bias)` minimising the binary cross-entropy (summed over the points) of
/// `sigmoid(weight·x + bias)` against targets `y` in [0, 1]: Newton's method from (1, 0) with a backtracking line search
/// (a step is halved until the loss falls), so it never ends worse than it started, and stops
/// when the loss stops falling (separable data end at large finite values). How a likelihood
/// head is fitted to the labels once its decoder has trained: two parameters need no optimizer.
pub fn fit_logistic(x: &[f64], y: &[f64]) -> (f64, f64) {
    let loss = |w: f64, b: f64| -> f64 {
        let log_sigmoid = |z: f64| -((-z).max(0.0) + (-z.abs()).exp().ln_1p());
        x.iter()
            .zip(y)
            .map(|(&xi, &yi)| {
                let z = w * xi + b;
                -(yi * log_sigmoid(z) + (1.0 - yi) * log_sigmoid(-z))
            })
            .sum::<f64>()
    };
    let (mut w, mut b) = (1.0f64, 0.0f64);
    let mut current = loss(w, b);
    for _ in 0..100 {
        let (mut gw, mut gb, mut hww, mut hwb, mut hbb) = (0.0, 0.0, 1e-9, 0.0, 1e-9);
        for (&xi, &yi) in x.iter().zip(y) {
            let p = 1.0 / (1.0 + (-(w * xi + b)).exp());
            let (r, s) = (p - yi, p * (1.0 - p));
            gw += r * xi;
            gb += r;
            hww += s * xi * xi;
            hwb += s * xi;
            hbb += s;
        }
        let det = hww * hbb - hwb * hwb;
        if !det.is_finite() || det <= 0.0 {
            break;
        }
        let (dw, db) = ((hbb * gw - hwb * gb) / det, (hww * gb - hwb * gw) / det);
        let mut step = 1.0;
        let better = loop {
            let tried = loss(w - step * dw, b - step * db);
            if tried < current {
                break Some(tried);
            }
            step /= 2.0;
            if step < 1e-10 {
                break None;
            }
        };
        let Some(next) = better else { break };
        (w, b) = (w - step * dw, b - step * db);
        let gain = current - next;
        current = next;
        if gain < 1e-13 * current.max(1.0) {
            break;
        }
    }
    (w, b)
}

/// Binary cross-entropy of `logits` against `targets` in [0, 1] (hard labels or soft values),
/// summed: `−Σ y·log σ(z) + (1 − y)·log σ(−z)`, through `log σ` so large logits stay finite.
pub fn bce_with_logits<B: Backend>(logits: Tensor<B, 1>, targets: &[f32]) -> Tensor<B, 1> {
    let n = targets.len();
    let y = Tensor::<B, 1>::from_data(TensorData::new(targets.to_vec(), [n]), &logits.device());
    let positive = log_sigmoid(logits.clone()) * y.clone();
    let negative = log_sigmoid(logits.neg()) * y.neg().add_scalar(1.0);
    (positive + negative).sum().neg()
}

/// Writes a PRM directory: `config.json` (with the `prm` block) and `model.safetensors` with the
/// decoder, `score.weight` `[1, hidden]` and `score.bias` `[1]`. Tokenizer files are the
/// caller's.
pub fn save_prm<B: Backend>(prm: &ProcessRewardModel<B>, dir: &Path) -> Result<()> {
    prm.prm_config()?;
    let host = |t: Tensor<B, 1>, name: &str| {
        t.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading {name}: {e:?}"))
    };
    let width = prm.score.weight.val().dims()[0];
    // `[in, 1]` and `[1, in]` hold the same values in the same order.
    let weight = host(prm.score.weight.val().reshape([width]), SCORE_WEIGHT)?;
    let bias = match &prm.score.bias {
        Some(b) => host(b.val(), SCORE_BIAS)?,
        None => vec![0.0],
    };
    save_model_with(
        &prm.lm,
        dir,
        vec![
            (SCORE_WEIGHT.to_string(), vec![1, width], weight),
            (SCORE_BIAS.to_string(), vec![1], bias),
        ],
    )
}

/// Loads a PRM directory that [`save_prm`] wrote (or any token-classification checkpoint with
/// one label, `score.bias` included, and a `prm` block in its config).
pub fn load_prm<B: Backend>(dir: &Path, device: &B::Device) -> Result<ProcessRewardModel<B>> {
    let mut config = ModelConfig::load(&dir.join(CONFIG_FILE))?;
    let prm =
        PrmConfig::from_model_config(&config).with_context(|| format!("{}", dir.display()))?;
    let width = match prm.head {
        // The decoder's tensors only: there is no language-model head to read.
        PrmHead::Hidden => {
            config.tie_word_embeddings = true;
            config.hidden_size
        }
        PrmHead::Likelihood => 1,
    };
    let lm = load_model_with_config::<B>(dir, &config, device)?;
    let weight = load_tensor(dir, SCORE_WEIGHT, &[1, width])?;
    let bias = load_tensor(dir, SCORE_BIAS, &[1])?;
    let score = Linear::new(
        Tensor::from_data(TensorData::new(weight, [width, 1]), device),
        Some(Tensor::from_data(TensorData::new(bias, [1]), device)),
    );
    Ok(ProcessRewardModel { lm, score })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, AdamWConfig, GradAccumulator};
    use burn::module::AutodiffModule;

    type Inf = burn::backend::Flex;
    type Ad = burn::backend::Autodiff<Inf>;

    fn prm_config() -> PrmConfig {
        PrmConfig {
            step_token_id: 3,
            step_separator: "\n".into(),
            aggregation: Aggregate::Min,
            activation: "sigmoid".into(),
            estimation: "hard".into(),
            input: PrmConfig::INPUT_LAYOUT.into(),
            think_block: true,
            head: PrmHead::Hidden,
        }
    }

    fn tiny<B: Backend>(seed: u64) -> ProcessRewardModel<B> {
        let mut config = ModelConfig::llama(8, 16, 32, 1, 2, 2, 64);
        config.tie_word_embeddings = false;
        let lm = CausalLm::<B>::init_random(&config, seed, &Default::default()).unwrap();
        ProcessRewardModel::from_lm(lm, &prm_config(), seed, 0).unwrap()
    }

    /// Token 4 is a good step, token 5 a bad one; 3 separates steps.
    fn items() -> (Vec<StepItem>, Vec<f32>) {
        let items = vec![
            StepItem {
                ids: vec![1, 4, 3, 4, 3],
                starts: vec![1, 3],
                ends: vec![2, 4],
            },
            StepItem {
                ids: vec![1, 4, 3, 5, 3],
                starts: vec![1, 3],
                ends: vec![2, 4],
            },
            StepItem {
                ids: vec![1, 5, 3],
                starts: vec![1],
                ends: vec![2],
            },
        ];
        (items, vec![1.0, 1.0, 1.0, 0.0, 0.0])
    }

    #[test]
    fn a_saved_prm_loads_with_its_head_and_config_fields() {
        let prm = tiny::<Inf>(1);
        let dir = std::env::temp_dir().join(format!("dagrun-prm-{}", std::process::id()));
        save_prm(&prm, &dir).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(
            config["architectures"],
            json!(["LlamaForTokenClassification"])
        );
        assert_eq!(config["num_labels"], json!(1));
        assert_eq!(config["prm"]["step_token_id"], json!(3));
        assert_eq!(config["prm"]["aggregation"], json!("min"));
        let bytes = std::fs::read(dir.join(crate::hf_dir::WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor(SCORE_WEIGHT).unwrap().shape(), [1, 16]);
        assert_eq!(st.tensor(SCORE_BIAS).unwrap().shape(), [1]);
        assert!(
            st.tensor("lm_head.weight").is_err(),
            "a PRM has no language-model head"
        );
        let loaded = load_prm::<Inf>(&dir, &Default::default()).unwrap();
        let (items, _) = items();
        assert_eq!(
            loaded.step_scores(&items, 0).unwrap(),
            prm.step_scores(&items, 0).unwrap()
        );
        assert_eq!(loaded.prm_config().unwrap(), prm_config());
        assert_eq!(config["prm"]["think_block"], json!(true));

        // A PRM saved before `think_block` was kept reads as one without it (bare steps).
        let mut old = config.clone();
        old["prm"].as_object_mut().unwrap().remove("think_block");
        std::fs::write(dir.join(CONFIG_FILE), old.to_string()).unwrap();
        let loaded = load_prm::<Inf>(&dir, &Default::default()).unwrap();
        assert!(!loaded.prm_config().unwrap().think_block);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bce_training_separates_good_and_bad_steps() {
        let mut prm = tiny::<Ad>(2);
        let mut opt = AdamW::<Inf>::new(AdamWConfig::default());
        let (items, targets) = items();
        let loss = |prm: &ProcessRewardModel<Ad>| {
            bce_with_logits(prm.step_logits(&items, 0).unwrap(), &targets).div_scalar(5.0)
        };
        let first = loss(&prm).into_scalar();
        for _ in 0..40 {
            let mut acc = GradAccumulator::<Ad>::new();
            acc.backward(loss(&prm), &prm);
            prm = opt.step(prm, &mut acc, 1e-2).unwrap().0;
        }
        let last = loss(&prm).into_scalar();
        assert!(last < first * 0.5, "BCE {first} → {last}");
        let scores = prm.valid().step_scores(&items, 0).unwrap();
        assert!(scores[0][1] > 0.5 && scores[1][1] < 0.5, "{scores:?}");
        let weakest = aggregate(&scores[1], Aggregate::Min).unwrap();
        assert_eq!(
            weakest.weakest, 1,
            "the bad step is the weakest: {scores:?}"
        );
    }

    #[test]
    fn copied_layers_start_equal_train_apart_and_save_as_a_deeper_model() {
        let mut config = ModelConfig::llama(8, 16, 32, 2, 2, 2, 64);
        config.tie_word_embeddings = false;
        let lm = CausalLm::<Ad>::init_random(&config, 3, &Default::default()).unwrap();
        let mut prm = ProcessRewardModel::from_lm(lm, &prm_config(), 3, 2).unwrap();
        assert_eq!(prm.lm.model.layers.len(), 4);
        assert_eq!(prm.lm.config.num_hidden_layers, 4);
        let weight = |prm: &ProcessRewardModel<Ad>, l: usize| {
            let w = &prm.lm.model.layers[l].mlp.up_proj.weight;
            (w.id, w.val().inner().into_data().to_vec::<f32>().unwrap())
        };
        // Layers 0, 1, then copies of 0 and 1: equal values, their own parameter ids.
        for (copy, source) in [(2, 0), (3, 1)] {
            let ((copy_id, copy_w), (source_id, source_w)) =
                (weight(&prm, copy), weight(&prm, source));
            assert_eq!(copy_w, source_w);
            assert_ne!(copy_id, source_id);
        }
        let mut opt = AdamW::<Inf>::new(AdamWConfig::default());
        let (items, targets) = items();
        for _ in 0..3 {
            let mut acc = GradAccumulator::<Ad>::new();
            let loss = bce_with_logits(prm.step_logits(&items, 0).unwrap(), &targets);
            acc.backward(loss, &prm);
            prm = opt.step(prm, &mut acc, 1e-2).unwrap().0;
        }
        assert_ne!(
            weight(&prm, 2).1,
            weight(&prm, 0).1,
            "a copy trains on its own"
        );
        let prm = prm.valid();
        let dir = std::env::temp_dir().join(format!("dagrun-prm-deep-{}", std::process::id()));
        save_prm(&prm, &dir).unwrap();
        let loaded = load_prm::<Inf>(&dir, &Default::default()).unwrap();
        assert_eq!(loaded.lm.config.num_hidden_layers, 4);
        assert_eq!(
            loaded.step_scores(&items, 0).unwrap(),
            prm.step_scores(&items, 0).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bce_matches_its_formula() {
        let logits = Tensor::<Inf, 1>::from_data(
            TensorData::new(vec![2.0f32, -1.0, 0.0], [3]),
            &Default::default(),
        );
        let got = bce_with_logits(logits, &[1.0, 0.0, 0.25]).into_scalar() as f64;
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let want = -(sig(2.0).ln()
            + (1.0 - sig(-1.0)).ln()
            + 0.25 * sig(0.0).ln()
            + 0.75 * (1.0 - sig(0.0)).ln());
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn aggregate_min_product_last_and_the_weakest_step() {
        let s = aggregate(&[0.9, 0.2, 0.8, 0.2], Aggregate::Min).unwrap();
        assert_eq!((s.weakest, s.weakest_score, s.score), (1, 0.2, 0.2));
        let p = aggregate(&[0.5, 0.5, 0.8], Aggregate::Product).unwrap();
        assert!((p.score - 0.2).abs() < 1e-12);
        assert_eq!(p.weakest, 0, "the first of equal scores");
        let l = aggregate(&[0.1, 0.7], Aggregate::Last).unwrap();
        assert_eq!((l.score, l.weakest, l.weakest_score), (0.7, 0, 0.1));
        assert_eq!(aggregate(&[], Aggregate::Min), None);
        for name in Aggregate::NAMES {
            let parsed = Aggregate::parse(name).unwrap();
            assert_eq!(serde_json::to_value(parsed).unwrap(), json!(name));
        }
        assert!(Aggregate::parse("mean").is_err());
    }

    #[test]
    fn fit_logistic_recovers_the_weight_and_bias_of_its_targets() {
        let x: Vec<f64> = (0..200).map(|i| -6.0 + 0.05 * i as f64).collect();
        let y: Vec<f64> = x
            .iter()
            .map(|x| 1.0 / (1.0 + (-(2.0 * x + 3.0)).exp()))
            .collect();
        let (w, b) = fit_logistic(&x, &y);
        assert!((w - 2.0).abs() < 1e-3 && (b - 3.0).abs() < 1e-3, "{w} {b}");
        // Separable hard labels stop at finite values; constant ones too.
        let y: Vec<f64> = x.iter().map(|&x| f64::from(x > -1.0)).collect();
        let (w, b) = fit_logistic(&x, &y);
        assert!(w.is_finite() && b.is_finite() && w > 0.0, "{w} {b}");
        let (w, b) = fit_logistic(&x, &vec![1.0; x.len()]);
        assert!(w.is_finite() && b.is_finite(), "{w} {b}");
        // Log-likelihoods far below 0 and labels that fall as they rise: full Newton steps
        // from (1, 0) overshoot and oscillate here; the fit must still find the negative weight.
        let x: Vec<f64> = (0..100).map(|i| -18.0 + 0.17 * i as f64).collect();
        let y: Vec<f64> = x
            .iter()
            .map(|&x| 1.0 / (1.0 + (0.3 * x + 4.0).exp()))
            .collect();
        let (w, b) = fit_logistic(&x, &y);
        assert!((w + 0.3).abs() < 1e-3 && (b + 4.0).abs() < 1e-3, "{w} {b}");
    }

    fn likelihood_prm<B: Backend>(seed: u64) -> ProcessRewardModel<B> {
        let mut config = ModelConfig::llama(8, 16, 32, 1, 2, 2, 64);
        config.tie_word_embeddings = false;
        let lm = CausalLm::<B>::init_random(&config, seed, &Default::default()).unwrap();
        let prm = PrmConfig {
            head: PrmHead::Likelihood,
            ..prm_config()
        };
        ProcessRewardModel::from_lm(lm, &prm, seed, 0).unwrap()
    }

    /// Σ log p(ids[t] | ids[..t]) over `start..end`, from a plain forward of the decoder.
    fn reference_loglik(lm: &CausalLm<Inf>, ids: &[u32], start: usize, end: usize) -> f32 {
        let logits = lm
            .forward(&TokenBatch::right_padded(&[ids.to_vec()], 0))
            .unwrap();
        let vocab = lm.vocab_size();
        let logits = logits.into_data().to_vec::<f32>().unwrap();
        (start..end)
            .map(|t| {
                let row = &logits[(t - 1) * vocab..t * vocab];
                let max = row.iter().cloned().fold(f32::MIN, f32::max);
                let log_z = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
                row[ids[t] as usize] - log_z
            })
            .sum()
    }

    #[test]
    fn a_likelihood_prm_scores_a_step_by_its_log_likelihood_and_saves_as_a_causal_lm() {
        let prm = likelihood_prm::<Inf>(4)
            .with_likelihood_head(1.0, 0.5)
            .unwrap();
        // Steps of one, two and three tokens.
        let items = vec![
            StepItem {
                ids: vec![1, 4, 5, 3, 4, 3],
                starts: vec![1, 4],
                ends: vec![3, 5],
            },
            StepItem {
                ids: vec![2, 1, 5, 6, 4, 3],
                starts: vec![2],
                ends: vec![5],
            },
        ];
        let mut out_of_order = items[0].clone();
        out_of_order.starts = vec![4, 1];
        assert!(prm.step_loglik(&[out_of_order], 0).is_err());
        let loglik = prm.step_loglik(&items, 0).unwrap();
        let mut expected = Vec::new();
        for item in &items {
            for (&start, &end) in item.starts.iter().zip(&item.ends) {
                expected.push(reference_loglik(&prm.lm, &item.ids, start, end));
            }
        }
        assert_eq!(loglik.len(), expected.len());
        for (got, want) in loglik.iter().zip(&expected) {
            assert!((got - want).abs() < 1e-4, "{loglik:?} against {expected:?}");
        }
        // sigmoid(1 · loglik + 0.5), item after item.
        let scores: Vec<f64> = prm.step_scores(&items, 0).unwrap().concat();
        for (s, l) in scores.iter().zip(&expected) {
            let want = 1.0 / (1.0 + (-(*l as f64 + 0.5)).exp());
            assert!((s - want).abs() < 1e-5, "{s} against {want}");
        }

        let dir = std::env::temp_dir().join(format!("dagrun-prm-lik-{}", std::process::id()));
        save_prm(&prm, &dir).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(config["prm"]["head"], json!("likelihood"));
        assert!(config.get("num_labels").is_none());
        let bytes = std::fs::read(dir.join(crate::hf_dir::WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor(SCORE_WEIGHT).unwrap().shape(), [1, 1]);
        assert_eq!(st.tensor(SCORE_BIAS).unwrap().shape(), [1]);
        assert!(
            st.tensor("lm_head.weight").is_ok(),
            "the untied language-model head is what the PRM reads"
        );
        let loaded = load_prm::<Inf>(&dir, &Default::default()).unwrap();
        assert_eq!(loaded.head().unwrap(), PrmHead::Likelihood);
        assert_eq!(
            loaded.step_scores(&items, 0).unwrap(),
            prm.step_scores(&items, 0).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
