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

save_file(tensors, out)
print(f"wrote {case} cases to {out}")
