//! COCO run-length encoding of binary masks (through `hotcoco`, which matches
//! pycocotools' `maskApi.c`).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// A COCO compressed RLE as it appears in JSON: `{"size": [h, w], "counts": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressedRle {
    pub size: [u32; 2],
    pub counts: String,
}

/// Encodes a binary mask `[H, W]` (any dtype; nonzero is foreground) as COCO
/// compressed RLE.
pub fn encode_mask(mask: &Tensor) -> CompressedRle {
    let (h, w) = (mask.size()[0], mask.size()[1]);
    // hotcoco takes column-major bytes: transpose, then read row-major.
    let cm = mask.ne(0).to_kind(Kind::Uint8).t_().contiguous().to_device(Device::Cpu);
    let mut bytes = vec![0u8; (h * w) as usize];
    let n = bytes.len();
    cm.copy_data(&mut bytes, n);
    encode_column_major(&bytes, h as u32, w as u32)
}

/// Encodes a column-major byte mask of `h`×`w`.
pub fn encode_column_major(bytes: &[u8], h: u32, w: u32) -> CompressedRle {
    match hotcoco::mask::encode(bytes, h, w) {
        Ok(rle) => CompressedRle { size: [h, w], counts: hotcoco::mask::rle_to_string(&rle) },
        // Only a length mismatch can fail, which the callers rule out.
        Err(_) => CompressedRle { size: [h, w], counts: String::new() },
    }
}
