//! Sums of three numbers of the same length, worked column by column as in `arithmetic`.
//!
//! One operation and one shape per difficulty, so every column sits at the same offsets in
//! the prompt: the easiest family to learn from scratch, and the one whose errors are about
//! adding digits rather than finding them (`347+285+109=`, difficulty = digits per operand).

use rand::Rng;

use super::Solved;
use super::arithmetic::{addition, random_operands};

/// Difficulty = digits per operand.
pub(super) const DIFFICULTY: (u32, u32) = (1, 6);

pub(super) fn generate(digits: u32, rng: &mut impl Rng) -> Solved {
    addition(&random_operands(3, digits, rng))
}
