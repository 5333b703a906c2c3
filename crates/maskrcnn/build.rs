//! Links the binary to the libtorch that tch was built against and compiles
//! the small C++ shim (`cpp/shim.cpp`) that reaches libtorch APIs tch lacks.
//!
//! torch-sys exports its library folder as `DEP_TCH_LIBTORCH_LIB`. We record it
//! as the run path, so `maskrcnn` runs from the build tree without
//! `LD_LIBRARY_PATH`; the entry is a RUNPATH, so an `LD_LIBRARY_PATH` set on
//! another machine (the GPU machine's torch) still takes precedence.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=cpp/shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = match env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => panic!(
            "torch-sys did not report its libtorch folder; build through `make build` \
             (it sets LIBTORCH_USE_PYTORCH=1 and the project's .venv)"
        ),
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=MASKRCNN_BUILD_LIBTORCH={}", lib.display());

    let torch_root = lib.parent().map(PathBuf::from).unwrap_or_default();
    // The CUDA runtime headers and NVRTC of torch's wheel (the nvidia-*-cu13
    // packages beside torch): with them the shim reaches libtorch's CUDA
    // streams, and NVRTC is found at run time without
    // LD_LIBRARY_PATH (tests compile the kernels even on a machine without
    // a GPU).
    let nvidia = torch_root.parent().map(|p| p.join("nvidia").join("cu13")).unwrap_or_default();
    let cuda_include = nvidia.join("include");
    let with_cuda = cuda_include.join("cuda_runtime_api.h").exists() && lib.join("libtorch_cuda.so").exists();
    if nvidia.join("lib").exists() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nvidia.join("lib").display());
    }
    let mut build = cc::Build::new();
    if with_cuda {
        build.define("MRCNN_WITH_CUDA", None).include(&cuda_include);
    }
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .include(torch_root.join("include"))
        .include(torch_root.join("include").join("torch").join("csrc").join("api").join("include"))
        .file("cpp/shim.cpp")
        .compile("maskrcnn_shim");
    // Nothing in Rust calls into libtorch_cuda directly, so the default
    // `--as-needed` would drop it and libtorch would not see CUDA at all.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
