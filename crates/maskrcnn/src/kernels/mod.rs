//! CUDA kernels compiled at run time by NVRTC (through cudarc) and launched
//! on the legacy default stream, so they run in order with libtorch's work
//! on the same tensors (DESIGN.md). Each kernel has a tch-based fallback:
//! when CUDA, the driver or NVRTC is unavailable the callers take it.

pub mod nms;
pub mod roi_align;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The compiled kernels of one device.
pub(crate) struct DeviceKernels {
    pub stream: Arc<CudaStream>,
    pub functions: HashMap<&'static str, CudaFunction>,
}

/// Every kernel source with the functions it defines.
const SOURCES: &[(&str, &[&str])] =
    &[(roi_align::SOURCE, &["roi_align_forward", "roi_align_backward"]), (nms::SOURCE, &["nms_suppression_bits"])];

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

fn build(index: usize) -> Result<DeviceKernels, String> {
    let ctx = CudaContext::new(index).map_err(|e| e.to_string())?;
    // The null stream is CUDA's legacy default stream, libtorch's stream.
    let stream = ctx.default_stream();
    let mut functions = HashMap::new();
    for (src, names) in SOURCES {
        let ptx = cudarc::nvrtc::compile_ptx(src).map_err(|e| crate::text::one_line(&e.to_string()))?;
        let module = ctx.load_module(ptx).map_err(|e| e.to_string())?;
        for name in *names {
            functions.insert(*name, module.load_function(name).map_err(|e| e.to_string())?);
        }
    }
    Ok(DeviceKernels { stream, functions })
}
