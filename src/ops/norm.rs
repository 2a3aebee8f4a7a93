//! Layer norm over the last axis and group norm over (N, C, *spatial), with their backward
//! (`shaders/norm.wgsl`).
//! Both normalise contiguous rows with a biased variance computed as the mean of squared
//! deviations from the mean (two passes), as `torch.nn.functional` does.

use rayon::prelude::*;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{u32_of, PAR_MIN};
use crate::shaders::NORM;
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NormParams {
    pub rows: u32,
    pub row_len: u32,
    pub spatial: u32,
    pub cpg: u32,
    pub groups: u32,
    pub has_w: u32,
    pub has_b: u32,
    pub eps: f32,
    pub want_g: u32,
    pub _pad: [u32; 3],
}

/// The rows to normalise: `rows` of `cpg * spatial` elements; row `r` holds channels
/// `(r % groups) * cpg ..` of `spatial` elements each.
#[derive(Clone, Copy)]
struct Layout {
    rows: usize,
    spatial: usize,
    cpg: usize,
    groups: usize,
}

/// Checks an optional per-channel affine tensor: f32, shape (C,), on the input's device.
fn check_affine(op: &'static str, what: &str, x: &Tensor, t: Option<&Tensor>, channels: usize) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    t.ensure_f32(op)?;
    x.same_device(op, t)?;
    if t.shape() != [channels] {
        return Err(Error::shape(
            op,
            format!("{what} has shape {:?}, expected [{channels}] for input of shape {:?}", t.shape(), x.shape()),
        ));
    }
    Ok(())
}

/// Sum of `f(v)` over `x`: 8 f32 lanes within blocks of 64 (so the loop vectorises), blocks
/// added in f64: the error is a few f32 ulp of each block's sum of |f| and does not grow with
/// the row's length.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(64) {
        let mut acc = [0.0f32; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for k in 0..8 {
                acc[k] += f(c[k]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for &v in it.remainder() {
            s += f(v);
        }
        total += s as f64;
    }
    total
}

/// [`lane_sum`] of `f(a, b)` over two equal-length slices.
#[inline(always)]
fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for (ba, bb) in a.chunks(64).zip(b.chunks(64)) {
        let mut acc = [0.0f32; 8];
        let (mut ia, mut ib) = (ba.chunks_exact(8), bb.chunks_exact(8));
        for (ca, cb) in (&mut ia).zip(&mut ib) {
            for k in 0..8 {
                acc[k] += f(ca[k], cb[k]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (&u, &v) in ia.remainder().iter().zip(ib.remainder()) {
            s += f(u, v);
        }
        total += s as f64;
    }
    total
}

/// [`lane_sum`] of `f(a, b, c)` over three equal-length slices.
#[inline(always)]
fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for ((ba, bb), bc) in a.chunks(64).zip(b.chunks(64)).zip(c.chunks(64)) {
        let mut acc = [0.0f32; 8];
        let (mut ia, mut ib, mut ic) = (ba.chunks_exact(8), bb.chunks_exact(8), bc.chunks_exact(8));
        for ((ca, cb), cc) in (&mut ia).zip(&mut ib).zip(&mut ic) {
            for k in 0..8 {
                acc[k] += f(ca[k], cb[k], cc[k]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for ((&u, &v), &w) in ia.remainder().iter().zip(ib.remainder()).zip(ic.remainder()) {
            s += f(u, v, w);
        }
        total += s as f64;
    }
    total
}

/// A row's mean as an f32 pair (hi + lo, hi = the mean rounded) and 1/sqrt(var + eps).
/// `dev` subtracts both halves: `v - hi` is exact for v near the mean, so deviations keep f64
/// accuracy even under a large common offset, at the cost of one more subtraction.
#[derive(Clone, Copy)]
struct RowStats {
    hi: f32,
    lo: f32,
    rstd: f64,
}

impl RowStats {
    fn of(x: &[f32], eps: f32) -> RowStats {
        let n = x.len() as f64;
        // Summed relative to the first value: f32 block sums of raw values lose the digits
        // under a large common offset (rows near 1000 sum to 64000 per block).
        let k = x.first().copied().unwrap_or(0.0);
        let mean = k as f64 + lane_sum(x, |v| v - k) / n;
        let hi = mean as f32;
        let lo = (mean - hi as f64) as f32;
        let var = lane_sum(x, |v| {
            let d = (v - hi) - lo;
            d * d
        }) / n;
        RowStats { hi, lo, rstd: 1.0 / (var + eps as f64).sqrt() }
    }
    #[inline(always)]
    fn dev(&self, v: f32) -> f32 {
        (v - self.hi) - self.lo
    }
}

/// CPU twin of the shader's `forward` for one row of `cpg` channels x `spatial`: statistics as
/// [`RowStats`], then per channel one scale and shift in f32 (the shader's precision).
fn norm_row(x: &[f32], y: &mut [f32], c0: usize, spatial: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f32) {
    let st = RowStats::of(x, eps);
    let rstd = st.rstd;
    if spatial == 1 {
        // Layer norm: one channel per element.
        let r = rstd as f32;
        for (j, (o, &v)) in y.iter_mut().zip(x).enumerate() {
            *o = st.dev(v) * (r * w.map_or(1.0, |w| w[c0 + j])) + b.map_or(0.0, |b| b[c0 + j]);
        }
        return;
    }
    for (ci, (yc, xc)) in y.chunks_mut(spatial).zip(x.chunks(spatial)).enumerate() {
        let c = c0 + ci;
        let scale = (rstd * w.map_or(1.0, |w| w[c] as f64)) as f32;
        let shift = b.map_or(0.0, |b| b[c]);
        for (o, &v) in yc.iter_mut().zip(xc) {
            *o = st.dev(v) * scale + shift;
        }
    }
}

/// CPU twin of the shader's `backward` for one row: dx, and `dy * xhat` into `g` if given.
/// Sums as [`lane_sum`]; elementwise work in f32, per channel.
#[allow(clippy::too_many_arguments)]
fn norm_backward_row(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    g: Option<&mut [f32]>,
    c0: usize,
    spatial: usize,
    w: Option<&[f32]>,
    eps: f32,
) {
    let n = x.len() as f64;
    let st = RowStats::of(x, eps);
    let rstd = st.rstd;
    let wc = |ci: usize| w.map_or(1.0, |w| w[c0 + ci]);
    // s1 = sum(dy * w), s2 = sum(dy * w * xhat) = rstd * sum(w * dy * (x - mean)).
    let (s1, s2) = match (spatial, w) {
        // Layer norm: one channel per element.
        (1, Some(w)) => {
            let w = &w[c0..c0 + x.len()];
            (lane_sum2(dy, w, |d, w| d * w), lane_sum3(dy, w, x, |d, w, v| d * w * st.dev(v)))
        }
        (1, None) => (lane_sum(dy, |d| d), lane_sum2(dy, x, |d, v| d * st.dev(v))),
        _ => {
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for (ci, (dyc, xc)) in dy.chunks(spatial).zip(x.chunks(spatial)).enumerate() {
                let w = wc(ci) as f64;
                s1 += w * lane_sum(dyc, |d| d);
                s2 += w * lane_sum2(dyc, xc, |d, v| d * st.dev(v));
            }
            (s1, s2)
        }
    };
    let (m1, m2) = ((s1 / n) as f32, (s2 * rstd / n) as f32);
    let r = rstd as f32;
    if spatial == 1 {
        for (j, (o, (&d, &v))) in dx.iter_mut().zip(dy.iter().zip(x)).enumerate() {
            *o = r * (d * wc(j) - m1 - st.dev(v) * r * m2);
        }
    } else {
        for (ci, (dxc, (dyc, xc))) in dx.chunks_mut(spatial).zip(dy.chunks(spatial).zip(x.chunks(spatial))).enumerate()
        {
            let w = wc(ci);
            for (o, (&d, &v)) in dxc.iter_mut().zip(dyc.iter().zip(xc)) {
                *o = r * (d * w - m1 - st.dev(v) * r * m2);
            }
        }
    }
    if let Some(g) = g {
        for (o, (&d, &v)) in g.iter_mut().zip(dy.iter().zip(x)) {
            *o = d * st.dev(v) * r;
        }
    }
}

/// Per-channel sums of `t` laid out as the norm's rows, i.e. (N, C, S) with N = rows / groups,
/// C = groups * cpg, S = spatial: sums over S first (contiguous), then over N. Returns (C,).
fn channel_sum(t: &Tensor, l: Layout) -> Result<Tensor> {
    let c = l.groups * l.cpg;
    let n = l.rows / l.groups;
    let mut t = t.reshape_to(&[n * c, l.spatial])?; // (N * C, S)
    if l.spatial != 1 {
        t = t.sum(1, false)?; // (N * C)
    }
    let t = t.reshape_to(&[n, c])?; // (N, C)
    if n == 1 {
        t.reshape_to(&[c])
    } else {
        t.sum(0, false)
    }
}

impl Tensor {
    /// `F.layer_norm(x, (C,), weight, bias, eps)` over the last axis; `weight`, `bias`: (C,).
    pub fn layer_norm(&self, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        const NAME: &str = "layer_norm";
        self.ensure_f32(NAME)?;
        let Some(&c) = self.shape().last() else {
            return Err(Error::shape(NAME, format!("needs rank >= 1, got shape {:?}", self.shape())));
        };
        check_affine(NAME, "weight", self, weight, c)?;
        check_affine(NAME, "bias", self, bias, c)?;
        let rows = self.numel().checked_div(c).unwrap_or(0);
        let layout = Layout { rows, spatial: 1, cpg: c, groups: 1 };
        self.norm_recorded(NAME, layout, weight, bias, eps)
    }

    /// `F.group_norm(x, groups, weight, bias, eps)` for `x` (N, C, *spatial) with any number
    /// of spatial dims (zero included); `weight`, `bias`: (C,). Biased variance per (n, group).
    pub fn group_norm(
        &self,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        const NAME: &str = "group_norm";
        self.ensure_f32(NAME)?;
        let shape = self.shape();
        if shape.len() < 2 {
            return Err(Error::shape(NAME, format!("expected input (N, C, *spatial), got shape {shape:?}")));
        }
        let (n, c) = (shape[0], shape[1]);
        if groups == 0 || c % groups != 0 {
            return Err(Error::shape(
                NAME,
                format!("{c} channels of input {shape:?} are not divisible into {groups} groups"),
            ));
        }
        check_affine(NAME, "weight", self, weight, c)?;
        check_affine(NAME, "bias", self, bias, c)?;
        let layout = Layout { rows: n * groups, spatial: shape[2..].iter().product(), cpg: c / groups, groups };
        self.norm_recorded(NAME, layout, weight, bias, eps)
    }

    /// The forward, recording a backward that recomputes mean and rstd from x rather than
    /// saving them; the weight's gradient sums `dy * xhat` per channel, the bias's sums `dy`.
    fn norm_recorded(
        &self,
        name: &'static str,
        l: Layout,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let out = self.norm_rows(name, l, weight, bias, eps)?;
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        let (has_w, has_b) = (weight.is_some(), bias.is_some());
        let x = self.detach();
        let w = weight.map(|t| t.detach());
        Ok(crate::autograd::record(name, out, &inputs, move |dy, needs| {
            let need_w = has_w && needs[1];
            let need_b = has_b && needs[1 + has_w as usize];
            let mut grads = Vec::with_capacity(needs.len());
            if needs[0] || need_w {
                let (dx, g) = x.norm_backward(name, l, w.as_ref(), dy, eps, need_w)?;
                grads.push(needs[0].then_some(dx));
                if has_w {
                    grads.push(g.map(|g| channel_sum(&g, l)).transpose()?);
                }
            } else {
                grads.push(None);
                if has_w {
                    grads.push(None);
                }
            }
            if has_b {
                grads.push(need_b.then(|| channel_sum(dy, l)).transpose()?);
            }
            Ok(grads)
        }))
    }

    /// Gradient of the norm for x (`self`), and `dy * xhat` (shaped like x) when `want_g`.
    fn norm_backward(
        &self,
        name: &'static str,
        l: Layout,
        weight: Option<&Tensor>,
        dy: &Tensor,
        eps: f32,
        want_g: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.same_device(name, dy)?;
        if dy.shape() != self.shape() {
            return Err(Error::shape(name, format!("backward: dy {:?} for x {:?}", dy.shape(), self.shape())));
        }
        let n = self.numel();
        let row_len = l.cpg * l.spatial;
        if n == 0 {
            let z = Tensor::zeros(self.shape(), &self.device())?;
            return Ok((z.clone(), want_g.then_some(z)));
        }
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32(name)?;
                let d = dy.cpu_f32(name)?;
                let w = weight.map(|t| t.cpu_f32(name)).transpose()?;
                let mut dx = vec![0.0f32; n];
                let mut g = if want_g { vec![0.0f32; n] } else { Vec::new() };
                let row = |r: usize, o: &mut [f32], gr: Option<&mut [f32]>| {
                    let s = r * row_len..(r + 1) * row_len;
                    let c0 = (r % l.groups) * l.cpg;
                    norm_backward_row(&x[s.clone()], &d[s], o, gr, c0, l.spatial, w, eps)
                };
                let min_rows = (PAR_MIN / row_len).max(1);
                match (want_g, n >= PAR_MIN) {
                    (true, true) => dx
                        .par_chunks_mut(row_len)
                        .zip(g.par_chunks_mut(row_len))
                        .enumerate()
                        .with_min_len(min_rows)
                        .for_each(|(r, (o, gr))| row(r, o, Some(gr))),
                    (true, false) => dx
                        .chunks_mut(row_len)
                        .zip(g.chunks_mut(row_len))
                        .enumerate()
                        .for_each(|(r, (o, gr))| row(r, o, Some(gr))),
                    (false, true) => {
                        dx.par_chunks_mut(row_len).enumerate().with_min_len(min_rows).for_each(|(r, o)| row(r, o, None))
                    }
                    (false, false) => dx.chunks_mut(row_len).enumerate().for_each(|(r, o)| row(r, o, None)),
                }
                let g = want_g.then(|| Tensor::cpu(g, self.shape()));
                Ok((Tensor::cpu(dx, self.shape()), g))
            }
            Device::Gpu(ctx) => {
                u32_of(name, n)?;
                let dx = Tensor::gpu_empty(&ctx, name, self.shape())?;
                // Without `want_g` the kernel never touches `g`; a 1-element buffer fills the slot.
                let g = Tensor::gpu_empty(&ctx, name, if want_g { self.shape() } else { &[1] })?;
                let params = NormParams {
                    rows: u32_of(name, l.rows)?,
                    row_len: u32_of(name, row_len)?,
                    spatial: u32_of(name, l.spatial)?,
                    cpg: u32_of(name, l.cpg)?,
                    groups: u32_of(name, l.groups)?,
                    has_w: weight.is_some() as u32,
                    has_b: 0,
                    eps,
                    want_g: want_g as u32,
                    _pad: [0; 3],
                };
                let xb = self.gpu_buf(name)?;
                let wb = weight.map(|t| t.gpu_buf(name)).transpose()?.unwrap_or(xb);
                let bufs = [xb, wb, dy.gpu_buf(name)?, dx.gpu_buf(name)?, g.gpu_buf(name)?];
                ctx.dispatch(&NORM, "backward", &params, &bufs, ctx.grid(l.rows as u64))?;
                Ok((dx, want_g.then_some(g)))
            }
        }
    }

    fn norm_rows(
        &self,
        name: &'static str,
        l: Layout,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let n = self.numel();
        let row_len = l.cpg * l.spatial;
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32(name)?;
                let w = weight.map(|t| t.cpu_f32(name)).transpose()?;
                let b = bias.map(|t| t.cpu_f32(name)).transpose()?;
                let mut y = vec![0.0f32; n];
                if n > 0 {
                    let row = |r: usize, yr: &mut [f32], xr: &[f32]| {
                        let c0 = (r % l.groups) * l.cpg;
                        norm_row(xr, yr, c0, l.spatial, w, b, eps)
                    };
                    if n >= PAR_MIN {
                        let min_rows = (PAR_MIN / row_len).max(1);
                        y.par_chunks_mut(row_len)
                            .zip(x.par_chunks(row_len))
                            .enumerate()
                            .with_min_len(min_rows)
                            .for_each(|(r, (yr, xr))| row(r, yr, xr));
                    } else {
                        y.chunks_mut(row_len)
                            .zip(x.chunks(row_len))
                            .enumerate()
                            .for_each(|(r, (yr, xr))| row(r, yr, xr));
                    }
                }
                Ok(Tensor::cpu(y, self.shape()))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, name, self.shape())?;
                if n == 0 {
                    return Ok(out);
                }
                u32_of(name, n)?;
                let params = NormParams {
                    rows: u32_of(name, l.rows)?,
                    row_len: u32_of(name, row_len)?,
                    spatial: u32_of(name, l.spatial)?,
                    cpg: u32_of(name, l.cpg)?,
                    groups: u32_of(name, l.groups)?,
                    has_w: weight.is_some() as u32,
                    has_b: bias.is_some() as u32,
                    eps,
                    want_g: 0,
                    _pad: [0; 3],
                };
                // An absent weight or bias binds `x` in its place (read-only; the flag skips it).
                let xb = self.gpu_buf(name)?;
                let wb = weight.map(|t| t.gpu_buf(name)).transpose()?.unwrap_or(xb);
                let bb = bias.map(|t| t.gpu_buf(name)).transpose()?.unwrap_or(xb);
                let bufs = [xb, wb, bb, out.gpu_buf(name)?];
                ctx.dispatch(&NORM, "main", &params, &bufs, ctx.grid(l.rows as u64))?;
                Ok(out)
            }
        }
    }
}
