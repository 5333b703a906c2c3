//! Data structures of detection: masks (pasting, later RLE/polygons).

pub mod masks;
