//! Where the host's time goes inside a training step: named marks along the
//! step, recorded only while [`record`] runs on the calling thread (a no-op
//! costing one thread-local read otherwise). `bench train` reports them for
//! a step queued behind a spinning GPU, so each interval is the host's own
//! work (building tensors, launching kernels), never a wait for the GPU.

use std::cell::RefCell;
use std::time::Instant;

thread_local! {
    static MARKS: RefCell<Option<Vec<(&'static str, Instant)>>> = const { RefCell::new(None) };
}

/// Notes that stage `name` of the step ends now.
pub fn mark(name: &'static str) {
    MARKS.with(|m| {
        if let Some(v) = m.borrow_mut().as_mut() {
            v.push((name, Instant::now()));
        }
    });
}

/// Runs `f`, returning its result and the host milliseconds of each stage
/// marked inside it (from the previous mark, or the start), in order; a
/// final `"rest"` covers the time after the last mark.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<(&'static str, f64)>) {
    let start = Instant::now();
    MARKS.with(|m| *m.borrow_mut() = Some(vec![("start", start)]));
    let out = f();
    mark("rest");
    let marks = MARKS.with(|m| m.borrow_mut().take()).unwrap_or_default();
    let stages = marks.windows(2).map(|w| (w[1].0, (w[1].1 - w[0].1).as_secs_f64() * 1e3)).collect();
    (out, stages)
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
