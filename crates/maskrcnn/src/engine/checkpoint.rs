//! Training checkpoints: `OUT/checkpoints/iter_0001000/` holding
//! `model.safetensors` (torchvision names, loadable by `predict`/`eval`),
//! `optimizer.safetensors` (momentum buffers), `state.json` (iteration,
//! loss-scaler state) and `config.toml`. A checkpoint is written into a
//! temporary folder and renamed into place, so a crash or a full disk leaves
//! the previous checkpoints intact; only the newest `keep` are kept.

use crate::engine::amp::ScalerState;
use crate::modeling::weights::write_tensors;
use crate::structures::Categories;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed (the next step has this 0-based index).
    pub iteration: u64,
    pub scaler: Option<ScalerState>,
    /// Sum of images seen, for logs.
    pub images_seen: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io { path: path.to_path_buf(), message: crate::text::one_line(&e.to_string()) }
}

/// The folder of checkpoints under an output directory.
pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

fn final_name(iteration: u64) -> String {
    format!("iter_{iteration:07}")
}

/// Writes one checkpoint atomically and prunes old ones. `model` and
/// `optimizer` are named tensors (any device); the model file carries
/// `categories` as `predict` reads them.
pub fn save(
    output: &Path,
    state: &TrainState,
    model: &[(String, Tensor)],
    categories: Option<&Categories>,
    optimizer: &[(String, Tensor)],
    config_toml: &str,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let dir = checkpoints_dir(output);
    let name = final_name(state.iteration);
    let tmp = dir.join(format!(".tmp-{name}"));
    let dst = dir.join(&name);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let write = |file: &str, tensors: &[(String, Tensor)], categories| -> Result<(), CheckpointError> {
        let path = tmp.join(file);
        write_tensors(tensors, categories, &path).map_err(|e| io(&path, e))?;
        sync_file(&path)
    };
    let result = (|| {
        write("model.safetensors", model, categories)?;
        write("optimizer.safetensors", optimizer, None)?;
        write_text(&tmp.join("config.toml"), config_toml)?;
        let json = serde_json::to_string_pretty(state).map_err(|e| io(&tmp, e))?;
        write_text(&tmp.join("state.json"), &json)?;
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(|e| io(&dst, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    prune(&dir, keep);
    Ok(dst)
}

fn write_text(path: &Path, text: &str) -> Result<(), CheckpointError> {
    std::fs::write(path, text).map_err(|e| io(path, e))?;
    sync_file(path)
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| io(path, e))
}

/// Complete checkpoints under `output`, oldest first: `(iteration, folder)`.
pub fn list(output: &Path) -> Vec<(u64, PathBuf)> {
    let dir = checkpoints_dir(output);
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let it = name.strip_prefix("iter_")?.parse().ok()?;
                    e.path().join("state.json").is_file().then(|| (it, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Removes leftovers of interrupted writes.
pub fn remove_partial(output: &Path) {
    if let Ok(entries) = std::fs::read_dir(checkpoints_dir(output)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn prune(dir: &Path, keep: usize) {
    let all = list(dir.parent().unwrap_or(dir));
    for (_, path) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Whether `path` is a whole safetensors file — its header parses and the
/// data it describes ends exactly at the end of the file (a file cut short
/// does not) — reading only the header, not the tensors.
fn check_complete_safetensors(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|e| format!("no safetensors header: {e}"))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return Err(format!("safetensors header of {n} bytes in a file of {len}"));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| format!("safetensors header: {e}"))?;
    let end = header
        .as_object()
        .ok_or("safetensors header is not an object")?
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(_, t)| t["data_offsets"][1].as_u64().unwrap_or(u64::MAX))
        .max()
        .unwrap_or(0);
    if end == u64::MAX || 8 + n + end != len {
        return Err(format!("the file has {len} bytes, its header describes {}", 8 + n + end.min(len)));
    }
    Ok(())
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainState,
    pub config_toml: String,
    pub optimizer: BTreeMap<String, Tensor>,
}

/// Reads the checkpoint in `dir` (the model weights stay in
/// `dir/model.safetensors`, loaded by the model, but are checked to be a
/// complete safetensors file here).
pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let model_path = dir.join("model.safetensors");
    check_complete_safetensors(&model_path).map_err(|e| io(&model_path, e))?;
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| io(&state_path, e))?;
    let cfg_path = dir.join("config.toml");
    let config_toml = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let opt_path = dir.join("optimizer.safetensors");
    let optimizer = Tensor::read_safetensors(&opt_path).map_err(|e| io(&opt_path, e))?.into_iter().collect();
    Ok(Loaded { dir: dir.to_path_buf(), state, config_toml, optimizer })
}
