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
    #[error(transparent)]
    Json(#[from] super::coco_json::JsonError),
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
    /// No usable mask (box-only annotation): no `segmentation`, an empty
    /// one, or only polygons of fewer than 3 points. It trains the box
    /// losses only.
    None,
}

impl InstanceMask {
    pub fn is_some(&self) -> bool {
        !matches!(self, InstanceMask::None)
    }
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
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Drop images without any usable annotation (the training view, as the
    /// seed's loader and torchvision's reference; `data.keep_empty_images`
    /// keeps them as negatives).
    pub drop_empty: bool,
    /// Any skipped annotation or image record is an error.
    pub strict: bool,
    /// An annotation without a mask gets its box as its mask
    /// (`data.box_as_mask`); else it has [`InstanceMask::None`].
    pub box_as_mask: bool,
}

/// What a load found, for the start-up report: counts of what was read,
/// used, changed and left out (the left-out records themselves are in
/// [`CocoDataset::skipped`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub images_in_file: usize,
    pub annotations_in_file: usize,
    /// Usable annotations (crowd regions included).
    pub instances: usize,
    pub crowd: usize,
    /// Non-crowd annotations without a `segmentation` key.
    pub no_segmentation: usize,
    /// Non-crowd annotations whose `segmentation` is `[]` or holds only empty lists.
    pub empty_segmentation: usize,
    /// Non-crowd annotations whose polygons all have fewer than 3 points.
    pub degenerate_polygons: usize,
    /// Whether those three kinds got their box as their mask (`data.box_as_mask`).
    pub box_as_mask: bool,
    /// Annotations without an `id` (ids do not matter for training).
    pub missing_ids: usize,
    /// Annotations whose `id` an earlier one has.
    pub duplicate_ids: usize,
    /// Usable images without any usable annotation.
    pub empty_images: usize,
    /// Whether those were dropped (else they train as negatives).
    pub empty_dropped: bool,
}

impl LoadReport {
    /// Non-crowd annotations without a mask.
    pub fn without_mask(&self) -> usize {
        self.no_segmentation + self.empty_segmentation + self.degenerate_polygons
    }

    /// The report's lines: what was used, then each finding with its count.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{} images and {} annotations in the file; {} annotations used ({} crowd regions)",
            self.images_in_file, self.annotations_in_file, self.instances, self.crowd
        )];
        let masks = self.instances - self.crowd;
        if self.without_mask() > 0 {
            let parts: Vec<String> = [
                (self.no_segmentation, "no \"segmentation\""),
                (self.empty_segmentation, "an empty \"segmentation\""),
                (self.degenerate_polygons, "only polygons of fewer than 3 points"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} with {what}"))
            .collect();
            let use_ = if self.box_as_mask {
                "their boxes are used as masks (data.box_as_mask = true)"
            } else {
                "they train the box losses, not the mask loss (data.box_as_mask = true fills their boxes in as masks)"
            };
            out.push(format!(
                "{} of {masks} annotations have no mask ({}): {use_}",
                self.without_mask(),
                parts.join(", ")
            ));
        }
        if self.missing_ids > 0 {
            let n = crate::text::count(self.missing_ids, "annotation has", "annotations have");
            out.push(format!("{n} no \"id\" (not needed for training)"));
        }
        if self.duplicate_ids > 0 {
            let n = crate::text::count(self.duplicate_ids, "annotation repeats", "annotations repeat");
            out.push(format!(
                "{n} an earlier annotation's \"id\" (not needed for training; evaluation renumbers them)"
            ));
        }
        if self.empty_images > 0 {
            let fate = if self.empty_dropped {
                "dropped (data.keep_empty_images = true trains them as negatives)"
            } else {
                "kept as negatives (data.keep_empty_images)"
            };
            let n = crate::text::count(self.empty_images, "image has", "images have");
            out.push(format!("{n} no usable annotation: {fate}"));
        }
        out
    }
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
    /// What the load found (counts).
    pub report: LoadReport,
}

impl CocoDataset {
    /// Reads `ann` (a COCO instances JSON) for images under `images_dir`.
    pub fn load(ann: &Path, images_dir: &Path, options: LoadOptions) -> Result<CocoDataset, DatasetError> {
        let dataset = super::coco_json::read_dataset(ann)?;
        Self::from_dataset(dataset, ann, images_dir, options)
    }

    /// Builds the training view of an already parsed dataset.
    pub fn from_dataset(
        dataset: Dataset,
        ann: &Path,
        images_dir: &Path,
        options: LoadOptions,
    ) -> Result<CocoDataset, DatasetError> {
        if let Some(message) = super::coco_json::structure_fault(&dataset) {
            return Err(DatasetError::Structure { path: ann.to_path_buf(), message });
        }
        let mut categories: Vec<Category> =
            dataset.categories.iter().map(|c| Category { id: c.id, name: c.name.clone() }).collect();
        categories.sort_by_key(|c| c.id);
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

        let mut report = LoadReport {
            images_in_file: images.len(),
            annotations_in_file: dataset.annotations.len(),
            box_as_mask: options.box_as_mask,
            empty_dropped: options.drop_empty,
            ..LoadReport::default()
        };
        // Ids do not matter for training (evaluation renumbers them): counted
        // for the report. 0 is what a missing id reads as.
        let mut annotation_ids = std::collections::HashSet::with_capacity(dataset.annotations.len());
        for a in &dataset.annotations {
            if a.id == 0 {
                report.missing_ids += 1;
            } else if !annotation_ids.insert(a.id) {
                report.duplicate_ids += 1;
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
                Ok((mut inst, absent)) => {
                    report.instances += 1;
                    report.crowd += usize::from(inst.crowd);
                    if !inst.crowd {
                        match absent {
                            Some(MaskAbsence::NoSegmentation) => report.no_segmentation += 1,
                            Some(MaskAbsence::Empty) => report.empty_segmentation += 1,
                            Some(MaskAbsence::Degenerate) => report.degenerate_polygons += 1,
                            None => {}
                        }
                    }
                    if options.box_as_mask && !inst.mask.is_some() {
                        let [x0, y0, x1, y1] = inst.bbox.map(f64::from);
                        inst.mask = InstanceMask::Polygons(vec![vec![x0, y0, x1, y0, x1, y1, x0, y1]]);
                    }
                    images[slot].instances.push(inst);
                }
                Err(reason) => skip(what(), reason)?,
            }
        }

        let images: Vec<ImageRecord> = images
            .into_iter()
            .zip(usable)
            .filter(|(im, ok)| {
                let empty = *ok && im.instances.is_empty();
                report.empty_images += usize::from(empty);
                *ok && !(options.drop_empty && empty)
            })
            .map(|(im, _)| im)
            .collect();
        Ok(CocoDataset {
            annotation_file: ann.to_path_buf(),
            images_dir: images_dir.to_path_buf(),
            images,
            categories: Categories(categories),
            skipped,
            report,
        })
    }

    /// Whether any non-crowd instance has a mask (else the data is box-only:
    /// `model.mask_on = "auto"` trains without the mask branch).
    pub fn has_masks(&self) -> bool {
        self.images.iter().flat_map(|im| &im.instances).any(|i| !i.crowd && i.mask.is_some())
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

/// Why an annotation has no mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MaskAbsence {
    /// No `segmentation` key (or `null`).
    NoSegmentation,
    /// `[]`, `[[]]`: how box-only exports often write "no mask".
    Empty,
    /// Polygons, but none with 3 or more points.
    Degenerate,
}

/// The usable form of one annotation (and why it has no mask, when it has
/// none), or why it is not usable. Without a mask the box is kept.
fn instance(
    bbox: Option<[f64; 4]>,
    segmentation: Option<Segmentation>,
    crowd: bool,
    label: i64,
    h: u32,
    w: u32,
) -> Result<(Instance, Option<MaskAbsence>), String> {
    let mut absent = None;
    let mask = match segmentation {
        None => {
            absent = Some(MaskAbsence::NoSegmentation);
            InstanceMask::None
        }
        Some(Segmentation::Polygon(polys)) => {
            if polys.iter().flatten().any(|v| !v.is_finite()) {
                return Err("polygon has a non-finite coordinate".into());
            }
            let empty = polys.iter().all(Vec::is_empty);
            let kept: Vec<Vec<f64>> = polys.into_iter().filter(|p| p.len() >= 6 && p.len() % 2 == 0).collect();
            if kept.is_empty() {
                absent = Some(if empty { MaskAbsence::Empty } else { MaskAbsence::Degenerate });
                InstanceMask::None
            } else {
                InstanceMask::Polygons(kept)
            }
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
            InstanceMask::None => return Err("has neither \"bbox\" nor a usable \"segmentation\"".into()),
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
    let bbox = [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32];
    Ok((Instance { bbox, label, crowd, mask }, absent))
}
