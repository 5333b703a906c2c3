//! `[precision]`: mixed precision, TF32, memory layout, cuDNN tuning,
//! fp16 loss scaling.

use super::error::{rule, ConfigError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Numeric precision and memory layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionConfig {
    /// Autocast dtype for convolutions and matmuls on CUDA: `auto` is bf16
    /// on GPUs that have it (compute capability 8.0 and up: A100, H100,
    /// RTX 30xx on), fp16 with loss scaling on older ones, off on the CPU.
    pub amp: AmpMode,
    /// Allow TF32 tensor cores for fp32 convolutions and matmuls.
    pub tf32: bool,
    /// Keep activations and convolution weights in NHWC (channels-last)
    /// layout on CUDA.
    pub channels_last: bool,
    /// cuDNN autotuning of convolution algorithms per input shape. Off by
    /// default: on one H100 it leaves the steady step unchanged (bs16 bf16
    /// at 800 × 1000–1333: 239.5 vs 239.6 img/s frozen, 132.4 vs 131.7 from
    /// scratch) while every new padded shape is tuned again — on COCO-like
    /// data with the defaults the first 50 iterations took 50.4 s with it
    /// and 9.5 s without (70 s vs 4.5 s outside steady steps in 200).
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
    /// The most GPU memory (GiB) libtorch's allocator may hold once a
    /// training step's CUDA graph is recorded; past it the graphs are
    /// dropped, their memory released, and fewer shapes recorded from then
    /// on. 0: 80% of the card.
    #[serde(default)]
    pub graph_memory_gb: f64,
    /// fp16 dynamic loss scaling: initial scale (doubles after
    /// `loss_scale_growth_interval` clean steps, halves on inf/NaN).
    pub loss_scale_init: f64,
    pub loss_scale_growth_interval: usize,
}

/// Mixed-precision mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmpMode {
    /// Chosen for the device ([`AmpMode::on`]).
    Auto,
    Off,
    Fp16,
    Bf16,
}

impl AmpMode {
    /// The dtype autocast runs in under this mode (`None` when off, and for
    /// an `auto` not resolved by [`AmpMode::on`]).
    pub fn autocast_dtype(self) -> Option<crate::shim::AutocastDtype> {
        match self {
            AmpMode::Off | AmpMode::Auto => None,
            AmpMode::Fp16 => Some(crate::shim::AutocastDtype::Fp16),
            AmpMode::Bf16 => Some(crate::shim::AutocastDtype::Bf16),
        }
    }

    /// The mode on `device`: off on the CPU (autocast is CUDA's here);
    /// `auto` on CUDA is bf16 from compute capability 8.0, else fp16.
    pub fn on(self, device: tch::Device) -> AmpMode {
        match (self, device) {
            (_, tch::Device::Cpu) => AmpMode::Off,
            (AmpMode::Auto, tch::Device::Cuda(i)) => {
                let bf16 = crate::environment::cuda_device(i).is_none_or(|d| d.capability.0 >= 8);
                if bf16 {
                    AmpMode::Bf16
                } else {
                    AmpMode::Fp16
                }
            }
            (mode, _) => mode,
        }
    }
}

impl fmt::Display for AmpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmpMode::Auto => "auto",
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
            amp: AmpMode::Auto,
            tf32: true,
            channels_last: true,
            cudnn_benchmark: false,
            cuda_graphs: true,
            graph_memory_gb: 0.0,
            loss_scale_init: 8192.0,
            loss_scale_growth_interval: 2000,
        }
    }
}

impl PrecisionConfig {
    /// [`PrecisionConfig::graph_memory_gb`] in bytes for CUDA device
    /// `index` (`None` when the card's size is unknown and no budget set).
    pub fn graph_memory_bytes(&self, index: usize) -> Option<u64> {
        if self.graph_memory_gb > 0.0 {
            return Some((self.graph_memory_gb * (1u64 << 30) as f64) as u64);
        }
        crate::environment::cuda_device(index).map(|d| (d.total_memory_bytes as f64 * 0.8) as u64)
    }

    /// The section's range rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
        rule(p.loss_scale_init >= 1.0 && p.loss_scale_init.is_finite(), "precision.loss_scale_init", "must be >= 1")?;
        rule(p.loss_scale_growth_interval >= 1, "precision.loss_scale_growth_interval", "must be >= 1")?;
        rule(
            p.graph_memory_gb >= 0.0 && p.graph_memory_gb.is_finite(),
            "precision.graph_memory_gb",
            "must be >= 0 (0: 80% of the card)",
        )
    }
}
