//! Device→host reads, counted. Every place in this crate that copies a
//! tensor off the GPU goes through [`to_host`], so a training step can be
//! checked for synchronizations; libtorch's own implicit ones (`nonzero`,
//! blocking copies, `.item()`) are counted by its CUDA sync check
//! ([`crate::shim::enable_sync_counter`]), which [`SyncCounter`] reads
//! together with ours.

use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Tensor};

static EXPLICIT_READS: AtomicU64 = AtomicU64::new(0);

/// `t` on the CPU. From a CUDA tensor this is a blocking copy, which waits
/// for every queued kernel: it is counted.
pub fn to_host(t: &Tensor) -> Tensor {
    if t.device().is_cuda() {
        EXPLICIT_READS.fetch_add(1, Ordering::Relaxed);
    }
    t.to_device(Device::Cpu)
}

/// Device→host reads through [`to_host`] so far.
pub fn explicit_reads() -> u64 {
    EXPLICIT_READS.load(Ordering::Relaxed)
}

/// Counts the synchronizations between two points of a program: libtorch's
/// count when its CUDA sync check is available (it sees every synchronizing
/// call, ours included), else ours.
#[derive(Debug, Clone, Copy)]
pub struct SyncCounter {
    libtorch: bool,
    start: i64,
}

impl SyncCounter {
    /// Starts counting (turns libtorch's sync check on when `cuda`).
    pub fn start(cuda: bool) -> SyncCounter {
        let libtorch = cuda && crate::shim::enable_sync_counter(true);
        SyncCounter { libtorch, start: Self::now(libtorch) }
    }

    fn now(libtorch: bool) -> i64 {
        if libtorch {
            crate::shim::sync_count()
        } else {
            explicit_reads() as i64
        }
    }

    /// Synchronizations since [`SyncCounter::start`] (or the last `take`),
    /// restarting the count.
    pub fn take(&mut self) -> i64 {
        let now = Self::now(self.libtorch);
        let n = now - self.start;
        self.start = now;
        n
    }

    /// Whether libtorch's own check is counting (every sync is seen).
    pub fn complete(&self) -> bool {
        self.libtorch
    }
}

/// `t` (a CPU tensor) on `device`, copied without blocking the host: from
/// page-locked memory, so the copy is queued like a kernel (libtorch's
/// pinned-memory cache keeps the source alive until it has run). On the CPU,
/// `t` itself.
pub fn upload(t: &Tensor, device: Device) -> Tensor {
    if t.device() == device {
        return t.shallow_clone();
    }
    if t.device() != Device::Cpu {
        return t.to_device(device);
    }
    crate::shim::pinned(&t.contiguous()).to_device_(device, t.kind(), true, false)
}
