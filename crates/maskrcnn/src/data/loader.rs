//! The prefetching hybrid training loader. Worker threads read, decode and
//! flip whole batches and collate them into one pinned host buffer (uint8
//! HWC pixels, images back to back, no padding) plus CPU targets; the
//! training thread issues one non-blocking host→device copy per batch and
//! turns the bytes into float images on the device, where the model
//! normalizes, resizes and pads them (the seed's "hybrid" loader). Batches
//! come out in sampler order whatever the thread timing, so a run is
//! reproducible from its seed; nothing here waits for the GPU.
//!
//! An image that cannot be read or decoded is left out of its batch, counted
//! and reported once with its id; with `strict` it stops the run.

use super::coco::CocoDataset;
use super::image::RgbImage;
use super::sampler::{BatchPlan, GroupedBatchSampler, PlannedBatch};
use super::transforms::{hflip_image, to_target};
use crate::random::Rng;
use crate::structures::{InstanceMasks, Target};
use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Images per batch on this rank.
    pub batch_size: usize,
    /// Decode/augment threads.
    pub workers: usize,
    /// Batches prepared ahead beyond one per worker.
    pub prefetch: usize,
    pub flip_prob: f64,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    pub group_by_aspect: bool,
    /// A bad image stops the run instead of being skipped.
    pub strict: bool,
    /// Where the images go (pinned host buffers when CUDA).
    pub device: Device,
    /// First iteration to produce (resuming a run).
    pub start_iteration: u64,
    /// How images decode (`input.max_image_pixels`, `input.exif`).
    pub decode: super::image::DecodeOptions,
}

/// Host-side time spent on one batch, summed over its images (milliseconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    /// File read + JPEG/PNG decode.
    pub decode: f64,
    /// Flip of pixels and annotations, target building.
    pub augment: f64,
    /// Copy into the pinned batch buffer.
    pub collate: f64,
}

/// A training batch ready for the model.
#[derive(Debug)]
pub struct Batch {
    pub iteration: u64,
    pub image_ids: Vec<u64>,
    /// `[3, H, W]` float RGB in [0, 1] on the loader's device, original sizes.
    pub images: Vec<Tensor>,
    /// Targets in original-image pixels, on the CPU (pinned when CUDA); the
    /// model validates them there and copies them without blocking.
    pub targets: Vec<Target>,
    pub times: StageTimes,
    /// Later batches already finished when this one was taken (0: the
    /// training thread is waiting on, or right behind, the workers).
    pub ready_ahead: usize,
    /// Seconds the training thread waited for the workers to finish this
    /// batch (not counting the upload, whose launches can wait for room in
    /// a full GPU queue).
    pub waited: f64,
    /// Original `(height, width)` per the annotations of every image of
    /// this iteration's global batch (all ranks' images; this batch's
    /// among them): what a padded batch shape common to the ranks covers.
    pub global_sizes: Vec<(i64, i64)>,
}

/// Why loading stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Sampler(#[from] super::sampler::SamplerError),
    #[error("image {id} ({path}): {message}")]
    BadImage { id: u64, path: String, message: String },
    #[error("data loader workers stopped")]
    WorkersGone,
    #[error("cannot start data loader worker {index} of {count}: {message}")]
    Spawn { index: usize, count: usize, message: String },
    #[error("no image loaded in {batches} batches in a row (an epoch's worth); the last failure: {last}")]
    NothingLoads { batches: u64, last: String },
}

struct HostBatch {
    iteration: u64,
    image_ids: Vec<u64>,
    pixels: Tensor,
    sizes: Vec<(i64, i64)>,
    targets: Vec<Target>,
    times: StageTimes,
    global_sizes: Vec<(i64, i64)>,
}

type Job = PlannedBatch;
type Done = Result<HostBatch, LoaderError>;

/// Images left out at run time, each reported once.
#[derive(Debug, Default)]
pub struct SkipLog {
    seen: Mutex<HashSet<u64>>,
    last: Mutex<String>,
}

impl SkipLog {
    /// Records image `id`; logs the reason the first time only.
    pub fn record(&self, id: u64, reason: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.insert(id) {
            tracing::warn!("skipping image {id}: {reason}");
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = format!("image {id}: {reason}");
    }

    /// The newest skip, `image ID: reason` (empty before any).
    pub fn last(&self) -> String {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Distinct images skipped so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The loader: iterate with [`Loader::next_batch`].
pub struct Loader {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    plan: BatchPlan,
    ready: BTreeMap<u64, HostBatch>,
    next_iteration: u64,
    in_flight: usize,
    max_in_flight: usize,
    device: Device,
    /// Batches in a row whose every image failed, and how many make an
    /// epoch on this rank: a whole epoch of them means nothing can load.
    empty_streak: u64,
    epoch_batches: u64,
    pub skipped: Arc<SkipLog>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Starts `options.workers` threads over `dataset`.
    pub fn new(dataset: Arc<CocoDataset>, options: LoaderOptions) -> Result<Loader, LoaderError> {
        let landscape = dataset.images.iter().map(|r| r.is_landscape()).collect();
        let sampler = GroupedBatchSampler::new(
            landscape,
            options.batch_size,
            options.seed,
            options.rank,
            options.world_size,
            options.group_by_aspect,
        )?;
        let start = options.start_iteration;
        let plan = sampler.plan_from(start);
        let per_epoch = (options.batch_size * options.world_size).max(1);
        let epoch_batches = dataset.images.len().div_ceil(per_epoch).max(1) as u64;
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let skipped = Arc::new(SkipLog::default());
        let count = options.workers.max(1);
        let workers = (0..count)
            .map(|index| {
                let (jobs, done, dataset, skipped, options) =
                    (job_rx.clone(), done_tx.clone(), dataset.clone(), skipped.clone(), options.clone());
                // A refused thread is an error, not an abort (the workers
                // already started stop when the job channel closes).
                std::thread::Builder::new()
                    .name(format!("loader-{index}"))
                    .spawn(move || worker(jobs, done, dataset, skipped, options))
                    .map_err(|e| LoaderError::Spawn { index, count, message: e.to_string() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Loader {
            jobs: Some(job_tx),
            done: done_rx,
            plan,
            ready: BTreeMap::new(),
            next_iteration: start,
            in_flight: 0,
            max_in_flight: options.workers.max(1) + options.prefetch,
            device: options.device,
            empty_streak: 0,
            epoch_batches,
            skipped,
            workers,
        })
    }

    /// The batch of the next iteration, its images already on the device
    /// (copy issued, not awaited). Batches whose images all failed to load
    /// are passed over; an epoch's worth of those in a row is an error
    /// (a wrong image folder, say), not a silent endless loop.
    pub fn next_batch(&mut self) -> Result<Batch, LoaderError> {
        loop {
            let (host, waited) = self.next_host()?;
            if host.image_ids.is_empty() {
                self.empty_streak += 1;
                if self.empty_streak >= self.epoch_batches {
                    return Err(LoaderError::NothingLoads { batches: self.empty_streak, last: self.skipped.last() });
                }
                continue;
            }
            self.empty_streak = 0;
            let ready_ahead = self.ready.len();
            return Ok(self.upload(host, ready_ahead, waited));
        }
    }

    /// The next iteration's host batch and the seconds spent waiting for
    /// it. Every batch the workers have finished is moved into `ready`
    /// first, so its size says how far ahead the loader is.
    fn next_host(&mut self) -> Result<(HostBatch, f64), LoaderError> {
        let jobs = self.jobs.as_ref().ok_or(LoaderError::WorkersGone)?;
        while self.in_flight < self.max_in_flight {
            match self.plan.next() {
                Some(job) => {
                    jobs.send(job).map_err(|_| LoaderError::WorkersGone)?;
                    self.in_flight += 1;
                }
                None => break,
            }
        }
        while let Ok(done) = self.done.try_recv() {
            self.keep(done)?;
        }
        let waiting = Instant::now();
        while !self.ready.contains_key(&self.next_iteration) {
            let done = self.done.recv().map_err(|_| LoaderError::WorkersGone)?;
            self.keep(done)?;
        }
        let waited = waiting.elapsed().as_secs_f64();
        self.in_flight -= 1;
        let out = self.ready.remove(&self.next_iteration).ok_or(LoaderError::WorkersGone)?;
        self.next_iteration += 1;
        Ok((out, waited))
    }

    /// Files a finished batch under its iteration; a worker's error stops
    /// the run at once, whatever its iteration.
    fn keep(&mut self, done: Done) -> Result<(), LoaderError> {
        let batch = done?;
        self.ready.insert(batch.iteration, batch);
        Ok(())
    }

    /// One non-blocking copy of the pinned pixels; per-image float views.
    fn upload(&self, host: HostBatch, ready_ahead: usize, waited: f64) -> Batch {
        let pixels = if self.device == Device::Cpu {
            host.pixels
        } else {
            host.pixels.to_device_(self.device, Kind::Uint8, true, false)
        };
        let mut offset = 0;
        let images = host
            .sizes
            .iter()
            .map(|&(h, w)| {
                let n = h * w * 3;
                let im = pixels.narrow(0, offset, n).view([h, w, 3]).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
                offset += n;
                im
            })
            .collect();
        Batch {
            iteration: host.iteration,
            image_ids: host.image_ids,
            images,
            targets: host.targets,
            times: host.times,
            ready_ahead,
            waited,
            global_sizes: host.global_sizes,
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the job channel ends the workers after their current batch.
        self.jobs = None;
        while self.done.try_recv().is_ok() {}
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    dataset: Arc<CocoDataset>,
    skipped: Arc<SkipLog>,
    options: LoaderOptions,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(planned) = job else { return };
        let result = load_batch(&dataset, &planned, &skipped, &options);
        if done.send(result).is_err() {
            return;
        }
    }
}

/// Reads, decodes, flips and collates one batch.
fn load_batch(
    dataset: &CocoDataset,
    planned: &PlannedBatch,
    skipped: &SkipLog,
    options: &LoaderOptions,
) -> Result<HostBatch, LoaderError> {
    let iteration = planned.iteration;
    let mut times = StageTimes::default();
    let mut decoded = Vec::with_capacity(planned.images.len());
    for &i in &planned.images {
        let record = &dataset.images[i];
        let path = dataset.image_path(record);
        let t0 = Instant::now();
        let image =
            RgbImage::open(&path, options.decode).and_then(|im| match im.size_mismatch(record.width, record.height) {
                None => Ok(im),
                Some(message) => Err(super::image::ImageError::Decode { path: path.clone(), message }),
            });
        times.decode += t0.elapsed().as_secs_f64() * 1e3;
        match image {
            Ok(mut image) => {
                let t1 = Instant::now();
                // One draw per (seed, iteration, image): the same flips
                // whatever thread loads the batch, and after a resume.
                let flip = Rng::derive(options.seed, iteration, record.id).chance(options.flip_prob);
                if flip {
                    hflip_image(&mut image);
                }
                let target = to_target(&record.instances, record.height, record.width, flip);
                times.augment += t1.elapsed().as_secs_f64() * 1e3;
                decoded.push((record.id, image, target));
            }
            Err(e) => {
                let message = e.to_string();
                if options.strict {
                    return Err(LoaderError::BadImage { id: record.id, path: path.display().to_string(), message });
                }
                skipped.record(record.id, &message);
            }
        }
    }
    let t2 = Instant::now();
    let total: usize = decoded.iter().map(|(_, im, _)| im.pixels.len()).sum();
    let pinned = options.device != Device::Cpu;
    let pixels = host_buffer(total as i64, pinned);
    {
        // SAFETY: `pixels` is a fresh contiguous uint8 CPU tensor of `total`
        // bytes that nothing else references yet.
        let dst = unsafe { std::slice::from_raw_parts_mut(pixels.data_ptr() as *mut u8, total) };
        let mut offset = 0;
        for (_, im, _) in &decoded {
            dst[offset..offset + im.pixels.len()].copy_from_slice(&im.pixels);
            offset += im.pixels.len();
        }
    }
    let mut image_ids = Vec::with_capacity(decoded.len());
    let mut sizes = Vec::with_capacity(decoded.len());
    let mut targets = Vec::with_capacity(decoded.len());
    for (id, im, target) in decoded {
        image_ids.push(id);
        sizes.push((i64::from(im.height), i64::from(im.width)));
        targets.push(if pinned { pin_target(target) } else { target });
    }
    times.collate += t2.elapsed().as_secs_f64() * 1e3;
    let global_sizes = planned
        .global
        .iter()
        .map(|&i| (i64::from(dataset.images[i].height), i64::from(dataset.images[i].width)))
        .collect();
    Ok(HostBatch { iteration, image_ids, pixels, sizes, targets, times, global_sizes })
}

/// A `[n]` uint8 CPU buffer, page-locked when it will be copied to a GPU
/// (allocated pinned: no extra copy).
fn host_buffer(n: i64, pinned: bool) -> Tensor {
    if pinned {
        if let Ok(t) = crate::shim::empty_pinned(n) {
            return t;
        }
    }
    Tensor::empty([n], (Kind::Uint8, Device::Cpu))
}

fn pin_target(t: Target) -> Target {
    use crate::shim::pinned;
    Target {
        boxes: pinned(&t.boxes),
        labels: pinned(&t.labels),
        masks: match t.masks {
            InstanceMasks::Bitmaps(m) => InstanceMasks::Bitmaps(pinned(&m)),
            p => p,
        },
        iscrowd: t.iscrowd.map(|c| pinned(&c)),
        has_mask: t.has_mask.map(|c| pinned(&c)),
    }
}
