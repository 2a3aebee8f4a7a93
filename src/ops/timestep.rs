//! Sinusoidal timestep embedding (`shaders/timestep.wgsl`), diffusers' `get_timestep_embedding`
//! with scale 1. It has no gradient: timesteps are inputs, not learned.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{groups_for, par_fill, u32_of};
use crate::shaders::TIMESTEP;
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TimestepParams {
    pub n: u32,
    pub dim: u32,
    pub half: u32,
    pub flip: u32,
    pub zero: u32,
    pub _pad: [u32; 3],
}

/// The `half` frequencies with PyTorch's f32 steps:
/// `exp(f32(-ln(max_period)) * j / f32(half - shift))`.
fn frequencies(half: usize, downscale_freq_shift: f32, max_period: f32) -> Vec<f32> {
    let scale = -(max_period as f64).ln() as f32;
    let denom = (half as f64 - downscale_freq_shift as f64) as f32;
    (0..half).map(|j| (scale * j as f32 / denom).exp()).collect()
}

impl Tensor {
    /// `timesteps` (N) -> (N, dim): `[sin(t f_j) | cos(t f_j)]` with
    /// `f_j = exp(-ln(max_period) * j / (dim/2 - downscale_freq_shift))`, the halves swapped
    /// when `flip_sin_to_cos`, and a zero last column when `dim` is odd.
    /// Frequencies and arguments are rounded to f32 as in PyTorch; sin/cos are then accurate
    /// to ~1e-7 on both devices (the GPU reduces arguments itself).
    /// No gradient by design (timesteps are inputs, not learned): the output never records an
    /// autograd node, even for a `timesteps` tensor that requires grad.
    pub fn timestep_embedding(
        timesteps: &Tensor,
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
        max_period: f32,
    ) -> Result<Tensor> {
        const OP: &str = "timestep_embedding";
        timesteps.ensure_f32(OP)?;
        let &[n] = timesteps.shape() else {
            return Err(Error::shape(OP, format!("timesteps {:?} must be 1-D (N,)", timesteps.shape())));
        };
        let half = dim / 2;
        let freq = frequencies(half, downscale_freq_shift, max_period);
        let shape = [n, dim];
        match timesteps.device() {
            Device::Cpu => {
                let t = timesteps.cpu_f32(OP)?;
                let mut y = vec![0.0f32; n * dim];
                par_fill(&mut y, |i| {
                    let (row, j) = (i / dim, i % dim);
                    if j >= 2 * half {
                        return 0.0;
                    }
                    let a = (t[row] * freq[j % half]) as f64;
                    if (j >= half) != flip_sin_to_cos {
                        a.cos() as f32
                    } else {
                        a.sin() as f32
                    }
                });
                Ok(Tensor::cpu(y, &shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &shape)?;
                let total = n * dim;
                let params = TimestepParams {
                    n: u32_of(OP, total)?,
                    dim: u32_of(OP, dim)?,
                    half: u32_of(OP, half)?,
                    flip: flip_sin_to_cos as u32,
                    zero: 0,
                    _pad: [0; 3],
                };
                let f = Tensor::from_vec(freq, &[half], &timesteps.device())?;
                ctx.dispatch(
                    &TIMESTEP,
                    "main",
                    &params,
                    &[timesteps.gpu_buf(OP)?, f.gpu_buf(OP)?, out.gpu_buf(OP)?],
                    groups_for(&ctx, total),
                )?;
                Ok(out)
            }
        }
    }
}
