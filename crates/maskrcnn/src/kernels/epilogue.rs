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

use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = concat!(
    super::half_conversions!(),
    r#"
// ReLU (when `relu`) that keeps NaN as torch.relu does, so a diverged run
// is still noticed.
__device__ __forceinline__ float act(float v, int relu) { return relu && !(v != v) ? fmaxf(v, 0.0f) : v; }

// Values of one memory layout: the channel of value i is (i / inner) %
// channels (inner 1 for channels-last, H·W for contiguous NCHW). With
// `vec`, each thread takes 16-byte vectors of VEC values: of one pixel on
// channels-last, of one channel plane on NCHW (the host checks that
// channels resp. H·W is a multiple of VEC and the pointers are aligned).
// BODY(k, c) handles value k of the vector (or 0 in the scalar tail) of
// channel c; LOADS and STORES move the vectors.
#define FOR_EACH_VALUE(T, VEC, LOADS, BODY, STORES)                                                          \
  long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;                                      \
  long long stride = (long long)blockDim.x * gridDim.x;                                                    \
  long long nv = vec ? n / VEC : 0;                                                                        \
  int step = inner == 1 ? 1 : 0;                                                                           \
  for (long long v = first; v < nv; v += stride) {                                                         \
    const int width = VEC;                                                                                 \
    int c0 = (int)((v * VEC / inner) % channels);                                                          \
    LOADS                                                                                                  \
    _Pragma("unroll") for (int k = 0; k < VEC; ++k) { int c = c0 + k * step; BODY }                        \
    STORES                                                                                                 \
  }                                                                                                        \
  for (long long v = nv * VEC + first; v < n; v += stride) {                                               \
    const int width = 1;                                                                                   \
    int c0 = (int)((v / inner) % channels);                                                                \
    LOADS                                                                                                  \
    { const int k = 0; int c = c0; BODY }                                                                  \
    STORES                                                                                                 \
  }

// Moves `width` values at index v·width (one vector, or one value in the
// tail); a null source loads nothing.
#define LOAD_VALUES(T, VEC, buf, src)                                                                      \
  union { uint4 u; T t[VEC]; } buf;                                                                        \
  if (src) { if (width == VEC) buf.u = ((const uint4*)(src))[v]; else buf.t[0] = (src)[v]; }
#define STORE_VALUES(T, VEC, buf, dst)                                                                     \
  if (width == VEC) ((uint4*)(dst))[v] = buf.u; else (dst)[v] = buf.t[0];

#define EPILOGUE_ARGS                                                                                       \
  const float* __restrict__ scale, const float* __restrict__ shift, const float* __restrict__ rscale,      \
      const float* __restrict__ rshift, long long n, int channels, long long inner, int vec, int relu, int bf16

#define EPILOGUE(NAME, T, VEC, LOAD, STORE)                                                                  \
  extern "C" __global__ void NAME##_forward(const T* __restrict__ y, const T* __restrict__ residual,        \
      T* __restrict__ out, EPILOGUE_ARGS) {                                                                \
    FOR_EACH_VALUE(T, VEC,                                                                                 \
      LOAD_VALUES(T, VEC, a, y) LOAD_VALUES(T, VEC, b, residual) union { uint4 u; T t[VEC]; } o;, \
      float s = LOAD(&a.t[k]);                                                                             \
      s = scale ? __fadd_rn(__fmul_rn(s, scale[c]), shift[c]) : __fadd_rn(s, shift[c]);                   \
      if (residual) {                                                                                      \
        float r = LOAD(&b.t[k]);                                                                           \
        if (rscale) r = __fadd_rn(__fmul_rn(r, rscale[c]), rshift[c]);                                     \
        s = __fadd_rn(s, r);                                                                               \
      }                                                                                                    \
      o.t[k] = STORE(act(s, relu));,                                                                       \
      STORE_VALUES(T, VEC, o, out))                                                                        \
  }                                                                                                        \
  extern "C" __global__ void NAME##_backward(const T* __restrict__ grad, const T* __restrict__ out,         \
      T* __restrict__ grad_y, T* __restrict__ grad_residual, EPILOGUE_ARGS) {                              \
    FOR_EACH_VALUE(T, VEC,                                                                                 \
      LOAD_VALUES(T, VEC, g, grad) LOAD_VALUES(T, VEC, o, out)                               \
      union { uint4 u; T t[VEC]; } gy; union { uint4 u; T t[VEC]; } gr;,                                   \
      float m = LOAD(&g.t[k]);                                                                             \
      if (out && LOAD(&o.t[k]) <= 0.0f) m = 0.0f;                                                         \
      gy.t[k] = STORE(scale ? __fmul_rn(m, scale[c]) : m);                                                 \
      gr.t[k] = STORE(rscale ? __fmul_rn(m, rscale[c]) : m);,                                              \
      STORE_VALUES(T, VEC, gy, grad_y) if (grad_residual) { STORE_VALUES(T, VEC, gr, grad_residual) })     \
  }

#define LOAD_F32(p) load_val(p)
#define LOAD_HALF(p) load_val(p, bf16)
#define STORE_F32(v) (v)
#define STORE_HALF(v) store_half(v, bf16)
EPILOGUE(epilogue_f32, float, 4, LOAD_F32, STORE_F32)
EPILOGUE(epilogue_f16, unsigned short, 8, LOAD_HALF, STORE_HALF)
EPILOGUE(epilogue_bf16, unsigned short, 8, LOAD_HALF, STORE_HALF)
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
    /// Shaped as `y`: added after its own `rscale`/`rshift`.
    pub residual: Option<&'a Tensor>,
    /// The residual's fixed normalization (`scale`, `shift`), if any.
    pub residual_affine: Option<(&'a Tensor, &'a Tensor)>,
    /// ReLU at the end (else the identity).
    pub relu: bool,
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
    let s = t.stride();
    // Channels-last: strides (H·W·C, 1, W·C, C).
    let (c, w) = (size[1], size[3]);
    (s[1] == 1 && s[3] == c && s[2] == w * c && (size[0] == 1 || s[0] == size[2] * w * c)).then_some(1)
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
fn launch(backward: bool, like: &Tensor, pointers: [u64; 4], affine: [Option<&Tensor>; 4], relu: bool) -> Option<()> {
    let Device::Cuda(index) = like.device() else { return None };
    let inner = layout(like)?;
    let (suffix, bf16, vec_len) = match like.kind() {
        Kind::Float => ("f32", 0i32, 4i64),
        Kind::Half => ("f16", 0, 8),
        Kind::BFloat16 => ("bf16", 1, 8),
        _ => return None,
    };
    let name = format!("epilogue_{suffix}_{}", if backward { "backward" } else { "forward" });
    let kernels = super::device_kernels(index)?;
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
    let blocks = ((work + 255) / 256).clamp(1, 132 * 32) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
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
    // SAFETY: the four value pointers (null where optional) address live
    // CUDA tensors of `n` values with `like`'s dtype, shape and strides,
    // dense in the layout `inner` describes (checked by `unsupported`);
    // per-channel pointers (null where optional) hold `channels` float32
    // values. Vectors are used only on 16-byte aligned pointers with whole
    // vectors per pixel or plane. All stay alive until later work on this
    // stream.
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
    relu: i32,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: the shim lends live tensors (the optional ones may be null).
        let [y, scale, shift, residual, rscale, rshift, out] =
            [y, scale, shift, residual, rscale, rshift, out].map(|p| unsafe { lent(p) });
        let (y, out) = (y?, out?);
        let values: Vec<&Tensor> = [residual.as_deref(), Some(&*out)].into_iter().flatten().collect();
        let per_channel: Vec<&Tensor> =
            [scale.as_deref(), shift.as_deref(), rscale.as_deref(), rshift.as_deref()].into_iter().flatten().collect();
        if shift.is_none() || unsupported(&y, &values, &per_channel).is_some() {
            return None;
        }
        let affine = [scale.as_deref(), shift.as_deref(), rscale.as_deref(), rshift.as_deref()];
        let pointers = [y.data_ptr() as u64, ptr(residual.as_deref()), out.data_ptr() as u64, 0];
        launch(false, &y, pointers, affine, relu != 0)
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
        launch(true, &grad, pointers, [scale.as_deref(), None, rscale.as_deref(), None], false)
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
    let values: Vec<&Tensor> = e.residual.into_iter().collect();
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
        crate::shim::set_epilogue_callbacks(forward_callback, backward_callback);
        crate::shim::epilogue_autograd(y, e.scale, e.shift, e.residual, rscale, rshift, e.relu)
            .map_err(|err| err.to_string())
    } else {
        let out = y.empty_like();
        let pointers = [y.data_ptr() as u64, ptr(e.residual), out.data_ptr() as u64, 0];
        launch(false, y, pointers, [e.scale, Some(e.shift), rscale, rshift], e.relu)
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
