//! Mask R-CNN instance segmentation — training, evaluation and inference — on
//! libtorch through tch.
//!
//! Layout follows the architecture: [`config`] holds every knob;
//! [`structures`] the data types of detection (masks, RLE); [`ops`] the
//! detection operators (boxes, NMS, RoIAlign); [`modeling`] the network;
//! [`data`] datasets, images and the loader; [`engine`] training;
//! [`distributed`] several processes; [`prediction`] prediction over files;
//! [`bench`] benchmarks; [`evaluation`] COCO evaluation and results;
//! [`kernels`] the CUDA kernels; [`visualization`] drawings.

pub mod bench;
pub mod config;
pub mod data;
pub mod distributed;
pub mod engine;
pub mod environment;
pub mod evaluation;
pub mod host_sync;
pub mod host_timing;
pub mod io;
pub mod kernels;
pub mod modeling;
pub mod ops;
pub mod prediction;
pub mod random;
pub mod shim;
pub mod structures;
pub mod text;
pub mod visualization;

pub use config::{Config, ConfigError};
pub use modeling::{Detections, MaskRcnn};

/// Helpers of the unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// The first CUDA device, or `None` after saying that test `name`
    /// skips (see [`crate::environment::cuda_for_test`]).
    pub fn cuda_or_skip(name: &str) -> Option<tch::Device> {
        crate::environment::cuda_for_test(name)
    }
}
