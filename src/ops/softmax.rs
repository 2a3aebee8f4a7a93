//! Numerically stable softmax over the last axis (`shaders/softmax.wgsl`).

use rayon::prelude::*;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{u32_of, PAR_MIN};
use crate::shaders::SOFTMAX;
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SoftmaxParams {
    pub rows: u32,
    pub cols: u32,
    pub _pad: [u32; 2],
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
                ctx.dispatch(&SOFTMAX, "main", &params, &bufs, ctx.grid(rows as u64))?;
                Ok(out)
            }
        }
    }
}
