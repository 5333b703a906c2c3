//! Weights on disk: safetensors files with torchvision's state-dict names.
//!
//! A torchvision checkpoint converts with
//! `safetensors.torch.save_file(model.state_dict(), "w.safetensors")`; the
//! bookkeeping buffers `*.num_batches_tracked` of ordinary BatchNorm are
//! ignored when present.

use super::ModelError;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::VarStore;
use tch::Tensor;

const CLS_SCORE: &str = "roi_heads.box_predictor.cls_score.weight";

/// Copies every tensor of the safetensors file at `path` into `vs`. Fails,
/// changing nothing, when any model tensor is missing, any file tensor is
/// unexpected, or any shape differs; the error lists each problem.
pub fn load_weights(vs: &VarStore, path: &Path, num_classes: usize) -> Result<(), ModelError> {
    let read_err = |message: String| ModelError::ReadWeights { path: path.to_path_buf(), message };
    if !path.is_file() {
        return Err(read_err("no such file".into()));
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| read_err(e.to_string()))?;
    let file: BTreeMap<String, Tensor> =
        tensors.into_iter().filter(|(name, _)| !name.ends_with(".num_batches_tracked")).collect();
    if let Some(w) = file.get(CLS_SCORE) {
        let shape = w.size();
        if shape.first().copied() != Some(num_classes as i64) {
            return Err(ModelError::NumClasses {
                path: path.to_path_buf(),
                expected: num_classes,
                found: shape.first().copied().unwrap_or(0),
                shape,
            });
        }
    }
    let model: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    copy_matching(&model, &file, "", path)
}

/// Copies `file` tensors into the `model` variables of the same name, where
/// model names are `prefix` + file names. Fails, changing nothing, when any
/// model tensor is missing, any file tensor unexpected or any shape differs;
/// the error lists each problem (names shown without `prefix`).
fn copy_matching(
    model: &BTreeMap<String, Tensor>,
    file: &BTreeMap<String, Tensor>,
    prefix: &str,
    path: &Path,
) -> Result<(), ModelError> {
    let mut problems = Vec::new();
    for (name, var) in model {
        let short = &name[prefix.len()..];
        match file.get(short) {
            None => problems.push(format!("missing {short} {:?}", var.size())),
            Some(t) if t.size() != var.size() => {
                problems.push(format!("{short}: file has {:?}, model needs {:?}", t.size(), var.size()))
            }
            Some(_) => {}
        }
    }
    for (name, t) in file {
        if !model.contains_key(&format!("{prefix}{name}")) {
            problems.push(format!("unexpected {name} {:?}", t.size()));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        let shown: Vec<String> = problems.into_iter().take(12).collect();
        let more = if n > shown.len() { format!("; and {} more", n - shown.len()) } else { String::new() };
        return Err(ModelError::Mismatch { path: path.to_path_buf(), problems: format!("{}{more}", shown.join("; ")) });
    }
    tch::no_grad(|| {
        for (name, var) in model {
            let src = &file[&name[prefix.len()..]];
            let mut var = var.shallow_clone();
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(())
}

/// Writes every tensor of `vs` to `path` as safetensors (float32, CPU),
/// atomically: a temporary file in the same folder is renamed over `path`.
pub fn save_weights(vs: &VarStore, path: &Path) -> Result<(), ModelError> {
    let write_err = |message: String| ModelError::WriteWeights { path: path.to_path_buf(), message };
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let named: Vec<(String, Tensor)> =
        vars.into_iter().map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    let tmp = path.with_extension("safetensors.tmp");
    Tensor::write_safetensors(&named, &tmp).map_err(|e| write_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| write_err(e.to_string()))
}

/// Copies an ImageNet ResNet state dict (torchvision's `resnet50` names:
/// `conv1.weight`, `bn1.running_var`, `layer1.0.conv1.weight`, ...; the
/// classifier `fc.*` is ignored) into the model's `backbone.body`. Every
/// body tensor must be present with its shape; nothing changes otherwise.
pub fn load_backbone_weights(vs: &VarStore, path: &Path) -> Result<(), ModelError> {
    let read_err = |message: String| ModelError::ReadWeights { path: path.to_path_buf(), message };
    if !path.is_file() {
        return Err(read_err("no such file (model.backbone_weights)".into()));
    }
    let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| read_err(e.to_string()))?
        .into_iter()
        .filter(|(n, _)| !n.starts_with("fc.") && !n.ends_with(".num_batches_tracked"))
        .collect();
    const BODY: &str = "backbone.body.";
    let model: BTreeMap<String, Tensor> = vs.variables().into_iter().filter(|(n, _)| n.starts_with(BODY)).collect();
    copy_matching(&model, &file, BODY, path)
}
