//! COCO run-length encoding of binary masks (through `hotcoco`, which matches
//! pycocotools' `maskApi.c`).

use serde::{Deserialize, Serialize};

/// A COCO compressed RLE as it appears in JSON: `{"size": [h, w], "counts": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressedRle {
    pub size: [u32; 2],
    pub counts: String,
}

/// Encodes a column-major byte mask of `h`×`w`.
pub fn encode_column_major(bytes: &[u8], h: u32, w: u32) -> CompressedRle {
    match hotcoco::mask::encode(bytes, h, w) {
        Ok(rle) => CompressedRle { size: [h, w], counts: hotcoco::mask::rle_to_string(&rle) },
        // Only a length mismatch can fail, which the callers rule out.
        Err(_) => CompressedRle { size: [h, w], counts: String::new() },
    }
}

/// A binary mask given by the window holding its foreground.
#[derive(Debug, Clone)]
pub struct MaskWindow {
    pub x0: usize,
    pub y0: usize,
    pub width: usize,
    pub height: usize,
    /// `height × width` bytes, row-major, nonzero = foreground.
    pub pixels: Vec<u8>,
}

impl MaskWindow {
    /// A mask with no foreground (an empty window).
    pub fn empty() -> Self {
        MaskWindow { x0: 0, y0: 0, width: 0, height: 0, pixels: Vec::new() }
    }
}

/// Encodes `windows` of masks of an `h`×`w` image, spread over the CPU's cores.
pub fn encode_windows_parallel(windows: &[MaskWindow], h: usize, w: usize) -> Vec<CompressedRle> {
    map_parallel(windows, |m| encode_window(&m.pixels, m.x0, m.y0, m.width, m.height, h, w))
}

/// `items.iter().map(f)` spread over the CPU's cores in contiguous chunks
/// (in order; on one thread for fewer than 8 items).
pub fn map_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if threads <= 1 || items.len() < 8 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> =
            items.chunks(chunk).map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<_>>())).collect();
        // A panic of a worker goes on here, as its own.
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// Encodes a mask of an `h`×`w` image that is zero outside the window at
/// (`x0`, `y0`) of `cw`×`ch` pixels, given only that window (`crop`,
/// row-major, nonzero = foreground). The runs cover the whole image, so the
/// result equals encoding the full mask, without ever materializing it.
pub fn encode_window(crop: &[u8], x0: usize, y0: usize, cw: usize, ch: usize, h: usize, w: usize) -> CompressedRle {
    let mut counts: Vec<u32> = Vec::new();
    let mut current = false; // runs start with background
    let mut run: u64 = 0;
    let mut push = |value: bool, n: u64, counts: &mut Vec<u32>| {
        if n == 0 {
            return;
        }
        if value != current {
            counts.push(run as u32);
            current = value;
            run = 0;
        }
        run += n;
    };
    push(false, (x0 * h) as u64, &mut counts);
    for x in 0..cw {
        push(false, y0 as u64, &mut counts);
        for y in 0..ch {
            push(crop[y * cw + x] != 0, 1, &mut counts);
        }
        push(false, (h - y0 - ch) as u64, &mut counts);
    }
    push(false, ((w - x0 - cw) * h) as u64, &mut counts);
    counts.push(run as u32);
    let rle = hotcoco::Rle { h: h as u32, w: w as u32, counts };
    CompressedRle { size: [h as u32, w as u32], counts: hotcoco::mask::rle_to_string(&rle) }
}

/// Writes the {0, 1} row-major bitmap of a column-major COCO RLE into `out`
/// (`h`×`w`, zeroed), mirrored left–right when `flip`. Touches only the
/// foreground pixels.
pub fn rle_into_bitmap(rle: &hotcoco::Rle, out: &mut [u8], flip: bool) {
    let w = rle.w as usize;
    for_each_foreground_pixel(rle, |x, y| out[y * w + if flip { w - 1 - x } else { x }] = 1);
}

/// Calls `f(x, y)` for every foreground pixel of a column-major COCO RLE
/// (runs alternate background, foreground; they are clipped to `h`×`w`).
pub fn for_each_foreground_pixel(rle: &hotcoco::Rle, mut f: impl FnMut(usize, usize)) {
    let (h, w) = (rle.h as usize, rle.w as usize);
    let mut pos = 0usize;
    for (k, &run) in rle.counts.iter().enumerate() {
        let end = (pos + run as usize).min(h * w);
        if k % 2 == 1 {
            for idx in pos..end {
                f(idx / h, idx % h);
            }
        }
        pos = end;
    }
}

/// A row-major `h`×`w` byte mask in COCO's column-major order (what
/// `hotcoco::mask::encode` takes).
pub fn row_to_column(rm: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            out[x * h + y] = rm[y * w + x];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window encoding equals hotcoco's encoding of the full mask, for
    /// windows inside, at every border, covering everything, and empty.
    #[test]
    fn window_encoding_equals_full_mask_encoding() {
        let (h, w) = (13usize, 17usize);
        let mut seed = 12345u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for (x0, y0, cw, ch) in
            [(3, 4, 5, 6), (0, 0, 4, 4), (10, 7, 7, 6), (0, 0, 17, 13), (16, 12, 1, 1), (5, 5, 0, 0)]
        {
            let crop: Vec<u8> = (0..cw * ch).map(|_| (rnd() % 3 == 0) as u8).collect();
            let mut full_cm = vec![0u8; h * w];
            for y in 0..ch {
                for x in 0..cw {
                    full_cm[(x0 + x) * h + (y0 + y)] = crop[y * cw + x];
                }
            }
            let expected = encode_column_major(&full_cm, h as u32, w as u32);
            assert_eq!(encode_window(&crop, x0, y0, cw, ch, h, w), expected, "window {x0},{y0} {cw}x{ch}");
        }
    }
}
