//! SGD with momentum and weight decay, in two parameter groups (weights;
//! biases with their own LR factor and decay, as the seed's recipe), updated
//! by libtorch's fused multi-tensor SGD kernel (`torch._fused_sgd_`, what
//! `torch.optim.SGD(fused=True)` runs).

use crate::shim::{fused_sgd, ShimError};
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::Tensor;

/// One group of parameters sharing LR factor and weight decay.
#[derive(Debug)]
struct Group {
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Momentum buffers, allocated at the first step.
    bufs: Vec<Tensor>,
    lr_factor: f64,
    weight_decay: f64,
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
        let mut weights = Group { names: vec![], params: vec![], bufs: vec![], lr_factor: 1.0, weight_decay };
        let mut biases = Group {
            names: vec![],
            params: vec![],
            bufs: vec![],
            lr_factor: bias_lr_factor,
            weight_decay: bias_weight_decay,
        };
        for (name, t) in vars {
            let g = if name.ends_with(".bias") { &mut biases } else { &mut weights };
            g.names.push(name);
            g.params.push(t);
        }
        Sgd { groups: vec![weights, biases], momentum, steps: 0 }
    }

    /// Every trainable parameter's gradient (defined ones).
    pub fn grads(&self) -> Vec<Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter().map(|p| p.grad())).filter(|g| g.defined()).collect()
    }

    /// One update at learning rate `lr`; skipped on the device when
    /// `found_inf` holds a nonzero value. Parameters without a gradient are
    /// left alone.
    pub fn step(&mut self, lr: f64, found_inf: Option<&Tensor>) -> Result<(), ShimError> {
        let first = self.steps == 0;
        for g in &mut self.groups {
            if g.params.is_empty() {
                continue;
            }
            if g.bufs.is_empty() {
                g.bufs = g.params.iter().map(|p| p.zeros_like()).collect();
            }
            let grads: Vec<Tensor> = g.params.iter().map(|p| p.grad()).collect();
            let live: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined()).collect();
            let params: Vec<&Tensor> = live.iter().map(|&i| &g.params[i]).collect();
            let gr: Vec<&Tensor> = live.iter().map(|&i| &grads[i]).collect();
            let bufs: Vec<&Tensor> = live.iter().map(|&i| &g.bufs[i]).collect();
            tch::no_grad(|| {
                fused_sgd(&params, &gr, &bufs, g.weight_decay, self.momentum, lr * g.lr_factor, first, None, found_inf)
            })?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for p in &mut g.params {
                p.zero_grad();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`
    /// (on the device, no sync).
    pub fn clip_grad_norm(&self, max_norm: f64) {
        let grads = self.grads();
        if grads.is_empty() {
            return;
        }
        let sq: Vec<Tensor> =
            grads.iter().map(|g| g.to_kind(tch::Kind::Float).square().sum(tch::Kind::Float)).collect();
        let total = Tensor::stack(&sq, 0).sum(tch::Kind::Float).sqrt();
        let coef = (total + 1e-6).reciprocal().g_mul_scalar(max_norm).clamp_max(1.0);
        tch::no_grad(|| {
            for g in &grads {
                let _ = g.shallow_clone().g_mul_(&coef.to_kind(g.kind()));
            }
        });
    }

    /// Momentum buffers by parameter name (empty before the first step).
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
            if steps > 0 {
                g.bufs = bufs;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
