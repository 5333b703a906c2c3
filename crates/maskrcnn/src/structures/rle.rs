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

/// Encodes `d` row-major `h`×`w` masks laid end to end in `bytes` (nonzero =
/// foreground), spread over the CPU's cores.
pub fn encode_masks_parallel(bytes: &[u8], d: usize, h: usize, w: usize) -> Vec<CompressedRle> {
    let per = h * w;
    let encode_one = |i: usize| {
        let m = &bytes[i * per..(i + 1) * per];
        let mut cm = vec![0u8; per];
        for y in 0..h {
            for x in 0..w {
                cm[x * h + y] = m[y * w + x];
            }
        }
        encode_column_major(&cm, h as u32, w as u32)
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(d.max(1));
    if threads <= 1 || d < 4 {
        return (0..d).map(encode_one).collect();
    }
    let chunk = d.div_ceil(threads);
    let mut out: Vec<Option<CompressedRle>> = vec![None; d];
    std::thread::scope(|s| {
        for (t, slot) in out.chunks_mut(chunk).enumerate() {
            let encode_one = &encode_one;
            s.spawn(move || {
                for (j, r) in slot.iter_mut().enumerate() {
                    *r = Some(encode_one(t * chunk + j));
                }
            });
        }
    });
    out.into_iter().flatten().collect()
}
