//! The `maskrcnn` command line (docs/ARCHITECTURE.md lists the commands and what they write).
//!
//! Every error ends the process with one line on stderr and a non-zero exit
//! code: 2 for a malformed command line, 1 for everything else.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use maskrcnn::config::AmpMode;
use maskrcnn::engine::bench::{run_infer_bench, InferBench};
use maskrcnn::engine::predictor::{predict_files, PredictOptions};
use maskrcnn::environment::EnvReport;
use maskrcnn::{Config, MaskRcnn};
use std::path::PathBuf;
use std::process::ExitCode;
use tch::Device;

#[derive(Parser)]
#[command(name = "maskrcnn", version, about = "Mask R-CNN instance segmentation: training, evaluation, inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the resolved configuration as TOML (loads back with --config).
    Config(ConfigArgs),
    /// Print versions, CUDA and cuDNN status, devices and threads.
    Env,
    /// Detect and segment objects in images.
    Predict(PredictArgs),
    /// Measure speed on synthetic data shaped like COCO.
    Bench(BenchArgs),
    /// COCO evaluation (bbox, and segm when there are masks) of a results file,
    /// or of a model run over the dataset's images.
    Eval(EvalArgs),
    /// Generate a synthetic COCO-format dataset of shapes (JPEGs + instances JSON).
    Synth(SynthArgs),
    /// Train on data.train_ann/data.train_images; checkpoints, logs and metrics in --output.
    Train(TrainArgs),
    /// Train on several GPUs: one `train` process per GPU, gradients all-reduced over NCCL.
    Launch(LaunchArgs),
}

#[derive(Args)]
struct LaunchArgs {
    /// Processes to start: one per GPU, cuda:0..N-1 (with `train --device
    /// cpu`: CPU processes, summing over TCP).
    #[arg(long, value_name = "N")]
    nproc_per_node: usize,
    /// Rendezvous port on 127.0.0.1 (default: a free one).
    #[arg(long, value_name = "PORT")]
    master_port: Option<u16>,
    /// `train` and its arguments, as for `maskrcnn train`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "train ARGS")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Output directory: config, metrics.jsonl, checkpoints/, model_final.safetensors, eval/.
    #[arg(long, value_name = "DIR", default_value = "output")]
    output: PathBuf,
    /// Continue from the newest checkpoint in --output.
    #[arg(long)]
    resume: bool,
    /// Replace a previous run in --output (its logs, checkpoints and
    /// weights are removed first); without it such a folder is refused.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// A bad annotation or image stops training instead of being skipped.
    #[arg(long)]
    strict: bool,
    /// Run iteration N between cuProfilerStart and cuProfilerStop, for a
    /// profiler started with collection off (`ncu --profile-from-start off`).
    #[arg(long, value_name = "N")]
    profile_iter: Option<u64>,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct SynthArgs {
    /// Output folder: train2017/, val2017/, annotations/instances_{train,val}2017.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Training images.
    #[arg(long, default_value_t = 200)]
    train: usize,
    /// Validation images.
    #[arg(long, default_value_t = 50)]
    val: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Each image side is drawn from MIN..=MAX pixels.
    #[arg(long, value_name = "MIN,MAX", default_value = "320,480", value_parser = parse_size)]
    size: (u32, u32),
    /// Write only the annotation files (no images, no occlusion): to test
    /// annotation loading at COCO scale.
    #[arg(long)]
    annotations_only: bool,
}

fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let parts: Vec<&str> = s.split(',').collect();
    match parts[..] {
        [a, b] => match (a.trim().parse(), b.trim().parse()) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            _ => Err(format!("expected MIN,MAX in pixels, got `{s}`")),
        },
        _ => Err(format!("expected MIN,MAX in pixels, got `{s}`")),
    }
}

#[derive(Args)]
struct EvalArgs {
    /// Ground truth: a COCO instances JSON.
    #[arg(long, value_name = "GT.json")]
    ann: PathBuf,
    /// Detections in the COCO results format (instead of running a model).
    #[arg(long, value_name = "DETS.json", conflicts_with_all = ["weights", "images", "out"])]
    results: Option<PathBuf>,
    /// Model weights to run over the dataset (with --images).
    #[arg(long, value_name = "FILE", requires = "images")]
    weights: Option<PathBuf>,
    /// Folder holding the dataset's images (with --weights).
    #[arg(long, value_name = "DIR", requires = "weights")]
    images: Option<PathBuf>,
    /// Where the model's detections are written (default: detections.json).
    #[arg(long, value_name = "DETS.json")]
    out: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    device: DeviceArg,
    /// Also write the numbers as JSON here.
    #[arg(long, value_name = "OUT.json")]
    metrics: Option<PathBuf>,
}

#[derive(Args)]
struct PredictArgs {
    /// Model weights (safetensors with torchvision's names).
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    device: DeviceArg,
    /// Write COCO-style results (boxes xywh, compressed RLE masks) here.
    #[arg(long, value_name = "OUT.json")]
    json: Option<PathBuf>,
    /// Write one annotated PNG per image into this folder.
    #[arg(long, value_name = "DIR")]
    draw: Option<PathBuf>,
    /// Minimum score of the detections drawn.
    #[arg(long, default_value_t = 0.5, value_name = "SCORE")]
    draw_thresh: f64,
    /// Images (JPEG or PNG).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure.
    what: BenchWhat,
    /// Images per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed iterations (after warm-up); bench data --iters 0 only loads the dataset.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Mixed precision on CUDA.
    #[arg(long, value_enum, default_value_t = AmpArg::Off)]
    amp: AmpArg,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
    /// Loader threads (bench data; default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Synthetic image sides for bench data when the config names no
    /// training set (`data.train_ann`).
    #[arg(long, value_name = "MIN,MAX", default_value = "800,1333", value_parser = parse_size)]
    size: (u32, u32),
    /// bench train: run one more step between cuProfilerStart and
    /// cuProfilerStop, for a profiler started with collection off
    /// (`ncu --profile-from-start off`, `nsys --capture-range=cudaProfilerApi`).
    #[arg(long)]
    profile_range: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchWhat {
    /// Inference: images to detections with pasted masks.
    Infer,
    /// The training data loader alone: read, decode, flip, collate, copy.
    Data,
    /// Training steps (forward, backward, SGD) on synthetic COCO-sized batches.
    Train,
}

#[derive(Clone, Copy, ValueEnum)]
enum AmpArg {
    Off,
    Fp16,
    Bf16,
}

impl From<AmpArg> for AmpMode {
    fn from(a: AmpArg) -> AmpMode {
        match a {
            AmpArg::Off => AmpMode::Off,
            AmpArg::Fp16 => AmpMode::Fp16,
            AmpArg::Bf16 => AmpMode::Bf16,
        }
    }
}

#[derive(Args)]
struct DeviceArg {
    /// cpu or cuda (default: cuda when available).
    #[arg(long, value_name = "cpu|cuda")]
    device: Option<String>,
}

impl DeviceArg {
    fn resolve(&self) -> Result<Device> {
        match self.device.as_deref() {
            None => Ok(Device::cuda_if_available()),
            Some("cpu") => Ok(Device::Cpu),
            Some("cuda") if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Some("cuda") => bail!("--device cuda: no CUDA device is available (see `maskrcnn env`)"),
            Some(d) if d.starts_with("cuda:") => {
                let i: usize = d[5..].parse().with_context(|| format!("--device {d}: bad device index"))?;
                if (i as i64) < tch::Cuda::device_count() {
                    Ok(Device::Cuda(i))
                } else {
                    bail!("--device {d}: only {} CUDA devices", tch::Cuda::device_count())
                }
            }
            Some(d) => bail!("--device {d}: expected cpu, cuda or cuda:N"),
        }
    }
}

/// The configuration layers every model-running command accepts.
#[derive(Args)]
struct ConfigArgs {
    /// TOML file overriding the defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one key, e.g. --set solver.base_lr=0.01 (repeatable; applied after --config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn resolve(&self) -> Result<Config> {
        Ok(Config::load(self.config.as_deref(), &self.set)?)
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Config(args) => {
            let config = args.resolve()?;
            print!("{}", config.to_toml());
        }
        Command::Env => {
            let report = EnvReport::collect();
            println!("{report}");
        }
        Command::Predict(args) => predict(args)?,
        Command::Bench(args) => bench(args)?,
        Command::Eval(args) => eval(args)?,
        Command::Synth(args) => synth(args)?,
        Command::Train(args) => train(args)?,
        Command::Launch(args) => launch(args)?,
    }
    Ok(())
}

fn launch(args: LaunchArgs) -> Result<()> {
    use maskrcnn::engine::launcher::{free_port, rank_env, run_ranks};
    use std::sync::atomic::{AtomicBool, Ordering};
    let n = args.nproc_per_node;
    if args.command.first().map(|c| c != "train").unwrap_or(true) {
        bail!("launch runs `train`: maskrcnn launch --nproc-per-node N train [ARGS]...");
    }
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    // The ranks' arguments, parsed and their config resolved here once: a
    // mistake is one error before anything starts, not one per rank.
    let argv = std::iter::once(std::ffi::OsString::from("maskrcnn")).chain(args.command.iter().cloned());
    let train_args = match Cli::try_parse_from(argv) {
        Ok(Cli { command: Command::Train(t) }) => t,
        Ok(_) => bail!("launch runs `train`: maskrcnn launch --nproc-per-node N train [ARGS]..."),
        Err(e) if !e.use_stderr() => {
            // train --help
            e.print()?;
            return Ok(());
        }
        Err(e) => {
            let text = e.render().to_string();
            bail!("launch: {}", text.lines().next().unwrap_or("invalid train arguments").trim_start_matches("error: "))
        }
    };
    train_args.config.resolve()?;
    // `train --device cpu` ranks sum over TCP; otherwise each needs a GPU.
    let on_cpu = train_args.device.device.as_deref() == Some("cpu");
    let gpus = tch::Cuda::device_count() as usize;
    if n > gpus && !on_cpu {
        bail!("--nproc-per-node {n} needs {n} CUDA devices; this machine has {gpus} (or train with --device cpu)");
    }
    let port = match args.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let exe = std::env::current_exe().context("cannot find the maskrcnn executable")?;
    let interrupt = std::sync::Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if !flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopping every rank after this iteration");
        }
    })
    .context("cannot install the Ctrl-C handler")?;
    // One id per launch, shared by its ranks.
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32;
    let place = if on_cpu { "CPU processes" } else { "GPUs" };
    eprintln!("launch: {n} ranks ({place}), rendezvous 127.0.0.1:{port}");
    run_ranks(
        n,
        |rank| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(&args.command).envs(rank_env(rank, n, port, run_id));
            cmd
        },
        interrupt,
    )?;
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let results = match (&args.results, &args.weights, &args.images) {
        (Some(r), _, _) => r.clone(),
        (None, Some(weights), Some(images)) => {
            let config = args.config.resolve()?;
            let device = args.device.resolve()?;
            maskrcnn::shim::set_tf32(config.precision.tf32);
            let model = MaskRcnn::from_weights(&config, weights, device)?;
            let dets = maskrcnn::evaluation::dataset_inference::infer_dataset(&model, &args.ann, images)?;
            let out = args.out.clone().unwrap_or_else(|| PathBuf::from("detections.json"));
            maskrcnn::io::write_json_atomic(&out, &dets)?;
            eprintln!("{} detections written to {}", dets.len(), out.display());
            out
        }
        _ => bail!("eval needs --results DETS.json, or --weights W and --images DIR"),
    };
    let metrics = maskrcnn::evaluation::coco_eval::evaluate_files(&args.ann, &results)?;
    for (name, m) in [("bbox", Some(&metrics.bbox)), ("segm", metrics.segm.as_ref())] {
        if let Some(m) = m {
            println!("IoU type: {name}");
            for line in &m.summary {
                println!("{line}");
            }
        }
    }
    if let Some(path) = &args.metrics {
        maskrcnn::io::write_json_atomic(path, &metrics)?;
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    use std::io::IsTerminal;
    use std::sync::atomic::{AtomicBool, Ordering};
    let config = args.config.resolve()?;
    let device = args.device.resolve()?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // First Ctrl-C or SIGTERM (how `timeout`, `kill`, Slurm and Kubernetes
    // stop a job): checkpoint after the current step and exit; second: now.
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this iteration (Ctrl-C again to abort without a checkpoint)");
    })
    .context("cannot install the Ctrl-C handler")?;
    let opts = maskrcnn::engine::trainer::TrainOptions {
        output: args.output.clone(),
        resume: args.resume,
        overwrite: args.overwrite,
        device,
        stop,
        progress: std::io::stderr().is_terminal(),
        strict: args.strict,
        profile_iteration: args.profile_iter,
    };
    let s = maskrcnn::engine::trainer::train(&config, &opts)?;
    if s.rank != 0 {
        // Under `launch`, rank 0 reports for the group.
        return Ok(());
    }
    maskrcnn::io::write_json_atomic(&args.output.join("summary.json"), &s)?;
    println!("{:<22} {} -> {}", "iterations", s.start_iteration, s.iterations);
    println!("{:<22} {:.1} s ({:.1} img/s)", "time", s.seconds, s.images_per_s);
    for (name, v) in &s.final_losses {
        println!("{name:<22} {v:.4}");
    }
    if let Some(scale) = s.loss_scale {
        println!("{:<22} {scale:.0} ({:.0} skipped steps)", "loss scale", s.skipped_steps);
    }
    for e in &s.evals {
        println!(
            "{:<22} bbox AP {:.4}  segm AP {:.4}  ({:.0} s)",
            format!("eval @ {}", e.iteration),
            e.bbox_ap,
            e.segm_ap,
            e.seconds
        );
    }
    if s.skipped_images > 0 {
        println!("{:<22} {}", "unreadable images", s.skipped_images);
    }
    if let Some(weights) = &s.weights {
        println!("{:<22} {}", "weights", weights.display());
    }
    if s.interrupted {
        println!(
            "interrupted: checkpoint written, no model_final; continue with --resume --output {}",
            args.output.display()
        );
    } else if s.stopped_early {
        println!("stopped early: target accuracy reached");
    }
    Ok(())
}

fn synth(args: SynthArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let out = maskrcnn::data::synth::generate(&maskrcnn::data::synth::SynthOptions {
        out: args.out.clone(),
        train: args.train,
        val: args.val,
        seed: args.seed,
        size: args.size,
        annotations_only: args.annotations_only,
    })?;
    eprintln!(
        "{} train + {} val images, {} annotations in {:.1} s: {} {}",
        args.train,
        args.val,
        out.annotations,
        t.elapsed().as_secs_f64(),
        out.train_ann.display(),
        out.val_ann.display()
    );
    println!(
        "--set data.train_ann='{}' --set data.train_images='{}' --set data.val_ann='{}' --set data.val_images='{}' --set model.num_classes={}",
        out.train_ann.display(),
        out.train_images.display(),
        out.val_ann.display(),
        out.val_images.display(),
        maskrcnn::data::synth::CATEGORIES.len() + 1
    );
    Ok(())
}

/// The configured training set, or a synthetic one written to a temporary
/// folder (kept alive by the returned guard).
fn bench_dataset(
    config: &Config,
    size: (u32, u32),
    images: usize,
) -> Result<(maskrcnn::data::CocoDataset, Option<TempDir>)> {
    let options = maskrcnn::data::LoadOptions { drop_empty: true, strict: false };
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
    let dir = TempDir::new("maskrcnn-bench-data")?;
    eprintln!("generating {images} synthetic images ({}..={} px sides) in {}", size.0, size.1, dir.0.display());
    let out = maskrcnn::data::synth::generate(&maskrcnn::data::synth::SynthOptions {
        out: dir.0.clone(),
        train: images,
        val: 0,
        seed: 0,
        size,
        annotations_only: false,
    })?;
    let d = maskrcnn::data::CocoDataset::load(&out.train_ann, &out.train_images, options)?;
    Ok((d, Some(dir)))
}

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn predict(args: PredictArgs) -> Result<()> {
    let config = args.config.resolve()?;
    let device = args.device.resolve()?;
    maskrcnn::shim::set_tf32(config.precision.tf32);
    let model = MaskRcnn::from_weights(&config, &args.weights, device)?;
    let opts = PredictOptions { json: args.json.clone(), draw: args.draw.clone(), draw_thresh: args.draw_thresh };
    let summary = predict_files(&model, &args.images, &opts)?;
    eprintln!(
        "predicted {} image(s), {} detection(s){}{}",
        summary.images,
        summary.detections,
        args.json.as_ref().map(|p| format!(", results in {}", p.display())).unwrap_or_default(),
        args.draw.as_ref().map(|p| format!(", drawings in {}", p.display())).unwrap_or_default(),
    );
    if !summary.failed.is_empty() {
        bail!(
            "{} of {} image(s) could not be read: {}",
            summary.failed.len(),
            args.images.len(),
            summary.failed.join("; ")
        );
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let device = args.device.resolve()?;
    match args.what {
        BenchWhat::Infer => {
            let opts = InferBench {
                batch: args.batch.max(1),
                iters: args.iters.max(1),
                warmup: 5,
                amp: args.amp.into(),
                device,
            };
            let r = run_infer_bench(&opts)?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "infer bs={} amp={} on {}: {:.2} img/s (median batch {:.4} s, p90 {:.4} s, {:.0} detections/img)",
                    r.bs, r.amp, r.device, r.img_per_s, r.med_batch_s, r.p90_s, r.dets_per_img
                );
                for (stage, ms) in &r.stages_ms {
                    println!("  {stage:<22} {ms:>9.2} ms");
                }
            }
        }
        BenchWhat::Train => {
            let config = args.config.resolve()?;
            let opts = maskrcnn::engine::train_bench::TrainBench {
                batch: args.batch.max(1),
                iters: args.iters.max(1),
                warmup: 8,
                amp: args.amp.into(),
                channels_last: config.precision.channels_last,
                device,
                profile_range: args.profile_range,
            };
            let r = maskrcnn::engine::train_bench::run_train_bench(&opts)?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "train bs={} amp={} channels_last={} on {}: {:.2} img/s (median step {:.4} s, peak memory {:.2} GiB)",
                    r.bs, r.amp, r.channels_last, r.device, r.img_per_s, r.med_step_s, r.peak_mem_gib
                );
                println!(
                    "  forward {:.1} ms, backward {:.1} ms, update {:.1} ms (synchronized between phases)",
                    r.split_ms[0], r.split_ms[1], r.split_ms[2]
                );
                let gpu = r.gpu_ms.map_or("n/a".to_string(), |g| format!("{g:.1} ms"));
                println!("  {} device→host syncs per step; GPU time per step (queued ahead) {gpu}", r.syncs_per_step);
                let host: Vec<String> = r.host_split_ms.iter().map(|(s, ms)| format!("{s} {ms:.1}")).collect();
                println!("  host ms per stage: {}", host.join(", "));
            }
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
            let opts = maskrcnn::engine::data_bench::DataBench {
                batch,
                iters: args.iters.max(1),
                workers,
                prefetch: config.dataloader.prefetch,
                flip_prob: config.input.flip_prob,
                device,
                max_image_pixels: config.input.max_image_pixels,
            };
            let r = maskrcnn::engine::data_bench::run_data_bench(std::sync::Arc::new(dataset), &opts)?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "data bs={} workers={} to {}: {:.1} img/s ({} images, {:.2} MP/img)",
                    r.bs, r.workers, r.device, r.img_per_s, r.images, r.megapixels_per_img
                );
                println!(
                    "  per image on one worker: decode {:.2} ms, augment {:.2} ms, collate {:.2} ms",
                    r.decode_ms, r.augment_ms, r.collate_ms
                );
                println!("  main thread waiting for the host->device copy: {:.3} ms/img", r.transfer_ms);
                if r.skipped_images > 0 {
                    println!("  {} image(s) skipped (unreadable)", r.skipped_images);
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to files stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message up to its usage block, on one line (a missing
            // argument is named on the line after "not provided:").
            let text = e.render().to_string();
            let message: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            let first = if message.is_empty() { "error: invalid command line".to_string() } else { message.join(" ") };
            eprintln!("{first} (see `maskrcnn --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error chain on one line, each cause once.
            eprintln!("error: {}", maskrcnn::text::error_chain_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
