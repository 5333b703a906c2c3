//! `maskrcnn train`: sets a run up — output folder (locked; resume or
//! overwrite), checkpoint to resume from, training set, model and weights,
//! optimizer and loss scaler, loader, the group of ranks — and runs the
//! [`Trainer`] (`engine::train_loop`: forward/backward under autocast, fp16
//! loss scaling or bf16 or fp32 with TF32, accumulation, clipping, fused SGD
//! with the warmup/multi-step schedule) with the standard hooks
//! (`engine::hooks`: interruption, time budget, loss log, evaluation with
//! the seed's early stop, checkpoints and final weights); returns the
//! run's summary.
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

use crate::config::{AmpMode, AutoCount, Config, MaskOn};
use crate::data::coco::{CocoDataset, LoadOptions};
use crate::data::loader::{Loader, LoaderOptions};
use crate::distributed::{DistEnv, ProcessGroup};
use crate::engine::amp::GradScaler;
use crate::engine::checkpoint;
use crate::engine::data_check::check_run_data;
use crate::engine::hooks;
use crate::engine::lr_schedule::LrSchedule;
use crate::engine::optimizer::Sgd;
use crate::engine::step_graphs::StepGraphs;
use crate::engine::train_log::{EvalPoint, TrainLog};
pub use crate::engine::train_loop::{
    apply_update, forward_backward, micro_batch_seed, micro_batch_short_side, MicroBatch, TrainError, TrainOptions,
};
use crate::engine::train_loop::{GroupStep, Hook, Stop, TrainClock, Trainer};
use crate::modeling::MaskRcnn;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;

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
    /// Evaluations that failed (`iteration N: why`); training went on and
    /// the weights were kept.
    pub eval_errors: Vec<String>,
    /// This process's rank (0 without `maskrcnn launch`); only rank 0 writes.
    pub rank: usize,
}

impl std::fmt::Display for TrainSummary {
    /// The run as a table, a row per line: iterations, time and speed, the
    /// final losses, the loss scale, each evaluation, unreadable images,
    /// the weights.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self;
        writeln!(f, "{:<22} {} -> {}", "iterations", s.start_iteration, s.iterations)?;
        writeln!(f, "{:<22} {:.1} s ({:.1} img/s)", "time", s.seconds, s.images_per_s)?;
        for (name, v) in &s.final_losses {
            writeln!(f, "{name:<22} {v:.4}")?;
        }
        if let Some(scale) = s.loss_scale {
            writeln!(f, "{:<22} {scale:.0} ({:.0} skipped steps)", "loss scale", s.skipped_steps)?;
        }
        for e in &s.evals {
            let segm = e.segm_ap.map(|v| format!("  segm AP {v:.4}")).unwrap_or_default();
            writeln!(
                f,
                "{:<22} bbox AP {:.4}{segm}  ({:.0} s)",
                format!("eval @ {}", e.iteration),
                e.bbox_ap,
                e.seconds
            )?;
        }
        for e in &s.eval_errors {
            writeln!(f, "{:<22} {e}", "evaluation failed")?;
        }
        if s.skipped_images > 0 {
            writeln!(f, "{:<22} {}", "unreadable images", s.skipped_images)?;
        }
        if let Some(weights) = &s.weights {
            writeln!(f, "{:<22} {}", "weights", weights.display())?;
        }
        Ok(())
    }
}

/// Trains per `config` into `opts.output`: sets the run up (output folder,
/// resume, data, model, optimizer, loader, group) and runs the
/// [`Trainer`] with the standard hooks.
pub fn train(config: &Config, opts: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let (group, opts) = join_group(opts)?;
    let opts = &opts;
    let (rank, world_size) = group.as_ref().map_or((0, 1), |g| (g.env.rank, g.env.world_size));
    let main = rank == 0;
    let device = opts.device;
    let micro_batch = micro_batch_size(config, world_size)?;
    check_data_paths(config)?;
    let mut dataset = load_training_set(config, opts.strict, main)?;
    // `auto` settings follow the data; the config written and checkpointed
    // is the resolved one.
    let config = &resolve_for_data(config, &dataset, main)?;
    let solver = &config.solver;
    let d = &config.data;
    let validation = (main && !d.val_ann.is_empty()).then(|| (Path::new(&d.val_ann), Path::new(&d.val_images)));
    let decode = crate::data::image::DecodeOptions::of(&config.input);
    let checked = check_run_data(&mut dataset, validation, decode, opts.strict)?;
    if main {
        for line in &checked.lines {
            tracing::warn!("data check: {line}");
        }
    }
    let config_toml = config.to_toml();
    // Held (rank 0) until training returns: a second run into the same
    // folder is refused while this one lives.
    let _lock =
        if main { Some(prepare_output(&opts.output, &config_toml, opts.resume, opts.overwrite)?) } else { None };
    let resumed = if opts.resume { load_resume_checkpoint(config, &opts.output)? } else { None };
    let model = build_model(config, device, resumed.as_ref(), &dataset)?;
    let group_step = group.as_ref().map(|g| GroupStep::new(g, &model, solver.allreduce_bucket_mb)).transpose()?;
    let cuda = device.is_cuda();
    let amp = config.precision.amp.on(device);
    if !matches!(config.precision.amp, AmpMode::Off | AmpMode::Auto) && !cuda {
        tracing::warn!("precision.amp = {} needs CUDA; training in fp32 on the CPU", config.precision.amp);
    }
    let mut sgd =
        Sgd::new(&model.vs, solver.momentum, solver.weight_decay, solver.bias_lr_factor, solver.bias_weight_decay);
    let mut scaler = (amp == AmpMode::Fp16).then(|| {
        GradScaler::new(config.precision.loss_scale_init, config.precision.loss_scale_growth_interval, device)
    });
    let (mut start, mut images_seen) = (0u64, 0u64);
    if let Some(r) = &resumed {
        sgd.restore(&r.optimizer, r.state.iteration)
            .map_err(|e| TrainError::Setup(format!("{}: {e}", r.dir.display())))?;
        if let (Some(s), Some(st)) = (scaler.as_mut(), r.state.scaler) {
            s.restore(st);
        }
        (start, images_seen) = (r.state.iteration, r.state.images_seen);
        tracing::info!("resuming from {} (iteration {start})", r.dir.display());
    }
    tracing::info!(
        "rank {rank}/{world_size}: training {} images ({} categories), {micro_batch} images × {} accumulation step(s) per iteration, iterations {start}..{}, amp {amp}, device {device:?}",
        dataset.images.len(),
        dataset.categories.len(),
        solver.accumulate_steps,
        solver.max_iter,
    );
    let loader = Loader::new(
        Arc::new(dataset),
        LoaderOptions {
            batch_size: micro_batch,
            workers: config.dataloader.worker_count(),
            prefetch: config.dataloader.prefetch,
            flip_prob: config.input.flip_prob,
            seed: config.seed,
            rank,
            world_size,
            group_by_aspect: config.dataloader.aspect_ratio_grouping,
            strict: opts.strict,
            device,
            start_iteration: start * solver.accumulate_steps as u64,
            decode,
        },
    )?;
    let log = TrainLog::open(&opts.output, rank, group.is_some(), start, cuda)?;
    let mut trainer = Trainer {
        config,
        opts,
        model,
        sgd,
        scaler,
        loader,
        group,
        group_step,
        step_graphs: StepGraphs::for_training(&config.precision, opts.device),
        log,
        bar: progress_bar(opts.progress, start, solver.max_iter as u64),
        clock: TrainClock::start(),
        schedule: LrSchedule::new(solver),
        amp,
        rank,
        start,
        iteration: start,
        images_seen,
        config_toml,
        last_losses: Vec::new(),
        evals: Vec::new(),
        validation: checked.validation,
        eval_errors: Vec::new(),
    };
    // The checkpointer before the evaluation: the last step's weights are
    // on disk before the final evaluation runs.
    let mut hooks: Vec<Box<dyn Hook>> = vec![
        Box::new(hooks::Interruption { flag: opts.stop.clone() }),
        Box::new(hooks::TimeBudget { max_seconds: solver.max_seconds }),
        Box::new(hooks::LossLog::default()),
        Box::new(hooks::Checkpointer::default()),
        Box::new(hooks::Evaluation),
    ];
    let stop = trainer.run(&mut hooks)?;
    let seconds = trainer.clock.elapsed();
    let scale = trainer.scaler.as_ref().map(|s| s.state());
    Ok(TrainSummary {
        start_iteration: start,
        iterations: trainer.iteration,
        seconds,
        images_per_s: (trainer.iteration - start) as f64 * solver.ims_per_batch as f64 / seconds.max(1e-9),
        final_losses: trainer.last_losses,
        skipped_steps: scale.map_or(0.0, |s| s.skipped),
        loss_scale: scale.map(|s| s.scale),
        evals: trainer.evals,
        stopped_early: stop == Stop::TargetReached,
        interrupted: stop == Stop::Interrupted,
        weights: hooks::final_weights(&opts.output, stop),
        skipped_images: trainer.loader.skipped.count() + checked.missing_train.count,
        eval_errors: trainer.eval_errors,
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

/// The image folders and the validation annotations, when configured,
/// must exist.
fn check_data_paths(config: &Config) -> Result<(), TrainError> {
    let d = &config.data;
    if !Path::new(&d.train_images).is_dir() {
        return Err(TrainError::Setup(format!("data.train_images: {} is not a folder", d.train_images)));
    }
    match (d.val_ann.is_empty(), d.val_images.is_empty()) {
        (true, true) => Ok(()),
        (false, false) if !Path::new(&d.val_ann).is_file() => {
            Err(TrainError::Setup(format!("data.val_ann: {} does not exist", d.val_ann)))
        }
        (false, false) if !Path::new(&d.val_images).is_dir() => {
            Err(TrainError::Setup(format!("data.val_images: {} is not a folder", d.val_images)))
        }
        (false, false) => Ok(()),
        _ => Err(TrainError::Setup(
            "evaluation needs both data.val_ann and data.val_images (or neither: no evaluation)".into(),
        )),
    }
}

/// The training set (images without annotations dropped unless
/// `data.keep_empty_images`; annotations without a mask kept for their box,
/// or with it as their mask per `data.box_as_mask`), with its report
/// logged (rank 0); an error when no image is left to train on.
fn load_training_set(config: &Config, strict: bool, main: bool) -> Result<CocoDataset, TrainError> {
    let d = &config.data;
    let dataset = CocoDataset::load(
        Path::new(&d.train_ann),
        Path::new(&d.train_images),
        LoadOptions { drop_empty: !d.keep_empty_images, strict, box_as_mask: d.box_as_mask },
    )?;
    if main {
        for line in dataset.report.lines() {
            tracing::info!("train data {}: {line}", d.train_ann);
        }
        for line in dataset.skip_summary() {
            tracing::warn!("train data {}: {line}", d.train_ann);
        }
    }
    if dataset.images.is_empty() {
        let r = &dataset.report;
        let why = if r.annotations_in_file == 0 {
            "it has no annotations".to_string()
        } else if r.instances == 0 {
            format!(
                "none of its {} annotations is usable ({})",
                r.annotations_in_file,
                dataset.skip_summary().first().cloned().unwrap_or_default()
            )
        } else {
            format!("its {} usable annotations are on images that could not be used", r.instances)
        };
        return Err(TrainError::Setup(format!(
            "{}: no image to train on: {} images, and {why}",
            d.train_ann, r.images_in_file
        )));
    }
    if dataset.images.iter().all(|im| im.instances.is_empty()) {
        return Err(TrainError::Setup(format!(
            "{}: none of its {} images has a usable annotation: there is nothing to learn (data.keep_empty_images keeps negatives beside annotated images)",
            d.train_ann,
            dataset.images.len()
        )));
    }
    Ok(dataset)
}

/// What `config`'s automatic settings come to for training on `device`:
/// `(key, value, why)` for each (the data's from `data.train_ann` when it
/// can be read; a reason why not otherwise). What `maskrcnn config` prints.
pub fn resolved_settings(config: &Config, device: Device) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let amp = config.precision.amp.on(device);
    let on = match device {
        Device::Cuda(i) => crate::environment::cuda_device(i).map_or(format!("CUDA device {i}"), |d| {
            format!("{} (compute capability {}.{})", d.name, d.capability.0, d.capability.1)
        }),
        _ => "the CPU".to_string(),
    };
    out.push(("precision.amp".into(), format!("\"{amp}\""), format!("{} on {on}", config.precision.amp)));
    out.push((
        "dataloader.workers".into(),
        config.dataloader.worker_count().to_string(),
        format!("{}; {} CPUs for this process", config.dataloader.workers, crate::environment::usable_cpus()),
    ));
    let d = &config.data;
    let dataset = (!d.train_ann.is_empty()).then(|| {
        CocoDataset::load(
            Path::new(&d.train_ann),
            Path::new(&d.train_images),
            LoadOptions { drop_empty: !d.keep_empty_images, strict: false, box_as_mask: d.box_as_mask },
        )
    });
    let resolved = match &dataset {
        Some(Ok(ds)) => resolve_for_data(config, ds, false).map_err(|e| e.to_string()),
        Some(Err(e)) => Err(format!("data.train_ann unreadable: {e}")),
        None => Err("no data.train_ann".into()),
    };
    let s = match &resolved {
        Ok(c) => c.solver.clone(),
        Err(_) => config.solver.resolved(0),
    };
    match (&resolved, &dataset) {
        (Ok(c), Some(Ok(ds))) => {
            out.push((
                "model.num_classes".into(),
                c.model.num_classes.to_string(),
                format!("{}: {} categories + background", d.train_ann, ds.categories.len()),
            ));
            out.push((
                "model.mask_on".into(),
                c.model.mask_on.to_string(),
                format!(
                    "{}: {} of {} annotations have a mask",
                    d.train_ann,
                    ds.report.instances - ds.report.crowd - ds.report.without_mask(),
                    ds.report.instances - ds.report.crowd
                ),
            ));
            if config.solver.epochs > 0.0 {
                out.push((
                    "solver.max_iter".into(),
                    s.max_iter.to_string(),
                    format!("{} epochs of {} images", s.epochs, ds.images.len()),
                ));
            }
        }
        (Err(why), _) => {
            for key in ["model.num_classes", "model.mask_on"] {
                out.push((key.into(), "\"auto\"".into(), format!("resolved when training starts ({why})")));
            }
        }
        _ => {}
    }
    out.push((
        "solver.steps".into(),
        format!("{:?}", s.steps),
        format!("solver.step_fractions {:?} of max_iter {}", s.step_fractions, s.max_iter),
    ));
    out.push((
        "learning rate".into(),
        s.effective_lr().to_string(),
        format!(
            "solver.base_lr {} for {} images, x {}/{}",
            s.base_lr, s.reference_batch, s.ims_per_batch, s.reference_batch
        ),
    ));
    out
}

/// `config` with its `auto` settings taken from `dataset`:
/// `model.num_classes` (its categories + background; a fixed count must
/// match), `model.mask_on` (off when no annotation has a mask), the
/// solver's `max_iter` (from `epochs`) and `steps` (from `step_fractions`).
fn resolve_for_data(config: &Config, dataset: &CocoDataset, main: bool) -> Result<Config, TrainError> {
    let mut config = config.clone();
    config.solver = config.solver.resolved(dataset.images.len());
    let s = &config.solver;
    if main {
        let epochs = s.max_iter as f64 * s.ims_per_batch as f64 / dataset.images.len().max(1) as f64;
        tracing::info!(
            "schedule: {} iterations of {} images ({epochs:.1} epochs of {} images), learning rate {} ({} for {} images, scaled by {}/{}), x{} at iterations {:?}",
            s.max_iter,
            s.ims_per_batch,
            dataset.images.len(),
            s.effective_lr(),
            s.base_lr,
            s.reference_batch,
            s.ims_per_batch,
            s.reference_batch,
            s.gamma,
            s.steps
        );
    }
    let needed = dataset.num_classes();
    match config.model.num_classes {
        AutoCount::Auto => config.model.num_classes = AutoCount::Fixed(needed),
        AutoCount::Fixed(n) if n != needed => {
            return Err(TrainError::Setup(format!(
                "{}: {} categories need model.num_classes = {needed} (background + categories), config has {n}; \"auto\" takes it from the data",
                config.data.train_ann,
                dataset.categories.len(),
            )))
        }
        AutoCount::Fixed(_) => {}
    }
    let has_masks = dataset.has_masks();
    match config.model.mask_on {
        MaskOn::Auto => {
            config.model.mask_on = MaskOn::from_bool(has_masks);
            if !has_masks && main {
                tracing::info!(
                    "{}: no annotation has a mask: training box detection only (model.mask_on = false, torchvision's Faster R-CNN)",
                    config.data.train_ann
                );
            }
        }
        MaskOn::On if !has_masks && main => tracing::warn!(
            "model.mask_on = true but no annotation of {} has a mask: the mask head will not learn",
            config.data.train_ann
        ),
        _ => {}
    }
    Ok(config)
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
        Some(r) => weights::load_weights(&model.vs, &r.dir.join("model.safetensors"), model.num_classes())?,
        None if !config.model.backbone_weights.is_empty() => {
            weights::load_backbone_weights(&model.vs, Path::new(&config.model.backbone_weights))?
        }
        None if !config.model.weights.is_empty() => {
            let classes = weights::load_pretrained_model(&model.vs, Path::new(&config.model.weights))?;
            if classes != model.num_classes() as i64 {
                tracing::info!(
                    "{}: {classes} classes, the model has {}: box and mask predictors start fresh",
                    config.model.weights,
                    model.num_classes()
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

/// What a run writes into its output folder (the config aside).
const RUN_FILES: [&str; 7] =
    ["metrics.jsonl", "ranks", "checkpoints", "model_final.safetensors", "tensorboard", "eval", "summary.json"];

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
    let err = |source: std::io::Error| TrainError::Output { path: output.to_path_buf(), source };
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
    let has_run = present.iter().any(|f| !["tensorboard", "eval", "ranks"].contains(f));
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
            removed.map_err(|source| TrainError::Output { path: path.clone(), source })?;
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
    if a.mask_on.enabled() != b.mask_on.enabled() {
        diffs.push(format!("model.mask_on {} vs {}", a.mask_on, b.mask_on));
    }
    if a.backbone_depth != b.backbone_depth {
        diffs.push(format!("model.backbone_depth {} vs {}", a.backbone_depth, b.backbone_depth));
    }
    if a.fpn_channels != b.fpn_channels {
        diffs.push(format!("model.fpn_channels {} vs {}", a.fpn_channels, b.fpn_channels));
    }
    if a.fpn_norm != b.fpn_norm {
        diffs.push(format!("model.fpn_norm {:?} vs {:?}", a.fpn_norm, b.fpn_norm));
    }
    if a.rpn_conv_depth != b.rpn_conv_depth {
        diffs.push(format!("model.rpn_conv_depth {} vs {}", a.rpn_conv_depth, b.rpn_conv_depth));
    }
    if (a.box_head, a.head_norm) != (b.box_head, b.head_norm) {
        diffs.push(format!(
            "model.box_head/head_norm {:?}/{:?} vs {:?}/{:?}",
            a.box_head, a.head_norm, b.box_head, b.head_norm
        ));
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

fn progress_bar(show: bool, start: u64, max_iter: u64) -> indicatif::ProgressBar {
    let bar = if show { indicatif::ProgressBar::new(max_iter) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("train {bar:30} {pos}/{len} eta {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar
}
