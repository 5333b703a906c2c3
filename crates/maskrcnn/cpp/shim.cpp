// C ABI over the few libtorch APIs that tch 0.24 does not expose.
// Every function catches C++ exceptions and reports failure by return code;
// nothing here may unwind into Rust.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <atomic>
#include <dlfcn.h>
#include <string>
#include <vector>
#ifdef MRCNN_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#include <optional>
#include <mutex>
#include <unordered_map>
#endif

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

// Sets whether CUDA autocast is enabled, keeping its dtype and its cast
// cache (a region of the forward run outside autocast). Returns the
// previous state (1 enabled, 0 not), or -1.
int mrcnn_autocast_cuda_set_enabled(int enabled) {
  try {
    int prev = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
    at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
    return prev;
  } catch (...) {
    return -1;
  }
}

// The CUDA autocast state (bit 0: enabled, bit 1: bfloat16), or -1.
int mrcnn_autocast_cuda_state() {
  try {
    return (at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0) |
           (at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 2 : 0);
  } catch (...) {
    return -1;
  }
}

// The message of the last failed call on this thread.
const char* mrcnn_last_error() { return last_error.c_str(); }

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

// RoIAlign over several pyramid levels at once, each RoI pooled from the
// level `levels[k]` names, as an autograd function whose forward and backward
// launch the NVRTC kernels of src/kernels/roi_align.rs through these
// callbacks. Features stay in their dtype and memory format (channels-last
// fp16/bf16 are read in place); the output has the features' dtype and
// memory format; the backward accumulates in float32 per level (for fp16/bf16
// features 64 channels at a time, converted as it goes).
//   forward(features, n, rois, levels, scales, output, ph, pw, sr, aligned)
//   backward(grad_output, rois, levels, scales, grad_features (float32), n, ph, pw, sr, aligned)
typedef int (*mrcnn_ml_forward_cb)(at::Tensor**, int, at::Tensor*, at::Tensor*, const double*, at::Tensor*, int64_t,
                                   int64_t, int64_t, int);
typedef int (*mrcnn_ml_backward_cb)(at::Tensor*, at::Tensor*, at::Tensor*, const double*, at::Tensor**, int, int64_t,
                                    int64_t, int64_t, int);
static mrcnn_ml_forward_cb ml_forward_cb = nullptr;
static mrcnn_ml_backward_cb ml_backward_cb = nullptr;

void mrcnn_set_multilevel_roi_align_callbacks(mrcnn_ml_forward_cb forward, mrcnn_ml_backward_cb backward) {
  ml_forward_cb = forward;
  ml_backward_cb = backward;
}

struct MultiLevelRoiAlignFunction : public torch::autograd::Function<MultiLevelRoiAlignFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList features, const at::Tensor& rois,
                            const at::Tensor& levels, std::vector<double> scales, int64_t ph, int64_t pw, int64_t sr,
                            bool aligned) {
    std::vector<at::Tensor> feats(features.begin(), features.end());
    std::vector<at::Tensor*> ptrs;
    for (auto& f : feats) ptrs.push_back(&f);
    at::Tensor r = rois.to(at::kFloat).contiguous();
    at::Tensor lv = levels.to(at::kLong).contiguous();
    auto format = feats[0].suggest_memory_format();
    at::Tensor out = at::empty({r.size(0), feats[0].size(1), ph, pw}, feats[0].options().memory_format(format));
    if (ml_forward_cb(ptrs.data(), (int)ptrs.size(), &r, &lv, scales.data(), &out, ph, pw, sr, aligned ? 1 : 0) != 0)
      throw std::runtime_error("multi-level RoIAlign forward kernel launch failed");
    ctx->save_for_backward({r, lv});
    std::vector<int64_t> dims;
    for (auto& f : feats) {
      for (auto d : f.sizes()) dims.push_back(d);
      dims.push_back(static_cast<int64_t>(f.suggest_memory_format() == at::MemoryFormat::ChannelsLast));
      dims.push_back(static_cast<int64_t>(f.scalar_type()));
    }
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["scales"] = scales;
    ctx->saved_data["ph"] = ph;
    ctx->saved_data["pw"] = pw;
    ctx->saved_data["sr"] = sr;
    ctx->saved_data["aligned"] = aligned;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor r = saved[0], lv = saved[1];
    auto dims = ctx->saved_data["dims"].toIntVector();
    auto scales = ctx->saved_data["scales"].toDoubleVector();
    at::Tensor g = grads[0];
    // The kernel accumulates in float32. For fp16/bf16 features the float32
    // buffers are only a staging area: they cover a slice of the channels at
    // a time, each slice converted into the features' dtype before the next
    // (all 256 channels of P2..P5 at once took 1.5 GB in float32 at batch 16
    // at 800 x 1333, plus the converted copies, at the step's memory peak).
    std::vector<at::Tensor> grad_out_maps;
    std::vector<std::vector<int64_t>> shapes;
    std::vector<at::MemoryFormat> formats;
    bool staged = false;
    for (size_t i = 0; i + 5 < dims.size() + 1; i += 6) {
      auto format = dims[i + 4] ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
      auto dtype = static_cast<at::ScalarType>(dims[i + 5]);
      std::vector<int64_t> shape = {dims[i], dims[i + 1], dims[i + 2], dims[i + 3]};
      // In the features' memory format (at::zeros ignores one in its
      // options): a channels-last gradient in NCHW made autograd's sum with
      // the convolutions' gradients a strided pass plus a layout copy.
      if (dtype == at::kFloat) {
        grad_out_maps.push_back(at::empty(shape, g.options().dtype(at::kFloat), format).zero_());
      } else {
        grad_out_maps.push_back(at::empty(shape, g.options().dtype(dtype), format));
        staged = true;
      }
      shapes.push_back(shape);
      formats.push_back(format);
    }
    const int64_t channels = shapes.empty() ? 0 : shapes[0][1];
    const int64_t slice = staged && channels > 64 && channels % 64 == 0 ? 64 : channels;
    auto ph = ctx->saved_data["ph"].toInt(), pw = ctx->saved_data["pw"].toInt(), sr = ctx->saved_data["sr"].toInt();
    int aligned = ctx->saved_data["aligned"].toBool() ? 1 : 0;
    for (int64_t c0 = 0; c0 < channels; c0 += slice) {
      std::vector<at::Tensor> buffers;
      for (size_t i = 0; i < shapes.size(); ++i) {
        if (grad_out_maps[i].scalar_type() == at::kFloat) {
          buffers.push_back(grad_out_maps[i].narrow(1, c0, slice));
        } else {
          auto shape = shapes[i];
          shape[1] = slice;
          buffers.push_back(at::empty(shape, g.options().dtype(at::kFloat), formats[i]).zero_());
        }
      }
      std::vector<at::Tensor*> ptrs;
      for (auto& t : buffers) ptrs.push_back(&t);
      at::Tensor gs = g.narrow(1, c0, slice);
      if (ml_backward_cb(&gs, &r, &lv, scales.data(), ptrs.data(), (int)ptrs.size(), ph, pw, sr, aligned) != 0)
        throw std::runtime_error("multi-level RoIAlign backward kernel launch failed");
      for (size_t i = 0; i < shapes.size(); ++i)
        if (grad_out_maps[i].scalar_type() != at::kFloat) grad_out_maps[i].narrow(1, c0, slice).copy_(buffers[i]);
    }
    torch::autograd::variable_list out(grad_out_maps.begin(), grad_out_maps.end());
    for (int i = 0; i < 7; ++i) out.push_back(at::Tensor());
    return out;
  }
};

// Differentiable multi-level RoIAlign through the callbacks; `*out` receives
// [K, C, ph, pw]. Returns 0, or -1 (see mrcnn_last_error).
int mrcnn_multilevel_roi_align(at::Tensor** features, int n, at::Tensor* rois, at::Tensor* levels,
                               const double* scales, int64_t ph, int64_t pw, int64_t sr, int aligned,
                               at::Tensor** out) {
  try {
    if (!ml_forward_cb || !ml_backward_cb) throw std::runtime_error("multi-level RoIAlign callbacks not set");
    std::vector<at::Tensor> feats = tensor_list(features, n);
    std::vector<double> s(scales, scales + n);
    *out = new at::Tensor(MultiLevelRoiAlignFunction::apply(at::TensorList(feats), *rois, *levels, s, ph, pw, sr,
                                                            aligned != 0));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// A convolution's epilogue act(y*scale + shift + (residual*rscale + rshift))
// (scale, residual, rscale/rshift optional; act ReLU or the identity) as an
// autograd function whose forward and backward launch the NVRTC kernels of
// src/kernels/epilogue.rs through these callbacks:
//   forward(y, scale, shift, residual, rscale, rshift, out, relu | 2·upsampled)
//   backward(grad, out (null without ReLU), scale, rscale, grad_y, grad_residual)
//   sum2x2(grad, grad_residual): the gradient of a 2× nearest upsampling
//   bias_backward(grad, out, masked, grad_shift): without scales, the ReLU
//     mask (out, masked null without ReLU) and the bias gradient in one pass
// Optional tensors are null. An upsampled residual is [N, C, H/2, W/2],
// read at (h/2, w/2) (an FPN's top-down path without the upsampled copy). The shift (a convolution's bias) may need a
// gradient; scale, rscale and rshift (fixed normalizations) may not.
typedef int (*mrcnn_epilogue_forward_cb)(at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*,
                                         at::Tensor*, int);
typedef int (*mrcnn_epilogue_backward_cb)(at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*,
                                          at::Tensor*);
typedef int (*mrcnn_sum2x2_cb)(at::Tensor*, at::Tensor*);
typedef int (*mrcnn_bias_backward_cb)(at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*);
static mrcnn_epilogue_forward_cb epilogue_forward_cb = nullptr;
static mrcnn_epilogue_backward_cb epilogue_backward_cb = nullptr;
static mrcnn_sum2x2_cb sum2x2_cb = nullptr;
static mrcnn_bias_backward_cb bias_backward_cb = nullptr;

void mrcnn_set_epilogue_callbacks(mrcnn_epilogue_forward_cb forward, mrcnn_epilogue_backward_cb backward,
                                  mrcnn_sum2x2_cb sum2x2, mrcnn_bias_backward_cb bias_backward) {
  epilogue_forward_cb = forward;
  epilogue_backward_cb = backward;
  sum2x2_cb = sum2x2;
  bias_backward_cb = bias_backward;
}

static at::Tensor* opt_ptr(at::Tensor& t) { return t.defined() ? &t : nullptr; }

// Which optional epilogue inputs are present (autograd functions take no
// undefined tensors: absent ones are passed as the shift and ignored).
enum {
  EPILOGUE_SCALE = 1,
  EPILOGUE_RESIDUAL = 2,
  EPILOGUE_RESIDUAL_AFFINE = 4,
  EPILOGUE_RELU = 8,
  EPILOGUE_RESIDUAL_UPSAMPLED = 16
};

struct EpilogueFunction : public torch::autograd::Function<EpilogueFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& residual, const at::Tensor& rscale,
                            const at::Tensor& rshift, int64_t flags) {
    auto pick = [&](const at::Tensor& t, int flag) { return (flags & flag) ? t : at::Tensor(); };
    bool relu = flags & EPILOGUE_RELU;
    bool upsampled = flags & EPILOGUE_RESIDUAL_UPSAMPLED;
    at::Tensor yy = y, b = shift, s = pick(scale, EPILOGUE_SCALE), r = pick(residual, EPILOGUE_RESIDUAL);
    at::Tensor rs = pick(rscale, EPILOGUE_RESIDUAL_AFFINE), rb = pick(rshift, EPILOGUE_RESIDUAL_AFFINE);
    at::Tensor out = at::empty_like(y);
    int mode = (relu ? 1 : 0) | (upsampled ? 2 : 0);
    if (epilogue_forward_cb(&yy, opt_ptr(s), &b, opt_ptr(r), opt_ptr(rs), opt_ptr(rb), &out, mode) != 0)
      throw std::runtime_error("convolution epilogue kernel does not apply to these tensors");
    ctx->save_for_backward({relu ? out : shift, scale, rscale});
    ctx->saved_data["flags"] = flags;
    if (upsampled) ctx->saved_data["residual_size"] = residual.sizes().vec();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    int64_t flags = ctx->saved_data["flags"].toInt();
    bool relu = flags & EPILOGUE_RELU;
    bool has_residual = flags & EPILOGUE_RESIDUAL;
    at::Tensor out = relu ? saved[0] : at::Tensor();
    at::Tensor scale = (flags & EPILOGUE_SCALE) ? saved[1] : at::Tensor();
    at::Tensor rscale = (flags & EPILOGUE_RESIDUAL_AFFINE) ? saved[2] : at::Tensor();
    at::Tensor g = grads[0];
    at::Tensor gy, gr, masked, gshift;
    if (!scale.defined() && !rscale.defined()) {
      // No scales: both gradients are the masked output gradient itself;
      // with a trainable bias, mask and bias gradient in one kernel.
      if (ctx->needs_input_grad(2)) {
        at::Tensor m = relu ? at::empty_like(g) : at::Tensor();
        at::Tensor gs = at::empty({g.size(1)}, g.options().dtype(at::kFloat));
        if (bias_backward_cb(&g, opt_ptr(out), opt_ptr(m), &gs) == 0) {
          masked = relu ? m : g;
          gshift = gs;
        }
      }
      if (!masked.defined()) masked = relu ? at::threshold_backward(g, out, 0) : g;
      gy = masked;
      gr = has_residual ? masked : at::Tensor();
    } else {
      auto format = out.defined() ? out.suggest_memory_format() : g.suggest_memory_format();
      g = g.contiguous(format);
      gy = at::empty_like(g);
      gr = has_residual ? at::empty_like(g) : at::Tensor();
      if (epilogue_backward_cb(&g, opt_ptr(out), opt_ptr(scale), opt_ptr(rscale), &gy, opt_ptr(gr)) != 0) {
        // Tensor ops with the same arithmetic.
        at::Tensor m = relu ? at::threshold_backward(g, out, 0) : g;
        auto per_channel = [](const at::Tensor& t) { return t.reshape({1, -1, 1, 1}); };
        gy = scale.defined() ? (m * per_channel(scale)).to(g.scalar_type()) : m;
        if (has_residual) gr = rscale.defined() ? (m * per_channel(rscale)).to(g.scalar_type()) : m;
      }
    }
    if (has_residual && (flags & EPILOGUE_RESIDUAL_UPSAMPLED)) {
      // Each residual value was read by a 2×2 block of outputs.
      auto size = ctx->saved_data["residual_size"].toIntVector();
      at::Tensor full = gr;
      gr = at::empty(size, full.options(), full.suggest_memory_format());
      if (sum2x2_cb(&full, &gr) != 0)
        gr = at::upsample_nearest2d_backward(full, {full.size(2), full.size(3)}, size, std::nullopt, std::nullopt);
    }
    if (ctx->needs_input_grad(2) && !gshift.defined()) {
      if (!masked.defined()) masked = relu ? at::threshold_backward(g, out, 0) : g;
      gshift = masked.sum({0, 2, 3}, false, at::kFloat);
    }
    return {gy, at::Tensor(), gshift, gr, at::Tensor(), at::Tensor(), at::Tensor()};  // 7 inputs
  }
};

// Differentiable epilogue through the callbacks (optional tensors null).
// Returns 0, or -1 (see mrcnn_last_error).
int mrcnn_epilogue(at::Tensor* y, at::Tensor* scale, at::Tensor* shift, at::Tensor* residual, at::Tensor* rscale,
                   at::Tensor* rshift, int relu, int upsampled, at::Tensor** out) {
  try {
    if (!epilogue_forward_cb || !epilogue_backward_cb || !sum2x2_cb || !bias_backward_cb)
      throw std::runtime_error("epilogue callbacks not set");
    auto opt = [&](at::Tensor* t) { return t ? *t : *shift; };
    int64_t flags = (scale ? EPILOGUE_SCALE : 0) | (residual ? EPILOGUE_RESIDUAL : 0) |
                    (rscale && rshift ? EPILOGUE_RESIDUAL_AFFINE : 0) | (relu ? EPILOGUE_RELU : 0) |
                    (residual && upsampled ? EPILOGUE_RESIDUAL_UPSAMPLED : 0);
    *out = new at::Tensor(
        EpilogueFunction::apply(*y, opt(scale), *shift, opt(residual), opt(rscale), opt(rshift), flags));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// Makes `grad` (same shape, dtype and device) the gradient tensor of
// `param`: backward then accumulates into it in place (a view into one flat
// buffer that the ranks all-reduce without concatenating or copying back).
int mrcnn_set_grad(at::Tensor* param, at::Tensor* grad) {
  try {
    if (!grad->defined() || grad->sizes() != param->sizes() || grad->scalar_type() != param->scalar_type() ||
        grad->device() != param->device())
      throw std::runtime_error("set_grad: the gradient's shape, dtype or device differs from the parameter's");
    param->mutable_grad() = *grad;
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// A parameter's post-accumulate-grad hook: once backward has accumulated
// the parameter's gradient (its .grad is final for this backward), it calls
// `callback(ctx, index, stream)` on the autograd thread with the CUDA
// stream the accumulation ran on (null off CUDA; the capturing stream while
// a CUDA graph records). The multi-GPU step starts its bucketed gradient
// all-reduce from these (engine::grad_buckets).
typedef void (*PostAccumulateCallback)(void* ctx, int index, void* stream);

struct MrcnnPostAccumulate : torch::autograd::PostAccumulateGradHook {
  PostAccumulateCallback callback;
  void* ctx;
  int index;
  MrcnnPostAccumulate(PostAccumulateCallback callback, void* ctx, int index)
      : callback(callback), ctx(ctx), index(index) {}
  void operator()(const torch::autograd::Variable& param) override {
    void* stream = nullptr;
#ifdef MRCNN_WITH_CUDA
    if (param.is_cuda()) stream = static_cast<void*>(c10::cuda::getCurrentCUDAStream(param.device().index()).stream());
#endif
    callback(ctx, index, stream);
  }
};

// Installs (callback non-null) or removes `param`'s post-accumulate hook
// (one per parameter: it replaces any other).
int mrcnn_set_post_accumulate_hook(at::Tensor* param, PostAccumulateCallback callback, void* ctx, int index) {
  try {
    if (!param->is_leaf() || !param->requires_grad())
      throw std::runtime_error("post-accumulate hook: the tensor is not a leaf that requires grad");
    if (callback)
      torch::autograd::impl::set_post_acc_grad_hooks(*param, std::make_unique<MrcnnPostAccumulate>(callback, ctx, index));
    else
      torch::autograd::impl::set_post_acc_grad_hooks(*param, nullptr);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// Sets every tensor of the list to zero with one multi-tensor kernel.
int mrcnn_foreach_zero(at::Tensor** ts, int n) {
  try {
    at::_foreach_zero_(tensor_list(ts, n));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// The global L2 norm of the tensors (float32 scalar in *out, on their
// device): torch.nn.utils.clip_grad_norm_'s foreach path.
int mrcnn_foreach_total_norm(at::Tensor** ts, int n, at::Tensor** out) {
  try {
    auto norms = at::_foreach_norm(tensor_list(ts, n), 2, at::kFloat);
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// Multiplies every tensor of the list in place by the 1-element tensor `factor`.
int mrcnn_foreach_mul(at::Tensor** ts, int n, at::Tensor* factor) {
  try {
    at::_foreach_mul_(tensor_list(ts, n), *factor);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// torch.optim.SGD's fused update (momentum, weight decay, dampening 0) of
// `n` parameters in place: one multi-tensor kernel launch per dtype/device
// group. The learning rate is a 1-element tensor on the parameters' device
// (a captured CUDA graph reads it at replay). `grad_scale` (nullable)
// divides the gradients first; `found_inf` (nullable, float scalar) skips
// the whole update on the device when nonzero, without a host sync.
// Returns 0, or -1 (see mrcnn_last_error).
int mrcnn_fused_sgd(at::Tensor** params, at::Tensor** grads, at::Tensor** bufs, int n, double weight_decay,
                              double momentum, at::Tensor* lr, int is_first_step, at::Tensor* grad_scale,
                              at::Tensor* found_inf) {
  try {
    std::optional<at::Tensor> scale = grad_scale ? std::optional<at::Tensor>(*grad_scale) : std::nullopt;
    std::optional<at::Tensor> inf = found_inf ? std::optional<at::Tensor>(*found_inf) : std::nullopt;
    // Without momentum no buffers go in (as torch.optim.SGD calls it): the
    // CUDA kernel with buffers requires momentum > 0.
    std::vector<at::Tensor> momentum_bufs = momentum == 0.0 ? std::vector<at::Tensor>{} : tensor_list(bufs, n);
    at::_fused_sgd_(tensor_list(params, n), tensor_list(grads, n), momentum_bufs, weight_decay, momentum, *lr, 0.0,
                    false, false, is_first_step != 0, scale, inf);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// Counting device->host synchronizations: libtorch's own sync check
// (torch.cuda.set_sync_debug_mode("warn")) reports every synchronizing CUDA
// call it makes (copies to the host, .item(), nonzero, stream and device
// synchronizations) as a warning; this handler counts those and passes
// every other warning on. The mode lives in a function-local static of
// libc10_cuda (c10::cuda::warning_state()), found by its symbol so no CUDA
// header is needed.
static std::atomic<int64_t> sync_count{0};

struct SyncCountingHandler : public c10::WarningHandler {
  c10::WarningHandler* previous = nullptr;
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("called a synchronizing CUDA operation") != std::string::npos) {
      sync_count.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    if (previous) previous->process(warning);
  }
};
static SyncCountingHandler* sync_handler = nullptr;

// Turns counting on (1) or off (0). Returns 0, or -1 when libtorch has no
// CUDA sync check (CPU-only build).
int mrcnn_sync_counter_enable(int enabled) {
  void* state = dlsym(RTLD_DEFAULT, "_ZZN3c104cuda13warning_stateEvE14warning_state_");
  if (!state) return -1;
  if (enabled && !sync_handler) {
    sync_handler = new SyncCountingHandler();
    sync_handler->previous = c10::WarningUtils::get_warning_handler();
    c10::WarningUtils::set_warning_handler(sync_handler);
  }
  *static_cast<int*>(state) = enabled ? 1 : 0;  // c10::cuda::SyncDebugMode::L_WARN / L_DISABLED
  return 0;
}

// Synchronizations counted so far.
int64_t mrcnn_sync_count() { return sync_count.load(std::memory_order_relaxed); }

#ifdef MRCNN_WITH_CUDA
// libtorch's current CUDA stream on `device` (the NVRTC kernels launch on
// it, so they run in order with libtorch's work, also inside a CUDA graph
// capture); null without CUDA.
void* mrcnn_current_cuda_stream(int device) {
  try {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  } catch (...) {
    return nullptr;
  }
}

// CUDA graphs: work issued between capture_begin and capture_end on the
// calling thread goes to a side stream and is recorded, not run (memory
// from the graph's private pool); replay runs it on the current stream.
// Autocast's cast cache is off while recording: weights cast inside the
// graph stay the graph's own (a cached cast could be freed when autocast
// ends while the graph still reads it).
// (Streams are switched by hand: c10's stream guard would pull CUDA
// runtime symbols into this library.)
struct MrcnnGraph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStream> previous;
  bool cache_was_enabled = true;
  void restore_stream() {
    if (previous) c10::cuda::setCurrentCUDAStream(*previous);
    previous.reset();
  }
};

// One capture stream per device for every graph, as torch.cuda.graph's
// default: the caching allocator reuses a freed block only on the stream it
// was used on, so graphs sharing a memory pool must be recorded on one
// stream for one graph's freed working memory to serve the next.
static c10::cuda::CUDAStream capture_stream(c10::DeviceIndex index) {
  static std::mutex lock;
  static std::unordered_map<int, c10::cuda::CUDAStream> streams;
  std::lock_guard<std::mutex> guard(lock);
  auto it = streams.find(index);
  if (it == streams.end()) it = streams.emplace(index, c10::cuda::getStreamFromPool(false, index)).first;
  return it->second;
}

void* mrcnn_graph_new() {
  try {
    return new MrcnnGraph();
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

// `share` (nullable): a recorded graph whose memory pool this one shares
// (graphs replayed one at a time on one stream never need their private
// memory at the same time; what a graph keeps, its outputs, stays theirs).
int mrcnn_graph_capture_begin(void* g, int device, void* share) {
  auto* graph = static_cast<MrcnnGraph*>(g);
  try {
    // (The caller has synchronized the device: queued work is done.)
    auto index = static_cast<c10::DeviceIndex>(device);
    graph->previous.emplace(c10::cuda::getCurrentCUDAStream(index));
    c10::cuda::setCurrentCUDAStream(capture_stream(index));
    graph->cache_was_enabled = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    // Thread-local: other threads (loader workers pinning memory) go on.
    decltype(graph->graph.pool()) pool = {0, 0};
    if (share) pool = static_cast<MrcnnGraph*>(share)->graph.pool();
    graph->graph.capture_begin(pool, cudaStreamCaptureModeThreadLocal);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    graph->restore_stream();
    at::autocast::set_autocast_cache_enabled(graph->cache_was_enabled);
    return -1;
  }
}

int mrcnn_graph_capture_end(void* g) {
  auto* graph = static_cast<MrcnnGraph*>(g);
  int code = 0;
  try {
    graph->graph.capture_end();
  } catch (const std::exception& e) {
    last_error = e.what();
    code = -1;
  }
  graph->restore_stream();
  at::autocast::set_autocast_cache_enabled(graph->cache_was_enabled);
  return code;
}

int mrcnn_graph_replay(void* g) {
  try {
    static_cast<MrcnnGraph*>(g)->graph.replay();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

void mrcnn_graph_free(void* g) { delete static_cast<MrcnnGraph*>(g); }

#else
void* mrcnn_current_cuda_stream(int) { return nullptr; }
void* mrcnn_graph_new() {
  last_error = "built without CUDA";
  return nullptr;
}
int mrcnn_graph_capture_begin(void*, int, void*) { return -1; }
int mrcnn_graph_capture_end(void*) { return -1; }
int mrcnn_graph_replay(void*) { return -1; }
void mrcnn_graph_free(void*) {}
#endif

// The tensor's version counter (bumped by every in-place change), or -1.
int64_t mrcnn_tensor_version(at::Tensor* t) {
  try {
    return static_cast<int64_t>(t->_version());
  } catch (...) {
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

// Returns the CUDA caching allocator's unused cached memory to the driver,
// memory pools of destroyed CUDA graphs included (which it otherwise frees
// only when an allocation fails: never during a capture, which then fails).
// Waits for the device. 0, or -1 (see mrcnn_last_error).
int mrcnn_cuda_empty_cache() {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->emptyCache();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// libtorch's CUDA caching allocator on `device`: what = 0 the peak bytes
// allocated since start, 1 the bytes allocated now, 2 the bytes reserved
// now (-1 when unavailable).
int64_t mrcnn_cuda_memory(int device, int what) {
  try {
    // The device-generic allocator interface: no CUDA headers needed here.
    auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    switch (what) {
      case 0: return stats.allocated_bytes[all].peak;
      case 1: return stats.allocated_bytes[all].current;
      case 2: return stats.reserved_bytes[all].current;
      default: return -1;
    }
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
