//! `[model]`: the network's shape.

use super::error::{rule, ConfigError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Network shape: backbone, normalization, FPN, number of classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of classes including background: `"auto"` takes the training
    /// set's categories + 1 (`train`) or the weights' class count (`predict`,
    /// `eval --weights`); a number fixes it (91: torchvision's COCO label
    /// space, where a label is the COCO category id).
    pub num_classes: AutoCount,
    /// The mask branch: `"auto"` (on, unless the training set has no masks
    /// at all, or the weights have no mask head), `true`, or `false` (box
    /// detection only: torchvision's Faster R-CNN, no mask head or loss).
    #[serde(default)]
    pub mask_on: MaskOn,
    /// ResNet depth: 18 and 34 use basic blocks, 50, 101 and 152 bottlenecks.
    pub backbone_depth: usize,
    /// How many ResNet stages train, counted from the top (layer4 first):
    /// 3 freezes conv1 and layer1 (the seed's "first two blocks frozen").
    /// Applies with pretrained weights (`backbone_weights` or `weights`);
    /// from scratch every stage trains (as torchvision without pretrained
    /// weights).
    pub trainable_layers: usize,
    /// Normalization inside the backbone.
    pub norm: NormKind,
    /// ImageNet ResNet weights (safetensors, torchvision's resnet names:
    /// `conv1.weight`, `layer1.0.bn1.running_mean`, ...) to start training
    /// from; empty: train from scratch.
    pub backbone_weights: String,
    /// A whole Mask R-CNN (safetensors, torchvision's names: a converted
    /// torchvision checkpoint or our `model_final.safetensors`) to fine-tune
    /// from. The class-dependent predictor layers start fresh when the file
    /// has another number of classes; every other tensor must match.
    pub weights: String,
    /// Channels of every FPN output level.
    pub fpn_channels: usize,
    /// Normalization after each FPN lateral and output convolution (which
    /// then have no bias), as torchvision's `_resnet_fpn_extractor(...,
    /// norm_layer=...)`: `none` (v1's FPN), `frozen_bn` or `bn` (trained with
    /// batch statistics, per GPU, as torchvision's BatchNorm2d).
    #[serde(default)]
    pub fpn_norm: FpnNorm,
    /// 3×3 convolutions (each followed by ReLU) of the RPN head before its
    /// predictors: 1 (v1) or 2 (torchvision's v2, `RPNHead(conv_depth=2)`).
    #[serde(default = "default_rpn_conv_depth")]
    pub rpn_conv_depth: usize,
    /// The box head before the predictors: `2mlp` (v1's TwoMLPHead) or
    /// `4conv1fc` (torchvision's v2 FastRCNNConvFCHead: four 3×3 convolutions
    /// of the FPN's width, then one fully connected layer of
    /// `roi_heads.representation_size`).
    #[serde(default)]
    pub box_head: BoxHeadKind,
    /// Normalization after the convolutions of the `4conv1fc` box head and of
    /// the mask head (which then have no bias): `none` (v1) or `bn` (v2's
    /// BatchNorm2d; batch statistics over the RoIs in training).
    #[serde(default)]
    pub head_norm: HeadNorm,
}

/// A count that is `"auto"` (resolved from the data, the weights or the
/// machine where it is used) or a number: `model.num_classes`,
/// `dataloader.workers`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AutoCount {
    #[default]
    Auto,
    Fixed(usize),
}

/// torchvision's COCO label space: what an unresolved `model.num_classes =
/// "auto"` builds (benchmarks, a model without data or weights to read it from).
pub const COCO_NUM_CLASSES: usize = 91;

impl AutoCount {
    /// The count when fixed.
    pub fn fixed(self) -> Option<usize> {
        match self {
            AutoCount::Auto => None,
            AutoCount::Fixed(n) => Some(n),
        }
    }

    /// The count, or `default` when `auto` was not resolved.
    pub fn or(self, default: usize) -> usize {
        self.fixed().unwrap_or(default)
    }
}

impl fmt::Display for AutoCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AutoCount::Auto => f.write_str("auto"),
            AutoCount::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for AutoCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AutoCount::Auto => s.serialize_str("auto"),
            AutoCount::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for AutoCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let wrong = |got: &dyn fmt::Display| D::Error::custom(format!("expected \"auto\" or a count, got {got}"));
        match AutoValue::deserialize(d)? {
            AutoValue::Text(t) if t == "auto" => Ok(AutoCount::Auto),
            AutoValue::Text(t) => t.trim().parse().map(AutoCount::Fixed).map_err(|_| wrong(&format!("{t:?}"))),
            AutoValue::Int(n) => usize::try_from(n).map(AutoCount::Fixed).map_err(|_| wrong(&n)),
            AutoValue::Bool(b) => Err(wrong(&b)),
        }
    }
}

/// `model.mask_on`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MaskOn {
    /// On unless the training set has no masks (or the weights no mask head).
    #[default]
    Auto,
    On,
    Off,
}

impl MaskOn {
    /// Whether a model built now has the mask branch (`auto` not resolved: on).
    pub fn enabled(self) -> bool {
        self != MaskOn::Off
    }

    /// `true`/`false` for a resolved choice.
    pub fn from_bool(on: bool) -> MaskOn {
        if on {
            MaskOn::On
        } else {
            MaskOn::Off
        }
    }
}

impl fmt::Display for MaskOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MaskOn::Auto => "auto",
            MaskOn::On => "true",
            MaskOn::Off => "false",
        })
    }
}

impl Serialize for MaskOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaskOn::Auto => s.serialize_str("auto"),
            MaskOn::On => s.serialize_bool(true),
            MaskOn::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for MaskOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match AutoValue::deserialize(d)? {
            AutoValue::Bool(b) => Ok(MaskOn::from_bool(b)),
            AutoValue::Text(t) => match t.as_str() {
                "auto" => Ok(MaskOn::Auto),
                "true" => Ok(MaskOn::On),
                "false" => Ok(MaskOn::Off),
                _ => Err(D::Error::custom(format!("expected \"auto\", true or false, got {t:?}"))),
            },
            AutoValue::Int(n) => Err(D::Error::custom(format!("expected \"auto\", true or false, got {n}"))),
        }
    }
}

/// A key that takes `"auto"` or a value: the overlay hands it over as a
/// string when the file or `--set` wrote a number or boolean (see
/// `overlay::coerce`), a config built in code as the value itself.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum AutoValue {
    Bool(bool),
    Int(i64),
    Text(String),
}

/// The box head's architecture.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BoxHeadKind {
    /// Two fully connected layers (torchvision's `TwoMLPHead`).
    #[default]
    #[serde(rename = "2mlp")]
    TwoMlp,
    /// Four 3×3 convolutions and one fully connected layer (`FastRCNNConvFCHead`).
    #[serde(rename = "4conv1fc")]
    FourConvOneFc,
}

/// Normalization in the RoI heads' convolutions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadNorm {
    #[default]
    None,
    Bn,
}

fn default_rpn_conv_depth() -> usize {
    1
}

/// Normalization of the FPN's convolutions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FpnNorm {
    /// Biased convolutions, no normalization (torchvision's v1 FPN).
    #[default]
    None,
    /// FrozenBatchNorm2d (fixed statistics and affine parameters).
    FrozenBn,
    /// BatchNorm2d: batch statistics in training, running ones in inference.
    Bn,
}

impl FpnNorm {
    /// The normalization layer kind, `None` without one.
    pub fn kind(self) -> Option<NormKind> {
        match self {
            FpnNorm::None => None,
            FpnNorm::FrozenBn => Some(NormKind::FrozenBn),
            FpnNorm::Bn => Some(NormKind::Bn),
        }
    }
}

/// Backbone normalization layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `frozen_bn` with `model.backbone_weights` or `model.weights`, `bn`
    /// from scratch.
    Auto,
    /// BatchNorm with fixed statistics and affine parameters (torchvision's
    /// `FrozenBatchNorm2d`, eps 1e-5), as every detection recipe fine-tuning
    /// an ImageNet backbone uses.
    FrozenBn,
    /// Ordinary BatchNorm, whose statistics update in training (torchvision's
    /// choice when training from scratch).
    Bn,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            num_classes: AutoCount::Auto,
            mask_on: MaskOn::Auto,
            backbone_depth: 50,
            trainable_layers: 3,
            norm: NormKind::Auto,
            backbone_weights: String::new(),
            weights: String::new(),
            fpn_channels: 256,
            fpn_norm: FpnNorm::None,
            rpn_conv_depth: 1,
            box_head: BoxHeadKind::TwoMlp,
            head_norm: HeadNorm::None,
        }
    }
}

impl ModelConfig {
    /// The section's range and consistency rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = self;
        if let AutoCount::Fixed(n) = m.num_classes {
            rule(n >= 2, "model.num_classes", "must be >= 2 (background plus at least one class), or \"auto\"")?;
        }
        rule(
            matches!(m.backbone_depth, 18 | 34 | 50 | 101 | 152),
            "model.backbone_depth",
            "must be one of 18, 34, 50, 101, 152",
        )?;
        rule(m.trainable_layers <= 5, "model.trainable_layers", "must be in 0..=5")?;
        rule(m.fpn_channels > 0, "model.fpn_channels", "must be > 0")?;
        rule((1..=4).contains(&m.rpn_conv_depth), "model.rpn_conv_depth", "must be in 1..=4")?;
        rule(
            m.weights.is_empty() || m.backbone_weights.is_empty(),
            "model.weights",
            "set model.weights (a whole model) or model.backbone_weights (an ImageNet ResNet), not both",
        )
    }
}
