// C ABI over the few libtorch APIs that tch 0.24 does not expose.
// Every function catches C++ exceptions and reports failure by return code;
// nothing here may unwind into Rust.
#include <ATen/Context.h>

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

}  // extern "C"
