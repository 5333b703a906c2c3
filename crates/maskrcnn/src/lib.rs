//! Mask R-CNN instance segmentation — training, evaluation and inference — on
//! libtorch through tch.
//!
//! Layout follows the architecture: [`config`] holds every knob;
//! [`structures`] the data types of detection; [`ops`] the detection
//! operators (boxes, NMS, RoIAlign); [`modeling`] the network.

pub mod config;
pub mod environment;
pub mod modeling;
pub mod ops;
pub mod shim;
pub mod structures;

pub use config::{Config, ConfigError};
pub use modeling::{Detections, MaskRcnn};
