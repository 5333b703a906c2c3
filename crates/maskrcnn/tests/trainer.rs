//! The training engine: LR schedule, gradient accumulation, fp16 loss
//! scaling, fused SGD against torch.optim.SGD's rule, checkpoints (atomic,
//! resumable to the same result), and the errors that must come before any
//! training starts.

mod common;

use common::maskrcnn_bin;

use maskrcnn::config::AutoCount;
use maskrcnn::config::{AmpMode, Config, SolverConfig, WarmupMethod};
use maskrcnn::engine::amp::GradScaler;
use maskrcnn::engine::checkpoint::{self, TrainState};
use maskrcnn::engine::lr_schedule::LrSchedule;
use maskrcnn::engine::optimizer::Sgd;
use maskrcnn::engine::trainer::{apply_update, forward_backward, train, MicroBatch, TrainOptions};
use maskrcnn::evaluation::dataset_inference::infer_dataset;
use maskrcnn::ops::FirstSampler;
use maskrcnn::prediction::{predict_files, PredictOptions};
use maskrcnn::structures::{Categories, Category, InstanceMasks, Target};
use maskrcnn::MaskRcnn;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn solver(method: WarmupMethod, factor: f64, iters: usize, steps: Vec<usize>) -> SolverConfig {
    let mut s = Config::default().solver;
    (s.base_lr, s.warmup_method, s.warmup_factor, s.warmup_iters, s.steps, s.gamma) =
        (0.02, method, factor, iters, steps, 0.1);
    s
}

#[test]
fn lr_schedule_at_chosen_iterations() {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-12);
    // The seed's recipe: linear warmup from 1/3 over 500 iterations, ×0.1 at 60k and 80k.
    let linear = LrSchedule::new(&solver(WarmupMethod::Linear, 1.0 / 3.0, 500, vec![60_000, 80_000]));
    for (i, want) in [
        (0, 0.02 / 3.0),
        (250, 0.02 * (1.0 / 3.0 * 0.5 + 0.5)),
        (499, 0.02 * (1.0 / 3.0 * (1.0 - 499.0 / 500.0) + 499.0 / 500.0)),
        (500, 0.02),
        (59_999, 0.02),
        (60_000, 0.002),
        (79_999, 0.002),
        (80_000, 0.0002),
        (89_999, 0.0002),
    ] {
        assert!(close(linear.lr_at(i), want), "linear @ {i}: {} vs {want}", linear.lr_at(i));
    }
    let constant = LrSchedule::new(&solver(WarmupMethod::Constant, 0.001, 1000, vec![10, 2000]));
    // A step inside the warmup applies on top of the warmup factor.
    for (i, want) in [(0, 2e-5), (9, 2e-5), (10, 2e-6), (999, 2e-6), (1000, 0.002), (2000, 0.0002)] {
        assert!(close(constant.lr_at(i), want), "constant @ {i}: {} vs {want}", constant.lr_at(i));
    }
    let none = LrSchedule::new(&solver(WarmupMethod::Linear, 0.5, 0, vec![]));
    assert!(close(none.lr_at(0), 0.02) && close(none.lr_at(1_000_000), 0.02));
}

fn small_config(extra: &[&str]) -> Config {
    let mut sets = common::small_model_sets();
    sets.extend(
        ["model.num_classes=3", "rpn.post_nms_top_n_train=200", "roi_heads.batch_size_per_image=64"].map(String::from),
    );
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).unwrap()
}

fn image_and_target() -> (Tensor, Target) {
    let img = Tensor::full([3, 96, 128], 0.2, (Kind::Float, Device::Cpu));
    let _ = img.narrow(1, 20, 40).narrow(2, 30, 50).fill_(0.9);
    let _ = img.narrow(1, 50, 30).narrow(2, 80, 30).fill_(0.6);
    let target = Target {
        boxes: Tensor::from_slice(&[30f32, 20., 80., 60., 80., 50., 110., 80.]).reshape([2, 4]),
        labels: Tensor::from_slice(&[1i64, 2]),
        masks: InstanceMasks::Polygons(vec![
            vec![vec![30., 20., 80., 20., 80., 60., 30., 60.]],
            vec![vec![80., 50., 110., 50., 110., 80., 80., 80.]],
        ]),
        iscrowd: None,
        has_mask: None,
    };
    (img, target)
}

fn weights(model: &MaskRcnn) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let d = (x - y).abs().max().double_value(&[]);
        let scale = y.abs().max().double_value(&[]).max(1e-6);
        if d / scale > worst.0 {
            worst = (d / scale, name.clone());
        }
    }
    worst
}

fn fresh_model(config: &Config) -> MaskRcnn {
    tch::manual_seed(17);
    MaskRcnn::new(config, Device::Cpu).unwrap()
}

/// libtorch's random generator is global to the process: tests that draw
/// from it (model init, sampling) run one at a time.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn accumulation_equals_one_larger_batch() {
    let _rng = rng_lock();
    let config = small_config(&[]);
    let (img, target) = image_and_target();
    let images: Vec<Tensor> = (0..4).map(|_| img.shallow_clone()).collect();
    let targets: Vec<Target> = (0..4).map(|_| target.to_device(Device::Cpu)).collect();
    let run = |chunks: usize| {
        let model = fresh_model(&config);
        let mut sgd = Sgd::new(&model.vs, 0.9, 1e-4, 2.0, 0.0);
        for _ in 0..2 {
            let per = 4 / chunks;
            for c in 0..chunks {
                let mb = MicroBatch {
                    images: &images[c * per..(c + 1) * per],
                    targets: &targets[c * per..(c + 1) * per],
                    resize: Default::default(),
                };
                let _ = forward_backward(&model, mb, chunks, None, AmpMode::Off, &mut FirstSampler, None).unwrap();
            }
            apply_update(&mut sgd, None, 0.01, 0.0).unwrap();
        }
        weights(&model)
    };
    let one = run(1);
    let four = run(4);
    let two = run(2);
    let before = weights(&fresh_model(&config));
    let (moved, _) = max_rel_diff(&one, &before);
    assert!(moved > 1e-4, "the steps changed nothing ({moved})");
    for (k, w) in [(2, &two), (4, &four)] {
        let (d, name) = max_rel_diff(w, &one);
        eprintln!("accumulate {k} vs batch 4: worst relative weight difference {d:.2e} ({name})");
        assert!(d < 1e-4, "accumulate_steps={k}: {name} differs by {d:.2e} (relative)");
    }
}

/// Two steps of torch.optim.SGD (dampening 0) written out: buf1 = g1 + wd·p0;
/// p1 = p0 − lr·buf1; buf2 = m·buf1 + g2 + wd·p1; p2 = p1 − lr·buf2 (without
/// momentum buf = g + wd·p), against the fused update on `device`.
fn check_fused_sgd(momentum: f64, device: Device) {
    let vs = tch::nn::VarStore::new(device);
    let root = vs.root();
    let w = (&root / "layer").var("weight", &[3], tch::nn::Init::Const(1.0));
    let b = (&root / "layer").var("bias", &[3], tch::nn::Init::Const(0.5));
    let mut sgd = Sgd::new(&vs, momentum, 0.1, 2.0, 0.0);
    let (lr, wd) = (0.5, 0.1);
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(device);
    let mut p = [1.0f64; 3];
    let mut pb = [0.5f64; 3];
    let (mut buf, mut bufb) = ([0.0f64; 3], [0.0f64; 3]);
    for step in 0..2 {
        let loss = ((&w * &x).sum(Kind::Float) + b.sum(Kind::Float) * 2.0).square();
        let inner: f64 = (0..3).map(|i| p[i] * (i + 1) as f64).sum::<f64>() + 2.0 * pb.iter().sum::<f64>();
        loss.backward();
        sgd.set_lr(lr);
        sgd.step(None).unwrap();
        sgd.zero_grad().unwrap();
        for i in 0..3 {
            let g = 2.0 * inner * (i + 1) as f64;
            let gb = 2.0 * inner * 2.0;
            let d = g + wd * p[i];
            buf[i] = if step == 0 { d } else { momentum * buf[i] + d };
            p[i] -= lr * buf[i];
            bufb[i] = if step == 0 { gb } else { momentum * bufb[i] + gb }; // biases: no decay here
            pb[i] -= lr * 2.0 * bufb[i]; // bias_lr_factor 2
        }
    }
    let got: Vec<f32> = Vec::try_from(&w.to_device(Device::Cpu)).unwrap();
    let gotb: Vec<f32> = Vec::try_from(&b.to_device(Device::Cpu)).unwrap();
    for i in 0..3 {
        let close = |a: f32, e: f64| (f64::from(a) - e).abs() <= 1e-4 * e.abs().max(1.0);
        assert!(close(got[i], p[i]), "momentum {momentum}, weight {i}: {} vs {}", got[i], p[i]);
        assert!(close(gotb[i], pb[i]), "momentum {momentum}, bias {i}: {} vs {}", gotb[i], pb[i]);
    }
}

#[test]
fn fused_sgd_follows_torch_sgd_rule() {
    check_fused_sgd(0.9, Device::Cpu);
    check_fused_sgd(0.0, Device::Cpu);
}

#[test]
fn gpu_fused_sgd_follows_torch_sgd_rule() {
    // libtorch's CUDA kernel takes no momentum buffers when momentum is 0.
    let Some(device) = common::cuda_or_skip("gpu_fused_sgd_follows_torch_sgd_rule") else { return };
    check_fused_sgd(0.9, device);
    check_fused_sgd(0.0, device);
}

#[test]
fn loss_scaler_skips_non_finite_steps_and_adapts() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let w = vs.root().var("w", &[4], tch::nn::Init::Const(1.0));
    let mut sgd = Sgd::new(&vs, 0.9, 0.0, 1.0, 0.0);
    let mut scaler = GradScaler::new(8192.0, 2, Device::Cpu);
    let step = |sgd: &mut Sgd, scaler: &mut GradScaler, poison: bool| {
        let loss = scaler.scale_loss(&(&w * Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])).sum(Kind::Float));
        loss.backward();
        if poison {
            let _ = w.grad().narrow(0, 1, 1).fill_(f64::INFINITY);
        }
        apply_update(sgd, Some(scaler), 0.1, 0.0).unwrap();
    };
    let before: Vec<f32> = Vec::try_from(&w).unwrap();
    step(&mut sgd, &mut scaler, true);
    let after: Vec<f32> = Vec::try_from(&w).unwrap();
    assert_eq!(before, after, "a step with inf gradients must not change the weights");
    let s = scaler.state();
    assert_eq!((s.scale, s.skipped, s.growth_tracker), (4096.0, 1.0, 0));
    step(&mut sgd, &mut scaler, false);
    let after: Vec<f32> = Vec::try_from(&w).unwrap();
    // Unscaled gradient [1, 2, 3, 4], lr 0.1, first momentum step.
    let want = [0.9f32, 0.8, 0.7, 0.6];
    for i in 0..4 {
        assert!((after[i] - want[i]).abs() < 1e-6, "{after:?} vs {want:?}");
    }
    assert_eq!(scaler.state().scale, 4096.0);
    step(&mut sgd, &mut scaler, false);
    let s = scaler.state();
    assert_eq!((s.scale, s.skipped), (8192.0, 1.0), "two clean steps (growth interval 2) double the scale");
}

fn synth_data(dir: &Path) -> maskrcnn::data::synth::SynthOutput {
    maskrcnn::data::synth::generate(&maskrcnn::data::synth::SynthOptions {
        out: dir.to_path_buf(),
        train: 12,
        val: 3,
        seed: 1,
        size: (96, 128),
        annotations_only: false,
        profile: Default::default(),
    })
    .unwrap()
}

fn train_config(data: &maskrcnn::data::synth::SynthOutput, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!("data.train_ann='{}'", data.train_ann.display()),
        format!("data.train_images='{}'", data.train_images.display()),
        "model.num_classes=7".to_string(),
        "solver.ims_per_batch=2".into(),
        "solver.base_lr=0.01".into(),
        "solver.reference_batch=2".into(),
        "solver.warmup_iters=2".into(),
        "solver.steps=[4]".into(),
        "solver.log_period=1".into(),
        "dataloader.workers=2".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
    small_config(&refs)
}

fn options(output: &Path, resume: bool) -> TrainOptions {
    TrainOptions {
        output: output.to_path_buf(),
        resume,
        overwrite: false,
        device: Device::Cpu,
        stop: Arc::new(AtomicBool::new(false)),
        progress: false,
        strict: false,
        profile_iteration: None,
    }
}

/// The step records (rows with a loss) of the JSON-lines log at `path`
/// (`metrics.jsonl`, or a rank's `ranks/rank<R>.jsonl`).
fn logged_steps(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect()
}

fn losses_by_iteration(output: &Path) -> Vec<(u64, f64)> {
    logged_steps(&output.join("metrics.jsonl"))
        .iter()
        .filter_map(|v| Some((v["iteration"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

#[test]
fn resume_continues_exactly_and_checkpoints_are_atomic() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let mut full = train_config(&data, &[]);
    full.solver.max_iter = 6;
    full.solver.checkpoint_period = 3;
    let a = tmp.path().join("a");
    let sa = train(&full, &options(&a, false)).unwrap();
    assert_eq!(sa.iterations, 6);
    assert_eq!(checkpoint::list(&a).iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6]);

    let b = tmp.path().join("b");
    let mut first = full.clone();
    first.solver.max_iter = 3;
    train(&first, &options(&b, false)).unwrap();
    let sb = train(&full, &options(&b, true)).unwrap();
    assert_eq!((sb.start_iteration, sb.iterations), (3, 6));
    let read = |p: &Path| {
        let mut v = Tensor::read_safetensors(p).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let wa = read(&a.join("model_final.safetensors"));
    let wb = read(&b.join("model_final.safetensors"));
    let (d, name) = max_rel_diff(&wb, &wa);
    assert!(d == 0.0, "resumed weights differ from the uninterrupted run: {name} by {d:.2e}");
    assert_eq!(losses_by_iteration(&a), losses_by_iteration(&b), "loss curves differ");
    // Each logged row says how long steps waited for data; no all-reduce on one process.
    let rows = logged_steps(&a.join("metrics.jsonl"));
    assert!(rows.len() >= 6 && rows.iter().all(|r| r["data_wait_ms"].as_f64().is_some_and(|ms| ms >= 0.0)));
    assert!(rows.iter().all(|r| r.get("allreduce_ms").is_none()));
    // And how often the host waited for the device, in steps and between
    // them (none on the CPU: the counts are of device waits).
    for key in ["syncs_per_step", "host_waits_per_step", "syncs_between_steps"] {
        assert!(rows.iter().all(|r| r[key].as_f64() == Some(0.0)), "{key} in {rows:?}");
    }
    let la = checkpoint::load(&checkpoint::list(&a)[1].1).unwrap();
    assert_eq!(la.state.iteration, 6);
    let events: Vec<_> = std::fs::read_dir(a.join("tensorboard")).unwrap().flatten().collect();
    assert_eq!(events.len(), 1, "one TensorBoard event file");
    assert!(tf_records(&std::fs::read(events[0].path()).unwrap()).len() > 6, "scalars per logged iteration");
    assert!(!la.optimizer.is_empty(), "momentum buffers are saved");

    // A full disk while writing the next checkpoint: the error is reported,
    // the previous checkpoints stay complete and loadable.
    let state = TrainState { iteration: 9, scaler: None, images_seen: 0 };
    let tmpdir = checkpoint::checkpoints_dir(&a).join(".tmp-iter_0000009");
    std::fs::create_dir_all(&tmpdir).unwrap();
    std::os::unix::fs::symlink("/dev/full", tmpdir.join("model.safetensors")).unwrap();
    let model = weights(&fresh_model(&full));
    let err = checkpoint::save(&a, &state, &model, None, &[], "x", 1).unwrap_err().to_string();
    assert!(err.contains("iter_0000009"), "{err}");
    assert_eq!(checkpoint::list(&a).iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6]);
    assert!(!tmpdir.exists(), "the partial checkpoint is removed");
    let w6 = read(&checkpoint::list(&a)[1].1.join("model.safetensors"));
    assert_eq!(max_rel_diff(&w6, &wa).0, 0.0);
    // predict/eval load the checkpoint's weights as they are.
    let cfg = full.clone();
    MaskRcnn::from_weights(&cfg, &checkpoint::list(&a)[1].1.join("model.safetensors"), Device::Cpu).unwrap();
    // Resuming with another model shape is refused before training.
    let mut other = full.clone();
    other.model.fpn_channels = 48;
    let e = train(&other, &options(&a, true)).unwrap_err().to_string();
    assert!(e.contains("another model") && e.contains("fpn_channels"), "{e}");

    // A damaged newest checkpoint (model file cut short): --resume falls
    // back to the older intact one, retrains 3..6 to the same weights, and
    // the log drops the rows past iteration 3 before logging them again
    // (no iteration appears twice).
    let newest = checkpoint::list(&a)[1].1.join("model.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let logged = losses_by_iteration(&a);
    let sr = train(&full, &options(&a, true)).unwrap();
    assert_eq!((sr.start_iteration, sr.iterations), (3, 6));
    let (d, name) = max_rel_diff(&read(&a.join("model_final.safetensors")), &wa);
    assert!(d == 0.0, "weights after the fallback differ: {name} by {d:.2e}");
    assert_eq!(losses_by_iteration(&a), logged, "metrics.jsonl after the resume");

    // A folder holding a run: a new run without --resume is refused (it
    // used to overwrite model_final and leave the old checkpoints), and so
    // is any run while another holds the folder's lock; --overwrite
    // replaces the old run's files.
    let e = train(&full, &options(&a, false)).unwrap_err().to_string();
    assert!(e.contains("holds a previous run") && e.contains("--overwrite"), "{e}");
    let held = std::fs::File::open(a.join(".lock")).unwrap();
    // SAFETY: locks a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let e = train(&full, &options(&a, true)).unwrap_err().to_string();
    assert!(e.contains("in use by another training run"), "{e}");
    drop(held);
    let mut short = full.clone();
    short.solver.max_iter = 3;
    let replace = TrainOptions { overwrite: true, ..options(&a, false) };
    train(&short, &replace).unwrap();
    assert_eq!(checkpoint::list(&a).iter().map(|c| c.0).collect::<Vec<_>>(), vec![3], "old checkpoints removed");
    assert_eq!(losses_by_iteration(&a).len(), 3, "old log removed");
}

#[test]
fn setup_errors_come_before_training() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let mut c = train_config(&data, &[]);
    c.solver.max_iter = 1;
    c.data.train_ann = tmp.path().join("missing.json").display().to_string();
    let e = train(&c, &options(&tmp.path().join("o1"), false)).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
    let mut c = train_config(&data, &[]);
    c.data.train_images = tmp.path().join("no-such-folder").display().to_string();
    let e = train(&c, &options(&tmp.path().join("o1"), false)).unwrap_err().to_string();
    assert!(e.contains("data.train_images") && e.contains("no-such-folder"), "{e}");
    let mut c = train_config(&data, &[]);
    c.data.val_ann = data.val_ann.display().to_string();
    let e = train(&c, &options(&tmp.path().join("o1"), false)).unwrap_err().to_string();
    assert!(e.contains("both data.val_ann and data.val_images"), "{e}");
    // A folder holding none of the set's images stops before training,
    // saying so (it looped forever once, then stopped after an epoch).
    let empty = tmp.path().join("empty-folder");
    std::fs::create_dir_all(&empty).unwrap();
    let mut c = train_config(&data, &[]);
    (c.data.train_images, c.solver.max_iter) = (empty.display().to_string(), 3);
    let e = train(&c, &options(&tmp.path().join("o1"), false)).unwrap_err().to_string();
    assert!(e.contains("none of the") && e.contains("training images is in") && e.contains("empty-folder"), "{e}");
    let mut c = train_config(&data, &[]);
    c.model.num_classes = AutoCount::Fixed(91);
    let e = train(&c, &options(&tmp.path().join("o2"), false)).unwrap_err().to_string();
    assert!(e.contains("model.num_classes = 7"), "{e}");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let c = train_config(&data, &[]);
    let e = train(&c, &options(&file.join("out"), false)).unwrap_err().to_string();
    assert!(e.contains("output directory"), "{e}");
    let e = train(&c, &options(&file, false)).unwrap_err().to_string();
    assert!(e.contains("is a file, not a directory"), "{e}");
    // Divergence in fp32 names the iteration and the loss.
    let mut c = train_config(&data, &[]);
    (c.solver.base_lr, c.solver.warmup_iters, c.solver.max_iter, c.solver.steps) = (1e12, 0, 8, vec![]);
    let e = train(&c, &options(&tmp.path().join("o3"), false)).unwrap_err().to_string();
    assert!(e.starts_with("iteration ") && e.contains("loss_") && (e.contains("NaN") || e.contains("inf")), "{e}");
}

#[test]
fn cli_sigterm_checkpoints_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let bin = maskrcnn_bin();
    let sets = [
        format!("data.train_ann='{}'", data.train_ann.display()),
        format!("data.train_images='{}'", data.train_images.display()),
        "model.num_classes=7".into(),
        "model.backbone_depth=18".into(),
        "model.fpn_channels=32".into(),
        "roi_heads.representation_size=64".into(),
        "roi_heads.mask_head_channels=16".into(),
        "input.min_size=[96]".into(),
        "input.max_size=128".into(),
        "solver.ims_per_batch=2".into(),
        "solver.max_iter=100000".into(),
        "solver.steps=[]".into(),
        "solver.log_period=1".into(),
        "dataloader.workers=1".into(),
    ];
    let args = |extra: &[&str]| {
        let mut a: Vec<String> =
            vec!["train".into(), "--device".into(), "cpu".into(), "--output".into(), out.display().to_string()];
        for s in &sets {
            a.push("--set".into());
            a.push(s.clone());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let child = std::process::Command::new(&bin)
        .args(args(&[]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for two logged iterations, then Ctrl-C.
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map(|t| t.lines().count()).unwrap_or(0) < 2 {
        assert!(started.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SIGTERM (how `timeout`, `kill`, Slurm and Kubernetes stop a job)
    // stops like Ctrl-C (SIGINT, sent to launched ranks below).
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("interrupted: checkpoint written, no model_final; continue with --resume"), "{stdout}");
    assert!(!out.join("model_final.safetensors").exists(), "an interrupted run writes no model_final");
    let saved = checkpoint::list(&out);
    assert_eq!(saved.len(), 1, "one checkpoint at the interruption");
    let at = saved[0].0;
    assert!(at >= 2);
    // --resume continues from there to max_iter.
    let target = format!("solver.max_iter={}", at + 2);
    let resumed = std::process::Command::new(&bin).args(args(&["--resume", "--set", &target])).output().unwrap();
    let text = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(text.contains(&format!("{at} -> {}", at + 2)), "{text}");
    assert!(out.join("model_final.safetensors").is_file(), "the completed run writes model_final");
    // Logs into a pipe or file carry no terminal colour codes.
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(log.contains("training") && !log.contains('\u{1b}'), "{log}");
}

/// Records of a TFRecord file: (payload) after checking both masked CRCs.
fn tf_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    use maskrcnn::engine::tensorboard::masked_crc32c;
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc32c(len_bytes));
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc32c(data));
        out.push(data.to_vec());
        at += 16 + len;
    }
    out
}

#[test]
fn tensorboard_events_are_valid_tfrecords() {
    use maskrcnn::engine::tensorboard::{crc32c, EventWriter};
    // The published CRC-32C check value.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    let tmp = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(tmp.path()).unwrap();
    w.scalar("loss", 7, 1.5).unwrap();
    w.scalar("eval/bbox_ap", 300, 0.25).unwrap();
    w.flush().unwrap();
    let records = tf_records(&std::fs::read(w.path()).unwrap());
    assert_eq!(records.len(), 3);
    assert!(records[0].windows(13).any(|x| x == b"brain.Event:2"), "version record first");
    for (rec, tag, step, value) in [(&records[1], "loss", 7u8, 1.5f32), (&records[2], "eval/bbox_ap", 0, 0.25)] {
        // wall_time (field 1, fixed64) then step (field 2, varint).
        assert_eq!(rec[0], 0x09);
        assert_eq!(rec[9], 0x10);
        if step > 0 {
            assert_eq!(rec[10], step);
        }
        let tail = &rec[rec.len() - (tag.len() + 5)..];
        assert_eq!(&tail[..tag.len()], tag.as_bytes());
        assert_eq!(tail[tag.len()], 0x15, "simple_value is field 2, fixed32");
        assert_eq!(f32::from_le_bytes(tail[tag.len() + 1..].try_into().unwrap()), value);
    }
}

#[test]
fn trained_weights_carry_the_dataset_categories() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let mut cfg = train_config(&data, &[]);
    cfg.solver.max_iter = 2;
    cfg.solver.checkpoint_period = 2;
    let out = tmp.path().join("out");
    train(&cfg, &options(&out, false)).unwrap();

    // The safetensors package reads the table from the header; the dataset's
    // categories (ids 1, 2, 3, 5, 8, 13, not contiguous), sorted by id.
    let gt: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&data.train_ann).unwrap()).unwrap();
    let mut expected: Vec<(u64, String)> = gt["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_u64().unwrap(), c["name"].as_str().unwrap().to_string()))
        .collect();
    expected.sort();
    let final_w = out.join("model_final.safetensors");
    let ckpt_w = checkpoint::list(&out)[0].1.join("model.safetensors");
    let mut stripped = PathBuf::new();
    for (i, w) in [&final_w, &ckpt_w].into_iter().enumerate() {
        let plain = tmp.path().join(format!("plain{i}.safetensors"));
        let report = tmp.path().join(format!("report{i}.json"));
        common::run_reference(
            "safetensors_header.py",
            &[w.to_str().unwrap(), plain.to_str().unwrap(), report.to_str().unwrap()],
            &report,
        );
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let table: serde_json::Value =
            serde_json::from_str(r["metadata"]["maskrcnn.categories"].as_str().expect("categories in the header"))
                .unwrap();
        let got: Vec<(u64, String)> = table
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["id"].as_u64().unwrap(), c["name"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(got, expected, "{}", w.display());
        assert_eq!(r["names"].as_array().unwrap().len(), fresh_model(&cfg).vs.variables().len());
        stripped = plain;
    }

    // predict: the table turns labels into the dataset's ids; without it (the
    // same tensors, as torchvision saves them) labels are written as they are.
    let with = MaskRcnn::from_weights(&cfg, &final_w, Device::Cpu).unwrap();
    let without = MaskRcnn::from_weights(&cfg, &stripped, Device::Cpu).unwrap();
    assert!(with.categories.is_some() && without.categories.is_none());
    let images: Vec<PathBuf> = std::fs::read_dir(&data.val_images).unwrap().flatten().map(|e| e.path()).collect();
    let run = |model: &MaskRcnn, name: &str| {
        let json = tmp.path().join(name);
        let opts = PredictOptions { json: Some(json.clone()), draw: None, draw_thresh: 0.5, image_ids: None };
        predict_files(model, &images, &opts).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        v.as_array().unwrap().clone()
    };
    let (a, b) = (run(&with, "with.json"), run(&without, "without.json"));
    assert!(!a.is_empty() && a.len() == b.len());
    let mut labels_seen = std::collections::BTreeSet::new();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x["file_name"], &x["score"], &x["bbox"]), (&y["file_name"], &y["score"], &y["bbox"]));
        let label = y["category_id"].as_i64().unwrap();
        labels_seen.insert(label);
        assert_eq!(x["category_id"].as_u64().unwrap(), expected[label as usize - 1].0);
    }
    // Labels 4..6 stand for ids 5, 8, 13: a model writing labels as ids fails here.
    assert!(labels_seen.iter().any(|&l| l >= 4), "labels {labels_seen:?}");
    assert_eq!(with.class_name(4), expected[3].1);
    assert_eq!(without.class_name(4), "class 4");

    // eval --weights: the table's ids agree with the ground truth's order.
    let gt = maskrcnn::evaluation::ground_truth::GroundTruth::load(&data.val_ann).unwrap();
    let ea = infer_dataset(&with, &gt, &data.val_images).unwrap().results;
    let eb = infer_dataset(&without, &gt, &data.val_images).unwrap().results;
    let key = |r: &maskrcnn::evaluation::results::CocoResult| (r.image_id, r.category_id, r.score.to_bits());
    assert_eq!(ea.iter().map(key).collect::<Vec<_>>(), eb.iter().map(key).collect::<Vec<_>>());

    // A table that disagrees with the model's classes is refused on load.
    let mut other = cfg.clone();
    other.model.num_classes = AutoCount::Fixed(7);
    let mut model = MaskRcnn::new(&other, Device::Cpu).unwrap();
    model.categories = Some(Categories(vec![Category { id: 1, name: "one".into() }]));
    let bad = tmp.path().join("bad.safetensors");
    model.save(&bad).unwrap();
    let e = MaskRcnn::from_weights(&other, &bad, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors") && e.contains("1 categories") && e.contains("7 classes"), "{e}");
}

#[test]
fn fine_tunes_from_a_torchvision_detection_checkpoint() {
    let _rng = rng_lock();
    // torchvision's R18-FPN Mask R-CNN with COCO's 91 classes, as converted
    // with save_file(model.state_dict()); we fine-tune it on 6 categories.
    let coco = common::fixture_dir().join("maskrcnn_r18_fpn_91.safetensors");
    common::run_reference("detection_weights.py", &["18", "91", coco.to_str().unwrap()], &coco);
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let weights_set = format!("model.weights='{}'", coco.display());
    let mut cfg = train_config(
        &data,
        &[
            "model.norm=\"auto\"",
            "model.fpn_channels=256",
            "roi_heads.representation_size=1024",
            "roi_heads.mask_head_channels=256",
            &weights_set,
        ],
    );
    cfg.solver.max_iter = 2;
    // A pretrained whole model: frozen BN, conv1 and layer1 frozen.
    assert_eq!((cfg.norm_kind(), cfg.trainable_layers()), (maskrcnn::config::NormKind::FrozenBn, 3));

    // Every tensor but the class-dependent predictors comes from the file.
    let model = fresh_model(&cfg);
    let classes = maskrcnn::modeling::weights::load_pretrained_model(&model.vs, &coco).unwrap();
    assert_eq!(classes, 91);
    common::assert_all_but_predictors_copied(&model.vs, &coco, 7);
    let file: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&coco).unwrap().into_iter().collect();

    // Training from it: frozen tensors stay the file's, the new heads learn.
    let out = tmp.path().join("ft");
    train(&cfg, &options(&out, false)).unwrap();
    let trained: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("model_final.safetensors")).unwrap().into_iter().collect();
    for frozen in
        ["backbone.body.conv1.weight", "backbone.body.layer1.0.conv1.weight", "backbone.body.bn1.running_mean"]
    {
        assert!(trained[frozen].equal(&file[frozen]), "{frozen} changed");
    }
    assert!(!trained["backbone.body.layer4.0.conv1.weight"].equal(&file["backbone.body.layer4.0.conv1.weight"]));
    assert_eq!(trained["roi_heads.box_predictor.cls_score.weight"].size(), vec![7, 1024]);

    // Another backbone depth is refused naming what does not fit; both kinds
    // of pretrained weights at once are refused by the config.
    let mut deeper = cfg.clone();
    deeper.model.backbone_depth = 34;
    let e =
        maskrcnn::modeling::weights::load_pretrained_model(&fresh_model(&deeper).vs, &coco).unwrap_err().to_string();
    assert!(e.contains("maskrcnn_r18_fpn_91.safetensors") && e.contains("missing backbone.body.layer"), "{e}");
    let mut both = cfg.clone();
    both.model.backbone_weights = "resnet.safetensors".into();
    let e = both.validate().unwrap_err().to_string();
    assert!(e.contains("model.weights") && e.contains("not both"), "{e}");
}

/// `--set` flags of a small fp32 run whose single update is plain SGD
/// (no momentum, weight decay, warmup or bias factor): w1 = w0 - lr * g.
fn plain_sgd_sets(data: &maskrcnn::data::synth::SynthOutput) -> Vec<String> {
    let mut sets = vec![
        format!("data.train_ann='{}'", data.train_ann.display()),
        format!("data.train_images='{}'", data.train_images.display()),
        "model.num_classes=7".into(),
    ];
    sets.extend(common::small_model_sets());
    sets.extend([
        "solver.ims_per_batch=4".into(),
        "solver.max_iter=1".into(),
        "solver.base_lr=0.02".into(),
        "solver.reference_batch=4".into(),
        "solver.momentum=0.0".into(),
        "solver.weight_decay=0.0".into(),
        "solver.bias_lr_factor=1.0".into(),
        "solver.bias_weight_decay=0.0".into(),
        "solver.warmup_iters=0".into(),
        "solver.steps=[]".into(),
        "precision.amp=\"off\"".into(),
        "dataloader.workers=1".into(),
    ]);
    sets
}

#[test]
fn launch_needs_a_gpu_per_rank_unless_on_the_cpu() {
    if tch::Cuda::device_count() >= 2 {
        eprintln!("skipped launch_needs_a_gpu_per_rank_unless_on_the_cpu: this machine has 2 GPUs");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let mut args: Vec<String> = vec!["launch".into(), "--nproc-per-node".into(), "2".into(), "train".into()];
    args.extend(["--output".into(), tmp.path().join("out").display().to_string()]);
    for s in plain_sgd_sets(&data) {
        args.extend(["--set".into(), s]);
    }
    let out = std::process::Command::new(maskrcnn_bin()).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--nproc-per-node 2 needs 2 CUDA devices") && err.contains("--device cpu"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing starts");
}

#[test]
fn launch_checks_the_train_arguments_once_before_starting_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["launch", "--nproc-per-node", "2", "train", "--device", "cpu"];
        args.extend(["--output", out.to_str().unwrap()]);
        args.extend(extra);
        std::process::Command::new(maskrcnn_bin()).args(&args).output().unwrap()
    };
    for (extra, expected) in [
        (&["--set", "solver.base_lrr=1"][..], "unknown config key `solver.base_lrr`"),
        (&["--bogus"][..], "launch: unexpected argument '--bogus'"),
    ] {
        let o = run(extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "one error line, not one per rank: {err}");
        assert!(err.contains(expected), "{err}");
    }
    assert!(!out.exists(), "no rank started");
}

#[test]
fn launch_two_cpu_ranks_take_the_mean_gradient_step() {
    check_ranks_take_the_mean_gradient_step(Device::Cpu, 1, 2);
}

/// Two `launch` commands on this machine acting as two nodes of two CPU
/// ranks each (`--nnodes 2 --node-rank R --master-addr --master-port`):
/// the four ranks take the mean gradient step of the global batch.
#[test]
fn launch_two_nodes_of_two_cpu_ranks_take_the_mean_gradient_step() {
    check_ranks_take_the_mean_gradient_step(Device::Cpu, 2, 2);
}

#[test]
fn gpu_launch_two_ranks_take_the_mean_gradient_step() {
    if tch::Cuda::device_count() < 2 {
        eprintln!("skipped gpu_launch_two_ranks_take_the_mean_gradient_step: needs 2 CUDA devices (nvidia-h100-x2)");
        return;
    }
    check_ranks_take_the_mean_gradient_step(Device::Cuda(0), 1, 2);
}

/// The bucketed all-reduce (each bucket queued behind the backward's event
/// for it, overlapping the rest of the backward) keeps the ranks in step:
/// 12 iterations on 2 GPUs in buckets of 0.25 MiB (a few dozen), recorded
/// steps replayed (their events are graph nodes), and at every logged
/// iteration both ranks' weights sum to the same float64, bit for bit, as
/// they must when each applies the same all-reduced gradients. A bucket
/// reduced before its gradients were final would leave each rank with part
/// of its own unreduced gradient: the ranks' weights would drift apart.
#[test]
fn gpu_launch_bucketed_all_reduce_keeps_the_ranks_in_step() {
    if tch::Cuda::device_count() < 2 {
        eprintln!("skipped gpu_launch_bucketed_all_reduce_keeps_the_ranks_in_step: needs 2 CUDA devices");
        return;
    }
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let out = tmp.path().join("bucketed");
    let mut sets = plain_sgd_sets(&data);
    sets.extend(["solver.max_iter=12".into(), "solver.log_period=2".into(), "solver.allreduce_bucket_mb=0.25".into()]);
    let mut args: Vec<String> = vec!["launch".into(), "--nproc-per-node".into(), "2".into(), "train".into()];
    args.extend(["--output".into(), out.display().to_string()]);
    for s in sets {
        args.extend(["--set".into(), s]);
    }
    let done = std::process::Command::new(maskrcnn_bin()).args(&args).output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let (zero, one) = (logged_steps(&out.join("metrics.jsonl")), logged_steps(&out.join("ranks").join("rank1.jsonl")));
    assert_eq!(zero.len(), 6, "logged iterations: {zero:?}");
    assert_eq!(zero.len(), one.len());
    for (a, b) in zero.iter().zip(&one) {
        let (da, db) = (a["weights_digest"].as_f64().unwrap(), b["weights_digest"].as_f64().unwrap());
        eprintln!("iteration {}: weights sum to {da:.17e} on rank 0, {db:.17e} on rank 1", a["iteration"]);
        assert_eq!(da.to_bits(), db.to_bits(), "iteration {}: the ranks' weights differ", a["iteration"]);
        assert!(a["allreduce_gpu_ms"].as_f64().is_some(), "no exposed all-reduce time logged: {a}");
    }
    let last = zero.last().unwrap();
    assert!(last["graph_replays"].as_u64().unwrap_or(0) > 0, "no recorded step was replayed: {last}");
}

/// `maskrcnn launch --nproc-per-node P train` on each of `nodes` nodes (one
/// launch per node on this machine) for one plain-SGD iteration on `device`
/// (the CPU: TCP; CUDA: NCCL) must change the weights by −lr × the mean of
/// the ranks' gradients, each computed here on its rank's shard with its
/// rank's sampling seed.
fn check_ranks_take_the_mean_gradient_step(device: Device, nodes: usize, per_node: usize) {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let out = tmp.path().join("ddp");
    let mut sets = plain_sgd_sets(&data);
    if device.is_cuda() {
        // Full float32 in the ranks and in the reference here: with TF32 the
        // ranks' cuBLAS products (TF32 on by the config) and this process's
        // (libtorch's default: off) differ by ~1e-3 of a value.
        sets.push("precision.tf32=false".into());
        maskrcnn::shim::set_tf32(false);
    }
    let world = nodes * per_node;
    let port = maskrcnn::distributed::launcher::free_port().unwrap().to_string();
    // The GPU machine runs the binary scripts/gpu-check.sh names.
    let bin = maskrcnn_bin();
    let launches: Vec<std::process::Child> = (0..nodes)
        .map(|node| {
            let mut args: Vec<String> = vec!["launch".into(), "--nproc-per-node".into(), per_node.to_string()];
            if nodes > 1 {
                args.extend(["--nnodes".into(), nodes.to_string(), "--node-rank".into(), node.to_string()]);
                args.extend(["--master-addr".into(), "127.0.0.1".into(), "--master-port".into(), port.clone()]);
            }
            args.extend(["train".into(), "--output".into(), out.display().to_string()]);
            if device == Device::Cpu {
                args.extend(["--device".into(), "cpu".into()]);
            }
            for s in &sets {
                args.extend(["--set".into(), s.clone()]);
            }
            std::process::Command::new(&bin)
                .args(&args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut stderr = String::new();
    for launch in launches {
        let run = launch.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(run.status.success(), "{text}");
        stderr.push_str(&text);
    }
    for rank in 0..world {
        assert!(stderr.contains(&format!("rank {rank}/{world}")), "rank {rank} missing: {stderr}");
    }
    // Every other rank logs its own step records (its step, GPU and
    // all-reduce times) beside rank 0's metrics.jsonl: the same iterations
    // and the same (all-reduced) losses.
    let logged = losses_by_iteration(&out);
    assert!(!logged.is_empty(), "rank 0 logged no step");
    for rank in 1..world {
        let path = out.join("ranks").join(format!("rank{rank}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let own: Vec<(u64, f64)> =
            rows.iter().map(|r| (r["iteration"].as_u64().unwrap(), r["loss"].as_f64().unwrap())).collect();
        assert_eq!(own.len(), logged.len(), "rank {rank}: {text}");
        for ((i, a), (j, b)) in own.iter().zip(&logged) {
            assert_eq!(i, j);
            assert!((a - b).abs() <= 1e-6 * b.abs(), "rank {rank} iteration {i}: loss {a} vs rank 0's {b}");
        }
        // The same all-reduced step on every rank: the same weights.
        let digest = |r: &serde_json::Value| r["weights_digest"].as_f64().map(f64::to_bits);
        let zero = logged_steps(&out.join("metrics.jsonl"));
        assert!(
            rows.iter().zip(&zero).all(|(r, z)| digest(r).is_some() && digest(r) == digest(z)),
            "rank {rank}: {text}"
        );
        assert!(rows.iter().all(|r| r["step_ms"].as_f64().is_some() && r["allreduce_ms"].as_f64().is_some()));
    }
    let trained: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("model_final.safetensors")).unwrap().into_iter().collect();

    // The reference: rank r's batch (the loader's shard r of 2) through one
    // forward/backward on cuda:0 with rank r's sampling seed; the update must
    // be the mean of the two gradients (DistributedDataParallel's rule).
    let cfg = Config::load(None, &sets).unwrap();
    let mut model = MaskRcnn::new(&cfg, device).unwrap();
    if device.is_cuda() {
        model.to_channels_last();
    }
    let w0: Vec<(String, Tensor)> = weights(&model);
    let ds = Arc::new(
        maskrcnn::data::CocoDataset::load(
            &data.train_ann,
            &data.train_images,
            maskrcnn::data::LoadOptions { drop_empty: true, ..Default::default() },
        )
        .unwrap(),
    );
    let mut grads: Vec<std::collections::HashMap<String, Tensor>> = Vec::new();
    for rank in 0..world {
        let mut loader = maskrcnn::data::Loader::new(
            ds.clone(),
            maskrcnn::data::LoaderOptions {
                batch_size: cfg.solver.ims_per_batch / world,
                workers: 1,
                prefetch: cfg.dataloader.prefetch,
                flip_prob: cfg.input.flip_prob,
                seed: cfg.seed,
                rank,
                world_size: world,
                group_by_aspect: cfg.dataloader.aspect_ratio_grouping,
                strict: false,
                device,
                start_iteration: 0,
                decode: maskrcnn::data::image::DecodeOptions::of(&cfg.input),
            },
        )
        .unwrap();
        let batch = loader.next_batch().unwrap();
        model.vs.trainable_variables().iter().for_each(|p| {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        });
        tch::manual_seed(maskrcnn::engine::trainer::micro_batch_seed(cfg.seed, 0, rank));
        let short_side = maskrcnn::engine::trainer::micro_batch_short_side(&cfg.input.min_size, cfg.seed, 0);
        let resize = maskrcnn::modeling::BatchResize { short_side, cover: &batch.global_sizes };
        let step = MicroBatch { images: &batch.images, targets: &batch.targets, resize };
        // The ranks' own path (on CUDA a first step through the step
        // graphs: padded to buckets, the mask head on its row budget), so
        // both sides run the same kernels on the same shapes and draws.
        let mut graphs = maskrcnn::engine::step_graphs::StepGraphs::for_training(&cfg.precision, device);
        let _losses =
            forward_backward(&model, step, 1, None, AmpMode::Off, &mut maskrcnn::ops::BalancedSampler, graphs.as_mut())
                .unwrap();
        grads.push(
            model
                .vs
                .variables()
                .into_iter()
                .filter(|(_, p)| p.requires_grad())
                .map(|(k, p)| (k, p.grad().copy()))
                .collect(),
        );
    }
    let (mut worst, mut scale, mut compared) = (0.0f64, 0.0f64, 0);
    for (name, w) in &w0 {
        let got = trained[name].to_device(device) - w;
        match grads.iter().map(|g| g.get(name)).collect::<Option<Vec<&Tensor>>>() {
            Some(per_rank) => {
                let sum = per_rank.into_iter().fold(Tensor::zeros_like(w), |acc, g| acc + g);
                let expected = sum * (-0.02 / world as f64);
                worst = worst.max((&got - &expected).abs().max().double_value(&[]));
                scale = scale.max(expected.abs().max().double_value(&[]));
                compared += 1;
            }
            None => assert_eq!(got.abs().max().double_value(&[]), 0.0, "{name}: frozen, yet it changed"),
        }
    }
    eprintln!(
        "{world} ranks vs mean gradient: worst update difference {worst:.3e} of {scale:.3e} over {compared} tensors"
    );
    assert!(compared > 50 && scale > 0.0);
    assert!(worst <= 1e-3 * scale, "update differs from the mean gradient step: {worst:.3e} vs {scale:.3e}");
}

/// Runs `maskrcnn launch --nproc-per-node 2 train --device cpu` with `sets`
/// into `out`; with `interrupt = Some(r)`, sends rank `r`'s process alone
/// SIGINT once two iterations are logged. Gives up (killing the launcher's group)
/// after 240 s: ranks that disagree on stopping would wait for each other.
fn launch_cpu_pair(sets: &[String], out: &Path, interrupt: Option<usize>) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let mut args: Vec<String> = vec!["launch".into(), "--nproc-per-node".into(), "2".into(), "train".into()];
    args.extend(["--device".into(), "cpu".into(), "--output".into(), out.display().to_string()]);
    for s in sets {
        args.extend(["--set".into(), s.clone()]);
    }
    let mut child = std::process::Command::new(maskrcnn_bin())
        .args(&args)
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let metrics = out.join("metrics.jsonl");
    let mut sent = false;
    while child.try_wait().unwrap().is_none() {
        let logged = std::fs::read_to_string(&metrics).map(|t| t.lines().count()).unwrap_or(0);
        if let (Some(rank), false, true) = (interrupt, sent, logged >= 2) {
            // The launcher's children, in the order it started them (rank order).
            let id = child.id();
            let ranks = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap();
            let pid = ranks.split_whitespace().nth(rank).unwrap().to_string();
            assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
            sent = true;
        }
        if started.elapsed().as_secs() > 240 {
            let _ = std::process::Command::new("kill").args(["-KILL", &format!("-{}", child.id())]).status();
            panic!("the two ranks did not finish within 240 s (stuck waiting for each other?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

/// A run checkpointed by two CPU ranks resumes on one process and then on
/// two again (same global batch): each continues at the checkpoint's
/// iteration and the log holds every iteration once.
#[test]
fn resume_works_with_another_number_of_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let out = tmp.path().join("out");
    let run = |ranks: usize, max_iter: usize, resume: bool| {
        let mut args: Vec<String> = Vec::new();
        if ranks > 1 {
            args.extend(["launch".into(), "--nproc-per-node".into(), ranks.to_string()]);
        }
        args.extend(["train".into(), "--device".into(), "cpu".into(), "--output".into(), out.display().to_string()]);
        if resume {
            args.push("--resume".into());
        }
        let mut sets = plain_sgd_sets(&data);
        sets.extend([format!("solver.max_iter={max_iter}"), "solver.checkpoint_period=2".into()]);
        sets.push("solver.log_period=1".into());
        for s in &sets {
            args.extend(["--set".into(), s.clone()]);
        }
        let o = std::process::Command::new(maskrcnn_bin()).args(&args).output().unwrap();
        assert!(o.status.success(), "{} rank(s) to {max_iter}: {}", ranks, String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        (summary["start_iteration"].as_u64().unwrap(), summary["iterations"].as_u64().unwrap())
    };
    assert_eq!(run(2, 2, false), (0, 2));
    assert_eq!(run(1, 4, true), (2, 4));
    assert_eq!(run(2, 6, true), (4, 6));
    let iterations: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some_and(|l| l.as_f64().is_some_and(f64::is_finite)))
        .map(|r| r["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(iterations, (1..=6).collect::<Vec<_>>());
}

/// Two `launch` commands as two nodes of one CPU rank each; node 1's rank is
/// killed with SIGKILL mid-training: both launches must exit non-zero within
/// 60 s, node 0's naming the lost rank and node 1's the killed one.
#[test]
fn a_rank_killed_on_one_node_ends_every_node_within_a_minute() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let mut sets = plain_sgd_sets(&data);
    sets.extend(["solver.max_iter=100000".into(), "solver.log_period=1".into()]);
    let out = tmp.path().join("out");
    let port = maskrcnn::distributed::launcher::free_port().unwrap().to_string();
    let mut launches: Vec<(std::process::Child, std::path::PathBuf)> = (0..2)
        .map(|node| {
            let log = tmp.path().join(format!("node{node}.log"));
            let mut args: Vec<String> = vec!["launch".into(), "--nproc-per-node".into(), "1".into()];
            args.extend(["--nnodes".into(), "2".into(), "--node-rank".into(), node.to_string()]);
            args.extend(["--master-port".into(), port.clone(), "train".into(), "--device".into(), "cpu".into()]);
            args.extend(["--output".into(), out.display().to_string()]);
            for s in &sets {
                args.extend(["--set".into(), s.clone()]);
            }
            let child = std::process::Command::new(maskrcnn_bin())
                .args(&args)
                .process_group(0)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (child, log)
        })
        .collect();
    let kill_groups = |launches: &[(std::process::Child, std::path::PathBuf)]| {
        for (c, _) in launches {
            let _ = std::process::Command::new("kill").args(["-KILL", &format!("-{}", c.id())]).status();
        }
    };
    // Wait for training to run (rank 0 logs iterations), then kill node 1's rank.
    wait_for_training(&out, || kill_groups(&launches));
    let pid = rank_pids(launches[1].0.id())[0].clone();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let killed = std::time::Instant::now();
    let mut statuses = vec![None, None];
    while statuses.iter().any(Option::is_none) {
        for (i, (c, _)) in launches.iter_mut().enumerate() {
            if statuses[i].is_none() {
                statuses[i] = c.try_wait().unwrap();
            }
        }
        if killed.elapsed().as_secs() > 60 {
            kill_groups(&launches);
            panic!("a node was still running 60 s after rank 1 was killed: {statuses:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let logs: Vec<String> = launches.iter().map(|(_, log)| std::fs::read_to_string(log).unwrap()).collect();
    for (i, status) in statuses.iter().enumerate() {
        assert!(!status.unwrap().success(), "node {i} exited 0:\n{}", logs[i]);
    }
    assert!(logs[0].contains("lost rank 1"), "node 0 does not name the lost rank:\n{}", logs[0]);
    assert!(logs[1].contains("rank 1 failed"), "node 1 does not name its killed rank:\n{}", logs[1]);
    eprintln!("both nodes exited {:.1} s after rank 1 was killed", killed.elapsed().as_secs_f64());
}

/// One of two CPU ranks stops (SIGSTOP: alive, holding its sockets, making
/// no progress — a hung GPU or a deadlock): the other rank ends itself once
/// its training has made no progress for the collective timeout
/// (`MASKRCNN_COLLECTIVE_TIMEOUT`), saying so, and the launch exits
/// non-zero instead of waiting forever.
#[test]
fn a_hung_rank_ends_the_group_after_the_collective_timeout() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let mut sets = plain_sgd_sets(&data);
    sets.extend(["solver.max_iter=100000".into(), "solver.log_period=1".into()]);
    let out = tmp.path().join("out");
    let log = tmp.path().join("launch.log");
    let mut args: Vec<String> = vec!["launch".into(), "--nproc-per-node".into(), "2".into(), "train".into()];
    args.extend(["--device".into(), "cpu".into(), "--output".into(), out.display().to_string()]);
    for s in &sets {
        args.extend(["--set".into(), s.clone()]);
    }
    let timeout_s = 15;
    let mut launch = std::process::Command::new(maskrcnn_bin())
        .args(&args)
        .env("MASKRCNN_COLLECTIVE_TIMEOUT", timeout_s.to_string())
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let kill_group = |pid: u32| {
        let _ = std::process::Command::new("kill").args(["-KILL", &format!("-{pid}")]).status();
    };
    let id = launch.id();
    wait_for_training(&out, || kill_group(id));
    let pids = rank_pids(id);
    // Each rank runs on its own share of the CPUs (launch --cpu-affinity auto).
    let cpus_of = |pid: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string()
    };
    let (a, b) = (cpus_of(&pids[0]), cpus_of(&pids[1]));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores >= 2 {
        assert_ne!(a, b, "both ranks may run on CPUs {a}");
    }
    let pid = pids[1].clone();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(status) = launch.try_wait().unwrap() {
            break status;
        }
        if stopped.elapsed().as_secs() > timeout_s + 60 {
            kill_group(id);
            panic!("the launch was still running {} s after a rank hung", timeout_s + 60);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "the launch exited 0:\n{text}");
    assert!(text.contains("MASKRCNN_COLLECTIVE_TIMEOUT"), "no rank named the collective timeout:\n{text}");
    let waited = stopped.elapsed().as_secs_f64();
    assert!(waited >= timeout_s as f64 - 1.0, "ended after {waited:.1} s, before the timeout:\n{text}");
    eprintln!("the launch exited {waited:.1} s after a rank hung (timeout {timeout_s} s)");
}

/// Waits until rank 0 has logged two iterations to `out`; after 180 s
/// calls `give_up` (which stops the launches) and fails.
fn wait_for_training(out: &std::path::Path, give_up: impl Fn()) {
    let started = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        if started.elapsed().as_secs() > 180 {
            give_up();
            panic!("training did not start within 180 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The process ids of the ranks a `launch` process started.
fn rank_pids(launch: u32) -> Vec<String> {
    let children = std::fs::read_to_string(format!("/proc/{launch}/task/{launch}/children")).unwrap();
    children.split_whitespace().map(str::to_string).collect()
}

/// The iteration in every `… at iteration N` line of `log`.
fn stop_iterations(log: &str, phrase: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split(phrase).nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

#[test]
fn launched_ranks_stop_together_on_a_time_budget_or_one_ranks_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    // Later --set values win over plain_sgd_sets' max_iter = 1.
    let mut sets = plain_sgd_sets(&data);
    sets.extend(["solver.max_iter=100000".into(), "solver.log_period=2".into()]);

    // Time budget: each rank's clock differs, the group stops at one log
    // boundary (every rank says the same iteration, a multiple of 2).
    let mut timed = sets.clone();
    timed.push("solver.max_seconds=3".into());
    let out = tmp.path().join("timed");
    let (ok, _, stderr) = launch_cpu_pair(&timed, &out, None);
    assert!(ok, "{stderr}");
    let at = stop_iterations(&stderr, "reached at iteration ");
    assert_eq!(at.len(), 2, "both ranks report the stop: {stderr}");
    assert!(at[0] == at[1] && at[0].is_multiple_of(2) && at[0] > 0, "{at:?}");
    assert!(out.join("model_final.safetensors").is_file());

    // Ctrl-C reaching rank 1 alone stops both ranks at one log boundary
    // (rank 0 would otherwise wait for rank 1 in the next all-reduce and
    // fail); rank 0 writes the one checkpoint there.
    let out = tmp.path().join("interrupted");
    let (ok, _, stderr) = launch_cpu_pair(&sets, &out, Some(1));
    assert!(ok, "{stderr}");
    let at = stop_iterations(&stderr, "checkpoint written at iteration ");
    assert_eq!(at.len(), 1, "rank 0 alone writes: {stderr}");
    let saved = checkpoint::list(&out);
    assert_eq!(saved.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![at[0]], "{stderr}");
    assert!(at[0].is_multiple_of(2));
}

#[test]
fn launched_ranks_evaluate_on_rank_zero_and_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(&tmp.path().join("data"));
    let mut sets = plain_sgd_sets(&data);
    sets.extend([
        "solver.max_iter=4".into(),
        "test.eval_period=2".into(),
        format!("data.val_ann='{}'", data.val_ann.display()),
        format!("data.val_images='{}'", data.val_images.display()),
    ]);
    let out = tmp.path().join("run");
    let (ok, stdout, stderr) = launch_cpu_pair(&sets, &out, None);
    assert!(ok, "{stderr}");
    // Rank 0 evaluates at 2 and 4 while rank 1 waits, then both go on.
    let evals: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("bbox_ap"))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![2, 4], "{stderr}");
    for it in [2, 4] {
        assert!(out.join(format!("eval/metrics_iter_{it:07}.json")).is_file());
    }
    assert!(stdout.contains("iterations") && stdout.contains("0 -> 4"), "{stdout}");
}
