//! Safe wrappers over `cpp/shim.cpp`: libtorch APIs that tch 0.24 lacks.

use std::ffi::c_int;

extern "C" {
    fn mrcnn_set_tf32(enabled: c_int) -> c_int;
    fn mrcnn_tf32_enabled() -> c_int;
    fn mrcnn_autocast_cuda(enabled: c_int, dtype: c_int) -> c_int;
}

/// Enables CUDA autocast (mixed precision) for its lifetime and restores the
/// previous state when dropped. Convolutions and matmuls then run in the
/// guard's dtype; numerically sensitive ops stay in float32 (libtorch's
/// autocast lists, as `torch.autocast("cuda")`).
#[derive(Debug)]
pub struct AutocastGuard {
    previous: c_int,
}

impl AutocastGuard {
    /// `None` when `amp` is off (no guard needed).
    pub fn new(amp: crate::config::AmpMode) -> Option<AutocastGuard> {
        let dtype = match amp {
            crate::config::AmpMode::Off => return None,
            crate::config::AmpMode::Fp16 => 0,
            crate::config::AmpMode::Bf16 => 1,
        };
        // SAFETY: sets thread-local autocast state; exceptions are caught in C++.
        let previous = unsafe { mrcnn_autocast_cuda(1, dtype) };
        Some(AutocastGuard { previous: previous.max(0) })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            mrcnn_autocast_cuda(self.previous & 1, (self.previous >> 1) & 1);
        }
    }
}

/// Allows or forbids TF32 tensor-core math for fp32 matmuls (cuBLAS) and
/// convolutions (cuDNN); libtorch's own default is off for matmuls.
pub fn set_tf32(enabled: bool) {
    // SAFETY: sets two flags of libtorch's global context; the C side catches
    // every exception.
    unsafe {
        mrcnn_set_tf32(c_int::from(enabled));
    }
}

/// Whether TF32 is currently allowed for fp32 matmuls.
pub fn tf32_enabled() -> bool {
    // SAFETY: reads a flag of libtorch's global context.
    unsafe { mrcnn_tf32_enabled() != 0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tf32_flag_round_trips() {
        super::set_tf32(true);
        assert!(super::tf32_enabled());
        super::set_tf32(false);
        assert!(!super::tf32_enabled());
    }
}
