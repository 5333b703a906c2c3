//! Safe wrappers over `cpp/shim.cpp`: libtorch APIs that tch 0.24 lacks.

use std::ffi::c_int;

extern "C" {
    fn mrcnn_set_tf32(enabled: c_int) -> c_int;
    fn mrcnn_tf32_enabled() -> c_int;
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
