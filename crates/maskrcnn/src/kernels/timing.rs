//! Timing GPU work on libtorch's stream: CUDA events around a region, and a
//! spin kernel that holds the GPU for a while so the host can queue a whole
//! training step before any of it runs — the events around such a step
//! then measure the GPU's own time for it (busy time), free of the host's
//! pace. Only meaningful for a step that never waits for the GPU: a
//! synchronization inside it waits for the spin as well.

use cudarc::driver::{CudaEvent, LaunchConfig, PushKernelArg};
use std::sync::Arc;
use tch::Device;

pub(crate) const SOURCE: &str = r#"
extern "C" __global__ void spin_ns(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}
"#;

/// Keeps CUDA device `index` busy for `seconds` from when the kernel starts
/// (queued on libtorch's stream; the call returns at once). False when the
/// kernel is unavailable.
pub fn spin(index: usize, seconds: f64) -> bool {
    let Some(kernels) = super::device_kernels(index) else { return false };
    let Some(f) = kernels.function("spin_ns") else { return false };
    let ns = (seconds * 1e9) as u64;
    let stream = kernels.stream();
    let mut l = stream.launch_builder(f);
    l.arg(&ns);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one thread reading the global timer; no memory is touched.
    unsafe { l.launch(cfg) }.is_ok()
}

/// Starts (`on`) or stops the CUDA profiler's collection on device `index`
/// (`cuProfilerStart`/`cuProfilerStop`): a profiler launched with collection
/// off records only the work in between. False when CUDA is unavailable.
pub fn profiler_range(index: usize, on: bool) -> bool {
    let Some(kernels) = super::device_kernels(index) else { return false };
    if kernels.context.bind_to_thread().is_err() {
        return false;
    }
    // SAFETY: plain driver calls on the bound context; no arguments.
    let r = unsafe {
        if on {
            cudarc::driver::sys::cuProfilerStart()
        } else {
            cudarc::driver::sys::cuProfilerStop()
        }
    };
    r == cudarc::driver::sys::CUresult::CUDA_SUCCESS
}

/// A pair of CUDA events recorded on libtorch's stream around some work.
pub struct GpuSpan {
    kernels: Arc<super::DeviceKernels>,
    start: CudaEvent,
    end: Option<CudaEvent>,
}

impl GpuSpan {
    /// Records the start event on `device`'s current stream (`None` off CUDA).
    pub fn start(device: Device) -> Option<GpuSpan> {
        let Device::Cuda(index) = device else { return None };
        let kernels = super::device_kernels(index)?;
        let start = kernels.stream().record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).ok()?;
        Some(GpuSpan { kernels, start, end: None })
    }

    /// Records the end event.
    pub fn stop(&mut self) {
        self.end = self.kernels.stream().record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).ok();
    }

    /// Milliseconds between the events (waits for the end event: a
    /// synchronization, for benchmarks and log periods only).
    pub fn elapsed_ms(&self) -> Option<f64> {
        let end = self.end.as_ref()?;
        crate::host_sync::count_host_wait();
        end.synchronize().ok()?;
        self.start.elapsed_ms(end).ok().map(f64::from)
    }
}
