//! Tensor: a shape and a contiguous storage on one device.
//!
//! Storage is shared (`Arc`), so `reshape` and `clone` copy nothing. Ops always produce
//! contiguous outputs; strided views are materialised by `permute`/`slice`.

use std::sync::Arc;

use crate::autograd::Node;
use crate::device::{Device, GpuBuffer};
use crate::error::{Error, Result};

/// Element type of a storage. Only f32 computes; f16 is a storage type (frozen weights), widened
/// with `to_dtype` where it is read (see `ops::cast`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        })
    }
}

pub enum Storage {
    Cpu(CpuStorage),
    Gpu(GpuBuffer),
}

pub enum CpuStorage {
    F32(Vec<f32>),
    /// f16 values, as the GPU keeps them (packed there two per u32).
    F16(Vec<half::f16>),
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Arc<Storage>,
    /// Autograd history: how this tensor was made (None for data and frozen weights).
    node: Option<Arc<Node>>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape, self.dtype, self.device())
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a contiguous tensor.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl Tensor {
    pub(crate) fn from_parts(shape: Vec<usize>, dtype: DType, storage: Storage) -> Tensor {
        Tensor { shape, dtype, storage: Arc::new(storage), node: None }
    }

    /// A CPU tensor from f32 values.
    pub(crate) fn cpu(data: Vec<f32>, shape: &[usize]) -> Tensor {
        debug_assert_eq!(data.len(), numel(shape));
        Tensor::from_parts(shape.to_vec(), DType::F32, Storage::Cpu(CpuStorage::F32(data)))
    }

    /// Host f32 values `data`, laid out row-major as `shape`, placed on `device`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "from_vec",
                format!("{} values do not fill shape {shape:?} ({} elements)", data.len(), numel(shape)),
            ));
        }
        match device {
            Device::Cpu => Ok(Tensor::cpu(data, shape)),
            Device::Gpu(ctx) => {
                let buf = ctx.alloc("from_vec", (data.len() * 4) as u64)?;
                ctx.write(&buf, bytemuck::cast_slice(&data));
                Ok(Tensor::from_parts(shape.to_vec(), DType::F32, Storage::Gpu(buf)))
            }
        }
    }

    pub fn from_slice(data: &[f32], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    pub fn full(value: f32, shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value; numel(shape)], shape, device)
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, device)
    }

    /// Standard normal values from a fixed seed: the same numbers on every device.
    pub fn randn(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
        let mut rng = crate::rng::Rng::new(seed);
        Tensor::from_vec(rng.normal_vec(numel(shape)), shape, device)
    }

    /// Uniform values in [lo, hi) from a fixed seed.
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, seed: u64, device: &Device) -> Result<Tensor> {
        let mut rng = crate::rng::Rng::new(seed);
        let v = (0..numel(shape)).map(|_| lo + (hi - lo) * rng.uniform()).collect();
        Tensor::from_vec(v, shape, device)
    }

    /// An uninitialised GPU output of `shape` (every op writes all of it).
    pub(crate) fn gpu_empty(ctx: &Arc<crate::device::GpuContext>, op: &'static str, shape: &[usize]) -> Result<Tensor> {
        let buf = ctx.alloc(op, (numel(shape).max(1) * 4) as u64)?;
        Ok(Tensor::from_parts(shape.to_vec(), DType::F32, Storage::Gpu(buf)))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn dim(&self, axis: isize) -> Result<usize> {
        Ok(self.shape[self.axis("dim", axis)?])
    }

    /// Resolves a possibly negative axis, naming the op on error.
    pub fn axis(&self, op: &'static str, axis: isize) -> Result<usize> {
        let r = self.rank() as isize;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r {
            return Err(Error::shape(op, format!("axis {axis} out of range for shape {:?}", self.shape)));
        }
        Ok(a as usize)
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Gpu(b) => Device::Gpu(b.ctx().clone()),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// True when both tensors share one storage (a reshape of the other, or a clone).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// f32 values of a CPU tensor, for CPU kernels.
    pub(crate) fn cpu_f32(&self, op: &'static str) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            Storage::Cpu(CpuStorage::F16(_)) => {
                Err(Error::DType { op, dtype: self.dtype.to_string(), supported: "f32" })
            }
            Storage::Gpu(_) => Err(Error::Device { op, msg: format!("expected a CPU tensor, got {self:?}") }),
        }
    }

    /// The buffer of a GPU tensor, checking the dtype is f32.
    pub(crate) fn gpu_buf(&self, op: &'static str) -> Result<&GpuBuffer> {
        self.ensure_f32(op)?;
        match &*self.storage {
            Storage::Gpu(b) => Ok(b),
            Storage::Cpu(_) => Err(Error::Device { op, msg: format!("expected a GPU tensor, got {self:?}") }),
        }
    }

    /// The buffer of a GPU tensor of any dtype (f16: packed two per word).
    pub(crate) fn gpu_buf_any(&self, op: &'static str) -> Result<&GpuBuffer> {
        match &*self.storage {
            Storage::Gpu(b) => Ok(b),
            Storage::Cpu(_) => Err(Error::Device { op, msg: format!("expected a GPU tensor, got {self:?}") }),
        }
    }

    pub(crate) fn ensure_f32(&self, op: &'static str) -> Result<()> {
        if self.dtype != DType::F32 {
            return Err(Error::DType { op, dtype: self.dtype.to_string(), supported: "f32" });
        }
        Ok(())
    }

    /// Copies the values to the host (waits for the GPU); f16 values come back widened to f32.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::F16 {
            return self.f16_to_vec_f32();
        }
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v.clone()),
            Storage::Cpu(CpuStorage::F16(_)) => {
                Err(Error::DType { op: "to_vec", dtype: "f16".into(), supported: "f32" })
            }
            Storage::Gpu(b) => {
                let bytes = b.ctx().read(b, (self.numel() * 4) as u64)?;
                Ok(bytemuck::pod_collect_to_vec(&bytes))
            }
        }
    }

    /// The single value of a one-element tensor.
    pub fn scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape("scalar", format!("expected one element, shape is {:?}", self.shape)));
        }
        Ok(self.to_vec()?[0])
    }

    /// This tensor on `device` (a copy when it moves, a cheap clone when it is already there),
    /// in its dtype.
    pub fn to(&self, device: &Device) -> Result<Tensor> {
        if &self.device() == device {
            return Ok(self.clone());
        }
        let out = match self.dtype {
            DType::F32 => Tensor::from_vec(self.to_vec()?, &self.shape, device)?,
            DType::F16 => Tensor::from_f16_vec(self.to_f16_vec()?, &self.shape, device)?,
        };
        let back = self.device();
        Ok(crate::autograd::record("to", out, &[self], move |g, _| Ok(vec![Some(g.to(&back)?)])))
    }

    /// Same storage, new shape of the same element count. `-1` in one place is inferred.
    pub fn reshape(&self, shape: &[isize]) -> Result<Tensor> {
        let known: usize = shape.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
        let holes = shape.iter().filter(|&&d| d < 0).count();
        let new: Vec<usize> = match holes {
            0 => shape.iter().map(|&d| d as usize).collect(),
            1 if known > 0 && self.numel().is_multiple_of(known) => {
                shape.iter().map(|&d| if d < 0 { self.numel() / known } else { d as usize }).collect()
            }
            _ => return Err(Error::shape("reshape", format!("cannot infer {shape:?} from {:?}", self.shape))),
        };
        self.reshape_to(&new)
    }

    pub fn reshape_to(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} has {} elements, {shape:?} has {}", self.shape, self.numel(), numel(shape)),
            ));
        }
        let out = Tensor { shape: shape.to_vec(), dtype: self.dtype, storage: self.storage.clone(), node: None };
        let in_shape = self.shape.clone();
        Ok(crate::autograd::record("reshape", out, &[self], move |g, _| Ok(vec![Some(g.reshape_to(&in_shape)?)])))
    }

    pub(crate) fn node(&self) -> Option<&Arc<Node>> {
        self.node.as_ref()
    }

    pub(crate) fn with_node(&self, node: Option<Arc<Node>>) -> Tensor {
        Tensor { shape: self.shape.clone(), dtype: self.dtype, storage: self.storage.clone(), node }
    }

    /// Checks that `other` lives on the same device, naming the op.
    pub(crate) fn same_device(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.device() != other.device() {
            return Err(Error::Device { op, msg: format!("operands on different devices: {self:?} and {other:?}") });
        }
        Ok(())
    }
}
