//! What `maskrcnn env` reports: versions of this crate, tch and the libtorch
//! actually loaded, CUDA/cuDNN, devices and threads.

use std::fmt;
use std::path::PathBuf;

/// A snapshot of the runtime environment.
#[derive(Debug, Clone)]
pub struct EnvReport {
    pub maskrcnn_version: &'static str,
    pub tch_version: &'static str,
    /// `torch.__version__` of the libtorch this process loaded (read from the
    /// `version.py` beside it), e.g. `2.11.0+cu130`.
    pub libtorch_version: Option<String>,
    /// Folder of the loaded `libtorch_cpu.so`.
    pub libtorch_dir: Option<PathBuf>,
    /// Folder libtorch was linked from at build time.
    pub libtorch_build_dir: &'static str,
    /// Whether the loaded libtorch has its CUDA library (`libtorch_cuda.so`).
    pub built_with_cuda: bool,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    /// cuDNN version as libtorch reports it (e.g. 91900 for 9.19.0).
    pub cudnn_version: Option<i64>,
    /// CUDA runtime version (e.g. 13000 for 13.0).
    pub cuda_runtime_version: Option<i64>,
    pub devices: Vec<CudaDeviceInfo>,
    pub intra_op_threads: i32,
    pub logical_cpus: usize,
}

impl EnvReport {
    /// Gathers the report; touches CUDA only when libtorch says it is available.
    pub fn collect() -> EnvReport {
        let cuda_available = tch::Cuda::is_available();
        let devices = if cuda_available { cuda_devices() } else { Vec::new() };
        let libtorch_dir = loaded_libtorch_dir();
        let libtorch_version = libtorch_dir.as_ref().and_then(|d| read_torch_version(d));
        let built_with_cuda = libtorch_dir.as_ref().is_some_and(|d| d.join("libtorch_cuda.so").exists());
        EnvReport {
            maskrcnn_version: env!("CARGO_PKG_VERSION"),
            tch_version: "0.24.0",
            libtorch_version,
            libtorch_dir,
            libtorch_build_dir: env!("MASKRCNN_BUILD_LIBTORCH"),
            built_with_cuda,
            cuda_available,
            cudnn_available: cuda_available && tch::Cuda::cudnn_is_available(),
            cudnn_version: cuda_available.then(tch::utils::version_cudnn).filter(|&v| v > 0),
            cuda_runtime_version: cuda_available.then(tch::utils::version_cudart).filter(|&v| v > 0),
            devices,
            intra_op_threads: tch::get_num_threads(),
            logical_cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        }
    }
}

/// The device of a test that needs CUDA: the first GPU, or `None` after
/// [`skip_gpu_test`] has said why.
pub fn cuda_for_test(test: &str) -> Option<tch::Device> {
    if tch::Cuda::is_available() {
        return Some(tch::Device::Cuda(0));
    }
    skip_gpu_test(test, "no CUDA device");
    None
}

/// Says on stderr that GPU test `test` does not run here (`why`) and, when
/// `MASKRCNN_SKIP_LOG` names a file, appends its name there as one line
/// (`make test` counts them, so a CPU run says how many GPU tests did not
/// run). With `MASKRCNN_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh` on
/// the GPU machine) it fails the test instead.
pub fn skip_gpu_test(test: &str, why: &str) {
    assert!(
        std::env::var("MASKRCNN_REQUIRE_CUDA").as_deref() != Ok("1"),
        "{test} cannot run ({why}), and MASKRCNN_REQUIRE_CUDA=1 says it must"
    );
    eprintln!("skipped {test}: {why} (run it on a GPU machine with scripts/gpu-check.sh)");
    if let Some(log) = std::env::var_os("MASKRCNN_SKIP_LOG") {
        use std::io::Write;
        // One short append per line: lines of concurrent tests do not mix.
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = f.write_all(format!("{test}\n").as_bytes());
        }
    }
}

/// Properties of one CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub index: usize,
    pub name: String,
    pub total_memory_bytes: usize,
    /// Compute capability (major, minor), e.g. (9, 0) for Hopper.
    pub capability: (i32, i32),
    pub multiprocessors: i32,
}

/// The CPUs this process may run on (its affinity mask and cgroup quota:
/// under `maskrcnn launch`, its rank's share).
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CUDA device `index` as the driver lists it (read once per process).
pub fn cuda_device(index: usize) -> Option<CudaDeviceInfo> {
    static DEVICES: std::sync::OnceLock<Vec<CudaDeviceInfo>> = std::sync::OnceLock::new();
    DEVICES.get_or_init(cuda_devices).iter().find(|d| d.index == index).cloned()
}

/// Every CUDA device the driver lists (through the driver API, which needs
/// no context). Empty when there is no driver.
pub fn cuda_devices() -> Vec<CudaDeviceInfo> {
    use cudarc::driver::{result, sys};
    // SAFETY: only probes whether libcuda can be opened.
    if !unsafe { sys::is_culib_present() } || result::init().is_err() {
        return Vec::new();
    }
    let count = result::device::get_count().unwrap_or(0).max(0);
    (0..count)
        .filter_map(|i| {
            let dev = result::device::get(i).ok()?;
            let attr = |a| {
                // SAFETY: `dev` is a valid device handle from the driver.
                unsafe { result::device::get_attribute(dev, a) }.unwrap_or(-1)
            };
            use sys::CUdevice_attribute::*;
            Some(CudaDeviceInfo {
                index: i as usize,
                name: result::device::get_name(dev).ok()?,
                // SAFETY: as above.
                total_memory_bytes: unsafe { result::device::total_mem(dev) }.unwrap_or(0),
                capability: (
                    attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                    attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                ),
                multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            })
        })
        .collect()
}

/// Finds the folder of the `libtorch_cpu.so` mapped into this process.
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| PathBuf::from(p).parent().map(PathBuf::from))
}

/// Reads `__version__` from `<torch>/version.py`, the file next to `lib/`.
fn read_torch_version(lib_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(lib_dir.parent()?.join("version.py")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_string())
}

fn dotted(v: i64, minor_div: i64, patch: bool) -> String {
    // cuDNN: 91900 -> 9.19.0 ; CUDA: 13000 -> 13.0
    let major = v / (minor_div * 100);
    let minor = (v / minor_div) % 100;
    if patch {
        format!("{major}.{minor}.{}", v % minor_div)
    } else {
        format!("{major}.{minor}")
    }
}

impl fmt::Display for EnvReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let na = || "n/a".to_string();
        writeln!(f, "maskrcnn          {}", self.maskrcnn_version)?;
        writeln!(f, "tch               {}", self.tch_version)?;
        writeln!(f, "libtorch          {}", self.libtorch_version.clone().unwrap_or_else(|| "unknown".into()))?;
        writeln!(
            f,
            "libtorch loaded   {}",
            self.libtorch_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_else(|| "unknown".into())
        )?;
        writeln!(f, "libtorch built    {}", self.libtorch_build_dir)?;
        writeln!(f, "built with CUDA   {}", self.built_with_cuda)?;
        writeln!(f, "CUDA available    {}", self.cuda_available)?;
        writeln!(
            f,
            "CUDA runtime      {}",
            self.cuda_runtime_version.map(|v| dotted(v, 10, false)).unwrap_or_else(na)
        )?;
        writeln!(
            f,
            "cuDNN             {}",
            if self.cudnn_available {
                self.cudnn_version.map(|v| dotted(v, 100, true)).unwrap_or_else(na)
            } else {
                na()
            }
        )?;
        writeln!(f, "CUDA devices      {}", self.devices.len())?;
        for d in &self.devices {
            writeln!(
                f,
                "  cuda:{}          {} ({:.1} GiB, sm_{}{}, {} SMs)",
                d.index,
                d.name,
                d.total_memory_bytes as f64 / (1u64 << 30) as f64,
                d.capability.0,
                d.capability.1,
                d.multiprocessors
            )?;
        }
        writeln!(f, "torch threads     {}", self.intra_op_threads)?;
        write!(f, "logical CPUs      {}", self.logical_cpus)
    }
}

/// Peak GPU memory allocated by libtorch on `device`, GiB (0 on the CPU).
pub fn cuda_peak_memory_gib(device: tch::Device) -> f64 {
    match device {
        tch::Device::Cuda(i) => crate::shim::cuda_peak_allocated(i).map_or(0.0, |b| b as f64 / (1u64 << 30) as f64),
        _ => 0.0,
    }
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::dotted;

    #[test]
    fn versions_print_dotted() {
        assert_eq!(dotted(91900, 100, true), "9.19.0");
        assert_eq!(dotted(13000, 10, false), "13.0");
        assert_eq!(dotted(12080, 10, false), "12.8");
    }
}
