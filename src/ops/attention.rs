//! Scaled dot-product attention, multi-head, self or cross (`shaders/attention.wgsl`).
//!
//! The GPU kernel is fused with an online softmax, so no score matrix is ever stored; head
//! dims above its register budget take a chunked path whose score tile is bounded by the
//! binding limit (and whose backward goes through the ops it is made of). The CPU twin
//! computes score tiles of `CPU_ROWS` queries with `sgemm`. The backward recomputes the
//! scores from q, k and the saved row log-sum-exp, so its memory is linear in the length.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::fast_exp;
use crate::ops::matmul::{sgemm, MatRef};
use crate::shaders::{ATTENTION, ATTENTION_D40, ATTENTION_D64, ATTENTION_D80};
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    pub bh: u32,
    pub lq: u32,
    pub lk: u32,
    pub d: u32,
    pub dv: u32,
    pub scale: f32,
    pub _pad: [u32; 2],
}

/// Largest head dim of the fused kernel (`MAX_D` in the shader): SD1.5's 160 fits.
pub const FUSED_MAX_D: usize = 160;
const CPU_ROWS: usize = 256;

/// The GPU kernel's variant for these head dims: one with them fixed at compile time when
/// there is one (registers instead of local memory: several times faster), else the generic.
fn gpu_shader(d: usize, dv: usize) -> &'static crate::device::Shader {
    match (d, dv) {
        (40, 40) => &ATTENTION_D40,
        (64, 64) => &ATTENTION_D64,
        (80, 80) => &ATTENTION_D80,
        _ => &ATTENTION,
    }
}

/// Sizes of one attention call, batch and heads folded into `bh`.
#[derive(Clone, Copy, Debug)]
struct Geom {
    bh: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f32,
}

impl Geom {
    fn params(&self) -> Result<AttentionParams> {
        let u = |x: usize| crate::ops::u32_of("attention", x);
        Ok(AttentionParams {
            bh: u(self.bh)?,
            lq: u(self.lq)?,
            lk: u(self.lk)?,
            d: u(self.d)?,
            dv: u(self.dv)?,
            scale: self.scale,
            _pad: [0; 2],
        })
    }
}

impl Tensor {
    /// `softmax(q k^T * scale) v` over the last two dims: q (..., Lq, D), k (..., Lk, D),
    /// v (..., Lk, Dv) -> (..., Lq, Dv), leading dims (batch, heads) equal. `scale` defaults to 1/sqrt(D).
    pub fn attention(&self, k: &Tensor, v: &Tensor, scale: Option<f32>) -> Result<Tensor> {
        const OP: &str = "attention";
        for t in [self, k, v] {
            t.ensure_f32(OP)?;
        }
        self.same_device(OP, k)?;
        self.same_device(OP, v)?;
        let (qs, ks, vs) = (self.shape(), k.shape(), v.shape());
        let bad = || {
            Error::shape(OP, format!("q {qs:?}, k {ks:?}, v {vs:?}: expected (..., Lq, D), (..., Lk, D), (..., Lk, Dv) with equal leading dims"))
        };
        if qs.len() < 2 || ks.len() != qs.len() || vs.len() != qs.len() {
            return Err(bad());
        }
        let r = qs.len();
        let (lq, d, lk, dv) = (qs[r - 2], qs[r - 1], ks[r - 2], vs[r - 1]);
        if ks[r - 1] != d || vs[r - 2] != lk || qs[..r - 2] != ks[..r - 2] || qs[..r - 2] != vs[..r - 2] {
            return Err(bad());
        }
        if lk == 0 {
            return Err(Error::shape(OP, format!("no keys: k {ks:?}")));
        }
        let bh: usize = qs[..r - 2].iter().product();
        let g = Geom { bh, lq, lk, d, dv, scale: scale.unwrap_or(1.0 / (d as f32).sqrt()) };
        let mut out_shape = qs.to_vec();
        out_shape[r - 1] = dv;
        if let Device::Gpu(ctx) = self.device() {
            if d > FUSED_MAX_D || dv > FUSED_MAX_D {
                return self.attention_chunked(k, v, &g, &out_shape, ctx.limits.max_storage_buffer_binding_size);
            }
        }
        let track = crate::autograd::will_record(&[self, k, v]);
        let (out, lse) = attention_forward(self, k, v, &g, &out_shape, track)?;
        let Some(lse) = lse else { return Ok(out) };
        let (q, k2, v2, o) = (self.detach(), k.detach(), v.detach(), out.detach());
        let (kshape, vshape) = (k.shape().to_vec(), v.shape().to_vec());
        Ok(crate::autograd::record(OP, out, &[self, k, v], move |grad, needs| {
            let want_q = needs[0];
            let want_kv = needs[1] || needs[2];
            let (dq, dk, dvv) = attention_backward(&q, &k2, &v2, &o, &lse, grad, &g, want_q, want_kv)?;
            Ok(vec![
                dq.map(|t| t.reshape_to(q.shape())).transpose()?,
                dk.filter(|_| needs[1]).map(|t| t.reshape_to(&kshape)).transpose()?,
                dvv.filter(|_| needs[2]).map(|t| t.reshape_to(&vshape)).transpose()?,
            ])
        }))
    }

    /// Wide heads on the GPU: scores for a chunk of queries at a time, within half a binding.
    /// Built from recorded ops, so autograd differentiates it through them.
    fn attention_chunked(&self, k: &Tensor, v: &Tensor, g: &Geom, out_shape: &[usize], limit: u64) -> Result<Tensor> {
        let budget = (limit / 2 / 4) as usize;
        let rows = (budget / (g.bh * g.lk)).clamp(1, g.lq.max(1));
        let q3 = self.reshape_to(&[g.bh, g.lq, g.d])?;
        let (k3, v3) = (k.reshape_to(&[g.bh, g.lk, g.d])?, v.reshape_to(&[g.bh, g.lk, g.dv])?);
        let mut parts = Vec::new();
        for s in (0..g.lq).step_by(rows) {
            let qc = q3.slice(1, s, rows.min(g.lq - s))?; // (BH, rows, D)
            let p = qc.matmul_t(&k3, false, true)?.mul_scalar(g.scale)?.softmax_last()?; // (BH, rows, Lk)
            parts.push(p.matmul(&v3)?); // (BH, rows, Dv)
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        Tensor::concat(&refs, 1)?.reshape_to(out_shape)
    }
}

/// O (out_shape), and the row log-sum-exp (BH, Lq) when `with_lse` (for the backward).
fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Geom,
    out_shape: &[usize],
    with_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "attention";
    match q.device() {
        Device::Cpu => {
            let (qv, kv, vv) = (q.cpu_f32(OP)?, k.cpu_f32(OP)?, v.cpu_f32(OP)?);
            let mut o = vec![0.0f32; g.bh * g.lq * g.dv];
            let mut lse = vec![0.0f32; g.bh * g.lq];
            cpu_attention(qv, kv, vv, &mut o, &mut lse, g);
            let lse = with_lse.then(|| Tensor::cpu(lse, &[g.bh, g.lq]));
            Ok((Tensor::cpu(o, out_shape), lse))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_empty(&ctx, OP, out_shape)?;
            let groups = [g.lq.div_ceil(64) as u32, crate::ops::u32_of(OP, g.bh)?, 1];
            let (qb, kb, vb) = (q.gpu_buf(OP)?, k.gpu_buf(OP)?, v.gpu_buf(OP)?);
            if with_lse {
                let lse = Tensor::gpu_empty(&ctx, OP, &[g.bh, g.lq])?;
                ctx.dispatch(
                    gpu_shader(g.d, g.dv),
                    "main_lse",
                    &g.params()?,
                    &[qb, kb, vb, out.gpu_buf(OP)?, lse.gpu_buf(OP)?],
                    groups,
                )?;
                Ok((out, Some(lse)))
            } else {
                ctx.dispatch(gpu_shader(g.d, g.dv), "main", &g.params()?, &[qb, kb, vb, out.gpu_buf(OP)?], groups)?;
                Ok((out, None))
            }
        }
    }
}

/// dQ (BH, Lq, D) when `want_q`; dK (BH, Lk, D) and dV (BH, Lk, Dv) when `want_kv`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    g: &Geom,
    want_q: bool,
    want_kv: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "attention backward";
    // dsum[i] = dO[i] . O[i]: the softmax backward's row term.
    let dsum = dout.mul(o)?.sum(-1, false)?.reshape_to(&[g.bh, g.lq])?;
    match q.device() {
        Device::Cpu => {
            fn c(t: &Tensor) -> Result<&[f32]> {
                t.cpu_f32(OP)
            }
            let mut dq = vec![0.0f32; if want_q { g.bh * g.lq * g.d } else { 0 }];
            let mut dk = vec![0.0f32; if want_kv { g.bh * g.lk * g.d } else { 0 }];
            let mut dvv = vec![0.0f32; if want_kv { g.bh * g.lk * g.dv } else { 0 }];
            let io = CpuBackward { q: c(q)?, k: c(k)?, v: c(v)?, lse: c(lse)?, dout: c(dout)?, dsum: c(&dsum)? };
            cpu_attention_backward(&io, &mut dq, &mut dk, &mut dvv, g);
            Ok((
                want_q.then(|| Tensor::cpu(dq, &[g.bh, g.lq, g.d])),
                want_kv.then(|| Tensor::cpu(dk, &[g.bh, g.lk, g.d])),
                want_kv.then(|| Tensor::cpu(dvv, &[g.bh, g.lk, g.dv])),
            ))
        }
        Device::Gpu(ctx) => {
            let params = g.params()?;
            let bh = crate::ops::u32_of(OP, g.bh)?;
            let ins = [q.gpu_buf(OP)?, k.gpu_buf(OP)?, v.gpu_buf(OP)?];
            let (lb, db, sb) = (lse.gpu_buf(OP)?, dout.gpu_buf(OP)?, dsum.gpu_buf(OP)?);
            let dq = if want_q {
                let dq = Tensor::gpu_empty(&ctx, OP, &[g.bh, g.lq, g.d])?;
                let bufs = [ins[0], ins[1], ins[2], dq.gpu_buf(OP)?, lb, db, sb];
                ctx.dispatch(gpu_shader(g.d, g.dv), "backward_dq", &params, &bufs, [g.lq.div_ceil(64) as u32, bh, 1])?;
                Some(dq)
            } else {
                None
            };
            let (dk, dvv) = if want_kv {
                let dk = Tensor::gpu_empty(&ctx, OP, &[g.bh, g.lk, g.d])?;
                let dvv = Tensor::gpu_empty(&ctx, OP, &[g.bh, g.lk, g.dv])?;
                let bufs = [ins[0], ins[1], ins[2], dk.gpu_buf(OP)?, lb, db, sb, dvv.gpu_buf(OP)?];
                ctx.dispatch(
                    gpu_shader(g.d, g.dv),
                    "backward_dkdv",
                    &params,
                    &bufs,
                    [g.lk.div_ceil(64) as u32, bh, 1],
                )?;
                (Some(dk), Some(dvv))
            } else {
                (None, None)
            };
            Ok((dq, dk, dvv))
        }
    }
}

/// CPU twin of the forward: per (batch*head, chunk of queries) a score tile, a stable
/// softmax, and P V; also the row log-sum-exp `lse` (BH * Lq).
fn cpu_attention(q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], lse: &mut [f32], g: &Geom) {
    use rayon::prelude::*;
    let Geom { lq, lk, d, dv, scale, .. } = *g;
    if lq == 0 || dv == 0 {
        return;
    }
    o.par_chunks_mut(lq * dv).zip(lse.par_chunks_mut(lq)).enumerate().for_each(|(b, (oh, lh))| {
        let (qh, kh, vh) =
            (&q[b * lq * d..(b + 1) * lq * d], &k[b * lk * d..(b + 1) * lk * d], &v[b * lk * dv..(b + 1) * lk * dv]);
        oh.par_chunks_mut(CPU_ROWS * dv).zip(lh.par_chunks_mut(CPU_ROWS)).enumerate().for_each_init(
            || (vec![0.0f32; CPU_ROWS * lk], vec![0.0f32; CPU_ROWS]),
            |(s, inv), (ci, (oc, lc))| {
                let r0 = ci * CPU_ROWS;
                let rows = oc.len() / dv;
                let st = &mut s[..rows * lk];
                let qv = MatRef { data: &qh[r0 * d..], rs: d, cs: 1 };
                sgemm(rows, lk, d, qv, MatRef { data: kh, rs: 1, cs: d }, st, lk, false, false);
                softmax_rows(st, lk, scale, lc, &mut inv[..rows]);
                sgemm(
                    rows,
                    dv,
                    lk,
                    MatRef { data: st, rs: lk, cs: 1 },
                    MatRef { data: vh, rs: dv, cs: 1 },
                    oc,
                    dv,
                    false,
                    false,
                );
                // The softmax's normalisation, on the output rows (Dv wide, not Lk).
                for (orow, &iv) in oc.chunks_mut(dv).zip(inv.iter()) {
                    orow.iter_mut().for_each(|x| *x *= iv);
                }
            },
        );
    });
}

/// Independent partial maxima and sums per row: one AVX-512 register's worth.
const LANES: usize = 16;

simd_fn! {
    /// Score rows `st` (rows, Lk) of raw Q.K to exp(scale s - m) in place, with each row's
    /// log-sum-exp in `lse` and 1 / sum in `inv`: two passes over a row (max; exp and sum).
    fn softmax_rows(st: &mut [f32], lk: usize, scale: f32, lse: &mut [f32], inv: &mut [f32]) {
        for ((row, l), iv) in st.chunks_mut(lk).zip(lse.iter_mut()).zip(inv.iter_mut()) {
            let mut mx = [f32::NEG_INFINITY; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for i in 0..LANES {
                    let v = c[i] * scale;
                    mx[i] = if v > mx[i] { v } else { mx[i] };
                }
            }
            let mut m = mx.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            for &x in tail {
                let v = x * scale;
                m = if v > m { v } else { m };
            }
            let mut acc = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    let e = fast_exp(c[i] * scale - m);
                    c[i] = e;
                    acc[i] += e;
                }
            }
            let mut sum = acc.iter().sum::<f32>();
            for x in chunks.into_remainder() {
                let e = fast_exp(*x * scale - m);
                *x = e;
                sum += e;
            }
            *l = m + sum.ln();
            *iv = 1.0 / sum;
        }
    }
}

simd_fn! {
    /// Probability rows of the backward: exp(scale s - lse) in place, `pt` (rows, Lk).
    fn prob_rows(pt: &mut [f32], lk: usize, scale: f32, lse: &[f32]) {
        for (row, &l) in pt.chunks_mut(lk).zip(lse) {
            row.iter_mut().for_each(|x| *x = fast_exp(*x * scale - l));
        }
    }
}

simd_fn! {
    /// dS = scale P (dP - dsum) in place: `dst` (rows, Lk) holds dP, `pt` P, `dsum` (rows,).
    fn ds_rows(dst: &mut [f32], pt: &[f32], lk: usize, scale: f32, dsum: &[f32]) {
        for ((drow, prow), &s) in dst.chunks_mut(lk).zip(pt.chunks(lk)).zip(dsum) {
            drow.iter_mut().zip(prow).for_each(|(x, &pv)| *x = scale * pv * (*x - s));
        }
    }
}

/// Inputs of the CPU backward, all contiguous (BH, L, *) or (BH, L).
struct CpuBackward<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    lse: &'a [f32],
    dout: &'a [f32],
    dsum: &'a [f32],
}

/// One head's gradient outputs.
struct HeadGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// CPU twin of the backward: per head, chunks of queries recompute P = exp(scale S - lse)
/// and accumulate dV += P^T dO, dK += scale dS^T Q, and write dQ = scale dS K. Empty
/// `dq` or `dk`/`dv` mean "not wanted".
fn cpu_attention_backward(io: &CpuBackward, dq: &mut [f32], dk: &mut [f32], dv_out: &mut [f32], g: &Geom) {
    use rayon::prelude::*;
    let Geom { bh, lq, lk, d, dv, scale } = *g;
    let (want_q, want_kv) = (!dq.is_empty(), !dk.is_empty());
    // Per head: its slices of dQ, dK and dV (empty when not wanted).
    fn split(buf: &mut [f32], len: usize, bh: usize) -> Vec<&mut [f32]> {
        if buf.is_empty() {
            (0..bh).map(|_| &mut [][..]).collect()
        } else {
            buf.chunks_mut(len).collect()
        }
    }
    let heads: Vec<HeadGrads> = split(dq, lq * d, bh)
        .into_iter()
        .zip(split(dk, lk * d, bh))
        .zip(split(dv_out, lk * dv, bh))
        .map(|((dq, dk), dv)| HeadGrads { dq, dk, dv })
        .collect();
    heads.into_par_iter().enumerate().for_each(|(b, HeadGrads { dq: dqh, dk: dkh, dv: dvh })| {
        let qh = &io.q[b * lq * d..(b + 1) * lq * d];
        let kh = &io.k[b * lk * d..(b + 1) * lk * d];
        let vh = &io.v[b * lk * dv..(b + 1) * lk * dv];
        let doh = &io.dout[b * lq * dv..(b + 1) * lq * dv];
        let (lh, sh) = (&io.lse[b * lq..(b + 1) * lq], &io.dsum[b * lq..(b + 1) * lq]);
        let mut p = vec![0.0f32; CPU_ROWS * lk];
        let mut ds = vec![0.0f32; CPU_ROWS * lk];
        for r0 in (0..lq).step_by(CPU_ROWS) {
            let rows = CPU_ROWS.min(lq - r0);
            let (pt, dst) = (&mut p[..rows * lk], &mut ds[..rows * lk]);
            let qc = MatRef { data: &qh[r0 * d..], rs: d, cs: 1 };
            let doc = MatRef { data: &doh[r0 * dv..], rs: dv, cs: 1 };
            sgemm(rows, lk, d, qc, MatRef { data: kh, rs: 1, cs: d }, pt, lk, false, false);
            prob_rows(pt, lk, scale, &lh[r0..r0 + rows]);
            // dP = dO V^T, then dS = scale P (dP - dsum) in place.
            sgemm(rows, lk, dv, doc, MatRef { data: vh, rs: 1, cs: dv }, dst, lk, false, false);
            ds_rows(dst, pt, lk, scale, &sh[r0..r0 + rows]);
            if want_kv {
                let pt_t = MatRef { data: pt, rs: 1, cs: lk };
                sgemm(lk, dv, rows, pt_t, doc, dvh, dv, true, false);
                sgemm(lk, d, rows, MatRef { data: dst, rs: 1, cs: lk }, qc, dkh, d, true, false);
            }
            if want_q {
                let dst_m = MatRef { data: dst, rs: lk, cs: 1 };
                sgemm(rows, d, lk, dst_m, MatRef { data: kh, rs: d, cs: 1 }, &mut dqh[r0 * d..], d, false, false);
            }
        }
    });
}

#[cfg(test)]
mod simd_tests {
    /// The AVX-512 and AVX2 builds of the softmax loops against the baseline one, on rows
    /// with a tail past the 16-lane blocks: the same arithmetic in the same order, so the
    /// same bits (each is only a different compilation of one body).
    #[test]
    fn softmax_versions_agree() {
        let (rows, lk, scale) = (5usize, 4099usize, 0.37f32);
        let mut rng = crate::rng::Rng::new(7);
        let scores: Vec<f32> = rng.normal_vec(rows * lk).into_iter().map(|x| x * 6.0).collect();
        let lse_in: Vec<f32> = (0..rows).map(|i| 3.0 + i as f32).collect();
        let run = |which: &str| {
            let (mut st, mut lse, mut inv) = (scores.clone(), vec![0f32; rows], vec![0f32; rows]);
            let (mut pt, mut ds) = (scores.clone(), scores.iter().map(|x| x * 0.5 - 1.0).collect::<Vec<f32>>());
            match which {
                "base" => {
                    super::softmax_rows::base(&mut st, lk, scale, &mut lse, &mut inv);
                    super::prob_rows::base(&mut pt, lk, scale, &lse_in);
                    super::ds_rows::base(&mut ds, &pt, lk, scale, &lse_in);
                }
                #[cfg(target_arch = "x86_64")]
                "v3" => unsafe {
                    super::softmax_rows::v3(&mut st, lk, scale, &mut lse, &mut inv);
                    super::prob_rows::v3(&mut pt, lk, scale, &lse_in);
                    super::ds_rows::v3(&mut ds, &pt, lk, scale, &lse_in);
                },
                #[cfg(target_arch = "x86_64")]
                "v4" => unsafe {
                    super::softmax_rows::v4(&mut st, lk, scale, &mut lse, &mut inv);
                    super::prob_rows::v4(&mut pt, lk, scale, &lse_in);
                    super::ds_rows::v4(&mut ds, &pt, lk, scale, &lse_in);
                },
                _ => unreachable!(),
            }
            (st, lse, inv, pt, ds)
        };
        let want = run("base");
        // The baseline itself: each row sums to 1 after the 1/sum it reports.
        for (r, row) in want.0.chunks(lk).enumerate() {
            let s: f64 = row.iter().map(|&x| x as f64).sum::<f64>() * want.2[r] as f64;
            assert!((s - 1.0).abs() < 1e-5, "row {r} sums to {s}");
        }
        // dS = scale P (dP - dsum), element by element, against f64.
        for (i, &got) in want.4.iter().enumerate() {
            let (p, dp, s) = (want.3[i] as f64, (scores[i] * 0.5 - 1.0) as f64, lse_in[i / lk] as f64);
            let w = scale as f64 * p * (dp - s);
            assert!((got as f64 - w).abs() <= 1e-6 * w.abs().max(1e-30), "dS {i}: {got} vs {w}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let mut checked = 0;
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                assert!(run("v3") == want, "the AVX2 build differs from the baseline");
                checked += 1;
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert!(run("v4") == want, "the AVX-512 build differs from the baseline");
                checked += 1;
            }
            eprintln!("softmax versions compared with the baseline: {checked}");
        }
    }
}
