//! `[precision]`: mixed precision, TF32, memory layout, cuDNN tuning,
//! fp16 loss scaling.

use super::error::{rule, ConfigError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Numeric precision and memory layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionConfig {
    /// Autocast dtype for convolutions and matmuls on CUDA.
    pub amp: AmpMode,
    /// Allow TF32 tensor cores for fp32 convolutions and matmuls.
    pub tf32: bool,
    /// Keep activations and convolution weights in NHWC (channels-last)
    /// layout on CUDA.
    pub channels_last: bool,
    /// cuDNN autotuning of convolution algorithms per input shape: fastest
    /// with fixed sizes; with multi-scale training every new padded size is
    /// tuned again, which can dominate short runs.
    pub cudnn_benchmark: bool,
    /// CUDA graphs on CUDA: inference replays the backbone and FPN per
    /// padded input shape (at most `modeling::graphs::MAX_GRAPHS` shapes,
    /// freed after each dataset evaluation), training replays each
    /// micro-batch's forward and backward per padded batch and target
    /// bucket (at most `engine::step_graphs::MAX_STEP_GRAPHS`), each
    /// recorded the second time it is seen: one launch instead of hundreds
    /// or thousands. Recorded training steps run the mask head on a row
    /// budget and publish their positive count; a step over budget runs
    /// again (exact losses; see `engine::step_graphs::StepGraphs`). Off:
    /// always eager, the mask head sized by its counted positives.
    #[serde(default = "default_cuda_graphs")]
    pub cuda_graphs: bool,
    /// fp16 dynamic loss scaling: initial scale (doubles after
    /// `loss_scale_growth_interval` clean steps, halves on inf/NaN).
    pub loss_scale_init: f64,
    pub loss_scale_growth_interval: usize,
}

/// Mixed-precision mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmpMode {
    Off,
    Fp16,
    Bf16,
}

impl AmpMode {
    /// The dtype autocast runs in under this mode (`None` when off).
    pub fn autocast_dtype(self) -> Option<crate::shim::AutocastDtype> {
        match self {
            AmpMode::Off => None,
            AmpMode::Fp16 => Some(crate::shim::AutocastDtype::Fp16),
            AmpMode::Bf16 => Some(crate::shim::AutocastDtype::Bf16),
        }
    }
}

impl fmt::Display for AmpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmpMode::Off => "off",
            AmpMode::Fp16 => "fp16",
            AmpMode::Bf16 => "bf16",
        })
    }
}

fn default_cuda_graphs() -> bool {
    true
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        PrecisionConfig {
            amp: AmpMode::Off,
            tf32: true,
            channels_last: true,
            cudnn_benchmark: true,
            cuda_graphs: true,
            loss_scale_init: 8192.0,
            loss_scale_growth_interval: 2000,
        }
    }
}

impl PrecisionConfig {
    /// The section's range rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
        rule(p.loss_scale_init >= 1.0 && p.loss_scale_init.is_finite(), "precision.loss_scale_init", "must be >= 1")?;
        rule(p.loss_scale_growth_interval >= 1, "precision.loss_scale_growth_interval", "must be >= 1")
    }
}
