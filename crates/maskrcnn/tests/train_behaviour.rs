//! Training behaviour beyond parity: bad targets, crowds, frozen stages, and a
//! short SGD run that must drive the loss down.

mod common;

use common::replay::ReplaySampler;
use maskrcnn::ops::sampler::Samples;
use maskrcnn::ops::{BalancedSampler, FgBgSampler, SampleStage};
use maskrcnn::structures::{InstanceMasks, Target};
use maskrcnn::{Config, MaskRcnn};
use tch::{nn::OptimizerConfig, Device, Kind, Tensor};

fn config(extra: &[&str]) -> Config {
    let mut sets: Vec<String> = [
        "model.backbone_depth=18",
        "model.num_classes=4",
        "input.min_size=160",
        "input.max_size=240",
        "model.norm=\"frozen_bn\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).unwrap()
}

/// A 3×h×w image with `rects` (x0, y0, x1, y1, label) painted in label
/// colours on dark noise, and its target.
fn scene(h: i64, w: i64, rects: &[(i64, i64, i64, i64, i64)], crowd: bool) -> (Tensor, Target) {
    let img = Tensor::rand([3, h, w], (Kind::Float, Device::Cpu)) * 0.2;
    let mut boxes = Vec::new();
    let mut labels = Vec::new();
    let mut masks = Vec::new();
    for &(x0, y0, x1, y1, label) in rects {
        let colour = Tensor::from_slice(&[(label % 2) as f32, ((label / 2) % 2) as f32, 0.8]).reshape([3, 1, 1]);
        img.narrow(1, y0, y1 - y0).narrow(2, x0, x1 - x0).copy_(&colour.expand([3, y1 - y0, x1 - x0], false));
        let m = Tensor::zeros([h, w], (Kind::Uint8, Device::Cpu));
        let _ = m.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).fill_(1);
        boxes.extend([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
        labels.push(label);
        masks.push(m);
    }
    let n = rects.len() as i64;
    let target = Target {
        boxes: Tensor::from_slice(&boxes).reshape([n, 4]),
        labels: Tensor::from_slice(&labels),
        masks: InstanceMasks::Bitmaps(if masks.is_empty() {
            Tensor::zeros([0, h, w], (Kind::Uint8, Device::Cpu))
        } else {
            Tensor::stack(&masks, 0)
        }),
        iscrowd: crowd.then(|| Tensor::ones([n], (Kind::Bool, Device::Cpu))),
        has_mask: None,
    };
    (img, target)
}

#[test]
fn degenerate_and_inconsistent_targets_are_errors_naming_the_image() {
    let model = MaskRcnn::new(&config(&[]), Device::Cpu).unwrap();
    let (img, mut t) = scene(100, 120, &[(10, 10, 40, 50, 1)], false);
    let (img2, _) = scene(100, 120, &[], false);
    t.boxes = Tensor::from_slice(&[10f32, 10.0, 10.0, 50.0]).reshape([1, 4]);
    let (_, good) = scene(100, 120, &[(5, 5, 20, 20, 2)], false);
    let e =
        model.forward_train(&[img2, img.shallow_clone()], &[good, t], &mut BalancedSampler).unwrap_err().to_string();
    assert!(e.contains("image 1: box 0") && e.contains("no positive width"), "{e}");
    let (_, mut nan) = scene(100, 120, &[(10, 10, 40, 50, 1)], false);
    nan.boxes = Tensor::from_slice(&[f32::NAN, 10.0, 40.0, 50.0]).reshape([1, 4]);
    let e = model.forward_train(&[], &[], &mut BalancedSampler).unwrap_err().to_string();
    assert!(e.contains("at least one image"), "{e}");
    let e = model.forward_train(&[img.shallow_clone()], &[nan], &mut BalancedSampler).unwrap_err().to_string();
    assert!(e.contains("image 0: box 0"), "{e}");
    let (_, mut bad_label) = scene(100, 120, &[(10, 10, 40, 50, 1)], false);
    bad_label.labels = Tensor::from_slice(&[9i64]);
    let e = model.forward_train(&[img], &[bad_label], &mut BalancedSampler).unwrap_err().to_string();
    assert!(e.contains("label 9 is outside 1..4"), "{e}");
}

#[test]
fn crowd_regions_and_empty_images_produce_no_positives() {
    tch::manual_seed(0);
    let model = MaskRcnn::new(&config(&[]), Device::Cpu).unwrap();
    let (a, crowd) = scene(120, 160, &[(20, 20, 90, 100, 1), (100, 30, 150, 80, 2)], true);
    let (b, empty) = scene(140, 100, &[], false);
    let losses = model.forward_train(&[a, b], &[crowd, empty], &mut BalancedSampler).unwrap();
    // No positive anchor or proposal: every regression and mask loss is zero.
    assert_eq!(losses.rpn_box_reg.double_value(&[]), 0.0);
    assert_eq!(losses.box_reg.double_value(&[]), 0.0);
    assert_eq!(losses.mask.as_ref().unwrap().double_value(&[]), 0.0);
    assert!(losses.objectness.double_value(&[]) > 0.0 && losses.classifier.double_value(&[]) > 0.0);
    losses.total().backward();
}

#[test]
fn only_trainable_parameters_receive_gradients() {
    let model = MaskRcnn::new(&config(&[]), Device::Cpu).unwrap();
    let (img, t) = scene(120, 160, &[(20, 20, 90, 100, 1)], false);
    model.forward_train(&[img], &[t], &mut BalancedSampler).unwrap().total().backward();
    for (name, v) in model.vs.variables() {
        let frozen = name.starts_with("backbone.body.conv1")
            || name.starts_with("backbone.body.layer1")
            || name.contains("bn")
            || name.contains("downsample.1");
        if frozen {
            assert!(!v.requires_grad() && !v.grad().defined(), "{name} is frozen but has a gradient");
        } else {
            assert!(v.grad().defined(), "{name} received no gradient");
        }
    }
}

/// 50 SGD steps on four fixed synthetic images: the total loss must fall by
/// at least half. Prints the curve.
#[test]
fn fifty_sgd_steps_halve_the_loss() {
    tch::manual_seed(0);
    // Fewer proposals and samples than the recipe keep this CPU run short.
    let cheap = ["roi_heads.batch_size_per_image=128", "rpn.pre_nms_top_n_train=500", "rpn.post_nms_top_n_train=500"];
    let model = MaskRcnn::new(&config(&cheap), Device::Cpu).unwrap();
    let data: Vec<(Tensor, Target)> = vec![
        scene(120, 160, &[(20, 20, 90, 100, 1), (100, 30, 150, 80, 2)], false),
        scene(140, 100, &[(10, 40, 70, 120, 3)], false),
        scene(110, 150, &[(60, 10, 140, 60, 2), (5, 60, 50, 105, 1)], false),
        scene(130, 130, &[(30, 30, 100, 100, 3)], false),
    ];
    let mut opt =
        tch::nn::Sgd { momentum: 0.9, dampening: 0.0, wd: 1e-4, nesterov: false }.build(&model.vs, 0.01).unwrap();
    let mut curve = Vec::new();
    for step in 0..50 {
        let batch = [&data[(2 * step) % 4], &data[(2 * step + 1) % 4]];
        let images: Vec<Tensor> = batch.iter().map(|(i, _)| i.shallow_clone()).collect();
        let targets: Vec<Target> = batch.iter().map(|(_, t)| t.to_device(Device::Cpu)).collect();
        let loss = model.forward_train(&images, &targets, &mut BalancedSampler).unwrap().total();
        opt.zero_grad();
        loss.backward();
        opt.clip_grad_norm(10.0);
        opt.step();
        curve.push(loss.double_value(&[]));
    }
    let first: f64 = curve[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = curve[45..].iter().sum::<f64>() / 5.0;
    let shown: Vec<String> = curve.iter().step_by(5).map(|v| format!("{v:.3}")).collect();
    eprintln!("loss every 5 steps: {}; mean of first 5 {first:.3}, last 5 {last:.3}", shown.join(" "));
    assert!(last <= 0.5 * first, "loss fell from {first:.3} to {last:.3} only");
}

/// Polygon annotations train like their bitmaps: with the same samples, every
/// loss but the mask loss is identical, and the mask loss (targets rasterized
/// per RoI instead of cropped from the bitmap) is close.
#[test]
fn polygon_targets_train_like_bitmaps() {
    let model = MaskRcnn::new(&config(&[]), Device::Cpu).unwrap();
    let rects = [(20, 20, 90, 100, 1), (100, 30, 150, 80, 2)];
    let (img, bitmap_target) = scene(120, 160, &rects, false);
    let polygons: Vec<Vec<Vec<f64>>> = rects
        .iter()
        .map(|&(x0, y0, x1, y1, _)| {
            let (x0, y0, x1, y1) = (x0 as f64, y0 as f64, x1 as f64, y1 as f64);
            vec![vec![x0, y0, x1, y0, x1, y1, x0, y1]]
        })
        .collect();
    let polygon_target = Target {
        boxes: bitmap_target.boxes.shallow_clone(),
        labels: bitmap_target.labels.shallow_clone(),
        masks: InstanceMasks::Polygons(polygons),
        iscrowd: None,
        has_mask: None,
    };
    // The same samples for both passes: record the first pass's and replay
    // them (the global RNG is shared with tests running in parallel).
    let mut recorder = Recorder::default();
    let a = model.forward_train(&[img.shallow_clone()], &[bitmap_target], &mut recorder).unwrap();
    let mut replay = ReplaySampler { calls: recorder.calls.into() };
    let b = model.forward_train(&[img], &[polygon_target], &mut replay).unwrap();
    for ((name, x), (_, y)) in a.named().iter().zip(b.named().iter()).take(4) {
        assert_eq!(x.double_value(&[]), y.double_value(&[]), "{name}");
    }
    let (ma, mb) = (a.mask.as_ref().unwrap().double_value(&[]), b.mask.as_ref().unwrap().double_value(&[]));
    assert!((ma - mb).abs() <= 0.1 * ma, "mask loss {ma} (bitmaps) vs {mb} (polygons)");
}

/// Draws like `BalancedSampler` and keeps what it drew, for replay.
#[derive(Default)]
struct Recorder {
    calls: Vec<(SampleStage, Vec<(Tensor, Tensor)>)>,
}

impl FgBgSampler for Recorder {
    fn sample(&mut self, stage: SampleStage, labels: &Tensor, exists: &Tensor, batch: usize, fraction: f64) -> Samples {
        let drawn = BalancedSampler.sample(stage, labels, exists, batch, fraction);
        self.calls.push((stage, drawn.masks(labels, exists)));
        drawn
    }
}

/// Replayed masks come back as the same positions, positives first.
#[test]
fn replay_puts_recorded_masks_on_real_positions() {
    let labels = Tensor::from_slice(&[1i64, 0, -1, 0, 1, -1]).reshape([1, 6]);
    let exists = Tensor::from_slice(&[true, true, false, true, true, false]).reshape([1, 6]);
    let mut r = ReplaySampler::default();
    let rp = Tensor::from_slice(&[false, false, false, true]);
    let rn = Tensor::from_slice(&[false, true, true, false]);
    r.calls.push_back((SampleStage::RoiHeads, vec![(rp, rn)]));
    let s = r.sample(SampleStage::RoiHeads, &labels, &exists, 4, 0.25);
    assert_eq!(Vec::<i64>::try_from(s.index.reshape([-1])).unwrap()[..3], [4, 1, 3]);
    assert_eq!(Vec::<bool>::try_from(s.valid.reshape([-1])).unwrap(), [true, true, true, false]);
}

/// Box-only annotations (no mask) train the box losses and are left out of
/// the mask loss: with the same samples, the box losses equal those of the
/// fully masked target, what their (absent) mask holds never matters, and
/// a target without any mask has a mask loss of exactly 0 and no gradient
/// into the mask head.
#[test]
fn box_only_annotations_train_boxes_not_masks() {
    let model = MaskRcnn::new(&config(&[]), Device::Cpu).unwrap();
    let rects = [(20, 20, 90, 100, 1), (100, 30, 150, 80, 2)];
    let (img, full) = scene(120, 160, &rects, false);
    let with_has_mask = |t: &Target, has: [bool; 2], garbage: bool| Target {
        masks: match &t.masks {
            InstanceMasks::Bitmaps(m) if garbage => {
                let m = m.copy();
                let _ = m.get(1).fill_(1);
                InstanceMasks::Bitmaps(m)
            }
            InstanceMasks::Bitmaps(m) => InstanceMasks::Bitmaps(m.copy()),
            InstanceMasks::Polygons(p) => InstanceMasks::Polygons(p.clone()),
        },
        has_mask: Some(Tensor::from_slice(&has)),
        ..t.to_device(Device::Cpu)
    };
    let mut recorder = Recorder::default();
    let a = model.forward_train(&[img.shallow_clone()], &[full.to_device(Device::Cpu)], &mut recorder).unwrap();
    let calls: Vec<_> = recorder.calls;
    let replay = |target: Target| {
        let mut r = ReplaySampler {
            calls: calls.iter().map(|(s, v)| (*s, v.iter().map(|(p, n)| (p.copy(), n.copy())).collect())).collect(),
        };
        model.forward_train(&[img.shallow_clone()], &[target], &mut r).unwrap()
    };
    let b = replay(with_has_mask(&full, [true, false], false));
    let c = replay(with_has_mask(&full, [true, false], true));
    for ((name, x), (_, y)) in a.named().iter().zip(b.named().iter()).take(4) {
        assert_eq!(x.double_value(&[]), y.double_value(&[]), "{name}");
    }
    let mask = |l: &maskrcnn::modeling::Losses| l.mask.as_ref().unwrap().double_value(&[]);
    assert_eq!(mask(&b), mask(&c), "a box-only instance's mask contents are never read");
    assert!(mask(&a) > 0.0 && mask(&b) > 0.0 && mask(&a) != mask(&b), "{} vs {}", mask(&a), mask(&b));
    let none = replay(with_has_mask(&full, [false, false], false));
    assert_eq!(mask(&none), 0.0);
    none.total().backward();
    for (name, v) in model.vs.variables() {
        if name.contains("mask_") && v.grad().defined() {
            assert_eq!(v.grad().abs().sum(Kind::Double).double_value(&[]), 0.0, "{name}");
        }
    }
}

/// A COCO annotation without a mask becomes a target instance marked
/// mask-less (no polygons, an empty bitmap), not a rectangle; with
/// `data.box_as_mask` its box is its mask.
#[test]
fn annotations_without_masks_become_mask_less_targets() {
    use maskrcnn::data::coco::{CocoDataset, LoadOptions};
    use maskrcnn::data::transforms::to_target;
    let tmp = tempfile::tempdir().unwrap();
    let json = r#"{"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "categories": [{"id": 5, "name": "a"}],
        "annotations": [
          {"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12]]},
          {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 5, 10, 10], "segmentation": []},
          {"id": 3, "image_id": 1, "category_id": 5, "bbox": [5, 15, 10, 10], "segmentation": [[]]},
          {"id": 4, "image_id": 1, "category_id": 5, "bbox": [25, 15, 10, 10]}]}"#;
    let ann = tmp.path().join("a.json");
    std::fs::write(&ann, json).unwrap();
    let load = |box_as_mask| {
        CocoDataset::load(&ann, tmp.path(), LoadOptions { drop_empty: true, strict: true, box_as_mask }).unwrap()
    };
    let ds = load(false);
    assert_eq!((ds.report.empty_segmentation, ds.report.no_segmentation, ds.report.without_mask()), (2, 1, 3));
    let t = to_target(&ds.images[0].instances, 30, 40, false);
    assert_eq!(Vec::<bool>::try_from(t.has_mask.as_ref().unwrap()).unwrap(), [true, false, false, false]);
    match &t.masks {
        InstanceMasks::Polygons(p) => assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), [1, 0, 0, 0]),
        _ => panic!("polygons expected"),
    }
    let ds = load(true);
    let t = to_target(&ds.images[0].instances, 30, 40, false);
    assert!(t.has_mask.is_none(), "box_as_mask: every instance has a mask");
    match &t.masks {
        InstanceMasks::Polygons(p) => assert_eq!(p[1], vec![vec![20.0, 5.0, 30.0, 5.0, 30.0, 15.0, 20.0, 15.0]]),
        _ => panic!("polygons expected"),
    }
}
