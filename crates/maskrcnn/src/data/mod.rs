//! Data: COCO datasets, synthetic data, images, transforms, the batch
//! sampler and the prefetching loader.

pub mod coco;
pub mod coco_json;
pub mod image;
pub mod loader;
pub mod outline;
pub mod sampler;
pub mod synth;
pub mod transforms;

pub use coco::{CocoDataset, DatasetError, LoadOptions};
pub use loader::{Batch, Loader, LoaderError, LoaderOptions};
