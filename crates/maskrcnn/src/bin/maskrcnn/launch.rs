//! `maskrcnn launch`: one `train` process per GPU (or CPU rank), with
//! torchrun's environment.

use crate::{Cli, Command};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser};

#[derive(Args)]
pub struct LaunchArgs {
    /// Processes to start: one per GPU, cuda:0..N-1 (with `train --device
    /// cpu`: CPU processes, summing over TCP).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: usize,
    /// Rendezvous port on 127.0.0.1 (default: a free one).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// `train` and its arguments, as for `maskrcnn train`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "train ARGS")]
    pub command: Vec<std::ffi::OsString>,
}

pub fn run(args: LaunchArgs) -> Result<()> {
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
