"""Oracle for training: torchvision 0.26 Mask R-CNN losses and gradients on a
seeded model, with every sample its two BalancedPositiveNegativeSamplers drew
recorded so the Rust side can replay them.

Usage: python train_fixture.py OUT_DIR [--depth 50] [--classes 7] [--min-size 320]
           [--max-size 512] [--device cpu|cuda] [--arch v1|v2]
--arch v2: torchvision's maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None),
whose BatchNorm layers train with batch statistics.
Writes OUT_DIR/weights.safetensors and OUT_DIR/train.safetensors with
image.{i}, boxes.{i}, labels.{i}, masks.{i}; loss.<name>; grad.<param> (and on
CUDA grad2.<param>: a second identical pass; for v2 grad64.<param>: the pass
in float64);
sample.{call}.{stage}.{image}.pos/neg (stage 0 = RPN, 1 = RoI heads).
"""
import argparse
import os
import torch
from safetensors.torch import save_file
from torchvision.models.detection import _utils as det_utils
from tv_common import build, shapes_image

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--depth", type=int, default=50)
ap.add_argument("--classes", type=int, default=7)
ap.add_argument("--min-size", type=int, default=256)
ap.add_argument("--max-size", type=int, default=512)
ap.add_argument("--device", default="cpu")
ap.add_argument("--seed", type=int, default=3)
ap.add_argument("--arch", default="v1", choices=["v1", "v2"])
ap.add_argument("--box-only", action="store_true", help="torchvision's Faster R-CNN (no mask branch)")
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
torch.manual_seed(args.seed)
gen = torch.Generator().manual_seed(args.seed)
dev = torch.device(args.device)
# Gradients are compared in full fp32: TF32 would turn the last-bit
# differences of two correct implementations into 1e-3-level ones.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
model = build(args.depth, args.classes, args.min_size, args.max_size, gen, arch=args.arch,
              masks=not args.box_only).to(dev)
model.train()

# Images: two with instances, one with none (a negative); all 256x384, a
# multiple of 32, so the batch has no padding whose equal scores would make
# the proposal order depend on each device's sort.
images, targets = [], []
for h, w, k in [(256, 384, 5), (256, 384, 3), (256, 384, 0)]:
    img, t = shapes_image(gen, h, w, k, args.classes)
    if args.box_only:  # Faster R-CNN's targets: boxes and labels
        t = {k: v for k, v in t.items() if k != "masks"}
    images.append(img.to(dev))
    targets.append({k: v.to(dev) for k, v in t.items()})

recorded = []
original_call = det_utils.BalancedPositiveNegativeSampler.__call__


def recording_call(self, matched_idxs):
    pos, neg = original_call(self, matched_idxs)
    stage = 0 if self is model.rpn.fg_bg_sampler else 1
    recorded.append((stage, [p.clone() for p in pos], [n.clone() for n in neg]))
    return pos, neg


det_utils.BalancedPositiveNegativeSampler.__call__ = recording_call
rpn_forward = model.rpn.forward
rpn_boxes = []


def recording_rpn(*a, **kw):
    boxes, rpn_losses = rpn_forward(*a, **kw)
    if not rpn_boxes:
        rpn_boxes.extend(b.detach().clone() for b in boxes)
    return boxes, rpn_losses


model.rpn.forward = recording_rpn
losses = model(images, targets)
total = sum(losses.values())
total.backward()

# Second, identical pass (same samples replayed): how far torchvision's own
# gradients move between two runs on this device (atomics, kernel choice).
first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
replay = list(recorded)


def replaying_call(self, matched_idxs):
    stage, pos, neg = replay.pop(0)
    return pos, neg


det_utils.BalancedPositiveNegativeSampler.__call__ = replaying_call
out = {}
if dev.type == "cuda":
    model.zero_grad()
    sum(model(images, targets).values()).backward()
    for n, p in model.named_parameters():
        if n in first_grads:
            out[f"grad2.{n}"] = p.grad
# (On the CPU torchvision repeats itself exactly: no second pass there.)

# The same pass in float64 (same samples): how far torchvision's own
# float32 gradients are from exact ones. Chains of BatchNorm layers in
# training (v2's heads) amplify float32 rounding in the backward pass.
if args.arch == "v2":  # (v1 matches within 1e-4 without it)
    import copy
    model64 = copy.deepcopy(model).double()
    del model64.rpn.forward  # the recording wrapper calls the float32 model's RPN
    rpn64_forward = model64.rpn.forward


    def float32_proposals(*a, **kw):
        # The RPN's losses in float64, but the float32 pass's proposals: the
        # replayed samples index them, and float64 scores would order and
        # suppress some proposals differently.
        _, rpn_losses = rpn64_forward(*a, **kw)
        return [b.double() for b in rpn_boxes], rpn_losses


    model64.rpn.forward = float32_proposals
    model64.zero_grad()
    replay = list(recorded)
    sum(model64([im.double() for im in images],
                [{k: (v.double() if v.is_floating_point() else v) for k, v in t.items()} for t in targets]).values()).backward()
    for n, p in model64.named_parameters():
        if n in first_grads:
            out[f"grad64.{n}"] = p.grad.float()
    del model64
# On CUDA: torchvision's CPU arithmetic on the same inputs and samples, to
# measure how far torchvision's own CPU and CUDA gradients are apart.
if dev.type == "cuda":
    model_cpu = model.to("cpu")
    model_cpu.zero_grad()
    replay = [(st, [p.cpu() for p in pos], [n.cpu() for n in neg]) for st, pos, neg in recorded]
    cpu_losses = model_cpu([im.cpu() for im in images], [{k: v.cpu() for k, v in t.items()} for t in targets])
    sum(cpu_losses.values()).backward()
    for n, p in model_cpu.named_parameters():
        if n in first_grads:
            out[f"gradcpu.{n}"] = p.grad
    print("CPU losses on the CUDA samples:", {k: round(float(v), 6) for k, v in cpu_losses.items()})
for i, (im, t) in enumerate(zip(images, targets)):
    out[f"image.{i}"] = im
    out[f"boxes.{i}"] = t["boxes"]
    out[f"labels.{i}"] = t["labels"]
    if "masks" in t:
        out[f"masks.{i}"] = t["masks"]
for i, b in enumerate(rpn_boxes):
    out[f"proposals.{i}"] = b
for name, v in losses.items():
    out[f"loss.{name}"] = v.detach().reshape(1)
for name, g in first_grads.items():
    out[f"grad.{name}"] = g
for c, (stage, pos, neg) in enumerate(recorded):
    for i, (p, n) in enumerate(zip(pos, neg)):
        out[f"sample.{c}.{stage}.{i}.pos"] = p
        out[f"sample.{c}.{stage}.{i}.neg"] = n
save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, os.path.join(args.out, "train.safetensors"))
# Weights as they were before the backward pass (backward changes none).
save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},  # unchanged by backward
          os.path.join(args.out, "weights.safetensors"))
print({k: round(float(v), 5) for k, v in losses.items()}, "sampler calls:", len(recorded))
