//! 2D convolution, NCHW, zero padding, dilation 1, groups 1 (`shaders/conv2d.wgsl`).
//! GPU: an implicit GEMM that builds im2col tiles in workgroup memory. CPU: `sgemm` per image,
//! straight on the input for a 1x1/stride-1/unpadded kernel, else on an im2col buffer.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::matmul::{sgemm, sgemm_raw, MatRef};
use crate::ops::{u32_of, PAR_MIN};
use crate::shaders::CONV2D;
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Conv2dParams {
    pub cin: u32,
    pub h: u32,
    pub w: u32,
    pub cout: u32,
    pub kh: u32,
    pub kw: u32,
    pub oh: u32,
    pub ow: u32,
    pub sh: u32,
    pub sw: u32,
    pub ph: u32,
    pub pw: u32,
    pub k: u32,
    pub ncol: u32,
    pub _pad: [u32; 2],
}

/// Sizes of one convolution, checked.
#[derive(Clone, Copy)]
struct Geom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
}

impl Geom {
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    fn ncol(&self) -> usize {
        self.oh * self.ow
    }
    /// A 1x1, stride-1, unpadded kernel reads the input as the GEMM's B as it is.
    fn is_pointwise(&self) -> bool {
        (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw) == (1, 1, 1, 1, 0, 0)
    }
}

const OP: &str = "conv2d";

fn geometry(
    x: &[usize],
    wt: &[usize],
    bias: Option<&[usize]>,
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Geom> {
    let bad = |msg: String| Err(Error::shape(OP, msg));
    let (&[n, cin, h, w], &[cout, wcin, kh, kw]) = (x, wt) else {
        return bad(format!("input {x:?} must be (N, Cin, H, W) and weight {wt:?} (Cout, Cin, KH, KW)"));
    };
    if wcin != cin {
        return bad(format!("input {x:?} has {cin} channels, weight {wt:?} expects {wcin}"));
    }
    if stride.0 == 0 || stride.1 == 0 {
        return bad(format!("stride {stride:?} must be positive"));
    }
    if kh == 0 || kw == 0 {
        return bad(format!("weight {wt:?} has an empty kernel"));
    }
    let (hp, wp) = (h + 2 * padding.0, w + 2 * padding.1);
    if kh > hp || kw > wp {
        return bad(format!(
            "kernel {kh}x{kw} of weight {wt:?} is larger than the padded input {hp}x{wp} (input {x:?}, padding {padding:?})"
        ));
    }
    if let Some(b) = bias {
        if b != [cout] {
            return bad(format!("bias {b:?} must be ({cout},) for weight {wt:?}"));
        }
    }
    Ok(Geom {
        n,
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        oh: (hp - kh) / stride.0 + 1,
        ow: (wp - kw) / stride.1 + 1,
        sh: stride.0,
        sw: stride.1,
        ph: padding.0,
        pw: padding.1,
    })
}

/// Row `row` = (ci, ky, kx) of the im2col matrix of one image, for output rows from `oy0`:
/// `out` (rows * OW) gets the input pixel under that kernel tap for each output pixel, 0 in
/// the padding.
fn im2col_row(xi: &[f32] /* (Cin, H, W) */, row: usize, out: &mut [f32], g: &Geom, oy0: usize) {
    let (ci, ky, kx) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
    let plane = &xi[ci * g.h * g.w..(ci + 1) * g.h * g.w];
    // Output columns whose input column ox*sw + kx - pw lies inside [0, W).
    let lo = g.pw.saturating_sub(kx).div_ceil(g.sw).min(g.ow);
    let hi = (g.w + g.pw).saturating_sub(kx).div_ceil(g.sw).clamp(lo, g.ow);
    for (r, o) in out.chunks_mut(g.ow).enumerate() {
        let iy = (oy0 + r) * g.sh + ky;
        if iy < g.ph || iy - g.ph >= g.h {
            o.fill(0.0);
            continue;
        }
        let src = &plane[(iy - g.ph) * g.w..(iy - g.ph + 1) * g.w];
        o[..lo].fill(0.0);
        o[hi..].fill(0.0);
        if g.sw == 1 {
            let ix0 = lo + kx - g.pw;
            o[lo..hi].copy_from_slice(&src[ix0..ix0 + hi - lo]);
        } else {
            for (ox, v) in o[lo..hi].iter_mut().enumerate() {
                *v = src[(lo + ox) * g.sw + kx - g.pw];
            }
        }
    }
}

/// One image on the CPU: `out` (Cout, OH*OW) = W (Cout, K) x im2col(xi) (K, OH*OW),
/// added to what `out` holds when `acc` (the bias). `col` is the im2col scratch (K*OH*OW,
/// empty for a pointwise kernel).
fn conv_image(g: &Geom, wt: &[f32], xi: &[f32], out: &mut [f32], col: &mut [f32], acc: bool, parallel: bool) {
    let (m, n, k) = (g.cout, g.ncol(), g.k());
    let a = MatRef { data: wt, rs: k, cs: 1 };
    // Large images: blocks of output rows, each thread building the im2col of its block
    // (in cache) and running a serial GEMM, instead of one huge im2col then one GEMM.
    let rows = (BLOCK_COLS / g.ow).clamp(1, g.oh);
    let blocks = g.oh.div_ceil(rows);
    if parallel && !g.is_pointwise() && blocks >= 2 * rayon::current_num_threads() {
        conv_image_blocked(g, a, xi, out, acc, rows);
        return;
    }
    let b = if g.is_pointwise() {
        MatRef { data: xi, rs: n, cs: 1 }
    } else {
        if parallel && col.len() >= PAR_MIN {
            use rayon::prelude::*;
            col.par_chunks_mut(n).enumerate().for_each(|(r, o)| im2col_row(xi, r, o, g, 0));
        } else {
            col.chunks_mut(n).enumerate().for_each(|(r, o)| im2col_row(xi, r, o, g, 0));
        }
        MatRef { data: col, rs: n, cs: 1 }
    };
    sgemm(m, n, k, a, b, out, n, acc, parallel);
}

/// Output columns per im2col block: K * 256 floats (2.9 MB at K = 2880) stays in cache.
const BLOCK_COLS: usize = 256;

/// `conv_image` by blocks of `rows` output rows, in parallel; `out` (Cout, OH*OW).
fn conv_image_blocked(g: &Geom, a: MatRef, xi: &[f32], out: &mut [f32], acc: bool, rows: usize) {
    use rayon::prelude::*;
    let (m, n, k) = (g.cout, g.ncol(), g.k());
    let blocks = g.oh.div_ceil(rows);
    // Each block writes a column range of every output channel, through a raw pointer.
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    (0..blocks).into_par_iter().for_each_init(
        || vec![0.0f32; k * rows * g.ow],
        |col, bi| {
            let oy0 = bi * rows;
            let nb = (rows.min(g.oh - oy0)) * g.ow;
            let colb = &mut col[..k * nb];
            colb.chunks_mut(nb).enumerate().for_each(|(r, o)| im2col_row(xi, r, o, g, oy0));
            let p0 = oy0 * g.ow;
            debug_assert!(p0 + (m - 1) * n + nb <= out_len);
            let b = MatRef { data: colb, rs: nb, cs: 1 };
            assert!((k - 1) * nb + nb <= colb.len() && (m - 1) * a.rs + k <= a.data.len());
            // SAFETY: block `bi` writes only columns [p0, p0 + nb) of each of the m rows of
            // `out` (row stride n), disjoint from every other block, all inside `out`; no
            // reference to `out` is alive while the tasks run.
            unsafe { sgemm_raw(m, nb, k, a, b, out_ptr.get().add(p0), n, acc, false) };
        },
    );
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only by `conv_image_blocked`, whose tasks write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method, so closures capture the whole (Send) wrapper rather than its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn conv_cpu(g: &Geom, x: &[f32], wt: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (img_in, img_out) = (g.cin * g.h * g.w, g.cout * g.ncol());
    // The bias goes in first and the GEMM accumulates onto it: no second pass.
    let mut y = match bias {
        Some(b) => {
            let mut y = Vec::with_capacity(g.n * img_out);
            for _ in 0..g.n {
                for &v in b {
                    y.extend(std::iter::repeat_n(v, g.ncol()));
                }
            }
            y
        }
        None => vec![0.0f32; g.n * img_out],
    };
    if y.is_empty() {
        return y;
    }
    let acc = bias.is_some();
    let col_len = if g.is_pointwise() { 0 } else { g.k() * g.ncol() };
    let work = g.cout * g.ncol() * g.k();
    if g.n >= rayon::current_num_threads() && g.n > 1 && work < 1 << 22 {
        // Many small images: one image per task, each with its own scratch and a serial GEMM.
        use rayon::prelude::*;
        y.par_chunks_mut(img_out).enumerate().for_each_init(
            || vec![0.0f32; col_len],
            |col, (i, out)| {
                let xi = &x[i * img_in..(i + 1) * img_in];
                conv_image(g, wt, xi, out, col, acc, false);
            },
        );
    } else {
        let mut col = vec![0.0f32; col_len];
        for (i, out) in y.chunks_mut(img_out).enumerate() {
            let xi = &x[i * img_in..(i + 1) * img_in];
            conv_image(g, wt, xi, out, &mut col, acc, true);
        }
    }
    y
}

impl Tensor {
    /// `F.conv2d(x, weight, bias, stride, padding)` with dilation 1 and groups 1.
    /// `self` (N, Cin, H, W), `weight` (Cout, Cin, KH, KW), `bias` (Cout) -> (N, Cout, OH, OW),
    /// OH = (H + 2 * padding.0 - KH) / stride.0 + 1, likewise OW.
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Tensor> {
        self.ensure_f32(OP)?;
        weight.ensure_f32(OP)?;
        self.same_device(OP, weight)?;
        if let Some(b) = bias {
            b.ensure_f32(OP)?;
            self.same_device(OP, b)?;
        }
        let g = geometry(self.shape(), weight.shape(), bias.map(|b| b.shape()), stride, padding)?;
        let out_shape = [g.n, g.cout, g.oh, g.ow];
        match self.device() {
            Device::Cpu => {
                let b = match bias {
                    Some(b) => Some(b.cpu_f32(OP)?),
                    None => None,
                };
                let y = conv_cpu(&g, self.cpu_f32(OP)?, weight.cpu_f32(OP)?, b);
                Ok(Tensor::cpu(y, &out_shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &out_shape)?;
                let u = |v: usize| u32_of(OP, v);
                u(self.numel())?;
                u(crate::tensor::numel(&out_shape))?;
                let params = Conv2dParams {
                    cin: u(g.cin)?,
                    h: u(g.h)?,
                    w: u(g.w)?,
                    cout: u(g.cout)?,
                    kh: u(g.kh)?,
                    kw: u(g.kw)?,
                    oh: u(g.oh)?,
                    ow: u(g.ow)?,
                    sh: u(g.sh)?,
                    sw: u(g.sw)?,
                    ph: u(g.ph)?,
                    pw: u(g.pw)?,
                    k: u(g.k())?,
                    ncol: u(g.ncol())?,
                    _pad: [0; 2],
                };
                let groups = [u(g.ncol().div_ceil(64))?, u(g.cout.div_ceil(64))?, u(g.n)?];
                let (xb, wb, yb) = (self.gpu_buf(OP)?, weight.gpu_buf(OP)?, out.gpu_buf(OP)?);
                match bias {
                    Some(b) => ctx.dispatch(&CONV2D, "main", &params, &[xb, wb, yb, b.gpu_buf(OP)?], groups)?,
                    None => ctx.dispatch(&CONV2D, "main_nobias", &params, &[xb, wb, yb], groups)?,
                }
                Ok(out)
            }
        }
    }
}
