//! A COCO instances dataset, read into the training view: per image its
//! usable instances (boxes as xyxy pixels, contiguous labels, polygons or RLE,
//! crowd flag). Structural faults of the file stop with an error; a faulty
//! annotation or image record is skipped, counted and reported once with its
//! id (or, with `strict`, stops the load).

use crate::structures::{Categories, Category};
use hotcoco::types::{Dataset, Segmentation};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Why a dataset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: invalid COCO JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Structure { path: PathBuf, message: String },
    #[error("{path}: {skip} (strict mode: a bad sample is an error)")]
    Strict { path: PathBuf, skip: Skip },
}

/// `dir/file_name` when `file_name` is a relative path that stays inside
/// `dir` (no `..`, root or drive components); `None` otherwise, so an
/// annotation file cannot make us open files elsewhere.
pub fn path_inside(dir: &Path, file_name: &str) -> Option<PathBuf> {
    let name = Path::new(file_name);
    let inside = !file_name.is_empty()
        && name.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
    inside.then(|| dir.join(name))
}

/// One annotation or image that was left out, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    /// `"annotation 17"`, `"image 4"`.
    pub what: String,
    pub reason: String,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} skipped: {}", self.what, self.reason)
    }
}

/// An instance's mask as the file gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceMask {
    /// Polygons `[x0, y0, x1, y1, ...]` in image pixels, each ≥ 3 points.
    Polygons(Vec<Vec<f64>>),
    /// A run-length encoding of the whole image (column-major, as COCO).
    Rle(hotcoco::Rle),
    /// No segmentation given (box-only annotation).
    None,
}

/// One usable annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// `[x0, y0, x1, y1]` in pixels, clipped to the image, positive size.
    pub bbox: [f32; 4],
    /// Contiguous label in `1..=K` (categories sorted by id).
    pub label: i64,
    /// A crowd region: never a positive, only ignored.
    pub crowd: bool,
    pub mask: InstanceMask,
}

/// One training image and its instances.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    pub id: u64,
    pub file_name: String,
    pub height: u32,
    pub width: u32,
    pub instances: Vec<Instance>,
}

impl ImageRecord {
    /// Landscape (or square) images batch apart from portrait ones.
    pub fn is_landscape(&self) -> bool {
        self.width >= self.height
    }
}

/// What to keep when reading.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Drop images without any usable annotation (the training view, as the
    /// seed's loader); evaluation keeps them.
    pub drop_empty: bool,
    /// Any skipped annotation or image record is an error.
    pub strict: bool,
}

/// A COCO instances dataset in training form.
#[derive(Debug, Clone)]
pub struct CocoDataset {
    pub annotation_file: PathBuf,
    pub images_dir: PathBuf,
    pub images: Vec<ImageRecord>,
    /// Sorted by id; label `i + 1` is `categories.0[i]`.
    pub categories: Categories,
    /// Annotations and images left out, in file order.
    pub skipped: Vec<Skip>,
    /// Images dropped for having no usable annotation.
    pub dropped_empty: usize,
}

impl CocoDataset {
    /// Reads `ann` (a COCO instances JSON) for images under `images_dir`.
    pub fn load(ann: &Path, images_dir: &Path, options: LoadOptions) -> Result<CocoDataset, DatasetError> {
        let bytes = std::fs::read(ann).map_err(|e| DatasetError::Read {
            path: ann.to_path_buf(),
            message: format!("cannot read annotation file: {e}"),
        })?;
        let dataset: Dataset = serde_json::from_slice(&bytes).map_err(|e| DatasetError::Json {
            path: ann.to_path_buf(),
            message: crate::text::one_line(&e.to_string()),
        })?;
        drop(bytes);
        Self::from_dataset(dataset, ann, images_dir, options)
    }

    /// Builds the training view of an already parsed dataset.
    pub fn from_dataset(
        dataset: Dataset,
        ann: &Path,
        images_dir: &Path,
        options: LoadOptions,
    ) -> Result<CocoDataset, DatasetError> {
        let structure = |message: String| DatasetError::Structure { path: ann.to_path_buf(), message };
        if dataset.categories.is_empty() {
            return Err(structure("no categories: a COCO instances file needs a non-empty \"categories\" list".into()));
        }
        let mut categories: Vec<Category> =
            dataset.categories.iter().map(|c| Category { id: c.id, name: c.name.clone() }).collect();
        categories.sort_by_key(|c| c.id);
        if let Some(w) = categories.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(structure(format!("category id {} appears twice in \"categories\"", w[0].id)));
        }
        let label_of: HashMap<u64, i64> = categories.iter().enumerate().map(|(i, c)| (c.id, i as i64 + 1)).collect();

        let mut skipped = Vec::new();
        let mut skip = |what: String, reason: String| -> Result<(), DatasetError> {
            let s = Skip { what, reason };
            if options.strict {
                return Err(DatasetError::Strict { path: ann.to_path_buf(), skip: s });
            }
            skipped.push(s);
            Ok(())
        };

        let mut index: HashMap<u64, usize> = HashMap::with_capacity(dataset.images.len());
        let mut images: Vec<ImageRecord> = Vec::with_capacity(dataset.images.len());
        let mut usable: Vec<bool> = Vec::with_capacity(dataset.images.len());
        for im in dataset.images {
            if index.contains_key(&im.id) {
                return Err(structure(format!("image id {} appears twice in \"images\"", im.id)));
            }
            index.insert(im.id, images.len());
            // An image without a size cannot be batched by aspect ratio or
            // checked against its masks.
            usable.push(im.width > 0 && im.height > 0 && !im.file_name.is_empty());
            if !usable[usable.len() - 1] {
                skip(format!("image {}", im.id), "needs \"file_name\", \"width\" and \"height\"".into())?;
            } else if path_inside(Path::new(""), &im.file_name).is_none() {
                usable[images.len()] = false;
                skip(format!("image {}", im.id), format!("file_name {:?} leaves the image folder", im.file_name))?;
            }
            images.push(ImageRecord {
                id: im.id,
                file_name: im.file_name,
                height: im.height,
                width: im.width,
                instances: Vec::new(),
            });
        }

        // Annotation ids must be unique (0 is what a missing id reads as,
        // so it is not checked).
        let mut annotation_ids = std::collections::HashSet::with_capacity(dataset.annotations.len());
        for a in &dataset.annotations {
            if a.id != 0 && !annotation_ids.insert(a.id) {
                return Err(structure(format!("annotation id {} appears twice in \"annotations\"", a.id)));
            }
        }
        for a in dataset.annotations {
            let what = || format!("annotation {} (image {})", a.id, a.image_id);
            let Some(&slot) = index.get(&a.image_id) else {
                skip(what(), format!("image id {} is not in \"images\"", a.image_id))?;
                continue;
            };
            if !usable[slot] {
                continue;
            }
            let Some(&label) = label_of.get(&a.category_id) else {
                skip(what(), format!("category id {} is not in \"categories\"", a.category_id))?;
                continue;
            };
            let (h, w) = (images[slot].height, images[slot].width);
            match instance(a.bbox, a.segmentation, a.iscrowd, label, h, w) {
                Ok(inst) => images[slot].instances.push(inst),
                Err(reason) => skip(what(), reason)?,
            }
        }

        let mut dropped_empty = 0;
        let images: Vec<ImageRecord> = images
            .into_iter()
            .zip(usable)
            .filter(|(im, ok)| {
                let keep = *ok && !(options.drop_empty && im.instances.is_empty());
                dropped_empty += usize::from(*ok && !keep);
                keep
            })
            .map(|(im, _)| im)
            .collect();
        Ok(CocoDataset {
            annotation_file: ann.to_path_buf(),
            images_dir: images_dir.to_path_buf(),
            images,
            categories: Categories(categories),
            skipped,
            dropped_empty,
        })
    }

    /// Number of object classes including background (`K + 1`).
    pub fn num_classes(&self) -> usize {
        self.categories.num_classes()
    }

    /// Path of image `record` on disk.
    pub fn image_path(&self, record: &ImageRecord) -> PathBuf {
        // Records whose name leaves the folder were skipped at load.
        self.images_dir.join(&record.file_name)
    }

    /// One line per reason with counts and the first ids, for the log.
    pub fn skip_summary(&self) -> Vec<String> {
        let mut by_reason: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for s in &self.skipped {
            // Group by the reason's wording without the numbers in it.
            let key: String = s.reason.chars().filter(|c| !c.is_ascii_digit()).collect();
            by_reason.entry(key).or_default().push(&s.what);
        }
        by_reason
            .into_values()
            .map(|whats| {
                let first = self.skipped.iter().find(|s| s.what == whats[0]).map(|s| s.to_string()).unwrap_or_default();
                if whats.len() == 1 {
                    first
                } else {
                    format!("{first} (and {} more like it)", whats.len() - 1)
                }
            })
            .collect()
    }
}

/// The usable form of one annotation, or why it is not usable.
fn instance(
    bbox: Option<[f64; 4]>,
    segmentation: Option<Segmentation>,
    crowd: bool,
    label: i64,
    h: u32,
    w: u32,
) -> Result<Instance, String> {
    let mask = match segmentation {
        None => InstanceMask::None,
        Some(Segmentation::Polygon(polys)) => {
            if polys.iter().flatten().any(|v| !v.is_finite()) {
                return Err("polygon has a non-finite coordinate".into());
            }
            let total = polys.len();
            let kept: Vec<Vec<f64>> = polys.into_iter().filter(|p| p.len() >= 6 && p.len() % 2 == 0).collect();
            if kept.is_empty() {
                return Err(format!("none of its {total} polygon(s) has 3 or more points"));
            }
            InstanceMask::Polygons(kept)
        }
        Some(Segmentation::Rect(b)) => InstanceMask::Polygons(vec![Segmentation::rect_corners(&b).to_vec()]),
        Some(seg @ (Segmentation::CompressedRle { .. } | Segmentation::UncompressedRle { .. })) => {
            let rle =
                seg.to_rle(h, w).map_err(|e| format!("malformed RLE: {}", crate::text::one_line(&e.to_string())))?;
            if (rle.h, rle.w) != (h, w) {
                return Err(format!("RLE size [{}, {}] differs from the image's [{h}, {w}]", rle.h, rle.w));
            }
            InstanceMask::Rle(rle)
        }
        Some(_) => return Err("unsupported segmentation form".into()),
    };
    let [x, y, bw, bh] = match bbox {
        Some(b) => b,
        None => match &mask {
            InstanceMask::Polygons(p) => hotcoco::mask::to_bbox(
                &hotcoco::mask::fr_polys(p, h, w)
                    .map_err(|e| format!("polygon: {}", crate::text::one_line(&e.to_string())))?,
            ),
            InstanceMask::Rle(r) => hotcoco::mask::to_bbox(r),
            InstanceMask::None => return Err("has neither \"bbox\" nor \"segmentation\"".into()),
        },
    };
    if ![x, y, bw, bh].iter().all(|v| v.is_finite()) {
        return Err(format!("bbox [{x}, {y}, {bw}, {bh}] has a non-finite value"));
    }
    if bw < 0.0 || bh < 0.0 {
        return Err(format!("bbox [{x}, {y}, {bw}, {bh}] has a negative size"));
    }
    // As torchvision's reference loader: xyxy, clipped to the image, kept
    // only with positive width and height.
    let (wf, hf) = (f64::from(w), f64::from(h));
    let b = [x.clamp(0.0, wf), y.clamp(0.0, hf), (x + bw).clamp(0.0, wf), (y + bh).clamp(0.0, hf)];
    if b[2] <= b[0] || b[3] <= b[1] {
        return Err(format!("bbox [{x}, {y}, {bw}, {bh}] has no area inside the {w}x{h} image"));
    }
    Ok(Instance { bbox: [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32], label, crowd, mask })
}
