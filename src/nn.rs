//! Layers shared by the model families, each built from the checkpoint keys under a prefix
//! (`Linear::load(&vb.pp("to_q"), ..)` reads `<prefix>.to_q.weight`), so a key mismatch
//! shows up by reading, and a missing or wrongly shaped key is an error naming it.

use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::ops::conv2d::ConvAdd;
use crate::params::{Param, ParamPath};
use crate::tensor::Tensor;
use crate::train::lora::{lora_is_off, LoraAdapter};

/// Where a `Linear`'s adapter sits; clones of a model share it, so attaching an adapter to
/// one reaches every copy.
pub type LoraSlot = Arc<RwLock<Option<LoraAdapter>>>;

/// `y = x W^T + b`; weight (out, in), bias (out); plus an optional LoRA adapter.
#[derive(Clone)]
pub struct Linear {
    pub weight: Arc<Param>,
    pub bias: Option<Arc<Param>>,
    pub lora: LoraSlot,
}

impl Linear {
    pub fn load(vb: &ParamPath, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: vb.get_shaped("weight", &[out_dim, in_dim])?,
            bias: if bias { Some(vb.get_shaped("bias", &[out_dim])?) } else { None },
            lora: LoraSlot::default(),
        })
    }

    /// The adapter, when one is attached, enabled, and not switched off on this thread.
    pub fn active_lora(&self) -> Option<LoraAdapter> {
        if lora_is_off() {
            return None;
        }
        let slot = self.lora.read().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().filter(|a| a.state.is_enabled()).cloned()
    }

    /// x (..., in) -> (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None)
    }

    /// `forward(x) + residual`, residual (..., out); the bias and the residual are added as
    /// the matmul writes its output.
    pub fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let b = self.bias.as_ref().map(|b| b.value());
        // A frozen weight stored in f16 is read as f16 by the kernel (no f32 copy).
        let y = x.linear(&self.weight.weight_value(), b.as_ref(), residual)?;
        // The adapter's delta last: at B = 0 it is exactly zero and the policy's output is the
        // reference's to the bit (Diffusion-DPO's first logit is then exactly 0).
        match self.active_lora() {
            Some(a) => y.add(&a.delta(x)?),
            None => Ok(y),
        }
    }
}

/// 2-D convolution with its stride and padding; weight (out, in, kh, kw), bias (out).
#[derive(Clone)]
pub struct Conv2d {
    pub weight: Arc<Param>,
    pub bias: Option<Arc<Param>>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn load(
        vb: &ParamPath,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: vb.get_shaped("weight", &[cout, cin, kernel, kernel])?,
            bias: Some(vb.get_shaped("bias", &[cout])?),
            stride,
            padding,
        })
    }

    /// x (N, in, H, W) -> (N, out, OH, OW).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, ConvAdd::default())
    }

    /// `forward(x)` plus a per-image bias and/or a residual, added as the output is written.
    pub fn forward_add(&self, x: &Tensor, add: ConvAdd) -> Result<Tensor> {
        let b = self.bias.as_ref().map(|b| b.value());
        let (s, p) = ((self.stride, self.stride), (self.padding, self.padding));
        x.conv2d_add(&self.weight.weight_value(), b.as_ref(), s, p, add)
    }
}

/// Group norm with affine weight and bias (C).
#[derive(Clone)]
pub struct GroupNorm {
    pub weight: Arc<Param>,
    pub bias: Arc<Param>,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(vb: &ParamPath, groups: usize, channels: usize, eps: f32) -> Result<GroupNorm> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Invalid(format!(
                "{}: {channels} channels do not split into {groups} groups",
                vb.prefix()
            )));
        }
        Ok(GroupNorm {
            weight: vb.get_shaped("weight", &[channels])?,
            bias: vb.get_shaped("bias", &[channels])?,
            groups,
            eps,
        })
    }

    /// x (N, C, *spatial).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.group_norm(self.groups, Some(&self.weight.value()), Some(&self.bias.value()), self.eps)
    }

    /// `silu(forward(x))` as one fused op; x (N, C, *spatial).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        x.group_norm_silu(self.groups, Some(&self.weight.value()), Some(&self.bias.value()), self.eps)
    }
}

/// Layer norm over the last axis with affine weight and bias (C).
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Arc<Param>,
    pub bias: Arc<Param>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(vb: &ParamPath, channels: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: vb.get_shaped("weight", &[channels])?, bias: vb.get_shaped("bias", &[channels])?, eps })
    }

    /// x (..., C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.weight.value()), Some(&self.bias.value()), self.eps)
    }
}

/// diffusers' `Attention` (to_q, to_k, to_v, to_out.0): multi-head attention of `hidden`
/// over itself or over a `context` (cross-attention).
#[derive(Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
}

impl Attention {
    /// `query_dim` = hidden channels, `context_dim` = cross-attention width (= query_dim for
    /// self-attention), `heads * dim_head` = inner width.
    pub fn load(
        vb: &ParamPath,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
    ) -> Result<Attention> {
        let inner = heads * dim_head;
        Ok(Attention {
            to_q: Linear::load(&vb.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(&vb.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// hidden (B, L, C), context (B, Lc, Cc) or None -> (B, L, C).
    pub fn forward(&self, hidden: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_add(hidden, context, None)
    }

    /// `forward(hidden, context) + residual` (B, L, C), the residual added by `to_out`.
    pub fn forward_add(&self, hidden: &Tensor, context: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(hidden);
        let q = self.to_q.forward(hidden)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let (b, l, inner) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let d = inner / self.heads;
        // (B, L, heads * d) -> (B, heads, L, d)
        let split = |t: &Tensor| -> Result<Tensor> {
            let lt = t.shape()[1];
            t.reshape_to(&[b, lt, self.heads, d])?.permute(&[0, 2, 1, 3])
        };
        let o = split(&q)?.attention(&split(&k)?, &split(&v)?, None)?; // (B, heads, L, d)
        let o = o.permute(&[0, 2, 1, 3])?.reshape_to(&[b, l, inner])?;
        self.to_out.forward_add(&o, residual)
    }
}

/// diffusers' `ResnetBlock2D`: GN, SiLU, 3x3 conv, (+ time embedding), GN, SiLU, 3x3 conv,
/// plus the input (through a 1x1 `conv_shortcut` when the channels change).
#[derive(Clone)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f32,
}

impl ResnetBlock2D {
    /// `temb_channels`: width of the time embedding (None in the VAE).
    pub fn load(
        vb: &ParamPath,
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f32,
    ) -> Result<ResnetBlock2D> {
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: temb_channels.map(|t| Linear::load(&vb.pp("time_emb_proj"), t, cout, true)).transpose()?,
            norm2: GroupNorm::load(&vb.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(&vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: 1.0,
        })
    }

    /// x (N, Cin, H, W), temb (N, T) -> (N, Cout, H, W). The norms are fused with their SiLUs,
    /// the time embedding is added by conv1 and the skip by conv2 as they write their outputs.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&t.silu()?)?; // (N or 1, Cout)
                let (n, c) = (x.shape()[0], t.shape()[1]);
                Some(if t.shape()[0] == n { t } else { t.broadcast_to(&[n, c])? })
            }
            _ => None,
        };
        let h = self.conv1.forward_add(&self.norm1.forward_silu(x)?, ConvAdd { temb: t.as_ref(), residual: None })?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let h = self.norm2.forward_silu(&h)?;
        if self.output_scale_factor == 1.0 {
            self.conv2.forward_add(&h, ConvAdd { temb: None, residual: Some(&skip) })
        } else {
            skip.add(&self.conv2.forward(&h)?)?.mul_scalar(1.0 / self.output_scale_factor)
        }
    }
}
