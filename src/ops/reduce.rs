//! Sum, mean and max over one axis, whole-tensor sums, and `sum_to_shape` for broadcast
//! gradients (`shaders/reduce.wgsl`). A tensor is viewed as (outer, len, inner) around the axis.

use rayon::prelude::*;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{u32_of, PAR_MIN};
use crate::shaders::{with_reductions, REDUCE, REDUCE_SUBGROUP};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

impl ReduceOp {
    /// Code of the shader's `op`: mean is a sum with `scale = 1 / len`.
    fn code(self) -> u32 {
        match self {
            ReduceOp::Sum | ReduceOp::Mean => 0,
            ReduceOp::Max => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReduceParams {
    pub outer: u32,
    pub len: u32,
    pub inner: u32,
    pub op: u32,
    pub chunk: u32,
    pub nchunks: u32,
    pub scale: f32,
    pub _pad: u32,
}

/// Axis length above which the GPU splits each row over several workgroups and adds a
/// second pass, so a long row is neither one workgroup's serial loop nor one long sum.
const GPU_SPLIT_LEN: usize = 8192;
/// Axis elements per workgroup in the first of those two passes.
const GPU_CHUNK: usize = 4096;
/// GPU, axis not last: an axis longer than this is split into chunks of `GPU_COL_CHUNK` when
/// there are fewer than `GPU_COL_FEW` outputs (a bias gradient: (tokens, C) -> (C)), so the
/// work spreads over many threads instead of one long loop per output.
const GPU_COL_SPLIT_LEN: usize = 1024;
const GPU_COL_CHUNK: usize = 256;
const GPU_COL_FEW: usize = 65536;
/// CPU: elements per parallel task when a few long rows are split.
const CPU_CHUNK: usize = 16384;
/// CPU: output columns per task when the axis is not the last one.
const CPU_COLS: usize = 512;

/// f64 accumulator of a CPU reduction (f64 sums; max is exact in either width).
#[inline]
fn fold(acc: f64, v: f64, op: ReduceOp) -> f64 {
    match op {
        ReduceOp::Max => acc.max(v),
        _ => acc + v,
    }
}

fn init(op: ReduceOp) -> f64 {
    match op {
        ReduceOp::Max => f64::NEG_INFINITY,
        _ => 0.0,
    }
}

fn fold_slice(x: &[f32], op: ReduceOp) -> f64 {
    x.iter().fold(init(op), |a, &v| fold(a, v as f64, op))
}

/// CPU twin: `x` (outer, len, inner) -> (outer, inner).
fn cpu_reduce(x: &[f32], outer: usize, len: usize, inner: usize, op: ReduceOp) -> Vec<f32> {
    let mut y = vec![0.0f32; outer * inner];
    if y.is_empty() {
        return y;
    }
    let par = x.len() >= PAR_MIN;
    let finish = |acc: f64| -> f32 {
        match op {
            ReduceOp::Mean => (acc / len as f64) as f32,
            _ => acc as f32,
        }
    };
    if inner == 1 {
        if par && outer < rayon::current_num_threads() * 4 {
            // Few long rows: split each row; partials are combined in order, so results are
            // the same for any thread count.
            for (o, out) in y.iter_mut().enumerate() {
                let parts: Vec<f64> =
                    x[o * len..(o + 1) * len].par_chunks(CPU_CHUNK).map(|c| fold_slice(c, op)).collect();
                *out = finish(parts.into_iter().fold(init(op), |a, v| fold(a, v, op)));
            }
        } else {
            let row = |o: usize| finish(fold_slice(&x[o * len..(o + 1) * len], op));
            if par {
                let min_rows = (PAR_MIN / len.max(1)).max(1);
                y.par_iter_mut().enumerate().with_min_len(min_rows).for_each(|(o, v)| *v = row(o));
            } else {
                y.iter_mut().enumerate().for_each(|(o, v)| *v = row(o));
            }
        }
        return y;
    }
    // The axis is not the last: accumulate whole contiguous runs of `inner` per step.
    let block = |o: usize, i0: usize, out: &mut [f32]| {
        let mut acc = vec![init(op); out.len()];
        for k in 0..len {
            let src = &x[(o * len + k) * inner + i0..][..out.len()];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a = fold(*a, v as f64, op);
            }
        }
        for (v, a) in out.iter_mut().zip(acc) {
            *v = finish(a);
        }
    };
    if par {
        y.par_chunks_mut(inner).enumerate().for_each(|(o, yr)| {
            yr.par_chunks_mut(CPU_COLS).enumerate().for_each(|(b, seg)| block(o, b * CPU_COLS, seg))
        });
    } else {
        y.chunks_mut(inner)
            .enumerate()
            .for_each(|(o, yr)| yr.chunks_mut(CPU_COLS).enumerate().for_each(|(b, seg)| block(o, b * CPU_COLS, seg)));
    }
    y
}

impl Tensor {
    /// `op` over `axis` (negative counts from the end); `keepdim` leaves the axis as size 1.
    pub fn reduce(&self, axis: isize, keepdim: bool, op: ReduceOp) -> Result<Tensor> {
        let name = op.name();
        self.ensure_f32(name)?;
        let a = self.axis(name, axis)?;
        let shape = self.shape();
        if op == ReduceOp::Max && shape[a] == 0 {
            return Err(Error::shape(name, format!("axis {axis} of shape {shape:?} is empty")));
        }
        let outer: usize = shape[..a].iter().product();
        let inner: usize = shape[a + 1..].iter().product();
        let mut out_shape = shape.to_vec();
        if keepdim {
            out_shape[a] = 1;
        } else {
            out_shape.remove(a);
        }
        let out = self.reduce3(name, outer, shape[a], inner, op, &out_shape)?;
        // Backward works on the keepdim shape, so the gradient broadcasts over the axis.
        let in_shape = shape.to_vec();
        let mut keep_shape = in_shape.clone();
        keep_shape[a] = 1;
        let len = shape[a];
        let x = self.detach();
        let y = out.detach();
        Ok(crate::autograd::record(name, out, &[self], move |g, _| {
            let g = g.reshape_to(&keep_shape)?; // (..., 1, ...)
            let dx = match op {
                ReduceOp::Sum => g.broadcast_to(&in_shape)?,
                ReduceOp::Mean => g.mul_scalar(1.0 / len as f32)?.broadcast_to(&in_shape)?,
                ReduceOp::Max => {
                    // Ties split the gradient evenly (as torch.amax): the max is an exact copy of
                    // an element on both devices, so `x >= max` marks exactly the maximal ones.
                    let mask = x.ge(&y.reshape_to(&keep_shape)?)?; // (in_shape)
                    let count = mask.reduce3(name, outer, len, inner, ReduceOp::Sum, &keep_shape)?;
                    mask.mul(&g.div(&count)?)?
                }
            };
            Ok(vec![Some(dx)])
        }))
    }

    pub fn sum(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(axis, keepdim, ReduceOp::Sum)
    }
    pub fn mean(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(axis, keepdim, ReduceOp::Mean)
    }
    /// Max over `axis`; its gradient is split evenly among tied maxima (as `torch.amax`).
    pub fn max(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(axis, keepdim, ReduceOp::Max)
    }

    /// Sum of all elements, as a tensor of shape `[]` (one element).
    pub fn sum_all(&self) -> Result<Tensor> {
        self.ensure_f32("sum_all")?;
        let out = self.reduce3("sum_all", 1, self.numel(), 1, ReduceOp::Sum, &[])?;
        let shape = self.shape().to_vec();
        Ok(crate::autograd::record("sum_all", out, &[self], move |g, _| Ok(vec![Some(g.broadcast_to(&shape)?)])))
    }

    /// Mean of all elements, as a tensor of shape `[]` (one element).
    pub fn mean_all(&self) -> Result<Tensor> {
        self.ensure_f32("mean_all")?;
        let n = self.numel();
        let out = self.reduce3("mean_all", 1, n, 1, ReduceOp::Mean, &[])?;
        let shape = self.shape().to_vec();
        Ok(crate::autograd::record("mean_all", out, &[self], move |g, _| {
            Ok(vec![Some(g.mul_scalar(1.0 / n as f32)?.broadcast_to(&shape)?)])
        }))
    }

    /// Sums this tensor down to `target`, a shape it was broadcast from (NumPy rules:
    /// leading extra dims are summed away, dims where `target` is 1 are summed with keepdim).
    pub fn sum_to_shape(&self, target: &[usize]) -> Result<Tensor> {
        // The body reshapes, which would record its own nodes: run it detached, record once.
        let out = self.detach().sum_to_shape_raw(target)?;
        let shape = self.shape().to_vec();
        Ok(crate::autograd::record("sum_to_shape", out, &[self], move |g, _| Ok(vec![Some(g.broadcast_to(&shape)?)])))
    }

    fn sum_to_shape_raw(&self, target: &[usize]) -> Result<Tensor> {
        const NAME: &str = "sum_to_shape";
        self.ensure_f32(NAME)?;
        let src = self.shape();
        let bad = || {
            Error::shape(NAME, format!("cannot sum {src:?} to {target:?}: {target:?} does not broadcast to {src:?}"))
        };
        if target.len() > src.len() {
            return Err(bad());
        }
        let lead = src.len() - target.len();
        // Runs of dims with the same fate merge into one, so each run costs one pass.
        let mut runs: Vec<(usize, bool)> = Vec::new();
        for (i, &d) in src.iter().enumerate() {
            let summed = if i < lead {
                true
            } else {
                let t = target[i - lead];
                if t == d {
                    false
                } else if t == 1 {
                    true
                } else {
                    return Err(bad());
                }
            };
            if d == 1 {
                continue;
            }
            match runs.last_mut() {
                Some((n, s)) if *s == summed => *n *= d,
                _ => runs.push((d, summed)),
            }
        }
        let merged: Vec<usize> = runs.iter().map(|r| r.0).collect();
        let mut t = self.reshape_to(&merged)?;
        for (a, &(_, summed)) in runs.iter().enumerate() {
            if summed {
                let shape = t.shape().to_vec();
                let outer: usize = shape[..a].iter().product();
                let inner: usize = shape[a + 1..].iter().product();
                let mut out_shape = shape.clone();
                out_shape[a] = 1;
                t = t.reduce3(NAME, outer, shape[a], inner, ReduceOp::Sum, &out_shape)?;
            }
        }
        t.reshape_to(target)
    }

    /// Reduces this tensor viewed as (outer, len, inner) to (outer, inner), shaped `out_shape`.
    fn reduce3(
        &self,
        name: &'static str,
        outer: usize,
        len: usize,
        inner: usize,
        op: ReduceOp,
        out_shape: &[usize],
    ) -> Result<Tensor> {
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32(name)?;
                Ok(Tensor::cpu(cpu_reduce(x, outer, len, inner, op), out_shape))
            }
            Device::Gpu(ctx) => {
                u32_of(name, self.numel())?;
                let out = Tensor::gpu_empty(&ctx, name, out_shape)?;
                if outer * inner == 0 {
                    return Ok(out);
                }
                let scale = match op {
                    ReduceOp::Mean => 1.0 / len as f32,
                    _ => 1.0,
                };
                let params = |outer: usize, len: usize, inner: usize, chunk, nchunks, scale| {
                    Ok::<_, Error>(ReduceParams {
                        outer: u32_of(name, outer)?,
                        len: u32_of(name, len)?,
                        inner: u32_of(name, inner)?,
                        op: op.code(),
                        chunk: u32_of(name, chunk)?,
                        nchunks: u32_of(name, nchunks)?,
                        scale,
                        _pad: 0,
                    })
                };
                // The row kernels reduce across a workgroup: tree or subgroup, as the adapter allows.
                let rows_shader = with_reductions(&ctx, &REDUCE, &REDUCE_SUBGROUP);
                if inner > 1 && len > GPU_COL_SPLIT_LEN && outer * inner < GPU_COL_FEW {
                    let nchunks = len.div_ceil(GPU_COL_CHUNK);
                    let part = Tensor::gpu_empty(&ctx, name, &[outer, nchunks, inner])?; // (outer, nchunks, inner)
                    let p1 = params(outer, len, inner, GPU_COL_CHUNK, nchunks, 1.0)?;
                    let bufs = [self.gpu_buf(name)?, part.gpu_buf(name)?];
                    ctx.dispatch(&REDUCE, "cols", &p1, &bufs, crate::ops::groups_for(&ctx, outer * nchunks * inner))?;
                    let p2 = params(outer, nchunks, inner, nchunks, 1, scale)?;
                    let bufs = [part.gpu_buf(name)?, out.gpu_buf(name)?];
                    ctx.dispatch(&REDUCE, "cols", &p2, &bufs, crate::ops::groups_for(&ctx, outer * inner))?;
                } else if inner > 1 {
                    let p = params(outer, len, inner, len, 1, scale)?;
                    let bufs = [self.gpu_buf(name)?, out.gpu_buf(name)?];
                    let groups = crate::ops::groups_for(&ctx, outer * inner);
                    ctx.dispatch(&REDUCE, "cols", &p, &bufs, groups)?;
                } else if len > GPU_SPLIT_LEN {
                    let nchunks = len.div_ceil(GPU_CHUNK);
                    let part = Tensor::gpu_empty(&ctx, name, &[outer, nchunks])?; // (outer, nchunks)
                    let p1 = params(outer, len, 1, GPU_CHUNK, nchunks, 1.0)?;
                    let bufs = [self.gpu_buf(name)?, part.gpu_buf(name)?];
                    ctx.dispatch(rows_shader, "rows", &p1, &bufs, ctx.grid((outer * nchunks) as u64))?;
                    let p2 = params(outer, nchunks, 1, nchunks, 1, scale)?;
                    let bufs = [part.gpu_buf(name)?, out.gpu_buf(name)?];
                    ctx.dispatch(rows_shader, "rows", &p2, &bufs, ctx.grid(outer as u64))?;
                } else {
                    let p = params(outer, len, 1, len, 1, scale)?;
                    let bufs = [self.gpu_buf(name)?, out.gpu_buf(name)?];
                    ctx.dispatch(rows_shader, "rows", &p, &bufs, ctx.grid(outer as u64))?;
                }
                Ok(out)
            }
        }
    }
}
