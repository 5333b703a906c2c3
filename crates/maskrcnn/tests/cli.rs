//! The command line: exit codes, one-line errors, `config` round trip, `env`.

mod common;

use common::maskrcnn_bin;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(maskrcnn_bin()).args(args).output().expect("maskrcnn runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command exits non-zero with exactly one line on stderr.
fn assert_one_line_failure(o: &Output, needle: &str) {
    assert!(!o.status.success(), "should fail: {o:?}");
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err:?}");
    assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn config_prints_toml_that_round_trips() {
    let o = run(&["config", "--set", "model.num_classes=7", "--set", "input.min_size=[320, 352]"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("num_classes = 7"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, &text).unwrap();
    let o2 = run(&["config", "--config", path.to_str().unwrap()]);
    assert!(o2.status.success(), "{}", stderr(&o2));
    assert_eq!(String::from_utf8(o2.stdout).unwrap(), text);
}

#[test]
fn bad_config_input_fails_with_one_line() {
    assert_one_line_failure(&run(&["config", "--set", "solver.base_lrr=1"]), "did you mean `solver.base_lr`");
    assert_one_line_failure(&run(&["config", "--set", "solver.base_lr=-1"]), "`solver.base_lr`: must be > 0");
    assert_one_line_failure(&run(&["config", "--set", "nokey"]), "expected section.key=value");
    assert_one_line_failure(&run(&["config", "--config", "/nonexistent.toml"]), "/nonexistent.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[model\nnum_classes = 3\n").unwrap();
    assert_one_line_failure(&run(&["config", "--config", path.to_str().unwrap()]), "bad.toml");
    let o = run(&["config", "--set", "input.min_size=2000"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn malformed_command_lines_exit_2_with_one_line() {
    let o = run(&["no-such-command"]);
    assert_eq!(o.status.code(), Some(2));
    assert_one_line_failure(&o, "no-such-command");
    let o = run(&["config", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert_one_line_failure(&o, "--bogus");
}

#[test]
fn help_and_version_succeed() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("config"));
    assert!(run(&["--version"]).status.success());
}

#[test]
fn env_reports_versions_and_cuda_state() {
    let o = run(&["env"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("tch               0.24.0"), "{text}");
    assert!(text.contains("libtorch          2.11.0"), "{text}");
    let cuda = tch::Cuda::is_available();
    assert!(text.contains(&format!("CUDA available    {cuda}")), "{text}");
    if cuda {
        // GPU machine: the device is listed with its name.
        assert!(text.contains("cuda:0"), "{text}");
        assert!(!text.contains("cuDNN             n/a"), "{text}");
    } else {
        eprintln!("skipped the device checks of env: no CUDA device");
    }
}

/// An absurd loader thread count is refused with the key named, never an
/// abort on a refused thread (was: "failed to spawn thread", exit 134).
#[test]
fn absurd_worker_counts_are_refused_with_the_key_named() {
    let o = run(&["config", "--set", "dataloader.workers=100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert_one_line_failure(&o, "`dataloader.workers`: must be <= 1024");
    let o = run(&["train", "--device", "cpu", "--set", "dataloader.workers=100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert_one_line_failure(&o, "dataloader.workers");
    let o = run(&["bench", "data", "--device", "cpu", "--workers", "100000", "--iters", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert_one_line_failure(&o, "--workers must be in 1..=1024");
}

/// Small input faults name what is wrong on one line: a missing argument by
/// name, a directory given for a weights file, an absurd synthetic image
/// size.
#[test]
fn small_input_faults_are_named() {
    let o = run(&["predict", "--weights", "w.safetensors"]);
    assert_eq!(o.status.code(), Some(2));
    assert_one_line_failure(&o, "not provided: <IMAGE|DIR>...");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_one_line_failure(&run(&["predict", "--device", "cpu", "--weights", d, "x.jpg"]), "is a directory");
    let o = run(&["synth", "--out", d, "--size", "100000,100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert_one_line_failure(&o, "32 <= MIN <= MAX <= 8192");
    // A parser quoting a huge line back is cut to a few hundred characters.
    let toml = dir.path().join("long.toml");
    std::fs::write(&toml, format!("[model]\nnum_classes = {}x\n", "9".repeat(200_000))).unwrap();
    let o = run(&["config", "--config", toml.to_str().unwrap()]);
    assert_one_line_failure(&o, "long.toml");
    assert!(stderr(&o).len() < 1000, "{} bytes of error", stderr(&o).len());
}
