//! Greedy NMS of many groups of boxes at once, entirely on the GPU (the
//! scheme of torchvision's `nms_kernel`, with the greedy pass moved onto the
//! device). For each group of score-sorted boxes, `nms_suppression_bits`
//! sets bit `j` of row `i` (64-bit words) when IoU(i, j) > threshold,
//! computed with torchvision's float32 arithmetic (rounded intrinsics: no
//! fused multiply-adds) and compared in double, as [`crate::ops::nms()`]'s
//! CPU path; only blocks on or above the diagonal are computed (the walk
//! never reads the others). `nms_greedy` then walks each group's rows in one
//! warp: a valid box not yet removed is kept and removes what its row marks.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = r#"
extern "C" __global__ void nms_suppression_bits(const float* boxes, int groups, int m, int words,
    double threshold, unsigned long long* out) {
  const int row_block = blockIdx.y, col_block = blockIdx.x, g = blockIdx.z;
  if (col_block < row_block) return;
  const int row = row_block * 64 + threadIdx.x;
  __shared__ float cols[64 * 4];
  const float* gb = boxes + (long long)g * m * 4;
  int col_start = col_block * 64;
  int ncols = min(64, m - col_start);
  if (threadIdx.x < ncols) {
    for (int k = 0; k < 4; k++) cols[threadIdx.x * 4 + k] = gb[(col_start + threadIdx.x) * 4 + k];
  }
  __syncthreads();
  if (row >= m) return;
  float x1 = gb[row * 4], y1 = gb[row * 4 + 1], x2 = gb[row * 4 + 2], y2 = gb[row * 4 + 3];
  float area_r = __fmul_rn(__fsub_rn(x2, x1), __fsub_rn(y2, y1));
  unsigned long long bits = 0;
  for (int j = 0; j < ncols; j++) {
    const float* c = cols + j * 4;
    float area_c = __fmul_rn(__fsub_rn(c[2], c[0]), __fsub_rn(c[3], c[1]));
    float w = fmaxf(__fsub_rn(fminf(x2, c[2]), fmaxf(x1, c[0])), 0.0f);
    float h = fmaxf(__fsub_rn(fminf(y2, c[3]), fmaxf(y1, c[1])), 0.0f);
    float inter = __fmul_rn(w, h);
    float ovr = __fdiv_rn(inter, __fsub_rn(__fadd_rn(area_r, area_c), inter));
    if ((double)ovr > threshold) bits |= 1ULL << j;
  }
  out[((long long)g * m + row) * words + col_block] = bits;
}

// One warp per group; the removed-bit words live in shared memory (`words`
// of them per group, dynamic size).
extern "C" __global__ void nms_greedy(const unsigned long long* bits, const unsigned char* valid, int m,
    int words, unsigned char* keep) {
  extern __shared__ unsigned long long removed[];
  const int g = blockIdx.x, lane = threadIdx.x;
  const unsigned long long* gb = bits + (long long)g * m * words;
  const unsigned char* gv = valid + (long long)g * m;
  unsigned char* gk = keep + (long long)g * m;
  for (int w = lane; w < words; w += 32) removed[w] = 0ULL;
  __syncwarp();
  for (int i = 0; i < m; i++) {
    bool take = gv[i] && !((removed[i >> 6] >> (i & 63)) & 1ULL);
    if (lane == 0) gk[i] = take ? 1 : 0;
    if (take) {
      const unsigned long long* row = gb + (long long)i * words;
      for (int w = (i >> 6) + lane; w < words; w += 32) removed[w] |= row[w];
    }
    __syncwarp();
  }
}
"#;

/// Launches the suppression-bit kernel over `boxes` `[G, M, 4]` (contiguous
/// float32, CUDA) into a fresh `[G, M, ceil(M / 64)]` int64 tensor; `None`
/// when the kernel is unavailable.
fn suppression_bits_on_device(boxes: &Tensor, iou_threshold: f64) -> Option<Tensor> {
    let Device::Cuda(index) = boxes.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let f = kernels.function("nms_suppression_bits")?;
    let (g, m) = (boxes.size()[0], boxes.size()[1]);
    let words = (m + 63) / 64;
    let out = Tensor::empty([g, m, words], (Kind::Int64, boxes.device()));
    if g == 0 || m == 0 {
        return Some(out);
    }
    let (bp, op) = (boxes.data_ptr() as u64, out.data_ptr() as u64);
    let (gi, mi, wi) = (g as i32, m as i32, words as i32);
    let cfg =
        LaunchConfig { grid_dim: (words as u32, words as u32, g as u32), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
    let stream = kernels.stream();
    let mut launch = stream.launch_builder(f);
    launch.arg(&bp).arg(&gi).arg(&mi).arg(&wi).arg(&iou_threshold).arg(&op);
    // SAFETY: contiguous float32 boxes [G, M, 4] and an int64 output of
    // G·M·words elements, both alive until later work on this stream.
    super::launched("nms_suppression_bits", unsafe { launch.launch(cfg) })?;
    Some(out)
}

/// Greedy NMS of each group of `boxes` `[G, M, 4]` (sorted by decreasing
/// score within the group) over its `valid` `[G, M]` boxes, on CUDA without
/// leaving the device: `[G, M]` bool, true for the kept boxes. `None` when
/// the kernels are unavailable.
pub fn keep_mask(boxes: &Tensor, valid: &Tensor, iou_threshold: f64) -> Option<Tensor> {
    let Device::Cuda(index) = boxes.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let f = kernels.function("nms_greedy")?;
    let boxes = boxes.to_kind(Kind::Float).contiguous();
    let valid = valid.to_kind(Kind::Bool).contiguous();
    let (g, m) = (boxes.size()[0], boxes.size()[1]);
    let keep = Tensor::zeros([g, m], (Kind::Bool, boxes.device()));
    if g == 0 || m == 0 {
        return Some(keep);
    }
    let bits = suppression_bits_on_device(&boxes, iou_threshold)?;
    let words = (m + 63) / 64;
    let (bp, vp, kp) = (bits.data_ptr() as u64, valid.data_ptr() as u64, keep.data_ptr() as u64);
    let (mi, wi) = (m as i32, words as i32);
    let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: (words * 8) as u32 };
    let stream = kernels.stream();
    let mut launch = stream.launch_builder(f);
    launch.arg(&bp).arg(&vp).arg(&mi).arg(&wi).arg(&kp);
    // SAFETY: the bit matrix [G, M, words] int64, valid and keep [G, M]
    // bool (one byte each), all contiguous on this device and alive until
    // later work on this stream.
    super::launched("nms_greedy", unsafe { launch.launch(cfg) })?;
    Some(keep)
}
