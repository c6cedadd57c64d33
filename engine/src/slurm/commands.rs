//! Slurm's command-line clients, run as processes: `sbatch` to submit, `squeue -t all` to
//! follow (no `sacct`: it needs slurmdbd, which many small clusters lack), `scancel` to
//! cancel, `sinfo` for the nodes. `SLURM_CONF` and the rest of the environment pass through.

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
    let mut cmd = client("sbatch");
    cmd.arg("--parsable")
        .arg(format!("--job-name={}", s.job_name))
        // `%` starts a Slurm filename pattern (`%j`): a literal one is doubled.
        .arg(format!(
            "--output={}",
            s.output.display().to_string().replace('%', "%%")
        ))
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
    /// Unix seconds, once started / ended.
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl JobState {
    /// Ended, one way or another.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "PREEMPTED"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "OUT_OF_MEMORY"
        ) || self.held_after_launch_failure()
    }

    /// A job whose launch failed and that Slurm requeued on hold: it will not run by itself.
    pub fn held_after_launch_failure(&self) -> bool {
        self.state == "PENDING" && self.reason.to_ascii_lowercase().contains("launch_failed")
    }

    pub fn succeeded(&self) -> bool {
        self.state == "COMPLETED"
    }
}

/// The states of `ids`: `Some` for jobs the controller knows (recently ended ones included,
/// for `MinJobAge`), `None` for jobs it has forgotten. One `squeue` call for them all; an
/// error (controller down, a timeout) is an error, never "ended".
pub fn job_states(ids: &[u64]) -> Result<BTreeMap<u64, Option<JobState>>> {
    let mut out: BTreeMap<u64, Option<JobState>> = ids.iter().map(|&id| (id, None)).collect();
    if ids.is_empty() {
        return Ok(out);
    }
    let list: Vec<String> = ids.iter().map(u64::to_string).collect();
    let o = client("squeue")
        .args(["-h", "-t", "all", "-j", &list.join(",")])
        .args([
            "-O",
            "JobID:|,State:|,Reason:|,StartTime:|,EndTime:|,exit_code:|",
        ])
        .output()
        .context("cannot run `squeue`")?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        // Every id unknown: all forgotten.
        if stderr.contains("Invalid job id") {
            return Ok(out);
        }
        bail!("squeue failed: {}", stderr.trim());
    }
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        if let Some((id, state)) = parse_squeue_line(line) {
            out.insert(id, Some(state));
        }
    }
    Ok(out)
}

/// One line of `squeue -O 'JobID:|,State:|,Reason:|,StartTime:|,EndTime:|,exit_code:|'`.
pub fn parse_squeue_line(line: &str) -> Option<(u64, JobState)> {
    let f: Vec<&str> = line.split('|').map(str::trim).collect();
    if f.len() < 6 {
        return None;
    }
    let id = f[0].parse().ok()?;
    // exit_code is the raw wait status: the exit code in the high byte, a signal in the low bits.
    let exit_code = f[5]
        .parse::<i64>()
        .ok()
        .map(|w| format!("{}:{}", (w >> 8) & 0xff, w & 0x7f));
    Some((
        id,
        JobState {
            state: f[1].to_string(),
            reason: f[2].to_string(),
            exit_code,
            start: parse_time(f[3]),
            end: parse_time(f[4]),
        },
    ))
}

/// A Slurm client command in its own process group: Ctrl-C on a terminal signals the whole
/// foreground group, and must reach the head alone (which then cancels its jobs), not kill
/// the `squeue` it is waiting for.
fn client(program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    cmd.process_group(0);
    cmd
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
    // normalises it. It also reads `TZ`, which nothing in dagrun changes while it runs.
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
    let out = client("scancel")
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
    let out = client("sinfo")
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
        let o = client("scontrol")
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
        let line = "12|COMPLETED|None|2026-12-02T14:05:31|2026-12-02T14:05:34|0|";
        let (id, s) = parse_squeue_line(line).unwrap();
        assert_eq!(id, 12);
        assert_eq!(s.state, "COMPLETED");
        assert!(s.is_final() && s.succeeded());
        assert_eq!(s.exit_code.as_deref(), Some("0:0"));
        assert_eq!(s.end.unwrap() - s.start.unwrap(), 3);
    }

    #[test]
    fn exit_statuses_and_pending_jobs_are_read() {
        let line = "8|FAILED|NonZeroExitCode|2026-12-02T14:12:37|2026-12-02T14:12:39|256|";
        let (_, failed) = parse_squeue_line(line).unwrap();
        assert_eq!(failed.exit_code.as_deref(), Some("1:0"));
        assert!(failed.is_final() && !failed.succeeded());
        let line = "4|CANCELLED|None|2026-12-02T14:12:27|2026-12-02T14:12:29|9|";
        let (_, killed) = parse_squeue_line(line).unwrap();
        assert_eq!(killed.exit_code.as_deref(), Some("0:9"));
        let (_, pending) = parse_squeue_line("9|PENDING|Dependency|N/A|N/A|0|").unwrap();
        assert!(!pending.is_final());
        assert_eq!(pending.reason, "Dependency");
        assert_eq!((pending.start, pending.end), (None, None));
        assert!(parse_squeue_line("garbage").is_none());
        let (_, held) =
            parse_squeue_line("7|PENDING|launch_failed_requeued_held|N/A|N/A|0|").unwrap();
        assert!(held.is_final() && !held.succeeded());
        let (_, completing) = parse_squeue_line("7|COMPLETING|None|N/A|N/A|0|").unwrap();
        assert!(!completing.is_final());
    }
}
