//! Mask R-CNN: transform → backbone → RPN → RoI heads → original-size
//! detections with pasted masks, as torchvision's `MaskRCNN` in eval mode.

use super::backbone::BackboneWithFpn;
use super::roi_heads::{Detections, RoiHeads};
use super::rpn::{Rpn, RpnOutput};
use super::transform::{ImageList, Transform};
use super::{weights, ModelError};
use crate::config::Config;
use crate::ops::boxes::resize_boxes;
use crate::structures::masks::paste_masks_in_image;
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
    pub fn new(config: &Config, device: Device) -> Result<MaskRcnn, ModelError> {
        tch::manual_seed(config.seed as i64);
        let vs = VarStore::new(device);
        let root = vs.root();
        let backbone = BackboneWithFpn::new(&(&root / "backbone"), &config.model)?;
        let rpn = Rpn::new(&(&root / "rpn"), backbone.out_channels, &config.rpn);
        let roi_heads = RoiHeads::new(
            &(&root / "roi_heads"),
            backbone.out_channels,
            config.model.num_classes as i64,
            &config.roi_heads,
        );
        Ok(MaskRcnn { vs, transform: Transform::new(&config.input), backbone, rpn, roi_heads, config: config.clone() })
    }

    /// A model whose weights come from the safetensors file `path`.
    pub fn from_weights(config: &Config, path: &Path, device: Device) -> Result<MaskRcnn, ModelError> {
        let model = MaskRcnn::new(config, device)?;
        weights::load_weights(&model.vs, path, config.model.num_classes)?;
        Ok(model)
    }

    /// Saves the weights (torchvision names) to `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        weights::save_weights(&self.vs, path)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Runs inference on `images` (each `[3, H, W]` float RGB in [0, 1] on the
    /// model's device) and keeps every intermediate result.
    pub fn trace(&self, images: &[Tensor]) -> InferenceTrace {
        tch::no_grad(|| {
            let input = &self.config.input;
            let list = self.transform.prepare(images, input.min_size_test as i64, input.max_size_test as i64);
            let features = self.backbone.forward(&list.tensors, false);
            let size = list.tensors.size();
            let rpn = self.rpn.forward(&features, (size[2], size[3]), &list.image_sizes, false);
            let detections = self.roi_heads.detect(&features[..4], &rpn.proposals, &list.image_sizes);
            InferenceTrace { images: list, features, rpn, detections }
        })
    }

    /// Detections per image in original-image pixels: boxes `[D, 4]`, scores,
    /// labels and mask probabilities `[D, 1, H, W]` pasted into the image.
    pub fn predict(&self, images: &[Tensor]) -> Vec<Detections> {
        let sizes: Vec<(i64, i64)> = images.iter().map(|im| (im.size()[1], im.size()[2])).collect();
        self.postprocess(self.trace(images), &sizes)
    }

    /// Maps a trace's detections to the `original_sizes` `(H, W)` of its
    /// images: boxes rescaled, masks pasted.
    pub fn postprocess(&self, trace: InferenceTrace, original_sizes: &[(i64, i64)]) -> Vec<Detections> {
        tch::no_grad(|| {
            trace
                .detections
                .into_iter()
                .zip(&trace.images.image_sizes)
                .zip(original_sizes)
                .map(|((d, &resized), &original)| {
                    let boxes = resize_boxes(&d.boxes, resized, original);
                    let masks = d.masks.map(|m| paste_masks_in_image(&m, &boxes, original));
                    Detections { boxes, scores: d.scores, labels: d.labels, masks }
                })
                .collect()
        })
    }
}
