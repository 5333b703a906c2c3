//! Several processes training one model: the process group and its
//! all-reduce (NCCL on GPUs, TCP on the CPU), gradient buckets that overlap
//! the all-reduce with the backward, the launcher that starts one process
//! per GPU, and the watchdog that ends a launch whose rank died or hung.

pub mod grad_buckets;
mod group;
pub mod launcher;
pub mod watchdog;

pub use group::{rendezvous, DistEnv, DistError, ProcessGroup, Rendezvous};
