//! A device value the host reads without synchronizing the stream: a
//! one-thread kernel stores an int64 scalar into page-locked host memory
//! mapped into the device's address space, and the host polls that memory.
//! The launch is ordinary stream work, so a CUDA graph records it and every
//! replay publishes again; the host writes a sentinel into the slot before
//! each launch, so it never reads a previous step's value. The host waits
//! only for the work queued up to the publishing kernel, not for the rest of
//! the stream (the training step uses it to learn, mid-step, how many mask
//! rows the step needs while the GPU keeps working).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = r#"
extern "C" __global__ void publish_i64(const long long* value, volatile long long* host) {
  *host = *value;
  __threadfence_system();
}
"#;

/// The slot's value before the kernel has written it.
const UNSET: i64 = i64::MIN;

/// One int64 slot of mapped page-locked host memory on a CUDA device.
pub struct HostValue {
    kernels: Arc<super::DeviceKernels>,
    /// Host address of the slot.
    host: *mut i64,
    /// The slot's address on the device.
    device_ptr: u64,
}

// SAFETY: the slot is plain page-locked memory owned by this value; the
// pointer is only dereferenced through volatile reads and writes.
unsafe impl Send for HostValue {}

impl std::fmt::Debug for HostValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostValue(cuda:{})", self.kernels.index)
    }
}

impl HostValue {
    /// A slot on CUDA device `index`; `None` where the kernels or mapped
    /// host memory are unavailable (callers then take a path without it).
    pub fn new(index: usize) -> Option<HostValue> {
        let kernels = super::device_kernels(index)?;
        kernels.function("publish_i64")?;
        kernels.context.bind_to_thread().ok()?;
        use cudarc::driver::sys;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: allocates 8 bytes of page-locked memory on the bound context.
        let host = unsafe { cudarc::driver::result::malloc_host(8, flags) }.ok()? as *mut i64;
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `host` came from cuMemHostAlloc with DEVICEMAP.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, host.cast(), 0) };
        let value = HostValue { kernels, host, device_ptr };
        (mapped == sys::CUresult::CUDA_SUCCESS).then_some(value)
    }

    /// Marks the slot unwritten (before queuing the work that publishes).
    pub fn reset(&self) {
        // SAFETY: the slot is live, aligned memory owned by `self`.
        unsafe { std::ptr::write_volatile(self.host, UNSET) };
    }

    /// Queues the copy of `value` (an int64 scalar on this device) into the
    /// slot; false when it could not be launched.
    pub fn publish(&self, value: &Tensor) -> bool {
        let Some(f) = self.kernels.function("publish_i64") else { return false };
        if value.device() != Device::Cuda(self.kernels.index) || value.kind() != Kind::Int64 || value.numel() != 1 {
            return false;
        }
        let value = value.contiguous();
        let src = value.data_ptr() as u64;
        let stream = self.kernels.stream();
        let mut l = stream.launch_builder(f);
        l.arg(&src).arg(&self.device_ptr);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one thread reads one int64 of a live device tensor (kept
        // alive by the caller's graph or stream order) and writes the slot.
        super::launched("publish_i64", unsafe { l.launch(cfg) }).is_some()
    }

    /// The published value, waiting up to `timeout` for the kernel to
    /// write it; `None` when it did not (a failed launch or a stalled
    /// device). Counted as a host wait ([`crate::host_sync::count_host_wait`]):
    /// the host waits for the device, if only for the work before the value.
    pub fn wait(&self, timeout: Duration) -> Option<i64> {
        crate::host_sync::count_host_wait();
        let start = Instant::now();
        loop {
            // SAFETY: the slot is live memory the device writes once.
            let v = unsafe { std::ptr::read_volatile(self.host) };
            if v != UNSET {
                return Some(v);
            }
            if start.elapsed() > timeout {
                return None;
            }
            // Steps take tens of milliseconds; poll without burning a core.
            if start.elapsed() > Duration::from_micros(200) {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Drop for HostValue {
    fn drop(&mut self) {
        if self.kernels.context.bind_to_thread().is_ok() {
            // SAFETY: `host` came from malloc_host and is freed once; no
            // queued kernel writes it after its owner (the step) is gone.
            let _ = unsafe { cudarc::driver::result::free_host(self.host.cast()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host reads a value published behind queued GPU work once that
    /// work is done, without a stream synchronization (the wait is counted
    /// among the syncs all the same), and a reset slot is not read as a
    /// value.
    #[test]
    fn gpu_published_value_reaches_the_host() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_published_value_reaches_the_host") else {
            return;
        };
        let Device::Cuda(index) = device else { return };
        let slot = HostValue::new(index).expect("mapped host memory");
        for v in [7i64, -3, 1 << 40] {
            let value = Tensor::from_slice(&[v]).to_device(device);
            slot.reset();
            assert_eq!(slot.wait(Duration::from_millis(1)), None, "a reset slot holds no value");
            // Queued behind 50 ms of spinning: the value arrives after it.
            assert!(crate::kernels::timing::spin(index, 0.05));
            let t0 = Instant::now();
            assert!(slot.publish(&value));
            let waits = crate::host_sync::host_waits();
            assert_eq!(slot.wait(Duration::from_secs(10)), Some(v));
            assert!(t0.elapsed() >= Duration::from_millis(20), "read before the queued work ran");
            assert!(crate::host_sync::host_waits() > waits, "the wait is counted as a sync");
        }
    }
}
