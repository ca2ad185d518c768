//! A small, safe arithmetic evaluator for SVAMP labels such as `( ( 17.0 + 15.0 ) + 2.0 )`.
//!
//! The paper's code runs Python `eval` on model output; this parser accepts only numbers,
//! `+ - * /`, unary minus and parentheses, and reports anything else (or a division by zero)
//! as an error instead of running it.

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArithError {
    /// The text is empty (or only whitespace).
    #[error("empty expression")]
    Empty,
    /// A character that is not part of an arithmetic expression.
    #[error("unexpected character `{0}` at byte {1}")]
    UnexpectedChar(char, usize),
    /// A number that does not parse (`1.2.3`).
    #[error("malformed number `{0}`")]
    BadNumber(String),
    /// The expression ends where an operand or `)` is needed.
    #[error("unexpected end of expression")]
    UnexpectedEnd,
    /// A token where another was needed (`1 2`, `( 1 +`).
    #[error("unexpected `{0}` at token {1}")]
    UnexpectedToken(String, usize),
    /// Division by zero.
    #[error("division by zero")]
    DivisionByZero,
    /// Too deeply nested parentheses (guards the recursion).
    #[error("expression nested deeper than {0} levels")]
    TooDeep(usize),
    /// A result that is not finite (overflow).
    #[error("result is not finite")]
    NotFinite,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Num(f64),
    Op(char),
    Open,
    Close,
}

impl Token {
    fn show(&self) -> String {
        match self {
            Token::Num(n) => n.to_string(),
            Token::Op(c) => c.to_string(),
            Token::Open => "(".into(),
            Token::Close => ")".into(),
        }
    }
}

const MAX_DEPTH: usize = 64;

fn tokenize(s: &str) -> Result<Vec<Token>, ArithError> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        match c {
            c if c.is_ascii_whitespace() => i += 1,
            '+' | '-' | '*' | '/' => {
                out.push(Token::Op(c));
                i += 1;
            }
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                let text = &s[start..i];
                let n: f64 = text
                    .parse()
                    .map_err(|_| ArithError::BadNumber(text.to_string()))?;
                out.push(Token::Num(n));
            }
            _ => {
                let ch = s[i..].chars().next().unwrap_or('?');
                return Err(ArithError::UnexpectedChar(ch, i));
            }
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    // expr := term (('+' | '-') term)*
    fn expr(&mut self, depth: usize) -> Result<f64, ArithError> {
        let mut acc = self.term(depth)?;
        while let Some(Token::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.term(depth)?;
            acc = if op == '+' { acc + rhs } else { acc - rhs };
        }
        Ok(acc)
    }

    // term := factor (('*' | '/') factor)*
    fn term(&mut self, depth: usize) -> Result<f64, ArithError> {
        let mut acc = self.factor(depth)?;
        while let Some(Token::Op(op @ ('*' | '/'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.factor(depth)?;
            if op == '*' {
                acc *= rhs;
            } else {
                if rhs == 0.0 {
                    return Err(ArithError::DivisionByZero);
                }
                acc /= rhs;
            }
        }
        Ok(acc)
    }

    // factor := '-' factor | '+' factor | number | '(' expr ')'
    fn factor(&mut self, depth: usize) -> Result<f64, ArithError> {
        if depth > MAX_DEPTH {
            return Err(ArithError::TooDeep(MAX_DEPTH));
        }
        let at = self.pos;
        match self.tokens.get(at).cloned() {
            None => Err(ArithError::UnexpectedEnd),
            Some(Token::Num(n)) => {
                self.pos += 1;
                Ok(n)
            }
            Some(Token::Op('-')) => {
                self.pos += 1;
                Ok(-self.factor(depth + 1)?)
            }
            Some(Token::Op('+')) => {
                self.pos += 1;
                self.factor(depth + 1)
            }
            Some(Token::Open) => {
                self.pos += 1;
                let v = self.expr(depth + 1)?;
                match self.peek() {
                    Some(Token::Close) => {
                        self.pos += 1;
                        Ok(v)
                    }
                    Some(t) => Err(ArithError::UnexpectedToken(t.show(), self.pos)),
                    None => Err(ArithError::UnexpectedEnd),
                }
            }
            Some(t) => Err(ArithError::UnexpectedToken(t.show(), at)),
        }
    }
}

/// Evaluates an arithmetic expression: numbers, `+ - * /`, unary `-`/`+`, parentheses, with the
/// usual precedence and left associativity. Never panics; anything else is an [`ArithError`].
pub fn eval_expression(text: &str) -> Result<f64, ArithError> {
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err(ArithError::Empty);
    }
    let mut p = Parser { tokens, pos: 0 };
    let v = p.expr(0)?;
    if let Some(t) = p.peek() {
        return Err(ArithError::UnexpectedToken(t.show(), p.pos));
    }
    if !v.is_finite() {
        return Err(ArithError::NotFinite);
    }
    Ok(v)
}

/// Whether two SVAMP answers are the same number: both must evaluate, and their values agree to
/// a relative 1e-9 (the paper's `==` on Python floats, made robust to summation order).
pub fn same_value(pred: &str, gold: &str) -> bool {
    match (eval_expression(pred), eval_expression(gold)) {
        (Ok(a), Ok(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluates_svamp_labels() {
        assert_eq!(eval_expression("( 84.0 / 2.0 )"), Ok(42.0));
        assert_eq!(eval_expression("( ( 17.0 + 15.0 ) + 2.0 )"), Ok(34.0));
        assert_eq!(eval_expression("(7 * 30)"), Ok(210.0));
        assert_eq!(eval_expression("10 - 2 - 3"), Ok(5.0));
        assert_eq!(eval_expression("2 + 3 * 4"), Ok(14.0));
        assert_eq!(eval_expression("-(3 - 5)"), Ok(2.0));
        assert_eq!(eval_expression("8 / 4 / 2"), Ok(1.0));
        assert!(same_value("( 84.0 / 2.0 )", "(84 / 2)"));
        assert!(same_value("0.1 + 0.2", "0.3"));
        assert!(!same_value("( 84.0 / 2.0 )", "(84 * 2)"));
    }

    #[test]
    fn errors_not_panics() {
        assert_eq!(
            eval_expression("( 5.0 / 0.0 )"),
            Err(ArithError::DivisionByZero)
        );
        assert_eq!(
            eval_expression("5 / (2 - 2)"),
            Err(ArithError::DivisionByZero)
        );
        assert_eq!(eval_expression(""), Err(ArithError::Empty));
        assert_eq!(eval_expression("   "), Err(ArithError::Empty));
        assert_eq!(eval_expression("( 1 +"), Err(ArithError::UnexpectedEnd));
        assert!(matches!(
            eval_expression("1 2"),
            Err(ArithError::UnexpectedToken(..))
        ));
        assert!(matches!(
            eval_expression("(1 + 2))"),
            Err(ArithError::UnexpectedToken(..))
        ));
        assert!(matches!(
            eval_expression("1.2.3"),
            Err(ArithError::BadNumber(_))
        ));
        assert!(matches!(
            eval_expression("__import__('os')"),
            Err(ArithError::UnexpectedChar('_', 0))
        ));
        assert!(matches!(
            eval_expression("2 ** 3"),
            Err(ArithError::UnexpectedToken(..))
        ));
        assert!(matches!(
            eval_expression("3 × 4"),
            Err(ArithError::UnexpectedChar('×', 2))
        ));
        assert!(matches!(
            eval_expression("."),
            Err(ArithError::BadNumber(_))
        ));
        let deep = "(".repeat(10_000) + "1" + &")".repeat(10_000);
        assert_eq!(eval_expression(&deep), Err(ArithError::TooDeep(MAX_DEPTH)));
        let big = "9".repeat(400);
        assert_eq!(
            eval_expression(&format!("{big} * {big}")),
            Err(ArithError::NotFinite)
        );
        assert!(!same_value("1 / 0", "1 / 0"));
        assert!(!same_value("garbage", "( 1.0 + 1.0 )"));
    }
}
