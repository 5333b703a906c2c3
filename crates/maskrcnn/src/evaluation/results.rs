//! COCO-style detection results, the format `predict --json` writes and
//! `eval --results` reads.

use crate::modeling::Detections;
use crate::structures::rle::CompressedRle;
use serde::{Deserialize, Serialize};

/// One detection in original-image pixels, as `predict --json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionResult {
    pub file_name: String,
    /// The image's id in the annotation file `predict --ann` was given, so
    /// `eval --results` scores these results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<u64>,
    pub category_id: i64,
    pub score: f64,
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    /// `None` for a model without the mask branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<CompressedRle>,
}

/// Converts one image's detections (masks pasted, original size) into results;
/// masks are binarized at 0.5. `category_id` maps contiguous labels to the
/// dataset's ids (identity when none is known).
pub fn to_results(file_name: &str, det: &Detections, category_id: impl Fn(i64) -> i64) -> Vec<DetectionResult> {
    let boxes = crate::ops::boxes::to_vec_f32(&det.boxes.reshape([-1]));
    let scores = crate::ops::boxes::to_vec_f32(&det.scores);
    let labels = crate::ops::boxes::to_vec_i64(&det.labels);
    let n = scores.len();
    let rles: Vec<Option<CompressedRle>> = match &det.segmentations {
        Some(r) if r.len() == n => r.iter().cloned().map(Some).collect(),
        _ => vec![None; n],
    };
    rles.into_iter()
        .enumerate()
        .map(|(i, segmentation)| {
            let b = &boxes[4 * i..4 * i + 4];
            DetectionResult {
                file_name: file_name.to_string(),
                image_id: None,
                category_id: category_id(labels[i]),
                score: f64::from(scores[i]),
                bbox: [f64::from(b[0]), f64::from(b[1]), f64::from(b[2] - b[0]), f64::from(b[3] - b[1])],
                segmentation,
            }
        })
        .collect()
}

/// One detection in the COCO results format (`image_id` instead of a file
/// name), as `eval` writes and reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoResult {
    pub image_id: u64,
    pub category_id: i64,
    pub score: f64,
    pub bbox: [f64; 4],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<CompressedRle>,
}

impl CocoResult {
    pub fn from_result(image_id: u64, r: DetectionResult) -> CocoResult {
        CocoResult { image_id, category_id: r.category_id, score: r.score, bbox: r.bbox, segmentation: r.segmentation }
    }
}
