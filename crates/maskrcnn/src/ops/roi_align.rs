//! RoIAlign, as `torchvision.ops.roi_align`.
//!
//! Each output bin averages `sampling_ratio²` bilinear samples, computed with
//! torchvision's arithmetic (bit-identical on the CPU) from gathers of the
//! four neighbouring feature rows, so it is differentiable with respect to
//! the features and runs on any device; on CUDA the fused kernels of
//! `kernels::roi_align` (same arithmetic) run instead.

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
    // On CUDA: the fused kernels with torchvision's arithmetic (one level),
    // differentiable through the shim when the input needs a gradient.
    if input.device().is_cuda() {
        let levels = Tensor::zeros([k], (Kind::Int64, device));
        if let Some(out) = crate::kernels::roi_align::multilevel_roi_align(
            &[input],
            rois,
            &levels,
            &[spatial_scale],
            output_size,
            sampling_ratio,
            aligned,
            input.requires_grad(),
        ) {
            return out;
        }
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
/// gathered from the features and combined in the
/// kernel's order, samples accumulated in its order, then divided by the
/// sample count. On the CPU this reproduces torchvision bit for bit; the
/// gathers (per image, from its `[C, H*W]` view) make it differentiable with
/// respect to `input`.
fn roi_align_fixed(input: &Tensor, rois: &Tensor, g: &RoiGeometry, samples: (i64, i64)) -> Tensor {
    let (ph, pw) = g.output_size;
    let (sy, sx) = samples;
    let [n, c, h, w] = input.size()[..] else {
        panic!("roi_align: input must be [N, C, H, W], got {:?}", input.size());
    };
    let k = rois.size()[0];
    let device = input.device();
    let opts = (Kind::Float, device);
    let input = input.to_kind(Kind::Float);
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
    // Samples outside the map (or not finite: a diverged box) read row 0
    // with weight 0.
    let axis = |v: &Tensor, size: i64| -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let valid = v.ge(-1.0).logical_and(&v.le(size as f64));
        let v = v.where_scalarother(&valid, 0.0).clamp_min(0.0);
        let low = v.floor().to_kind(Kind::Int64);
        let at_edge = low.ge(size - 1);
        let low = low.clamp_max(size - 1);
        let high = (&low + 1).clamp_max(size - 1);
        let v = v.where_self(&at_edge.logical_not(), &low.to_kind(Kind::Float));
        let l = &v - low.to_kind(Kind::Float);
        let hw = l.ones_like() - &l;
        (valid, low, high, hw, l)
    };
    // The RoIs of each image gather from that image's [C, H*W] view, so the
    // gradient reaching `input` is an ordinary contiguous NCHW tensor.
    let batch_index = rois.select(1, 0).to_kind(Kind::Int64);
    let mut parts = Vec::new();
    let mut order = Vec::new();
    for b in 0..n {
        let idx = batch_index.eq(b).nonzero().squeeze_dim(1);
        let kb = idx.size()[0];
        if kb == 0 {
            continue;
        }
        let plane = input.get(b).reshape([c, h * w]);
        let pick = |t: &Tensor| t.index_select(0, &idx);
        let (start_y, start_x, bh, bw) = (pick(&g.start_y), pick(&g.start_x), pick(&bin_h), pick(&bin_w));
        let mut acc: Option<Tensor> = None;
        for iy in 0..sy {
            let (vy, y_low, y_high, hy, ly) = axis(&coord(&start_y, &bh, &py, iy, sy), h); // [Kb, PH]
            for ix in 0..sx {
                let (vx, x_low, x_high, hx, lx) = axis(&coord(&start_x, &bw, &px, ix, sx), w); // [Kb, PW]
                let valid = vy.unsqueeze(2).logical_and(&vx.unsqueeze(1)).to_kind(Kind::Float); // [Kb, PH, PW]
                let weight = |a: &Tensor, b: &Tensor| (a.unsqueeze(2) * b.unsqueeze(1) * &valid).unsqueeze(0);
                let gather = |yi: &Tensor, xi: &Tensor| {
                    let pos = yi.unsqueeze(2) * w + xi.unsqueeze(1); // [Kb, PH, PW]
                    plane.index_select(1, &pos.reshape([-1])).reshape([c, kb, ph, pw])
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
        if let Some(a) = acc {
            parts.push(a.permute([1, 0, 2, 3])); // [Kb, C, PH, PW]
            order.push(idx);
        }
    }
    let count = (sy * sx).max(1) as f64;
    if parts.is_empty() {
        return Tensor::zeros([k, c, ph, pw], opts);
    }
    let pooled = Tensor::cat(&parts, 0) / count;
    let order = Tensor::cat(&order, 0);
    Tensor::zeros([k, c, ph, pw], opts).index_copy(0, &order, &pooled)
}
