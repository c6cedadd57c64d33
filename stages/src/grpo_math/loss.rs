//! GRPO's per-token clipped-surrogate loss with the k3 KL penalty, normalised per
//! `loss_type` exactly as TRL's `GRPOTrainer._compute_loss` does (token-level importance
//! sampling, `sum_then_normalize` advantages).

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

/// How the masked per-token losses of a batch become one number (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossType {
    /// Mean over each sequence's tokens, then over sequences (the original GRPO; length-biased).
    Grpo,
    /// Sum over the batch's tokens ÷ the batch's token count.
    Bnpo,
    /// Sum ÷ (sequences × `max_completion_length`) (Dr. GRPO).
    DrGrpo,
    /// Sum ÷ tokens in the whole batch (DAPO; TRL's default).
    #[default]
    Dapo,
}

impl LossType {
    pub const ALL: [LossType; 4] = [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
    ];
}

impl FromStr for LossType {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "grpo" => Ok(LossType::Grpo),
            "bnpo" => Ok(LossType::Bnpo),
            "dr_grpo" => Ok(LossType::DrGrpo),
            "dapo" => Ok(LossType::Dapo),
            other => Err(format!(
                "unknown loss_type `{other}` (expected one of: grpo, bnpo, dr_grpo, dapo)"
            )),
        }
    }
}

/// The batch that one optimizer step is taken on, when a [`grpo_loss`] call sees only a
/// micro-batch of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WholeBatch {
    /// Completions in the whole batch.
    pub sequences: usize,
    /// Completion tokens in the whole batch that count, after truncation masking (TRL's
    /// `num_items_in_batch`).
    pub tokens: f64,
}

/// Loss settings, named as TRL's `GRPOConfig` names them. Defaults are TRL's.
#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    pub loss_type: LossType,
    /// Lower clip: ratios below `1 − epsilon_low` stop pushing down (TRL's `epsilon`).
    pub epsilon_low: f64,
    /// Upper clip: ratios above `1 + epsilon_high` stop pushing up (DAPO's clip-higher).
    pub epsilon_high: f64,
    /// Weight of the k3 KL estimate to the reference policy; 0 skips it.
    pub beta: f64,
    /// `dr_grpo`'s constant length.
    pub max_completion_length: usize,
    /// The whole batch this call's micro-batch is part of; `None`: the call is the whole batch.
    /// Every loss type divides by the whole batch's count (sequences or tokens), so the
    /// micro-batches' losses, and so their gradients, add up to the whole batch's: the loss
    /// TRL computes for the batch in one piece, whatever the split (a memory setting only).
    pub whole_batch: Option<WholeBatch>,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            loss_type: LossType::Dapo,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            max_completion_length: 256,
            whole_batch: None,
        }
    }
}

impl LossConfig {
    fn validate(&self, rows: usize) -> Result<(), LossError> {
        let bad = |message: String| Err(LossError::BadConfig(message));
        for (name, value) in [
            ("epsilon", self.epsilon_low),
            ("epsilon_high", self.epsilon_high),
            ("beta", self.beta),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(format!(
                    "{name} is {value}; it must be finite and not negative"
                ));
            }
        }
        if self.loss_type == LossType::DrGrpo && self.max_completion_length == 0 {
            return bad("dr_grpo needs max_completion_length of at least 1".into());
        }
        if let Some(whole) = self.whole_batch {
            if whole.sequences < rows {
                return bad(format!(
                    "the whole batch has {} sequences, fewer than this micro-batch's {rows}",
                    whole.sequences
                ));
            }
            if !(whole.tokens.is_finite() && whole.tokens >= 0.0) {
                return bad(format!("the whole batch's token count is {}", whole.tokens));
            }
        }
        Ok(())
    }

    /// Sum of `masked` `[rows, width]` (per-token values, zero outside the mask), normalised
    /// over the whole batch as `loss_type` says; `tokens` is this call's mask sum.
    fn normalise<B: Backend>(
        &self,
        masked: Tensor<B, 2>,
        mask: Tensor<B, 2>,
        tokens: f64,
    ) -> Tensor<B, 1> {
        let rows = masked.dims()[0];
        let whole = self.whole_batch.unwrap_or(WholeBatch {
            sequences: rows,
            tokens,
        });
        match self.loss_type {
            LossType::Grpo => {
                let lengths = mask.sum_dim(1).clamp_min(1.0);
                divide((masked.sum_dim(1) / lengths).sum(), whole.sequences as f64)
            }
            LossType::Bnpo | LossType::Dapo => divide(masked.sum(), whole.tokens.max(1.0)),
            LossType::DrGrpo => divide(
                masked.sum(),
                (whole.sequences * self.max_completion_length) as f64,
            ),
        }
    }
}

/// Why the loss could not be computed.
#[derive(Debug, Clone, PartialEq)]
pub enum LossError {
    /// Inputs whose shapes disagree.
    Shape(String),
    /// No sequences or no positions.
    Empty,
    /// `beta` is non-zero but no reference log-probabilities were given.
    MissingReference,
    BadConfig(String),
}

impl fmt::Display for LossError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossError::Shape(message) => write!(f, "GRPO loss inputs disagree: {message}"),
            LossError::Empty => f.write_str("GRPO loss of an empty batch"),
            LossError::MissingReference => {
                f.write_str("beta is not 0 but no reference log-probabilities were given")
            }
            LossError::BadConfig(message) => write!(f, "bad GRPO loss config: {message}"),
        }
    }
}

impl std::error::Error for LossError {}

/// Figures about one loss computation, as TRL logs them (token means over this call's mask:
/// weight them by `tokens` to combine micro-batches).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossStats {
    /// Mean k3 KL to the reference; `None` when no reference was given.
    pub kl: Option<f64>,
    /// Tokens whose ratio fell below `1 − epsilon_low` with a negative advantage.
    pub clip_ratio_low: f64,
    /// Tokens whose ratio rose above `1 + epsilon_high` with a positive advantage.
    pub clip_ratio_high: f64,
    /// Either of the two.
    pub clip_ratio_region: f64,
    /// Sum of the mask: the completion tokens that count.
    pub tokens: f64,
}

/// The GRPO loss of a micro-batch, a one-element tensor to call `backward` on: its share of the
/// whole batch's loss (see [`LossConfig::whole_batch`]).
///
/// `logp`, `old_logp`, `ref_logp` and `mask` are `[sequences, positions]`; `advantages`
/// is `[sequences]`. `old_logp` is the sampling policy's log-probabilities (with one
/// iteration per batch, pass `logp.clone().detach()`, as TRL does); it, `ref_logp` and
/// `advantages` are detached here, so gradients flow only into `logp`. Positions where the
/// mask is 0 are zeroed before any arithmetic, so padding holding `-inf` or NaN cannot
/// poison the loss or its gradient.
///
/// Per token: `ratio = exp(logp − old)`, `−min(ratio·A, clip(ratio, 1−ε_low, 1+ε_high)·A)`,
/// plus `beta · (exp(ref − logp) − (ref − logp) − 1)` when `beta ≠ 0`; then masked and
/// normalised per [`LossType`].
pub fn grpo_loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    ref_logp: Option<Tensor<B, 2>>,
    advantages: Tensor<B, 1>,
    mask: Tensor<B, 2>,
    cfg: &LossConfig,
) -> Result<(Tensor<B, 1>, LossStats), LossError> {
    let [rows, width] = logp.dims();
    same_shape("old_logp", old_logp.dims(), [rows, width])?;
    same_shape("mask", mask.dims(), [rows, width])?;
    if let Some(reference) = &ref_logp {
        same_shape("ref_logp", reference.dims(), [rows, width])?;
    }
    if advantages.dims() != [rows] {
        return Err(LossError::Shape(format!(
            "advantages are {:?}, expected [{rows}]",
            advantages.dims()
        )));
    }
    if rows == 0 || width == 0 {
        return Err(LossError::Empty);
    }
    cfg.validate(rows)?;
    if cfg.beta != 0.0 && ref_logp.is_none() {
        return Err(LossError::MissingReference);
    }

    let host = HostCopy::read(&logp, &old_logp, ref_logp.as_ref(), &advantages, &mask);
    let padding = mask.clone().equal_elem(0.0);
    let logp = zero_padding(logp, &padding);
    let old_logp = zero_padding(old_logp.detach(), &padding);
    let ref_logp = ref_logp.map(|reference| zero_padding(reference.detach(), &padding));
    let advantages = advantages
        .detach()
        .unsqueeze_dim::<2>(1)
        .repeat_dim(1, width);

    let ratio = (logp.clone() - old_logp).exp();
    let clipped = ratio
        .clone()
        .clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let mut per_token = (ratio * advantages.clone())
        .min_pair(clipped * advantages)
        .neg();
    if cfg.beta != 0.0
        && let Some(reference) = ref_logp
    {
        let log_ratio = reference - logp;
        let kl = log_ratio.clone().exp() - log_ratio - 1.0;
        per_token = per_token + kl.mul_scalar(cfg.beta);
    }
    let masked = per_token * mask.clone();

    let tokens = host.mask.iter().sum::<f64>();
    let loss = cfg.normalise(masked, mask, tokens);
    Ok((loss, host.stats(cfg, tokens)))
}

/// The entropy bonus term: the per-token entropies aggregated over the whole batch exactly as
/// [`grpo_loss`] aggregates per-token losses for `cfg.loss_type`, times `coef`. Subtract it from
/// the loss (`loss − bonus`) to reward exploration. `entropies` is the per-token entropy of the
/// policy, `[sequences, positions]`, with its graph, so the bonus has gradients.
pub fn entropy_bonus<B: Backend>(
    entropies: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    coef: f64,
    cfg: &LossConfig,
) -> Result<Tensor<B, 1>, LossError> {
    let [rows, width] = entropies.dims();
    same_shape("mask", mask.dims(), [rows, width])?;
    if rows == 0 || width == 0 {
        return Err(LossError::Empty);
    }
    cfg.validate(rows)?;
    let tokens = scalar(&mask.clone().sum());
    let padding = mask.clone().equal_elem(0.0);
    let masked = zero_padding(entropies, &padding) * mask.clone();
    Ok(cfg.normalise(masked, mask, tokens).mul_scalar(coef))
}

/// The loss mask of a batch, row-major `[completions, width]`: 1.0 on each completion's
/// first `length` positions (at most `width`), 0.0 after. With `mask_truncated`, the rows
/// of truncated completions are all 0.0 (TRL's `mask_truncated_completions`). Its sum is
/// the batch's `num_items_in_batch` ([`WholeBatch::tokens`]).
pub fn completion_mask(
    completions: &[(usize, bool)],
    width: usize,
    mask_truncated: bool,
) -> Vec<f32> {
    let mut mask = vec![0.0; completions.len() * width];
    for (row, &(length, truncated)) in completions.iter().enumerate() {
        if !(mask_truncated && truncated) {
            mask[row * width..row * width + length.min(width)].fill(1.0);
        }
    }
    mask
}

fn same_shape(name: &str, got: [usize; 2], expected: [usize; 2]) -> Result<(), LossError> {
    if got == expected {
        Ok(())
    } else {
        Err(LossError::Shape(format!(
            "{name} is {got:?}, logp is {expected:?}"
        )))
    }
}

/// `tensor / divisor` as a multiplication: burn 0.21's autodiff differentiates `div_scalar`
/// with the reciprocal rounded to f32 even for f64 tensors, `mul_scalar` keeps the scalar.
fn divide<B: Backend>(tensor: Tensor<B, 1>, divisor: f64) -> Tensor<B, 1> {
    tensor.mul_scalar(1.0 / divisor)
}

fn zero_padding<B: Backend>(values: Tensor<B, 2>, padding: &Tensor<B, 2, Bool>) -> Tensor<B, 2> {
    values.mask_fill(padding.clone(), 0.0)
}

fn scalar<B: Backend>(tensor: &Tensor<B, 1>) -> f64 {
    tensor.to_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

fn host_values<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> Vec<f64> {
    tensor.to_data().iter::<f64>().collect()
}

/// The inputs read back to the host, for the logged figures (no gradients needed).
struct HostCopy {
    width: usize,
    logp: Vec<f64>,
    old_logp: Vec<f64>,
    ref_logp: Option<Vec<f64>>,
    advantages: Vec<f64>,
    mask: Vec<f64>,
}

impl HostCopy {
    fn read<B: Backend>(
        logp: &Tensor<B, 2>,
        old_logp: &Tensor<B, 2>,
        ref_logp: Option<&Tensor<B, 2>>,
        advantages: &Tensor<B, 1>,
        mask: &Tensor<B, 2>,
    ) -> Self {
        Self {
            width: logp.dims()[1],
            logp: host_values(logp),
            old_logp: host_values(old_logp),
            ref_logp: ref_logp.map(host_values),
            advantages: host_values(advantages),
            mask: host_values(mask),
        }
    }

    fn stats(&self, cfg: &LossConfig, tokens: f64) -> LossStats {
        let (mut low, mut high, mut region, mut kl) = (0.0, 0.0, 0.0, 0.0);
        for (index, &weight) in self.mask.iter().enumerate() {
            // Skipped rather than multiplied by 0, so padding values never matter.
            if weight == 0.0 {
                continue;
            }
            let advantage = self.advantages[index / self.width];
            let ratio = (self.logp[index] - self.old_logp[index]).exp();
            let is_low = ratio < 1.0 - cfg.epsilon_low && advantage < 0.0;
            let is_high = ratio > 1.0 + cfg.epsilon_high && advantage > 0.0;
            low += weight * f64::from(u8::from(is_low));
            high += weight * f64::from(u8::from(is_high));
            region += weight * f64::from(u8::from(is_low || is_high));
            if let Some(reference) = &self.ref_logp {
                let log_ratio = reference[index] - self.logp[index];
                kl += weight * (log_ratio.exp() - log_ratio - 1.0);
            }
        }
        let per_token = |sum: f64| sum / tokens.max(1.0);
        LossStats {
            kl: self.ref_logp.as_ref().map(|_| per_token(kl)),
            clip_ratio_low: per_token(low),
            clip_ratio_high: per_token(high),
            clip_ratio_region: per_token(region),
            tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    use super::*;

    type Backend = Autodiff<Flex>;

    fn matrix<const W: usize>(rows: &[[f32; W]]) -> Tensor<Backend, 2> {
        let values: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(
            TensorData::new(values, [rows.len(), W]),
            &Default::default(),
        )
    }

    fn vector(values: &[f32]) -> Tensor<Backend, 1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Default::default(),
        )
    }

    fn values<B: burn::tensor::backend::Backend, const D: usize>(
        tensor: &Tensor<B, D>,
    ) -> Vec<f64> {
        tensor.to_data().iter::<f64>().collect()
    }

    #[test]
    fn on_policy_loss_is_minus_mean_advantage_and_gradient_is_scaled_advantage() {
        // ratio = 1 everywhere: per-token loss −A, d/dlogp −A; grpo averages per sequence.
        let logp = matrix(&[[-1.0, -2.0], [-0.5, -0.5]]).require_grad();
        let mask = matrix(&[[1.0, 1.0], [1.0, 0.0]]);
        let cfg = LossConfig {
            loss_type: LossType::Grpo,
            ..LossConfig::default()
        };
        let (loss, stats) = grpo_loss(
            logp.clone(),
            logp.clone().detach(),
            None,
            vector(&[1.0, -2.0]),
            mask,
            &cfg,
        )
        .unwrap();
        assert!((values(&loss)[0] - 0.5).abs() < 1e-6); // mean(−1, +2)
        let grad = logp.grad(&loss.backward()).unwrap();
        let expected = [-0.25, -0.25, 1.0, 0.0]; // −A / (len · rows)
        for (got, want) in values(&grad).iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(stats.kl, None);
        assert_eq!((stats.clip_ratio_region, stats.tokens), (0.0, 3.0));
    }

    #[test]
    fn padding_values_cannot_poison_the_loss() {
        let logp = matrix(&[[-1.0, f32::NEG_INFINITY], [f32::NAN, f32::NAN]]).require_grad();
        let old = matrix(&[[-1.2, f32::NAN], [-1.0, f32::INFINITY]]);
        let reference = matrix(&[[-0.9, f32::NAN], [f32::NAN, -1.0]]);
        let mask = matrix(&[[1.0, 0.0], [0.0, 0.0]]);
        for loss_type in LossType::ALL {
            let cfg = LossConfig {
                loss_type,
                beta: 0.04,
                ..LossConfig::default()
            };
            let (loss, stats) = grpo_loss(
                logp.clone(),
                old.clone(),
                Some(reference.clone()),
                vector(&[1.0, -1.0]),
                mask.clone(),
                &cfg,
            )
            .unwrap();
            assert!(values(&loss)[0].is_finite(), "{loss_type:?}");
            let grad = values(&logp.grad(&loss.backward()).unwrap());
            assert!(grad[0] != 0.0 && grad[0].is_finite());
            assert_eq!(&grad[1..], [0.0, 0.0, 0.0], "{loss_type:?}");
            assert!(stats.kl.unwrap().is_finite());
        }
    }

    #[test]
    fn an_all_zero_mask_gives_zero_loss_not_nan() {
        let logp = matrix(&[[-1.0, -1.0]]).require_grad();
        let mask = matrix(&[[0.0, 0.0]]);
        for loss_type in LossType::ALL {
            let cfg = LossConfig {
                loss_type,
                ..LossConfig::default()
            };
            let (loss, stats) = grpo_loss(
                logp.clone(),
                logp.clone().detach(),
                None,
                vector(&[1.0]),
                mask.clone(),
                &cfg,
            )
            .unwrap();
            assert_eq!(values(&loss), vec![0.0]);
            assert_eq!((stats.tokens, stats.clip_ratio_low), (0.0, 0.0));
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let logp = matrix(&[[-1.0, -1.0]]);
        let cfg = LossConfig::default();
        let run =
            |old: Tensor<Backend, 2>, adv: &[f32], mask: Tensor<Backend, 2>, cfg: &LossConfig| {
                grpo_loss(logp.clone(), old, None, vector(adv), mask, cfg).map(|_| ())
            };
        let ones = matrix(&[[1.0, 1.0]]);
        assert!(matches!(
            run(matrix(&[[-1.0]]), &[1.0], ones.clone(), &cfg),
            Err(LossError::Shape(_))
        ));
        assert!(matches!(
            run(logp.clone(), &[1.0, 2.0], ones.clone(), &cfg),
            Err(LossError::Shape(_))
        ));
        let with_kl = LossConfig {
            beta: 0.1,
            ..LossConfig::default()
        };
        assert_eq!(
            run(logp.clone(), &[1.0], ones.clone(), &with_kl),
            Err(LossError::MissingReference)
        );
        let negative = LossConfig {
            epsilon_low: -0.1,
            ..LossConfig::default()
        };
        assert!(matches!(
            run(logp.clone(), &[1.0], ones.clone(), &negative),
            Err(LossError::BadConfig(_))
        ));
        let no_length = LossConfig {
            loss_type: LossType::DrGrpo,
            max_completion_length: 0,
            ..LossConfig::default()
        };
        assert!(matches!(
            run(logp.clone(), &[1.0], ones, &no_length),
            Err(LossError::BadConfig(_))
        ));
        let empty = Tensor::<Backend, 2>::from_data(
            TensorData::new(Vec::<f32>::new(), [0, 3]),
            &Default::default(),
        );
        let result = grpo_loss(empty.clone(), empty.clone(), None, vector(&[]), empty, &cfg);
        assert_eq!(result.map(|_| ()), Err(LossError::Empty));
        assert_eq!("dr_grpo".parse(), Ok(LossType::DrGrpo));
        assert!("ppo".parse::<LossType>().is_err());
    }

    #[test]
    fn completion_mask_marks_lengths_and_drops_truncated_rows() {
        let rows = [(2, false), (5, true), (0, false)];
        assert_eq!(
            completion_mask(&rows, 3, false),
            vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(
            completion_mask(&rows, 3, true),
            vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        assert!(completion_mask(&[], 4, true).is_empty());
    }

    #[test]
    fn entropy_bonus_hand_values() {
        let entropies = matrix(&[[1.0, 2.0], [3.0, 99.0]]).require_grad();
        let mask = matrix(&[[1.0, 1.0], [1.0, 0.0]]);
        // grpo: sequence means 1.5 and 3, over a whole batch of 4 sequences: 1.125; ×coef 0.5.
        let cfg = LossConfig {
            loss_type: LossType::Grpo,
            whole_batch: Some(WholeBatch {
                sequences: 4,
                tokens: 12.0,
            }),
            ..LossConfig::default()
        };
        let bonus = entropy_bonus(entropies.clone(), mask.clone(), 0.5, &cfg).unwrap();
        assert!((values(&bonus)[0] - 0.5625).abs() < 1e-6);
        // dapo: sum 6 over a 12-token whole batch, ×0.5.
        let dapo = LossConfig {
            whole_batch: Some(WholeBatch {
                sequences: 4,
                tokens: 12.0,
            }),
            ..LossConfig::default()
        };
        let bonus = entropy_bonus(entropies.clone(), mask, 0.5, &dapo).unwrap();
        assert!((values(&bonus)[0] - 0.25).abs() < 1e-6);
        let grad = values(&entropies.grad(&bonus.backward()).unwrap());
        let step = 0.5 / 12.0;
        for (got, want) in grad.iter().zip([step, step, step, 0.0]) {
            assert!((got - want).abs() < 1e-7);
        }
    }

    #[test]
    fn a_whole_batch_smaller_than_the_call_is_an_error() {
        let logp = matrix(&[[-1.0], [-1.0]]);
        let cfg = LossConfig {
            whole_batch: Some(WholeBatch {
                sequences: 1,
                tokens: 2.0,
            }),
            ..LossConfig::default()
        };
        let result = grpo_loss(
            logp.clone(),
            logp,
            None,
            vector(&[1.0, 1.0]),
            matrix(&[[1.0], [1.0]]),
            &cfg,
        );
        assert!(matches!(result, Err(LossError::BadConfig(_))));
    }
}
