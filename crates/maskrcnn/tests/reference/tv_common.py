"""Shared by the oracle scripts: a seeded torchvision Mask R-CNN built as this
project builds its model (ResNet-FPN, FrozenBatchNorm2d with plausible random
statistics, trainable_layers=3) and synthetic shape images with targets."""
import torch
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops.misc import FrozenBatchNorm2d


def randomize_statistics(module, gen):
    """Plausible, non-identity BN statistics so the normalization arithmetic
    is exercised and activations stay in range (as with pretrained weights)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=gen) * 0.3 + 0.2)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.05)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def build(depth, classes, min_size, max_size, gen, fpn_norm="none", rpn_conv_depth=1, box_head="2mlp",
          head_norm="none", arch="v1", trainable_layers=3, masks=True):
    """v1 by default; `fpn_norm` ("frozen_bn", "bn") puts that norm in the FPN
    (`_resnet_fpn_extractor(..., norm_layer=...)`), `rpn_conv_depth` 2 is
    v2's RPN head, `box_head` "4conv1fc" v2's FastRCNNConvFCHead and
    `head_norm` "bn" v2's BatchNorm in the box and mask heads. `arch="v2"`
    is torchvision's own `maskrcnn_resnet50_fpn_v2(weights=None,
    weights_backbone=None)` (BatchNorm2d everywhere, every stage trainable;
    the part options are ignored). `masks=False` builds the same detector
    without the mask branch: torchvision's FasterRCNN (v2:
    `fasterrcnn_resnet50_fpn_v2`)."""
    if arch == "v2":
        assert depth == 50, "torchvision's v2 builder is ResNet-50 only"
        builder = maskrcnn_resnet50_fpn_v2 if masks else fasterrcnn_resnet50_fpn_v2
        model = builder(weights=None, weights_backbone=None, num_classes=classes, min_size=min_size,
                        max_size=max_size)
        randomize_statistics(model, gen)
        return model
    body = getattr(resnet, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    randomize_statistics(body, gen)
    norm_layer = {"none": None, "frozen_bn": FrozenBatchNorm2d, "bn": torch.nn.BatchNorm2d}[fpn_norm]
    backbone = _resnet_fpn_extractor(body, trainable_layers=trainable_layers, norm_layer=norm_layer)
    randomize_statistics(backbone.fpn, gen)
    # v1 lets MaskRCNN build its RPN head (the same random init order as before).
    rpn_head = None if rpn_conv_depth == 1 else RPNHead(backbone.out_channels, 3, conv_depth=rpn_conv_depth)
    heads = {}
    if box_head != "2mlp" or head_norm != "none":
        head_norm_layer = torch.nn.BatchNorm2d if head_norm == "bn" else None
        c = backbone.out_channels
        if box_head == "4conv1fc":
            heads["box_head"] = FastRCNNConvFCHead((c, 7, 7), [c] * 4, [1024], norm_layer=head_norm_layer)
        heads["mask_head"] = MaskRCNNHeads(c, [256] * 4, 1, norm_layer=head_norm_layer)
    if masks:
        model = MaskRCNN(backbone, num_classes=classes, min_size=min_size, max_size=max_size, rpn_head=rpn_head,
                         **heads)
    else:
        heads.pop("mask_head", None)
        model = FasterRCNN(backbone, num_classes=classes, min_size=min_size, max_size=max_size, rpn_head=rpn_head,
                           **heads)
    randomize_statistics(model.roi_heads, gen)
    return model


def shapes_image(gen, h, w, k, classes):
    """An image of k filled rectangles/ellipses on noise, with targets."""
    img = torch.rand(3, h, w, generator=gen) * 0.3
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    boxes, labels, masks = [], [], []
    for _ in range(k):
        bw = float(torch.randint(max(4, w // 8), max(5, w // 2), (1,), generator=gen))
        bh = float(torch.randint(max(4, h // 8), max(5, h // 2), (1,), generator=gen))
        x0 = float(torch.randint(0, max(1, int(w - bw)), (1,), generator=gen))
        y0 = float(torch.randint(0, max(1, int(h - bh)), (1,), generator=gen))
        label = int(torch.randint(1, classes, (1,), generator=gen))
        if label % 2:
            m = (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh)
        else:
            cx, cy = x0 + bw / 2, y0 + bh / 2
            m = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1
        if m.sum() < 4:
            continue
        colour = torch.tensor([(label * 37 % 255) / 255, (label * 91 % 255) / 255, (label * 53 % 255) / 255])
        img[:, m] = colour[:, None] * 0.8 + 0.2 * torch.rand(3, int(m.sum()), generator=gen)
        ys, xs = torch.where(m)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
        labels.append(label)
        masks.append(m.to(torch.uint8))
    t = dict(boxes=torch.tensor(boxes).reshape(-1, 4), labels=torch.tensor(labels, dtype=torch.int64),
             masks=torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8))
    return img.clamp(0, 1), t
