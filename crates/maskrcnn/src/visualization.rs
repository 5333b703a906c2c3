//! Drawing detections onto images: translucent masks, box outlines, and a
//! label with class name and score (an 8×8 bitmap font, scaled with the image).

use crate::data::image::RgbImage;
use crate::structures::rle::{for_each_foreground_pixel, CompressedRle};
use std::path::Path;

/// One detection to draw: box `[x1, y1, x2, y2]`, mask (a COCO RLE of the
/// image's size, drawn run by run: no full-image buffer per mask) and
/// caption.
pub struct Drawable<'a> {
    pub bbox: [f32; 4],
    pub mask: Option<&'a CompressedRle>,
    pub caption: String,
}

const PALETTE: [[u8; 3]; 10] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [0, 128, 128],
];

/// Draws `items` onto a copy of `image` and writes it as PNG to `out`.
pub fn draw_detections(image: &RgbImage, items: &[Drawable<'_>], out: &Path) -> Result<(), image::ImageError> {
    let (w, h) = (image.width as usize, image.height as usize);
    let mut px = image.pixels.clone();
    let thickness = ((w.max(h) as f32 / 400.0).ceil() as usize).clamp(1, 6);
    let scale = ((w.max(h) as f32 / 640.0).round() as usize).clamp(1, 4);
    for (k, item) in items.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let runs = item
            .mask
            .filter(|m| m.size == [h as u32, w as u32])
            .and_then(|m| hotcoco::mask::rle_from_string(&m.counts, h as u32, w as u32).ok());
        if let Some(rle) = runs {
            for_each_foreground_pixel(&rle, |x, y| {
                let i = y * w + x;
                for ch in 0..3 {
                    let v = &mut px[3 * i + ch];
                    *v = ((*v as f32) * 0.5 + (c[ch] as f32) * 0.5) as u8;
                }
            });
        }
        let [x1, y1, x2, y2] = item.bbox.map(|v| v.round().max(0.0) as usize);
        let (x2, y2) = (x2.min(w.saturating_sub(1)), y2.min(h.saturating_sub(1)));
        for t in 0..thickness {
            for x in x1..=x2 {
                set(&mut px, w, h, x, y1 + t, c);
                set(&mut px, w, h, x, y2.saturating_sub(t), c);
            }
            for y in y1..=y2 {
                set(&mut px, w, h, x1 + t, y, c);
                set(&mut px, w, h, x2.saturating_sub(t), y, c);
            }
        }
        // Caption on a filled strip above the box (inside it at the top edge).
        let text_h = 8 * scale + 2;
        let text_w = item.caption.chars().count() * 8 * scale + 4;
        let ty = if y1 >= text_h { y1 - text_h } else { y1 };
        for y in ty..(ty + text_h).min(h) {
            for x in x1..(x1 + text_w).min(w) {
                set(&mut px, w, h, x, y, c);
            }
        }
        draw_text(&mut px, w, h, x1 + 2, ty + 1, &item.caption, scale);
    }
    let buf = image::RgbImage::from_raw(image.width, image.height, px).ok_or_else(|| {
        image::ImageError::Limits(image::error::LimitError::from_kind(image::error::LimitErrorKind::DimensionError))
    })?;
    buf.save_with_format(out, image::ImageFormat::Png)
}

fn set(px: &mut [u8], w: usize, h: usize, x: usize, y: usize, c: [u8; 3]) {
    if x < w && y < h {
        let i = 3 * (y * w + x);
        px[i..i + 3].copy_from_slice(&c);
    }
}

fn draw_text(px: &mut [u8], w: usize, h: usize, x0: usize, y0: usize, text: &str, scale: usize) {
    for (ci, ch) in text.chars().enumerate() {
        let Some(glyph) = font8x8::legacy::BASIC_LEGACY.get(ch as usize) else { continue };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let x = x0 + (ci * 8 + col) * scale + dx;
                            let y = y0 + row * scale + dy;
                            set(px, w, h, x, y, [255, 255, 255]);
                        }
                    }
                }
            }
        }
    }
}
