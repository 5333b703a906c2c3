//! Data structures of detection: ground-truth instances, masks (pasting,
//! targets), their COCO RLE encoding, and the categories behind labels.

pub mod categories;
pub mod instances;
pub mod masks;
pub mod rle;

pub use categories::{Categories, Category};
pub use instances::{BitmapBatch, InstanceMasks, PackedPolygons, PaddingFloor, Target, TargetBatch, TargetPadding};
