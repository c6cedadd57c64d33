//! Group-relative advantages: each completion's reward against its group's, as TRL's
//! `GRPOTrainer._generate_and_score_completions` computes them (`sum_then_normalize`).

use std::fmt;
use std::str::FromStr;

/// TRL's `scale_rewards`: what the centred rewards are divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleRewards {
    /// The standard deviation of the completion's group (TRL's default).
    #[default]
    Group,
    /// The standard deviation of the whole batch (PPO Lite).
    Batch,
    /// Nothing: advantages are rewards minus the group mean (Dr. GRPO).
    None,
}

impl FromStr for ScaleRewards {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "group" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" => Ok(ScaleRewards::None),
            other => Err(format!(
                "unknown scale_rewards `{other}` (expected one of: group, batch, none)"
            )),
        }
    }
}

/// Why rewards could not be grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdvantageError {
    ZeroGroupSize,
    /// The number of rewards is not a multiple of the group size.
    Ragged {
        rewards: usize,
        group_size: usize,
    },
}

impl fmt::Display for AdvantageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdvantageError::ZeroGroupSize => f.write_str("group_size must be at least 1"),
            AdvantageError::Ragged {
                rewards,
                group_size,
            } => write!(
                f,
                "{rewards} rewards do not split into groups of {group_size}"
            ),
        }
    }
}

impl std::error::Error for AdvantageError {}

/// Advantages of one batch, with the figure TRL logs about them.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One per completion, in the order of the rewards.
    pub advantages: Vec<f64>,
    /// Fraction of completions whose scaling standard deviation is zero (within 1e-8): for
    /// `group` and `none` the group's, for `batch` the batch's, exactly as TRL logs
    /// `frac_reward_zero_std`. 0.0 for an empty batch.
    pub frac_reward_zero_std: f64,
}

/// The constant TRL adds to the standard deviation before dividing.
const STD_EPSILON: f64 = 1e-4;

/// Advantages for `rewards` laid out as consecutive groups of `group_size` completions of
/// the same prompt: `(r − mean_group) / (std + 1e-4)` with the standard deviation chosen by
/// `scale` (unbiased, as torch's), or just `r − mean_group` for [`ScaleRewards::None`].
///
/// An unjudged completion (`None`, or a non-finite reward) is left out of its group's mean
/// and standard deviation and gets advantage 0, as TRL does with NaN rewards. A group with
/// fewer than two judged rewards has no standard deviation, so all its advantages are 0
/// under `group` scaling (TRL: NaN, then `nan_to_num`); with `group_size == 1` the standard
/// deviation is 0 by definition and so is every advantage.
pub fn compute_advantages(
    rewards: &[Option<f64>],
    group_size: usize,
    scale: ScaleRewards,
) -> Result<Advantages, AdvantageError> {
    if group_size == 0 {
        return Err(AdvantageError::ZeroGroupSize);
    }
    if !rewards.len().is_multiple_of(group_size) {
        return Err(AdvantageError::Ragged {
            rewards: rewards.len(),
            group_size,
        });
    }
    // NaN stands for "unjudged" from here on, so the arithmetic below is TRL's nan-aware
    // arithmetic line for line.
    let values: Vec<f64> = rewards
        .iter()
        .map(|reward| reward.filter(|value| value.is_finite()).unwrap_or(f64::NAN))
        .collect();
    let batch_std = if values.len() > 1 {
        nanstd(&values)
    } else {
        0.0
    };
    let mut advantages = Vec::with_capacity(values.len());
    let mut zero_std_rows = 0usize;
    for group in values.chunks(group_size) {
        let mean = nanmean(group);
        let std = match scale {
            ScaleRewards::Group | ScaleRewards::None if group_size > 1 => nanstd(group),
            ScaleRewards::Group | ScaleRewards::None => 0.0,
            ScaleRewards::Batch => batch_std,
        };
        // torch.isclose(std, 0): |std| <= atol (1e-8); NaN is never close.
        if std.abs() <= 1e-8 {
            zero_std_rows += group.len();
        }
        for &reward in group {
            let centred = reward - mean;
            let advantage = match scale {
                ScaleRewards::None => centred,
                _ => centred / (std + STD_EPSILON),
            };
            advantages.push(if advantage.is_nan() { 0.0 } else { advantage });
        }
    }
    let frac_reward_zero_std = if values.is_empty() {
        0.0
    } else {
        zero_std_rows as f64 / values.len() as f64
    };
    Ok(Advantages {
        advantages,
        frac_reward_zero_std,
    })
}

/// Mean of the non-NaN values; NaN when there are none (torch.nanmean).
fn nanmean(values: &[f64]) -> f64 {
    let (sum, count) = values
        .iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(sum, count), v| (sum + v, count + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// Bessel-corrected standard deviation of the non-NaN values; NaN for fewer than two
/// (TRL's `nanstd`).
fn nanstd(values: &[f64]) -> f64 {
    let count = values.iter().filter(|v| !v.is_nan()).count();
    if count < 2 {
        return f64::NAN;
    }
    let mean = nanmean(values);
    let sum_sq: f64 = values
        .iter()
        .filter(|v| !v.is_nan())
        .map(|v| (v - mean).powi(2))
        .sum();
    (sum_sq / (count - 1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn group_scaling_hand_values() {
        // Group [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3).
        let rewards = [Some(1.0), Some(0.0), Some(0.0)];
        let out = compute_advantages(&rewards, 3, ScaleRewards::Group).unwrap();
        let std = (1.0f64 / 3.0).sqrt();
        assert!(close(out.advantages[0], (2.0 / 3.0) / (std + 1e-4)));
        assert!(close(out.advantages[1], (-1.0 / 3.0) / (std + 1e-4)));
        assert_eq!(out.frac_reward_zero_std, 0.0);
        let none = compute_advantages(&rewards, 3, ScaleRewards::None).unwrap();
        assert!(close(none.advantages[0], 2.0 / 3.0));
    }

    #[test]
    fn unjudged_rewards_are_left_out_and_get_zero() {
        let rewards = [Some(1.0), None, Some(0.0), Some(f64::NAN)];
        let out = compute_advantages(&rewards, 4, ScaleRewards::Group).unwrap();
        // Judged [1, 0]: mean 0.5, std sqrt(0.5).
        let std = 0.5f64.sqrt();
        assert!(close(out.advantages[0], 0.5 / (std + 1e-4)));
        assert_eq!(out.advantages[1], 0.0);
        assert!(close(out.advantages[2], -0.5 / (std + 1e-4)));
        assert_eq!(out.advantages[3], 0.0);
    }

    #[test]
    fn degenerate_groups_give_zero_advantages() {
        // Zero std counts towards frac_reward_zero_std; a lone judged reward (NaN std) does not.
        let rewards = [Some(1.0), Some(1.0), None, Some(0.7), None, None];
        let out = compute_advantages(&rewards, 3, ScaleRewards::Group).unwrap();
        assert_eq!(out.advantages, vec![0.0; 6]);
        assert_eq!(out.frac_reward_zero_std, 0.5);
        let all_none = compute_advantages(&[None, None], 2, ScaleRewards::Batch).unwrap();
        assert_eq!(all_none.advantages, vec![0.0, 0.0]);
        let singles = compute_advantages(&[Some(3.0), Some(1.0)], 1, ScaleRewards::Group).unwrap();
        assert_eq!(
            (singles.advantages, singles.frac_reward_zero_std),
            (vec![0.0, 0.0], 1.0)
        );
        let empty = compute_advantages(&[], 4, ScaleRewards::Group).unwrap();
        assert_eq!(
            (empty.advantages.len(), empty.frac_reward_zero_std),
            (0, 0.0)
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert_eq!(
            compute_advantages(&[Some(1.0)], 0, ScaleRewards::Group),
            Err(AdvantageError::ZeroGroupSize)
        );
        assert_eq!(
            compute_advantages(&[Some(1.0); 5], 2, ScaleRewards::Group),
            Err(AdvantageError::Ragged {
                rewards: 5,
                group_size: 2
            })
        );
        assert_eq!("batch".parse(), Ok(ScaleRewards::Batch));
        assert!("std".parse::<ScaleRewards>().is_err());
    }
}
