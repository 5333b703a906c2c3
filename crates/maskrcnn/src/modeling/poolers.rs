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
        let max_h = image_sizes.iter().map(|s| s.0).max().unwrap_or(1);
        let scales: Vec<f64> = features
            .iter()
            .map(|f| {
                let approx = f.size()[2] as f64 / max_h as f64;
                2f64.powf((approx as f32).log2().round() as f64)
            })
            .collect();
        let lvl_min = -(scales[0] as f32).log2() as i64;
        let lvl_max = -(scales[scales.len() - 1] as f32).log2() as i64;

        let rois = rois_with_batch_index(boxes);
        let c = features[0].size()[1];
        let s = self.output_size;
        if features.len() == 1 {
            return roi_align(&features[0], &rois, (s, s), scales[0], self.sampling_ratio, false);
        }
        let levels = self.map_levels(boxes, lvl_min, lvl_max);
        let k = rois.size()[0];
        let device = rois.device();
        let mut result = Tensor::zeros([k, c, s, s], (features[0].kind(), device));
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

    /// The level index (0 = finest) of each box of `boxes`.
    fn map_levels(&self, boxes: &[Tensor], k_min: i64, k_max: i64) -> Tensor {
        let s = Tensor::cat(&boxes.iter().map(box_area).collect::<Vec<_>>(), 0).sqrt();
        let eps = Tensor::from(1e-6f64).to_kind(s.kind()).to_device(s.device());
        let target = ((s / self.canonical_scale).log2() + self.canonical_level + eps).floor();
        let target = target.clamp(k_min as f64, k_max as f64);
        target.to_kind(Kind::Int64) - k_min
    }
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
