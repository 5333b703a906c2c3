//! `maskrcnn bench infer`: inference throughput on synthetic batches shaped
//! like the peer benchmark's (torchvision's inference timed on the same
//! data; `scripts/gpu-bench.sh` runs both): 800 × 1000–1333 images, score threshold 0 so every image yields 100 detections with masks).

use crate::config::{AmpMode, Config};
use crate::modeling::{MaskRcnn, ModelError};
use crate::shim::AutocastGuard;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Settings of one inference benchmark.
#[derive(Debug, Clone)]
pub struct InferBench {
    pub batch: usize,
    pub iters: usize,
    pub warmup: usize,
    pub amp: AmpMode,
    pub device: Device,
    /// The model to time (architecture, classes, test sizes, RoI heads'
    /// thresholds; the peer's benchmark uses `roi_heads.score_thresh = 0`).
    pub config: Config,
}

/// Median times of one configuration; `stages_ms` splits one batch by stage.
#[derive(Debug, Clone, Serialize)]
pub struct InferBenchResult {
    pub kind: &'static str,
    pub bs: usize,
    pub amp: String,
    pub device: String,
    pub med_batch_s: f64,
    pub p90_s: f64,
    pub img_per_s: f64,
    pub dets_per_img: f64,
    pub stages_ms: Vec<(String, f64)>,
    /// Of each stage's time, how long the host took to issue its work (the
    /// rest is waiting for the GPU): a stage whose two figures are close is
    /// bound by the host.
    pub stages_host_ms: Vec<(String, f64)>,
    /// Input shapes replayed from a CUDA graph (`precision.cuda_graphs`).
    pub graphs_recorded: usize,
}

impl std::fmt::Display for InferBenchResult {
    /// The result in words: speed, latency, detections, then time per stage.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        writeln!(
            f,
            "infer bs={} amp={} on {}: {:.2} img/s (median batch {:.4} s, p90 {:.4} s, {:.0} detections/img, {} CUDA graphs)",
            r.bs, r.amp, r.device, r.img_per_s, r.med_batch_s, r.p90_s, r.dets_per_img, r.graphs_recorded
        )?;
        for ((stage, ms), (_, host)) in r.stages_ms.iter().zip(&r.stages_host_ms) {
            writeln!(f, "  {stage:<22} {ms:>9.2} ms (host {host:.2} ms)")?;
        }
        Ok(())
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The peer's synthetic images: 800 × U(1000, 1333), uniform noise.
fn synthetic_batch(n: usize, device: Device) -> Vec<Tensor> {
    (0..n)
        .map(|_| {
            let w = Tensor::randint_low(1000, 1334, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
            Tensor::rand([3, 800, w], (Kind::Float, device))
        })
        .collect()
}

/// Runs the benchmark with a randomly initialized model of `opts.config`.
pub fn run_infer_bench(opts: &InferBench) -> Result<InferBenchResult, ModelError> {
    let config = &opts.config;
    let model = MaskRcnn::new(config, opts.device)?;
    crate::shim::set_tf32(config.precision.tf32);
    if opts.device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(opts.config.precision.cudnn_benchmark);
    }
    tch::manual_seed(1);
    let batches: Vec<Vec<Tensor>> = (0..3).map(|_| synthetic_batch(opts.batch, opts.device)).collect();
    let _amp = if opts.device.is_cuda() { AutocastGuard::new(opts.amp.autocast_dtype()) } else { None };
    let mut times = Vec::new();
    let mut dets = 0.0;
    for it in 0..opts.warmup + opts.iters {
        let images = &batches[it % batches.len()];
        sync(opts.device);
        let t0 = Instant::now();
        let out = model.predict(images);
        sync(opts.device);
        if it >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64());
            dets = out.iter().map(|d| d.boxes.size()[0] as f64).sum::<f64>() / opts.batch as f64;
        }
    }
    let (stages_ms, stages_host_ms) = stage_breakdown(&model, &batches[0], opts.device, 5);
    let med = median(&mut times);
    let p90 = times[(times.len() * 9 / 10).min(times.len() - 1)];
    Ok(InferBenchResult {
        kind: "infer",
        bs: opts.batch,
        amp: opts.amp.to_string(),
        device: format!("{:?}", opts.device),
        med_batch_s: med,
        p90_s: p90,
        img_per_s: opts.batch as f64 / med,
        dets_per_img: dets,
        stages_ms,
        stages_host_ms,
        graphs_recorded: model.recorded_graphs(),
    })
}

/// Milliseconds by stage name.
type StageTimes = Vec<(String, f64)>;

/// Median milliseconds of each inference stage over `reps` batches, with a
/// device synchronization after every stage, and of the host's time to
/// issue each stage's work (before that synchronization).
fn stage_breakdown(model: &MaskRcnn, images: &[Tensor], device: Device, reps: usize) -> (StageTimes, StageTimes) {
    let names = ["transform", "backbone+fpn", "rpn", "roi_heads (box+mask)", "paste masks"];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut issued: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let sizes: Vec<(i64, i64)> = images.iter().map(|im| (im.size()[1], im.size()[2])).collect();
    let input = &model.config.input;
    for _ in 0..reps {
        tch::no_grad(|| {
            let mut lap = {
                sync(device);
                let mut t = Instant::now();
                move |stage: usize, samples: &mut Vec<Vec<f64>>, issued: &mut Vec<Vec<f64>>| {
                    issued[stage].push(t.elapsed().as_secs_f64() * 1e3);
                    sync(device);
                    samples[stage].push(t.elapsed().as_secs_f64() * 1e3);
                    t = Instant::now();
                }
            };
            let list = model.transform.prepare(images, input.min_size_test as i64, input.max_size_test as i64);
            lap(0, &mut samples, &mut issued);
            let features = model.inference_features(&list.tensors);
            lap(1, &mut samples, &mut issued);
            let rpn = model.rpn.forward(&features, &list, false);
            lap(2, &mut samples, &mut issued);
            let (proposals, _) = rpn.proposals.per_image();
            let detections = model.roi_heads.detect(&features[..4], &proposals, &list.image_sizes);
            lap(3, &mut samples, &mut issued);
            let trace = crate::modeling::mask_rcnn::InferenceTrace { images: list, features, rpn, detections };
            let _ = model.postprocess(trace, &sizes);
            lap(4, &mut samples, &mut issued);
        });
    }
    let medians =
        |v: &mut [Vec<f64>]| names.iter().zip(v.iter_mut()).map(|(n, s)| (n.to_string(), median(s))).collect();
    (medians(&mut samples), medians(&mut issued))
}
