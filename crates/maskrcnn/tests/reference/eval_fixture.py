"""Oracle for COCO evaluation: a synthetic ground truth (polygons, RLE and a
crowd region), detections derived from it (jittered, missed, false), written
as COCO JSON, and pycocotools' 12 summary numbers for bbox and segm, and
every category's AP and AP50 from its precision array
(`eval['precision'][:, :, k, 0, 2]`, the mean of the entries above -1).

Usage: python eval_fixture.py OUT_DIR
Writes gt.json, dets.json, dets_empty.json, expected.json.
"""
import json
import os
import sys
import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

def uncompressed(m):
    """Run lengths of a binary mask in column-major order, starting with zeros."""
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return [int(r) for r in runs]


out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(7)
images, anns, dets = [], [], []
CATS = [1, 3, 7, 8, 11, 15, 20, 33, 41, 90]
cats = [{"id": cid, "name": f"c{cid}"} for cid in CATS]
aid = 1
for img_id in range(1, 15):
    h, w = int(rng.integers(120, 300)), int(rng.integers(120, 300))
    images.append({"id": img_id, "file_name": f"{img_id}.jpg", "height": h, "width": w})
    # image 9 has no ground truth; image 10 gets no detections; image 11 gets
    # more than 100 detections; sizes span COCO's small/medium/large areas.
    n_gt = 0 if img_id == 9 else int(rng.integers(1, 8))
    for k in range(n_gt):
        x0, y0 = float(rng.uniform(0, w * 0.6)), float(rng.uniform(0, h * 0.6))
        scale = [0.1, 0.3, 1.0][k % 3]
        bw, bh = float(rng.uniform(6, max(7, (w - x0) * scale))), float(rng.uniform(6, max(7, (h - y0) * scale)))
        cat = int(rng.choice(CATS))
        crowd = int(k == 0 and img_id % 4 == 0)
        poly = [x0, y0, x0 + bw, y0, x0 + bw * 0.8, y0 + bh, x0, y0 + bh * 0.7]
        prle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
        if crowd:  # crowds as uncompressed RLE, as in COCO
            seg = {"size": [h, w], "counts": uncompressed(mask_util.decode(prle))}
        elif k % 2 == 0:
            seg = [poly]
        else:
            seg = {"size": [h, w], "counts": prle["counts"].decode()}
        rle = prle
        area = float(mask_util.area(rle))
        anns.append({"id": aid, "image_id": img_id, "category_id": cat, "segmentation": seg, "area": area,
                     "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": crowd})
        aid += 1
        if crowd or img_id == 10 or rng.random() < 0.15:
            continue  # missed
        m = mask_util.decode(rle)
        shift = rng.integers(-3, 4, 2)
        m = np.roll(np.roll(m, shift[0], 0), shift[1], 1)
        drle = mask_util.encode(np.asfortranarray(m))
        dets.append({"image_id": img_id, "category_id": cat if rng.random() > 0.1 else int(rng.choice(CATS)),
                     "bbox": [float(v) for v in mask_util.toBbox(drle)], "score": float(rng.uniform(0.05, 1.0)),
                     "segmentation": {"size": [h, w], "counts": drle["counts"].decode()}})
    n_fp = 0 if img_id == 10 else (130 if img_id == 11 else int(rng.integers(0, 3)))
    for _ in range(n_fp):  # false positives
        x0, y0 = float(rng.uniform(0, w - 20)), float(rng.uniform(0, h - 20))
        m = np.zeros((h, w), np.uint8)
        m[int(y0):int(y0) + 15, int(x0):int(x0) + 18] = 1
        drle = mask_util.encode(np.asfortranarray(m))
        dets.append({"image_id": img_id, "category_id": int(rng.choice(CATS)),
                     "bbox": [float(v) for v in mask_util.toBbox(drle)], "score": float(rng.uniform(0.05, 0.6)),
                     "segmentation": {"size": [h, w], "counts": drle["counts"].decode()}})
gt = {"images": images, "annotations": anns, "categories": cats}
for name, obj in [("gt.json", gt), ("dets.json", dets), ("dets_empty.json", [])]:
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f)
expected = {}
coco_gt = COCO(os.path.join(out, "gt.json"))
coco_dt = coco_gt.loadRes(os.path.join(out, "dets.json"))
for iou in ("bbox", "segm"):
    ev = COCOeval(coco_gt, coco_dt, iou)
    ev.evaluate(); ev.accumulate(); ev.summarize()
    expected[iou] = [float(v) for v in ev.stats]
    per_category = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, 2]
        ap = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
        p50 = p[0]
        ap50 = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else -1.0
        per_category[str(cat_id)] = [ap, ap50]
    expected[f"{iou}_per_category"] = per_category
# Empty results: pycocotools' loadRes cannot take [], so evaluate a results
# COCO with no annotations, which is what an empty file means.
empty = COCO()
empty.dataset = {"images": images, "categories": cats, "annotations": []}
empty.createIndex()
ev = COCOeval(coco_gt, empty, "bbox")
ev.evaluate(); ev.accumulate(); ev.summarize()
expected["empty_bbox"] = [float(v) for v in ev.stats]
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f)
