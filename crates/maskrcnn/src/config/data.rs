//! `[dataloader]`, `[test]` and `[data]`: loading, evaluation and early
//! stop, dataset locations.

use super::error::{rule, unit_interval, ConfigError};
use super::AutoCount;
use serde::{Deserialize, Serialize};

/// Training data loading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataLoaderConfig {
    /// Decode/augment worker threads per process: `"auto"` takes the CPUs
    /// this process may run on (under `launch`, its rank's share) less one
    /// for the training thread, at most 16; or a number.
    pub workers: AutoCount,
    /// Batch portrait and landscape images separately.
    pub aspect_ratio_grouping: bool,
    /// Batches prepared ahead of the training step.
    pub prefetch: usize,
}

/// Inference batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestConfig {
    /// Images per inference batch (global).
    pub ims_per_batch: usize,
    /// Evaluate on `data.val_*` every this many training iterations (and at
    /// the end); 0: only at the end.
    pub eval_period: usize,
    /// Early stop: training ends once bbox AP reaches this and mask AP
    /// reaches `min_mask_map` (the seed's target accuracy); 0: never.
    pub min_bbox_map: f64,
    pub min_mask_map: f64,
}

/// Dataset locations: COCO instances JSON files and their image folders.
/// An empty string means "not given".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub train_ann: String,
    pub train_images: String,
    pub val_ann: String,
    pub val_images: String,
    /// Training images without any usable annotation: dropped (false, as
    /// torchvision's reference and the seed) or trained as negatives (true:
    /// only background for the RPN and the heads). Counted either way.
    #[serde(default)]
    pub keep_empty_images: bool,
    /// An annotation without a mask (no `segmentation`, `[]`, `[[]]`, or no
    /// polygon of 3 points) trains the box losses only (false) or with its
    /// box filled in as its mask (true; the old behaviour of many loaders).
    #[serde(default)]
    pub box_as_mask: bool,
}

/// The most loader threads a config may ask for (`dataloader.workers`,
/// `bench data --workers`): far above any useful count, far below what an
/// operating system refuses to start.
pub const MAX_LOADER_WORKERS: usize = 1024;

impl Default for DataLoaderConfig {
    fn default() -> Self {
        DataLoaderConfig { workers: AutoCount::Auto, aspect_ratio_grouping: true, prefetch: 2 }
    }
}

impl DataLoaderConfig {
    /// Worker threads: the number given, or for `"auto"` the CPUs this
    /// process may run on less one (the training thread), 1..=16.
    pub fn worker_count(&self) -> usize {
        self.workers
            .fixed()
            .unwrap_or_else(|| (crate::environment::usable_cpus().saturating_sub(1)).clamp(1, 16))
            .max(1)
    }

    /// The section's range rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        rule(self.prefetch >= 1, "dataloader.prefetch", "must be >= 1")?;
        rule(
            self.workers.fixed().is_none_or(|w| w <= MAX_LOADER_WORKERS),
            "dataloader.workers",
            &format!("must be <= {MAX_LOADER_WORKERS} (threads decoding images; about one per core is plenty)"),
        )
    }
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig { ims_per_batch: 8, eval_period: 0, min_bbox_map: 0.0, min_mask_map: 0.0 }
    }
}

impl TestConfig {
    /// The section's range rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        unit_interval(self.min_bbox_map, "test.min_bbox_map")?;
        unit_interval(self.min_mask_map, "test.min_mask_map")?;
        rule(self.ims_per_batch >= 1, "test.ims_per_batch", "must be >= 1")
    }
}
