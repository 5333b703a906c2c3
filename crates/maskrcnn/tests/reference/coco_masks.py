"""Oracle for COCO mask handling: pycocotools' view of every annotation of a
COCO instances file (our `maskrcnn synth` output in the tests).

Usage: python coco_masks.py ANN.json OUT.json
For each image id (in file order of its annotations) writes, per annotation:
  rle       compressed RLE string of annToMask (polygons rasterized by frPyObjects)
  rle_flip  the same mask mirrored left-right (np.fliplr), encoded
  rle_polyflip  for polygons: frPyObjects of the mirrored polygons (x -> w - x)
  area, bbox  maskUtils.area / toBbox of the RLE
  decoded_area  the pixel count of maskUtils.decode of the RLE
"""
import json
import sys
import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO

ann_path, out_path = sys.argv[1], sys.argv[2]
coco = COCO(ann_path)
result = {}
for img_id in coco.getImgIds():
    info = coco.imgs[img_id]
    h, w = info["height"], info["width"]
    rows = []
    for ann in coco.imgToAnns[img_id]:
        m = coco.annToMask(ann)
        rle = mask_util.encode(np.asfortranarray(m))
        flip = mask_util.encode(np.asfortranarray(m[:, ::-1]))
        row = {
            "id": ann["id"],
            "rle": rle["counts"].decode(),
            "rle_flip": flip["counts"].decode(),
            "area": int(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "decoded_area": int(mask_util.decode(rle).sum()),
        }
        seg = ann["segmentation"]
        if isinstance(seg, list):
            mirrored = [[w - v if i % 2 == 0 else v for i, v in enumerate(p)] for p in seg]
            prle = mask_util.merge(mask_util.frPyObjects(mirrored, h, w))
            row["rle_polyflip"] = prle["counts"].decode()
        rows.append(row)
    result[str(img_id)] = rows
json.dump(result, open(out_path, "w"))
