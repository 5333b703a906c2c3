"""Oracle for backbone initialization: a seeded torchvision ResNet state
dict (ImageNet naming: conv1.weight, bn1.running_mean, layer1.0.conv1.weight,
..., fc.weight) with non-trivial BatchNorm statistics, as safetensors.

Usage: python resnet_weights.py DEPTH OUT.safetensors
"""
import sys
import torch
import torchvision
from safetensors.torch import save_file

depth, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.2, 0.2)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
