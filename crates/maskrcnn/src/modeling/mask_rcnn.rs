//! Mask R-CNN: transform → backbone → RPN → RoI heads → original-size
//! detections with pasted masks, as torchvision's `MaskRCNN` in eval mode.

use super::backbone::BackboneWithFpn;
use super::graphs::BackboneGraphs;
use super::roi_heads::{Detections, HeadArch, MaskRows, RoiHeads};
use super::rpn::{Rpn, RpnOutput};
use super::transform::{resize_target, ImageList, Transform};
use super::{weights, ModelError};
use crate::config::{AutoCount, Config, MaskOn};
use crate::ops::boxes::resize_boxes;
use crate::ops::sampler::FgBgSampler;
use crate::structures::masks::paste_masks_as_rle_batch;
use crate::structures::{Categories, Target, TargetBatch, TargetPadding};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// The whole model and the variables it owns.
#[derive(Debug)]
pub struct MaskRcnn {
    pub vs: VarStore,
    pub transform: Transform,
    pub backbone: BackboneWithFpn,
    pub rpn: Rpn,
    pub roi_heads: RoiHeads,
    pub config: Config,
    /// The dataset categories of labels 1..=K, when known (set by training,
    /// stored in and read from the weights file).
    pub categories: Option<Categories>,
    /// The backbone's CUDA graphs for inference (`precision.cuda_graphs`).
    graphs: BackboneGraphs,
}

/// The training losses, named as torchvision names them: five, or four
/// without the mask branch (Faster R-CNN's).
#[derive(Debug)]
pub struct Losses {
    pub objectness: Tensor,
    pub rpn_box_reg: Tensor,
    pub classifier: Tensor,
    pub box_reg: Tensor,
    /// `None` without the mask branch.
    pub mask: Option<Tensor>,
}

/// The loss names of a model with (`masks`) or without the mask branch, in
/// [`Losses::named`] order.
pub fn loss_names(masks: bool) -> &'static [&'static str] {
    const NAMES: [&str; 5] = ["loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"];
    if masks {
        &NAMES
    } else {
        &NAMES[..4]
    }
}

impl Losses {
    /// `(name, loss)` pairs in [`loss_names`] order: `loss_objectness`,
    /// `loss_rpn_box_reg`, `loss_classifier`, `loss_box_reg` and, with the
    /// mask branch, `loss_mask`.
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        let all = [&self.objectness, &self.rpn_box_reg, &self.classifier, &self.box_reg];
        let mut out: Vec<(&'static str, &Tensor)> = loss_names(false).iter().copied().zip(all).collect();
        if let Some(mask) = &self.mask {
            out.push(("loss_mask", mask));
        }
        out
    }

    /// The unweighted sum.
    pub fn total(&self) -> Tensor {
        let boxes = &self.objectness + &self.rpn_box_reg + &self.classifier + &self.box_reg;
        match &self.mask {
            Some(mask) => boxes + mask,
            None => boxes,
        }
    }
}

/// A training target that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("image {image}: box {index} {coords:?} has no positive width and height (or is not finite)")]
    DegenerateBox { image: usize, index: usize, coords: [f32; 4] },
    #[error("image {image}: {boxes} boxes but {labels} labels and {masks} masks")]
    Inconsistent { image: usize, boxes: i64, labels: i64, masks: i64 },
    #[error("image {image}: label {label} is outside 1..{num_classes}")]
    BadLabel { image: usize, label: i64, num_classes: usize },
    #[error("{images} images but {targets} targets")]
    Count { images: usize, targets: usize },
    #[error("a training batch needs at least one image")]
    NoImages,
}

/// How [`MaskRcnn::prepare_train`] resizes and pads a training batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchResize<'a> {
    /// The short side (`None`: drawn from `input.min_size` with libtorch's
    /// CPU generator).
    pub short_side: Option<i64>,
    /// Original `(height, width)` of images the padded batch must fit too,
    /// once resized: the global batch of a multi-GPU step, so every rank
    /// pads to the same shape (the shape one process would use).
    pub cover: &'a [(i64, i64)],
}

/// A training batch prepared on the host for the device step
/// ([`MaskRcnn::prepare_train`]): the resized, normalized, padded images
/// with their sizes, and the ground truth padded to `[B, G]`.
#[derive(Debug)]
pub struct TrainInputs {
    pub images: ImageList,
    pub targets: TargetBatch,
    /// How many rows the mask head runs ([`MaskRows::Counted`] from
    /// [`MaskRcnn::prepare_train`]; a recorded step sets a budget).
    pub mask_rows: MaskRows,
}

/// Everything inference computes for a batch, for inspection and tests.
#[derive(Debug)]
pub struct InferenceTrace {
    pub images: ImageList,
    /// P2..P6.
    pub features: Vec<Tensor>,
    pub rpn: RpnOutput,
    /// Detections in resized-image coordinates, masks not yet pasted.
    pub detections: Vec<Detections>,
}

impl MaskRcnn {
    /// A randomly initialized model on `device` (seeded by `config.seed`).
    /// `model.num_classes = "auto"` builds torchvision's COCO label space
    /// (91) and `model.mask_on = "auto"` the mask branch, unless resolved
    /// before (from the data: training; from the weights: [`from_weights`](Self::from_weights));
    /// the model's own `config` holds the resolved values.
    pub fn new(config: &Config, device: Device) -> Result<MaskRcnn, ModelError> {
        let mut config = config.clone();
        config.model.num_classes = AutoCount::Fixed(config.model.num_classes.or(crate::config::COCO_NUM_CLASSES));
        config.model.mask_on = MaskOn::from_bool(config.model.mask_on.enabled());
        config.precision.amp = config.precision.amp.on(device);
        let config = &config;
        // A config built in code skips `Config::load`'s checks; the model
        // relies on those of its own sections (non-empty `input.min_size`,
        // positive sizes, ...). Solver and data settings are the trainer's.
        config.model.validate()?;
        config.input.validate()?;
        config.rpn.validate()?;
        config.roi_heads.validate()?;
        tch::manual_seed(config.seed as i64);
        let vs = VarStore::new(device);
        let root = vs.root();
        let backbone = BackboneWithFpn::new(&(&root / "backbone"), config)?;
        let rpn = Rpn::new(&(&root / "rpn"), backbone.out_channels, &config.rpn, config.model.rpn_conv_depth);
        let roi_heads = RoiHeads::new(
            &(&root / "roi_heads"),
            backbone.out_channels,
            config.model.num_classes.or(crate::config::COCO_NUM_CLASSES) as i64,
            &config.roi_heads,
            HeadArch {
                box_head: config.model.box_head,
                head_norm: config.model.head_norm,
                masks: config.model.mask_on.enabled(),
            },
        );
        Ok(MaskRcnn {
            vs,
            transform: Transform::new(&config.input),
            backbone,
            rpn,
            roi_heads,
            config: config.clone(),
            categories: None,
            graphs: BackboneGraphs::default(),
        })
    }

    /// A model whose weights (and category table, when the file has one)
    /// come from the safetensors file `path`. `model.num_classes = "auto"`
    /// takes the file's class count and `model.mask_on = "auto"` its mask
    /// head, or its absence (a Faster R-CNN file).
    pub fn from_weights(config: &Config, path: &Path, device: Device) -> Result<MaskRcnn, ModelError> {
        let info = weights::inspect(path)?;
        let mut config = config.clone();
        if let (AutoCount::Auto, Some(n)) = (config.model.num_classes, info.classes) {
            config.model.num_classes = AutoCount::Fixed(n);
        }
        if config.model.mask_on == MaskOn::Auto {
            config.model.mask_on = MaskOn::from_bool(info.mask_head);
        }
        let mut model = MaskRcnn::new(&config, device)?;
        let classes = model.num_classes();
        weights::load_weights(&model.vs, path, classes)?;
        model.categories = info.categories;
        if let Some(c) = model.categories.as_ref().filter(|c| c.num_classes() != classes) {
            return Err(ModelError::ReadWeights {
                path: path.to_path_buf(),
                message: format!("its category table lists {} categories but the model has {classes} classes", c.len()),
            });
        }
        Ok(model)
    }

    /// Classes including background (the box predictor's outputs).
    pub fn num_classes(&self) -> usize {
        self.config.model.num_classes.or(crate::config::COCO_NUM_CLASSES)
    }

    /// Whether the model has the mask branch (else it detects boxes only).
    pub fn has_masks(&self) -> bool {
        self.roi_heads.mask_branch.is_some()
    }

    /// Saves the weights (torchvision names) and the category table to
    /// `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        weights::save_weights(&self.vs, self.categories.as_ref(), path)
    }

    /// The dataset category id of `label`: from the category table when the
    /// model has one, else the label itself (torchvision's COCO models
    /// predict category ids).
    pub fn category_id(&self, label: i64) -> i64 {
        self.categories.as_ref().and_then(|c| c.category_id(label)).map_or(label, |id| id as i64)
    }

    /// A name for `label`: the category's name, COCO's names for 91-class
    /// models without a table, else `class N`.
    pub fn class_name(&self, label: i64) -> String {
        match self.categories.as_ref().and_then(|c| c.get(label)) {
            Some(c) => c.name.clone(),
            None => crate::structures::categories::class_name(label, self.num_classes()),
        }
    }

    /// Stores every 4-D weight in NHWC (channels-last) layout; with
    /// `precision.channels_last` the input batch follows on CUDA, so cuDNN
    /// runs its NHWC kernels throughout the backbone.
    pub fn to_channels_last(&mut self) {
        tch::no_grad(|| {
            for (_, mut v) in self.vs.variables() {
                if v.dim() == 4 {
                    let nhwc = v.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
                    v.set_data(&nhwc);
                }
            }
        });
    }

    /// The padded batch in the layout the backbone runs in.
    fn layout(&self, batch: Tensor) -> Tensor {
        if self.config.precision.channels_last && batch.device().is_cuda() {
            batch.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
        } else {
            batch
        }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Runs inference on `images` (each `[3, H, W]` float RGB in [0, 1] on the
    /// model's device) and keeps every intermediate result. With CUDA graphs
    /// (`precision.cuda_graphs`) the trace's feature maps are the graph's
    /// outputs, rewritten by a later call with images of the same padded
    /// shape: use them before the next call.
    pub fn trace(&self, images: &[Tensor]) -> InferenceTrace {
        let input = &self.config.input;
        let list =
            tch::no_grad(|| self.transform.prepare(images, input.min_size_test as i64, input.max_size_test as i64));
        self.trace_prepared(list)
    }

    /// The FPN's feature maps P2..P6 of a padded batch `[B, 3, H, W]` in
    /// inference: replayed from a CUDA graph when `precision.cuda_graphs`
    /// is on (see [`trace`](Self::trace) for how long they stay valid).
    pub fn inference_features(&self, batch: &Tensor) -> Vec<Tensor> {
        if self.config.precision.cuda_graphs && batch.device().is_cuda() {
            self.graphs.forward(&self.backbone, batch)
        } else {
            self.backbone.forward(batch, false)
        }
    }

    /// Frees the inference CUDA graphs and their memory (evaluation during
    /// training does this after each pass, so training keeps the memory).
    pub fn clear_graphs(&self) {
        self.graphs.clear();
    }

    /// CUDA graphs recorded for inference so far (one per padded shape).
    pub fn recorded_graphs(&self) -> usize {
        self.graphs.recorded()
    }

    /// The inference forward pass over an already prepared batch.
    fn trace_prepared(&self, list: ImageList) -> InferenceTrace {
        tch::no_grad(|| {
            let features = self.inference_features(&list.tensors);
            let rpn = self.rpn.forward(&features, &list, false);
            let (proposals, _) = rpn.proposals.per_image();
            let detections = self.roi_heads.detect(&features[..4], &proposals, &list.image_sizes);
            InferenceTrace { images: list, features, rpn, detections }
        })
    }

    /// Training forward pass: the five losses for `images` (each `[3, H, W]`
    /// float RGB in [0, 1], on the model's device) and their `targets`
    /// (original-image pixels; from the data loader on the host, where they
    /// are checked and padded without a GPU sync). The
    /// short side is drawn from `input.min_size` per batch; `sampler` chooses
    /// the anchors and proposals that enter the losses. Images without
    /// instances train as negatives. [`prepare_train`](Self::prepare_train)
    /// then [`forward_prepared`](Self::forward_prepared).
    pub fn forward_train(
        &self,
        images: &[Tensor],
        targets: &[Target],
        sampler: &mut dyn FgBgSampler,
    ) -> Result<Losses, TargetError> {
        let inputs = self.prepare_train(images, targets, BatchResize::default(), TargetPadding::Exact)?;
        Ok(self.forward_prepared(&inputs, sampler))
    }

    /// The host's part of a training step: targets checked, images resized
    /// and padded per `resize` (long side at most `input.max_size`),
    /// normalized and batched, targets resized and padded to `[B, G]` (or
    /// further, per `padding`) and sent to the device without blocking.
    pub fn prepare_train(
        &self,
        images: &[Tensor],
        targets: &[Target],
        resize: BatchResize<'_>,
        padding: TargetPadding,
    ) -> Result<TrainInputs, TargetError> {
        // Checked where they are (on the host for the data loader's targets:
        // no GPU sync).
        validate_targets(images, targets, self.num_classes())?;
        let device = self.device();
        let input = &self.config.input;
        let short_side = resize.short_side.unwrap_or_else(|| {
            let choices = &input.min_size;
            let pick = if choices.len() > 1 {
                Tensor::randint(choices.len() as i64, [1], (tch::Kind::Int64, Device::Cpu)).int64_value(&[0]) as usize
            } else {
                0
            };
            choices[pick] as i64
        });
        let list = self.transform.prepare_covering(images, short_side, input.max_size as i64, resize.cover);
        crate::host_timing::mark("images");
        // Boxes and polygons are resized on the host, bitmaps on the device;
        // then the padded batch goes to the device without blocking.
        let resized: Vec<Target> = targets
            .iter()
            .zip(images)
            .zip(&list.image_sizes)
            .map(|((t, im), &size)| resize_target(t, (im.size()[1], im.size()[2]), size, device))
            .collect();
        let size = list.tensors.size();
        let targets = TargetBatch::new(resized, device, (size[2], size[3]), padding);
        crate::host_timing::mark("targets");
        Ok(TrainInputs { images: list, targets, mask_rows: MaskRows::Counted { report: None } })
    }

    /// The device's part of a training step: backbone, RPN and its losses,
    /// RoI sampling, box and mask heads and their losses for prepared
    /// `inputs`. Static shapes for given input shapes; no host reads unless
    /// `inputs.mask_rows` asks to count the mask positives.
    pub fn forward_prepared(&self, inputs: &TrainInputs, sampler: &mut dyn FgBgSampler) -> Losses {
        let (list, gt) = (&inputs.images, &inputs.targets);
        let features = self.backbone.forward(&self.layout(list.tensors.shallow_clone()), true);
        crate::host_timing::mark("backbone");
        let rpn = self.rpn.forward(&features, list, true);
        crate::host_timing::mark("rpn");
        let (objectness, rpn_box_reg) = self.rpn.losses(&rpn, gt, sampler);
        crate::host_timing::mark("rpn_losses");
        let roi =
            self.roi_heads.losses(&features[..4], &rpn.proposals, &list.image_sizes, gt, sampler, &inputs.mask_rows);
        Losses { objectness, rpn_box_reg, classifier: roi.classifier, box_reg: roi.box_reg, mask: roi.mask }
    }

    /// Detections per image in original-image pixels: boxes `[D, 4]`, scores,
    /// labels, box-relative mask probabilities `[D, 1, M, M]` and the masks
    /// pasted into the image as COCO RLEs (`segmentations`).
    pub fn predict(&self, images: &[Tensor]) -> Vec<Detections> {
        let sizes: Vec<(i64, i64)> = images.iter().map(|im| (im.size()[1], im.size()[2])).collect();
        self.postprocess(self.trace(images), &sizes)
    }

    /// [`predict`](Self::predict) consuming `images`, normalized in place
    /// (`Transform::prepare_owned`): one float32 copy of each image less.
    pub fn predict_owned(&self, images: Vec<Tensor>) -> Vec<Detections> {
        let sizes: Vec<(i64, i64)> = images.iter().map(|im| (im.size()[1], im.size()[2])).collect();
        let input = &self.config.input;
        let list = tch::no_grad(|| {
            self.transform.prepare_owned(images, input.min_size_test as i64, input.max_size_test as i64)
        });
        self.postprocess(self.trace_prepared(list), &sizes)
    }

    /// Maps a trace's detections to the `original_sizes` `(H, W)` of its
    /// images: boxes rescaled, masks pasted (as RLEs: memory bounded by the
    /// largest box, whatever the image size).
    pub fn postprocess(&self, trace: InferenceTrace, original_sizes: &[(i64, i64)]) -> Vec<Detections> {
        tch::no_grad(|| {
            let mut detections: Vec<Detections> = trace
                .detections
                .into_iter()
                .zip(&trace.images.image_sizes)
                .zip(original_sizes)
                .map(|((d, &resized), &original)| Detections { boxes: resize_boxes(&d.boxes, resized, original), ..d })
                .collect();
            // Every image's masks pasted together (one launch on CUDA).
            let with_masks: Vec<usize> = (0..detections.len()).filter(|&i| detections[i].masks.is_some()).collect();
            let batch: Vec<(&Tensor, &Tensor, (i64, i64))> = with_masks
                .iter()
                .filter_map(|&i| detections[i].masks.as_ref().map(|m| (m, &detections[i].boxes, original_sizes[i])))
                .collect();
            let rles = paste_masks_as_rle_batch(&batch);
            for (i, r) in with_masks.into_iter().zip(rles) {
                detections[i].segmentations = Some(r);
            }
            detections
        })
    }
}

/// Checks shapes, labels and boxes of every target (before any GPU work).
fn validate_targets(images: &[Tensor], targets: &[Target], num_classes: usize) -> Result<(), TargetError> {
    if images.len() != targets.len() {
        return Err(TargetError::Count { images: images.len(), targets: targets.len() });
    }
    if images.is_empty() {
        return Err(TargetError::NoImages);
    }
    for (image, t) in targets.iter().enumerate() {
        let (boxes, labels, masks) = (t.boxes.size()[0], t.labels.size()[0], t.masks.len());
        if boxes != labels || boxes != masks {
            return Err(TargetError::Inconsistent { image, boxes, labels, masks });
        }
        let coords = crate::ops::boxes::to_vec_f32(&t.boxes.reshape([-1]));
        for (index, b) in coords.chunks(4).enumerate() {
            if !(b.iter().all(|v| v.is_finite()) && b[2] > b[0] && b[3] > b[1]) {
                return Err(TargetError::DegenerateBox { image, index, coords: [b[0], b[1], b[2], b[3]] });
            }
        }
        for label in crate::ops::boxes::to_vec_i64(&t.labels) {
            if label < 1 || label >= num_classes as i64 {
                return Err(TargetError::BadLabel { image, label, num_classes });
            }
        }
    }
    Ok(())
}
