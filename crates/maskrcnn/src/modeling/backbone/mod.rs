//! Backbone: ResNet body + FPN, producing the five pyramid levels P2..P6.

pub mod fpn;
pub mod resnet;

use crate::config::Config;
use crate::modeling::ModelError;
use fpn::Fpn;
use resnet::ResNet;
use tch::nn::Path;
use tch::Tensor;

/// ResNet-FPN (`backbone.body` + `backbone.fpn`).
#[derive(Debug)]
pub struct BackboneWithFpn {
    pub body: ResNet,
    pub fpn: Fpn,
    /// Channels of every pyramid level.
    pub out_channels: i64,
}

impl BackboneWithFpn {
    /// Builds the backbone at `p` (`backbone`).
    pub fn new(p: &Path, config: &Config) -> Result<BackboneWithFpn, ModelError> {
        let cfg = &config.model;
        let body = ResNet::new(&(p / "body"), cfg.backbone_depth, config.trainable_layers(), config.norm_kind())
            .ok_or(ModelError::UnsupportedDepth(cfg.backbone_depth))?;
        let out_channels = cfg.fpn_channels as i64;
        let fpn = Fpn::new(&(p / "fpn"), &body.out_channels, out_channels, cfg.fpn_norm.kind());
        Ok(BackboneWithFpn { body, fpn, out_channels })
    }

    /// Normalized, padded images `[N, 3, H, W]` → P2..P6 `[N, C, H/s, W/s]`
    /// for strides 4, 8, 16, 32, 64.
    pub fn forward(&self, images: &Tensor, train: bool) -> Vec<Tensor> {
        self.fpn.forward(&self.body.forward(images, train), train)
    }
}
