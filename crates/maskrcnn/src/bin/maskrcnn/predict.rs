//! `maskrcnn predict`: detections of image files, as COCO results and
//! drawings.

use crate::args::{ConfigArgs, DeviceArg};
use anyhow::{bail, Result};
use clap::Args;
use maskrcnn::prediction::{collect_images, match_image_ids, predict_files, PredictOptions};
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
    /// A COCO annotation file the images are in: each result gets its
    /// image's `image_id` (matched by file_name), so `eval --results` takes them.
    #[arg(long, value_name = "GT.json")]
    pub ann: Option<PathBuf>,
    /// Images (JPEG or PNG), or folders searched recursively for them.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    pub images: Vec<PathBuf>,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let config = args.config.resolve()?;
    let device = args.device.resolve()?;
    maskrcnn::shim::set_tf32(config.precision.tf32);
    let model = MaskRcnn::from_weights(&config, &args.weights, device)?;
    let images = collect_images(&args.images).map_err(anyhow::Error::msg)?;
    let image_ids = match &args.ann {
        Some(ann) => {
            let dataset = maskrcnn::data::coco_json::read_dataset(ann)?;
            let named: Vec<(u64, String)> = dataset.images.into_iter().map(|im| (im.id, im.file_name)).collect();
            Some(match_image_ids(&images, &named).map_err(|e| anyhow::anyhow!("--ann {}: {e}", ann.display()))?)
        }
        None => None,
    };
    let opts =
        PredictOptions { json: args.json.clone(), draw: args.draw.clone(), draw_thresh: args.draw_thresh, image_ids };
    let summary = predict_files(&model, &images, &opts)?;
    eprintln!(
        "predicted {} image(s), {} detection(s){}{}",
        summary.images,
        summary.detections,
        args.json.as_ref().map(|p| format!(", results in {}", p.display())).unwrap_or_default(),
        args.draw.as_ref().map(|p| format!(", drawings in {}", p.display())).unwrap_or_default(),
    );
    if !summary.failed.is_empty() {
        bail!("{} of {} image(s) could not be read: {}", summary.failed.len(), images.len(), summary.failed.join("; "));
    }
    Ok(())
}
