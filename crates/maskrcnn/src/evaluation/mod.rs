//! COCO evaluation (through hotcoco) and results export.

pub mod coco_eval;
pub mod results;
