//! CUDA kernels compiled at run time by NVRTC (through cudarc) and launched
//! on libtorch's current CUDA stream, so they run in order with libtorch's
//! work on the same tensors and are recorded by a CUDA graph capture
//! (docs/ARCHITECTURE.md). Each kernel has a tch-based fallback: when CUDA, the driver
//! or NVRTC is unavailable the callers take it.

/// CUDA source of float32 ↔ fp16/bf16 conversions shared by the kernels
/// (NVRTC compiles without the CUDA headers): `load_val(p)` of a float,
/// `load_val(p, bf16)` of a 16-bit value (bf16 or fp16 by the flag),
/// `store_half(v, bf16)` rounding to nearest even (NaN stays NaN).
macro_rules! half_conversions {
    () => {
        r#"
__device__ __forceinline__ float load_val(const float* p) { return *p; }
__device__ __forceinline__ float load_val(const unsigned short* p, int bf16) {
  if (bf16) return __uint_as_float(((unsigned int)*p) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(*p));
  return f;
}
__device__ __forceinline__ unsigned short store_half(float v, int bf16) {
  if (bf16) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
  }
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
"#
    };
}
pub(crate) use half_conversions;

pub mod epilogue;
pub mod host_value;
pub mod matcher;
pub mod max_pool;
pub mod nms;
pub mod paste;
pub mod polygon;
pub mod roi_align;
pub mod timing;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels' name suffix for `kind`, their `bf16` flag (half types share
/// one 16-bit code path) and how many values fill a 16-byte vector.
pub(crate) fn dtype_suffix(kind: tch::Kind) -> Option<(&'static str, i32, i64)> {
    match kind {
        tch::Kind::Float => Some(("f32", 0, 4)),
        tch::Kind::Half => Some(("f16", 0, 8)),
        tch::Kind::BFloat16 => Some(("bf16", 1, 8)),
        _ => None,
    }
}

/// Threads per block of the one-dimensional launches.
pub(crate) const BLOCK_THREADS: i64 = 256;

/// Blocks of [`BLOCK_THREADS`] threads covering `items` work items, at
/// least 1 and at most `max_blocks` (kernels that loop over a grid stride
/// take a cap; the others pass one their sizes never reach).
pub(crate) fn blocks_for(items: i64, max_blocks: i64) -> i64 {
    ((items + BLOCK_THREADS - 1) / BLOCK_THREADS).clamp(1, max_blocks)
}

/// A one-dimensional launch of `blocks` blocks of [`BLOCK_THREADS`] threads.
pub(crate) fn launch_1d(blocks: i64) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether `t` is a dense 4-D channels-last (NHWC) tensor: strides
/// (H·W·C, 1, W·C, C). A tensor with one channel or one pixel is also
/// contiguous; callers that care check that first.
pub fn is_channels_last(t: &tch::Tensor) -> bool {
    let size = t.size();
    if size.len() != 4 {
        return false;
    }
    let (s, c, h, w) = (t.stride(), size[1], size[2], size[3]);
    s[1] == 1 && s[3] == c && s[2] == w * c && (size[0] == 1 || s[0] == h * w * c)
}

/// The compiled kernels of one device.
pub(crate) struct DeviceKernels {
    context: Arc<CudaContext>,
    index: usize,
    functions: HashMap<&'static str, CudaFunction>,
}

impl DeviceKernels {
    /// libtorch's current stream on this device, borrowed for a launch
    /// (the legacy default stream when libtorch has not set another).
    pub fn stream(&self) -> Arc<CudaStream> {
        let raw = crate::shim::current_cuda_stream(self.index);
        if raw.is_null() {
            return self.context.default_stream();
        }
        // SAFETY: libtorch owns the stream and keeps it alive for the
        // process; launches on it are ordered with libtorch's own work.
        unsafe { self.context.wrap_borrowed_stream(raw as cudarc::driver::sys::CUstream) }
    }

    /// The kernel `name` (one of [`SOURCES`]' function names).
    pub fn function(&self, name: &str) -> Option<&CudaFunction> {
        self.functions.get(name)
    }
}

/// Every kernel source with the functions it defines.
const SOURCES: &[(&str, &[&str])] = &[
    (
        roi_align::SOURCE,
        &[
            "roi_align_multilevel_forward_f32",
            "roi_align_multilevel_forward_f16",
            "roi_align_multilevel_forward_bf16",
            "roi_align_multilevel_forward_half_x8",
            "roi_align_multilevel_backward_f32",
            "roi_align_multilevel_backward_f16",
            "roi_align_multilevel_backward_bf16",
            "bitmap_mask_targets",
        ],
    ),
    (nms::SOURCE, &["nms_suppression_bits", "nms_greedy"]),
    (
        epilogue::SOURCE,
        &[
            "epilogue_f32_forward",
            "epilogue_f16_forward",
            "epilogue_bf16_forward",
            "epilogue_f32_backward",
            "epilogue_f16_backward",
            "epilogue_bf16_backward",
            "epilogue_f32_sum2x2",
            "epilogue_f16_sum2x2",
            "epilogue_bf16_sum2x2",
            "epilogue_f32_bias_backward",
            "epilogue_f16_bias_backward",
            "epilogue_bf16_bias_backward",
        ],
    ),
    (matcher::SOURCE, &["match_best_per_gt", "match_assign"]),
    (max_pool::SOURCE, &["max_pool_3x3s2_f32", "max_pool_3x3s2_half"]),
    (polygon::SOURCE, &["polygon_mask_targets"]),
    (paste::SOURCE, &["paste_masks_run_edges"]),
    (timing::SOURCE, &["spin_ns"]),
    (host_value::SOURCE, &["publish_i64"]),
];

/// The result of launching kernel `name` as an `Option` for the caller's
/// fallback; a failed launch is logged once per kernel, so a broken kernel
/// does not hide behind the tensor-op path.
pub(crate) fn launched<T, E: std::fmt::Display>(name: &str, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            static LOGGED: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
            let mut logged = LOGGED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
            if logged.insert(name.to_string()) {
                tracing::warn!("CUDA kernel {name} failed to launch ({e}); using the tensor-op fallback");
            }
            None
        }
    }
}

/// The kernels of CUDA device `index`, compiled on first use (`None` when
/// they cannot be built; the reason is logged once).
pub(crate) fn device_kernels(index: usize) -> Option<Arc<DeviceKernels>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Option<Arc<DeviceKernels>>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(index)
        .or_insert_with(|| match build(index) {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                tracing::warn!("CUDA kernels unavailable on cuda:{index} ({e}); using the tensor-op fallbacks");
                None
            }
        })
        .clone()
}

/// NVRTC opens its builtins library by name at the first compile, which
/// finds it only on the loader's search path. Opening it first from here
/// (whose run path includes the wheel's CUDA library folder) lets NVRTC
/// find it loaded already.
fn preload_nvrtc_builtins() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for name in ["libnvrtc-builtins.so.13.0", "libnvrtc-builtins.so"] {
            // SAFETY: loads a library without initialization side effects
            // that matter here; it stays loaded for the process.
            if let Ok(lib) = unsafe { libloading::Library::new(name) } {
                std::mem::forget(lib);
                return;
            }
        }
    });
}

/// PTX of `src` for virtual architecture `arch` (e.g. "compute_90"; the
/// kernels use sm_90's vector atomics where the device has them).
fn compile(src: &str, arch: &'static str) -> Result<cudarc::nvrtc::Ptx, String> {
    let options = cudarc::nvrtc::CompileOptions { arch: Some(arch), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(src, options).map_err(|e| crate::text::one_line(&e.to_string()))
}

/// The virtual architecture of a device of compute capability `major.minor`.
fn arch_name(major: i32, minor: i32) -> &'static str {
    static NAMES: OnceLock<Mutex<HashMap<(i32, i32), &'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    names.entry((major, minor)).or_insert_with(|| Box::leak(format!("compute_{major}{minor}").into_boxed_str()))
}

fn build(index: usize) -> Result<DeviceKernels, String> {
    preload_nvrtc_builtins();
    let context = CudaContext::new(index).map_err(|e| e.to_string())?;
    let (major, minor) = context.compute_capability().map_err(|e| e.to_string())?;
    let arch = arch_name(major, minor);
    let mut functions = HashMap::new();
    for (src, names) in SOURCES {
        let ptx = compile(src, arch)?;
        let module = context.load_module(ptx).map_err(|e| e.to_string())?;
        for name in *names {
            functions.insert(*name, module.load_function(name).map_err(|e| e.to_string())?);
        }
    }
    Ok(DeviceKernels { context, index, functions })
}

/// Compiles every kernel source with NVRTC (no GPU needed) for the oldest
/// architecture CUDA 13 supports and for Hopper's (where paths of their
/// own are compiled). `None` when the NVRTC library cannot be loaded;
/// otherwise the first compile error.
pub fn compile_all() -> Option<Result<(), String>> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return None;
    }
    preload_nvrtc_builtins();
    Some(["compute_75", "compute_90"].iter().try_for_each(|arch| {
        SOURCES.iter().try_for_each(|(src, names)| {
            let text = compile(src, arch)?.to_src();
            match names.iter().find(|n| !text.contains(&format!(".entry {n}("))) {
                Some(missing) => Err(format!("kernel {missing} is not in the module compiled for {arch}")),
                None => Ok(()),
            }
        })
    }))
}

#[cfg(test)]
mod tests {
    /// Every kernel source compiles with NVRTC and defines the functions
    /// the launchers look up (skips where NVRTC is absent).
    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        match super::compile_all() {
            None => crate::environment::skip_gpu_test("every_kernel_compiles_with_nvrtc", "NVRTC library not found"),
            Some(result) => result.unwrap(),
        }
    }
}
