//! Dynamic loss scaling for fp16 training (torch.amp.GradScaler's rule):
//! the loss is multiplied by the scale before backward; gradients are
//! unscaled and checked for inf/NaN on the device; a step with a non-finite
//! gradient is skipped and the scale halves; after `growth_interval` clean
//! steps in a row it doubles. Nothing here waits for the GPU.

use crate::shim::{non_finite_check_and_unscale, ShimError};
use tch::{Device, Kind, Tensor};

/// The scaler's state (all on the training device).
#[derive(Debug)]
pub struct GradScaler {
    /// `[1]` float32: the current loss scale.
    pub scale: Tensor,
    /// `[1]` int32: clean steps since the last change.
    pub growth_tracker: Tensor,
    /// `[1]` float32: 1 when the last unscale found a non-finite gradient.
    pub found_inf: Tensor,
    /// `[1]` float32: skipped steps so far.
    pub skipped: Tensor,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

/// The scaler's state as plain numbers (checkpoints, logs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    pub growth_tracker: i64,
    pub skipped: f64,
}

impl GradScaler {
    pub fn new(init_scale: f64, growth_interval: usize, device: Device) -> GradScaler {
        let f = (Kind::Float, device);
        GradScaler {
            scale: Tensor::full([1], init_scale, f),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
            found_inf: Tensor::zeros([1], f),
            skipped: Tensor::zeros([1], f),
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: growth_interval as i64,
        }
    }

    /// `loss · scale`.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.scale.to_kind(loss.kind())
    }

    /// Divides `grads` by the scale in place and records whether any value
    /// is inf or NaN in `found_inf`.
    pub fn unscale(&self, grads: &[&Tensor]) -> Result<(), ShimError> {
        let _ = self.found_inf.shallow_clone().zero_();
        let inv = self.scale.reciprocal();
        // The multi-tensor kernel wants one device; grads of one model share it.
        non_finite_check_and_unscale(grads, &self.found_inf, &inv)
    }

    /// After the (possibly skipped) step: counts a skip, and grows or backs
    /// off the scale.
    pub fn update(&mut self) {
        let _ = self.skipped.g_add_(&self.found_inf);
        let _ = self.scale.internal_amp_update_scale_(
            &self.growth_tracker,
            &self.found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        );
    }

    /// The state on the host (a device sync: call at log/checkpoint time).
    pub fn state(&self) -> ScalerState {
        ScalerState {
            scale: self.scale.double_value(&[0]),
            growth_tracker: self.growth_tracker.int64_value(&[0]),
            skipped: self.skipped.double_value(&[0]),
        }
    }

    pub fn restore(&mut self, s: ScalerState) {
        let _ = self.scale.fill_(s.scale);
        let _ = self.growth_tracker.fill_(s.growth_tracker);
        let _ = self.skipped.fill_(s.skipped);
    }
}
