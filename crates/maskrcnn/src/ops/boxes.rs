//! Box geometry on tensors. Boxes are `[N, 4]` float tensors in absolute
//! `(x1, y1, x2, y2)` pixel coordinates (xyxy) unless a function says otherwise;
//! every function runs on the tensors' device and matches torchvision.ops.

use tch::{Kind, Tensor};

/// Areas of `boxes` `[N, 4]` → `[N]` (`(x2 - x1) * (y2 - y1)`, no +1).
pub fn box_area(boxes: &Tensor) -> Tensor {
    let w = boxes.select(1, 2) - boxes.select(1, 0);
    let h = boxes.select(1, 3) - boxes.select(1, 1);
    w * h
}

/// Pairwise IoU of `a` `[N, 4]` and `b` `[M, 4]` → `[N, M]`, as
/// `torchvision.ops.box_iou` (0/0 gives NaN there too).
pub fn box_iou(a: &Tensor, b: &Tensor) -> Tensor {
    let area_a = box_area(a);
    let area_b = box_area(b);
    let lt = a.slice(1, 0, 2, 1).unsqueeze(1).maximum(&b.slice(1, 0, 2, 1).unsqueeze(0));
    let rb = a.slice(1, 2, 4, 1).unsqueeze(1).minimum(&b.slice(1, 2, 4, 1).unsqueeze(0));
    let wh = (rb - lt).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    let union = area_a.unsqueeze(1) + area_b.unsqueeze(0) - &inter;
    inter / union
}

/// Boxes `[B, K, 4]` clipped each into its image of `sizes` `[B, 2]`
/// (height, width; float, on the boxes' device), as torchvision's
/// `clip_boxes_to_image`, no host values needed.
pub fn clip_boxes_to_sizes(boxes: &Tensor, sizes: &Tensor) -> Tensor {
    let (h, w) = (sizes.narrow(1, 0, 1), sizes.narrow(1, 1, 1));
    let clip = |i: i64, limit: &Tensor| boxes.select(2, i).clamp_min(0.0).minimum(limit);
    Tensor::stack(&[clip(0, &w), clip(1, &h), clip(2, &w), clip(3, &h)], 2)
}

/// `[...]` bool: the boxes `[..., 4]` whose width and height are both
/// `>= min_size` (torchvision's `remove_small_boxes` keeps these).
pub fn boxes_at_least(boxes: &Tensor, min_size: f64) -> Tensor {
    let ws = boxes.select(-1, 2) - boxes.select(-1, 0);
    let hs = boxes.select(-1, 3) - boxes.select(-1, 1);
    ws.ge(min_size).logical_and(&hs.ge(min_size))
}

/// Scales boxes from an image of `from` `(h, w)` to one of `to` `(h, w)`,
/// as torchvision's `resize_boxes` (float32 ratios).
pub fn resize_boxes(boxes: &Tensor, from: (i64, i64), to: (i64, i64)) -> Tensor {
    let ratio_h = (to.0 as f32) / (from.0 as f32);
    let ratio_w = (to.1 as f32) / (from.1 as f32);
    let x1 = boxes.select(1, 0) * f64::from(ratio_w);
    let y1 = boxes.select(1, 1) * f64::from(ratio_h);
    let x2 = boxes.select(1, 2) * f64::from(ratio_w);
    let y2 = boxes.select(1, 3) * f64::from(ratio_h);
    Tensor::stack(&[x1, y1, x2, y2], 1)
}

/// Encodes boxes as regression deltas relative to reference boxes and back
/// (the R-CNN parameterization `(dx, dy, dw, dh)` scaled by `weights`), as
/// torchvision's `det_utils.BoxCoder`.
#[derive(Debug, Clone, Copy)]
pub struct BoxCoder {
    /// `(wx, wy, ww, wh)`: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    pub weights: [f64; 4],
    /// Upper clamp of `dw`/`dh` before `exp` (log(1000/16)).
    pub bbox_xform_clip: f64,
}

impl BoxCoder {
    pub fn new(weights: [f64; 4]) -> BoxCoder {
        BoxCoder { weights, bbox_xform_clip: (1000.0f64 / 16.0).ln() }
    }

    /// Deltas `[N, 4]` that move `proposals` `[N, 4]` onto `reference` `[N, 4]`.
    pub fn encode(&self, reference: &Tensor, proposals: &Tensor) -> Tensor {
        let [wx, wy, ww, wh] = self.weights;
        let pw = proposals.select(1, 2) - proposals.select(1, 0);
        let ph = proposals.select(1, 3) - proposals.select(1, 1);
        let px = proposals.select(1, 0) + &pw * 0.5;
        let py = proposals.select(1, 1) + &ph * 0.5;
        let gw = reference.select(1, 2) - reference.select(1, 0);
        let gh = reference.select(1, 3) - reference.select(1, 1);
        let gx = reference.select(1, 0) + &gw * 0.5;
        let gy = reference.select(1, 1) + &gh * 0.5;
        let dx = (gx - &px) * wx / &pw;
        let dy = (gy - &py) * wy / &ph;
        let dw = (gw / pw).log() * ww;
        let dh = (gh / ph).log() * wh;
        Tensor::stack(&[dx, dy, dw, dh], 1)
    }

    /// Applies deltas `[N, 4 * C]` to `boxes` `[N, 4]` → `[N, C, 4]` boxes.
    pub fn decode(&self, deltas: &Tensor, boxes: &Tensor) -> Tensor {
        let boxes = boxes.to_kind(deltas.kind());
        let [wx, wy, ww, wh] = self.weights;
        let widths = boxes.select(1, 2) - boxes.select(1, 0);
        let heights = boxes.select(1, 3) - boxes.select(1, 1);
        let ctr_x = boxes.select(1, 0) + &widths * 0.5;
        let ctr_y = boxes.select(1, 1) + &heights * 0.5;
        let dx = deltas.slice(1, 0, None, 4) / wx;
        let dy = deltas.slice(1, 1, None, 4) / wy;
        let dw = (deltas.slice(1, 2, None, 4) / ww).clamp_max(self.bbox_xform_clip);
        let dh = (deltas.slice(1, 3, None, 4) / wh).clamp_max(self.bbox_xform_clip);
        let pred_ctr_x = dx * widths.unsqueeze(1) + ctr_x.unsqueeze(1);
        let pred_ctr_y = dy * heights.unsqueeze(1) + ctr_y.unsqueeze(1);
        let pred_w = dw.exp() * widths.unsqueeze(1);
        let pred_h = dh.exp() * heights.unsqueeze(1);
        // torchvision multiplies by a 0.5 tensor of the deltas' dtype.
        let half_w = pred_w * 0.5;
        let half_h = pred_h * 0.5;
        let x1 = &pred_ctr_x - &half_w;
        let y1 = &pred_ctr_y - &half_h;
        let x2 = pred_ctr_x + half_w;
        let y2 = pred_ctr_y + half_h;
        Tensor::stack(&[x1, y1, x2, y2], 2)
    }
}

/// `[N]` float → `Vec<f32>` (copies to the CPU).
pub(crate) fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    let t = crate::host_sync::to_host(&t.to_kind(Kind::Float)).contiguous();
    let n = t.numel();
    let mut out = vec![0f32; n];
    t.copy_data(&mut out, n);
    out
}

/// `[N]` int → `Vec<i64>` (copies to the CPU).
pub(crate) fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    let t = crate::host_sync::to_host(&t.to_kind(Kind::Int64)).contiguous();
    let n = t.numel();
    let mut out = vec![0i64; n];
    t.copy_data(&mut out, n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn t(v: &[f32], cols: i64) -> Tensor {
        Tensor::from_slice(v).reshape([-1, cols])
    }

    /// The R-CNN parameterization by hand: a box moved by (+10, -5) and
    /// scaled by (2, 0.5) relative to a 20 × 40 proposal, weighted (10, 10,
    /// 5, 5) as the box head's coder.
    #[test]
    fn box_coder_encodes_the_rcnn_deltas() {
        let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
        let proposal = t(&[0.0, 0.0, 20.0, 40.0], 4);
        // Centre (10, 20) -> (20, 15); size 20 × 40 -> 40 × 20.
        let reference = t(&[0.0, 5.0, 40.0, 25.0], 4);
        let d: Vec<f32> = Vec::try_from(coder.encode(&reference, &proposal).reshape([-1])).unwrap();
        let expected = [10.0 * 10.0 / 20.0, 10.0 * -5.0 / 40.0, 5.0 * 2f32.ln(), 5.0 * 0.5f32.ln()];
        for (a, b) in d.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{d:?} vs {expected:?}");
        }
    }

    /// decode(encode(b)) gives b back, for each of several classes' deltas.
    #[test]
    fn box_coder_decode_inverts_encode() {
        let coder = BoxCoder::new([1.0, 1.0, 1.0, 1.0]);
        let proposals = t(&[0.0, 0.0, 20.0, 40.0, 5.0, 5.0, 15.0, 9.0], 4);
        let reference = t(&[3.0, -2.0, 30.0, 50.0, 6.0, 4.0, 10.0, 12.0], 4);
        let deltas = coder.encode(&reference, &proposals);
        let two_classes = Tensor::cat(&[&deltas, &deltas], 1);
        let decoded = coder.decode(&two_classes, &proposals);
        assert_eq!(decoded.size(), [2, 2, 4]);
        let err = (decoded - reference.unsqueeze(1)).abs().max().double_value(&[]);
        assert!(err < 1e-4, "round trip off by {err}");
    }

    /// Width/height deltas are clamped at log(1000/16) before `exp`.
    #[test]
    fn box_coder_clamps_huge_scale_deltas() {
        let coder = BoxCoder::new([1.0, 1.0, 1.0, 1.0]);
        let decoded = coder.decode(&t(&[0.0, 0.0, 50.0, 50.0], 4), &t(&[0.0, 0.0, 16.0, 16.0], 4));
        let w = (decoded.select(2, 2) - decoded.select(2, 0)).double_value(&[0, 0]);
        assert!((w - 1000.0).abs() < 1e-2, "width {w}");
        assert_eq!(decoded.kind(), Kind::Float);
    }
}
