//! Non-maximum suppression, as `torchvision.ops.nms` / `batched_nms`.
//!
//! Scores are sorted (stably, as torchvision's kernels) on the tensors'
//! device. On the CPU the greedy pass then runs over the sorted boxes with
//! torchvision's float32 IoU arithmetic. On CUDA the same IoU arithmetic runs
//! on the device for every pair, the "suppresses" bits are packed there and
//! copied once, and only the greedy walk over the bits runs on the host (the
//! scheme of torchvision's CUDA kernel, in tensor operations); per-category
//! NMS handles all categories in one such pass.

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
    let sorted = boxes.index_select(0, &order).to_kind(Kind::Float);
    let kept_positions = if device == Device::Cpu {
        greedy_nms_sorted(&to_vec_f32(&sorted.reshape([-1])), iou_threshold)
    } else {
        greedy_on_device_bits(&sorted.unsqueeze(0), &[n], iou_threshold).remove(0)
    };
    let pos = Tensor::from_slice(&kept_positions).to_device(device);
    order.index_select(0, &pos)
}

/// Greedy NMS of `G` groups of boxes at once: `groups` `[G, M, 4]` holds each
/// group's boxes sorted by decreasing score (padded past `counts[g]`). The IoU
/// of every pair within a group is compared with the threshold on the device
/// (torchvision's float32 arithmetic, compared in double as its CPU kernel),
/// packed 8 pairs a byte, copied to the host in row blocks, and walked
/// greedily. Returns the kept positions of each group.
fn greedy_on_device_bits(groups: &Tensor, counts: &[i64], iou_threshold: f64) -> Vec<Vec<i64>> {
    // One kernel on CUDA (same bits); tensor operations otherwise.
    if let Some((words, per_row)) = crate::kernels::nms::suppression_bits(groups, iou_threshold) {
        let m = groups.size()[1] as usize;
        return counts
            .iter()
            .enumerate()
            .map(|(gi, &count)| greedy_walk(&words[gi * m * per_row..(gi + 1) * m * per_row], count as usize, per_row))
            .collect();
    }
    let (g, m) = (groups.size()[0], groups.size()[1]);
    let m8 = (m + 7) / 8 * 8;
    let padded = groups.constant_pad_nd([0, 0, 0, m8 - m]); // [G, M8, 4]
    let coord = |t: &Tensor, i: i64| t.select(2, i);
    let area = |t: &Tensor| (coord(t, 2) - coord(t, 0)) * (coord(t, 3) - coord(t, 1));
    let area_all = area(&padded); // [G, M8]
    let bit_weights = Tensor::from_slice(&[1i64, 2, 4, 8, 16, 32, 64, 128]).to_device(groups.device());
    // Rows per block: keep a block's double-precision IoU under ~256 MB.
    let rows = (32_000_000 / (g * m8).max(1)).clamp(8, m8);
    let bytes_per_row = (m8 / 8) as usize;
    let mut bits = vec![0u8; (g * m8) as usize * bytes_per_row];
    let mut r0 = 0;
    while r0 < m8 {
        let r = rows.min(m8 - r0);
        let a = padded.narrow(1, r0, r); // [G, R, 4]
        let area_a = area_all.narrow(1, r0, r);
        let pair =
            |f: fn(&Tensor, &Tensor) -> Tensor, i: i64| f(&coord(&a, i).unsqueeze(2), &coord(&padded, i).unsqueeze(1));
        let xx1 = pair(|x, y| x.maximum(y), 0);
        let yy1 = pair(|x, y| x.maximum(y), 1);
        let xx2 = pair(|x, y| x.minimum(y), 2);
        let yy2 = pair(|x, y| x.minimum(y), 3);
        let inter = (xx2 - xx1).clamp_min(0.0) * (yy2 - yy1).clamp_min(0.0);
        let ovr = &inter / (area_a.unsqueeze(2) + area_all.unsqueeze(1) - &inter);
        let suppress = ovr.to_kind(Kind::Double).gt(iou_threshold).to_kind(Kind::Int64); // [G, R, M8]
        let packed = (suppress.reshape([g, r, m8 / 8, 8]) * &bit_weights).sum_dim_intlist(3, false, Kind::Int64);
        let packed = packed.to_kind(Kind::Uint8).to_device(Device::Cpu).contiguous();
        let mut block = vec![0u8; (g * r) as usize * bytes_per_row];
        let len = block.len();
        packed.copy_data(&mut block, len);
        for gi in 0..g as usize {
            let src = &block[gi * r as usize * bytes_per_row..(gi + 1) * r as usize * bytes_per_row];
            let dst_start = (gi * m8 as usize + r0 as usize) * bytes_per_row;
            bits[dst_start..dst_start + src.len()].copy_from_slice(src);
        }
        r0 += r;
    }
    // Bytes (8 boxes each, little-endian bit order) → 64-bit words.
    let per_row = bytes_per_row.div_ceil(8);
    let words: Vec<u64> = bits
        .chunks_exact(bytes_per_row)
        .flat_map(|row| {
            (0..per_row).map(move |w| {
                row[w * 8..(w * 8 + 8).min(row.len())].iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
            })
        })
        .collect();
    counts
        .iter()
        .enumerate()
        .map(|(gi, &count)| {
            let rows = m8 as usize * per_row;
            greedy_walk(&words[gi * rows..(gi + 1) * rows], count as usize, per_row)
        })
        .collect()
}

/// The greedy walk over one group's suppression bits (`per_row` u64 words
/// per box, boxes in decreasing score order): kept positions.
fn greedy_walk(words: &[u64], count: usize, per_row: usize) -> Vec<i64> {
    let mut removed = vec![0u64; per_row];
    let mut keep = Vec::new();
    for i in 0..count {
        if removed[i / 64] & (1 << (i % 64)) != 0 {
            continue;
        }
        keep.push(i as i64);
        for (r, w) in removed.iter_mut().zip(&words[i * per_row..(i + 1) * per_row]) {
            *r |= w;
        }
    }
    keep
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
/// `[categories, max count, 4]`, and suppressed by [`greedy_on_device_bits`].
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
    let kept = greedy_on_device_bits(&grouped, &counts_v, iou_threshold);
    let kept_sorted_pos: Vec<i64> =
        kept.iter().zip(&starts).flat_map(|(k, &s)| k.iter().map(move |&p| s + p)).collect();
    order.index_select(0, &Tensor::from_slice(&kept_sorted_pos).to_device(device))
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

    /// The device-side bit-matrix path (used on CUDA) equals the CPU greedy
    /// pass, checked here on CPU tensors.
    #[test]
    fn device_bits_path_equals_cpu_greedy() {
        for (n, thr) in [(1, 0.5), (9, 0.5), (300, 0.5), (700, 0.3), (257, 0.7)] {
            let (boxes, scores, idxs) = random_boxes(n, n);
            let (_, order) = scores.sort_stable(true, 0, true);
            let sorted = boxes.index_select(0, &order);
            let cpu = greedy_nms_sorted(&to_vec_f32(&sorted.reshape([-1])), thr);
            let bits = greedy_on_device_bits(&sorted.unsqueeze(0), &[n], thr).remove(0);
            assert_eq!(cpu, bits, "n={n}");

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
        }
    }
}
