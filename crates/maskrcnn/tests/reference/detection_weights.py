"""Oracle for fine-tuning from a whole model: a seeded torchvision Mask R-CNN
(ResNet-FPN as tv_common.build, COCO's 91 classes) saved as safetensors the
way a torchvision checkpoint converts: save_file(model.state_dict()).

Usage: python detection_weights.py DEPTH CLASSES OUT.safetensors [--v2]
--v2: torchvision's maskrcnn_resnet50_fpn_v2(weights=None) (DEPTH must be 50).
"""
import sys
import torch
from safetensors.torch import save_file
from tv_common import build

depth, classes, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
arch = "v2" if "--v2" in sys.argv[4:] else "v1"
gen = torch.Generator().manual_seed(5)
torch.manual_seed(5)
model = build(depth, classes, 320, 512, gen, arch=arch)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
