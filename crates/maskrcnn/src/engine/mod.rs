//! Running the model: training (loop, optimizer, LR schedule, loss scaling,
//! checkpoints), batch prediction over files, and benchmarks.

pub mod amp;
pub mod bench;
pub mod checkpoint;
pub mod data_bench;
pub mod data_check;
pub mod distributed;
pub mod grad_buckets;
pub mod hooks;
pub mod launcher;
pub mod lr_schedule;
pub mod optimizer;
pub mod predictor;
pub mod step_graphs;
pub mod tensorboard;
pub mod train_bench;
pub mod train_log;
pub mod train_loop;
pub mod trainer;
pub mod watchdog;
