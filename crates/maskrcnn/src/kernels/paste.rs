//! Mask pasting on the GPU, straight to COCO run-length edges: every
//! detection's `M`×`M` mask probabilities, zero-padded by one pixel and
//! resized bilinearly (align_corners=false) to its integer box, thresholded
//! at 0.5 — the arithmetic of libtorch's CUDA `upsample_bilinear2d` (source
//! index `scale·(dst+0.5)−0.5` clamped at 0, the same weights and products,
//! the result rounded to the masks' dtype before the comparison), so the
//! same bits as torchvision's `paste_masks_in_image(...) > 0.5` on CUDA.
//! Rather than the mask, each pixel of the box's part inside the image (its
//! window) records whether a run starts or ends there; the few marked
//! pixels are all the host needs for the RLE. One launch, one compaction
//! and one small copy replace a resize, a threshold, a copy and a scan of
//! every pixel per detection.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = concat!(
    super::half_conversions!(),
    r#"
// The padded mask's value at (y, x) of (m + 2)^2: zero on the border.
__device__ __forceinline__ float padded(const void* masks, int kind, long long base, int m, int y, int x) {
  if (y < 1 || x < 1 || y > m || x > m) return 0.0f;
  long long i = base + (long long)(y - 1) * m + (x - 1);
  if (kind == 0) return load_val((const float*)masks + i);
  return load_val((const unsigned short*)masks + i, kind == 2);
}

// Output index `dst` of a resize by `scale` along an axis of `in` input
// pixels: the first source pixel, whether a second one follows (0 or 1) and
// both weights (area_pixel_compute_source_index, align_corners=false).
__device__ __forceinline__ void source_index(float scale, int dst, int in, int* i0, int* step, float* lambda0,
    float* lambda1) {
  float r = scale * (dst + 0.5f) - 0.5f;
  r = r < 0.0f ? 0.0f : r;
  *i0 = r;
  *step = (*i0 < in - 1) ? 1 : 0;
  *lambda1 = r - *i0;
  *lambda0 = 1.0f - *lambda1;
}

// Whether the padded mask resized to (h, w) is > 0.5 at (h2, w2): libtorch's
// upsample_bilinear2d_out_frame arithmetic, the value stored in the masks'
// dtype before the comparison.
__device__ __noinline__ bool pasted(const void* masks, int kind, long long base, int m, float rheight,
    float rwidth, int h2, int w2) {
  int h1, h1p, w1, w1p;
  float h0lambda, h1lambda, w0lambda, w1lambda;
  source_index(rheight, h2, m + 2, &h1, &h1p, &h0lambda, &h1lambda);
  source_index(rwidth, w2, m + 2, &w1, &w1p, &w0lambda, &w1lambda);
  const float val = h0lambda * (w0lambda * padded(masks, kind, base, m, h1, w1)
                                + w1lambda * padded(masks, kind, base, m, h1, w1 + w1p))
                  + h1lambda * (w0lambda * padded(masks, kind, base, m, h1 + h1p, w1)
                                + w1lambda * padded(masks, kind, base, m, h1 + h1p, w1 + w1p));
  float stored = val;
  if (kind != 0) {
    unsigned short hv = store_half(val, kind == 2);
    stored = load_val(&hv, kind == 2);
  }
  return stored > 0.5f;
}

// Run edges of each detection's pasted, thresholded mask in COCO's
// column-major order over the im_h x im_w image, for its window's pixels
// (column-major within the window, so in image order): bit 0 where a run
// starts at the pixel (its value differs from the pixel before it in the
// image's column-major order), bit 1 where a foreground run ends right after
// it (at the bottom of a window column whose next image pixel is outside
// the window).
// windows [D, 9] int32 per detection: x0, y0, w, h (the expanded integer
// box: resize target w x h at image (x0, y0)), px0, py0, pw, ph (the part
// inside the image), im_h (its image's rows); offsets [D] int64: where its
// pw*ph bytes start in out.
// masks [D, m, m] of kind 0 float32, 1 float16, 2 bfloat16.
// Grid: (blocks per detection, D).
extern "C" __global__ void paste_masks_run_edges(const void* masks, int kind, int m, const int* windows,
    const long long* offsets, unsigned char* out) {
  const int d = blockIdx.y;
  const int* wd = windows + 9 * d;
  const int x0 = wd[0], y0 = wd[1], w = wd[2], h = wd[3];
  const int px0 = wd[4], py0 = wd[5], pw = wd[6], ph = wd[7], im_h = wd[8];
  const long long n = (long long)pw * ph;
  const long long base = (long long)d * m * m;
  // area_pixel_compute_scale<float>(in, out, align_corners=false, no scale)
  const float rheight = (float)(m + 2) / h, rwidth = (float)(m + 2) / w;
  // A window of full image height continues from one column into the next.
  const bool full_height = py0 == 0 && ph == im_h;
  unsigned char* dst = out + offsets[d];
  for (long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += (long long)gridDim.x * blockDim.x) {
    const int x = (int)(q / ph), y = (int)(q % ph);
    const int h2 = py0 + y - y0, w2 = px0 + x - x0;
    const bool v = pasted(masks, kind, base, m, rheight, rwidth, h2, w2);
    bool before = false;
    if (y > 0) before = pasted(masks, kind, base, m, rheight, rwidth, h2 - 1, w2);
    else if (full_height && x > 0) before = pasted(masks, kind, base, m, rheight, rwidth, ph - 1 - y0, w2 - 1);
    unsigned char code = v != before ? 1 : 0;
    if (v && y == ph - 1 && !(full_height && x + 1 < pw)) code |= 2;
    dst[q] = code;
  }
}
"#
);

/// One detection's pasted window: its expanded integer box at (`x0`, `y0`)
/// of `w`×`h` pixels (the size its mask is resized to) and the part of it
/// inside its `im_h`×`im_w` image at (`px0`, `py0`) of `pw`×`ph` pixels
/// (`structures::masks::paste_windows` computes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasteWindow {
    pub x0: i64,
    pub y0: i64,
    pub w: i64,
    pub h: i64,
    pub px0: i64,
    pub py0: i64,
    pub pw: i64,
    pub ph: i64,
    pub im_h: i64,
    pub im_w: i64,
}

impl PasteWindow {
    /// Pixels inside the image.
    pub fn pixels(&self) -> usize {
        (self.pw * self.ph) as usize
    }
}

/// The run edges of detections `masks` `[D, 1, M, M]` (f32, f16 or bf16
/// probabilities on a CUDA device) pasted at `windows` (one per detection,
/// each into its own image) and thresholded at 0.5: one byte per window
/// pixel, the windows one after another, each column-major; bit 0 marks a
/// run starting at the pixel (COCO's column-major order over the image),
/// bit 1 a foreground run ending right after it. `[Σ pw·ph]` uint8 on the
/// device; `None` off CUDA or when the kernel is unavailable.
pub fn paste_run_edges(masks: &Tensor, windows: &[PasteWindow]) -> Option<Tensor> {
    let Device::Cuda(index) = masks.device() else { return None };
    let kind = match masks.kind() {
        Kind::Float => 0i32,
        Kind::Half => 1,
        Kind::BFloat16 => 2,
        _ => return None,
    };
    let d = masks.size()[0];
    if d as usize != windows.len() {
        return None;
    }
    let kernels = super::device_kernels(index)?;
    let f = kernels.function("paste_masks_run_edges")?;
    let m = masks.size()[3] as i32;
    let masks = masks.contiguous();
    let mut table = Vec::with_capacity(9 * windows.len());
    let mut offsets = Vec::with_capacity(windows.len());
    let mut total = 0i64;
    let mut largest = 0i64;
    for w in windows {
        table.extend([w.x0, w.y0, w.w, w.h, w.px0, w.py0, w.pw, w.ph, w.im_h].map(|v| v as i32));
        offsets.push(total);
        total += w.pw * w.ph;
        largest = largest.max(w.pw * w.ph);
    }
    let out = Tensor::empty([total], (Kind::Uint8, masks.device()));
    if d == 0 || total == 0 {
        return Some(out);
    }
    let table = Tensor::from_slice(&table).to_device(masks.device());
    let offsets = Tensor::from_slice(&offsets).to_device(masks.device());
    const THREADS: i64 = 256;
    // Enough blocks that the largest window has a few pixels per thread.
    let blocks = (largest / (THREADS * 4)).clamp(1, 1024) as u32;
    let ptrs = [&masks, &table, &offsets, &out].map(|t| t.data_ptr() as u64);
    let cfg = LaunchConfig { grid_dim: (blocks, d as u32, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    let stream = kernels.stream();
    let mut l = stream.launch_builder(f);
    l.arg(&ptrs[0]).arg(&kind).arg(&m).arg(&ptrs[1]).arg(&ptrs[2]).arg(&ptrs[3]);
    // SAFETY: contiguous tensors on this device: masks [D, 1, M, M] of the
    // dtype `kind` names, table [D, 9] i32 windows inside their images,
    // offsets [D] i64 with offsets[i] + pw·ph ≤ total, out [total] u8;
    // alive until later work on this stream.
    super::launched("paste_masks_run_edges", unsafe { l.launch(cfg) })?;
    Some(out)
}
