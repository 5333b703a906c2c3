//! Mask R-CNN instance segmentation — training, evaluation and inference — on
//! libtorch through tch.
//!
//! Layout follows the architecture: [`config`] holds every knob; later stages
//! live in `structures`, `modeling`, `ops`, `kernels`, `data`, `engine` and
//! `evaluation`.

pub mod config;
pub mod environment;
pub mod shim;

pub use config::{Config, ConfigError};
