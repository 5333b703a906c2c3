//! RoIAlign forward and backward as CUDA kernels: torchvision's
//! `roi_align_forward_kernel_impl` / `roi_align_backward_kernel_impl` (same
//! arithmetic, so the same results). Without gradients the forward runs
//! directly (mask targets, inference); with gradients both run inside an
//! autograd function of the C++ shim, which calls back into
//! [`forward_callback`] / [`backward_callback`].

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = r#"
__device__ float bilinear(const float* input, int height, int width, float y, float x) {
  if (y < -1.0f || y > height || x < -1.0f || x > width) return 0.0f;
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int y_low = (int)y, x_low = (int)x, y_high, x_high;
  if (y_low >= height - 1) { y_high = y_low = height - 1; y = (float)y_low; } else { y_high = y_low + 1; }
  if (x_low >= width - 1) { x_high = x_low = width - 1; x = (float)x_low; } else { x_high = x_low + 1; }
  float ly = y - y_low, lx = x - x_low, hy = 1.0f - ly, hx = 1.0f - lx;
  float v1 = input[y_low * width + x_low], v2 = input[y_low * width + x_high];
  float v3 = input[y_high * width + x_low], v4 = input[y_high * width + x_high];
  float w1 = hy * hx, w2 = hy * lx, w3 = ly * hx, w4 = ly * lx;
  return (w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4);
}

extern "C" __global__ void roi_align_forward(long long nthreads, const float* input, float spatial_scale,
    int channels, int height, int width, int pooled_height, int pooled_width, int sampling_ratio,
    int aligned, const float* rois, float* output) {
  for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < nthreads;
       index += (long long)blockDim.x * gridDim.x) {
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
    const float* in = input + ((long long)batch * channels + c) * height * width;
    int grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_h / pooled_height);
    int grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_w / pooled_width);
    float count = fmaxf((float)(grid_h * grid_w), 1.0f);
    float acc = 0.0f;
    for (int iy = 0; iy < grid_h; iy++) {
      float y = start_h + ph * bin_h + ((float)iy + 0.5f) * bin_h / (float)grid_h;
      for (int ix = 0; ix < grid_w; ix++) {
        float x = start_w + pw * bin_w + ((float)ix + 0.5f) * bin_w / (float)grid_w;
        acc += bilinear(in, height, width, y, x);
      }
    }
    output[index] = acc / count;
  }
}

extern "C" __global__ void roi_align_backward(long long nthreads, const float* grad_output, float spatial_scale,
    int channels, int height, int width, int pooled_height, int pooled_width, int sampling_ratio,
    int aligned, const float* rois, float* grad_input) {
  for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < nthreads;
       index += (long long)blockDim.x * gridDim.x) {
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
    float* gin = grad_input + ((long long)batch * channels + c) * height * width;
    float g = grad_output[index];
    int grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_h / pooled_height);
    int grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_w / pooled_width);
    float count = fmaxf((float)(grid_h * grid_w), 1.0f);
    for (int iy = 0; iy < grid_h; iy++) {
      float y = start_h + ph * bin_h + ((float)iy + 0.5f) * bin_h / (float)grid_h;
      for (int ix = 0; ix < grid_w; ix++) {
        float x = start_w + pw * bin_w + ((float)ix + 0.5f) * bin_w / (float)grid_w;
        if (y < -1.0f || y > height || x < -1.0f || x > width) continue;
        float yy = y <= 0 ? 0 : y, xx = x <= 0 ? 0 : x;
        int y_low = (int)yy, x_low = (int)xx, y_high, x_high;
        if (y_low >= height - 1) { y_high = y_low = height - 1; yy = (float)y_low; } else { y_high = y_low + 1; }
        if (x_low >= width - 1) { x_high = x_low = width - 1; xx = (float)x_low; } else { x_high = x_low + 1; }
        float ly = yy - y_low, lx = xx - x_low, hy = 1.0f - ly, hx = 1.0f - lx;
        atomicAdd(gin + y_low * width + x_low, g * hy * hx / count);
        atomicAdd(gin + y_low * width + x_high, g * hy * lx / count);
        atomicAdd(gin + y_high * width + x_low, g * ly * hx / count);
        atomicAdd(gin + y_high * width + x_high, g * ly * lx / count);
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
    std::panic::catch_unwind(|| {
        // SAFETY: the shim passes live tensors for the duration of the call.
        let (i, r, o) = unsafe { (borrowed(input), borrowed(rois), borrowed(output)) };
        launch("roi_align_forward", &i, &r, &o, &i.size(), scale, (ph, pw), sr, aligned != 0).map_or(-1, |()| 0)
    })
    .unwrap_or(-1)
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
    std::panic::catch_unwind(|| {
        // SAFETY: as in `forward_callback`.
        let (g, r, gi) = unsafe { (borrowed(grad_output), borrowed(rois), borrowed(grad_input)) };
        launch("roi_align_backward", &g, &r, &gi, &gi.size(), scale, (ph, pw), sr, aligned != 0).map_or(-1, |()| 0)
    })
    .unwrap_or(-1)
}

/// RoIAlign of `input` `[N, C, H, W]` (CUDA; computed in float32) over
/// `rois` `[K, 5]`, as [`crate::ops::roi_align`] with the same arguments,
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
