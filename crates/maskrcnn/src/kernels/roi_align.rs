//! RoIAlign forward and backward as CUDA kernels: torchvision's
//! `roi_align_forward_kernel_impl` / `roi_align_backward_kernel_impl` (same
//! per-sample arithmetic, so the same results), generalized to several
//! pyramid levels at once (each RoI reads the level the pooler assigned it,
//! on the device) and to feature maps of any strides and dtype: channels-last
//! fp16/bf16 FPN outputs are read in place, accumulated in float32, and the
//! output is written in the features' dtype and memory format (what
//! torchvision's autocast wrapper returns). Without gradients the forward
//! launches directly (mask targets, inference); with gradients both run
//! inside an autograd function of the C++ shim, which calls back into
//! [`multilevel_forward_callback`] / [`multilevel_backward_callback`].

use cudarc::driver::PushKernelArg;
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = concat!(
    super::half_conversions!(),
    r#"
// torchvision's bilinear_interpolate(_gradient): the rows (ys) and columns
// (xs) of the four neighbours of (y, x) in a height × width map and their
// weights (low-low, low-high, high-low, high-high); false outside the map.
__device__ bool bilinear_corners(int height, int width, float y, float x, int ys[2], int xs[2], float w[4]) {
  if (y < -1.0f || y > height || x < -1.0f || x > width) return false;
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int y_low = (int)y, x_low = (int)x, y_high, x_high;
  if (y_low >= height - 1) { y_high = y_low = height - 1; y = (float)y_low; } else { y_high = y_low + 1; }
  if (x_low >= width - 1) { x_high = x_low = width - 1; x = (float)x_low; } else { x_high = x_low + 1; }
  float ly = y - y_low, lx = x - x_low, hy = 1.0f - ly, hx = 1.0f - lx;
  ys[0] = y_low; ys[1] = y_high; xs[0] = x_low; xs[1] = x_high;
  w[0] = hy * hx; w[1] = hy * lx; w[2] = ly * hx; w[3] = ly * lx;
  return true;
}

// torchvision's sampling grid over one output bin.
struct Cell {
  int grid_h, grid_w;
  float y0, x0, step_h, step_w, count;
};

// Sampling grid of bin (ph, pw) of RoI `r` (batch, x1, y1, x2, y2) on a map
// at `spatial_scale`, as torchvision computes it (plane left to the caller).
__device__ Cell bin_grid(const float* r, float spatial_scale, int ph, int pw, int pooled_height, int pooled_width,
    int sampling_ratio, int aligned) {
  float offset = aligned ? 0.5f : 0.0f;
  float start_w = r[1] * spatial_scale - offset, start_h = r[2] * spatial_scale - offset;
  float end_w = r[3] * spatial_scale - offset, end_h = r[4] * spatial_scale - offset;
  float roi_w = end_w - start_w, roi_h = end_h - start_h;
  if (!aligned) { roi_w = fmaxf(roi_w, 1.0f); roi_h = fmaxf(roi_h, 1.0f); }
  float bin_h = roi_h / pooled_height, bin_w = roi_w / pooled_width;
  Cell cell;
  cell.grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_h / pooled_height);
  cell.grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_w / pooled_width);
  cell.count = fmaxf((float)(cell.grid_h * cell.grid_w), 1.0f);
  cell.y0 = start_h + ph * bin_h;
  cell.x0 = start_w + pw * bin_w;
  cell.step_h = bin_h;
  cell.step_w = bin_w;
  return cell;
}

// Sample (iy, ix) of the cell's grid, as torchvision computes it.
__device__ float sample_y(const Cell& c, int iy) { return c.y0 + ((float)iy + 0.5f) * c.step_h / (float)c.grid_h; }
__device__ float sample_x(const Cell& c, int ix) { return c.x0 + ((float)ix + 0.5f) * c.step_w / (float)c.grid_w; }

// Multi-level RoIAlign over feature maps of any strides (NCHW or NHWC) and
// dtype. One thread per output value, channels fastest (coalesced on
// channels-last maps and outputs); RoI k reads level levels[k].
struct Level {
  unsigned long long data;
  long long sn, sc, sh, sw;
  int height, width;
  float scale;
  int pad;
};
struct Levels {
  Level l[5];
  int count;
};


// Output value `index` (channels fastest) of a multi-level pooling: where
// it goes in the output and, when its RoI has a level (a non-finite box has
// none), the level, the feature plane's offset in it and the sampling grid.
struct MlBin {
  long long out;
  Level L;
  long long plane;
  Cell cell;
};

__device__ bool ml_bin(long long index, const Levels& lv, int channels, int pooled_height, int pooled_width,
    int sampling_ratio, int aligned, const float* rois, const long long* levels, long long so_k, long long so_c,
    long long so_y, long long so_x, MlBin* b) {
  int c = index % channels;
  long long t = index / channels;
  int pw = t % pooled_width;
  t /= pooled_width;
  int ph = t % pooled_height;
  long long k = t / pooled_height;
  b->out = k * so_k + c * so_c + ph * so_y + pw * so_x;
  const long long lvl = levels[k];
  if (lvl < 0 || lvl >= lv.count) return false;
  const float* r = rois + k * 5;
  b->L = lv.l[lvl];
  b->cell = bin_grid(r, b->L.scale, ph, pw, pooled_height, pooled_width, sampling_ratio, aligned);
  b->plane = (long long)(int)r[0] * b->L.sn + (long long)c * b->L.sc;
  return true;
}

// Runs the body for every sample of bin `b` inside its map, with the corner
// rows `ys`, columns `xs` and weights `w` set (torchvision's loop order).
#define FOR_EACH_SAMPLE(b, ...)                                                                                \
  for (int iy = 0; iy < b.cell.grid_h; iy++) {                                                               \
    float y = sample_y(b.cell, iy);                                                                          \
    for (int ix = 0; ix < b.cell.grid_w; ix++) {                                                             \
      int ys[2], xs[2];                                                                                      \
      float w[4];                                                                                            \
      if (bilinear_corners(b.L.height, b.L.width, y, sample_x(b.cell, ix), ys, xs, w)) { __VA_ARGS__ }       \
    }                                                                                                        \
  }

#define ML_ARGS                                                                                                \
  long long nthreads, Levels lv, int channels, int pooled_height, int pooled_width, int sampling_ratio,      \
      int aligned, const float *rois, const long long *levels
#define ML_BIN(b)                                                                                              \
  ml_bin(index, lv, channels, pooled_height, pooled_width, sampling_ratio, aligned, rois, levels, so_k, so_c, \
         so_y, so_x, &b)
#define ML_THREADS                                                                                             \
  for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < nthreads;                 \
       index += (long long)blockDim.x * gridDim.x)

// A RoI of no level pools zeros, as torchvision's per-level masks leave it.
#define ML_FORWARD(NAME, T, LOAD, STORE)                                                                       \
  extern "C" __global__ void NAME(ML_ARGS, T* out, long long so_k, long long so_c, long long so_y,           \
      long long so_x, int bf16) {                                                                            \
    ML_THREADS {                                                                                             \
      MlBin b;                                                                                               \
      if (!ML_BIN(b)) { out[b.out] = STORE(0.0f); continue; }                                                \
      const T* in = (const T*)b.L.data + b.plane;                                                            \
      float acc = 0.0f;                                                                                      \
      FOR_EACH_SAMPLE(b, acc += (w[0] * LOAD(in + ys[0] * b.L.sh + xs[0] * b.L.sw)                           \
                                 + w[1] * LOAD(in + ys[0] * b.L.sh + xs[1] * b.L.sw)                         \
                                 + w[2] * LOAD(in + ys[1] * b.L.sh + xs[0] * b.L.sw)                         \
                                 + w[3] * LOAD(in + ys[1] * b.L.sh + xs[1] * b.L.sw));)                      \
      out[b.out] = STORE(acc / b.cell.count);                                                                \
    }                                                                                                        \
  }

// ML_FORWARD for channels-last fp16/bf16 maps and output whose channel rows
// are 16-byte aligned (channels % 8 == 0): one thread per eight channels of
// an output bin, every load and the store 16 bytes wide (the bin's sampling
// geometry computed once for the eight); per channel the same arithmetic.
extern "C" __global__ void roi_align_multilevel_forward_half_x8(ML_ARGS, unsigned short* out, long long so_k,
    long long so_c, long long so_y, long long so_x, int bf16) {
  const int groups = channels / 8;
  ML_THREADS {
    const int c = (int)(index % groups) * 8;
    long long t = index / groups;
    const int pw = t % pooled_width;
    t /= pooled_width;
    const int ph = t % pooled_height;
    const long long k = t / pooled_height;
    float acc[8];
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    float count = 1.0f;
    const long long lvl = levels[k];
    if (lvl >= 0 && lvl < lv.count) {
      MlBin b;
      b.L = lv.l[lvl];
      const float* r = rois + k * 5;
      b.cell = bin_grid(r, b.L.scale, ph, pw, pooled_height, pooled_width, sampling_ratio, aligned);
      count = b.cell.count;
      const unsigned short* in = (const unsigned short*)b.L.data + (long long)(int)r[0] * b.L.sn + c;
      FOR_EACH_SAMPLE(b, {
        uint4 v[4];
        for (int q = 0; q < 4; q++) v[q] = *(const uint4*)(in + ys[q / 2] * b.L.sh + xs[q % 2] * b.L.sw);
        const unsigned short *v0 = (const unsigned short*)&v[0], *v1 = (const unsigned short*)&v[1],
                             *v2 = (const unsigned short*)&v[2], *v3 = (const unsigned short*)&v[3];
        for (int j = 0; j < 8; j++)
          acc[j] += (w[0] * load_val(v0 + j, bf16) + w[1] * load_val(v1 + j, bf16)
                     + w[2] * load_val(v2 + j, bf16) + w[3] * load_val(v3 + j, bf16));
      })
    }
    uint4 o;
    unsigned short* h = (unsigned short*)&o;
    for (int j = 0; j < 8; j++) h[j] = store_half(acc[j] / count, bf16);
    *(uint4*)(out + k * so_k + c * so_c + ph * so_y + pw * so_x) = o;
  }
}

// Gradients accumulate in float32 maps described by `lv` (the shim's
// buffers, strided as the features). One block per (RoI, group of TILE_C
// channels): the RoI's samples are first summed in shared memory over its
// footprint on its level (fh × fw pixels, up to `tile_pixels`), then added
// to the map with one atomic per touched value. Adding every sample with a
// global atomic, as torchvision does, contends badly where sampled RoIs
// repeat one object (the mask head's positives): at 14 × 14 bins × 4
// samples × 4 corners over a footprint of ~10 × 10 pixels, each address
// took ~30 atomics from every RoI. A bigger footprint (or tile_pixels 0)
// adds straight to the map. Zero gradients (slots a loss masks out:
// negatives and padding in the mask head) add nothing and are skipped, a
// block whose gradients are all zero at once; NaN still goes in.
#define TILE_C 8
#define TILE_PIXELS 1024
// Hopper adds four floats with one atomic (global memory, 16-byte aligned).
#if __CUDA_ARCH__ >= 900
#define VECTOR_ATOMICS 1
__device__ __forceinline__ void add4(float* p, float4 v) { atomicAdd((float4*)p, v); }
#else
#define VECTOR_ATOMICS 0
__device__ __forceinline__ void add4(float* p, float4 v) {
  atomicAdd(p, v.x); atomicAdd(p + 1, v.y); atomicAdd(p + 2, v.z); atomicAdd(p + 3, v.w);
}
#endif
#define ML_BACKWARD(NAME, T, LOAD)                                                                             \
  extern "C" __global__ void __launch_bounds__(256) NAME(long long rois_count, Levels lv, int channels,        \
      int pooled_height, int pooled_width, int sampling_ratio, int aligned, const float *rois,               \
      const long long *levels, const T* grad_out, long long so_k, long long so_c, long long so_y,             \
      long long so_x, int bf16, int tile_pixels) {                                                           \
    __shared__ float tile[TILE_PIXELS * TILE_C];                                                             \
    const int chunks = (channels + TILE_C - 1) / TILE_C;                                                     \
    const long long k = blockIdx.x / chunks;                                                                 \
    const int c0 = (blockIdx.x % chunks) * TILE_C;                                                           \
    if (k >= rois_count) return;                                                                             \
    const long long lvl = levels[k];                                                                         \
    if (lvl < 0 || lvl >= lv.count) return;                                                                  \
    MlBin b;                                                                                                 \
    b.L = lv.l[lvl];                                                                                         \
    const float* r = rois + k * 5;                                                                           \
    const int items = pooled_height * pooled_width * TILE_C;                                                 \
    const T* g_roi = grad_out + k * so_k;                                                                    \
    int any = 0;                                                                                             \
    for (int i = threadIdx.x; i < items; i += blockDim.x) {                                                  \
      const int c = c0 + i % TILE_C, bin = i / TILE_C;                                                      \
      if (c < channels)                                                                                      \
        any |= LOAD(g_roi + c * so_c + (bin / pooled_width) * so_y + (bin % pooled_width) * so_x) != 0.0f;  \
    }                                                                                                        \
    if (!__syncthreads_or(any)) return;                                                                      \
    /* Rows and columns any corner of the RoI's samples can touch, with a  \
       pixel of margin for rounding (a corner outside still goes straight  \
       to the map). Clamped as floats: the box may be huge. */             \
    const Cell whole = bin_grid(r, b.L.scale, 0, 0, pooled_height, pooled_width, sampling_ratio, aligned);   \
    const float top = (float)(b.L.height - 1), right = (float)(b.L.width - 1);                              \
    const int y_lo = (int)fminf(fmaxf(floorf(whole.y0) - 1.0f, 0.0f), top);                                  \
    const int x_lo = (int)fminf(fmaxf(floorf(whole.x0) - 1.0f, 0.0f), right);                                \
    const int fh = (int)fminf(fmaxf(floorf(whole.y0 + whole.step_h * pooled_height) + 2.0f, 0.0f), top)    \
                   - y_lo + 1;                                                                               \
    const int fw = (int)fminf(fmaxf(floorf(whole.x0 + whole.step_w * pooled_width) + 2.0f, 0.0f), right)    \
                   - x_lo + 1;                                                                               \
    const bool tiled = fh > 0 && fw > 0 && fh * fw <= min(tile_pixels, TILE_PIXELS);                         \
    if (tiled) {                                                                                             \
      for (int i = threadIdx.x; i < fh * fw * TILE_C; i += blockDim.x) tile[i] = 0.0f;                       \
      __syncthreads();                                                                                       \
    }                                                                                                        \
    float* gin_image = (float*)b.L.data + (long long)(int)r[0] * b.L.sn;                                     \
    for (int i = threadIdx.x; i < items; i += blockDim.x) {                                                  \
      const int cc = i % TILE_C, c = c0 + cc, bin = i / TILE_C;                                              \
      if (c >= channels) continue;                                                                           \
      const int ph = bin / pooled_width, pw = bin % pooled_width;                                            \
      const float g = LOAD(g_roi + c * so_c + ph * so_y + pw * so_x);                                        \
      if (g == 0.0f) continue;                                                                               \
      b.cell = bin_grid(r, b.L.scale, ph, pw, pooled_height, pooled_width, sampling_ratio, aligned);         \
      float* gin = gin_image + (long long)c * b.L.sc;                                                        \
      FOR_EACH_SAMPLE(b, for (int q = 0; q < 4; q++) {                                                       \
        const int y = ys[q / 2], x = xs[q % 2], ty = y - y_lo, tx = x - x_lo;                                \
        const float v = g * w[q] / b.cell.count;                                                             \
        if (tiled && ty >= 0 && ty < fh && tx >= 0 && tx < fw) atomicAdd(&tile[(ty * fw + tx) * TILE_C + cc], v); \
        else atomicAdd(gin + y * b.L.sh + x * b.L.sw, v);                                                    \
      })                                                                                                     \
    }                                                                                                        \
    if (!tiled) return;                                                                                      \
    __syncthreads();                                                                                         \
    if (VECTOR_ATOMICS && b.L.sc == 1 && c0 + TILE_C <= channels && ((b.L.sn | b.L.sh | b.L.sw) & 3) == 0    \
        && (b.L.data & 15) == 0) {                                                                           \
      /* Channels-last, 16-byte aligned: four channels per atomic. */      \
      for (int i = threadIdx.x; i < fh * fw * (TILE_C / 4); i += blockDim.x) {                               \
        const float4 v = *(const float4*)&tile[i * 4];                                                       \
        const int p = i / (TILE_C / 4), c = c0 + (i % (TILE_C / 4)) * 4;                                     \
        if (v.x != 0.0f || v.y != 0.0f || v.z != 0.0f || v.w != 0.0f)                                       \
          add4(gin_image + c + (y_lo + p / fw) * b.L.sh + (x_lo + p % fw) * b.L.sw, v);                      \
      }                                                                                                      \
      return;                                                                                                \
    }                                                                                                        \
    for (int i = threadIdx.x; i < fh * fw * TILE_C; i += blockDim.x) {                                       \
      const float v = tile[i];                                                                               \
      const int c = c0 + i % TILE_C, p = i / TILE_C;                                                         \
      if (v != 0.0f && c < channels)                                                                         \
        atomicAdd(gin_image + (long long)c * b.L.sc + (y_lo + p / fw) * b.L.sh + (x_lo + p % fw) * b.L.sw, v); \
    }                                                                                                        \
  }

#define LOAD_F32(p) load_val(p)
#define LOAD_HALF(p) load_val(p, bf16)
#define STORE_F32(v) (v)
#define STORE_HALF(v) store_half(v, bf16)
ML_FORWARD(roi_align_multilevel_forward_f32, float, LOAD_F32, STORE_F32)
ML_FORWARD(roi_align_multilevel_forward_f16, unsigned short, LOAD_HALF, STORE_HALF)
ML_FORWARD(roi_align_multilevel_forward_bf16, unsigned short, LOAD_HALF, STORE_HALF)
ML_BACKWARD(roi_align_multilevel_backward_f32, float, LOAD_F32)
ML_BACKWARD(roi_align_multilevel_backward_f16, unsigned short, LOAD_HALF)
ML_BACKWARD(roi_align_multilevel_backward_bf16, unsigned short, LOAD_HALF)

// Mask targets from bitmaps: out[slot] (M×M float, row-major) for each slot
// of B×Q RoIs where use_slot[slot] and image b = slot / Q has bitmaps
// (others untouched) is torchvision's
// roi_align(mask, box, (M, M), spatial_scale 1, sampling_ratio 0, aligned
// False) of the uint8 plane (b, matched[slot]) of masks [B, G, H, W], read
// as a sizes[b] = (height, width) map in its top-left corner (the padding
// beyond is outside the map, as for the unpadded bitmap). The accumulation
// of roi_align_multilevel_forward_f32: the same values.
extern "C" __global__ void bitmap_mask_targets(const unsigned char* masks, const int* sizes, int G, int H, int W,
    int Q, const float* boxes, const long long* matched, const unsigned char* use_slot, int m, long long n,
    float* out) {
  for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < n;
       index += (long long)blockDim.x * gridDim.x) {
    const long long slot = index / (m * m);
    if (!use_slot[slot]) continue;
    const int pix = (int)(index % (m * m)), ph = pix / m, pw = pix % m;
    const long long b = slot / Q;
    if (sizes[2 * b] <= 0 || sizes[2 * b + 1] <= 0) continue;  // an image without bitmaps
    const float r[5] = {(float)b, boxes[slot * 4], boxes[slot * 4 + 1], boxes[slot * 4 + 2], boxes[slot * 4 + 3]};
    MlBin bin;
    bin.cell = bin_grid(r, 1.0f, ph, pw, m, m, 0, 0);
    bin.L.height = sizes[2 * b];
    bin.L.width = sizes[2 * b + 1];
    const unsigned char* in = masks + (b * G + matched[slot]) * (long long)H * W;
    float acc = 0.0f;
    FOR_EACH_SAMPLE(bin, acc += (w[0] * (float)in[ys[0] * W + xs[0]] + w[1] * (float)in[ys[0] * W + xs[1]]
                                 + w[2] * (float)in[ys[1] * W + xs[0]] + w[3] * (float)in[ys[1] * W + xs[1]]);)
    out[index] = acc / bin.cell.count;
  }
}
"#
);

/// Channels per block of the backward kernel (`TILE_C`).
const BACKWARD_TILE_CHANNELS: i64 = 8;
/// Footprint pixels the backward kernel sums in shared memory (`TILE_PIXELS`).
const BACKWARD_TILE_PIXELS: i32 = 1024;

/// The backward's shared-memory footprint limit; tests set 0 to run every
/// RoI through the direct path.
static TILE_PIXELS_LIMIT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(BACKWARD_TILE_PIXELS);

fn backward_tile_pixels() -> i32 {
    TILE_PIXELS_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets the backward's shared-memory footprint limit (0: every RoI adds its
/// samples straight to the map) and returns the previous one. For tests.
#[doc(hidden)]
pub fn set_backward_tile_pixels(pixels: i32) -> i32 {
    TILE_PIXELS_LIMIT.swap(pixels.clamp(0, BACKWARD_TILE_PIXELS), std::sync::atomic::Ordering::Relaxed)
}

/// One feature map as the kernels see it (`struct Level`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Level {
    data: u64,
    sn: i64,
    sc: i64,
    sh: i64,
    sw: i64,
    height: i32,
    width: i32,
    scale: f32,
    pad: i32,
}

/// Up to five levels, by value (`struct Levels`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Levels {
    l: [Level; 5],
    count: i32,
}

// SAFETY: plain-old-data with the C layout of the kernels' structs.
unsafe impl cudarc::driver::DeviceRepr for Levels {}

impl Levels {
    /// The maps `[N, C, H, W]` (any strides) at `scales`.
    fn new(maps: &[&Tensor], scales: &[f64]) -> Option<Levels> {
        if maps.is_empty() || maps.len() > 5 {
            return None;
        }
        let mut lv = Levels { count: maps.len() as i32, ..Levels::default() };
        for (slot, (m, &s)) in lv.l.iter_mut().zip(maps.iter().zip(scales)) {
            let (size, st) = (m.size(), m.stride());
            *slot = Level {
                data: m.data_ptr() as u64,
                sn: st[0],
                sc: st[1],
                sh: st[2],
                sw: st[3],
                height: size[2] as i32,
                width: size[3] as i32,
                scale: s as f32,
                pad: 0,
            };
        }
        Some(lv)
    }
}

fn bf16_or_f16(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16)
}

/// Whether `t` `[N, C, H, W]` (2-byte elements) is channels-last with every
/// pixel's `c` channels starting on a 16-byte boundary.
fn channel_rows_aligned(t: &Tensor, c: i64) -> bool {
    let st = t.stride();
    c % 8 == 0
        && st[1] == 1
        && [st[0], st[2], st[3]].iter().all(|s| s % 8 == 0)
        && (t.data_ptr() as usize).is_multiple_of(16)
}

/// One launch of the forward (`grad` = false: `values` is the output) or
/// backward (`values` is the output gradient, `maps` the float32 gradient
/// buffers) kernel.
#[allow(clippy::too_many_arguments)]
fn launch(
    backward: bool,
    maps: &[&Tensor],
    scales: &[f64],
    rois: &Tensor,
    levels: &Tensor,
    values: &Tensor,
    output_size: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
) -> Option<()> {
    let Device::Cuda(index) = rois.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let (suffix, bf16, _) = super::dtype_suffix(values.kind())?;
    let c = maps[0].size()[1];
    let x8 = !backward
        && bf16_or_f16(values.kind())
        && channel_rows_aligned(values, c)
        && maps.iter().all(|m| channel_rows_aligned(m, c));
    let name = match (backward, x8) {
        (true, _) => format!("roi_align_multilevel_backward_{suffix}"),
        (false, true) => "roi_align_multilevel_forward_half_x8".to_string(),
        (false, false) => format!("roi_align_multilevel_forward_{suffix}"),
    };
    let f = kernels.function(&name)?;
    let lv = Levels::new(maps, scales)?;
    let k = rois.size()[0];
    let n = k * c * output_size.0 * output_size.1;
    if n == 0 {
        return Some(());
    }
    let so = values.stride();
    let (so_k, so_c, so_y, so_x) = (so[0], so[1], so[2], so[3]);
    let (pr, pl, pv) = (rois.data_ptr() as u64, levels.data_ptr() as u64, values.data_ptr() as u64);
    let (ci, ph, pw) = (c as i32, output_size.0 as i32, output_size.1 as i32);
    let (sr, al) = (sampling_ratio as i32, i32::from(aligned));
    // Forward: one thread per output value; backward: one block per RoI and
    // group of BACKWARD_TILE_CHANNELS channels.
    let (count, blocks) = if backward {
        let blocks = k.checked_mul((c + BACKWARD_TILE_CHANNELS - 1) / BACKWARD_TILE_CHANNELS)?;
        (k, u32::try_from(blocks).ok().filter(|&b| b < i32::MAX as u32)?)
    } else {
        let n = if x8 { n / 8 } else { n };
        (n, super::blocks_for(n, 1 << 20) as u32)
    };
    let cfg = super::launch_1d(i64::from(blocks));
    let stream = kernels.stream();
    let tile_pixels = backward_tile_pixels();
    let mut l = stream.launch_builder(f);
    l.arg(&count).arg(&lv).arg(&ci).arg(&ph).arg(&pw).arg(&sr).arg(&al).arg(&pr).arg(&pl).arg(&pv);
    l.arg(&so_k).arg(&so_c).arg(&so_y).arg(&so_x).arg(&bf16);
    if backward {
        l.arg(&tile_pixels);
    }
    // SAFETY: every map is a live CUDA tensor [N, C, H, W] of `values`'
    // dtype (float32 gradient buffers in the backward) described by its
    // strides; rois [K, 5] float32 and levels [K] int64 contiguous, levels
    // in 0..maps.len(); `values` [K, C, ph, pw] by its strides. All stay
    // alive until later work on this stream.
    super::launched(&name, unsafe { l.launch(cfg) }).map(|_| ())
}

/// The tensor behind a handle the shim lends for the duration of a call.
///
/// # Safety
/// `p` must be a live `at::Tensor*`.
unsafe fn borrowed(p: *mut torch_sys::C_tensor) -> std::mem::ManuallyDrop<Tensor> {
    std::mem::ManuallyDrop::new(Tensor::from_ptr(p))
}

/// `n` handles the shim lends, as tensors.
///
/// # Safety
/// `ptrs` must point to `n` live `at::Tensor*`.
unsafe fn borrowed_list(ptrs: *const *mut torch_sys::C_tensor, n: i32) -> Vec<std::mem::ManuallyDrop<Tensor>> {
    (0..n as usize).map(|i| borrowed(*ptrs.add(i))).collect()
}

/// Forward of the shim's autograd multi-level RoIAlign. 0 on success.
#[allow(clippy::too_many_arguments)]
pub(crate) extern "C" fn multilevel_forward_callback(
    features: *const *mut torch_sys::C_tensor,
    n: i32,
    rois: *mut torch_sys::C_tensor,
    levels: *mut torch_sys::C_tensor,
    scales: *const f64,
    output: *mut torch_sys::C_tensor,
    ph: i64,
    pw: i64,
    sr: i64,
    aligned: i32,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: the shim passes live tensors and `n` scales for the call.
        let (maps, r, lv, out) =
            unsafe { (borrowed_list(features, n), borrowed(rois), borrowed(levels), borrowed(output)) };
        let scales = unsafe { std::slice::from_raw_parts(scales, n as usize) };
        let maps: Vec<&Tensor> = maps.iter().map(|m| &**m).collect();
        launch(false, &maps, scales, &r, &lv, &out, (ph, pw), sr, aligned != 0).map_or(-1, |()| 0)
    })
    .unwrap_or(-1)
}

/// Backward of the shim's autograd multi-level RoIAlign: accumulates
/// `grad_output` into the zeroed float32 `grad_features`. 0 on success.
#[allow(clippy::too_many_arguments)]
pub(crate) extern "C" fn multilevel_backward_callback(
    grad_output: *mut torch_sys::C_tensor,
    rois: *mut torch_sys::C_tensor,
    levels: *mut torch_sys::C_tensor,
    scales: *const f64,
    grad_features: *const *mut torch_sys::C_tensor,
    n: i32,
    ph: i64,
    pw: i64,
    sr: i64,
    aligned: i32,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: as in the forward.
        let (g, r, lv, maps) =
            unsafe { (borrowed(grad_output), borrowed(rois), borrowed(levels), borrowed_list(grad_features, n)) };
        let scales = unsafe { std::slice::from_raw_parts(scales, n as usize) };
        let maps: Vec<&Tensor> = maps.iter().map(|m| &**m).collect();
        launch(true, &maps, scales, &r, &lv, &g, (ph, pw), sr, aligned != 0).map_or(-1, |()| 0)
    })
    .unwrap_or(-1)
}

/// RoIAlign of `rois` `[K, 5]` from `features` (one map per level, any
/// strides, float32/fp16/bf16 on CUDA; RoI `k` from `features[levels[k]]`
/// at `scales[levels[k]]`) → `[K, C, ph, pw]` in the features' dtype and
/// memory format. With `autograd`, gradients reach the features (through
/// the shim); without, a plain launch. `None` when the kernels are
/// unavailable.
#[allow(clippy::too_many_arguments)]
pub fn multilevel_roi_align(
    features: &[&Tensor],
    rois: &Tensor,
    levels: &Tensor,
    scales: &[f64],
    output_size: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
    autograd: bool,
) -> Option<Tensor> {
    let Device::Cuda(index) = rois.device() else { return None };
    super::device_kernels(index)?;
    super::dtype_suffix(features.first()?.kind())?;
    if features.iter().any(|f| f.kind() != features[0].kind() || f.dim() != 4) {
        return None;
    }
    let rois = rois.to_kind(Kind::Float).contiguous();
    let levels = levels.to_kind(Kind::Int64).contiguous();
    if autograd {
        crate::shim::set_multilevel_roi_align_callbacks(multilevel_forward_callback, multilevel_backward_callback);
        return crate::shim::multilevel_roi_align_autograd(
            features,
            &rois,
            &levels,
            scales,
            output_size,
            sampling_ratio,
            aligned,
        )
        .ok();
    }
    let f0 = features[0];
    let format_nhwc = super::is_channels_last(f0) && !f0.is_contiguous();
    let shape = [rois.size()[0], f0.size()[1], output_size.0, output_size.1];
    let out = if format_nhwc {
        Tensor::empty([shape[0], shape[2], shape[3], shape[1]], (f0.kind(), f0.device())).permute([0, 3, 1, 2])
    } else {
        Tensor::empty(shape, (f0.kind(), f0.device()))
    };
    launch(false, features, scales, &rois, &levels, &out, output_size, sampling_ratio, aligned)?;
    Some(out)
}

/// Writes the mask targets of bitmap images into `out` `[K, M, M]` (K =
/// B × `per_image` RoI slots `boxes` `[K, 4]`, resized-image pixels): slot
/// `k` of image `b = k / per_image` where `use_slot[k]` and `sizes[b]` is
/// not `(0, 0)` gets torchvision's
/// `project_masks_on_boxes` of instance `matched[k]` of `masks` `[B, G, H,
/// W]` uint8, image `b`'s bitmaps being its `sizes[b]` = `(h, w)` corner
/// (`[B, 2]` int32); other slots are left as they are. CUDA only; `None`
/// (nothing written) when the kernel is unavailable.
#[allow(clippy::too_many_arguments)]
pub fn bitmap_mask_targets(
    masks: &Tensor,
    sizes: &Tensor,
    boxes: &Tensor,
    matched: &Tensor,
    use_slot: &Tensor,
    per_image: i64,
    out: &Tensor,
) -> Option<()> {
    let Device::Cuda(index) = boxes.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let f = kernels.function("bitmap_mask_targets")?;
    let (masks, sizes) = (masks.to_kind(Kind::Uint8).contiguous(), sizes.to_kind(Kind::Int).contiguous());
    let boxes = boxes.to_kind(Kind::Float).contiguous();
    let matched = matched.to_kind(Kind::Int64).contiguous();
    let use_slot = use_slot.to_kind(Kind::Bool).contiguous();
    if out.kind() != Kind::Float || !out.is_contiguous() {
        return None;
    }
    let (k, m) = (out.size()[0], out.size()[1]);
    let n = k * m * m;
    if n == 0 {
        return Some(());
    }
    let dims = masks.size();
    let (g, h, w) = (dims[1] as i32, dims[2] as i32, dims[3] as i32);
    let (q, mi) = (per_image as i32, m as i32);
    let ptrs = [&masks, &sizes, &boxes, &matched, &use_slot, out].map(|t| t.data_ptr() as u64);
    let cfg = super::launch_1d(super::blocks_for(n, 65_535 * 8));
    let stream = kernels.stream();
    let mut l = stream.launch_builder(f);
    l.arg(&ptrs[0]).arg(&ptrs[1]).arg(&g).arg(&h).arg(&w).arg(&q).arg(&ptrs[2]).arg(&ptrs[3]).arg(&ptrs[4]);
    l.arg(&mi).arg(&n).arg(&ptrs[5]);
    // SAFETY: contiguous tensors of the documented dtypes on this device:
    // masks [B, G, H, W] u8, sizes [B, 2] i32 within (H, W), boxes [K, 4]
    // f32, matched [K] i64 in 0..G, use_slot [K] bool, out [K, M, M] f32;
    // alive until later work on this stream.
    super::launched("bitmap_mask_targets", unsafe { l.launch(cfg) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use crate::structures::{InstanceMasks, Target, TargetBatch, TargetPadding};
    use tch::{Device, Kind, Tensor};

    /// The bitmap kernel's targets equal `project_masks_on_boxes` (RoIAlign
    /// of each image's own, unpadded bitmaps) for two images of different
    /// sizes packed in one padded canvas: RoIs inside, across and beyond the
    /// images' borders (where the padding must read as outside the map),
    /// slots left out untouched, a polygon image's slots untouched.
    #[test]
    fn gpu_bitmap_targets_equal_project_masks_on_boxes() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_bitmap_targets_equal_project_masks_on_boxes") else {
            return;
        };
        tch::manual_seed(3);
        let sizes = [(70i64, 90i64), (96, 64)];
        let (g, q, m) = (3i64, 40i64, 28i64);
        let mut targets: Vec<Target> = sizes
            .iter()
            .map(|&(h, w)| Target {
                boxes: Tensor::ones([g, 4], (Kind::Float, Device::Cpu)),
                labels: Tensor::ones([g], (Kind::Int64, Device::Cpu)),
                masks: InstanceMasks::Bitmaps(
                    Tensor::rand([g, h, w], (Kind::Float, Device::Cpu)).gt(0.6).to_kind(Kind::Uint8),
                ),
                iscrowd: None,
                has_mask: None,
            })
            .collect();
        targets.push(Target {
            boxes: Tensor::ones([1, 4], (Kind::Float, Device::Cpu)),
            labels: Tensor::ones([1], (Kind::Int64, Device::Cpu)),
            masks: InstanceMasks::Polygons(vec![vec![vec![1.0, 1.0, 30.0, 1.0, 30.0, 30.0]]]),
            iscrowd: None,
            has_mask: None,
        });
        let host: Vec<Tensor> = targets
            .iter()
            .map(|t| match &t.masks {
                InstanceMasks::Bitmaps(b) => b.shallow_clone(),
                InstanceMasks::Polygons(_) => Tensor::zeros([0], (Kind::Uint8, Device::Cpu)),
            })
            .collect();
        let batch = TargetBatch::new(std::mem::take(&mut targets), device, (128, 128), TargetPadding::buckets());
        let bitmaps = batch.bitmaps.expect("bitmap batch");
        let b = host.len() as i64;
        let xy = Tensor::rand([b, q, 2], (Kind::Float, Device::Cpu)) * 120.0 - 15.0;
        let wh = Tensor::rand([b, q, 2], (Kind::Float, Device::Cpu)) * 60.0 + 0.3;
        let boxes = Tensor::cat(&[&xy, &(&xy + &wh)], 2);
        let matched = Tensor::randint(g, [b, q], (Kind::Int64, Device::Cpu));
        let use_slot = Tensor::rand([b, q], (Kind::Float, Device::Cpu)).gt(0.2);
        let out = Tensor::full([b * q, m, m], -1.0, (Kind::Float, device));
        super::bitmap_mask_targets(
            &bitmaps.masks,
            &bitmaps.sizes,
            &boxes.reshape([-1, 4]).to_device(device),
            &matched.reshape([-1]).to_device(device),
            &use_slot.reshape([-1]).to_device(device),
            q,
            &out,
        )
        .expect("kernel available");
        let out = out.to_device(Device::Cpu).reshape([b, q, m, m]);
        for i in 0..b {
            let written = use_slot.get(i).reshape([q, 1, 1]);
            let expected = if host[i as usize].numel() > 0 {
                let reference = crate::structures::masks::project_masks_on_boxes(
                    &host[i as usize].to_device(device),
                    &boxes.get(i).to_device(device),
                    &matched.get(i).to_device(device),
                    m,
                )
                .to_device(Device::Cpu);
                reference.where_self(&written, &Tensor::full([1], -1.0, (Kind::Float, Device::Cpu)))
            } else {
                Tensor::full([q, m, m], -1.0, (Kind::Float, Device::Cpu))
            };
            let d = (out.get(i) - expected).abs().max().double_value(&[]);
            assert!(d <= 1e-6, "image {i}: max |Δ| {d}");
        }
    }
}
