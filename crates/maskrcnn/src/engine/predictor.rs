//! Batch inference over image files: what `maskrcnn predict` runs.

use crate::data::image::{open_many, RgbImage};
use crate::evaluation::results::{to_results, DetectionResult};
use crate::modeling::MaskRcnn;
use crate::shim::AutocastGuard;
use crate::visualization::{draw_detections, Drawable};
use std::path::{Path, PathBuf};

/// Why a prediction run failed as a whole (single bad images are skipped).
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("cannot create {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(transparent)]
    WriteJson(#[from] crate::io::WriteError),
}

/// Where results go.
#[derive(Debug, Clone, Default)]
pub struct PredictOptions {
    /// COCO-style results JSON.
    pub json: Option<PathBuf>,
    /// Folder for one annotated PNG per image.
    pub draw: Option<PathBuf>,
    /// Minimum score of a drawn detection.
    pub draw_thresh: f64,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct PredictSummary {
    pub images: usize,
    pub detections: usize,
    /// Images that could not be read, with the reason.
    pub failed: Vec<String>,
}

/// Runs `model` over `paths` in batches of `test.ims_per_batch`, writing the
/// results JSON and drawings per `opts`. Unreadable images are reported on
/// stderr, skipped and listed in the summary.
pub fn predict_files(
    model: &MaskRcnn,
    paths: &[PathBuf],
    opts: &PredictOptions,
) -> Result<PredictSummary, PredictError> {
    if let Some(dir) = &opts.draw {
        std::fs::create_dir_all(dir).map_err(|source| PredictError::CreateDir { path: dir.clone(), source })?;
    }
    let device = model.device();
    let batch = model.config.test.ims_per_batch.max(1);
    let mut summary = PredictSummary::default();
    let mut results: Vec<DetectionResult> = Vec::new();
    let names = result_names(paths);
    for chunk in paths.chunks(batch) {
        let mut loaded = Vec::new();
        for (path, decoded) in chunk.iter().zip(open_many(chunk, model.config.input.max_image_pixels)) {
            match decoded {
                Ok(img) => loaded.push((path, img)),
                Err(e) => {
                    eprintln!("warning: skipping {e}");
                    summary.failed.push(e.to_string());
                }
            }
        }
        if loaded.is_empty() {
            continue;
        }
        let tensors: Vec<tch::Tensor> = loaded.iter().map(|(_, im)| im.to_tensor(device)).collect();
        let dets = {
            let _amp =
                if device.is_cuda() { AutocastGuard::new(model.config.precision.amp.autocast_dtype()) } else { None };
            model.predict_owned(tensors)
        };
        for ((path, img), det) in loaded.iter().zip(&dets) {
            let name = names.get(*path).cloned().unwrap_or_default();
            let res = to_results(&name, det, |l| model.category_id(l));
            summary.detections += res.len();
            if let Some(dir) = &opts.draw {
                draw_one(dir, &name, img, det, &res, model, opts.draw_thresh)?;
            }
            results.extend(res);
            summary.images += 1;
        }
    }
    if let Some(path) = &opts.json {
        crate::io::write_json_atomic(path, &results)?;
    }
    Ok(summary)
}

/// The `file_name` each image's results carry: its file name, or, where
/// several inputs share one (same name in different folders), the path as
/// given — results and drawings then stay apart.
fn result_names(paths: &[PathBuf]) -> std::collections::HashMap<&PathBuf, String> {
    let base = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut count: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for p in paths {
        *count.entry(base(p)).or_default() += 1;
    }
    paths.iter().map(|p| (p, if count[&base(p)] > 1 { p.display().to_string() } else { base(p) })).collect()
}

fn draw_one(
    dir: &Path,
    name: &str,
    img: &RgbImage,
    det: &crate::modeling::Detections,
    res: &[DetectionResult],
    model: &MaskRcnn,
    thresh: f64,
) -> Result<(), PredictError> {
    let keep: Vec<usize> = (0..res.len()).filter(|&i| res[i].score >= thresh).collect();
    let labels = crate::ops::boxes::to_vec_i64(&det.labels);
    let items: Vec<Drawable<'_>> = keep
        .iter()
        .map(|&i| {
            let r = &res[i];
            let [x, y, bw, bh] = r.bbox;
            Drawable {
                bbox: [x as f32, y as f32, (x + bw) as f32, (y + bh) as f32],
                mask: det.segmentations.is_some().then_some(&r.segmentation),
                caption: format!("{} {:.2}", model.class_name(labels[i]), r.score),
            }
        })
        .collect();
    // A name that is a path (file names repeated across folders) draws
    // to a file named after the whole path.
    let stem = Path::new(name).with_extension("").to_string_lossy().replace(['/', '\\'], "_");
    let stem = stem.trim_start_matches(['.', '_']);
    let out = dir.join(format!("{stem}.png"));
    draw_detections(img, &items, &out).map_err(|e| PredictError::Write { path: out, message: e.to_string() })
}
