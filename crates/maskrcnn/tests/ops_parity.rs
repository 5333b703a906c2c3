//! Op-level parity with torchvision.ops (nms, batched_nms, box_iou,
//! roi_align) on random and edge-case inputs: CPU here, CUDA on the GPU machine.

mod common;

use common::*;
use maskrcnn::ops::{batched_nms, box_iou, nms, roi_align};
use std::collections::HashMap;
use tch::{Device, Tensor};

fn cases(device: Device) -> HashMap<String, Tensor> {
    let tag = if device == Device::Cpu { "cpu" } else { "cuda" };
    let path = fixture_dir().join(format!("ops_cases_{tag}.safetensors"));
    run_reference("ops_cases.py", &[path.to_str().unwrap(), tag], &path);
    load(&path, device)
}

fn names(t: &HashMap<String, Tensor>, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> =
        t.keys().filter(|k| k.starts_with(prefix)).filter_map(|k| k.split('.').next().map(String::from)).collect();
    v.sort();
    v.dedup();
    v
}

fn check_all(device: Device) {
    let t = cases(device);
    let nms_cases = names(&t, "nms");
    assert!(nms_cases.len() >= 8);
    for c in &nms_cases {
        let g = |k: &str| &t[&format!("{c}.{k}")];
        let thr = g("thr").double_value(&[0]);
        let keep = nms(g("boxes"), g("scores"), thr);
        assert_eq!(to_vec_i64(&keep), to_vec_i64(g("keep")), "{c}: nms (n={})", g("boxes").size()[0]);
        let bkeep = batched_nms(g("boxes"), g("scores"), g("idxs"), thr);
        assert_eq!(to_vec_i64(&bkeep), to_vec_i64(g("batched_keep")), "{c}: batched_nms");
        assert_eq!(keep.device(), device);
    }
    for c in names(&t, "iou") {
        let g = |k: &str| &t[&format!("{c}.{k}")];
        let ours = box_iou(g("a"), g("b"));
        assert_eq!(ours.size(), g("iou").size(), "{c}");
        let (o, r) = (ours.nan_to_num(-1.0, None, None), g("iou").nan_to_num(-1.0, None, None));
        assert!(max_abs_diff(&o, &r) <= 1e-6, "{c}: box_iou differs by {}", max_abs_diff(&o, &r));
    }
    for c in names(&t, "roi") {
        let g = |k: &str| &t[&format!("{c}.{k}")];
        let p = g("params").to_device(Device::Cpu);
        let (scale, size, ratio, aligned) = (
            p.double_value(&[0]),
            p.double_value(&[1]) as i64,
            p.double_value(&[2]) as i64,
            p.double_value(&[3]) > 0.5,
        );
        let ours = roi_align(g("feats"), g("rois"), (size, size), scale, ratio, aligned);
        assert_eq!(ours.size(), g("pooled").size(), "{c}");
        let d = max_abs_diff(&ours, g("pooled"));
        let scale = if ours.numel() == 0 { 1.0 } else { g("pooled").abs().max().double_value(&[]).max(1e-12) };
        let rel = d / scale;
        eprintln!("{c}: roi_align max |Δ| {d:.1e} ({rel:.1e} of the largest value)");
        // Bit-identical arithmetic on the CPU; torchvision's CUDA kernel fuses
        // multiply-adds, which moves the last bits.
        let bound = if device == Device::Cpu { 1e-6 } else { 1e-5 };
        assert!(rel <= bound, "{c}: roi_align differs by {rel:.2e} relative");
    }
}

#[test]
fn ops_match_torchvision_cpu() {
    check_all(Device::Cpu);
}

#[test]
fn gpu_ops_match_torchvision_cuda() {
    if let Some(dev) = cuda_or_skip("gpu_ops_match_torchvision_cuda") {
        check_all(dev);
    }
}

#[test]
fn roi_align_is_differentiable_wrt_features() {
    let feats = Tensor::randn([1, 2, 8, 8], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
    let rois = Tensor::from_slice(&[0f32, 1.0, 1.0, 6.0, 5.0]).reshape([1, 5]);
    let out = roi_align(&feats, &rois, (2, 2), 1.0, 2, false);
    out.sum(tch::Kind::Float).backward();
    let grad = feats.grad();
    // Gradients of all samples sum to the number of outputs per channel.
    let total = grad.sum(tch::Kind::Float).double_value(&[]);
    assert!((total - 8.0).abs() < 1e-4, "{total}");
}

fn check_training_ops(device: Device) {
    use maskrcnn::ops::{BalancedSampler, BoxCoder, FgBgSampler, Matcher, SampleStage};
    use maskrcnn::structures::masks::project_masks_on_boxes;
    let t = cases(device);
    let matcher_cases = names(&t, "match");
    assert!(matcher_cases.len() >= 5);
    for c in matcher_cases {
        let g = |k: &str| &t[&format!("{c}.{k}")];
        let p = g("params").to_device(Device::Cpu);
        let m = Matcher {
            high_threshold: p.double_value(&[0]),
            low_threshold: p.double_value(&[1]),
            allow_low_quality_matches: p.double_value(&[2]) > 0.5,
        };
        assert_eq!(to_vec_i64(&m.assign(g("quality"))), to_vec_i64(g("matches")), "{c}: matcher");
    }
    for c in names(&t, "coder") {
        let g = |k: &str| &t[&format!("{c}.{k}")];
        let w = g("weights").to_device(Device::Cpu);
        let coder =
            BoxCoder::new([w.double_value(&[0]), w.double_value(&[1]), w.double_value(&[2]), w.double_value(&[3])]);
        let enc = coder.encode(g("ref"), g("props"));
        assert!(
            max_abs_diff(&enc, g("encoded")) <= 1e-5,
            "{c}: encode differs by {}",
            max_abs_diff(&enc, g("encoded"))
        );
        let dec = coder.decode(g("deltas"), g("props")).reshape([-1, 12]);
        let rel = max_abs_diff(&dec, g("decoded")) / g("decoded").abs().max().double_value(&[]);
        assert!(rel <= 1e-6, "{c}: decode differs by {rel} relative");
    }
    for c in names(&t, "masktgt") {
        let g = |k: &str| &t[&format!("{c}.{k}")];
        let ours = project_masks_on_boxes(g("masks"), g("boxes"), g("matched"), 28);
        let d = max_abs_diff(&ours, g("targets"));
        eprintln!("{c}: mask targets max |Δ| {d:.1e}");
        assert!(d <= 1e-5, "{c}: mask targets differ by {d}");
    }
    for c in names(&t, "sampler") {
        // Images of different anchor counts, padded with ignored positions.
        let labels: Vec<Tensor> = (0..4).map(|i| t[&format!("{c}.labels{i}")].to_kind(tch::Kind::Int64)).collect();
        let p = labels.iter().map(|l| l.size()[0]).max().unwrap();
        let pad = |l: &Tensor, v: i64| {
            Tensor::cat(&[l.shallow_clone(), l.new_full([p - l.size()[0]], v, (l.kind(), l.device()))], 0)
        };
        let batch = Tensor::stack(&labels.iter().map(|l| pad(l, -1)).collect::<Vec<_>>(), 0);
        let exists = Tensor::stack(&labels.iter().map(|l| pad(&l.ones_like(), 0)).collect::<Vec<_>>(), 0)
            .to_kind(tch::Kind::Bool);
        let s = BalancedSampler.sample(SampleStage::Rpn, &batch, &exists, 256, 0.5);
        let sampled = batch.gather(1, &s.index, false);
        for i in 0..4 {
            let (lab, valid) = (sampled.get(i), s.valid.get(i));
            let pos = lab.ge(1).logical_and(&valid).sum(tch::Kind::Int64).int64_value(&[]);
            let neg = lab.eq(0).logical_and(&valid).sum(tch::Kind::Int64).int64_value(&[]);
            let counts = to_vec_i64(&t[&format!("{c}.counts{i}")]);
            assert_eq!(vec![pos, neg], counts, "{c}: image {i}: sample counts");
            // Every sample is a positive or a negative, never an ignored one.
            assert_eq!(pos + neg, valid.sum(tch::Kind::Int64).int64_value(&[]), "{c}: image {i}: ignored sampled");
        }
    }
}

#[test]
fn training_ops_match_torchvision_cpu() {
    check_training_ops(Device::Cpu);
}

#[test]
fn gpu_training_ops_match_torchvision_cuda() {
    if let Some(dev) = cuda_or_skip("gpu_training_ops_match_torchvision_cuda") {
        check_training_ops(dev);
    }
}

/// Polygon mask targets equal pycocotools' rasterization of the same cropped
/// and scaled polygons (maskrcnn_benchmark's procedure), exactly.
#[test]
fn polygon_mask_targets_match_pycocotools() {
    use maskrcnn::structures::masks::polygon_mask_targets;
    let t = cases(Device::Cpu);
    let found = names(&t, "polytgt");
    assert!(!found.is_empty(), "no polygon cases (pycocotools missing in the oracle's python?)");
    for c in found {
        let g = |k: &str| &t[&format!("{c}.{k}")];
        let coords: Vec<f64> = {
            let v = g("coords").to_kind(tch::Kind::Double);
            let mut out = vec![0f64; v.numel()];
            v.copy_data(&mut out, v.numel());
            out
        };
        let lengths = to_vec_i64(g("lengths"));
        let mut instances: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut at = 0usize;
        for pair in lengths.chunks(2) {
            let (inst, len) = (pair[0] as usize, pair[1] as usize);
            if instances.len() <= inst {
                instances.resize(inst + 1, Vec::new());
            }
            instances[inst].push(coords[at..at + len].to_vec());
            at += len;
        }
        let ours = polygon_mask_targets(&instances, g("boxes"), g("matched"), 28, Device::Cpu);
        let d = max_abs_diff(&ours, g("targets"));
        assert_eq!(d, 0.0, "{c}: polygon targets differ from pycocotools");
    }
}
