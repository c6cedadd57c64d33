//! GRPO's math, exactly as TRL's `GRPOTrainer` computes it: group-relative advantages from
//! rewards, and the clipped-surrogate loss with its KL penalty and length normalisations.
//!
//! The grpo stage samples, scores (see [`crate::rewards`]) and runs the model; this module
//! turns rewards into advantages ([`compute_advantages`]) and log-probabilities into a loss
//! with gradients ([`grpo_loss`], generic over any burn backend). Golden tests compare both
//! with numbers from `stages/fixtures/grpo_golden.py`, an independent float64 implementation
//! of TRL's published formulas.

mod advantages;
mod loss;

#[cfg(test)]
pub(crate) mod golden_tests;

pub use advantages::{AdvantageError, Advantages, ScaleRewards, compute_advantages};
pub use loss::{
    LossConfig, LossError, LossStats, LossType, WholeBatch, completion_mask, entropy_bonus,
    grpo_loss,
};
