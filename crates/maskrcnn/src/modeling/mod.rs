//! The network: backbone (ResNet + FPN), RPN, RoI heads, and the model that
//! assembles them with the input transform.

pub mod backbone;
pub mod graphs;
pub mod layers;
pub mod mask_rcnn;
pub mod poolers;
pub mod roi_heads;
pub mod rpn;
pub mod transform;
pub mod weights;

pub use mask_rcnn::{loss_names, BatchResize, InferenceTrace, Losses, MaskRcnn, TargetError};
pub use roi_heads::{mask_row_bucket, Detections, MaskRows};

/// Why a model could not be built or its weights loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("unsupported backbone depth {0} (use 18, 34, 50, 101 or 152)")]
    UnsupportedDepth(usize),
    #[error("cannot read weights {path}: {message}")]
    ReadWeights { path: std::path::PathBuf, message: String },
    #[error("cannot write weights {path}: {message}")]
    WriteWeights { path: std::path::PathBuf, message: String },
    #[error("weights {path} have {found} classes (roi_heads.box_predictor.cls_score.weight is {shape:?}) but model.num_classes is {expected}; set --set model.num_classes={found}")]
    NumClasses { path: std::path::PathBuf, expected: usize, found: i64, shape: Vec<i64> },
    #[error("weights {path} do not fit the model: {problems}")]
    Mismatch { path: std::path::PathBuf, problems: String },
    #[error("weights {path} hold NaN or infinite values: {tensors}")]
    NonFinite { path: std::path::PathBuf, tensors: String },
}
