//! Golden tests: advantages, loss, d loss / d leaf and the gradient norm against
//! `fixtures/grpo_golden.json`, written by `stages/fixtures/grpo_golden.py` (an independent
//! float64 implementation of TRL's formulas). Regenerate with
//! `python3 stages/fixtures/grpo_golden.py`.
//!
//! Every golden loss is the whole batch's. Each case also runs split into micro-batches of
//! unequal sizes, as the grpo stage splits by `micro_batch`: the parts must add up to the whole
//! (the split is a memory setting only). The loss runs on burn's `Autodiff<Flex>` in f32, the
//! training dtype, within `1e-6·max(1, |x|)`, and in f64 within 1e-12, which shows the f32 gap
//! is rounding only. The `logits` cases score at a temperature ≠ 1 through the stage's own
//! scoring function, and the gradient norm is the one the optimizer logs and clips: the leaf
//! (log-probs or logits) is a module parameter, gradients are summed by `GradAccumulator` over
//! the micro-batches and `AdamW::step` reports the norm.

use std::ops::Range;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend as BackendTrait;
use burn::tensor::{DType, Tensor, TensorData};
use dagrun_model::optim::{AdamW, AdamWConfig, GradAccumulator};
use dagrun_model::score::{entropies, token_logprobs};
use serde_json::Value;

use super::*;

type Backend = Autodiff<Flex>;

const GOLDEN: &str = include_str!("../../fixtures/grpo_golden.json");

/// The splits every case runs under: whole, and micro-batches of unequal sizes.
#[allow(clippy::single_range_in_vec_init)] // one range is the whole batch, not a range's items
const SPLITS: [&[Range<usize>]; 3] = [&[0..12], &[0..5, 5..12], &[0..1, 1..8, 8..12]];

struct Fixture {
    json: Value,
    rows: usize,
    width: usize,
    vocab: usize,
    group_size: usize,
}

impl Fixture {
    fn load() -> Self {
        let json: Value = serde_json::from_str(GOLDEN).expect("golden JSON parses");
        let rows = json["batch"].as_u64().unwrap() as usize;
        let width = json["width"].as_u64().unwrap() as usize;
        let vocab = json["vocab"].as_u64().unwrap() as usize;
        let group_size = json["group_size"].as_u64().unwrap() as usize;
        Self {
            json,
            rows,
            width,
            vocab,
            group_size,
        }
    }

    fn matrix(&self, key: &str) -> Vec<f64> {
        flatten(&self.json[key])
    }

    fn rewards(&self) -> Vec<Option<f64>> {
        self.json["rewards"]
            .as_array()
            .unwrap()
            .iter()
            .map(Value::as_f64)
            .collect()
    }

    fn completions(&self) -> Vec<(usize, bool)> {
        let lengths = self.json["lengths"].as_array().unwrap();
        let truncated = self.json["truncated"].as_array().unwrap();
        lengths
            .iter()
            .zip(truncated)
            .map(|(length, truncated)| {
                (
                    length.as_u64().unwrap() as usize,
                    truncated.as_bool().unwrap(),
                )
            })
            .collect()
    }

    fn tokens(&self) -> Vec<u32> {
        self.matrix("tokens")
            .into_iter()
            .map(|t| t as u32)
            .collect()
    }
}

/// Every number of a nested JSON array, in order (`distill_math`'s golden tests read it too).
pub(crate) fn flatten(value: &Value) -> Vec<f64> {
    match value {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        number => vec![number.as_f64().expect("a number")],
    }
}

fn scale_of(name: &str) -> ScaleRewards {
    name.parse().unwrap()
}

/// Fails unless `got` is within `tolerance·max(1, |expected|)` of `expected`.
pub(crate) fn assert_close(what: &str, got: f64, expected: f64, tolerance: f64) {
    let allowed = tolerance * expected.abs().max(1.0);
    assert!(
        (got - expected).abs() <= allowed,
        "{what}: got {got}, expected {expected} (|diff| {} > {allowed})",
        (got - expected).abs()
    );
}

#[test]
fn advantages_match_golden() {
    let fixture = Fixture::load();
    for scale in ["group", "batch", "none"] {
        let expected = &fixture.json["advantages"][scale];
        let got =
            compute_advantages(&fixture.rewards(), fixture.group_size, scale_of(scale)).unwrap();
        for (index, (got, want)) in got
            .advantages
            .iter()
            .zip(flatten(&expected["advantages"]))
            .enumerate()
        {
            assert_close(&format!("{scale} advantage {index}"), *got, want, 1e-12);
        }
        assert_close(
            &format!("{scale} frac_reward_zero_std"),
            got.frac_reward_zero_std,
            expected["frac_reward_zero_std"].as_f64().unwrap(),
            1e-12,
        );
    }
}

/// The tensor a case differentiates: the policy's log-probs `[rows, width]`, or its logits
/// `[rows · width, vocab]`. A module parameter, so the optimizer sees its gradient.
#[derive(Module, Debug)]
struct Leaf<B: BackendTrait> {
    values: Param<Tensor<B, 2>>,
}

struct Outcome {
    loss: f64,
    grad: Vec<f64>,
    stats: LossStats,
}

/// How a case gets its log-probs.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// `logp`, `old_logp`, `ref_logp` from the fixture.
    Logp,
    /// From `logits`, `old_logits`, `ref_logits` at the case's temperature.
    Logits,
}

fn config(case: &Value, whole_batch: Option<WholeBatch>) -> LossConfig {
    LossConfig {
        loss_type: case["loss_type"].as_str().unwrap().parse().unwrap(),
        epsilon_low: case["epsilon_low"].as_f64().unwrap(),
        epsilon_high: case["epsilon_high"].as_f64().unwrap(),
        beta: case["beta"].as_f64().unwrap(),
        max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
        whole_batch,
    }
}

/// One case split into `splits`: the parts' losses summed, their leaf gradients (taken from
/// one `backward` of the summed loss), token-weighted stats, and separately the norm that
/// `AdamW::step` reports for the gradient `GradAccumulator` sums over the parts.
fn run_case(
    fixture: &Fixture,
    case: &Value,
    source: Source,
    dtype: DType,
    splits: &[Range<usize>],
) -> (Outcome, f64) {
    let device = Default::default();
    let (rows, width, vocab) = (fixture.rows, fixture.width, fixture.vocab);
    let scale = scale_of(case["scale_rewards"].as_str().unwrap());
    let advantages = compute_advantages(&fixture.rewards(), fixture.group_size, scale)
        .unwrap()
        .advantages;
    let completions = fixture.completions();
    let mask_truncated = case["mask_truncated"].as_bool().unwrap();
    let whole_tokens: f64 = completion_mask(&completions, width, mask_truncated)
        .iter()
        .map(|m| f64::from(*m))
        .sum();
    let cfg = config(
        case,
        (splits.len() > 1).then_some(WholeBatch {
            sequences: rows,
            tokens: whole_tokens,
        }),
    );
    let on_policy = case["on_policy"].as_bool().unwrap();
    let temperature = case["temperature"].as_f64().unwrap_or(1.0);
    let tokens = if source == Source::Logits {
        fixture.tokens()
    } else {
        Vec::new()
    };

    let (leaf_key, leaf_shape) = match source {
        Source::Logp => ("logp", [rows, width]),
        Source::Logits => ("logits", [rows * width, vocab]),
    };
    let full = |key: &str, shape: [usize; 2]| {
        Tensor::<Backend, 2>::from_data(
            TensorData::new(fixture.matrix(key), shape),
            (&device, dtype),
        )
    };
    // `[r.len(), width]` log-probs of rows `r` from a `[rows·width, vocab]` logits tensor.
    let logps_of = |logits: Tensor<Backend, 2>, r: &Range<usize>| {
        token_logprobs(logits, &tokens[r.start * width..r.end * width], temperature)
            .reshape([r.len(), width])
    };
    let part_inputs = |leaf: &Tensor<Backend, 2>, r: &Range<usize>| {
        let (logp, old, reference) = match source {
            Source::Logp => {
                let logp = leaf.clone().slice([r.clone(), 0..width]);
                let old = full("old_logp", [rows, width]).slice([r.clone(), 0..width]);
                let reference = full("ref_logp", [rows, width]).slice([r.clone(), 0..width]);
                (logp, old, reference)
            }
            Source::Logits => {
                let cells = r.start * width..r.end * width;
                let logp = logps_of(leaf.clone().slice([cells.clone(), 0..vocab]), r);
                let old = logps_of(
                    full("old_logits", leaf_shape).slice([cells.clone(), 0..vocab]),
                    r,
                );
                let reference =
                    logps_of(full("ref_logits", leaf_shape).slice([cells, 0..vocab]), r);
                (logp, old.detach(), reference.detach())
            }
        };
        let old = if on_policy {
            logp.clone().detach()
        } else {
            old
        };
        let mask = completion_mask(&completions[r.clone()], width, mask_truncated);
        let mask = Tensor::<Backend, 2>::from_data(
            TensorData::new(
                mask.into_iter().map(f64::from).collect::<Vec<_>>(),
                [r.len(), width],
            ),
            (&device, dtype),
        );
        let adv = Tensor::<Backend, 1>::from_data(
            TensorData::new(advantages[r.clone()].to_vec(), [r.len()]),
            (&device, dtype),
        );
        grpo_loss(logp, old, Some(reference), adv, mask, &cfg).unwrap()
    };

    // Loss, gradient and stats: one backward of the summed parts.
    let leaf = full(leaf_key, leaf_shape).require_grad();
    let mut total: Option<Tensor<Backend, 1>> = None;
    let (mut weighted, mut counted) = ([0.0; 4], 0.0);
    for r in splits {
        let (loss, stats) = part_inputs(&leaf, r);
        total = Some(match total {
            Some(t) => t + loss,
            None => loss,
        });
        for (sum, value) in weighted.iter_mut().zip([
            stats.clip_ratio_low,
            stats.clip_ratio_high,
            stats.clip_ratio_region,
            stats.kl.unwrap(),
        ]) {
            *sum += value * stats.tokens;
        }
        counted += stats.tokens;
    }
    let total = total.unwrap();
    let grad = leaf
        .grad(&total.backward())
        .expect("the leaf has a gradient");
    let per_token = |sum: f64| sum / counted.max(1.0);
    let outcome = Outcome {
        loss: total.to_data().iter::<f64>().next().unwrap(),
        grad: grad.to_data().iter::<f64>().collect(),
        stats: LossStats {
            kl: Some(per_token(weighted[3])),
            clip_ratio_low: per_token(weighted[0]),
            clip_ratio_high: per_token(weighted[1]),
            clip_ratio_region: per_token(weighted[2]),
            tokens: counted,
        },
    };

    // The optimizer's view (f32 only, as the optimizer is): one backward per part, summed.
    let mut norm = f64::NAN;
    if dtype == DType::F32 {
        let module = Leaf {
            values: Param::from_tensor(full(leaf_key, leaf_shape)),
        };
        let mut acc = GradAccumulator::<Backend>::new();
        for r in splits {
            let (loss, _) = part_inputs(&module.values.val(), r);
            acc.backward(loss, &module);
        }
        let mut opt = AdamW::<Flex>::new(AdamWConfig {
            max_grad_norm: None,
            ..AdamWConfig::default()
        });
        norm = opt.step(module, &mut acc, 0.0).unwrap().1.grad_norm;
    }
    (outcome, norm)
}

fn check_cases(key: &str, source: Source, dtype: DType, tolerance: f64) {
    let fixture = Fixture::load();
    let cases = fixture.json[key].as_array().unwrap();
    assert!(
        cases.len() >= if source == Source::Logp { 30 } else { 12 },
        "fixture has every loss_type variant"
    );
    for (number, case) in cases.iter().enumerate() {
        for splits in SPLITS {
            let name = format!(
                "{key} {number} ({} beta={} scale={} mask_truncated={} on_policy={} T={} split={splits:?})",
                case["loss_type"],
                case["beta"],
                case["scale_rewards"],
                case["mask_truncated"],
                case["on_policy"],
                case["temperature"],
            );
            let (outcome, norm) = run_case(&fixture, case, source, dtype, splits);
            assert_close(
                &format!("{name} loss"),
                outcome.loss,
                case["loss"].as_f64().unwrap(),
                tolerance,
            );
            let expected_grad = flatten(&case["grad"]);
            assert_eq!(outcome.grad.len(), expected_grad.len());
            for (index, (got, want)) in outcome.grad.iter().zip(&expected_grad).enumerate() {
                assert_close(&format!("{name} grad[{index}]"), *got, *want, tolerance);
            }
            if dtype == DType::F32 {
                assert_close(
                    &format!("{name} grad_norm"),
                    norm,
                    case["grad_norm"].as_f64().unwrap(),
                    1e-5,
                );
            }
            // Clip fractions are counts over tokens: exact up to the division.
            for (key, got, exact) in [
                ("clip_ratio_low", outcome.stats.clip_ratio_low, true),
                ("clip_ratio_high", outcome.stats.clip_ratio_high, true),
                ("clip_ratio_region", outcome.stats.clip_ratio_region, true),
                ("kl", outcome.stats.kl.unwrap(), false),
            ] {
                let tolerance = if exact { 1e-12 } else { tolerance };
                assert_close(
                    &format!("{name} {key}"),
                    got,
                    case[key].as_f64().unwrap(),
                    tolerance,
                );
            }
        }
    }
}

#[test]
fn loss_and_gradient_match_golden_in_f32() {
    check_cases("cases", Source::Logp, DType::F32, 1e-6);
}

#[test]
fn loss_and_gradient_match_golden_in_f64() {
    check_cases("cases", Source::Logp, DType::F64, 1e-12);
}

#[test]
fn scoring_at_a_temperature_matches_golden() {
    check_cases("logits_cases", Source::Logits, DType::F32, 1e-5);
}

#[test]
fn entropies_at_a_temperature_match_golden() {
    let fixture = Fixture::load();
    let shape = [fixture.rows * fixture.width, fixture.vocab];
    let logits = Tensor::<Flex, 2>::from_data(
        TensorData::new(fixture.matrix("logits"), shape),
        (&Default::default(), DType::F32),
    );
    for (temperature, expected) in fixture.json["entropies"].as_object().unwrap() {
        let got: Vec<f64> = entropies(logits.clone(), temperature.parse().unwrap())
            .to_data()
            .iter::<f64>()
            .collect();
        for (index, (got, want)) in got.iter().zip(flatten(expected)).enumerate() {
            assert_close(
                &format!("entropy at T={temperature} [{index}]"),
                *got,
                want,
                1e-5,
            );
        }
    }
}
