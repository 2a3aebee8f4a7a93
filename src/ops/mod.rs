//! Ops: each file holds the GPU dispatch beside its CPU twin and the `#[repr(C)]` mirror
//! of its shader's `Params`. Shapes are in comments as `(B, C, H, W)`.

/// `fn name(args) { body }` compiled three times: for AVX-512F, for AVX2 + FMA, and for the
/// baseline the crate is built for (x86-64: SSE2, 4 lanes, no FMA); `name` picks the best the
/// CPU has at run time. For the hot elementwise loops of the CPU path (the GEMM crate already
/// does this for its kernels). Helpers the body calls must be `#[inline(always)]` to be
/// compiled into each version. The versions are reachable as `name::{base, v3, v4}` (a module
/// beside the function) so tests can compare them.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { $name::v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `v3` is compiled for.
                    return unsafe { $name::v3($($arg),*) };
                }
            }
            $name::base($($arg),*)
        }

        #[allow(dead_code)]
        $vis mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[inline(always)]
            pub fn base($($arg: $ty),*) $body

            /// # Safety
            /// The CPU must have AVX-512F.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            pub unsafe fn v4($($arg: $ty),*) {
                base($($arg),*)
            }

            /// # Safety
            /// The CPU must have AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn v3($($arg: $ty),*) {
                base($($arg),*)
            }
        }
    };
}

pub mod attention;
pub mod binary;
pub mod cast;
pub mod conv2d;
pub mod copy;
pub mod geglu;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod softmax;
pub mod timestep;
pub mod train_step;
pub mod unary;
pub mod upsample;

use crate::error::{Error, Result};

/// Highest rank the strided shaders index (their `Params` hold 8 dims).
pub const MAX_RANK: usize = 8;

/// Elements below this run on one CPU thread; above, rayon splits them.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// The operand types of a matmul or convolution kernel: both f32, both f16, or an f32 input
/// with an f16 weight (B of a matmul, W of a convolution). f16 is storage only: the kernels
/// widen as they load and compute in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operands {
    F32,
    F16,
    F16Weight,
}

impl Operands {
    /// The kind for an input of dtype `a` and a weight (or right operand) of dtype `b`.
    pub(crate) fn of(op: &'static str, a: crate::tensor::DType, b: crate::tensor::DType) -> Result<Operands> {
        use crate::tensor::DType::{F16, F32};
        match (a, b) {
            (F32, F32) => Ok(Operands::F32),
            (F16, F16) => Ok(Operands::F16),
            (F32, F16) => Ok(Operands::F16Weight),
            (a, b) => Err(crate::Error::DType {
                op,
                dtype: format!("{a} x {b}"),
                supported: "f32 x f32, f16 x f16, f32 x f16 (an f16 weight)",
            }),
        }
    }

    /// An f32 copy of `t` for the CPU path: f16 values widen exactly.
    pub(crate) fn cpu_values<'a>(
        op: &'static str,
        t: &'a crate::tensor::Tensor,
    ) -> Result<std::borrow::Cow<'a, [f32]>> {
        match t.dtype() {
            crate::tensor::DType::F32 => Ok(std::borrow::Cow::Borrowed(t.cpu_f32(op)?)),
            _ => Ok(std::borrow::Cow::Owned(t.f16_to_vec_f32()?)),
        }
    }

    /// Errors where the adapter cannot read f16.
    pub(crate) fn check_adapter(self, op: &'static str, ctx: &crate::device::GpuContext) -> Result<()> {
        if self != Operands::F32 && !ctx.features.contains(wgpu::Features::SHADER_F16) {
            return Err(crate::Error::Gpu(format!(
                "{op}: f16 operands need an adapter with SHADER_F16; {} has none (cast them to f32)",
                ctx.info.name
            )));
        }
        Ok(())
    }
}

/// Pads a dims list to the shaders' 8 slots.
pub(crate) fn pack8(op: &'static str, v: &[usize]) -> Result<[u32; MAX_RANK]> {
    if v.len() > MAX_RANK {
        return Err(Error::shape(op, format!("rank {} exceeds the maximum of {MAX_RANK}", v.len())));
    }
    let mut out = [0u32; MAX_RANK];
    for (o, &x) in out.iter_mut().zip(v) {
        *o = u32::try_from(x).map_err(|_| Error::shape(op, format!("dimension {x} exceeds u32")))?;
    }
    Ok(out)
}

/// NumPy broadcasting of two shapes, aligned at the right.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::shape(op, format!("shapes {a:?} and {b:?} do not broadcast"))),
        };
    }
    Ok(out)
}

/// Strides reading `src` (contiguous) as if broadcast to `out`: 0 on broadcast axes.
pub(crate) fn broadcast_strides(src: &[usize], out: &[usize]) -> Vec<usize> {
    let s = crate::tensor::strides(src);
    let lead = out.len() - src.len();
    (0..out.len()).map(|i| if i < lead || src[i - lead] == 1 { 0 } else { s[i - lead] }).collect()
}

/// Offset into a strided source of output element `i` of a contiguous `shape`.
#[inline]
pub(crate) fn strided_offset(mut i: usize, shape: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for d in (0..shape.len()).rev() {
        let n = shape[d];
        off += (i % n) * strides[d];
        i /= n;
    }
    off
}

/// Fills `out[i] = f(i)` on the CPU, in parallel when it is large.
pub(crate) fn par_fill(out: &mut [f32], f: impl Fn(usize) -> f32 + Sync) {
    use rayon::prelude::*;
    if out.len() < PAR_MIN {
        out.iter_mut().enumerate().for_each(|(i, o)| *o = f(i));
    } else {
        out.par_chunks_mut(4096).enumerate().for_each(|(c, chunk)| {
            for (j, o) in chunk.iter_mut().enumerate() {
                *o = f(c * 4096 + j);
            }
        });
    }
}

/// Workgroups needed for `n` threads in groups of 256, spread over the grid's x and y.
pub(crate) fn groups_for(ctx: &crate::device::GpuContext, n: usize) -> [u32; 3] {
    ctx.grid((n as u64).div_ceil(256))
}

/// The error for a u32 overflow of an element count, naming the op.
pub(crate) fn u32_of(op: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::shape(op, format!("{n} elements exceed the 2^32 index range of the shaders")))
}

/// `exp` for f32 in straight-line arithmetic (Cephes' expf: range reduction by ln 2 in two
/// parts, a degree-6 polynomial, exponent bits), so loops over slices vectorise; libm's
/// `exp` does not, and it dominated the CPU softmax. Max relative error ~2 ulp; clamps
/// instead of overflowing to inf below -87.3 / above 88.7.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    // Selects rather than `clamp`, whose NaN rules keep LLVM from using vector min/max.
    let x = if x < -87.336_55 { -87.336_55 } else { x };
    let x = if x > 88.722_83 { 88.722_83 } else { x };
    // Round to nearest by the 1.5 * 2^23 trick: `f32::round` is a libm call on baseline
    // x86-64 (no SSE4.1), which would stop the loop from vectorising.
    // The integer n sits in the low mantissa bits of `t + MAGIC`; reading it from there
    // avoids `as i32`, whose saturating NaN checks also block vectorisation.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let ni = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((ni + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let got = super::fast_exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "fast_exp worst relative error {worst:e}");
    }
}
