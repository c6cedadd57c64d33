//! Slurm's command-line clients, run as processes: `sbatch` to submit, `squeue` and
//! `scontrol show job` to follow (no `sacct`: it needs slurmdbd, which many small clusters
//! lack), `scancel` to cancel. `SLURM_CONF` and the rest of the environment pass through.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What `sbatch` is given for one stage.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    pub job_name: &'a str,
    pub script: &'a Path,
    pub output: &'a Path,
    pub workdir: &'a Path,
    pub cpus: u32,
    pub mem_mb: Option<u64>,
    pub gpus: Option<u32>,
    pub time: Option<&'a str>,
    pub partition: Option<&'a str>,
    /// Jobs that must end successfully first.
    pub after_ok: Vec<u64>,
    /// `--sbatch-arg` values, passed as they are (account, qos, constraints).
    pub extra: &'a [String],
}

/// Submits a job; returns its id.
pub fn sbatch(s: &Submission) -> Result<u64> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable")
        .arg(format!("--job-name={}", s.job_name))
        .arg(format!("--output={}", s.output.display()))
        .arg(format!("--chdir={}", s.workdir.display()))
        .arg(format!("--cpus-per-task={}", s.cpus.max(1)));
    if let Some(mem) = s.mem_mb {
        cmd.arg(format!("--mem={mem}M"));
    }
    if let Some(gpus) = s.gpus.filter(|&g| g > 0) {
        cmd.arg(format!("--gres=gpu:{gpus}"));
    }
    if let Some(t) = s.time {
        cmd.arg(format!("--time={t}"));
    }
    if let Some(p) = s.partition {
        cmd.arg(format!("--partition={p}"));
    }
    if !s.after_ok.is_empty() {
        let ids: Vec<String> = s.after_ok.iter().map(u64::to_string).collect();
        // A dependency that can never be met (a parent failed) cancels the job instead of
        // leaving it pending forever.
        cmd.arg(format!("--dependency=afterok:{}", ids.join(":")))
            .arg("--kill-on-invalid-dep=yes");
    }
    cmd.args(s.extra).arg(s.script);
    let out = cmd.output().context("cannot run `sbatch`")?;
    if !out.status.success() {
        bail!(
            "sbatch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `--parsable` prints `id` or `id;cluster`.
    let id = text.trim().split(';').next().unwrap_or_default();
    id.parse()
        .with_context(|| format!("sbatch printed `{}`, not a job id", text.trim()))
}

/// A job's state as the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`, ...
    pub state: String,
    /// Why a pending job waits (`Dependency`, `Resources`, `DependencyNeverSatisfied`).
    pub reason: String,
    /// `exit:signal`, once ended.
    pub exit_code: Option<String>,
    /// Unix seconds, once started / ended (from `scontrol`).
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl JobState {
    /// Ended, one way or another.
    pub fn is_final(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "RESIZING"
                | "SUSPENDED"
                | "STOPPED"
                | "SIGNALING"
                | "STAGE_OUT"
        )
    }

    pub fn succeeded(&self) -> bool {
        self.state == "COMPLETED"
    }
}

/// The states of `ids` that the controller still knows (recently ended jobs included, for
/// `MinJobAge`); an id missing from the map has left its memory.
pub fn job_states(ids: &[u64]) -> Result<BTreeMap<u64, JobState>> {
    let mut out = BTreeMap::new();
    for &id in ids {
        let o = Command::new("scontrol")
            .args(["show", "job", "-o", &id.to_string()])
            .output()
            .context("cannot run `scontrol`")?;
        if !o.status.success() {
            // "Invalid job id specified": aged out of the controller's memory.
            continue;
        }
        let text = String::from_utf8_lossy(&o.stdout);
        if let Some(state) = parse_show_job(&text) {
            out.insert(id, state);
        }
    }
    Ok(out)
}

/// Reads `scontrol show job -o` (one `Key=Value` line per job).
pub fn parse_show_job(text: &str) -> Option<JobState> {
    let line = text.lines().find(|l| l.contains("JobState="))?;
    let fields: BTreeMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let time = |k: &str| fields.get(k).and_then(|t| parse_time(t));
    Some(JobState {
        state: fields.get("JobState")?.to_string(),
        reason: fields.get("Reason").unwrap_or(&"None").to_string(),
        exit_code: fields.get("ExitCode").map(|s| s.to_string()),
        start: time("StartTime"),
        end: time("EndTime"),
    })
}

/// `2026-12-02T14:05:33` (local time, as Slurm prints it) → Unix seconds; `Unknown` → None.
fn parse_time(t: &str) -> Option<i64> {
    let (date, clock) = t.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let c: Vec<i64> = clock
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if d.len() != 3 || c.len() != 3 {
        return None;
    }
    let mut tm: libc::tm = unsafe_zeroed_tm();
    tm.tm_year = (d[0] - 1900) as i32;
    tm.tm_mon = (d[1] - 1) as i32;
    tm.tm_mday = d[2] as i32;
    tm.tm_hour = c[0] as i32;
    tm.tm_min = c[1] as i32;
    tm.tm_sec = c[2] as i32;
    tm.tm_isdst = -1;
    // SAFETY: `tm` is a fully initialised struct owned by this frame; mktime only reads and
    // normalises it, and consults the process's time zone.
    let t = unsafe { libc::mktime(&mut tm) };
    (t != -1).then_some(t as i64)
}

fn unsafe_zeroed_tm() -> libc::tm {
    // SAFETY: `libc::tm` is a plain C struct of integers (and, on glibc, a `*const c_char`
    // zone name that may be null); all-zero bytes are a valid value of it.
    unsafe { std::mem::zeroed() }
}

/// Cancels jobs (those already ended are ignored by Slurm).
pub fn scancel(ids: &[u64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let out = Command::new("scancel")
        .args(ids.iter().map(u64::to_string))
        .output()
        .context("cannot run `scancel`")?;
    if !out.status.success() {
        bail!(
            "scancel failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The cluster's node names (`sinfo` hostlist expanded by `scontrol show hostnames`).
pub fn node_names() -> Result<Vec<String>> {
    let out = Command::new("sinfo")
        .args(["-h", "-o", "%N"])
        .output()
        .context("cannot run `sinfo`")?;
    if !out.status.success() {
        bail!(
            "sinfo failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut names = Vec::new();
    for expr in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let o = Command::new("scontrol")
            .args(["show", "hostnames", expr])
            .output()
            .context("cannot run `scontrol`")?;
        names.extend(
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Whether `program` can be run from PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_job_line_is_read() {
        let line = "JobId=12 JobName=dagrun:p:a UserId=root(0) JobState=COMPLETED Reason=None \
                    Dependency=(null) ExitCode=0:0 RunTime=00:00:03 SubmitTime=2026-12-02T14:05:30 \
                    StartTime=2026-12-02T14:05:31 EndTime=2026-12-02T14:05:34 Partition=debug";
        let s = parse_show_job(line).unwrap();
        assert_eq!(s.state, "COMPLETED");
        assert!(s.is_final() && s.succeeded());
        assert_eq!(s.exit_code.as_deref(), Some("0:0"));
        assert_eq!(s.end.unwrap() - s.start.unwrap(), 3);
    }

    #[test]
    fn a_pending_job_has_no_times_and_is_not_final() {
        let line = "JobId=13 JobState=PENDING Reason=Dependency ExitCode=0:0 \
                    StartTime=Unknown EndTime=Unknown";
        let s = parse_show_job(line).unwrap();
        assert!(!s.is_final());
        assert_eq!(s.reason, "Dependency");
        assert_eq!((s.start, s.end), (None, None));
    }
}
