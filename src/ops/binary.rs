//! Broadcasting binary ops and `where` (`shaders/binary.wgsl`, `shaders/where.wgsl`).

use crate::device::Device;
use crate::error::Result;
use crate::ops::{broadcast_shape, broadcast_strides, groups_for, pack8, par_fill, strided_offset, u32_of};
use crate::shaders::{BINARY, WHERE};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    /// 1.0 where `a >= b`, else 0.0 (masks for gradients of max/min); not differentiable.
    Ge,
}

impl BinaryOp {
    fn code(self) -> u32 {
        self as u32
    }
    /// CPU twin of `apply` in the shader.
    #[inline]
    pub fn eval(self, u: f32, v: f32) -> f32 {
        match self {
            BinaryOp::Add => u + v,
            BinaryOp::Sub => u - v,
            BinaryOp::Mul => u * v,
            BinaryOp::Div => u / v,
            BinaryOp::Maximum => u.max(v),
            BinaryOp::Minimum => u.min(v),
            BinaryOp::Ge => (u >= v) as u8 as f32,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BinaryParams {
    pub n: u32,
    pub op: u32,
    pub rank: u32,
    pub contig: u32,
    pub shape: [u32; 8],
    pub sa: [u32; 8],
    pub sb: [u32; 8],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WhereParams {
    pub n: u32,
    pub rank: u32,
    pub _pad: [u32; 2],
    pub shape: [u32; 8],
    pub sc: [u32; 8],
    pub sa: [u32; 8],
    pub sb: [u32; 8],
}

impl Tensor {
    /// `a op b` with broadcasting; the output has the broadcast shape.
    pub fn binary(&self, other: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let out = self.binary_raw(other, op)?;
        if op == BinaryOp::Ge {
            return Ok(out);
        }
        let (a, b) = (self.detach(), other.detach());
        Ok(crate::autograd::record("binary", out, &[self, other], move |g, needs| {
            let (ga, gb) = match op {
                BinaryOp::Add => (Some(g.clone()), Some(g.clone())),
                BinaryOp::Sub => (Some(g.clone()), needs[1].then(|| g.neg()).transpose()?),
                BinaryOp::Mul => (needs[0].then(|| g.mul(&b)).transpose()?, needs[1].then(|| g.mul(&a)).transpose()?),
                BinaryOp::Div => {
                    let ga = needs[0].then(|| g.div(&b)).transpose()?;
                    // d(a/b)/db = -a / b^2
                    let gb = needs[1].then(|| g.mul(&a)?.div(&b.square()?)?.neg()).transpose()?;
                    (ga, gb)
                }
                BinaryOp::Maximum | BinaryOp::Minimum => {
                    // Ties go to `a`, as the forward's max/min returns `a` there.
                    let mask = if op == BinaryOp::Maximum {
                        a.binary_raw(&b, BinaryOp::Ge)?
                    } else {
                        b.binary_raw(&a, BinaryOp::Ge)?
                    };
                    let ga = needs[0].then(|| g.mul(&mask)).transpose()?;
                    let gb = needs[1].then(|| g.mul(&mask.affine(-1.0, 1.0)?)).transpose()?;
                    (ga, gb)
                }
                BinaryOp::Ge => (None, None),
            };
            let fit = |g: Option<Tensor>, t: &Tensor| g.map(|g| g.sum_to_shape(t.shape())).transpose();
            Ok(vec![fit(ga, &a)?, fit(gb, &b)?])
        }))
    }

    /// 1.0 where `self >= other` (broadcast), else 0.0.
    pub fn ge(&self, other: &Tensor) -> Result<Tensor> {
        self.binary_raw(other, BinaryOp::Ge)
    }

    fn binary_raw(&self, other: &Tensor, op: BinaryOp) -> Result<Tensor> {
        const NAME: &str = "binary";
        self.ensure_f32(NAME)?;
        other.ensure_f32(NAME)?;
        self.same_device(NAME, other)?;
        let shape = broadcast_shape(NAME, self.shape(), other.shape())?;
        let n = crate::tensor::numel(&shape);
        let contig = self.shape() == shape.as_slice() && other.shape() == shape.as_slice();
        let sa = broadcast_strides(self.shape(), &shape);
        let sb = broadcast_strides(other.shape(), &shape);
        match self.device() {
            Device::Cpu => {
                let (a, b) = (self.cpu_f32(NAME)?, other.cpu_f32(NAME)?);
                let mut y = vec![0.0; n];
                if contig {
                    par_fill(&mut y, |i| op.eval(a[i], b[i]));
                } else if other.numel() == 1 {
                    let s = b[0];
                    par_fill(&mut y, |i| op.eval(a[strided_offset(i, &shape, &sa)], s));
                } else {
                    broadcast_rows(&shape, &sa, &sb, a, b, &mut y, |x, z| op.eval(x, z));
                }
                Ok(Tensor::cpu(y, &shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, NAME, &shape)?;
                let params = BinaryParams {
                    n: u32_of(NAME, n)?,
                    op: op.code(),
                    rank: shape.len() as u32,
                    contig: contig as u32,
                    shape: pack8(NAME, &shape)?,
                    sa: pack8(NAME, &sa)?,
                    sb: pack8(NAME, &sb)?,
                };
                let bufs = [self.gpu_buf(NAME)?, other.gpu_buf(NAME)?, out.gpu_buf(NAME)?];
                ctx.dispatch(&BINARY, "main", &params, &bufs, groups_for(&ctx, n))?;
                Ok(out)
            }
        }
    }

    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Add)
    }
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Sub)
    }
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Mul)
    }
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Div)
    }
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Maximum)
    }
    pub fn minimum(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Minimum)
    }

    /// `cond != 0 ? a : b` elementwise (`self` is the condition), all three broadcast.
    /// The condition gets no gradient.
    pub fn where_cond(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let out = self.where_raw(a, b)?;
        let (c, sa, sb) = (self.detach(), a.shape().to_vec(), b.shape().to_vec());
        Ok(crate::autograd::record("where", out, &[a, b], move |g, needs| {
            let zero = Tensor::zeros(&[1], &g.device())?;
            let ga = needs[0].then(|| c.where_raw(g, &zero)?.sum_to_shape(&sa)).transpose()?;
            let gb = needs[1].then(|| c.where_raw(&zero, g)?.sum_to_shape(&sb)).transpose()?;
            Ok(vec![ga, gb])
        }))
    }

    fn where_raw(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const NAME: &str = "where";
        for t in [self, a, b] {
            t.ensure_f32(NAME)?;
        }
        self.same_device(NAME, a)?;
        self.same_device(NAME, b)?;
        let shape = broadcast_shape(NAME, &broadcast_shape(NAME, self.shape(), a.shape())?, b.shape())?;
        let n = crate::tensor::numel(&shape);
        let sc = broadcast_strides(self.shape(), &shape);
        let sa = broadcast_strides(a.shape(), &shape);
        let sb = broadcast_strides(b.shape(), &shape);
        match self.device() {
            Device::Cpu => {
                let (c, av, bv) = (self.cpu_f32(NAME)?, a.cpu_f32(NAME)?, b.cpu_f32(NAME)?);
                let mut y = vec![0.0; n];
                par_fill(&mut y, |i| {
                    if c[strided_offset(i, &shape, &sc)] != 0.0 {
                        av[strided_offset(i, &shape, &sa)]
                    } else {
                        bv[strided_offset(i, &shape, &sb)]
                    }
                });
                Ok(Tensor::cpu(y, &shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, NAME, &shape)?;
                let params = WhereParams {
                    n: u32_of(NAME, n)?,
                    rank: shape.len() as u32,
                    _pad: [0; 2],
                    shape: pack8(NAME, &shape)?,
                    sc: pack8(NAME, &sc)?,
                    sa: pack8(NAME, &sa)?,
                    sb: pack8(NAME, &sb)?,
                };
                let bufs = [self.gpu_buf(NAME)?, a.gpu_buf(NAME)?, b.gpu_buf(NAME)?, out.gpu_buf(NAME)?];
                ctx.dispatch(&WHERE, "main", &params, &bufs, groups_for(&ctx, n))?;
                Ok(out)
            }
        }
    }
}

/// `y = f(a, b)` over a broadcast: dims that are contiguous in both operands are merged, then
/// each row of the last merged dim is walked with its two offsets computed once (instead of a
/// division per element and dim), rows in parallel.
pub(crate) fn broadcast_rows(
    shape: &[usize],
    sa: &[usize],
    sb: &[usize],
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
    f: impl Fn(f32, f32) -> f32 + Sync,
) {
    use rayon::prelude::*;
    let (mut dims, mut ta, mut tb): (Vec<usize>, Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new(), Vec::new());
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        if let (Some(&n), Some(&pa), Some(&pb)) = (dims.last(), ta.last(), tb.last()) {
            if pa == sa[d] * shape[d] && pb == sb[d] * shape[d] {
                let k = dims.len() - 1;
                dims[k] = n * shape[d];
                ta[k] = sa[d];
                tb[k] = sb[d];
                continue;
            }
        }
        dims.push(shape[d]);
        ta.push(sa[d]);
        tb.push(sb[d]);
    }
    if dims.is_empty() {
        if let Some(o) = y.first_mut() {
            *o = f(a[0], b[0]);
        }
        return;
    }
    let inner = *dims.last().unwrap_or(&1);
    let (ia, ib) = (*ta.last().unwrap_or(&0), *tb.last().unwrap_or(&0));
    let row = |r: usize, out: &mut [f32]| {
        let (oa, ob) = (strided_offset(r * inner, &dims, &ta), strided_offset(r * inner, &dims, &tb));
        for (j, o) in out.iter_mut().enumerate() {
            *o = f(a[oa + j * ia], b[ob + j * ib]);
        }
    };
    let rows_per_task = (4096 / inner).max(1);
    if y.len() < crate::ops::PAR_MIN {
        y.chunks_mut(inner).enumerate().for_each(|(r, out)| row(r, out));
    } else {
        y.par_chunks_mut(inner * rows_per_task).enumerate().for_each(|(c, chunk)| {
            for (k, out) in chunk.chunks_mut(inner).enumerate() {
                row(c * rows_per_task + k, out);
            }
        });
    }
}
