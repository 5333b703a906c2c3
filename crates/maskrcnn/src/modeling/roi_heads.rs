//! RoI heads, as torchvision's `RoIHeads` with `TwoMLPHead`,
//! `FastRCNNPredictor`, `MaskRCNNHeads` and `MaskRCNNPredictor` (inference
//! path: detections and their mask probabilities).

use crate::config::RoiHeadsConfig;
use crate::modeling::layers::{conv2d, conv_transpose2d, linear, Conv2d, ConvOpts, ConvTranspose2d, Linear};
use crate::modeling::poolers::MultiScaleRoiAlign;
use crate::ops::matcher::{Matcher, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS};
use crate::ops::sampler::{FgBgSampler, SampleStage};
use crate::ops::{batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, BoxCoder};
use crate::structures::masks::{polygon_mask_targets, project_masks_on_boxes};
use crate::structures::{InstanceMasks, Target};
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
    /// `[D, 1, M, M]` mask probabilities inside each box (before pasting), or
    /// `[D, 1, H, W]` after pasting into the image.
    pub masks: Option<Tensor>,
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
    fc6: Linear,
    fc7: Linear,
    cls_score: Linear,
    bbox_pred: Linear,
}

impl BoxBranch {
    fn new(p: &Path, channels: i64, num_classes: i64, cfg: &RoiHeadsConfig) -> BoxBranch {
        let r = cfg.box_pooler_resolution as i64;
        let rep = cfg.representation_size as i64;
        let head = p / "box_head";
        let pred = p / "box_predictor";
        BoxBranch {
            pooler: MultiScaleRoiAlign::new(r, cfg.sampling_ratio as i64),
            fc6: linear(&(&head / "fc6"), channels * r * r, rep, None),
            fc7: linear(&(&head / "fc7"), rep, rep, None),
            cls_score: linear(&(&pred / "cls_score"), rep, num_classes, None),
            bbox_pred: linear(&(&pred / "bbox_pred"), rep, num_classes * 4, None),
        }
    }

    /// Class logits `[K, num_classes]` and deltas `[K, 4 * num_classes]`
    /// for `proposals` (one `[K_i, 4]` per image).
    pub fn forward(&self, features: &[Tensor], proposals: &[Tensor], image_sizes: &[(i64, i64)]) -> (Tensor, Tensor) {
        let x = self.pooler.forward(features, proposals, image_sizes);
        let x = x.flatten(1, -1);
        let x = self.fc7.forward(&self.fc6.forward(&x).relu()).relu();
        (self.cls_score.forward(&x), self.bbox_pred.forward(&x))
    }
}

/// Mask branch: pooled features → per-class mask logits `[K, C, 2S, 2S]`.
#[derive(Debug)]
pub struct MaskBranch {
    pub pooler: MultiScaleRoiAlign,
    convs: Vec<Conv2d>,
    conv5_mask: ConvTranspose2d,
    mask_fcn_logits: Conv2d,
}

impl MaskBranch {
    fn new(p: &Path, channels: i64, num_classes: i64, cfg: &RoiHeadsConfig) -> MaskBranch {
        let init = kaiming_normal_fan_out();
        let width = cfg.mask_head_channels as i64;
        let convs = (0..4)
            .map(|i| {
                let cin = if i == 0 { channels } else { width };
                conv2d(&(p / "mask_head" / i / 0), cin, width, 3, ConvOpts { padding: 1, init, ..ConvOpts::default() })
            })
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

    /// Mask logits `[K, num_classes, 2S, 2S]` for `boxes` (one `[K_i, 4]` per image).
    pub fn forward(&self, features: &[Tensor], boxes: &[Tensor], image_sizes: &[(i64, i64)]) -> Tensor {
        let mut x = self.pooler.forward(features, boxes, image_sizes);
        for conv in &self.convs {
            x = conv.forward(&x).relu();
        }
        self.mask_fcn_logits.forward(&self.conv5_mask.forward(&x).relu())
    }
}

/// Box and mask heads with their post-processing.
#[derive(Debug)]
pub struct RoiHeads {
    pub box_branch: BoxBranch,
    pub mask_branch: MaskBranch,
    pub box_coder: BoxCoder,
    pub cfg: RoiHeadsConfig,
}

impl RoiHeads {
    /// Heads at `p` (`roi_heads`) over `channels`-channel features.
    pub fn new(p: &Path, channels: i64, num_classes: i64, cfg: &RoiHeadsConfig) -> RoiHeads {
        let w = &cfg.bbox_reg_weights;
        RoiHeads {
            box_branch: BoxBranch::new(p, channels, num_classes, cfg),
            mask_branch: MaskBranch::new(p, channels, num_classes, cfg),
            box_coder: BoxCoder::new([w[0], w[1], w[2], w[3]]),
            cfg: cfg.clone(),
        }
    }

    /// Inference: detections with mask probabilities `[D, 1, 2S, 2S]` for each
    /// image, from `proposals` (one `[P_i, 4]` per image). `features` are
    /// P2..P5.
    pub fn detect(&self, features: &[Tensor], proposals: &[Tensor], image_sizes: &[(i64, i64)]) -> Vec<Detections> {
        let (logits, deltas) = self.box_branch.forward(features, proposals, image_sizes);
        let mut dets = self.postprocess_detections(&logits, &deltas, proposals, image_sizes);
        let boxes: Vec<Tensor> = dets.iter().map(|d| d.boxes.shallow_clone()).collect();
        let mask_logits = self.mask_branch.forward(features, &boxes, image_sizes);
        // The predicted class's channel of each detection.
        let labels = Tensor::cat(&dets.iter().map(|d| d.labels.shallow_clone()).collect::<Vec<_>>(), 0);
        let k = labels.size()[0];
        let index = Tensor::arange(k, (Kind::Int64, labels.device()));
        let probs = mask_logits.to_kind(Kind::Float).sigmoid().index(&[Some(index), Some(labels)]).unsqueeze(1);
        let mut start = 0;
        for d in &mut dets {
            let n = d.boxes.size()[0];
            d.masks = Some(probs.narrow(0, start, n));
            start += n;
        }
        dets
    }

    /// Softmax scores, per-class boxes, clipping, score threshold, small-box
    /// removal, per-class NMS and top-`detections_per_img`, per image.
    pub fn postprocess_detections(
        &self,
        logits: &Tensor,
        deltas: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
    ) -> Vec<Detections> {
        let device = logits.device();
        let num_classes = logits.size()[1];
        let all_proposals = Tensor::cat(proposals, 0);
        let pred_boxes = self.box_coder.decode(&deltas.to_kind(Kind::Float), &all_proposals); // [K, C, 4]
        let pred_scores = logits.softmax(-1, Kind::Float);
        let mut out = Vec::with_capacity(proposals.len());
        let mut start = 0;
        for (p, &size) in proposals.iter().zip(image_sizes) {
            let n = p.size()[0];
            let boxes = clip_boxes_to_image(&pred_boxes.narrow(0, start, n), size);
            let scores = pred_scores.narrow(0, start, n);
            start += n;
            let labels = Tensor::arange(num_classes, (Kind::Int64, device)).reshape([1, -1]).expand_as(&scores);
            let boxes = boxes.narrow(1, 1, num_classes - 1).reshape([-1, 4]);
            let scores = scores.narrow(1, 1, num_classes - 1).reshape([-1]);
            let labels = labels.narrow(1, 1, num_classes - 1).reshape([-1]);
            let inds = scores.gt(self.cfg.score_thresh).nonzero().squeeze_dim(1);
            let (boxes, scores, labels) =
                (boxes.index_select(0, &inds), scores.index_select(0, &inds), labels.index_select(0, &inds));
            let keep = remove_small_boxes(&boxes, 1e-2);
            let (boxes, scores, labels) =
                (boxes.index_select(0, &keep), scores.index_select(0, &keep), labels.index_select(0, &keep));
            let keep = batched_nms(&boxes, &scores, &labels, self.cfg.nms_thresh);
            let keep = keep.narrow(0, 0, (self.cfg.detections_per_img as i64).min(keep.size()[0]));
            out.push(Detections {
                boxes: boxes.index_select(0, &keep),
                scores: scores.index_select(0, &keep),
                labels: labels.index_select(0, &keep),
                masks: None,
            });
        }
        out
    }
}

/// The three RoI-head losses.
#[derive(Debug)]
pub struct RoiLosses {
    pub classifier: Tensor,
    pub box_reg: Tensor,
    pub mask: Tensor,
}

impl RoiHeads {
    /// Training losses: ground-truth boxes are appended to the `proposals`,
    /// proposals are matched (IoU >= fg: positive, < bg: background) and
    /// sampled, then cross-entropy + class-specific smooth-L1 (β = 1/9) on the
    /// samples and BCE on the positives' 28×28 mask targets, normalized as
    /// torchvision's `fastrcnn_loss` / `maskrcnn_loss`. `targets` are in
    /// resized-image pixels.
    pub fn losses(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
        targets: &[Target],
        sampler: &mut dyn FgBgSampler,
    ) -> RoiLosses {
        let matcher = Matcher {
            high_threshold: self.cfg.fg_iou_thresh,
            low_threshold: self.cfg.bg_iou_thresh,
            allow_low_quality_matches: false,
        };
        let device = proposals[0].device();
        let mut all_props = Vec::new();
        let mut matched_idxs = Vec::new();
        let mut labels = Vec::new();
        for (p, t) in proposals.iter().zip(targets) {
            let gt = t.boxes.to_kind(p.kind());
            let props = Tensor::cat(&[p.shallow_clone(), gt.shallow_clone()], 0);
            let n = props.size()[0];
            let (m, l) = if gt.size()[0] == 0 {
                (Tensor::zeros([n], (Kind::Int64, device)), Tensor::zeros([n], (Kind::Int64, device)))
            } else {
                let m = matcher.assign(&box_iou(&gt, &props));
                let clamped = m.clamp_min(0);
                let l = t
                    .labels
                    .index_select(0, &clamped)
                    .to_kind(Kind::Int64)
                    .masked_fill(&m.eq(BELOW_LOW_THRESHOLD), 0)
                    .masked_fill(&m.eq(BETWEEN_THRESHOLDS), -1);
                (clamped, l)
            };
            let l = if let Some(crowd) = &t.iscrowd {
                // Crowd instances never produce positives.
                let is_crowd_match = crowd.index_select(0, &m).logical_and(&l.gt(0));
                let l = l.masked_fill(&is_crowd_match, -1);
                let crowd_boxes = t.boxes.index_select(0, &crowd.nonzero().squeeze_dim(1));
                crate::ops::matcher::ignore_crowd_overlaps(l, &props, Some(&crowd_boxes), self.cfg.fg_iou_thresh)
            } else {
                l
            };
            all_props.push(props);
            matched_idxs.push(m);
            labels.push(l);
        }
        let sampled =
            sampler.sample(SampleStage::RoiHeads, &labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction);
        let mut s_props = Vec::new();
        let mut s_labels = Vec::new();
        let mut s_matched = Vec::new();
        let mut reg_targets = Vec::new();
        for (i, s) in sampled.iter().enumerate() {
            let inds = s.positive.logical_or(&s.negative).nonzero().squeeze_dim(1);
            let props = all_props[i].index_select(0, &inds);
            let m = matched_idxs[i].index_select(0, &inds);
            let gt = if targets[i].is_empty() {
                Tensor::zeros([1, 4], (props.kind(), device))
            } else {
                targets[i].boxes.to_kind(props.kind())
            };
            reg_targets.push(self.box_coder.encode(&gt.index_select(0, &m), &props));
            s_labels.push(labels[i].index_select(0, &inds));
            s_matched.push(m);
            s_props.push(props);
        }
        let (logits, deltas) = self.box_branch.forward(features, &s_props, image_sizes);
        let (classifier, box_reg) = fastrcnn_loss(&logits, &deltas, &s_labels, &reg_targets);

        // Mask branch on the positives.
        let mut mask_props = Vec::new();
        let mut mask_targets = Vec::new();
        let mut mask_labels = Vec::new();
        for i in 0..s_props.len() {
            let pos = s_labels[i].gt(0).nonzero().squeeze_dim(1);
            let props = s_props[i].index_select(0, &pos);
            let m = s_matched[i].index_select(0, &pos);
            let resolution = self.cfg.mask_resolution as i64;
            mask_targets.push(match &targets[i].masks {
                _ if pos.size()[0] == 0 => Tensor::zeros([0, resolution, resolution], (Kind::Float, device)),
                InstanceMasks::Bitmaps(masks) => project_masks_on_boxes(masks, &props, &m, resolution),
                InstanceMasks::Polygons(polys) => polygon_mask_targets(polys, &props, &m, resolution, device),
            });
            mask_labels.push(targets[i].labels.index_select(0, &m));
            mask_props.push(props);
        }
        let mask_logits = self.mask_branch.forward(features, &mask_props, image_sizes);
        let mask = maskrcnn_loss(&mask_logits, &Tensor::cat(&mask_labels, 0), &Tensor::cat(&mask_targets, 0));
        RoiLosses { classifier, box_reg, mask }
    }
}

/// Cross-entropy over all samples and smooth-L1 (β = 1/9, summed, divided by
/// the number of samples) on the positives' deltas for their class.
fn fastrcnn_loss(logits: &Tensor, deltas: &Tensor, labels: &[Tensor], targets: &[Tensor]) -> (Tensor, Tensor) {
    let labels = Tensor::cat(labels, 0);
    let targets = Tensor::cat(targets, 0);
    let logits = logits.to_kind(Kind::Float);
    let classification = logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0);
    let pos = labels.gt(0).nonzero().squeeze_dim(1);
    let labels_pos = labels.index_select(0, &pos);
    let n = logits.size()[0];
    let deltas = deltas.to_kind(Kind::Float).reshape([n, -1, 4]);
    let pred = deltas.index(&[Some(pos.shallow_clone()), Some(labels_pos)]);
    let box_loss =
        pred.smooth_l1_loss(&targets.index_select(0, &pos), tch::Reduction::Sum, 1.0 / 9.0) / labels.size()[0] as f64;
    (classification, box_loss)
}

/// Binary cross-entropy between each positive's mask logits for its class
/// (`mask_logits` `[K, C, M, M]`, `labels` `[K]`) and its target `[K, M, M]`;
/// zero (with a graph) when there are no positives.
fn maskrcnn_loss(mask_logits: &Tensor, labels: &Tensor, targets: &Tensor) -> Tensor {
    if targets.numel() == 0 {
        return mask_logits.sum(Kind::Float) * 0.0;
    }
    let k = labels.size()[0];
    let idx = Tensor::arange(k, (Kind::Int64, labels.device()));
    let logits = mask_logits.index(&[Some(idx), Some(labels.shallow_clone())]).to_kind(Kind::Float);
    logits.binary_cross_entropy_with_logits::<Tensor>(targets, None, None, tch::Reduction::Mean)
}
