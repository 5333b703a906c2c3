//! Ends a rank whose training stops making progress: a collective that
//! waits on a peer that died on another node or hangs would otherwise wait
//! forever (NCCL's kernels spin on the GPU; the host blocks at its next
//! read). The training loop beats once per step; when no beat came for
//! the collective timeout (`MASKRCNN_COLLECTIVE_TIMEOUT`, seconds), a
//! thread prints why and ends the process with exit code 1 (evaluations
//! pause the watch: they take as long as the validation set needs), without
//! running exit handlers (they could wait on the stuck GPU work). The
//! launcher then stops the rest of the node's ranks and names this one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `beat_ms` while no step is being watched.
const IDLE: u64 = u64::MAX;

struct State {
    origin: Instant,
    /// Milliseconds since `origin` of the last beat, or [`IDLE`].
    beat_ms: AtomicU64,
    done: AtomicBool,
}

/// A watchdog thread for this rank; idle until the first [`Watchdog::beat`].
pub struct Watchdog {
    state: Arc<State>,
}

impl Watchdog {
    /// Starts watching for rank `rank` with `timeout`. `on_timeout` gets the
    /// message and is called instead of ending the process when given
    /// (tests); `None` ends the process.
    pub fn start(rank: usize, timeout: Duration, on_timeout: Option<Box<dyn Fn(String) + Send>>) -> Watchdog {
        let state =
            Arc::new(State { origin: Instant::now(), beat_ms: AtomicU64::new(IDLE), done: AtomicBool::new(false) });
        let watched = Arc::clone(&state);
        let poll = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        std::thread::Builder::new()
            .name(format!("watchdog-{rank}"))
            .spawn(move || {
                while !watched.done.load(Ordering::Relaxed) {
                    std::thread::sleep(poll);
                    let beat = watched.beat_ms.load(Ordering::Relaxed);
                    let now = watched.origin.elapsed().as_millis() as u64;
                    if beat == IDLE || now.saturating_sub(beat) <= timeout.as_millis() as u64 {
                        continue;
                    }
                    let message = format!(
                        "rank {rank}: no training progress for {:.0} s: a collective waits on a rank that failed or \
                         hangs (MASKRCNN_COLLECTIVE_TIMEOUT={:.0}); exiting",
                        timeout.as_secs_f64(),
                        timeout.as_secs_f64()
                    );
                    match &on_timeout {
                        Some(report) => {
                            report(message);
                            watched.beat_ms.store(IDLE, Ordering::Relaxed);
                        }
                        None => {
                            eprintln!("error: {message}");
                            // SAFETY: ends the process at once; nothing of
                            // this process is used afterwards.
                            unsafe { libc::_exit(1) };
                        }
                    }
                }
            })
            .ok();
        Watchdog { state }
    }

    /// Progress now: the next beat must come within the timeout.
    pub fn beat(&self) {
        self.state.beat_ms.store(self.state.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Stops watching until the next beat (an evaluation, the end).
    pub fn pause(&self) {
        self.state.beat_ms.store(IDLE, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.pause();
        self.state.done.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Idle until the first beat; beats within the timeout keep it quiet;
    /// a silence longer than the timeout reports once, naming the rank and
    /// the variable; pausing stops the watch.
    #[test]
    fn reports_a_silence_longer_than_the_timeout_only_while_watching() {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let report = Box::new(move |m: String| {
            let _ = tx.lock().map(|t| t.send(m));
        });
        let dog = Watchdog::start(3, Duration::from_millis(200), Some(report));
        std::thread::sleep(Duration::from_millis(400));
        assert!(rx.try_recv().is_err(), "reported before the first beat");
        for _ in 0..6 {
            dog.beat();
            std::thread::sleep(Duration::from_millis(80));
        }
        assert!(rx.try_recv().is_err(), "reported while beating");
        let message = rx.recv_timeout(Duration::from_secs(5)).expect("a silence is reported");
        assert!(message.contains("rank 3") && message.contains("MASKRCNN_COLLECTIVE_TIMEOUT"), "{message}");
        dog.beat();
        dog.pause();
        std::thread::sleep(Duration::from_millis(500));
        assert!(rx.try_recv().is_err(), "reported while paused");
    }
}
