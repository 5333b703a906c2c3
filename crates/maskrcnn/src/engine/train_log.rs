//! What `maskrcnn train` records while it runs: one JSON line per logged
//! iteration and per evaluation in `metrics.jsonl`, the same scalars as
//! TensorBoard events under `tensorboard/`, and where a log window's time
//! went (waiting for the loader, in the all-reduce). Rank 0 writes these;
//! every other rank writes its own step records to `ranks/rank<R>.jsonl`
//! (its step, GPU, data-wait and all-reduce times: where one rank is slower).

use crate::engine::amp::ScalerState;
use crate::engine::tensorboard::EventWriter;
use crate::evaluation::coco_eval::{CategoryAp, CocoMetrics};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// One evaluation during training.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    pub iteration: u64,
    /// Training seconds so far (evaluation time excluded).
    pub seconds: f64,
    pub bbox_ap: f64,
    /// `None` when segm was not evaluated (a box-only model, or ground
    /// truth without masks).
    pub segm_ap: Option<f64>,
    /// Every category's AP and AP50, bbox then (when evaluated) segm.
    #[serde(skip)]
    pub bbox_per_category: Vec<CategoryAp>,
    #[serde(skip)]
    pub segm_per_category: Vec<CategoryAp>,
}

impl EvalPoint {
    /// The point of an evaluation at `iteration` after `seconds` of training.
    pub fn of(iteration: u64, seconds: f64, metrics: &CocoMetrics) -> EvalPoint {
        EvalPoint {
            iteration,
            seconds,
            bbox_ap: metrics.bbox.stats[0],
            segm_ap: metrics.segm.as_ref().map(|m| m.stats[0]),
            bbox_per_category: metrics.bbox.per_category.clone(),
            segm_per_category: metrics.segm.as_ref().map_or_else(Vec::new, |m| m.per_category.clone()),
        }
    }

    /// The seed's early stop: both `min_bbox_map` and `min_mask_map`
    /// reached (never when both are 0, i.e. unset; the mask target is
    /// not asked of a run without segm evaluation).
    pub fn reaches(&self, test: &crate::config::TestConfig) -> bool {
        (test.min_bbox_map > 0.0 || test.min_mask_map > 0.0)
            && self.bbox_ap >= test.min_bbox_map
            && self.segm_ap.is_none_or(|ap| ap >= test.min_mask_map)
    }
}

/// The training log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct TrainLogError {
    path: String,
    source: std::io::Error,
}

/// One logged iteration: the values a log line and `metrics.jsonl` show.
#[derive(Debug, Clone, Copy)]
pub struct StepValues<'a> {
    pub iteration: u64,
    pub lr: f64,
    /// The five named losses of the newest iteration.
    pub losses: &'a [(String, f64)],
    /// Images per iteration over all GPUs (images/s counts these).
    pub images_per_iteration: usize,
    /// Seconds since training started.
    pub seconds: f64,
    pub scale: Option<ScalerState>,
    /// Peak GPU memory (GiB) on CUDA.
    pub max_memory_gib: Option<f64>,
    /// Micro-batches replayed from CUDA graphs so far (when they are on).
    pub graph_replays: Option<u64>,
    /// Micro-batches the graphs ran again for want of mask rows, so far.
    pub steps_redone: Option<u64>,
    /// The mask head's row budget of recorded steps (once counted).
    pub mask_rows: Option<i64>,
    /// On several GPUs: the sum of every trainable weight (float64), equal
    /// on every rank while the ranks stay in step.
    pub weights_digest: Option<f64>,
    /// Iterations left to `solver.max_iter` (the ETA is these at the
    /// window's pace).
    pub remaining: u64,
    /// Bytes libtorch's allocator holds now (CUDA).
    pub reserved_gib: Option<f64>,
    /// Step shapes recorded as CUDA graphs now.
    pub graphs_recorded: Option<usize>,
    /// Steps so far that were not graph replays (first seen, recorded,
    /// run again) and their wall seconds: the time outside steady steps.
    pub unsteady: Option<(u64, f64)>,
}

/// `1h02m`, `3m12s`, `45s`.
pub fn duration_text(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// The training logs of one process.
pub struct TrainLog {
    metrics: Box<dyn Write>,
    board: Option<EventWriter>,
    /// Start time and iteration of the current log window.
    window: (Instant, u64),
    /// Seconds of the window blocked on the loader and, on several GPUs, in
    /// the all-reduce (this GPU's queued work plus waiting for the slowest
    /// rank): where a step's time goes.
    data_wait: f64,
    reduce_wait: Option<f64>,
    /// Device→host synchronizations inside the window's steps (log-time
    /// reads, evaluation and checkpoints excluded).
    syncs: crate::host_sync::SyncCounter,
    /// The window's synchronizations inside steps.
    window_syncs: crate::host_sync::Syncs,
    /// The window's synchronizations between steps (reading the losses and
    /// GPU times for the log, checkpoints, evaluations).
    between_syncs: i64,
    /// CUDA event pairs of the window's steps, each from the step's first
    /// model launch (after its batch is prepared on the host) to the last
    /// launch of its update: the GPU's busy time per step, read at log time.
    gpu_spans: Vec<crate::kernels::timing::GpuSpan>,
    /// The current step's span, until its update is issued.
    open_span: Option<crate::kernels::timing::GpuSpan>,
    /// The exposed all-reduce of the window's steps (several GPUs).
    reduce_spans: Vec<crate::kernels::timing::GpuSpan>,
    /// The window's batches: loader worker milliseconds (decode, augment,
    /// collate) and batches already finished behind the taken one.
    loader_ms: f64,
    loader_ahead: usize,
    loader_batches: usize,
}

/// Rewrites the JSON-lines log at `path` (atomically) without the records
/// whose `"iteration"` is past `iteration`; nothing to do when there are
/// none or the file does not exist.
fn drop_records_after(path: &Path, iteration: u64) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let later = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("iteration").and_then(serde_json::Value::as_u64))
            .is_some_and(|i| i > iteration)
    };
    if !text.lines().any(later) {
        return Ok(());
    }
    let kept: String = text.lines().filter(|l| !later(l)).flat_map(|l| [l, "\n"]).collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept)?;
    std::fs::rename(&tmp, path)
}

impl TrainLog {
    /// Opens `output/metrics.jsonl` for rank 0 (appending: a resumed run
    /// continues it, after dropping the records of iterations past
    /// `start_iteration` that the interrupted run logged after its
    /// checkpoint) and the TensorBoard writer; for rank `rank` > 0 of a
    /// `distributed` run `output/ranks/rank<rank>.jsonl` the same way (step
    /// records only). `distributed` adds the all-reduce time to each
    /// record. The first window starts at `start_iteration`.
    pub fn open(
        output: &Path,
        rank: usize,
        distributed: bool,
        start_iteration: u64,
        cuda: bool,
    ) -> Result<TrainLog, TrainLogError> {
        let main = rank == 0;
        let path = match (main, distributed) {
            (true, _) => Some(output.join("metrics.jsonl")),
            (false, true) => Some(output.join("ranks").join(format!("rank{rank}.jsonl"))),
            (false, false) => None,
        };
        let metrics: Box<dyn Write> = match path {
            Some(path) => {
                let error = |source| TrainLogError { path: path.display().to_string(), source };
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(error)?;
                }
                if start_iteration > 0 {
                    drop_records_after(&path, start_iteration).map_err(error)?;
                }
                Box::new(std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(error)?)
            }
            None => Box::new(std::io::sink()),
        };
        if main && start_iteration > 0 {
            if let Err(e) =
                crate::engine::tensorboard::drop_events_after(&output.join("tensorboard"), start_iteration as i64)
            {
                tracing::warn!("TensorBoard events after iteration {start_iteration} kept ({e})");
            }
        }
        let board = match main.then(|| EventWriter::create(&output.join("tensorboard"))) {
            None => None,
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::warn!("no TensorBoard events ({}): {e}", output.join("tensorboard").display());
                None
            }
        };
        Ok(TrainLog {
            metrics,
            board,
            window: (Instant::now(), start_iteration),
            data_wait: 0.0,
            reduce_wait: distributed.then_some(0.0),
            syncs: crate::host_sync::SyncCounter::start(cuda),
            window_syncs: Default::default(),
            between_syncs: 0,
            gpu_spans: Vec::new(),
            open_span: None,
            reduce_spans: Vec::new(),
            loader_ms: 0.0,
            loader_ahead: 0,
            loader_batches: 0,
        })
    }

    /// Marks the start of a training step (synchronizations before it are
    /// counted apart: `syncs_between_steps`).
    pub fn begin_step(&mut self) {
        self.between_syncs += self.syncs.take().all;
    }

    /// Marks the end of a training step: its synchronizations count, and
    /// its GPU span ends after the work issued so far.
    pub fn end_step(&mut self) {
        let step = self.syncs.take();
        self.window_syncs.all += step.all;
        self.window_syncs.host_waits += step.host_waits;
        if let Some(mut span) = self.open_span.take() {
            span.stop();
            self.gpu_spans.push(span);
        }
    }

    /// The step's device work starts now (its batch is on the way and
    /// prepared): a CUDA event on `device`'s stream (nothing off CUDA).
    pub fn begin_gpu_work(&mut self, device: tch::Device) {
        self.open_span = crate::kernels::timing::GpuSpan::start(device);
    }

    /// Counts a batch taken from the loader: the wait for it, its workers'
    /// time and how far ahead the loader was.
    pub fn add_loader_batch(&mut self, batch: &crate::data::loader::Batch) {
        self.data_wait += batch.waited;
        let t = &batch.times;
        self.loader_ms += t.decode + t.augment + t.collate;
        self.loader_ahead += batch.ready_ahead;
        self.loader_batches += 1;
    }

    /// Counts `seconds` spent in the gradient all-reduce.
    pub fn add_reduce_wait(&mut self, seconds: f64) {
        if let Some(w) = self.reduce_wait.as_mut() {
            *w += seconds;
        }
    }

    /// Keeps a step's GPU span from the end of its backward to the end of
    /// its all-reduce: the communication time the backward did not hide.
    pub fn add_reduce_span(&mut self, span: Option<crate::kernels::timing::GpuSpan>) {
        self.reduce_spans.extend(span);
    }

    /// Records iteration `v.iteration` (closing the log window: images/s and
    /// the wait times are per window) and returns the progress message
    /// `loss … lr … img/s [scale … skipped …]`.
    pub fn step(&mut self, v: StepValues<'_>) -> String {
        let elapsed = self.window.0.elapsed().as_secs_f64();
        let iterations = v.iteration.saturating_sub(self.window.1);
        let ips = iterations as f64 * v.images_per_iteration as f64 / elapsed.max(1e-9);
        let steps = iterations.max(1) as f64;
        self.window = (Instant::now(), v.iteration);
        let total_loss: f64 = v.losses.iter().map(|(_, x)| x).sum();
        let mut record = serde_json::Map::new();
        record.insert("iteration".into(), v.iteration.into());
        record.insert("lr".into(), v.lr.into());
        record.insert("loss".into(), total_loss.into());
        for (n, x) in v.losses {
            record.insert(n.clone(), (*x).into());
        }
        record.insert("images_per_s".into(), ips.into());
        record.insert("data_wait_ms".into(), (1e3 * self.data_wait / steps).into());
        record.insert("step_ms".into(), (1e3 * elapsed / steps).into());
        record.insert("syncs_per_step".into(), (self.window_syncs.all as f64 / steps).into());
        record.insert("host_waits_per_step".into(), (self.window_syncs.host_waits as f64 / steps).into());
        record.insert("syncs_between_steps".into(), self.between_syncs.into());
        self.data_wait = 0.0;
        self.window_syncs = Default::default();
        self.between_syncs = 0;
        if self.loader_batches > 0 {
            let n = self.loader_batches as f64;
            record.insert("loader_ms_per_batch".into(), (self.loader_ms / n).into());
            record.insert("loader_ready_ahead".into(), (self.loader_ahead as f64 / n).into());
            (self.loader_ms, self.loader_ahead, self.loader_batches) = (0.0, 0, 0);
        }
        // Reading the spans waits for the last one: a log-time sync.
        let gpu: Vec<f64> = self.gpu_spans.drain(..).filter_map(|s| s.elapsed_ms()).collect();
        if !gpu.is_empty() {
            let total: f64 = gpu.iter().sum();
            record.insert("gpu_ms".into(), (total / gpu.len() as f64).into());
            record.insert("gpu_busy".into(), (total / (1e3 * elapsed).max(1e-9)).into());
        }
        if let Some(w) = self.reduce_wait.as_mut() {
            record.insert("allreduce_ms".into(), (1e3 * *w / steps).into());
            *w = 0.0;
        }
        let exposed: Vec<f64> = self.reduce_spans.drain(..).filter_map(|s| s.elapsed_ms()).collect();
        if !exposed.is_empty() {
            record.insert("allreduce_gpu_ms".into(), (exposed.iter().sum::<f64>() / exposed.len() as f64).into());
        }
        record.insert("seconds".into(), v.seconds.into());
        let eta = v.remaining as f64 * elapsed / iterations.max(1) as f64;
        record.insert("eta_s".into(), eta.into());
        if let Some(r) = v.reserved_gib {
            record.insert("reserved_gib".into(), r.into());
        }
        if let Some(n) = v.graphs_recorded {
            record.insert("graphs_recorded".into(), n.into());
        }
        if let Some((n, s)) = v.unsteady {
            record.insert("unsteady_steps".into(), n.into());
            record.insert("unsteady_s".into(), s.into());
        }
        if let Some(s) = v.scale {
            record.insert("loss_scale".into(), s.scale.into());
            record.insert("skipped_steps".into(), s.skipped.into());
        }
        if let Some(m) = v.max_memory_gib {
            record.insert("max_memory_gib".into(), m.into());
        }
        if let Some(n) = v.graph_replays {
            record.insert("graph_replays".into(), n.into());
        }
        if let Some(n) = v.steps_redone {
            record.insert("steps_redone".into(), n.into());
        }
        if let Some(n) = v.mask_rows {
            record.insert("mask_rows".into(), n.into());
        }
        if let Some(d) = v.weights_digest {
            record.insert("weights_digest".into(), d.into());
        }
        if let Some(w) = self.board.as_mut() {
            for (tag, x) in &record {
                if let (Some(x), false) = (x.as_f64(), tag == "iteration") {
                    let _ = w.scalar(tag, v.iteration as i64, x as f32);
                }
            }
            let _ = w.flush();
        }
        let _ = writeln!(self.metrics, "{}", serde_json::Value::Object(record));
        let scale_text = v.scale.map(|s| format!(" scale {:.0} skipped {:.0}", s.scale, s.skipped)).unwrap_or_default();
        let eta_text = if v.remaining > 0 { format!(" eta {}", duration_text(eta)) } else { String::new() };
        format!("loss {total_loss:.4} lr {:.5} {ips:.1} img/s{scale_text}{eta_text}", v.lr)
    }

    /// Records an evaluation.
    pub fn eval(&mut self, point: &EvalPoint) {
        let _ = writeln!(
            self.metrics,
            "{}",
            serde_json::json!({
                "iteration": point.iteration,
                "bbox_ap": point.bbox_ap,
                "segm_ap": point.segm_ap,
                "seconds": point.seconds,
                "bbox_per_category": point.bbox_per_category,
                "segm_per_category": point.segm_per_category,
            })
        );
        if let Some(w) = self.board.as_mut() {
            let _ = w.scalar("eval/bbox_ap", point.iteration as i64, point.bbox_ap as f32);
            if let Some(segm) = point.segm_ap {
                let _ = w.scalar("eval/segm_ap", point.iteration as i64, segm as f32);
            }
            let _ = w.flush();
        }
    }
}
