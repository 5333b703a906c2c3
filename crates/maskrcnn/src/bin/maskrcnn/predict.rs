//! `maskrcnn predict`: detections of image files, as COCO results and
//! drawings.

use crate::args::{ConfigArgs, DeviceArg};
use anyhow::{bail, Result};
use clap::Args;
use maskrcnn::engine::predictor::{predict_files, PredictOptions};
use maskrcnn::MaskRcnn;
use std::path::PathBuf;

#[derive(Args)]
pub struct PredictArgs {
    /// Model weights (safetensors with torchvision's names).
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Write COCO-style results (boxes xywh, compressed RLE masks) here.
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
    /// Write one annotated PNG per image into this folder.
    #[arg(long, value_name = "DIR")]
    pub draw: Option<PathBuf>,
    /// Minimum score of the detections drawn.
    #[arg(long, default_value_t = 0.5, value_name = "SCORE")]
    pub draw_thresh: f64,
    /// Images (JPEG or PNG).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let config = args.config.resolve()?;
    let device = args.device.resolve()?;
    maskrcnn::shim::set_tf32(config.precision.tf32);
    let model = MaskRcnn::from_weights(&config, &args.weights, device)?;
    let opts = PredictOptions { json: args.json.clone(), draw: args.draw.clone(), draw_thresh: args.draw_thresh };
    let summary = predict_files(&model, &args.images, &opts)?;
    eprintln!(
        "predicted {} image(s), {} detection(s){}{}",
        summary.images,
        summary.detections,
        args.json.as_ref().map(|p| format!(", results in {}", p.display())).unwrap_or_default(),
        args.draw.as_ref().map(|p| format!(", drawings in {}", p.display())).unwrap_or_default(),
    );
    if !summary.failed.is_empty() {
        bail!(
            "{} of {} image(s) could not be read: {}",
            summary.failed.len(),
            args.images.len(),
            summary.failed.join("; ")
        );
    }
    Ok(())
}
