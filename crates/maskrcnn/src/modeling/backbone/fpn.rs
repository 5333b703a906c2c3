//! Feature pyramid network over C2..C5 with a max-pool P6, as torchvision's
//! `FeaturePyramidNetwork` + `LastLevelMaxPool`.

use crate::modeling::layers::{conv2d, Conv2d, ConvOpts};
use tch::nn::Path;
use tch::Tensor;

/// Lateral 1×1 and output 3×3 convolutions per input level.
#[derive(Debug)]
pub struct Fpn {
    inner_blocks: Vec<Conv2d>,
    layer_blocks: Vec<Conv2d>,
}

impl Fpn {
    /// FPN at `p` (`backbone.fpn`) from `in_channels` (C2..C5) to `out_channels`.
    pub fn new(p: &Path, in_channels: &[i64], out_channels: i64) -> Fpn {
        // torchvision: kaiming_uniform_(a=1), bias 0.
        let init = tch::nn::Init::Kaiming {
            dist: tch::nn::init::NormalOrUniform::Uniform,
            fan: tch::nn::init::FanInOut::FanIn,
            non_linearity: tch::nn::init::NonLinearity::Linear,
        };
        let inner_blocks = in_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                conv2d(&(p / "inner_blocks" / i / 0), c, out_channels, 1, ConvOpts { init, ..ConvOpts::default() })
            })
            .collect();
        let layer_blocks = (0..in_channels.len())
            .map(|i| {
                conv2d(
                    &(p / "layer_blocks" / i / 0),
                    out_channels,
                    out_channels,
                    3,
                    ConvOpts { padding: 1, init, ..ConvOpts::default() },
                )
            })
            .collect();
        Fpn { inner_blocks, layer_blocks }
    }

    /// C2..C5 → P2..P6 (P6 = stride-2 1×1 max-pool of P5).
    pub fn forward(&self, feats: &[Tensor]) -> Vec<Tensor> {
        let n = feats.len();
        let mut last_inner = self.inner_blocks[n - 1].forward(&feats[n - 1]);
        let mut results = vec![self.layer_blocks[n - 1].forward(&last_inner)];
        for idx in (0..n - 1).rev() {
            let size = &feats[idx].size()[2..];
            // Autocast would upsample in float32 and make the whole top-down
            // path float32; nearest upsampling is exact in any dtype.
            let top_down = crate::shim::without_autocast(|| last_inner.upsample_nearest2d(size, None, None));
            // lateral + top_down, the sum fused with the lateral's bias on CUDA.
            last_inner = self.inner_blocks[idx].forward_act(&feats[idx], Some(&top_down), false);
            results.insert(0, self.layer_blocks[idx].forward(&last_inner));
        }
        let p6 = results[n - 1].max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false);
        results.push(p6);
        results
    }
}
