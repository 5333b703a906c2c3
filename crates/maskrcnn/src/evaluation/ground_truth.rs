//! Ground truth for COCO evaluation, read as labeling tools write it:
//! annotation ids that are missing or repeated are renumbered (a duplicate
//! id makes pycocotools-style matching pair detections with the wrong
//! annotation: a silently wrong AP), and what the file lacks for the
//! evaluation is noted — no masks at all (bbox only), masks on only some
//! annotations (segm counts the rest as masks never found).

use crate::data::coco_json::{read_dataset, JsonError};
use hotcoco::types::Segmentation;
use hotcoco::COCO;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why ground truth could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GroundTruthError {
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("ground truth {path}: {message}")]
    Structure { path: PathBuf, message: String },
}

/// A COCO instances file ready for evaluation.
#[derive(Clone)]
pub struct GroundTruth {
    pub path: PathBuf,
    pub coco: Arc<COCO>,
    /// Non-crowd annotations with a usable mask (a polygon of 3 or more
    /// points, or an RLE), and without one.
    pub with_mask: usize,
    pub without_mask: usize,
    /// What was changed or is worth knowing, one line each (also logged
    /// when loaded).
    pub notes: Vec<String>,
}

impl std::fmt::Debug for GroundTruth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroundTruth({}, {} images)", self.path.display(), self.coco.dataset.images.len())
    }
}

impl GroundTruth {
    /// Reads `path`, renumbering annotation ids when any is missing or
    /// repeated (1, 2, ... in file order; results never refer to them).
    pub fn load(path: &Path) -> Result<GroundTruth, GroundTruthError> {
        let mut dataset = read_dataset(path)?;
        if let Some(message) = crate::data::coco_json::structure_fault(&dataset) {
            return Err(GroundTruthError::Structure { path: path.to_path_buf(), message });
        }
        let mut notes = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(dataset.annotations.len());
        let missing = dataset.annotations.iter().filter(|a| a.id == 0).count();
        let repeated = dataset.annotations.iter().filter(|a| a.id != 0 && !seen.insert(a.id)).count();
        if missing + repeated > 0 {
            for (i, a) in dataset.annotations.iter_mut().enumerate() {
                a.id = i as u64 + 1;
            }
            let what: Vec<String> = [(missing, "have no \"id\""), (repeated, "repeat an earlier \"id\"")]
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, w)| format!("{n} {w}"))
                .collect();
            notes.push(format!("annotations renumbered 1..={} ({})", dataset.annotations.len(), what.join(", ")));
        }
        let (mut with_mask, mut without_mask) = (0, 0);
        for a in dataset.annotations.iter().filter(|a| !a.iscrowd) {
            if has_mask(a.segmentation.as_ref()) {
                with_mask += 1;
            } else {
                without_mask += 1;
            }
        }
        if with_mask == 0 {
            notes.push("no annotation has a mask: bbox is evaluated, segm is not".into());
        } else if without_mask > 0 {
            notes.push(format!(
                "{without_mask} of {} annotations have no mask: segm AP counts them as masks never found (bbox AP is not affected)",
                with_mask + without_mask
            ));
        }
        Ok(GroundTruth {
            path: path.to_path_buf(),
            coco: Arc::new(COCO::from_dataset(dataset)),
            with_mask,
            without_mask,
            notes,
        })
    }

    /// Whether any annotation has a mask (segm can be evaluated).
    pub fn has_masks(&self) -> bool {
        self.with_mask > 0
    }
}

/// Whether a segmentation holds a usable mask: a polygon of 3 or more
/// points, or an RLE (a box as a polygon counts; absence or `[]` does not).
fn has_mask(segmentation: Option<&Segmentation>) -> bool {
    match segmentation {
        None => false,
        Some(Segmentation::Polygon(polys)) => polys.iter().any(|p| p.len() >= 6),
        Some(_) => true,
    }
}
