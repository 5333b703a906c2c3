//! Feature pyramid network over C2..C5 with a max-pool P6, as torchvision's
//! `FeaturePyramidNetwork` + `LastLevelMaxPool`; optionally with a
//! normalization after each convolution (`model.fpn_norm`, torchvision's
//! `norm_layer`).

use crate::config::NormKind;
use crate::modeling::layers::{conv2d, epilogue, norm, upsampled_like, Conv2d, ConvOpts, Epilogue, Norm};
use tch::nn::Path;
use tch::Tensor;

/// One FPN convolution: `conv` at `p.0` (biased without a norm), then the
/// optional norm at `p.1` (torchvision's `Conv2dNormActivation` without an
/// activation).
#[derive(Debug)]
struct FpnConv {
    conv: Conv2d,
    norm: Option<Norm>,
}

impl FpnConv {
    fn new(p: &Path, cin: i64, cout: i64, k: i64, norm_kind: Option<NormKind>) -> FpnConv {
        // torchvision: kaiming_uniform_(a=1), bias 0.
        let init = tch::nn::Init::Kaiming {
            dist: tch::nn::init::NormalOrUniform::Uniform,
            fan: tch::nn::init::FanInOut::FanIn,
            non_linearity: tch::nn::init::NonLinearity::Linear,
        };
        let opts = ConvOpts { padding: k / 2, init, bias: norm_kind.is_none(), ..ConvOpts::default() };
        FpnConv {
            conv: conv2d(&(p / 0), cin, cout, k, opts),
            norm: norm_kind.map(|kind| norm(&(p / 1), cout, kind, true)),
        }
    }

    /// `norm(conv(x))` `[N, cout, H, W]`, plus the coarser level `top_down`
    /// `[N, cout, H/2, W/2]` nearest-upsampled when given; with fixed
    /// statistics (or no norm) one epilogue on CUDA.
    fn forward(&self, x: &Tensor, top_down: Option<&Tensor>, train: bool) -> Tensor {
        let Some(norm) = &self.norm else {
            return match top_down {
                Some(t) => self.conv.forward_top_down(x, t),
                None => self.conv.forward(x),
            };
        };
        let y = self.conv.forward(x);
        match norm.fixed_affine(train) {
            Some((scale, shift)) => {
                let e =
                    Epilogue { residual: top_down, residual_upsampled: true, ..Epilogue::affine(Some(&scale), &shift) };
                epilogue(&y, &e)
            }
            None => {
                let y = norm.forward(&y, train);
                match top_down {
                    Some(t) => &y + upsampled_like(t, &y),
                    None => y,
                }
            }
        }
    }
}

/// Lateral 1×1 and output 3×3 convolutions per input level.
#[derive(Debug)]
pub struct Fpn {
    inner_blocks: Vec<FpnConv>,
    layer_blocks: Vec<FpnConv>,
}

impl Fpn {
    /// FPN at `p` (`backbone.fpn`) from `in_channels` (C2..C5) to
    /// `out_channels`, each convolution followed by a `norm_kind` layer
    /// when given.
    pub fn new(p: &Path, in_channels: &[i64], out_channels: i64, norm_kind: Option<NormKind>) -> Fpn {
        let inner_blocks = in_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| FpnConv::new(&(p / "inner_blocks" / i), c, out_channels, 1, norm_kind))
            .collect();
        let layer_blocks = (0..in_channels.len())
            .map(|i| FpnConv::new(&(p / "layer_blocks" / i), out_channels, out_channels, 3, norm_kind))
            .collect();
        Fpn { inner_blocks, layer_blocks }
    }

    /// C2..C5 → P2..P6 (P6 = stride-2 1×1 max-pool of P5). `train`: a
    /// BatchNorm uses batch statistics.
    pub fn forward(&self, feats: &[Tensor], train: bool) -> Vec<Tensor> {
        let n = feats.len();
        let mut last_inner = self.inner_blocks[n - 1].forward(&feats[n - 1], None, train);
        let mut results = vec![self.layer_blocks[n - 1].forward(&last_inner, None, train)];
        for idx in (0..n - 1).rev() {
            // lateral + upsampled top-down path, fused with the lateral's
            // bias or norm on CUDA (the coarser level read in place).
            last_inner = self.inner_blocks[idx].forward(&feats[idx], Some(&last_inner), train);
            results.insert(0, self.layer_blocks[idx].forward(&last_inner, None, train));
        }
        let p6 = results[n - 1].max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false);
        results.push(p6);
        results
    }
}
