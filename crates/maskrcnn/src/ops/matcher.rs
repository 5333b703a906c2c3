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

/// Matches of a whole batch against padded ground truth.
#[derive(Debug)]
pub struct BatchMatches {
    /// `[B, P]` int64: index into the padded ground truth (`[B, G]` rows),
    /// or [`BELOW_LOW_THRESHOLD`] / [`BETWEEN_THRESHOLDS`].
    pub matched: Tensor,
    /// `[B, P]` bool: the prediction overlaps some crowd row with IoU >=
    /// the high threshold.
    pub crowd_overlap: Tensor,
}

impl Matcher {
    /// Matches predictions `preds` (`[1, P, 4]` shared by every image, or
    /// `[B, P, 4]`) to the ground truth `gt` `[B, G, 4]`: only the rows set
    /// in `match_rows` `[B, G]` can be matched, and `crowd_rows` `[B, G]` are
    /// tested for crowd overlap. Equal to [`Matcher::assign`] on each image's
    /// matchable rows. On CUDA two kernels, no host sync; on the CPU per image.
    pub fn assign_batch(&self, gt: &Tensor, match_rows: &Tensor, crowd_rows: &Tensor, preds: &Tensor) -> BatchMatches {
        let params = crate::kernels::matcher::MatchParams {
            low: self.low_threshold,
            high: self.high_threshold,
            allow_low_quality: self.allow_low_quality_matches,
            crowd_thresh: self.high_threshold,
        };
        if let Some(a) = crate::kernels::matcher::assign(gt, match_rows, crowd_rows, preds, params) {
            return BatchMatches { matched: a.matched, crowd_overlap: a.crowd };
        }
        let b = gt.size()[0];
        let p = preds.size()[1];
        let device = gt.device();
        let mut matched = Vec::with_capacity(b as usize);
        let mut crowd = Vec::with_capacity(b as usize);
        for i in 0..b {
            let p_i = if preds.size()[0] == 1 { preds.get(0) } else { preds.get(i) };
            let rows = match_rows.get(i).nonzero().squeeze_dim(1);
            matched.push(if rows.size()[0] == 0 {
                Tensor::full([p], BELOW_LOW_THRESHOLD, (Kind::Int64, device))
            } else {
                let m = self.assign(&super::box_iou(&gt.get(i).index_select(0, &rows), &p_i));
                let original = rows.index_select(0, &m.clamp_min(0));
                original.where_self(&m.ge(0), &m)
            });
            let crowd_idx = crowd_rows.get(i).nonzero().squeeze_dim(1);
            crowd.push(if crowd_idx.size()[0] == 0 {
                Tensor::zeros([p], (Kind::Bool, device))
            } else {
                super::box_iou(&gt.get(i).index_select(0, &crowd_idx), &p_i).max_dim(0, false).0.ge(self.high_threshold)
            });
        }
        BatchMatches { matched: Tensor::stack(&matched, 0), crowd_overlap: Tensor::stack(&crowd, 0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn boxes(n: i64, scale: f64) -> Tensor {
        let xy = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * scale;
        let wh = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * (scale / 2.0) + 1.0;
        Tensor::cat(&[&xy, &(&xy + wh)], 1)
    }

    /// The batched matcher on `device` equals [`Matcher::assign`] per image
    /// on the CPU, with padded rows, crowd rows, an image without ground
    /// truth, shared and per-image predictions, and both matcher kinds.
    fn batched_matches_equal_per_image(device: Device) {
        tch::manual_seed(3);
        let (b, g, p) = (3i64, 6i64, 900i64);
        let gt = Tensor::stack(&(0..b).map(|_| boxes(g, 60.0)).collect::<Vec<_>>(), 0);
        // Image 0: 4 real rows (row 3 crowd); image 1: none; image 2: all 6.
        let valid = Tensor::from_slice(&[1u8, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
            .reshape([b, g])
            .to_kind(Kind::Bool);
        let crowd = Tensor::zeros([b, g], (Kind::Bool, Device::Cpu)).index_put_(
            &[Some(Tensor::from_slice(&[0i64])), Some(Tensor::from_slice(&[3i64]))],
            &Tensor::from(true),
            false,
        );
        let match_rows = valid.logical_and(&crowd.logical_not());
        let shared = boxes(p, 80.0).unsqueeze(0);
        let per_image = Tensor::stack(&(0..b).map(|_| boxes(p, 80.0)).collect::<Vec<_>>(), 0);
        for (preds, lq) in [(&shared, true), (&per_image, false), (&per_image, true)] {
            let m = Matcher { high_threshold: 0.5, low_threshold: 0.3, allow_low_quality_matches: lq };
            let d = |t: &Tensor| t.to_device(device);
            let got = m.assign_batch(&d(&gt), &d(&match_rows), &d(&crowd), &d(preds));
            for i in 0..b {
                let p_i = if preds.size()[0] == 1 { preds.get(0) } else { preds.get(i) };
                let rows: Vec<i64> = (0..g).filter(|&r| bool::try_from(match_rows.get(i).get(r)).unwrap()).collect();
                let expected = if rows.is_empty() {
                    Tensor::full([p], BELOW_LOW_THRESHOLD, (Kind::Int64, Device::Cpu))
                } else {
                    let r = Tensor::from_slice(&rows);
                    let a = m.assign(&crate::ops::box_iou(&gt.get(i).index_select(0, &r), &p_i));
                    r.index_select(0, &a.clamp_min(0)).where_self(&a.ge(0), &a)
                };
                let got_i = got.matched.get(i).to_device(Device::Cpu);
                assert!(got_i.equal(&expected), "image {i}, low quality {lq}: matches differ");
                let crowd_expected = if i == 0 {
                    crate::ops::box_iou(&gt.get(0).narrow(0, 3, 1), &p_i).max_dim(0, false).0.ge(0.5)
                } else {
                    Tensor::zeros([p], (Kind::Bool, Device::Cpu))
                };
                assert!(got.crowd_overlap.get(i).to_device(Device::Cpu).equal(&crowd_expected), "image {i}: crowd");
            }
        }
    }

    /// torchvision's rule on a hand-made IoU matrix: >= high matched, < low
    /// background, between ignored; with low-quality matches each ground
    /// truth also takes back every prediction of its best IoU (ties too).
    #[test]
    fn thresholds_and_low_quality_matches() {
        // 2 ground truths × 5 predictions.
        let quality = Tensor::from_slice(&[
            0.9f32, 0.5, 0.2, 0.1, 0.0, //
            0.1, 0.6, 0.4, 0.35, 0.35,
        ])
        .reshape([2, 5]);
        let strict = Matcher { high_threshold: 0.7, low_threshold: 0.3, allow_low_quality_matches: false };
        let got: Vec<i64> = Vec::try_from(strict.assign(&quality)).unwrap();
        assert_eq!(got, [0, BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS]);
        let rpn = Matcher { allow_low_quality_matches: true, ..strict };
        let got: Vec<i64> = Vec::try_from(rpn.assign(&quality)).unwrap();
        // Ground truth 1's best IoU is 0.6 (prediction 1): matched back.
        assert_eq!(got, [0, 1, BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS]);
        let low = Matcher { high_threshold: 0.5, low_threshold: 0.36, allow_low_quality_matches: false };
        let got: Vec<i64> = Vec::try_from(low.assign(&quality)).unwrap();
        assert_eq!(got, [0, 1, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]);
        // Ties: both predictions of ground truth 1's best IoU come back.
        let tied = Tensor::from_slice(&[0.1f32, 0.2, 0.2]).reshape([1, 3]);
        let got: Vec<i64> = Vec::try_from(rpn.assign(&tied)).unwrap();
        assert_eq!(got, [BELOW_LOW_THRESHOLD, 0, 0]);
    }

    #[test]
    fn batched_matches_equal_per_image_cpu() {
        batched_matches_equal_per_image(Device::Cpu);
    }

    #[test]
    fn gpu_batched_matches_equal_per_image() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_batched_matches_equal_per_image") else { return };
        batched_matches_equal_per_image(device);
    }
}
