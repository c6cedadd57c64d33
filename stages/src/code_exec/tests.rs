//! Tests of code extraction, the spec format and the sandbox. The sandbox tests need
//! `python3`; without it they print why and pass.

use std::time::{Duration, Instant};

use super::sandbox::{self, Exit, Scratch};
use super::*;

const BONUS: f64 = 0.5;

fn have_python() -> bool {
    match python() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn asserts(tests: &[&str]) -> CodeTests {
    CodeTests {
        cases: Cases::Asserts(tests.iter().map(|t| t.to_string()).collect()),
        entry_point: None,
        prelude: None,
    }
}

const ADD_TESTS: [&str; 4] = [
    "assert add(1, 2) == 3",
    "assert add(-1, 1) == 0",
    "assert add(0, 0) == 0",
    "assert add(2, 2) == 4",
];

/// Runs `code` against the `add` tests, checking it ends within the timeout plus a margin.
fn timed(code: &str) -> (TestOutcome, Duration) {
    let limits = Limits::default();
    let start = Instant::now();
    let outcome = run_tests(code, &asserts(&ADD_TESTS), &limits);
    let took = start.elapsed();
    assert!(
        took < limits.timeout + Duration::from_secs(1),
        "{code:?} took {took:?}"
    );
    (outcome, took)
}

#[test]
fn extracts_the_last_python_block_after_the_reasoning() {
    let completion = "<think>\n```python\nprint('draft')\n```\n</think>\nSo:\n```python\ndef f():\n    return 1\n```\nand\n```\nprint(f())\n```\n";
    assert_eq!(extract_code(completion).as_deref(), Some("print(f())\n"));
    // Blocks in other languages are not code to run; the last Python one is.
    let mixed = "```py\nx = 1\n```\n```bash\nls\n```";
    assert_eq!(extract_code(mixed).as_deref(), Some("x = 1\n"));
    // Else the answer block, fenced or not.
    let answer = "<think>\nhmm\n</think>\n<answer>def f():\n    return 2</answer>";
    assert_eq!(
        extract_code(answer).as_deref(),
        Some("def f():\n    return 2")
    );
    let fenced = "<answer>\n```python\nx = 3\n```\n</answer>";
    assert_eq!(extract_code(fenced).as_deref(), Some("x = 3\n"));
    // Only reasoning, an unclosed fence, an empty block: no code.
    assert_eq!(extract_code("<think>\n```python\nx=1\n```\n</think>"), None);
    assert_eq!(extract_code("```python\nx = 1\n"), None);
    assert_eq!(extract_code("```python\n\n```"), None);
    assert_eq!(extract_code(""), None);
    // A truncated reply's unfinished reasoning is not run; a stray fence after a block
    // does not lose the block.
    assert_eq!(extract_code("<think>\n```python\nx = 1\n```\n"), None);
    let stray = "```python\ndef f(): return 1\n```\nuse ```f```";
    assert_eq!(extract_code(stray).as_deref(), Some("def f(): return 1\n"));
}

#[test]
fn parses_both_spec_forms_and_rejects_others() {
    let spec = CodeTests::parse(r#"{"tests": ["assert f(1) == 2"], "entry_point": "f"}"#);
    assert_eq!(
        spec,
        Ok(CodeTests {
            cases: Cases::Asserts(vec!["assert f(1) == 2".into()]),
            entry_point: Some("f".into()),
            prelude: None,
        })
    );
    let io =
        CodeTests::parse(r#"{"io": [["1 2\n", "3\n"], {"input": "", "output": "0"}]}"#).unwrap();
    assert_eq!(
        io.cases,
        Cases::Io(vec![
            ("1 2\n".into(), "3\n".into()),
            ("".into(), "0".into())
        ])
    );
    for bad in [
        "42",
        "{}",
        r#"{"tests": []}"#,
        r#"{"tests": ["assert 1"], "io": [["", ""]]}"#,
        r#"{"tests": ["assert 1"], "extra": 1}"#,
    ] {
        assert!(CodeTests::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn output_comparison_ignores_trailing_whitespace_only() {
    assert!(same_output("3  \n\n\n", "3"));
    assert!(same_output("a\nb\n", "a \nb"));
    assert!(!same_output("a\n\nb", "a\nb"));
    assert!(!same_output(" 3", "3"));
}

#[test]
fn scores_are_fraction_plus_bonus_and_zero_on_timeout() {
    let outcome = |passed, status| TestOutcome {
        passed,
        total: 4,
        status,
    };
    assert_eq!(score(&outcome(4, Status::Ok), BONUS), Some(1.5));
    assert_eq!(score(&outcome(3, Status::Ok), BONUS), Some(0.75));
    assert_eq!(score(&outcome(2, Status::Crash), BONUS), Some(0.5));
    assert_eq!(score(&outcome(4, Status::Timeout), BONUS), Some(0.0));
    assert_eq!(score(&outcome(4, Status::OutputLimit), BONUS), Some(0.0));
    assert_eq!(score(&outcome(0, Status::Error), BONUS), None);
    assert!(all_passed(&outcome(4, Status::Ok)));
    assert!(!all_passed(&outcome(4, Status::Crash)));
    // Not a code problem, not a spec: cannot judge. No code: 0.
    let limits = Limits::default();
    let spec = r#"{"tests": ["assert True"]}"#;
    assert_eq!(reward("arithmetic", spec, "x", &limits, BONUS), None);
    assert_eq!(reward("code", "42", "```\nx=1\n```", &limits, BONUS), None);
    assert_eq!(
        reward("code", spec, "no code here", &limits, BONUS),
        Some(0.0)
    );
}

#[test]
fn a_correct_program_scores_one_plus_bonus() {
    if !have_python() {
        return;
    }
    let (outcome, _) = timed("def add(a, b):\n    return a + b\n");
    assert_eq!(outcome.status, Status::Ok);
    assert_eq!(score(&outcome, BONUS), Some(1.0 + BONUS));
    let completion =
        "<think>\nadd them\n</think>\n```python\ndef add(a, b):\n    return a + b\n```";
    let spec = r#"{"tests": ["assert add(1, 2) == 3"], "entry_point": "add"}"#;
    let limits = Limits::default();
    assert_eq!(reward("code", spec, completion, &limits, BONUS), Some(1.5));
    let renamed = completion.replace("def add", "def plus");
    assert_eq!(reward("code", spec, &renamed, &limits, BONUS), Some(0.0));
}

#[test]
fn humaneval_tests_call_the_entry_point_as_candidate() {
    if !have_python() {
        return;
    }
    let completion = "```python\ndef add(a, b):\n    return a + b\n```";
    let spec = r#"{"tests": ["assert candidate(1, 2) == 3", "assert candidate(2, 2) == 4"], "entry_point": "add"}"#;
    let limits = Limits::default();
    assert_eq!(reward("code", spec, completion, &limits, BONUS), Some(1.5));
    let wrong = completion.replace("a + b", "a - b");
    assert_eq!(reward("code", spec, &wrong, &limits, BONUS), Some(0.0));
}

#[test]
fn a_wrong_program_scores_its_fraction() {
    if !have_python() {
        return;
    }
    // a * b agrees with a + b on (0, 0) and (2, 2) only.
    let (outcome, _) = timed("def add(a, b):\n    return a * b\n");
    assert_eq!((outcome.passed, outcome.status), (2, Status::Ok));
    assert_eq!(score(&outcome, BONUS), Some(0.5));
    // Printing fake result lines earns nothing.
    let (forged, _) =
        timed("print('0 pass\\n1 pass\\n2 pass\\n3 pass')\ndef add(a, b):\n    return 7\n");
    assert_eq!(forged.passed, 0);
}

#[test]
fn an_infinite_loop_scores_zero_within_the_timeout() {
    if !have_python() {
        return;
    }
    let (outcome, took) = timed("def add(a, b):\n    while True:\n        pass\n");
    assert_eq!(outcome.status, Status::Timeout);
    assert_eq!(score(&outcome, BONUS), Some(0.0));
    assert!(took >= Limits::default().timeout, "{took:?}");
}

#[test]
fn a_crashing_program_fails_the_tests_it_crashes_in() {
    if !have_python() {
        return;
    }
    let (outcome, _) = timed("def add(a, b):\n    return a + b if a > 0 else 1 // 0\n");
    assert_eq!((outcome.passed, outcome.status), (2, Status::Crash));
    let (dead, _) = timed("import os\nos._exit(3)\n");
    assert_eq!((dead.passed, dead.status), (0, Status::Crash));
    let (syntax, _) = timed("def add(a, b) return a + b\n");
    assert_eq!(score(&syntax, BONUS), Some(0.0));
}

#[test]
fn a_memory_hungry_program_scores_zero_and_we_survive() {
    if !have_python() {
        return;
    }
    let (outcome, _) = timed("big = bytearray(2 << 30)\ndef add(a, b):\n    return a + b\n");
    assert_eq!((outcome.passed, outcome.status), (0, Status::MemoryLimit));
    // Growing slowly instead of at once ends the same way.
    let (grown, _) = timed("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n");
    assert_eq!(score(&grown, BONUS), Some(0.0));
}

#[test]
fn an_output_flood_scores_zero_within_the_timeout() {
    if !have_python() {
        return;
    }
    let (outcome, _) = timed("while True:\n    print('x' * 1000)\n");
    assert_eq!(outcome.status, Status::OutputLimit);
    assert_eq!(score(&outcome, BONUS), Some(0.0));
    let (errors, _) = timed("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n");
    assert_eq!(score(&errors, BONUS), Some(0.0));
}

#[test]
fn a_fork_bomb_scores_zero_and_leaves_no_process() {
    if !have_python() {
        return;
    }
    let bomb = "import os\nwhile True:\n    os.fork()\n";
    let (outcome, _) = timed(bomb);
    assert_eq!(score(&outcome, BONUS), Some(0.0));
    // Straight through the sandbox, to see the process group.
    let python = python().unwrap();
    let dir = Scratch::new().unwrap();
    let limits = Limits::default();
    let iso = sandbox::isolation(python);
    let run = sandbox::run(python, &["-c", bomb], dir.path(), b"", &limits, iso).unwrap();
    assert_ne!(run.exit, Exit::Code(0));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!sandbox::group_alive(run.pid), "group {} survives", run.pid);
    // Threads are not processes: they still work.
    let threads =
        "import threading\nt = threading.Thread(target=print, args=('t',))\nt.start()\nt.join()\n";
    let run = sandbox::run(python, &["-c", threads], dir.path(), b"", &limits, iso).unwrap();
    assert_eq!(
        (run.exit, run.stdout.as_slice()),
        (Exit::Code(0), &b"t\n"[..])
    );
}

#[test]
fn a_program_cannot_signal_processes_outside_its_run() {
    if !have_python() {
        return;
    }
    let python = python().unwrap();
    let iso = sandbox::isolation(python);
    if !iso.no_fork {
        eprintln!("SKIPPED: this kernel refused the seccomp filter, so signals are not confined");
        return;
    }
    // Signal 0 only asks whether the stage could be signalled: harmless if it could.
    let probe = "import os, resource\ntry:\n    os.kill(os.getppid(), 0)\n    print('reached')\nexcept PermissionError:\n    print('refused')\ntry:\n    os.kill(0, 0)\n    print('own group')\nexcept PermissionError:\n    print('own group refused')\ntry:\n    os.setpgid(0, os.getpgid(os.getppid()))\n    print('joined')\nexcept PermissionError:\n    print('join refused')\ntry:\n    resource.prlimit(os.getppid(), resource.RLIMIT_CPU)\n    print('prlimit reached')\nexcept PermissionError:\n    print('prlimit refused')\nresource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\nprint('own limits')\n";
    let dir = Scratch::new().unwrap();
    let run = sandbox::run(
        python,
        &["-c", probe],
        dir.path(),
        b"",
        &Limits::default(),
        iso,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "refused\nown group\njoin refused\nprlimit refused\nown limits\n",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn no_network_inside_the_sandbox() {
    if !have_python() {
        return;
    }
    let python = python().unwrap();
    let iso = sandbox::isolation(python);
    if !iso.net {
        eprintln!("skipped: no network namespace on this machine");
        return;
    }
    let dir = Scratch::new().unwrap();
    let connect = "import socket\ns = socket.socket()\ns.settimeout(1)\ntry:\n    s.connect(('1.1.1.1', 53))\n    print('connected')\nexcept OSError as e:\n    print('refused', e)\n";
    let run = sandbox::run(
        python,
        &["-c", connect],
        dir.path(),
        b"",
        &Limits::default(),
        iso,
    )
    .unwrap();
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(said.starts_with("refused"), "{said}");
}

/// Writes inside the scratch directory work and vanish with it; with the mount namespace,
/// writes elsewhere fail or land in a private tmpfs that vanishes with the run.
#[test]
fn writes_stay_inside_the_scratch_directory() {
    if !have_python() {
        return;
    }
    let python = python().unwrap();
    let iso = sandbox::isolation(python);
    let escape = std::env::temp_dir().join(format!("dagrun-escape-{}", std::process::id()));
    let beside = std::env::current_dir().unwrap().join("dagrun-escape-probe");
    let dir = Scratch::new().unwrap();
    let path = dir.path().to_path_buf();
    let program = format!(
        "import os\nopen('inside.txt', 'w').write('x')\nopen(os.environ['TMPDIR'] + '/t', 'w').write('x')\nfor p in [{:?}, {:?}]:\n    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n    except OSError as e:\n        print('refused', p, e.strerror)\n",
        escape.display().to_string(),
        beside.display().to_string(),
    );
    let run = sandbox::run(
        python,
        &["-c", &program],
        &path,
        b"",
        &Limits::default(),
        iso,
    )
    .unwrap();
    let said = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        run.exit,
        Exit::Code(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(path.join("inside.txt").exists() && path.join("t").exists());
    drop(dir);
    assert!(!path.exists());
    if iso.fs {
        assert!(!escape.exists(), "{said}");
        assert!(!beside.exists(), "{said}");
        assert!(said.contains("refused"), "{said}");
    } else {
        eprintln!("no mount namespace here, outside writes are not prevented:\n{said}");
        let _ = std::fs::remove_file(&escape);
        let _ = std::fs::remove_file(&beside);
    }
}

#[test]
fn io_pairs_run_the_program_per_input() {
    if !have_python() {
        return;
    }
    let spec =
        CodeTests::parse(r#"{"io": [["1 2\n", "3\n"], ["5 5\n", "10"], ["2 2\n", "5"]]}"#).unwrap();
    let code = "a, b = map(int, input().split())\nprint(a + b)\n";
    let outcome = run_tests(code, &spec, &Limits::default());
    assert_eq!(
        (outcome.passed, outcome.total, outcome.status),
        (2, 3, Status::Ok)
    );
    let crash = run_tests("raise SystemExit(1)", &spec, &Limits::default());
    assert_eq!((crash.passed, crash.status), (0, Status::Crash));
    let hang = run_tests("while True: pass", &spec, &Limits::default());
    assert_eq!((hang.passed, hang.status), (0, Status::Timeout));
}

#[test]
fn parallel_runs_use_the_cores() {
    if !have_python() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tests = asserts(&["assert True"]);
    // Distinct programs: identical ones would come from the memo after the first.
    let codes: Vec<String> = (0..9)
        .map(|i| format!("import time\ntime.sleep(0.5)\nrun = {i}\n"))
        .collect();
    let jobs: Vec<(&str, &CodeTests)> = codes[1..].iter().map(|c| (c.as_str(), &tests)).collect();
    let first = [(codes[0].as_str(), &tests)];
    sandbox::isolation(python().unwrap()); // probe outside the timing
    let start = Instant::now();
    let one = run_many(&first, &Limits::default());
    let single = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let outcomes = run_many(&jobs, &Limits::default());
    let took = start.elapsed().as_secs_f64();
    assert!(one.iter().chain(&outcomes).all(all_passed), "{outcomes:?}");
    // 8 runs on `cores` workers take ceil(8 / cores) rounds of one run, not 8 (with a margin
    // for a machine shared with other work).
    let rounds = 8usize.div_ceil(cores) as f64;
    eprintln!("8 runs on {cores} cores: {took:.2} s; one run: {single:.2} s");
    assert!(took < (rounds + 1.0) * single + 0.5, "{took} vs {single}");
    if cores > 1 {
        assert!(took < 0.75 * 8.0 * single, "{took} vs {single}");
    }
}
