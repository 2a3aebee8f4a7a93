//! f32 <-> f16 storage casts (`shaders/cast.wgsl`), and f16 tensors to and from the host.
//!
//! f16 is a storage type only: ops compute in f32, so a tensor kept in f16 (a frozen weight)
//! is widened by `to_dtype(DType::F32)` where it is read. On the GPU an f16 tensor holds its
//! values packed two per u32 (element 2k in the low half of word k, the byte layout of
//! `array<f16>`), in `ceil(numel / 2) * 4` bytes; on the CPU a `Vec<half::f16>`. Rounding is to
//! nearest even with overflow to inf, as PyTorch's `.half()`; the CPU twin is the `half` crate.

use rayon::prelude::*;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{groups_for, u32_of, PAR_MIN};
use crate::shaders::CAST;
use crate::tensor::{CpuStorage, DType, Storage, Tensor};

const OP: &str = "to_dtype";

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CastParams {
    pub n: u32,
    pub words: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Host f32 -> f16, round to nearest even, in parallel chunks when large.
fn narrow(src: &[f32]) -> Vec<f16> {
    let mut out = vec![f16::ZERO; src.len()];
    if src.len() < PAR_MIN {
        out.convert_from_f32_slice(src);
    } else {
        out.par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(o, s)| o.convert_from_f32_slice(s));
    }
    out
}

/// Host f16 -> f32 (exact).
fn widen(src: &[f16]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    if src.len() < PAR_MIN {
        src.convert_to_f32_slice(&mut out);
    } else {
        out.par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(o, s)| s.convert_to_f32_slice(o));
    }
    out
}

impl Tensor {
    /// This tensor stored as `dtype` (a cheap clone when it already is). f32 -> f16 rounds to
    /// nearest even and overflows to inf, as PyTorch's `.half()`; f16 -> f32 is exact.
    /// The gradient passes through unchanged (and stays f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        let out = self.to_dtype_raw(dtype)?;
        Ok(crate::autograd::record("to_dtype", out, &[self], |g, _| Ok(vec![Some(g.clone())])))
    }

    fn to_dtype_raw(&self, dtype: DType) -> Result<Tensor> {
        let n = self.numel();
        let shape = self.shape().to_vec();
        match (self.storage(), dtype) {
            (Storage::Cpu(CpuStorage::F32(v)), DType::F16) => {
                Ok(Tensor::from_parts(shape, DType::F16, Storage::Cpu(CpuStorage::F16(narrow(v)))))
            }
            (Storage::Cpu(CpuStorage::F16(v)), DType::F32) => Ok(Tensor::cpu(widen(v), &shape)),
            (Storage::Gpu(buf), _) => {
                let ctx = buf.ctx().clone();
                let words = n.div_ceil(2);
                let params = CastParams { n: u32_of(OP, n)?, words: u32_of(OP, words)?, _pad0: 0, _pad1: 0 };
                // Both buffers hold at least one word, so a 0-element tensor still binds.
                let (entry, bytes, threads) = match dtype {
                    DType::F16 => ("pack", words * 4, words),
                    DType::F32 => ("unpack", n * 4, n),
                };
                let out = ctx.alloc(OP, bytes as u64)?;
                ctx.dispatch(&CAST, entry, &params, &[buf, &out], groups_for(&ctx, threads))?;
                Ok(Tensor::from_parts(shape, dtype, Storage::Gpu(out)))
            }
            (Storage::Cpu(_), _) => {
                Err(Error::DType { op: OP, dtype: self.dtype().to_string(), supported: "f32, f16" })
            }
        }
    }

    /// The f16 values of an f16 tensor, copied to the host (waits for the GPU).
    pub fn to_f16_vec(&self) -> Result<Vec<f16>> {
        const OP: &str = "to_f16_vec";
        if self.dtype() != DType::F16 {
            return Err(Error::DType { op: OP, dtype: self.dtype().to_string(), supported: "f16" });
        }
        match self.storage() {
            Storage::Cpu(CpuStorage::F16(v)) => Ok(v.clone()),
            Storage::Gpu(b) => {
                let bytes = b.ctx().read(b, (self.numel() * 2) as u64)?;
                Ok(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect())
            }
            Storage::Cpu(_) => Err(Error::DType { op: OP, dtype: "f32".into(), supported: "f16" }),
        }
    }

    /// The values of an f16 tensor widened to f32 on the host (what `to_vec` returns for f16).
    pub(crate) fn f16_to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(widen(&self.to_f16_vec()?))
    }

    /// An f16 tensor of host f16 `data`, laid out row-major as `shape`, placed on `device`.
    pub fn from_f16_vec(data: Vec<f16>, shape: &[usize], device: &Device) -> Result<Tensor> {
        if data.len() != crate::tensor::numel(shape) {
            return Err(Error::shape(
                "from_f16_vec",
                format!("{} values do not fill shape {shape:?} ({} elements)", data.len(), crate::tensor::numel(shape)),
            ));
        }
        match device {
            Device::Cpu => Ok(Tensor::from_parts(shape.to_vec(), DType::F16, Storage::Cpu(CpuStorage::F16(data)))),
            Device::Gpu(ctx) => {
                let words = data.len().div_ceil(2);
                let buf = ctx.alloc("from_f16_vec", (words * 4) as u64)?;
                // Little-endian u16s are the packed layout; `write` pads an odd count with zeros.
                let bits: &[u16] = data.reinterpret_cast();
                ctx.write(&buf, bytemuck::cast_slice(bits));
                Ok(Tensor::from_parts(shape.to_vec(), DType::F16, Storage::Gpu(buf)))
            }
        }
    }
}
