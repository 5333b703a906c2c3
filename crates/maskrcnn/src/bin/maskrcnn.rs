//! The `maskrcnn` command line (DESIGN.md, "CLI contract").
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
    /// Timed iterations (after warm-up).
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
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchWhat {
    /// Inference: images to detections with pasted masks.
    Infer,
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
    }
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
            maskrcnn::engine::predictor::write_json_atomic(&out, &dets)?;
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
        maskrcnn::engine::predictor::write_json_atomic(path, &metrics)?;
    }
    Ok(())
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
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid command line");
            eprintln!("{first} (see `maskrcnn --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the error chain on one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
