"""Writes a synthetic COCO evaluation set for `maskrcnn eval --images`
benchmarks: N noise JPEGs of 800 x 1000-1333 with one box annotation each, and
randomly initialized torchvision Mask R-CNN R50-FPN weights (91 classes) as
safetensors.

Usage: python scripts/make_eval_dataset.py OUT_DIR [N] [HxW]
HxW gives every image that size (e.g. 480x640, COCO-like) instead.
"""
import json, os, sys
import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

out = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
fixed = tuple(int(v) for v in sys.argv[3].split("x")) if len(sys.argv) > 3 else None
os.makedirs(os.path.join(out, "images"), exist_ok=True)
rng = np.random.default_rng(0)
images, anns = [], []
for i in range(1, n + 1):
    h, w = fixed or (800, int(rng.integers(1000, 1334)))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(out, "images", f"{i}.jpg"), quality=90)
    images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
    anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 100, 100], "area": 10000.0, "iscrowd": 0,
                 "segmentation": [[10, 10, 110, 10, 110, 110, 10, 110]]})
json.dump({"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, 91)]},
          open(os.path.join(out, "gt.json"), "w"))
torch.manual_seed(0)
body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "weights.safetensors"))
print(f"wrote {n} images, gt.json, weights.safetensors to {out}")
