"""Oracle for Mask R-CNN inference: builds a seeded torchvision 0.26 Mask R-CNN
(ResNet-FPN, FrozenBatchNorm2d, trainable_layers=3), sharpens it with a few
SGD steps on synthetic shapes so detections are not ties of a random model,
runs it on a batch of images (non-square, tiny, larger than max_size) and saves
weights, inputs, intermediate stages and detections.

Usage: python inference_fixture.py OUT_DIR --depth 50 --classes 91 --min-size 800
           --max-size 1333 [--device cpu|cuda] [--steps 3] [--sizes 480x640,40x50,...]
           [--fpn-norm none|frozen_bn|bn] [--rpn-conv-depth N] [--box-head 2mlp|4conv1fc]
           [--head-norm none|bn] [--arch v1|v2] [--trainable-layers N] [--no-files]
--arch v2 builds torchvision's maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).
Writes OUT_DIR/weights.safetensors and OUT_DIR/outputs.safetensors.
"""
import argparse
import math
import os
import torch
import torchvision
from safetensors.torch import save_file
from tv_common import build, shapes_image

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--depth", type=int, default=50)
ap.add_argument("--classes", type=int, default=91)
ap.add_argument("--min-size", type=int, default=800)
ap.add_argument("--max-size", type=int, default=1333)
ap.add_argument("--device", default="cpu")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--sharpen", type=float, default=30.0)
ap.add_argument("--train-size", type=int, default=224)
ap.add_argument("--sizes", default="480x640,40x50,1600x2400")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--fpn-norm", default="none", choices=["none", "frozen_bn", "bn"])
ap.add_argument("--rpn-conv-depth", type=int, default=1)
ap.add_argument("--box-head", default="2mlp", choices=["2mlp", "4conv1fc"])
ap.add_argument("--head-norm", default="none", choices=["none", "bn"])
ap.add_argument("--arch", default="v1", choices=["v1", "v2"])
ap.add_argument("--trainable-layers", type=int, default=3)
ap.add_argument("--box-only", action="store_true", help="torchvision's Faster R-CNN (no mask branch)")
ap.add_argument("--no-files", action="store_true",
                help="skip the PNGs, predict_ref.json, gt.json and eval_ref.json (predict/eval tests)")
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
torch.manual_seed(args.seed)
torch.use_deterministic_algorithms(False)
dev = torch.device(args.device)
# Full float32 on CUDA (the Rust side turns TF32 off too): TF32 rounds every
# convolution input to 10 bits, so a last-bit difference upstream (cuDNN's
# BatchNorm against a folded scale and shift) would come out as a 1e-3 one.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
gen = torch.Generator().manual_seed(args.seed + 1)


model = build(args.depth, args.classes, args.min_size, args.max_size, gen, args.fpn_norm, args.rpn_conv_depth,
              args.box_head, args.head_norm, args.arch, args.trainable_layers, masks=not args.box_only).to(dev)

# Sharpen: a few SGD steps at a small size.
if args.steps > 0:
    model.transform.min_size = (args.train_size,)
    model.transform.max_size = int(args.train_size * 1.5)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    for step in range(args.steps):
        batch = [shapes_image(gen, args.train_size, int(args.train_size * 1.25), 4, args.classes) for _ in range(2)]
        imgs = [b[0].to(dev) for b in batch]
        tgts = [{k: v.to(dev) for k, v in b[1].items()} for b in batch]
        losses = model(imgs, tgts)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.transform.min_size = (args.min_size,)
    model.transform.max_size = args.max_size

# Scale the classifier so class scores spread out (few CPU steps cannot train
# a confident model; this keeps detection parity from being about ties).
with torch.no_grad():
    cls = model.roi_heads.box_predictor.cls_score
    cls.weight[1:].mul_(args.sharpen)
    cls.bias[1:].mul_(args.sharpen)
    cls.bias[0].sub_(3.0)
    model.rpn.head.cls_logits.weight.mul_(args.sharpen / 2)
    model.rpn.head.cls_logits.bias.mul_(args.sharpen / 2)
model.eval()
save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
          os.path.join(args.out, "weights.safetensors"))

sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
scenes = [shapes_image(gen, h, w, 5, args.classes) for h, w in sizes]
images = [img.to(dev) for img, _ in scenes]
out = {}
with torch.no_grad():
    il, _ = model.transform(images)
    feats = model.backbone(il.tensors)
    proposals, _ = model.rpn(il, feats)
    dets, _ = model.roi_heads(feats, proposals, il.image_sizes)
    # Detections before pasting (resized-image coordinates), then final ones.
    for i, d in enumerate(dets):
        out[f"pre.boxes.{i}"] = d["boxes"].clone()
        out[f"pre.scores.{i}"] = d["scores"].clone()
        if "masks" in d:
            out[f"pre.masks.{i}"] = d["masks"].clone()
    final = model.transform.postprocess(dets, il.image_sizes, [im.shape[-2:] for im in images])
for i, im in enumerate(images):
    out[f"image.{i}"] = im
for name, f in feats.items():
    if f.numel() < 25_000_000:
        out[f"features.{name}"] = f
for i, (p, d) in enumerate(zip(proposals, final)):
    out[f"proposals.{i}"] = p
    out[f"boxes.{i}"] = d["boxes"]
    out[f"scores.{i}"] = d["scores"]
    out[f"labels.{i}"] = d["labels"]
    if "masks" in d:
        out[f"masks.{i}"] = (d["masks"][:, 0] > 0.5).to(torch.uint8)
out["image_sizes"] = torch.tensor(il.image_sizes)
out["batch_shape"] = torch.tensor(list(il.tensors.shape))
save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, os.path.join(args.out, "outputs.safetensors"))
print("detections per image:", [len(d["boxes"]) for d in final],
      "max score:", [round(float(d["scores"].max()), 3) if len(d["scores"]) else None for d in final])

# The same images as 8-bit PNG files, and torchvision's detections on them in
# the COCO results format `maskrcnn predict --json` writes (pycocotools RLE).
import json
import sys
if args.no_files:
    sys.exit(0)
import numpy as np
from PIL import Image
try:
    import pycocotools.mask as mask_util
except ImportError:  # the GPU machine has no pycocotools; predict is tested on CPU
    print("pycocotools missing: predict_ref.json not written")
    sys.exit(0)

pngs = []
for i, im in enumerate(images):
    arr = (im.cpu().permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    path = os.path.join(args.out, f"img{i}.png")
    Image.fromarray(arr).save(path)
    pngs.append((path, torch.from_numpy(arr).permute(2, 0, 1).float().div(255).to(dev)))
results = []
with torch.no_grad():
    preds = model([p[1] for p in pngs])
for (path, _), d in zip(pngs, preds):
    for b, s, l, m in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(), d["masks"][:, 0] > 0.5):
        rle = mask_util.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8)))
        results.append(dict(file_name=os.path.basename(path), category_id=l, score=s,
                            bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            segmentation=dict(size=rle["size"], counts=rle["counts"].decode())))
with open(os.path.join(args.out, "predict_ref.json"), "w") as f:
    json.dump(results, f)

# A COCO ground truth for the PNGs (the shapes drawn into them; category id =
# label) and pycocotools' scores of torchvision's detections against it.
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"class {c}"} for c in range(1, args.classes)]}
for i, ((path, _), (_, t)) in enumerate(zip(pngs, scenes)):
    h, w = t["masks"].shape[-2:] if len(t["masks"]) else images[i].shape[-2:]
    gt["images"].append({"id": i + 1, "file_name": os.path.basename(path), "height": int(h), "width": int(w)})
    for b, l, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
        rle = mask_util.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": l,
                                  "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float(mask_util.area(rle)),
                                  "iscrowd": 0, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
# Every third of torchvision's detections also becomes a ground-truth
# instance, so the scores below are not trivially zero for a weak model.
for r in results[::3]:
    img_id = next(im["id"] for im in gt["images"] if im["file_name"] == r["file_name"])
    seg = r["segmentation"]
    area = float(mask_util.area({"size": seg["size"], "counts": seg["counts"].encode()}))
    if area == 0:
        continue
    gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": img_id, "category_id": r["category_id"],
                              "bbox": r["bbox"], "area": area, "iscrowd": 0, "segmentation": seg})
with open(os.path.join(args.out, "gt.json"), "w") as f:
    json.dump(gt, f)
ids = {im["file_name"]: im["id"] for im in gt["images"]}
coco_res = [dict(r, image_id=ids[r["file_name"]]) for r in results]
coco_gt = COCO(os.path.join(args.out, "gt.json"))
expected = {}
for iou in ("bbox", "segm"):
    ev = COCOeval(coco_gt, coco_gt.loadRes(coco_res), iou)
    ev.evaluate(); ev.accumulate(); ev.summarize()
    expected[iou] = [float(v) for v in ev.stats]
with open(os.path.join(args.out, "eval_ref.json"), "w") as f:
    json.dump(expected, f)
