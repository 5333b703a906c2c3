//! `maskrcnn bench data`: throughput of the training data loader alone —
//! read, decode, flip, collate, host→device copy — with no model, over a
//! COCO dataset (the config's `data.train_*`, or synthetic JPEGs generated
//! into a temporary folder at COCO-like sizes).

use crate::data::coco::CocoDataset;
use crate::data::loader::{Loader, LoaderError, LoaderOptions, StageTimes};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

/// Settings of one data benchmark.
#[derive(Debug, Clone)]
pub struct DataBench {
    pub batch: usize,
    pub iters: usize,
    pub workers: usize,
    pub prefetch: usize,
    pub flip_prob: f64,
    pub device: Device,
    /// `input.max_image_pixels`, `input.exif`.
    pub decode: crate::data::image::DecodeOptions,
}

/// Throughput and the per-image time of each stage (ms; worker stages are
/// CPU time per image on one worker, transfer is the main thread's wait for
/// the copy, per image).
#[derive(Debug, Clone, Serialize)]
pub struct DataBenchResult {
    pub kind: &'static str,
    pub bs: usize,
    pub workers: usize,
    pub device: String,
    pub images: usize,
    pub megapixels_per_img: f64,
    pub img_per_s: f64,
    pub decode_ms: f64,
    pub augment_ms: f64,
    pub collate_ms: f64,
    pub transfer_ms: f64,
    pub skipped_images: usize,
}

impl std::fmt::Display for DataBenchResult {
    /// The result in words: speed, per-image stage times, the copy wait, skipped images.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        writeln!(
            f,
            "data bs={} workers={} to {}: {:.1} img/s ({} images, {:.2} MP/img)",
            r.bs, r.workers, r.device, r.img_per_s, r.images, r.megapixels_per_img
        )?;
        writeln!(
            f,
            "  per image on one worker: decode {:.2} ms, augment {:.2} ms, collate {:.2} ms",
            r.decode_ms, r.augment_ms, r.collate_ms
        )?;
        writeln!(f, "  main thread waiting for the host->device copy: {:.3} ms/img", r.transfer_ms)?;
        if r.skipped_images > 0 {
            writeln!(f, "  {} image(s) skipped (unreadable)", r.skipped_images)?;
        }
        Ok(())
    }
}

/// Runs `opts.iters` batches (after one warm-up round of the workers).
pub fn run_data_bench(dataset: Arc<CocoDataset>, opts: &DataBench) -> Result<DataBenchResult, LoaderError> {
    let mut loader = Loader::new(
        dataset,
        LoaderOptions {
            batch_size: opts.batch,
            workers: opts.workers,
            prefetch: opts.prefetch,
            flip_prob: opts.flip_prob,
            seed: 0,
            rank: 0,
            world_size: 1,
            group_by_aspect: true,
            strict: false,
            device: opts.device,
            start_iteration: 0,
            decode: opts.decode,
        },
    )?;
    let sync = |d: Device| {
        if let Device::Cuda(i) = d {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..opts.workers.max(1) {
        loader.next_batch()?;
    }
    sync(opts.device);
    let (mut images, mut pixels, mut transfer) = (0usize, 0f64, 0f64);
    let mut times = StageTimes::default();
    let start = Instant::now();
    for _ in 0..opts.iters {
        let batch = loader.next_batch()?;
        let t = Instant::now();
        sync(opts.device);
        transfer += t.elapsed().as_secs_f64() * 1e3;
        images += batch.images.len();
        pixels += batch.images.iter().map(|im| (im.size()[1] * im.size()[2]) as f64).sum::<f64>();
        times.decode += batch.times.decode;
        times.augment += batch.times.augment;
        times.collate += batch.times.collate;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let per = |v: f64| v / images.max(1) as f64;
    Ok(DataBenchResult {
        kind: "data",
        bs: opts.batch,
        workers: opts.workers,
        device: format!("{:?}", opts.device),
        images,
        megapixels_per_img: per(pixels) / 1e6,
        img_per_s: images as f64 / elapsed,
        decode_ms: per(times.decode),
        augment_ms: per(times.augment),
        collate_ms: per(times.collate),
        transfer_ms: per(transfer),
        skipped_images: loader.skipped.count(),
    })
}
