//! Non-maximum suppression, as `torchvision.ops.nms` / `batched_nms`, and
//! greedy NMS of many groups at once ([`grouped_nms_keep`], what the
//! training step's proposal selection uses).
//!
//! Scores are sorted (stably, as torchvision's kernels) on the tensors'
//! device. On the CPU the greedy pass runs over the sorted boxes with
//! torchvision's float32 IoU arithmetic. On CUDA the same arithmetic fills a
//! "suppresses" bit matrix and the greedy pass walks it, both on the device
//! (`kernels::nms`); per-category NMS handles all categories in one pass.

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
    let sorted = boxes.index_select(0, &order).to_kind(Kind::Float).unsqueeze(0);
    let valid = Tensor::ones([1, n], (Kind::Bool, device));
    let keep = grouped_nms_keep(&sorted, &valid, iou_threshold).squeeze_dim(0);
    order.masked_select(&keep)
}

/// Greedy NMS of `G` groups at once: `boxes` `[G, M, 4]` holds each group's
/// boxes sorted by decreasing score, `valid` `[G, M]` (bool) the boxes that
/// take part (the others are neither kept nor suppress). Returns `[G, M]`
/// bool on `boxes`' device, true for the kept boxes. On CUDA it never leaves
/// the device (no host sync); on the CPU each group is walked on the host.
pub fn grouped_nms_keep(boxes: &Tensor, valid: &Tensor, iou_threshold: f64) -> Tensor {
    if let Some(keep) = crate::kernels::nms::keep_mask(boxes, valid, iou_threshold) {
        return keep;
    }
    let device = boxes.device();
    let (g, m) = (boxes.size()[0], boxes.size()[1]);
    let coords = to_vec_f32(&boxes.to_kind(Kind::Float).reshape([-1]));
    let flags = super::boxes::to_vec_i64(&valid.to_kind(Kind::Int64).reshape([-1]));
    let mut keep = vec![false; (g * m) as usize];
    for gi in 0..g as usize {
        let rows = gi * m as usize..(gi + 1) * m as usize;
        let members: Vec<usize> = rows.clone().filter(|&r| flags[r] != 0).collect();
        let member_coords: Vec<f32> = members.iter().flat_map(|&r| coords[4 * r..4 * r + 4].iter().copied()).collect();
        for p in greedy_nms_sorted(&member_coords, iou_threshold) {
            keep[members[p as usize]] = true;
        }
    }
    Tensor::from_slice(&keep).reshape([g, m]).to_device(device)
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

/// [`batched_nms`] as separate NMS calls per category (torchvision's
/// `_batched_nms_vanilla`): the IoUs of the boxes' own coordinates, without
/// the coordinate trick's offsets, whatever the number of categories. On
/// CUDA all categories are suppressed in one device pass.
pub fn batched_nms_per_category(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    let mut keep_mask = Tensor::zeros_like(scores).to_kind(Kind::Bool);
    if boxes.device() == Device::Cpu {
        let (categories, _, _) = idxs.unique_dim(0, true, false, false);
        for c in super::boxes::to_vec_i64(&categories) {
            let current = idxs.eq(c).nonzero().squeeze_dim(1);
            let kept = nms(&boxes.index_select(0, &current), &scores.index_select(0, &current), iou_threshold);
            let _ = keep_mask.index_fill_(0, &current.index_select(0, &kept), 1);
        }
    } else {
        let kept = per_category_on_device(boxes, scores, idxs, iou_threshold);
        let _ = keep_mask.index_fill_(0, &kept, 1);
    }
    let keep = keep_mask.nonzero().squeeze_dim(1);
    // Unstable, as torchvision's `scores[keep].sort(descending=True)`: equal
    // scores (e.g. proposals from padded regions) come out in its order.
    let (_, order) = scores.index_select(0, &keep).sort(0, true);
    keep.index_select(0, &order)
}

/// Per-category NMS of every category in one device pass: boxes are ordered
/// by category and, within it, by decreasing score with ties in index order
/// (exactly the order torchvision's per-category calls see), laid out as
/// `[categories, max count, 4]`, and suppressed by [`grouped_nms_keep`].
/// Returns the kept indices (any order).
fn per_category_on_device(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    let device = boxes.device();
    let (_, by_score) = scores.sort_stable(true, 0, true);
    let (_, by_category) = idxs.index_select(0, &by_score).sort_stable(true, 0, false);
    let order = by_score.index_select(0, &by_category); // grouped, score-sorted
    let cats = idxs.index_select(0, &order);
    let (_, inverse, counts) = cats.unique_consecutive(true, true, 0);
    let counts_v = super::boxes::to_vec_i64(&counts);
    let g = counts_v.len() as i64;
    let m = counts_v.iter().copied().max().unwrap_or(0);
    let starts: Vec<i64> = counts_v
        .iter()
        .scan(0, |acc, &c| {
            let s = *acc;
            *acc += c;
            Some(s)
        })
        .collect();
    let starts_t = Tensor::from_slice(&starts).to_device(device);
    let rank = Tensor::arange(order.size()[0], (Kind::Int64, device)) - starts_t.index_select(0, &inverse);
    let flat_pos = &inverse * m + &rank;
    let grouped = Tensor::zeros([g * m, 4], (Kind::Float, device))
        .index_copy(0, &flat_pos, &boxes.index_select(0, &order).to_kind(Kind::Float))
        .reshape([g, m, 4]);
    let valid = Tensor::zeros([g * m], (Kind::Bool, device)).index_fill(0, &flat_pos, 1).reshape([g, m]);
    let keep = grouped_nms_keep(&grouped, &valid, iou_threshold).reshape([-1]).index_select(0, &flat_pos);
    order.masked_select(&keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_boxes(n: i64, seed: i64) -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(seed);
        let xy = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 100.0;
        let wh = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 40.0;
        let boxes = Tensor::cat(&[&xy, &(&xy + wh)], 1);
        // Quantized scores: many ties.
        let scores = (Tensor::rand([n], (Kind::Float, Device::Cpu)) * 8.0).floor() / 8.0;
        let idxs = Tensor::randint(7, [n], (Kind::Int64, Device::Cpu));
        (boxes, scores, idxs)
    }

    /// Per-category NMS through the grouped pass equals one plain NMS per
    /// category, and the grouped pass with some boxes left out equals the
    /// greedy pass over the others (on the device tested: any device).
    fn grouped_pass_equals_per_group_greedy(device: Device) {
        for (n, thr) in [(1, 0.5), (9, 0.5), (300, 0.5), (700, 0.3), (257, 0.7)] {
            let (boxes, scores, idxs) = random_boxes(n, n);
            let (boxes, scores, idxs) = (boxes.to_device(device), scores.to_device(device), idxs.to_device(device));
            let mut per_cat = crate::ops::boxes::to_vec_i64(&per_category_on_device(&boxes, &scores, &idxs, thr));
            per_cat.sort();
            let mut reference = Vec::new();
            for c in 0..7 {
                let current = idxs.eq(c).nonzero().squeeze_dim(1);
                let kept = nms(&boxes.index_select(0, &current), &scores.index_select(0, &current), thr);
                reference.extend(crate::ops::boxes::to_vec_i64(&current.index_select(0, &kept)));
            }
            reference.sort();
            assert_eq!(per_cat, reference, "n={n}: per-category");

            let (_, order) = scores.sort_stable(true, 0, true);
            let sorted = boxes.index_select(0, &order);
            let valid = Tensor::rand([n], (Kind::Float, device)).gt(0.3);
            let keep = grouped_nms_keep(&sorted.unsqueeze(0), &valid.unsqueeze(0), thr).squeeze_dim(0);
            let members = valid.nonzero().squeeze_dim(1);
            let expected = greedy_nms_sorted(&to_vec_f32(&sorted.index_select(0, &members).reshape([-1])), thr);
            let expected: Vec<i64> = crate::ops::boxes::to_vec_i64(
                &members.index_select(0, &Tensor::from_slice(&expected).to_device(device)),
            );
            let got = crate::ops::boxes::to_vec_i64(&keep.nonzero().squeeze_dim(1));
            assert_eq!(got, expected, "n={n}: grouped pass with left-out boxes");
        }
    }

    #[test]
    fn grouped_pass_equals_per_group_greedy_cpu() {
        grouped_pass_equals_per_group_greedy(Device::Cpu);
    }

    #[test]
    fn gpu_grouped_pass_equals_per_group_greedy() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_grouped_pass_equals_per_group_greedy") else {
            return;
        };
        grouped_pass_equals_per_group_greedy(device);
    }
}
