//! `maskrcnn synth`: a deterministic COCO-format dataset of textured shapes on
//! cluttered backgrounds — the demo's data and the tests' data.
//!
//! The `shapes` profile: six classes (category ids 1, 2, 3, 5, 8, 13: not
//! contiguous, as COCO's), 1–10 instances per image drawn in z-order so later
//! shapes occlude earlier ones; each annotation is the *visible* part: a
//! polygon when the shape is unoccluded, a compressed RLE when it is partly
//! hidden (rings, having a hole, are always RLE). Some images hold a crowd
//! region (a cluster of small shapes of one class, uncompressed RLE,
//! `iscrowd: 1`). Colours and textures are independent of the class, and the
//! background carries distractor blobs, so the model has to learn shape.
//!
//! The `coco` profile has COCO's statistics, for measuring what users with
//! COCO-like data get: its 80 categories under COCO's ids and names (a class
//! is a shape and a colour family), COCO's image sizes (640×480, 480×640,
//! 640×427, ...), a long-tailed object count (mean ≈ 7; about 5% crowded
//! scenes of 40–120 objects), COCO's size mix (≈ 41% small < 32², 34%
//! medium, 25% large) and about 1% crowd regions; as in COCO, every
//! non-crowd object is annotated with polygons (an occluded one's visible
//! parts traced, one polygon each) and only crowd regions with RLE.

use super::outline::mask_polygons;
use crate::random::Rng;
use crate::structures::rle::{rle_into_bitmap, row_to_column};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The classes: `(category id, name)`.
pub const CATEGORIES: [(u64, &str); 6] =
    [(1, "circle"), (2, "rectangle"), (3, "triangle"), (5, "star"), (8, "hexagon"), (13, "ring")];

/// Which statistics the data has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SynthProfile {
    /// Six shape classes, sides from `size`, 1–10 objects (the demo's).
    #[default]
    Shapes,
    /// COCO's categories, image sizes, object counts and sizes.
    Coco,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub train: usize,
    pub val: usize,
    pub seed: u64,
    /// Each image side is drawn uniformly from `[min, max]` pixels (the
    /// `shapes` profile; `coco` draws COCO's sizes).
    pub size: (u32, u32),
    /// Write only the annotation files (no pixels, no occlusion): for
    /// benchmarking annotation loading at COCO scale.
    pub annotations_only: bool,
    pub profile: SynthProfile,
}

/// COCO's 80 categories: `(id, name)`, ids 1..=90 with COCO's gaps.
pub fn coco_categories() -> Vec<(u64, &'static str)> {
    crate::structures::categories::COCO_CLASS_NAMES
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, n)| **n != "N/A")
        .map(|(id, n)| (id as u64, *n))
        .collect()
}

impl SynthProfile {
    /// `(category id, name)` of the profile's classes.
    pub fn categories(self) -> Vec<(u64, &'static str)> {
        match self {
            SynthProfile::Shapes => CATEGORIES.to_vec(),
            SynthProfile::Coco => coco_categories(),
        }
    }
}

/// COCO's most common image sizes `(width, height)` and their weights
/// (about 85% of COCO's images), the rest 640 on the long side with a
/// short side in 240..=640.
const COCO_SIZES: [((u32, u32), u32); 12] = [
    ((640, 480), 28),
    ((640, 427), 17),
    ((480, 640), 10),
    ((427, 640), 7),
    ((640, 426), 5),
    ((640, 428), 3),
    ((640, 360), 4),
    ((500, 375), 3),
    ((375, 500), 2),
    ((640, 512), 2),
    ((612, 612), 2),
    ((640, 640), 2),
];

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
        let categories = options
            .profile
            .categories()
            .into_iter()
            .map(|(id, name)| JsonCategory { id, name, supercategory: "shape" })
            .collect();
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

/// A shape instance: its class (index into the profile's categories) and outline.
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

/// A shape of class `class` whose outline is the `kind`-th of [`CATEGORIES`]
/// (circle, rectangle, triangle, star, hexagon, ring), centred at `(cx, cy)`
/// with radius `r`.
fn random_shape(rng: &mut Rng, class: usize, kind: usize, cx: f64, cy: f64, r: f64) -> Shape {
    let rot = rng.range_f64(0.0, std::f64::consts::TAU);
    let (polygons, hole) = match CATEGORIES[kind % CATEGORIES.len()].1 {
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

    /// The `coco` profile's fill of colour family `family` (0..14): a fixed
    /// hue pair, jittered, in a random pattern — with the shape, what tells
    /// the 80 classes apart.
    fn of_family(rng: &mut Rng, family: usize) -> Texture {
        let hue = |h: f64, v: f64| {
            // Hue in turns to an RGB colour of value `v` and saturation 0.75.
            [0.0, 1.0 / 3.0, 2.0 / 3.0].map(|o: f64| {
                let d = ((h - o).rem_euclid(1.0) - 0.5).abs() * 2.0; // 1 at the hue, 0 opposite
                v * (0.25 + 0.75 * (d * 3.0 - 1.0).clamp(0.0, 1.0))
            })
        };
        let h = family as f64 / 14.0;
        let jitter = |rng: &mut Rng, c: [f64; 3]| c.map(|v| (v + rng.range_f64(-12.0, 12.0)).clamp(0.0, 255.0));
        let mut t = Texture::random(rng);
        t.base = jitter(rng, hue(h, 230.0));
        t.alt = jitter(rng, hue(h + 0.04, 120.0));
        t
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
    let coco = options.profile == SynthProfile::Coco;
    let (w, h) = if coco {
        coco_size(rng)
    } else {
        let (lo, hi) = options.size;
        (rng.range(u64::from(lo), u64::from(hi)) as u32, rng.range(u64::from(lo), u64::from(hi)) as u32)
    };
    let file_name = format!("{id:012}.jpg");
    let image = JsonImage { id, file_name: file_name.clone(), height: h, width: w };
    let short = f64::from(w.min(h));
    let classes = if coco { 80 } else { CATEGORIES.len() };
    // COCO averages 7.3 annotations per image: the annotation-only files
    // (for loading benchmarks at COCO scale) match that; images hold 1–10.
    let n = if coco {
        coco_object_count(rng)
    } else if options.annotations_only {
        rng.range(1, 13) as usize
    } else {
        rng.range(1, 10) as usize
    };
    // A class of the coco profile is an outline (class mod 6) and a colour
    // family (class / 6); the shapes profile's is its outline.
    let kind_of = |class: usize| class % CATEGORIES.len();
    let shapes: Vec<Shape> = (0..n)
        .map(|_| {
            let r = if coco { coco_radius(rng, w, h, n >= 40) } else { rng.range_f64(0.06, 0.24) * short };
            let cx = rng.range_f64(r * 0.5, (f64::from(w) - r * 0.5).max(r * 0.5 + 1.0));
            let cy = rng.range_f64(r * 0.5, (f64::from(h) - r * 0.5).max(r * 0.5 + 1.0));
            let class = rng.range(0, classes as u64 - 1) as usize;
            random_shape(rng, class, kind_of(class), cx, cy, r)
        })
        .collect();
    // About 1% of COCO's annotations are crowd regions.
    let crowd = rng.chance(if coco { 0.07 } else { 0.25 }).then(|| {
        let class = rng.range(0, classes as u64 - 1) as usize;
        let (cx, cy) = (rng.range_f64(0.2, 0.8) * f64::from(w), rng.range_f64(0.2, 0.8) * f64::from(h));
        let members = rng.range(4, 8);
        let mut polygons = Vec::new();
        for _ in 0..members {
            let r = rng.range_f64(0.015, 0.035) * short;
            let (dx, dy) = (rng.range_f64(-0.1, 0.1) * short, rng.range_f64(-0.1, 0.1) * short);
            polygons.extend(random_shape(rng, class, kind_of(class), cx + dx, cy + dy, r).polygons);
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
                annotation(id, category_of(options.profile, s.class), &rle, 0, JsonSegmentation::Polygons(s.polygons))
            })
            .filter(|a| a.area > 0.0)
            .collect();
        if let Some(c) = crowd {
            let rle = hotcoco::mask::fr_polys(&c.polygons, h, w).unwrap_or(hotcoco::Rle { h, w, counts: vec![h * w] });
            let seg = JsonSegmentation::Uncompressed { size: [h, w], counts: rle.counts.clone() };
            anns.push(annotation(id, category_of(options.profile, c.class), &rle, 1, seg));
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
    let mut textures: Vec<Texture> = std::iter::once(crowd.as_ref().map(|c| c.class))
        .chain(shapes.iter().map(|s| Some(s.class)))
        .map(|class| match class {
            Some(class) if coco => Texture::of_family(rng, class / CATEGORIES.len()),
            _ => Texture::random(rng),
        })
        .collect();
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
            let a = annotation(id, category_of(options.profile, c.class), &rle, 1, seg);
            if a.area > 0.0 {
                anns.push(a);
            }
        }
    }
    for (k, (shape, m)) in shapes.into_iter().zip(&full).enumerate() {
        let full_area = m.iter().filter(|&&v| v != 0).count();
        let visible: Vec<u8> = owner.iter().map(|&o| u8::from(o as usize == k + 2)).collect();
        let area = visible.iter().filter(|&&v| v != 0).count();
        // COCO keeps objects of a few pixels; the demo's data does not.
        let least = if coco { 8 } else { 30 };
        if area < least || (area as f64) < 0.1 * full_area as f64 {
            continue; // hidden: an unlabelled occluder, as in real data
        }
        let (rle, seg) = if area == full_area && shape.hole.is_none() {
            let Ok(rle) = hotcoco::mask::encode(&row_to_column(&visible, hu, wu), h, w) else { continue };
            (rle, JsonSegmentation::Polygons(shape.polygons))
        } else if coco {
            // COCO outlines the visible parts of every non-crowd object as
            // polygons (one per part); its box and area are the polygons'.
            let polygons = mask_polygons(&visible, hu, wu, 1.0, 8);
            let Ok(rle) = hotcoco::mask::fr_polys(&polygons, h, w) else { continue };
            (rle, JsonSegmentation::Polygons(polygons))
        } else {
            let Ok(rle) = hotcoco::mask::encode(&row_to_column(&visible, hu, wu), h, w) else { continue };
            let counts = hotcoco::mask::rle_to_string(&rle);
            (rle, JsonSegmentation::Compressed { size: [h, w], counts })
        };
        anns.push(annotation(id, category_of(options.profile, shape.class), &rle, 0, seg));
    }
    Ok((image, anns))
}

/// The category id of class `class` of `profile`.
fn category_of(profile: SynthProfile, class: usize) -> u64 {
    match profile {
        SynthProfile::Shapes => CATEGORIES[class].0,
        SynthProfile::Coco => coco_categories()[class].0,
    }
}

/// A COCO image size `(width, height)`.
fn coco_size(rng: &mut Rng) -> (u32, u32) {
    let total: u32 = COCO_SIZES.iter().map(|(_, w)| w).sum();
    // The listed sizes are 85% of the draws; the rest are 640 long.
    let mut pick = rng.range(0, u64::from(total) * 100 / 85) as u32;
    for &(size, weight) in &COCO_SIZES {
        if pick < weight {
            return size;
        }
        pick -= weight;
    }
    let short = rng.range(240, 640) as u32;
    if rng.chance(0.7) {
        (640, short)
    } else {
        (short, 640)
    }
}

/// Objects drawn into a COCO-like image: about 5% crowded scenes of
/// 40–120, the rest 1 + a geometric count (mean ≈ 5); about 8.8 per image,
/// ≈ 7 annotated once occlusion has hidden some.
fn coco_object_count(rng: &mut Rng) -> usize {
    if rng.chance(0.05) {
        return rng.range(40, 120) as usize;
    }
    let mut n = 1;
    while n < 40 && rng.chance(0.8) {
        n += 1;
    }
    n
}

/// The radius of a COCO-like object on a `w`×`h` image: its area drawn
/// log-uniformly within COCO's small (< 32²), medium (< 96²) or large range
/// — in a `crowded` scene small (55%) or medium, else 30% small, 27%
/// medium, 43% large, which after occlusion gives COCO's mix (≈ 41%
/// small, 34% medium, 25% large annotations); a shape of radius `r` covers
/// about 2.4 r².
fn coco_radius(rng: &mut Rng, w: u32, h: u32, crowded: bool) -> f64 {
    let (small, medium) = if crowded { (0.55, 1.0) } else { (0.30, 0.57) };
    let u = rng.uniform();
    let (lo, hi): (f64, f64) = if u < small {
        (40.0, 1024.0)
    } else if u < medium {
        (1024.0, 9216.0)
    } else {
        (9216.0, (0.5 * f64::from(w) * f64::from(h)).max(9217.0))
    };
    let area = (lo.ln() + rng.uniform() * (hi.ln() - lo.ln())).exp();
    (area / 2.4).sqrt()
}

fn annotation(
    image_id: u64,
    category_id: u64,
    rle: &hotcoco::Rle,
    iscrowd: u8,
    segmentation: JsonSegmentation,
) -> JsonAnnotation {
    let b = hotcoco::mask::to_bbox(rle);
    JsonAnnotation {
        id: 0,
        image_id,
        category_id,
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
