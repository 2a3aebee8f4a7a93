//! A small network — conv, group norm, self-attention, linear — on a toy regression: the
//! training engine's end-to-end check and its benchmark (`vipo bench --train`).
//! Parameter names follow diffusers' style so the same store/optimizer code paths run.

use std::sync::Arc;

use crate::device::Device;
use crate::error::Result;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::params::{Param, ParamStore};
use crate::tensor::Tensor;

/// Input channels, output channels, groups and heads of the toy network.
const CIN: usize = 3;
const COUT: usize = 4;
const GROUPS: usize = 4;
const HEADS: usize = 2;

pub struct ToyNet {
    pub store: ParamStore,
    pub channels: usize,
}

impl ToyNet {
    /// Random init (scaled like PyTorch's defaults) from `seed`; `channels` divisible by 4.
    pub fn new(channels: usize, seed: u64, device: &Device) -> Result<ToyNet> {
        let c = channels;
        let mut store = ParamStore::new();
        let mut k = seed;
        let mut rand = |shape: &[usize], fan_in: usize| -> Result<Tensor> {
            k += 1;
            Tensor::randn(shape, k, device)?.mul_scalar(1.0 / (fan_in as f32).sqrt())
        };
        store.insert("conv_in.weight", rand(&[c, CIN, 3, 3], CIN * 9)?, true)?;
        store.insert("conv_in.bias", rand(&[c], CIN * 9)?, true)?;
        store.insert("norm.weight", Tensor::full(1.0, &[c], device)?, true)?;
        store.insert("norm.bias", Tensor::zeros(&[c], device)?, true)?;
        for name in ["to_q", "to_k", "to_v"] {
            store.insert(format!("attn.{name}.weight"), rand(&[c, c], c)?, true)?;
        }
        store.insert("attn.to_out.0.weight", rand(&[c, c], c)?, true)?;
        store.insert("attn.to_out.0.bias", Tensor::zeros(&[c], device)?, true)?;
        store.insert("proj_out.weight", rand(&[COUT, c], c)?, true)?;
        store.insert("proj_out.bias", Tensor::zeros(&[COUT], device)?, true)?;
        Ok(ToyNet { store, channels })
    }

    fn p(&self, name: &str) -> Result<Tensor> {
        Ok(self.store.get(name)?.value())
    }

    /// x (B, 3, H, W) -> (B, 4, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w) = (x.shape()[0], x.shape()[2], x.shape()[3]);
        let (c, hw) = (self.channels, x.shape()[2] * x.shape()[3]);
        let d = c / HEADS;
        let hid = x.conv2d(&self.p("conv_in.weight")?, Some(&self.p("conv_in.bias")?), (1, 1), (1, 1))?;
        let hid = hid.group_norm(GROUPS, Some(&self.p("norm.weight")?), Some(&self.p("norm.bias")?), 1e-5)?.silu()?;
        let tokens = hid.reshape_to(&[b, c, hw])?.permute(&[0, 2, 1])?; // (B, HW, C)
        let heads = |name: &str| -> Result<Tensor> {
            let t = tokens.matmul_t(&self.p(name)?, false, true)?; // (B, HW, C)
            t.reshape_to(&[b, hw, HEADS, d])?.permute(&[0, 2, 1, 3]) // (B, heads, HW, d)
        };
        let (q, k, v) = (heads("attn.to_q.weight")?, heads("attn.to_k.weight")?, heads("attn.to_v.weight")?);
        let a = q.attention(&k, &v, None)?.permute(&[0, 2, 1, 3])?.reshape_to(&[b, hw, c])?;
        let a = a.matmul_t(&self.p("attn.to_out.0.weight")?, false, true)?.add(&self.p("attn.to_out.0.bias")?)?;
        let tokens = tokens.add(&a)?;
        let out = tokens.matmul_t(&self.p("proj_out.weight")?, false, true)?.add(&self.p("proj_out.bias")?)?; // (B, HW, 4)
        out.permute(&[0, 2, 1])?.reshape_to(&[b, COUT, h, w])
    }

    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.forward(x)?.sub(y)?.square()?.mean_all()
    }

    pub fn params(&self) -> Vec<Arc<Param>> {
        self.store.trainable()
    }
}

/// The regression task: inputs and the targets of a fixed "teacher" map, tanh(conv3x3(x)).
pub fn toy_batch(batch: usize, size: usize, seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
    let _g = crate::autograd::no_grad();
    let x = Tensor::randn(&[batch, CIN, size, size], seed, device)?;
    let teacher = Tensor::randn(&[COUT, CIN, 3, 3], 9999, device)?.mul_scalar(0.4)?;
    let y = x.conv2d(&teacher, None, (1, 1), (1, 1))?.tanh()?;
    Ok((x, y))
}

/// One optimizer step; returns the loss before the update and the gradient norm.
pub fn train_step(net: &ToyNet, opt: &mut AdamW, x: &Tensor, y: &Tensor, lr: f32) -> Result<(f32, f32)> {
    let params = net.params();
    crate::optim::zero_grad(&params);
    let loss = net.loss(x, y)?;
    loss.backward()?;
    let norm = clip_grad_norm(&params, 1.0)?;
    opt.step(&params, lr)?;
    Ok((loss.scalar()?, norm))
}

/// The optimizer the toy task trains with.
pub fn toy_optimizer() -> Result<AdamW> {
    // eps well above the noise floor of the gradients: with 1e-8, coordinates whose gradient is
    // ~0 take full-size steps in a direction set by rounding, and runs on two devices drift apart.
    AdamW::new(AdamWConfig { weight_decay: 0.0, eps: 1e-3, ..AdamWConfig::default() })
}
