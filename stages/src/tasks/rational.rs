//! Exact fractions over `i128`, for the expression evaluator and the answer verifier.
//!
//! Answers are compared exactly (`0.5` is `1/2`, `0.333` is not `1/3`), so there is no
//! floating point here. Every operation is checked: a result that does not fit is `None`,
//! never a wrong value or a panic.

use std::fmt;

/// A fraction in lowest terms with a positive denominator, so equal values compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Rational {
    numerator: i128,
    denominator: i128,
}

/// Beyond this exponent every base other than 0 and ±1 overflows `i128`.
const MAX_EXPONENT: u32 = 127;

impl Rational {
    pub(crate) const ZERO: Rational = Rational::integer(0);

    pub(crate) const fn integer(value: i128) -> Self {
        Rational {
            numerator: value,
            denominator: 1,
        }
    }

    /// `numerator / denominator` in lowest terms; `None` for a zero denominator or when the
    /// reduced fraction does not fit.
    pub(crate) fn new(numerator: i128, denominator: i128) -> Option<Self> {
        if denominator == 0 {
            return None;
        }
        let divisor =
            i128::try_from(gcd(numerator.unsigned_abs(), denominator.unsigned_abs())).ok()?;
        let (mut numerator, mut denominator) = (numerator / divisor, denominator / divisor);
        if denominator < 0 {
            numerator = numerator.checked_neg()?;
            denominator = denominator.checked_neg()?;
        }
        Some(Rational {
            numerator,
            denominator,
        })
    }

    /// The value of a decimal numeral's digits, `whole.fraction` (either may be empty);
    /// `None` for anything but ASCII digits or when it does not fit.
    pub(crate) fn from_decimal(whole: &str, fraction: &str) -> Option<Self> {
        let digits = |text: &str| text.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(fraction) {
            return None;
        }
        let parse = |text: &str| match text {
            "" => Some(0),
            _ => text.parse::<i128>().ok(),
        };
        let fraction = fraction.trim_end_matches('0');
        let scale = 10i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
        let numerator = parse(whole)?
            .checked_mul(scale)?
            .checked_add(parse(fraction)?)?;
        Rational::new(numerator, scale)
    }

    /// The value as an integer, when it is one.
    pub(crate) fn to_integer(self) -> Option<i128> {
        (self.denominator == 1).then_some(self.numerator)
    }

    pub(crate) fn checked_neg(self) -> Option<Self> {
        Some(Rational {
            numerator: self.numerator.checked_neg()?,
            denominator: self.denominator,
        })
    }

    pub(crate) fn checked_add(self, other: Self) -> Option<Self> {
        // Over the least common denominator, which keeps intermediate values small.
        let divisor = i128::try_from(gcd(
            self.denominator.unsigned_abs(),
            other.denominator.unsigned_abs(),
        ))
        .ok()?;
        let (mine, theirs) = (self.denominator / divisor, other.denominator / divisor);
        let numerator = self
            .numerator
            .checked_mul(theirs)?
            .checked_add(other.numerator.checked_mul(mine)?)?;
        Rational::new(numerator, mine.checked_mul(other.denominator)?)
    }

    pub(crate) fn checked_sub(self, other: Self) -> Option<Self> {
        self.checked_add(other.checked_neg()?)
    }

    pub(crate) fn checked_mul(self, other: Self) -> Option<Self> {
        Rational::new(
            self.numerator.checked_mul(other.numerator)?,
            self.denominator.checked_mul(other.denominator)?,
        )
    }

    /// `None` when dividing by zero.
    pub(crate) fn checked_div(self, other: Self) -> Option<Self> {
        self.checked_mul(Rational::new(other.denominator, other.numerator)?)
    }

    /// `self` to an integer power (negative too); `None` for a fractional exponent, `0^0`,
    /// `0` to a negative power, or a result that does not fit.
    pub(crate) fn checked_pow(self, exponent: Self) -> Option<Self> {
        let exponent = exponent.to_integer()?;
        let base = match exponent.signum() {
            0 if self == Rational::ZERO => return None,
            -1 => Rational::new(self.denominator, self.numerator)?,
            _ => self,
        };
        let power = match u32::try_from(exponent.unsigned_abs()) {
            Ok(power) if power <= MAX_EXPONENT => power,
            // Only 0 and ±1 survive huge exponents; checking them avoids any big loop.
            _ if base == Rational::ZERO
                || (base.denominator == 1 && base.numerator.unsigned_abs() == 1) =>
            {
                let odd = exponent % 2 != 0;
                return Some(if base.numerator < 0 && !odd {
                    Rational::integer(1)
                } else {
                    base
                });
            }
            _ => return None,
        };
        // Lowest terms stay lowest terms when both parts are raised to the same power.
        Some(Rational {
            numerator: base.numerator.checked_pow(power)?,
            denominator: base.denominator.checked_pow(power)?,
        })
    }
}

impl fmt::Display for Rational {
    /// `7`, `-7` or `-7/2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.denominator == 1 {
            write!(f, "{}", self.numerator)
        } else {
            write!(f, "{}/{}", self.numerator, self.denominator)
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(numerator: i128, denominator: i128) -> Rational {
        Rational::new(numerator, denominator).unwrap()
    }

    #[test]
    fn fractions_are_kept_in_lowest_terms() {
        assert_eq!(q(2, 4), q(1, 2));
        assert_eq!(q(3, -6), q(-1, 2));
        assert_eq!(q(0, -5), Rational::ZERO);
        assert_eq!(q(-6, 3).to_integer(), Some(-2));
        assert_eq!(q(1, 2).to_integer(), None);
        assert_eq!(Rational::new(1, 0), None);
        assert_eq!(q(-7, 2).to_string(), "-7/2");
        assert_eq!(q(14, 2).to_string(), "7");
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(Rational::from_decimal("0", "5"), Some(q(1, 2)));
        assert_eq!(Rational::from_decimal("", "25"), Some(q(1, 4)));
        assert_eq!(Rational::from_decimal("0741", "000"), Some(q(741, 1)));
        assert_eq!(Rational::from_decimal("0", "333"), Some(q(333, 1000)));
        assert_eq!(Rational::from_decimal("1", "5"), Some(q(3, 2)));
        assert_eq!(Rational::from_decimal("+1", ""), None);
        assert_eq!(Rational::from_decimal("1", "-5"), None);
        assert_eq!(Rational::from_decimal(&"9".repeat(60), ""), None);
        assert_eq!(Rational::from_decimal("0", &"1".repeat(60)), None);
    }

    #[test]
    fn arithmetic_is_exact() {
        assert_eq!(q(1, 2).checked_add(q(1, 3)), Some(q(5, 6)));
        assert_eq!(q(1, 2).checked_sub(q(1, 2)), Some(Rational::ZERO));
        assert_eq!(q(2, 3).checked_mul(q(3, 4)), Some(q(1, 2)));
        assert_eq!(q(1, 2).checked_div(q(1, 4)), Some(q(2, 1)));
        assert_eq!(q(1, 2).checked_div(Rational::ZERO), None);
        assert_eq!(q(3, 2).checked_pow(q(2, 1)), Some(q(9, 4)));
        assert_eq!(q(2, 1).checked_pow(q(-2, 1)), Some(q(1, 4)));
        assert_eq!(q(2, 1).checked_pow(q(1, 2)), None, "roots are not exact");
        assert_eq!(Rational::ZERO.checked_pow(Rational::ZERO), None);
        assert_eq!(Rational::ZERO.checked_pow(q(-1, 1)), None);
    }

    #[test]
    fn overflow_is_none_not_a_panic() {
        let big = Rational::integer(i128::MAX);
        assert_eq!(big.checked_add(Rational::integer(1)), None);
        assert_eq!(big.checked_mul(Rational::integer(2)), None);
        assert_eq!(Rational::integer(i128::MIN).checked_neg(), None);
        assert_eq!(Rational::new(i128::MIN, i128::MIN), None);
        assert_eq!(q(2, 1).checked_pow(q(99_999, 1)), None);
        assert_eq!(q(2, 1).checked_pow(Rational::integer(i128::MAX)), None);
        assert_eq!(q(1, 1).checked_pow(q(99_999, 1)), Some(q(1, 1)));
        assert_eq!(q(-1, 1).checked_pow(q(99_999, 1)), Some(q(-1, 1)));
        assert_eq!(q(-1, 1).checked_pow(q(100_000, 1)), Some(q(1, 1)));
        assert_eq!(
            Rational::ZERO.checked_pow(q(99_999, 1)),
            Some(Rational::ZERO)
        );
        assert_eq!(
            q(2, 1).checked_pow(q(126, 1)),
            Some(Rational::integer(1 << 126))
        );
        assert_eq!(q(2, 1).checked_pow(q(127, 1)), None);
    }
}
