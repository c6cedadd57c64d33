//! Running a completion's Python code against a code problem's tests, for the `code_tests`
//! reward (and, once wired, `correctness` of task `code`).
//!
//! Owns: the test-spec format of a `code` problem's `answer`, taking the code out of a
//! completion ([`extract_code`]), running it against the tests ([`run_tests`], in parallel
//! [`run_many`]) and turning the result into a reward ([`reward`]). The process sandbox is
//! [`sandbox`]. Does not own which rewards a stage uses (`crate::rewards`) nor the answer
//! verifier (`crate::tasks`).
//!
//! # The test spec (a `code` problem's `answer` column)
//!
//! A JSON object with exactly one of:
//! - `"tests"`: Python snippets, usually one `assert` each (`["assert add(1, 2) == 3"]`);
//!   each runs after the program, in the program's namespace, and passes if it raises
//!   nothing (a `SystemExit`, even with status 0, fails it: a program must not end its
//!   tests early). The program and the tests run with `__name__ == "solution"`, so a
//!   `__main__` block does not run; the dataset import calls test functions and runs
//!   `unittest` cases explicitly.
//! - `"io"`: stdin/stdout pairs, `[["1 2\n", "3\n"], …]` or `[{"input": …, "output": …}]`;
//!   the program runs once per pair with the input on stdin and passes if it exits 0 and its
//!   stdout equals the output up to trailing whitespace on each line and trailing blank lines.
//!
//! Optionally `"prelude"`: code run before the program, in its namespace (HumanEval's prompt:
//! its imports and helper functions, which a completion that writes only the function under
//! test relies on, as the official harness runs prompt + completion); its errors are ignored.
//! And optionally `"entry_point"`: a function the program must define (for `tests`, a
//! program without it fails every test).
//!
//! # The sandbox
//!
//! Each run is a fresh Python process (`-s -S -B`, cleared environment, `PYTHONHASHSEED=0`)
//! in a fresh scratch directory (its cwd, `HOME` and `TMPDIR`; removed afterwards), in its
//! own process group, with `RLIMIT_AS` (memory), `RLIMIT_CPU`, `RLIMIT_FSIZE`,
//! `RLIMIT_NOFILE`, no core files and no capabilities (an empty bounding set, so exec cannot
//! regain them as root). The parent enforces a wall-clock timeout and an output cap, and
//! kills the whole group when the run ends either way. Where the kernel allows (probed once;
//! else one line on stderr and the run goes on without it):
//! - a fresh network namespace: no network at all;
//! - a seccomp filter refusing fork/vfork/clone of new processes: a fork bomb fails at its
//!   first fork (threads still work);
//! - a private mount namespace with every mount read-only except the scratch directory, and
//!   fresh tmpfs on `/tmp`, `/var/tmp` and `/dev/shm` that vanish with the run.
//!
//! `RLIMIT_NPROC` is not used: it counts every process of the user and does not bind root.
//!
//! It does NOT prevent: reading any file the user can read (the interpreter here lives under
//! `/root`, so runs stay uid 0 and read what root reads); writing to device nodes root owns;
//! a program inspecting the test harness in its own interpreter to forge results (result
//! lines carry a per-run nonce the program is not handed (it comes on stdin, read before the
//! program runs), which stops printing fake results but not introspection; nor does anything
//! stop a function returning an object whose `__eq__` is always true); anything on a machine where the probe found a part missing. It
//! contains accidents and reward hacking by output, not a determined attacker: run
//! untrusted models' code in a container as well.
//!
//! # The reward
//!
//! The share of tests passed, plus `bonus` when all pass; 0.0 when the completion has no
//! code, or the run timed out or flooded its output. `None` (cannot judge) when the task is
//! not `code`, the answer is not a test spec, or Python could not be started. Timings aside,
//! it is a pure function of the program's behaviour on the tests.

mod confine;
pub mod sandbox;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;

use sandbox::{Exit, Scratch};
pub use sandbox::{Limits, python};

/// The task name of code problems.
pub const CODE_TASK: &str = "code";

/// A code problem's tests, parsed from its `answer` (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct CodeTests {
    pub cases: Cases,
    pub entry_point: Option<String>,
    /// Run before the program (see the module doc).
    pub prelude: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Cases {
    /// Python snippets run after the program.
    Asserts(Vec<String>),
    /// (stdin, expected stdout) pairs.
    Io(Vec<(String, String)>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    tests: Option<Vec<String>>,
    #[serde(default)]
    io: Option<Vec<IoPair>>,
    #[serde(default)]
    entry_point: Option<String>,
    #[serde(default)]
    prelude: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IoPair {
    Pair(String, String),
    Named { input: String, output: String },
}

impl CodeTests {
    /// Parses a test spec; the error says what is wrong with it.
    pub fn parse(answer: &str) -> Result<Self, String> {
        let spec: Spec =
            serde_json::from_str(answer).map_err(|e| format!("not a code test spec: {e}"))?;
        let cases = match (spec.tests, spec.io) {
            (Some(tests), None) if !tests.is_empty() => Cases::Asserts(tests),
            (None, Some(io)) if !io.is_empty() => Cases::Io(
                io.into_iter()
                    .map(|pair| match pair {
                        IoPair::Pair(input, output) | IoPair::Named { input, output } => {
                            (input, output)
                        }
                    })
                    .collect(),
            ),
            _ => return Err("a code test spec needs exactly one non-empty `tests` or `io`".into()),
        };
        Ok(Self {
            cases,
            entry_point: spec.entry_point.filter(|e| !e.is_empty()),
            prelude: spec.prelude.filter(|p| !p.trim().is_empty()),
        })
    }

    pub fn len(&self) -> usize {
        match &self.cases {
            Cases::Asserts(tests) => tests.len(),
            Cases::Io(pairs) => pairs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the runs of one program went, worst first wins: a timeout or output flood ends the
/// runs (and scores 0); a crash or memory error fails only the tests it happens in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every run finished; the tests that failed failed their checks.
    Ok,
    Timeout,
    /// A run died (signal, `os._exit`, an exception other than a failed assert).
    Crash,
    OutputLimit,
    /// A run hit the memory limit (`MemoryError`).
    MemoryLimit,
    /// The program could not be run at all (no Python, no scratch directory).
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TestOutcome {
    pub passed: usize,
    pub total: usize,
    pub status: Status,
}

/// The code of a completion: the last fenced block (```` ```python ````, ```` ```py ````
/// or bare ```` ``` ````) after the last `</think>`; else the inside of `<answer>…</answer>`
/// (its fenced block if it has one). `None` when there is none or it is blank.
pub fn extract_code(completion: &str) -> Option<String> {
    let after = match completion.rfind("</think>") {
        Some(at) => &completion[at + "</think>".len()..],
        // Reasoning that never ended (a truncated reply) has no answer to run.
        None if completion.contains("<think>") => return None,
        None => completion,
    };
    let code = last_fenced(after).or_else(|| {
        let start = after.find("<answer>")? + "<answer>".len();
        let inside = &after[start..];
        let inside = &inside[..inside.find("</answer>").unwrap_or(inside.len())];
        Some(last_fenced(inside).unwrap_or(inside))
    })?;
    (!code.trim().is_empty()).then(|| code.to_string())
}

/// The body of the last closed fenced block in a Python (or no) language.
fn last_fenced(text: &str) -> Option<&str> {
    let mut found = None;
    let mut rest = text;
    while let Some(open) = rest.find("```") {
        let after_open = &rest[open + 3..];
        // A fence with no line after it opens nothing: keep what was found before it.
        let Some(line_end) = after_open.find('\n') else {
            break;
        };
        let lang = after_open[..line_end].trim().to_ascii_lowercase();
        let body = &after_open[line_end + 1..];
        let Some(close) = body.find("```") else { break };
        if matches!(lang.as_str(), "" | "python" | "py" | "python3") {
            found = Some(&body[..close]);
        }
        rest = &body[close + 3..];
    }
    found
}

/// Runs `code` against `tests` under `limits` (see the module doc for what counts), once per
/// process: a later call with the same program, tests and limits returns the first outcome.
/// Eval, rejection sampling and rewards judge one completion several times (pass@1, maj@k,
/// `correctness` next to `code_tests`), and a run costs a Python start.
pub fn run_tests(code: &str, tests: &CodeTests, limits: &Limits) -> TestOutcome {
    let key = {
        let mut h = blake3::Hasher::new();
        h.update(format!("{tests:?}\0{limits:?}\0").as_bytes());
        h.update(code.as_bytes());
        *h.finalize().as_bytes()
    };
    if let Some(known) = memo().lock().ok().and_then(|m| m.get(&key).cloned()) {
        return known;
    }
    let outcome = run_uncached(code, tests, limits);
    // An error (no Python, no scratch directory) says nothing about the program: not kept.
    if outcome.status != Status::Error
        && let Ok(mut m) = memo().lock()
    {
        if m.len() >= MEMO_CAPACITY {
            m.clear();
        }
        m.insert(key, outcome.clone());
    }
    outcome
}

/// Outcomes kept by [`run_tests`]; cleared when full (a GRPO run judges new programs every
/// step, so old ones are rarely asked for again).
const MEMO_CAPACITY: usize = 65_536;

fn memo() -> &'static Mutex<HashMap<[u8; 32], TestOutcome>> {
    static MEMO: OnceLock<Mutex<HashMap<[u8; 32], TestOutcome>>> = OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// Judges the `code` problems among `(task, answer, completion)` on every core under
/// `limits`, so that the [`passes`] (or, under default limits, [`verify`]) calls that follow (in any order, on one thread) find their outcomes in the
/// memo. Other tasks are skipped. Fails when there is a code problem and no Python to judge
/// it with, rather than scoring every program 0.
pub fn prejudge<'a>(
    jobs: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    limits: &Limits,
) -> Result<(), String> {
    let code: Vec<(&str, &str)> = jobs
        .into_iter()
        .filter(|(task, _, _)| *task == CODE_TASK)
        .map(|(_, answer, completion)| (answer, completion))
        .collect();
    if code.is_empty() {
        return Ok(());
    }
    python().map_err(|e| format!("problems of task `code` are judged by running them: {e}"))?;
    parallel_map(&code, |(answer, completion)| {
        passes(answer, completion, limits)
    });
    Ok(())
}

fn run_uncached(code: &str, tests: &CodeTests, limits: &Limits) -> TestOutcome {
    let total = tests.len();
    let error = TestOutcome {
        passed: 0,
        total,
        status: Status::Error,
    };
    let Ok(python) = python() else { return error };
    let iso = sandbox::isolation(python);
    let Ok(dir) = Scratch::new() else {
        return error;
    };
    if std::fs::write(dir.path().join("solution.py"), code).is_err() {
        return error;
    }
    match &tests.cases {
        Cases::Asserts(asserts) => {
            let nonce = nonce();
            let entry = tests.entry_point.as_deref().unwrap_or("");
            let written = serde_json::to_vec(asserts).ok().is_some_and(|json| {
                std::fs::write(dir.path().join("tests.json"), json).is_ok()
                    && std::fs::write(dir.path().join("harness.py"), HARNESS).is_ok()
                    && std::fs::write(
                        dir.path().join("prelude.py"),
                        tests.prelude.as_deref().unwrap_or(""),
                    )
                    .is_ok()
            });
            if !written {
                return error;
            }
            // The nonce comes on stdin, which the harness reads to its end before the
            // program runs: a program could read its arguments back from /proc.
            let args = ["harness.py", entry];
            let stdin = format!("{nonce}\n");
            match sandbox::run(python, &args, dir.path(), stdin.as_bytes(), limits, iso) {
                Ok(run) => harness_outcome(&run, &nonce, total),
                Err(_) => error,
            }
        }
        Cases::Io(pairs) => {
            let mut outcome = TestOutcome {
                passed: 0,
                total,
                status: Status::Ok,
            };
            let started = std::time::Instant::now();
            for (input, expected) in pairs {
                if started.elapsed() > limits.timeout * IO_BUDGET {
                    // Many slow pairs would hold a worker for minutes: the rest time out.
                    return TestOutcome {
                        status: Status::Timeout,
                        passed: 0,
                        total,
                    };
                }
                let run = match sandbox::run(
                    python,
                    &["solution.py"],
                    dir.path(),
                    input.as_bytes(),
                    limits,
                    iso,
                ) {
                    Ok(run) => run,
                    Err(_) => return error,
                };
                let status = match run.exit {
                    Exit::Timeout => Status::Timeout,
                    Exit::OutputLimit => Status::OutputLimit,
                    Exit::Code(0) => Status::Ok,
                    _ if memory_error(&run.stderr) => Status::MemoryLimit,
                    _ => Status::Crash,
                };
                if matches!(status, Status::Timeout | Status::OutputLimit) {
                    return TestOutcome {
                        passed: 0,
                        total,
                        status,
                    };
                }
                if status == Status::Ok
                    && same_output(&String::from_utf8_lossy(&run.stdout), expected)
                {
                    outcome.passed += 1;
                }
                outcome.status = worse(outcome.status, status);
            }
            outcome
        }
    }
}

/// All input/output pairs of one program together get this many timeouts' time.
const IO_BUDGET: u32 = 5;

/// [`run_tests`] for many programs, as many at once as there are cores; in input order.
pub fn run_many(jobs: &[(&str, &CodeTests)], limits: &Limits) -> Vec<TestOutcome> {
    parallel_map(jobs, |(code, tests)| run_tests(code, tests, limits))
}

/// `f` over `items` on up to one thread per core, results in input order.
pub fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if workers <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            // A worker panics only if `f` does; re-raise it here rather than lose results.
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The `code_tests` reward (see the module doc).
pub fn reward(
    task: &str,
    answer: &str,
    completion: &str,
    limits: &Limits,
    bonus: f64,
) -> Option<f64> {
    if task != CODE_TASK {
        return None;
    }
    let tests = CodeTests::parse(answer).ok()?;
    let Some(code) = extract_code(completion) else {
        return Some(0.0);
    };
    score(&run_tests(&code, &tests, limits), bonus)
}

/// The reward of an outcome: `None` for [`Status::Error`] (nothing was judged).
pub fn score(outcome: &TestOutcome, bonus: f64) -> Option<f64> {
    match outcome.status {
        Status::Error => None,
        _ if outcome.total == 0 => None,
        Status::Timeout | Status::OutputLimit => Some(0.0),
        _ => {
            let all = outcome.passed == outcome.total;
            Some(outcome.passed as f64 / outcome.total as f64 + if all { bonus } else { 0.0 })
        }
    }
}

/// What `correctness` of a `code` problem means: the completion's program passes every test
/// of `answer` under default limits. For `tasks::verify_with` to call on task [`CODE_TASK`];
/// false when there is no code, the spec is bad or Python is missing.
pub fn verify(answer: &str, completion: &str) -> bool {
    passes(answer, completion, &Limits::default())
}

/// [`verify`] under `limits`.
pub fn passes(answer: &str, completion: &str, limits: &Limits) -> bool {
    let (Ok(tests), Some(code)) = (CodeTests::parse(answer), extract_code(completion)) else {
        return false;
    };
    all_passed(&run_tests(&code, &tests, limits))
}

/// Whether every test passed and nothing went wrong: what `correctness` of a `code` problem
/// should mean.
pub fn all_passed(outcome: &TestOutcome) -> bool {
    outcome.total > 0 && outcome.passed == outcome.total && outcome.status == Status::Ok
}

fn worse(a: Status, b: Status) -> Status {
    let rank = |s: Status| match s {
        Status::Ok => 0,
        Status::Crash => 1,
        Status::MemoryLimit => 2,
        Status::OutputLimit => 3,
        Status::Timeout => 4,
        Status::Error => 5,
    };
    if rank(b) > rank(a) { b } else { a }
}

fn memory_error(stderr: &[u8]) -> bool {
    String::from_utf8_lossy(stderr).contains("MemoryError")
}

/// Equal up to trailing whitespace on each line and trailing blank lines.
fn same_output(got: &str, expected: &str) -> bool {
    let lines = |text: &str| -> Vec<String> {
        let mut lines: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        lines
    };
    lines(got) == lines(expected)
}

/// A fresh token for the harness's result lines, so the program cannot print fake ones.
fn nonce() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.update(&now.to_le_bytes());
    hasher.finalize().to_hex()[..32].to_string()
}

/// Reads the harness's result lines: `<nonce> load ok|memory|error` then `<nonce> <i>
/// pass|fail|error|memory` per test. A missing line is a failed test.
fn harness_outcome(run: &sandbox::Run, nonce: &str, total: usize) -> TestOutcome {
    let mut outcome = TestOutcome {
        passed: 0,
        total,
        status: Status::Ok,
    };
    match run.exit {
        Exit::Timeout => {
            outcome.status = Status::Timeout;
            return outcome;
        }
        Exit::OutputLimit => {
            outcome.status = Status::OutputLimit;
            return outcome;
        }
        Exit::Code(0) => {}
        _ => outcome.status = Status::Crash,
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    let mut passed = vec![false; total];
    let mut finished = false;
    for line in stdout.lines() {
        let mut words = line.split(' ');
        if words.next() != Some(nonce) {
            continue;
        }
        let (what, result) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let status = match result {
            "memory" => Status::MemoryLimit,
            "error" => Status::Crash,
            _ => Status::Ok,
        };
        outcome.status = worse(outcome.status, status);
        match what.parse::<usize>() {
            Ok(i) if i < total => {
                passed[i] = result == "pass";
                finished |= i + 1 == total;
            }
            _ => {}
        }
    }
    if !finished {
        // The harness stopped early: the program exited or broke stdout mid-way.
        outcome.status = worse(outcome.status, Status::Crash);
    }
    outcome.passed = passed.iter().filter(|&&p| p).count();
    outcome
}

/// Runs the program (`solution.py`) and then each test of `tests.json` in its namespace,
/// printing one result line per step on the stdout it had before the program ran.
const HARNESS: &str = r#"import json, sys
def main():
    nonce, entry = sys.stdin.read().strip(), sys.argv[1]
    del sys.argv[1:]
    out = sys.stdout
    with open("tests.json") as f:
        tests = json.load(f)
    with open("solution.py") as f:
        source = f.read()
    with open("prelude.py") as f:
        prelude = f.read()
    def report(what, result):
        out.write("\n%s %s %s\n" % (nonce, what, result))
        out.flush()
    def kind(error):
        if isinstance(error, MemoryError):
            return "memory"
        return "fail" if isinstance(error, AssertionError) else "error"
    ns = {"__name__": "solution"}
    try:
        exec(compile(prelude, "prelude.py", "exec"), ns)
    except Exception:
        pass
    try:
        exec(compile(source, "solution.py", "exec"), ns)
        loaded = not entry or callable(ns.get(entry))
        if loaded and entry:
            # HumanEval's tests call the function under test `candidate`.
            ns.setdefault("candidate", ns[entry])
        report("load", "ok" if loaded else "missing")
    except BaseException as e:
        loaded = False
        report("load", "memory" if isinstance(e, MemoryError) else "error")
    for i, test in enumerate(tests):
        if not loaded:
            report(i, "fail")
            continue
        try:
            exec(compile(test, "test_%d" % i, "exec"), ns)
            report(i, "pass")
        except BaseException as e:
            report(i, kind(e))
main()
"#;
