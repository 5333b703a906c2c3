//! ResNet's stem max-pooling (3×3, stride 2, padding 1) on channels-last
//! tensors, for when no gradient is needed (a frozen stem, inference).
//! libtorch's channels-last max-pool took about five times the time its
//! memory traffic needs (1.1 ms of a 70 ms bs16 training step); here a
//! thread takes one 16-byte vector of channels of one output pixel and
//! reads its 3×3 window. Values are compared as libtorch compares them
//! (NaN wins), so the result is exact in every dtype.

use cudarc::driver::PushKernelArg;
use tch::{Device, Tensor};

pub(crate) const SOURCE: &str = r#"
// max(a, b) as libtorch's max-pool takes it: a NaN wins.
__device__ __forceinline__ bool takes(float v, float m) { return v > m || v != v; }

template <typename T> __device__ __forceinline__ float value(T v, int bf16);
template <> __device__ __forceinline__ float value<float>(float v, int) { return v; }
template <> __device__ __forceinline__ float value<unsigned short>(unsigned short v, int bf16) {
  if (bf16) return __uint_as_float(((unsigned int)v) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}

// x [N, H, W, C] → out [N, OH, OW, C] (channels-last), VEC channels per
// thread (C a multiple of VEC, 16-byte aligned pointers).
template <typename T, int VEC>
__device__ __forceinline__ void max_pool(const T* __restrict__ x, T* __restrict__ out, int n, int h, int w, int c,
                                         int oh, int ow, int bf16) {
  union V { uint4 u; T t[VEC]; };
  int groups = c / VEC;
  long long total = (long long)n * oh * ow * groups;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    int g = (int)(i % groups);
    long long p = i / groups;
    int ox = (int)(p % ow);
    long long rest = p / ow;
    int oy = (int)(rest % oh);
    int b = (int)(rest / oh);
    V best;
    float m[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) m[k] = 0.0f;  // set by the first value (every window has one)
    bool first = true;
    for (int dy = 0; dy < 3; ++dy) {
      int y = oy * 2 - 1 + dy;
      if (y < 0 || y >= h) continue;
      for (int dx = 0; dx < 3; ++dx) {
        int xx = ox * 2 - 1 + dx;
        if (xx < 0 || xx >= w) continue;
        V v;
        v.u = ((const uint4*)x)[(((long long)b * h + y) * w + xx) * groups + g];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float f = value<T>(v.t[k], bf16);
          if (first || takes(f, m[k])) { m[k] = f; best.t[k] = v.t[k]; }
        }
        first = false;
      }
    }
    ((uint4*)out)[i] = best.u;
  }
}

extern "C" __global__ void max_pool_3x3s2_f32(const float* x, float* out, int n, int h, int w, int c, int oh, int ow,
                                              int bf16) {
  max_pool<float, 4>(x, out, n, h, w, c, oh, ow, bf16);
}
extern "C" __global__ void max_pool_3x3s2_half(const unsigned short* x, unsigned short* out, int n, int h, int w,
                                               int c, int oh, int ow, int bf16) {
  max_pool<unsigned short, 8>(x, out, n, h, w, c, oh, ow, bf16);
}
"#;

/// `x` `[N, C, H, W]` channels-last (float32/fp16/bf16, CUDA) max-pooled
/// 3×3 with stride 2 and padding 1 → `[N, C, ⌊(H−1)/2⌋+1, ⌊(W−1)/2⌋+1]`,
/// channels-last, without autograd. `None` when the kernel does not apply
/// (another layout or dtype, a channel count not a multiple of the vector,
/// no kernels): the caller uses libtorch's.
pub fn max_pool_3x3_stride2(x: &Tensor) -> Option<Tensor> {
    let Device::Cuda(index) = x.device() else { return None };
    let size = x.size();
    if size.len() != 4 {
        return None;
    }
    let (n, c, h, w) = (size[0], size[1], size[2], size[3]);
    let (suffix, bf16, vec) = super::dtype_suffix(x.kind())?;
    let name = if suffix == "f32" { "max_pool_3x3s2_f32" } else { "max_pool_3x3s2_half" };
    if !super::is_channels_last(x) || c % vec != 0 || !(x.data_ptr() as usize).is_multiple_of(16) || n * h * w * c == 0
    {
        return None;
    }
    let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let kernels = super::device_kernels(index)?;
    let f = kernels.function(name)?;
    let out = Tensor::empty([n, oh, ow, c], (x.kind(), x.device())).permute([0, 3, 1, 2]);
    let total = n * oh * ow * (c / vec);
    let cfg = super::launch_1d(super::blocks_for(total, 1 << 20));
    let dims = [n, h, w, c, oh, ow].map(|d| d as i32);
    let (src, dst) = (x.data_ptr() as u64, out.data_ptr() as u64);
    let stream = kernels.stream();
    let mut l = stream.launch_builder(f);
    l.arg(&src).arg(&dst);
    for d in &dims {
        l.arg(d);
    }
    l.arg(&bf16);
    // SAFETY: `x` is a live channels-last CUDA tensor [N, C, H, W] of the
    // kernel's dtype with C a multiple of the vector and a 16-byte aligned
    // start; `out` was just allocated as channels-last [N, C, OH, OW] of
    // the same dtype. Both stay alive until later work on this stream.
    super::launched(name, unsafe { l.launch(cfg) })?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Equal to libtorch's max_pool2d (3×3, stride 2, padding 1) bit for
    /// bit, NaN included, for float32/fp16/bf16 and even and odd sizes.
    #[test]
    fn gpu_stem_max_pool_equals_libtorch() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_stem_max_pool_equals_libtorch") else {
            return;
        };
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            for shape in [[2i64, 64, 10, 12], [1, 16, 7, 9]] {
                let x = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
                let x = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
                let _ = x.get(0).get(1).get(2).get(3).fill_(f64::NAN);
                let ours = max_pool_3x3_stride2(&x).expect("the kernel applies");
                let theirs = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
                assert_eq!(ours.size(), theirs.size(), "{kind:?} {shape:?}: shape");
                let (a, b) = (ours.to_kind(Kind::Float), theirs.to_kind(Kind::Float));
                assert!(a.isnan().equal(&b.isnan()), "{kind:?} {shape:?}: NaN positions");
                let d = (a.nan_to_num(0.0, None, None) - b.nan_to_num(0.0, None, None)).abs().max();
                assert_eq!(d.double_value(&[]), 0.0, "{kind:?} {shape:?}: values");
            }
        }
    }
}
