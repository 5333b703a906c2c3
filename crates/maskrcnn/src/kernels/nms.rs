//! The "suppresses" bit matrix of greedy NMS as one CUDA kernel (the scheme
//! of torchvision's `nms_kernel`): for each group of score-sorted boxes,
//! bit `j` of row `i` is set when IoU(i, j) > threshold, computed with
//! torchvision's float32 arithmetic (rounded intrinsics: no fused
//! multiply-adds) and compared in double, as [`crate::ops::nms()`]'s tensor
//! path. Rows are 64-bit words; the greedy walk stays on the host.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = r#"
extern "C" __global__ void nms_suppression_bits(const float* boxes, int groups, int m, int words,
    double threshold, unsigned long long* out) {
  const int row_block = blockIdx.y, col_block = blockIdx.x, g = blockIdx.z;
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
"#;

/// The bit matrix `[G, M, ceil(M / 64)]` (u64 words, on the host) of
/// `groups` `[G, M, 4]` float boxes on CUDA; `None` when the kernel is
/// unavailable.
pub fn suppression_bits(groups: &Tensor, iou_threshold: f64) -> Option<(Vec<u64>, usize)> {
    let Device::Cuda(index) = groups.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let f = kernels.functions.get("nms_suppression_bits")?;
    let boxes = groups.to_kind(Kind::Float).contiguous();
    let (g, m) = (boxes.size()[0], boxes.size()[1]);
    let words = ((m + 63) / 64) as usize;
    if g == 0 || m == 0 {
        return Some((Vec::new(), words));
    }
    let out = Tensor::empty([g * m * words as i64], (Kind::Int64, boxes.device()));
    let (bp, op) = (boxes.data_ptr() as u64, out.data_ptr() as u64);
    let (gi, mi, wi) = (g as i32, m as i32, words as i32);
    let cfg =
        LaunchConfig { grid_dim: (words as u32, words as u32, g as u32), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernels.stream.launch_builder(f);
    launch.arg(&bp).arg(&gi).arg(&mi).arg(&wi).arg(&iou_threshold).arg(&op);
    // SAFETY: contiguous float32 boxes [G, M, 4] and an int64 output of
    // G·M·words elements, alive until the copy below (same stream).
    unsafe { launch.launch(cfg) }.ok()?;
    let host = out.to_device(Device::Cpu);
    let n = host.numel();
    let mut words_out = vec![0i64; n];
    host.copy_data(&mut words_out, n);
    Some((words_out.into_iter().map(|w| w as u64).collect(), words))
}
