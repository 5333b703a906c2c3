//! Weights on disk: safetensors files with torchvision's state-dict names.
//!
//! A torchvision checkpoint converts with
//! `safetensors.torch.save_file(model.state_dict(), "w.safetensors")`; the
//! bookkeeping buffers `*.num_batches_tracked` of ordinary BatchNorm are
//! ignored when present. Weights we write carry the model's category table
//! in the header's `__metadata__` (key [`CATEGORIES_KEY`]); torchvision and
//! `safetensors.torch.load_file` ignore it.

use super::ModelError;
use crate::structures::Categories;
use safetensors::tensor::{Dtype, View};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Header metadata key of the category table (JSON of [`Categories`]).
pub const CATEGORIES_KEY: &str = "maskrcnn.categories";

const CLS_SCORE: &str = "roi_heads.box_predictor.cls_score.weight";

/// What a weights file's header says about the model it holds.
#[derive(Debug, Clone, Default)]
pub struct WeightsInfo {
    /// Classes including background (rows of the box classifier), when the
    /// file has a box predictor.
    pub classes: Option<usize>,
    /// Whether it has a mask head (a Mask R-CNN, not a Faster R-CNN).
    pub mask_head: bool,
    /// The category table we store (`None` for torchvision checkpoints).
    pub categories: Option<Categories>,
}

/// Reads the header of the safetensors file `path` (no tensor data).
pub fn inspect(path: &Path) -> Result<WeightsInfo, ModelError> {
    let header = read_header(path)?;
    let classes = header
        .get(CLS_SCORE)
        .and_then(|t| t.get("shape"))
        .and_then(|s| s.get(0))
        .and_then(serde_json::Value::as_u64)
        .map(|n| n as usize);
    let mask_head = header.as_object().is_some_and(|o| o.keys().any(|k| k.starts_with("roi_heads.mask_")));
    Ok(WeightsInfo { classes, mask_head, categories: categories_of(&header, path)? })
}

/// Copies every tensor of the safetensors file at `path` into `vs`. Fails,
/// changing nothing, when any model tensor is missing, any file tensor is
/// unexpected, or any shape differs; the error lists each problem.
pub fn load_weights(vs: &VarStore, path: &Path, num_classes: usize) -> Result<(), ModelError> {
    let file = read_state_dict(path, "")?;
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

/// Every tensor of the safetensors file at `path` by name, without BatchNorm's
/// bookkeeping `*.num_batches_tracked`; `what` names the setting in the
/// missing-file message.
fn read_state_dict(path: &Path, what: &str) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let read_err = |message: String| ModelError::ReadWeights { path: path.to_path_buf(), message };
    if path.is_dir() {
        return Err(read_err(format!("is a directory, not a weights file{what}")));
    }
    if !path.is_file() {
        return Err(read_err(format!("no such file{what}")));
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| read_err(e.to_string()))?;
    Ok(tensors.into_iter().filter(|(name, _)| !name.ends_with(".num_batches_tracked")).collect())
}

/// The predictor tensors whose first dimension counts classes (K or 4K):
/// the layers fine-tuning on another dataset replaces (torchvision's
/// tutorial swaps `box_predictor` and `mask_predictor`).
const CLASS_TENSORS: [&str; 6] = [
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.bias",
];

/// Copies a whole Mask R-CNN or Faster R-CNN (the safetensors file at
/// `path`) into `vs` to fine-tune from. When the file's class count differs
/// from the model's, the class-dependent predictor tensors keep their fresh
/// initialization; so does the mask branch when the file has none, and a
/// file's mask branch is left out of a model without one; every other
/// tensor must be present with its shape (nothing changes otherwise).
/// Returns the classes the file has.
pub fn load_pretrained_model(vs: &VarStore, path: &Path) -> Result<i64, ModelError> {
    let mut file = read_state_dict(path, " (model.weights)")?;
    let mut model: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let is_mask = |name: &String| name.starts_with("roi_heads.mask_");
    let (file_masks, model_masks) = (file.keys().any(is_mask), model.keys().any(is_mask));
    if file_masks != model_masks {
        tracing::info!(
            "{}: {}",
            path.display(),
            if model_masks {
                "no mask head (a Faster R-CNN): the mask branch starts fresh"
            } else {
                "its mask head is left out (the model detects boxes only)"
            }
        );
        model.retain(|name, _| !is_mask(name));
        file.retain(|name, _| !is_mask(name));
    }
    let file_classes = file.get(CLS_SCORE).and_then(|t| t.size().first().copied()).unwrap_or(0);
    let model_classes = model.get(CLS_SCORE).and_then(|t| t.size().first().copied()).unwrap_or(0);
    if file_classes != model_classes {
        for name in CLASS_TENSORS {
            model.remove(name);
            file.remove(name);
        }
    }
    copy_matching(&model, &file, "", path)?;
    Ok(file_classes)
}

/// The architecture options a set of tensor names (without the model's
/// prefix) was built with, as far as the names tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct VariantMarks {
    fpn_norm: bool,
    /// RPN head convolutions (0: none named).
    rpn_convs: usize,
    conv_box_head: bool,
    head_norm: bool,
    mask_head: bool,
}

impl VariantMarks {
    fn of<'a>(names: impl Iterator<Item = &'a str>) -> VariantMarks {
        names.fold(VariantMarks::default(), |m, name| {
            let rpn_conv = name
                .strip_prefix("rpn.head.conv.")
                .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok())
                .map_or(0, |k| k + 1);
            VariantMarks {
                fpn_norm: m.fpn_norm || (name.starts_with("backbone.fpn.") && name.contains("_blocks.0.1.")),
                rpn_convs: m.rpn_convs.max(rpn_conv),
                conv_box_head: m.conv_box_head || name.starts_with("roi_heads.box_head.0.0."),
                head_norm: m.head_norm || name.starts_with("roi_heads.mask_head.0.1."),
                mask_head: m.mask_head || name.starts_with("roi_heads.mask_"),
            }
        })
    }
}

/// The config options to set when the file's tensor names are those of
/// another architecture variant than the model's (an FPN with or without a
/// norm, another RPN head depth, box head or head norm); names are without
/// the model's prefix.
fn variant_hint<'a>(model: impl Iterator<Item = &'a str>, file: impl Iterator<Item = &'a str>) -> Option<String> {
    let (m, f) = (VariantMarks::of(model), VariantMarks::of(file));
    let mut hints = Vec::new();
    if f.conv_box_head != m.conv_box_head {
        let kind = if f.conv_box_head { "4conv1fc" } else { "2mlp" };
        hints.push(format!("its box head is {kind}: set model.box_head = \"{kind}\""));
    }
    if f.mask_head != m.mask_head {
        hints.push(if f.mask_head {
            "it has a mask head (a Mask R-CNN): set model.mask_on = true".to_string()
        } else {
            "it has no mask head (a Faster R-CNN): set model.mask_on = false".to_string()
        });
    }
    if f.head_norm != m.head_norm && f.mask_head && m.mask_head {
        let (has, kind) = if f.head_norm { ("has", "bn") } else { ("has no", "none") };
        hints.push(format!("its mask head {has} a norm: set model.head_norm = \"{kind}\""));
    }
    if f.fpn_norm != m.fpn_norm {
        hints.push(if f.fpn_norm {
            "its FPN has a norm after each convolution: set model.fpn_norm = \"bn\" (torchvision's v2) or \"frozen_bn\""
                .to_string()
        } else {
            "its FPN has no norm: set model.fpn_norm = \"none\"".to_string()
        });
    }
    if f.rpn_convs > 0 && m.rpn_convs > 0 && f.rpn_convs != m.rpn_convs {
        let n = f.rpn_convs;
        hints.push(format!("its RPN head has {n} convolution(s): set model.rpn_conv_depth = {n}"));
    }
    (!hints.is_empty()).then(|| format!("the file is another variant ({})", hints.join("; ")))
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
            // Integers would be converted silently into a model that scores nothing.
            Some(t) if !t.is_floating_point() => {
                problems.push(format!("{short}: dtype {:?}, a floating-point tensor is needed", t.kind()))
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
        if let Some(hint) = variant_hint(model.keys().map(|k| &k[prefix.len()..]), file.keys().map(String::as_str)) {
            problems.insert(0, hint);
        }
        let n = problems.len();
        let shown: Vec<String> = problems.into_iter().take(12).collect();
        let more = if n > shown.len() { format!("; and {} more", n - shown.len()) } else { String::new() };
        return Err(ModelError::Mismatch { path: path.to_path_buf(), problems: format!("{}{more}", shown.join("; ")) });
    }
    // A non-finite weight is a broken file, named here (not, many steps
    // later, a loss that looks like a diverging learning rate).
    let broken: Vec<String> = model
        .keys()
        .map(|name| &name[prefix.len()..])
        .filter_map(|short| {
            let bad = file[short].isfinite().logical_not().sum(tch::Kind::Int64).int64_value(&[]);
            (bad > 0).then(|| format!("{short} ({bad} of {} values)", file[short].numel()))
        })
        .collect();
    if !broken.is_empty() {
        let shown: Vec<&str> = broken.iter().take(6).map(String::as_str).collect();
        let more = if broken.len() > shown.len() {
            format!("; and {} more", broken.len() - shown.len())
        } else {
            String::new()
        };
        return Err(ModelError::NonFinite { path: path.to_path_buf(), tensors: format!("{}{more}", shown.join("; ")) });
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

/// Writes every tensor of `vs` to `path` as safetensors (float32, CPU) with
/// `categories` in the header, atomically: a temporary file in the same
/// folder is renamed over `path`.
pub fn save_weights(vs: &VarStore, categories: Option<&Categories>, path: &Path) -> Result<(), ModelError> {
    let write_err = |message: String| ModelError::WriteWeights { path: path.to_path_buf(), message };
    let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let tmp = path.with_extension("safetensors.tmp");
    write_tensors(&named, categories, &tmp).map_err(|e| write_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| write_err(e.to_string()))
}

/// A contiguous CPU tensor (a copy only when the source was elsewhere or
/// strided), as safetensors data: its bytes are borrowed, not copied again.
struct CpuTensor {
    tensor: Tensor,
    shape: Vec<usize>,
    dtype: Dtype,
}

impl View for CpuTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.data_len() == 0 {
            return std::borrow::Cow::Borrowed(&[]);
        }
        // SAFETY: `tensor` is a contiguous CPU tensor owned by `self`, so its
        // storage holds `data_len()` initialized bytes at `data_ptr()` for as
        // long as `self` is borrowed.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.data_len())
        })
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Writes `named` tensors (any device; float32 stays float32) to `path` as
/// safetensors, sorted by name, with `categories` as header metadata.
pub fn write_tensors(named: &[(String, Tensor)], categories: Option<&Categories>, path: &Path) -> std::io::Result<()> {
    let views = named
        .iter()
        .map(|(name, t)| {
            let tensor = t.detach().to_device(tch::Device::Cpu).contiguous();
            let dtype = match tensor.kind() {
                Kind::Float => Dtype::F32,
                Kind::Half => Dtype::F16,
                Kind::BFloat16 => Dtype::BF16,
                Kind::Double => Dtype::F64,
                Kind::Int64 => Dtype::I64,
                Kind::Int => Dtype::I32,
                Kind::Uint8 => Dtype::U8,
                Kind::Bool => Dtype::BOOL,
                other => return Err(std::io::Error::other(format!("{name}: cannot store {other:?} tensors"))),
            };
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            Ok((name.as_str(), CpuTensor { tensor, shape, dtype }))
        })
        .collect::<std::io::Result<BTreeMap<&str, CpuTensor>>>()?;
    let metadata = categories
        .map(|c| serde_json::to_string(c).map(|json| HashMap::from([(CATEGORIES_KEY.to_string(), json)])))
        .transpose()?;
    safetensors::tensor::serialize_to_file(views, &metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => io,
        other => std::io::Error::other(format!("{other:?}")),
    })
}

/// The category table in the header of the weights file `path`: `None` for
/// files without one (torchvision checkpoints).
pub fn read_categories(path: &Path) -> Result<Option<Categories>, ModelError> {
    categories_of(&read_header(path)?, path)
}

/// The JSON header of the safetensors file `path`.
fn read_header(path: &Path) -> Result<serde_json::Value, ModelError> {
    let read_err = |message: String| ModelError::ReadWeights { path: path.to_path_buf(), message };
    if path.is_dir() {
        return Err(read_err("is a directory, not a weights file".into()));
    }
    if !path.is_file() {
        return Err(read_err("no such file".into()));
    }
    let mut file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| read_err("not a safetensors file (no header length)".into()))?;
    let len = u64::from_le_bytes(len);
    // The format caps headers at 100 MB.
    if len > 100_000_000 {
        return Err(read_err(format!("not a safetensors file (header length {len})")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|_| read_err("truncated safetensors header".into()))?;
    serde_json::from_slice(&header).map_err(|e| read_err(format!("safetensors header: {e}")))
}

/// The category table in a safetensors `header` of `path`.
fn categories_of(header: &serde_json::Value, path: &Path) -> Result<Option<Categories>, ModelError> {
    let read_err = |message: String| ModelError::ReadWeights { path: path.to_path_buf(), message };
    let Some(json) = header.get("__metadata__").and_then(|m| m.get(CATEGORIES_KEY)) else {
        return Ok(None);
    };
    let parsed = json.as_str().map(serde_json::from_str::<Categories>);
    match parsed {
        Some(Ok(categories)) => Ok(Some(categories)),
        Some(Err(e)) => Err(read_err(format!("metadata {CATEGORIES_KEY}: {e}"))),
        None => Err(read_err(format!("metadata {CATEGORIES_KEY} is not a string"))),
    }
}

/// Copies an ImageNet ResNet state dict (torchvision's `resnet50` names:
/// `conv1.weight`, `bn1.running_var`, `layer1.0.conv1.weight`, ...; the
/// classifier `fc.*` is ignored) into the model's `backbone.body`. Every
/// body tensor must be present with its shape; nothing changes otherwise.
pub fn load_backbone_weights(vs: &VarStore, path: &Path) -> Result<(), ModelError> {
    let mut file = read_state_dict(path, " (model.backbone_weights)")?;
    file.retain(|name, _| !name.starts_with("fc."));
    const BODY: &str = "backbone.body.";
    let model: BTreeMap<String, Tensor> = vs.variables().into_iter().filter(|(n, _)| n.starts_with(BODY)).collect();
    copy_matching(&model, &file, BODY, path)
}

#[cfg(test)]
mod tests {
    /// A file of another FPN/RPN-head variant names the option to set.
    #[test]
    fn another_variant_names_the_option_to_set() {
        let v1 =
            ["backbone.fpn.inner_blocks.0.0.weight", "backbone.fpn.inner_blocks.0.0.bias", "rpn.head.conv.0.0.weight"];
        let v2 = [
            "backbone.fpn.inner_blocks.0.0.weight",
            "backbone.fpn.inner_blocks.0.1.weight",
            "backbone.fpn.inner_blocks.0.1.running_var",
            "rpn.head.conv.0.0.weight",
            "rpn.head.conv.1.0.weight",
        ];
        let hint = super::variant_hint(v1.into_iter(), v2.into_iter()).unwrap();
        assert!(hint.contains("model.fpn_norm = \"bn\"") && hint.contains("model.rpn_conv_depth = 2"), "{hint}");
        let hint = super::variant_hint(v2.into_iter(), v1.into_iter()).unwrap();
        assert!(hint.contains("model.fpn_norm = \"none\"") && hint.contains("model.rpn_conv_depth = 1"), "{hint}");
        assert_eq!(super::variant_hint(v1.into_iter(), v1.into_iter()), None);
    }
}
