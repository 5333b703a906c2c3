//! Choosing which matched predictions enter the losses: a fixed number per
//! image with at most a fraction of positives, as torchvision's
//! `BalancedPositiveNegativeSampler`. The choice is behind a trait so tests can
//! replay the exact samples torchvision drew.

use tch::{Kind, Tensor};

/// Which of the two samplers of Mask R-CNN is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleStage {
    /// Anchors for the RPN losses.
    Rpn,
    /// Proposals for the box and mask losses.
    RoiHeads,
}

/// Positive and negative selections of one image, as `[P]` bool masks.
#[derive(Debug)]
pub struct Sampled {
    pub positive: Tensor,
    pub negative: Tensor,
}

/// Chooses samples among matched predictions.
pub trait FgBgSampler {
    /// `labels` holds one `[P]` tensor per image: `>= 1` positive, `0`
    /// negative, `-1` ignored. Returns one selection per image.
    fn sample(
        &mut self,
        stage: SampleStage,
        labels: &[Tensor],
        batch_size_per_image: usize,
        positive_fraction: f64,
    ) -> Vec<Sampled>;
}

/// Uniformly random samples (libtorch's RNG, seeded by `tch::manual_seed`).
#[derive(Debug, Default, Clone, Copy)]
pub struct BalancedSampler;

impl FgBgSampler for BalancedSampler {
    fn sample(&mut self, _stage: SampleStage, labels: &[Tensor], batch: usize, fraction: f64) -> Vec<Sampled> {
        labels
            .iter()
            .map(|l| {
                let positive = l.ge(1).nonzero().squeeze_dim(1);
                let negative = l.eq(0).nonzero().squeeze_dim(1);
                let num_pos = ((batch as f64 * fraction) as i64).min(positive.size()[0]);
                let num_neg = (batch as i64 - num_pos).min(negative.size()[0]);
                let device = l.device();
                let perm1 = Tensor::randperm(positive.size()[0], (Kind::Int64, device)).narrow(0, 0, num_pos);
                let perm2 = Tensor::randperm(negative.size()[0], (Kind::Int64, device)).narrow(0, 0, num_neg);
                let mask = |idx: &Tensor| Tensor::zeros_like(l).to_kind(Kind::Bool).index_fill(0, idx, 1);
                Sampled {
                    positive: mask(&positive.index_select(0, &perm1)),
                    negative: mask(&negative.index_select(0, &perm2)),
                }
            })
            .collect()
    }
}

/// Replays recorded selections in call order (for tests that drive
/// torchvision and this crate with the same samples).
#[derive(Debug, Default)]
pub struct ReplaySampler {
    /// Per call: stage and per-image (positive, negative) masks.
    pub calls: std::collections::VecDeque<(SampleStage, Vec<(Tensor, Tensor)>)>,
}

impl FgBgSampler for ReplaySampler {
    fn sample(&mut self, stage: SampleStage, labels: &[Tensor], _batch: usize, _fraction: f64) -> Vec<Sampled> {
        let (recorded_stage, per_image) = self.calls.pop_front().expect("ReplaySampler: no recorded call left");
        assert_eq!(recorded_stage, stage, "ReplaySampler: calls replayed out of order");
        assert_eq!(per_image.len(), labels.len(), "ReplaySampler: image count differs");
        per_image
            .into_iter()
            .zip(labels)
            .map(|((p, n), l)| {
                assert_eq!(p.size(), l.size(), "ReplaySampler: recorded mask does not fit the labels");
                Sampled {
                    positive: p.to_device(l.device()).to_kind(Kind::Bool),
                    negative: n.to_device(l.device()).to_kind(Kind::Bool),
                }
            })
            .collect()
    }
}
