//! `[solver]`: SGD, the learning-rate schedule, batch size and
//! accumulation, checkpoints, logging, the time budget.

use super::error::{rule, ConfigError};
use serde::{Deserialize, Serialize};

/// Optimizer and learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverConfig {
    /// Learning rate for `reference_batch` images per step; training uses
    /// `base_lr × ims_per_batch / reference_batch` (the linear scaling rule).
    pub base_lr: f64,
    /// The batch `base_lr` is for (the seed's and torchvision's recipes: 16).
    #[serde(default = "default_reference_batch")]
    pub reference_batch: usize,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Biases train at `base_lr * bias_lr_factor`.
    pub bias_lr_factor: f64,
    /// Weight decay applied to biases.
    pub bias_weight_decay: f64,
    pub warmup_method: WarmupMethod,
    /// Learning-rate multiplier at iteration 0 of the warmup.
    pub warmup_factor: f64,
    /// Iterations of warmup.
    pub warmup_iters: usize,
    /// Iterations at which the learning rate is multiplied by `gamma`;
    /// empty: at `step_fractions` of `max_iter`.
    pub steps: Vec<usize>,
    /// Where the learning rate steps when `steps` is empty, as fractions of
    /// `max_iter` (the seed's 60k and 80k of 90k); empty too: no steps.
    #[serde(default = "default_step_fractions")]
    pub step_fractions: Vec<f64>,
    pub gamma: f64,
    /// Total training iterations (unless `epochs` is set).
    pub max_iter: usize,
    /// Passes over the training set; when > 0, `max_iter` = epochs × images
    /// / `ims_per_batch` (rounded up).
    #[serde(default)]
    pub epochs: f64,
    /// Images per optimizer step, summed over all GPUs and accumulation steps.
    pub ims_per_batch: usize,
    /// Forward/backward passes whose gradients are summed per optimizer step.
    pub accumulate_steps: usize,
    /// A checkpoint is written every this many iterations.
    pub checkpoint_period: usize,
    /// Checkpoints kept in the output directory (oldest removed first).
    pub checkpoint_keep: usize,
    /// Clip the global gradient L2 norm to this value; 0 disables clipping.
    pub clip_grad_norm: f64,
    /// On several GPUs: gradients are averaged in buckets of about this
    /// many MB (float32), each all-reduced as soon as the backward pass has
    /// finished it, while the rest of the backward runs; 0: one all-reduce
    /// of every gradient after the backward.
    pub allreduce_bucket_mb: f64,
    /// Iterations between logged losses, learning rate and speed.
    pub log_period: usize,
    /// Stop (checkpoint, final evaluation) once training has taken this many
    /// seconds, evaluation excluded; 0: no time limit.
    pub max_seconds: f64,
}

/// Learning-rate warmup shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmupMethod {
    Linear,
    Constant,
}

fn default_reference_batch() -> usize {
    16
}

fn default_step_fractions() -> Vec<f64> {
    vec![2.0 / 3.0, 8.0 / 9.0]
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig {
            base_lr: 0.02,
            reference_batch: 16,
            momentum: 0.9,
            weight_decay: 1e-4,
            bias_lr_factor: 1.0,
            bias_weight_decay: 1e-4,
            warmup_method: WarmupMethod::Linear,
            warmup_factor: 1e-3,
            warmup_iters: 1000,
            steps: Vec::new(),
            step_fractions: default_step_fractions(),
            gamma: 0.1,
            max_iter: 90000,
            epochs: 0.0,
            ims_per_batch: 16,
            accumulate_steps: 1,
            checkpoint_period: 2500,
            checkpoint_keep: 3,
            clip_grad_norm: 0.0,
            allreduce_bucket_mb: 25.0,
            log_period: 20,
            max_seconds: 0.0,
        }
    }
}

impl SolverConfig {
    /// The learning rate training uses: `base_lr` scaled by the batch
    /// (`ims_per_batch / reference_batch`).
    pub fn effective_lr(&self) -> f64 {
        self.base_lr * self.ims_per_batch as f64 / self.reference_batch as f64
    }

    /// This solver for a training set of `images` images: `max_iter` from
    /// `epochs` when set, `steps` from `step_fractions` when empty (at
    /// least iteration 1 each, duplicates dropped).
    pub fn resolved(&self, images: usize) -> SolverConfig {
        let mut s = self.clone();
        if s.epochs > 0.0 {
            s.max_iter = ((s.epochs * images as f64) / s.ims_per_batch as f64).ceil().max(1.0) as usize;
        }
        if s.steps.is_empty() {
            s.steps = s
                .step_fractions
                .iter()
                .map(|f| ((f * s.max_iter as f64).round() as usize).clamp(1, s.max_iter))
                .collect();
            s.steps.dedup();
        }
        s.steps.retain(|&x| x <= s.max_iter);
        s
    }

    /// The section's range and consistency rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        rule(s.base_lr > 0.0 && s.base_lr.is_finite(), "solver.base_lr", "must be > 0")?;
        rule((0.0..1.0).contains(&s.momentum), "solver.momentum", "must be in [0, 1)")?;
        rule(s.weight_decay >= 0.0, "solver.weight_decay", "must be >= 0")?;
        rule(s.bias_lr_factor > 0.0, "solver.bias_lr_factor", "must be > 0")?;
        rule(s.bias_weight_decay >= 0.0, "solver.bias_weight_decay", "must be >= 0")?;
        rule(s.warmup_factor > 0.0 && s.warmup_factor <= 1.0, "solver.warmup_factor", "must be in (0, 1]")?;
        rule(s.gamma > 0.0, "solver.gamma", "must be > 0")?;
        rule(s.max_iter > 0, "solver.max_iter", "must be > 0")?;
        rule(s.epochs >= 0.0 && s.epochs.is_finite(), "solver.epochs", "must be >= 0 (0: solver.max_iter)")?;
        rule(s.reference_batch > 0, "solver.reference_batch", "must be > 0")?;
        rule(s.steps.windows(2).all(|w| w[0] < w[1]), "solver.steps", "must be strictly increasing")?;
        // With epochs the iteration count is known once the data is.
        rule(
            s.epochs > 0.0 || s.steps.iter().all(|&x| x > 0 && x <= s.max_iter),
            "solver.steps",
            &format!(
                "every step must be in 1..=solver.max_iter ({}); or leave solver.steps empty for steps at solver.step_fractions of max_iter",
                s.max_iter
            ),
        )?;
        rule(
            s.step_fractions.iter().all(|&f| f > 0.0 && f <= 1.0) && s.step_fractions.windows(2).all(|w| w[0] < w[1]),
            "solver.step_fractions",
            "must be increasing fractions in (0, 1]",
        )?;
        rule(s.ims_per_batch > 0, "solver.ims_per_batch", "must be > 0")?;
        rule(s.accumulate_steps >= 1, "solver.accumulate_steps", "must be >= 1")?;
        rule(
            s.ims_per_batch.is_multiple_of(s.accumulate_steps),
            "solver.ims_per_batch",
            &format!("must be divisible by solver.accumulate_steps ({})", s.accumulate_steps),
        )?;
        rule(s.checkpoint_period > 0, "solver.checkpoint_period", "must be > 0")?;
        rule(s.checkpoint_keep >= 1, "solver.checkpoint_keep", "must be >= 1")?;
        rule(
            s.clip_grad_norm >= 0.0 && s.clip_grad_norm.is_finite(),
            "solver.clip_grad_norm",
            "must be >= 0 (0: off)",
        )?;
        rule(
            s.allreduce_bucket_mb >= 0.0 && s.allreduce_bucket_mb.is_finite(),
            "solver.allreduce_bucket_mb",
            "must be >= 0 (0: one all-reduce after the backward)",
        )?;
        rule(s.log_period >= 1, "solver.log_period", "must be >= 1")?;
        rule(s.max_seconds >= 0.0 && s.max_seconds.is_finite(), "solver.max_seconds", "must be >= 0 (0: no limit)")
    }
}
