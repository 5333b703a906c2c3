//! RoI heads, as torchvision's `RoIHeads` with `TwoMLPHead`,
//! `FastRCNNPredictor`, `MaskRCNNHeads` and `MaskRCNNPredictor` (inference
//! path: detections and their mask probabilities).

use crate::config::{BoxHeadKind, HeadNorm, NormKind, RoiHeadsConfig};
use crate::modeling::layers::{
    conv2d, conv_norm_relu, conv_transpose2d, linear, norm, Conv2d, ConvOpts, ConvTranspose2d, Linear, Norm,
};
use crate::modeling::poolers::{rois_of_slots, rois_with_batch_index, MultiScaleRoiAlign};
use crate::modeling::rpn::Proposals;
use crate::ops::boxes::{boxes_at_least, clip_boxes_to_sizes};
use crate::ops::matcher::{Matcher, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS};
use crate::ops::nms::batched_nms_per_category;
use crate::ops::sampler::{FgBgSampler, SampleStage};
use crate::ops::{batched_nms, BoxCoder};
use crate::structures::masks::{polygon_mask_targets, project_masks_on_boxes};
use crate::structures::TargetBatch;
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// Detections of one image, in the coordinates of the image the network saw
/// (or of the original image after [`crate::modeling::MaskRcnn::postprocess`]).
#[derive(Debug)]
pub struct Detections {
    /// `[D, 4]` xyxy boxes.
    pub boxes: Tensor,
    /// `[D]` class probabilities.
    pub scores: Tensor,
    /// `[D]` int64 contiguous labels in `1..num_classes`.
    pub labels: Tensor,
    /// `[D, 1, M, M]` mask probabilities inside each box (paste them into
    /// the image with `structures::masks::paste_masks_in_image`).
    pub masks: Option<Tensor>,
    /// The masks pasted into the original image and binarized at 0.5, as
    /// COCO RLEs (`MaskRcnn::postprocess` fills this; see
    /// `structures::masks::paste_masks_as_rle`, `decode_rles`).
    pub segmentations: Option<Vec<crate::structures::rle::CompressedRle>>,
}

impl Detections {
    /// Boxes `[D, 4]`, scores `[D]` and labels `[D]` of candidates without
    /// masks yet.
    fn candidates(boxes: Tensor, scores: Tensor, labels: Tensor) -> Detections {
        Detections { boxes, scores, labels, masks: None, segmentations: None }
    }

    /// The detections at `index` `[K]` (int64), in its order; masks and
    /// segmentations are dropped (post-processing selects before they exist).
    fn select(&self, index: &Tensor) -> Detections {
        Detections::candidates(
            self.boxes.index_select(0, index),
            self.scores.index_select(0, index),
            self.labels.index_select(0, index),
        )
    }
}

fn kaiming_normal_fan_out() -> Init {
    Init::Kaiming {
        dist: tch::nn::init::NormalOrUniform::Normal,
        fan: tch::nn::init::FanInOut::FanOut,
        non_linearity: tch::nn::init::NonLinearity::ReLU,
    }
}

/// Box branch: pooled features → class logits and per-class box deltas.
#[derive(Debug)]
pub struct BoxBranch {
    pub pooler: MultiScaleRoiAlign,
    head: BoxHead,
    cls_score: Linear,
    bbox_pred: Linear,
}

/// The layers between the pooled features and the predictors
/// (`model.box_head`).
#[derive(Debug)]
enum BoxHead {
    /// torchvision's `TwoMLPHead`: `fc6`, `fc7`.
    TwoMlp { fc6: Linear, fc7: Linear },
    /// torchvision's `FastRCNNConvFCHead`: `box_head.{0..3}` 3×3 convolutions
    /// (each with its optional norm) then `box_head.5`, one fully connected
    /// layer (index 4 is the flatten).
    ConvFc { convs: Vec<ConvNorm>, fc: Linear },
}

/// A 3×3 convolution (`p.0`, biased without a norm) followed by an optional
/// norm (`p.1`) and ReLU: torchvision's `Conv2dNormActivation`.
#[derive(Debug)]
struct ConvNorm {
    conv: Conv2d,
    norm: Option<Norm>,
}

impl ConvNorm {
    fn new(p: &Path, cin: i64, cout: i64, norm_kind: HeadNorm) -> ConvNorm {
        let with_norm = norm_kind == HeadNorm::Bn;
        let opts = ConvOpts { padding: 1, init: kaiming_normal_fan_out(), bias: !with_norm, ..ConvOpts::default() };
        ConvNorm {
            conv: conv2d(&(p / 0), cin, cout, 3, opts),
            norm: with_norm.then(|| norm(&(p / 1), cout, NormKind::Bn, true)),
        }
    }

    /// `relu(norm(conv(x)))` `[K, cout, S, S]`; in training (`rows`: the
    /// `[K]` weights of the RoIs that count, 1 sampled, 0 padding) a
    /// BatchNorm uses the statistics of the counted RoIs only, as
    /// torchvision's heads see only those.
    fn forward(&self, x: &Tensor, rows: Option<&Tensor>) -> Tensor {
        match (&self.norm, rows) {
            (Some(norm), Some(rows)) => norm.forward_rows(&self.conv.forward(x), rows).relu(),
            (Some(norm), None) => conv_norm_relu(&self.conv, norm, x, false),
            (None, _) => self.conv.forward_act(x, None, true),
        }
    }
}

impl BoxBranch {
    fn new(p: &Path, channels: i64, num_classes: i64, cfg: &RoiHeadsConfig, arch: HeadArch) -> BoxBranch {
        let r = cfg.box_pooler_resolution as i64;
        let rep = cfg.representation_size as i64;
        let head = p / "box_head";
        let pred = p / "box_predictor";
        let box_head = match arch.box_head {
            BoxHeadKind::TwoMlp => BoxHead::TwoMlp {
                fc6: linear(&(&head / "fc6"), channels * r * r, rep, None),
                fc7: linear(&(&head / "fc7"), rep, rep, None),
            },
            BoxHeadKind::FourConvOneFc => BoxHead::ConvFc {
                convs: (0..4).map(|i| ConvNorm::new(&(&head / i), channels, channels, arch.head_norm)).collect(),
                fc: linear(&(&head / 5), channels * r * r, rep, None),
            },
        };
        BoxBranch {
            pooler: MultiScaleRoiAlign::new(r, cfg.sampling_ratio as i64),
            head: box_head,
            cls_score: linear(&(&pred / "cls_score"), rep, num_classes, None),
            bbox_pred: linear(&(&pred / "bbox_pred"), rep, num_classes * 4, None),
        }
    }

    /// Class logits `[K, num_classes]` and deltas `[K, 4 * num_classes]`
    /// for `proposals` (one `[K_i, 4]` per image), in inference.
    pub fn forward(&self, features: &[Tensor], proposals: &[Tensor], image_sizes: &[(i64, i64)]) -> (Tensor, Tensor) {
        self.forward_rois(features, &rois_with_batch_index(proposals), image_sizes, None)
    }

    /// The same for `rois` `[K, 5]` (`batch_index, x1, y1, x2, y2`); in
    /// training `rows` `[K]` weighs the RoIs (1 sampled, 0 padding) whose
    /// statistics a BatchNorm in the head uses.
    pub fn forward_rois(
        &self,
        features: &[Tensor],
        rois: &Tensor,
        image_sizes: &[(i64, i64)],
        rows: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let x = self.pooler.pool(features, rois, image_sizes);
        let x = match &self.head {
            BoxHead::TwoMlp { fc6, fc7 } => fc7.forward(&fc6.forward_flattened(&x).relu()).relu(),
            BoxHead::ConvFc { convs, fc } => {
                let x = convs.iter().fold(x, |x, c| c.forward(&x, rows));
                fc.forward_flattened(&x).relu()
            }
        };
        (self.cls_score.forward(&x), self.bbox_pred.forward(&x))
    }
}

/// Mask branch: pooled features → per-class mask logits `[K, C, 2S, 2S]`.
#[derive(Debug)]
pub struct MaskBranch {
    pub pooler: MultiScaleRoiAlign,
    convs: Vec<ConvNorm>,
    conv5_mask: ConvTranspose2d,
    mask_fcn_logits: Conv2d,
}

impl MaskBranch {
    fn new(p: &Path, channels: i64, num_classes: i64, cfg: &RoiHeadsConfig, head_norm: HeadNorm) -> MaskBranch {
        let init = kaiming_normal_fan_out();
        let width = cfg.mask_head_channels as i64;
        let convs = (0..4)
            .map(|i| ConvNorm::new(&(p / "mask_head" / i), if i == 0 { channels } else { width }, width, head_norm))
            .collect();
        let pred = p / "mask_predictor";
        MaskBranch {
            pooler: MultiScaleRoiAlign::new(cfg.mask_pooler_resolution as i64, cfg.sampling_ratio as i64),
            convs,
            conv5_mask: conv_transpose2d(&(&pred / "conv5_mask"), width, width, 2, 2, init),
            mask_fcn_logits: conv2d(
                &(&pred / "mask_fcn_logits"),
                width,
                num_classes,
                1,
                ConvOpts { init, ..ConvOpts::default() },
            ),
        }
    }

    /// Mask logits `[K, 2S, 2S]` of each box's class `labels` `[K]` for
    /// `boxes` (one `[K_i, 4]` per image), in inference.
    pub fn forward(
        &self,
        features: &[Tensor],
        boxes: &[Tensor],
        labels: &Tensor,
        image_sizes: &[(i64, i64)],
    ) -> Tensor {
        self.forward_rois(features, &rois_with_batch_index(boxes), labels, image_sizes, None)
    }

    /// The same for `rois` `[K, 5]` (`batch_index, x1, y1, x2, y2`); in
    /// training `rows` `[K]` weighs the RoIs (1 positive, 0 not) whose
    /// statistics a BatchNorm in the head uses.
    pub fn forward_rois(
        &self,
        features: &[Tensor],
        rois: &Tensor,
        labels: &Tensor,
        image_sizes: &[(i64, i64)],
        rows: Option<&Tensor>,
    ) -> Tensor {
        let mut x = self.pooler.pool(features, rois, image_sizes);
        for conv in &self.convs {
            x = conv.forward(&x, rows);
        }
        logits_of_labels(&self.conv5_mask.forward_act(&x, true), &self.mask_fcn_logits, labels)
    }
}

/// The 1×1 predictor `predictor` (`[C, Cin, 1, 1]`, bias `[C]`) applied to
/// `x` `[K, Cin, H, W]` for class `labels[k]` of RoI `k` only → `[K, H, W]`.
/// torchvision computes every class's logits and keeps the label's (for the
/// loss and for the detections' masks): the same values, without C − 1 of
/// every C output planes (on COCO most of the mask head's predictor time
/// and memory). One batched matrix product per RoI; its operands are views
/// of `x` in either memory format, so the gradient has `x`'s layout.
fn logits_of_labels(x: &Tensor, predictor: &Conv2d, labels: &Tensor) -> Tensor {
    let size = x.size();
    let (k, cin, h, w) = (size[0], size[1], size[2], size[3]);
    let weight = predictor.weight.reshape([-1, cin]).index_select(0, labels);
    let logits = if crate::kernels::is_channels_last(x) && !x.is_contiguous() {
        // Channels-last: [K, H·W, Cin] × [K, Cin, 1].
        x.permute([0, 2, 3, 1]).reshape([k, h * w, cin]).bmm(&weight.unsqueeze(2))
    } else {
        // NCHW: [K, 1, Cin] × [K, Cin, H·W].
        weight.unsqueeze(1).bmm(&x.reshape([k, cin, h * w]))
    };
    let logits = logits.reshape([k, h, w]);
    match &predictor.bias {
        Some(bias) => logits + bias.index_select(0, labels).reshape([k, 1, 1]),
        None => logits,
    }
}

/// The heads' architecture options (`model.box_head`, `model.head_norm`,
/// `model.mask_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadArch {
    pub box_head: BoxHeadKind,
    pub head_norm: HeadNorm,
    /// The mask branch (false: box detection only).
    pub masks: bool,
}

impl Default for HeadArch {
    fn default() -> HeadArch {
        HeadArch { box_head: BoxHeadKind::default(), head_norm: HeadNorm::default(), masks: true }
    }
}

/// Box and mask heads with their post-processing.
#[derive(Debug)]
pub struct RoiHeads {
    pub box_branch: BoxBranch,
    /// `None`: box detection only (`model.mask_on = false`, torchvision's
    /// Faster R-CNN).
    pub mask_branch: Option<MaskBranch>,
    pub box_coder: BoxCoder,
    pub cfg: RoiHeadsConfig,
}

impl RoiHeads {
    /// Heads at `p` (`roi_heads`) over `channels`-channel features, of
    /// architecture `arch` (`model.box_head`, `model.head_norm`, the mask
    /// branch or not).
    pub fn new(p: &Path, channels: i64, num_classes: i64, cfg: &RoiHeadsConfig, arch: HeadArch) -> RoiHeads {
        let w = &cfg.bbox_reg_weights;
        RoiHeads {
            box_branch: BoxBranch::new(p, channels, num_classes, cfg, arch),
            mask_branch: arch.masks.then(|| MaskBranch::new(p, channels, num_classes, cfg, arch.head_norm)),
            box_coder: BoxCoder::new([w[0], w[1], w[2], w[3]]),
            cfg: cfg.clone(),
        }
    }

    /// Inference: detections with mask probabilities `[D, 1, 2S, 2S]` (none
    /// without the mask branch) for each image, from `proposals` (one
    /// `[P_i, 4]` per image). `features` are P2..P5.
    pub fn detect(&self, features: &[Tensor], proposals: &[Tensor], image_sizes: &[(i64, i64)]) -> Vec<Detections> {
        let (logits, deltas) = self.box_branch.forward(features, proposals, image_sizes);
        let mut dets = self.postprocess_detections(&logits, &deltas, proposals, image_sizes);
        let Some(mask_branch) = &self.mask_branch else {
            return dets;
        };
        let boxes: Vec<Tensor> = dets.iter().map(|d| d.boxes.shallow_clone()).collect();
        // The predicted class's mask of each detection.
        let labels = Tensor::cat(&dets.iter().map(|d| d.labels.shallow_clone()).collect::<Vec<_>>(), 0);
        let mask_logits = mask_branch.forward(features, &boxes, &labels, image_sizes);
        let probs = mask_logits.to_kind(Kind::Float).sigmoid().unsqueeze(1);
        let mut start = 0;
        for d in &mut dets {
            let n = d.boxes.size()[0];
            d.masks = Some(probs.narrow(0, start, n));
            start += n;
        }
        dets
    }

    /// Softmax scores, per-class boxes, clipping, score threshold, small-box
    /// removal, per-class NMS and top-`detections_per_img`, per image. The
    /// candidates of every image are built and filtered together; NMS runs
    /// per image on the CPU, as torchvision calls it (bit for bit), and on
    /// CUDA per (image, class) for the whole batch in one device pass (IoUs
    /// of the boxes' own coordinates, as torchvision's per-class NMS for many
    /// candidates): a fixed handful of host round trips whatever the batch.
    pub fn postprocess_detections(
        &self,
        logits: &Tensor,
        deltas: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
    ) -> Vec<Detections> {
        let (d, images) = self.candidates(logits, deltas, proposals, image_sizes);
        let num_images = proposals.len() as i64;
        let per_image = |images: &Tensor| {
            crate::ops::boxes::to_vec_i64(&images.bincount::<Tensor>(None, num_images)).into_iter().scan(
                0,
                |start, n| {
                    let range = (*start, n);
                    *start += n;
                    Some(range)
                },
            )
        };
        let top = |n: i64| n.min(self.cfg.detections_per_img as i64);
        if !logits.device().is_cuda() {
            return per_image(&images)
                .map(|(start, n)| {
                    let d = d.select(&Tensor::arange_start(start, start + n, (Kind::Int64, logits.device())));
                    let keep = batched_nms(&d.boxes, &d.scores, &d.labels, self.cfg.nms_thresh);
                    d.select(&keep.narrow(0, 0, top(keep.size()[0])))
                })
                .collect();
        }
        let num_classes = logits.size()[1];
        // Kept by decreasing score, then grouped by image (stably).
        let keep =
            batched_nms_per_category(&d.boxes, &d.scores, &(&images * num_classes + &d.labels), self.cfg.nms_thresh);
        let (kept_images, by_image) = images.index_select(0, &keep).sort_stable(true, 0, false);
        let keep = keep.index_select(0, &by_image);
        per_image(&kept_images).map(|(start, n)| d.select(&keep.narrow(0, start, top(n)))).collect()
    }

    /// Every (proposal, class > 0) pair of all images above the score
    /// threshold and at least 0.01 pixels wide and high: boxes decoded and
    /// clipped to their image, softmax scores, labels, in torchvision's
    /// order (image, proposal, class); with each candidate's image `[N]`.
    fn candidates(
        &self,
        logits: &Tensor,
        deltas: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
    ) -> (Detections, Tensor) {
        let device = logits.device();
        let (num_images, num_classes) = (proposals.len() as i64, logits.size()[1]);
        let all_proposals = Tensor::cat(proposals, 0);
        let rows = all_proposals.size()[0];
        let pred_boxes = self.box_coder.decode(&deltas.to_kind(Kind::Float), &all_proposals); // [K, C, 4]
        let pred_scores = logits.softmax(-1, Kind::Float);
        // Each row's image, and that image's size for clipping.
        let image_of_row: Vec<i64> = proposals
            .iter()
            .enumerate()
            .flat_map(|(i, p)| std::iter::repeat_n(i as i64, p.size()[0] as usize))
            .collect();
        let image_of_row = Tensor::from_slice(&image_of_row).to_device(device);
        let sizes: Vec<f32> = image_sizes.iter().flat_map(|&(h, w)| [h as f32, w as f32]).collect();
        let sizes = Tensor::from_slice(&sizes).reshape([num_images, 2]).to_device(device);
        let boxes = clip_boxes_to_sizes(&pred_boxes, &sizes.index_select(0, &image_of_row));
        let foreground = num_classes - 1;
        let boxes = boxes.narrow(1, 1, foreground).reshape([-1, 4]);
        let scores = pred_scores.narrow(1, 1, foreground).reshape([-1]);
        let labels = Tensor::arange_start(1, num_classes, (Kind::Int64, device)).repeat([rows]);
        let images = image_of_row.unsqueeze(1).expand([rows, foreground], false).reshape([-1]);
        let kept = scores.gt(self.cfg.score_thresh).logical_and(&boxes_at_least(&boxes, 1e-2)).nonzero().squeeze_dim(1);
        (Detections::candidates(boxes, scores, labels).select(&kept), images.index_select(0, &kept))
    }
}

/// The RoI heads' training samples, `S` slots per image (positives first;
/// padding slots have weight 0).
#[derive(Debug)]
struct SampledProposals {
    /// `[B, S, 4]` xyxy boxes in resized-image pixels.
    boxes: Tensor,
    /// `[B, S]` int64 classes (0: background).
    labels: Tensor,
    /// `[B, S]` int64 row of the matched ground truth (meaningful where positive).
    matched: Tensor,
    /// `[B, S]` float32: 1 for a sampled slot, 0 for padding.
    weight: Tensor,
    /// `[B, S]` bool: sampled and foreground.
    positive: Tensor,
}

/// Rows `index` `[B, S]` of `t` `[B, N, 4]` → `[B, S, 4]`.
fn gather4(t: &Tensor, index: &Tensor, b: i64) -> Tensor {
    t.gather(1, &index.unsqueeze(2).expand([b, index.size()[1], 4], false), false)
}

/// The RoI-head losses (no mask loss without the mask branch).
#[derive(Debug)]
pub struct RoiLosses {
    pub classifier: Tensor,
    pub box_reg: Tensor,
    pub mask: Option<Tensor>,
}

/// How many rows the mask head runs in training. Its input is the first
/// `batch_size_per_image × positive_fraction` sample slots of each image,
/// positives first, `B × Q` slots in all; only the positives matter (the
/// rest have weight 0), so the positives of every image can be moved to the
/// front (image order, slot order) and the head run on fewer rows — the
/// loss and gradients are the same as long as every positive has a row.
#[derive(Debug, Clone)]
pub enum MaskRows {
    /// Every slot (`B × Q` rows): nothing read back.
    All,
    /// The positives counted on the host (one device→host read), rounded
    /// up by [`mask_row_bucket`]: exact, for eager steps; the count is also
    /// published to `report` when there is one.
    Counted { report: Option<std::sync::Arc<crate::kernels::host_value::HostValue>> },
    /// `rows` rows (at most `B × Q`), fixed on the host beforehand, as a
    /// recorded step needs; the step publishes its positive count to
    /// `report`, and a caller whose count exceeds `rows` must discard the
    /// step's gradients and run it again with more rows.
    Budget { rows: i64, report: std::sync::Arc<crate::kernels::host_value::HostValue> },
}

impl MaskRows {
    /// The row count a recorded step depends on (`None`: every slot or counted).
    pub fn budget(&self) -> Option<i64> {
        match self {
            MaskRows::Budget { rows, .. } => Some(*rows),
            _ => None,
        }
    }
}

/// The mask-head row count for `positives` positives: 32, then steps of a
/// half octave (48, 64, 96, 128, 192, 256, ...), so few distinct shapes
/// occur (each new one costs cuDNN a tuning pass and a graph a recording),
/// at most `slots`.
pub fn mask_row_bucket(positives: i64, slots: i64) -> i64 {
    let mut rows: i64 = 32;
    while rows < positives && rows < slots {
        rows = if (rows as u64).is_power_of_two() { rows + rows / 2 } else { rows / 3 * 4 };
    }
    rows.min(slots)
}

impl RoiHeads {
    /// Training losses, with static shapes and no host sync: the padded
    /// ground-truth boxes are appended to each image's `proposals`, every
    /// candidate is matched (IoU >= fg: its ground truth's class, < bg:
    /// background; crowd regions never give positives and what overlaps them
    /// strongly is ignored), `sampler` fills `batch_size_per_image` slots per
    /// image (positives first), then cross-entropy + class-specific smooth-L1
    /// (β = 1/9) over the samples and BCE on the positives' `M`×`M` mask
    /// targets (the positives among the first `batch_size_per_image ×
    /// positive_fraction` slots run the mask head, on as many rows as
    /// `mask_rows` says), normalized as torchvision's `fastrcnn_loss` /
    /// `maskrcnn_loss`. `gt` is in resized-image pixels.
    pub fn losses(
        &self,
        features: &[Tensor],
        proposals: &Proposals,
        image_sizes: &[(i64, i64)],
        gt: &TargetBatch,
        sampler: &mut dyn FgBgSampler,
        mask_rows: &MaskRows,
    ) -> RoiLosses {
        let sampled = self.label_and_sample_proposals(proposals, gt, sampler);
        crate::host_timing::mark("roi_sampling");
        let (classifier, box_reg) = self.box_losses(features, &sampled, gt, image_sizes);
        crate::host_timing::mark("box_head");
        let mask = self.mask_branch.as_ref().map(|branch| {
            let loss = self.mask_loss(branch, features, &sampled, gt, image_sizes, mask_rows);
            crate::host_timing::mark("mask_head");
            loss
        });
        RoiLosses { classifier, box_reg, mask }
    }

    /// Matches every candidate (the proposals and the ground truth itself)
    /// and samples `batch_size_per_image` slots per image, positives first.
    fn label_and_sample_proposals(
        &self,
        proposals: &Proposals,
        gt: &TargetBatch,
        sampler: &mut dyn FgBgSampler,
    ) -> SampledProposals {
        let matcher = Matcher {
            high_threshold: self.cfg.fg_iou_thresh,
            low_threshold: self.cfg.bg_iou_thresh,
            allow_low_quality_matches: false,
        };
        let b = gt.len();
        let candidates = Tensor::cat(&[&proposals.boxes, &gt.boxes.to_kind(proposals.boxes.kind())], 1);
        let exists = Tensor::cat(&[&proposals.valid, &gt.valid], 1);
        let crowd_rows = gt.valid.logical_and(&gt.crowd);
        let m = matcher.assign_batch(&gt.boxes, &gt.valid, &crowd_rows, &candidates);
        let matched = m.matched.clamp_min(0);
        let labels = gt
            .labels
            .gather(1, &matched, false)
            .masked_fill(&m.matched.eq(BELOW_LOW_THRESHOLD), 0)
            .masked_fill(&m.matched.eq(BETWEEN_THRESHOLDS), -1);
        // Crowd instances never produce positives.
        let crowd_match = gt.crowd.gather(1, &matched, false).logical_and(&labels.gt(0));
        let labels = labels
            .masked_fill(&crowd_match, -1)
            .masked_fill(&m.crowd_overlap.logical_and(&labels.eq(0)), -1)
            .masked_fill(&exists.logical_not(), -1);
        let s = sampler.sample(
            SampleStage::RoiHeads,
            &labels,
            &exists,
            self.cfg.batch_size_per_image,
            self.cfg.positive_fraction,
        );
        let labels = labels.gather(1, &s.index, false).clamp_min(0);
        SampledProposals {
            boxes: gather4(&candidates, &s.index, b),
            positive: s.valid.logical_and(&labels.gt(0)),
            labels,
            matched: matched.gather(1, &s.index, false),
            weight: s.valid.to_kind(Kind::Float),
        }
    }

    /// Classification and class-specific box regression losses over the
    /// sampled slots.
    fn box_losses(
        &self,
        features: &[Tensor],
        sampled: &SampledProposals,
        gt: &TargetBatch,
        image_sizes: &[(i64, i64)],
    ) -> (Tensor, Tensor) {
        let (b, slots) = (sampled.labels.size()[0], sampled.labels.size()[1]);
        let targets = self
            .box_coder
            .encode(&gather4(&gt.boxes, &sampled.matched, b).reshape([-1, 4]), &sampled.boxes.reshape([-1, 4]))
            .reshape([b, slots, 4])
            .where_scalarother(&sampled.positive.unsqueeze(2), 0.0);
        let rois = rois_of_slots(&sampled.boxes);
        let rows = sampled.weight.reshape([-1]);
        let (logits, deltas) = self.box_branch.forward_rois(features, &rois, image_sizes, Some(&rows));
        fastrcnn_loss(&logits, &deltas, &sampled.labels, &targets, &sampled.weight, &sampled.positive)
    }

    /// The mask loss on the positives, which fill the first
    /// `batch_size_per_image × positive_fraction` slots of each image; the
    /// head runs on the rows `mask_rows` asks for (see [`MaskRows`]).
    fn mask_loss(
        &self,
        mask_branch: &MaskBranch,
        features: &[Tensor],
        sampled: &SampledProposals,
        gt: &TargetBatch,
        image_sizes: &[(i64, i64)],
        mask_rows: &MaskRows,
    ) -> Tensor {
        let (b, slots) = (sampled.labels.size()[0], sampled.labels.size()[1]);
        let quota = self.cfg.positive_slots().min(slots);
        let boxes = sampled.boxes.narrow(1, 0, quota);
        let matched = sampled.matched.narrow(1, 0, quota);
        // Positives matched to a box-only annotation have no mask target.
        let positive = sampled.positive.narrow(1, 0, quota).logical_and(&gt.has_mask.gather(1, &matched, false));
        let resolution = self.cfg.mask_resolution as i64;
        let device = boxes.device();
        let targets = mask_targets(gt, &boxes, &matched, &positive, resolution, device);
        crate::host_timing::mark("mask_targets");
        let positive = positive.reshape([-1]);
        let labels = sampled.labels.narrow(1, 0, quota).reshape([-1]);
        let rois = rois_of_slots(&boxes);
        let total = b * quota;
        let count = || positive.sum(Kind::Int64);
        let rows = match mask_rows {
            MaskRows::All => total,
            MaskRows::Counted { report } => {
                let count = count();
                if let Some(report) = report {
                    report.publish(&count);
                }
                mask_row_bucket(crate::host_sync::to_host(&count).int64_value(&[]), total)
            }
            MaskRows::Budget { rows, report } => {
                report.publish(&count());
                (*rows).min(total)
            }
        };
        let (rois, labels, targets, positive) = if rows < total {
            // The positives first, in image and slot order (a stable sort).
            let order = positive.to_kind(Kind::Int64).argsort_stable(true, 0, true).narrow(0, 0, rows);
            let pick = |t: &Tensor| t.index_select(0, &order);
            (pick(&rois), pick(&labels), pick(&targets), pick(&positive))
        } else {
            (rois, labels, targets, positive)
        };
        let weight = positive.to_kind(Kind::Float);
        let logits = mask_branch.forward_rois(features, &rois, &labels, image_sizes, Some(&weight));
        maskrcnn_loss(&logits, &targets, &positive)
    }
}

/// `[B·Q, M, M]` float targets for the mask slots `boxes` `[B, Q, 4]` matched
/// to instances `matched` `[B, Q]` (only `positive` slots matter): bitmaps
/// cropped by RoIAlign as torchvision's `project_masks_on_boxes`, polygons
/// rasterized per RoI. On CUDA one kernel for each kind and the whole batch;
/// elsewhere (or where a kernel is unavailable) image by image.
fn mask_targets(
    gt: &TargetBatch,
    boxes: &Tensor,
    matched: &Tensor,
    positive: &Tensor,
    m: i64,
    device: tch::Device,
) -> Tensor {
    let (b, q) = (boxes.size()[0], boxes.size()[1]);
    let (flat_boxes, flat_matched, flat_positive) =
        (boxes.reshape([-1, 4]), matched.reshape([-1]), positive.reshape([-1]));
    // The polygon kernel writes every slot (zeros outside polygon images),
    // the bitmap kernel then the bitmap images' slots.
    let from_polygons = gt.polygons.as_ref().map(|p| {
        crate::kernels::polygon::polygon_mask_targets(
            &p.coords,
            &p.starts,
            &p.instances,
            &flat_boxes,
            &flat_matched,
            &flat_positive,
            q,
            m,
        )
    });
    let polygons_done = !matches!(from_polygons, Some(None));
    let targets = from_polygons.flatten().unwrap_or_else(|| Tensor::zeros([b * q, m, m], (Kind::Float, device)));
    let bitmaps_done = gt.bitmaps.as_ref().is_none_or(|bm| {
        let kernel = crate::kernels::roi_align::bitmap_mask_targets;
        kernel(&bm.masks, &bm.sizes, &flat_boxes, &flat_matched, &flat_positive, q, &targets).is_some()
    });
    if polygons_done && bitmaps_done {
        return targets;
    }
    // Image by image on the host's path.
    let polygon_lists = gt.polygons.as_ref().filter(|_| !polygons_done).map(|p| p.to_lists());
    for i in 0..b {
        let image_targets = match gt.bitmaps.as_ref().map(|bm| (&bm.masks, bm.host_sizes[i as usize])) {
            Some((masks, (h, w))) if (h, w) != (0, 0) => {
                if bitmaps_done {
                    continue;
                }
                let planes = masks.get(i).narrow(1, 0, h).narrow(2, 0, w);
                project_masks_on_boxes(&planes, &boxes.get(i), &matched.get(i), m)
            }
            _ => match &polygon_lists {
                Some(lists) => polygon_mask_targets(&lists[i as usize], &boxes.get(i), &matched.get(i), m, device),
                None => continue,
            },
        };
        targets.narrow(0, i * q, q).copy_(&image_targets);
    }
    targets
}

/// Cross-entropy over the sampled slots (`weight` `[B, S]`: 1 for a sample)
/// and smooth-L1 (β = 1/9, summed, divided by the number of samples) on the
/// positives' deltas for their class; `labels` `[B, S]`, `targets`
/// `[B, S, 4]`, `logits` `[B·S, C]`, `deltas` `[B·S, 4C]`.
fn fastrcnn_loss(
    logits: &Tensor,
    deltas: &Tensor,
    labels: &Tensor,
    targets: &Tensor,
    weight: &Tensor,
    positive: &Tensor,
) -> (Tensor, Tensor) {
    let labels = labels.reshape([-1]);
    let weight = weight.reshape([-1]);
    let count = weight.sum(Kind::Float).clamp_min(1.0);
    let logits = logits.to_kind(Kind::Float);
    let classification = (logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::None, -100, 0.0)
        * &weight)
        .sum(Kind::Float)
        / &count;
    let n = logits.size()[0];
    let deltas = deltas.to_kind(Kind::Float).reshape([n, -1, 4]);
    let pred = deltas.gather(1, &labels.reshape([n, 1, 1]).expand([n, 1, 4], false), false).squeeze_dim(1);
    let positive = positive.reshape([-1, 1]);
    let box_loss = pred
        .smooth_l1_loss(&targets.reshape([-1, 4]), tch::Reduction::None, 1.0 / 9.0)
        .where_scalarother(&positive, 0.0)
        .sum(Kind::Float)
        / count;
    (classification, box_loss)
}

/// Binary cross-entropy between each positive slot's mask logits for its
/// class (`mask_logits` `[K, M, M]`) and its target `[K, M, M]`, averaged
/// over the positives' pixels (`positive` `[K]`); zero, with a graph, when
/// there are none.
fn maskrcnn_loss(mask_logits: &Tensor, targets: &Tensor, positive: &Tensor) -> Tensor {
    let size = mask_logits.size();
    let (k, h, w) = (size[0], size[1], size[2]);
    let pixels = positive.to_kind(Kind::Float).sum(Kind::Float).clamp_min(1.0) * (h * w) as f64;
    mask_logits
        .to_kind(Kind::Float)
        .binary_cross_entropy_with_logits::<Tensor>(targets, None, None, tch::Reduction::None)
        .where_scalarother(&positive.reshape([k, 1, 1]), 0.0)
        .sum(Kind::Float)
        / pixels
}
