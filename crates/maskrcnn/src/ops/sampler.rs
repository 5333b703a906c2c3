//! Choosing which matched predictions enter the losses: a fixed number of
//! slots per image, at most a fraction of them positives, the rest
//! negatives, as torchvision's `BalancedPositiveNegativeSampler` — each
//! image's positives are a uniform random subset of up to
//! `batch_size × positive_fraction` of its positives, and its negatives a
//! uniform random subset filling the remaining slots. Static shapes: every
//! image gets `batch_size_per_image` slots, some marked empty. The choice
//! sits behind a trait so tests can replay the exact samples torchvision drew.

use tch::{Kind, Tensor};

/// Which of the two samplers of Mask R-CNN is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleStage {
    /// Anchors for the RPN losses.
    Rpn,
    /// Proposals for the box and mask losses.
    RoiHeads,
}

/// The samples of a batch, `S` slots per image: positives first (in the
/// first `floor(S × positive_fraction)` slots), then negatives, then empty
/// slots.
#[derive(Debug)]
pub struct Samples {
    /// `[B, S]` int64 positions along the labels' second dimension (an
    /// empty slot holds some valid position).
    pub index: Tensor,
    /// `[B, S]` bool: the slot holds a sample.
    pub valid: Tensor,
}

impl Samples {
    /// The samples marked in `positive` and `negative` (`[B, P]` bool, at
    /// most `slots` per image together), in `slots` slots per image.
    pub fn from_masks(positive: &Tensor, negative: &Tensor, slots: usize) -> Samples {
        let (b, p) = (positive.size()[0], positive.size()[1]);
        let index = Tensor::arange(p, (Kind::Int64, positive.device())).unsqueeze(0).expand([b, p], false).contiguous();
        compact(&index, &positive.logical_or(negative), positive, p, slots as i64)
    }

    /// Per image, the (positive, negative) masks over its real positions
    /// (`exists` `[B, P]`) for `labels` `[B, P]`: what [`ReplaySampler`]
    /// takes back.
    pub fn masks(&self, labels: &Tensor, exists: &Tensor) -> Vec<(Tensor, Tensor)> {
        // Added, not written: empty slots may repeat a sampled position.
        let chosen = |class: &Tensor| {
            let hit = self.valid.logical_and(&class.gather(1, &self.index, false)).to_kind(Kind::Int64);
            labels.zeros_like().scatter_add(1, &self.index, &hit).gt(0)
        };
        let (pos, neg) = (chosen(&labels.ge(1)), chosen(&labels.eq(0)));
        (0..labels.size()[0])
            .map(|i| {
                let real = exists.get(i);
                (pos.get(i).masked_select(&real), neg.get(i).masked_select(&real))
            })
            .collect()
    }
}

/// Chooses samples among matched predictions.
pub trait FgBgSampler {
    /// `labels` `[B, P]` int64: `>= 1` positive, `0` negative, `-1`
    /// ignored; `exists` `[B, P]` bool marks the positions that are real
    /// (padding is labelled -1 as well). Returns `batch_size_per_image`
    /// slots per image.
    fn sample(
        &mut self,
        stage: SampleStage,
        labels: &Tensor,
        exists: &Tensor,
        batch_size_per_image: usize,
        positive_fraction: f64,
    ) -> Samples;
}

/// Uniformly random samples drawn on the labels' device without a host
/// sync: random keys per position (libtorch's generator, seeded by
/// `tch::manual_seed`); the positives with the largest keys up to the quota,
/// then the negatives with the largest keys up to the slots left.
#[derive(Debug, Default, Clone, Copy)]
pub struct BalancedSampler;

impl FgBgSampler for BalancedSampler {
    fn sample(
        &mut self,
        _stage: SampleStage,
        labels: &Tensor,
        _exists: &Tensor,
        batch: usize,
        fraction: f64,
    ) -> Samples {
        let (b, p) = (labels.size()[0], labels.size()[1]);
        let device = labels.device();
        let keys = Tensor::rand([b, p], (Kind::Float, device));
        let quota = ((batch as f64 * fraction) as i64).min(p);
        let slots = (batch as i64).min(p);
        let is_pos = labels.ge(1);
        let (pos_keys, pos_idx) = keys.where_scalarother(&is_pos, -1.0).topk(quota, 1, true, true);
        let pos_ok = pos_keys.ge(0.0);
        let num_pos = pos_ok.sum_dim_intlist(1, true, Kind::Int64);
        let (neg_keys, neg_idx) = keys.where_scalarother(&labels.eq(0), -1.0).topk(slots, 1, true, true);
        let rank = Tensor::arange(slots, (Kind::Int64, device)).unsqueeze(0);
        let neg_ok = neg_keys.ge(0.0).logical_and(&rank.lt_tensor(&(-num_pos + batch as i64)));
        let index = Tensor::cat(&[pos_idx, neg_idx], 1);
        let ok = Tensor::cat(&[&pos_ok, &neg_ok], 1);
        let is_pos = Tensor::cat(&[pos_ok.ones_like(), neg_ok.zeros_like()], 1);
        compact(&index, &ok, &is_pos, p, batch as i64)
    }
}

/// Keeps the `slots` chosen entries of `index` `[B, T]` (where `ok`;
/// positions along a dimension of `positions` entries): the positives
/// (`is_pos`) first, each group in position order (so samples come out in
/// the same order however they were drawn); empty slots after them.
fn compact(index: &Tensor, ok: &Tensor, is_pos: &Tensor, positions: i64, slots: i64) -> Samples {
    let t = index.size()[1];
    let key = (is_pos.to_kind(Kind::Int64) * (positions + 1) - index + positions) * ok.to_kind(Kind::Int64);
    let k = slots.min(t);
    let (top, order) = key.topk(k, 1, true, true);
    let mut index = index.gather(1, &order, false);
    let mut valid = top.gt(0);
    if k < slots {
        index = index.constant_pad_nd([0, slots - k]);
        valid = valid.constant_pad_nd([0, slots - k]);
    }
    Samples { index, valid }
}

/// Deterministic samples: each image's first positives (up to the quota)
/// and then its first negatives, in position order. For tests that need
/// the same samples whatever the random state, or whatever padding follows
/// the real positions (the balanced sampler's keys shift with their count).
#[derive(Debug, Default, Clone, Copy)]
pub struct FirstSampler;

impl FgBgSampler for FirstSampler {
    fn sample(&mut self, _: SampleStage, labels: &Tensor, _: &Tensor, batch: usize, fraction: f64) -> Samples {
        // The first `n` of each image's positions in `m`, by index.
        let first = |m: Tensor, n: &Tensor| m.logical_and(&m.cumsum(1, Kind::Int64).le_tensor(n));
        let quota = Tensor::from((batch as f64 * fraction) as i64).to_device(labels.device());
        let positive = first(labels.ge(1), &quota);
        let taken = positive.sum_dim_intlist(1, true, Kind::Int64);
        let negative = first(labels.eq(0), &(-taken + batch as i64));
        Samples::from_masks(&positive, &negative, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Labels of one image: `pos` positives, `neg` negatives, `ign`
    /// ignored, shuffled by a fixed permutation.
    fn labels(pos: i64, neg: i64, ign: i64) -> Tensor {
        let l = Tensor::cat(
            &[
                Tensor::full([pos], 3, (Kind::Int64, Device::Cpu)),
                Tensor::zeros([neg], (Kind::Int64, Device::Cpu)),
                Tensor::full([ign], -1, (Kind::Int64, Device::Cpu)),
            ],
            0,
        );
        let perm = Tensor::randperm(pos + neg + ign, (Kind::Int64, Device::Cpu));
        l.index_select(0, &perm)
    }

    /// torchvision's counts: `min(#pos, floor(S·f))` positives and
    /// `min(#neg, S − that)` negatives per image, positives first, no
    /// repeats, in every edge case (more positives than the quota, none,
    /// all ignored, too few negatives); and each eligible position is
    /// chosen with probability count / eligible (4.5σ per position and 3σ
    /// for the class mean over 3,000 draws).
    fn counts_and_inclusion_probabilities(device: Device) {
        tch::manual_seed(11);
        let p = 80;
        let cases = [(30, 40, 10), (0, 70, 10), (0, 0, 80), (5, 6, 69), (60, 20, 0), (10, 70, 0)];
        let rows: Vec<Tensor> = cases.iter().map(|&(a, b, c)| labels(a, b, c)).collect();
        let l = Tensor::stack(&rows, 0).to_device(device);
        let exists = l.ones_like().to_kind(Kind::Bool);
        let (batch, fraction) = (32usize, 0.25);
        let draws = 3000;
        let mut counts = Tensor::zeros([cases.len() as i64, p], (Kind::Float, device));
        for _ in 0..draws {
            let s = BalancedSampler.sample(SampleStage::RoiHeads, &l, &exists, batch, fraction);
            assert_eq!(s.index.size(), [cases.len() as i64, batch as i64]);
            let chosen = Tensor::zeros_like(&counts).scatter_add(1, &s.index, &s.valid.to_kind(Kind::Float));
            assert!(chosen.le(1.0).all().int64_value(&[]) == 1, "a position was chosen twice");
            counts += &chosen;
            let lab = l.gather(1, &s.index, false);
            for (i, &(pos, neg, _)) in cases.iter().enumerate() {
                let n_pos = pos.min(8);
                let n_neg = neg.min(batch as i64 - n_pos);
                let v: Vec<bool> = Vec::try_from(s.valid.get(i as i64).to_device(Device::Cpu)).unwrap();
                let lab: Vec<i64> = Vec::try_from(lab.get(i as i64).to_device(Device::Cpu)).unwrap();
                let expected: Vec<bool> = (0..batch as i64).map(|k| k < n_pos + n_neg).collect();
                assert_eq!(v, expected, "case {i}: slots in use");
                assert!(lab[..n_pos as usize].iter().all(|&x| x >= 1), "case {i}: positives first");
                assert!(lab[n_pos as usize..(n_pos + n_neg) as usize].iter().all(|&x| x == 0), "case {i}: negatives");
            }
        }
        let freq = (counts / draws as f64).to_device(Device::Cpu);
        let l = l.to_device(Device::Cpu);
        for (i, &(pos, neg, _)) in cases.iter().enumerate() {
            let n_pos = pos.min(8);
            let n_neg = neg.min(batch as i64 - n_pos);
            for (class, eligible, chosen) in [(1i64, pos, n_pos), (0, neg, n_neg)] {
                if eligible == 0 {
                    continue;
                }
                let prob = chosen as f64 / eligible as f64;
                let mask = if class == 1 { l.get(i as i64).ge(1) } else { l.get(i as i64).eq(0) };
                let f: Vec<f64> = Vec::try_from(freq.get(i as i64).masked_select(&mask).to_kind(Kind::Double)).unwrap();
                let sigma = (prob * (1.0 - prob) / draws as f64).sqrt().max(1e-12);
                for (k, &fk) in f.iter().enumerate() {
                    assert!((fk - prob).abs() <= 4.5 * sigma, "case {i} class {class} position {k}: {fk} vs {prob}");
                }
                let mean = f.iter().sum::<f64>() / f.len() as f64;
                assert!((mean - prob).abs() <= 3.0 * sigma / (f.len() as f64).sqrt() + 1e-12, "case {i} class {class}");
            }
        }
        // Ignored positions never.
        assert!(freq.masked_select(&l.eq(-1)).sum(Kind::Double).double_value(&[]) == 0.0);
    }

    #[test]
    fn counts_and_inclusion_probabilities_cpu() {
        counts_and_inclusion_probabilities(Device::Cpu);
    }

    #[test]
    fn gpu_counts_and_inclusion_probabilities() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_counts_and_inclusion_probabilities") else { return };
        counts_and_inclusion_probabilities(device);
    }
}
