//! The layouts the `dataset` stage imports: how the columns of a row become a `problems` row
//! and, where the source has a worked solution, a chat in the R1 format
//! (`<think>\nsteps\n</think>\n<answer>answer</answer>`, as `cot_generate` writes it), and how
//! `format: auto` recognises a layout from a file's columns and first rows.
//!
//! Rows arrive as JSON objects (whatever the file type; a null is an absent key), so one
//! mapping serves every file type.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::tables::Message;
use crate::tasks;

/// A `format` param value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Auto,
    Gsm8k,
    Math,
    Openr1,
    Chat,
    Code,
    Generic,
}

impl Format {
    pub const NAMES: &'static [&'static str] =
        &["auto", "gsm8k", "math", "openr1", "chat", "code", "generic"];

    pub fn name(self) -> &'static str {
        Format::NAMES[self as usize]
    }

    /// The columns a file must have for this format: each entry is satisfied by any one of its
    /// names (code tests go by several).
    fn needs(self) -> &'static [&'static [&'static str]] {
        match self {
            Format::Gsm8k => &[&["question"], &["answer"]],
            Format::Math => &[&["problem"], &["solution"]],
            Format::Openr1 => &[&["problem"], &["solution"], &["answer"]],
            Format::Chat => &[&["messages"]],
            Format::Code => &[&["prompt"], CODE_TESTS],
            Format::Auto | Format::Generic => &[],
        }
    }
}

/// The columns code tests are read from, in order of preference (MBPP says `test_list`,
/// HumanEval `test`).
const CODE_TESTS: &[&str] = &["tests", "test_list", "test"];
/// The columns a code problem's reference solution is read from, for `chat`.
const CODE_SOLUTIONS: &[&str] = &["solution", "canonical_solution", "code"];
/// Columns read for the difficulty when a file has them.
const LEVELS: &[&str] = &["level", "difficulty"];

/// A template over columns, `{passage} {question}`; `{{` and `}}` stand for braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Column(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(format!(
                                    "`{{{}` is not closed by `}}`",
                                    name.trim_end()
                                ));
                            }
                            Some(c) => name.push(c),
                        }
                    }
                    let name = name.trim();
                    if name.is_empty() {
                        return Err("`{}` names no column".into());
                    }
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                    parts.push(Part::Column(name.to_string()));
                }
                '}' => return Err("a `}` closes nothing (write `}}` for a brace)".into()),
                c => literal.push(c),
            }
        }
        parts.push(Part::Text(literal));
        parts.retain(|p| p != &Part::Text(String::new()));
        Ok(Template(parts))
    }

    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The text for `row`, an absent or null column standing for nothing.
    pub fn render(&self, row: &Map<String, Value>) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Column(c) => out.push_str(&text(row, c).unwrap_or_default()),
            }
        }
        out
    }
}

/// What a row maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// From the id column; `None` when the file has none (the stage numbers the row).
    pub id: Option<String>,
    pub task: String,
    pub difficulty: i32,
    pub prompt: String,
    pub answer: String,
    pub steps: Vec<String>,
    /// The conversation whose last turn is the worked solution, when the source has one.
    pub chat: Option<Vec<Message>>,
    /// What the split column says: `Some(true)` for test.
    pub test: Option<bool>,
}

/// How rows of one import become problems. Built once from the params (and, for `auto`, the
/// first rows).
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Never `Auto`.
    pub format: Format,
    /// `generic`: the prompt template and the answer column.
    pub prompt: Option<Template>,
    pub answer: Option<String>,
    /// The id column; unset means `id` where a file has it.
    pub id: Option<String>,
    /// Replaces the format's task name.
    pub task: Option<Template>,
    pub split_column: Option<String>,
}

/// A column a file lacks: the param that names it (`None` when the format needs it) and what
/// to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingColumn {
    pub param: Option<&'static str>,
    pub message: String,
}

impl Mapping {
    /// Checks that a file with `columns` has everything this mapping reads.
    pub fn check_columns(&self, columns: &[String]) -> Result<(), MissingColumn> {
        let has = |c: &str| columns.iter().any(|x| x == c);
        let listed = if columns.is_empty() {
            "none".to_string()
        } else {
            columns.join(", ")
        };
        for need in self.format.needs() {
            if !need.iter().any(|c| has(c)) {
                let what = match need {
                    [one] => format!("column `{one}` is missing"),
                    several => format!("none of the columns {} is there", several.join(", ")),
                };
                let reads: Vec<String> = self.format.needs().iter().map(|n| n.join("|")).collect();
                return Err(MissingColumn {
                    param: None,
                    message: format!(
                        "{what}: format {} reads {} (the file has: {listed})",
                        self.format.name(),
                        reads.join(", ")
                    ),
                });
            }
        }
        let named = [
            (
                "prompt",
                self.prompt.iter().flat_map(|t| t.columns()).collect(),
            ),
            ("answer", self.answer.iter().map(String::as_str).collect()),
            ("id", self.id.iter().map(String::as_str).collect()),
            ("task", self.task.iter().flat_map(|t| t.columns()).collect()),
            (
                "split_column",
                self.split_column.iter().map(String::as_str).collect(),
            ),
        ];
        for (param, wanted) in named {
            let wanted: Vec<&str> = wanted;
            if let Some(c) = wanted.into_iter().find(|c| !has(c)) {
                return Err(MissingColumn {
                    param: Some(param),
                    message: format!(
                        "param `{param}` reads column `{c}`, which the file does not have (it has: {listed})"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Every column this mapping may read.
    pub fn columns(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .format
            .needs()
            .iter()
            .flat_map(|n| n.iter().map(|c| c.to_string()))
            .collect();
        let extra: &[&str] = match self.format {
            Format::Math => &["type"],
            Format::Openr1 => &["problem_type"],
            Format::Chat => &["answer"],
            Format::Code => &["entry_point", "solution", "canonical_solution", "code"],
            _ => &[],
        };
        out.extend(
            extra
                .iter()
                .chain(LEVELS)
                .chain(&["id"])
                .map(|c| c.to_string()),
        );
        out.extend(
            self.prompt
                .iter()
                .flat_map(|t| t.columns())
                .map(String::from),
        );
        out.extend(self.task.iter().flat_map(|t| t.columns()).map(String::from));
        out.extend(
            self.answer
                .iter()
                .chain(&self.id)
                .chain(&self.split_column)
                .cloned(),
        );
        out.sort();
        out.dedup();
        out
    }

    /// The problem (and chat) of one row, or what is wrong with it.
    pub fn map(&self, row: &Map<String, Value>) -> Result<Mapped, String> {
        let mut m = match self.format {
            Format::Gsm8k => gsm8k(row)?,
            Format::Math | Format::Openr1 => math(row, self.format)?,
            Format::Chat => chat(row)?,
            Format::Code => code(row)?,
            Format::Generic => self.generic(row)?,
            Format::Auto => return Err("format `auto` was not resolved".into()),
        };
        if m.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        m.difficulty = LEVELS
            .iter()
            .find_map(|c| row.get(*c).and_then(level))
            .unwrap_or(m.steps.len().min(i32::MAX as usize) as i32);
        m.id = match &self.id {
            Some(c) => Some(text(row, c).ok_or_else(|| format!("the id column `{c}` is empty"))?),
            None => text(row, "id"),
        };
        if let Some(t) = &self.task {
            m.task = t.render(row).trim().to_string();
            if m.task.is_empty() {
                return Err("param `task` gives an empty task name".into());
            }
        }
        if let Some(c) = &self.split_column {
            m.test = Some(split_side(row, c)?);
        }
        Ok(m)
    }

    fn generic(&self, row: &Map<String, Value>) -> Result<Mapped, String> {
        let prompt = self
            .prompt
            .as_ref()
            .map(|t| t.render(row).trim().to_string())
            .unwrap_or_default();
        let column = self.answer.as_deref().unwrap_or("answer");
        let answer = required(row, column)?;
        Ok(problem("generic", prompt, answer, Vec::new(), false))
    }
}

/// A mapped row before the stage-wide columns (difficulty, id, task, split) are applied; with
/// `chat`, the worked solution is `steps` and `answer` in the R1 format.
fn problem(task: &str, prompt: String, answer: String, steps: Vec<String>, chat: bool) -> Mapped {
    let chat = chat.then(|| {
        vec![
            Message {
                role: "user".into(),
                content: prompt.clone(),
            },
            Message {
                role: "assistant".into(),
                content: tasks::format_completion(&steps, &answer),
            },
        ]
    });
    Mapped {
        id: None,
        task: task.to_string(),
        difficulty: 0,
        prompt,
        answer,
        steps,
        chat,
        test: None,
    }
}

/// A cell as text: strings as they are, numbers and booleans as written, lists and objects
/// as JSON; `None` when absent or null.
pub fn text(row: &Map<String, Value>, column: &str) -> Option<String> {
    match row.get(column)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A cell's trimmed text, which must not be empty.
fn required(row: &Map<String, Value>, column: &str) -> Result<String, String> {
    let t = text(row, column).map(|t| t.trim().to_string());
    t.filter(|t| !t.is_empty())
        .ok_or_else(|| format!("`{column}` is empty"))
}

/// The non-blank lines of `text`, trimmed: a solution's steps.
fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A difficulty: a number, or the number in `Level 3`.
fn level(v: &Value) -> Option<i32> {
    match v {
        Value::Number(n) => n.as_f64().map(|f| f as i32),
        Value::String(s) => {
            let digits: String = s.chars().filter(char::is_ascii_digit).collect();
            digits.parse().ok()
        }
        _ => None,
    }
}

/// A dataset's subject as a task name: `Counting & Probability` → `counting_probability`.
fn slug(name: &str) -> String {
    let words: Vec<String> = name
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.join("_")
}

/// GSM8K's answer: the reasoning lines, then `#### 42`. Calculator annotations (`<<48/2=24>>`)
/// are dropped from the steps: they are the dataset's tool calls, not reasoning to imitate.
pub fn gsm8k_solution(answer: &str) -> Option<(Vec<String>, String)> {
    let (reasoning, last) = answer.rsplit_once("####")?;
    let final_answer = last.trim().lines().next().unwrap_or("").trim().to_string();
    if final_answer.is_empty() {
        return None;
    }
    let steps = lines(reasoning)
        .into_iter()
        .map(|l| without_calculator(&l))
        .collect();
    Some((steps, final_answer))
}

fn without_calculator(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find("<<") {
        match rest[start..].find(">>") {
            Some(end) => {
                out.push_str(&rest[..start]);
                rest = &rest[start + end + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// The content of the last `\boxed{…}` (or `\fbox{…}`) in `text`, braces matched.
pub fn boxed(text: &str) -> Option<String> {
    let start = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|m| text.rfind(m).map(|i| i + m.len()))
        .max()?;
    let rest = text[start..].trim_start();
    let Some(inner) = rest.strip_prefix('{') else {
        // `\boxed 5`: up to the next space or `$`.
        let token: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect();
        return (!token.is_empty()).then_some(token);
    };
    let mut depth = 1;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    let answer = inner[..i].trim();
                    return (!answer.is_empty()).then(|| answer.to_string());
                }
            }
            _ => {}
        }
    }
    None
}

fn gsm8k(row: &Map<String, Value>) -> Result<Mapped, String> {
    let question = required(row, "question")?;
    let (steps, answer) = gsm8k_solution(&required(row, "answer")?)
        .ok_or("`answer` does not end in a `#### n` line")?;
    Ok(problem("gsm8k", question, answer, steps, true))
}

/// MATH (`problem`, `solution` with `\boxed{}`, `level`, `type`) and OpenR1/NuminaMath
/// (`problem`, `solution`, `answer`, optional `problem_type`).
fn math(row: &Map<String, Value>, format: Format) -> Result<Mapped, String> {
    let prompt = required(row, "problem")?;
    let solution = required(row, "solution")?;
    let given = match format {
        Format::Openr1 => text(row, "answer").map(|a| a.trim().to_string()),
        _ => None,
    };
    let answer = given
        .filter(|a| !a.is_empty())
        .or_else(|| boxed(&solution))
        .ok_or(match format {
            Format::Openr1 => "`answer` is empty and `solution` has no \\boxed{…} answer",
            _ => "`solution` has no \\boxed{…} answer",
        })?;
    let subject = match format {
        Format::Openr1 => text(row, "problem_type"),
        _ => text(row, "type"),
    };
    let task = match subject.map(|s| slug(&s)).filter(|s| !s.is_empty()) {
        Some(s) => format!("math/{s}"),
        None => "math".to_string(),
    };
    Ok(problem(&task, prompt, answer, lines(&solution), true))
}

/// A message's text: a string, or the text parts of a list of `{type, text}` parts.
fn content_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// An assistant turn split into its reasoning (in `<think>…</think>`, or before a lone
/// `</think>` when the template opened the block) and what follows it.
fn split_think(content: &str) -> (&str, &str) {
    if let Some((_, after)) = content.split_once("<think>") {
        return after.split_once("</think>").unwrap_or((after, ""));
    }
    content.split_once("</think>").unwrap_or(("", content))
}

fn chat(row: &Map<String, Value>) -> Result<Mapped, String> {
    let Some(Value::Array(messages)) = row.get("messages") else {
        return Err("`messages` is not a list of turns".into());
    };
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("message {} has no `role`", i + 1))?;
        turns.push((role, content_text(m.get("content")), m));
    }
    let last = turns
        .iter()
        .rposition(|(role, ..)| *role == "assistant")
        .ok_or("`messages` has no assistant turn")?;
    let user = turns[..last]
        .iter()
        .rposition(|(role, ..)| *role == "user")
        .ok_or("`messages` has no user turn before the assistant's")?;
    let (_, content, message) = &turns[last];
    let given = content_text(message.get("reasoning_content"));
    let (thought, rest) = split_think(content);
    let reasoning = if given.trim().is_empty() {
        thought
    } else {
        given.as_str()
    };
    let answer = text(row, "answer")
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .or_else(|| tasks::extract_answer("chat", rest))
        .or_else(|| boxed(rest))
        .or_else(|| gsm8k_solution(rest).map(|(_, a)| a))
        .or_else(|| boxed(reasoning))
        .ok_or(
            "the assistant turn gives no final answer (no <answer> block, \\boxed{} or `#### n`)",
        )?;
    let steps = if reasoning.trim().is_empty() {
        // No separate reasoning: the reply is the worked solution, less its answer block.
        lines(
            rest.rsplit_once("<answer>")
                .map_or(rest, |(before, _)| before),
        )
    } else {
        lines(reasoning)
    };
    let mut m = problem(
        "chat",
        turns[user].1.trim().to_string(),
        answer,
        steps,
        true,
    );
    // Earlier turns stay as they are; the worked solution is rewritten in the R1 format.
    let mut conversation: Vec<Message> = turns[..last]
        .iter()
        .map(|(role, content, _)| Message {
            role: role.to_string(),
            content: content.clone(),
        })
        .collect();
    conversation.extend(m.chat.take().into_iter().flatten().skip(1));
    m.chat = Some(conversation);
    Ok(m)
}

/// A code problem's test as read from a row; [`code_answer`] writes them as `code_exec`'s spec.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CodeTest {
    Assert { assert: String },
    Io { input: String, output: String },
}

/// A code problem's `answer`: the test spec `code_exec` runs, as JSON: `{"entry_point": …,
/// "tests": ["assert …", …]}` or `{"entry_point": …, "io": [{"input": …, "output": …}, …]}`. The
/// `problems` schema has no column for tests; the answer is what a verifier checks a solution
/// against, and for code that is its tests.
fn code_answer(
    entry_point: Option<&str>,
    tests: Vec<CodeTest>,
    prelude: Option<&str>,
) -> Result<String, String> {
    let (mut asserts, mut io) = (Vec::new(), Vec::new());
    for test in tests {
        match test {
            CodeTest::Assert { assert } => asserts.push(Value::String(assert)),
            CodeTest::Io { input, output } => {
                io.push(serde_json::json!({"input": input, "output": output}))
            }
        }
    }
    let mut spec = Map::new();
    if let Some(e) = entry_point {
        spec.insert("entry_point".into(), Value::String(e.into()));
    }
    if let Some(p) = prelude.filter(|_| !asserts.is_empty()) {
        spec.insert("prelude".into(), Value::String(p.into()));
    }
    match (asserts.is_empty(), io.is_empty()) {
        (false, true) => spec.insert("tests".into(), Value::Array(asserts)),
        (true, false) => spec.insert("io".into(), Value::Array(io)),
        (false, false) => return Err("the tests mix assert lines and input/output pairs".into()),
        (true, true) => return Err("the tests are empty".into()),
    };
    serde_json::to_string(&spec).map_err(|e| e.to_string())
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Tests given as assert lines (a list, or Python text: see [`python_tests`]) or input/output
/// pairs (a list of `{input, output}`, or `{inputs: [...], outputs: [...]}`, maybe as JSON text).
/// `entry_point` is the function under test, which HumanEval's `check(candidate)` is called on.
fn code_tests(v: &Value, entry_point: Option<&str>) -> Result<Vec<CodeTest>, String> {
    let io = |i: &Value, o: &Value| CodeTest::Io {
        input: value_text(i),
        output: value_text(o),
    };
    let tests = match v {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(parsed @ (Value::Array(_) | Value::Object(_))) => {
                return code_tests(&parsed, entry_point);
            }
            _ => python_tests(s, entry_point)?,
        },
        Value::Array(items) => items
            .iter()
            .map(|t| match t {
                Value::String(s) if !s.trim().is_empty() => Ok(CodeTest::Assert {
                    assert: s.trim().to_string(),
                }),
                Value::Object(o) => match (o.get("input"), o.get("output")) {
                    (Some(i), Some(out)) => Ok(io(i, out)),
                    _ => Err("a test object needs `input` and `output`".to_string()),
                },
                other => Err(format!(
                    "a test is {other}, not an assert line or an input/output pair"
                )),
            })
            .collect::<Result<_, _>>()?,
        Value::Object(o) => match (o.get("inputs"), o.get("outputs")) {
            (Some(Value::Array(ins)), Some(Value::Array(outs))) if ins.len() == outs.len() => {
                ins.iter().zip(outs).map(|(i, o)| io(i, o)).collect()
            }
            (Some(Value::Array(_)), Some(Value::Array(_))) => {
                return Err("`inputs` and `outputs` differ in length".into());
            }
            _ => match (o.get("input"), o.get("output")) {
                (Some(i), Some(out)) => vec![io(i, out)],
                _ => return Err("tests are an object without `inputs`/`outputs` lists".into()),
            },
        },
        _ => Vec::new(),
    };
    if tests.is_empty() {
        return Err("no tests: expected assert lines or input/output pairs".into());
    }
    Ok(tests)
}

/// Tests written as one Python text. When it is nothing but top-level `assert` statements,
/// each is a test (an assert may continue over indented or bracketed lines), so a solution
/// earns partial credit. Anything else (setup code, loops, HumanEval's `def check(candidate):`)
/// is one test that runs the whole text; a `check` it defines but never calls is called on
/// the entry point, as HumanEval's harness does.
fn python_tests(text: &str, entry_point: Option<&str>) -> Result<Vec<CodeTest>, String> {
    let statements = top_level_statements(text);
    if statements.iter().all(|s| s.starts_with("assert")) {
        return Ok(statements
            .into_iter()
            .map(|assert| CodeTest::Assert { assert })
            .collect());
    }
    let mut whole = text.trim_end().to_string();
    let defines_check = statements.iter().any(|s| s.starts_with("def check("));
    let calls = |name: &str| {
        statements
            .iter()
            .any(|s| s.starts_with(&format!("{name}(")))
    };
    if defines_check && !calls("check") {
        if entry_point.is_none() {
            return Err(
                "the tests define `check(candidate)` but the row has no `entry_point` naming the function to check"
                    .into(),
            );
        }
        // The harness binds the entry point as `candidate`.
        whole.push_str("\n\ncheck(candidate)");
    }
    // pytest-style functions and unittest cases run only when called: call them, or a
    // program would pass tests that never ran.
    for name in statements.iter().filter_map(|s| defined_name(s, "def ")) {
        if name.starts_with("test") && !calls(name) {
            whole.push_str(&format!("\n{name}()"));
        }
    }
    let is_case = |s: &&String| s.contains("TestCase)") || s.contains("TestCase):");
    let cases: Vec<&str> = statements
        .iter()
        .filter(is_case)
        .filter_map(|s| defined_name(s, "class "))
        .collect();
    // pytest's test classes (no TestCase base): every `test*` method of a fresh instance.
    for name in statements
        .iter()
        .filter(|s| !is_case(s))
        .filter_map(|s| defined_name(s, "class "))
        .filter(|n| n.starts_with("Test"))
    {
        whole.push_str(&format!(
            "\nfor _dagrun_name in sorted(dir({name})):\n    if _dagrun_name.startswith('test'):\n        getattr({name}(), _dagrun_name)()"
        ));
    }
    if !cases.is_empty() {
        // Our runner replaces a top-level `unittest.main()`, which would end the test early.
        whole = whole
            .lines()
            .map(|l| {
                if l.starts_with("unittest.main(") {
                    "pass"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        whole.push_str(&format!(
            "\nimport io as _dagrun_io, unittest as _dagrun_unittest\n_dagrun_suite = _dagrun_unittest.TestSuite([_dagrun_unittest.defaultTestLoader.loadTestsFromTestCase(c) for c in ({},)])\nassert _dagrun_unittest.TextTestRunner(stream=_dagrun_io.StringIO()).run(_dagrun_suite).wasSuccessful()",
            cases.join(", ")
        ));
    }
    Ok(vec![CodeTest::Assert { assert: whole }])
}

/// The top-level statements of Python source, each with its continuation lines (indented,
/// inside open brackets, or after a backslash); blank and comment lines are left out. A
/// reader for splitting test files, not a Python parser: triple-quoted strings spanning
/// lines at the top level are not understood.
fn top_level_statements(text: &str) -> Vec<String> {
    let mut statements: Vec<String> = Vec::new();
    let mut depth = 0i32;
    let mut continued = false;
    for line in text.lines() {
        let trimmed = line.trim();
        let starts_new = !continued
            && depth <= 0
            && !line.starts_with([' ', '\t'])
            && !trimmed.is_empty()
            && !trimmed.starts_with('#');
        if starts_new {
            statements.push(trimmed.to_string());
            depth = 0;
        } else if let Some(last) = statements.last_mut() {
            if trimmed.is_empty() || trimmed.starts_with('#') && depth <= 0 {
                continue;
            }
            last.push('\n');
            last.push_str(line.trim_end());
        } else {
            continue;
        }
        depth += bracket_balance(line);
        continued = trimmed.ends_with('\\');
    }
    statements
}

/// Opening minus closing brackets on a line, outside string literals and comments.
fn bracket_balance(line: &str) -> i32 {
    let mut balance = 0;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') => break,
            (None, '(' | '[' | '{') => balance += 1,
            (None, ')' | ']' | '}') => balance -= 1,
            _ => {}
        }
    }
    balance
}

/// The name a statement `def name(` or `class name(` defines, for `keyword` `def ` or `class `.
fn defined_name<'a>(statement: &'a str, keyword: &str) -> Option<&'a str> {
    let rest = statement.strip_prefix(keyword)?;
    let end = rest.find(['(', ':'])?;
    Some(rest[..end].trim()).filter(|n| !n.is_empty())
}

/// Whether `source` defines function `name` with an indented line after its `def` line.
fn defines_with_body(source: &str, name: &str) -> bool {
    let mut lines = source.lines();
    let found = lines
        .by_ref()
        .any(|l| l.trim_start().starts_with(&format!("def {name}(")));
    found
        && lines
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.starts_with([' ', '\t']))
}

/// Whether Python source defines function `name` at any level.
fn defines(source: &str, name: &str) -> bool {
    source
        .lines()
        .any(|l| l.trim_start().starts_with(&format!("def {name}(")))
}

/// The reference program of a code row: its solution, or, when the solution is a function's
/// body (HumanEval's `canonical_solution`), the prompt's signature and docstring followed by it.
fn reference_program(prompt: &str, solution: &str, entry_point: Option<&str>) -> String {
    // Leading blank lines go; the first line's indentation is part of a body.
    let first = solution
        .lines()
        .position(|l| !l.trim().is_empty())
        .unwrap_or(0);
    let body = solution.lines().skip(first).collect::<Vec<_>>().join("\n");
    let body = body.trim_end();
    match entry_point {
        Some(e) if !defines(body, e) && defines(prompt, e) => {
            format!("{}\n{}", prompt.trim_end(), body)
        }
        _ => body.to_string(),
    }
}

fn code(row: &Map<String, Value>) -> Result<Mapped, String> {
    let prompt = required(row, "prompt")?;
    let (column, value) = CODE_TESTS
        .iter()
        .find_map(|c| row.get(*c).filter(|v| !v.is_null()).map(|v| (*c, v)))
        .ok_or("the tests are empty")?;
    let entry_point = text(row, "entry_point").map(|e| e.trim().to_string());
    let entry_point = entry_point.as_deref().filter(|e| !e.is_empty());
    let tests = code_tests(value, entry_point).map_err(|e| format!("`{column}`: {e}"))?;
    let raw_prompt = text(row, "prompt").unwrap_or_default();
    // A prompt that is code defining the function (HumanEval: a signature and a docstring,
    // which is a body) runs before the program; a bare signature would not compile.
    let prelude = entry_point
        .filter(|e| defines_with_body(&raw_prompt, e))
        .map(|_| raw_prompt.as_str());
    let answer =
        code_answer(entry_point, tests, prelude).map_err(|e| format!("`{column}`: {e}"))?;
    let solution = CODE_SOLUTIONS
        .iter()
        .find_map(|c| text(row, c).filter(|s| !s.trim().is_empty()));
    let mut m = problem("code", prompt, answer, Vec::new(), solution.is_some());
    if let (Some(chat), Some(solution)) = (&mut m.chat, solution) {
        // The code is the reply's answer; there are no reasoning steps to show.
        let program = reference_program(&raw_prompt, &solution, entry_point);
        chat[1].content = tasks::format_completion(&[], &program);
    }
    Ok(m)
}

/// The side a split column puts a row on: `true` for test.
fn split_side(row: &Map<String, Value>, column: &str) -> Result<bool, String> {
    match row.get(column) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "test" | "validation" | "valid" | "val" | "dev" | "eval" => Ok(true),
            "train" | "training" => Ok(false),
            other => Err(format!(
                "the split column `{column}` says `{other}`: expected train or test (or validation, dev)"
            )),
        },
        _ => Err(format!("the split column `{column}` is empty")),
    }
}

/// Picks the format of a file from its columns and first rows; says why.
pub fn detect(
    columns: &[String],
    sample: &[Map<String, Value>],
) -> Result<(Format, String), String> {
    let has = |c: &str| columns.iter().any(|x| x == c);
    // The share of non-empty values of `column` that pass `test`, as a whole percentage.
    let share = |column: &str, test: fn(&str) -> bool| {
        let values: Vec<String> = sample.iter().filter_map(|r| text(r, column)).collect();
        let passing = values.iter().filter(|v| test(v)).count();
        (!values.is_empty()).then(|| (passing * 100 + values.len() / 2) / values.len())
    };
    let mut near = String::new();
    if has("problem") && has("solution") && has("answer") {
        return Ok((
            Format::Openr1,
            "columns problem+solution+answer (OpenR1/NuminaMath)".into(),
        ));
    }
    if has("question") && has("answer") {
        let pct = share("answer", |a| gsm8k_solution(a).is_some()).unwrap_or(0);
        if pct >= 50 {
            return Ok((
                Format::Gsm8k,
                format!("columns question+answer and {pct}% of answers end in '#### n'"),
            ));
        }
        near = format!("; columns question+answer, but only {pct}% of answers end in '#### n'");
    }
    if has("problem") && has("solution") {
        let pct = share("solution", |s| boxed(s).is_some()).unwrap_or(0);
        if pct >= 50 {
            let mut why =
                format!("columns problem+solution and {pct}% of solutions have \\boxed{{…}}");
            for (c, what) in [("level", "difficulty"), ("type", "task")] {
                if has(c) {
                    why.push_str(&format!(", {c} → {what}"));
                }
            }
            return Ok((Format::Math, why));
        }
        near =
            format!("; columns problem+solution, but only {pct}% of solutions have \\boxed{{…}}");
    }
    if has("prompt")
        && let Some(tests) = CODE_TESTS.iter().find(|c| has(c))
    {
        return Ok((Format::Code, format!("columns prompt+{tests}")));
    }
    if has("messages") {
        return Ok((Format::Chat, "column messages".into()));
    }
    Err(format!(
        "cannot tell the format from the columns ({}){near}; set `format:`: gsm8k (question, answer), math (problem, solution), openr1 (problem, solution, answer), chat (messages), code (prompt, tests), or generic with `prompt:` and `answer:`",
        columns.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn mapping(format: Format) -> Mapping {
        Mapping {
            format,
            prompt: None,
            answer: None,
            id: None,
            task: None,
            split_column: None,
        }
    }

    #[test]
    fn templates_name_columns_and_escape_braces() {
        let t = Template::parse("{passage}\n\n{ question } {{x}}").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), vec!["passage", "question"]);
        let r = row(json!({"passage": "P", "question": 7}));
        assert_eq!(t.render(&r), "P\n\n7 {x}");
        assert!(Template::parse("{open").unwrap_err().contains("not closed"));
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("{}").is_err());
    }

    #[test]
    fn boxed_answers_match_braces() {
        assert_eq!(
            boxed("so $\\boxed{\\frac{1}{2}}$.").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(boxed("\\boxed{1} then \\boxed{2}").as_deref(), Some("2"));
        assert_eq!(boxed("\\boxed 5$").as_deref(), Some("5"));
        assert_eq!(boxed("\\boxed{unclosed"), None);
        assert_eq!(boxed("no box"), None);
    }

    #[test]
    fn gsm8k_rows_give_steps_without_calculator_calls_and_a_chat() {
        let m = mapping(Format::Gsm8k)
            .map(&row(json!({
                "question": "Q?",
                "answer": "She sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72"
            })))
            .unwrap();
        assert_eq!(m.answer, "72");
        assert_eq!(m.steps, vec!["She sold 48/2 = 24 clips.", "48+24 = 72"]);
        assert_eq!(m.difficulty, 2, "no level column: the number of steps");
        let chat = m.chat.unwrap();
        assert_eq!(
            chat[1].content,
            "<think>\nShe sold 48/2 = 24 clips.\n48+24 = 72\n</think>\n<answer>72</answer>"
        );
        assert!(tasks::verify(&m.task, "72", &chat[1].content));
        let bad = mapping(Format::Gsm8k).map(&row(json!({"question": "Q", "answer": "72"})));
        assert!(bad.unwrap_err().contains("####"));
    }

    #[test]
    fn math_rows_take_the_last_box_and_level_and_type() {
        let m = mapping(Format::Math)
            .map(&row(json!({
                "problem": "P", "solution": "First.\nSo $\\boxed{3}$.",
                "level": "Level 4", "type": "Counting & Probability"
            })))
            .unwrap();
        assert_eq!((m.answer.as_str(), m.difficulty), ("3", 4));
        assert_eq!(m.task, "math/counting_probability");
        let o = mapping(Format::Openr1)
            .map(&row(
                json!({"problem": "P", "solution": "\\boxed{9}", "answer": 4}),
            ))
            .unwrap();
        assert_eq!((o.answer.as_str(), o.task.as_str()), ("4", "math"));
    }

    #[test]
    fn chats_split_out_think_blocks_and_reasoning_content() {
        let think = row(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "<think>2+3=5\n</think>\nThe answer is \\boxed{5}."}
        ]}));
        let m = mapping(Format::Chat).map(&think).unwrap();
        assert_eq!((m.prompt.as_str(), m.answer.as_str()), ("2+3?", "5"));
        assert_eq!(m.steps, vec!["2+3=5"]);
        let chat = m.chat.unwrap();
        assert_eq!(chat.len(), 3);
        assert_eq!(
            chat[2].content,
            "<think>\n2+3=5\n</think>\n<answer>5</answer>"
        );
        let separate = row(json!({"messages": [
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "<answer>5</answer>", "reasoning_content": "add\n2+3=5"}
        ]}));
        let m = mapping(Format::Chat).map(&separate).unwrap();
        assert_eq!((m.answer.as_str(), m.steps.len()), ("5", 2));
        let none = row(json!({"messages": [{"role": "user", "content": "hi"}]}));
        assert!(mapping(Format::Chat).map(&none).is_err());
    }

    #[test]
    fn code_tests_are_assert_lines_or_input_output_pairs() {
        let asserts = mapping(Format::Code)
            .map(&row(json!({
                "prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"],
                "entry_point": "add"
            })))
            .unwrap();
        assert_eq!(
            asserts.answer,
            r#"{"entry_point":"add","tests":["assert add(1, 2) == 3"]}"#
        );
        assert!(asserts.chat.is_none(), "no reference solution");
        let spec = crate::code_exec::CodeTests::parse(&asserts.answer).unwrap();
        assert_eq!(spec.len(), 1, "the answer is the spec code_tests runs");
        let pairs = mapping(Format::Code)
            .map(&row(json!({
                "prompt": "Sum two numbers.", "tests": [{"input": "1 2\n", "output": "3\n"}],
                "solution": "print(sum(map(int, input().split())))"
            })))
            .unwrap();
        assert_eq!(pairs.answer, r#"{"io":[{"input":"1 2\n","output":"3\n"}]}"#);
        assert_eq!(
            crate::code_exec::CodeTests::parse(&pairs.answer)
                .unwrap()
                .len(),
            1
        );
        let chat = pairs.chat.unwrap();
        assert!(chat[1].content.contains("<answer>print("));
        // The imported reference solution passes its own tests (where Python is installed).
        if crate::code_exec::python().is_ok() {
            assert!(crate::tasks::verify_with(
                "code",
                &pairs.answer,
                &chat[1].content,
                false
            ));
            assert!(!crate::tasks::verify_with(
                "code",
                &pairs.answer,
                "<answer>print(4)</answer>",
                false
            ));
        }
        let apps = code_tests(&json!("{\"inputs\": [\"1\"], \"outputs\": [\"2\"]}"), None).unwrap();
        assert_eq!(apps.len(), 1);
        assert!(code_tests(&json!([1]), None).is_err());
    }

    /// A HumanEval row as the published file has it: the prompt is the signature and
    /// docstring, `canonical_solution` the body, `test` a `check(candidate)` function.
    fn humaneval_row() -> Map<String, Value> {
        row(json!({
            "task_id": "HumanEval/0",
            "prompt": "def add(a, b):\n    \"\"\"Adds two numbers.\"\"\"\n",
            "canonical_solution": "    return a + b\n",
            "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(\n        -1, 1\n    ) == 0\n",
            "entry_point": "add"
        }))
    }

    #[test]
    fn humaneval_rows_call_check_and_join_the_body_to_its_signature() {
        let m = mapping(Format::Code).map(&humaneval_row()).unwrap();
        let spec = crate::code_exec::CodeTests::parse(&m.answer).unwrap();
        let crate::code_exec::Cases::Asserts(tests) = &spec.cases else {
            panic!("{:?}", spec.cases)
        };
        assert_eq!(tests.len(), 1, "check() is one test");
        assert!(tests[0].ends_with("check(candidate)"), "{}", tests[0]);
        let reply = &m.chat.as_ref().unwrap()[1].content;
        assert!(
            reply.contains("def add(a, b):\n    \"\"\"Adds two numbers.\"\"\"\n    return a + b"),
            "{reply}"
        );
        let mut no_entry = humaneval_row();
        no_entry.remove("entry_point");
        let err = mapping(Format::Code).map(&no_entry).unwrap_err();
        assert!(err.contains("no `entry_point`"), "{err}");
        if crate::code_exec::python().is_err() {
            eprintln!("SKIPPED running the HumanEval row: no Python here");
            return;
        }
        assert!(crate::tasks::verify_with("code", &m.answer, reply, false));
        let wrong = reply.replace("a + b", "a - b");
        assert!(!crate::tasks::verify_with("code", &m.answer, &wrong, false));
        // A check() that is never called would pass anything: it must be called.
        let never = "<answer>def add(a, b):\n    return 0</answer>";
        assert!(!crate::tasks::verify_with("code", &m.answer, never, false));
        // As HumanEval's harness runs prompt + completion, the prompt's imports and helpers
        // are there for a completion that writes the function alone.
        let mut helper = humaneval_row();
        helper.insert(
            "prompt".into(),
            json!("from typing import List\n\ndef shift(x: int) -> int:\n    return x\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Adds.\"\"\"\n"),
        );
        let h = mapping(Format::Code).map(&helper).unwrap();
        let alone = "<answer>def add(a: int, b: List[int] = None) -> int:\n    return shift(a) + b</answer>";
        assert!(
            crate::tasks::verify_with("code", &h.answer, alone, false),
            "{}",
            h.answer
        );
    }

    #[test]
    fn test_functions_and_unittest_cases_are_run_not_only_defined() {
        let spec = |tests: &str| {
            let m = mapping(Format::Code)
                .map(&row(
                    json!({"prompt": "add", "entry_point": "add", "tests": tests}),
                ))
                .unwrap();
            m.answer
        };
        let pytest = spec("def test_add():\n    assert add(1, 2) == 3\n");
        let unit = spec(
            "import unittest\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n\nif __name__ == '__main__':\n    unittest.main()\n",
        );
        assert!(pytest.contains("test_add()"), "{pytest}");
        if crate::code_exec::python().is_err() {
            eprintln!("SKIPPED running the tests: no Python here");
            return;
        }
        let class =
            spec("class TestAdd:\n    def test_small(self):\n        assert add(1, 2) == 3\n");
        let bare = spec(
            "import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\nunittest.main()\n",
        );
        for answer in [&pytest, &unit, &class, &bare] {
            let right = "<answer>def add(a, b):\n    return a + b</answer>";
            let wrong = "<answer>def add(a, b):\n    return 0</answer>";
            let quits = "<answer>def add(a, b):\n    raise SystemExit(0)</answer>";
            assert!(
                crate::tasks::verify_with("code", answer, right, false),
                "{answer}"
            );
            assert!(
                !crate::tasks::verify_with("code", answer, wrong, false),
                "{answer}"
            );
            assert!(
                !crate::tasks::verify_with("code", answer, quits, false),
                "{answer}"
            );
        }
    }

    #[test]
    fn assert_text_splits_into_statements_with_their_continuation_lines() {
        let text = "# tests\nassert f(1) == [\n    1,\n]\nassert f(2) == \\\n    [1, 2]\n\nassert f(')') == 3  # ')'\n";
        let tests = python_tests(text, None).unwrap();
        assert_eq!(
            tests,
            vec![
                CodeTest::Assert {
                    assert: "assert f(1) == [\n    1,\n]".into()
                },
                CodeTest::Assert {
                    assert: "assert f(2) == \\\n    [1, 2]".into()
                },
                CodeTest::Assert {
                    assert: "assert f(')') == 3  # ')'".into()
                },
            ]
        );
        let looped = "for i in range(3):\n    assert f(i) == i\n";
        assert_eq!(
            python_tests(looped, None).unwrap(),
            vec![CodeTest::Assert {
                assert: looped.trim_end().into()
            }],
            "a loop is one test, not its inner assert alone"
        );
    }

    #[test]
    fn detection_says_why_and_what_to_set_otherwise() {
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let gsm = vec![
            row(json!({"answer": "x\n#### 1"})),
            row(json!({"answer": "y\n#### 2"})),
        ];
        let (f, why) = detect(&cols(&["question", "answer"]), &gsm).unwrap();
        assert_eq!(f, Format::Gsm8k);
        assert_eq!(
            why,
            "columns question+answer and 100% of answers end in '#### n'"
        );
        let plain = vec![row(json!({"answer": "1"}))];
        let err = detect(&cols(&["question", "answer"]), &plain).unwrap_err();
        assert!(err.contains("only 0% of answers"), "{err}");
        assert!(err.contains("set `format:`"), "{err}");
        let (f, _) = detect(&cols(&["prompt", "test_list"]), &[]).unwrap();
        assert_eq!(f, Format::Code);
    }

    #[test]
    fn missing_columns_name_the_format_or_the_param() {
        let err = mapping(Format::Gsm8k)
            .check_columns(&["question".to_string()])
            .unwrap_err();
        assert_eq!(err.param, None);
        assert_eq!(
            err.message,
            "column `answer` is missing: format gsm8k reads question, answer (the file has: question)"
        );
        let generic = Mapping {
            prompt: Some(Template::parse("{passage} {question}").unwrap()),
            answer: Some("label".into()),
            ..mapping(Format::Generic)
        };
        let err = generic
            .check_columns(&["question".to_string(), "label".to_string()])
            .unwrap_err();
        assert_eq!(err.param, Some("prompt"));
    }
}
