//! SGD with momentum and weight decay, in two parameter groups (weights;
//! biases with their own LR factor and decay, as the seed's recipe), updated
//! by libtorch's fused multi-tensor SGD kernel (`torch._fused_sgd_`, what
//! `torch.optim.SGD(fused=True)` runs). Nothing here waits for the GPU or
//! loops over parameters with a kernel each: the learning rate lives in a
//! device tensor, gradients are cleared and clipped with multi-tensor
//! kernels, so a step can be captured in a CUDA graph.

use crate::shim::{foreach_mul, foreach_total_norm, foreach_zero, fused_sgd, ShimError};
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::Tensor;

/// One group of parameters sharing LR factor and weight decay.
#[derive(Debug)]
struct Group {
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Momentum buffers (zeros before the first step: `momentum · 0 + g`
    /// is exactly the first step's `buf = g`).
    bufs: Vec<Tensor>,
    lr_factor: f64,
    weight_decay: f64,
    /// `[1]` float32 learning rate of this group, on the parameters' device.
    lr: Tensor,
}

/// The optimizer over the trainable variables of a model.
#[derive(Debug)]
pub struct Sgd {
    groups: Vec<Group>,
    momentum: f64,
    /// Steps taken (the first initializes the momentum buffers).
    pub steps: u64,
}

impl Sgd {
    /// Trainable variables of `vs`, split into weights and biases (names
    /// ending in `.bias`), in name order.
    pub fn new(vs: &VarStore, momentum: f64, weight_decay: f64, bias_lr_factor: f64, bias_weight_decay: f64) -> Sgd {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let lr = || Tensor::zeros([1], (tch::Kind::Float, vs.device()));
        let group = |lr_factor, weight_decay| Group {
            names: vec![],
            params: vec![],
            bufs: vec![],
            lr_factor,
            weight_decay,
            lr: lr(),
        };
        let mut weights = group(1.0, weight_decay);
        let mut biases = group(bias_lr_factor, bias_weight_decay);
        for (name, t) in vars {
            let g = if name.ends_with(".bias") { &mut biases } else { &mut weights };
            g.names.push(name);
            g.bufs.push(t.zeros_like());
            g.params.push(t);
        }
        Sgd { groups: vec![weights, biases], momentum, steps: 0 }
    }

    /// Every trainable parameter's gradient (defined ones).
    pub fn grads(&self) -> Vec<Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter().map(|p| p.grad())).filter(|g| g.defined()).collect()
    }

    /// Sets the learning rate of the next steps (a fill on the device: no
    /// sync; outside a captured step, which reads it).
    pub fn set_lr(&mut self, lr: f64) {
        for g in &mut self.groups {
            let _ = g.lr.fill_(lr * g.lr_factor);
        }
    }

    /// One update at the learning rate of [`Sgd::set_lr`]; skipped on the
    /// device when `found_inf` holds a nonzero value. Parameters without a
    /// gradient are left alone.
    pub fn step(&mut self, found_inf: Option<&Tensor>) -> Result<(), ShimError> {
        for g in &self.groups {
            let grads: Vec<Tensor> = g.params.iter().map(|p| p.grad()).collect();
            let live: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined()).collect();
            if live.is_empty() {
                continue;
            }
            let params: Vec<&Tensor> = live.iter().map(|&i| &g.params[i]).collect();
            let gr: Vec<&Tensor> = live.iter().map(|&i| &grads[i]).collect();
            let bufs: Vec<&Tensor> = live.iter().map(|&i| &g.bufs[i]).collect();
            tch::no_grad(|| {
                fused_sgd(&params, &gr, &bufs, g.weight_decay, self.momentum, &g.lr, false, None, found_inf)
            })?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Sets every gradient to zero (one multi-tensor kernel; the gradient
    /// tensors stay allocated, as a captured step needs).
    pub fn zero_grad(&mut self) -> Result<(), ShimError> {
        let grads = self.grads();
        if grads.is_empty() {
            return Ok(());
        }
        tch::no_grad(|| foreach_zero(&grads.iter().collect::<Vec<_>>()))
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`
    /// (`torch.nn.utils.clip_grad_norm_`, on the device, no sync).
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<(), ShimError> {
        let grads = self.grads();
        if grads.is_empty() {
            return Ok(());
        }
        let refs: Vec<&Tensor> = grads.iter().collect();
        let total = foreach_total_norm(&refs)?;
        let coef = (total + 1e-6).reciprocal().g_mul_scalar(max_norm).clamp_max(1.0);
        tch::no_grad(|| foreach_mul(&refs, &coef))
    }

    /// Momentum buffers by parameter name (zeros before the first step).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.groups.iter().flat_map(|g| g.names.iter().cloned().zip(g.bufs.iter().map(|b| b.shallow_clone()))).collect()
    }

    /// Restores buffers saved by [`Sgd::state`] after `steps` steps.
    pub fn restore(&mut self, state: &BTreeMap<String, Tensor>, steps: u64) -> Result<(), String> {
        for g in &mut self.groups {
            let mut bufs = Vec::with_capacity(g.params.len());
            for (name, p) in g.names.iter().zip(&g.params) {
                match state.get(name) {
                    Some(b) if b.size() == p.size() => {
                        // zeros_like keeps the parameter's memory format.
                        let mut buf = p.zeros_like();
                        tch::no_grad(|| buf.copy_(b));
                        bufs.push(buf)
                    }
                    Some(b) => {
                        return Err(format!("momentum of {name} has shape {:?}, parameter {:?}", b.size(), p.size()))
                    }
                    None if steps == 0 => bufs.push(p.zeros_like()),
                    None => return Err(format!("no momentum buffer for {name}")),
                }
            }
            g.bufs = bufs;
        }
        self.steps = steps;
        Ok(())
    }
}
