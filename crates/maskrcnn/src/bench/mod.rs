//! `maskrcnn bench`: the throughput of inference, of the training step and
//! of the data loader alone, each on the peer benchmark's synthetic
//! batches or on a dataset.

pub mod data;
pub mod infer;
pub mod train;
