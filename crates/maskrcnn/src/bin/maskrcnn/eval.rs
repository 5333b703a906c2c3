//! `maskrcnn eval`: COCO metrics of a results file, or of a model run over
//! the dataset's images.

use crate::args::{ConfigArgs, DeviceArg};
use anyhow::{bail, Result};
use clap::Args;
use maskrcnn::evaluation::ground_truth::GroundTruth;
use maskrcnn::MaskRcnn;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// Ground truth: a COCO instances JSON.
    #[arg(long, value_name = "GT.json")]
    pub ann: PathBuf,
    /// Detections in the COCO results format (instead of running a model).
    #[arg(long, value_name = "DETS.json", conflicts_with_all = ["weights", "images", "out"])]
    pub results: Option<PathBuf>,
    /// Model weights to run over the dataset (with --images).
    #[arg(long, value_name = "FILE", requires = "images")]
    pub weights: Option<PathBuf>,
    /// Folder holding the dataset's images (with --weights).
    #[arg(long, value_name = "DIR", requires = "weights")]
    pub images: Option<PathBuf>,
    /// Where the model's detections are written (default: detections.json).
    #[arg(long, value_name = "DETS.json")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Also write the numbers as JSON here.
    #[arg(long, value_name = "OUT.json")]
    pub metrics: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    use maskrcnn::evaluation::coco_eval::{evaluate, read_results};
    let gt = GroundTruth::load(&args.ann)?;
    let metrics = match (&args.results, &args.weights, &args.images) {
        (Some(r), _, _) => evaluate(&gt, read_results(r)?, r, None)?,
        (None, Some(weights), Some(images)) => {
            let config = args.config.resolve()?;
            let device = args.device.resolve()?;
            maskrcnn::shim::set_tf32(config.precision.tf32);
            let model = MaskRcnn::from_weights(&config, weights, device)?;
            let dets = maskrcnn::evaluation::dataset_inference::infer_dataset(&model, &gt, images)?;
            let out = args.out.clone().unwrap_or_else(|| PathBuf::from("detections.json"));
            maskrcnn::io::write_json_atomic(&out, &dets.results)?;
            eprintln!("{} detections written to {}", dets.results.len(), out.display());
            maskrcnn::evaluation::coco_eval::evaluate_run(&gt, &dets, &out)?
        }
        _ => bail!("eval needs --results DETS.json, or --weights W and --images DIR"),
    };
    for (name, m) in [("bbox", Some(&metrics.bbox)), ("segm", metrics.segm.as_ref())] {
        if let Some(m) = m {
            println!("IoU type: {name}");
            for line in &m.summary {
                println!("{line}");
            }
            println!("{name} AP per category, worst first (AP: IoU 0.50:0.95, all areas, 100 detections):");
            for line in m.category_table() {
                println!("{line}");
            }
        }
    }
    for note in &metrics.notes {
        eprintln!("note: {note}");
    }
    if let Some(path) = &args.metrics {
        maskrcnn::io::write_json_atomic(path, &metrics)?;
    }
    Ok(())
}
