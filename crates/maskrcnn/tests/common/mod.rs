//! Shared helpers of the integration tests: running the torchvision /
//! pycocotools oracle scripts of `tests/reference/` and reading their outputs.
#![allow(dead_code)]

pub mod replay;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor};

/// The Python that has torch, torchvision and pycocotools: `$MASKRCNN_PYTHON`,
/// else the workspace's `.venv`.
pub fn python() -> String {
    std::env::var("MASKRCNN_PYTHON").unwrap_or_else(|_| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
        venv.to_string_lossy().into_owned()
    })
}

pub fn reference_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(name)
}

/// Folder for oracle outputs, shared by the tests of one build.
pub fn fixture_dir() -> PathBuf {
    let dir = std::env::var("MASKRCNN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures"));
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    dir
}

/// Runs `script args...` with the oracle Python unless `output` was made by
/// the same run: its key (the oracle scripts' contents, `script`, `args`
/// and the oracle packages' versions) is kept beside it in `output.key`.
/// Panics with the script's stderr on failure.
pub fn run_reference(script: &str, args: &[&str], output: &Path) {
    // Tests of one binary run in parallel; one of them generates a fixture
    // while the others wait for it.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let key = oracle_key(script, args);
    let key_path = PathBuf::from(format!("{}.key", output.display()));
    if output.exists() && std::fs::read_to_string(&key_path).is_ok_and(|k| k == key) {
        return;
    }
    let started = std::time::Instant::now();
    let out = Command::new(python())
        .arg(reference_script(script))
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {script}: {e}", python()));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{script}: {:.1} s", started.elapsed().as_secs_f64());
    assert!(output.exists(), "{script} did not write {}", output.display());
    std::fs::write(&key_path, key).unwrap_or_else(|e| panic!("write {}: {e}", key_path.display()));
}

/// What an oracle output depends on, as text: a hash of every script in
/// `tests/reference/` (they import each other), the script and its
/// arguments, and torch's, torchvision's and pycocotools' versions.
fn oracle_key(script: &str, args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|entries| entries.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    // Each part's length after it: ("ab", "c") and ("a", "bc") differ.
    let hash = files.iter().fold(maskrcnn::random::Fnv1a::default(), |h, f| {
        let name = f.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
        let text = std::fs::read(f).unwrap_or_default();
        h.write(&name).write(&name.len().to_le_bytes()).write(&text).write(&text.len().to_le_bytes())
    });
    format!("scripts {:016x}\n{script} {args:?}\n{}\n", hash.finish(), oracle_versions())
}

/// The oracle packages' versions (read once per test process, without
/// importing torch).
fn oracle_versions() -> &'static str {
    static VERSIONS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSIONS.get_or_init(|| {
        let code =
            "import importlib.metadata as m; print(*(m.version(p) for p in ('torch', 'torchvision', 'pycocotools')))";
        Command::new(python())
            .args(["-c", code])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "versions unknown".into())
    })
}

/// All tensors of a safetensors file, on `device`.
pub fn load(path: &Path, device: Device) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device)))
        .collect()
}

/// The CUDA device when present; `None` after printing why a GPU test skips.
pub fn cuda_or_skip(test: &str) -> Option<Device> {
    maskrcnn::environment::cuda_for_test(test)
}

/// max |a - b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(tch::Kind::Double).to_device(Device::Cpu) - b.to_kind(tch::Kind::Double).to_device(Device::Cpu))
        .abs()
        .max()
        .double_value(&[])
}

pub fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    let t = t.to_kind(tch::Kind::Int64).to_device(Device::Cpu).contiguous();
    let mut v = vec![0i64; t.numel()];
    t.copy_data(&mut v, t.numel());
    v
}

#[allow(dead_code)]
pub fn to_vec_f64(t: &Tensor) -> Vec<f64> {
    let t = t.to_kind(tch::Kind::Double).to_device(Device::Cpu).contiguous();
    let mut v = vec![0f64; t.numel()];
    t.copy_data(&mut v, t.numel());
    v
}

/// `--set`s of a small, fast model for CPU training runs: R18-FPN (32
/// channels, frozen BatchNorm), small heads, 96-128 px images.
pub fn small_model_sets() -> Vec<String> {
    [
        "model.backbone_depth=18",
        "model.fpn_channels=32",
        "model.norm=\"frozen_bn\"",
        "roi_heads.representation_size=64",
        "roi_heads.mask_head_channels=16",
        "input.min_size=[96]",
        "input.max_size=128",
    ]
    .map(String::from)
    .to_vec()
}

/// The `maskrcnn` binary: `MASKRCNN_BIN` where the tests run away from the
/// build tree (the GPU machine), else the one cargo built.
#[allow(dead_code)]
pub fn maskrcnn_bin() -> String {
    std::env::var("MASKRCNN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_maskrcnn").to_string())
}

/// Fine-tuning from the whole model in `file`: every variable of `vs` equals
/// the file's tensor of that name, except the six class-dependent predictor
/// tensors, which have `classes` rows (`4 × classes` for `bbox_pred`).
#[allow(dead_code)]
pub fn assert_all_but_predictors_copied(vs: &tch::nn::VarStore, file: &Path, classes: i64) {
    let stored: HashMap<String, Tensor> = Tensor::read_safetensors(file).unwrap().into_iter().collect();
    let vars = vs.variables();
    let mut copied = 0;
    for (name, t) in &vars {
        if name.contains("box_predictor") || name.contains("mask_fcn_logits") {
            let rows = if name.contains("bbox_pred") { 4 * classes } else { classes };
            assert_eq!(t.size()[0], rows, "{name}");
        } else {
            assert!(t.equal(&stored[name]), "{name} not copied");
            copied += 1;
        }
    }
    assert_eq!(copied, vars.len() - 6);
}
