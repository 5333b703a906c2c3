//! The training loop and its step, as detectron2's `SimpleTrainer` with
//! hooks: a [`Trainer`] holds what a run trains with and takes one step at
//! a time (micro-batches from the loader, forward/backward under autocast,
//! the group's all-reduce, the update); [`Hook`]s ask for a stop before a
//! step's all-reduce (so that every rank agrees), act after every step
//! (logging, evaluation, checkpoints: `engine::hooks`) and after training.
//! A new behaviour — an EMA of the weights, a profiler — is one more hook.

use crate::config::{AmpMode, Config};
use crate::data::loader::Loader;
use crate::distributed::grad_buckets::GradBuckets;
use crate::distributed::{DistError, ProcessGroup};
use crate::engine::amp::GradScaler;
use crate::engine::checkpoint;
use crate::engine::lr_schedule::LrSchedule;
use crate::engine::optimizer::Sgd;
use crate::engine::step_graphs::{forward_backward_prepared, StepGraphs};
use crate::engine::train_log::{EvalPoint, TrainLog};
use crate::modeling::mask_rcnn::TrainInputs;
use crate::modeling::{BatchResize, MaskRcnn};
use crate::ops::BalancedSampler;
use crate::structures::TargetPadding;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How to run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub output: PathBuf,
    /// Continue from the newest checkpoint in `output`.
    pub resume: bool,
    /// Remove a previous run's files from `output` first (without it, and
    /// without `resume`, an output holding a run is refused).
    pub overwrite: bool,
    pub device: Device,
    /// Set (e.g. by Ctrl-C) to checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Show a progress bar (else log lines every `solver.log_period`).
    pub progress: bool,
    /// Data strictness: a bad sample stops training.
    pub strict: bool,
    /// This iteration runs inside a CUDA profiler range
    /// (`kernels::timing::profiler_range`), for an external profiler.
    pub profile_iteration: Option<u64>,
}

/// Why training could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Dataset(#[from] crate::data::DatasetError),
    #[error(transparent)]
    DataCheck(#[from] crate::engine::data_check::DataCheckError),
    #[error(transparent)]
    Loader(#[from] crate::data::LoaderError),
    #[error(transparent)]
    Model(#[from] crate::modeling::ModelError),
    #[error(transparent)]
    Targets(#[from] crate::modeling::TargetError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Shim(#[from] crate::shim::ShimError),
    #[error("iteration {iteration}: {loss} is {value} (fp32 training diverged; lower solver.base_lr or enable solver.clip_grad_norm)")]
    NonFinite { iteration: u64, loss: String, value: f64 },
    /// A file or folder of the run's output could not be written.
    #[error("output directory: cannot write {}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("evaluation")]
    Eval(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Distributed(#[from] DistError),
    #[error(transparent)]
    Log(#[from] crate::engine::train_log::TrainLogError),
}

/// Why the training loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `solver.max_iter` reached.
    Done,
    /// `solver.max_seconds` of training spent.
    TimeUp,
    /// The evaluation reached the configured target accuracy.
    TargetReached,
    /// Ctrl-C or SIGTERM (on any rank).
    Interrupted,
}

/// What a rank asks for before a step's all-reduce; with several ranks,
/// any rank's request holds for all (read once per log period).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopRequest {
    pub interrupt: bool,
    pub time_up: bool,
}

impl StopRequest {
    /// Both requests together.
    pub fn or(self, other: StopRequest) -> StopRequest {
        StopRequest { interrupt: self.interrupt || other.interrupt, time_up: self.time_up || other.time_up }
    }
}

/// One finished step as the hooks see it; a hook records its decision in
/// it (the evaluation sets `target_reached`) for the hooks after it.
#[derive(Debug)]
pub struct StepEnd {
    /// Iterations done, this step included.
    pub iteration: u64,
    pub lr: f64,
    /// The loss values `[L]` (`modeling::loss_names`), on the device,
    /// averaged over the ranks.
    pub losses: Tensor,
    /// The stop requests every rank agreed on.
    pub request: StopRequest,
    /// The final step: `solver.max_iter` reached or the time budget spent.
    pub last: bool,
    pub target_reached: bool,
}

impl StepEnd {
    /// Whether the loop ends after this step, and why: an interruption
    /// first, then the target accuracy (an early stop), the time budget,
    /// the last iteration.
    pub fn stop(&self, max_iter: u64) -> Option<Stop> {
        if self.request.interrupt {
            Some(Stop::Interrupted)
        } else if self.target_reached && !self.last {
            Some(Stop::TargetReached)
        } else if self.request.time_up {
            Some(Stop::TimeUp)
        } else if self.iteration >= max_iter {
            Some(Stop::Done)
        } else {
            None
        }
    }
}

/// Behaviour around the training steps. Every method has a default that
/// does nothing.
pub trait Hook {
    /// Asked on every rank before each step's all-reduce.
    fn stop_request(&mut self, _trainer: &Trainer<'_>) -> StopRequest {
        StopRequest::default()
    }

    /// After each step, in the hooks' order.
    fn after_step(&mut self, _trainer: &mut Trainer<'_>, _step: &mut StepEnd) -> Result<(), TrainError> {
        Ok(())
    }

    /// Once, after the last step.
    fn after_train(&mut self, _trainer: &mut Trainer<'_>, _stop: Stop) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Wall time since training started, and the training time apart from
/// evaluations (what the time budget and the AP-over-time log count).
#[derive(Debug, Clone, Copy)]
pub struct TrainClock {
    started: Instant,
    eval_seconds: f64,
}

impl TrainClock {
    pub fn start() -> TrainClock {
        TrainClock { started: Instant::now(), eval_seconds: 0.0 }
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Seconds since the start, evaluations excepted.
    pub fn train_seconds(&self) -> f64 {
        self.elapsed() - self.eval_seconds
    }

    /// Counts `seconds` of evaluation.
    pub fn add_eval(&mut self, seconds: f64) {
        self.eval_seconds += seconds;
    }
}

/// Everything a run trains with, and where it is.
pub struct Trainer<'a> {
    pub config: &'a Config,
    pub opts: &'a TrainOptions,
    pub model: MaskRcnn,
    pub sgd: Sgd,
    /// fp16's dynamic loss scaler.
    pub scaler: Option<GradScaler>,
    pub loader: Loader,
    /// The other ranks, under `maskrcnn launch`.
    pub group: Option<ProcessGroup>,
    pub group_step: Option<GroupStep>,
    /// CUDA graphs of the step (`precision.cuda_graphs` on CUDA).
    pub step_graphs: Option<StepGraphs>,
    pub log: TrainLog,
    pub bar: indicatif::ProgressBar,
    pub clock: TrainClock,
    pub schedule: LrSchedule,
    pub amp: AmpMode,
    pub rank: usize,
    /// The iteration training started (resumed) from.
    pub start: u64,
    /// Iterations done.
    pub iteration: u64,
    pub images_seen: u64,
    /// The run's config as written to `output/config.toml`.
    pub config_toml: String,
    /// The newest losses read back to the host, by name.
    pub last_losses: Vec<(String, f64)>,
    pub evals: Vec<EvalPoint>,
    /// The validation set's ground truth (rank 0, when configured).
    pub validation: Option<crate::evaluation::ground_truth::GroundTruth>,
    /// Evaluations that failed (`iteration N: why`); training went on.
    pub eval_errors: Vec<String>,
}

impl Trainer<'_> {
    /// Rank 0, which alone writes logs, checkpoints and weights.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Steps until `solver.max_iter` or a hook's stop, then every hook's
    /// `after_train`. Returns why it ended.
    pub fn run(&mut self, hooks: &mut [Box<dyn Hook>]) -> Result<Stop, TrainError> {
        let max_iter = self.config.solver.max_iter as u64;
        let mut stop = Stop::Done;
        while self.iteration < max_iter {
            if let Some(g) = &self.group {
                g.heartbeat();
            }
            let request = hooks.iter_mut().fold(StopRequest::default(), |r, h| r.or(h.stop_request(self)));
            let mut step = self.run_step(request)?;
            for hook in hooks.iter_mut() {
                hook.after_step(self, &mut step)?;
            }
            if let Some(s) = step.stop(max_iter) {
                stop = s;
                break;
            }
        }
        self.bar.finish_and_clear();
        if let Some(g) = &self.group {
            g.pause_watchdog();
        }
        for hook in hooks.iter_mut() {
            hook.after_train(self, stop)?;
        }
        Ok(stop)
    }

    /// One iteration: `solver.accumulate_steps` micro-batches forward and
    /// backward (libtorch's generator reseeded per micro-batch), the group's
    /// all-reduce of gradients, losses and this rank's stop `request`, the
    /// update. Nothing is read back to the host.
    pub fn run_step(&mut self, request: StopRequest) -> Result<StepEnd, TrainError> {
        let solver = &self.config.solver;
        let max_iter = solver.max_iter as u64;
        let iteration = self.iteration;
        let lr = self.schedule.lr_at(iteration as usize);
        let device = self.opts.device;
        let profiled = match device {
            Device::Cuda(i) if self.opts.profile_iteration == Some(iteration) => {
                crate::kernels::timing::profiler_range(i, true)
            }
            _ => false,
        };
        self.log.begin_step();
        let mut sums: Vec<Tensor> = Vec::new();
        for micro in 0..solver.accumulate_steps as u64 {
            let batch = self.loader.next_batch()?;
            self.log.add_loader_batch(&batch);
            self.images_seen += batch.images.len() as u64;
            let global_micro = iteration * solver.accumulate_steps as u64 + micro;
            let seed = micro_batch_seed(self.config.seed, global_micro, self.rank);
            tch::manual_seed(seed);
            let short_side = micro_batch_short_side(&self.config.input.min_size, self.config.seed, global_micro);
            // Padded to cover the global batch: every rank runs one shape.
            let resize = BatchResize { short_side, cover: &batch.global_sizes };
            let step = MicroBatch { images: &batch.images, targets: &batch.targets, resize };
            let inputs = prepare_micro_batch(&self.model, step, self.step_graphs.as_ref())?;
            if micro == 0 {
                self.log.begin_gpu_work(device);
            }
            sums.push(forward_backward_inputs(
                &self.model,
                inputs,
                solver.accumulate_steps,
                self.scaler.as_ref(),
                self.amp,
                &mut BalancedSampler,
                self.step_graphs.as_mut(),
                Some(seed),
            ));
        }
        let losses = Tensor::stack(&sums, 0).mean_dim(0, false, Kind::Float);
        let mut request = request;
        if let (Some(g), Some(sync)) = (&self.group, &self.group_step) {
            let next = iteration + 1;
            let read_flags = next.is_multiple_of(solver.log_period as u64) || next == max_iter;
            let reduced = Instant::now();
            // On the GPU: from the backward's end to the last all-reduce's
            // (the communication the backward did not hide).
            let mut exposed = crate::kernels::timing::GpuSpan::start(device);
            let (interrupt, time_up) = sync.all_reduce(g, &losses, (request.interrupt, request.time_up), read_flags)?;
            request = StopRequest { interrupt, time_up };
            self.log.add_reduce_wait(reduced.elapsed().as_secs_f64());
            if let Some(span) = exposed.as_mut() {
                span.stop();
            }
            self.log.add_reduce_span(exposed);
        }
        apply_update(&mut self.sgd, self.scaler.as_mut(), lr, solver.clip_grad_norm)?;
        if let (true, Device::Cuda(i)) = (profiled, device) {
            crate::kernels::timing::profiler_range(i, false);
        }
        self.log.end_step();
        self.iteration += 1;
        self.bar.set_position(self.iteration);
        let last = self.iteration == max_iter || request.time_up;
        Ok(StepEnd { iteration: self.iteration, lr, losses, request, last, target_reached: false })
    }
}

/// What one training step exchanges over several GPUs, prepared once: one
/// flat float32 buffer holding every trainable parameter's gradient (in a
/// rank-independent order — by name, descending, which is about the order
/// backward finishes them: the RPN and RoI heads, the FPN, then the
/// backbone from its top; each parameter's `.grad` is a view into it from
/// the start, so backward accumulates straight into the buffer and every
/// rank reduces the same values even when a step leaves a parameter
/// unreached), then the step's five losses and the two stop flags. On GPUs
/// the gradients are all-reduced in buckets, each started as soon as
/// backward has finished it ([`GradBuckets`], `solver.allreduce_bucket_mb`),
/// then the losses and flags; else in one all-reduce after the backward.
/// Nothing is concatenated or copied back.
pub struct GroupStep {
    flat: Tensor,
    /// `[5]` view of `flat`: the step's losses.
    losses: Tensor,
    /// `[2]` view of `flat`: Ctrl-C, time budget (1.0 = set) on this rank.
    flags: Tensor,
    /// The gradients' buckets (NCCL with `allreduce_bucket_mb` > 0).
    buckets: Option<GradBuckets>,
}

impl GroupStep {
    /// Makes the ranks' weights and statistics identical (the mean of equal
    /// values is exact; this also covers any init drift) and prepares the
    /// step's tensors, with gradient buckets of about `bucket_mb` MiB on
    /// CUDA (0: none).
    pub fn new(group: &ProcessGroup, model: &MaskRcnn, bucket_mb: f64) -> Result<GroupStep, TrainError> {
        // Sorted by name: every rank must concatenate in the same order.
        let mut state: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        state.sort_by(|a, b| a.0.cmp(&b.0));
        group.all_reduce_mean(&state.into_iter().map(|(_, t)| t).collect::<Vec<_>>())?;
        let mut params: Vec<(String, Tensor)> =
            model.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| b.0.cmp(&a.0));
        let trainable: Vec<Tensor> = params.into_iter().map(|(_, p)| p).collect();
        let device = model.vs.device();
        let total: i64 = trainable.iter().map(|p| p.numel() as i64).sum();
        let losses_len = crate::modeling::loss_names(model.has_masks()).len() as i64;
        let flat = Tensor::zeros([total + losses_len + 2], (Kind::Float, device));
        let mut offset = 0;
        for p in &trainable {
            let grad = dense_view(&flat, offset, p);
            let current = p.grad();
            if current.defined() {
                tch::no_grad(|| grad.shallow_clone().copy_(&current));
            }
            crate::shim::set_grad(p, &grad)?;
            offset += p.numel() as i64;
        }
        let buckets = match group.device() {
            Device::Cuda(index) if bucket_mb > 0.0 => {
                let numels: Vec<i64> = trainable.iter().map(|p| p.numel() as i64).collect();
                let cap = (bucket_mb * (1u64 << 20) as f64 / 4.0).ceil() as i64;
                let plan = crate::distributed::grad_buckets::plan_buckets(&numels, cap);
                Some(GradBuckets::new(&trainable, &plan, index).map_err(DistError::from)?)
            }
            _ => None,
        };
        let (losses, flags) = (flat.narrow(0, total, losses_len), flat.narrow(0, total + losses_len, 2));
        Ok(GroupStep { flat, losses, flags, buckets })
    }

    /// The all-reduce (mean over ranks) of the gradients, the step's
    /// `losses` `[5]` (averaged in place) and this rank's `(stop, time_up)`
    /// flags: any rank's Ctrl-C or time budget stops every rank. Call after
    /// the step's backward was launched: bucketed, each bucket's all-reduce
    /// waits on the device for its gradients only, and libtorch's stream
    /// waits for all of them. The flags are filled on the device and read
    /// back only when `read_flags` (once per log period, the same
    /// iterations on every rank; `(false, false)` otherwise): no host sync
    /// per step.
    fn all_reduce(
        &self,
        group: &ProcessGroup,
        losses: &Tensor,
        (stop, time_up): (bool, bool),
        read_flags: bool,
    ) -> Result<(bool, bool), TrainError> {
        let _ = self.flags.get(0).fill_(f64::from(u8::from(stop)));
        let _ = self.flags.get(1).fill_(f64::from(u8::from(time_up)));
        tch::no_grad(|| {
            self.losses.shallow_clone().copy_(losses);
        });
        match &self.buckets {
            Some(buckets) => {
                let spans = buckets.spans();
                for (k, span) in spans.iter().enumerate() {
                    let stream = buckets.comm_after(Some(k)).map_err(DistError::from)?;
                    let mut grads = self.flat.narrow(0, span.start, span.end - span.start);
                    // SAFETY: our stream on this rank's GPU; `flat` lives
                    // as long as `self`, and the next step's work waits
                    // for this stream (`join`).
                    unsafe { group.all_reduce_mean_on(&mut grads, stream) }?;
                }
                let start = spans.last().map_or(0, |s| s.end);
                let stream = buckets.comm_after(None).map_err(DistError::from)?;
                let mut rest = self.flat.narrow(0, start, self.flat.numel() as i64 - start);
                // SAFETY: as above.
                unsafe { group.all_reduce_mean_on(&mut rest, stream) }?;
                buckets.join().map_err(DistError::from)?;
            }
            None => group.all_reduce_mean_in_place(&mut self.flat.shallow_clone())?,
        }
        tch::no_grad(|| losses.shallow_clone().copy_(&self.losses));
        if !read_flags {
            return Ok((false, false));
        }
        let any: Vec<f32> =
            Vec::try_from(crate::host_sync::to_host(&self.flags.gt(0.0).to_kind(Kind::Float))).unwrap_or_default();
        Ok((any.first() == Some(&1.0), any.get(1) == Some(&1.0)))
    }
}

/// `p.numel()` values of `flat` from `offset`, shaped as `p` with `p`'s
/// strides where they are dense (a channels-last weight keeps its layout,
/// so accumulating its gradient is not a strided pass), else contiguous.
fn dense_view(flat: &Tensor, offset: i64, p: &Tensor) -> Tensor {
    let (size, stride) = (p.size(), p.stride());
    let span: i64 = 1 + size.iter().zip(&stride).map(|(&n, &s)| (n - 1).max(0) * s).sum::<i64>();
    if span == p.numel() as i64 {
        flat.as_strided(size.as_slice(), stride.as_slice(), offset)
    } else {
        flat.narrow(0, offset, p.numel() as i64).view(size.as_slice())
    }
}

/// The seed of libtorch's generator for global micro-batch `micro` (iteration
/// × accumulate_steps + step) on `rank`: RoI sampling draws from it.
pub fn micro_batch_seed(seed: u64, micro: u64, rank: usize) -> i64 {
    (seed ^ micro.wrapping_mul(0x9E37_79B9) ^ (rank as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) as i64
}

/// The short side of global micro-batch `micro`'s images (`None` when
/// `choices` is empty): one of `choices` (`input.min_size`), drawn from the run's `seed` alone, so
/// every rank resizes to the same one — the global batch has one scale, as
/// in one process, and the ranks' steps take about as long (each waits for
/// the slowest at the all-reduce).
pub fn micro_batch_short_side(choices: &[usize], seed: u64, micro: u64) -> Option<i64> {
    let last = choices.len().checked_sub(1)?;
    let mut rng = crate::random::Rng::derive(seed, micro, 0x5CA1E);
    choices.get(rng.range(0, last as u64) as usize).map(|&c| c as i64)
}

/// One micro-batch: images on the model's device, targets anywhere.
#[derive(Debug, Clone, Copy)]
pub struct MicroBatch<'a> {
    pub images: &'a [Tensor],
    pub targets: &'a [crate::structures::Target],
    /// How to resize and pad it.
    pub resize: BatchResize<'a>,
}

/// Forward and backward of one micro-batch: [`prepare_micro_batch`] on
/// the host, then [`forward_backward_inputs`]. Returns the five unscaled
/// loss values `[5]` (device, not synced).
pub fn forward_backward(
    model: &MaskRcnn,
    batch: MicroBatch<'_>,
    accumulate: usize,
    scaler: Option<&GradScaler>,
    amp: AmpMode,
    sampler: &mut dyn crate::ops::FgBgSampler,
    graphs: Option<&mut StepGraphs>,
) -> Result<Tensor, TrainError> {
    let inputs = prepare_micro_batch(model, batch, graphs.as_deref())?;
    Ok(forward_backward_inputs(model, inputs, accumulate, scaler, amp, sampler, graphs, None))
}

/// [`MaskRcnn::prepare_train`] of a micro-batch: its ground truth padded
/// as `graphs` asks (buckets, so batches share graphs), else exactly.
pub fn prepare_micro_batch(
    model: &MaskRcnn,
    batch: MicroBatch<'_>,
    graphs: Option<&StepGraphs>,
) -> Result<TrainInputs, TrainError> {
    let padding = graphs.map_or(TargetPadding::Exact, StepGraphs::padding);
    Ok(model.prepare_train(batch.images, batch.targets, batch.resize, padding)?)
}

/// [`forward_backward_prepared`] of prepared inputs: replayed from
/// `graphs` when given (`reseed`: the generator's seed for this micro-batch,
/// for a step the graphs run again), else eager. Returns the five unscaled
/// loss values `[5]` (device, not synced).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_inputs(
    model: &MaskRcnn,
    inputs: TrainInputs,
    accumulate: usize,
    scaler: Option<&GradScaler>,
    amp: AmpMode,
    sampler: &mut dyn crate::ops::FgBgSampler,
    graphs: Option<&mut StepGraphs>,
    reseed: Option<i64>,
) -> Tensor {
    match graphs {
        Some(g) => g.forward_backward(model, inputs, accumulate, scaler, amp, sampler, reseed),
        None => forward_backward_prepared(model, &inputs, accumulate, scaler, amp, sampler),
    }
}

/// The optimizer step after the micro-batches' backward passes: unscale
/// (fp16; a non-finite gradient skips the step on the device and backs the
/// scale off), clip the global norm when `clip > 0`, fused SGD at `lr`,
/// clear the gradients.
pub fn apply_update(sgd: &mut Sgd, scaler: Option<&mut GradScaler>, lr: f64, clip: f64) -> Result<(), TrainError> {
    if let Some(s) = scaler.as_deref() {
        let grads = sgd.grads();
        s.unscale(&grads.iter().collect::<Vec<_>>())?;
    }
    if clip > 0.0 {
        sgd.clip_grad_norm(clip)?;
    }
    sgd.set_lr(lr);
    sgd.step(scaler.as_deref().map(|s| &s.found_inf))?;
    if let Some(s) = scaler {
        s.update();
    }
    sgd.zero_grad()?;
    Ok(())
}

/// Copies the per-iteration loss vectors `[L]` (named `names`) gathered on
/// the device to the host in one transfer; with `check_finite`, the first
/// non-finite loss is an error naming its iteration. Returns the newest
/// iteration's losses.
pub fn drain_losses(
    pending: &mut Vec<(u64, Tensor)>,
    names: &[&str],
    check_finite: bool,
) -> Result<Option<Vec<f64>>, TrainError> {
    if pending.is_empty() {
        return Ok(None);
    }
    let rows: Vec<&Tensor> = pending.iter().map(|(_, t)| t).collect();
    let host = crate::host_sync::to_host(&Tensor::stack(&rows, 0)).reshape([-1]);
    let values: Vec<f64> = Vec::<f32>::try_from(&host).unwrap_or_default().into_iter().map(f64::from).collect();
    let n = names.len();
    if check_finite {
        for ((iteration, _), row) in pending.iter().zip(values.chunks(n)) {
            if let Some((k, v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(TrainError::NonFinite { iteration: *iteration, loss: names[k].to_string(), value: *v });
            }
        }
    }
    pending.clear();
    Ok(values.chunks(n).last().map(|r| r.to_vec()))
}

#[cfg(test)]
mod tests {
    /// Micro-batches draw each short side with equal probability (within
    /// 4σ over 5,000 draws), and the draw depends on the seed and the
    /// micro-batch only (so every rank resizes to the same one).
    #[test]
    fn short_sides_are_uniform_over_the_choices() {
        let choices = [480usize, 512, 544, 576, 608];
        let n = 5000u64;
        let mut counts = [0u64; 5];
        for micro in 0..n {
            let side = super::micro_batch_short_side(&choices, 7, micro).expect("a side");
            assert_eq!(Some(side), super::micro_batch_short_side(&choices, 7, micro));
            counts[choices.iter().position(|&c| c as i64 == side).expect("a choice")] += 1;
        }
        let (mean, sd) = (n as f64 / 5.0, (n as f64 * 0.2 * 0.8).sqrt());
        for (c, k) in choices.iter().zip(counts) {
            assert!((k as f64 - mean).abs() <= 4.0 * sd, "{c}: {k} of {n}");
        }
        assert_eq!(super::micro_batch_short_side(&[800], 7, 3), Some(800));
        assert_eq!(super::micro_batch_short_side(&[], 7, 3), None);
        let other_seed = (0..50).filter(|&m| {
            super::micro_batch_short_side(&choices, 8, m) != super::micro_batch_short_side(&choices, 7, m)
        });
        assert!(other_seed.count() > 20, "another seed draws other sides");
    }
}
