//! Region proposal network, as torchvision's `AnchorGenerator`, `RPNHead` and
//! `RegionProposalNetwork`: anchors, objectness and box deltas, proposals
//! (a fixed number per image, padded, selected on the device without a host
//! sync), and the training losses over a fixed number of sampled anchors.

use crate::config::{RpnConfig, TopNScope};
use crate::modeling::layers::{conv2d, Conv2d, ConvOpts};
use crate::modeling::transform::ImageList;
use crate::ops::matcher::{Matcher, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS};
use crate::ops::nms::grouped_nms_keep;
use crate::ops::sampler::{FgBgSampler, SampleStage};
use crate::ops::{boxes_at_least, clip_boxes_to_sizes, BoxCoder};
use crate::structures::TargetBatch;
use std::collections::HashMap;
use std::sync::Mutex;
use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

/// Anchors of one size per pyramid level and shared aspect ratios.
#[derive(Debug)]
pub struct AnchorGenerator {
    /// `[A, 4]` zero-centered anchors per level (float32, rounded as torchvision).
    cell_anchors: Vec<Tensor>,
    /// Anchors already built, per device, padded image size and grid sizes.
    cache: Mutex<HashMap<AnchorKey, Tensor>>,
}

type AnchorKey = (Device, (i64, i64), Vec<(i64, i64)>);

impl AnchorGenerator {
    pub fn new(sizes: &[f64], aspect_ratios: &[f64]) -> AnchorGenerator {
        let cell_anchors = sizes
            .iter()
            .map(|&size| {
                let scales = Tensor::from_slice(&[size as f32]);
                let ratios = Tensor::from_slice(&aspect_ratios.iter().map(|&r| r as f32).collect::<Vec<_>>());
                let h_ratios = ratios.sqrt();
                let w_ratios = h_ratios.reciprocal();
                let ws = (w_ratios.unsqueeze(1) * scales.unsqueeze(0)).reshape([-1]);
                let hs = (h_ratios.unsqueeze(1) * scales.unsqueeze(0)).reshape([-1]);
                (Tensor::stack(&[-&ws, -&hs, ws, hs], 1) / 2.0).round()
            })
            .collect();
        AnchorGenerator { cell_anchors, cache: Mutex::new(HashMap::new()) }
    }

    /// Anchors per location.
    pub fn num_anchors_per_location(&self) -> i64 {
        self.cell_anchors.first().map(|a| a.size()[0]).unwrap_or(0)
    }

    /// Anchors `[sum_l H_l*W_l*A, 4]` for a padded batch of `image_size`
    /// `(H, W)` and feature maps of `grid_sizes` (level order, then row-major
    /// locations, then anchors — the order of the head's flattened outputs).
    /// Built once per shape and device, then reused.
    pub fn grid_anchors(&self, image_size: (i64, i64), grid_sizes: &[(i64, i64)], device: Device) -> Tensor {
        let key = (device, image_size, grid_sizes.to_vec());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = cache.get(&key) {
            return a.shallow_clone();
        }
        let per_level: Vec<Tensor> = grid_sizes
            .iter()
            .zip(&self.cell_anchors)
            .map(|(&(gh, gw), base)| {
                let (sh, sw) = (image_size.0 / gh, image_size.1 / gw);
                let shifts_x = Tensor::arange(gw, (Kind::Int64, device)) * sw;
                let shifts_y = Tensor::arange(gh, (Kind::Int64, device)) * sh;
                let grids = Tensor::meshgrid_indexing(&[shifts_y, shifts_x], "ij");
                let (sy, sx) = (grids[0].reshape([-1]), grids[1].reshape([-1]));
                let shifts = Tensor::stack(&[&sx, &sy, &sx, &sy], 1);
                (shifts.reshape([-1, 1, 4]) + base.to_device(device).reshape([1, -1, 4])).reshape([-1, 4])
            })
            .collect();
        let anchors = Tensor::cat(&per_level, 0);
        cache.insert(key, anchors.shallow_clone());
        anchors
    }
}

/// 3×3 conv + ReLU (one or more), then 1×1 objectness (A) and box deltas
/// (4A) per level.
#[derive(Debug)]
pub struct RpnHead {
    convs: Vec<Conv2d>,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
}

impl RpnHead {
    /// Head at `p` (`rpn.head`) over `channels` with `num_anchors` per
    /// location and `conv_depth` 3×3 convolutions (`conv.K.0`) before the
    /// predictors.
    pub fn new(p: &Path, channels: i64, num_anchors: i64, conv_depth: usize) -> RpnHead {
        let init = Init::Randn { mean: 0.0, stdev: 0.01 };
        let opts = ConvOpts { init, ..ConvOpts::default() };
        RpnHead {
            convs: (0..conv_depth)
                .map(|k| conv2d(&(p / "conv" / k / 0), channels, channels, 3, ConvOpts { padding: 1, ..opts }))
                .collect(),
            cls_logits: conv2d(&(p / "cls_logits"), channels, num_anchors, 1, opts),
            bbox_pred: conv2d(&(p / "bbox_pred"), channels, num_anchors * 4, 1, opts),
        }
    }

    /// Per level: objectness `[N, A, H, W]` and deltas `[N, 4A, H, W]`.
    pub fn forward(&self, features: &[Tensor]) -> (Vec<Tensor>, Vec<Tensor>) {
        features
            .iter()
            .map(|f| {
                let t = self.convs.iter().fold(f.shallow_clone(), |t, conv| conv.forward_act(&t, None, true));
                (self.cls_logits.forward(&t), self.bbox_pred.forward(&t))
            })
            .unzip()
    }
}

/// `[N, A*C, H, W]` → `[N, H*W*A, C]` (torchvision's `permute_and_flatten`).
pub fn permute_and_flatten(x: &Tensor, c: i64) -> Tensor {
    let s = x.size();
    let (n, h, w) = (s[0], s[2], s[3]);
    let a = s[1] / c;
    x.reshape([n, a, c, h, w]).permute([0, 3, 4, 1, 2]).reshape([n, -1, c])
}

/// Proposals of a batch, a fixed number `N` per image: each row holds the
/// image's proposals best first, then padding.
#[derive(Debug)]
pub struct Proposals {
    /// `[B, N, 4]` float32 xyxy boxes, resized-image pixels.
    pub boxes: Tensor,
    /// `[B, N]` float32 objectness probabilities (padding: -1).
    pub scores: Tensor,
    /// `[B, N]` bool: a real proposal (the first ones of each row).
    pub valid: Tensor,
}

impl Proposals {
    /// Each image's real proposals `[P_i, 4]` and scores `[P_i]` (reads the
    /// counts: one host sync; for inference and inspection).
    pub fn per_image(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let counts = crate::host_sync::to_host(&self.valid.sum_dim_intlist(1, false, Kind::Int64));
        let counts: Vec<i64> = Vec::try_from(&counts).unwrap_or_default();
        counts
            .iter()
            .enumerate()
            .map(|(i, &n)| (self.boxes.get(i as i64).narrow(0, 0, n), self.scores.get(i as i64).narrow(0, 0, n)))
            .unzip()
    }
}

/// Proposals and the head's raw outputs (kept for the losses).
#[derive(Debug)]
pub struct RpnOutput {
    pub proposals: Proposals,
    /// Objectness logits `[N, sum_l H_l*W_l*A]`.
    pub objectness: Tensor,
    /// Box deltas `[N, sum_l H_l*W_l*A, 4]`.
    pub deltas: Tensor,
    /// Anchors `[sum_l H_l*W_l*A, 4]`, shared by the images of the batch.
    pub anchors: Tensor,
    /// Anchors per level.
    pub num_anchors_per_level: Vec<i64>,
}

/// How the per-level top-k candidates (`K` columns, level `l` in columns
/// `offset_l .. offset_l + k_l`) map to NMS groups `[L, M]` (`M = max k_l`)
/// and back. Built on the device once per set of level sizes.
#[derive(Debug)]
struct NmsLayout {
    /// `[L * M]` int64: the candidate column of each group slot (clamped).
    columns: Tensor,
    /// `[L, M]` bool: the group slot holds a candidate.
    members: Tensor,
    /// `[K]` int64: the group slot of each candidate column.
    slots: Tensor,
    /// `[K]` float32: the level of each candidate column.
    level_of: Tensor,
    groups: i64,
    group_size: i64,
}

impl NmsLayout {
    fn new(per_level: &[i64], device: Device) -> NmsLayout {
        let m = per_level.iter().copied().max().unwrap_or(0).max(1);
        let l = per_level.len() as i64;
        let (mut columns, mut members, mut slots, mut level_of) = (vec![], vec![], vec![], vec![]);
        let mut offset = 0;
        for (i, &k) in per_level.iter().enumerate() {
            let r = Tensor::arange(m, (Kind::Int64, device));
            columns.push(r.clamp_max((k - 1).max(0)) + offset);
            members.push(r.lt(k));
            slots.push(Tensor::arange(k, (Kind::Int64, device)) + i as i64 * m);
            level_of.push(Tensor::full([k], i as f64, (Kind::Float, device)));
            offset += k;
        }
        NmsLayout {
            columns: Tensor::cat(&columns, 0),
            members: Tensor::stack(&members, 0),
            slots: Tensor::cat(&slots, 0),
            level_of: Tensor::cat(&level_of, 0),
            groups: l,
            group_size: m,
        }
    }

    fn shallow_clone(&self) -> NmsLayout {
        NmsLayout {
            columns: self.columns.shallow_clone(),
            members: self.members.shallow_clone(),
            slots: self.slots.shallow_clone(),
            level_of: self.level_of.shallow_clone(),
            groups: self.groups,
            group_size: self.group_size,
        }
    }
}

/// The RPN: anchors, head, decoding and proposal selection.
#[derive(Debug)]
pub struct Rpn {
    pub anchor_generator: AnchorGenerator,
    pub head: RpnHead,
    pub box_coder: BoxCoder,
    pub cfg: RpnConfig,
    layouts: Mutex<HashMap<(Device, Vec<i64>), NmsLayout>>,
}

impl Rpn {
    /// The RPN at `p` (`rpn`) over `channels`, its head with `conv_depth`
    /// 3×3 convolutions (`model.rpn_conv_depth`).
    pub fn new(p: &Path, channels: i64, cfg: &RpnConfig, conv_depth: usize) -> Rpn {
        let anchor_generator = AnchorGenerator::new(&cfg.anchor_sizes, &cfg.aspect_ratios);
        let head = RpnHead::new(&(p / "head"), channels, anchor_generator.num_anchors_per_location(), conv_depth);
        Rpn {
            anchor_generator,
            head,
            box_coder: BoxCoder::new([1.0, 1.0, 1.0, 1.0]),
            cfg: cfg.clone(),
            layouts: Mutex::new(HashMap::new()),
        }
    }

    /// Runs the head on P2..P6 and selects proposals for the padded batch
    /// `images` (its padded size and image sizes): `post_nms_top_n` slots
    /// per image (train or test setting).
    pub fn forward(&self, features: &[Tensor], images: &ImageList, train: bool) -> RpnOutput {
        let size = images.tensors.size();
        let batch_size = (size[2], size[3]);
        let (obj, reg) = self.head.forward(features);
        let grid_sizes: Vec<(i64, i64)> = features.iter().map(|f| (f.size()[2], f.size()[3])).collect();
        let device = features[0].device();
        let anchors = self.anchor_generator.grid_anchors(batch_size, &grid_sizes, device);
        let a = self.anchor_generator.num_anchors_per_location();
        let num_anchors_per_level: Vec<i64> = grid_sizes.iter().map(|&(h, w)| h * w * a).collect();
        let objectness =
            Tensor::cat(&obj.iter().map(|o| permute_and_flatten(o, 1)).collect::<Vec<_>>(), 1).squeeze_dim(2);
        let deltas = Tensor::cat(&reg.iter().map(|r| permute_and_flatten(r, 4)).collect::<Vec<_>>(), 1);
        let (pre_n, post_n) = if train {
            (self.cfg.pre_nms_top_n_train, self.cfg.post_nms_top_n_train)
        } else {
            (self.cfg.pre_nms_top_n_test, self.cfg.post_nms_top_n_test)
        };
        let proposals = tch::no_grad(|| {
            self.select_proposals(
                &objectness.detach(),
                &deltas.detach(),
                &anchors,
                &images.sizes,
                &num_anchors_per_level,
                (pre_n as i64, post_n as i64),
                train && self.cfg.post_nms_top_n_scope == TopNScope::Batch,
            )
        });
        RpnOutput { proposals, objectness, deltas, anchors, num_anchors_per_level }
    }

    /// torchvision's `filter_proposals`, batched and without host syncs: per
    /// level the top `pre_n` anchors by objectness, decoded (float32), clipped
    /// to the image; boxes with a side under `min_box_size` or a score under
    /// `score_thresh` drop out; NMS per image and level (on coordinates
    /// shifted apart per level where torchvision's `batched_nms` would shift
    /// them, judged by the candidate count); then the best `post_n` per image
    /// (or over the whole batch with `batch_scope`), best first.
    #[allow(clippy::too_many_arguments)]
    fn select_proposals(
        &self,
        objectness: &Tensor,
        deltas: &Tensor,
        anchors: &Tensor,
        sizes: &Tensor,
        num_anchors_per_level: &[i64],
        (pre_n, post_n): (i64, i64),
        batch_scope: bool,
    ) -> Proposals {
        let device = objectness.device();
        let n = objectness.size()[0];
        let mut top = Vec::with_capacity(num_anchors_per_level.len());
        let mut per_level = Vec::with_capacity(num_anchors_per_level.len());
        let mut offset = 0;
        for &count in num_anchors_per_level {
            let k = pre_n.min(count);
            let (_, idx) = objectness.narrow(1, offset, count).topk(k, 1, true, true);
            top.push(idx + offset);
            per_level.push(k);
            offset += count;
        }
        let top = Tensor::cat(&top, 1); // [N, K]
        let k = top.size()[1];
        let scores = objectness.gather(1, &top, false).to_kind(Kind::Float).sigmoid();
        let d = deltas.gather(1, &top.unsqueeze(2).expand([n, k, 4], false), false).to_kind(Kind::Float);
        let a = anchors.index_select(0, &top.reshape([-1]));
        let boxes = self.box_coder.decode(&d.reshape([-1, 4]), &a).reshape([n, k, 4]);

        let boxes = clip_boxes_to_sizes(&boxes, sizes);
        let valid = boxes_at_least(&boxes, self.cfg.min_box_size).logical_and(&scores.ge(self.cfg.score_thresh));

        let layout = self.layout(&per_level, device);
        // torchvision's batched_nms shifts each level's boxes apart (and runs
        // one NMS) below 4,000 coordinates on the CPU / 100,000 on CUDA.
        let shift_limit = if device.is_cuda() { 100_000 } else { 4_000 };
        let shifted = 4 * k <= shift_limit;
        let for_nms = if shifted {
            let max_coordinate = boxes
                .masked_fill(&valid.logical_not().unsqueeze(2), f64::NEG_INFINITY)
                .amax([1, 2], true)
                .clamp_min(0.0);
            &boxes + layout.level_of.reshape([1, -1, 1]) * (max_coordinate + 1.0)
        } else {
            boxes.shallow_clone()
        };
        let (g, m) = (layout.groups, layout.group_size);
        let grouped = for_nms.index_select(1, &layout.columns).reshape([n * g, m, 4]);
        let grouped_valid =
            valid.index_select(1, &layout.columns).reshape([n, g, m]).logical_and(&layout.members.unsqueeze(0));
        let keep = grouped_nms_keep(&grouped, &grouped_valid.reshape([n * g, m]), self.cfg.nms_thresh)
            .reshape([n, g * m])
            .index_select(1, &layout.slots);

        let selected = if batch_scope {
            let flat = scores.where_scalarother(&keep, -1.0).reshape([-1]);
            let (best, idx) = flat.topk(post_n.min(n * k), 0, true, true);
            Tensor::zeros([n * k], (Kind::Bool, device)).index_put(&[Some(idx)], &best.ge(0.0), false).reshape([n, k])
        } else {
            keep
        };
        let (best, idx) = rank_kept(&scores, &selected, post_n, shifted);
        let kept = idx.size()[1];
        let boxes = boxes.gather(1, &idx.unsqueeze(2).expand([n, kept, 4], false), false);
        let valid = best.ge(0.0);
        let pad = post_n - kept;
        Proposals {
            boxes: boxes.constant_pad_nd([0, 0, 0, pad]),
            scores: Tensor::cat(&[best, Tensor::full([n, pad], -1.0, (Kind::Float, device))], 1),
            valid: valid.constant_pad_nd([0, pad]),
        }
    }

    fn layout(&self, per_level: &[i64], device: Device) -> NmsLayout {
        let mut cache = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry((device, per_level.to_vec())).or_insert_with(|| NmsLayout::new(per_level, device)).shallow_clone()
    }
}

/// The best `post_n` (at most) of each image's `selected` candidates by
/// `scores` `[B, K]`, best first: `(scores, columns)` `[B, min(post_n, K)]`,
/// score -1 where a row has fewer. Equal scores are common (an untrained
/// head gives ~0.5 everywhere), and their order decides which proposals a
/// replayed sample refers to, so on the CPU each image's kept candidates are
/// sorted as torchvision sorts them (a stable sort after its
/// coordinate-shift NMS, an unstable one after per-level NMS); on CUDA one
/// sort of the masked scores ranks every image at once.
fn rank_kept(scores: &Tensor, selected: &Tensor, post_n: i64, shifted: bool) -> (Tensor, Tensor) {
    let (n, k) = (scores.size()[0], scores.size()[1]);
    let kept = post_n.min(k);
    let device = scores.device();
    if device.is_cuda() {
        let (best, idx) = scores.where_scalarother(selected, -1.0).sort(1, true);
        return (best.narrow(1, 0, kept), idx.narrow(1, 0, kept));
    }
    let (mut best, mut cols) = (Vec::new(), Vec::new());
    for i in 0..n {
        let keep = selected.get(i).nonzero().squeeze_dim(1);
        let s = scores.get(i).index_select(0, &keep);
        let (sorted, order) = if shifted { s.sort_stable(true, 0, true) } else { s.sort(0, true) };
        let m = kept.min(sorted.size()[0]);
        let fill = kept - m;
        best.push(Tensor::cat(&[sorted.narrow(0, 0, m), Tensor::full([fill], -1.0, (Kind::Float, device))], 0));
        let columns = keep.index_select(0, &order.narrow(0, 0, m));
        cols.push(Tensor::cat(&[columns, Tensor::zeros([fill], (Kind::Int64, device))], 0));
    }
    (Tensor::stack(&best, 0), Tensor::stack(&cols, 0))
}

impl Rpn {
    /// RPN training losses `(loss_objectness, loss_rpn_box_reg)` for the head
    /// outputs in `out` and the batch's padded ground truth `gt` (crowd
    /// regions are never matched; background anchors overlapping them are
    /// ignored). Anchors match at IoU >= fg / < bg with torchvision's
    /// low-quality rule; `sampler` picks `batch_size_per_image` slots per
    /// image. Normalized by the number of samples in the batch, as
    /// torchvision; all on the device.
    pub fn losses(&self, out: &RpnOutput, gt: &TargetBatch, sampler: &mut dyn FgBgSampler) -> (Tensor, Tensor) {
        let matcher = Matcher {
            high_threshold: self.cfg.fg_iou_thresh,
            low_threshold: self.cfg.bg_iou_thresh,
            allow_low_quality_matches: true,
        };
        let anchors = &out.anchors;
        let (b, a) = (out.objectness.size()[0], anchors.size()[0]);
        let match_rows = gt.valid.logical_and(&gt.crowd.logical_not());
        let crowd_rows = gt.valid.logical_and(&gt.crowd);
        let m = matcher.assign_batch(&gt.boxes, &match_rows, &crowd_rows, &anchors.unsqueeze(0));
        let labels = m
            .matched
            .ge(0)
            .to_kind(Kind::Int64)
            .masked_fill(&m.matched.eq(BETWEEN_THRESHOLDS), -1)
            .masked_fill(&m.matched.eq(BELOW_LOW_THRESHOLD).logical_and(&m.crowd_overlap), -1);
        let exists = Tensor::ones([b, a], (Kind::Bool, labels.device()));
        let s = sampler.sample(
            SampleStage::Rpn,
            &labels,
            &exists,
            self.cfg.batch_size_per_image,
            self.cfg.positive_fraction,
        );
        let weight = s.valid.to_kind(Kind::Float);
        let count = weight.sum(Kind::Float).clamp_min(1.0);
        let s_labels = labels.gather(1, &s.index, false);
        let positive = s.valid.logical_and(&s_labels.eq(1));
        let logits = out.objectness.gather(1, &s.index, false).to_kind(Kind::Float);
        let objectness_loss = (logits.binary_cross_entropy_with_logits::<Tensor>(
            &s_labels.clamp_min(0).to_kind(Kind::Float),
            None,
            None,
            tch::Reduction::None,
        ) * &weight)
            .sum(Kind::Float)
            / &count;
        let slots = s.index.size()[1];
        let index4 = s.index.unsqueeze(2).expand([b, slots, 4], false);
        let deltas = out.deltas.gather(1, &index4, false).to_kind(Kind::Float);
        let matched = m.matched.gather(1, &s.index, false).clamp_min(0);
        let matched_gt = gt.boxes.gather(1, &matched.unsqueeze(2).expand([b, slots, 4], false), false);
        let sampled_anchors = anchors.index_select(0, &s.index.reshape([-1]));
        let targets = self
            .box_coder
            .encode(&matched_gt.reshape([-1, 4]), &sampled_anchors)
            .reshape([b, slots, 4])
            .where_scalarother(&positive.unsqueeze(2), 0.0);
        let box_loss = deltas
            .smooth_l1_loss(&targets, tch::Reduction::None, 1.0 / 9.0)
            .where_scalarother(&positive.unsqueeze(2), 0.0)
            .sum(Kind::Float)
            / count;
        (objectness_loss, box_loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's cell anchors for size 32 and ratios (0.5, 1, 2):
    /// w = 32/sqrt(r), h = 32*sqrt(r), centred, rounded.
    #[test]
    fn cell_anchors_are_torchvisions() {
        let generator = AnchorGenerator::new(&[32.0], &[0.5, 1.0, 2.0]);
        assert_eq!(generator.num_anchors_per_location(), 3);
        let a: Vec<f32> =
            Vec::try_from(generator.grid_anchors((32, 32), &[(1, 1)], Device::Cpu).reshape([-1])).unwrap();
        assert_eq!(a, [-23.0, -11.0, 23.0, 11.0, -16.0, -16.0, 16.0, 16.0, -11.0, -23.0, 11.0, 23.0]);
    }

    /// Anchors tile each level's grid at its stride, level by level, then
    /// row-major locations, then the anchors of a location.
    #[test]
    fn grid_anchors_shift_by_the_stride_in_head_order() {
        let generator = AnchorGenerator::new(&[32.0, 64.0], &[1.0]);
        let anchors = generator.grid_anchors((64, 96), &[(2, 3), (1, 1)], Device::Cpu);
        assert_eq!(anchors.size(), [2 * 3 + 1, 4]);
        let row = |i: i64| -> Vec<f32> { Vec::try_from(anchors.get(i)).unwrap() };
        // Level 0: stride 32 in both directions; location (row 1, col 2) is 5th.
        assert_eq!(row(0), [-16.0, -16.0, 16.0, 16.0]);
        assert_eq!(row(1), [16.0, -16.0, 48.0, 16.0]);
        assert_eq!(row(5), [48.0, 16.0, 80.0, 48.0]);
        // Level 1: one 64-pixel anchor at the origin.
        assert_eq!(row(6), [-32.0, -32.0, 32.0, 32.0]);
        // Built once per shape: the same tensor comes back.
        let again = generator.grid_anchors((64, 96), &[(2, 3), (1, 1)], Device::Cpu);
        assert_eq!(again.data_ptr(), anchors.data_ptr());
    }
}
