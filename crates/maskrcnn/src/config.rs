//! Every knob of training and inference, with the defaults of the R50-FPN
//! recipe: the seed's (NVIDIA maskrcnn_benchmark) values where torchvision 0.26
//! agrees, torchvision's where they differ (the seed's choice stays reachable as
//! an option, e.g. `input.pixel_format = "bgr255"`).
//!
//! A config is resolved in three layers: the defaults below, then a TOML file
//! (`--config F`), then `--set section.key=value` overrides. Each layer is
//! checked key by key against the defaults' shape, so an unknown key or a value
//! of the wrong type is reported with its full path and the closest valid keys,
//! and the result is validated as a whole ([`Config::validate`]).
//! [`Config::to_toml`] prints a resolved config that loads back unchanged.

use crate::text::one_line;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Value;

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

/// The whole resolved configuration; see the module docs for how it is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// Network shape: backbone, normalization, FPN, number of classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of classes including background (COCO: 80 used ids of 91, so 91
    /// as in torchvision).
    pub num_classes: usize,
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

/// Image preprocessing: sizes, normalization, augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Training short-side sizes; one is drawn per image (multi-scale training).
    pub min_size: Vec<usize>,
    /// Training long-side cap.
    pub max_size: usize,
    /// Inference short-side size.
    pub min_size_test: usize,
    /// Inference long-side cap.
    pub max_size_test: usize,
    /// Channel order and value range the mean/std apply to.
    pub pixel_format: PixelFormat,
    /// Per-channel mean subtracted after scaling to `pixel_format`'s range.
    pub pixel_mean: Vec<f64>,
    /// Per-channel divisor applied after the mean.
    pub pixel_std: Vec<f64>,
    /// Batched images are zero-padded so height and width are multiples of this.
    pub size_divisibility: usize,
    /// Probability of a horizontal flip of each training image.
    pub flip_prob: f64,
    /// Images with more pixels are refused (skipped and reported) from
    /// their header, before decoding: a decoded image costs 15 bytes per
    /// pixel on the way to the network (RGB bytes and float32).
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
}

/// The default of `input.max_image_pixels`: 100 megapixels (10000×10000),
/// about 1.5 GB on the way to the network.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 100_000_000;

fn default_max_image_pixels() -> u64 {
    DEFAULT_MAX_IMAGE_PIXELS
}

/// How pixel values are presented to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelFormat {
    /// RGB in [0, 1] (torchvision; mean/std are ImageNet's).
    Rgb,
    /// BGR in [0, 255] (the seed's Caffe2 weights: mean 102.98/115.95/122.77, std 1).
    Bgr255,
}

/// Region proposal network: anchors, matching, sampling, proposal selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpnConfig {
    /// Anchor side (pixels) of each FPN level P2..P6, one size per level.
    pub anchor_sizes: Vec<f64>,
    /// Anchor height/width ratios, the same on every level.
    pub aspect_ratios: Vec<f64>,
    /// Anchors with IoU >= this with some ground truth are foreground.
    pub fg_iou_thresh: f64,
    /// Anchors with IoU < this with every ground truth are background.
    pub bg_iou_thresh: f64,
    /// Anchors sampled per image for the RPN losses.
    pub batch_size_per_image: usize,
    /// Fraction of the sampled anchors that may be foreground.
    pub positive_fraction: f64,
    /// Top-scoring anchors kept per level before NMS, training.
    pub pre_nms_top_n_train: usize,
    /// Top-scoring anchors kept per level before NMS, inference.
    pub pre_nms_top_n_test: usize,
    /// Proposals kept after NMS, training.
    pub post_nms_top_n_train: usize,
    /// Proposals kept after NMS, inference.
    pub post_nms_top_n_test: usize,
    /// Whether post-NMS top-N counts per image (torchvision) or over the whole
    /// batch (the seed's maskrcnn_benchmark in training).
    pub post_nms_top_n_scope: TopNScope,
    /// IoU above which NMS suppresses a proposal.
    pub nms_thresh: f64,
    /// Proposals with a side shorter than this (pixels) are removed.
    pub min_box_size: f64,
    /// Proposals with objectness probability below this are removed.
    pub score_thresh: f64,
}

/// What a post-NMS top-N counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopNScope {
    Image,
    Batch,
}

/// Box and mask heads: matching, sampling, pooling, post-processing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoiHeadsConfig {
    /// Proposals with IoU >= this with a ground truth are foreground.
    pub fg_iou_thresh: f64,
    /// Proposals with IoU < this with every ground truth are background.
    pub bg_iou_thresh: f64,
    /// Proposals sampled per image for the box and mask losses.
    pub batch_size_per_image: usize,
    /// Fraction of the sampled proposals that may be foreground.
    pub positive_fraction: f64,
    /// Weights (wx, wy, ww, wh) of the box coder.
    pub bbox_reg_weights: Vec<f64>,
    /// Detections with a class score below this are dropped.
    pub score_thresh: f64,
    /// IoU above which per-class NMS suppresses a detection.
    pub nms_thresh: f64,
    /// Detections kept per image.
    pub detections_per_img: usize,
    /// Hidden width of the two-layer box head (TwoMLPHead).
    pub representation_size: usize,
    /// Output side of RoIAlign for the box head.
    pub box_pooler_resolution: usize,
    /// Output side of RoIAlign for the mask head.
    pub mask_pooler_resolution: usize,
    /// RoIAlign samples per bin side (0: adaptive, as torchvision).
    pub sampling_ratio: usize,
    /// Side of the predicted masks (twice the mask pooler's, by the head's
    /// transposed convolution).
    pub mask_resolution: usize,
    /// Channels of the four mask-head convolutions and the upsampler
    /// (torchvision: 256).
    pub mask_head_channels: usize,
}

/// Optimizer and learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverConfig {
    /// Learning rate for `ims_per_batch` images per step.
    pub base_lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Biases train at `base_lr * bias_lr_factor`.
    pub bias_lr_factor: f64,
    /// Weight decay applied to biases.
    pub bias_weight_decay: f64,
    pub warmup_method: WarmupMethod,
    /// Learning-rate multiplier at iteration 0 of the warmup.
    pub warmup_factor: f64,
    /// Iterations of warmup.
    pub warmup_iters: usize,
    /// Iterations at which the learning rate is multiplied by `gamma`.
    pub steps: Vec<usize>,
    pub gamma: f64,
    /// Total training iterations.
    pub max_iter: usize,
    /// Images per optimizer step, summed over all GPUs and accumulation steps.
    pub ims_per_batch: usize,
    /// Forward/backward passes whose gradients are summed per optimizer step.
    pub accumulate_steps: usize,
    /// A checkpoint is written every this many iterations.
    pub checkpoint_period: usize,
    /// Checkpoints kept in the output directory (oldest removed first).
    pub checkpoint_keep: usize,
    /// Clip the global gradient L2 norm to this value; 0 disables clipping.
    pub clip_grad_norm: f64,
    /// Iterations between logged losses, learning rate and speed.
    pub log_period: usize,
    /// Stop (checkpoint, final evaluation) once training has taken this many
    /// seconds, evaluation excluded; 0: no time limit.
    pub max_seconds: f64,
}

/// Learning-rate warmup shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmupMethod {
    Linear,
    Constant,
}

/// Numeric precision and memory layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionConfig {
    /// Autocast dtype for convolutions and matmuls on CUDA.
    pub amp: AmpMode,
    /// Allow TF32 tensor cores for fp32 convolutions and matmuls.
    pub tf32: bool,
    /// Keep activations and convolution weights in NHWC (channels-last)
    /// layout on CUDA.
    pub channels_last: bool,
    /// cuDNN autotuning of convolution algorithms per input shape: fastest
    /// with fixed sizes; with multi-scale training every new padded size is
    /// tuned again, which can dominate short runs.
    pub cudnn_benchmark: bool,
    /// fp16 dynamic loss scaling: initial scale (doubles after
    /// `loss_scale_growth_interval` clean steps, halves on inf/NaN).
    pub loss_scale_init: f64,
    pub loss_scale_growth_interval: usize,
}

/// Mixed-precision mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmpMode {
    Off,
    Fp16,
    Bf16,
}

impl AmpMode {
    /// The dtype autocast runs in under this mode (`None` when off).
    pub fn autocast_dtype(self) -> Option<crate::shim::AutocastDtype> {
        match self {
            AmpMode::Off => None,
            AmpMode::Fp16 => Some(crate::shim::AutocastDtype::Fp16),
            AmpMode::Bf16 => Some(crate::shim::AutocastDtype::Bf16),
        }
    }
}

impl fmt::Display for AmpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmpMode::Off => "off",
            AmpMode::Fp16 => "fp16",
            AmpMode::Bf16 => "bf16",
        })
    }
}

/// Training data loading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataLoaderConfig {
    /// Decode/augment worker threads per process.
    pub workers: usize,
    /// Batch portrait and landscape images separately.
    pub aspect_ratio_grouping: bool,
    /// Batches prepared ahead of the training step.
    pub prefetch: usize,
}

/// Inference batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestConfig {
    /// Images per inference batch (global).
    pub ims_per_batch: usize,
    /// Evaluate on `data.val_*` every this many training iterations (and at
    /// the end); 0: only at the end.
    pub eval_period: usize,
    /// Early stop: training ends once bbox AP reaches this and mask AP
    /// reaches `min_mask_map` (the seed's target accuracy); 0: never.
    pub min_bbox_map: f64,
    pub min_mask_map: f64,
}

/// Dataset locations: COCO instances JSON files and their image folders.
/// An empty string means "not given".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub train_ann: String,
    pub train_images: String,
    pub val_ann: String,
    pub val_images: String,
}

/// The most loader threads a config may ask for (`dataloader.workers`,
/// `bench data --workers`): far above any useful count, far below what an
/// operating system refuses to start.
pub const MAX_LOADER_WORKERS: usize = 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 0,
            model: ModelConfig {
                num_classes: 91,
                backbone_depth: 50,
                trainable_layers: 3,
                norm: NormKind::Auto,
                backbone_weights: String::new(),
                weights: String::new(),
                fpn_channels: 256,
            },
            input: InputConfig {
                min_size: vec![800],
                max_size: 1333,
                min_size_test: 800,
                max_size_test: 1333,
                pixel_format: PixelFormat::Rgb,
                pixel_mean: vec![0.485, 0.456, 0.406],
                pixel_std: vec![0.229, 0.224, 0.225],
                size_divisibility: 32,
                flip_prob: 0.5,
                max_image_pixels: default_max_image_pixels(),
            },
            rpn: RpnConfig {
                anchor_sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
                aspect_ratios: vec![0.5, 1.0, 2.0],
                fg_iou_thresh: 0.7,
                bg_iou_thresh: 0.3,
                batch_size_per_image: 256,
                positive_fraction: 0.5,
                pre_nms_top_n_train: 2000,
                pre_nms_top_n_test: 1000,
                post_nms_top_n_train: 2000,
                post_nms_top_n_test: 1000,
                post_nms_top_n_scope: TopNScope::Image,
                nms_thresh: 0.7,
                min_box_size: 1e-3,
                score_thresh: 0.0,
            },
            roi_heads: RoiHeadsConfig {
                fg_iou_thresh: 0.5,
                bg_iou_thresh: 0.5,
                batch_size_per_image: 512,
                positive_fraction: 0.25,
                bbox_reg_weights: vec![10.0, 10.0, 5.0, 5.0],
                score_thresh: 0.05,
                nms_thresh: 0.5,
                detections_per_img: 100,
                representation_size: 1024,
                box_pooler_resolution: 7,
                mask_pooler_resolution: 14,
                sampling_ratio: 2,
                mask_resolution: 28,
                mask_head_channels: 256,
            },
            solver: SolverConfig {
                base_lr: 0.02,
                momentum: 0.9,
                weight_decay: 1e-4,
                bias_lr_factor: 1.0,
                bias_weight_decay: 1e-4,
                warmup_method: WarmupMethod::Linear,
                warmup_factor: 1e-3,
                warmup_iters: 1000,
                steps: vec![60000, 80000],
                gamma: 0.1,
                max_iter: 90000,
                ims_per_batch: 16,
                accumulate_steps: 1,
                checkpoint_period: 2500,
                checkpoint_keep: 3,
                clip_grad_norm: 0.0,
                log_period: 20,
                max_seconds: 0.0,
            },
            precision: PrecisionConfig {
                amp: AmpMode::Off,
                tf32: true,
                channels_last: true,
                cudnn_benchmark: true,
                loss_scale_init: 8192.0,
                loss_scale_growth_interval: 2000,
            },
            dataloader: DataLoaderConfig { workers: 4, aspect_ratio_grouping: true, prefetch: 2 },
            test: TestConfig { ims_per_batch: 8, eval_period: 0, min_bbox_map: 0.0, min_mask_map: 0.0 },
            data: DataConfig {
                train_ann: String::new(),
                train_images: String::new(),
                val_ann: String::new(),
                val_images: String::new(),
            },
        }
    }
}

impl Config {
    /// Resolves defaults, then `file` (TOML) if given, then each `key=value`
    /// of `overrides` in order, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let defaults = Value::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid { key: "<defaults>".into(), message: e.to_string() })?;
        let mut merged = defaults.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_path_buf(),
                message: one_line(&e.to_string()),
            })?;
            let origin = format!("config file {}", path.display());
            overlay(&mut merged, &defaults, Value::Table(table), "", &origin)?;
        }
        for item in overrides {
            let (key, value) = parse_override(item)?;
            let origin = format!("--set {item}");
            let nested = nest(&key, value);
            overlay(&mut merged, &defaults, nested, "", &origin)?;
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

    /// Checks every cross-field and range rule; the error names the key and
    /// the rule it breaks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        rule(m.num_classes >= 2, "model.num_classes", "must be >= 2 (background plus at least one class)")?;
        rule(
            matches!(m.backbone_depth, 18 | 34 | 50 | 101 | 152),
            "model.backbone_depth",
            "must be one of 18, 34, 50, 101, 152",
        )?;
        rule(m.trainable_layers <= 5, "model.trainable_layers", "must be in 0..=5")?;
        rule(m.fpn_channels > 0, "model.fpn_channels", "must be > 0")?;
        rule(
            m.weights.is_empty() || m.backbone_weights.is_empty(),
            "model.weights",
            "set model.weights (a whole model) or model.backbone_weights (an ImageNet ResNet), not both",
        )?;

        let i = &self.input;
        rule(!i.min_size.is_empty(), "input.min_size", "must list at least one size")?;
        rule(i.min_size.iter().all(|&s| s > 0), "input.min_size", "sizes must be > 0")?;
        rule(i.max_size > 0, "input.max_size", "must be > 0")?;
        rule(
            i.min_size.iter().all(|&s| s <= i.max_size),
            "input.min_size",
            &format!("every size must be <= input.max_size ({})", i.max_size),
        )?;
        rule(i.min_size_test > 0, "input.min_size_test", "must be > 0")?;
        rule(
            i.min_size_test <= i.max_size_test,
            "input.min_size_test",
            &format!("must be <= input.max_size_test ({})", i.max_size_test),
        )?;
        rule(i.pixel_mean.len() == 3, "input.pixel_mean", "must have 3 values (one per channel)")?;
        rule(i.pixel_std.len() == 3, "input.pixel_std", "must have 3 values (one per channel)")?;
        rule(i.pixel_mean.iter().all(|v| v.is_finite()), "input.pixel_mean", "values must be finite")?;
        rule(i.pixel_std.iter().all(|&v| v > 0.0 && v.is_finite()), "input.pixel_std", "values must be > 0")?;
        rule(i.size_divisibility >= 1, "input.size_divisibility", "must be >= 1")?;
        rule(i.max_image_pixels > 0, "input.max_image_pixels", "must be > 0")?;
        unit_interval(i.flip_prob, "input.flip_prob")?;

        let r = &self.rpn;
        rule(r.anchor_sizes.len() == 5, "rpn.anchor_sizes", "must have 5 sizes, one per FPN level P2..P6")?;
        rule(r.anchor_sizes.iter().all(|&s| s > 0.0), "rpn.anchor_sizes", "sizes must be > 0")?;
        rule(!r.aspect_ratios.is_empty(), "rpn.aspect_ratios", "must list at least one ratio")?;
        rule(r.aspect_ratios.iter().all(|&a| a > 0.0), "rpn.aspect_ratios", "ratios must be > 0")?;
        iou_pair(r.fg_iou_thresh, r.bg_iou_thresh, "rpn")?;
        rule(r.batch_size_per_image > 0, "rpn.batch_size_per_image", "must be > 0")?;
        unit_interval(r.positive_fraction, "rpn.positive_fraction")?;
        for (v, k) in [
            (r.pre_nms_top_n_train, "rpn.pre_nms_top_n_train"),
            (r.pre_nms_top_n_test, "rpn.pre_nms_top_n_test"),
            (r.post_nms_top_n_train, "rpn.post_nms_top_n_train"),
            (r.post_nms_top_n_test, "rpn.post_nms_top_n_test"),
        ] {
            rule(v > 0, k, "must be > 0")?;
        }
        unit_interval(r.nms_thresh, "rpn.nms_thresh")?;
        rule(r.min_box_size >= 0.0, "rpn.min_box_size", "must be >= 0")?;
        unit_interval(r.score_thresh, "rpn.score_thresh")?;

        let h = &self.roi_heads;
        iou_pair(h.fg_iou_thresh, h.bg_iou_thresh, "roi_heads")?;
        rule(h.batch_size_per_image > 0, "roi_heads.batch_size_per_image", "must be > 0")?;
        unit_interval(h.positive_fraction, "roi_heads.positive_fraction")?;
        rule(h.bbox_reg_weights.len() == 4, "roi_heads.bbox_reg_weights", "must have 4 values (wx, wy, ww, wh)")?;
        rule(h.bbox_reg_weights.iter().all(|&w| w > 0.0), "roi_heads.bbox_reg_weights", "values must be > 0")?;
        unit_interval(h.score_thresh, "roi_heads.score_thresh")?;
        unit_interval(h.nms_thresh, "roi_heads.nms_thresh")?;
        rule(h.detections_per_img > 0, "roi_heads.detections_per_img", "must be > 0")?;
        rule(h.representation_size > 0, "roi_heads.representation_size", "must be > 0")?;
        rule(h.box_pooler_resolution > 0, "roi_heads.box_pooler_resolution", "must be > 0")?;
        rule(h.mask_pooler_resolution > 0, "roi_heads.mask_pooler_resolution", "must be > 0")?;
        rule(
            h.mask_resolution == 2 * h.mask_pooler_resolution,
            "roi_heads.mask_resolution",
            &format!(
                "must be twice roi_heads.mask_pooler_resolution ({}), as the mask head upsamples by 2",
                h.mask_pooler_resolution
            ),
        )?;

        let s = &self.solver;
        rule(s.base_lr > 0.0 && s.base_lr.is_finite(), "solver.base_lr", "must be > 0")?;
        rule((0.0..1.0).contains(&s.momentum), "solver.momentum", "must be in [0, 1)")?;
        rule(s.weight_decay >= 0.0, "solver.weight_decay", "must be >= 0")?;
        rule(s.bias_lr_factor > 0.0, "solver.bias_lr_factor", "must be > 0")?;
        rule(s.bias_weight_decay >= 0.0, "solver.bias_weight_decay", "must be >= 0")?;
        rule(s.warmup_factor > 0.0 && s.warmup_factor <= 1.0, "solver.warmup_factor", "must be in (0, 1]")?;
        rule(s.gamma > 0.0, "solver.gamma", "must be > 0")?;
        rule(s.max_iter > 0, "solver.max_iter", "must be > 0")?;
        rule(s.steps.windows(2).all(|w| w[0] < w[1]), "solver.steps", "must be strictly increasing")?;
        rule(
            s.steps.iter().all(|&x| x > 0 && x <= s.max_iter),
            "solver.steps",
            &format!("every step must be in 1..=solver.max_iter ({})", s.max_iter),
        )?;
        rule(s.ims_per_batch > 0, "solver.ims_per_batch", "must be > 0")?;
        rule(s.accumulate_steps >= 1, "solver.accumulate_steps", "must be >= 1")?;
        rule(
            s.ims_per_batch.is_multiple_of(s.accumulate_steps),
            "solver.ims_per_batch",
            &format!("must be divisible by solver.accumulate_steps ({})", s.accumulate_steps),
        )?;
        rule(s.checkpoint_period > 0, "solver.checkpoint_period", "must be > 0")?;
        rule(self.roi_heads.mask_head_channels >= 1, "roi_heads.mask_head_channels", "must be >= 1")?;
        rule(s.checkpoint_keep >= 1, "solver.checkpoint_keep", "must be >= 1")?;
        rule(
            s.clip_grad_norm >= 0.0 && s.clip_grad_norm.is_finite(),
            "solver.clip_grad_norm",
            "must be >= 0 (0: off)",
        )?;
        rule(s.log_period >= 1, "solver.log_period", "must be >= 1")?;
        rule(s.max_seconds >= 0.0 && s.max_seconds.is_finite(), "solver.max_seconds", "must be >= 0 (0: no limit)")?;
        let p = &self.precision;
        rule(p.loss_scale_init >= 1.0 && p.loss_scale_init.is_finite(), "precision.loss_scale_init", "must be >= 1")?;
        rule(p.loss_scale_growth_interval >= 1, "precision.loss_scale_growth_interval", "must be >= 1")?;
        unit_interval(self.test.min_bbox_map, "test.min_bbox_map")?;
        unit_interval(self.test.min_mask_map, "test.min_mask_map")?;

        rule(self.dataloader.prefetch >= 1, "dataloader.prefetch", "must be >= 1")?;
        rule(
            self.dataloader.workers <= MAX_LOADER_WORKERS,
            "dataloader.workers",
            &format!("must be <= {MAX_LOADER_WORKERS} (threads decoding images; about one per core is plenty)"),
        )?;
        rule(self.test.ims_per_batch >= 1, "test.ims_per_batch", "must be >= 1")?;
        Ok(())
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

fn rule(ok: bool, key: &str, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { key: key.to_string(), message: message.to_string() })
    }
}

fn unit_interval(v: f64, key: &str) -> Result<(), ConfigError> {
    rule((0.0..=1.0).contains(&v), key, "must be in [0, 1]")
}

fn iou_pair(fg: f64, bg: f64, section: &str) -> Result<(), ConfigError> {
    unit_interval(fg, &format!("{section}.fg_iou_thresh"))?;
    unit_interval(bg, &format!("{section}.bg_iou_thresh"))?;
    rule(bg <= fg, &format!("{section}.bg_iou_thresh"), &format!("must be <= {section}.fg_iou_thresh ({fg})"))
}

/// serde's wording for unsigned integers and enums, said for config users.
fn describe_serde_error(msg: &str, key: &str) -> String {
    let msg = one_line(msg);
    let msg = msg.strip_suffix(&format!(" in `{key}`")).unwrap_or(&msg);
    msg.replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
}

fn collect_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Table(t) = v {
        for (k, child) in t {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if child.is_table() {
                collect_keys(child, &path, out);
            } else {
                out.push(path);
            }
        }
    }
}

/// Splits `section.key=value`; the value is read as a TOML value (`0.02`,
/// `[512, 640]`, `true`, `"fp16"`) and, failing that, as a bare string
/// (`fp16`), so the common cases need no quoting in a shell.
fn parse_override(item: &str) -> Result<(String, Value), ConfigError> {
    let (key, raw) = item.split_once('=').ok_or_else(|| ConfigError::BadOverride(item.to_string()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::BadOverride(item.to_string()));
    }
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    };
    Ok((key.to_string(), value))
}

fn nest(key: &str, value: Value) -> Value {
    key.rsplit('.').fold(value, |inner, part| {
        let mut t = toml::Table::new();
        t.insert(part.to_string(), inner);
        Value::Table(t)
    })
}

/// Writes `src` into `dst` key by key, checking each key exists in `schema`
/// (the defaults) and each value has the schema's type. Integers widen to
/// floats, and a scalar given for a list becomes a one-element list.
fn overlay(dst: &mut Value, schema: &Value, src: Value, prefix: &str, origin: &str) -> Result<(), ConfigError> {
    let (Value::Table(dst_t), Value::Table(schema_t)) = (dst, schema) else {
        return Ok(());
    };
    let Value::Table(src_t) = src else {
        return Ok(());
    };
    for (k, v) in src_t {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let Some(expected) = schema_t.get(&k) else {
            // Name the first full key under an unknown section, so a misspelt
            // section (`modle.num_classes`) gets a full-key suggestion.
            let mut leaves = Vec::new();
            collect_keys(&v, &path, &mut leaves);
            let key = leaves.into_iter().next().unwrap_or(path);
            return Err(ConfigError::UnknownKey { origin: origin.to_string(), closest: closest_keys(&key), key });
        };
        if expected.is_table() {
            if !v.is_table() {
                return Err(wrong_type(origin, &path, expected, &v));
            }
            let slot = dst_t.entry(k.clone()).or_insert_with(|| expected.clone());
            overlay(slot, expected, v, &path, origin)?;
        } else {
            let coerced = coerce(expected, v).map_err(|v| wrong_type(origin, &path, expected, &v))?;
            dst_t.insert(k, coerced);
        }
    }
    Ok(())
}

fn coerce(expected: &Value, v: Value) -> Result<Value, Value> {
    match (expected, v) {
        (Value::Float(_), Value::Integer(i)) => Ok(Value::Float(i as f64)),
        (Value::Array(proto), Value::Array(items)) => {
            let Some(elem) = proto.first() else {
                return Ok(Value::Array(items));
            };
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match coerce(elem, item) {
                    Ok(x) => out.push(x),
                    Err(_) => {
                        let bad = Value::Array(out);
                        return Err(bad);
                    }
                }
            }
            Ok(Value::Array(out))
        }
        (Value::Array(proto), scalar) if !scalar.is_array() && !scalar.is_table() => match proto.first() {
            Some(elem) => coerce(elem, scalar).map(|x| Value::Array(vec![x])),
            None => Ok(Value::Array(vec![scalar])),
        },
        (e, v) if std::mem::discriminant(e) == std::mem::discriminant(&v) => Ok(v),
        (_, v) => Err(v),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "a list",
        Value::Table(_) => "a table",
    }
}

fn expected_name(v: &Value) -> String {
    match v {
        Value::Array(items) => match items.first() {
            Some(e) => format!("a list of {}s", type_name(e).trim_start_matches("a ").trim_start_matches("an ")),
            None => "a list".to_string(),
        },
        other => type_name(other).to_string(),
    }
}

fn wrong_type(origin: &str, key: &str, expected: &Value, got: &Value) -> ConfigError {
    let shown = match got {
        Value::Array(_) if matches!(expected, Value::Array(_)) => "a list with an element of another type".to_string(),
        Value::Table(_) | Value::Array(_) => type_name(got).to_string(),
        other => format!("{} ({})", type_name(other), other),
    };
    ConfigError::WrongType {
        origin: origin.to_string(),
        key: key.to_string(),
        expected: expected_name(expected),
        got: shown,
    }
}

/// Up to three valid keys closest to `key`: by edit distance of the whole
/// path, and any key whose last component matches (a key put in the wrong
/// section).
fn closest_keys(key: &str) -> Vec<String> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let mut scored: Vec<(usize, String)> = Config::keys()
        .into_iter()
        .map(|k| {
            let k_leaf = k.rsplit('.').next().unwrap_or(&k).to_string();
            let d = if k_leaf == leaf {
                0
            } else {
                strsim::levenshtein(key, &k).min(strsim::levenshtein(leaf, &k_leaf) + 1)
            };
            (d, k)
        })
        .collect();
    scored.sort();
    let limit = (key.len() / 3).max(3);
    scored.into_iter().filter(|(d, _)| *d <= limit).take(3).map(|(_, k)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_typo_and_wrong_section() {
        assert_eq!(closest_keys("solver.base_lrr")[0], "solver.base_lr");
        assert_eq!(closest_keys("rpn.base_lr")[0], "solver.base_lr");
        assert!(closest_keys("zzzzzzzzzzzzzzzzzzzzzz.qqqqqqqqqqq").is_empty());
    }

    #[test]
    fn override_values_parse_as_toml_or_bare_strings() {
        assert_eq!(parse_override("a.b=0.5").unwrap().1, Value::Float(0.5));
        assert_eq!(parse_override("a.b=[1, 2]").unwrap().1, Value::Array(vec![Value::Integer(1), Value::Integer(2)]));
        assert_eq!(parse_override("a.b=fp16").unwrap().1, Value::String("fp16".into()));
        assert_eq!(parse_override("a.b=/data/x y.json").unwrap().1, Value::String("/data/x y.json".into()));
        assert!(parse_override("a.b").is_err());
        assert!(parse_override("a..b=1").is_err());
        assert!(parse_override("=1").is_err());
    }
}
