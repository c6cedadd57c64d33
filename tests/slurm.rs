//! The Slurm executor against a real single-node Slurm (slurmctld + slurmd, started from
//! tests/slurm/cluster.sh, which installs Debian's slurm-wlm and munge when missing): results
//! equal the local executor's, independent branches run at once, a second run submits
//! nothing, and a job cancelled mid-stage is resumed from its checkpoint by the next run.
//! Where Slurm cannot run (no root, no packages), the test says so on stderr and skips.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Project;
use serde_json::Value;

/// A cluster this test started; stopped when dropped, whatever the test's outcome.
struct Cluster {
    dir: PathBuf,
    conf: String,
}

impl Cluster {
    /// `None` (after saying why) where Slurm cannot run.
    fn start() -> Option<Cluster> {
        let dir = std::env::temp_dir().join(format!("dagrun-slurm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run tests/slurm/cluster.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(77) {
            // Not captured by the test harness: the skip shows in `cargo test` output.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED slurm executor test: this machine cannot run Slurm: {}",
                stderr.trim().lines().last().unwrap_or("")
            );
            return None;
        }
        assert!(out.status.success(), "cluster.sh start failed: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let conf = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("export SLURM_CONF="))
            .unwrap_or_else(|| panic!("cluster.sh printed no SLURM_CONF: {stdout}"))
            .to_string();
        Some(Cluster { dir, conf })
    }

    /// `dagrun ARGS` in `p` with this cluster's config.
    fn dagrun(&self, p: &Project, args: &[&str]) -> std::process::Output {
        p.command(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap()
    }

    /// (state, start, end) of a job from `scontrol show job -o`.
    fn job(&self, id: u64) -> (String, String, String) {
        let out = Command::new("scontrol")
            .args(["show", "job", "-o", &id.to_string()])
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        (field("JobState"), field("StartTime"), field("EndTime"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
    }
}

fn script() -> PathBuf {
    common::repo_dir().join("tests/slurm/cluster.sh")
}

/// Two SFT branches of a few seconds each from one base and one dataset, and a longer SFT
/// that checkpoints often (the one cancelled mid-stage). Each branch must outlast Slurm's
/// one-second clock (50 steps took 0.6 s on AVX-512 and the overlap check could not see it),
/// and `long` must outlast the 1.5 s the Ctrl-C check waits after its resumed job starts.
const PIPELINE: &str = "
name: branches
seed: 5
stages:
  problems:
    kind: cot_generate
    params: { families: [addition], difficulty: [1, 1], n_train: 64, n_test: 8 }
  base:
    kind: init_model
    params: { preset: pico }
  left:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 300, batch_size: 8, lr: 3e-3 }
    resources: { cpus: 1, mem: 500M }
  right:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 300, batch_size: 8, lr: 1e-3 }
    resources: { cpus: 1, mem: 500M, time: 10 }
";

const LONG: &str = "
  long:
    kind: sft
    inputs: { model: base, data: problems.cot }
    params: { max_steps: 600, batch_size: 8, lr: 2e-3, checkpoint_every: 10 }
    resources: { cpus: 1 }
";

fn json_line(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|_| panic!("no JSON line: {stdout}"))
}

fn stages(run: &Value) -> Vec<Value> {
    run["stages"].as_array().cloned().unwrap_or_default()
}

fn stage<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {run}"))
}

fn digests(run: &Value) -> Vec<(String, Value)> {
    stages(run)
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["outputs"].clone(),
            )
        })
        .collect()
}

fn ok(out: &std::process::Output) -> &std::process::Output {
    assert!(
        out.status.success(),
        "dagrun failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn slurm_runs_the_dag_as_jobs_like_the_local_executor() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let p = Project::new("slurm");
    p.write("p.yaml", PIPELINE);

    let local = json_line(ok(
        &cluster.dagrun(&p, &["run", "p.yaml", "--json", "--cache-dir", "local"])
    ));
    let out = cluster.dagrun(&p, &["run", "p.yaml", "--json", "--executor", "slurm"]);
    let slurm = json_line(ok(&out));
    assert_eq!(
        digests(&slurm),
        digests(&local),
        "Slurm jobs made other bytes"
    );
    for s in stages(&slurm) {
        assert_eq!(s["status"], "ran", "{s}");
        assert!(s["slurm_job"].as_u64().is_some(), "no job id: {s}");
    }

    // The branches overlapped: each started before the other ended (Slurm's clock, seconds).
    let job = |name: &str| cluster.job(stage(&slurm, name)["slurm_job"].as_u64().unwrap());
    let (ls, l0, l1) = job("left");
    let (rs, r0, r1) = job("right");
    assert_eq!((ls.as_str(), rs.as_str()), ("COMPLETED", "COMPLETED"));
    assert!(
        l0 < r1 && r0 < l1,
        "left ran {l0}..{l1}, right {r0}..{r1}: one after the other"
    );
    // ...and after their inputs' jobs ended.
    let (_, _, base_end) = job("base");
    assert!(
        l0 >= base_end && r0 >= base_end,
        "a branch started before `base` ended"
    );

    // Nothing changed: nothing is submitted.
    let again = cluster.dagrun(&p, &["run", "p.yaml", "--json", "--executor", "slurm"]);
    let again_run = json_line(ok(&again));
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("submitted as Slurm job"),
        "a cached stage was submitted: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    for s in stages(&again_run) {
        assert_eq!(s["status"], "cached", "{s}");
    }

    // A job cancelled mid-stage: its checkpoints stay, and the next run resumes from them.
    p.write("p.yaml", &format!("{PIPELINE}{LONG}"));
    // With an override, which the jobs and the collected record must both apply.
    const SET: &str = "--set=long.lr=3e-3";
    let detached = cluster.dagrun(
        &p,
        &["run", "p.yaml", "--executor", "slurm", "--detach", SET],
    );
    ok(&detached);
    let sub = latest_submission(&p.cache());
    let long_job = sub["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["stage"] == "long")
        .and_then(|j| j["job"].as_u64())
        .unwrap_or_else(|| panic!("`long` not submitted: {sub}"));
    assert_eq!(
        sub["jobs"].as_array().unwrap().len(),
        1,
        "only `long` is new: {sub}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !has_checkpoint(&p.cache()) {
        assert!(Instant::now() < deadline, "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (state, _, _) = cluster.job(long_job);
    assert_eq!(
        state, "RUNNING",
        "`long` ended before it could be cancelled"
    );
    let cancel = Command::new("scancel")
        .arg(long_job.to_string())
        .env("SLURM_CONF", &cluster.conf)
        .status()
        .unwrap();
    assert!(cancel.success());
    while !cluster.job(long_job).0.starts_with("CANCELLED") {
        assert!(Instant::now() < deadline, "job {long_job} not cancelled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = cluster.dagrun(&p, &["status", "p.yaml"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains(&format!("job {long_job}")) && shown.contains("cancelled"),
        "`dagrun status` does not show the cancelled job: {shown}"
    );
    // Every job of the detached submission has ended: `status` wrote its run record.
    let run_id = shown
        .split("recorded as run ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("`dagrun status` recorded no run: {shown}"));
    let record: Value = serde_json::from_slice(
        &std::fs::read(p.cache().join("runs").join(run_id).join("record.json")).unwrap(),
    )
    .unwrap();
    let long = stage(&record, "long");
    assert_eq!(long["status"], "failed", "{long}");
    assert!(
        long["error"]
            .as_str()
            .unwrap_or("")
            .contains("cancelled mid-stage"),
        "{long}"
    );
    assert_eq!(stage(&record, "left")["status"], "cached", "{record}");

    // Ctrl-C on a following head cancels its jobs (exit 130), leaving the checkpoints too.
    let head = p
        .command(&["run", "p.yaml", "--json", "--executor", "slurm", SET])
        .env("SLURM_CONF", &cluster.conf)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut second = None;
    while second.is_none() {
        assert!(Instant::now() < deadline, "the head submitted nothing");
        let sub = latest_submission(&p.cache());
        second = sub["jobs"][0]["job"].as_u64().filter(|&j| j != long_job);
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = second.unwrap();
    while cluster.job(second).0 != "RUNNING" {
        assert!(Instant::now() < deadline, "job {second} never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signals a child this test spawned and has not reaped yet.
    unsafe { libc::kill(head.id() as i32, libc::SIGINT) };
    let head = head.wait_with_output().unwrap();
    assert_eq!(
        head.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&head.stderr)
    );
    let (state, _, _) = cluster.job(second);
    assert!(
        state.starts_with("CANCELLED"),
        "job {second} is {state} after Ctrl-C"
    );

    let resumed = json_line(ok(
        &cluster.dagrun(&p, &["run", "p.yaml", "--json", "--executor", "slurm", SET])
    ));
    let long = stage(&resumed, "long");
    assert_eq!(long["status"], "ran", "{long}");
    assert_eq!(long["resumed"], true, "`long` started over: {long}");
    let local_long = json_line(ok(&cluster.dagrun(
        &p,
        &["run", "p.yaml", "--json", "--cache-dir", "local", SET],
    )));
    assert_eq!(
        stage(&local_long, "long")["outputs"],
        long["outputs"],
        "the resumed stage made other bytes than an uninterrupted local run"
    );

    // A stage that fails in its job: the error, the job id and its log; --keep-going.
    p.write(
        "broken.jsonl",
        "{\"question\": \"1+1?\", \"answer\": \"2\"}\n{\"question\": \"2+",
    );
    p.write(
        "p.yaml",
        &format!("{PIPELINE}  broken:\n    kind: dataset\n    params: {{ path: broken.jsonl }}\n"),
    );
    let failed = cluster.dagrun(
        &p,
        &[
            "run",
            "p.yaml",
            "--json",
            "--executor",
            "slurm",
            "--keep-going",
        ],
    );
    assert_eq!(
        failed.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let run = json_line(&failed);
    let broken = stage(&run, "broken");
    let error = broken["error"].as_str().unwrap_or("");
    let job = broken["slurm_job"]
        .as_u64()
        .unwrap_or_else(|| panic!("{broken}"));
    assert_eq!(broken["status"], "failed", "{broken}");
    assert!(
        error.contains("broken.jsonl")
            && error.contains(&format!("Slurm job {job}"))
            && error.contains("broken.out"),
        "the failure does not name the file, the job and its log: {error}"
    );
    assert_eq!(stage(&run, "left")["status"], "cached", "{run}");

    // A second head while the first one's job is queued or running follows that job.
    p.write("p.yaml", &format!("{PIPELINE}{LONG}"));
    let set = "--set=long.max_steps=60";
    ok(&cluster.dagrun(
        &p,
        &["run", "p.yaml", "--executor", "slurm", "--detach", set],
    ));
    let first = latest_submission(&p.cache());
    let first_job = first["jobs"][0]["job"].as_u64().unwrap();
    let second = cluster.dagrun(&p, &["run", "p.yaml", "--json", "--executor", "slurm", set]);
    let second_run = json_line(ok(&second));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("already queued as Slurm job {first_job}"))
            && !stderr.contains("submitted as Slurm job"),
        "the second head queued the stage again: {stderr}"
    );
    let long = stage(&second_run, "long");
    assert_eq!(long["status"], "ran", "{long}");
    assert_eq!(long["slurm_job"].as_u64(), Some(first_job), "{long}");
}

/// The newest submission record (`Null` while none is written yet).
fn latest_submission(cache: &Path) -> Value {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache.join("slurm"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.iter()
        .rev()
        .find_map(|d| std::fs::read(d.join("submission.json")).ok())
        .and_then(|text| serde_json::from_slice(&text).ok())
        .unwrap_or(Value::Null)
}

/// A finished checkpoint in any key's resume directory.
fn has_checkpoint(cache: &Path) -> bool {
    std::fs::read_dir(cache.join("resume"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.path().join("ckpt").join("state.json").is_file())
        })
        .unwrap_or(false)
}
