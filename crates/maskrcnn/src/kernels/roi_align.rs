//! RoIAlign forward and backward as CUDA kernels: torchvision's
//! `roi_align_forward_kernel_impl` / `roi_align_backward_kernel_impl` (same
//! arithmetic, so the same results). Without gradients the forward runs
//! directly (mask targets, inference); with gradients both run inside an
//! autograd function of the C++ shim, which calls back into
//! `forward_callback` / `backward_callback`.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = r#"
// torchvision's bilinear_interpolate(_gradient): the four neighbours of
// (y, x) in a height × width map and their weights; false outside the map.
__device__ bool bilinear_weights(int height, int width, float y, float x, int idx[4], float w[4]) {
  if (y < -1.0f || y > height || x < -1.0f || x > width) return false;
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int y_low = (int)y, x_low = (int)x, y_high, x_high;
  if (y_low >= height - 1) { y_high = y_low = height - 1; y = (float)y_low; } else { y_high = y_low + 1; }
  if (x_low >= width - 1) { x_high = x_low = width - 1; x = (float)x_low; } else { x_high = x_low + 1; }
  float ly = y - y_low, lx = x - x_low, hy = 1.0f - ly, hx = 1.0f - lx;
  idx[0] = y_low * width + x_low; idx[1] = y_low * width + x_high;
  idx[2] = y_high * width + x_low; idx[3] = y_high * width + x_high;
  w[0] = hy * hx; w[1] = hy * lx; w[2] = ly * hx; w[3] = ly * lx;
  return true;
}

// The output cell `index` of [K, C, ph, pw]: its feature plane (image and
// channel) and torchvision's sampling grid over the bin.
struct Cell {
  long long plane;
  int grid_h, grid_w;
  float y0, x0, step_h, step_w, count;
};

__device__ Cell cell_of(long long index, const float* rois, float spatial_scale, int channels, int height,
    int width, int pooled_height, int pooled_width, int sampling_ratio, int aligned) {
  int pw = index % pooled_width;
  int ph = (index / pooled_width) % pooled_height;
  int c = (index / pooled_width / pooled_height) % channels;
  long long n = index / pooled_width / pooled_height / channels;
  const float* r = rois + n * 5;
  int batch = (int)r[0];
  float offset = aligned ? 0.5f : 0.0f;
  float start_w = r[1] * spatial_scale - offset, start_h = r[2] * spatial_scale - offset;
  float end_w = r[3] * spatial_scale - offset, end_h = r[4] * spatial_scale - offset;
  float roi_w = end_w - start_w, roi_h = end_h - start_h;
  if (!aligned) { roi_w = fmaxf(roi_w, 1.0f); roi_h = fmaxf(roi_h, 1.0f); }
  float bin_h = roi_h / pooled_height, bin_w = roi_w / pooled_width;
  Cell cell;
  cell.plane = ((long long)batch * channels + c) * height * width;
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

extern "C" __global__ void roi_align_forward(long long nthreads, const float* input, float spatial_scale,
    int channels, int height, int width, int pooled_height, int pooled_width, int sampling_ratio,
    int aligned, const float* rois, float* output) {
  for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < nthreads;
       index += (long long)blockDim.x * gridDim.x) {
    Cell cell = cell_of(index, rois, spatial_scale, channels, height, width, pooled_height, pooled_width,
                        sampling_ratio, aligned);
    const float* in = input + cell.plane;
    float acc = 0.0f;
    for (int iy = 0; iy < cell.grid_h; iy++) {
      float y = sample_y(cell, iy);
      for (int ix = 0; ix < cell.grid_w; ix++) {
        int idx[4];
        float w[4];
        if (bilinear_weights(height, width, y, sample_x(cell, ix), idx, w))
          acc += (w[0] * in[idx[0]] + w[1] * in[idx[1]] + w[2] * in[idx[2]] + w[3] * in[idx[3]]);
      }
    }
    output[index] = acc / cell.count;
  }
}

extern "C" __global__ void roi_align_backward(long long nthreads, const float* grad_output, float spatial_scale,
    int channels, int height, int width, int pooled_height, int pooled_width, int sampling_ratio,
    int aligned, const float* rois, float* grad_input) {
  for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < nthreads;
       index += (long long)blockDim.x * gridDim.x) {
    Cell cell = cell_of(index, rois, spatial_scale, channels, height, width, pooled_height, pooled_width,
                        sampling_ratio, aligned);
    float* gin = grad_input + cell.plane;
    float g = grad_output[index];
    for (int iy = 0; iy < cell.grid_h; iy++) {
      float y = sample_y(cell, iy);
      for (int ix = 0; ix < cell.grid_w; ix++) {
        int idx[4];
        float w[4];
        if (!bilinear_weights(height, width, y, sample_x(cell, ix), idx, w)) continue;
        for (int k = 0; k < 4; k++) atomicAdd(gin + idx[k], g * w[k] / cell.count);
      }
    }
  }
}
"#;

/// Launches `name` (forward or backward) over `n` = K·C·ph·pw output cells:
/// `a` is the input (forward) or output gradient (backward), `b` the output
/// or input gradient; `shape` is the feature map's `[N, C, H, W]`. All
/// tensors contiguous float32 on one CUDA device.
#[allow(clippy::too_many_arguments)]
fn launch(
    name: &str,
    a: &Tensor,
    rois: &Tensor,
    b: &Tensor,
    shape: &[i64],
    spatial_scale: f64,
    output_size: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
) -> Option<()> {
    let Device::Cuda(index) = a.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let f = kernels.functions.get(name)?;
    let n = rois.size()[0] * shape[1] * output_size.0 * output_size.1;
    if n == 0 {
        return Some(());
    }
    let (pa, pr, pb) = (a.data_ptr() as u64, rois.data_ptr() as u64, b.data_ptr() as u64);
    let (scale, ci, hi, wi) = (spatial_scale as f32, shape[1] as i32, shape[2] as i32, shape[3] as i32);
    let (ph, pw, sr, al) = (output_size.0 as i32, output_size.1 as i32, sampling_ratio as i32, i32::from(aligned));
    let blocks = ((n + 511) / 512).min(65_535) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    let mut l = kernels.stream.launch_builder(f);
    l.arg(&n).arg(&pa).arg(&scale).arg(&ci).arg(&hi).arg(&wi).arg(&ph).arg(&pw).arg(&sr).arg(&al).arg(&pr).arg(&pb);
    // SAFETY: live contiguous float32 CUDA tensors of the sizes passed (the
    // caller keeps them alive until the launch is queued; the stream orders
    // later libtorch work after it); argument types match the kernels.
    unsafe { l.launch(cfg) }.ok().map(|_| ())
}

/// The tensor behind a handle the shim lends for the duration of a call.
///
/// # Safety
/// `p` must be a live `at::Tensor*`.
unsafe fn borrowed(p: *mut torch_sys::C_tensor) -> std::mem::ManuallyDrop<Tensor> {
    std::mem::ManuallyDrop::new(Tensor::from_ptr(p))
}

/// One callback of the shim's autograd RoIAlign: launches `kernel` with
/// `a` (input or output gradient), `rois`, `b` (output or input gradient);
/// the feature map is `a` in the forward, `b` in the backward. 0 on success.
#[allow(clippy::too_many_arguments)]
fn callback(
    kernel: &str,
    a: *mut torch_sys::C_tensor,
    rois: *mut torch_sys::C_tensor,
    b: *mut torch_sys::C_tensor,
    feature_is_b: bool,
    scale: f64,
    output_size: (i64, i64),
    sr: i64,
    aligned: i32,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: the shim passes live tensors for the duration of the call.
        let (a, r, b) = unsafe { (borrowed(a), borrowed(rois), borrowed(b)) };
        let shape = if feature_is_b { b.size() } else { a.size() };
        launch(kernel, &a, &r, &b, &shape, scale, output_size, sr, aligned != 0).map_or(-1, |()| 0)
    })
    .unwrap_or(-1)
}

/// Forward of the shim's autograd RoIAlign: `input` `[N, C, H, W]`,
/// `rois` `[K, 5]`, `output` `[K, C, ph, pw]` (all float32, contiguous).
pub(crate) extern "C" fn forward_callback(
    input: *mut torch_sys::C_tensor,
    rois: *mut torch_sys::C_tensor,
    output: *mut torch_sys::C_tensor,
    scale: f64,
    ph: i64,
    pw: i64,
    sr: i64,
    aligned: i32,
) -> i32 {
    callback("roi_align_forward", input, rois, output, false, scale, (ph, pw), sr, aligned)
}

/// Backward of the shim's autograd RoIAlign: accumulates `grad_output`
/// `[K, C, ph, pw]` into `grad_input` `[N, C, H, W]` (zeroed, float32).
pub(crate) extern "C" fn backward_callback(
    grad_output: *mut torch_sys::C_tensor,
    rois: *mut torch_sys::C_tensor,
    grad_input: *mut torch_sys::C_tensor,
    scale: f64,
    ph: i64,
    pw: i64,
    sr: i64,
    aligned: i32,
) -> i32 {
    callback("roi_align_backward", grad_output, rois, grad_input, true, scale, (ph, pw), sr, aligned)
}

/// RoIAlign of `input` `[N, C, H, W]` (CUDA; computed in float32) over
/// `rois` `[K, 5]`, as [`crate::ops::roi_align()`] with the same arguments,
/// without autograd. `None` when the kernel is unavailable.
pub fn roi_align_forward(
    input: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Option<Tensor> {
    let input = input.to_kind(Kind::Float).contiguous();
    let rois = rois.to_kind(Kind::Float).contiguous();
    let size = input.size();
    let output = Tensor::empty([rois.size()[0], size[1], output_size.0, output_size.1], (Kind::Float, input.device()));
    launch("roi_align_forward", &input, &rois, &output, &size, spatial_scale, output_size, sampling_ratio, aligned)?;
    Some(output)
}

/// Differentiable RoIAlign on CUDA (forward and backward kernels inside the
/// shim's autograd function); `None` when the kernels are unavailable.
pub fn roi_align_autograd(
    input: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Option<Tensor> {
    let Device::Cuda(index) = input.device() else { return None };
    super::device_kernels(index)?;
    crate::shim::roi_align_autograd(input, rois, output_size, spatial_scale, sampling_ratio, aligned).ok()
}
