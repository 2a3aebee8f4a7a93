//! Layer norm over the last axis and group norm over (N, C, *spatial), with their backward
//! (`shaders/norm.wgsl`); group norm also fused with the SiLU after it (`group_norm_silu`).
//! Both normalise contiguous rows with a biased variance computed as the mean of squared
//! deviations from the mean (two passes), as `torch.nn.functional` does.

use rayon::prelude::*;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{u32_of, PAR_MIN};
use crate::shaders::{NORM, NORM_SUBGROUP};
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
    pub act: u32,
    pub want_dz: u32,
    pub _pad: u32,
}

impl NormParams {
    /// The layout's fields; every flag off but `act`.
    fn of(name: &'static str, l: Layout, eps: f32, act: bool) -> Result<NormParams> {
        Ok(NormParams {
            rows: u32_of(name, l.rows)?,
            row_len: u32_of(name, l.cpg * l.spatial)?,
            spatial: u32_of(name, l.spatial)?,
            cpg: u32_of(name, l.cpg)?,
            groups: u32_of(name, l.groups)?,
            has_w: 0,
            has_b: 0,
            eps,
            want_g: 0,
            act: act as u32,
            want_dz: 0,
            _pad: 0,
        })
    }
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

/// SiLU and its derivative in f32, as `UnaryOp::Silu` and the shaders compute them.
#[inline(always)]
fn silu(z: f32) -> f32 {
    z / (1.0 + (-z).exp())
}

#[inline(always)]
fn silu_grad(z: f32) -> f32 {
    let s = 1.0 / (1.0 + (-z).exp());
    s * (1.0 + z * (1.0 - s))
}

/// The per-row settings the norm's CPU twins share.
#[derive(Clone, Copy)]
struct RowOpts<'a> {
    /// First channel of the row.
    c0: usize,
    spatial: usize,
    w: Option<&'a [f32]>,
    b: Option<&'a [f32]>,
    eps: f32,
    /// SiLU after the affine.
    act: bool,
}

/// Writes `out[j] = f(j, z_j)` for every element of one row, z = the normalised value times
/// w plus b as the shader computes it: statistics as [`RowStats`], then per channel one scale
/// and shift in f32 (layer norm: per element).
#[inline(always)]
fn map_affine(x: &[f32], out: &mut [f32], o: RowOpts, f: impl Fn(usize, f32) -> f32) {
    let st = RowStats::of(x, o.eps);
    let (c0, w, b) = (o.c0, o.w, o.b);
    if o.spatial == 1 {
        // Layer norm: one channel per element.
        let r = st.rstd as f32;
        for (j, (out, &v)) in out.iter_mut().zip(x).enumerate() {
            *out = f(j, st.dev(v) * (r * w.map_or(1.0, |w| w[c0 + j])) + b.map_or(0.0, |b| b[c0 + j]));
        }
        return;
    }
    for (ci, (oc, xc)) in out.chunks_mut(o.spatial).zip(x.chunks(o.spatial)).enumerate() {
        let c = c0 + ci;
        let scale = (st.rstd * w.map_or(1.0, |w| w[c] as f64)) as f32;
        let shift = b.map_or(0.0, |b| b[c]);
        let j0 = ci * o.spatial;
        for (k, (out, &v)) in oc.iter_mut().zip(xc).enumerate() {
            *out = f(j0 + k, st.dev(v) * scale + shift);
        }
    }
}

/// CPU twin of the shader's `forward` for one row of `cpg` channels x `spatial`: the affine
/// values, then SiLU when `o.act`.
fn norm_row(x: &[f32], y: &mut [f32], o: RowOpts) {
    if o.act {
        map_affine(x, y, o, |_, z| silu(z))
    } else {
        map_affine(x, y, o, |_, z| z)
    }
}

thread_local! {
    /// dz of one row for the fused SiLU backward when the caller wants no dz out (reused: a
    /// row is up to a few hundred KiB, which the allocator would map and unmap every time).
    static DZ_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// dz = dy * silu'(z) for one row, z recomputed exactly as [`norm_row`] computes it.
fn silu_dz_row(x: &[f32], dy: &[f32], dz: &mut [f32], o: RowOpts) {
    map_affine(x, dz, o, |j, z| dy[j] * silu_grad(z))
}

/// The fused backward for one row: dz into `dz_out` (or a scratch row), then the norm's
/// backward of dz.
fn norm_silu_backward_row(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    g: Option<&mut [f32]>,
    dz_out: Option<&mut [f32]>,
    o: RowOpts,
) {
    match dz_out {
        Some(dz) => {
            silu_dz_row(x, dy, dz, o);
            norm_backward_row(x, dz, dx, g, o.c0, o.spatial, o.w, o.eps);
        }
        None => DZ_SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.resize(x.len(), 0.0);
            silu_dz_row(x, dy, &mut s, o);
            norm_backward_row(x, &s, dx, g, o.c0, o.spatial, o.w, o.eps);
        }),
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

/// The norm kernel on subgroup sums where the adapter has them.
fn norm_shader(ctx: &crate::device::GpuContext) -> &'static crate::device::Shader {
    crate::shaders::with_reductions(ctx, &NORM, &NORM_SUBGROUP)
}

/// What the fused backward kernel is asked for.
#[derive(Clone, Copy)]
struct BackwardWants {
    /// `dz * xhat` per element (the weight's gradient, summed per channel by the host).
    g: bool,
    /// dz itself (the bias's gradient under `act`).
    dz: bool,
}

/// A row's optional outputs of the CPU backward: `g` and `dz`.
type RowOuts<'a> = (Option<&'a mut [f32]>, Option<&'a mut [f32]>);

/// The backward's outputs: dx, and `g`, `dz` where asked for.
type NormGrads = (Tensor, Option<Tensor>, Option<Tensor>);

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
        self.norm_recorded(NAME, layout, weight, bias, eps, false)
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
        self.group_norm_act("group_norm", groups, weight, bias, eps, false)
    }

    /// `F.silu(F.group_norm(x, groups, weight, bias, eps))` in one pass over x, forward and
    /// backward; the backward keeps x (and the affine) only, not the norm's output.
    pub fn group_norm_silu(
        &self,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        self.group_norm_act("group_norm_silu", groups, weight, bias, eps, true)
    }

    fn group_norm_act(
        &self,
        name: &'static str,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
        act: bool,
    ) -> Result<Tensor> {
        self.ensure_f32(name)?;
        let shape = self.shape();
        if shape.len() < 2 {
            return Err(Error::shape(name, format!("expected input (N, C, *spatial), got shape {shape:?}")));
        }
        let (n, c) = (shape[0], shape[1]);
        if groups == 0 || c % groups != 0 {
            return Err(Error::shape(
                name,
                format!("{c} channels of input {shape:?} are not divisible into {groups} groups"),
            ));
        }
        check_affine(name, "weight", self, weight, c)?;
        check_affine(name, "bias", self, bias, c)?;
        let layout = Layout { rows: n * groups, spatial: shape[2..].iter().product(), cpg: c / groups, groups };
        self.norm_recorded(name, layout, weight, bias, eps, act)
    }

    /// The forward, recording a backward that recomputes mean and rstd from x rather than
    /// saving them; the weight's gradient sums `dz * xhat` per channel, the bias's sums `dz`
    /// (dz = dy without `act`).
    fn norm_recorded(
        &self,
        name: &'static str,
        l: Layout,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
        act: bool,
    ) -> Result<Tensor> {
        let out = self.norm_rows(name, l, weight, bias, eps, act)?;
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        if !crate::autograd::will_record(&inputs) {
            return Ok(out);
        }
        let (has_w, has_b) = (weight.is_some(), bias.is_some());
        let x = self.detach();
        let w = weight.map(|t| t.detach());
        // Only the SiLU's derivative needs the bias (to recompute z).
        let b = bias.filter(|_| act).map(|t| t.detach());
        Ok(crate::autograd::record(name, out, &inputs, move |dy, needs| {
            let need_w = has_w && needs[1];
            let need_b = has_b && needs[1 + has_w as usize];
            let mut grads = Vec::with_capacity(needs.len());
            if needs[0] || need_w || (act && need_b) {
                let wants = BackwardWants { g: need_w, dz: act && need_b };
                let (dx, g, dz) = x.norm_backward(name, l, w.as_ref(), b.as_ref(), dy, eps, act, wants)?;
                grads.push(needs[0].then_some(dx));
                if has_w {
                    grads.push(g.map(|g| channel_sum(&g, l)).transpose()?);
                }
                if has_b {
                    let dz = if act { dz } else { need_b.then(|| dy.clone()) };
                    grads.push(dz.map(|d| channel_sum(&d, l)).transpose()?);
                }
            } else {
                grads.push(None);
                if has_w {
                    grads.push(None);
                }
                if has_b {
                    grads.push(need_b.then(|| channel_sum(dy, l)).transpose()?);
                }
            }
            Ok(grads)
        }))
    }

    /// Gradient of the norm (and the SiLU after it, with `act`) for x (`self`); `dz * xhat` and
    /// dz (both shaped like x) as `wants` says.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        name: &'static str,
        l: Layout,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        dy: &Tensor,
        eps: f32,
        act: bool,
        wants: BackwardWants,
    ) -> Result<NormGrads> {
        self.same_device(name, dy)?;
        if dy.shape() != self.shape() {
            return Err(Error::shape(name, format!("backward: dy {:?} for x {:?}", dy.shape(), self.shape())));
        }
        let want_dz = act && wants.dz;
        let n = self.numel();
        let row_len = l.cpg * l.spatial;
        if n == 0 {
            let z = Tensor::zeros(self.shape(), &self.device())?;
            return Ok((z.clone(), wants.g.then(|| z.clone()), want_dz.then_some(z)));
        }
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32(name)?;
                let d = dy.cpu_f32(name)?;
                let w = weight.map(|t| t.cpu_f32(name)).transpose()?;
                let b = bias.map(|t| t.cpu_f32(name)).transpose()?;
                let mut dx = vec![0.0f32; n];
                let mut g = if wants.g { vec![0.0f32; n] } else { Vec::new() };
                let mut dz = if want_dz { vec![0.0f32; n] } else { Vec::new() };
                let row = |r: usize, o: &mut [f32], gr: Option<&mut [f32]>, dzr: Option<&mut [f32]>| {
                    let s = r * row_len..(r + 1) * row_len;
                    let c0 = (r % l.groups) * l.cpg;
                    if act {
                        let opts = RowOpts { c0, spatial: l.spatial, w, b, eps, act };
                        norm_silu_backward_row(&x[s.clone()], &d[s], o, gr, dzr, opts)
                    } else {
                        norm_backward_row(&x[s.clone()], &d[s], o, gr, c0, l.spatial, w, eps)
                    }
                };
                // Each row of dx with its rows of g and dz where they are wanted.
                fn rows_of(v: &mut [f32], row_len: usize, rows: usize) -> Vec<Option<&mut [f32]>> {
                    match v.is_empty() {
                        false => v.chunks_mut(row_len).map(Some).collect(),
                        true => (0..rows).map(|_| None).collect(),
                    }
                }
                let (g_rows, dz_rows) = (rows_of(&mut g, row_len, l.rows), rows_of(&mut dz, row_len, l.rows));
                let task = |(r, (o, (gr, dzr))): (usize, (&mut [f32], RowOuts))| row(r, o, gr, dzr);
                if n >= PAR_MIN {
                    let min_rows = (PAR_MIN / row_len).max(1);
                    dx.par_chunks_mut(row_len)
                        .zip(g_rows.into_par_iter().zip(dz_rows.into_par_iter()))
                        .enumerate()
                        .with_min_len(min_rows)
                        .for_each(task);
                } else {
                    dx.chunks_mut(row_len).zip(g_rows.into_iter().zip(dz_rows)).enumerate().for_each(task);
                }
                let g = wants.g.then(|| Tensor::cpu(g, self.shape()));
                let dz = want_dz.then(|| Tensor::cpu(dz, self.shape()));
                Ok((Tensor::cpu(dx, self.shape()), g, dz))
            }
            Device::Gpu(ctx) => {
                u32_of(name, n)?;
                let dx = Tensor::gpu_empty(&ctx, name, self.shape())?;
                // An output the kernel is not asked for gets a 1-element buffer for its slot.
                let g = Tensor::gpu_empty(&ctx, name, if wants.g { self.shape() } else { &[1] })?;
                let dz = Tensor::gpu_empty(&ctx, name, if want_dz { self.shape() } else { &[1] })?;
                let mut params = NormParams::of(name, l, eps, act)?;
                params.has_w = weight.is_some() as u32;
                params.has_b = (act && bias.is_some()) as u32;
                params.want_g = wants.g as u32;
                params.want_dz = want_dz as u32;
                let xb = self.gpu_buf(name)?;
                let wb = weight.map(|t| t.gpu_buf(name)).transpose()?.unwrap_or(xb);
                let bb = bias.filter(|_| act).map(|t| t.gpu_buf(name)).transpose()?.unwrap_or(xb);
                let bufs = [xb, wb, dy.gpu_buf(name)?, dx.gpu_buf(name)?, g.gpu_buf(name)?, bb, dz.gpu_buf(name)?];
                ctx.dispatch(norm_shader(&ctx), "backward", &params, &bufs, ctx.grid(l.rows as u64))?;
                Ok((dx, wants.g.then_some(g), want_dz.then_some(dz)))
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
        act: bool,
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
                        norm_row(xr, yr, RowOpts { c0, spatial: l.spatial, w, b, eps, act })
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
                let mut params = NormParams::of(name, l, eps, act)?;
                params.has_w = weight.is_some() as u32;
                params.has_b = bias.is_some() as u32;
                // An absent weight or bias binds `x` in its place (read-only; the flag skips it).
                let xb = self.gpu_buf(name)?;
                let wb = weight.map(|t| t.gpu_buf(name)).transpose()?.unwrap_or(xb);
                let bb = bias.map(|t| t.gpu_buf(name)).transpose()?.unwrap_or(xb);
                let bufs = [xb, wb, bb, out.gpu_buf(name)?];
                ctx.dispatch(norm_shader(&ctx), "main", &params, &bufs, ctx.grid(l.rows as u64))?;
                Ok(out)
            }
        }
    }
}
