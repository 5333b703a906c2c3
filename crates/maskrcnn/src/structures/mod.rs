//! Data structures of detection: masks (pasting) and their COCO RLE encoding.

pub mod masks;
pub mod rle;
