//! GEGLU, the feed-forward gate of diffusers' transformer blocks (`shaders/geglu.wgsl`).

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::unary::erf;
use crate::ops::{groups_for, par_fill, u32_of};
use crate::shaders::GEGLU;
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GegluParams {
    pub n: u32,
    pub c: u32,
    pub _pad: [u32; 2],
}

impl Tensor {
    /// `(..., 2C) -> (..., C)`: `h * gelu(g)` with `h, g = x.chunk(2, -1)` (erf GELU).
    pub fn geglu(&self) -> Result<Tensor> {
        let out = self.geglu_raw()?;
        let x = self.detach();
        Ok(crate::autograd::record("geglu", out, &[self], move |g, _| Ok(vec![Some(x.geglu_backward(g)?)])))
    }

    /// Gradient of `geglu` at `self` (..., 2C) for `dy` (..., C).
    pub fn geglu_backward(&self, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "geglu backward";
        self.ensure_f32(OP)?;
        self.same_device(OP, dy)?;
        let two_c = *self.shape().last().ok_or_else(|| Error::shape(OP, "needs at least one dim"))?;
        let c = two_c / 2;
        if dy.numel() * 2 != self.numel() || dy.shape().last() != Some(&c) {
            return Err(Error::shape(OP, format!("dy {:?} for x {:?}", dy.shape(), self.shape())));
        }
        let n = dy.numel();
        match self.device() {
            Device::Cpu => {
                let (x, d) = (self.cpu_f32(OP)?, dy.cpu_f32(OP)?);
                let mut dx = vec![0.0f32; self.numel()];
                use rayon::prelude::*;
                dx.par_chunks_mut(two_c).zip(x.par_chunks(two_c)).zip(d.par_chunks(c)).for_each(|((o, xr), dr)| {
                    for j in 0..c {
                        let (h, g, dyv) = (xr[j] as f64, xr[c + j] as f64, dr[j] as f64);
                        let cdf = 0.5 * (1.0 + erf(g * std::f64::consts::FRAC_1_SQRT_2));
                        let pdf = (-0.5 * g * g).exp() / (2.0 * std::f64::consts::PI).sqrt();
                        o[j] = (dyv * g * cdf) as f32;
                        o[c + j] = (dyv * h * (cdf + g * pdf)) as f32;
                    }
                });
                Ok(Tensor::cpu(dx, self.shape()))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, self.shape())?;
                let params = GegluParams { n: u32_of(OP, n)?, c: u32_of(OP, c)?, _pad: [0; 2] };
                let bufs = [self.gpu_buf(OP)?, out.gpu_buf(OP)?, dy.gpu_buf(OP)?];
                ctx.dispatch(&GEGLU, "backward", &params, &bufs, groups_for(&ctx, n))?;
                Ok(out)
            }
        }
    }

    fn geglu_raw(&self) -> Result<Tensor> {
        const OP: &str = "geglu";
        self.ensure_f32(OP)?;
        let two_c = *self.shape().last().ok_or_else(|| Error::shape(OP, "needs at least one dim"))?;
        if two_c % 2 != 0 {
            return Err(Error::shape(
                OP,
                format!("last dim of {:?} must be even (hidden and gate halves)", self.shape()),
            ));
        }
        let c = two_c / 2;
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = c;
        let n = crate::tensor::numel(&shape);
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32(OP)?;
                let mut y = vec![0.0; n];
                par_fill(&mut y, |i| {
                    let (r, j) = (i / c, i % c);
                    let h = x[r * two_c + j] as f64;
                    let g = x[r * two_c + c + j] as f64;
                    (h * 0.5 * g * (1.0 + erf(g * std::f64::consts::FRAC_1_SQRT_2))) as f32
                });
                Ok(Tensor::cpu(y, &shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &shape)?;
                let params = GegluParams { n: u32_of(OP, n)?, c: u32_of(OP, c)?, _pad: [0; 2] };
                ctx.dispatch(&GEGLU, "main", &params, &[self.gpu_buf(OP)?, out.gpu_buf(OP)?], groups_for(&ctx, n))?;
                Ok(out)
            }
        }
    }
}
