"""Peer for the training comparison: torchvision's Mask R-CNN R50-FPN trained
from scratch on a COCO instances dataset (our `maskrcnn synth` output) with
the recipe of configs/demo_gpu.toml, for a wall-clock budget of training
time, evaluated on the validation set at given iterations and at the end.

Usage (GPU machine; no pycocotools needed):
  python3 peer_train_coco.py DATA_DIR OUT_DIR SECONDS EVAL_EVERY_ITERS
Writes OUT_DIR/dets_iter_N.json (COCO results) and OUT_DIR/log.jsonl
(iteration, train seconds, losses); score them with `maskrcnn eval`.

Recipe (as ours): the dataset's categories + background (sorted by id: 7
classes for `maskrcnn synth`, 81 for `synth --profile coco`), SGD
lr 0.02 momentum 0.9 weight decay 1e-4, linear warmup from 0.001 over 200
iterations, steps at 2200/2700, batch 8, fp16 autocast + GradScaler,
channels-last, short side drawn from 480..608 (max 800), test 544/800,
horizontal flip 0.5, crowd annotations left out (torchvision's reference).
Environment overrides for other recipes: PEER_BATCH (8), PEER_AMP (fp16 |
bf16), PEER_MIN_SIZES ("480,512,544,576,608"), PEER_MAX_SIZE (800),
PEER_WORKERS (8), PEER_MAX_ITER (no limit: stop at the time budget),
PEER_LR (0.02), PEER_WARMUP (200), PEER_STEPS ("2200,2700"): match ours'
effective learning rate (solver.base_lr x ims_per_batch / reference_batch)
and resolved steps (`maskrcnn config` prints both).
"""
import json, os, random, sys, time
import numpy as np
import cv2
import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn


def rle_decode(counts, h, w):
    """COCO RLE (compressed string or run list) -> [h, w] uint8."""
    if isinstance(counts, str):
        runs, i, s = [], 0, counts.encode()
        while i < len(s):
            x, k, more = 0, 0, True
            while more:
                c = s[i] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                i += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(runs) > 2:
                x += runs[-2]
            runs.append(x)
        counts = runs
    flat = np.zeros(h * w, np.uint8)
    pos, val = 0, 0
    for r in counts:
        if val:
            flat[pos:pos + r] = 1
        pos += r
        val ^= 1
    return flat.reshape(w, h).T


def rle_encode(mask):
    """[h, w] bool -> COCO compressed RLE string (column-major, as maskApi.c)."""
    flat = np.asarray(mask, np.uint8).T.reshape(-1)
    n = flat.size
    idx = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], idx, [n]])).tolist()
    if n and flat[0] == 1:
        runs = [0] + runs
    if n == 0:
        runs = [0]
    out = []
    for i, x in enumerate(runs):
        x = int(x) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


class Coco(torch.utils.data.Dataset):
    def __init__(self, ann, images, train):
        d = json.load(open(ann))
        self.images_dir, self.train = images, train
        cats = sorted(c["id"] for c in d["categories"])
        self.label = {c: i + 1 for i, c in enumerate(cats)}
        self.cat_of = {i + 1: c for i, c in enumerate(cats)}
        by_img = {}
        for a in d["annotations"]:
            if a.get("iscrowd", 0) == 0:
                by_img.setdefault(a["image_id"], []).append(a)
        self.imgs = [im for im in d["images"] if (not train) or by_img.get(im["id"])]
        self.anns = by_img

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        im = self.imgs[i]
        img = cv2.imread(os.path.join(self.images_dir, im["file_name"]))[:, :, ::-1].copy()
        h, w = img.shape[:2]
        t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        if not self.train:
            return t, im["id"]
        boxes, labels, masks = [], [], []
        for a in self.anns.get(im["id"], []):
            x, y, bw, bh = a["bbox"]
            if bw <= 0 or bh <= 0:
                continue
            seg = a["segmentation"]
            if isinstance(seg, list):
                m = np.zeros((h, w), np.uint8)
                for p in seg:
                    cv2.fillPoly(m, [np.array(p, np.float32).reshape(-1, 2).round().astype(np.int32)], 1)
            else:
                m = rle_decode(seg["counts"], h, w)
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.label[a["category_id"]])
            masks.append(m)
        target = dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      labels=torch.tensor(labels, dtype=torch.int64),
                      masks=torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8))
        if random.random() < 0.5:
            t = t.flip(-1)
            b = target["boxes"].clone()
            target["boxes"][:, 0], target["boxes"][:, 2] = w - b[:, 2], w - b[:, 0]
            target["masks"] = target["masks"].flip(-1)
        return t, target


def collate(batch):
    return tuple(zip(*batch))


@torch.no_grad()
def evaluate(model, val, out_path, dev):
    model.eval()
    model.transform.min_size = (544,)
    results = []
    loader = torch.utils.data.DataLoader(val, batch_size=8, num_workers=4, collate_fn=collate)
    for imgs, ids in loader:
        with torch.autocast("cuda", dtype=torch.float16):
            outs = model([i.to(dev) for i in imgs])
        for o, img_id in zip(outs, ids):
            masks = (o["masks"][:, 0] > 0.5).cpu().numpy()
            for b, s, l, m in zip(o["boxes"].float().cpu().tolist(), o["scores"].float().cpu().tolist(),
                                  o["labels"].cpu().tolist(), masks):
                results.append(dict(image_id=img_id, category_id=val.cat_of[l], score=s,
                                    bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                    segmentation=dict(size=list(m.shape), counts=rle_encode(m))))
    json.dump(results, open(out_path, "w"))
    model.train()
    model.transform.min_size = MIN_SIZES


BATCH = int(os.environ.get("PEER_BATCH", "8"))
AMP = torch.bfloat16 if os.environ.get("PEER_AMP", "fp16") == "bf16" else torch.float16
MIN_SIZES = tuple(int(s) for s in os.environ.get("PEER_MIN_SIZES", "480,512,544,576,608").split(","))
MAX_SIZE = int(os.environ.get("PEER_MAX_SIZE", "800"))
WORKERS = int(os.environ.get("PEER_WORKERS", "8"))
MAX_ITER = int(os.environ.get("PEER_MAX_ITER", "0"))
LR = float(os.environ.get("PEER_LR", "0.02"))
WARMUP = int(os.environ.get("PEER_WARMUP", "200"))
STEPS = tuple(int(s) for s in os.environ.get("PEER_STEPS", "2200,2700").split(",") if s)


def main():
    data, out, budget, eval_every = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    random.seed(0)
    torch.backends.cudnn.benchmark = False  # as configs/demo_gpu.toml (multi-scale)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    train = Coco(f"{data}/annotations/instances_train2017.json", f"{data}/train2017", True)
    val = Coco(f"{data}/annotations/instances_val2017.json", f"{data}/val2017", False)
    # From scratch: trainable BatchNorm, every stage trains (torchvision's rule).
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(train.label) + 1,
                                  min_size=MIN_SIZES, max_size=MAX_SIZE)
    model.to(dev).to(memory_format=torch.channels_last).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-4)
    warm, steps = WARMUP, STEPS

    def lr_at(i):
        f = 1.0
        if i < warm:
            a = i / warm
            f = 0.001 * (1 - a) + a
        return LR * f * (0.1 ** sum(1 for s in steps if s <= i))

    scaler = torch.amp.GradScaler("cuda", init_scale=8192.0, enabled=AMP == torch.float16)
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=collate,
                                         drop_last=True, persistent_workers=True)
    log = open(f"{out}/log.jsonl", "w")
    it, trained = 0, 0.0
    done = False
    # Wall time of training (data waits included, evaluation excluded).
    t_prev = time.perf_counter()
    while not done:
        for imgs, tgts in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(it)
            imgs = [i.to(dev, non_blocking=True) for i in imgs]
            tgts = [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in tgts]
            with torch.autocast("cuda", dtype=AMP):
                losses = model(imgs, tgts)
                loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            it += 1
            if it % 50 == 0:
                torch.cuda.synchronize()
            now = time.perf_counter()
            trained += now - t_prev
            t_prev = now
            if it % 50 == 0:
                log.write(json.dumps(dict(iteration=it, seconds=trained, loss=float(loss.detach()))) + "\n")
                log.flush()
            last = trained >= budget or it == MAX_ITER
            if it % eval_every == 0 or last:
                torch.cuda.synchronize()
                evaluate(model, val, f"{out}/dets_iter_{it}.json", dev)
                log.write(json.dumps(dict(iteration=it, seconds=trained, eval=f"dets_iter_{it}.json")) + "\n")
                log.flush()
                t_prev = time.perf_counter()
            if last:
                done = True
                break
    print(json.dumps(dict(iterations=it, train_seconds=trained, img_per_s=it * BATCH / trained)))


if __name__ == "__main__":
    main()
