//! A small, panic-free evaluator for arithmetic expressions, in two dialects.
//!
//! It evaluates model output, so it must survive anything: every operation is checked, input
//! length, literal size and nesting depth are bounded, and any problem yields `None`.
//! [`evaluate`] reads countdown expressions: integers, `+ - * /` and parentheses, no signs,
//! and division must be exact (the countdown rules); intermediate results may be negative.
//! [`evaluate_math`] reads the value of a math answer: also decimals (`2.5`, `.5`,
//! `1,234.5`), signs and `^`, over exact fractions, so `1/3` is exact and `1/0` is `None`.

use super::rational::Rational;

/// Longer input is not a plausible answer; refusing it bounds the work per call.
const MAX_INPUT_BYTES: usize = 1024;
/// Bounds recursion so deeply nested parentheses or signs cannot overflow the stack.
const MAX_DEPTH: usize = 64;
/// More digits than this cannot be a given countdown number and would only risk overflow.
const MAX_LITERAL_DIGITS: usize = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Countdown,
    Math,
}

/// The value of an expression and the number literals it uses, in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evaluated {
    pub value: i128,
    pub literals: Vec<i128>,
}

/// Evaluates a countdown expression, or returns `None` if it is not a well-formed expression
/// whose every step (including exact division) is representable.
pub(crate) fn evaluate(text: &str) -> Option<Evaluated> {
    let (value, literals) = parse(text, Dialect::Countdown)?;
    Some(Evaluated {
        value: value.to_integer()?,
        literals: literals
            .into_iter()
            .map(Rational::to_integer)
            .collect::<Option<_>>()?,
    })
}

/// The exact value of a math expression such as `-3/4 + 2^-1` or `1,000*1.5`; `None` if it
/// is malformed or a step is undefined (`1/0`) or does not fit (`2^99999`).
pub(crate) fn evaluate_math(text: &str) -> Option<Rational> {
    parse(text, Dialect::Math).map(|(value, _)| value)
}

fn parse(text: &str, dialect: Dialect) -> Option<(Rational, Vec<Rational>)> {
    if text.len() > MAX_INPUT_BYTES {
        return None;
    }
    let tokens = tokenize(text, dialect)?;
    let mut parser = Parser {
        tokens: &tokens,
        position: 0,
        dialect,
        literals: Vec::new(),
    };
    let value = parser.sum(0)?;
    if parser.position != tokens.len() {
        return None;
    }
    Some((value, parser.literals))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Number(Rational),
    Plus,
    Minus,
    Times,
    Divide,
    Power,
    Open,
    Close,
}

fn tokenize(text: &str, dialect: Dialect) -> Option<Vec<Token>> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut index = 0;
    while let Some(&c) = chars.get(index) {
        let starts_number = c.is_ascii_digit()
            || (dialect == Dialect::Math
                && c == '.'
                && chars.get(index + 1).is_some_and(char::is_ascii_digit));
        if starts_number {
            let (number, end) = match dialect {
                Dialect::Countdown => integer_literal(&chars, index)?,
                Dialect::Math => decimal_literal(&chars, index)?,
            };
            tokens.push(Token::Number(number));
            index = end;
            continue;
        }
        let token = match c {
            c if c.is_whitespace() => None,
            '+' => Some(Token::Plus),
            // Models and people also write the typographic minus, times and division signs.
            '-' | '\u{2212}' => Some(Token::Minus),
            '*' | '\u{00d7}' | '\u{00b7}' => Some(Token::Times),
            '/' | '\u{00f7}' => Some(Token::Divide),
            '^' if dialect == Dialect::Math => Some(Token::Power),
            '(' => Some(Token::Open),
            ')' => Some(Token::Close),
            _ => return None,
        };
        tokens.extend(token);
        index += 1;
    }
    Some(tokens)
}

fn digits_from(chars: &[char], start: usize) -> usize {
    chars[start..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count()
}

/// Plain digits, as countdown numbers are written: `(value, index after it)`.
fn integer_literal(chars: &[char], start: usize) -> Option<(Rational, usize)> {
    let end = start + digits_from(chars, start);
    if end - start > MAX_LITERAL_DIGITS {
        return None;
    }
    let digits: String = chars[start..end].iter().collect();
    Some((Rational::from_decimal(&digits, "")?, end))
}

/// `1234`, `1,234,567` (a first group of at most three digits, then groups of exactly
/// three), each optionally followed by `.digits`, or `.5`. A comma that does not group
/// thousands (`1,2`, `3, 4`) is an error, not a list.
fn decimal_literal(chars: &[char], start: usize) -> Option<(Rational, usize)> {
    let mut whole = String::new();
    let mut index = start;
    let first = digits_from(chars, index);
    whole.extend(&chars[index..index + first]);
    index += first;
    while first <= 3 && chars.get(index) == Some(&',') {
        if digits_from(chars, index + 1) != 3 {
            return None;
        }
        whole.extend(&chars[index + 1..index + 4]);
        index += 4;
    }
    let mut fraction = String::new();
    if chars.get(index) == Some(&'.') {
        let count = digits_from(chars, index + 1);
        if count == 0 {
            return None;
        }
        fraction.extend(&chars[index + 1..index + 1 + count]);
        index += 1 + count;
    }
    if matches!(chars.get(index), Some(',' | '.')) {
        return None;
    }
    Some((Rational::from_decimal(&whole, &fraction)?, index))
}

/// Recursive descent over `sum := product (("+"|"-") product)*`,
/// `product := signed (("*"|"/") signed)*`, `signed := ("+"|"-") signed | power`,
/// `power := atom ("^" signed)?`, `atom := number | "(" sum ")"`, so `-2^2` is `-4` and
/// `2^3^2` is `2^9`. Countdown has no signs (answers combine the given positive numbers
/// only) and no powers.
struct Parser<'a> {
    tokens: &'a [Token],
    position: usize,
    dialect: Dialect,
    literals: Vec<Rational>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.position).copied()
    }

    fn sum(&mut self, depth: usize) -> Option<Rational> {
        let mut value = self.product(depth)?;
        while let Some(operator @ (Token::Plus | Token::Minus)) = self.peek() {
            self.position += 1;
            let right = self.product(depth)?;
            value = match operator {
                Token::Plus => value.checked_add(right)?,
                _ => value.checked_sub(right)?,
            };
        }
        Some(value)
    }

    fn product(&mut self, depth: usize) -> Option<Rational> {
        let mut value = self.signed(depth)?;
        while let Some(operator @ (Token::Times | Token::Divide)) = self.peek() {
            self.position += 1;
            let right = self.signed(depth)?;
            value = match operator {
                Token::Times => value.checked_mul(right)?,
                _ => self.divide(value, right)?,
            };
        }
        Some(value)
    }

    fn divide(&self, dividend: Rational, divisor: Rational) -> Option<Rational> {
        let quotient = dividend.checked_div(divisor)?;
        // The countdown rules allow only exact division.
        match self.dialect {
            Dialect::Countdown => quotient.to_integer().map(Rational::integer),
            Dialect::Math => Some(quotient),
        }
    }

    fn signed(&mut self, depth: usize) -> Option<Rational> {
        match self.peek()? {
            sign @ (Token::Plus | Token::Minus)
                if self.dialect == Dialect::Math && depth < MAX_DEPTH =>
            {
                self.position += 1;
                let value = self.signed(depth + 1)?;
                match sign {
                    Token::Minus => value.checked_neg(),
                    _ => Some(value),
                }
            }
            _ => self.power(depth),
        }
    }

    fn power(&mut self, depth: usize) -> Option<Rational> {
        let base = self.atom(depth)?;
        if self.peek() != Some(Token::Power) || depth >= MAX_DEPTH {
            return Some(base);
        }
        self.position += 1;
        let exponent = self.signed(depth + 1)?;
        base.checked_pow(exponent)
    }

    fn atom(&mut self, depth: usize) -> Option<Rational> {
        match self.peek()? {
            Token::Number(value) => {
                self.position += 1;
                self.literals.push(value);
                Some(value)
            }
            Token::Open if depth < MAX_DEPTH => {
                self.position += 1;
                let value = self.sum(depth + 1)?;
                if self.peek()? != Token::Close {
                    return None;
                }
                self.position += 1;
                Some(value)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Option<i128> {
        evaluate(text).map(|evaluated| evaluated.value)
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(value("2+3*4"), Some(14));
        assert_eq!(value("(2+3)*4"), Some(20));
        assert_eq!(value("10-4-3"), Some(3));
        assert_eq!(value("10-(4-3)"), Some(9));
        assert_eq!(value("48/4/2"), Some(6));
        assert_eq!(value("48/(4/2)"), Some(24));
        assert_eq!(value(" 3 - 7 + 10 "), Some(6));
        assert_eq!(value("6 × 7 − 2 ÷ 2"), Some(41));
    }

    #[test]
    fn literals_are_recorded_in_order() {
        let evaluated = evaluate("(8-3)*12/4").unwrap();
        assert_eq!(evaluated.literals, vec![8, 3, 12, 4]);
        assert_eq!(evaluated.value, 15);
    }

    #[test]
    fn malformed_or_unrepresentable_input_is_rejected() {
        for bad in [
            "",
            " ",
            "(",
            ")",
            "1+",
            "+1",
            "-1",
            "1 2",
            "(1+2",
            "1+2)",
            "()",
            "1//2",
            "7/2",
            "5/0",
            "5/(3-3)",
            "x+1",
            "1e5",
            "1.5",
            "2**3",
            "١+٢",
            "1234567890123456789",
            "999999999999999999*999999999999999999*999999999999999999",
        ] {
            assert_eq!(evaluate(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn deep_nesting_and_long_input_do_not_overflow_the_stack() {
        let deep = format!("{}1{}", "(".repeat(400), ")".repeat(400));
        assert_eq!(evaluate(&deep), None);
        let nested_ok = format!("{}1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(value(&nested_ok), Some(1));
        assert_eq!(evaluate(&"1+".repeat(5000)), None);
    }

    fn math(text: &str) -> Option<String> {
        evaluate_math(text).map(|value| value.to_string())
    }

    #[test]
    fn math_expressions_are_exact_fractions() {
        for (text, want) in [
            ("1/2", "1/2"),
            ("2/4", "1/2"),
            ("0.5", "1/2"),
            (".5", "1/2"),
            ("1,234.50", "2469/2"),
            ("-3", "-3"),
            ("- -3", "3"),
            ("+3", "3"),
            ("-2^2", "-4"),
            ("(-2)^2", "4"),
            ("2^3^2", "512"),
            ("2^-1", "1/2"),
            ("(1/2)^2", "1/4"),
            ("3*(4-1)/6", "3/2"),
            ("7/2*2", "7"),
            ("1/3+1/6", "1/2"),
            ("6 × 7 − 2 ÷ 2", "41"),
            ("1^99999", "1"),
        ] {
            assert_eq!(math(text).as_deref(), Some(want), "{text:?}");
        }
    }

    #[test]
    fn malformed_or_undefined_math_is_rejected() {
        for bad in [
            "", "1/0", "0^0", "0^-1", "2^99999", "2^(1/2)", "1,2", "1, 2", "1234,567", "1.2.3",
            "5.", "1 2", "2(3)", "x", "1e5", "--", "(", "2^", "^2",
        ] {
            assert_eq!(evaluate_math(bad), None, "{bad:?}");
        }
        let signs = format!("{}1", "-".repeat(10_000));
        assert_eq!(evaluate_math(&signs), None, "too long");
        let signs = format!("{}1", "-".repeat(500));
        assert_eq!(evaluate_math(&signs), None, "too deep");
        let powers = format!("2{}", "^2".repeat(400));
        assert_eq!(evaluate_math(&powers), None);
        assert_eq!(evaluate_math(&"9".repeat(40)), None, "does not fit");
    }
}
