"""Oracle for image decoding: the JPEG/PNG variants found in COCO-format
datasets (grayscale and CMYK JPEGs, progressive, 4:4:4 and 4:2:0 chroma,
RGBA / grayscale / palette / 16-bit PNGs, photos with an EXIF orientation),
each with the RGB pixels that PIL's `Image.open(f).convert("RGB")` gives
(torchvision's reference loader) — turned upright by PIL's
`ImageOps.exif_transpose` (what detectron2 applies) for the EXIF variants,
whose stored pixels are in NAME.stored.npy. A 16-bit PNG's expected pixels
are its values scaled to 8 bits (round(v / 257)): PIL's convert clips them
at 255 instead, which whitens the image.

Usage: python image_variants.py OUT_DIR    (writes NAME and NAME.npy per variant, and a stamp file)
"""
import os
import sys
import numpy as np
from PIL import Image, ImageOps

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

def exif(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e


# A photo whose camera was turned: stored sideways, EXIF says how to turn it.
for o in range(2, 9):
    variants[f"exif{o}.png"] = lambda p, o=o: im.save(p, exif=exif(o))
variants["exif6.jpg"] = lambda p: im.save(p, quality=92, exif=exif(6))
variants["exif8_gray.jpg"] = lambda p: im.convert("L").save(p, quality=92, exif=exif(8))
deep = (np.asarray(im.convert("L"), dtype=np.uint16) * 257 + rng.integers(0, 257, (117, 161))).astype(np.uint16)
variants["gray16.png"] = lambda p: Image.fromarray(deep).save(p)

for name, save in variants.items():
    path = os.path.join(out, name)
    save(path)
    opened = Image.open(path)
    if name == "gray16.png":
        assert opened.mode.startswith("I"), opened.mode
        scaled = np.round(np.asarray(opened, dtype=np.float64) / 257).astype(np.uint8)
        np.save(path + ".npy", np.repeat(scaled[:, :, None], 3, axis=2))
        continue
    if name.startswith("exif"):
        np.save(path + ".stored.npy", np.asarray(opened.convert("RGB"), dtype=np.uint8))
        opened = ImageOps.exif_transpose(opened)
    np.save(path + ".npy", np.asarray(opened.convert("RGB"), dtype=np.uint8))
open(os.path.join(out, "stamp"), "w").write("\n".join(variants))
