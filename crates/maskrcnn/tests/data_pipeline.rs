//! The data pipeline against pycocotools (masks, RLE, flips) and its own
//! contracts: synthetic data, sampler order, loader determinism and sharding,
//! and every kind of bad input.

mod common;

use common::maskrcnn_bin;

use maskrcnn::data::coco::{CocoDataset, InstanceMask, LoadOptions};
use maskrcnn::data::loader::{Loader, LoaderError, LoaderOptions};
use maskrcnn::data::synth::{generate, SynthOptions, SynthOutput, CATEGORIES};
use maskrcnn::data::transforms::{flip_box, instance_bitmap, to_target};
use maskrcnn::structures::rle::row_to_column;
use maskrcnn::structures::InstanceMasks;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

const TRAIN: LoadOptions = LoadOptions { drop_empty: true, strict: false, box_as_mask: false };

fn synth(dir: &Path, train: usize, val: usize, seed: u64) -> SynthOutput {
    generate(&SynthOptions {
        out: dir.to_path_buf(),
        train,
        val,
        seed,
        size: (96, 160),
        annotations_only: false,
        profile: Default::default(),
    })
    .expect("synth")
}

fn rle_string(bitmap: &[u8], h: u32, w: u32) -> String {
    let rle = hotcoco::mask::encode(&row_to_column(bitmap, h as usize, w as usize), h, w).unwrap();
    hotcoco::mask::rle_to_string(&rle)
}

fn iou(a: &str, b: &str, h: u32, w: u32) -> f64 {
    let da = hotcoco::mask::decode(&hotcoco::mask::rle_from_string(a, h, w).unwrap());
    let db = hotcoco::mask::decode(&hotcoco::mask::rle_from_string(b, h, w).unwrap());
    let inter = da.iter().zip(&db).filter(|(x, y)| **x != 0 && **y != 0).count();
    let union = da.iter().zip(&db).filter(|(x, y)| **x != 0 || **y != 0).count();
    inter as f64 / union.max(1) as f64
}

#[test]
fn masks_rle_and_flips_match_pycocotools() {
    let tmp = tempfile::tempdir().unwrap();
    let out = synth(tmp.path(), 24, 0, 3);
    let oracle_path = tmp.path().join("pycocotools.json");
    common::run_reference(
        "coco_masks.py",
        &[out.train_ann.to_str().unwrap(), oracle_path.to_str().unwrap()],
        &oracle_path,
    );
    let oracle: Value = serde_json::from_slice(&std::fs::read(&oracle_path).unwrap()).unwrap();
    let ds = CocoDataset::load(
        &out.train_ann,
        &out.train_images,
        LoadOptions { drop_empty: false, strict: true, box_as_mask: false },
    )
    .expect("synth data loads in strict mode");
    let (mut polygons, mut rles, mut crowds, mut worst_poly_flip) = (0, 0, 0, 1.0f64);
    for record in &ds.images {
        let rows = oracle[record.id.to_string()].as_array().unwrap();
        assert_eq!(rows.len(), record.instances.len(), "image {}", record.id);
        let (h, w) = (record.height, record.width);
        for (inst, row) in record.instances.iter().zip(rows) {
            let mut plain = vec![0u8; (h * w) as usize];
            instance_bitmap(inst, h, w, false, &mut plain);
            let mut flipped = vec![0u8; (h * w) as usize];
            instance_bitmap(inst, h, w, true, &mut flipped);
            let ours = rle_string(&plain, h, w);
            // annToMask (polygons via frPyObjects, RLE via decode): identical.
            assert_eq!(ours, row["rle"].as_str().unwrap(), "annotation {}", row["id"]);
            // encode/decode round trip, area and toBbox of the same RLE.
            let rle = hotcoco::mask::rle_from_string(row["rle"].as_str().unwrap(), h, w).unwrap();
            assert_eq!(hotcoco::mask::decode(&rle), row_to_column(&plain, h as usize, w as usize));
            assert_eq!(hotcoco::mask::area(&rle), row["area"].as_u64().unwrap());
            assert_eq!(plain.iter().map(|&v| u64::from(v)).sum::<u64>(), row["decoded_area"].as_u64().unwrap());
            let bbox: Vec<f64> = row["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(hotcoco::mask::to_bbox(&rle).to_vec(), bbox);
            let flipped_rle = rle_string(&flipped, h, w);
            match &inst.mask {
                InstanceMask::Rle(_) => {
                    rles += 1;
                    crowds += usize::from(inst.crowd);
                    // An RLE mirrors exactly (np.fliplr).
                    assert_eq!(flipped_rle, row["rle_flip"].as_str().unwrap(), "annotation {}", row["id"]);
                }
                InstanceMask::Polygons(_) => {
                    polygons += 1;
                    // Mirrored polygons rasterize exactly as pycocotools
                    // rasterizes them, and almost as the mirrored bitmap.
                    assert_eq!(flipped_rle, row["rle_polyflip"].as_str().unwrap(), "annotation {}", row["id"]);
                    worst_poly_flip = worst_poly_flip.min(iou(&flipped_rle, row["rle_flip"].as_str().unwrap(), h, w));
                }
                InstanceMask::None => panic!("synth writes a mask for every annotation"),
            }
            // The mirrored box is the mirrored mask's box (within a pixel of
            // the rasterizer's rounding for polygons).
            let fb = flip_box(inst.bbox, w, true);
            let frle = hotcoco::mask::rle_from_string(&flipped_rle, h, w).unwrap();
            let [x, y, bw, bh] = hotcoco::mask::to_bbox(&frle);
            let want = [x, y, x + bw, y + bh];
            for k in 0..4 {
                assert!((f64::from(fb[k]) - want[k]).abs() <= 1.0, "box {fb:?} vs mirrored mask box {want:?}");
            }
        }
    }
    eprintln!("{polygons} polygons, {rles} RLE ({crowds} crowd); worst IoU(mirrored polygon, mirrored bitmap) {worst_poly_flip:.4}");
    assert!(polygons > 20 && rles > 20 && crowds > 0, "synth must mix polygons, RLE and crowds");
    assert!(worst_poly_flip > 0.9, "mirrored polygons drift from the mirrored bitmap: IoU {worst_poly_flip}");
}

#[test]
fn targets_flip_and_resize_consistently() {
    let tmp = tempfile::tempdir().unwrap();
    let out = synth(tmp.path(), 12, 0, 5);
    let ds = CocoDataset::load(&out.train_ann, &out.train_images, TRAIN).unwrap();
    let (mut bitmap_images, mut polygon_images) = (0, 0);
    for record in &ds.images {
        let (h, w) = (record.height, record.width);
        let plain = to_target(&record.instances, h, w, false);
        let flipped = to_target(&record.instances, h, w, true);
        assert_eq!(plain.len(), record.instances.len() as i64);
        let crowd = record.instances.iter().any(|i| i.crowd);
        assert_eq!(plain.iscrowd.is_some(), crowd);
        // Boxes: x ↦ w − x, y unchanged.
        let pb = plain.boxes.shallow_clone();
        let want = Tensor::stack(
            &[-pb.select(1, 2) + w as f64, pb.select(1, 1), -pb.select(1, 0) + w as f64, pb.select(1, 3)],
            1,
        );
        assert_eq!(f64::try_from((flipped.boxes.shallow_clone() - want).abs().max()).unwrap(), 0.0);
        match (&plain.masks, &flipped.masks) {
            (InstanceMasks::Bitmaps(a), InstanceMasks::Bitmaps(b)) => {
                bitmap_images += 1;
                // RLE instances mirror exactly; polygons agree up to the
                // rasterizer's rounding.
                let diff = a.flip([2]).ne_tensor(b).sum(Kind::Int64).int64_value(&[]);
                let area = a.sum(Kind::Int64).int64_value(&[]);
                assert!((diff as f64) < 0.03 * area as f64, "flipped bitmaps differ in {diff} of {area} pixels");
                // Resize (nearest for masks, ratios for boxes): each
                // resized mask's extent stays within its resized box.
                let (rh, rw) = maskrcnn::modeling::transform::resized_size(h as i64, w as i64, 64, 100);
                let resized =
                    maskrcnn::modeling::transform::resize_target(&plain, (h as i64, w as i64), (rh, rw), Device::Cpu);
                let InstanceMasks::Bitmaps(m) = &resized.masks else { unreachable!() };
                assert_eq!(m.size(), vec![plain.len(), rh, rw]);
                for g in 0..plain.len() {
                    let ys = m.get(g).sum_dim_intlist(1, false, Kind::Int64).nonzero();
                    let xs = m.get(g).sum_dim_intlist(0, false, Kind::Int64).nonzero();
                    if ys.size()[0] == 0 {
                        continue;
                    }
                    let b: Vec<f32> = Vec::try_from(resized.boxes.get(g)).unwrap();
                    let (x0, x1) = (xs.min().int64_value(&[]) as f32, xs.max().int64_value(&[]) as f32 + 1.0);
                    let (y0, y1) = (ys.min().int64_value(&[]) as f32, ys.max().int64_value(&[]) as f32 + 1.0);
                    // Nearest-neighbour downscaling can drop thin edges of
                    // small masks: inside the box always, tight for large ones.
                    let tol = 2.0;
                    let inside = x0 >= b[0] - tol && x1 <= b[2] + tol && y0 >= b[1] - tol && y1 <= b[3] + tol;
                    let tight = (x0 - b[0]).abs() <= tol
                        && (x1 - b[2]).abs() <= tol
                        && (y0 - b[1]).abs() <= tol
                        && (y1 - b[3]).abs() <= tol;
                    let large = a.get(g).sum(Kind::Int64).int64_value(&[]) >= 400;
                    assert!(
                        inside && (tight || !large),
                        "image {} instance {g}: resized mask extent [{x0},{y0},{x1},{y1}] vs box {b:?}",
                        record.id
                    );
                }
            }
            (InstanceMasks::Polygons(a), InstanceMasks::Polygons(b)) => {
                polygon_images += 1;
                for (pa, pb) in a.iter().zip(b) {
                    for (qa, qb) in pa.iter().zip(pb) {
                        for (k, (va, vb)) in qa.iter().zip(qb).enumerate() {
                            let want = if k % 2 == 0 { w as f64 - va } else { *va };
                            assert!((vb - want).abs() < 1e-9);
                        }
                    }
                }
            }
            _ => panic!("a flip must not change the mask representation"),
        }
    }
    assert!(bitmap_images > 0 && polygon_images > 0, "{bitmap_images} bitmap / {polygon_images} polygon images");
}

#[test]
fn synth_is_deterministic_varied_and_within_spec() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (oa, ob, oc) = (synth(a.path(), 30, 6, 9), synth(b.path(), 30, 6, 9), synth(c.path(), 30, 6, 10));
    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(read(&oa.train_ann), read(&ob.train_ann));
    assert_eq!(read(&oa.train_images.join("000000000007.jpg")), read(&ob.train_images.join("000000000007.jpg")));
    assert_ne!(read(&oa.train_ann), read(&oc.train_ann));
    let json: Value = serde_json::from_slice(&read(&oa.train_ann)).unwrap();
    assert_eq!(json["categories"].as_array().unwrap().len(), CATEGORIES.len());
    assert!(CATEGORIES.len() >= 6);
    let images = json["images"].as_array().unwrap();
    assert_eq!(images.len(), 30);
    for im in images {
        let (w, h) = (im["width"].as_u64().unwrap(), im["height"].as_u64().unwrap());
        assert!((96..=160).contains(&w) && (96..=160).contains(&h));
        let n = json["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["image_id"] == im["id"] && a["iscrowd"] == 0)
            .count();
        assert!(n <= 10, "image {} has {n} instances", im["id"]);
    }
    let anns = json["annotations"].as_array().unwrap();
    let classes: std::collections::BTreeSet<u64> = anns.iter().map(|a| a["category_id"].as_u64().unwrap()).collect();
    assert_eq!(classes.len(), 6, "every class appears");
    let val: Value = serde_json::from_slice(&read(&oa.val_ann)).unwrap();
    assert_eq!(val["images"].as_array().unwrap().len(), 6);
    assert!(oa.val_images.join("000000000006.jpg").exists());
}

/// Loader options: batches of 2 (per rank), 2 workers, seed 4, grouped.
fn options(start: u64, rank: usize, world: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size: 2,
        workers: 2,
        prefetch: 2,
        flip_prob: 0.5,
        seed: 4,
        rank,
        world_size: world,
        group_by_aspect: true,
        strict: false,
        device: Device::Cpu,
        start_iteration: start,
        decode: maskrcnn::data::image::DecodeOptions::default(),
    }
}

fn loader(ds: &Arc<CocoDataset>, workers: usize, start: u64, rank: usize, world: usize) -> Loader {
    Loader::new(ds.clone(), LoaderOptions { workers, ..options(start, rank, world) }).unwrap()
}

#[test]
fn loader_is_deterministic_resumable_grouped_and_sharded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = synth(tmp.path(), 20, 0, 6);
    let ds = Arc::new(CocoDataset::load(&out.train_ann, &out.train_images, TRAIN).unwrap());
    let take = |mut l: Loader, n: usize| (0..n).map(|_| l.next_batch().unwrap()).collect::<Vec<_>>();
    let one = take(loader(&ds, 1, 0, 0, 1), 12);
    let many = take(loader(&ds, 4, 0, 0, 1), 12);
    let resumed = take(loader(&ds, 3, 7, 0, 1), 5);
    for (a, b) in one.iter().zip(&many).chain(one[7..].iter().zip(&resumed)) {
        assert_eq!(a.iteration, b.iteration);
        assert_eq!(a.image_ids, b.image_ids);
        for (x, y) in a.images.iter().zip(&b.images) {
            assert!(x.equal(y), "iteration {}: pixels differ", a.iteration);
        }
        for (x, y) in a.targets.iter().zip(&b.targets) {
            assert!(x.boxes.equal(&y.boxes));
        }
    }
    let by_id: std::collections::HashMap<u64, &maskrcnn::data::coco::ImageRecord> =
        ds.images.iter().map(|r| (r.id, r)).collect();
    let mut flips = 0;
    for b in &one {
        assert_eq!(b.images.len(), 2);
        let land: Vec<bool> = b.image_ids.iter().map(|id| by_id[id].is_landscape()).collect();
        assert!(land.iter().all(|&l| l == land[0]), "batch {} mixes portrait and landscape", b.iteration);
        for ((id, im), t) in b.image_ids.iter().zip(&b.images).zip(&b.targets) {
            let r = by_id[id];
            assert_eq!(im.size(), vec![3, r.height as i64, r.width as i64]);
            assert_eq!(im.kind(), Kind::Float);
            let x0 = f64::try_from(t.boxes.get(0).get(0)).unwrap();
            flips += usize::from((x0 - f64::from(r.instances[0].bbox[0])).abs() > 1e-3);
        }
    }
    assert!(flips > 0 && flips < 24, "flip_prob 0.5 flipped {flips} of 24 images");
    // Two ranks over one epoch's worth of batches: disjoint images; at each
    // iteration together the batch of one process with both ranks' images,
    // and each knows the whole global batch's sizes (to pad to one shape).
    let per_rank = ds.images.len() / 2 / 2;
    let r0 = take(loader(&ds, 2, 0, 0, 2), per_rank - 2);
    let r1 = take(loader(&ds, 2, 0, 1, 2), per_rank - 2);
    let both =
        take(Loader::new(ds.clone(), LoaderOptions { batch_size: 4, ..options(0, 0, 1) }).unwrap(), per_rank - 2);
    for ((a, b), whole) in r0.iter().zip(&r1).zip(&both) {
        assert!(a.image_ids.iter().all(|i| !b.image_ids.contains(i)), "ranks share images");
        assert_eq!([a.image_ids.clone(), b.image_ids.clone()].concat(), whole.image_ids);
        let sizes: Vec<(i64, i64)> =
            [&a.images, &b.images].into_iter().flatten().map(|im| (im.size()[1], im.size()[2])).collect();
        assert_eq!(a.global_sizes, sizes);
        assert_eq!(b.global_sizes, sizes);
        assert_eq!(whole.global_sizes, sizes);
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn load_str(dir: &Path, json: &str, strict: bool) -> Result<CocoDataset, maskrcnn::data::DatasetError> {
    let p = dir.join("ann.json");
    write(&p, json);
    CocoDataset::load(&p, dir, LoadOptions { drop_empty: true, strict, box_as_mask: false })
}

const CATS: &str = r#""categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]"#;

#[test]
fn bad_annotations_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Structural faults stop the load, naming the file and place.
    let e = load_str(dir, "{\"images\": [\n  {\"id\": 1,}\n]}", false).unwrap_err().to_string();
    assert!(e.contains("ann.json") && e.contains("line 2 column"), "{e}");
    let e = load_str(dir, r#"{"images": [{"id": 1, "file_name": "a.jpg", "width": NaN, "height": 5}]}"#, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(r#"image id 1 (images[0]) field "width" is NaN, which JSON does not allow"#), "{e}");
    let e = load_str(dir, r#"{"images": [], "annotations": []}"#, false).unwrap_err().to_string();
    assert!(e.contains("no categories"), "{e}");
    let dup = format!(
        r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}}, {{"id": 1, "file_name": "b.jpg", "width": 10, "height": 10}}], {CATS}}}"#
    );
    assert!(load_str(dir, &dup, false).unwrap_err().to_string().contains("image id 1 appears twice"));
    let ann = r#"{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}"#;
    let dup = format!(
        r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}}], "annotations": [{ann}, {ann}], {CATS}}}"#
    );
    // Annotation ids do not matter for training: a repeated one is counted.
    let ds = load_str(dir, &dup, false).unwrap();
    assert_eq!((ds.report.duplicate_ids, ds.report.instances), (1, 2));
    assert!(ds.report.lines().iter().any(|l| l.contains("1 annotation repeats an earlier annotation's \"id\"")));

    // Bad samples are skipped, counted, named; strict makes them errors.
    let anns = [
        r#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]}"#, // good
        r#"{"id": 2, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]}"#, // missing image
        r#"{"id": 3, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]}"#,  // unknown category
        r#"{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1]]}"#, // 2 points: box only
        r#"{"id": 5, "image_id": 1, "category_id": 7, "bbox": [1, 1, -5, 5]}"#, // negative size
        r#"{"id": 6, "image_id": 1, "category_id": 7, "bbox": [50, 50, 5, 5]}"#, // outside the image
        r#"{"id": 7, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4], "segmentation": {"size": [5, 5], "counts": [25]}}"#, // RLE of another size
        r#"{"id": 8, "image_id": 1, "category_id": 7, "bbox": [8, 8, 5, 5], "iscrowd": 1, "segmentation": {"size": [10, 10], "counts": [88, 2, 8, 2]}}"#, // clipped crowd: fine
        r#"{"id": 9, "image_id": 2, "category_id": 7, "bbox": [1, 1, 2, 2]}"#, // image without size
        r#"{"id": 10, "image_id": 4, "category_id": 7, "bbox": [1, 1, 2, 2]}"#, // image outside the folder
    ];
    let json = format!(
        r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}}, {{"id": 2, "file_name": "b.jpg"}}, {{"id": 3, "file_name": "c.jpg", "width": 10, "height": 10}}, {{"id": 4, "file_name": "../d.jpg", "width": 10, "height": 10}}], "annotations": [{}], {CATS}}}"#,
        anns.join(",")
    );
    let ds = load_str(dir, &json, false).unwrap();
    assert_eq!(ds.images.len(), 1, "image 3 has no annotation, image 2 no size");
    assert_eq!(ds.report.empty_images, 1);
    let inst = &ds.images[0].instances;
    assert_eq!(inst.len(), 3);
    assert_eq!((inst[0].label, inst[1].label, inst[2].label, inst[2].crowd), (1, 1, 2, true));
    assert_eq!(inst[1].mask, InstanceMask::None, "a polygon of 2 points is no mask; the box is kept");
    assert_eq!(ds.report.degenerate_polygons, 1);
    assert_eq!(inst[2].bbox, [8.0, 8.0, 10.0, 10.0]);
    assert_eq!(
        (ds.categories.category_id(1), ds.categories.category_id(2), ds.categories.category_id(3)),
        (Some(3), Some(7), None)
    );
    let skipped: Vec<String> = ds.skipped.iter().map(|s| s.to_string()).collect();
    let expect = [
        "image 2 skipped: needs \"file_name\", \"width\" and \"height\"",
        "image 4 skipped: file_name \"../d.jpg\" leaves the image folder",
        "annotation 2 (image 99) skipped: image id 99 is not in \"images\"",
        "annotation 3 (image 1) skipped: category id 4 is not in \"categories\"",
        "annotation 5 (image 1) skipped: bbox [1, 1, -5, 5] has a negative size",
        "annotation 6 (image 1) skipped: bbox [50, 50, 5, 5] has no area inside the 10x10 image",
        "annotation 7 (image 1) skipped: RLE size [5, 5] differs from the image's [10, 10]",
    ];
    assert_eq!(skipped, expect);
    assert_eq!(ds.skip_summary().len(), expect.len());
    let e = load_str(dir, &json, true).unwrap_err().to_string();
    assert!(e.contains("image 2 skipped") && e.contains("strict"), "{e}");
}

#[test]
fn bad_images_are_skipped_once_or_stop_in_strict_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let out = synth(tmp.path(), 8, 0, 8);
    let ds = CocoDataset::load(&out.train_ann, &out.train_images, TRAIN).unwrap();
    let truncated = ds.image_path(&ds.images[0]);
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(ds.image_path(&ds.images[1]), b"not a jpeg at all").unwrap();
    std::fs::remove_file(ds.image_path(&ds.images[2])).unwrap();
    let bad: Vec<u64> = ds.images[..3].iter().map(|r| r.id).collect();
    let ds = Arc::new(ds);
    let mut l = loader(&ds, 2, 0, 0, 1);
    let mut seen = 0;
    for _ in 0..12 {
        let b = l.next_batch().unwrap();
        assert!(b.image_ids.iter().all(|id| !bad.contains(id)));
        seen += b.image_ids.len();
    }
    assert!(seen > 0);
    assert!(l.skipped.count() >= 3, "skipped {}", l.skipped.count());
    let mut strict = Loader::new(
        ds.clone(),
        LoaderOptions {
            batch_size: 2,
            workers: 2,
            prefetch: 1,
            flip_prob: 0.0,
            seed: 4,
            rank: 0,
            world_size: 1,
            group_by_aspect: false,
            strict: true,
            device: Device::Cpu,
            start_iteration: 0,
            decode: maskrcnn::data::image::DecodeOptions::default(),
        },
    )
    .unwrap();
    let err = (0..8).find_map(|_| strict.next_batch().err()).expect("strict mode stops on a bad image");
    assert!(matches!(err, LoaderError::BadImage { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("image ") && !msg.contains('\n'), "{msg}");
}

#[test]
fn cli_synth_and_bench_data() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = maskrcnn_bin();
    let out = std::process::Command::new(&bin)
        .args(["synth", "--out", tmp.path().to_str().unwrap(), "--train", "12", "--val", "2", "--size", "64,96"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sets = String::from_utf8_lossy(&out.stdout);
    assert!(sets.contains("data.train_ann=") && !sets.contains("num_classes"), "{sets}: the class count is auto");
    let ann = tmp.path().join("annotations/instances_train2017.json");
    let images = tmp.path().join("train2017");
    let bench = |ann: &Path| {
        std::process::Command::new(&bin)
            .args(["bench", "data", "--batch", "2", "--iters", "3", "--workers", "2", "--device", "cpu", "--json"])
            .args(["--set", &format!("data.train_ann='{}'", ann.display())])
            .args(["--set", &format!("data.train_images='{}'", images.display())])
            .output()
            .unwrap()
    };
    let ok = bench(&ann);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let r: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(r["images"], 6);
    assert!(r["img_per_s"].as_f64().unwrap() > 0.0);
    let broken = tmp.path().join("broken.json");
    write(&broken, "{\"images\": [}");
    let bad = bench(&broken);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("broken.json") && err.contains("line 1 column 13") && err.trim().lines().count() == 1,
        "{err}"
    );
    // bench train --data: the loader's batches of the synth folder.
    let o = std::process::Command::new(&bin)
        .args(["bench", "train", "--data", tmp.path().to_str().unwrap(), "--batch", "2", "--iters", "2"])
        .args(["--device", "cpu", "--json", "--set", "model.backbone_depth=18", "--set", "model.fpn_channels=32"])
        .args(["--set", "input.min_size=[64]", "--set", "input.max_size=96", "--set", "dataloader.workers=1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["data"].as_str().unwrap().ends_with("instances_train2017.json"), "{r}");
    assert!(r["img_per_s"].as_f64().unwrap() > 0.0 && r["mean_img_per_s"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn image_variants_decode_as_pil_does() {
    let dir = common::fixture_dir().join("image_variants");
    common::run_reference("image_variants.py", &[dir.to_str().unwrap()], &dir.join("stamp"));
    let names = std::fs::read_to_string(dir.join("stamp")).unwrap();
    for name in names.lines() {
        let path = dir.join(name);
        let ours = maskrcnn::data::image::RgbImage::open(&path, maskrcnn::data::image::DecodeOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let pil = Tensor::read_npy(dir.join(format!("{name}.npy"))).unwrap();
        let (h, w) = (pil.size()[0], pil.size()[1]);
        assert_eq!((ours.height as i64, ours.width as i64), (h, w), "{name}");
        let ours = Tensor::from_slice(&ours.pixels).reshape([h, w, 3]).to_kind(Kind::Int);
        let diff = (ours - pil.to_kind(Kind::Int)).abs();
        let (max, mean) = (diff.max().int64_value(&[]), diff.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]));
        eprintln!("{name}: max |ours - PIL| {max}, mean {mean:.3}");
        // PNGs are lossless; JPEG decoders differ by IDCT and chroma upsampling rounding.
        let (max_bound, mean_bound) = if name.ends_with(".png") { (0, 0.0) } else { (4, 0.5) };
        assert!(max <= max_bound && mean <= mean_bound, "{name}: max {max}, mean {mean:.3}");
        // input.exif = false: the stored pixels, as PIL opens them.
        if name.starts_with("exif") {
            let stored = maskrcnn::data::image::RgbImage::open(
                &path,
                maskrcnn::data::image::DecodeOptions { exif: false, ..Default::default() },
            )
            .unwrap();
            let pil = Tensor::read_npy(dir.join(format!("{name}.stored.npy"))).unwrap();
            assert_eq!((stored.height as i64, stored.width as i64), (pil.size()[0], pil.size()[1]), "{name} stored");
            let diff = (Tensor::from_slice(&stored.pixels).reshape(pil.size()).to_kind(Kind::Int)
                - pil.to_kind(Kind::Int))
            .abs()
            .max()
            .int64_value(&[]);
            assert!(diff <= max_bound, "{name} stored: max {diff}");
        }
    }
}

/// A sideways photo (EXIF orientation 6) whose annotations give the
/// stored size: the size mismatch names EXIF and the setting that fixes it;
/// the other way round (annotated upright, read with input.exif = false) too.
#[test]
fn exif_size_mismatches_name_the_orientation() {
    use maskrcnn::data::image::{DecodeOptions, ImageHeader, RgbImage};
    let dir = common::fixture_dir().join("image_variants");
    common::run_reference("image_variants.py", &[dir.to_str().unwrap()], &dir.join("stamp"));
    let path = dir.join("exif6.jpg");
    let header = ImageHeader::read(&path).unwrap();
    assert_eq!((header.width, header.height, header.orientation), (161, 117, 6));
    assert_eq!(header.decoded_size(true), (117, 161));
    let upright = RgbImage::open(&path, DecodeOptions::default()).unwrap();
    assert_eq!((upright.width, upright.height), (117, 161));
    assert_eq!(upright.size_mismatch(117, 161), None);
    let why = upright.size_mismatch(161, 117).unwrap();
    assert!(why.contains("EXIF orientation 6") && why.contains("input.exif = false"), "{why}");
    let stored = RgbImage::open(&path, DecodeOptions { exif: false, ..Default::default() }).unwrap();
    let why = stored.size_mismatch(117, 161).unwrap();
    assert!(why.contains("EXIF orientation 6") && why.contains("input.exif = true"), "{why}");
    assert!(!upright.size_mismatch(100, 100).unwrap().contains("EXIF"));
}

/// `synth --profile coco` has COCO's statistics: its 80 categories under
/// COCO's ids, COCO's image sizes (640 on the long side), about 7 objects
/// per image with crowded scenes, COCO's small/medium/large mix, ~1% crowd
/// regions, COCO's mask forms; and it loads for training.
#[test]
fn the_coco_profile_has_cocos_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = generate(&SynthOptions {
        out: tmp.path().to_path_buf(),
        train: 300,
        val: 0,
        seed: 5,
        size: (96, 160),
        annotations_only: false,
        profile: maskrcnn::data::synth::SynthProfile::Coco,
    })
    .unwrap();
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&out.train_ann).unwrap()).unwrap();
    let ids: Vec<u64> = d["categories"].as_array().unwrap().iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 80);
    assert_eq!((ids[0], ids[11], ids[79]), (1, 13, 90), "COCO's ids, 12 missing");
    assert_eq!(d["categories"][0]["name"], "person");
    let images = d["images"].as_array().unwrap();
    assert!(images.iter().all(|im| im["width"].as_u64().unwrap().max(im["height"].as_u64().unwrap()) <= 640));
    let landscape = images.iter().filter(|im| im["width"] == 640 && im["height"] == 480).count();
    assert!(landscape > images.len() / 6, "640x480 is COCO's most common size: {landscape}");
    let anns = d["annotations"].as_array().unwrap();
    let per_image = anns.len() as f64 / images.len() as f64;
    assert!((5.5..=10.0).contains(&per_image), "{per_image} objects per image");
    let mut counts = std::collections::HashMap::new();
    for a in anns {
        *counts.entry(a["image_id"].as_u64().unwrap()).or_insert(0) += 1;
    }
    assert!(counts.values().any(|&n| n >= 40), "no crowded scene");
    let areas: Vec<f64> = anns.iter().filter(|a| a["iscrowd"] == 0).map(|a| a["area"].as_f64().unwrap()).collect();
    let share = |f: &dyn Fn(f64) -> bool| areas.iter().filter(|&&a| f(a)).count() as f64 / areas.len() as f64;
    let (small, large) = (share(&|a| a < 1024.0), share(&|a| a >= 9216.0));
    assert!((0.3..=0.55).contains(&small) && (0.12..=0.35).contains(&large), "small {small:.2}, large {large:.2}");
    let crowd = anns.iter().filter(|a| a["iscrowd"] == 1).count() as f64 / anns.len() as f64;
    assert!(crowd > 0.0 && crowd < 0.03, "crowd share {crowd}");
    // As COCO's: polygons for every object (occluded ones in several
    // parts), RLE only for crowd regions.
    let objects: Vec<&Value> = anns.iter().filter(|a| a["iscrowd"] == 0).collect();
    assert!(objects.iter().all(|a| a["segmentation"].is_array()), "a non-crowd object as RLE");
    let parts = objects.iter().filter(|a| a["segmentation"].as_array().unwrap().len() > 1).count();
    assert!(parts * 50 > objects.len(), "{parts} of {} objects in several parts", objects.len());
    assert!(anns.iter().filter(|a| a["iscrowd"] == 1).all(|a| a["segmentation"]["counts"].is_array()));
    let ds = CocoDataset::load(&out.train_ann, &out.train_images, TRAIN).unwrap();
    assert_eq!((ds.num_classes(), ds.skipped.len()), (81, 0));
}
