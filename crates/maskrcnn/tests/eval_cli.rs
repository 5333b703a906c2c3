//! `maskrcnn eval --ann GT --results DETS`: the 12 COCO numbers for bbox and
//! segm equal pycocotools' within 1e-6 (oracle: tests/reference/eval_fixture.py:
//! 10 categories, polygons / compressed / uncompressed-RLE crowds, an image
//! without ground truth, one without detections, one with 130+ detections,
//! small/medium/large areas), and bad results files are one-line errors.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    let dir = fixture_dir().join("eval");
    run_reference("eval_fixture.py", &[dir.to_str().unwrap()], &dir.join("expected.json"));
    dir
}

fn eval(gt: &Path, dets: &Path, metrics: Option<&Path>) -> Output {
    let mut cmd = Command::new(maskrcnn_bin());
    cmd.args(["eval", "--ann", gt.to_str().unwrap(), "--results", dets.to_str().unwrap()]);
    if let Some(m) = metrics {
        cmd.args(["--metrics", m.to_str().unwrap()]);
    }
    cmd.output().unwrap()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn stats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn bbox_and_segm_stats_equal_pycocotools() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("metrics.json");
    let o = eval(&dir.join("gt.json"), &dir.join("dets.json"), Some(&m));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("IoU type: bbox") && out.contains("IoU type: segm"), "{out}");
    assert!(out.contains("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"), "{out}");
    let ours = read_json(&m);
    let expected = read_json(&dir.join("expected.json"));
    for iou in ["bbox", "segm"] {
        let (a, b) = (stats(&ours[iou]["stats"]), stats(&expected[iou]));
        assert_eq!(a.len(), 12);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-6, "{iou} stat {i}: ours {x} pycocotools {y}");
        }
        eprintln!("{iou}: AP {:.4} (pycocotools {:.4}), all 12 equal", a[0], b[0]);
    }
}

#[test]
fn empty_results_score_as_pycocotools_does() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("metrics.json");
    let o = eval(&dir.join("gt.json"), &dir.join("dets_empty.json"), Some(&m));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = stats(&read_json(&m)["bbox"]["stats"]);
    let expected = stats(&read_json(&dir.join("expected.json"))["empty_bbox"]);
    assert_eq!(ours, expected);
}

fn assert_one_line_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail");
    assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn bad_results_are_one_line_errors() {
    let dir = fixture();
    let gt = dir.join("gt.json");
    let tmp = tempfile::tempdir().unwrap();
    let dets = read_json(&dir.join("dets.json"));
    let write = |name: &str, v: &serde_json::Value| {
        let p = tmp.path().join(name);
        std::fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
        p
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = dets.clone();
        f(&mut v[2]);
        v
    };
    let p = write("img.json", &with(&|d| d["image_id"] = 999.into()));
    assert_one_line_error(&eval(&gt, &p, None), "detection 2: image_id 999 is not in the ground truth");
    let p = write("cat.json", &with(&|d| d["category_id"] = 2.into()));
    assert_one_line_error(&eval(&gt, &p, None), "detection 2: category_id 2 is not in the ground truth");
    let p = write("box.json", &with(&|d| d["bbox"] = serde_json::json!([1.0, 2.0, -3.0, 4.0])));
    assert_one_line_error(&eval(&gt, &p, None), "non-negative width and height");
    let p = write("rle.json", &with(&|d| d["segmentation"]["counts"] = "zz".into()));
    assert_one_line_error(&eval(&gt, &p, None), "detection 2: malformed RLE");
    let p = write("score.json", &with(&|d| d["score"] = serde_json::Value::Null));
    assert_one_line_error(&eval(&gt, &p, None), "score must be a finite number");
    let p = tmp.path().join("broken.json");
    std::fs::write(&p, "[{\"image_id\": 1,\n \"bbox\": [1, 2").unwrap();
    assert_one_line_error(&eval(&gt, &p, None), "line 2");
    // Ground truth without segmentations, results with masks.
    let mut g = read_json(&gt);
    for a in g["annotations"].as_array_mut().unwrap() {
        a.as_object_mut().unwrap().remove("segmentation");
    }
    let bare = write("bare_gt.json", &g);
    assert_one_line_error(&eval(&bare, &dir.join("dets.json"), None), "has no segmentations");
    assert_one_line_error(&eval(Path::new("/nonexistent/gt.json"), &p, None), "cannot read ground truth");
}

/// COCO allows images without height/width: box results still evaluate, to
/// the same numbers (masks then need the sizes, which hotcoco says in one line).
#[test]
fn ground_truth_without_image_sizes_still_evaluates() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut g = read_json(&dir.join("gt.json"));
    for im in g["images"].as_array_mut().unwrap() {
        let im = im.as_object_mut().unwrap();
        im.remove("height");
        im.remove("width");
    }
    let gt = tmp.path().join("gt.json");
    std::fs::write(&gt, serde_json::to_string(&g).unwrap()).unwrap();
    let mut dets = read_json(&dir.join("dets.json"));
    for d in dets.as_array_mut().unwrap() {
        d.as_object_mut().unwrap().remove("segmentation");
    }
    let boxes_only = tmp.path().join("boxes.json");
    std::fs::write(&boxes_only, serde_json::to_string(&dets).unwrap()).unwrap();
    let m = tmp.path().join("m.json");
    let o = eval(&gt, &boxes_only, Some(&m));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = stats(&read_json(&m)["bbox"]["stats"]);
    let expected = stats(&read_json(&dir.join("expected.json"))["bbox"]);
    assert_eq!(ours, expected);
    assert_one_line_error(&eval(&gt, &dir.join("dets.json"), None), "needs `height` and `width`");
}
