//! The hooks `maskrcnn train` runs with, in this order: interruption
//! (Ctrl-C/SIGTERM), the time budget, the loss log, checkpoints and the
//! final weights, evaluation with the early stop (after the checkpoint, so
//! a failing evaluation never costs the weights: it is reported and
//! training goes on). Each decides from the
//! step it is shown ([`StepEnd`]) and the trainer's state; the decisions
//! that stop training are requests every rank agrees on, or (the early
//! stop) rank 0's evaluation shared with the group.

use crate::config::Config;
use crate::engine::checkpoint::{self, TrainState};
use crate::engine::optimizer::Sgd;
use crate::engine::train_log::{EvalPoint, StepValues};
use crate::engine::train_loop::{drain_losses, Hook, StepEnd, Stop, StopRequest, TrainError, Trainer};
use crate::evaluation::coco_eval::CocoMetrics;
use crate::evaluation::ground_truth::GroundTruth;
use crate::modeling::MaskRcnn;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

/// Stops (checkpoint written, no final weights) once `flag` is set, by the
/// Ctrl-C/SIGTERM handler.
#[derive(Debug)]
pub struct Interruption {
    pub flag: Arc<AtomicBool>,
}

impl Hook for Interruption {
    fn stop_request(&mut self, _trainer: &Trainer<'_>) -> StopRequest {
        StopRequest { interrupt: self.flag.load(Ordering::SeqCst), time_up: false }
    }

    fn after_train(&mut self, trainer: &mut Trainer<'_>, stop: Stop) -> Result<(), TrainError> {
        if stop == Stop::Interrupted && trainer.is_main() {
            let iteration = trainer.iteration;
            tracing::warn!("interrupted: checkpoint written at iteration {iteration}; continue with --resume");
        }
        Ok(())
    }
}

/// Stops after `max_seconds` of training (evaluation time not counted;
/// 0 = no budget).
#[derive(Debug)]
pub struct TimeBudget {
    pub max_seconds: f64,
}

impl TimeBudget {
    /// Whether `train_seconds` of training spend the budget.
    pub fn spent(&self, train_seconds: f64) -> bool {
        self.max_seconds > 0.0 && train_seconds >= self.max_seconds
    }
}

impl Hook for TimeBudget {
    fn stop_request(&mut self, trainer: &Trainer<'_>) -> StopRequest {
        StopRequest { interrupt: false, time_up: self.spent(trainer.clock.train_seconds()) }
    }

    fn after_train(&mut self, trainer: &mut Trainer<'_>, stop: Stop) -> Result<(), TrainError> {
        if stop == Stop::TimeUp {
            tracing::info!("solver.max_seconds = {} reached at iteration {}", self.max_seconds, trainer.iteration);
        }
        Ok(())
    }
}

/// Reads the losses back once per `solver.log_period` (and before a
/// checkpoint or a stop), failing on a non-finite fp32 loss, and writes the
/// log line (`metrics.jsonl`, TensorBoard, progress).
#[derive(Debug, Default)]
pub struct LossLog {
    /// Steps whose losses are still on the device.
    pending: Vec<(u64, Tensor)>,
}

impl LossLog {
    /// Whether step `step` of a run with `config` writes a log line.
    pub fn logs_at(config: &Config, step: &StepEnd) -> bool {
        step.iteration.is_multiple_of(config.solver.log_period as u64) || step.last
    }
}

impl Hook for LossLog {
    fn after_step(&mut self, trainer: &mut Trainer<'_>, step: &mut StepEnd) -> Result<(), TrainError> {
        let solver = &trainer.config.solver;
        self.pending.push((step.iteration - 1, step.losses.shallow_clone()));
        let log_now = LossLog::logs_at(trainer.config, step);
        if log_now || step.request.interrupt || step.iteration.is_multiple_of(solver.checkpoint_period as u64) {
            // fp16 steps with inf/NaN are the loss scaler's to skip.
            let names = crate::modeling::loss_names(trainer.model.has_masks());
            if let Some(values) = drain_losses(&mut self.pending, names, trainer.scaler.is_none())? {
                trainer.last_losses = names.iter().map(|n| n.to_string()).zip(values).collect();
            }
        }
        if !log_now {
            return Ok(());
        }
        let device = trainer.opts.device;
        let msg = trainer.log.step(StepValues {
            iteration: step.iteration,
            lr: step.lr,
            losses: &trainer.last_losses,
            images_per_iteration: solver.ims_per_batch,
            seconds: trainer.clock.elapsed(),
            scale: trainer.scaler.as_ref().map(|s| s.state()),
            max_memory_gib: device.is_cuda().then(|| crate::environment::cuda_peak_memory_gib(device)),
            graph_replays: trainer.step_graphs.as_ref().map(|g| g.replays()),
            steps_redone: trainer.step_graphs.as_ref().map(|g| g.redone()),
            mask_rows: trainer.step_graphs.as_ref().and_then(|g| g.mask_rows()),
            weights_digest: trainer.group.as_ref().map(|_| weights_digest(&trainer.model.vs)),
            remaining: (solver.max_iter as u64).saturating_sub(step.iteration),
            reserved_gib: match device {
                tch::Device::Cuda(i) => crate::shim::cuda_memory_now(i).map(|(_, r)| r as f64 / (1u64 << 30) as f64),
                tch::Device::Cpu => None,
                _ => None,
            },
            graphs_recorded: trainer.step_graphs.as_ref().map(|g| g.recorded()),
            unsteady: trainer.step_graphs.as_ref().map(|g| g.unsteady()),
        });
        if trainer.is_main() && trainer.bar.is_hidden() {
            tracing::info!("iter {}/{} {msg}", step.iteration, solver.max_iter);
        } else {
            trainer.bar.set_message(msg);
        }
        Ok(())
    }
}

/// The sum of every trainable weight in float64 (one log-time read): the
/// ranks apply the same all-reduced gradients, so theirs are equal
/// bit for bit unless a rank fell out of step.
fn weights_digest(vs: &tch::nn::VarStore) -> f64 {
    // By name: the same order (so the same rounding) on every rank.
    let mut named: Vec<(String, tch::Tensor)> = vs.variables().into_iter().filter(|(_, p)| p.requires_grad()).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let sums: Vec<tch::Tensor> = named.iter().map(|(_, p)| p.sum(tch::Kind::Double)).collect();
    if sums.is_empty() {
        return 0.0;
    }
    f64::try_from(crate::host_sync::to_host(&tch::Tensor::stack(&sums, 0).sum(tch::Kind::Double))).unwrap_or(f64::NAN)
}

/// Evaluates on the validation set every `test.eval_period` iterations and
/// at the last (rank 0; detections and metrics under `output/eval/`), logs
/// the APs, and marks the step `target_reached` when they reach
/// `test.min_bbox_map`/`min_mask_map` (rank 0's decision, shared with the
/// group): the early stop.
#[derive(Debug)]
pub struct Evaluation;

impl Evaluation {
    /// Whether step `step` of a run with `config` evaluates.
    pub fn evaluates_at(config: &Config, step: &StepEnd) -> bool {
        let has_val = !config.data.val_ann.is_empty() && !config.data.val_images.is_empty();
        let period = config.test.eval_period as u64;
        !step.request.interrupt && has_val && (step.last || (period > 0 && step.iteration.is_multiple_of(period)))
    }
}

impl Hook for Evaluation {
    fn after_step(&mut self, trainer: &mut Trainer<'_>, step: &mut StepEnd) -> Result<(), TrainError> {
        if !Evaluation::evaluates_at(trainer.config, step) {
            return Ok(());
        }
        let iteration = step.iteration;
        let mut reached = false;
        // Evaluation takes as long as the validation set needs (rank 0
        // evaluates, the others wait for its decision): not a hang.
        if let Some(g) = &trainer.group {
            g.pause_watchdog();
        }
        if let (true, Some(gt)) = (trainer.is_main(), trainer.validation.as_ref()) {
            let started = Instant::now();
            // The training steps' graphs give their memory to the
            // evaluation's (they record again after it).
            if let Some(graphs) = trainer.step_graphs.as_mut() {
                graphs.clear();
            }
            let (model, config, output) = (&trainer.model, trainer.config, &trainer.opts.output);
            let result = trainer.bar.suspend(|| evaluate(model, gt, config, output, iteration));
            trainer.clock.add_eval(started.elapsed().as_secs_f64());
            match result {
                Ok(metrics) => {
                    let point = EvalPoint::of(iteration, trainer.clock.train_seconds(), &metrics);
                    trainer.log.eval(&point);
                    trainer.bar.suspend(|| log_evaluation(&point, &metrics, step.last));
                    reached = point.reaches(&trainer.config.test);
                    trainer.evals.push(point);
                }
                Err(e) => {
                    let message = format!("iteration {iteration}: {}", crate::text::error_chain_line(&e));
                    trainer.bar.suspend(|| {
                        tracing::error!("evaluation failed at {message}; training goes on, the weights are kept")
                    });
                    trainer.eval_errors.push(message);
                }
            }
        }
        if let Some(g) = &trainer.group {
            // Rank 0's early-stop decision, for every rank.
            let flag = Tensor::from_slice(&[f32::from(u8::from(reached))]).to_device(trainer.opts.device);
            g.all_reduce_mean(std::slice::from_ref(&flag))?;
            reached = crate::host_sync::to_host(&flag).double_value(&[0]) > 0.0;
        }
        step.target_reached = reached;
        Ok(())
    }

    fn after_train(&mut self, trainer: &mut Trainer<'_>, stop: Stop) -> Result<(), TrainError> {
        if stop == Stop::TargetReached {
            tracing::info!("target accuracy reached at iteration {}: stopping early", trainer.iteration);
        }
        Ok(())
    }
}

/// The evaluation's log lines: the APs, the per-category table worst first
/// (all of it at the final evaluation, the three worst otherwise), the notes.
fn log_evaluation(point: &EvalPoint, metrics: &CocoMetrics, last: bool) {
    let iteration = point.iteration;
    let segm = point.segm_ap.map(|ap| format!(", segm AP {ap:.4}")).unwrap_or_default();
    tracing::info!("iter {iteration}: bbox AP {:.4}{segm}", point.bbox_ap);
    for (kind, m) in [("bbox", Some(&metrics.bbox)), ("segm", metrics.segm.as_ref())] {
        let Some(m) = m else { continue };
        let table = m.category_table();
        if last {
            tracing::info!("iter {iteration}: {kind} AP per category, worst first:\n{}", table.join("\n"));
        } else if table.len() > 4 {
            let worst: Vec<String> =
                table[1..4].iter().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
            tracing::info!("iter {iteration}: {kind} worst categories (id name AP AP50): {}", worst.join(" | "));
        }
    }
    for note in &metrics.notes {
        tracing::warn!("iter {iteration}: evaluation: {note}");
    }
}

/// Writes a checkpoint (rank 0) every `solver.checkpoint_period`
/// iterations and at any stop, and `model_final.safetensors` at the last
/// step (before its evaluation) or at an early stop, unless interrupted.
#[derive(Debug, Default)]
pub struct Checkpointer {
    /// The iteration of the newest checkpoint written.
    saved: Option<u64>,
}

impl Checkpointer {
    /// Whether step `step` of a run with `config` writes a checkpoint (an
    /// early stop, decided by the evaluation after this hook, writes its
    /// own after training).
    pub fn saves_at(config: &Config, step: &StepEnd) -> bool {
        step.iteration.is_multiple_of(config.solver.checkpoint_period as u64)
            || step.request.interrupt
            || step.last
            || step.target_reached
    }

    fn save(&mut self, t: &Trainer<'_>) -> Result<(), TrainError> {
        if self.saved == Some(t.iteration) {
            return Ok(());
        }
        save_checkpoint(
            &t.model,
            &t.sgd,
            TrainState {
                iteration: t.iteration,
                scaler: t.scaler.as_ref().map(|s| s.state()),
                images_seen: t.images_seen,
            },
            &t.config_toml,
            &t.opts.output,
            t.config.solver.checkpoint_keep,
        )?;
        self.saved = Some(t.iteration);
        Ok(())
    }
}

/// Where a run that ended with `stop` leaves its final weights: none when
/// interrupted (its checkpoint is there; a `model_final` could be taken for
/// a finished model).
pub fn final_weights(output: &Path, stop: Stop) -> Option<PathBuf> {
    (stop != Stop::Interrupted).then(|| output.join(FINAL_WEIGHTS))
}

impl Hook for Checkpointer {
    fn after_step(&mut self, trainer: &mut Trainer<'_>, step: &mut StepEnd) -> Result<(), TrainError> {
        if !trainer.is_main() {
            return Ok(());
        }
        if Checkpointer::saves_at(trainer.config, step) {
            self.save(trainer)?;
        }
        if step.last && !step.request.interrupt {
            // Before the final evaluation, whatever it does.
            trainer.model.save(&trainer.opts.output.join(FINAL_WEIGHTS))?;
        }
        Ok(())
    }

    fn after_train(&mut self, trainer: &mut Trainer<'_>, stop: Stop) -> Result<(), TrainError> {
        if let (true, Some(path)) = (trainer.is_main(), final_weights(&trainer.opts.output, stop)) {
            // An early stop (decided by the evaluation after this hook's
            // step) saves here; the last step already did.
            self.save(trainer)?;
            if !path.exists() || stop == Stop::TargetReached {
                trainer.model.save(&path)?;
            }
        }
        Ok(())
    }
}

/// The final weights' file name in the output folder.
const FINAL_WEIGHTS: &str = "model_final.safetensors";

/// Saves the model's variables (by name), the optimizer state and `state`
/// as a checkpoint of `output`, keeping the newest `keep`.
fn save_checkpoint(
    model: &MaskRcnn,
    sgd: &Sgd,
    state: TrainState,
    config_toml: &str,
    output: &Path,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let mut named: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(checkpoint::save(output, &state, &named, model.categories.as_ref(), &sgd.state(), config_toml, keep)?)
}

/// bbox/segm AP of `model` on the validation set `gt` (images from
/// `data.val_images`); detections and metrics kept under `output/eval/`.
fn evaluate(
    model: &MaskRcnn,
    gt: &GroundTruth,
    config: &Config,
    output: &Path,
    iteration: u64,
) -> Result<CocoMetrics, TrainError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| TrainError::Eval(e);
    let images = Path::new(&config.data.val_images);
    let dets = crate::evaluation::dataset_inference::infer_dataset(model, gt, images).map_err(|e| err(e.into()))?;
    let dir = output.join("eval");
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(crate::io::WriteError { path: dir.clone(), source: e.into() }.into()))?;
    let path = dir.join(format!("detections_iter_{iteration:07}.json"));
    crate::io::write_json_atomic(&path, &dets.results).map_err(|e| err(e.into()))?;
    let metrics = crate::evaluation::coco_eval::evaluate_run(gt, &dets, &path).map_err(|e| err(e.into()))?;
    let mpath = dir.join(format!("metrics_iter_{iteration:07}.json"));
    crate::io::write_json_atomic(&mpath, &metrics).map_err(|e| err(e.into()))?;
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn step(iteration: u64, last: bool) -> StepEnd {
        StepEnd {
            iteration,
            lr: 0.01,
            losses: Tensor::zeros([5], (Kind::Float, Device::Cpu)),
            request: StopRequest::default(),
            last,
            target_reached: false,
        }
    }

    fn config() -> Config {
        let mut c = Config::default();
        c.solver.max_iter = 100;
        c.solver.log_period = 20;
        c.solver.checkpoint_period = 50;
        c.test.eval_period = 25;
        c.data.val_ann = "val.json".into();
        c.data.val_images = "val".into();
        c
    }

    /// The budget counts training seconds only and 0 means none.
    #[test]
    fn time_budget_is_spent_at_its_seconds() {
        let budget = TimeBudget { max_seconds: 60.0 };
        assert!(!budget.spent(59.9));
        assert!(budget.spent(60.0));
        assert!(!TimeBudget { max_seconds: 0.0 }.spent(1e9));
    }

    /// The stop reasons, in their order of precedence; the target at the
    /// last step is a plain end, not an early stop.
    #[test]
    fn a_step_says_why_training_stops() {
        let mut s = step(10, false);
        assert_eq!(s.stop(100), None);
        s.request.time_up = true;
        assert_eq!(s.stop(100), Some(Stop::TimeUp));
        s.target_reached = true;
        assert_eq!(s.stop(100), Some(Stop::TargetReached));
        s.request.interrupt = true;
        assert_eq!(s.stop(100), Some(Stop::Interrupted));
        let mut end = step(100, true);
        assert_eq!(end.stop(100), Some(Stop::Done));
        end.target_reached = true;
        assert_eq!(end.stop(100), Some(Stop::Done));
    }

    /// Evaluation every eval_period and at the last step, never when
    /// interrupted or without a validation set.
    #[test]
    fn evaluation_runs_on_its_period_and_at_the_end() {
        let c = config();
        assert!(Evaluation::evaluates_at(&c, &step(25, false)));
        assert!(!Evaluation::evaluates_at(&c, &step(26, false)));
        assert!(Evaluation::evaluates_at(&c, &step(33, true)));
        let mut interrupted = step(25, false);
        interrupted.request.interrupt = true;
        assert!(!Evaluation::evaluates_at(&c, &interrupted));
        let mut no_val = config();
        no_val.data.val_ann.clear();
        assert!(!Evaluation::evaluates_at(&no_val, &step(25, true)));
    }

    /// Checkpoints every checkpoint_period and at every kind of stop; the
    /// final weights unless interrupted.
    #[test]
    fn checkpoints_on_their_period_and_at_any_stop() {
        let c = config();
        assert!(Checkpointer::saves_at(&c, &step(50, false)));
        assert!(!Checkpointer::saves_at(&c, &step(51, false)));
        assert!(Checkpointer::saves_at(&c, &step(51, true)));
        let mut s = step(52, false);
        s.target_reached = true;
        assert!(Checkpointer::saves_at(&c, &s));
        let mut s = step(53, false);
        s.request.interrupt = true;
        assert!(Checkpointer::saves_at(&c, &s));
        let out = Path::new("out");
        assert_eq!(final_weights(out, Stop::Done), Some(out.join("model_final.safetensors")));
        assert_eq!(final_weights(out, Stop::TargetReached), Some(out.join("model_final.safetensors")));
        assert_eq!(final_weights(out, Stop::Interrupted), None);
    }

    /// A log line every log_period and at the last step.
    #[test]
    fn the_loss_log_writes_on_its_period_and_at_the_end() {
        let c = config();
        assert!(LossLog::logs_at(&c, &step(40, false)));
        assert!(!LossLog::logs_at(&c, &step(41, false)));
        assert!(LossLog::logs_at(&c, &step(41, true)));
    }
}
