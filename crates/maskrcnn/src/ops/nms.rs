//! Non-maximum suppression, as `torchvision.ops.nms` / `batched_nms`.
//!
//! Scores are sorted (stably, as torchvision's kernels) on the tensors' device;
//! the greedy pass then runs on the CPU over the sorted
//! boxes with torchvision's float32 IoU arithmetic. A fused CUDA kernel can
//! replace the greedy pass later without changing results.

use super::boxes::to_vec_f32;
use tch::{Device, Kind, Tensor};

/// Indices `[K]` (int64, on `boxes`' device) of the boxes `[N, 4]` (xyxy) kept
/// by greedy NMS: a box is dropped when its IoU with a higher-scoring kept box
/// is `> iou_threshold`. Sorted by decreasing score.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    let device = boxes.device();
    let n = boxes.size()[0];
    if n == 0 {
        return Tensor::empty([0], (Kind::Int64, device));
    }
    // Stable, as torchvision's kernels (checked: equal scores keep index order).
    let (_, order) = scores.sort_stable(true, 0, true);
    let sorted = boxes.index_select(0, &order);
    let coords = to_vec_f32(&sorted.to_kind(Kind::Float).reshape([-1]));
    let kept_positions = greedy_nms_sorted(&coords, iou_threshold);
    let pos = Tensor::from_slice(&kept_positions).to_device(device);
    order.index_select(0, &pos)
}

/// Greedy NMS over boxes already sorted by decreasing score (`coords` is
/// `[x1, y1, x2, y2]` per box, flattened). Returns the kept positions.
pub fn greedy_nms_sorted(coords: &[f32], iou_threshold: f64) -> Vec<i64> {
    let n = coords.len() / 4;
    let b = |i: usize| (coords[4 * i], coords[4 * i + 1], coords[4 * i + 2], coords[4 * i + 3]);
    let areas: Vec<f32> = (0..n)
        .map(|i| {
            let (x1, y1, x2, y2) = b(i);
            (x2 - x1) * (y2 - y1)
        })
        .collect();
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for i in 0..n {
        if suppressed[i] {
            continue;
        }
        keep.push(i as i64);
        let (ix1, iy1, ix2, iy2) = b(i);
        for j in (i + 1)..n {
            if suppressed[j] {
                continue;
            }
            let (jx1, jy1, jx2, jy2) = b(j);
            let w = (ix2.min(jx2) - ix1.max(jx1)).max(0.0);
            let h = (iy2.min(jy2) - iy1.max(jy1)).max(0.0);
            let inter = w * h;
            let ovr = inter / (areas[i] + areas[j] - inter);
            if f64::from(ovr) > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// NMS applied independently per category `idxs` `[N]`; returns kept indices
/// sorted by decreasing score. Follows torchvision's choice of strategy (the
/// coordinate-offset trick for small inputs, per-category NMS for large ones:
/// more than 1,000 boxes on the CPU, 25,000 on CUDA), since the two round
/// coordinates differently.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    let limit = if boxes.device() == Device::Cpu { 4000 } else { 100_000 };
    if boxes.numel() > limit {
        batched_nms_per_category(boxes, scores, idxs, iou_threshold)
    } else {
        batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)
    }
}

fn batched_nms_coordinate_trick(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    if boxes.numel() == 0 {
        return Tensor::empty([0], (Kind::Int64, boxes.device()));
    }
    let max_coordinate = boxes.max();
    let offsets = idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0);
    let shifted = boxes + offsets.unsqueeze(1);
    nms(&shifted, scores, iou_threshold)
}

fn batched_nms_per_category(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    let mut keep_mask = Tensor::zeros_like(scores).to_kind(Kind::Bool);
    let (categories, _, _) = idxs.unique_dim(0, true, false, false);
    for c in super::boxes::to_vec_i64(&categories) {
        let current = idxs.eq(c).nonzero().squeeze_dim(1);
        let kept = nms(&boxes.index_select(0, &current), &scores.index_select(0, &current), iou_threshold);
        let _ = keep_mask.index_fill_(0, &current.index_select(0, &kept), 1);
    }
    let keep = keep_mask.nonzero().squeeze_dim(1);
    // Unstable, as torchvision's `scores[keep].sort(descending=True)`: equal
    // scores (e.g. proposals from padded regions) come out in its order.
    let (_, order) = scores.index_select(0, &keep).sort(0, true);
    keep.index_select(0, &order)
}
