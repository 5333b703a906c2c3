//! The gradient all-reduce of several GPUs, overlapped with the backward
//! pass: the gradients (one flat buffer, parameters laid out in about the
//! order backward finishes them) are cut into buckets of consecutive
//! parameters; a post-accumulate hook on every parameter records a CUDA
//! event on the backward's stream when the last gradient of its bucket is
//! accumulated, and after the step's launch the host queues each bucket's
//! all-reduce on a communication stream behind its event. The host never
//! waits; the buckets of the heads and the upper backbone are reduced while
//! the lower backbone's backward still runs.
//!
//! Why events and not NCCL inside the backward: a recorded training step
//! (`engine::step_graphs`) captures the hooks' events as graph nodes that
//! every replay records again, while the all-reduces stay outside the
//! graph, queued only once the host has accepted the step. A step whose
//! mask positives overflowed its row budget is run again on its rank alone,
//! so collectives inside the graph would desynchronize the ranks; events
//! of a discarded attempt are simply recorded again by the next one.

use cudarc::driver::sys;
use std::ffi::{c_int, c_void};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// Consecutive runs of parameters (indices into `numels`, the parameters'
/// element counts in flat-buffer order), each closed once it holds at least
/// `cap` elements (so one larger than `cap` ends its bucket; the last
/// bucket may be smaller): DistributedDataParallel's rule. `cap` 0: none.
pub fn plan_buckets(numels: &[i64], cap: i64) -> Vec<Range<usize>> {
    if cap <= 0 || numels.is_empty() {
        return Vec::new();
    }
    let mut buckets = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in numels.iter().enumerate() {
        filled += n;
        if filled >= cap {
            buckets.push(start..i + 1);
            (start, filled) = (i + 1, 0);
        }
    }
    if start < numels.len() {
        buckets.push(start..numels.len());
    }
    buckets
}

/// A CUDA handle used from the autograd thread and the main thread (the
/// driver API is thread-safe; each handle is destroyed once, in `Drop`).
#[derive(Clone, Copy)]
struct Raw<T>(T);
// SAFETY: CUDA driver handles may be used from any thread of the process.
unsafe impl<T> Send for Raw<T> {}
// SAFETY: as above; the driver serializes what needs it.
unsafe impl<T> Sync for Raw<T> {}

/// What the hooks share with the host: which bucket each parameter is in,
/// how many of each bucket's gradients this backward has accumulated, and
/// the buckets' events.
struct HookState {
    bucket_of: Vec<usize>,
    sizes: Vec<usize>,
    counts: Mutex<Vec<usize>>,
    ready: Vec<Raw<sys::CUevent>>,
    /// Buckets the hooks recorded in the current backward (tests read it).
    by_hooks: AtomicUsize,
    /// An event record failed: the host then orders every bucket after the
    /// whole step instead (correct, not overlapped).
    failed: AtomicBool,
}

impl HookState {
    /// A parameter's gradient is accumulated on `stream`: counts it, and
    /// records its bucket's event when it was the bucket's last.
    fn param_ready(&self, index: usize, stream: sys::CUstream) {
        let Some(&bucket) = self.bucket_of.get(index) else { return };
        let complete = match self.counts.lock() {
            Ok(mut counts) => {
                counts[bucket] += 1;
                counts[bucket] == self.sizes[bucket]
            }
            Err(_) => false,
        };
        if complete {
            self.record(bucket, stream);
            self.by_hooks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records bucket `k`'s event on `stream`: as an external event node
    /// when the stream is being captured (so every replay records it).
    fn record(&self, k: usize, stream: sys::CUstream) {
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: a live stream (libtorch's) and an out-parameter.
        let queried = unsafe { sys::cuStreamIsCapturing(stream, &mut status) };
        let flags = if status == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
            sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL
        } else {
            sys::CUevent_record_flags::CU_EVENT_RECORD_DEFAULT
        };
        // SAFETY: an event this state owns, on a live stream.
        let recorded = unsafe { sys::cuEventRecordWithFlags(self.ready[k].0, stream, flags as u32) };
        if queried != sys::CUresult::CUDA_SUCCESS || recorded != sys::CUresult::CUDA_SUCCESS {
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    /// After a backward pass: records the event of every bucket whose
    /// gradients were not all accumulated (a parameter the step did not
    /// reach) on `stream`, and starts the next backward's counts.
    fn finish(&self, stream: sys::CUstream) -> usize {
        let incomplete: Vec<usize> = match self.counts.lock() {
            Ok(mut counts) => {
                let left = (0..counts.len()).filter(|&k| counts[k] != self.sizes[k]).collect();
                counts.iter_mut().for_each(|c| *c = 0);
                left
            }
            Err(_) => (0..self.sizes.len()).collect(),
        };
        for &k in &incomplete {
            self.record(k, stream);
        }
        self.by_hooks.swap(0, Ordering::Relaxed)
    }
}

extern "C" fn param_ready(ctx: *mut c_void, index: c_int, stream: *mut c_void) {
    // SAFETY: `ctx` is the `HookState` of a live `GradBuckets`, which removes
    // its hooks before the state is freed.
    let state = unsafe { &*(ctx as *const HookState) };
    // Nothing may unwind into libtorch's autograd thread.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        state.param_ready(index as usize, stream as sys::CUstream);
    }));
}

/// The buckets whose hooks are installed in this process (the training
/// parameters of one model): [`finish_backward`] closes their backward.
static ACTIVE: Mutex<Option<(Arc<HookState>, usize)>> = Mutex::new(None);

/// Ends a backward pass for the gradient buckets of this process, if any:
/// buckets with a gradient the pass did not reach get their event now (on
/// libtorch's current stream: inside a recorded step, as part of the graph).
/// Returns how many buckets the hooks recorded during the pass. Call it
/// after every backward of a training step.
pub fn finish_backward() -> usize {
    let active = ACTIVE.lock().ok().and_then(|a| a.clone());
    match active {
        Some((state, device)) => state.finish(crate::shim::current_cuda_stream(device) as sys::CUstream),
        None => 0,
    }
}

/// The gradient buckets of one model's trainable parameters on one GPU:
/// the hooks, the buckets' events and the stream their all-reduces run on.
pub struct GradBuckets {
    state: Arc<HookState>,
    params: Vec<Tensor>,
    /// Each bucket's span of the flat buffer, in elements.
    spans: Vec<Range<i64>>,
    device: usize,
    comm: Raw<sys::CUstream>,
    /// Marks a point of libtorch's stream (the step's end) or of `comm`.
    marker: Raw<sys::CUevent>,
}

impl std::fmt::Debug for GradBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradBuckets({} buckets on cuda:{})", self.spans.len(), self.device)
    }
}

/// A CUDA driver call failed.
#[derive(Debug, thiserror::Error)]
#[error("gradient buckets: {0}")]
pub struct BucketError(String);

fn cuda(what: &str, r: sys::CUresult) -> Result<(), BucketError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(BucketError(format!("{what} failed: {r:?}")))
    }
}

fn new_event() -> Result<sys::CUevent, BucketError> {
    let mut event: sys::CUevent = std::ptr::null_mut();
    // SAFETY: an out-parameter; the caller destroys the event.
    cuda("cuEventCreate", unsafe {
        sys::cuEventCreate(&mut event, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
    })?;
    Ok(event)
}

impl GradBuckets {
    /// Hooks `params` (trainable, on CUDA device `device`, their gradients
    /// laid out one after the other from element 0 of the flat buffer in
    /// this order) in buckets `buckets` (ranges of `params`, see
    /// [`plan_buckets`]). Call on a thread with the device's context
    /// current. One set per process: hooking a second model fails.
    pub fn new(params: &[Tensor], buckets: &[Range<usize>], device: usize) -> Result<GradBuckets, BucketError> {
        let poisoned = |_| BucketError("the bucket registry's lock is poisoned".into());
        if ACTIVE.lock().map_err(poisoned)?.is_some() {
            return Err(BucketError("another model's gradients are already bucketed in this process".into()));
        }
        let mut bucket_of = vec![0; params.len()];
        let mut spans = Vec::with_capacity(buckets.len());
        let mut offset = 0i64;
        for (k, range) in buckets.iter().enumerate() {
            let len: i64 = params[range.clone()].iter().map(|p| p.numel() as i64).sum();
            range.clone().for_each(|i| bucket_of[i] = k);
            spans.push(offset..offset + len);
            offset += len;
        }
        let mut ready = Vec::with_capacity(buckets.len());
        for _ in buckets {
            ready.push(Raw(new_event()?));
        }
        let marker = Raw(new_event()?);
        let mut comm: sys::CUstream = std::ptr::null_mut();
        // SAFETY: an out-parameter; destroyed in Drop. Non-blocking: the
        // all-reduces must not wait for the legacy default stream's work.
        cuda("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut comm, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let state = Arc::new(HookState {
            bucket_of,
            sizes: buckets.iter().map(|r| r.len()).collect(),
            counts: Mutex::new(vec![0; buckets.len()]),
            ready,
            by_hooks: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        });
        let buckets = GradBuckets {
            state: state.clone(),
            params: params.iter().map(Tensor::shallow_clone).collect(),
            spans,
            device,
            comm: Raw(comm),
            marker,
        };
        let ctx = Arc::as_ptr(&buckets.state) as *mut c_void;
        for (i, p) in params.iter().enumerate() {
            // SAFETY: `ctx` outlives the hooks: Drop removes them first.
            unsafe { crate::shim::set_post_accumulate_hook(p, Some((param_ready, ctx, i))) }
                .map_err(|e| BucketError(e.to_string()))?;
        }
        // (Not held above: on an error `buckets`' Drop takes the lock.)
        *ACTIVE.lock().map_err(poisoned)? = Some((state, device));
        Ok(buckets)
    }

    /// Each bucket's elements of the flat gradient buffer.
    pub fn spans(&self) -> &[Range<i64>] {
        &self.spans
    }

    /// Makes the communication stream wait until bucket `k`'s gradients
    /// are final (`None`: until the work queued so far on libtorch's
    /// current stream is done) and returns it (a raw `CUstream`) for that
    /// bucket's all-reduce. Call after the step's backward was launched.
    pub fn comm_after(&self, k: Option<usize>) -> Result<*mut c_void, BucketError> {
        let failed = self.state.failed.load(Ordering::Relaxed);
        let event = match k {
            Some(k) if !failed => self.state.ready[k].0,
            _ => {
                let stream = crate::shim::current_cuda_stream(self.device) as sys::CUstream;
                // SAFETY: our event on libtorch's live stream.
                cuda("cuEventRecord", unsafe { sys::cuEventRecord(self.marker.0, stream) })?;
                self.marker.0
            }
        };
        // SAFETY: our stream and event.
        cuda("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(self.comm.0, event, 0) })?;
        Ok(self.comm.0 as *mut c_void)
    }

    /// Makes libtorch's current stream wait for everything queued on the
    /// communication stream (the optimizer then reads reduced gradients).
    pub fn join(&self) -> Result<(), BucketError> {
        let stream = crate::shim::current_cuda_stream(self.device) as sys::CUstream;
        // SAFETY: our event and stream; libtorch's live stream.
        cuda("cuEventRecord", unsafe { sys::cuEventRecord(self.marker.0, self.comm.0) })?;
        cuda("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(stream, self.marker.0, 0) })
    }
}

impl Drop for GradBuckets {
    fn drop(&mut self) {
        for p in &self.params {
            // SAFETY: removes the hook installed in `new`.
            let _ = unsafe { crate::shim::set_post_accumulate_hook(p, None) };
        }
        if let Ok(mut active) = ACTIVE.lock() {
            if active.as_ref().is_some_and(|(s, _)| Arc::ptr_eq(s, &self.state)) {
                *active = None;
            }
        }
        // SAFETY: handles made in `new`, destroyed once; queued work that
        // uses them completes first (CUDA defers the release).
        unsafe {
            let _ = sys::cuStreamDestroy_v2(self.comm.0);
            let _ = sys::cuEventDestroy_v2(self.marker.0);
            for e in &self.state.ready {
                let _ = sys::cuEventDestroy_v2(e.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{finish_backward, plan_buckets, GradBuckets};
    use cudarc::driver::sys;
    use tch::{Device, Kind, Tensor};

    /// Copies each bucket of `flat` to `snapshot` on the communication
    /// stream behind the bucket's event, as the all-reduce is queued.
    fn snapshot_buckets(buckets: &GradBuckets, flat: &Tensor, snapshot: &Tensor) {
        for (k, span) in buckets.spans().iter().enumerate() {
            let stream = buckets.comm_after(Some(k)).unwrap();
            let bytes = 4 * (span.end - span.start) as usize;
            let at = |t: &Tensor| t.data_ptr() as u64 + 4 * span.start as u64;
            // SAFETY: both spans lie inside the live float32 tensors.
            let r = unsafe { sys::cuMemcpyDtoDAsync_v2(at(snapshot), at(flat), bytes, stream as sys::CUstream) };
            assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        }
        buckets.join().unwrap();
    }

    /// A bucket's event marks the end of its gradients' accumulation, in
    /// an eager backward and in every replay of a recorded one: work queued
    /// behind the events on the communication stream (here a copy, in
    /// training the all-reduce) sees each step's final gradients while the
    /// backward is still running. The hooks record the buckets the pass
    /// completes; a bucket holding a parameter the pass never reaches gets
    /// its event when the pass ends.
    #[test]
    fn gpu_bucket_events_follow_the_backward() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_bucket_events_follow_the_backward") else {
            return;
        };
        let Device::Cuda(index) = device else { return };
        let _ = Tensor::zeros([1], (Kind::Float, device)).sum(Kind::Float).double_value(&[]);
        let (n, d, layers) = (16384, 2048, 4);
        let opts = (Kind::Float, device);
        // Flat order: the layers' weights from the last (backward's order),
        // a bias no loss uses before the first layer's weight.
        let weights: Vec<Tensor> =
            (0..layers).map(|_| (Tensor::randn([d, d], opts) / (d as f64).sqrt()).set_requires_grad(true)).collect();
        let unused = Tensor::zeros([d], opts).set_requires_grad(true);
        let params: Vec<Tensor> = [&weights[3], &weights[2], &weights[1], &unused, &weights[0]]
            .into_iter()
            .map(Tensor::shallow_clone)
            .collect();
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let flat = Tensor::zeros([total], opts);
        let mut offset = 0;
        for p in &params {
            let n = p.numel() as i64;
            crate::shim::set_grad(p, &flat.narrow(0, offset, n).view(p.size().as_slice())).unwrap();
            offset += n;
        }
        let numels: Vec<i64> = params.iter().map(|p| p.numel() as i64).collect();
        let plan = plan_buckets(&numels, d * d);
        assert_eq!(plan, vec![0..1, 1..2, 2..3, 3..5]);
        let buckets = GradBuckets::new(&params, &plan, index).unwrap();
        let x = Tensor::randn([n, d], opts);
        let step = || {
            let mut y = x.shallow_clone();
            for w in &weights {
                y = y.matmul(w).relu();
            }
            y.square().mean(Kind::Float).backward();
            finish_backward()
        };
        let snapshot = Tensor::zeros([total], opts);
        let check = |what: &str| {
            let (got, want) = (Vec::<f32>::try_from(&snapshot).unwrap(), Vec::<f32>::try_from(&flat).unwrap());
            assert!(want.iter().any(|&g| g != 0.0), "{what}: no gradient");
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{what}: {differ} of {} gradient values copied before they were final", want.len());
        };
        let _ = flat.shallow_clone().zero_();
        // Three buckets complete during the pass; the last (the first
        // layer's weight and the unused bias) when it ends.
        assert_eq!(step(), 3, "buckets the hooks recorded in an eager backward");
        snapshot_buckets(&buckets, &flat, &snapshot);
        check("eager");
        let _ = flat.shallow_clone().zero_();
        tch::Cuda::synchronize(index as i64);
        let (graph, by_hooks) = crate::shim::CudaGraph::capture(index, None, step).unwrap();
        assert_eq!(by_hooks, 3, "buckets the hooks recorded while a graph captured the backward");
        for replay in 0..3 {
            tch::no_grad(|| {
                x.shallow_clone().copy_(&Tensor::randn([n, d], opts));
            });
            let _ = flat.shallow_clone().zero_();
            let _ = snapshot.shallow_clone().zero_();
            graph.replay().unwrap();
            snapshot_buckets(&buckets, &flat, &snapshot);
            check(&format!("replay {replay}"));
        }
    }

    #[test]
    fn buckets_close_once_they_reach_the_cap() {
        assert_eq!(plan_buckets(&[3, 4, 2, 10, 1, 1], 6), vec![0..2, 2..4, 4..6]);
        // A parameter larger than the cap ends the bucket it starts or joins.
        assert_eq!(plan_buckets(&[20, 1, 1], 6), vec![0..1, 1..3]);
        assert_eq!(plan_buckets(&[1, 20], 6), vec![0..2]);
        // Every parameter in exactly one bucket, in order.
        let sizes: Vec<i64> = (1..50).map(|i| (i * 37) % 11 + 1).collect();
        let buckets = plan_buckets(&sizes, 9);
        assert_eq!(buckets.first().map(|r| r.start), Some(0));
        assert_eq!(buckets.last().map(|r| r.end), Some(sizes.len()));
        assert!(buckets.windows(2).all(|w| w[0].end == w[1].start && !w[1].is_empty()));
        assert!(buckets[..buckets.len() - 1].iter().all(|r| sizes[r.clone()].iter().sum::<i64>() >= 9));
        assert!(plan_buckets(&sizes, 0).is_empty());
    }
}
