//! Arguments several commands share: the device, the configuration layers,
//! the mixed-precision choice, image side ranges.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use maskrcnn::config::AmpMode;
use maskrcnn::Config;
use std::path::PathBuf;
use tch::Device;

#[derive(Clone, Copy, ValueEnum)]
pub enum AmpArg {
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
pub struct DeviceArg {
    /// cpu or cuda (default: cuda when available).
    #[arg(long, value_name = "cpu|cuda")]
    pub device: Option<String>,
}

impl DeviceArg {
    pub fn resolve(&self) -> Result<Device> {
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
pub struct ConfigArgs {
    /// TOML file overriding the defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set solver.base_lr=0.01 (repeatable; applied after --config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    pub fn resolve(&self) -> Result<Config> {
        Ok(Config::load(self.config.as_deref(), &self.set)?)
    }
}

/// `MIN,MAX` pixels.
pub fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let parts: Vec<&str> = s.split(',').collect();
    match parts[..] {
        [a, b] => match (a.trim().parse(), b.trim().parse()) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            _ => Err(format!("expected MIN,MAX in pixels, got `{s}`")),
        },
        _ => Err(format!("expected MIN,MAX in pixels, got `{s}`")),
    }
}
