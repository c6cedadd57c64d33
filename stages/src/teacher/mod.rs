//! Teachers that write `cot_generate`'s worked solutions: an OpenAI-compatible endpoint
//! (DeepSeek, vLLM, OpenAI, `dagrun serve`) asked over HTTP.
//!
//! Owns: reading the `teacher` params, asking for every (problem, sample) with a bounded number
//! of requests in flight, the journal that makes a killed or failed run never pay twice for a
//! finished request, and turning replies into R1-format chats. Does not own drawing the
//! problems (`cot_generate`) nor the HTTP retry policy ([`http`]).
//!
//! The journal is `teacher.jsonl` in the stage's resume directory: one line per finished
//! request, appended and flushed as each reply arrives. A re-run (same key) reads it first and
//! asks only for what is missing; a torn last line is asked again.

pub mod http;
pub mod local;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, bail};
use dagrun_engine::Progress;
use serde::{Deserialize, Serialize};

pub use http::{Endpoint, Reply};

/// The keys a `teacher` map may have.
pub const TEACHER_KEYS: &[&str] = &["endpoint", "model", "api_key_env"];

/// The `teacher` param: an endpoint, or `{model: teacher}` for the model on the `teacher`
/// input.
#[derive(Debug, Clone)]
pub enum Teacher {
    Endpoint(TeacherSpec),
    /// The input port the model comes from.
    Local(String),
}

/// The input port a local teacher model comes in on.
pub const TEACHER_PORT: &str = "teacher";

impl Teacher {
    /// Reads a `teacher` map: with `endpoint`, an endpoint; `{model: <port>}` alone, a local
    /// model.
    pub fn parse(value: &serde_json::Value) -> Result<Teacher, String> {
        let map = value.as_object().ok_or("param `teacher` must be a map")?;
        if let Some(key) = map.keys().find(|k| !TEACHER_KEYS.contains(&k.as_str())) {
            let hint = dagrun_engine::diag::did_you_mean(key, TEACHER_KEYS)
                .or_else(|| {
                    TEACHER_KEYS
                        .iter()
                        .copied()
                        .find(|k| k.starts_with(key.as_str()))
                })
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(format!(
                "param `teacher`: unknown key `{key}`{hint}; it takes endpoint, model, api_key_env"
            ));
        }
        if !map.contains_key("endpoint") && map.len() == 1 {
            let port = map.get("model").and_then(|m| m.as_str()).ok_or(
                "param `teacher` needs `endpoint` (a server) or `model` alone (an input port)",
            )?;
            if port != TEACHER_PORT {
                return Err(format!(
                    "param `teacher`: `model: {port}` must name the input port `{TEACHER_PORT}` (wire the model there), or give `endpoint` for a server"
                ));
            }
            return Ok(Teacher::Local(port.to_string()));
        }
        let spec: TeacherSpec =
            serde_json::from_value(value.clone()).map_err(|e| format!("param `teacher`: {e}"))?;
        match spec.problem() {
            Some(p) => Err(format!("param `teacher`: {p}")),
            None => Ok(Teacher::Endpoint(spec)),
        }
    }
}

/// `teacher: {endpoint, model, api_key_env}` as written in the pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    pub endpoint: String,
    pub model: String,
    /// The environment variable holding the API key; the key itself is never a param.
    pub api_key_env: Option<String>,
}

impl TeacherSpec {
    /// What is wrong with the spec, if anything (checked before a run).
    pub fn problem(&self) -> Option<String> {
        let url = self.endpoint.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Some(format!(
                "`endpoint` must be an http:// or https:// URL, got `{url}`"
            ));
        }
        if self.model.trim().is_empty() {
            return Some("`model` is empty".into());
        }
        if let Some(var) = &self.api_key_env
            && (var.is_empty() || var.contains(['=', '\0']))
        {
            return Some(format!(
                "`api_key_env` must name an environment variable, got `{var}`"
            ));
        }
        None
    }

    /// The chat-completions URL: the endpoint as given when it ends in
    /// `/chat/completions`, else with it appended (`http://host:8000/v1` works).
    pub fn chat_url(&self) -> String {
        let base = self.endpoint.trim().trim_end_matches('/');
        if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        }
    }

    /// The API key from its environment variable; an error names the variable, never a value.
    pub fn api_key(&self) -> anyhow::Result<Option<String>> {
        let Some(var) = &self.api_key_env else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
            _ => bail!("teacher: the environment variable `{var}` (`api_key_env`) is not set"),
        }
    }
}

/// One request: a problem's prompt and which of its samples.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub sample: usize,
    pub prompt: String,
}

/// A journal line: a finished request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Answered {
    pub id: String,
    pub sample: usize,
    pub reasoning: Option<String>,
    pub content: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub attempts: u32,
}

impl Answered {
    /// The reply in the R1 format: the reasoning (`reasoning_content`) in a `<think>` block
    /// before the content; a content that holds its own `<think>` stays as it is.
    pub fn completion(&self) -> String {
        let content = self.content.trim();
        match &self.reasoning {
            Some(r) => format!("<think>\n{}\n</think>\n{content}", r.trim()),
            // A template that opens `<think>` in the prompt (QwQ, R1-Distill without a
            // reasoning parser) sends the rest: the reply gets its opening back.
            None if content.contains("</think>") && !content.contains("<think>") => {
                format!("<think>\n{content}")
            }
            None => content.to_string(),
        }
    }
}

/// Every answer, by (problem id, sample).
pub type Answers = HashMap<(String, usize), Answered>;

/// Totals for the stage's metrics.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    pub requests: u64,
    /// Requests answered in an earlier, interrupted run (read from the journal).
    pub resumed: u64,
    pub retries: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Adds the token counts of every answer, earlier runs' included.
    pub fn count_tokens(&mut self, answers: &Answers) {
        for a in answers.values() {
            self.prompt_tokens += a.prompt_tokens;
            self.completion_tokens += a.completion_tokens;
        }
    }
}

/// Asks `endpoint` for every job not in the journal under `resume`, `concurrency` at a time;
/// returns every answer (journal and new), keyed by (id, sample). On a request that fails for
/// good, the requests in flight finish and are journaled, then the error is returned.
pub fn ask_all(
    endpoint: &Endpoint,
    jobs: &[Job],
    concurrency: usize,
    resume: &Path,
    progress: &Progress,
) -> anyhow::Result<(Answers, Usage)> {
    let journal_path = resume.join("teacher.jsonl");
    let mut answers = read_journal(&journal_path)?;
    let mut usage = Usage {
        resumed: answers.len() as u64,
        ..Usage::default()
    };
    let pending: Vec<&Job> = jobs
        .iter()
        .filter(|j| !answers.contains_key(&(j.id.clone(), j.sample)))
        .collect();
    progress.inc((jobs.len() - pending.len()) as u64);
    let journal = Journal::open(&journal_path)?;
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let journal = Mutex::new(journal);
    let done: Mutex<Vec<Answered>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..concurrency.clamp(1, pending.len().max(1)) {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let Some(job) = pending.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let seed = request_seed(&job.id, job.sample);
                    match endpoint.ask(&agent, &job.prompt, seed) {
                        Ok(reply) => {
                            let answered = Answered {
                                id: job.id.clone(),
                                sample: job.sample,
                                reasoning: reply.reasoning,
                                content: reply.content,
                                prompt_tokens: reply.prompt_tokens,
                                completion_tokens: reply.completion_tokens,
                                attempts: reply.attempts,
                            };
                            let written = journal
                                .lock()
                                .map_err(|_| "the journal lock is poisoned".to_string())
                                .and_then(|mut j| j.append(&answered));
                            if let Err(e) = written {
                                fail(&stop, &first_error, e);
                                break;
                            }
                            progress.inc(1);
                            if let Ok(mut d) = done.lock() {
                                d.push(answered);
                            }
                        }
                        Err(e) => {
                            fail(
                                &stop,
                                &first_error,
                                format!(
                                    "teacher request for `{}` (sample {}): {e}",
                                    job.id, job.sample
                                ),
                            );
                            break;
                        }
                    }
                }
            });
        }
    });
    for a in done.into_inner().unwrap_or_default() {
        usage.requests += 1;
        usage.retries += u64::from(a.attempts.saturating_sub(1));
        answers.insert((a.id.clone(), a.sample), a);
    }
    if let Some(e) = first_error.into_inner().ok().flatten() {
        bail!(
            "{e}; {} finished requests are kept for the next run",
            answers.len()
        );
    }
    usage.count_tokens(&answers);
    Ok((answers, usage))
}

fn fail(stop: &AtomicBool, first: &Mutex<Option<String>>, e: String) {
    stop.store(true, Ordering::Relaxed);
    if let Ok(mut slot) = first.lock()
        && slot.is_none()
    {
        *slot = Some(e);
    }
}

/// The `seed` sent with a request: fixed per (problem, sample), so a server that honours it
/// answers a re-asked request the same way.
fn request_seed(id: &str, sample: usize) -> u64 {
    let h = blake3::hash(format!("{id}\0{sample}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8])) >> 1
}

/// The answers an earlier run journaled; a torn or unreadable line is skipped (asked again).
pub(crate) fn read_journal(path: &Path) -> anyhow::Result<Answers> {
    let mut out = HashMap::new();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // By bytes: a line torn inside a multi-byte character is not UTF-8, and must not stop the
    // lines after it from being read.
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if let Ok(a) = serde_json::from_slice::<Answered>(&line) {
            out.insert((a.id.clone(), a.sample), a);
        }
    }
    Ok(out)
}

/// The append-only journal file.
pub(crate) struct Journal {
    file: std::fs::File,
    path: PathBuf,
}

impl Journal {
    pub(crate) fn open(path: &Path) -> anyhow::Result<Journal> {
        // A torn last line (a kill mid-write) must not glue onto the next one.
        let torn = std::fs::read(path)
            .ok()
            .is_some_and(|b| !b.is_empty() && !b.ends_with(b"\n"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if torn {
            file.write_all(b"\n")?;
        }
        Ok(Journal {
            file,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn append(&mut self, a: &Answered) -> Result<(), String> {
        let mut line = serde_json::to_string(a).map_err(|e| e.to_string())?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(reasoning: Option<&str>, content: &str) -> Answered {
        Answered {
            id: "p".into(),
            sample: 0,
            reasoning: reasoning.map(str::to_string),
            content: content.into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            attempts: 1,
        }
    }

    #[test]
    fn replies_become_r1_completions() {
        assert_eq!(
            answered(Some("2+2=4"), "<answer>4</answer>").completion(),
            "<think>\n2+2=4\n</think>\n<answer>4</answer>"
        );
        assert_eq!(
            answered(None, "2+2=4\n</think>\n4").completion(),
            "<think>\n2+2=4\n</think>\n4",
            "a reply continuing the template's <think> gets its opening"
        );
        let whole = "<think>\nx\n</think>\n4";
        assert_eq!(answered(None, whole).completion(), whole);
    }

    #[test]
    fn a_torn_journal_line_skips_that_answer_only() {
        let dir = std::env::temp_dir().join(format!("dagrun-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("teacher.jsonl");
        let line = |id: &str| {
            serde_json::to_string(&Answered {
                id: id.into(),
                ..answered(None, "×")
            })
            .unwrap()
        };
        let mut bytes = format!("{}\n", line("a")).into_bytes();
        let torn = line("b");
        // Cut inside the two-byte `×`: not UTF-8.
        bytes.extend_from_slice(&torn.as_bytes()[..torn.find('×').unwrap() + 1]);
        std::fs::write(&path, &bytes).unwrap();
        let mut journal = Journal::open(&path).unwrap();
        journal
            .append(&Answered {
                id: "c".into(),
                ..answered(None, "ok")
            })
            .unwrap();
        let read = read_journal(&path).unwrap();
        let mut ids: Vec<&str> = read.keys().map(|(id, _)| id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, vec!["a", "c"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
