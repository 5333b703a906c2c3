"""Oracle for image decoding: the JPEG/PNG variants found in COCO-format
datasets (grayscale and CMYK JPEGs, progressive, 4:4:4 and 4:2:0 chroma,
RGBA / grayscale / palette PNGs), each with the RGB pixels that PIL's
`Image.open(f).convert("RGB")` gives (torchvision's reference loader).

Usage: python image_variants.py OUT_DIR    (writes NAME and NAME.npy per variant, and a stamp file)
"""
import os
import sys
import numpy as np
from PIL import Image

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
# Smooth content (upsampled noise), so decoders differ only by IDCT/upsampling rounding.
small = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
im = Image.fromarray(small).resize((161, 117), Image.BILINEAR)
variants = {
    "gray.jpg": lambda p: im.convert("L").save(p, quality=92),
    "cmyk.jpg": lambda p: im.convert("CMYK").save(p, quality=92),
    "progressive.jpg": lambda p: im.save(p, quality=92, progressive=True),
    "s444.jpg": lambda p: im.save(p, quality=92, subsampling=0),
    "s420.jpg": lambda p: im.save(p, quality=92, subsampling=2),
    "rgba.png": lambda p: im.convert("RGBA").save(p),
    "gray.png": lambda p: im.convert("L").save(p),
    "palette.png": lambda p: im.convert("P").save(p),
}
for name, save in variants.items():
    path = os.path.join(out, name)
    save(path)
    np.save(path + ".npy", np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8))
open(os.path.join(out, "stamp"), "w").write("\n".join(variants))
