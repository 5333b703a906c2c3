"""Oracle for the weights file format: reads a safetensors file with the
`safetensors` package (as torchvision users load weights), reports its
header metadata and tensor names, and writes a copy without metadata (what
`safetensors.torch.save_file(state_dict)` of a torchvision model gives).

Usage: python safetensors_header.py IN.safetensors STRIPPED_OUT.safetensors REPORT.json
"""
import json
import sys
from safetensors import safe_open
from safetensors.torch import load_file, save_file

src, stripped, report = sys.argv[1:4]
with safe_open(src, framework="pt") as f:
    metadata = f.metadata()
    names = sorted(f.keys())
save_file(load_file(src), stripped)
json.dump({"metadata": metadata, "names": names}, open(report, "w"))
