"""Evaluation benchmark: a COCO-sized synthetic ground truth (N images, ~7
polygon instances each) and N x 100 detections with RLE masks; times
pycocotools' COCOeval (bbox, segm) and `maskrcnn eval --results` on the same
files and checks the 12 numbers agree.

Usage: python scripts/bench_eval.py [N] [maskrcnn binary]   (N default 5000)
"""
import json, os, subprocess, sys, tempfile, time
import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/maskrcnn"
rng = np.random.default_rng(0)
tmp = tempfile.mkdtemp()
images, anns, dets = [], [], []
for i in range(1, n + 1):
    h, w = 480, 640
    images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
    gt_boxes = []
    for _ in range(int(rng.integers(3, 12))):
        x, y = rng.uniform(0, w - 60), rng.uniform(0, h - 60)
        bw, bh = rng.uniform(8, w - x), rng.uniform(8, h - y)
        poly = [x, y, x + bw, y, x + bw * 0.7, y + bh, x, y + bh * 0.8]
        cat = int(rng.integers(1, 81))
        anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "segmentation": [poly],
                     "area": bw * bh * 0.75, "bbox": [x, y, bw, bh], "iscrowd": 0})
        gt_boxes.append((x, y, bw, bh, cat))
    boxes = []
    for k in range(100):
        if k < len(gt_boxes):
            x, y, bw, bh, cat = gt_boxes[k]
            b = [x + rng.normal(0, 3), y + rng.normal(0, 3), bw * rng.uniform(0.9, 1.1), bh * rng.uniform(0.9, 1.1)]
        else:
            b = [rng.uniform(0, w - 40), rng.uniform(0, h - 40), rng.uniform(5, 200), rng.uniform(5, 200)]
            cat = int(rng.integers(1, 81))
        b = [max(0.0, b[0]), max(0.0, b[1]), min(b[2], w - b[0]), min(b[3], h - b[1])]
        boxes.append((b, cat))
    rles = mask_util.frPyObjects(np.array([b for b, _ in boxes], dtype=np.float64), h, w)
    for (b, cat), r in zip(boxes, rles):
        dets.append({"image_id": i, "category_id": cat, "bbox": [float(v) for v in b],
                     "score": float(rng.uniform(0.01, 1)), "segmentation": {"size": [h, w], "counts": r["counts"].decode()}})
cats = [{"id": c, "name": str(c)} for c in range(1, 81)]
gt_path, dt_path = os.path.join(tmp, "gt.json"), os.path.join(tmp, "dt.json")
json.dump({"images": images, "annotations": anns, "categories": cats}, open(gt_path, "w"))
json.dump(dets, open(dt_path, "w"))
print(f"{n} images, {len(anns)} GT instances, {len(dets)} detections", flush=True)

t0 = time.perf_counter()
coco_gt = COCO(gt_path)
coco_dt = coco_gt.loadRes(dt_path)
ref = {}
for iou in ("bbox", "segm"):
    t = time.perf_counter()
    ev = COCOeval(coco_gt, coco_dt, iou); ev.evaluate(); ev.accumulate(); ev.summarize()
    ref[iou] = list(ev.stats)
    print(f"pycocotools {iou}: {time.perf_counter() - t:.1f} s", flush=True)
t_py = time.perf_counter() - t0

t0 = time.perf_counter()
m = os.path.join(tmp, "m.json")
subprocess.run([binary, "eval", "--ann", gt_path, "--results", dt_path, "--metrics", m], check=True,
               stdout=subprocess.DEVNULL)
t_ours = time.perf_counter() - t0
ours = json.load(open(m))
diff = max(abs(a - b) for iou in ("bbox", "segm") for a, b in zip(ours[iou]["stats"], ref[iou]))
print(json.dumps({"images": n, "detections": len(dets), "pycocotools_s": round(t_py, 1),
                  "maskrcnn_eval_s": round(t_ours, 1), "speedup": round(t_py / t_ours, 1), "max_stat_diff": diff}))
