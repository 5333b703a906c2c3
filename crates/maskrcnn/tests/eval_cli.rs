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
        // Per category: pycocotools' precision array averaged, to 1e-9.
        let theirs = expected[format!("{iou}_per_category")].as_object().unwrap();
        let rows = ours[iou]["per_category"].as_array().unwrap();
        assert_eq!(rows.len(), theirs.len(), "{iou}: one row per category");
        for row in rows {
            let id = row["id"].as_u64().unwrap().to_string();
            let want = stats(&theirs[&id]);
            for (k, key) in ["ap", "ap50"].iter().enumerate() {
                let got = row[key].as_f64().unwrap();
                assert!(
                    (got - want[k]).abs() <= 1e-9,
                    "{iou} category {id} {key}: ours {got}, pycocotools {}",
                    want[k]
                );
            }
        }
        // Printed worst first.
        let table: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{iou} AP per category")))
            .skip(2)
            .take(rows.len())
            .collect();
        let aps: Vec<f64> = table.iter().filter_map(|l| l.split_whitespace().nth(2)?.parse().ok()).collect();
        assert!(aps.len() >= 2 && aps.windows(2).all(|w| w[0] <= w[1]), "{iou} table not worst first: {table:?}");
    }
}

/// Ground truth whose annotation ids are missing or repeated is renumbered
/// (said so): results equal to the ground truth score AP 1 (a repeated id
/// made matching pair detections with the wrong annotation: AP 0.011).
#[test]
fn ground_truth_ids_missing_or_repeated_are_renumbered() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut g = read_json(&dir.join("gt.json"));
    let anns = g["annotations"].as_array_mut().unwrap();
    let results: Vec<serde_json::Value> = anns
        .iter()
        .filter(|a| a["iscrowd"] == 0)
        .map(|a| serde_json::json!({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}))
        .collect();
    for (i, a) in anns.iter_mut().enumerate() {
        if i % 3 == 0 {
            a.as_object_mut().unwrap().remove("id");
        } else {
            a["id"] = serde_json::json!(7);
        }
    }
    let gt = tmp.path().join("gt.json");
    // With a byte-order mark, as some Windows tools write.
    std::fs::write(&gt, format!("\u{feff}{}", serde_json::to_string(&g).unwrap())).unwrap();
    let dets = tmp.path().join("dets.json");
    std::fs::write(&dets, serde_json::to_string(&results).unwrap()).unwrap();
    let m = tmp.path().join("m.json");
    let o = eval(&gt, &dets, Some(&m));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("annotations renumbered") && err.contains("have no \"id\"") && err.contains("repeat"),
        "{err}"
    );
    let ap = stats(&read_json(&m)["bbox"]["stats"])[0];
    assert!((ap - 1.0).abs() < 1e-12, "bbox AP {ap}");
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
    assert_one_line_error(&eval(Path::new("/nonexistent/gt.json"), &p, None), "gt.json: cannot read");
    let p = tmp.path().join("nan.json");
    std::fs::write(&p, "[{\"image_id\": 1, \"category_id\": 1, \"bbox\": [1, 2, 3, 4], \"score\": NaN}]").unwrap();
    assert_one_line_error(&eval(&gt, &p, None), "entry 0 field \"score\" is NaN, which JSON does not allow");
}

/// Mask results against ground truth without masks: bbox evaluated (to
/// pycocotools' numbers), segm skipped with a note; ground truth with masks
/// on some annotations only: evaluated, the count noted.
#[test]
fn ground_truth_without_masks_is_evaluated_for_boxes() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut g = read_json(&dir.join("gt.json"));
    for a in g["annotations"].as_array_mut().unwrap() {
        a.as_object_mut().unwrap().remove("segmentation");
    }
    let bare = tmp.path().join("bare_gt.json");
    std::fs::write(&bare, serde_json::to_string(&g).unwrap()).unwrap();
    let m = tmp.path().join("m.json");
    let o = eval(&bare, &dir.join("dets.json"), Some(&m));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no annotation has a mask: bbox is evaluated, segm is not"), "{err}");
    let ours = read_json(&m);
    assert!(ours["segm"].is_null());
    assert_eq!(stats(&ours["bbox"]["stats"]), stats(&read_json(&dir.join("expected.json"))["bbox"]));
    let mut g = read_json(&dir.join("gt.json"));
    let anns = g["annotations"].as_array_mut().unwrap();
    let mut removed = 0;
    for a in anns.iter_mut().filter(|a| a["iscrowd"] == 0).step_by(4) {
        a.as_object_mut().unwrap().remove("segmentation");
        removed += 1;
    }
    let partial = tmp.path().join("partial_gt.json");
    std::fs::write(&partial, serde_json::to_string(&g).unwrap()).unwrap();
    let o = eval(&partial, &dir.join("dets.json"), None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("{removed} of ")) && err.contains("annotations have no mask: segm AP counts them"),
        "{err}"
    );
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
