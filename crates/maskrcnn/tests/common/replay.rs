//! Replaying the samples torchvision drew: the oracle scripts record each
//! sampler call's per-image positive and negative masks, and this sampler
//! gives them back in call order, so both sides compute losses on the same
//! samples. A call that does not fit the recording ends the test.

use maskrcnn::ops::sampler::Samples;
use maskrcnn::ops::{FgBgSampler, SampleStage};
use tch::{Kind, Tensor};

/// Replays recorded selections in call order (for tests that drive
/// torchvision and this crate with the same samples).
#[derive(Debug, Default)]
pub struct ReplaySampler {
    /// Per call: stage and per-image (positive, negative) masks over that
    /// image's real positions, in order.
    pub calls: std::collections::VecDeque<(SampleStage, Vec<(Tensor, Tensor)>)>,
}

impl FgBgSampler for ReplaySampler {
    fn sample(
        &mut self,
        stage: SampleStage,
        labels: &Tensor,
        exists: &Tensor,
        batch: usize,
        _fraction: f64,
    ) -> Samples {
        let (recorded_stage, per_image) = self.calls.pop_front().expect("ReplaySampler: no recorded call left");
        assert_eq!(recorded_stage, stage, "ReplaySampler: calls replayed out of order");
        assert_eq!(per_image.len() as i64, labels.size()[0], "ReplaySampler: image count differs");
        let device = labels.device();
        let (b, p) = (labels.size()[0], labels.size()[1]);
        let mut pos = Tensor::zeros([b, p], (Kind::Bool, device));
        let mut neg = Tensor::zeros([b, p], (Kind::Bool, device));
        for (i, (rp, rn)) in per_image.into_iter().enumerate() {
            let positions = exists.get(i as i64).nonzero().squeeze_dim(1);
            assert_eq!(rp.size()[0], positions.size()[0], "ReplaySampler: recorded mask does not fit the labels");
            let put = |m: &mut Tensor, r: Tensor| {
                let r = r.to_device(device).to_kind(Kind::Bool);
                let _ = m.get(i as i64).index_copy_(0, &positions, &r);
            };
            put(&mut pos, rp);
            put(&mut neg, rn);
        }
        Samples::from_masks(&pos, &neg, batch)
    }
}
