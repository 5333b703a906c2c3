//! ResNet body (torchvision's `resnet18/34/50/101/152`, v1.5: the stride is on
//! the 3×3 convolution) returning the outputs C2..C5 of `layer1..layer4`.

use crate::config::NormKind;
use crate::modeling::layers::{conv2d, conv_norm_relu, epilogue, norm, Conv2d, ConvOpts, Epilogue, Norm};
use tch::nn::Path;
use tch::Tensor;

/// Block type and count per stage for a depth.
fn stages(depth: usize) -> Option<(BlockKind, [usize; 4])> {
    match depth {
        18 => Some((BlockKind::Basic, [2, 2, 2, 2])),
        34 => Some((BlockKind::Basic, [3, 4, 6, 3])),
        50 => Some((BlockKind::Bottleneck, [3, 4, 6, 3])),
        101 => Some((BlockKind::Bottleneck, [3, 4, 23, 3])),
        152 => Some((BlockKind::Bottleneck, [3, 8, 36, 3])),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

#[derive(Debug)]
struct Block {
    /// The convolutions before the last (each followed by its norm and ReLU).
    inner: Vec<(Conv2d, Norm)>,
    /// The last convolution, whose ReLU follows the shortcut's sum.
    last: (Conv2d, Norm),
    downsample: Option<(Conv2d, Norm)>,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut out = x.shallow_clone();
        for (conv, norm) in &self.inner {
            out = conv_norm_relu(conv, norm, &out, train);
        }
        // The shortcut joins before the last ReLU. With fixed statistics
        // the normalizations, the sum and the ReLU are one epilogue.
        let (conv, norm) = &self.last;
        if let Some((scale, shift)) = norm.fixed_affine(train) {
            let shortcut = match &self.downsample {
                Some((dconv, dnorm)) => dnorm.fixed_affine(train).map(|affine| (dconv.forward(x), Some(affine))),
                None => Some((x.shallow_clone(), None)),
            };
            if let Some((residual, affine)) = shortcut {
                let e = Epilogue {
                    residual: Some(&residual),
                    residual_affine: affine.as_ref().map(|(s, b)| (s, b)),
                    relu: true,
                    ..Epilogue::affine(Some(&scale), &shift)
                };
                return epilogue(&conv.forward(&out), &e);
            }
        }
        let out = norm.forward(&conv.forward(&out), train);
        let identity = match &self.downsample {
            Some((dconv, dnorm)) => dnorm.forward(&dconv.forward(x), train),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// The ResNet trunk without its classifier.
#[derive(Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: Norm,
    layers: [Vec<Block>; 4],
    /// Output channels of layer1..layer4 (C2..C5).
    pub out_channels: [i64; 4],
}

/// Conv init of torchvision's ResNet (kaiming normal, fan_out, relu).
fn resnet_init() -> tch::nn::Init {
    tch::nn::Init::Kaiming {
        dist: tch::nn::init::NormalOrUniform::Normal,
        fan: tch::nn::init::FanInOut::FanOut,
        non_linearity: tch::nn::init::NonLinearity::ReLU,
    }
}

impl ResNet {
    /// Builds a ResNet of `depth` at `p` (`p` is `backbone.body`). Stages
    /// below the top `trainable_layers` (of conv1, layer1..layer4) are frozen.
    /// Returns `None` for an unsupported depth.
    pub fn new(p: &Path, depth: usize, trainable_layers: usize, norm_kind: NormKind) -> Option<ResNet> {
        let (kind, counts) = stages(depth)?;
        // Stage 0 is conv1+bn1, 1..=4 are layer1..layer4; the top
        // `trainable_layers` of these five train.
        let trains = |stage: usize| stage + trainable_layers >= 5;
        let opts = |stride: i64, padding: i64, stage: usize| ConvOpts {
            stride,
            padding,
            bias: false,
            trainable: trains(stage),
            init: resnet_init(),
            ..ConvOpts::default()
        };
        let conv1 = conv2d(&(p / "conv1"), 3, 64, 7, opts(2, 3, 0));
        let bn1 = norm(&(p / "bn1"), 64, norm_kind, trains(0));
        let mut inplanes = 64;
        let mut out_channels = [0; 4];
        let layers = std::array::from_fn(|li| {
            let stage = li + 1;
            let planes = 64 << li;
            let stride = if li == 0 { 1 } else { 2 };
            let lp = p / format!("layer{stage}");
            let mut blocks = Vec::with_capacity(counts[li]);
            for bi in 0..counts[li] {
                let bp = &lp / bi;
                let s = if bi == 0 { stride } else { 1 };
                let out = planes * kind.expansion();
                let (inner, last) = match kind {
                    BlockKind::Basic => (
                        vec![(
                            conv2d(&(&bp / "conv1"), inplanes, planes, 3, opts(s, 1, stage)),
                            norm(&(&bp / "bn1"), planes, norm_kind, trains(stage)),
                        )],
                        (
                            conv2d(&(&bp / "conv2"), planes, planes, 3, opts(1, 1, stage)),
                            norm(&(&bp / "bn2"), planes, norm_kind, trains(stage)),
                        ),
                    ),
                    BlockKind::Bottleneck => (
                        vec![
                            (
                                conv2d(&(&bp / "conv1"), inplanes, planes, 1, opts(1, 0, stage)),
                                norm(&(&bp / "bn1"), planes, norm_kind, trains(stage)),
                            ),
                            (
                                conv2d(&(&bp / "conv2"), planes, planes, 3, opts(s, 1, stage)),
                                norm(&(&bp / "bn2"), planes, norm_kind, trains(stage)),
                            ),
                        ],
                        (
                            conv2d(&(&bp / "conv3"), planes, out, 1, opts(1, 0, stage)),
                            norm(&(&bp / "bn3"), out, norm_kind, trains(stage)),
                        ),
                    ),
                };
                let downsample = (bi == 0 && (s != 1 || inplanes != out)).then(|| {
                    let dp = &bp / "downsample";
                    (
                        conv2d(&(&dp / 0), inplanes, out, 1, opts(s, 0, stage)),
                        norm(&(&dp / 1), out, norm_kind, trains(stage)),
                    )
                });
                blocks.push(Block { inner, last, downsample });
                inplanes = out;
            }
            out_channels[li] = inplanes;
            blocks
        });
        Some(ResNet { conv1, bn1, layers, out_channels })
    }

    /// `[N, 3, H, W]` → the four stage outputs C2..C5 (strides 4, 8, 16, 32).
    pub fn forward(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut x = conv_norm_relu(&self.conv1, &self.bn1, x, train);
        // Without a gradient to the stem (frozen, or inference) one kernel
        // on CUDA; libtorch's (with its backward) otherwise.
        let pooled = if x.requires_grad() { None } else { crate::kernels::max_pool::max_pool_3x3_stride2(&x) };
        x = pooled.unwrap_or_else(|| x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false));
        let mut outs = Vec::with_capacity(4);
        for layer in &self.layers {
            for block in layer {
                x = block.forward(&x, train);
            }
            outs.push(x.shallow_clone());
        }
        outs
    }
}
