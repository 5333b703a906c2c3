// C ABI over the few libtorch APIs that tch 0.24 does not expose.
// Every function catches C++ exceptions and reports failure by return code;
// nothing here may unwind into Rust.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

extern "C" {

// Allows or forbids TF32 tensor-core math in cuBLAS matmuls and cuDNN
// convolutions. Returns 0 on success.
int mrcnn_set_tf32(int enabled) {
  try {
    at::globalContext().setAllowTF32CuBLAS(enabled != 0);
    at::globalContext().setAllowTF32CuDNN(enabled != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Whether TF32 is allowed for cuBLAS matmuls (1) or not (0).
int mrcnn_tf32_enabled() {
  try {
    return at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// Turns CUDA autocast on (dtype 0: float16, 1: bfloat16) or off, returning
// the previous state (bit 0: enabled, bit 1: bfloat16) so it can be restored.
// Turning it off clears autocast's cast cache.
int mrcnn_autocast_cuda(int enabled, int dtype) {
  try {
    int prev = (at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0) |
               (at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 2 : 0);
    at::autocast::set_autocast_dtype(at::kCUDA, dtype == 1 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
    if (!enabled) at::autocast::clear_cache();
    return prev;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
