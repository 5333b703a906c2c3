//! `maskrcnn bench`: inference, training-step and loader speed.

use crate::args::{parse_size, AmpArg, ConfigArgs, DeviceArg};
use anyhow::Result;
use clap::{Args, ValueEnum};
use maskrcnn::bench::infer::{run_infer_bench, InferBench};
use maskrcnn::Config;

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure.
    pub what: BenchWhat,
    /// Images per batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed iterations (after warm-up); bench data --iters 0 only loads the dataset.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Mixed precision on CUDA.
    #[arg(long, value_enum, default_value_t = AmpArg::Off)]
    pub amp: AmpArg,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Loader threads (bench data; default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Synthetic image sides for bench data when the config names no
    /// training set (`data.train_ann`).
    #[arg(long, value_name = "MIN,MAX", default_value = "800,1333", value_parser = parse_size)]
    pub size: (u32, u32),
    /// bench train: run one more step between cuProfilerStart and
    /// cuProfilerStop, for a profiler started with collection off
    /// (`ncu --profile-from-start off`, `nsys --capture-range=cudaProfilerApi`).
    #[arg(long)]
    pub profile_range: bool,
    /// bench train: batches from a dataset through the training loader — a
    /// folder as `maskrcnn synth` writes it (annotations/instances_train2017.json,
    /// train2017/), or `data` to use the config's data.train_ann — instead of
    /// the peer's synthetic batches.
    #[arg(long, value_name = "DIR|data")]
    pub data: Option<std::path::PathBuf>,
    /// bench infer: the RoI heads' score threshold (replaces
    /// `roi_heads.score_thresh`); 0, the peer's, keeps 100 detections per
    /// image; users typically run 0.05.
    #[arg(long, default_value_t = 0.0)]
    pub score_thresh: f64,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BenchWhat {
    /// Inference: images to detections with pasted masks.
    Infer,
    /// The training data loader alone: read, decode, flip, collate, copy.
    Data,
    /// Training steps (forward, backward, SGD) on synthetic COCO-sized batches.
    Train,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = args.device.resolve()?;
    match args.what {
        BenchWhat::Infer => {
            let mut config = args.config.resolve()?;
            let t = args.score_thresh;
            anyhow::ensure!((0.0..=1.0).contains(&t), "--score-thresh must be in 0..=1, got {t}");
            config.roi_heads.score_thresh = t;
            let opts = InferBench {
                batch: args.batch.max(1),
                iters: args.iters.max(1),
                warmup: 5,
                amp: args.amp.into(),
                device,
                config,
            };
            let r = run_infer_bench(&opts)?;
            report(&r, args.json)?;
        }
        BenchWhat::Train => {
            let mut config = args.config.resolve()?;
            let data = match &args.data {
                None => None,
                Some(dir) => {
                    if dir.as_os_str() != "data" {
                        config.data.train_ann = dir.join("annotations/instances_train2017.json").display().to_string();
                        config.data.train_images = dir.join("train2017").display().to_string();
                    }
                    anyhow::ensure!(
                        !config.data.train_ann.is_empty(),
                        "--data data: the config names no data.train_ann"
                    );
                    let (dataset, _) = bench_dataset(&config, args.size, 0)?;
                    // The model's classes follow the data, as in training.
                    if config.model.num_classes == maskrcnn::config::AutoCount::Auto {
                        config.model.num_classes = maskrcnn::config::AutoCount::Fixed(dataset.num_classes());
                    }
                    Some(std::sync::Arc::new(dataset))
                }
            };
            let opts = maskrcnn::bench::train::TrainBench {
                batch: args.batch.max(1),
                iters: args.iters.max(1),
                warmup: 8,
                amp: args.amp.into(),
                channels_last: config.precision.channels_last,
                device,
                config,
                profile_range: args.profile_range,
                data,
            };
            let r = maskrcnn::bench::train::run_train_bench(&opts)?;
            report(&r, args.json)?;
        }
        BenchWhat::Data => {
            let config = args.config.resolve()?;
            let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let max = maskrcnn::config::MAX_LOADER_WORKERS;
            anyhow::ensure!((1..=max).contains(&workers), "--workers must be in 1..={max}, got {workers}");
            let batch = args.batch.max(1);
            // Enough distinct images that each worker decodes different files.
            let (dataset, _guard) = bench_dataset(&config, args.size, (2 * batch * workers).clamp(16, 256))?;
            if args.iters == 0 {
                return Ok(()); // load only
            }
            let opts = maskrcnn::bench::data::DataBench {
                batch,
                iters: args.iters.max(1),
                workers,
                prefetch: config.dataloader.prefetch,
                flip_prob: config.input.flip_prob,
                device,
                decode: maskrcnn::data::image::DecodeOptions::of(&config.input),
            };
            let r = maskrcnn::bench::data::run_data_bench(std::sync::Arc::new(dataset), &opts)?;
            report(&r, args.json)?;
        }
    }
    Ok(())
}

/// The configured training set, or a synthetic one written to a temporary
/// folder (kept alive by the returned guard).
fn bench_dataset(
    config: &Config,
    size: (u32, u32),
    images: usize,
) -> Result<(maskrcnn::data::CocoDataset, Option<tempfile::TempDir>)> {
    let options = maskrcnn::data::LoadOptions { drop_empty: true, ..Default::default() };
    if !config.data.train_ann.is_empty() {
        let t = std::time::Instant::now();
        let d = maskrcnn::data::CocoDataset::load(
            config.data.train_ann.as_ref(),
            config.data.train_images.as_ref(),
            options,
        )?;
        eprintln!(
            "loaded {}: {} training images, {} instances, {} skipped annotation(s) in {:.2} s (peak RSS {})",
            config.data.train_ann,
            d.images.len(),
            d.images.iter().map(|r| r.instances.len()).sum::<usize>(),
            d.skipped.len(),
            t.elapsed().as_secs_f64(),
            maskrcnn::environment::peak_rss()
                .map_or("unknown".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)),
        );
        return Ok((d, None));
    }
    let dir = tempfile::Builder::new().prefix("maskrcnn-bench-data-").tempdir()?;
    eprintln!("generating {images} synthetic images ({}..={} px sides) in {}", size.0, size.1, dir.path().display());
    let out = maskrcnn::data::synth::generate(&maskrcnn::data::synth::SynthOptions {
        out: dir.path().to_path_buf(),
        train: images,
        val: 0,
        seed: 0,
        size,
        annotations_only: false,
        profile: Default::default(),
    })?;
    let d = maskrcnn::data::CocoDataset::load(&out.train_ann, &out.train_images, options)?;
    Ok((d, Some(dir)))
}

/// A benchmark's result: one JSON line with `json`, else its text.
fn report<R: serde::Serialize + std::fmt::Display>(result: &R, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(result)?);
    } else {
        print!("{result}");
    }
    Ok(())
}
