//! Matching predictions (anchors, proposals) to ground truth by IoU, as
//! torchvision's `det_utils.Matcher`.

use tch::{Kind, Tensor};

/// A prediction below the low threshold: background.
pub const BELOW_LOW_THRESHOLD: i64 = -1;
/// A prediction between the thresholds: ignored.
pub const BETWEEN_THRESHOLDS: i64 = -2;

/// Assigns each prediction the ground truth it overlaps most, or marks it
/// background / ignored by the IoU thresholds.
#[derive(Debug, Clone, Copy)]
pub struct Matcher {
    /// IoU >= this: matched (foreground).
    pub high_threshold: f64,
    /// IoU < this: background.
    pub low_threshold: f64,
    /// Also match, for every ground truth, the predictions that overlap it
    /// most (even below `high_threshold`) — the RPN's rule.
    pub allow_low_quality_matches: bool,
}

impl Matcher {
    /// `quality` `[G, P]` (IoU of each ground truth with each prediction, G >= 1)
    /// → `[P]` int64: the matched ground-truth index, or
    /// [`BELOW_LOW_THRESHOLD`] / [`BETWEEN_THRESHOLDS`].
    pub fn assign(&self, quality: &Tensor) -> Tensor {
        let (matched_vals, matches) = quality.max_dim(0, false);
        let all_matches = matches.copy();
        let below = matched_vals.lt(self.low_threshold);
        let between = matched_vals.ge(self.low_threshold).logical_and(&matched_vals.lt(self.high_threshold));
        let mut matches = matches.masked_fill(&below, BELOW_LOW_THRESHOLD).masked_fill(&between, BETWEEN_THRESHOLDS);
        if self.allow_low_quality_matches {
            // For each ground truth, every prediction achieving its highest
            // IoU (ties included) takes its best match back.
            let (best_per_gt, _) = quality.max_dim(1, true);
            let is_best = quality.eq_tensor(&best_per_gt).any_dim(0, false);
            matches = matches.where_self(&is_best.logical_not(), &all_matches);
        }
        matches.to_kind(Kind::Int64)
    }
}

/// Marks as ignored (-1) the background predictions that overlap a crowd
/// region with IoU >= `thresh`: they are neither positives nor negatives.
pub fn ignore_crowd_overlaps(labels: Tensor, boxes: &Tensor, crowd: Option<&Tensor>, thresh: f64) -> Tensor {
    let Some(crowd) = crowd.filter(|c| c.size()[0] > 0) else {
        return labels;
    };
    let overlaps = super::box_iou(crowd, boxes).max_dim(0, false).0.ge(thresh);
    let is_background = labels.eq(0);
    labels.masked_fill(&overlaps.logical_and(&is_background), -1)
}
