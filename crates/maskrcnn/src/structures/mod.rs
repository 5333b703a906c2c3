//! Data structures of detection: ground-truth instances, masks (pasting,
//! targets) and their COCO RLE encoding.

pub mod instances;
pub mod masks;
pub mod rle;

pub use instances::{InstanceMasks, Target};
