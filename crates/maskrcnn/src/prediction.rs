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
    /// The image id of each input (in input order), written into the
    /// results so `eval --results` scores them (`predict --ann`).
    pub image_ids: Option<Vec<u64>>,
}

/// The file extensions taken from a folder.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The images `inputs` name: files as given (one that cannot be read is
/// reported when its turn comes), folders searched recursively for `.jpg`,
/// `.jpeg` and `.png` files (any case), in path order. A folder without
/// images is an error.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = out.len();
            walk(input, &mut out).map_err(|e| format!("{}: {e}", input.display()))?;
            if out.len() == before {
                return Err(format!("{}: no .jpg, .jpeg or .png file in this folder", input.display()));
            }
            out[before..].sort();
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The id of each of `paths` among `images` (a COCO file's `(id,
/// file_name)`): the image whose `file_name` the path ends with (whole
/// components: `val/a.jpg` matches `data/val/a.jpg`, not `data/xval/a.jpg`).
/// An image that matches none, or several, is an error naming it.
pub fn match_image_ids(paths: &[PathBuf], images: &[(u64, String)]) -> Result<Vec<u64>, String> {
    let mut by_name: std::collections::HashMap<&std::ffi::OsStr, Vec<(u64, &Path)>> = std::collections::HashMap::new();
    for (id, name) in images {
        let p = Path::new(name.as_str());
        if let Some(base) = p.file_name() {
            by_name.entry(base).or_default().push((*id, p));
        }
    }
    let (mut ids, mut unmatched, mut ambiguous) = (Vec::with_capacity(paths.len()), Vec::new(), Vec::new());
    for path in paths {
        let candidates: Vec<u64> = path
            .file_name()
            .and_then(|b| by_name.get(b))
            .map(|c| c.iter().filter(|(_, name)| path.ends_with(name)).map(|(id, _)| *id).collect())
            .unwrap_or_default();
        match candidates[..] {
            [id] => ids.push(id),
            [] => unmatched.push(path.display().to_string()),
            _ => ambiguous.push(path.display().to_string()),
        }
    }
    let first = |v: &[String]| v.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
    if !unmatched.is_empty() {
        return Err(format!(
            "{} of {} images have no file_name in the annotation file that their path ends with (first: {})",
            unmatched.len(),
            paths.len(),
            first(&unmatched)
        ));
    }
    if !ambiguous.is_empty() {
        return Err(format!(
            "{} images match several file_names of the annotation file (first: {}); give paths that tell them apart",
            ambiguous.len(),
            first(&ambiguous)
        ));
    }
    Ok(ids)
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
    let ids: std::collections::HashMap<&PathBuf, u64> = match &opts.image_ids {
        Some(ids) => paths.iter().zip(ids.iter().copied()).collect(),
        None => std::collections::HashMap::new(),
    };
    for chunk in paths.chunks(batch) {
        let mut loaded = Vec::new();
        for (path, decoded) in
            chunk.iter().zip(open_many(chunk, crate::data::image::DecodeOptions::of(&model.config.input)))
        {
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
            let mut res = to_results(&name, det, |l| model.category_id(l));
            if let Some(&id) = ids.get(*path) {
                res.iter_mut().for_each(|r| r.image_id = Some(id));
            }
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
                mask: r.segmentation.as_ref(),
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
