//! Which images form each training batch: an infinite sequence of batches,
//! counted in iterations, shuffled per epoch from a seed, (optionally)
//! grouped by aspect ratio so portrait and landscape images batch apart
//! (the seed's `GroupedBatchSampler`; padding a mixed batch wastes compute).
//! Batches are formed globally — `batch_size × world_size` images of one
//! group — and each rank takes its slice: N ranks see exactly the images,
//! in the same order, that one process with the global batch would (so a
//! run resumed on another number of GPUs continues the same sequence), and
//! at every iteration all ranks hold images of one aspect group, which lets
//! them pad to one shape (see [`PlannedBatch::global`]).

/// The batch plan of one rank.
#[derive(Debug, Clone)]
pub struct GroupedBatchSampler {
    /// Aspect group of each dataset image (`true`: landscape or square).
    groups: Vec<bool>,
    batch_size: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
    group_by_aspect: bool,
}

/// Why a sampler cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error("rank {rank} is not below world size {world_size}")]
    Rank { rank: usize, world_size: usize },
    #[error("batch size must be at least 1")]
    BatchSize,
    #[error("{images} images cannot fill one batch of {batch_size} per rank over {world_size} rank(s)")]
    TooFewImages { images: usize, batch_size: usize, world_size: usize },
}

impl GroupedBatchSampler {
    /// `landscape[i]` is image `i`'s aspect group; `batch_size` is per rank.
    pub fn new(
        landscape: Vec<bool>,
        batch_size: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
        group_by_aspect: bool,
    ) -> Result<GroupedBatchSampler, SamplerError> {
        if rank >= world_size {
            return Err(SamplerError::Rank { rank, world_size });
        }
        if batch_size == 0 {
            return Err(SamplerError::BatchSize);
        }
        let sampler = GroupedBatchSampler { groups: landscape, batch_size, seed, rank, world_size, group_by_aspect };
        if sampler.global_epoch(0).is_empty() {
            return Err(SamplerError::TooFewImages { images: sampler.groups.len(), batch_size, world_size });
        }
        Ok(sampler)
    }

    /// The global batches of `epoch`: the dataset shuffled with
    /// `(seed, epoch)`, filled in that order into per-group batches of
    /// `batch_size × world_size` images. A group's last partial batch is
    /// dropped (its images come round again in the next epoch's shuffle).
    /// Each batch lists dataset indices, rank 0's slice first.
    pub fn global_epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.groups.len()).collect();
        crate::random::Rng::derive(self.seed, 0x005A_3D1E, epoch).shuffle(&mut order);
        let size = self.batch_size * self.world_size;
        let mut pending: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
        let mut batches = Vec::new();
        for i in order {
            let g = usize::from(self.group_by_aspect && self.groups[i]);
            pending[g].push(i);
            if pending[g].len() == size {
                batches.push(std::mem::take(&mut pending[g]));
            }
        }
        batches
    }

    /// This rank's batches of `epoch`: its slices of the global batches
    /// (what [`BatchPlan`] yields, one epoch at a time; for the tests).
    #[cfg(test)]
    fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        self.global_epoch(epoch).iter().map(|g| self.slice(g).to_vec()).collect()
    }

    /// This rank's images of a global batch.
    fn slice<'a>(&self, global: &'a [usize]) -> &'a [usize] {
        &global[self.rank * self.batch_size..(self.rank + 1) * self.batch_size]
    }

    /// Batches from global iteration `start` on, forever (epochs follow one
    /// another). Resuming at `start` yields exactly the batches an
    /// uninterrupted run sees from there.
    pub fn plan_from(self, start: u64) -> BatchPlan {
        BatchPlan::new(self, start)
    }
}

/// One iteration's images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBatch {
    pub iteration: u64,
    /// This rank's images (dataset indices).
    pub images: Vec<usize>,
    /// Every rank's images at this iteration, rank 0's first (this rank's
    /// among them).
    pub global: Vec<usize>,
}

/// The sampler's infinite sequence of batches from a start iteration,
/// computed lazily epoch by epoch.
#[derive(Debug)]
pub struct BatchPlan {
    sampler: GroupedBatchSampler,
    epoch: u64,
    batches: std::vec::IntoIter<Vec<usize>>,
    iteration: u64,
}

impl BatchPlan {
    fn new(sampler: GroupedBatchSampler, start: u64) -> BatchPlan {
        // Skip whole epochs by their batch counts (cheap: shuffles only).
        let (mut epoch, mut skip) = (0u64, start);
        let mut batches = sampler.global_epoch(0);
        while skip >= batches.len() as u64 {
            skip -= batches.len() as u64;
            epoch += 1;
            batches = sampler.global_epoch(epoch);
        }
        batches.drain(..skip as usize);
        BatchPlan { sampler, epoch, batches: batches.into_iter(), iteration: start }
    }
}

impl Iterator for BatchPlan {
    type Item = PlannedBatch;

    fn next(&mut self) -> Option<PlannedBatch> {
        let global = match self.batches.next() {
            Some(b) => b,
            None => {
                self.epoch += 1;
                self.batches = self.sampler.global_epoch(self.epoch).into_iter();
                self.batches.next()?
            }
        };
        self.iteration += 1;
        Some(PlannedBatch { iteration: self.iteration - 1, images: self.sampler.slice(&global).to_vec(), global })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(n: usize) -> Vec<bool> {
        (0..n).map(|i| i % 3 != 0).collect()
    }

    #[test]
    fn deterministic_grouped_and_disjoint() {
        let g = groups(103);
        let s = GroupedBatchSampler::new(g.clone(), 4, 11, 0, 1, true).unwrap();
        assert_eq!(s.epoch(3), s.epoch(3));
        assert_ne!(s.epoch(0), s.epoch(1));
        for b in s.epoch(0) {
            assert_eq!(b.len(), 4);
            assert!(b.iter().all(|&i| g[i] == g[b[0]]), "mixed aspect groups in {b:?}");
        }
        let shards: Vec<Vec<usize>> = (0..3)
            .map(|r| {
                let s = GroupedBatchSampler::new(g.clone(), 4, 11, r, 3, true).unwrap();
                s.epoch(5).concat()
            })
            .collect();
        for a in 0..3 {
            for b in a + 1..3 {
                assert!(shards[a].iter().all(|i| !shards[b].contains(i)), "ranks {a} and {b} share images");
            }
        }
    }

    #[test]
    fn resume_matches_uninterrupted() {
        let s = GroupedBatchSampler::new(groups(37), 4, 2, 0, 1, true).unwrap();
        let all: Vec<_> = s.clone().plan_from(0).take(40).collect();
        let resumed: Vec<_> = s.plan_from(23).take(17).collect();
        assert_eq!(&all[23..], &resumed[..]);
        assert_eq!(all[5].iteration, 5);
    }

    /// Three ranks of 4 images see, iteration by iteration, the batches of
    /// one process with 12: their slices in rank order, of one aspect group.
    #[test]
    fn ranks_split_the_one_process_batches() {
        let g = groups(211);
        let one: Vec<PlannedBatch> =
            GroupedBatchSampler::new(g.clone(), 12, 5, 0, 1, true).unwrap().plan_from(0).take(40).collect();
        let ranks: Vec<Vec<PlannedBatch>> = (0..3)
            .map(|r| GroupedBatchSampler::new(g.clone(), 4, 5, r, 3, true).unwrap().plan_from(0).take(40).collect())
            .collect();
        for (k, whole) in one.iter().enumerate() {
            let parts: Vec<usize> = ranks.iter().flat_map(|r| r[k].images.clone()).collect();
            assert_eq!(parts, whole.images, "iteration {k}");
            assert!(ranks.iter().all(|r| r[k].global == whole.images && r[k].iteration == k as u64));
            assert!(parts.iter().all(|&i| g[i] == g[parts[0]]), "mixed aspect groups at iteration {k}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            GroupedBatchSampler::new(groups(3), 4, 0, 0, 1, true).unwrap_err().to_string(),
            "3 images cannot fill one batch of 4 per rank over 1 rank(s)"
        );
        assert!(GroupedBatchSampler::new(groups(30), 2, 0, 2, 2, true).is_err());
    }
}
