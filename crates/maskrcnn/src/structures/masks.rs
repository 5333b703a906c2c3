//! Instance masks: pasting fixed-size mask predictions into images.

use crate::structures::rle::{encode_windows_parallel, CompressedRle, MaskWindow};
use tch::{Kind, Tensor};

/// Pastes `masks` `[D, 1, M, M]` (probabilities inside each box) into
/// `[D, 1, H, W]` images of `image_size` `(H, W)` at `boxes` `[D, 4]`, as
/// torchvision's `paste_masks_in_image` (1 pixel of zero padding around each
/// mask, boxes scaled to match and truncated to integers, bilinear resize).
/// Memory grows with image area × detections: for large images use
/// [`paste_masks_as_rle`].
pub fn paste_masks_in_image(masks: &Tensor, boxes: &Tensor, image_size: (i64, i64)) -> Tensor {
    let (im_h, im_w) = image_size;
    let out = Tensor::zeros([masks.size()[0], 1, im_h, im_w], (masks.kind(), masks.device()));
    for_each_pasted_window(masks, boxes, image_size, |i, y0, x0, window| {
        let (h, w) = (window.size()[0], window.size()[1]);
        out.get(i as i64).get(0).narrow(0, y0, h).narrow(1, x0, w).copy_(&window);
    });
    out
}

/// The masks of [`paste_masks_in_image`] binarized at 0.5 (torchvision's
/// `masks > 0.5`), as COCO RLEs of the whole image — equal to encoding the
/// pasted masks, without materializing them: each detection is pasted into
/// its box window only (clipped to the image), and at most
/// [`WINDOW_PIXELS_PENDING`] window pixels wait for encoding at once, so
/// memory stays bounded by the largest box, whatever the image size and
/// the number of detections.
pub fn paste_masks_as_rle(masks: &Tensor, boxes: &Tensor, image_size: (i64, i64)) -> Vec<CompressedRle> {
    paste_masks_as_rle_pending(masks, boxes, image_size, WINDOW_PIXELS_PENDING)
}

/// [`paste_masks_as_rle`] encoding whenever `budget` window pixels wait.
fn paste_masks_as_rle_pending(
    masks: &Tensor,
    boxes: &Tensor,
    image_size: (i64, i64),
    budget: usize,
) -> Vec<CompressedRle> {
    let (h, w) = (image_size.0 as usize, image_size.1 as usize);
    let d = masks.size()[0] as usize;
    let empty = || MaskWindow { x0: 0, y0: 0, width: 0, height: 0, pixels: Vec::new() };
    let mut out = Vec::with_capacity(d);
    let mut pending: Vec<MaskWindow> = Vec::new();
    let mut pending_pixels = 0usize;
    let mut next = 0usize; // the next detection to queue
    for_each_pasted_window(masks, boxes, image_size, |i, y0, x0, window| {
        // Detections without a window (box outside the image) are empty masks.
        pending.extend((next..i).map(|_| empty()));
        let (wh, ww) = (window.size()[0] as usize, window.size()[1] as usize);
        let binary = window.gt(0.5).to_kind(Kind::Uint8).to_device(tch::Device::Cpu).contiguous();
        let mut pixels = vec![0u8; wh * ww];
        binary.copy_data(&mut pixels, wh * ww);
        pending.push(MaskWindow { x0: x0 as usize, y0: y0 as usize, width: ww, height: wh, pixels });
        next = i + 1;
        pending_pixels += wh * ww;
        if pending_pixels >= budget {
            out.extend(encode_windows_parallel(&pending, h, w));
            pending.clear();
            pending_pixels = 0;
        }
    });
    pending.extend((next..d).map(|_| empty()));
    out.extend(encode_windows_parallel(&pending, h, w));
    out
}

/// The most mask-window pixels (bytes) held for encoding at once by
/// [`paste_masks_as_rle`].
pub const WINDOW_PIXELS_PENDING: usize = 64 << 20;

/// Runs `f(i, y0, x0, window)` for each detection `i` whose pasted box
/// window (clipped to the image) is not empty: `window` `[h, w]` holds the
/// pasted probabilities at rows `y0..y0+h`, columns `x0..x0+w` of the
/// image; the rest of detection `i`'s image is zero.
fn for_each_pasted_window(
    masks: &Tensor,
    boxes: &Tensor,
    image_size: (i64, i64),
    mut f: impl FnMut(usize, i64, i64, Tensor),
) {
    let (im_h, im_w) = image_size;
    let d = masks.size()[0];
    if d == 0 {
        return;
    }
    let padding = 1;
    let m = masks.size()[3];
    let scale = (m + 2 * padding) as f64 / m as f64;
    let padded = masks.constant_pad_nd([padding, padding, padding, padding]);
    let boxes = expand_boxes(&boxes.to_kind(Kind::Float), scale).to_kind(Kind::Int64);
    let coords = crate::ops::boxes::to_vec_i64(&boxes.reshape([-1]));
    for i in 0..d as usize {
        let [x0, y0, x1, y1] = [coords[4 * i], coords[4 * i + 1], coords[4 * i + 2], coords[4 * i + 3]];
        let w = (x1 - x0 + 1).max(1);
        let h = (y1 - y0 + 1).max(1);
        let (px0, px1) = (x0.max(0), (x1 + 1).min(im_w));
        let (py0, py1) = (y0.max(0), (y1 + 1).min(im_h));
        if px1 <= px0 || py1 <= py0 {
            continue;
        }
        let resized = padded.get(i as i64).unsqueeze(0).upsample_bilinear2d([h, w], false, None, None).get(0).get(0);
        f(i, py0, px0, resized.narrow(0, py0 - y0, py1 - py0).narrow(1, px0 - x0, px1 - px0));
    }
}

/// COCO RLEs (all of one image size) decoded into `[D, H, W]` uint8 masks
/// (`None` for an empty list or mixed sizes).
pub fn decode_rles(rles: &[CompressedRle]) -> Option<Tensor> {
    let [h, w] = rles.first()?.size;
    let mut masks = Vec::with_capacity(rles.len());
    for r in rles {
        if r.size != [h, w] {
            return None;
        }
        let rle = hotcoco::mask::rle_from_string(&r.counts, h, w).ok()?;
        let mut bitmap = vec![0u8; (h * w) as usize];
        crate::structures::rle::rle_into_bitmap(&rle, &mut bitmap, false);
        masks.push(Tensor::from_slice(&bitmap).reshape([h as i64, w as i64]));
    }
    Some(Tensor::stack(&masks, 0))
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

#[cfg(test)]
mod paste_tests {
    use super::*;

    /// The RLEs equal encoding torchvision's dense pasted masks `> 0.5`
    /// (boxes inside, across the border, wholly outside; encoded in one
    /// group or one window at a time), and decode back to them.
    #[test]
    fn rle_pasting_equals_dense_pasting() {
        tch::manual_seed(5);
        let (h, w) = (37i64, 53i64);
        let masks = Tensor::rand([5, 1, 28, 28], (Kind::Float, tch::Device::Cpu));
        let boxes = Tensor::from_slice(&[
            3.0f32, 4.0, 20.0, 30.0, // inside
            -10.0, 5.0, 15.0, 25.0, // across the left border
            40.0, 30.0, 70.0, 60.0, // across the bottom-right corner
            60.0, 40.0, 80.0, 50.0, // outside
            0.0, 0.0, 52.0, 36.0, // the whole image
        ])
        .reshape([5, 4]);
        let dense = paste_masks_in_image(&masks, &boxes, (h, w)).squeeze_dim(1).gt(0.5).to_kind(Kind::Uint8);
        let expected: Vec<CompressedRle> = (0..5)
            .map(|i| {
                // Column-major bytes for the encoder.
                let m = dense.get(i).tr().contiguous();
                let mut bytes = vec![0u8; (h * w) as usize];
                m.copy_data(&mut bytes, (h * w) as usize);
                crate::structures::rle::encode_column_major(&bytes, h as u32, w as u32)
            })
            .collect();
        for budget in [WINDOW_PIXELS_PENDING, 1] {
            let rles = paste_masks_as_rle_pending(&masks, &boxes, (h, w), budget);
            assert_eq!(rles, expected, "budget {budget}");
        }
        let decoded = decode_rles(&expected).unwrap();
        assert!(decoded.equal(&dense), "decode_rles inverts the encoding");
        assert!(dense.get(3).sum(Kind::Int64).int64_value(&[]) == 0, "the box outside pastes nothing");
    }
}
