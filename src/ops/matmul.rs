//! Batched matmul with either operand transposed (`shaders/matmul.wgsl`); the CPU twin
//! runs the `gemm` crate. `sgemm` is shared with conv2d and attention on the CPU.

use crate::device::Device;
use crate::device::Shader;
use crate::error::{Error, Result};
use crate::ops::conv2d::{sum_splits, SplitTerms};
use crate::ops::Operands;
use crate::shaders::{
    MATMUL_128, MATMUL_128X64, MATMUL_64, MATMUL_64X128, MATMUL_F16BM_128, MATMUL_F16BM_128X64, MATMUL_F16BM_64,
    MATMUL_F16BM_64X128, MATMUL_F16B_128, MATMUL_F16B_128X64, MATMUL_F16B_64, MATMUL_F16B_64X128, MATMUL_F16M_128,
    MATMUL_F16M_128X64, MATMUL_F16M_64, MATMUL_F16M_64X128, MATMUL_F16_128, MATMUL_F16_128X64, MATMUL_F16_64,
    MATMUL_F16_64X128,
};
use crate::tensor::DType;
use crate::tensor::Tensor;

/// Workgroups a dispatch should have before bigger tiles pay: about 1.5 waves on a
/// 132-multiprocessor GPU. Fewer, and 128-wide tiles leave multiprocessors idle.
pub const BIG_TILE_GROUPS: usize = 192;

/// The output tile (rows, columns per workgroup) the GPU matmul uses for a batch of
/// `batch` (M, N) products: the largest of 128x128, 128x64 / 64x128 and 64x64 that still
/// makes `BIG_TILE_GROUPS` workgroups. Bigger tiles reuse each loaded value more (8x8
/// register blocks instead of 4x4).
pub fn tile(m: usize, n: usize, batch: usize) -> (usize, usize) {
    let groups = |bm: usize, bn: usize| m.div_ceil(bm) * n.div_ceil(bn) * batch;
    if groups(128, 128) >= BIG_TILE_GROUPS {
        (128, 128)
    } else if m >= n && groups(128, 64) >= BIG_TILE_GROUPS {
        (128, 64)
    } else if groups(64, 128) >= BIG_TILE_GROUPS {
        (64, 128)
    } else if groups(128, 64) >= BIG_TILE_GROUPS {
        (128, 64)
    } else {
        (64, 64)
    }
}

/// Split-K when a product (a convolution's implicit GEMM; a matmul where
/// `GpuContext::matmul_split_k` is on) has fewer output tiles than `BIG_TILE_GROUPS` (1280
/// channels at 8x8 make 20 workgroups, a sixth of an H100's multiprocessors, each walking K =
/// 11520; a LoRA adapter's gradient has 5 tiles and K = tokens): workgroups it aims for (two
/// waves on 132 multiprocessors), the fewest K elements per split, the most splits.
const SPLIT_TARGET: usize = 264;
const SPLIT_MIN_CHUNK: usize = 512;
const SPLIT_MAX: usize = 16;

/// (splits, K elements per split) for a product of `tiles` output tiles over `k`; None where
/// one pass fills the GPU or K is too short to share.
pub fn k_splits(tiles: usize, k: usize) -> Option<(usize, usize)> {
    if tiles >= BIG_TILE_GROUPS {
        return None;
    }
    let want = SPLIT_TARGET.div_ceil(tiles.max(1)).min(k / SPLIT_MIN_CHUNK).min(SPLIT_MAX);
    if want < 2 {
        return None;
    }
    let chunk = k.div_ceil(want).next_multiple_of(16);
    let splits = k.div_ceil(chunk);
    (splits >= 2).then_some((splits, chunk))
}

/// The variant for tile `t` and the operands; `f16_math`: f16 operands multiply in f16.
fn tile_shader(t: (usize, usize), ops: Operands, f16_math: bool) -> &'static Shader {
    use Operands::*;
    match (t, ops) {
        ((128, 128), F16) if f16_math => &MATMUL_F16M_128,
        ((128, 64), F16) if f16_math => &MATMUL_F16M_128X64,
        ((64, 128), F16) if f16_math => &MATMUL_F16M_64X128,
        (_, F16) if f16_math => &MATMUL_F16M_64,
        ((128, 128), F16Weight) if f16_math => &MATMUL_F16BM_128,
        ((128, 64), F16Weight) if f16_math => &MATMUL_F16BM_128X64,
        ((64, 128), F16Weight) if f16_math => &MATMUL_F16BM_64X128,
        (_, F16Weight) if f16_math => &MATMUL_F16BM_64,
        ((128, 128), F32) => &MATMUL_128,
        ((128, 64), F32) => &MATMUL_128X64,
        ((64, 128), F32) => &MATMUL_64X128,
        (_, F32) => &MATMUL_64,
        ((128, 128), F16) => &MATMUL_F16_128,
        ((128, 64), F16) => &MATMUL_F16_128X64,
        ((64, 128), F16) => &MATMUL_F16_64X128,
        (_, F16) => &MATMUL_F16_64,
        ((128, 128), F16Weight) => &MATMUL_F16B_128,
        ((128, 64), F16Weight) => &MATMUL_F16B_128X64,
        ((64, 128), F16Weight) => &MATMUL_F16B_64X128,
        (_, F16Weight) => &MATMUL_F16B_64,
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub batch: u32,
    pub a_rs: u32,
    pub a_cs: u32,
    pub b_rs: u32,
    pub b_cs: u32,
    pub a_bs: u32,
    pub b_bs: u32,
    /// 1: add `bias[col]`; 1: add the residual (both as the output is written).
    pub has_bias: u32,
    pub has_res: u32,
    /// Split-K: K elements per split (the output is then the partials); 0: no split.
    pub chunk: u32,
    pub _pad: [u32; 3],
}

/// A strided matrix view into a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `c (m, n, row stride ldc) = a (m, k) x b (k, n)`, plus `c` when `accumulate`.
/// `parallel` lets the GEMM use rayon; pass false when already inside a parallel loop.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs;
    // The bounds the unsafe call relies on.
    assert!(k == 0 || last(m, k, a.rs, a.cs) < a.data.len(), "sgemm: A view out of bounds");
    assert!(k == 0 || last(k, n, b.rs, b.cs) < b.data.len(), "sgemm: B view out of bounds");
    assert!(last(m, n, ldc, 1) < c.len(), "sgemm: C view out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // Whatever the thread count and `parallel` (then the ranges run in turn), so that results
    // do not depend on them.
    if m.min(n) <= SKINNY && m * n <= 1 << 16 && k >= SKINNY_MIN_K {
        return sgemm_split_k(m, n, k, a, b, c, ldc, accumulate, parallel);
    }
    // SAFETY: every index the views can produce was checked against the slices above,
    // and `c` is borrowed mutably, so it aliases neither input.
    unsafe { sgemm_raw(m, n, k, a, b, c.as_mut_ptr(), ldc, accumulate, parallel) }
}

/// Products with at most this many rows or columns and a K of at least `SKINNY_MIN_K` split K
/// into ranges of `SKINNY_CHUNK` on the CPU's threads: a LoRA adapter's gradients (rank 4 by
/// K = tokens) gave the GEMM crate one block to parallelise over and ran 2.7x slower than
/// PyTorch's.
const SKINNY: usize = 16;
const SKINNY_MIN_K: usize = 2048;
/// Fixed, not per thread: the sums' grouping, so the result, is the same on every machine.
const SKINNY_CHUNK: usize = 1024;

/// [`sgemm`] with K cut into ranges of `SKINNY_CHUNK`, each a product into its own (m, n)
/// buffer on some thread, then summed into `c` in range order (so the result depends on the
/// shapes alone, not on threads or scheduling).
#[allow(clippy::too_many_arguments)]
fn sgemm_split_k(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    use rayon::prelude::*;
    let chunk = SKINNY_CHUNK;
    // (ranges, m, n): each range's product.
    let mut parts = vec![0.0f32; k.div_ceil(chunk) * m * n];
    let range = |(i, p): (usize, &mut [f32])| {
        let (kb, ke) = (i * chunk, ((i + 1) * chunk).min(k));
        let av = MatRef { data: &a.data[kb * a.cs..], ..a };
        let bv = MatRef { data: &b.data[kb * b.rs..], ..b };
        // ke - kb < SKINNY_MIN_K: this does not split again.
        sgemm(m, n, ke - kb, av, bv, p, n, false, false);
    };
    if parallel {
        parts.par_chunks_mut(m * n).enumerate().for_each(range);
    } else {
        parts.chunks_mut(m * n).enumerate().for_each(range);
    }
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if !accumulate {
            row.fill(0.0);
        }
        for p in parts.chunks(m * n) {
            row.iter_mut().zip(&p[i * n..(i + 1) * n]).for_each(|(o, &v)| *o += v);
        }
    }
}

/// `sgemm` writing through a raw pointer, for callers whose tasks fill disjoint column
/// blocks of one output (no overlapping `&mut` slices may exist for those).
///
/// # Safety
/// `c` must be valid for writes at `i * ldc + j` for all i < m, j < n, and no other live
/// reference may cover those elements; `a` and `b` must be in bounds as `sgemm` checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_raw(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let par = if parallel && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Shapes of a batched matmul after transposes: batch count, M, N, K and per-operand batch counts.
struct Plan {
    batch_shape: Vec<usize>,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a_batched: bool,
    b_batched: bool,
}

fn plan(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Result<Plan> {
    const OP: &str = "matmul";
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::shape(OP, format!("operands need at least 2 dims, got {a:?} and {b:?}")));
    }
    let (ar, ac) = (a[a.len() - 2], a[a.len() - 1]);
    let (br, bc) = (b[b.len() - 2], b[b.len() - 1]);
    let (m, ka) = if ta { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if tb { (bc, br) } else { (br, bc) };
    if ka != kb {
        return Err(Error::shape(
            OP,
            format!(
                "{a:?}{} x {b:?}{}: inner dims {ka} != {kb}",
                if ta { "^T" } else { "" },
                if tb { "^T" } else { "" }
            ),
        ));
    }
    let (ba, bb) = (&a[..a.len() - 2], &b[..b.len() - 2]);
    let (na, nb) = (ba.iter().product::<usize>(), bb.iter().product::<usize>());
    let batch_shape = if ba == bb || nb == 1 && ba.len() >= bb.len() {
        ba.to_vec()
    } else if na == 1 && bb.len() >= ba.len() {
        bb.to_vec()
    } else {
        return Err(Error::shape(OP, format!("batch dims of {a:?} and {b:?} must match or one side must have none")));
    };
    Ok(Plan { batch: batch_shape.iter().product(), batch_shape, m, n, k: ka, a_batched: na > 1, b_batched: nb > 1 })
}

/// Terms added to a matmul's output as it is written: bias (N), residual (shaped like it).
#[derive(Clone, Copy, Default)]
struct Epilogue<'a> {
    bias: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
}

/// What a matmul's backward keeps: each operand only when the other needs a gradient (dA
/// needs B, dB needs A), so a frozen weight keeps no activation alive; the shapes always.
struct Saved {
    a: Option<Tensor>,
    b: Option<Tensor>,
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
}

impl Saved {
    fn of(a: &Tensor, b: &Tensor) -> Saved {
        Saved {
            a: b.is_tracked().then(|| a.detach()),
            b: a.is_tracked().then(|| b.detach()),
            a_shape: a.shape().to_vec(),
            b_shape: b.shape().to_vec(),
        }
    }
}

/// Gradients of `op(a) x op(b)` for `g`, where needed.
fn matmul_backward(
    s: &Saved,
    g: &Tensor,
    ta: bool,
    tb: bool,
    need_a: bool,
    need_b: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let none = Epilogue::default();
    let unsaved = || Error::Invalid("matmul backward: an operand it needs was not saved".into());
    // With op(A) (M, K) and op(B) (K, N): d op(A) = g op(B)^T, d op(B) = op(A)^T g,
    // written for each stored layout so nothing is transposed by a copy.
    let ga = if need_a {
        let b = s.b.as_ref().ok_or_else(unsaved)?;
        let d = match (ta, tb) {
            (false, false) => g.matmul_raw(b, false, true, none)?,
            (false, true) => g.matmul_raw(b, false, false, none)?,
            (true, false) => b.matmul_raw(g, false, true, none)?,
            (true, true) => b.matmul_raw(g, true, true, none)?,
        };
        Some(d.sum_to_shape(&s.a_shape)?)
    } else {
        None
    };
    let gb = if need_b {
        let a = s.a.as_ref().ok_or_else(unsaved)?;
        // A shared 2-D B (a linear layer's weight) against a batched A: fold the batch
        // into the rows instead of a batched product and a sum.
        let fold = s.b_shape.len() == 2 && a.rank() > 2 && !ta;
        let (a2, g2) = if fold {
            let k = a.shape()[a.rank() - 1];
            let n = g.shape()[g.rank() - 1];
            (a.reshape_to(&[a.numel() / k, k])?, g.reshape_to(&[g.numel() / n, n])?)
        } else {
            (a.clone(), g.clone())
        };
        let d = match (ta, tb) {
            (false, false) => a2.matmul_raw(&g2, true, false, none)?,
            (true, false) => a2.matmul_raw(&g2, false, false, none)?,
            (false, true) => g2.matmul_raw(&a2, true, false, none)?,
            (true, true) => g2.matmul_raw(&a2, true, true, none)?,
        };
        Some(d.sum_to_shape(&s.b_shape)?)
    } else {
        None
    };
    Ok((ga, gb))
}

impl Tensor {
    /// `(..., M, K) x (..., K, N) -> (..., M, N)`; batch dims equal, or absent on one side.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        self.matmul_t(other, false, false)
    }

    /// Matmul with `self` read as `(..., K, M)` when `ta`, `other` as `(..., N, K)` when `tb`.
    /// Both f32; both f16 (the product is f32: f16 storage, f32 arithmetic; no gradient); or an
    /// f32 `self` and an f16 `other` (a weight stored in f16: gradients reach `self`).
    pub fn matmul_t(&self, other: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
        let out = self.matmul_raw(other, ta, tb, Epilogue::default())?;
        if self.dtype() == DType::F16 {
            if self.is_tracked() || other.is_tracked() {
                return Err(Error::Invalid("matmul: f16 operands have no backward (cast to f32 to train)".into()));
            }
            return Ok(out);
        }
        let saved = Saved::of(self, other);
        Ok(crate::autograd::record("matmul", out, &[self, other], move |g, needs| {
            let (ga, gb) = matmul_backward(&saved, g, ta, tb, needs[0], needs[1])?;
            Ok(vec![ga, gb])
        }))
    }

    /// A linear layer: `self` (..., K) x `weight` (N, K)^T + `bias` (N) + `residual` (..., N),
    /// the bias and the residual added as the output is written (no pass per term).
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "linear";
        let n = weight.shape().first().copied().unwrap_or(0);
        if let Some(b) = bias {
            if b.shape() != [n] {
                return Err(Error::shape(
                    OP,
                    format!("bias {:?} for weight {:?}: expected [{n}]", b.shape(), weight.shape()),
                ));
            }
        }
        let out = self.matmul_raw(weight, false, true, Epilogue { bias, residual })?;
        let inputs: Vec<&Tensor> = [Some(self), Some(weight), bias, residual].into_iter().flatten().collect();
        if !crate::autograd::will_record(&inputs) {
            return Ok(out);
        }
        let saved = Saved::of(self, weight);
        let (has_b, has_r) = (bias.is_some(), residual.is_some());
        Ok(crate::autograd::record(OP, out, &inputs, move |g, needs| {
            let (ga, gb) = matmul_backward(&saved, g, false, true, needs[0], needs[1])?;
            let mut grads = vec![ga, gb];
            if has_b {
                let rows = g.numel().checked_div(n).unwrap_or(0);
                grads.push(needs[2].then(|| g.reshape_to(&[rows, n])?.sum(0, false)).transpose()?);
            }
            if has_r {
                grads.push(needs[2 + has_b as usize].then(|| g.clone()));
            }
            Ok(grads)
        }))
    }

    fn matmul_raw(&self, other: &Tensor, ta: bool, tb: bool, e: Epilogue) -> Result<Tensor> {
        const OP: &str = "matmul";
        let ops = Operands::of(OP, self.dtype(), other.dtype())?;
        self.same_device(OP, other)?;
        let p = plan(self.shape(), other.shape(), ta, tb)?;
        for t in [e.bias, e.residual].into_iter().flatten() {
            t.ensure_f32(OP)?;
            self.same_device(OP, t)?;
        }
        if let Some(b) = e.bias {
            if b.shape() != [p.n] {
                return Err(Error::shape(OP, format!("bias {:?}: expected [{}]", b.shape(), p.n)));
            }
        }
        let (m, n, k) = (p.m, p.n, p.k);
        // Element strides of op(A) (M, K) and op(B) (K, N) inside one batch.
        let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
        let a_bs = if p.a_batched { m * k } else { 0 };
        let b_bs = if p.b_batched { k * n } else { 0 };
        let mut out_shape = p.batch_shape.clone();
        out_shape.extend([m, n]);
        if let Some(r) = e.residual {
            if r.shape() != out_shape {
                return Err(Error::shape(
                    OP,
                    format!("residual {:?} must be the output's shape {out_shape:?}", r.shape()),
                ));
            }
        }
        match self.device() {
            Device::Cpu => {
                // f16 operands are widened: their products are exact in f32, as on the GPU.
                let (a, b) = (Operands::cpu_values(OP, self)?, Operands::cpu_values(OP, other)?);
                let (a, b) = (&a[..], &b[..]);
                // The epilogue's terms go in first and the GEMM accumulates onto them.
                // Built in one pass (no zeroing first).
                let rows = p.batch * m;
                let mut c = match (e.residual, e.bias) {
                    (Some(r), None) => r.cpu_f32(OP)?.to_vec(),
                    (Some(r), Some(bias)) => {
                        let bias = bias.cpu_f32(OP)?;
                        let mut c = r.cpu_f32(OP)?.to_vec();
                        if n > 0 {
                            c.chunks_mut(n).for_each(|row| row.iter_mut().zip(bias).for_each(|(o, &v)| *o += v));
                        }
                        c
                    }
                    (None, Some(bias)) => bias.cpu_f32(OP)?.repeat(rows),
                    (None, None) => vec![0.0f32; rows * n],
                };
                let acc = e.bias.is_some() || e.residual.is_some();
                let one = |bi: usize, cb: &mut [f32], parallel: bool| {
                    let av = MatRef { data: &a[bi * a_bs..], rs: a_rs, cs: a_cs };
                    let bv = MatRef { data: &b[bi * b_bs..], rs: b_rs, cs: b_cs };
                    sgemm(m, n, k, av, bv, cb, n, acc, parallel);
                };
                let threads = rayon::current_num_threads();
                if p.batch >= threads && m * n * k < 1 << 22 && m * n > 0 {
                    use rayon::prelude::*;
                    c.par_chunks_mut(m * n).enumerate().for_each(|(bi, cb)| one(bi, cb, false));
                } else if m * n > 0 {
                    for (bi, cb) in c.chunks_mut(m * n).enumerate() {
                        one(bi, cb, true);
                    }
                }
                Ok(Tensor::cpu(c, &out_shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &out_shape)?;
                let u = |x: usize| crate::ops::u32_of(OP, x);
                let params = MatmulParams {
                    m: u(m)?,
                    n: u(n)?,
                    k: u(k)?,
                    batch: u(p.batch)?,
                    a_rs: u(a_rs)?,
                    a_cs: u(a_cs)?,
                    b_rs: u(b_rs)?,
                    b_cs: u(b_cs)?,
                    a_bs: u(a_bs)?,
                    b_bs: u(b_bs)?,
                    has_bias: e.bias.is_some() as u32,
                    has_res: e.residual.is_some() as u32,
                    chunk: 0,
                    _pad: [0; 3],
                };
                let t = tile(m, n, p.batch);
                let groups = [u(n.div_ceil(t.1))?, u(m.div_ceil(t.0))?, u(p.batch)?];
                ops.check_adapter(OP, &ctx)?;
                let shader = tile_shader(t, ops, ctx.f16_math());
                let (ab, bb) = (self.gpu_buf_any(OP)?, other.gpu_buf_any(OP)?);
                let res = e.residual.map(|t| t.gpu_buf(OP)).transpose()?;
                let bias = e.bias.map(|t| t.gpu_buf(OP)).transpose()?;
                let tiles = n.div_ceil(t.1) * m.div_ceil(t.0) * p.batch;
                let split = if ctx.matmul_split_k() { k_splits(tiles, k) } else { None };
                if let Some((splits, chunk)) = split {
                    // Partials (splits, batch, M, N), then their sum with bias and residual.
                    let len = out.numel();
                    let part = Tensor::gpu_empty(&ctx, OP, &[splits, len])?;
                    let pb = part.gpu_buf(OP)?;
                    let sp = MatmulParams { chunk: u(chunk)?, has_bias: 0, has_res: 0, ..params };
                    let z = u(splits * p.batch)?;
                    // No epilogue here, so `a` fills both term slots (never read).
                    ctx.dispatch(shader, "main", &sp, &[ab, bb, pb, ab, ab], [groups[0], groups[1], z])?;
                    let terms = SplitTerms { res, bias, temb: None };
                    sum_splits(OP, &ctx, pb, &out, splits, (u(n)?, 1), terms)?;
                    return Ok(out);
                }
                // `a` fills the slot of an absent term (its flag keeps the kernel from reading
                // it; a slot is raw bytes, so an f16 `a` binds as well).
                let bufs = [ab, bb, out.gpu_buf(OP)?, res.unwrap_or(ab), bias.unwrap_or(ab)];
                ctx.dispatch(shader, "main", &params, &bufs, groups)?;
                Ok(out)
            }
        }
    }
}
