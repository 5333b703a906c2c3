"""Oracle for prediction with trained weights: torchvision's R18-FPN Mask
R-CNN (7 classes, FrozenBatchNorm2d body, three trainable stages, as
tv_common.build) trained briefly on the CPU on tv_common's shapes, seeded; then IMAGES new scenes of
varied sizes as PNG files and torchvision's detections on them, predicted
in batches of each given size, in the COCO results format `maskrcnn predict
--json` writes (pycocotools RLE), at most 40 per image.

A trained model's scores sit near its thresholds and its features reach
the padding of a batch, so it shows departures that sharpened random weights
hide; and a detector's output depends on which images share its padded
batch, so each batch size has its own reference.

Usage: python trained_fixture.py OUT_DIR ITERS IMAGES BATCH [BATCH ...]
Writes OUT_DIR/weights.safetensors, OUT_DIR/images/img{NN}.png,
OUT_DIR/predict_b{BATCH}.json.
"""
import json
import os
import shutil
import sys

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image
from safetensors.torch import save_file

from tv_common import build, shapes_image

out, iters, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
batches = [int(b) for b in sys.argv[4:]]
# A fresh images folder: scenes of an earlier run (more of them) must not stay.
shutil.rmtree(os.path.join(out, "images"), ignore_errors=True)
os.makedirs(os.path.join(out, "images"))
torch.set_num_threads(2)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
model = build(18, 7, 160, 240, gen)
model.train()
# Fewer proposals and sampled RoIs than the defaults while training (a few
# times faster on a CPU); inference keeps torchvision's defaults.
model.rpn._pre_nms_top_n = dict(training=300, testing=1000)
model.rpn._post_nms_top_n = dict(training=100, testing=1000)
model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.SGD(params, lr=0.04, momentum=0.9, weight_decay=1e-4)
for it in range(iters):
    for g in opt.param_groups:
        g["lr"] = 0.04 * min(1.0, (it + 1) / 10)
    images, targets = [], []
    while len(images) < 4:
        h, w = (int(torch.randint(120, 200, (1,), generator=gen)) for _ in range(2))
        im, t = shapes_image(gen, h, w, int(torch.randint(1, 5, (1,), generator=gen)), 7)
        if len(t["boxes"]):
            images.append(im)
            targets.append(t)
    loss = sum(model(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()
print("last training loss:", round(float(loss.detach()), 3))
model.eval()
# At most 40 detections per image (the test passes the same): a weak
# model's 100 low-score masks per image made most of the oracle's time.
model.roi_heads.detections_per_img = 40
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "weights.safetensors"))

files = []
scenes = torch.Generator().manual_seed(123)
for i in range(count):
    h, w = (int(torch.randint(110, 230, (1,), generator=scenes)) for _ in range(2))
    im, _ = shapes_image(scenes, h, w, int(torch.randint(1, 7, (1,), generator=scenes)), 7)
    arr = (im.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    name = f"img{i:02d}.png"
    Image.fromarray(arr).save(os.path.join(out, "images", name))
    files.append((name, torch.from_numpy(arr).permute(2, 0, 1).float().div(255)))

for batch in batches:
    results = []
    for k in range(0, len(files), batch):
        chunk = files[k:k + batch]
        with torch.no_grad():
            preds = model([im for _, im in chunk])
        for (name, _), d in zip(chunk, preds):
            for b, s, l, m in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(),
                                  d["masks"][:, 0] > 0.5):
                rle = mask_util.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
                results.append(dict(file_name=name, category_id=l, score=s,
                                    bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                    segmentation=dict(size=rle["size"], counts=rle["counts"].decode())))
    with open(os.path.join(out, f"predict_b{batch}.json"), "w") as f:
        json.dump(results, f)
    print(f"batch {batch}: {len(results)} detections, top score {max(r['score'] for r in results):.3f}")
