//! Layout copies (`shaders/copy.wgsl`): permute, transpose, slice, pad_axis, concat,
//! broadcast_to, each differentiable (its backward is another copy, or `sum_to_shape`).
//! Every output is contiguous; all but concat are one strided gather
//! `out[i] = x[offset + sum_d coord_d(i) * stride_d]`, with its dims merged first where the
//! source is contiguous across them, so most copies reach the kernel with rank 1 to 3.

use crate::device::{Device, GpuContext};
use crate::error::{Error, Result};
use crate::ops::{broadcast_strides, groups_for, pack8, strided_offset, u32_of, PAR_MIN};
use crate::shaders::COPY;
use crate::tensor::{numel, strides, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CopyParams {
    pub n: u32,
    pub rank: u32,
    pub offset: u32,
    pub seg: u32,
    pub row: u32,
    pub dst: u32,
    pub _pad: [u32; 2],
    pub shape: [u32; 8],
    pub strides: [u32; 8],
}

/// Drops size-1 dims and merges neighbours the source walks contiguously, so a copy
/// does as few index divisions as its layout allows. Same element order, same offsets.
fn coalesce(shape: &[usize], st: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut sh: Vec<usize> = Vec::with_capacity(shape.len());
    let mut ss: Vec<usize> = Vec::with_capacity(shape.len());
    for (&d, &s) in shape.iter().zip(st) {
        if d == 1 {
            continue;
        }
        match (sh.last_mut(), ss.last_mut()) {
            (Some(pd), Some(ps)) if *ps == s * d => {
                *pd *= d;
                *ps = s;
            }
            _ => {
                sh.push(d);
                ss.push(s);
            }
        }
    }
    (sh, ss)
}

/// CPU twin of `gather`: one row of the last dim at a time, a memcpy when it is contiguous.
fn gather_cpu(x: &[f32], offset: usize, shape: &[usize], st: &[usize]) -> Vec<f32> {
    use rayon::prelude::*;
    let n = numel(shape);
    let mut y = vec![0.0f32; n];
    if n == 0 {
        return y;
    }
    let r = shape.len();
    let (inner, s_in) = if r == 0 { (1, 0) } else { (shape[r - 1], st[r - 1]) };
    let (outer_shape, outer_st) = (&shape[..r.saturating_sub(1)], &st[..r.saturating_sub(1)]);
    let row = |ri: usize, out: &mut [f32]| {
        let base = offset + strided_offset(ri, outer_shape, outer_st);
        match s_in {
            1 => out.copy_from_slice(&x[base..base + inner]),
            0 => out.fill(x[base]),
            s => {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = x[base + j * s];
                }
            }
        }
    };
    if n < PAR_MIN {
        y.chunks_mut(inner).enumerate().for_each(|(ri, o)| row(ri, o));
    } else {
        let rows = (4096 / inner).max(1);
        y.par_chunks_mut(rows * inner).enumerate().for_each(|(c, chunk)| {
            for (k, o) in chunk.chunks_mut(inner).enumerate() {
                row(c * rows + k, o);
            }
        });
    }
    y
}

/// A contiguous tensor of `shape` read from `x` at `offset` with per-dim strides `st`.
fn gather(op: &'static str, x: &Tensor, offset: usize, shape: &[usize], st: &[usize]) -> Result<Tensor> {
    let (csh, cst) = coalesce(shape, st);
    match x.device() {
        Device::Cpu => Ok(Tensor::cpu(gather_cpu(x.cpu_f32(op)?, offset, &csh, &cst), shape)),
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_empty(&ctx, op, shape)?;
            let n = numel(shape);
            u32_of(op, x.numel())?;
            let params = CopyParams {
                n: u32_of(op, n)?,
                rank: csh.len() as u32,
                offset: u32_of(op, offset)?,
                seg: 0,
                row: 0,
                dst: 0,
                _pad: [0; 2],
                shape: pack8(op, &csh)?,
                strides: pack8(op, &cst)?,
            };
            ctx.dispatch(&COPY, "gather", &params, &[x.gpu_buf(op)?, out.gpu_buf(op)?], groups_for(&ctx, n))?;
            Ok(out)
        }
    }
}

/// `t` as (outer, axis, inner) around `axis`.
fn split3(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]))
}

impl Tensor {
    /// Dims reordered: output dim `i` is input dim `perm[i]` (`torch.permute`), contiguous.
    /// Backward: the inverse permutation.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let out = self.permute_raw(perm)?;
        let mut inv = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        Ok(crate::autograd::record("permute", out, &[self], move |g, _| Ok(vec![Some(g.permute(&inv)?)])))
    }

    fn permute_raw(&self, perm: &[usize]) -> Result<Tensor> {
        const OP: &str = "permute";
        self.ensure_f32(OP)?;
        let r = self.rank();
        let mut seen = vec![false; r];
        let valid = perm.len() == r && perm.iter().all(|&p| p < r && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(Error::shape(
                OP,
                format!("{perm:?} is not a permutation of the {r} dims of {:?}", self.shape()),
            ));
        }
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape()[p]).collect();
        // Only size-1 dims move: the element order is unchanged, so a reshape shares storage.
        let moved: Vec<usize> = perm.iter().copied().filter(|&p| self.shape()[p] != 1).collect();
        if moved.windows(2).all(|w| w[0] < w[1]) {
            return self.detach().reshape_to(&shape);
        }
        let s = strides(self.shape());
        let st: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        gather(OP, self, 0, &shape, &st)
    }

    /// Dims `d0` and `d1` swapped (negative axes count from the end), contiguous.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let (a, b) = (self.axis("transpose", d0)?, self.axis("transpose", d1)?);
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Elements `start .. start + len` along `axis`, as a contiguous copy.
    /// Backward: the gradient zero-padded back to the input's shape (`pad_axis`).
    pub fn slice(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        let out = self.slice_raw(axis, start, len)?;
        let ax = self.axis("slice", axis)?;
        let after = self.shape()[ax] - start - len;
        Ok(crate::autograd::record("slice", out, &[self], move |g, _| {
            Ok(vec![Some(g.pad_axis(ax as isize, start, after)?)])
        }))
    }

    fn slice_raw(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        const OP: &str = "slice";
        self.ensure_f32(OP)?;
        let ax = self.axis(OP, axis)?;
        let (outer, dim, inner) = split3(self.shape(), ax);
        if start.checked_add(len).is_none_or(|end| end > dim) {
            return Err(Error::shape(
                OP,
                format!("range {start}..{start}+{len} out of bounds for axis {axis} of {:?}", self.shape()),
            ));
        }
        if len == dim {
            return Ok(self.detach());
        }
        let mut shape = self.shape().to_vec();
        shape[ax] = len;
        let out = gather(OP, self, start * inner, &[outer, len, inner], &[dim * inner, inner, 1])?;
        out.reshape_to(&shape)
    }

    /// Zeros added along `axis`: `before` in front, `after` behind (`F.pad` on one axis), as a
    /// contiguous copy. Backward: the slice of the gradient where `self` sits.
    pub fn pad_axis(&self, axis: isize, before: usize, after: usize) -> Result<Tensor> {
        const OP: &str = "pad_axis";
        self.ensure_f32(OP)?;
        let ax = self.axis(OP, axis)?;
        let (outer, len, inner) = split3(self.shape(), ax);
        let total = before.checked_add(len).and_then(|t| t.checked_add(after));
        let Some(total) = total else {
            return Err(Error::shape(OP, format!("padding ({before}, {after}) of {:?} overflows", self.shape())));
        };
        let mut shape = self.shape().to_vec();
        shape[ax] = total;
        let out = if total == len {
            self.detach()
        } else {
            pad_raw(self, outer, len * inner, total * inner, before * inner, &shape)?
        };
        Ok(crate::autograd::record(OP, out, &[self], move |g, _| Ok(vec![Some(g.slice(ax as isize, before, len)?)])))
    }

    /// `torch.narrow`: the same as [`Tensor::slice`].
    pub fn narrow(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        self.slice(axis, start, len)
    }

    /// `self` repeated along new leading dims and size-1 dims to `shape` (NumPy rules), contiguous.
    /// Backward: the gradient summed back to the input's shape (`sum_to_shape`).
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        let out = self.broadcast_to_raw(shape)?;
        let src = self.shape().to_vec();
        Ok(crate::autograd::record("broadcast_to", out, &[self], move |g, _| Ok(vec![Some(g.sum_to_shape(&src)?)])))
    }

    fn broadcast_to_raw(&self, shape: &[usize]) -> Result<Tensor> {
        const OP: &str = "broadcast_to";
        self.ensure_f32(OP)?;
        let src = self.shape();
        let ok = shape.len() >= src.len()
            && src.iter().zip(&shape[shape.len() - src.len()..]).all(|(&s, &t)| s == t || s == 1);
        if !ok {
            return Err(Error::shape(OP, format!("{src:?} cannot be broadcast to {shape:?}")));
        }
        if numel(shape) == self.numel() {
            return self.detach().reshape_to(shape);
        }
        gather(OP, self, 0, shape, &broadcast_strides(src, shape))
    }

    /// `torch.cat`: the tensors joined along `axis`; every other dim must agree.
    /// Backward: each input gets its slice of the gradient.
    pub fn concat(tensors: &[&Tensor], axis: isize) -> Result<Tensor> {
        let out = Tensor::concat_raw(tensors, axis)?;
        if !crate::autograd::will_record(tensors) {
            return Ok(out);
        }
        let ax = out.axis("concat", axis)?;
        let lens: Vec<usize> = tensors.iter().map(|t| t.shape()[ax]).collect();
        Ok(crate::autograd::record("concat", out, tensors, move |g, needs| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(lens.len());
            for (&len, &need) in lens.iter().zip(needs) {
                grads.push(need.then(|| g.slice(ax as isize, start, len)).transpose()?);
                start += len;
            }
            Ok(grads)
        }))
    }

    fn concat_raw(tensors: &[&Tensor], axis: isize) -> Result<Tensor> {
        const OP: &str = "concat";
        let Some(first) = tensors.first() else {
            return Err(Error::shape(OP, "no tensors to concatenate"));
        };
        let ax = first.axis(OP, axis)?;
        for t in tensors {
            t.ensure_f32(OP)?;
            first.same_device(OP, t)?;
            let same = t.rank() == first.rank()
                && t.shape().iter().zip(first.shape()).enumerate().all(|(d, (a, b))| d == ax || a == b);
            if !same {
                let shapes: Vec<&[usize]> = tensors.iter().map(|t| t.shape()).collect();
                return Err(Error::shape(OP, format!("shapes {shapes:?} differ outside axis {axis}")));
            }
        }
        if tensors.len() == 1 {
            return Ok(first.detach());
        }
        let (outer, _, inner) = split3(first.shape(), ax);
        let total: usize = tensors.iter().map(|t| t.shape()[ax]).sum();
        let mut shape = first.shape().to_vec();
        shape[ax] = total;
        let row = total * inner;
        match first.device() {
            Device::Cpu => {
                let parts =
                    tensors.iter().map(|t| Ok((t.cpu_f32(OP)?, t.shape()[ax] * inner))).collect::<Result<Vec<_>>>()?;
                let mut y = vec![0.0f32; outer * row];
                if y.is_empty() {
                    return Ok(Tensor::cpu(y, &shape));
                }
                let fill = |o: usize, out: &mut [f32]| {
                    let mut off = 0;
                    for &(data, seg) in &parts {
                        out[off..off + seg].copy_from_slice(&data[o * seg..(o + 1) * seg]);
                        off += seg;
                    }
                };
                if y.len() >= PAR_MIN && outer > 1 {
                    use rayon::prelude::*;
                    y.par_chunks_mut(row).enumerate().for_each(|(o, out)| fill(o, out));
                } else {
                    y.chunks_mut(row).enumerate().for_each(|(o, out)| fill(o, out));
                }
                Ok(Tensor::cpu(y, &shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &shape)?;
                u32_of(OP, outer * row)?;
                let mut off = 0;
                for t in tensors {
                    let seg = t.shape()[ax] * inner;
                    concat_part(&ctx, t, &out, seg, row, off)?;
                    off += seg;
                }
                Ok(out)
            }
        }
    }
}

/// `x` viewed as (outer, seg) at column `at` of a zero tensor viewed as (outer, row), shaped `shape`.
fn pad_raw(x: &Tensor, outer: usize, seg: usize, row: usize, at: usize, shape: &[usize]) -> Result<Tensor> {
    const OP: &str = "pad_axis";
    match x.device() {
        Device::Cpu => {
            let src = x.cpu_f32(OP)?;
            let mut y = vec![0.0f32; outer * row];
            if seg > 0 {
                let fill = |o: usize, out: &mut [f32]| out[at..at + seg].copy_from_slice(&src[o * seg..(o + 1) * seg]);
                if y.len() >= PAR_MIN && outer > 1 {
                    use rayon::prelude::*;
                    y.par_chunks_mut(row).enumerate().for_each(|(o, out)| fill(o, out));
                } else {
                    y.chunks_mut(row).enumerate().for_each(|(o, out)| fill(o, out));
                }
            }
            Ok(Tensor::cpu(y, shape))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_empty(&ctx, OP, shape)?;
            let n = outer * row;
            u32_of(OP, x.numel())?;
            let params = CopyParams {
                n: u32_of(OP, n)?,
                rank: 0,
                offset: u32_of(OP, at)?,
                seg: u32_of(OP, seg)?,
                row: u32_of(OP, row)?,
                dst: 0,
                _pad: [0; 2],
                shape: [0; 8],
                strides: [0; 8],
            };
            ctx.dispatch(&COPY, "pad", &params, &[x.gpu_buf(OP)?, out.gpu_buf(OP)?], groups_for(&ctx, n))?;
            Ok(out)
        }
    }
}

/// Writes `t` (outer, seg) into columns `dst .. dst + seg` of `out` (outer, row).
fn concat_part(
    ctx: &std::sync::Arc<GpuContext>,
    t: &Tensor,
    out: &Tensor,
    seg: usize,
    row: usize,
    dst: usize,
) -> Result<()> {
    const OP: &str = "concat";
    let n = t.numel();
    if n == 0 {
        return Ok(());
    }
    let params = CopyParams {
        n: u32_of(OP, n)?,
        rank: 0,
        offset: 0,
        seg: u32_of(OP, seg)?,
        row: u32_of(OP, row)?,
        dst: u32_of(OP, dst)?,
        _pad: [0; 2],
        shape: [0; 8],
        strides: [0; 8],
    };
    ctx.dispatch(&COPY, "concat_part", &params, &[t.gpu_buf(OP)?, out.gpu_buf(OP)?], groups_for(ctx, n))
}
