//! Scaled dot-product attention, multi-head, self or cross (`shaders/attention.wgsl`).
//!
//! The GPU kernel is fused with an online softmax, so no score matrix is ever stored; head
//! dims above its register budget take a chunked path whose score tile is bounded by the
//! binding limit. The CPU twin computes score tiles of `CPU_ROWS` queries with `sgemm`.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::matmul::{sgemm, MatRef};
use crate::shaders::ATTENTION;
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
        let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
        let mut out_shape = qs.to_vec();
        out_shape[r - 1] = dv;
        match self.device() {
            Device::Cpu => {
                let (q, kk, vv) = (self.cpu_f32(OP)?, k.cpu_f32(OP)?, v.cpu_f32(OP)?);
                let mut o = vec![0.0f32; bh * lq * dv];
                cpu_attention(q, kk, vv, &mut o, bh, lq, lk, d, dv, scale);
                Ok(Tensor::cpu(o, &out_shape))
            }
            Device::Gpu(ctx) if d <= FUSED_MAX_D && dv <= FUSED_MAX_D => {
                let out = Tensor::gpu_empty(&ctx, OP, &out_shape)?;
                let u = |x: usize| crate::ops::u32_of(OP, x);
                let params =
                    AttentionParams { bh: u(bh)?, lq: u(lq)?, lk: u(lk)?, d: u(d)?, dv: u(dv)?, scale, _pad: [0; 2] };
                let groups = [lq.div_ceil(64) as u32, u(bh)?, 1];
                let bufs = [self.gpu_buf(OP)?, k.gpu_buf(OP)?, v.gpu_buf(OP)?, out.gpu_buf(OP)?];
                ctx.dispatch(&ATTENTION, "main", &params, &bufs, groups)?;
                Ok(out)
            }
            Device::Gpu(ctx) => {
                // Wide heads: scores for a chunk of queries at a time, within half a binding.
                let budget = (ctx.limits.max_storage_buffer_binding_size / 2 / 4) as usize;
                let rows = (budget / (bh * lk)).clamp(1, lq.max(1));
                let q3 = self.reshape_to(&[bh, lq, d])?;
                let (k3, v3) = (k.reshape_to(&[bh, lk, d])?, v.reshape_to(&[bh, lk, dv])?);
                let mut parts = Vec::new();
                for s in (0..lq).step_by(rows) {
                    let qc = q3.slice(1, s, rows.min(lq - s))?; // (BH, rows, D)
                    let p = qc.matmul_t(&k3, false, true)?.mul_scalar(scale)?.softmax_last()?; // (BH, rows, Lk)
                    parts.push(p.matmul(&v3)?); // (BH, rows, Dv)
                }
                let refs: Vec<&Tensor> = parts.iter().collect();
                Tensor::concat(&refs, 1)?.reshape_to(&out_shape)
            }
        }
    }
}

/// CPU twin: per (batch*head, chunk of queries) a score tile, a stable softmax, and P V.
#[allow(clippy::too_many_arguments)]
fn cpu_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    bh: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f32,
) {
    use rayon::prelude::*;
    if lq == 0 || dv == 0 {
        return;
    }
    debug_assert_eq!(o.len(), bh * lq * dv);
    o.par_chunks_mut(lq * dv).enumerate().for_each(|(b, oh)| {
        let (qh, kh, vh) =
            (&q[b * lq * d..(b + 1) * lq * d], &k[b * lk * d..(b + 1) * lk * d], &v[b * lk * dv..(b + 1) * lk * dv]);
        oh.par_chunks_mut(CPU_ROWS * dv).enumerate().for_each_init(
            || vec![0.0f32; CPU_ROWS * lk],
            |s, (ci, oc)| {
                let r0 = ci * CPU_ROWS;
                let rows = oc.len() / dv;
                let st = &mut s[..rows * lk];
                let qv = MatRef { data: &qh[r0 * d..], rs: d, cs: 1 };
                sgemm(rows, lk, d, qv, MatRef { data: kh, rs: 1, cs: d }, st, lk, false, false);
                for row in st.chunks_mut(lk) {
                    row.iter_mut().for_each(|x| *x *= scale);
                    let m = crate::ops::max_lanes(row);
                    row.iter_mut().for_each(|x| *x = crate::ops::fast_exp(*x - m));
                    let inv = 1.0 / crate::ops::sum_lanes(row);
                    row.iter_mut().for_each(|x| *x *= inv);
                }
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
            },
        );
    });
}
