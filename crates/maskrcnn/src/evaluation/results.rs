//! COCO-style detection results, the format `predict --json` writes and
//! `eval --results` reads.

use crate::modeling::Detections;
use crate::structures::rle::{encode_windows_parallel, CompressedRle, MaskWindow};
use serde::{Deserialize, Serialize};
use tch::Kind;

/// One detection in original-image pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionResult {
    pub file_name: String,
    pub category_id: i64,
    pub score: f64,
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    pub segmentation: CompressedRle,
}

/// Converts one image's detections (masks pasted, original size) into results;
/// masks are binarized at 0.5. `category_id` maps contiguous labels to the
/// dataset's ids (identity when none is known).
pub fn to_results(file_name: &str, det: &Detections, category_id: impl Fn(i64) -> i64) -> Vec<DetectionResult> {
    let boxes = crate::ops::boxes::to_vec_f32(&det.boxes.reshape([-1]));
    let scores = crate::ops::boxes::to_vec_f32(&det.scores);
    let labels = crate::ops::boxes::to_vec_i64(&det.labels);
    let n = scores.len();
    let rles: Vec<CompressedRle> = match &det.masks {
        Some(m) if n > 0 => {
            let (h, w) = (m.size()[2], m.size()[3]);
            let windows = mask_windows(&m.squeeze_dim(1).gt(0.5));
            encode_windows_parallel(&windows, h as usize, w as usize)
        }
        _ => vec![CompressedRle { size: [0, 0], counts: String::new() }; n],
    };
    rles.into_iter()
        .enumerate()
        .map(|(i, segmentation)| {
            let b = &boxes[4 * i..4 * i + 4];
            DetectionResult {
                file_name: file_name.to_string(),
                category_id: category_id(labels[i]),
                score: f64::from(scores[i]),
                bbox: [f64::from(b[0]), f64::from(b[1]), f64::from(b[2] - b[0]), f64::from(b[3] - b[1])],
                segmentation,
            }
        })
        .collect()
}

/// The foreground window of each of `masks` `[D, H, W]` (bool, any device):
/// row/column occupancy is reduced on the device, and only the windows are
/// copied to the host — never the full-image masks.
pub fn mask_windows(masks: &tch::Tensor) -> Vec<MaskWindow> {
    let d = masks.size()[0];
    let rows = crate::ops::boxes::to_vec_i64(&masks.any_dim(2, false).reshape([-1]));
    let cols = crate::ops::boxes::to_vec_i64(&masks.any_dim(1, false).reshape([-1]));
    let (h, w) = (masks.size()[1] as usize, masks.size()[2] as usize);
    (0..d as usize)
        .map(|i| {
            let r = &rows[i * h..(i + 1) * h];
            let c = &cols[i * w..(i + 1) * w];
            let (Some(y0), Some(y1), Some(x0), Some(x1)) = (
                r.iter().position(|&v| v != 0),
                r.iter().rposition(|&v| v != 0),
                c.iter().position(|&v| v != 0),
                c.iter().rposition(|&v| v != 0),
            ) else {
                return MaskWindow { x0: 0, y0: 0, width: 0, height: 0, pixels: Vec::new() };
            };
            let (width, height) = (x1 - x0 + 1, y1 - y0 + 1);
            let crop = masks
                .get(i as i64)
                .narrow(0, y0 as i64, height as i64)
                .narrow(1, x0 as i64, width as i64)
                .to_kind(Kind::Uint8)
                .to_device(tch::Device::Cpu)
                .contiguous();
            let mut pixels = vec![0u8; width * height];
            crop.copy_data(&mut pixels, width * height);
            MaskWindow { x0, y0, width, height, pixels }
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
    pub segmentation: CompressedRle,
}

impl CocoResult {
    pub fn from_result(image_id: u64, r: DetectionResult) -> CocoResult {
        CocoResult { image_id, category_id: r.category_id, score: r.score, bbox: r.bbox, segmentation: r.segmentation }
    }
}
