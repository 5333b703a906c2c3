//! Region proposal network, as torchvision's `AnchorGenerator`, `RPNHead` and
//! `RegionProposalNetwork` (inference path: proposals from objectness).

use crate::config::{RpnConfig, TopNScope};
use crate::modeling::layers::{conv2d, Conv2d, ConvOpts};
use crate::ops::matcher::{Matcher, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS};
use crate::ops::sampler::{FgBgSampler, SampleStage};
use crate::ops::{batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, BoxCoder};
use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

/// Anchors of one size per pyramid level and shared aspect ratios.
#[derive(Debug)]
pub struct AnchorGenerator {
    /// `[A, 4]` zero-centered anchors per level (float32, rounded as torchvision).
    cell_anchors: Vec<Tensor>,
}

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
        AnchorGenerator { cell_anchors }
    }

    /// Anchors per location.
    pub fn num_anchors_per_location(&self) -> i64 {
        self.cell_anchors.first().map(|a| a.size()[0]).unwrap_or(0)
    }

    /// Anchors `[sum_l H_l*W_l*A, 4]` for a padded batch of `image_size`
    /// `(H, W)` and feature maps of `grid_sizes` (level order, then row-major
    /// locations, then anchors — the order of the head's flattened outputs).
    pub fn grid_anchors(&self, image_size: (i64, i64), grid_sizes: &[(i64, i64)], device: Device) -> Tensor {
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
        Tensor::cat(&per_level, 0)
    }
}

/// 3×3 conv + ReLU, then 1×1 objectness (A) and box deltas (4A) per level.
#[derive(Debug)]
pub struct RpnHead {
    conv: Conv2d,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
}

impl RpnHead {
    /// Head at `p` (`rpn.head`) over `channels` with `num_anchors` per location.
    pub fn new(p: &Path, channels: i64, num_anchors: i64) -> RpnHead {
        let init = Init::Randn { mean: 0.0, stdev: 0.01 };
        let opts = ConvOpts { init, ..ConvOpts::default() };
        RpnHead {
            conv: conv2d(&(p / "conv" / 0 / 0), channels, channels, 3, ConvOpts { padding: 1, ..opts }),
            cls_logits: conv2d(&(p / "cls_logits"), channels, num_anchors, 1, opts),
            bbox_pred: conv2d(&(p / "bbox_pred"), channels, num_anchors * 4, 1, opts),
        }
    }

    /// Per level: objectness `[N, A, H, W]` and deltas `[N, 4A, H, W]`.
    pub fn forward(&self, features: &[Tensor]) -> (Vec<Tensor>, Vec<Tensor>) {
        features
            .iter()
            .map(|f| {
                let t = self.conv.forward(f).relu();
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

/// Proposals per image and the head's raw outputs (kept for the losses).
#[derive(Debug)]
pub struct RpnOutput {
    /// One `[P_i, 4]` tensor of proposals per image (resized-image pixels).
    pub proposals: Vec<Tensor>,
    /// One `[P_i]` objectness probability per proposal.
    pub scores: Vec<Tensor>,
    /// Objectness logits `[N, sum_l H_l*W_l*A]`.
    pub objectness: Tensor,
    /// Box deltas `[N, sum_l H_l*W_l*A, 4]`.
    pub deltas: Tensor,
    /// Anchors `[sum_l H_l*W_l*A, 4]`, shared by the images of the batch.
    pub anchors: Tensor,
    /// Anchors per level.
    pub num_anchors_per_level: Vec<i64>,
}

/// The RPN: anchors, head, decoding and proposal selection.
#[derive(Debug)]
pub struct Rpn {
    pub anchor_generator: AnchorGenerator,
    pub head: RpnHead,
    pub box_coder: BoxCoder,
    pub cfg: RpnConfig,
}

impl Rpn {
    pub fn new(p: &Path, channels: i64, cfg: &RpnConfig) -> Rpn {
        let anchor_generator = AnchorGenerator::new(&cfg.anchor_sizes, &cfg.aspect_ratios);
        let head = RpnHead::new(&(p / "head"), channels, anchor_generator.num_anchors_per_location());
        Rpn { anchor_generator, head, box_coder: BoxCoder::new([1.0, 1.0, 1.0, 1.0]), cfg: cfg.clone() }
    }

    /// Runs the head on P2..P6 and selects proposals for a batch padded to
    /// `batch_size` `(H, W)` holding images of `image_sizes`.
    pub fn forward(
        &self,
        features: &[Tensor],
        batch_size: (i64, i64),
        image_sizes: &[(i64, i64)],
        train: bool,
    ) -> RpnOutput {
        let (obj, reg) = self.head.forward(features);
        let grid_sizes: Vec<(i64, i64)> = features.iter().map(|f| (f.size()[2], f.size()[3])).collect();
        let device = features[0].device();
        let anchors = self.anchor_generator.grid_anchors(batch_size, &grid_sizes, device);
        let a = self.anchor_generator.num_anchors_per_location();
        let num_anchors_per_level: Vec<i64> = grid_sizes.iter().map(|&(h, w)| h * w * a).collect();
        let objectness =
            Tensor::cat(&obj.iter().map(|o| permute_and_flatten(o, 1)).collect::<Vec<_>>(), 1).squeeze_dim(2);
        let deltas = Tensor::cat(&reg.iter().map(|r| permute_and_flatten(r, 4)).collect::<Vec<_>>(), 1);
        let n = objectness.size()[0];
        let total = anchors.size()[0];
        let proposals = tch::no_grad(|| {
            let all = anchors.repeat([n, 1]);
            // Decode in float32 also under autocast (fp16 cannot hold pixel
            // coordinates above 1024 to a pixel).
            self.box_coder.decode(&deltas.detach().to_kind(Kind::Float).reshape([-1, 4]), &all).reshape([n, total, 4])
        });
        let (pre_n, post_n) = if train {
            (self.cfg.pre_nms_top_n_train, self.cfg.post_nms_top_n_train)
        } else {
            (self.cfg.pre_nms_top_n_test, self.cfg.post_nms_top_n_test)
        };
        let (proposals, scores) = tch::no_grad(|| {
            self.filter_proposals(
                &proposals,
                &objectness.detach(),
                image_sizes,
                &num_anchors_per_level,
                pre_n as i64,
                post_n as i64,
                train,
            )
        });
        RpnOutput { proposals, scores, objectness, deltas, anchors, num_anchors_per_level }
    }

    /// Per level top-`pre_n` by objectness, clip, drop small and low-scoring
    /// boxes, NMS per level, keep the best `post_n` (per image, or over the
    /// batch in training when `post_nms_top_n_scope = "batch"`).
    #[allow(clippy::too_many_arguments)]
    fn filter_proposals(
        &self,
        proposals: &Tensor,
        objectness: &Tensor,
        image_sizes: &[(i64, i64)],
        num_anchors_per_level: &[i64],
        pre_n: i64,
        post_n: i64,
        train: bool,
    ) -> (Vec<Tensor>, Vec<Tensor>) {
        let device = proposals.device();
        let levels = Tensor::cat(
            &num_anchors_per_level
                .iter()
                .enumerate()
                .map(|(i, &n)| Tensor::full([n], i as i64, (Kind::Int64, device)))
                .collect::<Vec<_>>(),
            0,
        );
        let mut top_idx = Vec::new();
        let mut offset = 0;
        for (l, &n) in num_anchors_per_level.iter().enumerate() {
            let ob = objectness.narrow(1, offset, n);
            let k = pre_n.min(n);
            let (_, idx) = ob.topk(k, 1, true, true);
            top_idx.push(idx + offset);
            offset += num_anchors_per_level[l];
        }
        let top_idx = Tensor::cat(&top_idx, 1); // [N, K]
        let mut boxes_out = Vec::new();
        let mut scores_out = Vec::new();
        for (i, &size) in image_sizes.iter().enumerate() {
            let i = i as i64;
            let idx = top_idx.get(i);
            let boxes = proposals.get(i).index_select(0, &idx);
            let scores = objectness.get(i).index_select(0, &idx).sigmoid();
            let lvl = levels.index_select(0, &idx);
            let boxes = clip_boxes_to_image(&boxes, size);
            let keep = remove_small_boxes(&boxes, self.cfg.min_box_size);
            let (boxes, scores, lvl) =
                (boxes.index_select(0, &keep), scores.index_select(0, &keep), lvl.index_select(0, &keep));
            let keep = scores.ge(self.cfg.score_thresh).nonzero().squeeze_dim(1);
            let (boxes, scores, lvl) =
                (boxes.index_select(0, &keep), scores.index_select(0, &keep), lvl.index_select(0, &keep));
            let mut keep = batched_nms(&boxes, &scores, &lvl, self.cfg.nms_thresh);
            if !(train && self.cfg.post_nms_top_n_scope == TopNScope::Batch) {
                keep = keep.narrow(0, 0, post_n.min(keep.size()[0]));
            }
            boxes_out.push(boxes.index_select(0, &keep));
            scores_out.push(scores.index_select(0, &keep));
        }
        if train && self.cfg.post_nms_top_n_scope == TopNScope::Batch {
            return keep_top_over_batch(boxes_out, scores_out, post_n);
        }
        (boxes_out, scores_out)
    }
}

/// The seed's training rule: the best `post_n` proposals over the whole batch.
fn keep_top_over_batch(boxes: Vec<Tensor>, scores: Vec<Tensor>, post_n: i64) -> (Vec<Tensor>, Vec<Tensor>) {
    let counts: Vec<i64> = scores.iter().map(|s| s.size()[0]).collect();
    let all = Tensor::cat(&scores, 0);
    let k = post_n.min(all.size()[0]);
    let (_, idx) = all.topk(k, 0, true, true);
    let selected = Tensor::zeros_like(&all).to_kind(Kind::Bool).index_fill(0, &idx, 1);
    let mut start = 0;
    let mut out_b = Vec::new();
    let mut out_s = Vec::new();
    for ((b, s), n) in boxes.into_iter().zip(scores).zip(counts) {
        let keep = selected.narrow(0, start, n).nonzero().squeeze_dim(1);
        out_b.push(b.index_select(0, &keep));
        out_s.push(s.index_select(0, &keep));
        start += n;
    }
    (out_b, out_s)
}

impl Rpn {
    /// RPN training losses `(loss_objectness, loss_rpn_box_reg)` for the head
    /// outputs in `out` and ground-truth boxes per image (`[G_i, 4]`, resized
    /// pixels; `crowd` marks regions that must not become positives).
    /// Anchors match at IoU >= fg / < bg with torchvision's low-quality rule;
    /// `sampler` picks `batch_size_per_image` anchors per image.
    pub fn losses(
        &self,
        out: &RpnOutput,
        gt_boxes: &[Tensor],
        crowd: &[Option<Tensor>],
        sampler: &mut dyn FgBgSampler,
    ) -> (Tensor, Tensor) {
        let matcher = Matcher {
            high_threshold: self.cfg.fg_iou_thresh,
            low_threshold: self.cfg.bg_iou_thresh,
            allow_low_quality_matches: true,
        };
        let anchors = &out.anchors;
        let device = anchors.device();
        let mut labels = Vec::with_capacity(gt_boxes.len());
        let mut targets = Vec::with_capacity(gt_boxes.len());
        for (gt, crowd) in gt_boxes.iter().zip(crowd) {
            let (l, matched_gt) = if gt.size()[0] == 0 {
                (Tensor::zeros([anchors.size()[0]], (Kind::Float, device)), Tensor::zeros_like(anchors))
            } else {
                let matched = matcher.assign(&box_iou(gt, anchors));
                let matched_gt = gt.index_select(0, &matched.clamp_min(0));
                let l = matched
                    .ge(0)
                    .to_kind(Kind::Float)
                    .masked_fill(&matched.eq(BELOW_LOW_THRESHOLD), 0.0)
                    .masked_fill(&matched.eq(BETWEEN_THRESHOLDS), -1.0);
                (l, matched_gt)
            };
            let l = crate::ops::matcher::ignore_crowd_overlaps(l, anchors, crowd.as_ref(), self.cfg.fg_iou_thresh);
            targets.push(self.box_coder.encode(&matched_gt, anchors));
            labels.push(l);
        }
        let sampled =
            sampler.sample(SampleStage::Rpn, &labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction);
        let pos = Tensor::cat(&sampled.iter().map(|s| s.positive.shallow_clone()).collect::<Vec<_>>(), 0);
        let neg = Tensor::cat(&sampled.iter().map(|s| s.negative.shallow_clone()).collect::<Vec<_>>(), 0);
        let pos_inds = pos.nonzero().squeeze_dim(1);
        let neg_inds = neg.nonzero().squeeze_dim(1);
        let sampled_inds = Tensor::cat(&[&pos_inds, &neg_inds], 0);
        let objectness = out.objectness.reshape([-1]);
        let deltas = out.deltas.reshape([-1, 4]);
        let labels = Tensor::cat(&labels, 0);
        let targets = Tensor::cat(&targets, 0);
        let box_loss = deltas.index_select(0, &pos_inds).to_kind(Kind::Float).smooth_l1_loss(
            &targets.index_select(0, &pos_inds),
            tch::Reduction::Sum,
            1.0 / 9.0,
        ) / sampled_inds.size()[0] as f64;
        let objectness_loss =
            objectness.index_select(0, &sampled_inds).to_kind(Kind::Float).binary_cross_entropy_with_logits::<Tensor>(
                &labels.index_select(0, &sampled_inds),
                None,
                None,
                tch::Reduction::Mean,
            );
        (objectness_loss, box_loss)
    }
}
