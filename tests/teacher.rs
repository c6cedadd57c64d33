//! `cot_generate` with a teacher endpoint, against a fault-injecting OpenAI-compatible server
//! on loopback: retries (429 with Retry-After, 500, dropped connections, timeouts) end in
//! answers, a server that goes away fails the stage with a clear error, the re-run asks only
//! for what is missing, and the API key never reaches the cache.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Project, batches, floats, strings};

const KEY: &str = "sk-dagrun-test-5f1e9a";

/// What the server does with the first request for a prompt (later ones are answered).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    RateLimited,
    ServerError,
    Dropped,
    Slow,
    /// 503 on every request, not only the first.
    Unavailable,
}

/// Requests seen, per prompt, with their arrival times.
type Seen = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// A server that answers `n` connections (all, with `None`) on `listener`, then stops
/// listening. `fault` says how a prompt's first request fails.
fn serve(
    listener: TcpListener,
    n: Option<usize>,
    fault: fn(&str) -> Fault,
    seen: Seen,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut handled = 0;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || answer(stream, fault, &seen));
            handled += 1;
            if n.is_some_and(|n| handled >= n) {
                break;
            }
        }
    })
}

fn answer(mut stream: TcpStream, fault: fn(&str) -> Fault, seen: &Seen) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let (mut length, mut auth) = (0usize, String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            auth = line["authorization:".len()..].trim().to_string();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let prompt = request["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let first = {
        let mut seen = seen.lock().unwrap();
        let times = seen.entry(prompt.clone()).or_default();
        times.push(Instant::now());
        times.len() == 1
    };
    let respond = |stream: &mut TcpStream, status: &str, extra: &str, body: &str| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
            body.len()
        );
    };
    if auth != format!("Bearer {KEY}") {
        return respond(
            &mut stream,
            "401 Unauthorized",
            "",
            r#"{"error":{"message":"bad key"}}"#,
        );
    }
    let fault = match fault(&prompt) {
        Fault::Unavailable => Fault::Unavailable,
        f if first => f,
        _ => Fault::None,
    };
    match fault {
        Fault::Unavailable => respond(
            &mut stream,
            "503 Service Unavailable",
            "",
            r#"{"error":{"message":"overloaded"}}"#,
        ),
        Fault::RateLimited => respond(
            &mut stream,
            "429 Too Many Requests",
            "Retry-After: 0.3\r\n",
            r#"{"error":{"message":"slow down","type":"rate_limit"}}"#,
        ),
        Fault::ServerError => respond(&mut stream, "500 Internal Server Error", "", "{}"),
        Fault::Dropped => drop(stream),
        Fault::Slow => {
            std::thread::sleep(Duration::from_millis(1500));
            respond(&mut stream, "200 OK", "", &reply(&prompt));
        }
        Fault::None => respond(&mut stream, "200 OK", "", &reply(&prompt)),
    }
}

/// The right answer to an addition prompt (`12+34+5=`), with reasoning, as DeepSeek sends it.
fn reply(prompt: &str) -> String {
    let sum: i64 = prompt
        .trim_end_matches('=')
        .split('+')
        .filter_map(|t| t.trim().parse::<i64>().ok())
        .sum();
    serde_json::json!({
        "choices": [{"message": {"role": "assistant", "content": format!("<answer>{sum}</answer>"),
            "reasoning_content": format!("{prompt}{sum}")}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7}
    })
    .to_string()
}

fn pipeline(port: u16, n_train: usize, extra: &str) -> String {
    format!(
        "stages:\n  gen:\n    kind: cot_generate\n    params:\n      families: [addition]\n      n_train: {n_train}\n      n_test: 2\n      teacher: {{ endpoint: 'http://127.0.0.1:{port}/v1', model: tiny, api_key_env: DAGRUN_TEST_TEACHER_KEY }}\n      request_timeout: 0.5\n      retry_backoff: 0.01\n{extra}"
    )
}

fn run(p: &Project, file: &str) -> std::process::Output {
    p.command(&["run", file, "--json"])
        .env("DAGRUN_TEST_TEACHER_KEY", KEY)
        .output()
        .unwrap()
}

/// Every file under `dir`, as bytes.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[test]
fn retries_end_in_answers_and_the_key_stays_out_of_the_cache() {
    let p = Project::new("teacher-retries");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    // A fault per prompt, by its first digit.
    fn fault(prompt: &str) -> Fault {
        match prompt.bytes().find(|b| b.is_ascii_digit()).map(|b| b % 5) {
            Some(0) => Fault::RateLimited,
            Some(1) => Fault::ServerError,
            Some(2) => Fault::Dropped,
            Some(3) => Fault::Slow,
            _ => Fault::None,
        }
    }
    serve(listener, None, fault, seen.clone());
    p.write("p.yaml", &pipeline(port, 12, "      concurrency: 3\n"));
    let out = run(&p, "p.yaml");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let result = common::Run::parse(&out);
    let cot = batches(&p.cache(), &result.output("gen", "cot"));
    let answers = strings(&cot[0], "answer");
    assert_eq!(answers.len(), 12, "every solution verifies: {stderr}");
    let seen = seen.lock().unwrap().clone();
    let faulted: Vec<&String> = seen.keys().filter(|p| fault(p) != Fault::None).collect();
    assert!(!faulted.is_empty());
    for (prompt, times) in &seen {
        let expected = if fault(prompt) == Fault::None { 1 } else { 2 };
        assert_eq!(times.len(), expected, "{prompt}: {:?}", fault(prompt));
        if fault(prompt) == Fault::RateLimited {
            let waited = times[1] - times[0];
            assert!(
                waited >= Duration::from_millis(300),
                "Retry-After ignored: {waited:?}"
            );
        }
    }
    let metrics = batches(&p.cache(), &result.output("gen", "metrics"));
    let named: HashMap<String, f64> = strings(&metrics[0], "metric")
        .into_iter()
        .zip(floats(&metrics[0], "value"))
        .collect();
    assert_eq!(named["retries"], faulted.len() as f64);
    assert_eq!(named["completion_tokens"], 12.0 * 7.0);
    // The key is read from the environment only: nowhere in the cache, records or logs.
    for (path, bytes) in files(&p.dir) {
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the API key is in {}",
            path.display()
        );
    }
    // Concurrency and timeouts are not in the key: changing them keeps the result.
    p.write(
        "p.yaml",
        &pipeline(port, 12, "      concurrency: 1\n      max_retries: 2\n"),
    );
    let again = run(&p, "p.yaml");
    assert_eq!(common::Run::parse(&again).status("gen"), "cached");
}

#[test]
fn a_server_that_goes_away_fails_the_stage_and_the_rerun_asks_only_for_the_rest() {
    let p = Project::new("teacher-resume");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let first: Seen = Arc::default();
    // Three answers, then the server is gone (connections refused).
    let server = serve(listener, Some(3), |_| Fault::None, first.clone());
    p.write(
        "p.yaml",
        &pipeline(port, 8, "      concurrency: 1\n      max_retries: 1\n"),
    );
    let out = run(&p, "p.yaml");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("teacher request for"), "{stderr}");
    assert!(stderr.contains("gave up after 2 attempts"), "{stderr}");
    assert!(stderr.contains("3 finished requests are kept"), "{stderr}");
    server.join().unwrap();
    // The server is back on the same address: only the five unanswered prompts are asked.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let second: Seen = Arc::default();
    serve(listener, None, |_| Fault::None, second.clone());
    let out = run(&p, "p.yaml");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (first, second) = (
        first.lock().unwrap().clone(),
        second.lock().unwrap().clone(),
    );
    assert_eq!((first.len(), second.len()), (3, 5));
    assert!(first.keys().all(|k| !second.contains_key(k)), "re-asked");
    let result = common::Run::parse(&out);
    let cot = batches(&p.cache(), &result.output("gen", "cot"));
    assert_eq!(strings(&cot[0], "answer").len(), 8);
}

#[test]
fn a_teacher_without_its_key_or_with_a_typo_is_a_clear_error() {
    let p = Project::new("teacher-errors");
    p.write(
        "p.yaml",
        "stages:\n  gen:\n    kind: cot_generate\n    params:\n      teacher: { endpoint: 'http://127.0.0.1:9/v1', model: m, api_key: x }\n",
    );
    let out = p.output(&["run", "p.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("p.yaml:"), "{stderr}");
    assert!(stderr.contains("did you mean `api_key_env`?"), "{stderr}");
    p.write("q.yaml", &pipeline(9, 2, ""));
    let out = p
        .command(&["run", "q.yaml"])
        .env_remove("DAGRUN_TEST_TEACHER_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`DAGRUN_TEST_TEACHER_KEY` (`api_key_env`) is not set"),
        "{stderr}"
    );
}

#[test]
fn a_local_model_teaches_through_the_sampler_and_must_be_wired() {
    let p = Project::new("teacher-local");
    let model = common::repo_dir().join("tests/fixtures/qwen2-bpe");
    let pipeline = format!(
        "stages:\n  base:\n    kind: init_model\n    params: {{ from: {} }}\n  gen:\n    kind: cot_generate\n    inputs: {{ teacher: base.model }}\n    params: {{ families: [addition], n_train: 6, n_test: 2, samples_per_problem: 2, verify: false, max_tokens: 24, teacher: {{ model: teacher }} }}\n",
        model.display()
    );
    p.write("p.yaml", &pipeline);
    let run = p.run("p.yaml", &[]);
    let cot = batches(&p.cache(), &run.output("gen", "cot"));
    let ids: Vec<String> = cot.iter().flat_map(|b| strings(b, "id")).collect();
    assert_eq!(ids.len(), 12, "two samples of six problems: {ids:?}");
    assert!(ids.contains(&"train-0000000-1".to_string()), "{ids:?}");
    let metrics = batches(&p.cache(), &run.output("gen", "metrics"));
    let named: HashMap<String, f64> = strings(&metrics[0], "metric")
        .into_iter()
        .zip(floats(&metrics[0], "value"))
        .collect();
    assert_eq!(named["requests"], 12.0);
    assert!(named["completion_tokens"] > 0.0);
    // The same pipeline elsewhere writes the same chats: sampling is seeded.
    let q = Project::new("teacher-local-again");
    q.write("p.yaml", &pipeline);
    let again = q.run("p.yaml", &[]);
    assert_eq!(again.output("gen", "cot"), run.output("gen", "cot"));
    // `{model: teacher}` without a model on the input is a located error.
    p.write(
        "q.yaml",
        &pipeline.replace("    inputs: { teacher: base.model }\n", ""),
    );
    let out = p.output(&["run", "q.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("q.yaml:") && stderr.contains("needs a model on the `teacher` input"),
        "{stderr}"
    );
}

#[test]
fn a_server_that_keeps_failing_is_given_up_on_after_the_retry_limit() {
    let p = Project::new("teacher-give-up");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    serve(listener, None, |_| Fault::Unavailable, seen.clone());
    p.write(
        "p.yaml",
        &pipeline(port, 3, "      concurrency: 1\n      max_retries: 2\n"),
    );
    let out = run(&p, "p.yaml");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("HTTP 503: overloaded (gave up after 3 attempts)"),
        "{stderr}"
    );
    assert!(!stderr.contains(KEY), "{stderr}");
    // One problem was tried, three times; the others were not started.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen.values().next().unwrap().len(), 3);
}
