//! `maskrcnn bench train`: training-step throughput on the synthetic batches
//! of the peer benchmark (torchvision's training step timed on the same
//! data; `scripts/gpu-bench.sh` runs both): R50-FPN with frozen BN and 3
//! trainable stages, 91 classes, 800 × U(1000, 1333) noise images,
//! 7 random boxes per image with box-shaped bitmap masks, four batches
//! cycled; timed per step (forward, backward, SGD update, synchronized)
//! exactly as the peer times torchvision's, forward and backward replayed
//! from CUDA graphs when `precision.cuda_graphs` is on (the phase split is
//! measured eagerly). With a dataset (`--data`) the batches come from the
//! training loader instead — real images, targets and shape variety, the
//! workload `maskrcnn train` runs — and the median and the mean step are
//! both reported (the mean counts the steps that tune or record).

use crate::config::{AmpMode, Config, NormKind};
use crate::engine::amp::GradScaler;
use crate::engine::optimizer::Sgd;
use crate::engine::step_graphs::StepGraphs;
use crate::engine::trainer::{apply_update, forward_backward, MicroBatch, TrainError};
use crate::modeling::MaskRcnn;
use crate::ops::BalancedSampler;
use crate::structures::{InstanceMasks, Target};
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Settings of one training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub batch: usize,
    pub iters: usize,
    pub warmup: usize,
    pub amp: AmpMode,
    pub channels_last: bool,
    pub device: Device,
    /// The model to time (architecture, classes, normalization): with
    /// `model.norm = "auto"` the peer's v1 setup (frozen BatchNorm, three
    /// trainable stages); `amp` and `channels_last` above take precedence
    /// over its precision section.
    pub config: Config,
    /// After the measurements, one more step inside a CUDA profiler range
    /// (`kernels::timing::profiler_range`) for an external profiler.
    pub profile_range: bool,
    /// Batches from this training set through the loader (`None`: the
    /// peer's synthetic batches).
    pub data: Option<std::sync::Arc<crate::data::CocoDataset>>,
}

/// Median step time, throughput and peak memory of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchResult {
    pub kind: &'static str,
    pub bs: usize,
    pub amp: String,
    pub channels_last: bool,
    pub device: String,
    pub med_step_s: f64,
    pub img_per_s: f64,
    /// Images per second over every timed step (with `--data` the steps
    /// that meet a new shape, tune and record count too).
    pub mean_img_per_s: f64,
    /// Where the batches came from: `synthetic` or the annotation file.
    pub data: String,
    pub peak_mem_gib: f64,
    /// Median split of a step measured in extra synchronized iterations:
    /// forward (losses), backward, optimizer update (ms).
    pub split_ms: [f64; 3],
    /// Waits of the host for the device per step (median): libtorch's
    /// synchronizations (its CUDA sync check) and the waits outside it (a
    /// replayed step's mask-positive count: 1).
    pub syncs_per_step: f64,
    /// The GPU's own time for a step (median, ms): CUDA events around a step
    /// queued while a spin kernel holds the GPU, so the host's pace does not
    /// show. Equals the GPU-busy time when the step does not wait for the
    /// device (beyond the mask count, which waits for part of its own work).
    pub gpu_ms: Option<f64>,
    /// `gpu_ms` / the median wall time of a step.
    pub gpu_busy_fraction: Option<f64>,
    /// Steps whose forward and backward were replayed from a CUDA graph
    /// (`precision.cuda_graphs`; 0 when off or on the CPU).
    pub graph_replays: u64,
    /// Steps the graphs ran again because their mask positives exceeded
    /// the mask head's row budget.
    pub steps_redone: u64,
    /// Host time per stage of the timed steps (median ms, in step order;
    /// `crate::host_timing` marks). Without syncs a stage waits for
    /// the GPU only when the launch queue is full (the GPU-bound case);
    /// otherwise these are the host's own costs.
    pub host_split_ms: Vec<(&'static str, f64)>,
    /// CUDA memory allocated after each stage of one eager step (GiB, in
    /// step order; `loss_sum` holds every activation the backward needs).
    pub memory_after_stage_gib: Vec<(&'static str, f64)>,
}

impl std::fmt::Display for TrainBenchResult {
    /// The result in words: speed and memory, the phases, syncs and GPU time, host time per stage.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        writeln!(
            f,
            "train bs={} amp={} channels_last={} on {} ({}): {:.2} img/s (median step {:.4} s; {:.2} img/s over every step; peak memory {:.2} GiB)",
            r.bs, r.amp, r.channels_last, r.device, r.data, r.img_per_s, r.med_step_s, r.mean_img_per_s, r.peak_mem_gib
        )?;
        writeln!(
            f,
            "  forward {:.1} ms, backward {:.1} ms, update {:.1} ms (synchronized between phases)",
            r.split_ms[0], r.split_ms[1], r.split_ms[2]
        )?;
        let gpu = r.gpu_ms.map_or("n/a".to_string(), |g| format!("{g:.1} ms"));
        writeln!(
            f,
            "  {} host waits for the device per step; GPU time per step (queued ahead) {gpu}; {} steps replayed from CUDA graphs, {} run again (mask rows)",
            r.syncs_per_step, r.graph_replays, r.steps_redone
        )?;
        let host: Vec<String> = r.host_split_ms.iter().map(|(s, ms)| format!("{s} {ms:.1}")).collect();
        writeln!(f, "  host ms per stage: {}", host.join(", "))?;
        let memory: Vec<String> = r.memory_after_stage_gib.iter().map(|(s, g)| format!("{s} {g:.2}")).collect();
        if !memory.is_empty() {
            writeln!(f, "  GiB allocated after each stage (eager step): {}", memory.join(", "))?;
        }
        Ok(())
    }
}

/// The peer's synthetic training batch of `n` images on `device`.
fn synthetic_batch(n: usize, device: Device) -> (Vec<Tensor>, Vec<Target>) {
    let mut images = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    for _ in 0..n {
        let (h, w) = (800i64, Tensor::randint_low(1000, 1334, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]));
        images.push(Tensor::rand([3, h, w], (Kind::Float, device)));
        let k = 7i64;
        let xy =
            Tensor::rand([k, 2], (Kind::Float, Device::Cpu)) * Tensor::from_slice(&[w as f32 * 0.7, h as f32 * 0.7]);
        let wh = Tensor::rand([k, 2], (Kind::Float, Device::Cpu))
            * Tensor::from_slice(&[w as f32 * 0.3, h as f32 * 0.3])
            + 32.0;
        let boxes = Tensor::cat(&[&xy, &(&xy + &wh)], 1);
        let masks = Tensor::zeros([k, h, w], (Kind::Uint8, Device::Cpu));
        let b: Vec<f32> = Vec::try_from(boxes.round().reshape([-1])).unwrap_or_default();
        for i in 0..k as usize {
            let (x0, y0) = (b[4 * i] as i64, b[4 * i + 1] as i64);
            let (x1, y1) = ((b[4 * i + 2] as i64).min(w), (b[4 * i + 3] as i64).min(h));
            if x1 > x0 && y1 > y0 {
                let _ = masks.get(i as i64).narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).fill_(1);
            }
        }
        targets.push(Target {
            boxes,
            labels: Tensor::randint_low(1, 91, [k], (Kind::Int64, Device::Cpu)),
            masks: InstanceMasks::Bitmaps(masks.to_device(device)),
            iscrowd: None,
            has_mask: None,
        });
    }
    (images, targets)
}

/// One timed training step: forward and backward (replayed from a CUDA
/// graph once recorded, when `graphs`), then the SGD update.
fn bench_step(
    model: &MaskRcnn,
    sgd: &mut Sgd,
    scaler: &mut Option<GradScaler>,
    graphs: &mut Option<StepGraphs>,
    amp: AmpMode,
    (images, targets): &(Vec<Tensor>, Vec<Target>),
) -> Result<(), TrainError> {
    let batch = MicroBatch { images, targets, resize: Default::default() };
    let _ = forward_backward(model, batch, 1, scaler.as_ref(), amp, &mut BalancedSampler, graphs.as_mut())?;
    apply_update(sgd, scaler.as_mut(), 0.02, 0.0)
}

/// Runs the benchmark with a randomly initialized model of `opts.config`.
pub fn run_train_bench(opts: &TrainBench) -> Result<TrainBenchResult, TrainError> {
    let mut config = opts.config.clone();
    if config.model.norm == NormKind::Auto {
        config.model.norm = NormKind::FrozenBn;
        config.model.trainable_layers = 3;
    }
    config.precision.amp = opts.amp;
    config.precision.channels_last = opts.channels_last;
    tch::manual_seed(0);
    let cuda = opts.device.is_cuda();
    if cuda {
        tch::Cuda::cudnn_set_benchmark(config.precision.cudnn_benchmark);
    }
    crate::shim::set_tf32(true);
    let mut model = MaskRcnn::new(&config, opts.device)?;
    if cuda && opts.channels_last {
        model.to_channels_last();
    }
    let mut sgd = Sgd::new(&model.vs, 0.9, 1e-4, 1.0, 1e-4);
    let amp = if cuda { opts.amp } else { AmpMode::Off };
    let mut scaler = (amp == AmpMode::Fp16).then(|| GradScaler::new(65536.0, 2000, opts.device));
    let mut loader = opts
        .data
        .as_ref()
        .map(|ds| {
            crate::data::Loader::new(
                ds.clone(),
                crate::data::LoaderOptions {
                    batch_size: opts.batch,
                    workers: config.dataloader.worker_count(),
                    prefetch: config.dataloader.prefetch,
                    flip_prob: config.input.flip_prob,
                    seed: config.seed,
                    rank: 0,
                    world_size: 1,
                    group_by_aspect: config.dataloader.aspect_ratio_grouping,
                    strict: false,
                    device: opts.device,
                    start_iteration: 0,
                    decode: crate::data::image::DecodeOptions::of(&config.input),
                },
            )
        })
        .transpose()?;
    let mut next_batch = || -> Result<(Vec<Tensor>, Vec<Target>), TrainError> {
        match loader.as_mut() {
            Some(l) => {
                let b = l.next_batch()?;
                Ok((b.images, b.targets))
            }
            None => Ok(synthetic_batch(opts.batch, opts.device)),
        }
    };
    // The extra measurements below cycle four batches.
    let batches: Vec<(Vec<Tensor>, Vec<Target>)> = (0..4).map(|_| next_batch()).collect::<Result<_, _>>()?;
    let sync = || {
        if let Device::Cuda(i) = opts.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    sync();
    let mut times = Vec::with_capacity(opts.iters);
    let mut host_stages: Vec<Vec<(&'static str, f64)>> = Vec::new();
    let mut graphs = StepGraphs::for_training(&config.precision, opts.device);
    for it in 0..opts.warmup + opts.iters {
        let fresh = if opts.data.is_some() { Some(next_batch()?) } else { None };
        let batch = fresh.as_ref().unwrap_or(&batches[it % batches.len()]);
        let t0 = Instant::now();
        let (result, stages) =
            crate::host_timing::record(|| bench_step(&model, &mut sgd, &mut scaler, &mut graphs, amp, batch));
        result?;
        sync();
        if it >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64());
            host_stages.push(stages);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    // What each stage keeps allocated: one eager step.
    let memory_after_stage_gib = match opts.device {
        Device::Cuda(i) => {
            let (result, marks) = crate::host_timing::record_memory(i, || {
                bench_step(&model, &mut sgd, &mut scaler, &mut None, amp, &batches[0])
            });
            result?;
            marks
        }
        _ => Vec::new(),
    };
    // Where the time goes: a few more steps, synchronized between phases.
    let mut phases: [Vec<f64>; 3] = [vec![], vec![], vec![]];
    for it in 0..opts.iters.clamp(1, 6) {
        let (images, targets) = &batches[it % batches.len()];
        let t0 = Instant::now();
        let losses = {
            let _autocast = crate::shim::AutocastGuard::new(amp.autocast_dtype());
            model.forward_train(images, targets, &mut BalancedSampler)?
        };
        sync();
        let t1 = Instant::now();
        let total = losses.total();
        match &scaler {
            Some(s) => s.scale_loss(&total).backward(),
            None => total.backward(),
        }
        sync();
        let t2 = Instant::now();
        apply_update(&mut sgd, scaler.as_mut(), 0.02, 0.0)?;
        sync();
        for (k, d) in [t1 - t0, t2 - t1, t2.elapsed()].into_iter().enumerate() {
            phases[k].push(d.as_secs_f64() * 1e3);
        }
    }
    let split_ms = phases.map(|mut v| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    });
    // Synchronizations per step, and the GPU's own time per step.
    let mut syncs = Vec::new();
    let mut gpu = Vec::new();
    let mut counter = crate::host_sync::SyncCounter::start(cuda);
    for it in 0..opts.iters.clamp(1, 6) {
        let batch = &batches[it % batches.len()];
        let queued = match opts.device {
            Device::Cuda(i) => crate::kernels::timing::spin(i, 0.5),
            _ => false,
        };
        let mut span = crate::kernels::timing::GpuSpan::start(opts.device);
        counter.take();
        bench_step(&model, &mut sgd, &mut scaler, &mut graphs, amp, batch)?;
        syncs.push(counter.take().all as f64);
        if let Some(span) = span.as_mut().filter(|_| queued) {
            span.stop();
            gpu.extend(span.elapsed_ms());
        }
        sync();
    }
    crate::shim::enable_sync_counter(false);
    if let (true, Device::Cuda(i)) = (opts.profile_range, opts.device) {
        crate::kernels::timing::profiler_range(i, true);
        bench_step(&model, &mut sgd, &mut scaler, &mut graphs, amp, &batches[0])?;
        sync();
        crate::kernels::timing::profiler_range(i, false);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    };
    let gpu_ms = median(gpu);
    let host_split_ms = host_stages
        .first()
        .map(|first| {
            first
                .iter()
                .enumerate()
                .map(|(i, &(name, _))| {
                    let v = host_stages.iter().filter_map(|s| s.get(i).filter(|s| s.0 == name).map(|s| s.1)).collect();
                    (name, median(v).unwrap_or(0.0))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(TrainBenchResult {
        kind: "train",
        bs: opts.batch,
        amp: amp.to_string(),
        channels_last: opts.channels_last && cuda,
        device: format!("{:?}", opts.device),
        med_step_s: med,
        img_per_s: opts.batch as f64 / med,
        mean_img_per_s: opts.batch as f64 / mean.max(1e-12),
        data: opts.data.as_ref().map_or("synthetic".into(), |d| d.annotation_file.display().to_string()),
        peak_mem_gib: crate::environment::cuda_peak_memory_gib(opts.device),
        split_ms,
        syncs_per_step: median(syncs).unwrap_or(0.0),
        gpu_ms,
        gpu_busy_fraction: gpu_ms.map(|g| g / (med * 1e3)),
        graph_replays: graphs.as_ref().map_or(0, StepGraphs::replays),
        steps_redone: graphs.as_ref().map_or(0, StepGraphs::redone),
        host_split_ms,
        memory_after_stage_gib,
    })
}
