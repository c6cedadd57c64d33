//! The token-level loss of `distill`'s `mode: logits`, as TRL's
//! `GKDTrainer.generalized_jsd_loss` defines it (Agarwal et al. 2024, eq. 1).
//!
//! Both logits are divided by the temperature before the log-softmax. With `beta = 0` the loss
//! is the forward KL(teacher ‖ student), with `beta = 1` the reverse KL(student ‖ teacher), and in
//! between the generalised JSD `beta·KL(teacher ‖ m) + (1 − beta)·KL(student ‖ m)` against the
//! mixture `m = beta·teacher + (1 − beta)·student`. Each position's divergence is summed over the
//! vocabulary; TRL's "batchmean" then divides the sum over unmasked positions by their number.
//! [`jsd_sum`] returns the sum only, so a caller can divide by the whole optimizer step's token
//! count (TRL's `num_items_in_batch`) and micro-batches add up to the step's loss.
//!
//! Golden tests compare loss and gradient with numbers TRL's own function computed
//! (`stages/fixtures/gkd_golden.py`).

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;

/// The divergence of every position, `[rows, vocab]` logits → `[rows]`, summed over the
/// vocabulary. `beta` is in [0, 1] and `temperature` above 0 (the stage's param checks).
pub fn generalized_jsd<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    beta: f64,
    temperature: f64,
) -> Tensor<B, 1> {
    let rows = student.dims()[0];
    // A product, not a quotient: burn's autodiff takes the gradient of `div_scalar` through an
    // f32 reciprocal, which an f64 run would see.
    let inverse = temperature.recip();
    let s = log_softmax(student.mul_scalar(inverse), 1);
    let t = log_softmax(teacher.mul_scalar(inverse), 1).detach();
    // torch's kl_div(input, target, log_target=True) is exp(target)·(target − input) per entry.
    let kl = |input: Tensor<B, 2>, target: Tensor<B, 2>| target.clone().exp() * (target - input);
    let per_entry = if beta == 0.0 {
        kl(s, t)
    } else if beta == 1.0 {
        kl(t, s)
    } else {
        let a = s.clone().add_scalar((1.0 - beta).ln());
        let b = t.clone().add_scalar(beta.ln());
        // log(e^a + e^b) shifted by the larger term, held constant: the shift changes neither
        // the value nor the gradient, and keeps exp from underflowing to log(0).
        let c = a.clone().max_pair(b.clone()).detach();
        let m = ((a - c.clone()).exp() + (b - c.clone()).exp()).log() + c;
        kl(m.clone(), t).mul_scalar(beta) + kl(m, s).mul_scalar(1.0 - beta)
    };
    per_entry.sum_dim(1).reshape([rows])
}

/// The divergences of the positions where `mask` (`[rows]`, 1 or 0) is 1, summed: a one-element
/// tensor. Divided by the mask's sum it is TRL's "batchmean" loss.
pub fn jsd_sum<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    mask: Tensor<B, 1>,
    beta: f64,
    temperature: f64,
) -> Tensor<B, 1> {
    (generalized_jsd(student, teacher, beta, temperature) * mask).sum()
}

/// How many masked-in positions the student's and the teacher's most likely tokens agree on.
pub fn agreement<B: Backend>(student: Tensor<B, 2>, teacher: Tensor<B, 2>, mask: &[f32]) -> f64 {
    let top = |logits: Tensor<B, 2>| -> Vec<i64> {
        logits
            .detach()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap_or_default()
    };
    let (s, t) = (top(student), top(teacher));
    s.iter()
        .zip(&t)
        .zip(mask)
        .filter(|((a, b), m)| a == b && **m > 0.0)
        .count() as f64
}

#[cfg(test)]
mod golden_tests {
    //! Loss and gradient w.r.t. the student's logits against `fixtures/gkd_golden.json`, written
    //! by `stages/fixtures/gkd_golden.py` with TRL's `generalized_jsd_loss` (float64): in f32 (the
    //! training dtype) within `1e-6·max(1, |x|)`, in f64 within 1e-12. Each case also runs split
    //! into micro-batches divided by the whole batch's token count, as the stage does: the parts
    //! must add up to the whole.

    use std::ops::Range;

    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, TensorData};
    use serde_json::Value;

    use super::*;
    use crate::grpo_math::golden_tests::{assert_close, flatten};

    type Ad = Autodiff<Flex>;

    const GOLDEN: &str = include_str!("../fixtures/gkd_golden.json");

    /// Loss and gradient of one case, summed over the micro-batches `splits` (rows of
    /// `[batch·width, vocab]`).
    fn run(json: &Value, case: &Value, dtype: DType, splits: &[Range<usize>]) -> (f64, Vec<f64>) {
        let device = Default::default();
        let shape = [
            json["batch"].as_u64().unwrap() as usize * json["width"].as_u64().unwrap() as usize,
            json["vocab"].as_u64().unwrap() as usize,
        ];
        let mask: Vec<f64> = flatten(&json["labels"])
            .into_iter()
            .map(|l| if l == -100.0 { 0.0 } else { 1.0 })
            .collect();
        let tokens: f64 = mask.iter().sum();
        let tensor = |key: &str| {
            Tensor::<Ad, 2>::from_data(
                TensorData::new(flatten(&json[key]), shape),
                (&device, dtype),
            )
        };
        let (beta, temperature) = (
            case["beta"].as_f64().unwrap(),
            case["temperature"].as_f64().unwrap(),
        );
        let student = tensor("student").require_grad();
        let teacher = tensor("teacher");
        let mut total: Option<Tensor<Ad, 1>> = None;
        for r in splits {
            let part_mask = Tensor::<Ad, 1>::from_data(
                TensorData::new(mask[r.clone()].to_vec(), [r.len()]),
                (&device, dtype),
            );
            let part = jsd_sum(
                student.clone().slice([r.clone(), 0..shape[1]]),
                teacher.clone().slice([r.clone(), 0..shape[1]]),
                part_mask,
                beta,
                temperature,
            )
            .div_scalar(tokens);
            total = Some(match total {
                Some(t) => t + part,
                None => part,
            });
        }
        let total = total.unwrap();
        let grad = student.grad(&total.backward()).expect("a gradient");
        (
            total.to_data().iter::<f64>().next().unwrap(),
            grad.to_data().iter::<f64>().collect(),
        )
    }

    fn check(dtype: DType, tolerance: f64) {
        let json: Value = serde_json::from_str(GOLDEN).unwrap();
        let cases = json["cases"].as_array().unwrap();
        let betas: Vec<f64> = cases.iter().map(|c| c["beta"].as_f64().unwrap()).collect();
        for needed in [0.0, 0.5, 1.0] {
            assert!(betas.contains(&needed), "the fixture has beta = {needed}");
        }
        let rows = flatten(&json["labels"]).len();
        #[allow(clippy::single_range_in_vec_init)] // one range is the whole batch
        let splits: [Vec<Range<usize>>; 2] = [vec![0..rows], vec![0..4, 4..9, 9..rows]];
        for case in cases {
            for split in &splits {
                let name = format!(
                    "beta={} T={} split={split:?}",
                    case["beta"], case["temperature"]
                );
                let (loss, grad) = run(&json, case, dtype, split);
                assert_close(
                    &format!("{name} loss"),
                    loss,
                    case["loss"].as_f64().unwrap(),
                    tolerance,
                );
                let want = flatten(&case["grad"]);
                assert_eq!(grad.len(), want.len());
                for (i, (got, want)) in grad.iter().zip(&want).enumerate() {
                    assert_close(&format!("{name} grad[{i}]"), *got, *want, tolerance);
                }
            }
        }
    }

    #[test]
    fn loss_and_gradient_match_trl_in_f32() {
        check(DType::F32, 1e-6);
    }

    #[test]
    fn loss_and_gradient_match_trl_in_f64() {
        check(DType::F64, 1e-12);
    }

    #[test]
    fn masked_positions_and_agreement() {
        let device = Default::default();
        let logits =
            |v: Vec<f32>| Tensor::<Flex, 2>::from_data(TensorData::new(v, [2, 3]), &device);
        let student = logits(vec![3.0, 0.0, 0.0, 0.0, 2.0, 0.0]);
        let teacher = logits(vec![2.0, 1.0, 0.0, 5.0, 0.0, 0.0]);
        assert_eq!(
            agreement(student.clone(), teacher.clone(), &[1.0, 1.0]),
            1.0
        );
        assert_eq!(
            agreement(student.clone(), teacher.clone(), &[0.0, 1.0]),
            0.0
        );
        // A masked-out position adds nothing, however far apart the two are there.
        let mask = Tensor::<Flex, 1>::from_data(TensorData::new(vec![1.0f32, 0.0], [2]), &device);
        let first = jsd_sum(
            student.clone().slice([0..1, 0..3]),
            teacher.clone().slice([0..1, 0..3]),
            Tensor::from_data(TensorData::new(vec![1.0f32], [1]), &device),
            0.5,
            1.0,
        );
        let both = jsd_sum(student, teacher, mask, 0.5, 1.0);
        let value = |t: Tensor<Flex, 1>| t.into_data().iter::<f32>().next().unwrap();
        assert_eq!(value(first), value(both));
    }
}
