// C ABI over the few libtorch APIs that tch 0.24 does not expose.
// Every function catches C++ exceptions and reports failure by return code;
// nothing here may unwind into Rust.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/custom_function.h>
#include <string>
#include <vector>

// tch's tensor handles are `at::Tensor*` (torch-sys's `tensor` type).
static thread_local std::string last_error;

static std::vector<at::Tensor> tensor_list(at::Tensor** ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

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

// The message of the last failed call on this thread.
const char* mrcnn_last_error() { return last_error.c_str(); }

// torch.optim.SGD's fused update (momentum, weight decay, dampening 0) of
// `n` parameters in place: one multi-tensor kernel launch per dtype/device
// group. `grad_scale` (nullable) divides the gradients first; `found_inf`
// (nullable, float scalar) skips the whole update on the device when
// nonzero, without a host sync. Returns 0, or -1 (see mrcnn_last_error).
int mrcnn_fused_sgd(at::Tensor** params, at::Tensor** grads, at::Tensor** bufs, int n, double weight_decay,
                    double momentum, double lr, int is_first_step, at::Tensor* grad_scale, at::Tensor* found_inf) {
  try {
    std::optional<at::Tensor> scale = grad_scale ? std::optional<at::Tensor>(*grad_scale) : std::nullopt;
    std::optional<at::Tensor> inf = found_inf ? std::optional<at::Tensor>(*found_inf) : std::nullopt;
    // Without momentum no buffers go in (as torch.optim.SGD calls it): the
    // CUDA kernel with buffers requires momentum > 0.
    std::vector<at::Tensor> momentum_bufs = momentum == 0.0 ? std::vector<at::Tensor>{} : tensor_list(bufs, n);
    at::_fused_sgd_(tensor_list(params, n), tensor_list(grads, n), momentum_bufs, weight_decay, momentum, lr, 0.0,
                    false, false, is_first_step != 0, scale, inf);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// GradScaler's check: multiplies every gradient by `inv_scale` and sets
// `found_inf` to 1 if any value is inf or NaN (all on the device).
int mrcnn_non_finite_check_and_unscale(at::Tensor** grads, int n, at::Tensor* found_inf, at::Tensor* inv_scale) {
  try {
    std::vector<at::Tensor> g = tensor_list(grads, n);
    at::_amp_foreach_non_finite_check_and_unscale_(g, *found_inf, *inv_scale);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// An uninitialized page-locked uint8 CPU tensor of `n` bytes in *out.
int mrcnn_empty_pinned(int64_t n, at::Tensor** out) {
  try {
    *out = new at::Tensor(at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// RoIAlign as an autograd function whose forward and backward launch the
// NVRTC kernels of the Rust side (src/kernels/roi_align.rs) through these
// callbacks: (input or grad_output, rois, output or grad_input, scale,
// pooled h, pooled w, sampling ratio, aligned) -> 0 on success.
typedef int (*mrcnn_roi_cb)(at::Tensor*, at::Tensor*, at::Tensor*, double, int64_t, int64_t, int64_t, int);
static mrcnn_roi_cb roi_forward_cb = nullptr;
static mrcnn_roi_cb roi_backward_cb = nullptr;

void mrcnn_set_roi_align_callbacks(mrcnn_roi_cb forward, mrcnn_roi_cb backward) {
  roi_forward_cb = forward;
  roi_backward_cb = backward;
}

struct RoiAlignFunction : public torch::autograd::Function<RoiAlignFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& rois,
                            double scale, int64_t ph, int64_t pw, int64_t sr, bool aligned) {
    at::Tensor in = input.to(at::kFloat).contiguous();
    at::Tensor r = rois.to(at::kFloat).contiguous();
    at::Tensor out = at::empty({r.size(0), in.size(1), ph, pw}, in.options());
    if (roi_forward_cb(&in, &r, &out, scale, ph, pw, sr, aligned ? 1 : 0) != 0)
      throw std::runtime_error("RoIAlign forward kernel launch failed");
    ctx->save_for_backward({r});
    ctx->saved_data["shape"] = input.sizes().vec();
    ctx->saved_data["dtype"] = static_cast<int64_t>(input.scalar_type());
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["ph"] = ph;
    ctx->saved_data["pw"] = pw;
    ctx->saved_data["sr"] = sr;
    ctx->saved_data["aligned"] = aligned;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor r = ctx->get_saved_variables()[0];
    auto shape = ctx->saved_data["shape"].toIntVector();
    at::Tensor g = grads[0].to(at::kFloat).contiguous();
    at::Tensor grad_in = at::zeros(shape, g.options());
    if (roi_backward_cb(&g, &r, &grad_in, ctx->saved_data["scale"].toDouble(), ctx->saved_data["ph"].toInt(),
                        ctx->saved_data["pw"].toInt(), ctx->saved_data["sr"].toInt(),
                        ctx->saved_data["aligned"].toBool() ? 1 : 0) != 0)
      throw std::runtime_error("RoIAlign backward kernel launch failed");
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grad_in.to(dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Differentiable RoIAlign through the callbacks; `*out` receives
// [K, C, ph, pw] float32. Returns 0, or -1 (see mrcnn_last_error).
int mrcnn_roi_align_autograd(at::Tensor* input, at::Tensor* rois, double scale, int64_t ph, int64_t pw, int64_t sr,
                             int aligned, at::Tensor** out) {
  try {
    if (!roi_forward_cb || !roi_backward_cb) throw std::runtime_error("RoIAlign callbacks not set");
    *out = new at::Tensor(RoiAlignFunction::apply(*input, *rois, scale, ph, pw, sr, aligned != 0));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// A page-locked copy of CPU tensor `t` in *out (no deprecated device argument).
int mrcnn_pin(at::Tensor* t, at::Tensor** out) {
  try {
    *out = new at::Tensor(t->pin_memory());
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// Peak bytes allocated by libtorch's CUDA caching allocator on `device`
// since start (or -1 when unavailable).
int64_t mrcnn_cuda_peak_allocated(int device) {
  try {
    // The device-generic allocator interface: no CUDA headers needed here.
    auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
