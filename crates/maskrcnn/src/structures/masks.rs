//! Instance masks: pasting fixed-size mask predictions into images.

use tch::{Kind, Tensor};

/// Pastes `masks` `[D, 1, M, M]` (probabilities inside each box) into
/// `[D, 1, H, W]` images of `image_size` `(H, W)` at `boxes` `[D, 4]`, as
/// torchvision's `paste_masks_in_image` (1 pixel of zero padding around each
/// mask, boxes scaled to match and truncated to integers, bilinear resize).
pub fn paste_masks_in_image(masks: &Tensor, boxes: &Tensor, image_size: (i64, i64)) -> Tensor {
    let (im_h, im_w) = image_size;
    let d = masks.size()[0];
    let device = masks.device();
    if d == 0 {
        return Tensor::zeros([0, 1, im_h, im_w], (masks.kind(), device));
    }
    let padding = 1;
    let m = masks.size()[3];
    let scale = (m + 2 * padding) as f64 / m as f64;
    let padded = masks.constant_pad_nd([padding, padding, padding, padding]);
    let boxes = expand_boxes(&boxes.to_kind(Kind::Float), scale).to_kind(Kind::Int64);
    let coords = crate::ops::boxes::to_vec_i64(&boxes.reshape([-1]));
    let out = Tensor::zeros([d, 1, im_h, im_w], (masks.kind(), device));
    for i in 0..d as usize {
        let [x0, y0, x1, y1] = [coords[4 * i], coords[4 * i + 1], coords[4 * i + 2], coords[4 * i + 3]];
        let w = (x1 - x0 + 1).max(1);
        let h = (y1 - y0 + 1).max(1);
        let resized = padded.get(i as i64).unsqueeze(0).upsample_bilinear2d([h, w], false, None, None).get(0).get(0);
        let (px0, px1) = (x0.max(0), (x1 + 1).min(im_w));
        let (py0, py1) = (y0.max(0), (y1 + 1).min(im_h));
        if px1 <= px0 || py1 <= py0 {
            continue;
        }
        let src = resized.narrow(0, py0 - y0, py1 - py0).narrow(1, px0 - x0, px1 - px0);
        out.get(i as i64).get(0).narrow(0, py0, py1 - py0).narrow(1, px0, px1 - px0).copy_(&src);
    }
    out
}

/// Scales boxes `[D, 4]` about their centers by `scale` (torchvision's `expand_boxes`).
fn expand_boxes(boxes: &Tensor, scale: f64) -> Tensor {
    let w_half = (boxes.select(1, 2) - boxes.select(1, 0)) * 0.5 * scale;
    let h_half = (boxes.select(1, 3) - boxes.select(1, 1)) * 0.5 * scale;
    let x_c = (boxes.select(1, 2) + boxes.select(1, 0)) * 0.5;
    let y_c = (boxes.select(1, 3) + boxes.select(1, 1)) * 0.5;
    Tensor::stack(&[&x_c - &w_half, &y_c - &h_half, x_c + w_half, y_c + h_half], 1)
}

/// Mask targets for training: the ground-truth masks `gt_masks` `[G, H, W]`
/// cropped to `boxes` `[K, 4]` (each matched to ground truth `matched` `[K]`)
/// and resized to `m`×`m` by RoIAlign (adaptive sampling, aligned=false), as
/// torchvision's `project_masks_on_boxes`. Returns `[K, m, m]` float in [0, 1],
/// on the masks' device.
pub fn project_masks_on_boxes(gt_masks: &Tensor, boxes: &Tensor, matched: &Tensor, m: i64) -> Tensor {
    let rois = Tensor::cat(&[matched.to_kind(boxes.kind()).unsqueeze(1), boxes.shallow_clone()], 1);
    let masks = gt_masks.unsqueeze(1).to_kind(boxes.kind());
    crate::ops::roi_align(&masks, &rois, (m, m), 1.0, -1, false).squeeze_dim(1)
}

/// Mask targets from polygons, as maskrcnn_benchmark builds them: each
/// positive RoI's ground-truth polygons (`polygons[matched[k]]`, image
/// pixels) are shifted to the box origin, scaled to `m`×`m` (by `m / width`,
/// `m / height`, sides at least 1 pixel) and rasterized with COCO's polygon
/// rasterizer. Returns `[K, m, m]` float {0, 1} on `device`.
pub fn polygon_mask_targets(
    polygons: &[Vec<Vec<f64>>],
    boxes: &Tensor,
    matched: &Tensor,
    m: i64,
    device: tch::Device,
) -> Tensor {
    let k = boxes.size()[0];
    let b = crate::ops::boxes::to_vec_f32(&boxes.reshape([-1]));
    let idx = crate::ops::boxes::to_vec_i64(matched);
    let side = m as u32;
    let mut out = vec![0u8; (k * m * m) as usize];
    for i in 0..k as usize {
        let (x0, y0) = (f64::from(b[4 * i]), f64::from(b[4 * i + 1]));
        let w = (f64::from(b[4 * i + 2]) - x0).max(1.0);
        let h = (f64::from(b[4 * i + 3]) - y0).max(1.0);
        let (sx, sy) = (m as f64 / w, m as f64 / h);
        let polys: Vec<Vec<f64>> = polygons[idx[i] as usize]
            .iter()
            .map(|p| p.chunks(2).flat_map(|xy| [(xy[0] - x0) * sx, (xy[1] - y0) * sy]).collect())
            .collect();
        if let Ok(rle) = hotcoco::mask::fr_polys(&polys, side, side) {
            super::rle::rle_into_bitmap(&rle, &mut out[i * (m * m) as usize..(i + 1) * (m * m) as usize], false);
        }
    }
    Tensor::from_slice(&out).reshape([k, m, m]).to_device(device).to_kind(Kind::Float)
}
