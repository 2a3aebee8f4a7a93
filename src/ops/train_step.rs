//! A training step's scalars as kernels (`shaders/train_step.wgsl`), so that a GPU step
//! records its loss head, gradient clipping and NaN guard without reading anything back: the
//! Poly-DPO head ([`poly_dpo_head`]), the Diffusion-KTO head ([`kto_head`]), the gradients' sums of squares ([`sumsq_partials`]) and
//! the guard AdamW reads ([`step_guard`], `optim::adamw_update_guarded`). The head's CPU twin
//! does the kernel's f32 arithmetic in its order; the sums' twins group as the kernels do but
//! add in f64. `train::objective`'s f64 head stays the reference.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::u32_of;
use crate::shaders::TRAIN_STEP;
use crate::tensor::Tensor;

/// Mirror of `Params` in `shaders/train_step.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepParams {
    pub n: u32,
    pub offset: u32,
    pub _pad: [u32; 2],
    pub s: f32,
    pub alpha: f32,
    pub max_norm: f32,
    /// `kto_head`: lambda_U.
    pub lam_u: f32,
}

/// Elements per partial sum of squares (one workgroup's).
pub const SUMSQ_CHUNK: usize = 4096;

/// Where the head puts each value, for `n` pairs: `[loss, z (N), p (N), model_diff (N),
/// ref_diff (N), dL/derr (2N)]`, then each pair's loss term (N): 1 + 7N in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    pub pairs: usize,
}

impl HeadLayout {
    /// Elements in all.
    pub fn size(&self) -> usize {
        1 + 7 * self.pairs
    }
    pub fn z(&self) -> usize {
        1
    }
    pub fn p(&self) -> usize {
        1 + self.pairs
    }
    pub fn model_diff(&self) -> usize {
        1 + 2 * self.pairs
    }
    pub fn ref_diff(&self) -> usize {
        1 + 3 * self.pairs
    }
    /// dL / d err per sample, cat(w, l): 2N values.
    pub fn dloss_derr(&self) -> usize {
        1 + 4 * self.pairs
    }
}

/// The guard's four values: `[clip coefficient, 1 if the step goes on else 0, gradient norm,
/// mean loss]`.
pub const GUARD_LEN: usize = 4;

fn sigmoid(v: f32) -> f32 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

fn log1p_unit(u: f32) -> f32 {
    if u < 0.05 {
        u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * (0.25 - u * 0.2))))
    } else {
        (1.0 + u).ln()
    }
}

fn softplus(v: f32) -> f32 {
    v.max(0.0) + log1p_unit((-v.abs()).exp())
}

fn check_vec(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    t.ensure_f32(op)?;
    if t.rank() != 1 {
        return Err(Error::shape(op, format!("{what} {:?}: expected a vector", t.shape())));
    }
    Ok(())
}

/// A head's per-sample errors: `e` the policy's and `r` the reference's, two equal non-empty
/// f32 vectors on one device; returns their length.
fn check_errors(op: &'static str, e: &Tensor, r: &Tensor) -> Result<usize> {
    check_vec(op, "policy errors", e)?;
    check_vec(op, "reference errors", r)?;
    e.same_device(op, r)?;
    if e.shape() != r.shape() || e.numel() == 0 {
        return Err(Error::shape(
            op,
            format!("policy errors {:?}, reference errors {:?}: expected two equal (B,)", e.shape(), r.shape()),
        ));
    }
    Ok(e.numel())
}

/// A head kernel (`entry`, one thread) on the errors `(e, r)`, writing `len` values.
fn gpu_head(
    op: &'static str,
    ctx: &std::sync::Arc<crate::device::GpuContext>,
    entry: &'static str,
    p: &StepParams,
    (e, r): (&Tensor, &Tensor),
    len: usize,
) -> Result<Tensor> {
    let y = Tensor::gpu_empty(ctx, op, &[len])?;
    ctx.dispatch(&TRAIN_STEP, entry, p, &[e.gpu_buf(op)?, y.gpu_buf(op)?, r.gpu_buf(op)?], [1, 1, 1])?;
    Ok(y)
}

/// The Poly-DPO loss head on per-sample errors, cat(winners, losers) order: `e` the policy's
/// (2N,), `r` the reference's (2N,), `s` the logit scale, `alpha` Poly-DPO's (0: DPO).
/// Returns `(1 + 7N,)` laid out as [`HeadLayout`] says; the loss is the mean over pairs.
pub fn poly_dpo_head(e: &Tensor, r: &Tensor, s: f32, alpha: f32) -> Result<Tensor> {
    const OP: &str = "poly_dpo_head";
    let b = check_errors(OP, e, r)?;
    if !b.is_multiple_of(2) {
        return Err(Error::shape(OP, format!("{b} errors per model: cat(winners, losers) is an even count (2N,)")));
    }
    if !(s.is_finite() && alpha.is_finite()) {
        return Err(Error::Invalid(format!("{OP}: scale {s} and alpha {alpha} must be finite")));
    }
    let n = b / 2;
    let lay = HeadLayout { pairs: n };
    match e.device() {
        Device::Cpu => {
            let (x, z) = (e.cpu_f32(OP)?, r.cpu_f32(OP)?);
            let mut y = vec![0f32; lay.size()];
            let mut total = 0f32;
            for i in 0..n {
                let md = x[i] - x[n + i];
                let rd = z[i] - z[n + i];
                let zi = -s * (md - rd);
                let (pi, qi) = (sigmoid(zi), sigmoid(-zi));
                let term = softplus(-zi) + alpha * qi;
                total += term;
                let dz = -qi * (1.0 + alpha * pi) / n as f32;
                let dmd = -s * dz;
                y[1 + i] = zi;
                y[1 + n + i] = pi;
                y[1 + 2 * n + i] = md;
                y[1 + 3 * n + i] = rd;
                y[1 + 4 * n + i] = dmd;
                y[1 + 5 * n + i] = -dmd;
                y[1 + 6 * n + i] = term;
            }
            y[0] = total / n as f32;
            Ok(Tensor::cpu(y, &[lay.size()]))
        }
        Device::Gpu(ctx) => {
            let p = StepParams { n: u32_of(OP, n)?, s, alpha, ..Default::default() };
            gpu_head(OP, &ctx, "head", &p, (e, r), lay.size())
        }
    }
}

/// Where [`kto_head`] puts each value, for `samples` (B) samples: `[loss, Q, u (B), sigmoid(u)
/// (B), dL/derr (B)]`, 2 + 3B in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KtoLayout {
    pub samples: usize,
}

impl KtoLayout {
    pub fn size(&self) -> usize {
        2 + 3 * self.samples
    }
    /// The reference point Q.
    pub fn q(&self) -> usize {
        1
    }
    pub fn u(&self) -> usize {
        2
    }
    pub fn h(&self) -> usize {
        2 + self.samples
    }
    pub fn dloss_derr(&self) -> usize {
        2 + 2 * self.samples
    }
}

/// The Diffusion-KTO head on per-sample errors: `e` the policy's (B,), `r` the reference's
/// (B,), the first `desirable` samples desirable and the rest not, `beta`, and the weights
/// `lam_d` and `lam_u`. Returns `(2 + 3B,)` laid out as [`KtoLayout`] says (the same
/// arithmetic as `ObjectiveConfig::head`'s KTO, in f32).
pub fn kto_head(e: &Tensor, r: &Tensor, desirable: usize, beta: f32, lam_d: f32, lam_u: f32) -> Result<Tensor> {
    const OP: &str = "kto_head";
    let b = check_errors(OP, e, r)?;
    if desirable > b {
        return Err(Error::shape(OP, format!("{desirable} desirable of {b} samples")));
    }
    if !(beta.is_finite() && lam_d.is_finite() && lam_u.is_finite()) {
        return Err(Error::Invalid(format!("{OP}: beta {beta}, lambda_D {lam_d}, lambda_U {lam_u} must be finite")));
    }
    let lay = KtoLayout { samples: b };
    match e.device() {
        Device::Cpu => {
            let (x, z) = (e.cpu_f32(OP)?, r.cpu_f32(OP)?);
            let mut y = vec![0f32; lay.size()];
            let mut gsum = 0f32;
            for j in 0..b {
                gsum += z[j] - x[j];
            }
            let q = (gsum / b as f32).max(0.0);
            let mut total = 0f32;
            for j in 0..b {
                let good = j < desirable;
                let (yj, lam) = if good { (1.0f32, lam_d) } else { (-1.0, lam_u) };
                let u = yj * beta * ((z[j] - x[j]) - q);
                let (h, h1) = (sigmoid(u), sigmoid(-u));
                total += lam * h1;
                y[lay.u() + j] = u;
                y[lay.h() + j] = h;
                y[lay.dloss_derr() + j] = lam * h * h1 * yj * beta / b as f32;
            }
            y[0] = total / b as f32;
            y[lay.q()] = q;
            Ok(Tensor::cpu(y, &[lay.size()]))
        }
        Device::Gpu(ctx) => {
            let p = StepParams {
                n: u32_of(OP, b)?,
                offset: u32_of(OP, desirable)?,
                s: beta,
                alpha: lam_d,
                lam_u,
                ..Default::default()
            };
            gpu_head(OP, &ctx, "kto_head", &p, (e, r), lay.size())
        }
    }
}

/// Partial sums of squares of every gradient in `grads` (any shapes, one device), each cut in
/// chunks of [`SUMSQ_CHUNK`] elements: `(sum over grads of ceil(numel / SUMSQ_CHUNK),)`, at
/// least one element (a zero when every gradient is empty).
pub fn sumsq_partials(grads: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "sumsq_partials";
    let Some(first) = grads.first() else {
        return Err(Error::Invalid(format!("{OP}: no gradient")));
    };
    for g in grads {
        g.ensure_f32(OP)?;
        first.same_device(OP, g)?;
    }
    let counts: Vec<usize> = grads.iter().map(|g| g.numel().div_ceil(SUMSQ_CHUNK)).collect();
    let total: usize = counts.iter().sum();
    match first.device() {
        Device::Cpu => {
            let mut y = Vec::with_capacity(total.max(1));
            for g in grads {
                for c in g.cpu_f32(OP)?.chunks(SUMSQ_CHUNK) {
                    y.push(c.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32);
                }
            }
            if y.is_empty() {
                y.push(0.0);
            }
            let len = y.len();
            Ok(Tensor::cpu(y, &[len]))
        }
        Device::Gpu(ctx) => {
            if total == 0 {
                return Tensor::zeros(&[1], &Device::Gpu(ctx));
            }
            let y = Tensor::gpu_empty(&ctx, OP, &[total])?;
            let mut offset = 0usize;
            for (g, &c) in grads.iter().zip(&counts) {
                if c > 0 {
                    let p = StepParams { n: u32_of(OP, g.numel())?, offset: u32_of(OP, offset)?, ..Default::default() };
                    ctx.dispatch(&TRAIN_STEP, "sumsq", &p, &[g.gpu_buf(OP)?, y.gpu_buf(OP)?], ctx.grid(c as u64))?;
                }
                offset += c;
            }
            Ok(y)
        }
    }
}

/// The guard of a step from the gradients' `partials` (K,) ([`sumsq_partials`]) and the
/// micro-batches' `losses` (A,): `(4,)` = `[coef, ok, norm, mean loss]` with
/// `norm = sqrt(sum partials)`, `ok` 1 when the norm and the mean loss are finite (else 0), and
/// `coef = min(max_norm / (norm + 1e-6), 1)` (1 when not ok), as `optim::clip_grad_norm` does.
pub fn step_guard(partials: &Tensor, losses: &Tensor, max_norm: f32) -> Result<Tensor> {
    const OP: &str = "step_guard";
    check_vec(OP, "partial sums", partials)?;
    check_vec(OP, "losses", losses)?;
    partials.same_device(OP, losses)?;
    if partials.numel() == 0 || losses.numel() == 0 {
        return Err(Error::shape(
            OP,
            format!("partial sums {:?}, losses {:?}: neither may be empty", partials.shape(), losses.shape()),
        ));
    }
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Invalid(format!("{OP}: max_norm {max_norm} must be positive and finite")));
    }
    match partials.device() {
        Device::Cpu => {
            let total = partials.cpu_f32(OP)?.iter().map(|&v| v as f64).sum::<f64>() as f32;
            let l = losses.cpu_f32(OP)?;
            let loss = l.iter().sum::<f32>() / l.len() as f32;
            let norm = total.sqrt();
            let ok = norm.is_finite() && loss.is_finite();
            let coef = if ok { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
            Ok(Tensor::cpu(vec![coef, if ok { 1.0 } else { 0.0 }, norm, loss], &[GUARD_LEN]))
        }
        Device::Gpu(ctx) => {
            let y = Tensor::gpu_empty(&ctx, OP, &[GUARD_LEN])?;
            let p = StepParams {
                n: u32_of(OP, partials.numel())?,
                offset: u32_of(OP, losses.numel())?,
                max_norm,
                ..Default::default()
            };
            let bufs = [partials.gpu_buf(OP)?, y.gpu_buf(OP)?, losses.gpu_buf(OP)?];
            ctx.dispatch(&TRAIN_STEP, "guard", &p, &bufs, [1, 1, 1])?;
            Ok(y)
        }
    }
}
