//! Device→host reads, counted. Every place in this crate that copies a
//! tensor off the GPU goes through [`to_host`], so a training step can be
//! checked for synchronizations; libtorch's own implicit ones (`nonzero`,
//! blocking copies, `.item()`) are counted by its CUDA sync check
//! ([`crate::shim::enable_sync_counter`]), which [`SyncCounter`] reads
//! together with ours. Waits that libtorch cannot see — the host polling
//! mapped memory for a value the GPU publishes mid-step
//! ([`crate::kernels::host_value::HostValue::wait`]) and CUDA event waits
//! ([`crate::kernels::timing::GpuSpan::elapsed_ms`]) — are counted by
//! [`count_host_wait`] and added to either count.

use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Tensor};

static EXPLICIT_READS: AtomicU64 = AtomicU64::new(0);
static HOST_WAITS: AtomicU64 = AtomicU64::new(0);

/// Counts one wait of the host for the device outside libtorch (a mapped
/// memory value, an event).
pub fn count_host_wait() {
    HOST_WAITS.fetch_add(1, Ordering::Relaxed);
}

/// Host waits through [`count_host_wait`] so far.
pub fn host_waits() -> u64 {
    HOST_WAITS.load(Ordering::Relaxed)
}

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
/// call of libtorch, ours included), else ours; plus the host waits
/// libtorch cannot see ([`count_host_wait`]).
#[derive(Debug, Clone, Copy)]
pub struct SyncCounter {
    libtorch: bool,
    start: (i64, u64),
}

/// Synchronizations counted over a span of a program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Syncs {
    /// Every wait of the host for the device, `host_waits` included.
    pub all: i64,
    /// Of which waits outside libtorch (mapped-memory values, events).
    pub host_waits: i64,
}

impl SyncCounter {
    /// Starts counting (turns libtorch's sync check on when `cuda`).
    pub fn start(cuda: bool) -> SyncCounter {
        let libtorch = cuda && crate::shim::enable_sync_counter(true);
        SyncCounter { libtorch, start: Self::now(libtorch) }
    }

    fn now(libtorch: bool) -> (i64, u64) {
        let syncs = if libtorch { crate::shim::sync_count() } else { explicit_reads() as i64 };
        (syncs, host_waits())
    }

    /// Synchronizations since [`SyncCounter::start`] (or the last `take`),
    /// restarting the count.
    pub fn take(&mut self) -> Syncs {
        let now = Self::now(self.libtorch);
        let host_waits = (now.1 - self.start.1) as i64;
        let all = now.0 - self.start.0 + host_waits;
        self.start = now;
        Syncs { all, host_waits }
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
