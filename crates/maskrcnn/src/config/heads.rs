//! `[rpn]` and `[roi_heads]`: anchors, matching, sampling, proposal
//! selection; pooling, the heads' widths, post-processing.

use super::error::{iou_pair, rule, unit_interval, ConfigError};
use serde::{Deserialize, Serialize};

/// Region proposal network: anchors, matching, sampling, proposal selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpnConfig {
    /// Anchor side (pixels) of each FPN level P2..P6, one size per level.
    pub anchor_sizes: Vec<f64>,
    /// Anchor height/width ratios, the same on every level.
    pub aspect_ratios: Vec<f64>,
    /// Anchors with IoU >= this with some ground truth are foreground.
    pub fg_iou_thresh: f64,
    /// Anchors with IoU < this with every ground truth are background.
    pub bg_iou_thresh: f64,
    /// Anchors sampled per image for the RPN losses.
    pub batch_size_per_image: usize,
    /// Fraction of the sampled anchors that may be foreground.
    pub positive_fraction: f64,
    /// Top-scoring anchors kept per level before NMS, training.
    pub pre_nms_top_n_train: usize,
    /// Top-scoring anchors kept per level before NMS, inference.
    pub pre_nms_top_n_test: usize,
    /// Proposals kept after NMS, training.
    pub post_nms_top_n_train: usize,
    /// Proposals kept after NMS, inference.
    pub post_nms_top_n_test: usize,
    /// Whether post-NMS top-N counts per image (torchvision) or over the whole
    /// batch (the seed's maskrcnn_benchmark in training).
    pub post_nms_top_n_scope: TopNScope,
    /// IoU above which NMS suppresses a proposal.
    pub nms_thresh: f64,
    /// Proposals with a side shorter than this (pixels) are removed.
    pub min_box_size: f64,
    /// Proposals with objectness probability below this are removed.
    pub score_thresh: f64,
}

/// What a post-NMS top-N counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopNScope {
    Image,
    Batch,
}

/// Box and mask heads: matching, sampling, pooling, post-processing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoiHeadsConfig {
    /// Proposals with IoU >= this with a ground truth are foreground.
    pub fg_iou_thresh: f64,
    /// Proposals with IoU < this with every ground truth are background.
    pub bg_iou_thresh: f64,
    /// Proposals sampled per image for the box and mask losses.
    pub batch_size_per_image: usize,
    /// Fraction of the sampled proposals that may be foreground.
    pub positive_fraction: f64,
    /// Weights (wx, wy, ww, wh) of the box coder.
    pub bbox_reg_weights: Vec<f64>,
    /// Detections with a class score below this are dropped.
    pub score_thresh: f64,
    /// IoU above which per-class NMS suppresses a detection.
    pub nms_thresh: f64,
    /// Detections kept per image.
    pub detections_per_img: usize,
    /// Hidden width of the two-layer box head (TwoMLPHead).
    pub representation_size: usize,
    /// Output side of RoIAlign for the box head.
    pub box_pooler_resolution: usize,
    /// Output side of RoIAlign for the mask head.
    pub mask_pooler_resolution: usize,
    /// RoIAlign samples per bin side (0: adaptive, as torchvision).
    pub sampling_ratio: usize,
    /// Side of the predicted masks (twice the mask pooler's, by the head's
    /// transposed convolution).
    pub mask_resolution: usize,
    /// Channels of the four mask-head convolutions and the upsampler
    /// (torchvision: 256).
    pub mask_head_channels: usize,
}

impl Default for RpnConfig {
    fn default() -> Self {
        RpnConfig {
            anchor_sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            fg_iou_thresh: 0.7,
            bg_iou_thresh: 0.3,
            batch_size_per_image: 256,
            positive_fraction: 0.5,
            pre_nms_top_n_train: 2000,
            pre_nms_top_n_test: 1000,
            post_nms_top_n_train: 2000,
            post_nms_top_n_test: 1000,
            post_nms_top_n_scope: TopNScope::Image,
            nms_thresh: 0.7,
            min_box_size: 1e-3,
            score_thresh: 0.0,
        }
    }
}

impl RpnConfig {
    /// The section's range and consistency rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
        rule(r.anchor_sizes.len() == 5, "rpn.anchor_sizes", "must have 5 sizes, one per FPN level P2..P6")?;
        rule(r.anchor_sizes.iter().all(|&s| s > 0.0), "rpn.anchor_sizes", "sizes must be > 0")?;
        rule(!r.aspect_ratios.is_empty(), "rpn.aspect_ratios", "must list at least one ratio")?;
        rule(r.aspect_ratios.iter().all(|&a| a > 0.0), "rpn.aspect_ratios", "ratios must be > 0")?;
        iou_pair(r.fg_iou_thresh, r.bg_iou_thresh, "rpn")?;
        rule(r.batch_size_per_image > 0, "rpn.batch_size_per_image", "must be > 0")?;
        unit_interval(r.positive_fraction, "rpn.positive_fraction")?;
        for (v, k) in [
            (r.pre_nms_top_n_train, "rpn.pre_nms_top_n_train"),
            (r.pre_nms_top_n_test, "rpn.pre_nms_top_n_test"),
            (r.post_nms_top_n_train, "rpn.post_nms_top_n_train"),
            (r.post_nms_top_n_test, "rpn.post_nms_top_n_test"),
        ] {
            rule(v > 0, k, "must be > 0")?;
        }
        unit_interval(r.nms_thresh, "rpn.nms_thresh")?;
        rule(r.min_box_size >= 0.0, "rpn.min_box_size", "must be >= 0")?;
        unit_interval(r.score_thresh, "rpn.score_thresh")
    }
}

impl Default for RoiHeadsConfig {
    fn default() -> Self {
        RoiHeadsConfig {
            fg_iou_thresh: 0.5,
            bg_iou_thresh: 0.5,
            batch_size_per_image: 512,
            positive_fraction: 0.25,
            bbox_reg_weights: vec![10.0, 10.0, 5.0, 5.0],
            score_thresh: 0.05,
            nms_thresh: 0.5,
            detections_per_img: 100,
            representation_size: 1024,
            box_pooler_resolution: 7,
            mask_pooler_resolution: 14,
            sampling_ratio: 2,
            mask_resolution: 28,
            mask_head_channels: 256,
        }
    }
}

impl RoiHeadsConfig {
    /// Sample slots per image that can hold positives (positives come
    /// first), the mask head's input: `batch_size_per_image ×
    /// positive_fraction`, rounded down.
    pub fn positive_slots(&self) -> i64 {
        ((self.batch_size_per_image as f64 * self.positive_fraction) as i64).min(self.batch_size_per_image as i64)
    }

    /// The section's range and consistency rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = self;
        iou_pair(h.fg_iou_thresh, h.bg_iou_thresh, "roi_heads")?;
        rule(h.batch_size_per_image > 0, "roi_heads.batch_size_per_image", "must be > 0")?;
        unit_interval(h.positive_fraction, "roi_heads.positive_fraction")?;
        rule(h.bbox_reg_weights.len() == 4, "roi_heads.bbox_reg_weights", "must have 4 values (wx, wy, ww, wh)")?;
        rule(h.bbox_reg_weights.iter().all(|&w| w > 0.0), "roi_heads.bbox_reg_weights", "values must be > 0")?;
        unit_interval(h.score_thresh, "roi_heads.score_thresh")?;
        unit_interval(h.nms_thresh, "roi_heads.nms_thresh")?;
        rule(h.detections_per_img > 0, "roi_heads.detections_per_img", "must be > 0")?;
        rule(h.representation_size > 0, "roi_heads.representation_size", "must be > 0")?;
        rule(h.box_pooler_resolution > 0, "roi_heads.box_pooler_resolution", "must be > 0")?;
        rule(h.mask_pooler_resolution > 0, "roi_heads.mask_pooler_resolution", "must be > 0")?;
        rule(
            h.mask_resolution == 2 * h.mask_pooler_resolution,
            "roi_heads.mask_resolution",
            &format!(
                "must be twice roi_heads.mask_pooler_resolution ({}), as the mask head upsamples by 2",
                h.mask_pooler_resolution
            ),
        )?;
        rule(h.mask_head_channels >= 1, "roi_heads.mask_head_channels", "must be >= 1")
    }
}
