//! GEGLU, the feed-forward gate of diffusers' transformer blocks (`shaders/geglu.wgsl`).

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{fast_exp, groups_for, u32_of, PAR_MIN};
use crate::shaders::GEGLU;
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GegluParams {
    pub n: u32,
    pub c: u32,
    pub _pad: [u32; 2],
}

/// The shaders' erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7) in f32 straight-line
/// arithmetic with [`fast_exp`], so the loops below vectorise (libm's `exp` would not).
#[inline(always)]
fn erf_f32(v: f32) -> f32 {
    let z = v.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * fast_exp(-z * z)).copysign(v)
}

simd_fn! {
    /// GEGLU of rows `x` (rows, 2C) into `y` (rows, C): `h * gelu(g)`, as the shader's `main`.
    fn geglu_rows(x: &[f32], y: &mut [f32], c: usize) {
        for (xr, yr) in x.chunks_exact(2 * c).zip(y.chunks_exact_mut(c)) {
            let (h, g) = xr.split_at(c);
            for ((o, &h), &g) in yr.iter_mut().zip(h).zip(g) {
                *o = h * 0.5 * g * (1.0 + erf_f32(g * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

simd_fn! {
    /// The backward of [`geglu_rows`]: `dx` (rows, 2C) = [dy * gelu(g), dy * h * gelu'(g)].
    fn geglu_grad_rows(x: &[f32], dy: &[f32], dx: &mut [f32], c: usize) {
        let rows = x.chunks_exact(2 * c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(2 * c));
        for ((xr, dr), or) in rows {
            let (h, g) = xr.split_at(c);
            let (oh, og) = or.split_at_mut(c);
            for ((((oh, og), &h), &g), &d) in oh.iter_mut().zip(og.iter_mut()).zip(h).zip(g).zip(dr) {
                let cdf = 0.5 * (1.0 + erf_f32(g * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = fast_exp(-0.5 * g * g) * 0.398_942_3;
                *oh = d * g * cdf;
                *og = d * h * (cdf + g * pdf);
            }
        }
    }
}

/// Rows per parallel task: at least `PAR_MIN` elements each.
fn task_rows(c: usize) -> usize {
    (PAR_MIN / c.max(1)).max(1)
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
                if n > 0 {
                    use rayon::prelude::*;
                    let k = task_rows(c);
                    dx.par_chunks_mut(two_c * k)
                        .zip(x.par_chunks(two_c * k))
                        .zip(d.par_chunks(c * k))
                        .for_each(|((o, xr), dr)| geglu_grad_rows(xr, dr, o, c));
                }
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
                if n > 0 {
                    use rayon::prelude::*;
                    let k = task_rows(c);
                    y.par_chunks_mut(c * k).zip(x.par_chunks(two_c * k)).for_each(|(yr, xr)| geglu_rows(xr, yr, c));
                }
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

#[cfg(test)]
mod tests {
    /// The f32 erf against the f64 one of the same formula, and against erf's own values.
    #[test]
    fn erf_f32_matches_the_f64_formula() {
        let mut worst = 0f64;
        for i in -6000..6000 {
            let v = i as f32 / 1000.0 + 0.000_3;
            let got = super::erf_f32(v) as f64;
            worst = worst.max((got - crate::ops::unary::erf(v as f64)).abs());
        }
        // A few f32 ulp near 1 (the f64 version rounds once at the end).
        assert!(worst < 5e-7, "erf_f32 worst abs difference {worst:e}");
        // erf(1) = 0.8427007929..., erf(-0.5) = -0.5204998778...: within the formula's 1.5e-7 plus the f32 roundings.
        assert!((super::erf_f32(1.0) as f64 - 0.842_700_792_9).abs() < 6e-7);
        assert!((super::erf_f32(-0.5) as f64 + 0.520_499_877_8).abs() < 6e-7);
    }

    /// Every build of the GEGLU loops the CPU has gives the baseline's bits (one body, several
    /// compilations), on rows whose width is not a multiple of the vector width.
    #[test]
    fn geglu_versions_agree() {
        let (rows, c) = (3usize, 37usize);
        let x: Vec<f32> = crate::rng::Rng::new(11).normal_vec(rows * 2 * c).into_iter().map(|v| v * 3.0).collect();
        let dy: Vec<f32> = crate::rng::Rng::new(12).normal_vec(rows * c);
        let run = |which: &str| {
            let (mut y, mut dx) = (vec![0f32; rows * c], vec![0f32; rows * 2 * c]);
            match which {
                "base" => {
                    super::geglu_rows::base(&x, &mut y, c);
                    super::geglu_grad_rows::base(&x, &dy, &mut dx, c);
                }
                #[cfg(target_arch = "x86_64")]
                "v3" => unsafe {
                    super::geglu_rows::v3(&x, &mut y, c);
                    super::geglu_grad_rows::v3(&x, &dy, &mut dx, c);
                },
                #[cfg(target_arch = "x86_64")]
                "v4" => unsafe {
                    super::geglu_rows::v4(&x, &mut y, c);
                    super::geglu_grad_rows::v4(&x, &dy, &mut dx, c);
                },
                _ => unreachable!(),
            }
            (y, dx)
        };
        let want = run("base");
        assert!(want.0.iter().chain(&want.1).all(|v| v.is_finite()) && want.0.iter().any(|&v| v != 0.0));
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                assert!(run("v3") == want, "the AVX2 build differs from the baseline");
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert!(run("v4") == want, "the AVX-512 build differs from the baseline");
            }
        }
    }
}
