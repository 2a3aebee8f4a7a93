//! Numerically stable softmax over the last axis and its backward (`shaders/softmax.wgsl`).

use rayon::prelude::*;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{u32_of, PAR_MIN};
use crate::shaders::{with_reductions, SOFTMAX, SOFTMAX_SUBGROUP};
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SoftmaxParams {
    pub rows: u32,
    pub cols: u32,
    pub _pad: [u32; 2],
}

/// CPU twin of `backward` for one row, in f64: dx = y * (dy - sum(dy * y)).
fn softmax_backward_row(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let s: f64 = y.iter().zip(dy).map(|(&a, &b)| a as f64 * b as f64).sum();
    for ((o, &a), &b) in dx.iter_mut().zip(y).zip(dy) {
        *o = (a as f64 * (b as f64 - s)) as f32;
    }
}

/// CPU twin for one row: max in f32 (exact), exponentials and their sum in f64.
fn softmax_row(x: &[f32], y: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
    let mut s = 0.0f64;
    for &v in x {
        s += (v as f64 - m).exp();
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o = ((v as f64 - m).exp() / s) as f32;
    }
}

impl Tensor {
    /// `softmax(x, dim=-1)`, subtracting each row's max before `exp`.
    pub fn softmax_last(&self) -> Result<Tensor> {
        let out = self.softmax_last_raw()?;
        let y = out.detach();
        Ok(crate::autograd::record("softmax_last", out, &[self], move |g, _| Ok(vec![Some(y.softmax_backward(g)?)])))
    }

    /// Gradient of `softmax_last` from its output: `self` is y = softmax(x), `dy` shaped like it;
    /// returns `y * (dy - sum(dy * y, -1))`.
    pub fn softmax_backward(&self, dy: &Tensor) -> Result<Tensor> {
        const NAME: &str = "softmax_last backward";
        self.ensure_f32(NAME)?;
        dy.ensure_f32(NAME)?;
        self.same_device(NAME, dy)?;
        if dy.shape() != self.shape() {
            return Err(Error::shape(NAME, format!("dy {:?} for y {:?}", dy.shape(), self.shape())));
        }
        let Some(&cols) = self.shape().last() else {
            return Err(Error::shape(NAME, format!("needs rank >= 1, got shape {:?}", self.shape())));
        };
        let n = self.numel();
        let rows = n.checked_div(cols).unwrap_or(0);
        match self.device() {
            Device::Cpu => {
                let (y, d) = (self.cpu_f32(NAME)?, dy.cpu_f32(NAME)?);
                let mut dx = vec![0.0f32; n];
                if let Some(min_rows) = PAR_MIN.checked_div(cols) {
                    if n >= PAR_MIN {
                        dx.par_chunks_mut(cols)
                            .zip(y.par_chunks(cols).zip(d.par_chunks(cols)))
                            .with_min_len(min_rows.max(1))
                            .for_each(|(o, (yr, dr))| softmax_backward_row(yr, dr, o));
                    } else {
                        dx.chunks_mut(cols)
                            .zip(y.chunks(cols).zip(d.chunks(cols)))
                            .for_each(|(o, (yr, dr))| softmax_backward_row(yr, dr, o));
                    }
                }
                Ok(Tensor::cpu(dx, self.shape()))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, NAME, self.shape())?;
                if n == 0 {
                    return Ok(out);
                }
                let params = SoftmaxParams { rows: u32_of(NAME, rows)?, cols: u32_of(NAME, cols)?, _pad: [0; 2] };
                u32_of(NAME, n)?;
                let bufs = [self.gpu_buf(NAME)?, out.gpu_buf(NAME)?, dy.gpu_buf(NAME)?];
                ctx.dispatch(
                    with_reductions(&ctx, &SOFTMAX, &SOFTMAX_SUBGROUP),
                    "backward",
                    &params,
                    &bufs,
                    ctx.grid(rows as u64),
                )?;
                Ok(out)
            }
        }
    }

    fn softmax_last_raw(&self) -> Result<Tensor> {
        const NAME: &str = "softmax_last";
        self.ensure_f32(NAME)?;
        let Some(&cols) = self.shape().last() else {
            return Err(Error::shape(NAME, format!("needs rank >= 1, got shape {:?}", self.shape())));
        };
        let n = self.numel();
        let rows = n.checked_div(cols).unwrap_or(0);
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32(NAME)?;
                let mut y = vec![0.0f32; n];
                // Empty rows (cols == 0) leave nothing to do.
                if let Some(min_rows) = PAR_MIN.checked_div(cols) {
                    if n >= PAR_MIN {
                        y.par_chunks_mut(cols)
                            .zip(x.par_chunks(cols))
                            .with_min_len(min_rows.max(1))
                            .for_each(|(yr, xr)| softmax_row(xr, yr));
                    } else {
                        y.chunks_mut(cols).zip(x.chunks(cols)).for_each(|(yr, xr)| softmax_row(xr, yr));
                    }
                }
                Ok(Tensor::cpu(y, self.shape()))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, NAME, self.shape())?;
                if n == 0 {
                    return Ok(out);
                }
                let params = SoftmaxParams { rows: u32_of(NAME, rows)?, cols: u32_of(NAME, cols)?, _pad: [0; 2] };
                u32_of(NAME, n)?;
                let bufs = [self.gpu_buf(NAME)?, out.gpu_buf(NAME)?];
                ctx.dispatch(
                    with_reductions(&ctx, &SOFTMAX, &SOFTMAX_SUBGROUP),
                    "main",
                    &params,
                    &bufs,
                    ctx.grid(rows as u64),
                )?;
                Ok(out)
            }
        }
    }
}
