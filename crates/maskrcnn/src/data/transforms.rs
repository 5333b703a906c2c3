//! Training-time transforms on the host: horizontal flip of an image, and
//! the conversion of its instances to the model's [`Target`], mirrored with
//! it (boxes, polygons and RLE by the same map). Resizing to `input.min_size` (a random
//! choice per batch) capped by `input.max_size` runs on the device inside the
//! model ([`crate::modeling::transform`]), as the seed's hybrid loader does.

use super::coco::{Instance, InstanceMask};
use super::image::RgbImage;
use crate::structures::rle::rle_into_bitmap;
use crate::structures::{InstanceMasks, Target};
use tch::{Kind, Tensor};

/// Mirrors `image` left–right in place.
pub fn hflip_image(image: &mut RgbImage) {
    let w = image.width as usize;
    let mut tmp = vec![0u8; w * 3];
    for row in image.pixels.chunks_exact_mut(w * 3) {
        tmp.copy_from_slice(row);
        for (dst, src) in row.chunks_exact_mut(3).zip(tmp.chunks_exact(3).rev()) {
            dst.copy_from_slice(src);
        }
    }
}

/// An instance's box on an image `width` pixels wide, mirrored when `flip`:
/// x ↦ width − x (pixel edges, the same map as for polygon vertices, so a
/// flipped polygon rasterizes to the flipped bitmap).
pub fn flip_box(b: [f32; 4], width: u32, flip: bool) -> [f32; 4] {
    let w = width as f32;
    if flip {
        [w - b[2], b[1], w - b[0], b[3]]
    } else {
        b
    }
}

/// Polygons mirrored when `flip` (x ↦ width − x).
pub fn flip_polygons(polys: &[Vec<f64>], width: u32, flip: bool) -> Vec<Vec<f64>> {
    let w = f64::from(width);
    polys
        .iter()
        .map(|p| p.chunks_exact(2).flat_map(|xy| [if flip { w - xy[0] } else { xy[0] }, xy[1]]).collect())
        .collect()
}

/// Writes the row-major {0, 1} bitmap of one instance into `out` (`h`×`w`,
/// zeroed), mirrored when `flip` (COCO's polygon rasterizer; a box-only
/// instance leaves it empty: its mask is not trained).
pub fn instance_bitmap(inst: &Instance, h: u32, w: u32, flip: bool, out: &mut [u8]) {
    match &inst.mask {
        InstanceMask::Rle(r) => rle_into_bitmap(r, out, flip),
        InstanceMask::Polygons(p) => {
            if let Ok(r) = hotcoco::mask::fr_polys(&flip_polygons(p, w, flip), h, w) {
                rle_into_bitmap(&r, out, false);
            }
        }
        InstanceMask::None => {}
    }
}

/// The model's target for the instances of an `h`×`w` image (mirrored when
/// `flip`), on the CPU. Polygons stay polygons (rasterized later, only for
/// positive RoIs) unless a non-crowd instance is an RLE; then every instance
/// becomes a bitmap `[G, H, W]`. Crowd regions carry no polygons (they are
/// never positives); instances without a mask neither, and are marked in
/// `has_mask` (the mask loss leaves them out).
pub fn to_target(instances: &[Instance], h: u32, w: u32, flip: bool) -> Target {
    let g = instances.len() as i64;
    let boxes: Vec<f32> = instances.iter().flat_map(|i| flip_box(i.bbox, w, flip)).collect();
    let labels: Vec<i64> = instances.iter().map(|i| i.label).collect();
    let crowd: Vec<bool> = instances.iter().map(|i| i.crowd).collect();
    let needs_bitmaps = instances.iter().any(|i| !i.crowd && matches!(i.mask, InstanceMask::Rle(_)));
    let masks = if needs_bitmaps {
        let plane = h as usize * w as usize;
        let mut all = vec![0u8; instances.len() * plane];
        for (inst, out) in instances.iter().zip(all.chunks_exact_mut(plane.max(1))) {
            instance_bitmap(inst, h, w, flip, out);
        }
        InstanceMasks::Bitmaps(Tensor::from_slice(&all).reshape([g, i64::from(h), i64::from(w)]))
    } else {
        InstanceMasks::Polygons(
            instances
                .iter()
                .map(|i| match (&i.mask, i.crowd) {
                    (InstanceMask::Polygons(p), false) => flip_polygons(p, w, flip),
                    _ => Vec::new(),
                })
                .collect(),
        )
    };
    let has_mask: Vec<bool> = instances.iter().map(|i| i.mask.is_some()).collect();
    Target {
        boxes: Tensor::from_slice(&boxes).reshape([g, 4]),
        labels: Tensor::from_slice(&labels),
        masks,
        iscrowd: crowd.iter().any(|&c| c).then(|| Tensor::from_slice(&crowd).to_kind(Kind::Bool)),
        has_mask: has_mask.iter().any(|&m| !m).then(|| Tensor::from_slice(&has_mask).to_kind(Kind::Bool)),
    }
}
