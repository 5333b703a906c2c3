//! Detection operators on tensors (CPU and CUDA): box geometry and coding,
//! NMS, RoIAlign, matching and sampling. Each matches its torchvision
//! counterpart.

pub mod boxes;
pub mod matcher;
pub mod nms;
pub mod roi_align;
pub mod sampler;

pub use boxes::{box_area, box_iou, boxes_at_least, clip_boxes_to_sizes, BoxCoder};
pub use matcher::Matcher;
pub use nms::{batched_nms, nms};
pub use roi_align::roi_align;
pub use sampler::{BalancedSampler, FgBgSampler, FirstSampler, SampleStage};
