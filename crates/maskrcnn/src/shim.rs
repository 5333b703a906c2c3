//! Safe wrappers over `cpp/shim.cpp`: libtorch APIs that tch 0.24 lacks.

use std::ffi::{c_char, c_double, c_int, CStr};
use tch::Tensor;

/// tch's opaque tensor handle (`at::Tensor*` on the C++ side).
type Handle = *mut torch_sys::C_tensor;

extern "C" {
    fn mrcnn_set_tf32(enabled: c_int) -> c_int;
    fn mrcnn_tf32_enabled() -> c_int;
    fn mrcnn_autocast_cuda(enabled: c_int, dtype: c_int) -> c_int;
    fn mrcnn_autocast_cuda_set_enabled(enabled: c_int) -> c_int;
    fn mrcnn_autocast_cuda_state() -> c_int;
    fn mrcnn_last_error() -> *const c_char;
    fn mrcnn_non_finite_check_and_unscale(
        grads: *const Handle,
        n: c_int,
        found_inf: Handle,
        inv_scale: Handle,
    ) -> c_int;
    fn mrcnn_empty_pinned(n: i64, out: *mut Handle) -> c_int;
    fn mrcnn_set_multilevel_roi_align_callbacks(forward: MultiLevelForward, backward: MultiLevelBackward);
    fn mrcnn_multilevel_roi_align(
        features: *const Handle,
        n: c_int,
        rois: Handle,
        levels: Handle,
        scales: *const c_double,
        ph: i64,
        pw: i64,
        sr: i64,
        aligned: c_int,
        out: *mut Handle,
    ) -> c_int;
    fn mrcnn_set_epilogue_callbacks(
        forward: EpilogueForward,
        backward: EpilogueBackward,
        sum2x2: Sum2x2,
        bias_backward: BiasBackward,
    );
    fn mrcnn_epilogue(
        y: Handle,
        scale: Handle,
        shift: Handle,
        residual: Handle,
        rscale: Handle,
        rshift: Handle,
        relu: c_int,
        upsampled: c_int,
        out: *mut Handle,
    ) -> c_int;
    fn mrcnn_set_grad(param: Handle, grad: Handle) -> c_int;
    fn mrcnn_set_post_accumulate_hook(
        param: Handle,
        callback: Option<PostAccumulateCallback>,
        ctx: *mut std::ffi::c_void,
        index: c_int,
    ) -> c_int;
    fn mrcnn_foreach_zero(ts: *const Handle, n: c_int) -> c_int;
    fn mrcnn_foreach_total_norm(ts: *const Handle, n: c_int, out: *mut Handle) -> c_int;
    fn mrcnn_foreach_mul(ts: *const Handle, n: c_int, factor: Handle) -> c_int;
    fn mrcnn_fused_sgd(
        params: *const Handle,
        grads: *const Handle,
        bufs: *const Handle,
        n: c_int,
        weight_decay: c_double,
        momentum: c_double,
        lr: Handle,
        is_first_step: c_int,
        grad_scale: Handle,
        found_inf: Handle,
    ) -> c_int;
    fn mrcnn_sync_counter_enable(enabled: c_int) -> c_int;
    fn mrcnn_sync_count() -> i64;
    fn mrcnn_current_cuda_stream(device: c_int) -> *mut std::ffi::c_void;
    fn mrcnn_cuda_memory(device: c_int, what: c_int) -> i64;
    fn mrcnn_cuda_empty_cache() -> c_int;
    fn mrcnn_pin(t: Handle, out: *mut Handle) -> c_int;
    fn mrcnn_tensor_version(t: Handle) -> i64;
    fn mrcnn_graph_new() -> *mut std::ffi::c_void;
    fn mrcnn_graph_capture_begin(g: *mut std::ffi::c_void, device: c_int, share: *mut std::ffi::c_void) -> c_int;
    fn mrcnn_graph_capture_end(g: *mut std::ffi::c_void) -> c_int;
    fn mrcnn_graph_replay(g: *mut std::ffi::c_void) -> c_int;
    fn mrcnn_graph_free(g: *mut std::ffi::c_void);
}

/// `(features, n, rois, levels, scales, output, ph, pw, sr, aligned)`.
pub type MultiLevelForward =
    extern "C" fn(*const Handle, c_int, Handle, Handle, *const c_double, Handle, i64, i64, i64, c_int) -> c_int;
/// `(grad_output, rois, levels, scales, grad_features, n, ph, pw, sr, aligned)`.
pub type MultiLevelBackward =
    extern "C" fn(Handle, Handle, Handle, *const c_double, *const Handle, c_int, i64, i64, i64, c_int) -> c_int;

/// Registers the kernels that the shim's multi-level RoIAlign autograd
/// function launches (`kernels::roi_align` does, before its first use).
pub fn set_multilevel_roi_align_callbacks(forward: MultiLevelForward, backward: MultiLevelBackward) {
    // SAFETY: stores two function pointers that live for the whole program.
    unsafe { mrcnn_set_multilevel_roi_align_callbacks(forward, backward) }
}

/// Multi-level RoIAlign through the shim's autograd function, whose forward
/// and backward launch the callbacks registered with
/// [`set_multilevel_roi_align_callbacks`]:
/// RoI `k` (`rois` `[K, 5]`) is pooled from `features[levels[k]]` at
/// `scales[levels[k]]`. Output `[K, C, ph, pw]` in the features' dtype and
/// memory format; the gradient flows back to every level.
#[allow(clippy::too_many_arguments)]
pub fn multilevel_roi_align_autograd(
    features: &[&Tensor],
    rois: &Tensor,
    levels: &Tensor,
    scales: &[f64],
    output_size: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
) -> Result<Tensor, ShimError> {
    assert_eq!(features.len(), scales.len(), "multilevel_roi_align: one scale per level");
    let f = handles(features);
    let mut out: Handle = std::ptr::null_mut();
    // SAFETY: live tensors borrowed for the call; on success the shim hands
    // over a new heap-allocated at::Tensor.
    check(unsafe {
        mrcnn_multilevel_roi_align(
            f.as_ptr(),
            f.len() as c_int,
            rois.as_ptr() as Handle,
            levels.as_ptr() as Handle,
            scales.as_ptr(),
            output_size.0,
            output_size.1,
            sampling_ratio,
            c_int::from(aligned),
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `(y, scale, shift, residual, rscale, rshift, out, mode)`, optional ones
/// null; `mode` bit 0: ReLU, bit 1: the residual is upsampled 2× (nearest).
pub type EpilogueForward = extern "C" fn(Handle, Handle, Handle, Handle, Handle, Handle, Handle, c_int) -> c_int;
/// `(grad, out, scale, rscale, grad_y, grad_residual)`, optional ones null.
pub type EpilogueBackward = extern "C" fn(Handle, Handle, Handle, Handle, Handle, Handle) -> c_int;
/// `(grad [N, C, H, W], grad_small [N, C, H/2, W/2])`: sums of 2×2 blocks
/// (the gradient of a 2× nearest upsampling).
pub type Sum2x2 = extern "C" fn(Handle, Handle) -> c_int;
/// `(grad, out, masked, grad_shift)`: a bias's gradient (`out`, `masked`
/// null without ReLU).
pub type BiasBackward = extern "C" fn(Handle, Handle, Handle, Handle) -> c_int;

/// Registers the kernels that the shim's convolution-epilogue autograd
/// function launches (`kernels::epilogue` does, before its first use).
pub fn set_epilogue_callbacks(
    forward: EpilogueForward,
    backward: EpilogueBackward,
    sum2x2: Sum2x2,
    bias_backward: BiasBackward,
) {
    // SAFETY: stores function pointers that live for the whole program.
    unsafe { mrcnn_set_epilogue_callbacks(forward, backward, sum2x2, bias_backward) }
}

/// `act(y·scale + shift + (residual·rscale + rshift))` through the shim's
/// autograd function (kernels registered with [`set_epilogue_callbacks`]);
/// gradients for `y`, `residual` and `shift`. With `upsampled` the
/// residual is `[N, C, H/2, W/2]`, read 2× nearest-upsampled. Fails when
/// the kernel rejects the tensors.
#[allow(clippy::too_many_arguments)]
pub fn epilogue_autograd(
    y: &Tensor,
    scale: Option<&Tensor>,
    shift: &Tensor,
    residual: Option<&Tensor>,
    rscale: Option<&Tensor>,
    rshift: Option<&Tensor>,
    relu: bool,
    upsampled: bool,
) -> Result<Tensor, ShimError> {
    let mut out: Handle = std::ptr::null_mut();
    let opt = |t: Option<&Tensor>| t.map_or(std::ptr::null_mut(), |t| t.as_ptr() as Handle);
    // SAFETY: live tensors (optional ones null) borrowed for the call; on
    // success the shim hands over a new heap-allocated at::Tensor.
    check(unsafe {
        mrcnn_epilogue(
            y.as_ptr() as Handle,
            opt(scale),
            shift.as_ptr() as Handle,
            opt(residual),
            opt(rscale),
            opt(rshift),
            c_int::from(relu),
            c_int::from(upsampled),
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Makes `grad` (shaped as `param`, same dtype and device) the gradient
/// tensor of `param`: backward accumulates into it in place from then on.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), ShimError> {
    // SAFETY: live tensors borrowed for the call.
    check(unsafe { mrcnn_set_grad(param.as_ptr() as Handle, grad.as_ptr() as Handle) })
}

/// Called on the autograd thread once backward has accumulated a
/// parameter's gradient: `(ctx, index, stream)`, `stream` being the raw
/// `CUstream` the accumulation ran on (null off CUDA). It must not unwind.
pub type PostAccumulateCallback = extern "C" fn(*mut std::ffi::c_void, c_int, *mut std::ffi::c_void);

/// Makes `callback(ctx, index, stream)` run after every backward pass has
/// accumulated `param`'s gradient (`None`: removes it). One hook per
/// parameter; `param` must be a leaf that requires grad.
///
/// # Safety
/// `ctx` must stay valid for `callback` until the hook is removed.
pub unsafe fn set_post_accumulate_hook(
    param: &Tensor,
    hook: Option<(PostAccumulateCallback, *mut std::ffi::c_void, usize)>,
) -> Result<(), ShimError> {
    let (callback, ctx, index) = match hook {
        Some((f, ctx, index)) => (Some(f), ctx, index as c_int),
        None => (None, std::ptr::null_mut(), 0),
    };
    // SAFETY: a live tensor borrowed for the call; the caller keeps `ctx` alive.
    check(unsafe { mrcnn_set_post_accumulate_hook(param.as_ptr() as Handle, callback, ctx, index) })
}

/// Sets every tensor of `ts` to zero (one multi-tensor kernel per device
/// and dtype group).
pub fn foreach_zero(ts: &[&Tensor]) -> Result<(), ShimError> {
    let h = handles(ts);
    // SAFETY: live tensors borrowed for the call.
    check(unsafe { mrcnn_foreach_zero(h.as_ptr(), h.len() as c_int) })
}

/// The L2 norm of all of `ts` together, a float32 scalar on their device
/// (no host sync).
pub fn foreach_total_norm(ts: &[&Tensor]) -> Result<Tensor, ShimError> {
    let h = handles(ts);
    let mut out: Handle = std::ptr::null_mut();
    // SAFETY: as in `foreach_zero`; on success the shim hands over a new tensor.
    check(unsafe { mrcnn_foreach_total_norm(h.as_ptr(), h.len() as c_int, &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Multiplies every tensor of `ts` in place by the 1-element tensor `factor`.
pub fn foreach_mul(ts: &[&Tensor], factor: &Tensor) -> Result<(), ShimError> {
    let h = handles(ts);
    // SAFETY: as in `foreach_zero`.
    check(unsafe { mrcnn_foreach_mul(h.as_ptr(), h.len() as c_int, factor.as_ptr() as Handle) })
}

/// Counts libtorch's device→host synchronizations from now on (CUDA sync
/// debug mode "warn", warnings counted instead of printed). `false` when
/// libtorch has no CUDA.
pub fn enable_sync_counter(enabled: bool) -> bool {
    // SAFETY: flips a flag of libc10_cuda and installs a handler that lives
    // for the whole program.
    unsafe { mrcnn_sync_counter_enable(c_int::from(enabled)) == 0 }
}

/// Synchronizations libtorch reported since counting was enabled.
pub fn sync_count() -> i64 {
    // SAFETY: reads an atomic counter.
    unsafe { mrcnn_sync_count() }
}

/// libtorch's current CUDA stream on device `index` (raw `CUstream`), or
/// null without CUDA.
pub fn current_cuda_stream(index: usize) -> *mut std::ffi::c_void {
    // SAFETY: reads libtorch's thread-local stream; exceptions are caught.
    unsafe { mrcnn_current_cuda_stream(index as c_int) }
}

/// A CUDA graph (libtorch's `at::cuda::CUDAGraph`): the device work that a
/// closure issues is recorded once and replayed later with one launch, on
/// the same memory (the graph's private pool). Tensors the closure made are
/// the graph's outputs; every replay rewrites them in place.
pub struct CudaGraph(std::ptr::NonNull<std::ffi::c_void>);

// SAFETY: the graph is a plain libtorch object used by one thread at a time
// (callers hold it behind a Mutex).
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Records the device work of `f` on CUDA device `device`: it runs on
    /// the host once, on a side stream in capture mode, so nothing executes
    /// (call [`replay`](Self::replay) for that). `f` must not synchronize
    /// with the host. With `share`, the new graph records into that graph's
    /// memory pool (graphs replayed one at a time then need the memory of
    /// the largest, not the sum; each keeps its outputs). Errors carry
    /// libtorch's message.
    pub fn capture<R>(
        device: usize,
        share: Option<&CudaGraph>,
        f: impl FnOnce() -> R,
    ) -> Result<(CudaGraph, R), ShimError> {
        // SAFETY: creates a graph object owned by the returned value.
        let raw = unsafe { mrcnn_graph_new() };
        let Some(raw) = std::ptr::NonNull::new(raw) else {
            return Err(check(-1).unwrap_err());
        };
        let graph = CudaGraph(raw);
        // Work already queued (the static inputs' copies) finishes first.
        tch::Cuda::synchronize(device as i64);
        let share = share.map_or(std::ptr::null_mut(), |g| g.0.as_ptr());
        // SAFETY: live graphs (`share` recorded, or null); the capture
        // stream stays current on this thread until capture_end.
        check(unsafe { mrcnn_graph_capture_begin(graph.0.as_ptr(), device as c_int, share) })?;
        // A libtorch error while recording (tch panics on it) ends the
        // capture too, as an error (the panic itself not printed: the
        // caller reports the error in one line).
        let out = crate::text::quiet_panics(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        // SAFETY: ends the capture begun above on this thread.
        let ended = check(unsafe { mrcnn_graph_capture_end(graph.0.as_ptr()) });
        let out = out.map_err(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            ShimError(format!("recording failed: {}", crate::text::libtorch_message(message)))
        })?;
        ended?;
        Ok((graph, out))
    }

    /// Runs the recorded work on the current stream.
    pub fn replay(&self) -> Result<(), ShimError> {
        // SAFETY: a live, captured graph.
        check(unsafe { mrcnn_graph_replay(self.0.as_ptr()) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: frees the graph this value owns, once.
        unsafe { mrcnn_graph_free(self.0.as_ptr()) }
    }
}

/// `t`'s version counter: it changes whenever `t` is modified in place
/// (weights loaded, running statistics updated), so values derived from
/// `t` can be cached until then.
pub fn tensor_version(t: &Tensor) -> i64 {
    // SAFETY: reads a counter of a live tensor; exceptions are caught.
    unsafe { mrcnn_tensor_version(t.as_ptr() as Handle) }
}

/// A page-locked copy of CPU tensor `t` (host→GPU copies from it run
/// asynchronously); `t` itself when pinning fails (no CUDA).
pub fn pinned(t: &Tensor) -> Tensor {
    let mut out: Handle = std::ptr::null_mut();
    // SAFETY: `t` is a live tensor; on success the shim hands over a new
    // heap-allocated at::Tensor.
    match check(unsafe { mrcnn_pin(t.as_ptr() as Handle, &mut out) }) {
        Ok(()) => unsafe { Tensor::from_ptr(out) },
        Err(_) => t.shallow_clone(),
    }
}

/// Peak bytes libtorch has allocated on CUDA device `index` (None without CUDA).
pub fn cuda_peak_allocated(index: usize) -> Option<u64> {
    cuda_memory(index, 0)
}

/// Bytes libtorch's caching allocator holds on CUDA device `index` now:
/// `(allocated, reserved)` (None without CUDA).
pub fn cuda_memory_now(index: usize) -> Option<(u64, u64)> {
    Some((cuda_memory(index, 1)?, cuda_memory(index, 2)?))
}

/// Returns the CUDA caching allocator's unused cached memory to the driver,
/// the memory pools of dropped CUDA graphs included (libtorch frees those
/// only when an allocation fails, which it cannot do while recording a
/// graph). Waits for the device: call between steps, never while recording.
pub fn release_cached_cuda_memory() -> Result<(), ShimError> {
    // SAFETY: no arguments; the C side catches exceptions.
    check(unsafe { mrcnn_cuda_empty_cache() })
}

fn cuda_memory(index: usize, what: c_int) -> Option<u64> {
    // SAFETY: reads allocator statistics; the C side catches exceptions.
    let v = unsafe { mrcnn_cuda_memory(index as c_int, what) };
    u64::try_from(v).ok()
}

/// A libtorch call of the shim failed.
#[derive(Debug, thiserror::Error)]
#[error("libtorch: {0}")]
pub struct ShimError(pub(crate) String);

fn check(code: c_int) -> Result<(), ShimError> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to its thread-local message string.
    let msg = unsafe { CStr::from_ptr(mrcnn_last_error()) }.to_string_lossy();
    Err(ShimError(crate::text::libtorch_message(&msg)))
}

fn handles(ts: &[&Tensor]) -> Vec<Handle> {
    ts.iter().map(|t| t.as_ptr() as Handle).collect()
}

/// `torch.optim.SGD`'s fused step over `params` (in place): with weight
/// decay `wd`, `buf = momentum * buf + (grad + wd * param)` (`buf = that`
/// on the first step) and `param -= lr * buf`, the learning rate read from
/// the 1-element float tensor `lr` on the parameters' device (so a captured
/// step follows the schedule). `grad_scale` divides the gradients first; a
/// nonzero `found_inf` skips the step on the device.
#[allow(clippy::too_many_arguments)]
pub fn fused_sgd(
    params: &[&Tensor],
    grads: &[&Tensor],
    bufs: &[&Tensor],
    wd: f64,
    momentum: f64,
    lr: &Tensor,
    first_step: bool,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<(), ShimError> {
    assert!(params.len() == grads.len() && grads.len() == bufs.len(), "fused_sgd: list lengths differ");
    let (p, g, b) = (handles(params), handles(grads), handles(bufs));
    let opt = |t: Option<&Tensor>| t.map_or(std::ptr::null_mut(), |t| t.as_ptr() as Handle);
    // SAFETY: every handle is a live tensor borrowed for the call; the C
    // side copies the handles and catches exceptions.
    check(unsafe {
        mrcnn_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            p.len() as c_int,
            wd,
            momentum,
            lr.as_ptr() as Handle,
            c_int::from(first_step),
            opt(grad_scale),
            opt(found_inf),
        )
    })
}

/// Multiplies `grads` by `inv_scale` (1-element float tensor) in place and
/// sets `found_inf` (1-element float) to 1 when any value is not finite.
pub fn non_finite_check_and_unscale(
    grads: &[&Tensor],
    found_inf: &Tensor,
    inv_scale: &Tensor,
) -> Result<(), ShimError> {
    let g = handles(grads);
    // SAFETY: as in `fused_sgd`.
    check(unsafe {
        mrcnn_non_finite_check_and_unscale(
            g.as_ptr(),
            g.len() as c_int,
            found_inf.as_ptr() as Handle,
            inv_scale.as_ptr() as Handle,
        )
    })
}

/// An uninitialized `[n]` uint8 CPU tensor in page-locked memory (host→GPU
/// copies from it run asynchronously).
pub fn empty_pinned(n: i64) -> Result<Tensor, ShimError> {
    let mut out: Handle = std::ptr::null_mut();
    // SAFETY: on success the shim stores a heap-allocated at::Tensor that
    // tch takes ownership of.
    check(unsafe { mrcnn_empty_pinned(n, &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Enables CUDA autocast (mixed precision) for its lifetime and restores the
/// previous state when dropped. Convolutions and matmuls then run in the
/// guard's dtype; numerically sensitive ops stay in float32 (libtorch's
/// autocast lists, as `torch.autocast("cuda")`).
#[derive(Debug)]
pub struct AutocastGuard {
    previous: c_int,
}

/// The reduced-precision dtype autocast runs convolutions and matmuls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutocastDtype {
    Fp16,
    Bf16,
}

impl AutocastGuard {
    /// Autocast to `dtype`; `None` (no guard needed) when `dtype` is `None`.
    pub fn new(dtype: Option<AutocastDtype>) -> Option<AutocastGuard> {
        let dtype = match dtype? {
            AutocastDtype::Fp16 => 0,
            AutocastDtype::Bf16 => 1,
        };
        // SAFETY: sets thread-local autocast state; exceptions are caught in C++.
        let previous = unsafe { mrcnn_autocast_cuda(1, dtype) };
        Some(AutocastGuard { previous: previous.max(0) })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            mrcnn_autocast_cuda(self.previous & 1, (self.previous >> 1) & 1);
        }
    }
}

/// The CUDA autocast state of this thread: 0 off, 1 float16, 3 bfloat16
/// (bit 0 enabled, bit 1 bfloat16).
pub fn autocast_state() -> i32 {
    // SAFETY: reads thread-local autocast state; exceptions are caught in C++.
    unsafe { mrcnn_autocast_cuda_state() }
}

/// Runs `f` with CUDA autocast off (its cast cache kept), then restores
/// it: for ops that autocast would run in float32 although they are exact
/// in the input's dtype (nearest upsampling), so they stay in fp16/bf16.
pub fn without_autocast<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: flips thread-local autocast state; exceptions are caught in C++.
    let previous = unsafe { mrcnn_autocast_cuda_set_enabled(0) };
    let out = f();
    if previous == 1 {
        // SAFETY: as above.
        unsafe { mrcnn_autocast_cuda_set_enabled(1) };
    }
    out
}

/// Allows or forbids TF32 tensor-core math for fp32 matmuls (cuBLAS) and
/// convolutions (cuDNN); libtorch's own default is off for matmuls.
pub fn set_tf32(enabled: bool) {
    // SAFETY: sets two flags of libtorch's global context; the C side catches
    // every exception.
    unsafe {
        mrcnn_set_tf32(c_int::from(enabled));
    }
}

/// Whether TF32 is currently allowed for fp32 matmuls.
pub fn tf32_enabled() -> bool {
    // SAFETY: reads a flag of libtorch's global context.
    unsafe { mrcnn_tf32_enabled() != 0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tf32_flag_round_trips() {
        super::set_tf32(true);
        assert!(super::tf32_enabled());
        super::set_tf32(false);
        assert!(!super::tf32_enabled());
    }
}
