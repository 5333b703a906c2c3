//! Detection operators on tensors (CPU and CUDA): box geometry and coding,
//! NMS, RoIAlign. Each matches its torchvision.ops counterpart.

pub mod boxes;
pub mod nms;
pub mod roi_align;

pub use boxes::{box_area, box_iou, clip_boxes_to_image, remove_small_boxes, BoxCoder};
pub use nms::{batched_nms, nms};
pub use roi_align::roi_align;
