//! CUDA graphs of the training step: the device part of a micro-batch —
//! forward, losses, backward into the parameters' gradients
//! ([`forward_backward_prepared`]) — recorded once per [`StepKey`] and
//! replayed, so a step costs the host a copy of its inputs and one launch
//! instead of thousands (what made training host-bound). The optimizer
//! update and the all-reduce stay eager: a handful of multi-tensor launches.
//!
//! What makes this sound: the step issues no host reads but the one wait
//! for its published mask-positive count (`HostValue`), its
//! shapes and host-side decisions follow from the key (padded image batch,
//! ground truth padded to power-of-two buckets, mask kinds, pooler scales,
//! autocast and loss scaling), it reads host data only through its input
//! tensors (refilled before each replay), and its random draws come from
//! libtorch's CUDA generator, which a replay reads at launch (so reseeding
//! before a step gives the same samples as an eager step). Gradients
//! accumulate into `.grad` tensors that exist before recording (zeroed in
//! place by the optimizer, never replaced).

use crate::config::AmpMode;
use crate::engine::amp::GradScaler;
use crate::kernels::host_value::HostValue;
use crate::modeling::graphs::{GraphCache, GraphInputs, StaticArena};
use crate::modeling::mask_rcnn::TrainInputs;
use crate::modeling::transform::ImageList;
use crate::modeling::{MaskRcnn, MaskRows};
use crate::ops::FgBgSampler;
use crate::shim::AutocastGuard;
use crate::structures::{BitmapBatch, PackedPolygons, PaddingFloor, TargetBatch, TargetPadding};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// The most step shapes recorded (their working memory is shared: one
/// pool, the largest step's size; so are their static inputs: one arena;
/// each graph keeps only its loss vector). Multi-scale recipes make a few
/// dozen image shapes (five short sides × the long sides of batches in 32-px
/// steps × two orientations); keys past this run eagerly.
pub const MAX_STEP_GRAPHS: usize = 64;

/// Everything host-side a recorded step depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepKey {
    /// `[B, 3, H, W]` of the padded image batch.
    images: Vec<i64>,
    /// Instance slots per image.
    slots: i64,
    /// Packed polygon vertices and polygons, when the batch has polygons.
    polygons: Option<(i64, i64)>,
    /// Whether the batch has bitmap masks.
    bitmaps: bool,
    /// The box and mask poolers' level scales (bit patterns).
    scales: Vec<u64>,
    /// The mask head's row budget (`None`: every slot).
    mask_rows: Option<i64>,
    amp: AmpMode,
    loss_scaled: bool,
    accumulate: usize,
}

impl StepKey {
    fn of(inputs: &TrainInputs, amp: AmpMode, loss_scaled: bool, accumulate: usize) -> StepKey {
        let images = inputs.images.tensors.size();
        // P2..P5 (the poolers' levels): each stride-2 stage of the backbone
        // halves the height, rounding up.
        let heights: Vec<i64> = (2..=5).map(|l| (images[2] + (1 << l) - 1) >> l).collect();
        let scales = crate::modeling::poolers::level_scales(&heights, &inputs.images.image_sizes);
        let gt = &inputs.targets;
        StepKey {
            images,
            slots: gt.slots(),
            polygons: gt.polygons.as_ref().map(|p| (p.coords.size()[0], p.starts.size()[0])),
            bitmaps: gt.bitmaps.is_some(),
            scales: scales.iter().map(|s| s.to_bits()).collect(),
            mask_rows: inputs.mask_rows.budget(),
            amp,
            loss_scaled,
            accumulate,
        }
    }
}

/// Forward and backward of one prepared micro-batch: the loss sum divided
/// by `accumulate` (so `accumulate` micro-batches add up to the gradient of
/// their mean), scaled by the loss scaler when there is one, under autocast
/// per `amp`. Gradients accumulate into the parameters' `.grad`. Returns
/// the five unscaled loss values `[5]` (device, not synced).
pub fn forward_backward_prepared(
    model: &MaskRcnn,
    inputs: &TrainInputs,
    accumulate: usize,
    scaler: Option<&GradScaler>,
    amp: AmpMode,
    sampler: &mut dyn FgBgSampler,
) -> Tensor {
    let losses = {
        let _autocast = AutocastGuard::new(amp.autocast_dtype());
        model.forward_prepared(inputs, sampler)
    };
    let total = losses.total() / accumulate as f64;
    let total = match scaler {
        Some(s) => s.scale_loss(&total),
        None => total,
    };
    crate::host_timing::mark("loss_sum");
    total.backward();
    // Several GPUs: buckets of gradients the pass left unreached are ready now.
    crate::distributed::grad_buckets::finish_backward();
    crate::host_timing::mark("backward");
    Tensor::stack(&losses.named().iter().map(|(_, t)| t.detach().to_kind(Kind::Float)).collect::<Vec<_>>(), 0)
}

/// The training step's graphs by [`StepKey`], with the mask head's row
/// budget: a recorded step cannot size the mask head by its positives (that
/// needs the count on the host before the head runs), so it runs a budget
/// of rows — the slots `B × Q` halved up to four times while that still
/// leaves a quarter more rows than the most positives seen so far — and publishes its
/// count to mapped host memory; the host waits for that count (the GPU
/// meanwhile runs the rest of the step) and, when a step had more positives
/// than rows, discards its gradients and runs it again with enough rows.
/// Every step's mask loss is therefore exact; typical steps run far fewer
/// mask rows than the slots. The budget only grows (positives grow as the
/// RPN learns, then level off), at most four times a run, and when it
/// grows the graphs recorded for the old one are dropped, so the keys stay
/// those of the batch shapes (a finer budget would re-record every shape
/// at each of many small steps while training warms up).
pub struct StepGraphs {
    cache: GraphCache<StepKey, TrainInputs, Tensor>,
    /// Every trainable parameter has a `.grad` (made before the first step).
    grads_defined: bool,
    /// Where steps publish their mask positives (made at the first CUDA
    /// step; `None` then: unavailable, every slot runs).
    positives: Option<Option<Arc<HostValue>>>,
    /// The most mask positives of a step so far.
    most: Option<i64>,
    /// The mask slots `B × Q` of the latest step.
    slots: i64,
    /// Steps run again because their positives exceeded the budget.
    redone: u64,
    /// The ground-truth padding so far (see [`StepGraphs::padding`]).
    floor: PaddingFloor,
    /// Steps run eagerly outside the cache (the first, counted step) and
    /// their wall seconds.
    first_steps: (u64, f64),
}

/// How long the host waits for a step's positive count before giving up
/// on budgets (the count comes a fraction of a step after launch).
const COUNT_TIMEOUT: Duration = Duration::from_secs(120);

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StepGraphs({} recorded, {} replays, {} redone)",
            self.cache.recorded(),
            self.cache.replays(),
            self.redone
        )
    }
}

impl Default for StepGraphs {
    fn default() -> StepGraphs {
        StepGraphs {
            cache: GraphCache::new("training step", MAX_STEP_GRAPHS),
            grads_defined: false,
            positives: None,
            most: None,
            slots: 0,
            redone: 0,
            floor: PaddingFloor::default(),
            first_steps: (0, 0.0),
        }
    }
}

impl StepGraphs {
    /// Step graphs for training on `device` with `precision`: on CUDA when
    /// `precision.cuda_graphs` is on, else none (eager steps).
    pub fn for_training(precision: &crate::config::PrecisionConfig, device: Device) -> Option<StepGraphs> {
        let Device::Cuda(index) = device else { return None };
        precision.cuda_graphs.then(|| {
            let mut graphs = StepGraphs::default();
            graphs.cache = graphs.cache.with_budget(precision.graph_memory_bytes(index));
            graphs
        })
    }

    /// [`forward_backward_prepared`] on a CUDA model: eager the first time
    /// a key is seen, recorded the second, replayed after (see
    /// [`GraphCache::run`]), the mask head on a row budget (see
    /// [`StepGraphs`]; with `accumulate` > 1 on every slot, as gradients of
    /// earlier micro-batches could not be kept apart from a discarded one).
    /// `reseed`, when given, is the seed libtorch's generator had before
    /// this step: a step run again draws the same samples. Prepare `inputs`
    /// with [`StepGraphs::padding`], so batches share keys. The first step
    /// (no count yet) and every step on the CPU: eager, counting the
    /// positives.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &mut self,
        model: &MaskRcnn,
        inputs: TrainInputs,
        accumulate: usize,
        scaler: Option<&GradScaler>,
        amp: AmpMode,
        sampler: &mut dyn FgBgSampler,
        reseed: Option<i64>,
    ) -> Tensor {
        let Device::Cuda(index) = model.device() else {
            return forward_backward_prepared(model, &inputs, accumulate, scaler, amp, sampler);
        };
        let before = self.floor;
        self.floor.cover(&inputs.targets);
        if self.floor != before && self.cache.recorded() > 0 {
            // Later batches pad to the raised floor: no recorded key recurs.
            tracing::debug!("ground-truth padding {before:?} -> {:?}: recorded steps dropped", self.floor);
            self.cache.clear();
        }
        if !self.grads_defined {
            // A recorded backward must add into gradients that exist: one
            // made during recording would be the graph's own buffer,
            // overwritten (not accumulated) by each replay.
            for (_, p) in model.vs.variables() {
                if p.requires_grad() && !p.grad().defined() {
                    if let Err(e) = crate::shim::set_grad(&p, &p.zeros_like()) {
                        tracing::warn!("could not make a gradient before recording the training step: {e}");
                    }
                }
            }
            self.grads_defined = true;
        }
        let report = self.positives.get_or_insert_with(|| HostValue::new(index).map(Arc::new)).clone();
        // Without the mask branch there are no mask rows to budget.
        let Some(report) = report.filter(|_| accumulate == 1 && model.has_masks()) else {
            let inputs = TrainInputs { mask_rows: MaskRows::All, ..inputs };
            return self.run(index, model, inputs, accumulate, scaler, amp, sampler);
        };
        let slots = inputs.targets.len() * model.config.roi_heads.positive_slots();
        self.slots = slots;
        let Some(mut rows) = self.budget() else {
            // No count yet to size a budget by: this step runs eagerly on
            // its counted positives (one read; every slot — `B × Q` rows,
            // 2048 at batch 16 — made it the run's memory peak).
            report.reset();
            let started = std::time::Instant::now();
            let first = TrainInputs { mask_rows: MaskRows::Counted { report: Some(report.clone()) }, ..inputs };
            let losses = forward_backward_prepared(model, &first, accumulate, scaler, amp, sampler);
            self.take_count(&report);
            self.first_steps.0 += 1;
            self.first_steps.1 += started.elapsed().as_secs_f64();
            return losses;
        };
        loop {
            let attempt =
                TrainInputs { mask_rows: MaskRows::Budget { rows, report: report.clone() }, ..inputs.shallow() };
            report.reset();
            let losses = self.run(index, model, attempt, accumulate, scaler, amp, sampler);
            let positives = self.take_count(&report);
            if positives.is_some_and(|p| p <= rows) {
                return losses;
            }
            // Too few rows (or no count): this attempt's gradients are wrong.
            let grads: Vec<Tensor> =
                model.vs.trainable_variables().iter().map(Tensor::grad).filter(Tensor::defined).collect();
            if let Err(e) = tch::no_grad(|| crate::shim::foreach_zero(&grads.iter().collect::<Vec<_>>())) {
                tracing::warn!("could not zero the gradients of a step to run again: {e}");
            }
            if let Some(seed) = reseed {
                tch::manual_seed(seed);
            }
            self.redone += 1;
            match positives {
                Some(p) => {
                    tracing::debug!("mask positives {p} exceeded the budget of {rows} rows; running the step again");
                    // Without a reseed the samples (hence the count) may differ again.
                    // The budget now covers `p` (it is at least min(slots, p)).
                    rows = if reseed.is_some() { self.budget().unwrap_or(slots) } else { slots };
                }
                None => {
                    let inputs = TrainInputs { mask_rows: MaskRows::All, ..inputs };
                    return self.run(index, model, inputs, accumulate, scaler, amp, sampler);
                }
            }
        }
    }

    /// Waits for the positive count a step publishes to `report` and notes
    /// it. Without one (a failed launch, a stalled device) budgets are given
    /// up: the mask head runs every slot from then on.
    fn take_count(&mut self, report: &HostValue) -> Option<i64> {
        let count = report.wait(COUNT_TIMEOUT);
        match count {
            Some(p) => self.observe(p),
            None => {
                tracing::warn!(
                    "a training step did not publish its mask positives; the mask head runs every slot from now on"
                );
                self.positives = Some(None);
            }
        }
        count
    }

    /// How to pad the next step's ground truth: to power-of-two buckets, at
    /// least as far as any earlier step's (so a run's batches share one set
    /// of target sizes, and keys differ only by their images).
    pub fn padding(&self) -> TargetPadding {
        TargetPadding::Buckets(self.floor)
    }

    /// The mask rows of the next step: the slots halved up to four times
    /// while a quarter more rows than the most positives so far remain;
    /// `None` before any count (that step runs on its counted positives).
    fn budget(&self) -> Option<i64> {
        let most = self.most?;
        let mut rows = self.slots;
        for _ in 0..4 {
            if rows / 2 < most + most / 4 + 1 {
                break;
            }
            rows /= 2;
        }
        Some(rows)
    }

    /// Notes a step's positive count; when the budget grows, the graphs of
    /// the old budget are dropped (they would not be replayed again).
    fn observe(&mut self, positives: i64) {
        if self.most.is_some_and(|m| m >= positives) {
            return;
        }
        let before = self.budget();
        self.most = Some(positives);
        if before.is_some() && before != self.budget() {
            tracing::debug!("mask-row budget {before:?} -> {:?} rows", self.budget());
            self.cache.clear();
        }
    }

    /// The mask rows a step runs now (before any step: counted, `None`).
    pub fn mask_rows(&self) -> Option<i64> {
        self.budget()
    }

    /// One attempt: `inputs` through the graph cache.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        index: usize,
        model: &MaskRcnn,
        inputs: TrainInputs,
        accumulate: usize,
        scaler: Option<&GradScaler>,
        amp: AmpMode,
        sampler: &mut dyn FgBgSampler,
    ) -> Tensor {
        let key = StepKey::of(&inputs, amp, scaler.is_some(), accumulate);
        self.cache.run(
            index,
            key,
            inputs,
            |i| forward_backward_prepared(model, i, accumulate, scaler, amp, sampler),
            Tensor::copy,
        )
    }

    /// Keys recorded.
    pub fn recorded(&self) -> usize {
        self.cache.recorded()
    }

    /// Drops every recorded step and returns its memory to the driver
    /// (before an evaluation, which records graphs of its own).
    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// Steps so far that were not replays (first seen, recorded, counted
    /// first steps) and their wall seconds.
    pub fn unsteady(&self) -> (u64, f64) {
        let (n, s) = self.cache.unsteady();
        (n + self.first_steps.0, s + self.first_steps.1)
    }

    /// Steps replayed from a graph so far.
    pub fn replays(&self) -> u64 {
        self.cache.replays()
    }

    /// Steps run again because their mask positives exceeded the budget.
    pub fn redone(&self) -> u64 {
        self.redone
    }
}

/// Field by field: every device tensor copied (host fields cloned; they
/// match within a key).
impl GraphInputs for TrainInputs {
    fn to_static(&self, arena: &mut StaticArena) -> TrainInputs {
        self.map_tensors(|t| arena.copy(t))
    }

    fn refill(&self, values: &TrainInputs) {
        let (images, gt, new) = (&self.images, &self.targets, &values.targets);
        images.tensors.refill(&values.images.tensors);
        images.sizes.refill(&values.images.sizes);
        for (into, from) in [
            (&gt.boxes, &new.boxes),
            (&gt.labels, &new.labels),
            (&gt.valid, &new.valid),
            (&gt.crowd, &new.crowd),
            (&gt.has_mask, &new.has_mask),
        ] {
            into.refill(from);
        }
        if let (Some(p), Some(q)) = (&gt.polygons, &new.polygons) {
            p.coords.refill(&q.coords);
            p.starts.refill(&q.starts);
            p.instances.refill(&q.instances);
        }
        if let (Some(b), Some(c)) = (&gt.bitmaps, &new.bitmaps) {
            b.masks.refill(&c.masks);
            b.sizes.refill(&c.sizes);
        }
    }
}

impl TrainInputs {
    /// Another handle to the same device tensors.
    fn shallow(&self) -> TrainInputs {
        self.map_tensors(Tensor::shallow_clone)
    }

    /// `self` with `f` applied to every tensor (host fields cloned).
    fn map_tensors(&self, mut f: impl FnMut(&Tensor) -> Tensor) -> TrainInputs {
        let (images, gt) = (&self.images, &self.targets);
        TrainInputs {
            images: ImageList {
                tensors: f(&images.tensors),
                image_sizes: images.image_sizes.clone(),
                sizes: f(&images.sizes),
            },
            targets: TargetBatch {
                boxes: f(&gt.boxes),
                labels: f(&gt.labels),
                valid: f(&gt.valid),
                crowd: f(&gt.crowd),
                has_mask: f(&gt.has_mask),
                polygons: gt.polygons.as_ref().map(|p| PackedPolygons {
                    coords: f(&p.coords),
                    starts: f(&p.starts),
                    instances: f(&p.instances),
                }),
                bitmaps: gt.bitmaps.as_ref().map(|b| BitmapBatch {
                    masks: f(&b.masks),
                    sizes: f(&b.sizes),
                    host_sizes: b.host_sizes.clone(),
                }),
            },
            mask_rows: self.mask_rows.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, NormKind};
    use crate::engine::optimizer::Sgd;
    use crate::engine::train_loop::apply_update;
    use crate::modeling::mask_row_bucket;
    use crate::ops::BalancedSampler;
    use crate::structures::{InstanceMasks, Target};

    /// A small training setup: ResNet-18 FPN, frozen BN, 4 classes, images
    /// resized to a short side of 160 (long side at most 240).
    fn config() -> Config {
        let mut config = Config::default();
        config.model.backbone_depth = 18;
        config.model.num_classes = crate::config::AutoCount::Fixed(4);
        config.model.norm = NormKind::FrozenBn;
        config.input.min_size = vec![160];
        config.input.max_size = 240;
        config
    }

    /// A batch of noise images `sizes` `(H, W)`, each with 1–`max_instances`
    /// random boxes: even images carry polygon masks (a quadrilateral inside
    /// each box), odd ones bitmaps (the box filled), drawn from `rng`.
    fn batch(rng: &mut crate::random::Rng, sizes: &[(i64, i64)], max_instances: usize) -> (Vec<Tensor>, Vec<Target>) {
        let mut images = Vec::new();
        let mut targets = Vec::new();
        for (i, &(h, w)) in sizes.iter().enumerate() {
            images.push(Tensor::rand([3, h, w], (Kind::Float, Device::Cpu)));
            let n = 1 + (rng.next_u64() % max_instances as u64) as usize;
            let mut boxes = Vec::new();
            let mut polygons = Vec::new();
            let bitmaps = Tensor::zeros([n as i64, h, w], (Kind::Uint8, Device::Cpu));
            for k in 0..n {
                let (x0, y0) = (rng.range_f64(0.0, w as f64 * 0.6), rng.range_f64(0.0, h as f64 * 0.6));
                let (x1, y1) = (x0 + rng.range_f64(12.0, w as f64 * 0.4), y0 + rng.range_f64(12.0, h as f64 * 0.4));
                boxes.extend([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
                let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
                polygons.push(vec![vec![x0, cy, cx, y0, x1, cy, cx, y1]]);
                let (r0, c0) = (y0 as i64, x0 as i64);
                let (r1, c1) = ((y1 as i64).min(h), (x1 as i64).min(w));
                let _ = bitmaps.get(k as i64).narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0).fill_(1);
            }
            let labels: Vec<i64> = (0..n).map(|_| 1 + (rng.next_u64() % 3) as i64).collect();
            targets.push(Target {
                boxes: Tensor::from_slice(&boxes).reshape([n as i64, 4]),
                labels: Tensor::from_slice(&labels),
                masks: if i % 2 == 0 { InstanceMasks::Polygons(polygons) } else { InstanceMasks::Bitmaps(bitmaps) },
                iscrowd: None,
                has_mask: None,
            });
        }
        (images, targets)
    }

    /// Copies `from`'s weights into `into`'s tensors in place (recorded
    /// graphs read those very tensors).
    fn copy_weights(from: &MaskRcnn, into: &MaskRcnn) {
        let into_vars = into.vs.variables();
        tch::no_grad(|| {
            for (name, v) in from.vs.variables() {
                into_vars[&name].shallow_clone().copy_(&v);
            }
        });
    }

    /// The relative L2 distance between the gradients of `a` and `b`
    /// (over `a`'s trainable parameters with a gradient) and `a`'s
    /// gradient norm squared.
    fn gradient_distance(a: &MaskRcnn, b: &MaskRcnn) -> (f64, f64) {
        let b_vars = b.vs.variables();
        let sq = |t: Tensor| t.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
        let (mut diff, mut norm) = (0.0, 0.0);
        for (name, v) in a.vs.variables() {
            if v.requires_grad() && v.grad().defined() {
                diff += sq(v.grad() - b_vars[&name].grad());
                norm += sq(v.grad());
            }
        }
        ((diff / norm).sqrt(), norm)
    }

    /// A device loss vector's values.
    fn values(losses: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(losses.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap()
    }

    /// Padding the ground truth to buckets (more instance slots, polygon
    /// storage never read) gives the losses of exact padding: on the CPU,
    /// with polygon and bitmap images and the same samples; also at a
    /// floor raised by earlier batches, where a batch of bitmap images
    /// carries an empty polygon pack.
    #[test]
    fn bucketed_targets_give_the_losses_of_exact_ones() {
        let config = config();
        let model = MaskRcnn::new(&config, Device::Cpu).expect("model");
        let mut rng = crate::random::Rng::new(11);
        let (images, targets) = batch(&mut rng, &[(150, 200), (180, 140), (160, 160), (140, 170)], 3);
        let losses = |images: &[Tensor], targets: &[Target], padding| {
            let inputs = model.prepare_train(images, targets, Default::default(), padding).expect("inputs");
            let l = tch::no_grad(|| model.forward_prepared(&inputs, &mut crate::ops::FirstSampler));
            let polygons = inputs.targets.polygons.as_ref().map(|p| p.coords.size()[0]);
            (inputs.targets.slots(), polygons, l.named().iter().map(|(_, t)| t.double_value(&[])).collect::<Vec<f64>>())
        };
        let raised =
            TargetPadding::Buckets(PaddingFloor { slots: 32, vertices: 4096, polygons: 256, pack_polygons: true });
        let bitmaps: (Vec<Tensor>, Vec<Target>) = (
            images.iter().skip(1).step_by(2).map(Tensor::shallow_clone).collect(),
            targets.iter().skip(1).step_by(2).map(|t| t.to_device(Device::Cpu)).collect(),
        );
        for (images, targets) in [(&images[..], &targets[..]), (&bitmaps.0[..], &bitmaps.1[..])] {
            let (exact_slots, exact_polygons, exact) = losses(images, targets, TargetPadding::Exact);
            assert!(exact_slots < 8, "instance slots: {exact_slots} exact");
            let mut padded = vec![(8, losses(images, targets, TargetPadding::buckets()))];
            padded.push((32, losses(images, targets, raised)));
            for (slots, (bucket_slots, polygons, bucketed)) in padded {
                assert_eq!(bucket_slots, slots);
                if slots == 32 {
                    assert_eq!(polygons, Some(4096), "the raised floor packs (possibly no) polygons");
                } else {
                    assert_eq!(polygons.is_some(), exact_polygons.is_some());
                }
                for (k, (a, b)) in exact.iter().zip(&bucketed).enumerate() {
                    assert!(a.is_finite() && *a > 0.0, "loss {k}: {a}");
                    assert!((a - b).abs() <= 1e-6 * a.abs(), "loss {k}: exact {a}, padded to {slots} slots {b}");
                }
            }
        }
    }

    /// A floor covers what a batch was padded to and never shrinks.
    #[test]
    fn padding_floor_only_grows() {
        let mut rng = crate::random::Rng::new(3);
        let (_, large) = batch(&mut rng, &[(150, 200), (180, 140)], 12);
        let (_, small) = batch(&mut rng, &[(150, 200), (180, 140)], 2);
        let mut floor = PaddingFloor::default();
        let padded = |targets: Vec<Target>, floor: PaddingFloor| {
            TargetBatch::new(targets, Device::Cpu, (200, 200), TargetPadding::Buckets(floor))
        };
        let big = padded(large, floor);
        floor.cover(&big);
        assert_eq!((floor.slots, floor.pack_polygons), (16, true));
        let after = padded(small, floor);
        assert_eq!(after.slots(), 16);
        floor.cover(&after);
        assert_eq!(floor.slots, 16);
    }

    /// The mask head on the counted positives only (moved to the front of
    /// the batch, padded to a bucket) gives the losses and gradients of
    /// running it on every slot: on the CPU, polygon and bitmap images.
    #[test]
    fn counted_mask_rows_give_the_losses_and_gradients_of_every_slot() {
        let config = config();
        let model = MaskRcnn::new(&config, Device::Cpu).expect("model");
        let mut rng = crate::random::Rng::new(5);
        let (images, targets) = batch(&mut rng, &[(150, 200), (180, 140), (160, 160)], 6);
        let run = |rows: MaskRows| {
            let inputs =
                model.prepare_train(&images, &targets, Default::default(), TargetPadding::Exact).expect("inputs");
            let inputs = TrainInputs { mask_rows: rows, ..inputs };
            let losses = model.forward_prepared(&inputs, &mut crate::ops::FirstSampler);
            for p in model.vs.trainable_variables() {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            losses.total().backward();
            let grads: Vec<Tensor> =
                model.vs.trainable_variables().iter().map(|p| p.grad().reshape([-1]).copy()).collect();
            (losses.named().iter().map(|(_, t)| t.double_value(&[])).collect::<Vec<f64>>(), Tensor::cat(&grads, 0))
        };
        let (all, all_grads) = run(MaskRows::All);
        let (counted, counted_grads) = run(MaskRows::Counted { report: None });
        assert!(all[4] > 0.0, "a mask loss: {all:?}");
        for (k, (a, b)) in all.iter().zip(&counted).enumerate() {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "loss {k}: every slot {a}, counted rows {b}");
        }
        let rel = (&all_grads - &counted_grads).norm().double_value(&[]) / all_grads.norm().double_value(&[]);
        assert!(rel <= 1e-6, "gradients differ by {rel:.2e} (relative L2)");
    }

    /// Row buckets: 32, then half octaves, never below the count, capped by the slots.
    #[test]
    fn mask_row_buckets_cover_the_count() {
        let buckets: Vec<i64> = [0, 1, 32, 33, 49, 64, 65, 97, 129, 200].map(|p| mask_row_bucket(p, 10_000)).to_vec();
        assert_eq!(buckets, [32, 32, 32, 48, 64, 64, 96, 128, 192, 256]);
        assert_eq!(mask_row_bucket(300, 256), 256);
        for p in 0..3000 {
            let r = mask_row_bucket(p, 2048);
            assert!(r >= p.min(2048) && r <= 2048 && (r <= 32 || r < 2 * p), "{p} -> {r}");
        }
    }

    /// The budget rule on the host: none before a count; the slots halved
    /// up to four times while a quarter more rows than the most positives
    /// remain; a lower count leaves it, a higher one grows it.
    #[test]
    fn the_budget_follows_the_most_positives() {
        let mut graphs = StepGraphs { slots: 2048, ..StepGraphs::default() };
        assert_eq!((graphs.budget(), graphs.mask_rows()), (None, None));
        for (positives, rows) in [(93, 128), (50, 128), (300, 512), (2000, 2048)] {
            graphs.observe(positives);
            assert_eq!(graphs.budget(), Some(rows), "after {positives} positives");
        }
    }

    /// Two models with equal weights on `device`, and one step of the same
    /// four images (up to `max_instances` instances each, drawn from
    /// `batch_seed`) through each from libtorch seed `seed`: eager on the
    /// first, through `graphs` on the second. Returns the models and the
    /// two loss vectors.
    fn eager_and_graphed_step(
        device: Device,
        batch_seed: u64,
        max_instances: usize,
        seed: i64,
        graphs: &mut StepGraphs,
    ) -> (MaskRcnn, MaskRcnn, Tensor, Tensor) {
        crate::shim::set_tf32(false);
        tch::Cuda::cudnn_set_benchmark(false);
        let config = config();
        let (eager_model, graph_model) =
            (MaskRcnn::new(&config, device).expect("model"), MaskRcnn::new(&config, device).expect("model"));
        copy_weights(&eager_model, &graph_model);
        let mut rng = crate::random::Rng::new(batch_seed);
        let (images, targets) = batch(&mut rng, &[(150, 200), (180, 140), (160, 160), (150, 150)], max_instances);
        let images: Vec<Tensor> = images.iter().map(|t| t.to_device(device)).collect();
        let prepare = |model: &MaskRcnn| {
            model.prepare_train(&images, &targets, Default::default(), TargetPadding::buckets()).expect("inputs")
        };
        tch::manual_seed(seed);
        let eager = forward_backward_prepared(
            &eager_model,
            &prepare(&eager_model),
            1,
            None,
            AmpMode::Off,
            &mut BalancedSampler,
        );
        tch::manual_seed(seed);
        let inputs = prepare(&graph_model);
        let graphed =
            graphs.forward_backward(&graph_model, inputs, 1, None, AmpMode::Off, &mut BalancedSampler, Some(seed));
        crate::shim::set_tf32(true);
        (eager_model, graph_model, eager, graphed)
    }

    /// Asserts the losses (1e-5 relative) and gradients (1e-4 relative L2)
    /// of two steps equal.
    fn assert_same_step(eager: (&MaskRcnn, &Tensor), graphed: (&MaskRcnn, &Tensor), what: &str) {
        let (a, b) = (values(eager.1), values(graphed.1));
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "loss {k}: eager {x}, {what} {y}");
        }
        let (rel, _) = gradient_distance(eager.0, graphed.0);
        eprintln!("{what}: losses {a:?} vs {b:?}; gradients differ by {rel:.1e}");
        assert!(rel <= 1e-4, "{what}: gradients differ by {rel:.2e} (relative L2)");
    }

    /// A graphed step whose positives exceed its mask-row budget runs again
    /// with enough rows: the same losses and gradients as an eager step
    /// that counts its positives (the discarded attempt's gradients gone),
    /// one step redone.
    #[test]
    fn gpu_a_step_over_its_mask_budget_runs_again() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_a_step_over_its_mask_budget_runs_again") else {
            return;
        };
        let mut graphs = StepGraphs::default();
        (graphs.most, graphs.slots) = (Some(1), 4 * 128);
        assert_eq!(graphs.budget(), Some(32));
        // Four images with 1-24 instances each: more positives than 32 rows.
        let (eager_model, graph_model, eager, redone) = eager_and_graphed_step(device, 8, 24, 9, &mut graphs);
        assert_eq!(graphs.redone(), 1, "the step ran again");
        let counted = graphs.most.expect("a count");
        assert!(counted > 32, "positives {counted}");
        let budget = graphs.budget().expect("a budget");
        assert!(budget > counted + counted / 4 || budget == 512, "budget {budget} for {counted} positives");
        assert_same_step((&eager_model, &eager), (&graph_model, &redone), "redone step");
    }

    /// The first graphed step has no count to size a budget by: it runs
    /// eagerly on its counted positives (not on every slot, which made it
    /// the run's memory peak), gives the eager step's losses and gradients,
    /// records nothing, and sets the budget of the steps after it.
    #[test]
    fn gpu_the_first_step_counts_its_positives() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_the_first_step_counts_its_positives") else {
            return;
        };
        let mut graphs = StepGraphs::default();
        assert_eq!(graphs.mask_rows(), None);
        let (eager_model, graph_model, eager, first) = eager_and_graphed_step(device, 12, 8, 21, &mut graphs);
        let counted = graphs.most.expect("the first step published its count");
        assert!(counted > 0 && counted < graphs.slots, "{counted} positives of {} slots", graphs.slots);
        let rows = graphs.mask_rows().expect("a budget after the first step");
        assert!(
            rows > counted && rows < graphs.slots,
            "budget {rows} for {counted} positives of {} slots",
            graphs.slots
        );
        assert_eq!((graphs.recorded(), graphs.replays(), graphs.redone()), (0, 0, 0));
        assert_same_step((&eager_model, &eager), (&graph_model, &first), "first graphed step");
    }

    /// Training steps replayed from CUDA graphs compute what eager steps
    /// compute: from the same weights (the eager model's, copied in place
    /// into the replayed model before every step, so rounding cannot
    /// compound over steps into a different trajectory), the same losses
    /// and the same gradients, in float32 (TF32 off) and fp16 with loss
    /// scaling (one step forced to overflow and skipped, on a replayed
    /// step), over two padded shapes met in turn, new images and targets
    /// every step, each step updated by SGD on both sides.
    #[test]
    fn gpu_replayed_training_steps_equal_eager_ones() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_replayed_training_steps_equal_eager_ones") else {
            return;
        };
        crate::shim::set_tf32(false);
        tch::Cuda::cudnn_set_benchmark(false);
        let small = [(150i64, 200i64), (180, 140)];
        let large = [(160i64, 300i64), (150, 200)];
        // Shapes per step: recorded at steps 2 and 6, replayed at 2, 3, 5, 6, 7.
        let plan = [&small, &small, &small, &large, &small, &large, &large];
        const LR: f64 = 0.002;
        const CLIP: f64 = 1.0;
        for amp in [AmpMode::Off, AmpMode::Fp16] {
            let config = config();
            let new_model = || {
                let mut m = MaskRcnn::new(&config, device).expect("model");
                m.to_channels_last();
                m
            };
            let (eager_model, graph_model) = (new_model(), new_model());
            let mut eager_sgd = Sgd::new(&eager_model.vs, 0.9, 1e-4, 1.0, 1e-4);
            let mut graph_sgd = Sgd::new(&graph_model.vs, 0.9, 1e-4, 1.0, 1e-4);
            let scaler = || (amp == AmpMode::Fp16).then(|| GradScaler::new(1024.0, 2000, device));
            let (mut eager_scaler, mut graph_scaler) = (scaler(), scaler());
            let mut graphs = StepGraphs::default();
            // A fixed mask-row budget, half the 256 slots (more rows than
            // these small batches have positives): the keys are the shapes.
            (graphs.most, graphs.slots) = (Some(100), 2 * 128);
            assert_eq!(graphs.budget(), Some(128));
            let mut rng = crate::random::Rng::new(3);
            let (mut worst_loss, mut worst_grad): (f64, f64) = (0.0, 0.0);
            let mut reserved_after = Vec::new();
            crate::shim::release_cached_cuda_memory().expect("release the cache");
            let reserved_before = crate::shim::cuda_memory_now(0).unwrap_or_default().1 as f64;
            for (step, sizes) in plan.iter().enumerate() {
                copy_weights(&eager_model, &graph_model);
                let (images, targets) = batch(&mut rng, sizes.as_slice(), 5);
                let images: Vec<Tensor> = images.iter().map(|t| t.to_device(device)).collect();
                let overflow = amp == AmpMode::Fp16 && step == 4;
                if overflow {
                    for s in [&eager_scaler, &graph_scaler].into_iter().flatten() {
                        let _ = s.scale.shallow_clone().fill_(2f64.powi(60));
                    }
                }
                tch::manual_seed(100 + step as i64);
                let inputs = eager_model
                    .prepare_train(&images, &targets, Default::default(), TargetPadding::buckets())
                    .expect("inputs");
                let eager = forward_backward_prepared(
                    &eager_model,
                    &inputs,
                    1,
                    eager_scaler.as_ref(),
                    amp,
                    &mut BalancedSampler,
                );
                tch::manual_seed(100 + step as i64);
                let inputs = graph_model
                    .prepare_train(&images, &targets, Default::default(), TargetPadding::buckets())
                    .expect("inputs");
                let replayed = graphs.forward_backward(
                    &graph_model,
                    inputs,
                    1,
                    graph_scaler.as_ref(),
                    amp,
                    &mut BalancedSampler,
                    Some(100 + step as i64),
                );
                // The gradients of this step alone (the previous update zeroed them).
                let (grad_rel, norm) = gradient_distance(&eager_model, &graph_model);
                if overflow {
                    assert!(!norm.is_finite(), "{amp} step {step}: the forced overflow gives non-finite gradients");
                } else {
                    assert!(norm > 0.0 && grad_rel.is_finite(), "{amp} step {step}: gradients {norm}, {grad_rel}");
                    worst_grad = worst_grad.max(grad_rel);
                }
                apply_update(&mut eager_sgd, eager_scaler.as_mut(), LR, CLIP).expect("update");
                apply_update(&mut graph_sgd, graph_scaler.as_mut(), LR, CLIP).expect("update");
                if overflow {
                    for s in [&mut eager_scaler, &mut graph_scaler].into_iter().flatten() {
                        assert_eq!(s.state().skipped, 1.0, "{amp}: the overflowing step is skipped");
                        let _ = s.scale.shallow_clone().fill_(1024.0);
                    }
                }
                let (a, b) = (values(&eager), values(&replayed));
                // What the step leaves held beyond the general pool's cache
                // (which GraphCache releases at some steps and not others,
                // and earlier tests may have left): live tensors and graphs.
                crate::shim::release_cached_cuda_memory().expect("release the cache");
                let (allocated, reserved) = crate::shim::cuda_memory_now(0).unwrap_or_default();
                eprintln!(
                    "{amp} step {step}: gradients differ by {grad_rel:.1e} (relative L2); {} MiB allocated, {} MiB reserved",
                    allocated >> 20,
                    reserved >> 20
                );
                reserved_after.push(reserved as f64);
                for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(x.is_finite() && y.is_finite(), "{amp} step {step} loss {k}: eager {x}, replayed {y}");
                    let rel = (x - y).abs() / x.abs().max(1e-3);
                    worst_loss = worst_loss.max(rel);
                    eprintln!("{amp} step {step} loss {k}: eager {x:.6} replayed {y:.6} (rel {rel:.1e})");
                }
            }
            // From equal weights the forward passes run the same kernels on
            // the same values; gradients differ by the order of atomic sums
            // in some backward kernels. A stale input, random draw or
            // gradient buffer in a replay moves them by far more.
            // (float32: eager steps differ from each other by up to ~2e-4.)
            let (loss_tolerance, grad_tolerance) = if amp == AmpMode::Off { (1e-5, 1e-3) } else { (1e-3, 1e-2) };
            eprintln!("{amp}: losses within {worst_loss:.1e}, gradients within {worst_grad:.1e} (relative)");
            assert!(worst_loss <= loss_tolerance, "{amp}: losses differ by {worst_loss:.2e} (relative)");
            assert!(worst_grad <= grad_tolerance, "{amp}: gradients differ by {worst_grad:.2e} (relative L2)");
            assert_eq!(
                (graphs.recorded(), graphs.replays(), graphs.redone()),
                (2, 5, 0),
                "{amp}: graphs recorded, steps replayed, steps redone"
            );
            // The second graph records into the first one's memory: it
            // reserves far less than the first recording's working memory.
            if amp == AmpMode::Off {
                let first = reserved_after[1] - reserved_after[0];
                let second = reserved_after[5] - reserved_after[4];
                eprintln!(
                    "reserved by recording: first {:.0} MiB, second {:.0} MiB (before {:.0} MiB)",
                    first / 1048576.0,
                    second / 1048576.0,
                    reserved_before / 1048576.0
                );
                assert!(second <= 0.5 * first, "the second graph reserved {second} bytes, the first {first}");
            }
        }
        crate::shim::set_tf32(true);
    }
}
