//! Data: reading images (and, later, COCO datasets, transforms and loaders).

pub mod image;
