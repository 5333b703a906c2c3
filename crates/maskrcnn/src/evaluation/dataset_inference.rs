//! Running a model over a COCO dataset's images and writing its detections in
//! the results format, with the dataset's own category ids. An image that
//! cannot be read (missing, corrupt, another size than the annotations say)
//! is left out and reported, not the end of the evaluation.

use super::ground_truth::GroundTruth;
use super::results::{to_results, CocoResult};
use crate::data::coco::path_inside;
use crate::data::image::{open_many, DecodeOptions, RgbImage};
use crate::modeling::MaskRcnn;
use crate::shim::AutocastGuard;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Why a dataset could not be run.
#[derive(Debug, thiserror::Error)]
pub enum DatasetInferenceError {
    #[error("{path}: {categories} categories (ids {ids}) do not fit model.num_classes = {num_classes}; use num_classes = {needed}, or 91 for torchvision's COCO label space")]
    Categories { path: PathBuf, categories: usize, ids: String, num_classes: usize, needed: usize },
    #[error("{gt}: none of its {images} images could be read from {dir} (first: {first})")]
    NoImages { gt: PathBuf, images: usize, dir: PathBuf, first: String },
}

/// The detections of a dataset run.
#[derive(Debug, Default)]
pub struct DatasetDetections {
    pub results: Vec<CocoResult>,
    /// The ids of the images that ran.
    pub images: Vec<u64>,
    /// `(image id, why)` of the images that could not be read.
    pub failed: Vec<(u64, String)>,
}

impl DatasetDetections {
    /// One line on the images left out (`None` when none were).
    pub fn failure_note(&self) -> Option<String> {
        let (id, why) = self.failed.first()?;
        Some(format!(
            "{} of {} images could not be read and are left out of the evaluation (first: image {id}: {why})",
            self.failed.len(),
            self.failed.len() + self.images.len()
        ))
    }
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
    Err(DatasetInferenceError::Categories {
        path: path.to_path_buf(),
        categories: ids.len(),
        ids: crate::text::ids_text(ids.iter().copied()),
        num_classes,
        needed: ids.len() + 1,
    })
}

/// Runs `model` over every image of the ground truth `gt` (read from
/// `images_dir/<file_name>`), in batches of `test.ims_per_batch`, reporting
/// progress on stderr. An unreadable image is left out, counted and named
/// once (an error only when none can be read).
pub fn infer_dataset(
    model: &MaskRcnn,
    gt: &GroundTruth,
    images_dir: &Path,
) -> Result<DatasetDetections, DatasetInferenceError> {
    let coco = &gt.coco;
    let gt = gt.path.as_path();
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
        None => Some(label_to_category(&ids, model.num_classes(), gt)?),
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
    let mut out = DatasetDetections::default();
    // Batches are read and decoded on a thread of their own (open_many
    // decodes a batch's images in parallel) while the model runs on the
    // previous ones: at most two batches wait.
    let chunks: Vec<&[hotcoco::types::Image]> = images.chunks(batch).collect();
    let decode = DecodeOptions::of(&model.config.input);
    let _amp = if device.is_cuda() { AutocastGuard::new(model.config.precision.amp.autocast_dtype()) } else { None };
    std::thread::scope(|scope| {
        let (send, receive) = std::sync::mpsc::sync_channel(2);
        let reader = scope.spawn(move || {
            for chunk in &chunks {
                if send.send(read_batch(chunk, images_dir, decode)).is_err() {
                    return;
                }
            }
        });
        for (done, (chunk, loaded)) in images.chunks(batch).zip(receive).enumerate() {
            let mut ran = Vec::with_capacity(chunk.len());
            let mut tensors = Vec::with_capacity(chunk.len());
            for (im, image) in chunk.iter().zip(loaded) {
                match image {
                    Ok(image) => {
                        tensors.push(image.to_tensor(device));
                        ran.push(im);
                    }
                    Err(why) => {
                        if out.failed.is_empty() {
                            bar.suspend(|| tracing::warn!("{}: image {} left out: {why}", gt.display(), im.id));
                        }
                        out.failed.push((im.id, why));
                    }
                }
            }
            if !tensors.is_empty() {
                let dets = model.predict_owned(tensors);
                for (im, det) in ran.into_iter().zip(&dets) {
                    let res = to_results(&im.file_name, det, category_id);
                    out.results.extend(
                        res.into_iter()
                            .filter(|r| ids.contains(&(r.category_id as u64)))
                            .map(|r| CocoResult::from_result(im.id, r)),
                    );
                    out.images.push(im.id);
                }
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
    });
    bar.finish_and_clear();
    // The graphs' memory goes back (to training, when it evaluates).
    model.clear_graphs();
    if out.images.is_empty() && !out.failed.is_empty() {
        let (id, why) = &out.failed[0];
        return Err(DatasetInferenceError::NoImages {
            gt: gt.to_path_buf(),
            images: out.failed.len(),
            dir: images_dir.to_path_buf(),
            first: format!("image {id}: {why}"),
        });
    }
    if let Some(note) = out.failure_note() {
        tracing::warn!("{}: {note}", gt.display());
    }
    Ok(out)
}

/// The images of `chunk` (entries of a COCO file) read from `images_dir`
/// and decoded, each checked against its annotated size (results are in
/// the annotated image's pixels): per image, the image or why not.
fn read_batch(
    chunk: &[hotcoco::types::Image],
    images_dir: &Path,
    decode: DecodeOptions,
) -> Vec<Result<RgbImage, String>> {
    let paths: Vec<Option<PathBuf>> = chunk.iter().map(|im| path_inside(images_dir, &im.file_name)).collect();
    let readable: Vec<PathBuf> = paths.iter().flatten().cloned().collect();
    let mut decoded = open_many(&readable, decode).into_iter();
    chunk
        .iter()
        .zip(&paths)
        .map(|(im, path)| {
            let Some(path) = path else {
                return Err(format!("file_name {:?} leaves the image folder", im.file_name));
            };
            let image = decoded.next().ok_or("not decoded")?.map_err(|e| e.to_string())?;
            // COCO allows images without a size; checked when given.
            match image.size_mismatch(im.width, im.height).filter(|_| im.width > 0 && im.height > 0) {
                Some(why) => Err(format!("{} {why}", path.display())),
                None => Ok(image),
            }
        })
        .collect()
}
