//! `maskrcnn train`: one training process (under `launch`, one rank).

use crate::args::{ConfigArgs, DeviceArg};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Output directory: config, metrics.jsonl, checkpoints/, model_final.safetensors, eval/.
    #[arg(long, value_name = "DIR", default_value = "output")]
    pub output: PathBuf,
    /// Continue from the newest checkpoint in --output.
    #[arg(long)]
    pub resume: bool,
    /// Replace a previous run in --output (its logs, checkpoints and
    /// weights are removed first); without it such a folder is refused.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// A bad annotation or image stops training instead of being skipped.
    #[arg(long)]
    pub strict: bool,
    /// Run iteration N between cuProfilerStart and cuProfilerStop, for a
    /// profiler started with collection off (`ncu --profile-from-start off`).
    #[arg(long, value_name = "N")]
    pub profile_iter: Option<u64>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: TrainArgs) -> Result<()> {
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
    print!("{s}");
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
