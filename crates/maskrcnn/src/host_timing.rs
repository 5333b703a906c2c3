//! Where the host's time goes inside a training step: named marks along the
//! step, recorded only while [`record`] runs on the calling thread (a no-op
//! costing one thread-local read otherwise). `bench train` reports them for
//! a step queued behind a spinning GPU, so each interval is the host's own
//! work (building tensors, launching kernels), never a wait for the GPU.
//! [`record_memory`] instead notes the CUDA memory allocated at each mark
//! (allocation is decided on the host, so an eager step's marks show what
//! each stage keeps alive).

use std::cell::RefCell;
use std::time::Instant;

/// A mark: the stage that ends, when, and the CUDA memory allocated then
/// (bytes; only under [`record_memory`]).
type Mark = (&'static str, Instant, u64);

thread_local! {
    static MARKS: RefCell<Option<Vec<Mark>>> = const { RefCell::new(None) };
    /// The CUDA device whose memory [`record_memory`] notes.
    static MEMORY_DEVICE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Notes that stage `name` of the step ends now.
pub fn mark(name: &'static str) {
    MARKS.with(|m| {
        if let Some(v) = m.borrow_mut().as_mut() {
            let memory =
                MEMORY_DEVICE.get().and_then(crate::shim::cuda_memory_now).map_or(0, |(allocated, _)| allocated);
            v.push((name, Instant::now(), memory));
        }
    });
}

/// Runs `f`, returning its result and the CUDA memory allocated on
/// `device` at each mark inside it (GiB, in order; `"rest"` at the end).
pub fn record_memory<T>(device: usize, f: impl FnOnce() -> T) -> (T, Vec<(&'static str, f64)>) {
    MEMORY_DEVICE.set(Some(device));
    let (out, marks) = record_marks(f);
    MEMORY_DEVICE.set(None);
    let gib = marks.iter().skip(1).map(|m| (m.0, m.2 as f64 / (1u64 << 30) as f64)).collect();
    (out, gib)
}

/// Runs `f`, returning its result and the host milliseconds of each stage
/// marked inside it (from the previous mark, or the start), in order; a
/// final `"rest"` covers the time after the last mark.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<(&'static str, f64)>) {
    let (out, marks) = record_marks(f);
    let stages = marks.windows(2).map(|w| (w[1].0, (w[1].1 - w[0].1).as_secs_f64() * 1e3)).collect();
    (out, stages)
}

/// `f`'s result and its marks, from a `"start"` mark to a `"rest"` one.
fn record_marks<T>(f: impl FnOnce() -> T) -> (T, Vec<Mark>) {
    MARKS.with(|m| *m.borrow_mut() = Some(Vec::new()));
    mark("start");
    let out = f();
    mark("rest");
    (out, MARKS.with(|m| m.borrow_mut().take()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_split_the_recorded_time_in_order() {
        super::mark("ignored outside record");
        let (v, stages) = super::record(|| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            super::mark("a");
            super::mark("b");
            7
        });
        assert_eq!(v, 7);
        let names: Vec<_> = stages.iter().map(|s| s.0).collect();
        assert_eq!(names, ["a", "b", "rest"]);
        assert!(stages[0].1 >= 5.0, "{stages:?}");
        super::mark("after");
        assert!(super::record(|| ()).1.iter().all(|s| s.0 == "rest"));
    }
}
