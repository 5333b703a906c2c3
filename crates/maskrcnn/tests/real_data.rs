//! What a user with a labeling tool's COCO export meets, from the command
//! line: box-only and mixed annotations, missing ids, empty images, missing
//! files, EXIF photos, a byte-order mark, a bad validation set, an
//! evaluation that fails at the end of a run, and `predict`/`eval` on the
//! result. Each asserts the behaviour (counts, files, exit codes), not just
//! the absence of a panic. Small R18 runs on the CPU.

mod common;

use common::{maskrcnn_bin, python};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A synthetic train/val set in `dir`.
fn synth(dir: &Path, train: usize, val: usize) -> maskrcnn::data::synth::SynthOutput {
    maskrcnn::data::synth::generate(&maskrcnn::data::synth::SynthOptions {
        out: dir.to_path_buf(),
        train,
        val,
        seed: 3,
        size: (96, 128),
        annotations_only: false,
        profile: Default::default(),
    })
    .unwrap()
}

fn read(p: &Path) -> Value {
    maskrcnn::data::coco_json::read_json(p).unwrap()
}

fn write(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_string(v).unwrap()).unwrap();
}

/// A small, fast model and recipe; `extra` after.
fn sets(train_ann: &Path, train_images: &Path, extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        format!("data.train_ann='{}'", train_ann.display()),
        format!("data.train_images='{}'", train_images.display()),
    ];
    v.extend(common::small_model_sets());
    v.extend([
        "input.min_size_test=96".into(),
        "input.max_size_test=128".into(),
        "rpn.post_nms_top_n_train=200".into(),
        "roi_heads.batch_size_per_image=64".into(),
        "solver.ims_per_batch=2".into(),
        "solver.reference_batch=2".into(),
        "solver.max_iter=4".into(),
        "solver.steps=[3]".into(),
        "solver.warmup_iters=1".into(),
        "solver.log_period=1".into(),
        "dataloader.workers=1".into(),
    ]);
    v.extend(extra.iter().cloned());
    v
}

fn val_sets(data: &maskrcnn::data::synth::SynthOutput) -> Vec<String> {
    vec![
        format!("data.val_ann='{}'", data.val_ann.display()),
        format!("data.val_images='{}'", data.val_images.display()),
    ]
}

fn train(out: &Path, sets: &[String], extra_args: &[&str]) -> Output {
    let mut cmd = Command::new(maskrcnn_bin());
    cmd.args(["train", "--device", "cpu", "--output", out.to_str().unwrap()]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.args(extra_args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a short Python (PIL) snippet: what the tests use to write EXIF photos.
fn pil(code: &str) {
    let o = Command::new(python()).args(["-c", code]).output().unwrap();
    assert!(o.status.success(), "python: {}", String::from_utf8_lossy(&o.stderr));
}

/// Names in the safetensors header of `path`.
fn tensor_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect()
}

/// An export with every quirk of labeling tools at once: a byte-order mark,
/// box-only annotations written as `[]`, `[[]]` and without the key, a
/// polygon of two points, annotations without ids and a repeated id, an
/// image without annotations and one whose file is missing. It trains, and
/// the start-up report counts each.
#[test]
fn a_quirky_export_trains_and_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(&tmp.path().join("data"), 10, 0);
    let mut d = read(&data.train_ann);
    let cat = d["categories"][0]["id"].clone();
    let anns = d["annotations"].as_array_mut().unwrap();
    // One more below: the missing image's, without a segmentation.
    let non_crowd = anns.iter().filter(|a| a["iscrowd"] == 0).count() + 1;
    let mut expect = (0, 0, 1, 0); // [], [[]], no key, 2-point polygon
    for (k, a) in anns.iter_mut().filter(|a| a["iscrowd"] == 0).enumerate() {
        match k % 6 {
            0 => {
                a["segmentation"] = json!([]);
                expect.0 += 1;
            }
            1 => {
                a["segmentation"] = json!([[]]);
                expect.1 += 1;
            }
            2 => {
                a.as_object_mut().unwrap().remove("segmentation");
                expect.2 += 1;
            }
            3 => {
                a["segmentation"] = json!([[1.0, 1.0, 5.0, 5.0]]);
                expect.3 += 1;
            }
            _ => {}
        }
    }
    for a in anns.iter_mut().take(3) {
        a.as_object_mut().unwrap().remove("id");
    }
    let repeated = anns[4]["id"].clone();
    anns[5]["id"] = repeated;
    d["images"].as_array_mut().unwrap().push(json!({"id": 9001, "file_name": "empty.jpg", "width": 128, "height": 96}));
    d["images"].as_array_mut().unwrap().push(json!({"id": 9002, "file_name": "gone.jpg", "width": 128, "height": 96}));
    d["annotations"].as_array_mut().unwrap().push(
        json!({"id": 123456, "image_id": 9002, "category_id": cat, "bbox": [5, 5, 30, 30], "iscrowd": 0, "area": 900}),
    );
    std::fs::copy(data.train_images.join("000000000001.jpg"), data.train_images.join("empty.jpg")).unwrap();
    let export = tmp.path().join("export.json");
    std::fs::write(&export, format!("\u{feff}{}", serde_json::to_string(&d).unwrap())).unwrap();
    let out = tmp.path().join("run");
    let o = train(&out, &sets(&export, &data.train_images, &[]), &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let without = expect.0 + expect.1 + expect.2 + expect.3;
    for line in [
        format!(
            "{without} of {non_crowd} annotations have no mask ({} with no \"segmentation\", {} with an empty \"segmentation\", {} with only polygons of fewer than 3 points)",
            expect.2,
            expect.0 + expect.1,
            expect.3
        ),
        "3 annotations have no \"id\"".to_string(),
        "1 annotation repeats an earlier annotation's \"id\"".to_string(),
        "1 image has no usable annotation: dropped".to_string(),
        "train images: 1 file is missing (first: gone.jpg)".to_string(),
    ] {
        assert!(err.contains(&line), "{line:?} not in the report:\n{err}");
    }
    assert!(out.join("model_final.safetensors").is_file());
    assert!(tensor_names(&out.join("model_final.safetensors")).iter().any(|n| n.starts_with("roi_heads.mask_head")));
    // --strict: the missing file is an error before training.
    let o = train(&tmp.path().join("strict"), &sets(&export, &data.train_images, &[]), &["--strict"]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("strict") && err.contains("gone.jpg"), "{err}");
    assert!(!tmp.path().join("strict").join("model_final.safetensors").exists());
}

/// A box-only export (`"segmentation": []` everywhere, as CVAT writes boxes)
/// trains torchvision's Faster R-CNN: four losses, weights without a mask
/// head; predict writes boxes only, with image ids from `--ann`, and eval
/// scores them (bbox; segm skipped with a note).
#[test]
fn a_box_only_export_trains_box_detection() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(&tmp.path().join("data"), 8, 4);
    for path in [&data.train_ann, &data.val_ann] {
        let mut d = read(path);
        for a in d["annotations"].as_array_mut().unwrap() {
            a["segmentation"] = json!([]);
        }
        write(path, &d);
    }
    let out = tmp.path().join("run");
    let o = train(&out, &sets(&data.train_ann, &data.train_images, &val_sets(&data)), &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no annotation has a mask: training box detection only"), "{err}");
    assert!(err.contains("no annotation has a mask: bbox is evaluated, segm is not"), "{err}");
    let weights = out.join("model_final.safetensors");
    let names = tensor_names(&weights);
    assert!(names.iter().any(|n| n.starts_with("roi_heads.box_predictor")));
    assert!(!names.iter().any(|n| n.starts_with("roi_heads.mask_")), "a mask head in a box-only model");
    let summary = read(&out.join("summary.json"));
    let losses: Vec<&str> =
        summary["final_losses"].as_array().unwrap().iter().map(|l| l[0].as_str().unwrap()).collect();
    assert_eq!(losses, ["loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"]);
    assert!(summary["evals"][0]["segm_ap"].is_null(), "{summary}");
    let config = read_toml(&out.join("config.toml"));
    assert_eq!(
        (config["model"]["mask_on"].as_bool(), config["model"]["num_classes"].as_integer()),
        (Some(false), Some(7))
    );
    // predict: a folder, classes and mask head from the weights, ids from --ann.
    let dets = tmp.path().join("dets.json");
    let o = Command::new(maskrcnn_bin())
        .args(["predict", "--device", "cpu", "--weights", weights.to_str().unwrap()])
        .args(["--set", "input.min_size_test=96", "--set", "input.max_size_test=128"])
        .args(["--set", "model.backbone_depth=18", "--set", "model.fpn_channels=32"])
        .args(["--set", "roi_heads.representation_size=64"])
        .args(["--ann", data.val_ann.to_str().unwrap(), "--json", dets.to_str().unwrap()])
        .arg(&data.val_images)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let results = read(&dets);
    let results = results.as_array().unwrap();
    assert!(!results.is_empty());
    assert!(results.iter().all(|r| r["image_id"].is_u64() && r.get("segmentation").is_none()), "{:?}", results[0]);
    let m = tmp.path().join("m.json");
    let o = Command::new(maskrcnn_bin())
        .args(["eval", "--ann", data.val_ann.to_str().unwrap(), "--results", dets.to_str().unwrap()])
        .args(["--metrics", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = read(&m);
    assert!(metrics["bbox"]["stats"][0].as_f64().unwrap() >= 0.0 && metrics["segm"].is_null());
    assert_eq!(metrics["bbox"]["per_category"].as_array().unwrap().len(), 6);
}

fn read_toml(p: &Path) -> toml::Value {
    std::fs::read_to_string(p).unwrap().parse().unwrap()
}

/// Images without annotations: dropped and counted by default, kept as
/// negatives with `data.keep_empty_images`; a file whose images are all
/// empty says there is nothing to learn.
#[test]
fn images_without_annotations_are_counted_and_kept_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(&tmp.path().join("data"), 6, 0);
    let mut d = read(&data.train_ann);
    let first = d["images"][0]["id"].clone();
    d["annotations"].as_array_mut().unwrap().retain(|a| a["image_id"] != first);
    let ann = tmp.path().join("a.json");
    write(&ann, &d);
    let keep = ["data.keep_empty_images=true".to_string(), "solver.max_iter=1".into(), "solver.steps=[]".into()];
    let o = train(&tmp.path().join("keep"), &sets(&ann, &data.train_images, &keep), &[]);
    let err = stderr(&o);
    assert!(o.status.success() && err.contains("1 image has no usable annotation: kept as negatives"), "{err}");
    assert!(err.contains("training 6 images"), "{err}");
    d["annotations"] = json!([]);
    write(&ann, &d);
    let o = train(&tmp.path().join("none"), &sets(&ann, &data.train_images, &[]), &[]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("no image to train on") && err.contains("it has no annotations"),
        "{err}"
    );
    let o = train(&tmp.path().join("none2"), &sets(&ann, &data.train_images, &keep), &[]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("there is nothing to learn"), "{err}");
}

/// The validation set is checked before training: a missing image, and a
/// sideways phone photo (EXIF orientation 6) annotated in its stored size,
/// are reported at once (the second naming EXIF and the fix), left out of
/// every evaluation, and the run ends with its weights; `--strict` stops
/// before training. An image annotated upright trains and evaluates.
#[test]
fn a_bad_validation_set_is_found_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(&tmp.path().join("data"), 6, 4);
    let mut v = read(&data.val_ann);
    let images = v["images"].as_array_mut().unwrap();
    images[0]["file_name"] = json!("not-there.jpg");
    // Images 1 and 2 stored sideways with EXIF 6; image 1 annotated with
    // the stored size, image 2 upright (as the file says).
    let (one, two) =
        (images[1]["file_name"].as_str().unwrap().to_string(), images[2]["file_name"].as_str().unwrap().to_string());
    let (w, h) = (images[1]["width"].as_u64().unwrap(), images[1]["height"].as_u64().unwrap());
    for name in [&one, &two] {
        let p = data.val_images.join(name);
        pil(&format!(
            "from PIL import Image\nim = Image.open('{p}').transpose(Image.Transpose.ROTATE_90)\ne = Image.Exif(); e[0x0112] = 6\nim.save('{p}', quality=95, exif=e)",
            p = p.display()
        ));
    }
    images[1]["width"] = json!(h);
    images[1]["height"] = json!(w);
    write(&data.val_ann, &v);
    let out = tmp.path().join("run");
    let o = train(&out, &sets(&data.train_ann, &data.train_images, &val_sets(&data)), &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let report_at = err.find("data check:").expect("a data check report");
    let first_step = err.find("iter 1/").expect("a step log line");
    assert!(report_at < first_step, "the report comes before training:\n{err}");
    assert!(err.contains("1 file is missing (first: not-there.jpg)"), "{err}");
    assert!(
        err.contains("1 image has another size than annotated")
            && err.contains(&format!(
                "is {w}x{h} but the annotations say {h}x{w} (its EXIF orientation 6 turns the stored {h}x{w} upright"
            ))
            && err.contains("set input.exif = false"),
        "{err}"
    );
    assert!(err.contains("2 of 4 images could not be read and are left out of the evaluation"), "{err}");
    assert!(out.join("model_final.safetensors").is_file());
    let metrics = read(&out.join("eval").join("metrics_iter_0000004.json"));
    assert_eq!(metrics["images"], 2, "evaluated on the two readable images");
    let o =
        train(&tmp.path().join("strict"), &sets(&data.train_ann, &data.train_images, &val_sets(&data)), &["--strict"]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("the data check found 2 problem(s)"), "{err}");
    assert!(!err.contains("iter 1/"), "strict mode trained: {err}");
}

/// An evaluation that fails at the end of a run (the validation images gone
/// while training) is reported; the final weights and the last checkpoint
/// are on disk, and the run exits 0 with the failure in its summary.
#[test]
fn a_failing_final_evaluation_keeps_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(&tmp.path().join("data"), 6, 3);
    let out = tmp.path().join("run");
    let mut cmd = Command::new(maskrcnn_bin());
    cmd.args(["train", "--device", "cpu", "--output", out.to_str().unwrap()]);
    for s in sets(&data.train_ann, &data.train_images, &[val_sets(&data), vec!["solver.max_iter=40".into()]].concat()) {
        cmd.args(["--set", &s]);
    }
    let child = cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Once training runs, the validation images disappear.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 1 {
        assert!(started.elapsed().as_secs() < 300, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let moved = tmp.path().join("val-moved");
    std::fs::rename(&data.val_images, &moved).unwrap();
    std::fs::create_dir(&data.val_images).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("evaluation failed at iteration 40") && err.contains("the weights are kept"), "{err}");
    assert!(out.join("model_final.safetensors").is_file());
    assert!(out.join("checkpoints").join("iter_0000040").is_dir(), "no checkpoint of the last step");
    let summary = read(&out.join("summary.json"));
    let errors = summary["eval_errors"].as_array().unwrap();
    assert!(
        errors.len() == 1 && errors[0].as_str().unwrap().contains("none of its 3 images could be read"),
        "{summary}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("evaluation failed"));
}

/// `predict` on a phone photo (EXIF orientation 6) answers in the upright
/// image's pixels: the same detections as for the photo turned upright and
/// stored without EXIF (PNG, lossless), and none of the stored frame's.
#[test]
fn predict_turns_exif_photos_upright() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(&tmp.path().join("data"), 6, 1);
    let out = tmp.path().join("run");
    let o = train(&out, &sets(&data.train_ann, &data.train_images, &[]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let src = std::fs::read_dir(&data.val_images).unwrap().next().unwrap().unwrap().path();
    let (upright, sideways) = (tmp.path().join("photos/upright.png"), tmp.path().join("photos/sideways.png"));
    std::fs::create_dir_all(tmp.path().join("photos")).unwrap();
    pil(&format!(
        "from PIL import Image\nim = Image.open('{}').convert('RGB')\nim.save('{}')\ne = Image.Exif(); e[0x0112] = 6\nim.transpose(Image.Transpose.ROTATE_90).save('{}', exif=e)",
        src.display(),
        upright.display(),
        sideways.display()
    ));
    let predict = |image: &Path, extra: &[&str]| -> Vec<Value> {
        let json = tmp.path().join("p.json");
        let o = Command::new(maskrcnn_bin())
            .args(["predict", "--device", "cpu", "--weights", out.join("model_final.safetensors").to_str().unwrap()])
            .args(["--set", "input.min_size_test=96", "--set", "input.max_size_test=128"])
            .args(["--set", "model.backbone_depth=18", "--set", "model.fpn_channels=32"])
            .args(["--set", "roi_heads.representation_size=64", "--set", "roi_heads.mask_head_channels=16"])
            .args(extra)
            .args(["--json", json.to_str().unwrap()])
            .arg(image)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        read(&json).as_array().unwrap().clone()
    };
    let key = |r: &Value| (r["category_id"].clone(), r["bbox"].clone(), r["segmentation"]["size"].clone());
    let a: Vec<_> = predict(&upright, &[]).iter().map(key).collect();
    let b: Vec<_> = predict(&sideways, &[]).iter().map(key).collect();
    assert!(!a.is_empty());
    assert_eq!(a, b, "the EXIF photo is predicted upright");
    let stored: Vec<_> = predict(&sideways, &["--set", "input.exif=false"]).iter().map(key).collect();
    let size = a[0].2.as_array().unwrap().clone();
    let turned = json!([size[1], size[0]]);
    assert!(
        !stored.is_empty() && stored.iter().all(|k| k.2 == turned),
        "input.exif = false: the stored frame {turned}"
    );
}

/// `predict --ann` matches images to the annotation file by the end of
/// their path; an image not in it is an error before any prediction.
#[test]
fn predict_matches_images_to_the_annotation_file() {
    use maskrcnn::prediction::match_image_ids;
    let images = [(1, "val/a.jpg".to_string()), (2, "b.jpg".to_string()), (3, "x/b.jpg".to_string())];
    let p = |s: &str| PathBuf::from(s);
    assert_eq!(match_image_ids(&[p("data/val/a.jpg")], &images).unwrap(), [1]);
    assert!(match_image_ids(&[p("data/xval/a.jpg")], &images).unwrap_err().contains("1 of 1 images have no file_name"));
    // "b.jpg" and "x/b.jpg" both end "data/x/b.jpg": ambiguous.
    assert!(match_image_ids(&[p("data/x/b.jpg")], &images).unwrap_err().contains("match several"));
    assert_eq!(match_image_ids(&[p("y/b.jpg")], &images).unwrap(), [2]);
}

/// The validation categories must be the training set's: a category the
/// model cannot predict, or one it predicts that the validation file lacks,
/// is a problem in the report (an error with --strict); none in common
/// stops the run before training.
#[test]
fn validation_categories_are_checked_against_training() {
    use maskrcnn::data::coco::{CocoDataset, LoadOptions};
    use maskrcnn::engine::data_check::check_run_data;
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(&tmp.path().join("data"), 4, 2);
    let mut v = read(&data.val_ann);
    // Train has ids 1, 2, 3, 5, 8, 13: drop 13 from val, add 99 with an annotation.
    v["categories"].as_array_mut().unwrap().retain(|c| c["id"] != 13);
    v["categories"].as_array_mut().unwrap().push(json!({"id": 99, "name": "new"}));
    v["annotations"].as_array_mut().unwrap().retain(|a| a["category_id"] != 13);
    let image = v["images"][0]["id"].clone();
    v["annotations"].as_array_mut().unwrap().push(
        json!({"id": 5000, "image_id": image, "category_id": 99, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0}),
    );
    let val = tmp.path().join("val.json");
    write(&val, &v);
    let load = || {
        CocoDataset::load(&data.train_ann, &data.train_images, LoadOptions { drop_empty: true, ..Default::default() })
            .unwrap()
    };
    let decode = maskrcnn::data::image::DecodeOptions::default();
    let check = check_run_data(&mut load(), Some((val.as_path(), data.val_images.as_path())), decode, false).unwrap();
    let problems = check.problems.join("\n");
    assert!(problems.contains("categories 99 are not in the training set"), "{problems}");
    assert!(problems.contains("training categories 13 are not in it"), "{problems}");
    assert!(check.validation.is_some());
    let e = check_run_data(&mut load(), Some((val.as_path(), data.val_images.as_path())), decode, true).unwrap_err();
    assert!(e.to_string().contains("strict"), "{e}");
    v["categories"] = json!([{"id": 99, "name": "new"}]);
    write(&val, &v);
    let e = check_run_data(&mut load(), Some((val.as_path(), data.val_images.as_path())), decode, false).unwrap_err();
    assert!(e.to_string().contains("none of its category ids (99) is a training category"), "{e}");
}
