//! COCO evaluation of a results file against ground truth, through hotcoco
//! (checked identical to pycocotools), with the inputs validated first so a
//! bad file is one clear error instead of a warning and a silently low AP.

use crate::text::one_line;
use hotcoco::{COCOeval, IouType, COCO};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read ground truth {path}: {message}")]
    GroundTruth { path: PathBuf, message: String },
    #[error("results {path}: {message}")]
    Results { path: PathBuf, message: String },
    #[error("results {path}: detection {index}: {message}")]
    Detection { path: PathBuf, index: usize, message: String },
    #[error("ground truth {path} has no segmentations, so segm cannot be evaluated")]
    NoGroundTruthMasks { path: PathBuf },
}

/// The 12 COCO summary numbers of one IoU type, and its printed summary.
#[derive(Debug, Clone, Serialize)]
pub struct TypeMetrics {
    /// AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    /// (-1 where nothing could be computed, as pycocotools).
    pub stats: Vec<f64>,
    #[serde(skip)]
    pub summary: Vec<String>,
}

/// bbox metrics always; segm metrics when the results carry segmentations.
#[derive(Debug, Clone, Serialize)]
pub struct CocoMetrics {
    pub bbox: TypeMetrics,
    pub segm: Option<TypeMetrics>,
}

/// pycocotools' 12 summary lines, character for character.
pub fn summary_lines(stats: &[f64]) -> Vec<String> {
    const ROWS: [(bool, &str, &str, u32); 12] = [
        (true, "0.50:0.95", "all", 100),
        (true, "0.50", "all", 100),
        (true, "0.75", "all", 100),
        (true, "0.50:0.95", "small", 100),
        (true, "0.50:0.95", "medium", 100),
        (true, "0.50:0.95", "large", 100),
        (false, "0.50:0.95", "all", 1),
        (false, "0.50:0.95", "all", 10),
        (false, "0.50:0.95", "all", 100),
        (false, "0.50:0.95", "small", 100),
        (false, "0.50:0.95", "medium", 100),
        (false, "0.50:0.95", "large", 100),
    ];
    ROWS.iter()
        .zip(stats)
        .map(|(&(ap, iou, area, dets), v)| {
            let (title, kind) = if ap { ("Average Precision", "(AP)") } else { ("Average Recall", "(AR)") };
            format!(" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={dets:>3} ] = {v:0.3}")
        })
        .collect()
}

/// Evaluates the COCO results file `results` (a JSON list of `image_id`,
/// `category_id`, `bbox` `[x, y, w, h]`, `score`, optional `segmentation`)
/// against the instances file `gt`.
pub fn evaluate_files(gt: &Path, results: &Path) -> Result<CocoMetrics, EvalError> {
    let gt_err = |message: String| EvalError::GroundTruth { path: gt.to_path_buf(), message: one_line(&message) };
    let res_err = |message: String| EvalError::Results { path: results.to_path_buf(), message: one_line(&message) };
    let coco_gt = COCO::new(gt).map_err(|e| gt_err(e.to_string()))?;
    let text = std::fs::read_to_string(results).map_err(|e| res_err(e.to_string()))?;
    let dets: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        res_err(format!("not a JSON list of detections (line {}, column {}): {e}", e.line(), e.column()))
    })?;
    let with_segm = validate(&coco_gt, &dets, results)?;
    let gt_has_masks = coco_gt.dataset.annotations.iter().any(|a| a.segmentation.is_some());
    if with_segm && !gt_has_masks {
        return Err(EvalError::NoGroundTruthMasks { path: gt.to_path_buf() });
    }
    let anns: Vec<hotcoco::Annotation> =
        serde_json::from_value(serde_json::Value::Array(dets)).map_err(|e| res_err(e.to_string()))?;
    let coco_dt = coco_gt.load_res_anns(anns).map_err(|e| res_err(e.to_string()))?;
    let gt = std::sync::Arc::new(coco_gt);
    let dt = std::sync::Arc::new(coco_dt);
    let run = |iou: IouType| -> Result<TypeMetrics, EvalError> {
        let mut ev = COCOeval::new(gt.clone(), dt.clone(), iou);
        ev.evaluate().map_err(|e| res_err(e.to_string()))?;
        ev.accumulate();
        let _ = ev.summarize_lines(); // computes the stats
        let stats = ev.stats().map(|s| s.to_vec()).unwrap_or_else(|| vec![-1.0; 12]);
        Ok(TypeMetrics { summary: summary_lines(&stats), stats })
    };
    let bbox = run(IouType::Bbox)?;
    let segm = if with_segm { Some(run(IouType::Segm)?) } else { None };
    Ok(CocoMetrics { bbox, segm })
}

/// Checks every detection: known image and category ids, a 4-number box of
/// non-negative size, a finite score, a well-formed RLE of the image's size.
/// Returns whether the detections carry segmentations.
fn validate(gt: &COCO, dets: &[serde_json::Value], path: &Path) -> Result<bool, EvalError> {
    let err = |index: usize, message: String| EvalError::Detection { path: path.to_path_buf(), index, message };
    let images: std::collections::HashMap<u64, (u32, u32)> =
        gt.dataset.images.iter().map(|im| (im.id, (im.height, im.width))).collect();
    let cats: HashSet<u64> = gt.dataset.categories.iter().map(|c| c.id).collect();
    let mut with_segm = None;
    for (i, d) in dets.iter().enumerate() {
        let id = |k: &str| d.get(k).and_then(serde_json::Value::as_u64);
        let image = id("image_id").ok_or_else(|| err(i, "missing or non-integer image_id".into()))?;
        let (h, w) =
            *images.get(&image).ok_or_else(|| err(i, format!("image_id {image} is not in the ground truth")))?;
        let cat = id("category_id").ok_or_else(|| err(i, "missing or non-integer category_id".into()))?;
        if !cats.contains(&cat) {
            return Err(err(i, format!("category_id {cat} is not in the ground truth")));
        }
        let score = d.get("score").and_then(serde_json::Value::as_f64);
        if !score.is_some_and(f64::is_finite) {
            return Err(err(i, "score must be a finite number".into()));
        }
        let bbox: Option<Vec<f64>> =
            d.get("bbox").and_then(|b| b.as_array()).map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect());
        match bbox {
            Some(b) if b.len() == 4 && b.iter().all(|v| v.is_finite()) && b[2] >= 0.0 && b[3] >= 0.0 => {}
            _ => return Err(err(i, "bbox must be [x, y, width, height] with non-negative width and height".into())),
        }
        let segm = d.get("segmentation").filter(|s| !s.is_null());
        if let Some(s) = segm {
            let size: Option<Vec<u64>> = s
                .get("size")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect());
            let counts = s.get("counts").and_then(serde_json::Value::as_str);
            match (size.as_deref(), counts) {
                (Some([sh, sw]), Some(c)) => {
                    // COCO allows images without height/width; check when given.
                    if h > 0 && w > 0 && (*sh, *sw) != (u64::from(h), u64::from(w)) {
                        return Err(err(
                            i,
                            format!("segmentation size [{sh}, {sw}] is not image {image}'s [{h}, {w}]"),
                        ));
                    }
                    let (h, w) = (u32::try_from(*sh).unwrap_or(u32::MAX), u32::try_from(*sw).unwrap_or(u32::MAX));
                    let rle = hotcoco::mask::rle_from_string(c, h, w)
                        .map_err(|e| err(i, format!("malformed RLE counts: {}", one_line(&e.to_string()))))?;
                    if rle.counts.iter().map(|&v| u64::from(v)).sum::<u64>() != u64::from(h) * u64::from(w) {
                        return Err(err(i, "malformed RLE counts: runs do not cover the image".into()));
                    }
                }
                _ => {
                    return Err(err(
                        i,
                        "segmentation must be a compressed RLE {\"size\": [h, w], \"counts\": \"...\"}".into(),
                    ))
                }
            }
        }
        match with_segm {
            None => with_segm = Some(segm.is_some()),
            Some(prev) if prev != segm.is_some() => {
                return Err(err(i, "some detections have a segmentation and others not".into()))
            }
            _ => {}
        }
    }
    Ok(with_segm.unwrap_or(false))
}
