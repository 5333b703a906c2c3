//! Parameterized layers registered under torchvision's state-dict names.
//!
//! Small structs instead of `tch::nn` modules so a layer can be created
//! frozen (its tensors are buffers: no gradient, not in the optimizer) and
//! so each forward is exactly the libtorch call torchvision makes.

pub use crate::kernels::epilogue::{upsampled_like, Epilogue};
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// Creates a parameter: trainable (in the optimizer) or frozen (a buffer).
fn param(p: &Path, name: &str, dims: &[i64], init: Init, trainable: bool) -> Tensor {
    p.add(name, tch::nn::init::init(init, dims, p.device()), trainable)
}

/// 2-D convolution; weight `[out, in/groups, k, k]`, optional bias `[out]`.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
}

/// Options of [`conv2d`].
#[derive(Debug, Clone, Copy)]
pub struct ConvOpts {
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
    pub bias: bool,
    pub trainable: bool,
    pub init: Init,
}

impl Default for ConvOpts {
    fn default() -> Self {
        ConvOpts {
            stride: 1,
            padding: 0,
            dilation: 1,
            bias: true,
            trainable: true,
            init: Init::Kaiming {
                dist: tch::nn::init::NormalOrUniform::Uniform,
                fan: tch::nn::init::FanInOut::FanIn,
                non_linearity: tch::nn::init::NonLinearity::ReLU,
            },
        }
    }
}

/// A `k`×`k` convolution from `cin` to `cout` channels at `p` (`p.weight`, `p.bias`).
pub fn conv2d(p: &Path, cin: i64, cout: i64, k: i64, o: ConvOpts) -> Conv2d {
    let weight = param(p, "weight", &[cout, cin, k, k], o.init, o.trainable);
    let bias = o.bias.then(|| param(p, "bias", &[cout], Init::Const(0.0), o.trainable));
    Conv2d { weight, bias, stride: o.stride, padding: o.padding, dilation: o.dilation }
}

impl Conv2d {
    /// `[N, in, H, W]` → `[N, out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_act(x, None, false)
    }

    /// `act(conv(x) (+ residual))`, `act` ReLU when `relu`, else the
    /// identity; `residual` shaped as the output. See [`conv_epilogue`].
    pub fn forward_act(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Tensor {
        self.forward_epilogue(x, residual, false, relu)
    }

    /// `conv(x) + upsample(coarser)`: an FPN's lateral plus its top-down
    /// path, `coarser` `[N, out, H'/2, W'/2]` nearest-upsampled to the
    /// output's size (read in place on CUDA).
    pub fn forward_top_down(&self, x: &Tensor, coarser: &Tensor) -> Tensor {
        self.forward_epilogue(x, Some(coarser), true, false)
    }

    fn forward_epilogue(&self, x: &Tensor, residual: Option<&Tensor>, upsampled: bool, relu: bool) -> Tensor {
        let conv = |bias: Option<&Tensor>| {
            x.conv2d(
                &self.weight,
                bias,
                [self.stride, self.stride],
                [self.padding, self.padding],
                [self.dilation, self.dilation],
                1,
            )
        };
        conv_epilogue(conv, self.bias.as_ref(), residual, upsampled, relu, x.device().is_cuda())
    }
}

/// `act(conv(bias) (+ residual))` for a convolution `conv` given the bias
/// it should add itself (or `None`), the residual nearest-upsampled 2×
/// first when `upsampled`. On CUDA a biased convolution runs without its
/// bias and [`epilogue`] adds bias and residual and applies the ReLU in one
/// pass; elsewhere torchvision's own ops run (bias inside the convolution,
/// then upsample and add, then ReLU), keeping CPU results identical.
fn conv_epilogue(
    conv: impl FnOnce(Option<&Tensor>) -> Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    upsampled: bool,
    relu: bool,
    cuda: bool,
) -> Tensor {
    if let (true, Some(shift)) = (cuda, bias) {
        let e = Epilogue { residual, residual_upsampled: upsampled, relu, ..Epilogue::affine(None, shift) };
        return epilogue(&conv(None), &e);
    }
    let y = conv(bias);
    let y = match residual {
        Some(r) if upsampled => &y + upsampled_like(r, &y),
        Some(r) => y + r,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        y
    }
}

/// `act(y·scale + shift + (residual·rscale + rshift))` per [`Epilogue`]
/// for `y` `[N, C, H, W]`: one fused kernel on CUDA
/// (`kernels::epilogue`), the same arithmetic in tensor ops elsewhere
/// (torchvision's: equal results). Differentiable for `y`, the residual
/// and a trainable shift; the output has `y`'s dtype.
pub fn epilogue(y: &Tensor, e: &Epilogue) -> Tensor {
    if y.device().is_cuda() {
        if let Some(out) = crate::kernels::epilogue::apply(y, e) {
            return out;
        }
    }
    let per_channel = |t: &Tensor| t.reshape([1, -1, 1, 1]);
    let affine = |x: &Tensor, scale: Option<&Tensor>, shift: &Tensor| match scale {
        Some(s) => x * per_channel(s) + per_channel(shift),
        None => x + per_channel(shift),
    };
    let mut out = affine(y, e.scale, e.shift);
    let upsampled = e.residual.filter(|_| e.residual_upsampled).map(|r| upsampled_like(r, y));
    if let Some(r) = upsampled.as_ref().or(e.residual) {
        out = match e.residual_affine {
            Some((s, b)) => out + affine(r, Some(s), b),
            None => out + r,
        };
    }
    let out = if e.relu { out.relu() } else { out };
    out.to_kind(y.kind())
}

/// `relu(norm(conv(x)))`; with fixed statistics normalization and ReLU are
/// one epilogue.
pub fn conv_norm_relu(conv: &Conv2d, norm: &Norm, x: &Tensor, train: bool) -> Tensor {
    match norm.fixed_affine(train) {
        Some((scale, shift)) => {
            let e = Epilogue { relu: true, ..Epilogue::affine(Some(&scale), &shift) };
            epilogue(&conv.forward(x), &e)
        }
        None => norm.forward(&conv.forward(x), train).relu(),
    }
}

/// Transposed 2-D convolution, weight `[in, out, k, k]`, bias `[out]`.
#[derive(Debug)]
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: i64,
}

/// A `k`×`k`, stride-`stride` transposed convolution at `p`.
pub fn conv_transpose2d(p: &Path, cin: i64, cout: i64, k: i64, stride: i64, init: Init) -> ConvTranspose2d {
    ConvTranspose2d {
        weight: p.var("weight", &[cin, cout, k, k], init),
        bias: p.var("bias", &[cout], Init::Const(0.0)),
        stride,
    }
}

impl ConvTranspose2d {
    /// `[N, in, H, W]` → `[N, out, H*stride, W*stride]` (for k == stride).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_act(x, false)
    }

    /// The same followed by a ReLU when `relu` (see [`conv_epilogue`]).
    pub fn forward_act(&self, x: &Tensor, relu: bool) -> Tensor {
        let conv = |bias: Option<&Tensor>| {
            x.conv_transpose2d(&self.weight, bias, [self.stride, self.stride], [0, 0], [0, 0], 1, [1, 1])
        };
        conv_epilogue(conv, Some(&self.bias), None, false, relu, x.device().is_cuda())
    }
}

/// Fully connected layer, weight `[out, in]`, bias `[out]`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

/// A linear layer at `p`, initialized as `torch.nn.Linear` unless `init` says otherwise.
pub fn linear(p: &Path, cin: i64, cout: i64, init: Option<(Init, Init)>) -> Linear {
    let bound = 1.0 / (cin as f64).sqrt();
    let (w_init, b_init) =
        init.unwrap_or((Init::Uniform { lo: -bound, up: bound }, Init::Uniform { lo: -bound, up: bound }));
    Linear { weight: p.var("weight", &[cout, cin], w_init), bias: p.var("bias", &[cout], b_init) }
}

impl Linear {
    /// `[N, in]` → `[N, out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }

    /// `x` `[N, C, H, W]` flattened in torchvision's (C, H, W) order →
    /// `[N, out]`. On channels-last `x` the weight's columns are put in
    /// (H, W, C) order instead and `x` is flattened as it lies: a copy of
    /// the weight per call rather than of the (much larger) pooled
    /// features.
    pub fn forward_flattened(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        if crate::kernels::is_channels_last(x) && !x.is_contiguous() {
            let (n, c, h, w) = (size[0], size[1], size[2], size[3]);
            let weight = self.weight.reshape([-1, c, h, w]).permute([0, 2, 3, 1]).reshape([-1, c * h * w]);
            return x.permute([0, 2, 3, 1]).reshape([n, -1]).linear(&weight, Some(&self.bias));
        }
        self.forward(&x.flatten(1, -1))
    }
}

/// BatchNorm with fixed statistics and affine parameters, as torchvision's
/// `FrozenBatchNorm2d` (eps 1e-5). All four tensors are buffers.
#[derive(Debug)]
pub struct FrozenBatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f64,
    folded: FoldedStatistics,
}

/// A frozen BN over `c` channels at `p`, initialized to the identity.
pub fn frozen_batch_norm2d(p: &Path, c: i64) -> FrozenBatchNorm2d {
    FrozenBatchNorm2d {
        weight: p.ones_no_train("weight", &[c]),
        bias: p.zeros_no_train("bias", &[c]),
        running_mean: p.zeros_no_train("running_mean", &[c]),
        running_var: p.ones_no_train("running_var", &[c]),
        eps: 1e-5,
        folded: FoldedStatistics::default(),
    }
}

impl FrozenBatchNorm2d {
    /// `[N, C, H, W]` → same shape: `x * scale + shift` with torchvision's
    /// arithmetic (`scale = w * rsqrt(var + eps)`, `shift = b - mean * scale`).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (scale, shift) =
            self.folded.get(x.kind(), [&self.weight, &self.bias, &self.running_mean, &self.running_var], self.eps);
        x * scale + shift
    }
}

/// `[1, C, 1, 1]` scale and shift of a normalization with fixed statistics
/// per dtype, computed once and again only when a tensor behind them
/// changes (libtorch's version counters): a frozen BN costs two kernels
/// per call instead of eight.
#[derive(Debug, Default)]
struct FoldedStatistics {
    /// One entry per dtype asked for.
    cached: std::sync::Mutex<Vec<Folded>>,
}

/// Scale and shift in one dtype, for the version counters of weight, bias,
/// mean and variance they were computed from.
#[derive(Debug)]
struct Folded {
    kind: Kind,
    versions: [i64; 4],
    scale: Tensor,
    shift: Tensor,
}

impl FoldedStatistics {
    /// `(scale, shift)` of `[weight, bias, mean, var]` in `kind`.
    fn get(&self, kind: Kind, t: [&Tensor; 4], eps: f64) -> (Tensor, Tensor) {
        let versions = t.map(crate::shim::tensor_version);
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cached.iter().find(|f| f.kind == kind && f.versions == versions && !versions.contains(&-1)) {
            return (f.scale.shallow_clone(), f.shift.shallow_clone());
        }
        let (scale, shift) = tch::no_grad(|| scale_and_shift(kind, t[0], t[1], t[2], t[3], eps));
        cached.retain(|f| f.kind != kind);
        cached.push(Folded { kind, versions, scale: scale.shallow_clone(), shift: shift.shallow_clone() });
        (scale, shift)
    }
}

/// `x * scale + shift` per channel with `scale = w * rsqrt(var + eps)`,
/// `shift = b - mean * scale`: torchvision's FrozenBatchNorm2d arithmetic,
/// also what BatchNorm computes in eval mode (so a BN model and its frozen
/// copy give identical inference).
fn normalize_with_statistics(x: &Tensor, w: &Tensor, b: &Tensor, mean: &Tensor, var: &Tensor, eps: f64) -> Tensor {
    let (scale, shift) = scale_and_shift(x.kind(), w, b, mean, var, eps);
    x * scale + shift
}

/// `[1, C, 1, 1]` `scale = w * rsqrt(var + eps)` and `shift = b - mean *
/// scale` in `kind`.
fn scale_and_shift(kind: Kind, w: &Tensor, b: &Tensor, mean: &Tensor, var: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let scale = w * (var + eps).rsqrt();
    let shift = b - mean * &scale;
    (scale.reshape([1, -1, 1, 1]).to_kind(kind), shift.reshape([1, -1, 1, 1]).to_kind(kind))
}

/// Ordinary BatchNorm (`torch.nn.BatchNorm2d`, eps 1e-5, momentum 0.1):
/// trainable affine parameters, running statistics as buffers.
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// The backbone's normalization layer, per `model.norm`.
#[derive(Debug)]
pub enum Norm {
    Frozen(FrozenBatchNorm2d),
    Batch(BatchNorm2d),
}

/// A normalization layer over `c` channels at `p`. `trainable` only matters
/// for [`NormKind::Bn`](crate::config::NormKind::Bn) (frozen stages keep
/// their BN fixed as well).
pub fn norm(p: &Path, c: i64, kind: crate::config::NormKind, trainable: bool) -> Norm {
    match kind {
        // `Auto` is resolved by `Config::norm_kind` before models are built.
        crate::config::NormKind::FrozenBn | crate::config::NormKind::Auto => Norm::Frozen(frozen_batch_norm2d(p, c)),
        crate::config::NormKind::Bn => Norm::Batch(BatchNorm2d {
            weight: param(p, "weight", &[c], Init::Const(1.0), trainable),
            bias: param(p, "bias", &[c], Init::Const(0.0), trainable),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
        }),
    }
}

impl Norm {
    /// The per-channel float32 `[C]` `(scale, shift)` that this layer
    /// applies (`x * scale + shift`) when its statistics are fixed: frozen
    /// BN always, BatchNorm outside training. `None` for BatchNorm in
    /// training (batch statistics).
    pub fn fixed_affine(&self, train: bool) -> Option<(Tensor, Tensor)> {
        let (scale, shift) = match self {
            Norm::Frozen(bn) => {
                bn.folded.get(Kind::Float, [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var], bn.eps)
            }
            Norm::Batch(bn) if train && bn.weight.requires_grad() => return None,
            Norm::Batch(bn) => {
                scale_and_shift(Kind::Float, &bn.weight, &bn.bias, &bn.running_mean, &bn.running_var, 1e-5)
            }
        };
        Some((scale.reshape([-1]), shift.reshape([-1])))
    }

    /// [`forward`](Self::forward) in training where only some rows of the
    /// batch count: a trainable BatchNorm takes its statistics from (and
    /// updates its running ones with) the rows `n` of `x` `[N, C, H, W]`
    /// weighted by `rows` `[N]` (1 counted, 0 not: the padding slots of
    /// static shapes), exactly as a BatchNorm over the counted rows alone;
    /// every row is normalized with them. Other norms ignore `rows`.
    pub fn forward_rows(&self, x: &Tensor, rows: &Tensor) -> Tensor {
        let Norm::Batch(bn) = self else { return self.forward(x, true) };
        if !bn.weight.requires_grad() {
            return self.forward(x, true);
        }
        let (n, c) = (x.size()[0], x.size()[1]);
        // H·W values per row and channel.
        let per_row = (x.numel() as i64 / (n * c).max(1)) as f64;
        // In float32, as torch's CUDA BatchNorm (float64 here changed the
        // gradients by less than their float32 error, see train_parity).
        let xf = x.to_kind(Kind::Float);
        let rows = rows.to_kind(Kind::Float);
        let weights = rows.reshape([-1, 1, 1, 1]);
        let count = rows.sum(Kind::Float) * per_row;
        let denominator = count.clamp_min(1.0);
        let channel_sum = |t: &Tensor| (t * &weights).sum_dim_intlist([0, 2, 3].as_slice(), false, Kind::Float);
        let mean = channel_sum(&xf) / &denominator;
        let centered = &xf - mean.reshape([1, -1, 1, 1]);
        let var = channel_sum(&centered.square()) / &denominator;
        let scale = (&var + 1e-5).rsqrt() * &bn.weight;
        let y = centered * scale.reshape([1, -1, 1, 1]) + bn.bias.reshape([1, -1, 1, 1]);
        // Running statistics (momentum 0.1, unbiased variance), unchanged
        // when no row counts: no host sync either way.
        tch::no_grad(|| {
            let counted = count.gt(0.0);
            let unbiased = &var * &count / (&count - 1.0).clamp_min(1.0);
            for (running, batch) in [(&bn.running_mean, &mean), (&bn.running_var, &unbiased)] {
                let updated = running * 0.9 + batch.detach().to_kind(running.kind()) * 0.1;
                running.shallow_clone().copy_(&updated.where_self(&counted, running));
            }
        });
        y.to_kind(x.kind())
    }

    /// `[N, C, H, W]` → same shape. In training, BatchNorm uses (and updates)
    /// batch statistics; FrozenBatchNorm never does.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Frozen(bn) => bn.forward(x),
            Norm::Batch(bn) if train && bn.weight.requires_grad() => Tensor::batch_norm(
                x,
                Some(&bn.weight),
                Some(&bn.bias),
                Some(&bn.running_mean),
                Some(&bn.running_var),
                true,
                0.1,
                1e-5,
                true,
            ),
            Norm::Batch(bn) => {
                normalize_with_statistics(x, &bn.weight, &bn.bias, &bn.running_mean, &bn.running_var, 1e-5)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    /// BatchNorm over the counted rows of a batch equals torch's BatchNorm
    /// over those rows alone: outputs, input and affine gradients, running
    /// statistics; uncounted rows, whose outputs the loss ignores, get no
    /// gradient.
    #[test]
    fn row_weighted_batch_norm_equals_batch_norm_of_the_counted_rows() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let layer = norm(&vs.root(), 6, crate::config::NormKind::Bn, true);
        let Norm::Batch(bn) = &layer else { unreachable!() };
        tch::no_grad(|| {
            bn.weight.shallow_clone().copy_(&(Tensor::rand([6], (Kind::Float, Device::Cpu)) + 0.5));
            bn.bias.shallow_clone().copy_(&Tensor::randn([6], (Kind::Float, Device::Cpu)));
        });
        let x = (Tensor::randn([10, 6, 5, 5], (Kind::Float, Device::Cpu)) * 3.0 + 1.0).set_requires_grad(true);
        let rows = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]);
        let counted = rows.nonzero().squeeze_dim(1);
        // Uncounted rows' outputs do not reach the loss (the heads' padding).
        let upstream = Tensor::randn([10, 6, 5, 5], (Kind::Float, Device::Cpu)) * rows.reshape([-1, 1, 1, 1]);
        let ours = layer.forward_rows(&x, &rows);
        (&ours * &upstream).sum(Kind::Float).backward();
        let (our_grad, our_gamma, our_beta) = (x.grad().copy(), bn.weight.grad().copy(), bn.bias.grad().copy());
        let our_running = (bn.running_mean.copy(), bn.running_var.copy());
        // The reference: torch's BatchNorm on the counted rows only.
        let (rm, rv) = (Tensor::zeros([6], (Kind::Float, Device::Cpu)), Tensor::ones([6], (Kind::Float, Device::Cpu)));
        let weight = bn.weight.detach().copy().set_requires_grad(true);
        let bias = bn.bias.detach().copy().set_requires_grad(true);
        let xs = x.detach().index_select(0, &counted).set_requires_grad(true);
        let theirs = Tensor::batch_norm(&xs, Some(&weight), Some(&bias), Some(&rm), Some(&rv), true, 0.1, 1e-5, true);
        (&theirs * upstream.index_select(0, &counted)).sum(Kind::Float).backward();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d <= 1e-5, "{what}: max |Δ| {d}");
        };
        close(&ours.index_select(0, &counted), &theirs, "output");
        close(&our_grad.index_select(0, &counted), &xs.grad(), "input gradient");
        assert_eq!(our_grad.index_select(0, &rows.eq(0.0).nonzero().squeeze_dim(1)).abs().max().double_value(&[]), 0.0);
        close(&our_gamma, &weight.grad(), "weight gradient");
        close(&our_beta, &bias.grad(), "bias gradient");
        close(&our_running.0, &rm, "running mean");
        close(&our_running.1, &rv, "running variance");
    }
}
