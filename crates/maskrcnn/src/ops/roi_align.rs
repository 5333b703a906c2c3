//! RoIAlign, as `torchvision.ops.roi_align`.
//!
//! Each output bin averages `sampling_ratio²` bilinear samples, computed with
//! torchvision's arithmetic (bit-identical on the CPU) from gathers of the
//! four neighbouring feature rows, so it is differentiable with respect to
//! the features and runs on any device. A fused CUDA kernel can replace it
//! later without changing results.

use tch::{Kind, Tensor};

/// Pools `rois` `[K, 5]` (`batch_index, x1, y1, x2, y2` in image pixels) from
/// `input` `[N, C, H, W]` into `[K, C, output_size.0, output_size.1]`.
/// `spatial_scale` maps image pixels to feature pixels (1/stride);
/// `sampling_ratio` is the samples per bin side, or `<= 0` for torchvision's
/// adaptive count (`ceil(roi_size / output_size)` per RoI, which costs a
/// device-to-host copy of the RoI sizes); `aligned` shifts the box by -0.5
/// pixel (torchvision's `aligned=True`). Computes in float32 and returns
/// `input`'s dtype.
pub fn roi_align(
    input: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let (ph, pw) = output_size;
    let size = input.size();
    let (c, device, out_kind) = (size[1], input.device(), input.kind());
    let k = rois.size()[0];
    if k == 0 {
        return Tensor::zeros([0, c, ph, pw], (out_kind, device));
    }
    let geometry = RoiGeometry::new(rois, spatial_scale, aligned, output_size);
    if sampling_ratio > 0 {
        return roi_align_fixed(input, rois, &geometry, (sampling_ratio, sampling_ratio)).to_kind(out_kind);
    }
    // Adaptive: group the RoIs by their (samples_y, samples_x) and pool each
    // group with a fixed grid.
    let sy = (&geometry.roi_h / ph as f64).ceil().to_kind(Kind::Int64).clamp_min(1);
    let sx = (&geometry.roi_w / pw as f64).ceil().to_kind(Kind::Int64).clamp_min(1);
    let keys = crate::ops::boxes::to_vec_i64(&(&sy * 100_000 + &sx));
    let mut groups: std::collections::BTreeMap<i64, Vec<i64>> = std::collections::BTreeMap::new();
    for (i, key) in keys.into_iter().enumerate() {
        groups.entry(key).or_default().push(i as i64);
    }
    let mut out = Tensor::zeros([k, c, ph, pw], (Kind::Float, device));
    for (key, members) in groups {
        let idx = Tensor::from_slice(&members).to_device(device);
        let sub = RoiGeometry {
            start_x: geometry.start_x.index_select(0, &idx),
            start_y: geometry.start_y.index_select(0, &idx),
            roi_w: geometry.roi_w.index_select(0, &idx),
            roi_h: geometry.roi_h.index_select(0, &idx),
            output_size,
        };
        let pooled = roi_align_fixed(input, &rois.index_select(0, &idx), &sub, (key / 100_000, key % 100_000));
        out = out.index_copy(0, &idx, &pooled);
    }
    out.to_kind(out_kind)
}

/// Start and size of each RoI on the feature map, `[K]` float32 each.
struct RoiGeometry {
    start_x: Tensor,
    start_y: Tensor,
    roi_w: Tensor,
    roi_h: Tensor,
    output_size: (i64, i64),
}

impl RoiGeometry {
    fn new(rois: &Tensor, spatial_scale: f64, aligned: bool, output_size: (i64, i64)) -> RoiGeometry {
        let rois = rois.to_kind(Kind::Float);
        let offset = if aligned { 0.5 } else { 0.0 };
        let start_x = rois.select(1, 1) * spatial_scale - offset;
        let start_y = rois.select(1, 2) * spatial_scale - offset;
        let end_x = rois.select(1, 3) * spatial_scale - offset;
        let end_y = rois.select(1, 4) * spatial_scale - offset;
        let mut roi_w = end_x - &start_x;
        let mut roi_h = end_y - &start_y;
        if !aligned {
            roi_w = roi_w.clamp_min(1.0);
            roi_h = roi_h.clamp_min(1.0);
        }
        RoiGeometry { start_x, start_y, roi_w, roi_h, output_size }
    }
}

/// RoIAlign with `samples` (per bin side, y and x) for every RoI; float32 out.
///
/// Follows torchvision's kernel operation by operation: the same float32
/// sample coordinates, clamping and bilinear weights, the four corner values
/// gathered from a channels-last copy of the features and combined in the
/// kernel's order, samples accumulated in its order, then divided by the
/// sample count. On the CPU this reproduces torchvision bit for bit; the
/// gathers make it differentiable with respect to `input`.
fn roi_align_fixed(input: &Tensor, rois: &Tensor, g: &RoiGeometry, samples: (i64, i64)) -> Tensor {
    let (ph, pw) = g.output_size;
    let (sy, sx) = samples;
    let [n, c, h, w] = input.size()[..] else {
        panic!("roi_align: input must be [N, C, H, W], got {:?}", input.size());
    };
    let k = rois.size()[0];
    let device = input.device();
    let opts = (Kind::Float, device);
    // [N*H*W, C]: one row per feature-map position.
    let rows = input.to_kind(Kind::Float).permute([0, 2, 3, 1]).reshape([n * h * w, c]);
    let base = rois.select(1, 0).to_kind(Kind::Int64) * (h * w); // [K]
    let bin_w = &g.roi_w / pw as f64;
    let bin_h = &g.roi_h / ph as f64;
    let py = Tensor::arange(ph, opts);
    let px = Tensor::arange(pw, opts);
    // Coordinates of sample `i` of every bin: start + p * bin + ((i + 0.5) * bin) / s.
    let coord = |start: &Tensor, bin: &Tensor, p: &Tensor, i: i64, s: i64| -> Tensor {
        let offset = bin * (i as f64 + 0.5) / s as f64;
        (start.unsqueeze(1) + p.unsqueeze(0) * bin.unsqueeze(1)) + offset.unsqueeze(1)
    };
    // torchvision's bilinear_interpolate along one axis: validity, low/high
    // indices and the (low, high) weights.
    let axis = |v: &Tensor, size: i64| -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let valid = v.ge(-1.0).logical_and(&v.le(size as f64));
        let v = v.clamp_min(0.0);
        let low = v.floor().to_kind(Kind::Int64);
        let at_edge = low.ge(size - 1);
        let low = low.clamp_max(size - 1);
        let high = (&low + 1).clamp_max(size - 1);
        let v = v.where_self(&at_edge.logical_not(), &low.to_kind(Kind::Float));
        let l = &v - low.to_kind(Kind::Float);
        let hw = l.ones_like() - &l;
        (valid, low, high, hw, l)
    };
    let mut acc: Option<Tensor> = None;
    for iy in 0..sy {
        let (vy, y_low, y_high, hy, ly) = axis(&coord(&g.start_y, &bin_h, &py, iy, sy), h); // [K, PH]
        for ix in 0..sx {
            let (vx, x_low, x_high, hx, lx) = axis(&coord(&g.start_x, &bin_w, &px, ix, sx), w); // [K, PW]
            let valid = vy.unsqueeze(2).logical_and(&vx.unsqueeze(1)).to_kind(Kind::Float); // [K, PH, PW]
            let weight = |a: &Tensor, b: &Tensor| (a.unsqueeze(2) * b.unsqueeze(1) * &valid).unsqueeze(3);
            let gather = |yi: &Tensor, xi: &Tensor| {
                let idx = base.reshape([k, 1, 1]) + yi.unsqueeze(2) * w + xi.unsqueeze(1);
                rows.index_select(0, &idx.reshape([-1])).reshape([k, ph, pw, c])
            };
            let val = weight(&hy, &hx) * gather(&y_low, &x_low)
                + weight(&hy, &lx) * gather(&y_low, &x_high)
                + weight(&ly, &hx) * gather(&y_high, &x_low)
                + weight(&ly, &lx) * gather(&y_high, &x_high);
            acc = Some(match acc {
                None => val,
                Some(a) => a + val,
            });
        }
    }
    let count = (sy * sx).max(1) as f64;
    match acc {
        Some(a) => (a / count).permute([0, 3, 1, 2]),
        None => Tensor::zeros([k, c, ph, pw], opts),
    }
}
