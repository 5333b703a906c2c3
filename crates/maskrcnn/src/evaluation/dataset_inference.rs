//! Running a model over a COCO dataset's images and writing its detections in
//! the results format, with the dataset's own category ids.

use super::results::{to_results, CocoResult};
use crate::data::coco::path_inside;
use crate::data::image::{open_many, RgbImage};
use crate::modeling::MaskRcnn;
use crate::shim::AutocastGuard;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Why a dataset could not be run.
#[derive(Debug, thiserror::Error)]
pub enum DatasetInferenceError {
    #[error("cannot read ground truth {path}: {message}")]
    GroundTruth { path: PathBuf, message: String },
    #[error("{path}: {categories} categories (ids {ids}) do not fit model.num_classes = {num_classes}; use num_classes = {needed}, or 91 for torchvision's COCO label space")]
    Categories { path: PathBuf, categories: usize, ids: String, num_classes: usize, needed: usize },
    #[error(transparent)]
    Image(#[from] crate::data::image::ImageError),
    #[error("{gt}: image {id} file_name {file_name:?} leaves the image folder")]
    OutsideFolder { gt: PathBuf, id: u64, file_name: String },
    #[error("{path} is {width}x{height} but {gt} says {gt_width}x{gt_height} (image {id})")]
    SizeMismatch { path: PathBuf, width: u32, height: u32, gt: PathBuf, gt_width: u32, gt_height: u32, id: u64 },
}

/// How contiguous labels map to the dataset's category ids: torchvision's
/// COCO models (91 classes) predict the ids themselves; other models predict
/// 1..=K for the K categories sorted by id.
fn label_to_category(ids: &BTreeSet<u64>, num_classes: usize, path: &Path) -> Result<Vec<i64>, DatasetInferenceError> {
    if num_classes == 91 && ids.iter().all(|&i| (1..=90).contains(&i)) {
        return Ok((0..91).collect());
    }
    if num_classes == ids.len() + 1 {
        let mut map = vec![0i64];
        map.extend(ids.iter().map(|&i| i as i64));
        return Ok(map);
    }
    let shown: Vec<String> = ids.iter().take(8).map(u64::to_string).collect();
    Err(DatasetInferenceError::Categories {
        path: path.to_path_buf(),
        categories: ids.len(),
        ids: format!("{}{}", shown.join(", "), if ids.len() > 8 { ", ..." } else { "" }),
        num_classes,
        needed: ids.len() + 1,
    })
}

/// Runs `model` over every image of the COCO file `gt` (read from
/// `images_dir/<file_name>`), in batches of `test.ims_per_batch`, reporting
/// progress on stderr. An unreadable image is an error naming it.
pub fn infer_dataset(model: &MaskRcnn, gt: &Path, images_dir: &Path) -> Result<Vec<CocoResult>, DatasetInferenceError> {
    let coco = hotcoco::COCO::new(gt).map_err(|e| DatasetInferenceError::GroundTruth {
        path: gt.to_path_buf(),
        message: crate::text::one_line(&e.to_string()),
    })?;
    let ids: BTreeSet<u64> = coco.dataset.categories.iter().map(|c| c.id).collect();
    // Labels → ids: the model's own category table when it has one (trained
    // here), else the ground truth's categories in torchvision's or our order.
    let gt_map: Option<Vec<i64>> = match &model.categories {
        Some(table) => {
            let unknown: Vec<String> = table.ids().filter(|i| !ids.contains(i)).map(|i| i.to_string()).collect();
            if !unknown.is_empty() {
                tracing::warn!(
                    "the model's categories {} are not in {}: their detections are left out",
                    unknown.join(", "),
                    gt.display()
                );
            }
            None
        }
        None => Some(label_to_category(&ids, model.config.model.num_classes, gt)?),
    };
    let category_id = |l: i64| match &gt_map {
        Some(map) => map.get(l as usize).copied().unwrap_or(l),
        None => model.category_id(l),
    };
    let device = model.device();
    let images = &coco.dataset.images;
    let batch = model.config.test.ims_per_batch.max(1);
    let started = Instant::now();
    // A bar on a terminal; plain progress lines otherwise (logs, CI).
    let bar = indicatif::ProgressBar::new(images.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval {bar:40} {pos}/{len} images  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut out = Vec::new();
    // Batches are read and decoded on a thread of their own (open_many
    // decodes a batch's images in parallel) while the model runs on the
    // previous ones: at most two batches wait.
    let chunks: Vec<&[hotcoco::types::Image]> = images.chunks(batch).collect();
    let _amp = if device.is_cuda() { AutocastGuard::new(model.config.precision.amp.autocast_dtype()) } else { None };
    let max_pixels = model.config.input.max_image_pixels;
    std::thread::scope(|scope| -> Result<(), DatasetInferenceError> {
        let (send, receive) = std::sync::mpsc::sync_channel(2);
        let reader = scope.spawn(move || {
            for chunk in &chunks {
                let loaded = read_batch(chunk, gt, images_dir, max_pixels);
                let failed = loaded.is_err();
                if send.send(loaded).is_err() || failed {
                    return;
                }
            }
        });
        for (done, (chunk, loaded)) in images.chunks(batch).zip(receive).enumerate() {
            let loaded = loaded?;
            let tensors: Vec<tch::Tensor> = loaded.iter().map(|im| im.to_tensor(device)).collect();
            drop(loaded);
            let dets = model.predict_owned(tensors);
            for (im, det) in chunk.iter().zip(&dets) {
                let res = to_results(&im.file_name, det, category_id);
                out.extend(
                    res.into_iter()
                        .filter(|r| ids.contains(&(r.category_id as u64)))
                        .map(|r| CocoResult::from_result(im.id, r)),
                );
            }
            let n = ((done + 1) * batch).min(images.len());
            bar.set_position(n as u64);
            if bar.is_hidden() && (done % 10 == 9 || n == images.len()) {
                let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
                eprintln!("eval: {n}/{} images ({rate:.1} img/s)", images.len());
            }
        }
        // A panic of the reader goes on here, as its own.
        if let Err(panic) = reader.join() {
            std::panic::resume_unwind(panic);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    // The graphs' memory goes back (to training, when it evaluates).
    model.clear_graphs();
    Ok(out)
}

/// The images of `chunk` (entries of the COCO file `gt`) read from
/// `images_dir` and decoded, each checked against its annotated size:
/// results are in the annotated image's pixels, so another size is the
/// image's fault, named here (not later as a bad results file).
fn read_batch(
    chunk: &[hotcoco::types::Image],
    gt: &Path,
    images_dir: &Path,
    max_pixels: u64,
) -> Result<Vec<RgbImage>, DatasetInferenceError> {
    let paths: Vec<PathBuf> = chunk
        .iter()
        .map(|im| {
            path_inside(images_dir, &im.file_name).ok_or_else(|| DatasetInferenceError::OutsideFolder {
                gt: gt.to_path_buf(),
                id: im.id,
                file_name: im.file_name.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    let loaded: Vec<RgbImage> = open_many(&paths, max_pixels).into_iter().collect::<Result<_, _>>()?;
    for ((im, path), img) in chunk.iter().zip(&paths).zip(&loaded) {
        let annotated = (im.width, im.height);
        if annotated.0 > 0 && annotated.1 > 0 && (img.width, img.height) != annotated {
            return Err(DatasetInferenceError::SizeMismatch {
                path: path.clone(),
                width: img.width,
                height: img.height,
                gt: gt.to_path_buf(),
                gt_width: annotated.0,
                gt_height: annotated.1,
                id: im.id,
            });
        }
    }
    Ok(loaded)
}
