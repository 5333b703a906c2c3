//! COCO evaluation (through hotcoco), running a model over a dataset, and the
//! results formats.

pub mod coco_eval;
pub mod dataset_inference;
pub mod ground_truth;
pub mod results;
