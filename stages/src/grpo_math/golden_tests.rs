//! Golden tests: advantages, loss and d loss / d logp against `fixtures/grpo_golden.json`,
//! written by `stages/fixtures/grpo_golden.py` (an independent float64 implementation of
//! TRL's formulas). Regenerate with `python3 stages/fixtures/grpo_golden.py`.
//!
//! The loss runs on burn's `Autodiff<Flex>` twice: in f32, the training dtype, within
//! `1e-6·max(1, |x|)`; and in f64 within 1e-12, which shows the f32 gap is rounding only.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use serde_json::Value;

use super::*;

type Backend = Autodiff<Flex>;

const GOLDEN: &str = include_str!("../../fixtures/grpo_golden.json");

struct Fixture {
    json: Value,
    rows: usize,
    width: usize,
    group_size: usize,
}

impl Fixture {
    fn load() -> Self {
        let json: Value = serde_json::from_str(GOLDEN).expect("golden JSON parses");
        let rows = json["batch"].as_u64().unwrap() as usize;
        let width = json["width"].as_u64().unwrap() as usize;
        let group_size = json["group_size"].as_u64().unwrap() as usize;
        Self { json, rows, width, group_size }
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
}

fn flatten(value: &Value) -> Vec<f64> {
    match value {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        number => vec![number.as_f64().expect("a number")],
    }
}

fn scale_of(name: &str) -> ScaleRewards {
    name.parse().unwrap()
}

fn assert_close(what: &str, got: f64, expected: f64, tolerance: f64) {
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
        let got = compute_advantages(&fixture.rewards(), fixture.group_size, scale_of(scale)).unwrap();
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

struct Outcome {
    loss: f64,
    grad: Vec<f64>,
    stats: LossStats,
}

fn run_case(fixture: &Fixture, case: &Value, dtype: DType) -> Outcome {
    let device = Default::default();
    let shape = [fixture.rows, fixture.width];
    let tensor = |values: Vec<f64>| {
        Tensor::<Backend, 2>::from_data(TensorData::new(values, shape), (&device, dtype))
    };
    let cfg = LossConfig {
        loss_type: case["loss_type"].as_str().unwrap().parse().unwrap(),
        epsilon_low: case["epsilon_low"].as_f64().unwrap(),
        epsilon_high: case["epsilon_high"].as_f64().unwrap(),
        beta: case["beta"].as_f64().unwrap(),
        max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
        num_items_in_batch: case["num_items_in_batch"].as_f64(),
        gradient_accumulation_steps: case["gradient_accumulation_steps"].as_u64().unwrap() as usize,
    };
    let scale = scale_of(case["scale_rewards"].as_str().unwrap());
    let advantages = compute_advantages(&fixture.rewards(), fixture.group_size, scale)
        .unwrap()
        .advantages;
    let mask = completion_mask(
        &fixture.completions(),
        fixture.width,
        case["mask_truncated"].as_bool().unwrap(),
    );

    let logp = tensor(fixture.matrix("logp")).require_grad();
    let old_logp = if case["on_policy"].as_bool().unwrap() {
        logp.clone().detach()
    } else {
        tensor(fixture.matrix("old_logp"))
    };
    let ref_logp = tensor(fixture.matrix("ref_logp"));
    let advantages = Tensor::<Backend, 1>::from_data(
        TensorData::new(advantages, [fixture.rows]),
        (&device, dtype),
    );
    let mask = tensor(mask.into_iter().map(f64::from).collect());

    let (loss, stats) = grpo_loss(
        logp.clone(),
        old_logp,
        Some(ref_logp),
        advantages,
        mask,
        &cfg,
    )
    .unwrap();
    let grads = loss.backward();
    let grad = logp.grad(&grads).expect("logp has a gradient");
    Outcome {
        loss: loss.to_data().iter::<f64>().next().unwrap(),
        grad: grad.to_data().iter::<f64>().collect(),
        stats,
    }
}

fn check_all_cases(dtype: DType, tolerance: f64) {
    let fixture = Fixture::load();
    let cases = fixture.json["cases"].as_array().unwrap();
    assert!(cases.len() >= 30, "fixture has every loss_type variant");
    for (number, case) in cases.iter().enumerate() {
        let name = format!(
            "case {number} ({} beta={} scale={} mask_truncated={} on_policy={} accum={})",
            case["loss_type"],
            case["beta"],
            case["scale_rewards"],
            case["mask_truncated"],
            case["on_policy"],
            case["gradient_accumulation_steps"],
        );
        let outcome = run_case(&fixture, case, dtype);
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
        // Clip fractions are counts over tokens: exact up to the division.
        for (key, got) in [
            ("clip_ratio_low", outcome.stats.clip_ratio_low),
            ("clip_ratio_high", outcome.stats.clip_ratio_high),
            ("clip_ratio_region", outcome.stats.clip_ratio_region),
        ] {
            assert_close(
                &format!("{name} {key}"),
                got,
                case[key].as_f64().unwrap(),
                1e-12,
            );
        }
        assert_close(
            &format!("{name} kl"),
            outcome.stats.kl.unwrap(),
            case["kl"].as_f64().unwrap(),
            tolerance,
        );
    }
}

#[test]
fn loss_and_gradient_match_golden_in_f32() {
    check_all_cases(DType::F32, 1e-6);
}

#[test]
fn loss_and_gradient_match_golden_in_f64() {
    check_all_cases(DType::F64, 1e-12);
}
