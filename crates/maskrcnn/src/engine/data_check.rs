//! The check of a run's data before training starts, so that a bad file is
//! found in seconds rather than by the final evaluation hours later: every
//! training image must exist (a `stat`, not a decode: 118k images take
//! seconds), every validation image must exist, decode and have the size
//! its annotation says (after EXIF orientation), and the validation
//! categories must fit the training set's. One report; with `--strict` any
//! problem is an error.

use crate::data::coco::{path_inside, CocoDataset};
use crate::data::image::{DecodeOptions, RgbImage};
use crate::evaluation::ground_truth::GroundTruth;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The words of a missing file's count.
const MISSING: (&str, &str) = ("file is missing", "files are missing");

/// Why the data check stopped the run.
#[derive(Debug, thiserror::Error)]
pub enum DataCheckError {
    #[error(transparent)]
    GroundTruth(#[from] crate::evaluation::ground_truth::GroundTruthError),
    #[error("{0}")]
    Unusable(String),
    #[error("the data check found {problems} problem(s) (strict mode: any problem is an error): {first}")]
    Strict { problems: usize, first: String },
}

/// Files of one kind with the same problem: how many, and the first few.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileProblem {
    pub count: usize,
    pub first: Vec<String>,
}

impl FileProblem {
    const SHOWN: usize = 3;

    fn add(&mut self, name: String) {
        self.count += 1;
        if self.first.len() < Self::SHOWN {
            self.first.push(name);
        }
    }

    /// `3 files are missing (first: a.jpg; b.jpg; c.jpg, ...)`; `what` is
    /// `(one, many)`: the words after the count.
    fn describe(&self, (one, many): (&str, &str)) -> String {
        let more = if self.count > self.first.len() { ", ..." } else { "" };
        format!("{} (first: {}{more})", crate::text::count(self.count, one, many), self.first.join("; "))
    }
}

/// What the check found.
#[derive(Debug, Default)]
pub struct DataCheck {
    /// The report, one finding a line (problems and facts).
    pub lines: Vec<String>,
    /// Problems among them (what `--strict` refuses).
    pub problems: Vec<String>,
    /// The validation ground truth, read once for every evaluation.
    pub validation: Option<GroundTruth>,
    /// Training images whose file is missing (left out of the dataset).
    pub missing_train: FileProblem,
}

impl DataCheck {
    /// Notes a problem: in the report, and counted for `--strict`.
    fn problem(&mut self, line: String) {
        self.problems.push(line.clone());
        self.lines.push(line);
    }
}

/// Checks `dataset`'s image files (records of missing files are removed
/// from it: they could not train) and, when configured, the validation set
/// of `val_ann`/`val_images` against the training categories.
pub fn check_run_data(
    dataset: &mut CocoDataset,
    validation: Option<(&Path, &Path)>,
    decode: DecodeOptions,
    strict: bool,
) -> Result<DataCheck, DataCheckError> {
    let mut check = DataCheck::default();
    let paths: Vec<PathBuf> = dataset.images.iter().map(|r| dataset.image_path(r)).collect();
    let exists = crate::structures::rle::map_parallel(&paths, |p| p.is_file());
    for (record, ok) in dataset.images.iter().zip(&exists) {
        if !ok {
            check.missing_train.add(record.file_name.clone());
        }
    }
    if check.missing_train.count > 0 {
        check.problem(format!(
            "train images: {} in {}: left out",
            check.missing_train.describe(MISSING),
            dataset.images_dir.display()
        ));
        let mut keep = exists.into_iter();
        dataset.images.retain(|_| keep.next().unwrap_or(false));
        if dataset.images.is_empty() {
            return Err(DataCheckError::Unusable(format!(
                "none of the {} training images is in {} (is data.train_images the right folder?)",
                paths.len(),
                dataset.images_dir.display()
            )));
        }
    }
    if let Some((ann, dir)) = validation {
        let gt = GroundTruth::load(ann)?;
        check_validation(&gt, dir, decode, dataset, &mut check)?;
        check.validation = Some(gt);
    }
    if strict && !check.problems.is_empty() {
        return Err(DataCheckError::Strict { problems: check.problems.len(), first: check.problems[0].clone() });
    }
    Ok(check)
}

/// The validation images (exist, decode, size) and categories.
fn check_validation(
    gt: &GroundTruth,
    dir: &Path,
    decode: DecodeOptions,
    dataset: &CocoDataset,
    check: &mut DataCheck,
) -> Result<(), DataCheckError> {
    let label = format!("val {}", gt.path.display());
    let images = &gt.coco.dataset.images;
    let mut problems: BTreeMap<(&str, &str), FileProblem> = BTreeMap::new();
    let paths: Vec<Option<PathBuf>> = images.iter().map(|im| path_inside(dir, &im.file_name)).collect();
    type Kind = (&'static str, &'static str);
    let verdicts = crate::structures::rle::map_parallel(&paths, |path| -> Result<RgbImage, (Kind, String)> {
        let Some(path) = path else {
            return Err((("file lies outside the image folder", "files lie outside the image folder"), String::new()));
        };
        if !path.is_file() {
            return Err((MISSING, String::new()));
        }
        // Decoded (and turned upright, as evaluation will), then only the
        // size is kept.
        RgbImage::open(path, decode)
            .map(|image| RgbImage { pixels: Vec::new(), ..image })
            .map_err(|e| (("file does not decode", "files do not decode"), e.to_string()))
    });
    for (im, verdict) in images.iter().zip(verdicts) {
        let name = im.file_name.clone();
        match verdict {
            Err((kind, why)) => problems.entry(kind).or_default().add(if why.is_empty() { name } else { why }),
            // COCO allows images without a size; checked when given.
            Ok(image) if im.width > 0 && im.height > 0 => {
                if let Some(why) = image.size_mismatch(im.width, im.height) {
                    problems
                        .entry(("image has another size than annotated", "images have another size than annotated"))
                        .or_default()
                        .add(format!("{name} {why}"));
                }
            }
            Ok(_) => {}
        }
    }
    let bad: usize = problems.values().map(|p| p.count).sum();
    check.lines.push(format!(
        "{label}: {} images, {} annotations{}",
        images.len(),
        gt.coco.dataset.annotations.len(),
        if bad > 0 {
            format!("; {} left out of every evaluation", crate::text::count(bad, "image will be", "images will be"))
        } else {
            String::new()
        }
    ));
    for (kind, p) in &problems {
        check.problem(format!("{label}: {}", p.describe(*kind)));
    }
    if bad == images.len() && !images.is_empty() {
        return Err(DataCheckError::Unusable(format!(
            "{label}: none of its {} images can be read from {} ({})",
            images.len(),
            dir.display(),
            check.problems.last().cloned().unwrap_or_default()
        )));
    }
    for note in &gt.notes {
        check.lines.push(format!("{label}: {note}"));
    }
    // Categories: the model predicts the training set's.
    let train: BTreeMap<u64, &str> = dataset.categories.0.iter().map(|c| (c.id, c.name.as_str())).collect();
    let val: BTreeMap<u64, &str> = gt.coco.dataset.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
    let only_train: Vec<u64> = train.keys().filter(|id| !val.contains_key(id)).copied().collect();
    let only_val: BTreeSet<u64> = val.keys().filter(|id| !train.contains_key(id)).copied().collect();
    if only_train.len() == train.len() {
        return Err(DataCheckError::Unusable(format!(
            "{label}: none of its category ids ({}) is a training category ({}): check data.val_ann",
            crate::text::ids_text(val.keys().copied()),
            crate::text::ids_text(train.keys().copied())
        )));
    }
    if !only_val.is_empty() {
        let with_gt: BTreeSet<u64> = gt.coco.dataset.annotations.iter().map(|a| a.category_id).collect();
        let annotated: Vec<u64> = only_val.iter().filter(|id| with_gt.contains(id)).copied().collect();
        if !annotated.is_empty() {
            check.problem(format!(
                "{label}: categories {} are not in the training set: the model cannot detect them, their AP is 0",
                crate::text::ids_text(annotated.into_iter())
            ));
        }
    }
    if !only_train.is_empty() {
        check.problem(format!(
            "{label}: training categories {} are not in it: their detections are left out of the evaluation",
            crate::text::ids_text(only_train.into_iter())
        ));
    }
    let renamed: Vec<String> = train
        .iter()
        .filter_map(|(id, name)| val.get(id).filter(|v| *v != name).map(|v| format!("{id} ({name:?} / {v:?})")))
        .collect();
    if !renamed.is_empty() {
        check.lines.push(format!(
            "{label}: category ids with other names than in training (matched by id): {}",
            renamed.into_iter().take(5).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}
