//! Running the model: batch prediction over files, benchmarks (and, later,
//! training).

pub mod bench;
pub mod data_bench;
pub mod predictor;
