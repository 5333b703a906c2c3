//! The `maskrcnn` command line: the commands and their dispatch here, each
//! command's arguments and work in its own module, the arguments several
//! commands share in `args`.
//!
//! Every error ends the process with one line on stderr and a non-zero exit
//! code: 2 for a malformed command line, 1 for everything else.

mod args;
mod bench;
mod eval;
mod launch;
mod predict;
mod synth;
mod train;

use clap::{Parser, Subcommand};
use maskrcnn::environment::EnvReport;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "maskrcnn", version, about = "Mask R-CNN instance segmentation: training, evaluation, inference")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Print the resolved configuration as TOML (loads back with --config).
    Config(args::ConfigArgs),
    /// Print versions, CUDA and cuDNN status, devices and threads.
    Env,
    /// Detect and segment objects in images.
    Predict(predict::PredictArgs),
    /// Measure speed on synthetic data shaped like COCO.
    Bench(bench::BenchArgs),
    /// COCO evaluation (bbox, and segm when there are masks) of a results file,
    /// or of a model run over the dataset's images.
    Eval(eval::EvalArgs),
    /// Generate a synthetic COCO-format dataset of shapes (JPEGs + instances JSON).
    Synth(synth::SynthArgs),
    /// Train on data.train_ann/data.train_images; checkpoints, logs and metrics in --output.
    Train(train::TrainArgs),
    /// Train on several GPUs: one `train` process per GPU, gradients all-reduced over NCCL.
    Launch(launch::LaunchArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config(args) => {
            let config = args.resolve()?;
            print!("{}", config.to_toml());
            // What the automatic settings come to here, as TOML comments
            // (the output still loads back with --config).
            let device = tch::Device::cuda_if_available();
            let settings = maskrcnn::engine::trainer::resolved_settings(&config, device);
            println!("\n# Resolved for training here:");
            let width = settings.iter().map(|(k, v, _)| k.len() + v.len()).max().unwrap_or(0) + 3;
            for (key, value, why) in settings {
                let kv = format!("{key} = {value}");
                println!("# {kv:<width$} ({why})");
            }
        }
        Command::Env => {
            let report = EnvReport::collect();
            println!("{report}");
        }
        Command::Predict(args) => predict::run(args)?,
        Command::Bench(args) => bench::run(args)?,
        Command::Eval(args) => eval::run(args)?,
        Command::Synth(args) => synth::run(args)?,
        Command::Train(args) => train::run(args)?,
        Command::Launch(args) => launch::run(args)?,
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
