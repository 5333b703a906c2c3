//! CUDA graphs of the training step: the device part of a micro-batch —
//! forward, losses, backward into the parameters' gradients
//! ([`forward_backward_prepared`]) — recorded once per [`StepKey`] and
//! replayed, so a step costs the host a copy of its inputs and one launch
//! instead of thousands (what made training host-bound). The optimizer
//! update and the all-reduce stay eager: a handful of multi-tensor launches.
//!
//! What makes this sound: the step issues no host reads (0 syncs), its
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
use crate::modeling::graphs::{GraphCache, GraphInputs};
use crate::modeling::mask_rcnn::TrainInputs;
use crate::modeling::transform::ImageList;
use crate::modeling::MaskRcnn;
use crate::ops::FgBgSampler;
use crate::shim::AutocastGuard;
use crate::structures::{BitmapBatch, PackedPolygons, TargetBatch};
use tch::{Device, Kind, Tensor};

/// The most step shapes recorded (their working memory is shared: one
/// pool, the largest step's size; each graph keeps only its loss vector).
pub const MAX_STEP_GRAPHS: usize = 16;

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
    crate::host_timing::mark("backward");
    Tensor::stack(&losses.named().iter().map(|(_, t)| t.detach().to_kind(Kind::Float)).collect::<Vec<_>>(), 0)
}

/// The training step's graphs by [`StepKey`].
pub struct StepGraphs {
    cache: GraphCache<StepKey, TrainInputs, Tensor>,
    /// Every trainable parameter has a `.grad` (made before the first step).
    grads_defined: bool,
}

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepGraphs({} recorded, {} replays)", self.cache.recorded(), self.cache.replays())
    }
}

impl Default for StepGraphs {
    fn default() -> StepGraphs {
        StepGraphs { cache: GraphCache::new("training step", MAX_STEP_GRAPHS), grads_defined: false }
    }
}

impl StepGraphs {
    /// [`forward_backward_prepared`] on a CUDA model: eager the first time
    /// a key is seen, recorded the second, replayed after (see
    /// [`GraphCache::run`]). Prepare `inputs` with
    /// `TargetPadding::Buckets`, so batches share keys. On the CPU: eager.
    pub fn forward_backward(
        &mut self,
        model: &MaskRcnn,
        inputs: TrainInputs,
        accumulate: usize,
        scaler: Option<&GradScaler>,
        amp: AmpMode,
        sampler: &mut dyn FgBgSampler,
    ) -> Tensor {
        let Device::Cuda(index) = model.device() else {
            return forward_backward_prepared(model, &inputs, accumulate, scaler, amp, sampler);
        };
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

    /// Steps replayed from a graph so far.
    pub fn replays(&self) -> u64 {
        self.cache.replays()
    }
}

/// Field by field: every device tensor copied (host fields cloned; they
/// match within a key).
impl GraphInputs for TrainInputs {
    fn to_static(&self) -> TrainInputs {
        let (images, gt) = (&self.images, &self.targets);
        TrainInputs {
            images: ImageList {
                tensors: images.tensors.to_static(),
                image_sizes: images.image_sizes.clone(),
                sizes: images.sizes.to_static(),
            },
            targets: TargetBatch {
                boxes: gt.boxes.to_static(),
                labels: gt.labels.to_static(),
                valid: gt.valid.to_static(),
                crowd: gt.crowd.to_static(),
                polygons: gt.polygons.as_ref().map(|p| PackedPolygons {
                    coords: p.coords.to_static(),
                    starts: p.starts.to_static(),
                    instances: p.instances.to_static(),
                }),
                bitmaps: gt.bitmaps.as_ref().map(|b| BitmapBatch {
                    masks: b.masks.to_static(),
                    sizes: b.sizes.to_static(),
                    host_sizes: b.host_sizes.clone(),
                }),
            },
        }
    }

    fn refill(&self, values: &TrainInputs) {
        let (images, gt, new) = (&self.images, &self.targets, &values.targets);
        images.tensors.refill(&values.images.tensors);
        images.sizes.refill(&values.images.sizes);
        for (into, from) in
            [(&gt.boxes, &new.boxes), (&gt.labels, &new.labels), (&gt.valid, &new.valid), (&gt.crowd, &new.crowd)]
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, NormKind};
    use crate::engine::optimizer::Sgd;
    use crate::engine::train_loop::apply_update;
    use crate::ops::BalancedSampler;
    use crate::structures::{InstanceMasks, Target, TargetPadding};

    /// A small training setup: ResNet-18 FPN, frozen BN, 4 classes, images
    /// resized to a short side of 160 (long side at most 240).
    fn config() -> Config {
        let mut config = Config::default();
        config.model.backbone_depth = 18;
        config.model.num_classes = 4;
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
            });
        }
        (images, targets)
    }

    /// Padding the ground truth to buckets (more instance slots, polygon
    /// storage never read) gives the losses of exact padding: on the CPU,
    /// with polygon and bitmap images and the same samples.
    #[test]
    fn bucketed_targets_give_the_losses_of_exact_ones() {
        let config = config();
        let model = MaskRcnn::new(&config, Device::Cpu).expect("model");
        let mut rng = crate::random::Rng::new(11);
        let (images, targets) = batch(&mut rng, &[(150, 200), (180, 140), (160, 160)], 3);
        let losses = |padding| {
            let inputs = model.prepare_train(&images, &targets, padding).expect("inputs");
            let l = tch::no_grad(|| model.forward_prepared(&inputs, &mut crate::ops::FirstSampler));
            (inputs.targets.slots(), l.named().map(|(_, t)| t.double_value(&[])))
        };
        let (exact_slots, exact) = losses(TargetPadding::Exact);
        let (bucket_slots, bucketed) = losses(TargetPadding::Buckets);
        assert!(exact_slots < 8 && bucket_slots == 8, "instance slots: {exact_slots} exact, {bucket_slots} bucketed");
        for (k, (a, b)) in exact.iter().zip(&bucketed).enumerate() {
            assert!(a.is_finite() && *a > 0.0, "loss {k}: {a}");
            assert!((a - b).abs() <= 1e-6 * a.abs(), "loss {k}: exact {a}, bucketed {b}");
        }
    }

    /// Training steps replayed from CUDA graphs take the steps eager
    /// execution takes: the same losses every step and the same weights at
    /// the end, in float32 (TF32 off) and fp16 with loss scaling (one step
    /// forced to overflow and skipped, on a replayed step), over two padded
    /// shapes met in turn, new images and targets every step.
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
        // Small, clipped steps: random weights on noise images diverge at
        // larger ones, and diverging losses would amplify rounding.
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
            let initial: std::collections::HashMap<String, Tensor> =
                eager_model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let mut eager_sgd = Sgd::new(&eager_model.vs, 0.9, 1e-4, 1.0, 1e-4);
            let mut graph_sgd = Sgd::new(&graph_model.vs, 0.9, 1e-4, 1.0, 1e-4);
            let scaler = || (amp == AmpMode::Fp16).then(|| GradScaler::new(1024.0, 2000, device));
            let (mut eager_scaler, mut graph_scaler) = (scaler(), scaler());
            let mut graphs = StepGraphs::default();
            let mut rng = crate::random::Rng::new(3);
            let mut worst: f64 = 0.0;
            let mut reserved_after = Vec::new();
            let reserved_before = crate::shim::cuda_memory_now(0).unwrap_or_default().1 as f64;
            for (step, sizes) in plan.iter().enumerate() {
                let (images, targets) = batch(&mut rng, sizes.as_slice(), 5);
                let images: Vec<Tensor> = images.iter().map(|t| t.to_device(device)).collect();
                let overflow = amp == AmpMode::Fp16 && step == 4;
                if overflow {
                    for s in [&eager_scaler, &graph_scaler].into_iter().flatten() {
                        let _ = s.scale.shallow_clone().fill_(2f64.powi(60));
                    }
                }
                tch::manual_seed(100 + step as i64);
                let inputs = eager_model.prepare_train(&images, &targets, TargetPadding::Buckets).expect("inputs");
                let eager = forward_backward_prepared(
                    &eager_model,
                    &inputs,
                    1,
                    eager_scaler.as_ref(),
                    amp,
                    &mut BalancedSampler,
                );
                apply_update(&mut eager_sgd, eager_scaler.as_mut(), LR, CLIP).expect("update");
                tch::manual_seed(100 + step as i64);
                let inputs = graph_model.prepare_train(&images, &targets, TargetPadding::Buckets).expect("inputs");
                let replayed =
                    graphs.forward_backward(&graph_model, inputs, 1, graph_scaler.as_ref(), amp, &mut BalancedSampler);
                apply_update(&mut graph_sgd, graph_scaler.as_mut(), LR, CLIP).expect("update");
                if overflow {
                    for s in [&mut eager_scaler, &mut graph_scaler].into_iter().flatten() {
                        assert_eq!(s.state().skipped, 1.0, "{amp}: the overflowing step is skipped");
                        let _ = s.scale.shallow_clone().fill_(1024.0);
                    }
                }
                let (a, b) = (
                    Vec::<f64>::try_from(eager.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap(),
                    Vec::<f64>::try_from(replayed.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap(),
                );
                let (allocated, reserved) = crate::shim::cuda_memory_now(0).unwrap_or_default();
                eprintln!("{amp} step {step}: {} MiB allocated, {} MiB reserved", allocated >> 20, reserved >> 20);
                reserved_after.push(reserved as f64);
                for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(x.is_finite() && y.is_finite(), "{amp} step {step} loss {k}: eager {x}, replayed {y}");
                    let rel = (x - y).abs() / x.abs().max(1e-3);
                    // fp16 rounding can flip which proposals rank first, which
                    // moves a small loss (few positives) by percents in eager
                    // runs too: there, the total is compared.
                    if amp == AmpMode::Off {
                        worst = worst.max(rel);
                    }
                    eprintln!("{amp} step {step} loss {k}: eager {x:.6} replayed {y:.6} (rel {rel:.1e})");
                }
                let (x, y) = (a.iter().sum::<f64>(), b.iter().sum::<f64>());
                worst = worst.max((x - y).abs() / x.abs());
            }
            // Eager runs differ from each other by as much (atomic sums in
            // some backward kernels); a stale input or random draw in a
            // replay moves losses by far more.
            let tolerance = if amp == AmpMode::Off { 5e-3 } else { 1e-2 };
            assert!(worst <= tolerance, "{amp}: losses differ by {worst:.2e} (relative), above {tolerance:.0e}");
            assert_eq!((graphs.recorded(), graphs.replays()), (2, 5), "{amp}: graphs recorded, steps replayed");
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
            // The weights: their distance relative to how far training moved
            // them (a parameter barely moved, such as a zero-initialized
            // bias, differs relatively by the noise of atomic sums).
            let (eager_vars, mut distance, mut moved) = (eager_model.vs.variables(), 0.0, 0.0);
            for (name, b) in graph_model.vs.variables() {
                let (a, start) = (&eager_vars[&name], &initial[&name]);
                let sq = |t: Tensor| t.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
                distance += sq(a - &b);
                moved += sq(a - start);
            }
            let rel = (distance / moved).sqrt();
            eprintln!("{amp}: weights differ by {rel:.2e} of the distance training moved them");
            // (fp16: a flipped proposal ranking changes one step's gradient
            // by percents, in eager runs too.)
            let weight_tolerance = if amp == AmpMode::Off { tolerance } else { 5e-2 };
            assert!(moved > 0.0 && rel <= weight_tolerance, "{amp}: weights differ by {rel:.2e} of their update");
        }
        crate::shim::set_tf32(true);
    }
}
