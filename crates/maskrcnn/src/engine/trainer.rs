//! `maskrcnn train`: the training loop. Data from the prefetching loader,
//! forward/backward under autocast (fp16 with dynamic loss scaling, bf16, or
//! fp32 with TF32), gradient accumulation and clipping, fused SGD with the
//! warmup/multi-step schedule, periodic atomic checkpoints, evaluation with
//! the seed's early stop, logs (progress bar; `metrics.jsonl` and
//! TensorBoard through [`crate::engine::train_log`]; summary).
//!
//! Reproducibility: libtorch's generator is reseeded from `(seed, micro
//! batch)` before every forward pass and the loader's order and flips derive
//! from the seed and iteration, so a resumed run takes the same steps as an
//! uninterrupted one.
//!
//! Several GPUs (`maskrcnn launch`, torchrun's environment): one process per
//! GPU (or several CPU processes), each on its shard of every batch; gradients, logged losses and the
//! stop decisions are averaged over the group each step (one NCCL
//! all-reduce), so every rank takes the same update. Rank 0 alone writes
//! logs, checkpoints, evaluations and the final weights.

use crate::config::{AmpMode, Config};
use crate::data::coco::{CocoDataset, LoadOptions};
use crate::data::loader::{Loader, LoaderOptions};
use crate::engine::amp::GradScaler;
use crate::engine::checkpoint::{self, TrainState};
use crate::engine::distributed::{DistEnv, DistError, ProcessGroup};
use crate::engine::lr_schedule::LrSchedule;
use crate::engine::optimizer::Sgd;
use crate::engine::train_log::{EvalPoint, StepValues, TrainLog};
use crate::evaluation::coco_eval::CocoMetrics;
use crate::modeling::MaskRcnn;
use crate::ops::BalancedSampler;
use crate::shim::AutocastGuard;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How to run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub output: PathBuf,
    /// Continue from the newest checkpoint in `output`.
    pub resume: bool,
    /// Remove a previous run's files from `output` first (without it, and
    /// without `resume`, an output holding a run is refused).
    pub overwrite: bool,
    pub device: Device,
    /// Set (e.g. by Ctrl-C) to checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Show a progress bar (else log lines every `solver.log_period`).
    pub progress: bool,
    /// Data strictness: a bad sample stops training.
    pub strict: bool,
    /// This iteration runs inside a CUDA profiler range
    /// (`kernels::timing::profiler_range`), for an external profiler.
    pub profile_iteration: Option<u64>,
}

/// Why training could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Dataset(#[from] crate::data::DatasetError),
    #[error(transparent)]
    Loader(#[from] crate::data::LoaderError),
    #[error(transparent)]
    Model(#[from] crate::modeling::ModelError),
    #[error(transparent)]
    Targets(#[from] crate::modeling::TargetError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Shim(#[from] crate::shim::ShimError),
    #[error("iteration {iteration}: {loss} is {value} (fp32 training diverged; lower solver.base_lr or enable solver.clip_grad_norm)")]
    NonFinite { iteration: u64, loss: String, value: f64 },
    #[error("evaluation")]
    Eval(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Distributed(#[from] DistError),
    #[error(transparent)]
    Log(#[from] crate::engine::train_log::TrainLogError),
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub start_iteration: u64,
    pub iterations: u64,
    pub seconds: f64,
    pub images_per_s: f64,
    pub final_losses: Vec<(String, f64)>,
    pub skipped_steps: f64,
    pub loss_scale: Option<f64>,
    pub evals: Vec<EvalPoint>,
    pub stopped_early: bool,
    /// Stopped by Ctrl-C or SIGTERM (checkpoint written; no `model_final`).
    pub interrupted: bool,
    /// `model_final.safetensors`, written unless interrupted.
    pub weights: Option<PathBuf>,
    pub skipped_images: usize,
    /// This process's rank (0 without `maskrcnn launch`); only rank 0 writes.
    pub rank: usize,
}

/// Trains per `config` into `opts.output`.
pub fn train(config: &Config, opts: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let setup = |m: String| TrainError::Setup(m);
    let (group, opts) = join_group(opts)?;
    let opts = &opts;
    let (rank, world_size) = group.as_ref().map_or((0, 1), |g| (g.env.rank, g.env.world_size));
    let main = rank == 0;
    let device = opts.device;
    let solver = &config.solver;
    let micro_batch = micro_batch_size(config, world_size)?;
    let config_toml = config.to_toml();
    // Held (rank 0) until training returns: a second run into the same
    // folder is refused while this one lives.
    let _lock =
        if main { Some(prepare_output(&opts.output, &config_toml, opts.resume, opts.overwrite)?) } else { None };
    let resumed = if opts.resume { load_resume_checkpoint(config, &opts.output)? } else { None };
    let dataset = load_training_set(config, opts.strict)?;
    let has_val = !config.data.val_ann.is_empty() && !config.data.val_images.is_empty();
    let images_in_set = dataset.images.len();

    let model = build_model(config, device, resumed.as_ref(), &dataset)?;
    let cuda = device.is_cuda();
    let step_sync = match &group {
        Some(g) => Some(GroupStep::new(g, &model)?),
        None => None,
    };
    let amp = if cuda { config.precision.amp } else { AmpMode::Off };
    if config.precision.amp != AmpMode::Off && !cuda {
        tracing::warn!("precision.amp = {} needs CUDA; training in fp32 on the CPU", config.precision.amp);
    }

    let mut sgd =
        Sgd::new(&model.vs, solver.momentum, solver.weight_decay, solver.bias_lr_factor, solver.bias_weight_decay);
    let mut scaler = (amp == AmpMode::Fp16).then(|| {
        GradScaler::new(config.precision.loss_scale_init, config.precision.loss_scale_growth_interval, device)
    });
    let mut start = 0u64;
    let mut images_seen = 0u64;
    if let Some(r) = &resumed {
        sgd.restore(&r.optimizer, r.state.iteration).map_err(|e| setup(format!("{}: {e}", r.dir.display())))?;
        if let (Some(s), Some(st)) = (scaler.as_mut(), r.state.scaler) {
            s.restore(st);
        }
        start = r.state.iteration;
        images_seen = r.state.images_seen;
        tracing::info!("resuming from {} (iteration {start})", r.dir.display());
    }
    let dataset = Arc::new(dataset);
    let mut loader = Loader::new(
        dataset.clone(),
        LoaderOptions {
            batch_size: micro_batch,
            workers: config.dataloader.workers.max(1),
            prefetch: config.dataloader.prefetch,
            flip_prob: config.input.flip_prob,
            seed: config.seed,
            rank,
            world_size,
            group_by_aspect: config.dataloader.aspect_ratio_grouping,
            strict: opts.strict,
            device,
            start_iteration: start * solver.accumulate_steps as u64,
            max_image_pixels: config.input.max_image_pixels,
        },
    )?;

    let schedule = LrSchedule::new(solver);
    let max_iter = solver.max_iter as u64;
    let mut log = TrainLog::open(&opts.output, main, group.is_some(), start, cuda)?;
    let bar = progress_bar(opts.progress, start, max_iter);
    let started = Instant::now();
    // Training time without evaluation (the time budget and the AP-over-time log).
    let mut eval_time = 0.0f64;
    let train_seconds = |eval_time: f64| started.elapsed().as_secs_f64() - eval_time;
    let mut last_losses: Vec<(String, f64)> = Vec::new();
    let mut pending: Vec<(u64, Tensor)> = Vec::new();
    let mut evals = Vec::new();
    let (mut stopped_early, mut interrupted) = (false, false);
    let mut iteration = start;
    tracing::info!(
        "rank {rank}/{world_size}: training {} images ({} categories), {micro_batch} images × {} accumulation step(s) per iteration, iterations {start}..{max_iter}, amp {amp}, device {:?}",
        images_in_set,
        dataset.categories.len(),
        solver.accumulate_steps,
        device
    );

    while iteration < max_iter {
        let lr = schedule.lr_at(iteration as usize);
        let profiled = match device {
            Device::Cuda(i) if opts.profile_iteration == Some(iteration) => {
                crate::kernels::timing::profiler_range(i, true)
            }
            _ => false,
        };
        log.begin_step();
        let mut sums: Vec<Tensor> = Vec::new();
        for micro in 0..solver.accumulate_steps as u64 {
            let waited = Instant::now();
            let batch = loader.next_batch()?;
            log.add_data_wait(waited.elapsed().as_secs_f64());
            images_seen += batch.images.len() as u64;
            tch::manual_seed(micro_batch_seed(config.seed, iteration * solver.accumulate_steps as u64 + micro, rank));
            let step = MicroBatch { images: &batch.images, targets: &batch.targets };
            sums.push(forward_backward(
                &model,
                step,
                solver.accumulate_steps,
                scaler.as_ref(),
                amp,
                &mut BalancedSampler,
            )?);
        }
        let losses = Tensor::stack(&sums, 0).mean_dim(0, false, Kind::Float);
        let mut stop = opts.stop.load(Ordering::SeqCst);
        let mut time_up = solver.max_seconds > 0.0 && train_seconds(eval_time) >= solver.max_seconds;
        if let (Some(g), Some(sync)) = (&group, &step_sync) {
            let next = iteration + 1;
            let read_flags = next.is_multiple_of(solver.log_period as u64) || next == max_iter;
            let reduced = Instant::now();
            (stop, time_up) = sync.all_reduce(g, &losses, (stop, time_up), read_flags)?;
            log.add_reduce_wait(reduced.elapsed().as_secs_f64());
        }
        apply_update(&mut sgd, scaler.as_mut(), lr, solver.clip_grad_norm)?;
        if let (true, Device::Cuda(i)) = (profiled, device) {
            crate::kernels::timing::profiler_range(i, false);
        }
        log.end_step();
        iteration += 1;

        // Loss values stay on the device until a log line or checkpoint needs
        // them: one copy per `log_period`, not a sync per step.
        pending.push((iteration - 1, losses));
        bar.set_position(iteration);
        let last = iteration == max_iter || time_up;
        let log_now = iteration.is_multiple_of(solver.log_period as u64) || last;
        if log_now || stop || iteration.is_multiple_of(solver.checkpoint_period as u64) {
            // fp16 steps with inf/NaN are the loss scaler's to skip.
            if let Some(values) = drain_losses(&mut pending, scaler.is_none())? {
                last_losses = LOSS_NAMES.iter().map(|n| n.to_string()).zip(values).collect();
            }
        }

        if log_now {
            let msg = log.step(StepValues {
                iteration,
                lr,
                losses: &last_losses,
                images_per_iteration: solver.ims_per_batch,
                seconds: started.elapsed().as_secs_f64(),
                scale: scaler.as_ref().map(|s| s.state()),
                max_memory_gib: cuda.then(|| crate::environment::cuda_peak_memory_gib(device)),
            });
            if main && bar.is_hidden() {
                tracing::info!("iter {iteration}/{max_iter} {msg}");
            } else {
                bar.set_message(msg);
            }
        }

        let eval_now = !stop
            && has_val
            && (last || (config.test.eval_period > 0 && iteration.is_multiple_of(config.test.eval_period as u64)));
        let mut target_reached = false;
        if eval_now && main {
            let t_eval = Instant::now();
            let metrics = bar.suspend(|| evaluate(&model, config, &opts.output, iteration))?;
            eval_time += t_eval.elapsed().as_secs_f64();
            let point = EvalPoint {
                iteration,
                seconds: train_seconds(eval_time),
                bbox_ap: metrics.bbox.stats[0],
                segm_ap: metrics.segm.as_ref().map_or(0.0, |m| m.stats[0]),
            };
            log.eval(&point);
            bar.suspend(|| {
                tracing::info!("iter {iteration}: bbox AP {:.4}, segm AP {:.4}", point.bbox_ap, point.segm_ap)
            });
            target_reached = point.reaches(&config.test);
            evals.push(point);
        }
        if let (true, Some(g)) = (eval_now, &group) {
            // Rank 0's early-stop decision, for every rank.
            let flag = Tensor::from_slice(&[f32::from(u8::from(target_reached))]).to_device(device);
            g.all_reduce_mean(std::slice::from_ref(&flag))?;
            target_reached = crate::host_sync::to_host(&flag).double_value(&[0]) > 0.0;
        }
        let save = iteration.is_multiple_of(solver.checkpoint_period as u64) || stop || last || target_reached;
        if save && main {
            save_checkpoint(
                &model,
                &sgd,
                scaler.as_ref(),
                iteration,
                images_seen,
                &config_toml,
                &opts.output,
                solver.checkpoint_keep,
            )?;
        }
        if stop {
            interrupted = true;
            bar.suspend(|| {
                if main {
                    tracing::warn!("interrupted: checkpoint written at iteration {iteration}; continue with --resume")
                }
            });
            break;
        }
        if target_reached {
            stopped_early = !last;
            if stopped_early {
                bar.suspend(|| tracing::info!("target accuracy reached at iteration {iteration}: stopping early"));
            }
            break;
        }
        if time_up {
            bar.suspend(|| {
                tracing::info!("solver.max_seconds = {} reached at iteration {iteration}", solver.max_seconds)
            });
            break;
        }
    }
    bar.finish_and_clear();
    // An interrupted run leaves its checkpoint, not a `model_final` that
    // could be taken for a finished model.
    let weights = (!interrupted).then(|| opts.output.join("model_final.safetensors"));
    if let (true, Some(path)) = (main, &weights) {
        model.save(path)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let done = iteration - start;
    let scale = scaler.as_ref().map(|s| s.state());
    Ok(TrainSummary {
        start_iteration: start,
        iterations: iteration,
        seconds,
        images_per_s: done as f64 * solver.ims_per_batch as f64 / seconds.max(1e-9),
        final_losses: last_losses,
        skipped_steps: scale.map_or(0.0, |s| s.skipped),
        loss_scale: scale.map(|s| s.scale),
        evals,
        stopped_early,
        interrupted,
        weights,
        skipped_images: loader.skipped.count(),
        rank,
    })
}

/// Joins the group when a launcher set torchrun's variables (one process
/// per GPU over NCCL; CPU processes over TCP). Returns the group and the
/// options this process runs with: its GPU `cuda:LOCAL_RANK` (or the CPU),
/// a progress bar on rank 0 only.
fn join_group(opts: &TrainOptions) -> Result<(Option<ProcessGroup>, TrainOptions), TrainError> {
    let Some(env) = DistEnv::from_process()? else {
        return Ok((None, opts.clone()));
    };
    let group = ProcessGroup::join(env, opts.device.is_cuda())?;
    let opts = TrainOptions { device: group.device(), progress: opts.progress && group.env.rank == 0, ..opts.clone() };
    Ok((Some(group), opts))
}

/// Images per micro-batch on each GPU: `solver.ims_per_batch` split over
/// `world_size` GPUs and `solver.accumulate_steps` micro-batches; an error
/// when it does not split, or when no training data is configured.
fn micro_batch_size(config: &Config, world_size: usize) -> Result<usize, TrainError> {
    let solver = &config.solver;
    if config.data.train_ann.is_empty() || config.data.train_images.is_empty() {
        return Err(TrainError::Setup(
            "no training data: set data.train_ann and data.train_images (see `maskrcnn synth`)".into(),
        ));
    }
    let per_step = solver.ims_per_batch / world_size;
    if per_step == 0 || !per_step.is_multiple_of(solver.accumulate_steps) {
        return Err(TrainError::Setup(format!(
            "solver.ims_per_batch = {} does not split into {world_size} GPU(s) × solver.accumulate_steps = {}",
            solver.ims_per_batch, solver.accumulate_steps
        )));
    }
    Ok(per_step / solver.accumulate_steps)
}

/// The newest readable checkpoint in `output` for `--resume` (a damaged
/// newer one is passed over with a warning naming it and why; None, with a
/// warning, when there is none); an error when it comes from another model.
fn load_resume_checkpoint(config: &Config, output: &Path) -> Result<Option<checkpoint::Loaded>, TrainError> {
    let mut saved = checkpoint::list(output);
    while let Some((_, dir)) = saved.pop() {
        match checkpoint::load(&dir) {
            Ok(loaded) => {
                check_compatible(config, &loaded.config_toml, &dir)?;
                return Ok(Some(loaded));
            }
            Err(e) if saved.is_empty() => return Err(e.into()),
            Err(e) => tracing::warn!("--resume: skipping damaged checkpoint {} ({e})", dir.display()),
        }
    }
    tracing::warn!("--resume: no checkpoint in {}, starting from iteration 0", output.display());
    Ok(None)
}

/// The training set (images without annotations dropped; skipped records
/// reported), checked against `model.num_classes`; the image folders and
/// the validation annotations, when configured, must exist.
fn load_training_set(config: &Config, strict: bool) -> Result<CocoDataset, TrainError> {
    let d = &config.data;
    if !Path::new(&d.train_images).is_dir() {
        return Err(TrainError::Setup(format!("data.train_images: {} is not a folder", d.train_images)));
    }
    match (d.val_ann.is_empty(), d.val_images.is_empty()) {
        (true, true) => {}
        (false, false) if !Path::new(&d.val_ann).is_file() => {
            return Err(TrainError::Setup(format!("data.val_ann: {} does not exist", d.val_ann)));
        }
        (false, false) if !Path::new(&d.val_images).is_dir() => {
            return Err(TrainError::Setup(format!("data.val_images: {} is not a folder", d.val_images)));
        }
        (false, false) => {}
        _ => {
            return Err(TrainError::Setup(
                "evaluation needs both data.val_ann and data.val_images (or neither: no evaluation)".into(),
            ))
        }
    }
    let dataset = CocoDataset::load(
        Path::new(&config.data.train_ann),
        Path::new(&config.data.train_images),
        LoadOptions { drop_empty: true, strict },
    )?;
    for line in dataset.skip_summary() {
        tracing::warn!("{}: {line}", config.data.train_ann);
    }
    if dataset.num_classes() != config.model.num_classes {
        return Err(TrainError::Setup(format!(
            "{}: {} categories need model.num_classes = {} (background + categories), config has {}",
            config.data.train_ann,
            dataset.categories.len(),
            dataset.num_classes(),
            config.model.num_classes
        )));
    }
    Ok(dataset)
}

/// The model on `device`, its weights from (in this order) the `resumed`
/// checkpoint, ImageNet backbone weights, a whole model to fine-tune, or
/// none (from scratch); it carries the dataset's category table. On CUDA:
/// cuDNN benchmark per config and channels-last when configured. TF32 per
/// config on every device.
fn build_model(
    config: &Config,
    device: Device,
    resumed: Option<&checkpoint::Loaded>,
    dataset: &CocoDataset,
) -> Result<MaskRcnn, TrainError> {
    use crate::modeling::weights;
    let mut model = MaskRcnn::new(config, device)?;
    model.categories = Some(dataset.categories.clone());
    match resumed {
        Some(r) => weights::load_weights(&model.vs, &r.dir.join("model.safetensors"), config.model.num_classes)?,
        None if !config.model.backbone_weights.is_empty() => {
            weights::load_backbone_weights(&model.vs, Path::new(&config.model.backbone_weights))?
        }
        None if !config.model.weights.is_empty() => {
            let classes = weights::load_pretrained_model(&model.vs, Path::new(&config.model.weights))?;
            if classes != config.model.num_classes as i64 {
                tracing::info!(
                    "{}: {classes} classes, the model has {}: box and mask predictors start fresh",
                    config.model.weights,
                    config.model.num_classes
                );
            }
        }
        None => {}
    }
    crate::shim::set_tf32(config.precision.tf32);
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(config.precision.cudnn_benchmark);
        if config.precision.channels_last {
            model.to_channels_last();
        }
    }
    Ok(model)
}

/// What one training step exchanges over several GPUs, prepared once: every
/// trainable parameter in a rank-independent order (by name), each with a
/// gradient tensor from the start (zeros, accumulated into by backward) so
/// every rank all-reduces the same tensors even when a step leaves one
/// unreached, and the two stop flags on the device.
struct GroupStep {
    trainable: Vec<Tensor>,
    /// `[2]`: Ctrl-C, time budget (1.0 = set) on this rank.
    flags: Tensor,
}

impl GroupStep {
    /// Makes the ranks' weights and statistics identical (the mean of equal
    /// values is exact; this also covers any init drift) and prepares the
    /// step's tensors.
    fn new(group: &ProcessGroup, model: &MaskRcnn) -> Result<GroupStep, TrainError> {
        // Sorted by name: every rank must concatenate in the same order.
        let mut state: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        state.sort_by(|a, b| a.0.cmp(&b.0));
        group.all_reduce_mean(&state.into_iter().map(|(_, t)| t).collect::<Vec<_>>())?;
        let mut params: Vec<(String, Tensor)> =
            model.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let trainable: Vec<Tensor> = params.into_iter().map(|(_, p)| p).collect();
        let untouched: Vec<&Tensor> = trainable.iter().filter(|p| !p.grad().defined()).collect();
        if !untouched.is_empty() {
            let zero: Tensor = untouched.iter().map(|p| p.sum(Kind::Float) * 0.0).sum();
            zero.backward();
        }
        let device = model.vs.device();
        Ok(GroupStep { trainable, flags: Tensor::zeros([2], (Kind::Float, device)) })
    }

    /// One all-reduce (mean over ranks) of the gradients, the step's `losses`
    /// `[5]` (averaged in place) and this rank's `(stop, time_up)` flags: any
    /// rank's Ctrl-C or time budget stops every rank. The flags are filled on
    /// the device and read back only when `read_flags` (once per log period,
    /// the same iterations on every rank; `(false, false)` otherwise): no
    /// host sync per step.
    fn all_reduce(
        &self,
        group: &ProcessGroup,
        losses: &Tensor,
        (stop, time_up): (bool, bool),
        read_flags: bool,
    ) -> Result<(bool, bool), TrainError> {
        let _ = self.flags.get(0).fill_(f64::from(u8::from(stop)));
        let _ = self.flags.get(1).fill_(f64::from(u8::from(time_up)));
        let mut tensors: Vec<Tensor> = self.trainable.iter().map(Tensor::grad).collect();
        tensors.push(losses.shallow_clone());
        tensors.push(self.flags.shallow_clone());
        group.all_reduce_mean(&tensors)?;
        if !read_flags {
            return Ok((false, false));
        }
        let any: Vec<f32> =
            Vec::try_from(crate::host_sync::to_host(&self.flags.gt(0.0).to_kind(Kind::Float))).unwrap_or_default();
        Ok((any.first() == Some(&1.0), any.get(1) == Some(&1.0)))
    }
}

/// The seed of libtorch's generator for global micro-batch `micro` (iteration
/// × accumulate_steps + step) on `rank`: RoI sampling draws from it.
pub fn micro_batch_seed(seed: u64, micro: u64, rank: usize) -> i64 {
    (seed ^ micro.wrapping_mul(0x9E37_79B9) ^ (rank as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) as i64
}

/// The names of the five losses, in [`crate::modeling::Losses::named`] order.
pub const LOSS_NAMES: [&str; 5] =
    ["loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"];

/// One micro-batch: images on the model's device, targets anywhere.
#[derive(Debug, Clone, Copy)]
pub struct MicroBatch<'a> {
    pub images: &'a [Tensor],
    pub targets: &'a [crate::structures::Target],
}

/// Forward and backward of one micro-batch: the loss sum divided by
/// `accumulate` (so `accumulate` micro-batches add up to the gradient of
/// their mean), scaled by the loss scaler when there is one, under autocast
/// per `amp`. Gradients accumulate into the parameters' `.grad`. Returns the
/// five unscaled loss values `[5]` (device, not synced).
pub fn forward_backward(
    model: &MaskRcnn,
    batch: MicroBatch<'_>,
    accumulate: usize,
    scaler: Option<&GradScaler>,
    amp: AmpMode,
    sampler: &mut dyn crate::ops::FgBgSampler,
) -> Result<Tensor, TrainError> {
    let losses = {
        let _autocast = AutocastGuard::new(amp.autocast_dtype());
        model.forward_train(batch.images, batch.targets, sampler)?
    };
    let total = losses.total() / accumulate as f64;
    let total = match scaler {
        Some(s) => s.scale_loss(&total),
        None => total,
    };
    crate::host_timing::mark("loss_sum");
    total.backward();
    crate::host_timing::mark("backward");
    Ok(Tensor::stack(&losses.named().iter().map(|(_, t)| t.detach().to_kind(Kind::Float)).collect::<Vec<_>>(), 0))
}

/// The optimizer step after the micro-batches' backward passes: unscale
/// (fp16; a non-finite gradient skips the step on the device and backs the
/// scale off), clip the global norm when `clip > 0`, fused SGD at `lr`,
/// clear the gradients.
pub fn apply_update(sgd: &mut Sgd, scaler: Option<&mut GradScaler>, lr: f64, clip: f64) -> Result<(), TrainError> {
    if let Some(s) = scaler.as_deref() {
        let grads = sgd.grads();
        s.unscale(&grads.iter().collect::<Vec<_>>())?;
    }
    if clip > 0.0 {
        sgd.clip_grad_norm(clip)?;
    }
    sgd.set_lr(lr);
    sgd.step(scaler.as_deref().map(|s| &s.found_inf))?;
    if let Some(s) = scaler {
        s.update();
    }
    sgd.zero_grad()?;
    Ok(())
}

/// Copies the per-iteration loss vectors `[5]` gathered on the device to the
/// host in one transfer; with `check_finite`, the first non-finite loss is an
/// error naming its iteration. Returns the newest iteration's losses.
fn drain_losses(pending: &mut Vec<(u64, Tensor)>, check_finite: bool) -> Result<Option<Vec<f64>>, TrainError> {
    if pending.is_empty() {
        return Ok(None);
    }
    let rows: Vec<&Tensor> = pending.iter().map(|(_, t)| t).collect();
    let host = crate::host_sync::to_host(&Tensor::stack(&rows, 0)).reshape([-1]);
    let values: Vec<f64> = Vec::<f32>::try_from(&host).unwrap_or_default().into_iter().map(f64::from).collect();
    let n = LOSS_NAMES.len();
    if check_finite {
        for ((iteration, _), row) in pending.iter().zip(values.chunks(n)) {
            if let Some((k, v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(TrainError::NonFinite {
                    iteration: *iteration,
                    loss: LOSS_NAMES[k].to_string(),
                    value: *v,
                });
            }
        }
    }
    pending.clear();
    Ok(values.chunks(n).last().map(|r| r.to_vec()))
}

/// What a run writes into its output folder (the config aside).
const RUN_FILES: [&str; 6] =
    ["metrics.jsonl", "checkpoints", "model_final.safetensors", "tensorboard", "eval", "summary.json"];

/// Makes `output` ready for a run: creates it, takes its lock (an advisory
/// `flock` on `output/.lock`, released when the returned file is dropped or
/// the process dies, so no lock goes stale), refuses a folder holding a
/// previous run unless `resume` (continue it) or `overwrite` (its files are
/// removed first), writes the config, removes partial checkpoints.
fn prepare_output(
    output: &Path,
    config_toml: &str,
    resume: bool,
    overwrite: bool,
) -> Result<std::fs::File, TrainError> {
    let setup = |m: String| TrainError::Setup(format!("output directory {}: {m}", output.display()));
    let err = |e: std::io::Error| setup(e.to_string());
    if output.exists() && !output.is_dir() {
        return Err(setup("is a file, not a directory".into()));
    }
    std::fs::create_dir_all(output).map_err(err)?;
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(output.join(".lock")).map_err(err)?;
    // SAFETY: flock on a descriptor this File owns.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(setup("in use by another training run (its .lock is held)".into()));
    }
    let present: Vec<&str> = RUN_FILES.iter().copied().filter(|f| output.join(f).exists()).collect();
    let has_run = present.iter().any(|f| *f != "tensorboard" && *f != "eval");
    if !resume && has_run {
        if !overwrite {
            return Err(setup(format!(
                "holds a previous run ({}); continue it with --resume or replace it with --overwrite",
                present.join(", ")
            )));
        }
        for f in &present {
            let path = output.join(f);
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.map_err(|e| setup(format!("cannot remove {}: {e}", path.display())))?;
        }
    }
    std::fs::write(output.join("config.toml"), config_toml).map_err(err)?;
    checkpoint::remove_partial(output);
    Ok(lock)
}

/// A checkpoint's model must have the shape the config builds.
fn check_compatible(config: &Config, saved_toml: &str, dir: &Path) -> Result<(), TrainError> {
    let saved: Config = toml::from_str(saved_toml).map_err(|e| {
        TrainError::Setup(format!(
            "{}: config.toml unreadable: {}",
            dir.display(),
            crate::text::one_line(&e.to_string())
        ))
    })?;
    let (a, b) = (&saved.model, &config.model);
    let mut diffs = Vec::new();
    if a.num_classes != b.num_classes {
        diffs.push(format!("model.num_classes {} vs {}", a.num_classes, b.num_classes));
    }
    if a.backbone_depth != b.backbone_depth {
        diffs.push(format!("model.backbone_depth {} vs {}", a.backbone_depth, b.backbone_depth));
    }
    if a.fpn_channels != b.fpn_channels {
        diffs.push(format!("model.fpn_channels {} vs {}", a.fpn_channels, b.fpn_channels));
    }
    let (r, q) = (&saved.roi_heads, &config.roi_heads);
    if (r.representation_size, r.mask_head_channels) != (q.representation_size, q.mask_head_channels) {
        diffs.push("roi_heads.representation_size or mask_head_channels differ".into());
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Setup(format!(
            "--resume: checkpoint {} is from another model ({}: checkpoint vs config); use another --output",
            dir.display(),
            diffs.join(", ")
        )))
    }
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    model: &MaskRcnn,
    sgd: &Sgd,
    scaler: Option<&GradScaler>,
    iteration: u64,
    images_seen: u64,
    config_toml: &str,
    output: &Path,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let state = TrainState { iteration, scaler: scaler.map(|s| s.state()), images_seen };
    let mut named: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(checkpoint::save(output, &state, &named, model.categories.as_ref(), &sgd.state(), config_toml, keep)?)
}

/// bbox/segm AP of `model` on the validation set; detections kept under
/// `output/eval/`.
fn evaluate(model: &MaskRcnn, config: &Config, output: &Path, iteration: u64) -> Result<CocoMetrics, TrainError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| TrainError::Eval(e);
    let ann = Path::new(&config.data.val_ann);
    let dets = crate::evaluation::dataset_inference::infer_dataset(model, ann, Path::new(&config.data.val_images))
        .map_err(|e| err(e.into()))?;
    let dir = output.join("eval");
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(crate::io::WriteError { path: dir.clone(), source: e.into() }.into()))?;
    let path = dir.join(format!("detections_iter_{iteration:07}.json"));
    crate::io::write_json_atomic(&path, &dets).map_err(|e| err(e.into()))?;
    let metrics = crate::evaluation::coco_eval::evaluate_files(ann, &path).map_err(|e| err(e.into()))?;
    let mpath = dir.join(format!("metrics_iter_{iteration:07}.json"));
    crate::io::write_json_atomic(&mpath, &metrics).map_err(|e| err(e.into()))?;
    Ok(metrics)
}

fn progress_bar(show: bool, start: u64, max_iter: u64) -> indicatif::ProgressBar {
    let bar = if show { indicatif::ProgressBar::new(max_iter) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("train {bar:30} {pos}/{len} eta {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar
}
