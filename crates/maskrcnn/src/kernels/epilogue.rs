//! The epilogue of a convolution in one pass:
//! `act(y·scale + shift + shortcut)`, `shortcut = residual·rscale + rshift`
//! (or the residual itself, or nothing), `act` ReLU or the identity.
//! It covers a convolution's bias (`shift`, no scale), a normalization
//! with fixed statistics (frozen BN's `scale`/`shift`), a ResNet block's
//! shortcut (identity or downsample + its frozen BN) and an FPN top-down
//! sum. libtorch adds a bias as a broadcast over channels-last outputs (a
//! slow, non-vectorized pass) and each of mul, add, add and ReLU is
//! another full pass; at detection image sizes these passes were most of
//! the non-convolution GPU time of a training step.
//!
//! Arithmetic is torchvision's, in float32 and without contraction
//! (`__fmul_rn`, `__fadd_rn`): `(y·scale + shift) + (r·rscale + rshift)`,
//! so float32 results equal libtorch's op-by-op results bit for bit; fp16
//! and bf16 values are loaded to float32 and the result rounded once.
//! The backward (another kernel) gives `m·scale` to `y` and `m·rscale` to
//! the residual, `m` the output gradient masked by ReLU as libtorch's
//! `threshold_backward` masks it; a trainable bias gets the sum of `m` over
//! batch and positions (in the C++ shim, which runs both kernels inside an
//! autograd function through [`forward_callback`] / [`backward_callback`]).

use cudarc::driver::PushKernelArg;
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = concat!(
    super::half_conversions!(),
    r#"
// ReLU (when `relu`) that keeps NaN as torch.relu does, so a diverged run
// is still noticed.
__device__ __forceinline__ float act(float v, int relu) { return relu && !(v != v) ? fmaxf(v, 0.0f) : v; }

template <typename T> __device__ __forceinline__ float ld(const T* p, int bf16);
template <> __device__ __forceinline__ float ld<float>(const float* p, int) { return *p; }
template <> __device__ __forceinline__ float ld<unsigned short>(const unsigned short* p, int bf16) {
  return load_val(p, bf16);
}
template <typename T> __device__ __forceinline__ T st(float v, int bf16);
template <> __device__ __forceinline__ float st<float>(float v, int) { return v; }
template <> __device__ __forceinline__ unsigned short st<unsigned short>(float v, int bf16) {
  return store_half(v, bf16);
}

// VEC values moved as one 16-byte vector, or (width 1) value t[0] alone.
template <typename T, int VEC> union Values {
  uint4 u;
  T t[VEC];
  __device__ __forceinline__ void load(const T* src, long long v, int width) {
    if (width == VEC) u = ((const uint4*)src)[v]; else t[0] = src[v];
  }
  __device__ __forceinline__ void store(T* dst, long long v, int width) const {
    if (width == VEC) ((uint4*)dst)[v] = u; else dst[v] = t[0];
  }
};

// The per-channel factors of the `count` values of a vector: channels c0,
// c0 + step, ... (step 1 on channels-last, 0 on an NCHW plane). Absent
// tensors give 1 and 0, which the kernels do not use.
template <int VEC> struct Factors {
  float s[VEC], b[VEC], rs[VEC], rb[VEC];
  __device__ __forceinline__ void load(const float* scale, const float* shift, const float* rscale,
                                       const float* rshift, int c0, int step, int count) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < count) {
        int c = c0 + k * step;
        s[k] = scale ? scale[c] : 1.0f;
        b[k] = shift ? shift[c] : 0.0f;
        rs[k] = rscale ? rscale[c] : 1.0f;
        rb[k] = rshift ? rshift[c] : 0.0f;
      }
    }
  }
};

// Calls step(v, width, factors, c) for every vector v (width VEC) of the
// `n` values, then for every value of the scalar tail (width 1). Values of
// one memory layout: the channel of value i is (i / inner) % channels
// (inner 1 for channels-last, H·W for contiguous NCHW); with `vec` a vector
// is VEC channels of one pixel (channels-last) or VEC values of one
// channel plane (NCHW) -- the host checks channels resp. H·W is a multiple
// of VEC and the pointers are aligned. Per-channel factors are read when a
// thread's channels change: on channels-last the grid stride is a whole
// number of pixels for the usual channel counts, so a thread reads them
// once (reading them per value made the kernel bound by L1 requests).
// `c` is the channel of the vector's first value.
template <int VEC, typename Step>
__device__ __forceinline__ void for_each_vector(long long n, int channels, long long inner, int vec,
                                                const float* scale, const float* shift, const float* rscale,
                                                const float* rshift, Step step) {
  long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  long long stride = (long long)blockDim.x * gridDim.x;
  long long nv = vec ? n / VEC : 0;
  Factors<VEC> f;
  int cached = -1;
  int c0 = (int)((first * VEC) % channels);
  int advance = (int)((stride * VEC) % channels);
  // Two vectors in flight per thread: the loads of the next iteration
  // issue before the stores of this one.
#pragma unroll 2
  for (long long v = first; v < nv; v += stride) {
    int c = inner == 1 ? c0 : (int)((v * VEC / inner) % channels);
    if (c != cached) {
      f.load(scale, shift, rscale, rshift, c, inner == 1 ? 1 : 0, VEC);
      cached = c;
    }
    step(v, VEC, f, c);
    c0 += advance;
    if (c0 >= channels) c0 -= channels;
  }
  for (long long v = nv * VEC + first; v < n; v += stride) {
    int c = (int)((v / inner) % channels);
    f.load(scale, shift, rscale, rshift, c, 0, 1);
    step(v, 1, f, c);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void epilogue_forward(const T* __restrict__ y, const T* __restrict__ residual,
                                                 T* __restrict__ out, const float* __restrict__ scale,
                                                 const float* __restrict__ shift, const float* __restrict__ rscale,
                                                 const float* __restrict__ rshift, long long n, int channels,
                                                 long long inner, int vec, int relu, int bf16, int up_h, int up_w) {
  for_each_vector<VEC>(n, channels, inner, vec, scale, shift, rscale, rshift,
                       [&](long long v, int width, const Factors<VEC>& f, int c) {
    Values<T, VEC> a, b, o;
    a.load(y, v, width);
    if (residual) {
      long long r = v;
      if (up_w) {
        // Channels-last output [N, up_h, up_w, C] reading the residual
        // [N, up_h/2, up_w/2, C] at (h/2, w/2): nearest 2× upsampling.
        unsigned int pixel = (unsigned int)(v * width / channels);
        unsigned int x = pixel % up_w, rest = pixel / up_w, y2 = rest % up_h, b2 = rest / up_h;
        long long source = ((long long)b2 * (up_h / 2) + y2 / 2) * (up_w / 2) + x / 2;
        r = (source * channels + c) / width;
      }
      b.load(residual, r, width);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < width) {
        float s = ld<T>(&a.t[k], bf16);
        s = scale ? __fadd_rn(__fmul_rn(s, f.s[k]), f.b[k]) : __fadd_rn(s, f.b[k]);
        if (residual) {
          float r = ld<T>(&b.t[k], bf16);
          if (rscale) r = __fadd_rn(__fmul_rn(r, f.rs[k]), f.rb[k]);
          s = __fadd_rn(s, r);
        }
        o.t[k] = st<T>(act(s, relu), bf16);
      }
    }
    o.store(out, v, width);
  });
}

template <typename T, int VEC>
__device__ __forceinline__ void epilogue_backward(const T* __restrict__ grad, const T* __restrict__ out,
                                                  T* __restrict__ grad_y, T* __restrict__ grad_residual,
                                                  const float* __restrict__ scale, const float* __restrict__ rscale,
                                                  long long n, int channels, long long inner, int vec, int bf16) {
  for_each_vector<VEC>(n, channels, inner, vec, scale, nullptr, rscale, nullptr,
                       [&](long long v, int width, const Factors<VEC>& f, int) {
    Values<T, VEC> g, o, gy, gr;
    g.load(grad, v, width);
    if (out) o.load(out, v, width);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < width) {
        float m = ld<T>(&g.t[k], bf16);
        if (out && ld<T>(&o.t[k], bf16) <= 0.0f) m = 0.0f;
        gy.t[k] = st<T>(scale ? __fmul_rn(m, f.s[k]) : m, bf16);
        gr.t[k] = st<T>(rscale ? __fmul_rn(m, f.rs[k]) : m, bf16);
      }
    }
    gy.store(grad_y, v, width);
    if (grad_residual) gr.store(grad_residual, v, width);
  });
}

// grad_small [N, H/2, W/2, C] = sums of grad [N, H, W, C]'s 2×2 blocks
// (channels-last; `vec`: VEC channels per thread), added in libtorch's
// order for upsample_nearest2d_backward (rows, then columns, from 0).
template <typename T, int VEC>
__device__ __forceinline__ void sum2x2(const T* __restrict__ grad, T* __restrict__ grad_small, long long pixels,
                                       int channels, int h, int w, int vec, int bf16) {
  int width = vec ? VEC : 1;
  int groups = channels / width;
  long long total = pixels * groups;
  for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
       t += (long long)blockDim.x * gridDim.x) {
    long long p = t / groups;
    int c = (int)(t % groups) * width;
    long long x = p % (w / 2), rest = p / (w / 2), y = rest % (h / 2), b = rest / (h / 2);
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
    for (int dy = 0; dy < 2; ++dy) {
      for (int dx = 0; dx < 2; ++dx) {
        long long i = ((b * h + 2 * y + dy) * w + 2 * x + dx) * channels + c;
        Values<T, VEC> g;
        g.load(grad, i / width, width);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (k < width) acc[k] = __fadd_rn(acc[k], ld<T>(&g.t[k], bf16));
        }
      }
    }
    Values<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < width) o.t[k] = st<T>(acc[k], bf16);
    }
    o.store(grad_small, (p * channels + c) / width, width);
  }
}

// A bias's gradient for an epilogue without scales: per-channel sums of
// the output gradient, masked by ReLU when `out` is given (and then also
// written to `masked`, libtorch's threshold_backward), in one pass.
// Channels-last, VEC channels per thread; 256·VEC is a multiple of C (host
// check), so each thread keeps the same channels over the grid stride and
// sums them in registers, then the threads of a block sharing channels
// are added in a fixed order into partial[block][C]: deterministic.
template <typename T, int VEC>
__device__ __forceinline__ void bias_backward(const T* __restrict__ grad, const T* __restrict__ out,
                                              T* __restrict__ masked, float* __restrict__ partial, long long n,
                                              int channels, int bf16) {
  __shared__ float sums[256 * VEC];
  long long stride = (long long)blockDim.x * gridDim.x;
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
  for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < n / VEC; v += stride) {
    Values<T, VEC> g, o, m;
    g.load(grad, v, VEC);
    if (out) o.load(out, v, VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float x = ld<T>(&g.t[k], bf16);
      if (out && ld<T>(&o.t[k], bf16) <= 0.0f) x = 0.0f;
      acc[k] = __fadd_rn(acc[k], x);
      m.t[k] = st<T>(x, bf16);
    }
    if (masked) m.store(masked, v, VEC);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) sums[threadIdx.x * VEC + k] = acc[k];
  __syncthreads();
  int groups = channels / VEC;
  for (int t = threadIdx.x; t < groups; t += blockDim.x) {
    float total[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) total[k] = 0.0f;
    for (int j = t; j < blockDim.x; j += groups) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) total[k] = __fadd_rn(total[k], sums[j * VEC + k]);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) partial[(long long)blockIdx.x * channels + t * VEC + k] = total[k];
  }
}

#define EPILOGUE_ARGS                                                                                       \
  const float* __restrict__ scale, const float* __restrict__ shift, const float* __restrict__ rscale,      \
      const float* __restrict__ rshift, long long n, int channels, long long inner, int vec, int relu, int bf16

#define EPILOGUE(NAME, T, VEC)                                                                               \
  extern "C" __global__ void NAME##_forward(const T* __restrict__ y, const T* __restrict__ residual,        \
                                            T* __restrict__ out, EPILOGUE_ARGS, int up_h, int up_w) {      \
    epilogue_forward<T, VEC>(y, residual, out, scale, shift, rscale, rshift, n, channels, inner, vec, relu, bf16, \
                             up_h, up_w);                                                                  \
  }                                                                                                        \
  extern "C" __global__ void NAME##_bias_backward(const T* __restrict__ grad, const T* __restrict__ out,    \
                                                  T* __restrict__ masked, float* __restrict__ partial,     \
                                                  long long n, int channels, int bf16) {                   \
    bias_backward<T, VEC>(grad, out, masked, partial, n, channels, bf16);                                  \
  }                                                                                                        \
  extern "C" __global__ void NAME##_sum2x2(const T* __restrict__ grad, T* __restrict__ grad_small,          \
                                           long long pixels, int channels, int h, int w, int vec, int bf16) { \
    sum2x2<T, VEC>(grad, grad_small, pixels, channels, h, w, vec, bf16);                                   \
  }                                                                                                        \
  extern "C" __global__ void NAME##_backward(const T* __restrict__ grad, const T* __restrict__ out,         \
                                             T* __restrict__ grad_y, T* __restrict__ grad_residual,        \
                                             EPILOGUE_ARGS) {                                              \
    epilogue_backward<T, VEC>(grad, out, grad_y, grad_residual, scale, rscale, n, channels, inner, vec, bf16); \
  }

EPILOGUE(epilogue_f32, float, 4)
EPILOGUE(epilogue_f16, unsigned short, 8)
EPILOGUE(epilogue_bf16, unsigned short, 8)
"#
);

/// What follows a convolution with output `y` `[N, C, H, W]`:
/// `act(y·scale + shift + shortcut)`. Per-channel tensors are float32
/// `[C]` without gradients except `shift` (a convolution's trainable bias).
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Multiplies `y` first (a fixed normalization's scale); `None`: 1.
    pub scale: Option<&'a Tensor>,
    /// Added to `y·scale` (bias or normalization shift).
    pub shift: &'a Tensor,
    /// Shaped as `y` (or `[N, C, H/2, W/2]` with `residual_upsampled`):
    /// added after its own `rscale`/`rshift`.
    pub residual: Option<&'a Tensor>,
    /// The residual is added 2× nearest-upsampled (an FPN's top-down
    /// path): on channels-last CUDA tensors read in place, without the
    /// upsampled copy.
    pub residual_upsampled: bool,
    /// The residual's fixed normalization (`scale`, `shift`), if any.
    pub residual_affine: Option<(&'a Tensor, &'a Tensor)>,
    /// ReLU at the end (else the identity).
    pub relu: bool,
}

impl<'a> Epilogue<'a> {
    /// `y·scale + shift` (without a scale `y + shift`) and nothing else:
    /// the base call sites complete with struct update syntax.
    pub fn affine(scale: Option<&'a Tensor>, shift: &'a Tensor) -> Self {
        Epilogue { scale, shift, residual: None, residual_upsampled: false, residual_affine: None, relu: false }
    }
}

/// Times a CUDA epilogue fell back to tensor ops, with the last reason
/// (tests check that the model's epilogues all take the kernel).
static FALLBACKS: AtomicUsize = AtomicUsize::new(0);

/// How many CUDA epilogues have run as tensor ops since the start.
pub fn fallback_count() -> usize {
    FALLBACKS.load(Ordering::Relaxed)
}

/// How the kernels walk a tensor: `inner` (1 for channels-last, H·W for
/// contiguous NCHW), or `None` when the tensor is neither.
fn layout(t: &Tensor) -> Option<i64> {
    let size = t.size();
    if size.len() != 4 {
        return None;
    }
    if t.is_contiguous() {
        return Some(size[2] * size[3]);
    }
    super::is_channels_last(t).then_some(1)
}

/// `r` `[N, C, h, w]` nearest-upsampled to `like`'s spatial size
/// (torchvision's `F.interpolate(mode="nearest")`), outside autocast:
/// autocast would upsample in float32 and make the whole top-down path
/// float32, and nearest upsampling is exact in any dtype.
pub fn upsampled_like(r: &Tensor, like: &Tensor) -> Tensor {
    crate::shim::without_autocast(|| r.upsample_nearest2d(&like.size()[2..], None, None))
}

/// Whether the kernels can read `residual` as `y`'s residual upsampled 2×
/// in place: both channels-last, `residual` `[N, C, H/2, W/2]` of `y`'s
/// dtype and device.
fn upsampled_residual_fits(y: &Tensor, residual: &Tensor) -> bool {
    let (ys, rs) = (y.size(), residual.size());
    ys.len() == 4
        && ys[2] % 2 == 0
        && ys[3] % 2 == 0
        && rs == [ys[0], ys[1], ys[2] / 2, ys[3] / 2]
        && layout(y) == Some(1)
        && layout(residual) == Some(1)
        && residual.kind() == y.kind()
        && residual.device() == y.device()
}

/// Why the kernel cannot run on these tensors, if it cannot.
fn unsupported(y: &Tensor, values: &[&Tensor], channels_tensors: &[&Tensor]) -> Option<&'static str> {
    if !y.device().is_cuda() {
        return Some("not on CUDA");
    }
    if layout(y).is_none() {
        return Some("neither contiguous nor channels-last");
    }
    if !matches!(y.kind(), Kind::Float | Kind::Half | Kind::BFloat16) {
        return Some("dtype");
    }
    for t in values {
        if t.kind() != y.kind() || t.size() != y.size() || t.stride() != y.stride() || t.device() != y.device() {
            return Some("a tensor's dtype, shape or strides differ from the output's");
        }
    }
    let channels = y.size()[1];
    for t in channels_tensors {
        if t.kind() != Kind::Float || !t.is_contiguous() || t.numel() as i64 != channels || t.device() != y.device() {
            return Some("a per-channel tensor is not contiguous float32 [C] on the device");
        }
    }
    None
}

/// One launch of `epilogue_<dtype>_<forward|backward>` over `like`'s values.
/// The device's kernels, the name `epilogue_<dtype>_<what>` of the one for
/// `like`'s dtype, its bf16 flag and its vector length (`None` off CUDA or
/// for another dtype).
fn kernel_for(like: &Tensor, what: &str) -> Option<(std::sync::Arc<super::DeviceKernels>, String, i32, i64)> {
    let Device::Cuda(index) = like.device() else { return None };
    let (suffix, bf16, vec_len) = super::dtype_suffix(like.kind())?;
    Some((super::device_kernels(index)?, format!("epilogue_{suffix}_{what}"), bf16, vec_len))
}

/// `up`: the output's (H, W) when the residual is read 2× upsampled, else (0, 0).
fn launch(
    backward: bool,
    like: &Tensor,
    pointers: [u64; 4],
    affine: [Option<&Tensor>; 4],
    relu: bool,
    up: (i64, i64),
) -> Option<()> {
    let inner = layout(like)?;
    let (kernels, name, bf16, vec_len) = kernel_for(like, if backward { "backward" } else { "forward" })?;
    let f = kernels.function(&name)?;
    let n = like.numel() as i64;
    if n == 0 {
        return Some(());
    }
    let channels = like.size()[1];
    let aligned = pointers.iter().all(|&p| p % 16 == 0);
    let groups = if inner == 1 { channels } else { inner };
    let vec = i32::from(aligned && groups % vec_len == 0);
    let work = if vec == 1 { n / vec_len } else { n };
    let cfg = super::launch_1d(super::blocks_for(work, 132 * 32));
    let [scale, shift, rscale, rshift] = affine.map(|t| t.map_or(0u64, |t| t.data_ptr() as u64));
    let (ci, relu) = (channels as i32, i32::from(relu));
    let stream = kernels.stream();
    let mut l = stream.launch_builder(f);
    // forward(y, residual, out), backward(grad, out, grad_y, grad_residual).
    for p in &pointers[..if backward { 4 } else { 3 }] {
        l.arg(p);
    }
    l.arg(&scale).arg(&shift).arg(&rscale).arg(&rshift);
    l.arg(&n).arg(&ci).arg(&inner).arg(&vec).arg(&relu).arg(&bf16);
    let (up_h, up_w) = (up.0 as i32, up.1 as i32);
    if !backward {
        l.arg(&up_h).arg(&up_w);
    }
    // SAFETY: the four value pointers (null where optional) address live
    // CUDA tensors of `n` values with `like`'s dtype, shape and strides,
    // dense in the layout `inner` describes (checked by `unsupported`);
    // per-channel pointers (null where optional) hold `channels` float32
    // values; with `up`, the residual is channels-last [N, C, H/2, W/2]
    // (checked by `upsampled_residual_fits`). Vectors are used only on
    // 16-byte aligned pointers with whole vectors per pixel or plane. All
    // stay alive until later work on this stream.
    super::launched(&name, unsafe { l.launch(cfg) }).map(|_| ())
}

fn ptr(t: Option<&Tensor>) -> u64 {
    t.map_or(0, |t| t.data_ptr() as u64)
}

/// The tensor behind a handle the shim lends for a call (`None` for null).
///
/// # Safety
/// `p` must be null or a live `at::Tensor*`.
unsafe fn lent(p: *mut torch_sys::C_tensor) -> Option<std::mem::ManuallyDrop<Tensor>> {
    (!p.is_null()).then(|| std::mem::ManuallyDrop::new(Tensor::from_ptr(p)))
}

/// Forward of the shim's autograd function: fills `out`. 0 on success.
#[allow(clippy::too_many_arguments)]
pub(crate) extern "C" fn forward_callback(
    y: *mut torch_sys::C_tensor,
    scale: *mut torch_sys::C_tensor,
    shift: *mut torch_sys::C_tensor,
    residual: *mut torch_sys::C_tensor,
    rscale: *mut torch_sys::C_tensor,
    rshift: *mut torch_sys::C_tensor,
    out: *mut torch_sys::C_tensor,
    mode: i32,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: the shim lends live tensors (the optional ones may be null).
        let [y, scale, shift, residual, rscale, rshift, out] =
            [y, scale, shift, residual, rscale, rshift, out].map(|p| unsafe { lent(p) });
        let (y, out) = (y?, out?);
        let (relu, upsampled) = (mode & 1 != 0, mode & 2 != 0);
        let same_shape = residual.as_deref().filter(|_| !upsampled);
        let values: Vec<&Tensor> = [same_shape, Some(&*out)].into_iter().flatten().collect();
        let per_channel: Vec<&Tensor> =
            [scale.as_deref(), shift.as_deref(), rscale.as_deref(), rshift.as_deref()].into_iter().flatten().collect();
        if shift.is_none() || unsupported(&y, &values, &per_channel).is_some() {
            return None;
        }
        let up = match residual.as_deref() {
            Some(r) if upsampled => {
                if !upsampled_residual_fits(&y, r) {
                    return None;
                }
                (y.size()[2], y.size()[3])
            }
            _ => (0, 0),
        };
        let affine = [scale.as_deref(), shift.as_deref(), rscale.as_deref(), rshift.as_deref()];
        let pointers = [y.data_ptr() as u64, ptr(residual.as_deref()), out.data_ptr() as u64, 0];
        launch(false, &y, pointers, affine, relu, up)
    })
    .ok()
    .flatten()
    .map_or(-1, |()| 0)
}

/// Backward of the shim's autograd function: fills `grad_y` and
/// `grad_residual` (nullable) from `grad` and, with ReLU, `out` (null
/// without). 0 on success.
#[allow(clippy::too_many_arguments)]
pub(crate) extern "C" fn backward_callback(
    grad: *mut torch_sys::C_tensor,
    out: *mut torch_sys::C_tensor,
    scale: *mut torch_sys::C_tensor,
    rscale: *mut torch_sys::C_tensor,
    grad_y: *mut torch_sys::C_tensor,
    grad_residual: *mut torch_sys::C_tensor,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: as in the forward.
        let [grad, out, scale, rscale, grad_y, grad_residual] =
            [grad, out, scale, rscale, grad_y, grad_residual].map(|p| unsafe { lent(p) });
        let (grad, grad_y) = (grad?, grad_y?);
        let values: Vec<&Tensor> =
            [out.as_deref(), Some(&*grad_y), grad_residual.as_deref()].into_iter().flatten().collect();
        if unsupported(&grad, &values, &[]).is_some() {
            return None;
        }
        let pointers =
            [grad.data_ptr() as u64, ptr(out.as_deref()), grad_y.data_ptr() as u64, ptr(grad_residual.as_deref())];
        launch(true, &grad, pointers, [scale.as_deref(), None, rscale.as_deref(), None], false, (0, 0))
    })
    .ok()
    .flatten()
    .map_or(-1, |()| 0)
}

/// The bias gradient of the shim's autograd function without scales:
/// `grad_shift` `[C]` float32 = per-channel sums of `grad` masked by ReLU
/// where `out` (nullable) is given, the masked gradient also written to
/// `masked` (nullable). One pass (libtorch's threshold_backward and sum
/// read the gradient twice). 0 on success.
pub(crate) extern "C" fn bias_backward_callback(
    grad: *mut torch_sys::C_tensor,
    out: *mut torch_sys::C_tensor,
    masked: *mut torch_sys::C_tensor,
    grad_shift: *mut torch_sys::C_tensor,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: as in the forward.
        let [grad, out, masked, grad_shift] = [grad, out, masked, grad_shift].map(|p| unsafe { lent(p) });
        let (grad, mut grad_shift) = (grad?, grad_shift?);
        let values: Vec<&Tensor> = [out.as_deref(), masked.as_deref()].into_iter().flatten().collect();
        if unsupported(&grad, &values, &[]).is_some() || layout(&grad) != Some(1) || out.is_some() != masked.is_some() {
            return None;
        }
        let (kernels, name, bf16, vec_len) = kernel_for(&grad, "bias_backward")?;
        let (n, channels) = (grad.numel() as i64, grad.size()[1]);
        let pointers = [Some(&*grad), out.as_deref(), masked.as_deref()].map(|t| t.map_or(0, |t| t.data_ptr() as u64));
        // Each thread keeps its channels: 256·VEC a multiple of C.
        if n == 0 || channels % vec_len != 0 || (256 * vec_len) % channels != 0 || pointers.iter().any(|p| p % 16 != 0)
        {
            return None;
        }
        let f = kernels.function(&name)?;
        let blocks = super::blocks_for(n / vec_len, 132 * 32);
        let partial = Tensor::empty([blocks, channels], (Kind::Float, grad.device()));
        let cfg = super::launch_1d(blocks);
        let ci = channels as i32;
        let p = partial.data_ptr() as u64;
        let stream = kernels.stream();
        let mut l = stream.launch_builder(f);
        l.arg(&pointers[0]).arg(&pointers[1]).arg(&pointers[2]).arg(&p).arg(&n).arg(&ci).arg(&bf16);
        // SAFETY: `grad` (and `out`, `masked` where given) are live
        // channels-last CUDA tensors of one dtype, shape and strides
        // (checked), 16-byte aligned with C a multiple of the vector;
        // `partial` was just allocated as [blocks, C] float32. All stay
        // alive until later work on this stream.
        super::launched(&name, unsafe { l.launch(cfg) })?;
        grad_shift.copy_(&partial.sum_dim_intlist([0i64].as_slice(), false, Kind::Float));
        Some(())
    })
    .ok()
    .flatten()
    .map_or(-1, |()| 0)
}

/// The gradient of a 2× nearest upsampling for the shim's autograd
/// function: `grad_small` `[N, C, H/2, W/2]` = sums of `grad` `[N, C, H, W]`'s
/// 2×2 blocks (both channels-last). 0 on success.
pub(crate) extern "C" fn sum2x2_callback(grad: *mut torch_sys::C_tensor, grad_small: *mut torch_sys::C_tensor) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: as in the forward.
        let [grad, small] = [grad, grad_small].map(|p| unsafe { lent(p) });
        let (grad, small) = (grad?, small?);
        if !upsampled_residual_fits(&grad, &small) {
            return None;
        }
        let (kernels, name, bf16, vec_len) = kernel_for(&grad, "sum2x2")?;
        let f = kernels.function(&name)?;
        let size = grad.size();
        let (channels, h, w) = (size[1], size[2], size[3]);
        let pixels = small.numel() as i64 / channels.max(1);
        if pixels == 0 {
            return Some(());
        }
        let aligned = [grad.data_ptr() as u64, small.data_ptr() as u64].iter().all(|&p| p % 16 == 0);
        let vec = i32::from(aligned && channels % vec_len == 0);
        let work = pixels * if vec == 1 { channels / vec_len } else { channels };
        let cfg = super::launch_1d(super::blocks_for(work, 132 * 32));
        let (g, o) = (grad.data_ptr() as u64, small.data_ptr() as u64);
        let (ci, hi, wi) = (channels as i32, h as i32, w as i32);
        let stream = kernels.stream();
        let mut l = stream.launch_builder(f);
        l.arg(&g).arg(&o).arg(&pixels).arg(&ci).arg(&hi).arg(&wi).arg(&vec).arg(&bf16);
        // SAFETY: `grad` [N, C, H, W] and `small` [N, C, H/2, W/2] are live
        // channels-last CUDA tensors of one dtype (checked above); vectors
        // only on 16-byte aligned pointers with C a multiple of the vector.
        super::launched(&name, unsafe { l.launch(cfg) }).map(|_| ())
    })
    .ok()
    .flatten()
    .map_or(-1, |()| 0)
}

/// `e` applied to `y` by the kernels (`None`, with the reason counted in
/// [`fallback_count`] and logged once, when they cannot run it: the
/// caller then uses tensor ops). Differentiable for `y`, the residual and
/// a shift that needs a gradient; the affine tensors must not need one.
pub fn apply(y: &Tensor, e: &Epilogue) -> Option<Tensor> {
    if let (true, Some(r)) = (e.residual_upsampled, e.residual) {
        if !upsampled_residual_fits(y, r) {
            // Not readable in place: upsample first, add as it is.
            let up = upsampled_like(r, y);
            return apply(y, &Epilogue { residual: Some(&up), residual_upsampled: false, ..*e });
        }
    }
    let upsampled = e.residual_upsampled && e.residual.is_some();
    let values: Vec<&Tensor> = e.residual.filter(|_| !upsampled).into_iter().collect();
    let mut channels_tensors: Vec<&Tensor> = vec![e.shift];
    channels_tensors.extend(e.scale);
    if let Some((s, b)) = e.residual_affine {
        channels_tensors.extend([s, b]);
    }
    let fixed_need_grad = e.scale.is_some_and(|s| s.requires_grad())
        || e.residual_affine.is_some_and(|(s, b)| s.requires_grad() || b.requires_grad());
    let reason = if fixed_need_grad {
        Some("a scale needs a gradient")
    } else if e.residual_affine.is_some() && e.residual.is_none() {
        Some("a residual affine without a residual")
    } else {
        unsupported(y, &values, &channels_tensors)
    };
    if let Some(reason) = reason {
        if y.device().is_cuda() && FALLBACKS.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!("convolution epilogue ran as tensor ops on CUDA: {reason}");
        }
        return None;
    }
    let (rscale, rshift) = e.residual_affine.unzip();
    let needs_grad = y.requires_grad() || e.shift.requires_grad() || e.residual.is_some_and(|r| r.requires_grad());
    let out = if needs_grad {
        crate::shim::set_epilogue_callbacks(
            forward_callback,
            backward_callback,
            sum2x2_callback,
            bias_backward_callback,
        );
        crate::shim::epilogue_autograd(y, e.scale, e.shift, e.residual, rscale, rshift, e.relu, upsampled)
            .map_err(|err| err.to_string())
    } else {
        let out = y.empty_like();
        let pointers = [y.data_ptr() as u64, ptr(e.residual), out.data_ptr() as u64, 0];
        let up = if upsampled { (y.size()[2], y.size()[3]) } else { (0, 0) };
        launch(false, y, pointers, [e.scale, Some(e.shift), rscale, rshift], e.relu, up)
            .map(|()| out)
            .ok_or_else(|| "the kernel launch failed".to_string())
    };
    match out {
        Ok(out) => Some(out),
        Err(reason) => {
            if FALLBACKS.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("convolution epilogue ran as tensor ops on CUDA: {reason}");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modeling::layers::epilogue;

    /// `t` stored channels-last.
    fn nhwc(t: &Tensor) -> Tensor {
        t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().nan_to_num(0.0, None, None).max().double_value(&[])
    }

    /// The kernels equal libtorch's op-by-op arithmetic (torchvision's
    /// FrozenBatchNorm `y * scale + shift`, `+ shortcut`, ReLU; a conv
    /// bias `y + b`) exactly — outputs, and gradients of `y`, the residual
    /// and a trainable bias — for float32/fp16/bf16 (half types computed in
    /// float32 and rounded once), contiguous and channels-last, with and
    /// without scale, residual, residual affine and ReLU, on the vectorized
    /// path (channels a multiple of 8) and the scalar one (odd sizes). NaN
    /// stays NaN through the ReLU as with `torch.relu`.
    #[test]
    fn gpu_epilogue_equals_libtorch_ops() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_epilogue_equals_libtorch_ops") else {
            return;
        };
        tch::manual_seed(3);
        let before = fallback_count();
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            for channels_last in [false, true] {
                for shape in [[2i64, 64, 10, 12], [3, 5, 7, 9]] {
                    // (scale, residual, residual affine, relu)
                    for (scaled, with_residual, residual_affine, relu) in [
                        (false, false, false, false),
                        (false, false, false, true),
                        (false, true, false, false),
                        (true, false, false, true),
                        (true, true, false, true),
                        (true, true, true, true),
                        (true, true, true, false),
                    ] {
                        let what = format!(
                            "{kind:?} {shape:?} channels_last={channels_last} scale={scaled} \\
                             residual={with_residual} affine={residual_affine} relu={relu}"
                        );
                        let make = || {
                            let t = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
                            let t = if channels_last { nhwc(&t) } else { t };
                            t.set_requires_grad(true)
                        };
                        let (y, r) = (make(), make());
                        let _ = y.detach().get(0).get(0).get(0).get(0).fill_(f64::NAN);
                        let c = shape[1];
                        let per_channel = || Tensor::randn([c], (Kind::Float, device));
                        let (scale, rscale, rshift) = (per_channel(), per_channel(), per_channel());
                        // A trainable bias when unscaled (a convolution's), fixed otherwise.
                        let shift = per_channel().set_requires_grad(!scaled);
                        let e = Epilogue {
                            scale: scaled.then_some(&scale),
                            shift: &shift,
                            residual: with_residual.then_some(&r),
                            residual_upsampled: false,
                            residual_affine: residual_affine.then_some((&rscale, &rshift)),
                            relu,
                        };
                        let out = apply(&y, &e).expect("the kernel applies");
                        assert_eq!(out.stride(), y.stride(), "{what}: layout kept");
                        // libtorch's ops in float32, op by op.
                        let pc = |t: &Tensor| t.detach().reshape([1, -1, 1, 1]);
                        let yf = y.detach().to_kind(Kind::Float);
                        let mut want = if scaled { yf * pc(&scale) + pc(&shift) } else { yf + pc(&shift) };
                        if with_residual {
                            let rf = r.detach().to_kind(Kind::Float);
                            want = if residual_affine { want + (rf * pc(&rscale) + pc(&rshift)) } else { want + rf };
                        }
                        let want = if relu { want.relu() } else { want }.to_kind(kind).to_kind(Kind::Float);
                        assert!(out.get(0).get(0).get(0).get(0).double_value(&[]).is_nan(), "{what}: NaN kept");
                        assert_eq!(max_abs(&(out.to_kind(Kind::Float) - &want)), 0.0, "{what}: values");
                        // Tensor-op fallback of the layer: the same values.
                        let ops = tch::no_grad(|| {
                            let cpu = |t: &Tensor| t.detach().to_device(tch::Device::Cpu);
                            let (yc, rc, sc, bc) = (cpu(&y), cpu(&r), cpu(&scale), cpu(&shift));
                            let (rsc, rbc) = (cpu(&rscale), cpu(&rshift));
                            let ec = Epilogue {
                                scale: scaled.then_some(&sc),
                                shift: &bc,
                                residual: with_residual.then_some(&rc),
                                residual_upsampled: false,
                                residual_affine: residual_affine.then_some((&rsc, &rbc)),
                                relu,
                            };
                            epilogue(&yc.to_kind(Kind::Float), &ec)
                        });
                        if kind == Kind::Float {
                            let d = max_abs(&(ops.to_device(device) - &want));
                            assert_eq!(d, 0.0, "{what}: tensor-op path");
                        }
                        // Gradients.
                        let g = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
                        let mut inputs: Vec<&Tensor> = vec![&y];
                        if with_residual {
                            inputs.push(&r);
                        }
                        if !scaled {
                            inputs.push(&shift);
                        }
                        let grads = Tensor::run_backward(&[(&out * &g).sum(Kind::Float)], &inputs, false, false);
                        let gf = g.to_kind(Kind::Float);
                        // threshold_backward: zero where out <= 0 (NaN passes).
                        let m = if relu { gf.where_scalarother(&want.le(0.0).logical_not(), 0.0) } else { gf };
                        let m_rounded = m.to_kind(kind).to_kind(Kind::Float);
                        let gy_want = if scaled { &m * pc(&scale) } else { m.shallow_clone() }.to_kind(kind);
                        assert_eq!(
                            max_abs(&(grads[0].to_kind(Kind::Float) - gy_want.to_kind(Kind::Float))),
                            0.0,
                            "{what}: dy"
                        );
                        if with_residual {
                            let gr_want =
                                if residual_affine { &m * pc(&rscale) } else { m.shallow_clone() }.to_kind(kind);
                            let d = max_abs(&(grads[1].to_kind(Kind::Float) - gr_want.to_kind(Kind::Float)));
                            assert_eq!(d, 0.0, "{what}: d residual");
                        }
                        if !scaled {
                            let gb = grads.last().expect("bias gradient");
                            let want_b = m_rounded.sum_dim_intlist([0, 2, 3].as_slice(), false, Kind::Float);
                            let tol = 1e-4 * max_abs(&want_b).max(1.0);
                            assert!(max_abs(&(gb - &want_b)) <= tol, "{what}: d bias");
                        }
                    }
                }
            }
        }
        assert_eq!(fallback_count(), before, "every case ran on the kernels");
    }

    /// A residual read 2× nearest-upsampled in place (the FPN's top-down
    /// sum) gives exactly libtorch's `upsample_nearest2d` + the op-by-op
    /// arithmetic, and its gradient exactly libtorch's
    /// `upsample_nearest2d_backward` of the full-size residual gradient:
    /// float32/fp16/bf16, vectorized and scalar channel counts, with and
    /// without a scale; NCHW tensors and odd sizes take an explicit
    /// upsampling first (still the kernels).
    #[test]
    fn gpu_upsampled_residual_equals_libtorch_upsample() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_upsampled_residual_equals_libtorch_upsample") else {
            return;
        };
        tch::manual_seed(5);
        let before = fallback_count();
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            for (shape, channels_last) in
                [([2i64, 64, 10, 12], true), ([2, 5, 6, 8], true), ([2, 16, 8, 6], false), ([1, 8, 7, 9], true)]
            {
                for scaled in [false, true] {
                    let what = format!("{kind:?} {shape:?} channels_last={channels_last} scale={scaled}");
                    let small = [shape[0], shape[1], shape[2] / 2, (shape[3] + 1) / 2];
                    let make = |size: [i64; 4]| {
                        let t = Tensor::randn(size, (Kind::Float, device)).to_kind(kind);
                        let t = if channels_last { nhwc(&t) } else { t };
                        t.set_requires_grad(true)
                    };
                    let (y, r) = (make(shape), make(small));
                    let c = shape[1];
                    let scale = Tensor::randn([c], (Kind::Float, device));
                    let shift = Tensor::randn([c], (Kind::Float, device)).set_requires_grad(!scaled);
                    let e = Epilogue {
                        scale: scaled.then_some(&scale),
                        shift: &shift,
                        residual: Some(&r),
                        residual_upsampled: true,
                        residual_affine: None,
                        relu: false,
                    };
                    let out = apply(&y, &e).expect("the kernel applies");
                    let pc = |t: &Tensor| t.detach().reshape([1, -1, 1, 1]);
                    let yf = y.detach().to_kind(Kind::Float);
                    let up = upsampled_like(&r.detach(), &y).to_kind(Kind::Float);
                    let want = if scaled { yf * pc(&scale) + pc(&shift) } else { yf + pc(&shift) } + up;
                    let want = want.to_kind(kind).to_kind(Kind::Float);
                    assert_eq!(max_abs(&(out.to_kind(Kind::Float) - &want)), 0.0, "{what}: values");
                    let g = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
                    let grads = Tensor::run_backward(&[(&out * &g).sum(Kind::Float)], &[&r], false, false);
                    let want_r = Tensor::upsample_nearest2d_backward(&g, &shape[2..], small, None, None);
                    let d = max_abs(&(grads[0].to_kind(Kind::Float) - want_r.to_kind(Kind::Float)));
                    assert_eq!(d, 0.0, "{what}: d residual");
                    assert_eq!(grads[0].size(), small, "{what}: residual gradient shape");
                }
            }
        }
        assert_eq!(fallback_count(), before, "every case ran on the kernels");
    }

    /// Every convolution epilogue of the model (frozen-BN ResNet blocks,
    /// FPN, RPN head, mask head) takes the fused kernels in a bf16
    /// channels-last training forward and backward on CUDA.
    #[test]
    fn gpu_model_epilogues_all_take_the_kernels() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_model_epilogues_all_take_the_kernels") else {
            return;
        };
        let mut config = crate::Config::default();
        config.model.norm = crate::config::NormKind::FrozenBn;
        config.model.trainable_layers = 3;
        let mut model = crate::MaskRcnn::new(&config, device).expect("model");
        model.to_channels_last();
        let before = fallback_count();
        let images = nhwc(&Tensor::rand([2, 3, 256, 320], (Kind::Float, device)));
        let loss = {
            let _autocast = crate::shim::AutocastGuard::new(Some(crate::shim::AutocastDtype::Bf16));
            let features = model.backbone.forward(&images, true);
            let (obj, reg) = model.rpn.head.forward(&features);
            let mut total = Tensor::zeros([], (Kind::Float, device));
            for t in features.iter().chain(&obj).chain(&reg) {
                total += t.to_kind(Kind::Float).mean(Kind::Float);
            }
            total
        };
        loss.backward();
        assert_eq!(fallback_count(), before, "an epilogue ran as tensor ops");
    }
}
