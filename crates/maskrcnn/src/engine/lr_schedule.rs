//! The learning rate per iteration: warmup (linear or constant) then
//! multi-step decay, as the seed's `WarmupMultiStepLR`.

use crate::config::{SolverConfig, WarmupMethod};

/// `lr(i) = base_lr · warmup(i) · gamma^(number of steps ≤ i)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_method: WarmupMethod,
    pub warmup_factor: f64,
    pub warmup_iters: usize,
    pub steps: Vec<usize>,
    pub gamma: f64,
}

impl LrSchedule {
    /// The schedule of `s` (resolved: see [`SolverConfig::resolved`]), at
    /// its effective learning rate (`base_lr` scaled by the batch).
    pub fn new(s: &SolverConfig) -> LrSchedule {
        LrSchedule {
            base_lr: s.effective_lr(),
            warmup_method: s.warmup_method,
            warmup_factor: s.warmup_factor,
            warmup_iters: s.warmup_iters,
            steps: s.steps.clone(),
            gamma: s.gamma,
        }
    }

    /// The learning rate of the update at 0-based iteration `i`. During
    /// warmup (`i < warmup_iters`) the factor is `warmup_factor` (constant)
    /// or ramps linearly from `warmup_factor` at 0 to 1 at `warmup_iters`.
    pub fn lr_at(&self, i: usize) -> f64 {
        let warmup = if i < self.warmup_iters {
            match self.warmup_method {
                WarmupMethod::Constant => self.warmup_factor,
                WarmupMethod::Linear => {
                    let alpha = i as f64 / self.warmup_iters as f64;
                    self.warmup_factor * (1.0 - alpha) + alpha
                }
            }
        } else {
            1.0
        };
        // bisect_right: a step at iteration s applies from s on.
        let decays = self.steps.iter().filter(|&&s| s <= i).count();
        self.base_lr * warmup * self.gamma.powi(decays as i32)
    }
}
