//! Results export (and, later, COCO evaluation).

pub mod results;
