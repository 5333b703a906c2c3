//! `maskrcnn launch`: one `train` process per GPU (or CPU rank) of this
//! node, with torchrun's environment and flags (`--nnodes`, `--node-rank`,
//! `--master-addr`, `--master-port`, `--rdzv-id`).

use crate::{Cli, Command};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser};

#[derive(Args)]
pub struct LaunchArgs {
    /// Processes to start: one per GPU, cuda:0..N-1 (with `train --device
    /// cpu`: CPU processes, summing over TCP).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: usize,
    /// Nodes (machines) taking part; each runs this command with its own
    /// --node-rank.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes (node 0 hosts rank 0 and the rendezvous).
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, where every rank meets.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port at --master-addr (default on one node: a free one;
    /// several nodes must name the same port).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// Identifies this run across nodes (default: derived from the
    /// rendezvous address); ranks of another run are refused.
    #[arg(long, value_name = "ID")]
    pub rdzv_id: Option<String>,
    /// `auto`: each rank runs on its own contiguous share of this node's
    /// CPUs (loader workers and libtorch threads of one rank stay off the
    /// others' cores); `none`: the ranks share every CPU.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "none"])]
    pub cpu_affinity: String,
    /// `train` and its arguments, as for `maskrcnn train`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "train ARGS")]
    pub command: Vec<std::ffi::OsString>,
}

pub fn run(args: LaunchArgs) -> Result<()> {
    use maskrcnn::distributed::launcher::{
        allowed_cpus, cpu_share, free_port, pin_to, rank_env, run_ranks, shared_run_id, RankPlace,
    };
    use std::sync::atomic::{AtomicBool, Ordering};
    let n = args.nproc_per_node;
    if args.command.first().map(|c| c != "train").unwrap_or(true) {
        bail!("launch runs `train`: maskrcnn launch --nproc-per-node N train [ARGS]...");
    }
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    if args.nnodes == 0 || args.node_rank >= args.nnodes {
        bail!("--node-rank {} is not in 0..--nnodes ({})", args.node_rank, args.nnodes);
    }
    if args.nnodes > 1 && args.master_port.is_none() {
        bail!("--nnodes {}: every node needs the same --master-port", args.nnodes);
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
    // One id per run, shared by its ranks: random for a single node, the
    // same on every node of a multi-node run.
    let run_id = if args.nnodes > 1 || args.rdzv_id.is_some() {
        shared_run_id(args.rdzv_id.as_deref(), &args.master_addr, port)
    } else {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32
    };
    let kind = if on_cpu { "CPU processes" } else { "GPUs" };
    let (nodes, node) = (args.nnodes, args.node_rank);
    let first = node * n;
    eprintln!(
        "launch: node {node} of {nodes}, ranks {first}..{} of {} ({kind}), rendezvous {}:{port}",
        first + n - 1,
        nodes * n,
        args.master_addr
    );
    let cpus = if args.cpu_affinity == "auto" { allowed_cpus() } else { Vec::new() };
    if cpu_share(&cpus, 0, n).is_empty() {
        eprintln!("launch: ranks share every CPU");
    } else {
        let spans: Vec<String> = (0..n)
            .map(|i| {
                let share = cpu_share(&cpus, i, n);
                format!("rank {}: CPUs {}-{}", first + i, share[0], share[share.len() - 1])
            })
            .collect();
        eprintln!("launch: {} (--cpu-affinity none to share them)", spans.join(", "));
    }
    run_ranks(
        first..first + n,
        |rank| {
            let place = RankPlace::of(node, nodes, n, rank - first);
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(&args.command).envs(rank_env(place, &args.master_addr, port, run_id));
            pin_to(&mut cmd, cpu_share(&cpus, rank - first, n));
            cmd
        },
        interrupt,
    )?;
    Ok(())
}
