//! COCO evaluation of detections against ground truth, through hotcoco
//! (checked identical to pycocotools), with the inputs validated first so a
//! bad file is one clear error instead of a warning and a silently low AP:
//! the 12 summary numbers and the AP of every category, for bbox and (when
//! both sides have masks) segm.

use super::ground_truth::{GroundTruth, GroundTruthError};
use crate::text::one_line;
use hotcoco::{COCOeval, IouType, COCO};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    GroundTruth(#[from] GroundTruthError),
    #[error("results {path}: {message}")]
    Results { path: PathBuf, message: String },
    #[error("results {path}: detection {index}: {message}")]
    Detection { path: PathBuf, index: usize, message: String },
}

/// One category's AP (IoU 0.50:0.95) and AP50, all areas, 100 detections:
/// pycocotools' `eval['precision'][:, :, k, 0, 2]` (and `[0, :, k, 0, 2]`)
/// averaged over its entries above -1; -1 when it has none (no ground truth).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryAp {
    pub id: u64,
    pub name: String,
    pub ap: f64,
    pub ap50: f64,
}

/// The 12 COCO summary numbers of one IoU type, its printed summary and
/// the per-category APs.
#[derive(Debug, Clone, Serialize)]
pub struct TypeMetrics {
    /// AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    /// (-1 where nothing could be computed, as pycocotools).
    pub stats: Vec<f64>,
    /// Every category of the ground truth, in id order.
    pub per_category: Vec<CategoryAp>,
    #[serde(skip)]
    pub summary: Vec<String>,
}

impl TypeMetrics {
    /// The per-category table as printed lines, worst AP first (categories
    /// without ground truth last).
    pub fn category_table(&self) -> Vec<String> {
        let mut rows: Vec<&CategoryAp> = self.per_category.iter().collect();
        rows.sort_by(|a, b| {
            let key = |c: &CategoryAp| if c.ap < 0.0 { f64::INFINITY } else { c.ap };
            key(a).total_cmp(&key(b)).then(a.id.cmp(&b.id))
        });
        let width = rows.iter().map(|c| c.name.chars().count()).max().unwrap_or(4).clamp(8, 32);
        let mut out = vec![format!(" {:>4}  {:<width$}  {:>6}  {:>6}", "id", "category", "AP", "AP50")];
        for c in rows {
            let shown = |v: f64| if v < 0.0 { "    -".to_string() } else { format!("{v:6.3}") };
            let name: String = c.name.chars().take(width).collect();
            out.push(format!(" {:>4}  {name:<width$}  {}  {}", c.id, shown(c.ap), shown(c.ap50)));
        }
        out
    }
}

/// bbox metrics always; segm metrics when the results carry segmentations
/// and the ground truth has masks.
#[derive(Debug, Clone, Serialize)]
pub struct CocoMetrics {
    pub bbox: TypeMetrics,
    pub segm: Option<TypeMetrics>,
    /// Images of the ground truth evaluated (all, unless some could not be run).
    pub images: usize,
    /// What the evaluation did that a reader should know (segm skipped,
    /// ids renumbered, images left out), one line each.
    pub notes: Vec<String>,
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
/// `category_id`, `bbox` `[x, y, w, h]`, `score`, optional `segmentation`;
/// other keys such as `predict`'s `file_name` are ignored) against the
/// instances file `gt`.
pub fn evaluate_files(gt: &Path, results: &Path) -> Result<CocoMetrics, EvalError> {
    let gt = GroundTruth::load(gt)?;
    evaluate(&gt, read_results(results)?, results, None)
}

/// Evaluates a model's run over `gt`'s images (`dets`, written to
/// `source`): on the images that ran, with a note on those that could not
/// be read.
pub fn evaluate_run(
    gt: &GroundTruth,
    dets: &super::dataset_inference::DatasetDetections,
    source: &Path,
) -> Result<CocoMetrics, EvalError> {
    let values = match serde_json::to_value(&dets.results) {
        Ok(serde_json::Value::Array(values)) => values,
        Ok(_) => Vec::new(),
        Err(e) => return Err(EvalError::Results { path: source.to_path_buf(), message: e.to_string() }),
    };
    let mut metrics = evaluate(gt, values, source, Some(&dets.images))?;
    metrics.notes.extend(dets.failure_note());
    Ok(metrics)
}

/// The detections of the results file `path` (a JSON list; BOM accepted).
pub fn read_results(path: &Path) -> Result<Vec<serde_json::Value>, EvalError> {
    crate::data::coco_json::read_json(path).map_err(|e| EvalError::Results {
        path: path.to_path_buf(),
        message: match e {
            crate::data::coco_json::JsonError::Parse { message, .. } => {
                format!("not a JSON list of detections: {message}")
            }
            crate::data::coco_json::JsonError::Read { message, .. } => message,
        },
    })
}

/// Evaluates detections `dets` (the results format; `source` names them in
/// errors) against `gt`, on the images `images` only when given (images that
/// could not be run are left out rather than counted as all missed).
pub fn evaluate(
    gt: &GroundTruth,
    dets: Vec<serde_json::Value>,
    source: &Path,
    images: Option<&[u64]>,
) -> Result<CocoMetrics, EvalError> {
    let res_err = |message: String| EvalError::Results { path: source.to_path_buf(), message: one_line(&message) };
    let with_segm = validate(&gt.coco, &dets, source)?;
    let mut notes = gt.notes.clone();
    if with_segm && !gt.has_masks() {
        notes.push(format!("segm not evaluated: {} has no masks", gt.path.display()));
    }
    // Keys hotcoco does not know (`file_name`) are dropped.
    let anns: Vec<hotcoco::Annotation> = dets
        .into_iter()
        .map(|mut d| {
            if let Some(o) = d.as_object_mut() {
                o.retain(|k, _| matches!(k.as_str(), "image_id" | "category_id" | "bbox" | "score" | "segmentation"));
            }
            serde_json::from_value(d)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| res_err(e.to_string()))?;
    let coco_dt = gt.coco.load_res_anns(anns).map_err(|e| res_err(e.to_string()))?;
    let dt = std::sync::Arc::new(coco_dt);
    let evaluated = images.map_or(gt.coco.dataset.images.len(), <[u64]>::len);
    let run = |iou: IouType| -> Result<TypeMetrics, EvalError> {
        let mut ev = COCOeval::new(gt.coco.clone(), dt.clone(), iou);
        if let Some(ids) = images {
            let mut ids = ids.to_vec();
            ids.sort_unstable();
            ev.params.img_ids = ids;
        }
        ev.evaluate().map_err(|e| res_err(e.to_string()))?;
        ev.accumulate();
        let _ = ev.summarize_lines(); // computes the stats
        let stats = ev.stats().map(|s| s.to_vec()).unwrap_or_else(|| vec![-1.0; 12]);
        Ok(TypeMetrics { summary: summary_lines(&stats), per_category: per_category(&ev, &gt.coco), stats })
    };
    let bbox = run(IouType::Bbox)?;
    let segm = if with_segm && gt.has_masks() { Some(run(IouType::Segm)?) } else { None };
    Ok(CocoMetrics { bbox, segm, images: evaluated, notes })
}

/// Every category's AP and AP50 (all areas, the most detections) from an
/// accumulated evaluation, in the ground truth's id order.
fn per_category(ev: &COCOeval, gt: &COCO) -> Vec<CategoryAp> {
    let Some(acc) = ev.accumulated() else {
        return Vec::new();
    };
    let (a, m) = (ev.params.all_area_idx(), ev.params.max_det_idx());
    let t50 = ev.params.iou_thr_idx(0.5);
    let shape = acc.shape;
    let mean = |k: usize, thresholds: &mut dyn Iterator<Item = usize>| {
        let (mut sum, mut n) = (0.0, 0usize);
        for t in thresholds {
            for r in 0..shape.r {
                let p = acc.precision[acc.precision_idx(t, r, k, a, m)];
                if p > -1.0 {
                    sum += p;
                    n += 1;
                }
            }
        }
        if n == 0 {
            -1.0
        } else {
            sum / n as f64
        }
    };
    acc.cat_ids
        .iter()
        .enumerate()
        .map(|(k, &id)| CategoryAp {
            id,
            name: gt.get_cat(id).map_or_else(|| format!("category {id}"), |c| c.name.clone()),
            ap: mean(k, &mut (0..shape.t)),
            ap50: t50.map_or(-1.0, |t| mean(k, &mut std::iter::once(t))),
        })
        .collect()
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
