//! Multi-scale RoIAlign over FPN levels, as torchvision's `MultiScaleRoIAlign`:
//! each RoI is pooled from the level the FPN paper's heuristic assigns it
//! (`floor(4 + log2(sqrt(area) / 224) + 1e-6)`, clamped to the levels present).

use crate::ops::{box_area, roi_align};
use tch::{Kind, Tensor};

/// RoIAlign over P2..P5 with a fixed output size.
#[derive(Debug, Clone, Copy)]
pub struct MultiScaleRoiAlign {
    /// Output side (7 for boxes, 14 for masks).
    pub output_size: i64,
    pub sampling_ratio: i64,
    pub canonical_scale: f64,
    pub canonical_level: f64,
}

impl MultiScaleRoiAlign {
    pub fn new(output_size: i64, sampling_ratio: i64) -> MultiScaleRoiAlign {
        MultiScaleRoiAlign { output_size, sampling_ratio, canonical_scale: 224.0, canonical_level: 4.0 }
    }

    /// Pools `boxes` (one `[K_i, 4]` tensor per image, image pixels) from
    /// `features` (the levels to pool from, finest first, `[N, C, H_l, W_l]`)
    /// → `[sum K_i, C, S, S]` in the order of the concatenated boxes.
    /// `image_sizes` are the resized (unpadded) image sizes, from which the
    /// levels' scales are inferred as torchvision does.
    pub fn forward(&self, features: &[Tensor], boxes: &[Tensor], image_sizes: &[(i64, i64)]) -> Tensor {
        self.pool(features, &rois_with_batch_index(boxes), image_sizes)
    }

    /// Pools `rois` `[K, 5]` (`batch_index, x1, y1, x2, y2`) as
    /// [`MultiScaleRoiAlign::forward`]. On CUDA one kernel reads every level
    /// in place (the level of each RoI chosen on the device); on the CPU
    /// each level's RoIs are pooled in turn.
    pub fn pool(&self, features: &[Tensor], rois: &Tensor, image_sizes: &[(i64, i64)]) -> Tensor {
        let heights: Vec<i64> = features.iter().map(|f| f.size()[2]).collect();
        let scales = level_scales(&heights, image_sizes);
        let lvl_min = -(scales[0] as f32).log2() as i64;
        let lvl_max = -(scales[scales.len() - 1] as f32).log2() as i64;
        let s = self.output_size;
        if features.len() == 1 {
            return roi_align(&features[0], rois, (s, s), scales[0], self.sampling_ratio, false);
        }
        let levels = self.map_levels(&rois.narrow(1, 1, 4), lvl_min, lvl_max);
        let maps: Vec<&Tensor> = features.iter().collect();
        let grad = features.iter().any(|f| f.requires_grad());
        if let Some(out) = crate::kernels::roi_align::multilevel_roi_align(
            &maps,
            rois,
            &levels,
            &scales,
            (s, s),
            self.sampling_ratio,
            false,
            grad,
        ) {
            return out;
        }
        let k = rois.size()[0];
        let c = features[0].size()[1];
        let mut result = Tensor::zeros([k, c, s, s], (features[0].kind(), rois.device()));
        for (l, (feat, &scale)) in features.iter().zip(&scales).enumerate() {
            let idx = levels.eq(l as i64).nonzero().squeeze_dim(1);
            if idx.size()[0] == 0 {
                continue;
            }
            let pooled = roi_align(feat, &rois.index_select(0, &idx), (s, s), scale, self.sampling_ratio, false);
            result = result.index_put(&[Some(idx)], &pooled.to_kind(result.kind()), false);
        }
        result
    }

    /// The level index (0 = finest) of each box of `boxes` `[K, 4]`.
    fn map_levels(&self, boxes: &Tensor, k_min: i64, k_max: i64) -> Tensor {
        let s = box_area(boxes).sqrt();
        // torchvision adds the eps as a tensor of the boxes' dtype: the same
        // float32 addition as a scalar.
        let target = ((s / self.canonical_scale).log2() + self.canonical_level + 1e-6).floor();
        let target = target.clamp(k_min as f64, k_max as f64);
        target.to_kind(Kind::Int64) - k_min
    }
}

/// The spatial scale of each level (feature maps `heights` rows high) as
/// torchvision infers it: the power of two nearest the ratio of the level's
/// height to the tallest image of `image_sizes`.
pub fn level_scales(heights: &[i64], image_sizes: &[(i64, i64)]) -> Vec<f64> {
    let max_h = image_sizes.iter().map(|s| s.0).max().unwrap_or(1);
    heights
        .iter()
        .map(|&h| {
            let approx = h as f64 / max_h as f64;
            2f64.powf((approx as f32).log2().round() as f64)
        })
        .collect()
}

/// `[B, S, 4]` boxes (a fixed number of slots per image) → `[B·S, 5]` RoIs
/// `(batch_index, x1, y1, x2, y2)`.
pub fn rois_of_slots(boxes: &Tensor) -> Tensor {
    let (b, s) = (boxes.size()[0], boxes.size()[1]);
    let index = Tensor::arange(b, (boxes.kind(), boxes.device())).reshape([b, 1, 1]).expand([b, s, 1], false);
    Tensor::cat(&[index, boxes.shallow_clone()], 2).reshape([-1, 5])
}

/// Concatenates per-image boxes into `[K, 5]` rows of `(batch_index, x1, y1, x2, y2)`.
pub fn rois_with_batch_index(boxes: &[Tensor]) -> Tensor {
    let rows: Vec<Tensor> = boxes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let idx = Tensor::full([b.size()[0], 1], i as f64, (b.kind(), b.device()));
            Tensor::cat(&[idx, b.shallow_clone()], 1)
        })
        .collect();
    Tensor::cat(&rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Four pyramid levels of a 2-image batch padded to 128×160, RoIs of
    /// every size (so every level is used), some crossing the border.
    fn case() -> (Vec<Tensor>, Tensor, Vec<(i64, i64)>) {
        case_with_channels(6)
    }

    fn case_with_channels(channels: i64) -> (Vec<Tensor>, Tensor, Vec<(i64, i64)>) {
        tch::manual_seed(5);
        let features: Vec<Tensor> = [4i64, 8, 16, 32]
            .iter()
            .map(|&stride| Tensor::randn([2, channels, 128 / stride, 160 / stride], (Kind::Float, Device::Cpu)))
            .collect();
        let k = 60;
        let xy = Tensor::rand([k, 2], (Kind::Float, Device::Cpu)) * 150.0 - 10.0;
        let wh = (Tensor::rand([k, 2], (Kind::Float, Device::Cpu)) * 6.5).exp() + 1.0;
        let index = Tensor::randint(2, [k, 1], (Kind::Float, Device::Cpu));
        // One square of each level's size range besides the random ones,
        // and a giant box (adaptive sampling gives it a 20+ sample grid).
        let squares = Tensor::from_slice(&[
            0.0f32, 10., 20., 60., 60., 1., 5., 5., 205., 205., 0., -30., -40., 330., 290., 1., -200., -200., 400.,
            400., 0., -2000., -1500., 4000., 3000.,
        ])
        .reshape([5, 5]);
        // Twenty RoIs jittered around one object, as the mask head's
        // positives are (their gradients pile onto the same pixels).
        let jitter = Tensor::rand([20, 4], (Kind::Float, Device::Cpu)) * 6.0;
        let object = Tensor::from_slice(&[40.0f32, 30., 90., 70.]).reshape([1, 4]) + jitter;
        let repeated = Tensor::cat(&[Tensor::zeros([20, 1], (Kind::Float, Device::Cpu)), object], 1);
        let rois = Tensor::cat(&[Tensor::cat(&[index, xy.shallow_clone(), &xy + wh], 1), squares, repeated], 0);
        (features, rois, vec![(120, 150), (128, 160)])
    }

    /// The case uses every level, and the per-level CPU path is
    /// differentiable (the reference the GPU test compares with).
    #[test]
    fn every_level_pools_and_gradients_reach_it() {
        let pooler = MultiScaleRoiAlign::new(7, 2);
        let (features, rois, sizes) = case();
        let leaves: Vec<Tensor> = features.iter().map(|f| f.set_requires_grad(true)).collect();
        pooler.pool(&leaves, &rois, &sizes).sum(Kind::Float).backward();
        for (l, f) in leaves.iter().enumerate() {
            assert!(f.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "level {l} received no gradient");
        }
    }

    /// The one-kernel multi-level pooling on CUDA (float32 NCHW, fp16 and
    /// bf16 channels-last read in place; 16 channels take the eight-wide
    /// loads and vector atomics; 192 fp16/bf16 channels go through the
    /// backward's float32 staging 64 channels at a time) equals the
    /// per-level CPU path, and so do the gradients reaching every level.
    #[test]
    fn gpu_multilevel_kernel_equals_per_level_cpu_path() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_multilevel_kernel_equals_per_level_cpu_path") else {
            return;
        };
        for (channels, sampling_ratio) in [(6, 2), (16, 2), (6, 0), (192, 2)] {
            multilevel_kernel_equals_per_level_cpu_path(device, channels, sampling_ratio);
        }
    }

    fn multilevel_kernel_equals_per_level_cpu_path(device: Device, channels: i64, sampling_ratio: i64) {
        let pooler = MultiScaleRoiAlign::new(7, sampling_ratio);
        let (features, rois, sizes) = case_with_channels(channels);
        let leaves: Vec<Tensor> = features.iter().map(|f| f.set_requires_grad(true)).collect();
        let reference = pooler.pool(&leaves, &rois, &sizes);
        let weights = Tensor::randn(reference.size(), (Kind::Float, Device::Cpu));
        (&reference * &weights).sum(Kind::Float).backward();
        let reference_grads: Vec<Tensor> = leaves.iter().map(|f| f.grad()).collect();
        // The backward sums a RoI's samples in shared memory (limit 1024
        // pixels) or, past its footprint limit, adds them to the map.
        for (kind, nhwc, tol, tile_pixels) in [
            (Kind::Float, false, 1e-4, 1024),
            (Kind::Float, true, 1e-4, 1024),
            (Kind::Float, false, 1e-4, 0),
            (Kind::Float, true, 1e-4, 40),
            (Kind::Half, true, 2e-2, 1024),
            (Kind::BFloat16, true, 8e-2, 1024),
        ] {
            let dev = device;
            crate::kernels::roi_align::set_backward_tile_pixels(tile_pixels);
            let leaves: Vec<Tensor> = features
                .iter()
                .map(|f| {
                    let f = f.to_device(dev).to_kind(kind);
                    let f = if nhwc { f.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]) } else { f };
                    f.detach().set_requires_grad(true)
                })
                .collect();
            let out = pooler.pool(&leaves, &rois.to_device(dev), &sizes);
            assert_eq!(out.kind(), kind, "output dtype");
            let d = (out.to_kind(Kind::Float).to_device(Device::Cpu) - &reference).abs().max().double_value(&[]);
            assert!(d <= tol, "{kind:?} nhwc={nhwc} C={channels} sr={sampling_ratio}: pooled values differ by {d}");
            (out.to_kind(Kind::Float) * weights.to_device(dev)).sum(Kind::Float).backward();
            for (l, (f, r)) in leaves.iter().zip(&reference_grads).enumerate() {
                // The gradient has the features' layout (autograd adds it to
                // the convolutions' channels-last gradients without a copy).
                assert_eq!(f.grad().stride(), f.stride(), "{kind:?} nhwc={nhwc}: level {l} gradient layout");
                let g = f.grad().to_kind(Kind::Float).to_device(Device::Cpu);
                let d = (&g - r).abs().max().double_value(&[]) / r.abs().max().double_value(&[]).max(1e-6);
                assert!(
                    d <= tol,
                    "{kind:?} nhwc={nhwc} C={channels} sr={sampling_ratio} tile {tile_pixels}: level {l} gradient differs by {d} relative"
                );
            }
        }
        crate::kernels::roi_align::set_backward_tile_pixels(1024);
    }
}
