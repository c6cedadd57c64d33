//! One sandboxed run of the Python interpreter on files in a scratch directory.
//!
//! Owns: finding the interpreter, the scratch directory, probing which isolation works, the
//! wall-clock timeout, the output caps and killing the run's whole process group. What the
//! child does to itself before exec (limits, namespaces, seccomp) is [`super::confine`]. Does not own what the program is or how its output is
//! judged (that is [`super`]).
//!
//! What a run can and cannot do is listed in [`super`]'s module doc.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::confine::Confinement;

/// Resource limits of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Wall-clock time of one process (all asserts share one; each stdin/stdout pair has its
    /// own, and all pairs together five).
    pub timeout: Duration,
    /// Address space (`RLIMIT_AS`), in bytes.
    pub memory_bytes: u64,
    /// Bytes kept of stdout and of stderr each; more kills the run.
    pub output_bytes: usize,
    /// Largest file the program may write (`RLIMIT_FSIZE`), in bytes.
    pub file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            memory_bytes: 512 << 20,
            output_bytes: 1 << 20,
            file_bytes: 16 << 20,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    Timeout,
    OutputLimit,
}

#[derive(Debug)]
pub struct Run {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The run's process id, which was also its process group id.
    pub pid: u32,
}

/// Which isolation this machine allows, probed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isolation {
    /// A fresh network namespace (no interfaces but a down loopback).
    pub net: bool,
    /// The seccomp filter that refuses new processes.
    pub no_fork: bool,
    /// A private mount namespace: everything read-only but the scratch directory and fresh
    /// tmpfs on the shared writable directories.
    pub fs: bool,
}

/// The Python interpreter's real path: `DAGRUN_PYTHON`, else `python3` on `PATH`, resolved
/// through `sys.executable` because shims (pyenv) need an environment the sandbox clears.
pub fn python() -> Result<&'static Path, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let name = std::env::var("DAGRUN_PYTHON").unwrap_or_else(|_| "python3".into());
            let out = Command::new(&name)
                .args(["-c", "import sys; sys.stdout.write(sys.executable)"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("code_tests needs a Python 3 interpreter: `{name}`: {e}"))?;
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || path.is_empty() {
                return Err(format!(
                    "code_tests needs a Python 3 interpreter: `{name}` did not report its path"
                ));
            }
            Ok(PathBuf::from(path))
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

/// What isolation works here: each part is tried once on its own and, where refused (no
/// privilege for namespaces, no seccomp), left out with one line on stderr rather than
/// failing every run.
pub fn isolation(python: &Path) -> Isolation {
    static ISOLATION: OnceLock<Isolation> = OnceLock::new();
    *ISOLATION.get_or_init(|| {
        let works = |iso: Isolation| {
            let dir = Scratch::new().ok()?;
            let limits = Limits::default();
            // Writes its own directory by both names, as real programs do.
            let probe = "import os\nopen('p', 'w').write('x')\nopen(os.environ['HOME'] + '/q', 'w').write('x')";
            let run = run(python, &["-c", probe], dir.path(), b"", &limits, iso).ok()?;
            Some(run.exit == Exit::Code(0))
        };
        let none = Isolation {
            net: false,
            no_fork: false,
            fs: false,
        };
        let net = works(Isolation { net: true, ..none }) == Some(true);
        let no_fork = works(Isolation {
            no_fork: true,
            ..none
        }) == Some(true);
        let fs = works(Isolation { fs: true, ..none }) == Some(true);
        let missing = [
            (net, "a network namespace (programs keep the network)"),
            (no_fork, "the seccomp filter (programs may fork; their group is still killed)"),
            (fs, "a read-only mount namespace (programs may write outside their directory)"),
        ];
        for (works, what) in missing {
            if !works {
                eprintln!("code_tests: this machine does not allow {what}");
            }
        }
        Isolation { net, no_fork, fs }
    })
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("dagrun-code-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self(path)),
                // Left by an earlier process with the same pid: take the next name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `python args…` in `dir` with `stdin` as input under `limits` and `iso`, until it exits,
/// times out or floods its output; the whole process group is killed before this returns.
/// An error means the run could not start.
pub fn run(
    python: &Path,
    args: &[&str],
    dir: &Path,
    stdin: &[u8],
    limits: &Limits,
    iso: Isolation,
) -> io::Result<Run> {
    let mut cmd = Command::new(python);
    // `-I` would also ignore PYTHONHASHSEED, which keeps str hashing (set order) reproducible;
    // the cleared environment gives the isolation `-I` would (no PYTHON* variables).
    cmd.args(["-s", "-S", "-B"])
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .env("LANG", "C.UTF-8")
        .env("PYTHONHASHSEED", "0")
        .env("PYTHONIOENCODING", "utf-8")
        .stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let confinement = Confinement::new(limits, iso, dir)?;
    // SAFETY: `apply` is made for exactly this place: the forked child before exec, with the
    // cwd already set (Command changes directory before running pre_exec hooks).
    unsafe {
        cmd.pre_exec(move || confinement.apply());
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    if let Some(mut input) = child.stdin.take() {
        let data = stdin.to_vec();
        // A program that never reads its input must not block us: write from a thread.
        std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
    }
    let flooded = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let readers = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ];
    for (index, reader) in readers.into_iter().enumerate() {
        if let Some(reader) = reader {
            let (tx, flooded, cap) = (tx.clone(), flooded.clone(), limits.output_bytes);
            std::thread::spawn(move || {
                let _ = tx.send((index, read_capped(reader, cap, &flooded)));
            });
        }
    }
    drop(tx);

    let start = Instant::now();
    let mut ended = None;
    while ended.is_none() {
        if flooded.load(Ordering::Relaxed) {
            ended = Some(Exit::OutputLimit);
        } else if has_exited(pid) {
            break;
        } else if start.elapsed() >= limits.timeout {
            ended = Some(Exit::Timeout);
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The leader is not reaped yet, so its pid (the group id) cannot have been reused.
    kill_group(pid);
    let status = child.wait()?;
    let exit = ended.unwrap_or(match status.code() {
        Some(code) => Exit::Code(code),
        None => Exit::Signal(status.signal().unwrap_or(0)),
    });
    let mut outputs = [Vec::new(), Vec::new()];
    // A process that left the group could hold a pipe open: do not wait for it forever.
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok((index, bytes)) =
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        outputs[index] = bytes;
    }
    let [stdout, stderr] = outputs;
    // A flood the readers noticed only after a quick exit is still a flood.
    let exit = if flooded.load(Ordering::Relaxed) {
        Exit::OutputLimit
    } else {
        exit
    };
    Ok(Run {
        exit,
        stdout,
        stderr,
        pid,
    })
}

/// Reads `reader` to its end, keeping at most `cap` bytes; past it, raises `flooded` and stops.
fn read_capped(mut reader: impl Read, cap: usize, flooded: &AtomicBool) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) if kept.len() + n > cap => {
                flooded.store(true, Ordering::Relaxed);
                break;
            }
            Ok(n) => kept.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    kept
}

/// Whether `pid` (our child) has exited, without reaping it.
fn has_exited(pid: u32) -> bool {
    // SAFETY: waitid writes only into `info`, a zeroed siginfo_t we own; WNOWAIT leaves the
    // child to `Child::wait`.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        if libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) != 0 {
            // No such child: nothing left to wait for.
            return true;
        }
        info.si_pid() != 0
    }
}

/// SIGKILLs every process of group `pid`.
pub fn kill_group(pid: u32) {
    // SAFETY: killpg only sends a signal; the group is the one our child leads.
    unsafe {
        libc::killpg(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Whether any process of group `pid` is alive.
pub fn group_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::killpg(pid as libc::pid_t, 0) == 0 }
}
