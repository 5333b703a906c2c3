//! Training: the loop and its hooks (logging, checkpoints, evaluation), the
//! optimizer, LR schedule and loss scaling, the data check before a run,
//! and the training step's CUDA graphs. Several processes live in
//! [`crate::distributed`], benchmarks in [`crate::bench`], prediction over
//! files in [`crate::prediction`].

pub mod amp;
pub mod checkpoint;
pub mod data_check;
pub mod hooks;
pub mod lr_schedule;
pub mod optimizer;
pub mod step_graphs;
pub mod tensorboard;
pub mod train_log;
pub mod train_loop;
pub mod trainer;
