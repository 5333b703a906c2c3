//! `[input]`: image sizes, normalization, augmentation, the size limit.

use super::error::{rule, unit_interval, ConfigError};
use serde::{Deserialize, Serialize};

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
    /// Apply a photo's EXIF orientation (JPEG APP1, PNG eXIf) when decoding,
    /// in training, `predict` and `eval`, as PIL's `exif_transpose` and
    /// detectron2 do: the image is seen upright, and the annotation file's
    /// width and height must be the upright ones. False: the stored pixels.
    #[serde(default = "default_exif")]
    pub exif: bool,
}

fn default_exif() -> bool {
    true
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

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
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
            exif: true,
        }
    }
}

impl InputConfig {
    /// The section's range and consistency rules (errors name the key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let i = self;
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
        unit_interval(i.flip_prob, "input.flip_prob")
    }
}
