//! RoIAlign, as `torchvision.ops.roi_align`.
//!
//! Each output bin averages `sampling_ratio²` bilinear samples. The samples are
//! taken with one `grid_sampler_2d` call per image over all of its RoIs, on
//! coordinates clamped as torchvision's `bilinear_interpolate` clamps them;
//! samples that torchvision zeroes (more than one pixel outside the map) are
//! masked. It is differentiable with respect to the features and runs on
//! any device; the result differs from torchvision's only by the rounding of
//! the grid's normalized coordinates (~1e-5 pixel).

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
fn roi_align_fixed(input: &Tensor, rois: &Tensor, g: &RoiGeometry, samples: (i64, i64)) -> Tensor {
    let (ph, pw) = g.output_size;
    let (sy, sx) = samples;
    let [n, c, h, w] = input.size()[..] else {
        panic!("roi_align: input must be [N, C, H, W], got {:?}", input.size());
    };
    let k = rois.size()[0];
    let device = input.device();
    let input = input.to_kind(Kind::Float);
    let bin_w = &g.roi_w / pw as f64;
    let bin_h = &g.roi_h / ph as f64;
    // Sample coordinates in torchvision's evaluation order:
    // start + p * bin + ((i + 0.5) * bin) / s.
    let coords = |start: &Tensor, bin: &Tensor, pooled: i64, s: i64| -> Tensor {
        let opts = (Kind::Float, device);
        let p = Tensor::arange(pooled, opts).repeat_interleave_self_int(s, 0, None);
        let i = Tensor::arange(s, opts).repeat([pooled]) + 0.5;
        let bin = bin.unsqueeze(1);
        start.unsqueeze(1) + p.unsqueeze(0) * &bin + i.unsqueeze(0) * &bin / s as f64
    };
    let xs = coords(&g.start_x, &bin_w, pw, sx); // [K, pw*sx]
    let ys = coords(&g.start_y, &bin_h, ph, sy); // [K, ph*sy]
    let valid_x = xs.ge(-1.0).logical_and(&xs.le(w as f64));
    let valid_y = ys.ge(-1.0).logical_and(&ys.le(h as f64));
    let valid = valid_y.unsqueeze(2).logical_and(&valid_x.unsqueeze(1)).to_kind(Kind::Float);
    // Clamp into [0, size-1] and normalize for grid_sample(align_corners=false).
    let gx = (xs.clamp(0.0, (w - 1) as f64) * 2.0 + 1.0) / w as f64 - 1.0;
    let gy = (ys.clamp(0.0, (h - 1) as f64) * 2.0 + 1.0) / h as f64 - 1.0;
    let (gh, gw) = (ph * sy, pw * sx);
    let grid =
        Tensor::stack(&[gx.unsqueeze(1).expand([k, gh, gw], false), gy.unsqueeze(2).expand([k, gh, gw], false)], 3);

    let batch_index = rois.select(1, 0).to_kind(Kind::Int64);
    let mut parts = Vec::new();
    let mut order = Vec::new();
    for b in 0..n {
        let idx = batch_index.eq(b).nonzero().squeeze_dim(1);
        let kb = idx.size()[0];
        if kb == 0 {
            continue;
        }
        let grid_b = grid.index_select(0, &idx).reshape([1, kb * gh, gw, 2]);
        // mode 0 = bilinear, padding 0 = zeros (every coordinate is in range).
        let sampled = input.narrow(0, b, 1).grid_sampler_2d(&grid_b, 0, 0, false);
        let sampled = sampled.reshape([c, kb, gh, gw]).permute([1, 0, 2, 3]);
        let sampled = sampled * valid.index_select(0, &idx).unsqueeze(1);
        parts.push(sampled.avg_pool2d([sy, sx], [sy, sx], [0, 0], false, true, None::<i64>));
        order.push(idx);
    }
    let pooled = Tensor::cat(&parts, 0);
    let order = Tensor::cat(&order, 0);
    Tensor::zeros([k, c, ph, pw], (Kind::Float, device)).index_copy(0, &order, &pooled)
}
