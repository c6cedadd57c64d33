//! One chat completion from an OpenAI-compatible endpoint, retried the way rate-limited APIs
//! expect: exponential backoff with jitter on 429, 5xx, timeouts and dropped connections,
//! `Retry-After` honoured, any other status fatal at once. The API key goes into the
//! `Authorization` header and nowhere else: no error message, log line or record holds it.

use std::io::Read;
use std::time::Duration;

use serde_json::{Value, json};

/// Where and how to ask.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `…/v1/chat/completions`.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff; each retry doubles it (with jitter), up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    pub temperature: f64,
    pub max_tokens: u64,
}

/// Longest wait between attempts, whatever `Retry-After` asks.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A teacher's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// DeepSeek's `reasoning_content`, when the server sends it.
    pub reasoning: Option<String>,
    pub content: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Attempts it took (1 when the first succeeded).
    pub attempts: u32,
}

/// Why an attempt failed, and whether another may succeed.
#[derive(Debug)]
struct Failure {
    message: String,
    retry: bool,
    retry_after: Option<Duration>,
}

impl Endpoint {
    /// The completion of `prompt` (sample `sample`: the seed a server may honour).
    pub fn ask(&self, agent: &ureq::Agent, prompt: &str, seed: u64) -> Result<Reply, String> {
        let body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
        });
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.attempt(agent, &body) {
                Ok(mut reply) => {
                    reply.attempts = attempt;
                    return Ok(reply);
                }
                Err(f) => f,
            };
            if !failure.retry || attempt > self.max_retries {
                let tried = match attempt {
                    1 => String::new(),
                    n => format!(" (gave up after {n} attempts)"),
                };
                return Err(format!("{}: {}{tried}", self.url, failure.message));
            }
            std::thread::sleep(self.wait(attempt, failure.retry_after, seed));
        }
    }

    /// The pause before retry `attempt`: the server's `Retry-After`, else the doubled backoff
    /// times a jitter in [0.5, 1) (from the request's seed and attempt, so runs repeat).
    fn wait(&self, attempt: u32, retry_after: Option<Duration>, seed: u64) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(MAX_BACKOFF);
        }
        let doubled = self.backoff.saturating_mul(1 << (attempt - 1).min(16));
        let h = blake3::hash(&[seed.to_le_bytes(), u64::from(attempt).to_le_bytes()].concat());
        let unit = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]));
        let jitter = 0.5 + 0.5 * (unit >> 11) as f64 / (1u64 << 53) as f64;
        doubled.min(MAX_BACKOFF).mul_f64(jitter)
    }

    fn attempt(&self, agent: &ureq::Agent, body: &Value) -> Result<Reply, Failure> {
        let mut request = agent
            .post(&self.url)
            .config()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(false)
            .build()
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request
            .send(body.to_string().as_bytes())
            .map_err(transport_failure)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after_seconds);
        let mut text = String::new();
        response
            .body_mut()
            .as_reader()
            .take(64 << 20)
            .read_to_string(&mut text)
            .map_err(|e| Failure {
                message: format!("reading the response: {e}"),
                retry: true,
                retry_after: None,
            })?;
        if !(200..300).contains(&status) {
            return Err(Failure {
                message: format!("HTTP {status}: {}", error_message(&text)),
                retry: status == 408 || status == 429 || status >= 500,
                retry_after,
            });
        }
        parse_reply(&text).map_err(|message| Failure {
            message,
            retry: false,
            retry_after: None,
        })
    }
}

/// A `Retry-After` in seconds (an HTTP date is not read: the backoff applies), at most
/// [`MAX_BACKOFF`].
fn retry_after_seconds(value: &str) -> Option<Duration> {
    let secs = value.trim().parse::<f64>().ok()?;
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::from_secs_f64(secs.min(MAX_BACKOFF.as_secs_f64())))
}

/// A transport error (refused, reset, timed out): worth retrying.
fn transport_failure(e: ureq::Error) -> Failure {
    Failure {
        message: e.to_string(),
        retry: true,
        retry_after: None,
    }
}

/// An OpenAI-shaped error body's message, else the start of the body.
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    match parsed.as_ref().and_then(|v| v["error"]["message"].as_str()) {
        Some(m) => m.to_string(),
        None => body.chars().take(200).collect(),
    }
}

/// A chat completion's first choice and usage.
pub fn parse_reply(body: &str) -> Result<Reply, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("the response is not JSON: {e}"))?;
    let message = &v["choices"][0]["message"];
    if !message.is_object() {
        return Err("the response has no choices[0].message".into());
    }
    // A null content (reasoning cut off at max_tokens, a refusal) is an answer too: kept as
    // empty, so it is paid for once and `verify` drops it.
    let content = message["content"].as_str().unwrap_or("");
    let reasoning = message["reasoning_content"]
        .as_str()
        .filter(|r| !r.trim().is_empty())
        .map(str::to_string);
    Ok(Reply {
        reasoning,
        content: content.to_string(),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        attempts: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_content_reasoning_and_usage() {
        let body = r#"{"choices":[{"message":{"role":"assistant","content":"<answer>4</answer>","reasoning_content":"2+2=4"}}],"usage":{"prompt_tokens":7,"completion_tokens":5}}"#;
        let r = parse_reply(body).unwrap();
        assert_eq!(r.reasoning.as_deref(), Some("2+2=4"));
        assert_eq!(
            (r.content.as_str(), r.prompt_tokens, r.completion_tokens),
            ("<answer>4</answer>", 7, 5)
        );
        assert!(
            parse_reply(r#"{"choices":[]}"#)
                .unwrap_err()
                .contains("message")
        );
        let cut =
            parse_reply(r#"{"choices":[{"message":{"content":null,"reasoning_content":"long"}}]}"#)
                .unwrap();
        assert_eq!(
            (cut.content.as_str(), cut.reasoning.as_deref()),
            ("", Some("long"))
        );
        assert_eq!(retry_after_seconds("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            retry_after_seconds("99999999999999999999"),
            Some(MAX_BACKOFF)
        );
        assert_eq!(retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after_seconds("-1"), None);
        assert_eq!(
            error_message(r#"{"error":{"message":"slow down","type":"rate_limit"}}"#),
            "slow down"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_obeys_retry_after() {
        let e = Endpoint {
            url: String::new(),
            model: String::new(),
            api_key: None,
            timeout: Duration::from_secs(1),
            max_retries: 5,
            backoff: Duration::from_millis(100),
            temperature: 0.0,
            max_tokens: 1,
        };
        for attempt in 1..=4 {
            let full = 100.0 * f64::from(1u32 << (attempt - 1));
            let w = e.wait(attempt, None, 7).as_secs_f64() * 1000.0;
            assert!(w >= full * 0.5 - 1e-6 && w < full, "{attempt}: {w}");
        }
        assert_ne!(e.wait(1, None, 7), e.wait(1, None, 8), "jittered");
        assert_eq!(
            e.wait(1, Some(Duration::from_secs(3)), 7),
            Duration::from_secs(3)
        );
        assert_eq!(e.wait(1, Some(Duration::from_secs(600)), 7), MAX_BACKOFF);
    }
}
