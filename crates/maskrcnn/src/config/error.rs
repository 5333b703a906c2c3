//! Why a config could not be resolved ([`ConfigError`]), and the rule
//! checks the sections' `validate` build their errors with.

use std::path::PathBuf;

/// Why a configuration could not be resolved. Each variant names the key and,
/// where it came from a file, the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: unknown config key `{key}`{}", suggestion(.closest))]
    UnknownKey { origin: String, key: String, closest: Vec<String> },
    #[error("{origin}: config key `{key}`: expected {expected}, got {got}")]
    WrongType { origin: String, key: String, expected: String, got: String },
    #[error("--set `{0}`: expected section.key=value")]
    BadOverride(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn suggestion(closest: &[String]) -> String {
    if closest.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = closest.iter().map(|k| format!("`{k}`")).collect();
        format!(" (did you mean {}?)", names.join(" or "))
    }
}

pub(super) fn rule(ok: bool, key: &str, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { key: key.to_string(), message: message.to_string() })
    }
}

pub(super) fn unit_interval(v: f64, key: &str) -> Result<(), ConfigError> {
    rule((0.0..=1.0).contains(&v), key, "must be in [0, 1]")
}

pub(super) fn iou_pair(fg: f64, bg: f64, section: &str) -> Result<(), ConfigError> {
    unit_interval(fg, &format!("{section}.fg_iou_thresh"))?;
    unit_interval(bg, &format!("{section}.bg_iou_thresh"))?;
    rule(bg <= fg, &format!("{section}.bg_iou_thresh"), &format!("must be <= {section}.fg_iou_thresh ({fg})"))
}
