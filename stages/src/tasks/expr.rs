//! A small, panic-free evaluator for integer expressions with `+ - * /` and parentheses.
//!
//! It evaluates model output, so it must survive anything: every operation is checked, input
//! length, literal size and nesting depth are bounded, and any problem yields `None`.
//! Division must be exact (the countdown rules); intermediate results may be negative.

/// Longer input is not a plausible answer; refusing it bounds the work per call.
const MAX_INPUT_BYTES: usize = 1024;
/// Bounds recursion so deeply nested parentheses cannot overflow the stack.
const MAX_DEPTH: usize = 64;
/// More digits than this cannot be a given number and would only risk overflow.
const MAX_LITERAL_DIGITS: usize = 18;

/// The value of an expression and the number literals it uses, in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evaluated {
    pub value: i128,
    pub literals: Vec<i128>,
}

/// Evaluates `text`, or returns `None` if it is not a well-formed expression whose every
/// step (including exact division) is representable.
pub(crate) fn evaluate(text: &str) -> Option<Evaluated> {
    if text.len() > MAX_INPUT_BYTES {
        return None;
    }
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens: &tokens,
        position: 0,
        literals: Vec::new(),
    };
    let value = parser.sum(0)?;
    if parser.position != tokens.len() {
        return None;
    }
    Some(Evaluated {
        value,
        literals: parser.literals,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Number(i128),
    Plus,
    Minus,
    Times,
    Divide,
    Open,
    Close,
}

fn tokenize(text: &str) -> Option<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '0'..='9' => {
                let mut digits = String::from(c);
                while let Some(&next) = chars.peek().filter(|next| next.is_ascii_digit()) {
                    digits.push(next);
                    chars.next();
                }
                if digits.len() > MAX_LITERAL_DIGITS {
                    return None;
                }
                Token::Number(digits.parse().ok()?)
            }
            '+' => Token::Plus,
            // Models and people also write the typographic minus, times and division signs.
            '-' | '\u{2212}' => Token::Minus,
            '*' | '\u{00d7}' | '\u{00b7}' => Token::Times,
            '/' | '\u{00f7}' => Token::Divide,
            '(' => Token::Open,
            ')' => Token::Close,
            _ => return None,
        };
        tokens.push(token);
    }
    Some(tokens)
}

/// Recursive descent over `sum := product (("+"|"-") product)*`,
/// `product := atom (("*"|"/") atom)*`, `atom := number | "(" sum ")"`.
/// There is no unary minus: countdown answers combine the given positive numbers only.
struct Parser<'a> {
    tokens: &'a [Token],
    position: usize,
    literals: Vec<i128>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.position).copied()
    }

    fn sum(&mut self, depth: usize) -> Option<i128> {
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

    fn product(&mut self, depth: usize) -> Option<i128> {
        let mut value = self.atom(depth)?;
        while let Some(operator @ (Token::Times | Token::Divide)) = self.peek() {
            self.position += 1;
            let right = self.atom(depth)?;
            value = match operator {
                Token::Times => value.checked_mul(right)?,
                _ => exact_division(value, right)?,
            };
        }
        Some(value)
    }

    fn atom(&mut self, depth: usize) -> Option<i128> {
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

fn exact_division(dividend: i128, divisor: i128) -> Option<i128> {
    if divisor == 0 || dividend.checked_rem(divisor)? != 0 {
        return None;
    }
    dividend.checked_div(divisor)
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
}
