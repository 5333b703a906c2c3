//! `maskrcnn predict` end to end: PNG files in, COCO results JSON (boxes in
//! original pixels, compressed RLE masks) and drawings out, compared with
//! torchvision's detections on the same files encoded by pycocotools; and
//! its handling of bad input.

mod common;

use common::*;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Deserialize)]
struct Rle {
    size: [u32; 2],
    counts: String,
}

#[derive(Debug, Deserialize)]
struct Det {
    file_name: String,
    category_id: i64,
    score: f64,
    bbox: [f64; 4],
    segmentation: Rle,
}

/// The R101 / 7-class / 320 px oracle fixture (shared with inference_parity).
fn fixture() -> PathBuf {
    oracle("infer_r101_c7_cpu", &["--depth", "101"])
}

/// torchvision's `maskrcnn_resnet50_fpn_v2(weights=None)` saved with
/// `save_file(model.state_dict())`, 7 classes, 320 px (shared with
/// inference_parity).
fn fixture_v2() -> PathBuf {
    oracle(
        "infer_r50_c7_v2_cpu",
        &[
            "--depth",
            "50",
            "--fpn-norm",
            "bn",
            "--rpn-conv-depth",
            "2",
            "--box-head",
            "4conv1fc",
            "--head-norm",
            "bn",
            "--arch",
            "v2",
            "--trainable-layers",
            "5",
            "--steps",
            "6",
        ],
    )
}

/// The inference oracle's files for 7 classes at 320 px in `name`, built with `args`.
fn oracle(name: &str, args: &[&str]) -> PathBuf {
    let dir = fixture_dir().join(name);
    let mut all = vec![dir.to_str().unwrap(), "--classes", "7", "--min-size", "320", "--max-size", "512"];
    all.extend(["--sizes", "300x200,30x20,1000x1500", "--device", "cpu"]);
    all.extend(args);
    run_reference("inference_fixture.py", &all, &dir.join("predict_ref.json"));
    dir
}

const SETS: [&str; 8] = [
    "--set",
    "model.num_classes=7",
    "--set",
    "model.backbone_depth=101",
    "--set",
    "input.min_size_test=320",
    "--set",
    "input.max_size_test=512",
];

/// v2's preset, 7 classes at 320 px.
const SETS_V2: [&str; 8] = [
    "--config",
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/maskrcnn_r50_fpn_v2.toml"),
    "--set",
    "model.num_classes=7",
    "--set",
    "input.min_size_test=320",
    "--set",
    "input.max_size_test=512",
];

fn iou_xywh(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let (ax2, ay2, bx2, by2) = (a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]);
    let w = (ax2.min(bx2) - a[0].max(b[0])).max(0.0);
    let h = (ay2.min(by2) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / (a[2] * a[3] + b[2] * b[3] - inter)
}

fn mask_iou(a: &Rle, b: &Rle) -> f64 {
    let dec = |r: &Rle| {
        hotcoco::mask::decode(&hotcoco::mask::rle_from_string(&r.counts, r.size[0], r.size[1]).expect("valid RLE"))
    };
    let (x, y) = (dec(a), dec(b));
    let inter = x.iter().zip(&y).filter(|(p, q)| **p != 0 && **q != 0).count() as f64;
    let union = x.iter().zip(&y).filter(|(p, q)| **p != 0 || **q != 0).count() as f64;
    if union == 0.0 {
        1.0
    } else {
        inter / union
    }
}

fn read_results(path: &Path) -> Vec<Det> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// How two result lists agree.
struct Matched {
    /// Detections of `theirs` with a counterpart in `ours`: the same file
    /// and category, box IoU ≥ 0.999, |Δscore| ≤ 1e-4 (each used once).
    matched: usize,
    /// Of those, with the identical RLE string.
    identical_rle: usize,
    /// The lowest mask IoU of a matched pair (1 when none).
    worst_mask_iou: f64,
    /// The longer list's length.
    total: usize,
}

fn match_results(ours: &[Det], theirs: &[Det]) -> Matched {
    let mut used = vec![false; ours.len()];
    let (mut matched, mut identical_rle, mut worst_mask_iou) = (0, 0, 1.0f64);
    for t in theirs {
        let best = ours
            .iter()
            .enumerate()
            .filter(|(i, d)| !used[*i] && d.file_name == t.file_name && d.category_id == t.category_id)
            .map(|(i, d)| (i, iou_xywh(&d.bbox, &t.bbox)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, iou)) = best {
            let d = &ours[i];
            if iou >= 0.999 && (d.score - t.score).abs() <= 1e-4 {
                used[i] = true;
                matched += 1;
                assert_eq!(d.segmentation.size, t.segmentation.size, "{}", t.file_name);
                if d.segmentation.counts == t.segmentation.counts {
                    identical_rle += 1;
                } else {
                    worst_mask_iou = worst_mask_iou.min(mask_iou(&d.segmentation, &t.segmentation));
                }
            }
        }
    }
    Matched { matched, identical_rle, worst_mask_iou, total: ours.len().max(theirs.len()) }
}

/// With trained weights — torchvision's R18-FPN trained briefly (15
/// iterations on the CPU), whose scores sit near the thresholds — on 6
/// scenes of varied sizes as PNG files, `predict` gives torchvision's
/// detections when it batches the images as torchvision did (3 per batch,
/// and 1): ≥ 99.5% matched (box IoU ≥ 0.999, |Δscore| ≤ 1e-4, masks equal
/// or IoU ≥ 0.99). Batching matters: a detector's output depends on which
/// images share its padded batch (torchvision's own batch-3 and batch-1
/// detections agree far less; printed), so a comparison across batch
/// sizes says nothing about parity.
#[test]
fn trained_weights_predict_as_torchvision_batch_for_batch() {
    let dir = fixture_dir().join("trained_r18_c7");
    let d = dir.to_str().unwrap();
    run_reference("trained_fixture.py", &[d, "15", "6", "3", "1"], &dir.join("predict_b1.json"));
    for batch in [3, 1] {
        let out = tempfile::tempdir().unwrap();
        let json = out.path().join("dets.json");
        let o = Command::new(maskrcnn_bin())
            .arg("predict")
            .args(["--weights", dir.join("weights.safetensors").to_str().unwrap()])
            .args(["--set", "model.backbone_depth=18", "--set", "input.min_size_test=160"])
            .args(["--set", "input.max_size_test=240", "--set", &format!("test.ims_per_batch={batch}")])
            .args(["--set", "roi_heads.detections_per_img=40"])
            .args(["--device", "cpu", "--json", json.to_str().unwrap(), dir.join("images").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let theirs = read_results(&dir.join(format!("predict_b{batch}.json")));
        let m = match_results(&read_results(&json), &theirs);
        eprintln!(
            "batch {batch}: {}/{} detections matched, {} with identical RLE strings",
            m.matched, m.total, m.identical_rle
        );
        assert!(theirs.len() >= 100, "{} detections: too few to compare", theirs.len());
        assert!(m.matched as f64 >= 0.995 * m.total as f64, "batch {batch}: {}/{} matched", m.matched, m.total);
        assert!(m.worst_mask_iou >= 0.99, "batch {batch}: mask IoU {}", m.worst_mask_iou);
    }
    let across =
        match_results(&read_results(&dir.join("predict_b3.json")), &read_results(&dir.join("predict_b1.json")));
    eprintln!("torchvision, batch 3 against batch 1: {}/{} detections matched", across.matched, across.total);
}

#[test]
fn predict_json_matches_torchvision_and_pycocotools() {
    predict_matches_torchvision(&fixture(), &SETS);
}

/// `predict` and `eval --weights --images` on a state dict of torchvision's
/// v2 model (`save_file(model.state_dict())`) with the v2 preset.
#[test]
fn v2_state_dict_predicts_and_evaluates_as_torchvision() {
    let dir = fixture_v2();
    predict_matches_torchvision(&dir, &SETS_V2);
    eval_matches_torchvision(&dir, &SETS_V2);
}

/// `predict --json --draw` with the weights in `dir` and `sets`: the
/// detections match torchvision's (`predict_ref.json`), one drawing per image.
fn predict_matches_torchvision(dir: &Path, sets: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("dets.json");
    let draw = out.path().join("draw");
    let images: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("img{i}.png"))).collect();
    let o = Command::new(maskrcnn_bin())
        .arg("predict")
        .args(["--weights", dir.join("weights.safetensors").to_str().unwrap()])
        .args(sets)
        .args(["--device", "cpu", "--json", json.to_str().unwrap(), "--draw", draw.to_str().unwrap()])
        .args(["--draw-thresh", "0.3"])
        .args(&images)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = read_results(&json);
    let theirs = read_results(&dir.join("predict_ref.json"));
    assert!(!theirs.is_empty());
    let m = match_results(&ours, &theirs);
    eprintln!("predict: {}/{} detections matched, {} with identical RLE strings", m.matched, m.total, m.identical_rle);
    assert!(m.matched as f64 >= 0.99 * m.total as f64, "{}/{}", m.matched, m.total);
    assert!(m.worst_mask_iou >= 0.99, "mask IoU {}", m.worst_mask_iou);
    // One drawing per image.
    for (i, source) in images.iter().enumerate() {
        let png = draw.join(format!("img{i}.png"));
        let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        let src = image::open(source).unwrap();
        assert_eq!((img.width(), img.height()), (src.width(), src.height()));
    }
}

fn predict_args(dir: &Path) -> Vec<String> {
    let mut v = vec!["predict".to_string(), "--weights".into(), dir.join("weights.safetensors").display().to_string()];
    v.extend(SETS.iter().map(|s| s.to_string()));
    v.extend(["--device".into(), "cpu".into()]);
    v
}

#[test]
fn predict_skips_bad_images_and_fails_at_the_end() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let missing = tmp.path().join("missing.png");
    let json = tmp.path().join("d.json");
    let o = Command::new(maskrcnn_bin())
        .args(predict_args(&dir))
        .args(["--json", json.to_str().unwrap()])
        .arg(&corrupt)
        .arg(dir.join("img1.png"))
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("corrupt.jpg") && err.contains("missing.png"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.starts_with("error: 2 of 3 image(s) could not be read"), "{last}");
    // The good image was still processed and written.
    let dets: Vec<Det> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(dets.iter().all(|d| d.file_name == "img1.png") && !dets.is_empty());
    // --json naming a folder: said so, no temporary file left beside it.
    let folder = tmp.path().join("results");
    std::fs::create_dir(&folder).unwrap();
    let o = Command::new(maskrcnn_bin())
        .args(predict_args(&dir))
        .args(["--json", folder.to_str().unwrap()])
        .arg(dir.join("img1.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is a directory, not a file"), "{err}");
    assert!(!tmp.path().join("results.json.tmp").exists(), "temporary file left behind");
    // One file name in two folders: results keep the paths apart, and
    // neither drawing overwrites the other.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir(d).unwrap();
        std::fs::copy(dir.join("img1.png"), d.join("img1.png")).unwrap();
    }
    let drawn = tmp.path().join("drawn");
    let o = Command::new(maskrcnn_bin())
        .args(predict_args(&dir))
        .args(["--json", json.to_str().unwrap(), "--draw", drawn.to_str().unwrap()])
        .args([a.join("img1.png"), b.join("img1.png")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dets: Vec<Det> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: std::collections::BTreeSet<&str> = dets.iter().map(|d| d.file_name.as_str()).collect();
    let expected = [a.join("img1.png"), b.join("img1.png")].map(|p| p.display().to_string());
    assert_eq!(names, expected.iter().map(String::as_str).collect(), "file names");
    assert_eq!(std::fs::read_dir(&drawn).unwrap().count(), 2, "one drawing per input");
}

#[test]
fn predict_rejects_bad_weights_with_one_line() {
    let dir = fixture();
    let run = |extra: &[&str]| {
        let mut args = vec!["predict".to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(dir.join("img0.png").display().to_string());
        Command::new(maskrcnn_bin()).args(&args).output().unwrap()
    };
    let w = dir.join("weights.safetensors");
    let w = w.to_str().unwrap();
    // The class count comes from the weights ("auto"); a wrong one is said
    // so, with the number the weights have.
    let o = run(&["--weights", w, "--set", "model.backbone_depth=101", "--device", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o =
        run(&["--weights", w, "--set", "model.backbone_depth=101", "--set", "model.num_classes=91", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("7 classes") && err.contains("model.num_classes is 91"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Wrong depth: missing / unexpected tensors are listed with shapes.
    let o = run(&["--weights", w, "--set", "model.num_classes=7", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unexpected backbone.body.layer3.") && err.contains("more"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Not a weights file.
    let o = run(&["--weights", dir.join("img0.png").to_str().unwrap(), "--device", "cpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot read weights"), "{err}");
    let o = run(&["--weights", "/nonexistent.safetensors", "--device", "cpu"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.safetensors: no such file"));
}

/// `eval --weights --images`: our model over the fixture's PNGs, scored
/// against its ground truth, gives the numbers pycocotools gives for
/// torchvision's detections on the same images.
#[test]
fn eval_over_images_matches_pycocotools_on_torchvision_detections() {
    let dir = fixture();
    eval_matches_torchvision(&dir, &SETS);
    let tmp = tempfile::tempdir().unwrap();
    let dets = tmp.path().join("dets.json");
    // Ground truth whose sizes do not match the images: the image is named
    // and left out of the evaluation, the rest evaluated; so is a
    // file_name leaving the image folder.
    let mut gt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("gt.json")).unwrap()).unwrap();
    gt["images"][0]["width"] = serde_json::json!(7);
    let bad = tmp.path().join("bad-gt.json");
    std::fs::write(&bad, gt.to_string()).unwrap();
    let eval = |ann: &Path| {
        Command::new(maskrcnn_bin())
            .args(["eval", "--ann", ann.to_str().unwrap()])
            .args(["--weights", dir.join("weights.safetensors").to_str().unwrap(), "--images", dir.to_str().unwrap()])
            .args(SETS)
            .args(["--device", "cpu", "--out", dets.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let left_out = |o: &std::process::Output, why: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("note: 1 of 3 images could not be read and are left out of the evaluation"), "{err}");
        assert!(err.contains(why), "{err}");
        let dets: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&dets).unwrap()).unwrap();
        assert!(!dets.is_empty() && dets.iter().all(|d| d["image_id"] != 1), "image 1 has no detections");
    };
    left_out(&eval(&bad), "img0.png is 200x300 but the annotations say 7x300");
    gt["images"][0]["width"] = serde_json::json!(300);
    gt["images"][0]["file_name"] = serde_json::json!("../img0.png");
    std::fs::write(&bad, gt.to_string()).unwrap();
    left_out(&eval(&bad), "\"../img0.png\" leaves the image folder");
}

/// `eval --weights --images` with the weights in `dir` and `sets`, over the
/// oracle's PNGs and ground truth: pycocotools' numbers for torchvision's
/// detections on the same images (`eval_ref.json`).
fn eval_matches_torchvision(dir: &Path, sets: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (dets, metrics) = (tmp.path().join("dets.json"), tmp.path().join("m.json"));
    let o = Command::new(maskrcnn_bin())
        .args(["eval", "--ann", dir.join("gt.json").to_str().unwrap()])
        .args(["--weights", dir.join("weights.safetensors").to_str().unwrap(), "--images", dir.to_str().unwrap()])
        .args(sets)
        .args(["--device", "cpu", "--out", dets.to_str().unwrap(), "--metrics", metrics.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("IoU type: segm"));
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval_ref.json")).unwrap()).unwrap();
    for (iou, tol) in [("bbox", 1e-9), ("segm", 2e-3)] {
        let a: Vec<f64> = ours[iou]["stats"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let b: Vec<f64> = reference[iou].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol, "{iou} stat {i}: ours {x}, pycocotools on torchvision {y}");
        }
        eprintln!("eval {iou}: AP {:.4} vs {:.4}", a[0], b[0]);
        assert!(b[0] > 0.05, "{iou}: the reference AP {} is too small to tell anything", b[0]);
    }
    // The written detections are valid COCO results with the dataset's image ids.
    let written: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&dets).unwrap()).unwrap();
    assert!(
        !written.is_empty() && written.iter().all(|d| d["image_id"].as_u64().is_some_and(|i| (1..=3).contains(&i)))
    );
}

/// `predict` on one 8000×8000 image with 100 detections stays within 2 GB
/// of peak memory (it used 7.9 GB with 20 detections when each pasted mask
/// was a full-image tensor): masks are pasted into their box windows and
/// encoded to RLE a bounded group at a time; the drawing is made from the
/// RLE runs.
#[test]
fn predict_memory_stays_bounded_on_a_huge_image() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("huge.jpg");
    image::RgbImage::from_pixel(8000, 8000, image::Rgb([120, 110, 100])).save(&image).unwrap();
    let sets = ["model.backbone_depth=18".to_string(), "model.num_classes=3".to_string()];
    let config = maskrcnn::Config::load(None, &sets).unwrap();
    let weights = tmp.path().join("w.safetensors");
    maskrcnn::MaskRcnn::new(&config, tch::Device::Cpu).unwrap().save(&weights).unwrap();
    let json = tmp.path().join("d.json");
    // Above input.max_image_pixels: refused from the header, named.
    let o = Command::new(maskrcnn_bin())
        .args(["predict", "--device", "cpu", "--weights", weights.to_str().unwrap()])
        .args(["--set", &sets[0], "--set", &sets[1], "--set", "input.max_image_pixels=50000000"])
        .arg(&image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("huge.jpg: 8000x8000 is 64 megapixels, above input.max_image_pixels (50 megapixels)"),
        "{err}"
    );
    #[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives its rusage
    let child = Command::new(maskrcnn_bin())
        .args(["predict", "--device", "cpu", "--weights", weights.to_str().unwrap()])
        .args(["--set", &sets[0], "--set", &sets[1]])
        .args(["--set", "roi_heads.score_thresh=0", "--set", "roi_heads.detections_per_img=100"])
        .args(["--json", json.to_str().unwrap(), "--draw", tmp.path().join("drawn").to_str().unwrap()])
        .arg(&image)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Peak resident memory of this child alone (wait4's rusage).
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, filling plain-old-data out-parameters.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "predict failed: status {status}");
    let peak_gib = usage.ru_maxrss as f64 / (1 << 20) as f64; // kilobytes on Linux
    let dets: Vec<Det> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    eprintln!("8000×8000, {} detections: peak RSS {peak_gib:.2} GiB", dets.len());
    assert!(dets.len() >= 50, "only {} detections", dets.len());
    assert!(dets.iter().all(|d| d.segmentation.size == [8000, 8000]));
    assert!(peak_gib <= 2.0, "peak RSS {peak_gib:.2} GiB");
}
