//! Every knob of training and inference, with the defaults of the R50-FPN
//! recipe: the seed's (NVIDIA maskrcnn_benchmark) values where torchvision 0.26
//! agrees, torchvision's where they differ (the seed's choice stays reachable as
//! an option, e.g. `input.pixel_format = "bgr255"`).
//!
//! A config is resolved in three layers: the defaults (each section's
//! `Default`, one file per section), then a TOML file
//! (`--config F`), then `--set section.key=value` overrides. Each layer is
//! checked key by key against the defaults' shape, so an unknown key or a value
//! of the wrong type is reported with its full path and the closest valid keys,
//! and the result is validated as a whole ([`Config::validate`]).
//! [`Config::to_toml`] prints a resolved config that loads back unchanged.

mod data;
mod error;
mod heads;
mod input;
mod model;
mod overlay;
mod precision;
mod solver;

pub use data::{DataConfig, DataLoaderConfig, TestConfig, MAX_LOADER_WORKERS};
pub use error::ConfigError;
pub use heads::{RoiHeadsConfig, RpnConfig, TopNScope};
pub use input::{InputConfig, PixelFormat, DEFAULT_MAX_IMAGE_PIXELS};
pub use model::{AutoCount, BoxHeadKind, FpnNorm, HeadNorm, MaskOn, ModelConfig, NormKind, COCO_NUM_CLASSES};
pub use precision::{AmpMode, PrecisionConfig};
pub use solver::{SolverConfig, WarmupMethod};

use crate::text::one_line;
use overlay::{collect_keys, describe_serde_error, nest, overlay, parse_override};
use serde::{Deserialize, Serialize};
use std::path::Path;
use toml::Value;

/// The whole resolved configuration; see the module docs for how it is built.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Seed of every random choice (init, sampling, augmentation, shuffling).
    pub seed: u64,
    pub model: ModelConfig,
    pub input: InputConfig,
    pub rpn: RpnConfig,
    pub roi_heads: RoiHeadsConfig,
    pub solver: SolverConfig,
    pub precision: PrecisionConfig,
    pub dataloader: DataLoaderConfig,
    pub test: TestConfig,
    pub data: DataConfig,
}

impl Config {
    /// Resolves defaults, then `file` (TOML) if given, then each `key=value`
    /// of `overrides` in order, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let defaults = Value::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid { key: "<defaults>".into(), message: e.to_string() })?;
        let mut merged = defaults.clone();
        let keys = Config::keys();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_path_buf(),
                message: one_line(&e.to_string()),
            })?;
            let origin = format!("config file {}", path.display());
            overlay(&mut merged, &defaults, Value::Table(table), "", &origin, &keys)?;
        }
        for item in overrides {
            let (key, value) = parse_override(item)?;
            let origin = format!("--set {item}");
            let nested = nest(&key, value);
            overlay(&mut merged, &defaults, nested, "", &origin, &keys)?;
        }
        let config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            let message = describe_serde_error(&e.into_inner().to_string(), &key);
            ConfigError::Invalid { key, message }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The config as TOML; `Config::load` of this text yields `self` again.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    /// Checks every section's range and consistency rules; the error names
    /// the key and the rule it breaks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.input.validate()?;
        self.rpn.validate()?;
        self.roi_heads.validate()?;
        self.solver.validate()?;
        self.precision.validate()?;
        self.test.validate()?;
        self.dataloader.validate()
    }

    /// The backbone normalization actually built: `auto` resolves to frozen
    /// BatchNorm with ImageNet weights, trainable BatchNorm from scratch.
    pub fn norm_kind(&self) -> NormKind {
        match (self.model.norm, self.pretrained()) {
            (NormKind::Auto, false) => NormKind::Bn,
            (NormKind::Auto, true) => NormKind::FrozenBn,
            (n, _) => n,
        }
    }

    /// Whether training starts from pretrained weights (backbone or whole
    /// model) rather than from scratch.
    pub fn pretrained(&self) -> bool {
        !self.model.backbone_weights.is_empty() || !self.model.weights.is_empty()
    }

    /// ResNet stages that train: all five when `auto` normalization trains
    /// from scratch (torchvision's rule), else `model.trainable_layers`.
    pub fn trainable_layers(&self) -> usize {
        if self.model.norm == NormKind::Auto && !self.pretrained() {
            5
        } else {
            self.model.trainable_layers
        }
    }

    /// Every valid key path (`section.key`), in declaration order.
    pub fn keys() -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(v) = Value::try_from(Config::default()) {
            collect_keys(&v, "", &mut out);
        }
        out
    }
}
