//! Nearest-neighbour upsampling by integer factors and its backward (`shaders/upsample.wgsl`).

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{groups_for, u32_of, PAR_MIN};
use crate::shaders::UPSAMPLE;
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct UpsampleParams {
    pub n: u32,
    pub h: u32,
    pub w: u32,
    pub fh: u32,
    pub fw: u32,
    pub _pad: [u32; 3],
}

impl Tensor {
    /// `F.interpolate(x, scale_factor=2, mode="nearest")`: (N, C, H, W) -> (N, C, 2H, 2W).
    pub fn upsample_nearest2x(&self) -> Result<Tensor> {
        self.upsample_nearest(2, 2)
    }

    /// Nearest upsampling by integer factors: (N, C, H, W) -> (N, C, H * fh, W * fw),
    /// `y[.., oy, ox] = x[.., oy / fh, ox / fw]`. Differentiable (`upsample_nearest_backward`).
    pub fn upsample_nearest(&self, fh: usize, fw: usize) -> Result<Tensor> {
        let out = self.upsample_nearest_raw(fh, fw)?;
        Ok(crate::autograd::record("upsample_nearest", out, &[self], move |g, _| {
            Ok(vec![Some(g.upsample_nearest_backward(fh, fw)?)])
        }))
    }

    /// The adjoint of `upsample_nearest`: `self` is dY (N, C, H * fh, W * fw) -> dX (N, C, H, W),
    /// each element the sum of its fh x fw block.
    pub fn upsample_nearest_backward(&self, fh: usize, fw: usize) -> Result<Tensor> {
        const OP: &str = "upsample_nearest backward";
        self.ensure_f32(OP)?;
        let &[n, c, oh, ow] = self.shape() else {
            return Err(Error::shape(OP, format!("dy {:?} must be (N, C, H * fh, W * fw)", self.shape())));
        };
        if fh == 0 || fw == 0 || oh % fh != 0 || ow % fw != 0 {
            return Err(Error::shape(
                OP,
                format!("dy {:?} is not divisible into blocks of the factors ({fh}, {fw})", self.shape()),
            ));
        }
        let (h, w) = (oh / fh, ow / fw);
        let shape = [n, c, h, w];
        let total = n * c * h * w;
        match self.device() {
            Device::Cpu => {
                let dy = self.cpu_f32(OP)?;
                let mut dx = vec![0.0f32; total];
                if total == 0 {
                    return Ok(Tensor::cpu(dx, &shape));
                }
                // One input row (nc, iy) at a time, from its fh rows of dy.
                let row = |r: usize, o: &mut [f32]| {
                    let block = &dy[r * fh * ow..][..fh * ow];
                    for src in block.chunks(ow) {
                        for (v, b) in o.iter_mut().zip(src.chunks(fw)) {
                            *v += b.iter().sum::<f32>();
                        }
                    }
                };
                if total * fh * fw >= PAR_MIN {
                    use rayon::prelude::*;
                    dx.par_chunks_mut(w).enumerate().for_each(|(r, o)| row(r, o));
                } else {
                    dx.chunks_mut(w).enumerate().for_each(|(r, o)| row(r, o));
                }
                Ok(Tensor::cpu(dx, &shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &shape)?;
                u32_of(OP, self.numel())?;
                let params = UpsampleParams {
                    n: u32_of(OP, total)?,
                    h: u32_of(OP, h)?,
                    w: u32_of(OP, w)?,
                    fh: u32_of(OP, fh)?,
                    fw: u32_of(OP, fw)?,
                    _pad: [0; 3],
                };
                let bufs = [self.gpu_buf(OP)?, out.gpu_buf(OP)?];
                ctx.dispatch(&UPSAMPLE, "backward", &params, &bufs, groups_for(&ctx, total))?;
                Ok(out)
            }
        }
    }

    fn upsample_nearest_raw(&self, fh: usize, fw: usize) -> Result<Tensor> {
        const OP: &str = "upsample_nearest";
        self.ensure_f32(OP)?;
        let &[n, c, h, w] = self.shape() else {
            return Err(Error::shape(OP, format!("input {:?} must be (N, C, H, W)", self.shape())));
        };
        if fh == 0 || fw == 0 {
            return Err(Error::shape(OP, format!("factors ({fh}, {fw}) must be positive")));
        }
        let (oh, ow) = (h * fh, w * fw);
        let shape = [n, c, oh, ow];
        let total = n * c * oh * ow;
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32(OP)?;
                let mut y = vec![0.0f32; total];
                if total == 0 {
                    return Ok(Tensor::cpu(y, &shape));
                }
                // One output row (nc, oy) at a time, from input row (nc, oy / fh).
                let row = |r: usize, o: &mut [f32]| {
                    let (nc, oy) = (r / oh, r % oh);
                    let src = &x[(nc * h + oy / fh) * w..][..w];
                    for (chunk, &v) in o.chunks_mut(fw).zip(src) {
                        chunk.fill(v);
                    }
                };
                if total >= PAR_MIN {
                    use rayon::prelude::*;
                    y.par_chunks_mut(ow).enumerate().for_each(|(r, o)| row(r, o));
                } else {
                    y.chunks_mut(ow).enumerate().for_each(|(r, o)| row(r, o));
                }
                Ok(Tensor::cpu(y, &shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &shape)?;
                let params = UpsampleParams {
                    n: u32_of(OP, total)?,
                    h: u32_of(OP, h)?,
                    w: u32_of(OP, w)?,
                    fh: u32_of(OP, fh)?,
                    fw: u32_of(OP, fw)?,
                    _pad: [0; 3],
                };
                ctx.dispatch(
                    &UPSAMPLE,
                    "main",
                    &params,
                    &[self.gpu_buf(OP)?, out.gpu_buf(OP)?],
                    groups_for(&ctx, total),
                )?;
                Ok(out)
            }
        }
    }
}
