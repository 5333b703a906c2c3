//! `maskrcnn synth`: a deterministic COCO-format dataset of textured shapes on
//! cluttered backgrounds — the demo's data and the tests' data.
//!
//! Six classes (category ids 1, 2, 3, 5, 8, 13: not contiguous, as COCO's),
//! 1–10 instances per image drawn in z-order so later shapes occlude earlier
//! ones; each annotation is the *visible* part: a polygon when the shape is
//! unoccluded, a compressed RLE when it is partly hidden (rings, having a
//! hole, are always RLE). Some images hold a crowd region (a cluster of small
//! shapes of one class, uncompressed RLE, `iscrowd: 1`). Colours and textures
//! are independent of the class, and the background carries distractor
//! blobs, so the model has to learn shape.

use crate::random::Rng;
use crate::structures::rle::{rle_into_bitmap, row_to_column};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The classes: `(category id, name)`.
pub const CATEGORIES: [(u64, &str); 6] =
    [(1, "circle"), (2, "rectangle"), (3, "triangle"), (5, "star"), (8, "hexagon"), (13, "ring")];

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub train: usize,
    pub val: usize,
    pub seed: u64,
    /// Each image side is drawn uniformly from `[min, max]` pixels.
    pub size: (u32, u32),
    /// Write only the annotation files (no pixels, no occlusion): for
    /// benchmarking annotation loading at COCO scale.
    pub annotations_only: bool,
}

/// Paths of what was written.
#[derive(Debug, Clone)]
pub struct SynthOutput {
    pub train_ann: PathBuf,
    pub train_images: PathBuf,
    pub val_ann: PathBuf,
    pub val_images: PathBuf,
    pub annotations: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Options(String),
}

#[derive(Serialize)]
struct JsonImage {
    id: u64,
    file_name: String,
    height: u32,
    width: u32,
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonSegmentation {
    Polygons(Vec<Vec<f64>>),
    Compressed { size: [u32; 2], counts: String },
    Uncompressed { size: [u32; 2], counts: Vec<u32> },
}

#[derive(Serialize)]
struct JsonAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    area: f64,
    iscrowd: u8,
    segmentation: JsonSegmentation,
}

#[derive(Serialize)]
struct JsonCategory {
    id: u64,
    name: &'static str,
    supercategory: &'static str,
}

#[derive(Serialize)]
struct JsonDataset<'a> {
    images: &'a [JsonImage],
    annotations: &'a [JsonAnnotation],
    categories: Vec<JsonCategory>,
}

/// The largest image side generated (larger ones exhaust memory, not test
/// anything more).
pub const MAX_SIDE: u32 = 8192;

/// Generates the train and val splits under `options.out`:
/// `train2017/`, `val2017/` (JPEG) and `annotations/instances_{train,val}2017.json`.
pub fn generate(options: &SynthOptions) -> Result<SynthOutput, SynthError> {
    let (lo, hi) = options.size;
    if lo < 32 || hi < lo || hi > MAX_SIDE {
        return Err(SynthError::Options(format!("--size {lo},{hi}: need 32 <= MIN <= MAX <= {MAX_SIDE}")));
    }
    if options.train + options.val == 0 {
        return Err(SynthError::Options("nothing to generate: --train and --val are both 0".into()));
    }
    let io = |path: &Path, e: std::io::Error| SynthError::Io { path: path.to_path_buf(), message: e.to_string() };
    let ann_dir = options.out.join("annotations");
    std::fs::create_dir_all(&ann_dir).map_err(|e| io(&ann_dir, e))?;
    let mut annotations = 0;
    let mut paths = Vec::new();
    for (split, count, stream) in [("train2017", options.train, 1u64), ("val2017", options.val, 2u64)] {
        let image_dir = options.out.join(split);
        if !options.annotations_only {
            std::fs::create_dir_all(&image_dir).map_err(|e| io(&image_dir, e))?;
        }
        let (images, anns) = generate_split(options, count, stream, &image_dir)?;
        annotations += anns.len();
        let ann_path = ann_dir.join(format!("instances_{split}.json"));
        let categories =
            CATEGORIES.iter().map(|&(id, name)| JsonCategory { id, name, supercategory: "shape" }).collect();
        write_json(&ann_path, &JsonDataset { images: &images, annotations: &anns, categories })?;
        paths.push((ann_path, image_dir));
    }
    let (val_ann, val_images) = paths.pop().unwrap_or_default();
    let (train_ann, train_images) = paths.pop().unwrap_or_default();
    Ok(SynthOutput { train_ann, train_images, val_ann, val_images, annotations })
}

/// Writes `value` as JSON to a temporary file renamed over `path`.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SynthError> {
    let io = |e: std::io::Error| SynthError::Io { path: path.to_path_buf(), message: e.to_string() };
    let tmp = path.with_extension("json.tmp");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    serde_json::to_writer(&mut w, value).map_err(|e| io(e.into()))?;
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Images and annotations of one split, rendered on all cores.
fn generate_split(
    options: &SynthOptions,
    count: usize,
    stream: u64,
    image_dir: &Path,
) -> Result<(Vec<JsonImage>, Vec<JsonAnnotation>), SynthError> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, count.max(1));
    let chunk = count.div_ceil(threads).max(1);
    type Part = Result<Vec<(JsonImage, Vec<JsonAnnotation>)>, SynthError>;
    let results: Vec<Part> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + chunk).min(count))
                        .map(|i| {
                            let mut rng = Rng::derive(options.seed, stream, i as u64);
                            let id = i as u64 + 1;
                            render_image(&mut rng, id, options, image_dir)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(SynthError::Options("a generator thread failed".into()))))
            .collect()
    });
    let mut images = Vec::with_capacity(count);
    let mut anns = Vec::new();
    for part in results {
        for (image, mut a) in part? {
            images.push(image);
            anns.append(&mut a);
        }
    }
    for (k, a) in anns.iter_mut().enumerate() {
        a.id = k as u64 + 1;
    }
    Ok((images, anns))
}

/// A shape instance: its class index into [`CATEGORIES`] and outline.
struct Shape {
    class: usize,
    /// Outer polygons (unioned); the ring's hole is `hole`.
    polygons: Vec<Vec<f64>>,
    hole: Option<Vec<f64>>,
}

fn regular_polygon(cx: f64, cy: f64, r: f64, n: usize, rot: f64, radii: &[f64]) -> Vec<f64> {
    (0..n)
        .flat_map(|k| {
            let a = rot + k as f64 * std::f64::consts::TAU / n as f64;
            let rr = r * radii[k % radii.len()];
            [round2(cx + rr * a.cos()), round2(cy + rr * a.sin())]
        })
        .collect()
}

/// `poly` with edges split at their midpoints until it has `min_points`.
fn densify(poly: &[f64], min_points: usize) -> Vec<f64> {
    let mut p = poly.to_vec();
    while p.len() / 2 < min_points && p.len() >= 6 {
        let n = p.len() / 2;
        p = (0..n)
            .flat_map(|i| {
                let j = (i + 1) % n;
                let (x0, y0, x1, y1) = (p[2 * i], p[2 * i + 1], p[2 * j], p[2 * j + 1]);
                [x0, y0, round2((x0 + x1) / 2.0), round2((y0 + y1) / 2.0)]
            })
            .collect();
    }
    p
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn random_shape(rng: &mut Rng, class: usize, cx: f64, cy: f64, r: f64) -> Shape {
    let rot = rng.range_f64(0.0, std::f64::consts::TAU);
    let (polygons, hole) = match CATEGORIES[class].1 {
        "circle" => (vec![regular_polygon(cx, cy, r, 32, rot, &[1.0])], None),
        "rectangle" => {
            let aspect = rng.range_f64(0.35, 1.0);
            let (hw, hh) = (r, r * aspect);
            let (c, s) = (rot.cos(), rot.sin());
            let pts = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)];
            (
                vec![pts.iter().flat_map(|&(x, y)| [round2(cx + x * c - y * s), round2(cy + x * s + y * c)]).collect()],
                None,
            )
        }
        "triangle" => {
            let radii = [1.0, rng.range_f64(0.7, 1.0), rng.range_f64(0.7, 1.0)];
            (vec![regular_polygon(cx, cy, r, 3, rot, &radii)], None)
        }
        "star" => (vec![regular_polygon(cx, cy, r, 10, rot, &[1.0, rng.range_f64(0.38, 0.5)])], None),
        "hexagon" => (vec![regular_polygon(cx, cy, r, 6, rot, &[1.0])], None),
        _ => (
            vec![regular_polygon(cx, cy, r, 32, rot, &[1.0])],
            Some(regular_polygon(cx, cy, r * 0.55, 32, rot, &[1.0])),
        ),
    };
    Shape { class, polygons, hole }
}

/// Row-major {0,1} mask of `shape` on an `h`×`w` canvas.
fn shape_mask(shape: &Shape, h: u32, w: u32) -> Vec<u8> {
    let raster = |polys: &[Vec<f64>]| {
        let mut m = vec![0u8; (h * w) as usize];
        if let Ok(r) = hotcoco::mask::fr_polys(polys, h, w) {
            rle_into_bitmap(&r, &mut m, false);
        }
        m
    };
    let mut outer = raster(&shape.polygons);
    if let Some(hole) = &shape.hole {
        for (o, i) in outer.iter_mut().zip(raster(std::slice::from_ref(hole))) {
            *o &= 1 - i;
        }
    }
    outer
}

/// A fill: base colour and a pattern.
#[derive(Clone, Copy)]
struct Texture {
    base: [f64; 3],
    alt: [f64; 3],
    kind: u8,
    freq: f64,
    angle: f64,
    seed: u64,
}

impl Texture {
    fn random(rng: &mut Rng) -> Texture {
        let color =
            |rng: &mut Rng| [rng.range_f64(20.0, 235.0), rng.range_f64(20.0, 235.0), rng.range_f64(20.0, 235.0)];
        Texture {
            base: color(rng),
            alt: color(rng),
            kind: rng.range(0, 3) as u8,
            freq: rng.range_f64(0.08, 0.4),
            angle: rng.range_f64(0.0, std::f64::consts::PI),
            seed: rng.next_u64(),
        }
    }

    fn at(&self, x: usize, y: usize) -> [f64; 3] {
        let (xf, yf) = (x as f64, y as f64);
        let t = match self.kind {
            0 => 0.0,
            1 => ((xf * self.angle.cos() + yf * self.angle.sin()) * self.freq).sin() * 0.5 + 0.5,
            2 => f64::from(((xf * self.freq * 0.5) as i64 + (yf * self.freq * 0.5) as i64) % 2 == 0),
            _ => (hash2(self.seed, x / 3, y / 3) & 0xff) as f64 / 255.0,
        };
        [0, 1, 2].map(|c| self.base[c] * (1.0 - t) + self.alt[c] * t)
    }
}

fn hash2(seed: u64, x: usize, y: usize) -> u64 {
    Rng::derive(seed, x as u64, y as u64).state
}

/// Renders one image (unless annotations only) and returns its records.
fn render_image(
    rng: &mut Rng,
    id: u64,
    options: &SynthOptions,
    image_dir: &Path,
) -> Result<(JsonImage, Vec<JsonAnnotation>), SynthError> {
    let (lo, hi) = options.size;
    let (w, h) = (rng.range(u64::from(lo), u64::from(hi)) as u32, rng.range(u64::from(lo), u64::from(hi)) as u32);
    let file_name = format!("{id:012}.jpg");
    let image = JsonImage { id, file_name: file_name.clone(), height: h, width: w };
    let short = f64::from(w.min(h));
    // COCO averages 7.3 annotations per image: the annotation-only files
    // (for loading benchmarks at COCO scale) match that; images hold 1–10.
    let n = if options.annotations_only { rng.range(1, 13) } else { rng.range(1, 10) } as usize;
    let shapes: Vec<Shape> = (0..n)
        .map(|_| {
            let r = rng.range_f64(0.06, 0.24) * short;
            let cx = rng.range_f64(r * 0.5, f64::from(w) - r * 0.5);
            let cy = rng.range_f64(r * 0.5, f64::from(h) - r * 0.5);
            let class = rng.range(0, CATEGORIES.len() as u64 - 1) as usize;
            random_shape(rng, class, cx, cy, r)
        })
        .collect();
    let crowd = rng.chance(0.25).then(|| {
        let class = rng.range(0, CATEGORIES.len() as u64 - 1) as usize;
        let (cx, cy) = (rng.range_f64(0.2, 0.8) * f64::from(w), rng.range_f64(0.2, 0.8) * f64::from(h));
        let members = rng.range(4, 8);
        let mut polygons = Vec::new();
        for _ in 0..members {
            let r = rng.range_f64(0.015, 0.035) * short;
            let (dx, dy) = (rng.range_f64(-0.1, 0.1) * short, rng.range_f64(-0.1, 0.1) * short);
            polygons.extend(random_shape(rng, class, cx + dx, cy + dy, r).polygons);
        }
        Shape { class, polygons, hole: None }
    });

    if options.annotations_only {
        let mut anns: Vec<JsonAnnotation> = shapes
            .into_iter()
            .map(|mut s| {
                // Real annotators' outlines are dense: COCO's file averages
                // ~520 bytes per annotation.
                s.polygons = s.polygons.iter().map(|p| densify(p, 20)).collect();
                let rle =
                    hotcoco::mask::fr_polys(&s.polygons, h, w).unwrap_or(hotcoco::Rle { h, w, counts: vec![h * w] });
                annotation(id, s.class, &rle, 0, JsonSegmentation::Polygons(s.polygons))
            })
            .filter(|a| a.area > 0.0)
            .collect();
        if let Some(c) = crowd {
            let rle = hotcoco::mask::fr_polys(&c.polygons, h, w).unwrap_or(hotcoco::Rle { h, w, counts: vec![h * w] });
            let seg = JsonSegmentation::Uncompressed { size: [h, w], counts: rle.counts.clone() };
            anns.push(annotation(id, c.class, &rle, 1, seg));
        }
        return Ok((image, anns));
    }

    // Ownership map: 0 background, 1 crowd, 2.. shapes in z-order.
    let (hu, wu) = (h as usize, w as usize);
    let mut owner = vec![0u8; hu * wu];
    let crowd_mask = crowd.as_ref().map(|c| shape_mask(c, h, w));
    if let Some(m) = &crowd_mask {
        for (o, &v) in owner.iter_mut().zip(m) {
            if v != 0 {
                *o = 1;
            }
        }
    }
    let full: Vec<Vec<u8>> = shapes.iter().map(|s| shape_mask(s, h, w)).collect();
    for (k, m) in full.iter().enumerate() {
        for (o, &v) in owner.iter_mut().zip(m) {
            if v != 0 {
                *o = k as u8 + 2;
            }
        }
    }

    // Pixels: gradient + noise background, distractor blobs, textured shapes.
    let bg = [Texture::random(rng), Texture::random(rng)];
    let (g0, g1) = (bg[0].base, bg[1].base);
    let mut textures: Vec<Texture> = (0..shapes.len() + 1).map(|_| Texture::random(rng)).collect();
    textures[0].kind = 0;
    let blobs: Vec<(Vec<u8>, Texture)> = (0..rng.range(2, 6))
        .map(|_| {
            let r = rng.range_f64(0.03, 0.12) * short;
            let (cx, cy) = (rng.range_f64(0.0, f64::from(w)), rng.range_f64(0.0, f64::from(h)));
            let k = rng.range(5, 9) as usize;
            let radii: Vec<f64> = (0..k).map(|_| rng.range_f64(0.3, 1.0)).collect();
            let poly = regular_polygon(cx, cy, r, k, rng.range_f64(0.0, 6.3), &radii);
            let s = Shape { class: 0, polygons: vec![poly], hole: None };
            (shape_mask(&s, h, w), Texture::random(rng))
        })
        .collect();
    let noise_seed = rng.next_u64();
    let mut pixels = vec![0u8; hu * wu * 3];
    for y in 0..hu {
        for x in 0..wu {
            let i = y * wu + x;
            let rgb = match owner[i] {
                0 => {
                    let t = (x + y) as f64 / (wu + hu) as f64;
                    let mut c = [0, 1, 2].map(|k| g0[k] * (1.0 - t) + g1[k] * t);
                    if let Some((_, tex)) = blobs.iter().rev().find(|(m, _)| m[i] != 0) {
                        c = tex.at(x, y);
                    }
                    c
                }
                1 => textures[0].at(x, y),
                k => textures[k as usize - 1].at(x, y),
            };
            let noise = (hash2(noise_seed, x, y) % 25) as f64 - 12.0;
            for c in 0..3 {
                pixels[3 * i + c] = (rgb[c] + noise).clamp(0.0, 255.0) as u8;
            }
        }
    }
    let path = image_dir.join(&file_name);
    write_jpeg(&path, &pixels, w, h)?;

    // Annotations of the visible parts.
    let mut anns = Vec::new();
    if let (Some(c), Some(_)) = (&crowd, &crowd_mask) {
        let visible: Vec<u8> = owner.iter().map(|&o| u8::from(o == 1)).collect();
        if let Ok(rle) = hotcoco::mask::encode(&row_to_column(&visible, hu, wu), h, w) {
            let seg = JsonSegmentation::Uncompressed { size: [h, w], counts: rle.counts.clone() };
            let a = annotation(id, c.class, &rle, 1, seg);
            if a.area > 0.0 {
                anns.push(a);
            }
        }
    }
    for (k, (shape, m)) in shapes.into_iter().zip(&full).enumerate() {
        let full_area = m.iter().filter(|&&v| v != 0).count();
        let visible: Vec<u8> = owner.iter().map(|&o| u8::from(o as usize == k + 2)).collect();
        let area = visible.iter().filter(|&&v| v != 0).count();
        if area < 30 || (area as f64) < 0.1 * full_area as f64 {
            continue; // hidden: an unlabelled occluder, as in real data
        }
        let Ok(rle) = hotcoco::mask::encode(&row_to_column(&visible, hu, wu), h, w) else { continue };
        let seg = if area == full_area && shape.hole.is_none() {
            JsonSegmentation::Polygons(shape.polygons)
        } else {
            JsonSegmentation::Compressed { size: [h, w], counts: hotcoco::mask::rle_to_string(&rle) }
        };
        anns.push(annotation(id, shape.class, &rle, 0, seg));
    }
    Ok((image, anns))
}

fn annotation(
    image_id: u64,
    class: usize,
    rle: &hotcoco::Rle,
    iscrowd: u8,
    segmentation: JsonSegmentation,
) -> JsonAnnotation {
    let b = hotcoco::mask::to_bbox(rle);
    JsonAnnotation {
        id: 0,
        image_id,
        category_id: CATEGORIES[class].0,
        bbox: b.map(round2),
        area: hotcoco::mask::area(rle) as f64,
        iscrowd,
        segmentation,
    }
}

fn write_jpeg(path: &Path, pixels: &[u8], w: u32, h: u32) -> Result<(), SynthError> {
    let io = |message: String| SynthError::Io { path: path.to_path_buf(), message };
    let file = std::fs::File::create(path).map_err(|e| io(e.to_string()))?;
    let mut out = std::io::BufWriter::new(file);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode(pixels, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| io(e.to_string()))?;
    out.flush().map_err(|e| io(e.to_string()))
}
