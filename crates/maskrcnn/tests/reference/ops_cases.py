"""Oracle for the detection ops: random and edge-case inputs with
torchvision 0.26's outputs of nms, batched_nms, box_iou and roi_align.

Usage: python ops_cases.py OUT.safetensors [cpu|cuda]
Every case i stores its inputs and torchvision's output under "i.<name>".
"""
import sys
import torch
import torchvision
from safetensors.torch import save_file

out, device = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cpu")
g = torch.Generator().manual_seed(1234)
tensors = {}


def rand_boxes(n, size=100.0, degenerate=False):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size * 0.5
    if degenerate and n > 0:
        wh[: max(1, n // 5)] = 0.0  # zero-area boxes
    b = torch.cat([xy, xy + wh], 1)
    # boxes crossing and outside the image border
    b[::7] -= size * 0.3
    return b


def put(case, **kw):
    for k, v in kw.items():
        tensors[f"{case}.{k}"] = v.detach().to("cpu").contiguous()


case = 0
# --- NMS / batched NMS
for n, thr, ties, degenerate, many in [
    (0, 0.5, False, False, False),
    (1, 0.5, False, False, False),
    (50, 0.5, False, False, False),
    (300, 0.7, False, True, False),
    (200, 0.3, True, False, False),      # equal scores
    (1500, 0.5, False, True, True),      # > 1000 boxes: per-category path on CPU
    (40, 0.0, False, False, False),
    (40, 1.0, False, False, False),
]:
    boxes = rand_boxes(n, degenerate=degenerate)
    scores = torch.rand(n, generator=g)
    if ties:
        scores = (scores * 4).floor() / 4
    idxs = torch.randint(0, 5 if not many else 40, (n,), generator=g)
    b, s, i = boxes.to(device), scores.to(device), idxs.to(device)
    keep = torchvision.ops.nms(b, s, thr)
    bkeep = torchvision.ops.batched_nms(b, s, i, thr)
    put(f"nms{case}", boxes=boxes, scores=scores, idxs=idxs, thr=torch.tensor([thr]), keep=keep, batched_keep=bkeep)
    case += 1

# --- box_iou
for n, m in [(0, 5), (5, 0), (30, 40)]:
    a, b = rand_boxes(n, degenerate=True), rand_boxes(m)
    put(f"iou{case}", a=a, b=b, iou=torchvision.ops.box_iou(a.to(device), b.to(device)))
    case += 1

# --- roi_align (aligned=False and True, sampling 2, several scales)
for (n, c, h, w, k, scale, out_size, aligned, ratio) in [
    (2, 8, 25, 34, 40, 0.25, 7, False, 2),
    (1, 4, 13, 9, 12, 0.125, 14, False, 2),
    (2, 3, 10, 10, 10, 1.0, 5, True, 2),
    (1, 2, 6, 7, 0, 0.25, 7, False, 2),
    (3, 1, 60, 80, 30, 1.0, 28, False, -1),  # adaptive: mask targets
]:
    feats = torch.randn(n, c, h, w, generator=g)
    size = max(h, w) / scale
    boxes = rand_boxes(k, size=size, degenerate=True)
    if k:
        boxes[0] = torch.tensor([-size, -size, 2 * size, 2 * size])  # far outside
        boxes[1] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # a point
    bidx = torch.randint(0, n, (k, 1), generator=g).float()
    rois = torch.cat([bidx, boxes], 1)
    pooled = torchvision.ops.roi_align(feats.to(device), rois.to(device), out_size, scale, ratio, aligned)
    put(f"roi{case}", feats=feats, rois=rois, params=torch.tensor([scale, out_size, ratio, float(aligned)]), pooled=pooled)
    case += 1

# --- Matcher (RPN: 0.7/0.3 with low-quality matches; RoI: 0.5/0.5 without)
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import project_masks_on_boxes

for (g_n, p_n, hi, lo, lq, kind) in [
    (5, 300, 0.7, 0.3, True, "random"),
    (4, 200, 0.5, 0.5, False, "random"),
    (3, 100, 0.7, 0.3, True, "no_overlap"),   # a GT overlapping nothing: IoU row of zeros
    (3, 100, 0.7, 0.3, True, "all_ignored"),  # every IoU between the thresholds
    (1, 1, 0.7, 0.3, True, "random"),
]:
    gt = rand_boxes(g_n, degenerate=False) + 1.0
    preds = rand_boxes(p_n) + 1.0
    q = torchvision.ops.box_iou(gt, preds)
    if kind == "no_overlap":
        q[0] = 0.0
    if kind == "all_ignored":
        q = 0.3 + 0.39 * torch.rand(g_n, p_n, generator=g)
    m = det_utils.Matcher(hi, lo, allow_low_quality_matches=lq)(q.clone().to(device))
    put(f"match{case}", quality=q, params=torch.tensor([hi, lo, float(lq)]), matches=m)
    case += 1

# --- BoxCoder encode / decode
for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
    coder = det_utils.BoxCoder(w)
    ref = rand_boxes(50) + 1.0
    props = rand_boxes(50) + 1.0
    enc = coder.encode_single(ref.to(device), props.to(device))
    deltas = torch.randn(50, 4 * 3, generator=g) * 2
    deltas[0, 2] = 20.0  # beyond the exp clamp
    dec = coder.decode_single(deltas.to(device), props.to(device))
    put(f"coder{case}", weights=torch.tensor(w), ref=ref, props=props, encoded=enc, deltas=deltas, decoded=dec)
    case += 1

# --- Mask targets: GT masks cropped/resized into boxes (adaptive RoIAlign)
masks = (torch.rand(4, 90, 120, generator=g) > 0.5).to(torch.uint8)
boxes = rand_boxes(25, size=120.0) + 2.0
boxes[0] = torch.tensor([-20.0, -10.0, 140.0, 100.0])  # crossing the border
matched = torch.randint(0, 4, (25,), generator=g)
t = project_masks_on_boxes(masks.to(device), boxes.to(device), matched.to(device), 28)
put(f"masktgt{case}", masks=masks, boxes=boxes, matched=matched, targets=t)
case += 1

# --- Sampler: how many positives / negatives torchvision draws per image
sampler = det_utils.BalancedPositiveNegativeSampler(256, 0.5)
labels = [torch.cat([torch.ones(300), torch.zeros(1000), -torch.ones(50)]),   # more positives than the quota
          torch.cat([torch.ones(10), torch.zeros(100)]),                     # too few of both
          torch.zeros(500),                                                  # no positives (no GT)
          -torch.ones(40)]                                                   # all ignored
pos, neg = sampler([l.to(device) for l in labels])
for i, (l, p_, n_) in enumerate(zip(labels, pos, neg)):
    put(f"sampler{case}", **{f"labels{i}": l, f"counts{i}": torch.tensor([int(p_.sum()), int(n_.sum())])})
case += 1

# --- Polygon mask targets (maskrcnn_benchmark's procedure: shift to the box,
# scale to MxM, rasterize with pycocotools). Skipped where pycocotools is missing.
try:
    import numpy as np
    import pycocotools.mask as mask_util
except ImportError:
    mask_util = None
if mask_util is not None:
    M = 28
    instances = []
    for _ in range(3):
        polys = []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            k = int(torch.randint(3, 7, (1,), generator=g))
            ang = torch.sort(torch.rand(k, generator=g) * 6.283)[0]
            r = 10 + torch.rand(k, generator=g) * 30
            cx, cy = 20 + torch.rand(2, generator=g) * 60
            polys.append(torch.stack([cx + r * torch.cos(ang), cy + r * torch.sin(ang)], 1).reshape(-1).double())
        instances.append(polys)
    boxes = rand_boxes(12, size=100.0) + 1.0
    boxes[0] = torch.tensor([-10.0, -5.0, 130.0, 90.0])
    matched = torch.randint(0, 3, (12,), generator=g)
    targets = []
    for b, mi in zip(boxes.double().tolist(), matched.tolist()):
        w, h = max(b[2] - b[0], 1.0), max(b[3] - b[1], 1.0)
        ps = [((p.reshape(-1, 2) - torch.tensor([b[0], b[1]], dtype=torch.float64)) * torch.tensor([M / w, M / h], dtype=torch.float64)).reshape(-1).tolist()
              for p in instances[mi]]
        rle = mask_util.merge(mask_util.frPyObjects(ps, M, M))
        targets.append(torch.from_numpy(mask_util.decode(rle).astype(np.float32)))
    flat, lengths = [], []
    for inst_i, polys in enumerate(instances):
        for p in polys:
            flat.append(p)
            lengths.append([inst_i, p.numel()])
    put(f"polytgt{case}", coords=torch.cat(flat), lengths=torch.tensor(lengths), boxes=boxes, matched=matched,
        targets=torch.stack(targets))
    case += 1

save_file(tensors, out)
print(f"wrote {case} cases to {out}")
