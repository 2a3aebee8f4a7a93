//! 2D convolution, NCHW, zero padding, dilation 1, groups 1 (`shaders/conv2d.wgsl`).
//! GPU: an implicit GEMM that builds im2col tiles in workgroup memory. CPU: `sgemm` per image,
//! straight on the input for a 1x1/stride-1/unpadded kernel, else on an im2col buffer.
//! Backward: dX = the transposed convolution (GPU: a GEMM gathering from dY per stride phase;
//! CPU: W^T x dY then a col2im scatter-add), dW = dY x im2col(X)^T summed over the batch,
//! dbias = dY summed over N, OH, OW (a reduction).

use crate::device::{Device, GpuBuffer};
use crate::error::{Error, Result};
use crate::ops::matmul::{sgemm, sgemm_raw, MatRef};
use crate::ops::{u32_of, Operands, PAR_MIN};
use crate::shaders::{
    CONV2D, CONV2D_FWD_128, CONV2D_FWD_128X64, CONV2D_FWD_64, CONV2D_FWD_64X128, CONV2D_FWD_F16M_128,
    CONV2D_FWD_F16M_128X64, CONV2D_FWD_F16M_64, CONV2D_FWD_F16M_64X128, CONV2D_FWD_F16WM_128, CONV2D_FWD_F16WM_128X64,
    CONV2D_FWD_F16WM_64, CONV2D_FWD_F16WM_64X128, CONV2D_FWD_F16W_128, CONV2D_FWD_F16W_128X64, CONV2D_FWD_F16W_64,
    CONV2D_FWD_F16W_64X128, CONV2D_FWD_F16_128, CONV2D_FWD_F16_128X64, CONV2D_FWD_F16_64, CONV2D_FWD_F16_64X128,
    CONV2D_SPLIT,
};
use crate::tensor::{DType, Tensor};

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
    /// Images (read by `grad_weight`).
    pub n: u32,
    /// Reduction elements per split (read by `grad_weight`).
    pub chunk: u32,
    /// The forward's epilogue: 1 adds the bias, the per-image bias `temb`, the residual.
    pub has_bias: u32,
    pub has_temb: u32,
    pub has_res: u32,
    pub _pad: u32,
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

/// Terms `Tensor::conv2d_add` adds to the convolution's output as it is written.
#[derive(Clone, Copy, Default)]
pub struct ConvAdd<'a> {
    /// (N, Cout): a per-image bias (the resnets' projected time embedding).
    pub temb: Option<&'a Tensor>,
    /// (N, Cout, OH, OW): a residual (the resnets' skip connection).
    pub residual: Option<&'a Tensor>,
}

/// What the forward adds to the convolution, on the CPU: bias (Cout), temb (N, Cout), residual
/// (N, Cout, OH, OW).
#[derive(Clone, Copy, Default)]
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    temb: Option<&'a [f32]>,
    res: Option<&'a [f32]>,
}

fn conv_cpu(g: &Geom, x: &[f32], wt: &[f32], e: Epilogue) -> Vec<f32> {
    let (img_in, img_out) = (g.cin * g.h * g.w, g.cout * g.ncol());
    // What the epilogue adds goes in first and the GEMM accumulates onto it: no second pass.
    let acc = e.bias.is_some() || e.temb.is_some() || e.res.is_some();
    // Built in one pass (no zeroing first): the residual plus the per-channel terms, or those
    // terms alone, or zeros.
    let ncol = g.ncol();
    let chan = |i: usize, c: usize| e.bias.map_or(0.0, |b| b[c]) + e.temb.map_or(0.0, |t| t[i * g.cout + c]);
    let mut y = match (e.res, e.bias.is_some() || e.temb.is_some()) {
        (Some(r), false) => r.to_vec(),
        (Some(r), true) => {
            let mut y = r.to_vec();
            for (i, yi) in y.chunks_mut(img_out).enumerate() {
                for (c, plane) in yi.chunks_mut(ncol).enumerate() {
                    let v = chan(i, c);
                    plane.iter_mut().for_each(|o| *o += v);
                }
            }
            y
        }
        (None, true) => {
            let mut y = Vec::with_capacity(g.n * img_out);
            for i in 0..g.n {
                for c in 0..g.cout {
                    y.extend(std::iter::repeat_n(chan(i, c), ncol));
                }
            }
            y
        }
        (None, false) => vec![0.0f32; g.n * img_out],
    };
    if y.is_empty() {
        return y;
    }
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

/// Largest block of im2col columns the CPU backward materialises (floats, 16 MiB; 4 MiB made
/// the input gradient 7–16% slower at 320–640 channels: thinner GEMMs): blocks run
/// one after another, so the scratch stays bounded whatever the image size.
const COL_CAP: usize = 1 << 22;

/// Output rows per block of the CPU backward.
fn block_rows(g: &Geom) -> usize {
    (COL_CAP / (g.k() * g.ow).max(1)).clamp(1, g.oh.max(1))
}

/// The adjoint of `im2col_row`: scatter-adds row `row` = (ci, ky, kx) of a column block for
/// output rows from `oy0`, `src` (rows * OW), into `plane` (H, W), input channel ci.
fn col2im_row(src: &[f32], row: usize, plane: &mut [f32], g: &Geom, oy0: usize) {
    let (ky, kx) = ((row / g.kw) % g.kh, row % g.kw);
    let lo = g.pw.saturating_sub(kx).div_ceil(g.sw).min(g.ow);
    let hi = (g.w + g.pw).saturating_sub(kx).div_ceil(g.sw).clamp(lo, g.ow);
    for (r, s) in src.chunks(g.ow).enumerate() {
        let iy = (oy0 + r) * g.sh + ky;
        if iy < g.ph || iy - g.ph >= g.h {
            continue;
        }
        let dst = &mut plane[(iy - g.ph) * g.w..(iy - g.ph + 1) * g.w];
        if g.sw == 1 {
            let ix0 = lo + kx - g.pw;
            for (d, &v) in dst[ix0..ix0 + hi - lo].iter_mut().zip(&s[lo..hi]) {
                *d += v;
            }
        } else {
            for (ox, &v) in s[lo..hi].iter().enumerate() {
                dst[(lo + ox) * g.sw + kx - g.pw] += v;
            }
        }
    }
}

/// dX of one image: `dxi` (Cin, H, W) = col2im(W^T (K, Cout) x `dyi` (Cout, OH*OW)), by blocks
/// of `rows` output rows; `dxi` must hold zeros. `col` is the scratch (K * rows * OW, empty
/// for a pointwise kernel).
fn grad_input_image(g: &Geom, wt: &[f32], dyi: &[f32], dxi: &mut [f32], col: &mut [f32], rows: usize, parallel: bool) {
    let (k, n) = (g.k(), g.ncol());
    let a = MatRef { data: wt, rs: 1, cs: k };
    if g.is_pointwise() {
        sgemm(k, n, g.cout, a, MatRef { data: dyi, rs: n, cs: 1 }, dxi, n, false, parallel);
        return;
    }
    let (plane, khw) = (g.h * g.w, g.kh * g.kw);
    for oy0 in (0..g.oh).step_by(rows) {
        let nb = rows.min(g.oh - oy0) * g.ow;
        let colb = &mut col[..k * nb];
        let b = MatRef { data: &dyi[oy0 * g.ow..], rs: n, cs: 1 };
        sgemm(k, nb, g.cout, a, b, colb, nb, false, parallel);
        let colb = &*colb;
        // One task per input channel: it owns its plane, so the scatter needs no locks.
        let scatter = |ci: usize, pl: &mut [f32]| {
            for row in ci * khw..(ci + 1) * khw {
                col2im_row(&colb[row * nb..(row + 1) * nb], row, pl, g, oy0);
            }
        };
        if parallel && colb.len() >= PAR_MIN {
            use rayon::prelude::*;
            dxi.par_chunks_mut(plane).enumerate().for_each(|(ci, pl)| scatter(ci, pl));
        } else {
            dxi.chunks_mut(plane).enumerate().for_each(|(ci, pl)| scatter(ci, pl));
        }
    }
}

/// `dw` (Cout, K) (+)= `dyi` (Cout, OH*OW) x im2col(`xi`)^T (OH*OW, K), by blocks of `rows`
/// output rows, overwriting first unless `acc`; `col` as in `grad_input_image`.
#[allow(clippy::too_many_arguments)]
fn grad_weight_image(
    g: &Geom,
    xi: &[f32],
    dyi: &[f32],
    dw: &mut [f32],
    col: &mut [f32],
    rows: usize,
    mut acc: bool,
    parallel: bool,
) {
    let (k, n) = (g.k(), g.ncol());
    if g.is_pointwise() {
        let (a, b) = (MatRef { data: dyi, rs: n, cs: 1 }, MatRef { data: xi, rs: 1, cs: n });
        sgemm(g.cout, k, n, a, b, dw, k, acc, parallel);
        return;
    }
    for oy0 in (0..g.oh).step_by(rows) {
        let nb = rows.min(g.oh - oy0) * g.ow;
        let colb = &mut col[..k * nb];
        if parallel && colb.len() >= PAR_MIN {
            use rayon::prelude::*;
            colb.par_chunks_mut(nb).enumerate().for_each(|(r, o)| im2col_row(xi, r, o, g, oy0));
        } else {
            colb.chunks_mut(nb).enumerate().for_each(|(r, o)| im2col_row(xi, r, o, g, oy0));
        }
        let a = MatRef { data: &dyi[oy0 * g.ow..], rs: n, cs: 1 };
        sgemm(g.cout, k, nb, a, MatRef { data: colb, rs: 1, cs: nb }, dw, k, acc, parallel);
        acc = true;
    }
}

/// Many small images: one image per rayon task (serial GEMMs) beats parallel GEMMs per image.
fn per_image_tasks(g: &Geom) -> bool {
    g.n >= rayon::current_num_threads() && g.n > 1 && g.cout * g.ncol() * g.k() < 1 << 22
}

fn grad_input_cpu(g: &Geom, wt: &[f32], dy: &[f32]) -> Vec<f32> {
    let (img_in, img_out) = (g.cin * g.h * g.w, g.cout * g.ncol());
    let mut dx = vec![0.0f32; g.n * img_in];
    if dx.is_empty() {
        return dx;
    }
    let rows = block_rows(g);
    let col_len = if g.is_pointwise() { 0 } else { g.k() * rows * g.ow };
    let dyi = |i: usize| &dy[i * img_out..(i + 1) * img_out];
    if per_image_tasks(g) {
        use rayon::prelude::*;
        dx.par_chunks_mut(img_in).enumerate().for_each_init(
            || vec![0.0f32; col_len],
            |col, (i, dxi)| grad_input_image(g, wt, dyi(i), dxi, col, rows, false),
        );
    } else {
        let mut col = vec![0.0f32; col_len];
        for (i, dxi) in dx.chunks_mut(img_in).enumerate() {
            grad_input_image(g, wt, dyi(i), dxi, &mut col, rows, true);
        }
    }
    dx
}

fn grad_weight_cpu(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (img_in, img_out, wlen) = (g.cin * g.h * g.w, g.cout * g.ncol(), g.cout * g.k());
    if wlen == 0 || g.n == 0 {
        return vec![0.0f32; wlen];
    }
    let rows = block_rows(g);
    let col_len = if g.is_pointwise() { 0 } else { g.k() * rows * g.ow };
    let xi = |i: usize| &x[i * img_in..(i + 1) * img_in];
    let dyi = |i: usize| &dy[i * img_out..(i + 1) * img_out];
    if per_image_tasks(g) {
        // Each task sums its images into its own (small) dW, then the partial sums are added.
        use rayon::prelude::*;
        (0..g.n)
            .into_par_iter()
            .fold(
                || (vec![0.0f32; wlen], vec![0.0f32; col_len]),
                |(mut dw, mut col), i| {
                    grad_weight_image(g, xi(i), dyi(i), &mut dw, &mut col, rows, true, false);
                    (dw, col)
                },
            )
            .map(|(dw, _)| dw)
            .reduce(
                || vec![0.0f32; wlen],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(u, v)| *u += v);
                    a
                },
            )
    } else {
        let mut dw = vec![0.0f32; wlen];
        let mut col = vec![0.0f32; col_len];
        for i in 0..g.n {
            grad_weight_image(g, xi(i), dyi(i), &mut dw, &mut col, rows, i > 0, true);
        }
        dw
    }
}

fn gpu_params(g: &Geom, chunk: usize) -> Result<Conv2dParams> {
    let u = |v: usize| u32_of(OP, v);
    Ok(Conv2dParams {
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
        n: u(g.n)?,
        chunk: u(chunk)?,
        has_bias: 0,
        has_temb: 0,
        has_res: 0,
        _pad: 0,
    })
}

/// The forward kernel's variant for a tile from `matmul::tile`, on f32 or f16 X and W.
fn fwd_shader(t: (usize, usize), ops: Operands, f16_math: bool) -> &'static crate::device::Shader {
    use Operands::*;
    match (t, ops) {
        ((128, 128), F32) => &CONV2D_FWD_128,
        ((128, 64), F32) => &CONV2D_FWD_128X64,
        ((64, 128), F32) => &CONV2D_FWD_64X128,
        (_, F32) => &CONV2D_FWD_64,
        ((128, 128), F16) if f16_math => &CONV2D_FWD_F16M_128,
        ((128, 64), F16) if f16_math => &CONV2D_FWD_F16M_128X64,
        ((64, 128), F16) if f16_math => &CONV2D_FWD_F16M_64X128,
        (_, F16) if f16_math => &CONV2D_FWD_F16M_64,
        ((128, 128), F16Weight) if f16_math => &CONV2D_FWD_F16WM_128,
        ((128, 64), F16Weight) if f16_math => &CONV2D_FWD_F16WM_128X64,
        ((64, 128), F16Weight) if f16_math => &CONV2D_FWD_F16WM_64X128,
        (_, F16Weight) if f16_math => &CONV2D_FWD_F16WM_64,
        ((128, 128), F16) => &CONV2D_FWD_F16_128,
        ((128, 64), F16) => &CONV2D_FWD_F16_128X64,
        ((64, 128), F16) => &CONV2D_FWD_F16_64X128,
        (_, F16) => &CONV2D_FWD_F16_64,
        ((128, 128), F16Weight) => &CONV2D_FWD_F16W_128,
        ((128, 64), F16Weight) => &CONV2D_FWD_F16W_128X64,
        ((64, 128), F16Weight) => &CONV2D_FWD_F16W_64X128,
        (_, F16Weight) => &CONV2D_FWD_F16W_64,
    }
}

/// GPU weight gradient: workgroups it aims for, and the fewest reduction elements per split.
const WG_TARGET: usize = 512;
const MIN_CHUNK: usize = 256;

/// Terms the split-K sum adds (each None or its buffer): residual (like Y), bias (Cout),
/// temb (N, Cout).
pub(crate) struct SplitTerms<'a> {
    pub res: Option<&'a GpuBuffer>,
    pub bias: Option<&'a GpuBuffer>,
    pub temb: Option<&'a GpuBuffer>,
}

/// conv2d_split.wgsl's params: `len` = N * Cout * OH * OW, `ncol` = OH * OW.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SplitParams {
    pub len: u32,
    pub cout: u32,
    pub ncol: u32,
    pub splits: u32,
    pub has_bias: u32,
    pub has_temb: u32,
    pub has_res: u32,
    pub _pad: u32,
}

/// Split-K: `entry` of `shader` (main_split or grad_input_s1_split) writes each split's
/// partial product of the convolution `params` describes, then conv2d_split adds them and
/// `terms` into `out` (N, Cout, OH, OW). `tiles`: the x and y workgroups of one pass; `op`
/// names the caller in errors.
#[allow(clippy::too_many_arguments)]
fn split_k(
    op: &'static str,
    ctx: &std::sync::Arc<crate::device::GpuContext>,
    shader: &'static crate::device::Shader,
    entry: &'static str,
    params: &Conv2dParams,
    (x, w): (&GpuBuffer, &GpuBuffer),
    out: &Tensor,
    tiles: [u32; 2],
    (splits, chunk): (usize, usize),
    terms: SplitTerms,
) -> Result<()> {
    let len = out.numel();
    let n = params.n as usize;
    u32_of(op, splits * len)?;
    let part = Tensor::gpu_empty(ctx, op, &[splits, len])?;
    let mut p = *params;
    p.chunk = u32_of(op, chunk)?;
    let pb = part.gpu_buf(op)?;
    ctx.dispatch(shader, entry, &p, &[x, w, pb], [tiles[0], tiles[1], u32_of(op, splits * n)?])?;
    sum_splits(op, ctx, pb, out, splits, (params.cout, params.ncol), terms)
}

/// conv2d_split.wgsl: `out` (len elements) = the sum of the `splits` partials in `part`
/// (splits, len) plus `terms`, for an output laid out (N, Cout, ncol) — a matmul's C (batch,
/// M, N) is Cout = N columns of ncol = 1, so its bias is per column.
pub(crate) fn sum_splits(
    op: &'static str,
    ctx: &std::sync::Arc<crate::device::GpuContext>,
    part: &GpuBuffer,
    out: &Tensor,
    splits: usize,
    (cout, ncol): (u32, u32),
    terms: SplitTerms,
) -> Result<()> {
    let len = out.numel();
    let sp = SplitParams {
        len: u32_of(op, len)?,
        cout,
        ncol,
        splits: u32_of(op, splits)?,
        has_bias: terms.bias.is_some() as u32,
        has_temb: terms.temb.is_some() as u32,
        has_res: terms.res.is_some() as u32,
        _pad: 0,
    };
    // `part` fills the slots of absent terms (read-only; the flags skip them).
    let bufs =
        [part, out.gpu_buf(op)?, terms.res.unwrap_or(part), terms.bias.unwrap_or(part), terms.temb.unwrap_or(part)];
    ctx.dispatch(&CONV2D_SPLIT, "main", &sp, &bufs, crate::ops::groups_for(ctx, len))
}

impl Tensor {
    /// `F.conv2d(x, weight, bias, stride, padding)` with dilation 1 and groups 1.
    /// `self` (N, Cin, H, W), `weight` (Cout, Cin, KH, KW), `bias` (Cout) -> (N, Cout, OH, OW),
    /// OH = (H + 2 * padding.0 - KH) / stride.0 + 1, likewise OW.
    /// Differentiable in all three; it saves `self` only when the weight needs a gradient and
    /// the weight only when `self` does, so a frozen weight keeps no activation alive.
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Tensor> {
        self.conv2d_add(weight, bias, stride, padding, ConvAdd::default())
    }

    /// `conv2d` plus `add.temb[:, :, None, None]` and `add.residual`, added as the output is
    /// written (no elementwise pass per term); differentiable in every input.
    pub fn conv2d_add(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        add: ConvAdd,
    ) -> Result<Tensor> {
        let out = self.conv2d_raw(weight, bias, stride, padding, add)?;
        let inputs: Vec<&Tensor> =
            [Some(self), Some(weight), bias, add.temb, add.residual].into_iter().flatten().collect();
        if !crate::autograd::will_record(&inputs) {
            return Ok(out);
        }
        if self.dtype() == DType::F16 {
            return Err(Error::Invalid("conv2d: an f16 input has no backward (cast it to f32 to train)".into()));
        }
        let x_saved = weight.is_tracked().then(|| self.detach());
        let w_saved = self.is_tracked().then(|| weight.detach());
        let (x_shape, w_shape) = (self.shape().to_vec(), weight.shape().to_vec());
        let (has_b, has_t, has_r) = (bias.is_some(), add.temb.is_some(), add.residual.is_some());
        Ok(crate::autograd::record(OP, out, &inputs, move |g, needs| {
            let unsaved = || Error::Invalid("conv2d backward: an input it needs was not saved".into());
            let dx = match needs[0] {
                true => Some(g.conv2d_grad_input(w_saved.as_ref().ok_or_else(unsaved)?, &x_shape, stride, padding)?),
                false => None,
            };
            let dw = match needs[1] {
                true => Some(x_saved.as_ref().ok_or_else(unsaved)?.conv2d_grad_weight(g, &w_shape, stride, padding)?),
                false => None,
            };
            let mut grads = vec![dx, dw];
            let (n, cout) = (x_shape[0], w_shape[0]);
            let mut k = 2;
            if has_b {
                grads.push(needs[k].then(|| g.sum_to_shape(&[1, cout, 1, 1])?.reshape_to(&[cout])).transpose()?);
                k += 1;
            }
            if has_t {
                grads.push(needs[k].then(|| g.sum_to_shape(&[n, cout, 1, 1])?.reshape_to(&[n, cout])).transpose()?);
                k += 1;
            }
            if has_r {
                grads.push(needs[k].then(|| g.clone()));
            }
            Ok(grads)
        }))
    }

    /// Input gradient of `conv2d`: `self` is dY (N, Cout, OH, OW), `weight` (Cout, Cin, KH, KW),
    /// `input_shape` the forward input's (N, Cin, H, W) (several H give the same OH when
    /// strided) -> dX (N, Cin, H, W).
    pub fn conv2d_grad_input(
        &self,
        weight: &Tensor,
        input_shape: &[usize],
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Tensor> {
        const NAME: &str = "conv2d grad_input";
        self.ensure_f32(NAME)?;
        // An f16 weight (stored in f16, frozen) is read as such by the stride-1 kernel.
        let ops = Operands::of(NAME, self.dtype(), weight.dtype())?;
        self.same_device(NAME, weight)?;
        let g = geometry(input_shape, weight.shape(), None, stride, padding)?;
        check_dy(NAME, &g, self.shape(), input_shape)?;
        match self.device() {
            Device::Cpu => {
                let wt = Operands::cpu_values(NAME, weight)?;
                Ok(Tensor::cpu(grad_input_cpu(&g, &wt, self.cpu_f32(NAME)?), input_shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, NAME, input_shape)?;
                if out.numel() == 0 {
                    return Ok(out);
                }
                let u = |v: usize| u32_of(NAME, v);
                u(out.numel())?;
                u(self.numel())?;
                if g.sh == 1 && g.sw == 1 && g.ph < g.kh && g.pw < g.kw {
                    // A stride-1 input gradient is a convolution of dY with the flipped,
                    // transposed kernel: the forward's register-blocked tiles.
                    let params = Conv2dParams {
                        cin: u(g.cout)?,
                        h: u(g.oh)?,
                        w: u(g.ow)?,
                        cout: u(g.cin)?,
                        kh: u(g.kh)?,
                        kw: u(g.kw)?,
                        oh: u(g.h)?,
                        ow: u(g.w)?,
                        sh: 1,
                        sw: 1,
                        ph: u(g.kh - 1 - g.ph)?,
                        pw: u(g.kw - 1 - g.pw)?,
                        k: u(g.cout * g.kh * g.kw)?,
                        ncol: u(g.h * g.w)?,
                        n: u(g.n)?,
                        chunk: 0,
                        has_bias: 0,
                        has_temb: 0,
                        has_res: 0,
                        _pad: 0,
                    };
                    let t = crate::ops::matmul::tile(g.cin, g.h * g.w, g.n);
                    let groups = [u((g.h * g.w).div_ceil(t.1))?, u(g.cin.div_ceil(t.0))?, u(g.n)?];
                    ops.check_adapter(NAME, &ctx)?;
                    let dyb = self.gpu_buf(NAME)?;
                    let wb = weight.gpu_buf_any(NAME)?;
                    let tiles = (groups[0] * groups[1]) as usize * g.n;
                    let shader = fwd_shader(t, ops, ctx.f16_math());
                    if let Some(split) = crate::ops::matmul::k_splits(tiles, params.k as usize) {
                        let none = SplitTerms { res: None, bias: None, temb: None };
                        split_k(
                            NAME,
                            &ctx,
                            shader,
                            "grad_input_s1_split",
                            &params,
                            (dyb, wb),
                            &out,
                            [groups[0], groups[1]],
                            split,
                            none,
                        )?;
                        return Ok(out);
                    }
                    let bufs = [dyb, wb, out.gpu_buf(NAME)?];
                    ctx.dispatch(shader, "grad_input_s1", &params, &bufs, groups)?;
                    return Ok(out);
                }
                let phase_cols = g.h.div_ceil(g.sh) * g.w.div_ceil(g.sw);
                let groups = [u(phase_cols.div_ceil(64))?, u(g.cin.div_ceil(64))?, u(g.n * g.sh * g.sw)?];
                // The strided kernel reads f32 weights: an f16 one is widened for it.
                let wide;
                let weight = if weight.dtype() == DType::F32 {
                    weight
                } else {
                    wide = weight.to_dtype(DType::F32)?;
                    &wide
                };
                let bufs = [self.gpu_buf(NAME)?, weight.gpu_buf(NAME)?, out.gpu_buf(NAME)?];
                ctx.dispatch(&CONV2D, "grad_input", &gpu_params(&g, 0)?, &bufs, groups)?;
                Ok(out)
            }
        }
    }

    /// Weight gradient of `conv2d`: `self` is the forward input X (N, Cin, H, W), `dy`
    /// (N, Cout, OH, OW) -> dW shaped `weight_shape` (Cout, Cin, KH, KW), summed over the batch.
    pub fn conv2d_grad_weight(
        &self,
        dy: &Tensor,
        weight_shape: &[usize],
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Tensor> {
        const NAME: &str = "conv2d grad_weight";
        self.ensure_f32(NAME)?;
        dy.ensure_f32(NAME)?;
        self.same_device(NAME, dy)?;
        let g = geometry(self.shape(), weight_shape, None, stride, padding)?;
        check_dy(NAME, &g, dy.shape(), self.shape())?;
        match self.device() {
            Device::Cpu => Ok(Tensor::cpu(grad_weight_cpu(&g, self.cpu_f32(NAME)?, dy.cpu_f32(NAME)?), weight_shape)),
            Device::Gpu(ctx) => {
                let (k, total) = (g.k(), g.n * g.ncol());
                if g.cout * k == 0 {
                    return Tensor::gpu_empty(&ctx, NAME, weight_shape);
                }
                // Few output tiles (a small weight): split the batch*pixels reduction over
                // workgroups into partial sums, added up by one reduce afterwards.
                let tiles = g.cout.div_ceil(64) * k.div_ceil(64);
                let splits = WG_TARGET.div_ceil(tiles).min(total.div_ceil(MIN_CHUNK)).max(1);
                let chunk = total.div_ceil(splits).next_multiple_of(16).max(16);
                let splits = total.div_ceil(chunk).max(1);
                let u = |v: usize| u32_of(NAME, v);
                u(self.numel())?;
                u(dy.numel())?;
                u(splits * g.cout * k)?;
                let out = Tensor::gpu_empty(&ctx, NAME, &[splits, g.cout, k])?;
                let groups = [u(k.div_ceil(64))?, u(g.cout.div_ceil(64))?, u(splits)?];
                let bufs = [self.gpu_buf(NAME)?, dy.gpu_buf(NAME)?, out.gpu_buf(NAME)?];
                ctx.dispatch(&CONV2D, "grad_weight", &gpu_params(&g, chunk)?, &bufs, groups)?;
                let out = if splits > 1 { out.sum(0, false)? } else { out };
                out.reshape_to(weight_shape)
            }
        }
    }

    fn conv2d_raw(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        add: ConvAdd,
    ) -> Result<Tensor> {
        // X and W both f32, both f16, or an f16 W (storage; f32 arithmetic, f32 output).
        let ops = Operands::of(OP, self.dtype(), weight.dtype())?;
        self.same_device(OP, weight)?;
        for t in [bias, add.temb, add.residual].into_iter().flatten() {
            t.ensure_f32(OP)?;
            self.same_device(OP, t)?;
        }
        let g = geometry(self.shape(), weight.shape(), bias.map(|b| b.shape()), stride, padding)?;
        let out_shape = [g.n, g.cout, g.oh, g.ow];
        if let Some(t) = add.temb {
            if t.shape() != [g.n, g.cout] {
                let msg =
                    format!("temb {:?} must be [{}, {}] (N, Cout) for output {out_shape:?}", t.shape(), g.n, g.cout);
                return Err(Error::shape(OP, msg));
            }
        }
        if let Some(r) = add.residual {
            if r.shape() != out_shape {
                return Err(Error::shape(
                    OP,
                    format!("residual {:?} must be the output's shape {out_shape:?}", r.shape()),
                ));
            }
        }
        match self.device() {
            Device::Cpu => {
                let (b, t, r) = (
                    bias.map(|t| t.cpu_f32(OP)).transpose()?,
                    add.temb.map(|t| t.cpu_f32(OP)).transpose()?,
                    add.residual.map(|t| t.cpu_f32(OP)).transpose()?,
                );
                let e = Epilogue { bias: b, temb: t, res: r };
                // f16 values widened: products exact in f32, as on the GPU.
                let (x, w) = (Operands::cpu_values(OP, self)?, Operands::cpu_values(OP, weight)?);
                let y = conv_cpu(&g, &x, &w, e);
                Ok(Tensor::cpu(y, &out_shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, &out_shape)?;
                let u = |v: usize| u32_of(OP, v);
                u(self.numel())?;
                u(crate::tensor::numel(&out_shape))?;
                let mut params = gpu_params(&g, 0)?;
                params.has_bias = bias.is_some() as u32;
                params.has_temb = add.temb.is_some() as u32;
                params.has_res = add.residual.is_some() as u32;
                // Output channels are the GEMM's rows, pixels its columns, images its batch.
                let t = crate::ops::matmul::tile(g.cout, g.ncol(), g.n);
                let groups = [u(g.ncol().div_ceil(t.1))?, u(g.cout.div_ceil(t.0))?, u(g.n)?];
                ops.check_adapter(OP, &ctx)?;
                let xb = self.gpu_buf_any(OP)?;
                let wb = weight.gpu_buf_any(OP)?;
                let terms = SplitTerms {
                    res: add.residual.map(|t| t.gpu_buf(OP)).transpose()?,
                    bias: bias.map(|t| t.gpu_buf(OP)).transpose()?,
                    temb: add.temb.map(|t| t.gpu_buf(OP)).transpose()?,
                };
                let shader = fwd_shader(t, ops, ctx.f16_math());
                let tiles = (groups[0] * groups[1]) as usize * g.n;
                if let Some(split) = crate::ops::matmul::k_splits(tiles, g.k()) {
                    let (gx, gy) = (groups[0], groups[1]);
                    split_k(OP, &ctx, shader, "main_split", &params, (xb, wb), &out, [gx, gy], split, terms)?;
                    return Ok(out);
                }
                // x fills the slot of an absent term (its flag keeps the kernel from reading it;
                // a slot is raw bytes, so an f16 x binds as well).
                let (rb, bb, tb) = (terms.res.unwrap_or(xb), terms.bias.unwrap_or(xb), terms.temb.unwrap_or(xb));
                let bufs = [xb, wb, out.gpu_buf(OP)?, rb, bb, tb];
                ctx.dispatch(shader, "main", &params, &bufs, groups)?;
                Ok(out)
            }
        }
    }
}

/// Checks that `dy` has the forward output's shape for input `x`.
fn check_dy(op: &'static str, g: &Geom, dy: &[usize], x: &[usize]) -> Result<()> {
    let want = [g.n, g.cout, g.oh, g.ow];
    if dy != want {
        return Err(Error::shape(op, format!("dy {dy:?} must be {want:?}, the output shape for input {x:?}")));
    }
    Ok(())
}
