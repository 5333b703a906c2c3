//! The `maskrcnn` command line (DESIGN.md, "CLI contract").
//!
//! Every error ends the process with one line on stderr and a non-zero exit
//! code: 2 for a malformed command line, 1 for everything else.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use maskrcnn::environment::EnvReport;
use maskrcnn::Config;
use std::path::PathBuf;
use std::process::ExitCode;

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
