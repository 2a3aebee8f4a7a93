//! Devices: the CPU path and wgpu adapters, and how a user picks one.
//!
//! `--device auto|cpu|gpu|gpu:N` or `VIPO_DEVICE`. `auto` takes the first hardware adapter
//! and never a software rasteriser (llvmpipe/lavapipe, WARP); those are reachable by name
//! (`gpu:N`) only, which is how the tests run the WGSL kernels on a machine without a GPU.

pub mod gpu;

use std::sync::{Arc, OnceLock};

pub use gpu::{GpuBuffer, GpuContext, GpuTimes, KernelTime, PoolStats, Shader, SUBGROUP_FRAGMENT};

use crate::error::{Error, Result};

#[derive(Clone)]
pub enum Device {
    Cpu,
    Gpu(Arc<GpuContext>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Gpu(g) => write!(f, "gpu:{} ({}, {:?})", g.index, g.info.name, g.info.backend),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Gpu(a), Device::Gpu(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// What the user asked for, parsed from `auto`, `cpu`, `gpu` or `gpu:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    /// The first hardware adapter.
    Gpu,
    /// Adapter N of `vipo devices`, software ones included.
    GpuIndex(usize),
}

impl std::str::FromStr for DeviceRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "gpu" => Ok(DeviceRequest::Gpu),
            _ => match s.strip_prefix("gpu:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceRequest::GpuIndex(n)),
                _ => Err(Error::Invalid(format!(
                    "device '{s}': expected auto, cpu, gpu or gpu:N (N from `vipo devices`)"
                ))),
            },
        }
    }
}

/// One adapter as `vipo devices` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub software: bool,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_size: (u32, u32),
    pub max_storage_binding_bytes: u64,
    pub max_buffer_bytes: u64,
    pub workgroup_storage_bytes: u32,
    pub max_invocations_per_workgroup: u32,
}

fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    // Reads WGPU_BACKEND etc., so CI can force Vulkan and a broken driver cannot hide behind GL.
    INSTANCE.get_or_init(|| wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env()))
}

/// Adapters in a stable order: the index is what `gpu:N` means.
fn adapters() -> &'static [wgpu::Adapter] {
    static ADAPTERS: OnceLock<Vec<wgpu::Adapter>> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let mut v = pollster::block_on(instance().enumerate_adapters(backends));
        // Native compute back ends before GL, hardware before software: `auto` takes the first fit.
        v.sort_by_key(|a| {
            let i = a.get_info();
            (i.backend == wgpu::Backend::Gl, i.device_type == wgpu::DeviceType::Cpu)
        });
        v
    })
}

fn is_software(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
}

pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters()
        .iter()
        .enumerate()
        .map(|(index, a)| {
            let i = a.get_info();
            let f = a.features();
            let l = a.limits();
            AdapterSummary {
                index,
                name: i.name.clone(),
                backend: format!("{:?}", i.backend),
                device_type: format!("{:?}", i.device_type),
                driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
                software: is_software(&i),
                shader_f16: f.contains(wgpu::Features::SHADER_F16),
                subgroups: f.contains(wgpu::Features::SUBGROUP),
                subgroup_size: (i.subgroup_min_size, i.subgroup_max_size),
                max_storage_binding_bytes: l.max_storage_buffer_binding_size,
                max_buffer_bytes: l.max_buffer_size,
                workgroup_storage_bytes: l.max_compute_workgroup_storage_size,
                max_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            }
        })
        .collect()
}

/// An adapter's context once opened, or why it could not be.
type Slot = OnceLock<std::result::Result<Arc<GpuContext>, String>>;

/// One opened context per adapter, shared by everything in the process.
fn open(index: usize) -> Result<Device> {
    static OPEN: OnceLock<Vec<Slot>> = OnceLock::new();
    let slots = OPEN.get_or_init(|| (0..adapters().len()).map(|_| OnceLock::new()).collect());
    let adapter = adapters().get(index).ok_or_else(|| {
        Error::NoDevice(format!(
            "gpu:{index} does not exist; {} adapter(s) found (see `vipo devices`)",
            adapters().len()
        ))
    })?;
    let ctx = slots[index].get_or_init(|| GpuContext::new(adapter, index).map(Arc::new).map_err(|e| e.to_string()));
    match ctx {
        Ok(c) => Ok(Device::Gpu(c.clone())),
        Err(e) => Err(Error::NoDevice(e.clone())),
    }
}

/// The device chosen, and a sentence saying why, for the user.
#[derive(Debug)]
pub struct Selected {
    pub device: Device,
    pub reason: String,
}

impl Device {
    /// Resolves a request; the `reason` says which device was taken and why.
    pub fn select(req: DeviceRequest) -> Result<Selected> {
        let hw = || adapters().iter().position(|a| !is_software(&a.get_info()));
        match req {
            DeviceRequest::Cpu => Ok(Selected { device: Device::Cpu, reason: "cpu: asked for".into() }),
            DeviceRequest::GpuIndex(n) => {
                let device = open(n)?;
                Ok(Selected { reason: format!("{device}: asked for"), device })
            }
            DeviceRequest::Gpu => match hw() {
                Some(n) => {
                    let device = open(n)?;
                    Ok(Selected { reason: format!("{device}: first hardware adapter"), device })
                }
                None => Err(Error::NoDevice(format!(
                    "no hardware GPU adapter found ({} software adapter(s); name one with gpu:N, or use cpu)",
                    adapters().len()
                ))),
            },
            DeviceRequest::Auto => match hw().map(open) {
                Some(Ok(device)) => Ok(Selected { reason: format!("{device}: hardware GPU found"), device }),
                Some(Err(e)) => {
                    Ok(Selected { device: Device::Cpu, reason: format!("cpu: the GPU could not be opened ({e})") })
                }
                None => Ok(Selected {
                    device: Device::Cpu,
                    reason: if adapters().is_empty() {
                        "cpu: no GPU adapter found".into()
                    } else {
                        "cpu: only software GPU adapters found (slower than the CPU path)".into()
                    },
                }),
            },
        }
    }

    /// The argument when given, else `VIPO_DEVICE`, else `auto`.
    pub fn from_arg(arg: Option<&str>) -> Result<Selected> {
        let env = std::env::var("VIPO_DEVICE").ok();
        let s = arg.or(env.as_deref()).unwrap_or("auto");
        Device::select(s.parse()?)
    }

    /// Any adapter at all, software ones included: what GPU tests run on.
    pub fn first_gpu_any() -> Option<Device> {
        (0..adapters().len()).find_map(|i| open(i).ok())
    }

    /// A new context on adapter `index`, shared with nobody: for measurements (pool counters,
    /// submits) that other users of the shared context would disturb.
    pub fn open_private(index: usize) -> Result<Device> {
        let adapter = adapters()
            .get(index)
            .ok_or_else(|| Error::NoDevice(format!("gpu:{index} does not exist (see `vipo devices`)")))?;
        Ok(Device::Gpu(Arc::new(GpuContext::new(adapter, index)?)))
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn gpu(&self) -> Option<&Arc<GpuContext>> {
        match self {
            Device::Gpu(g) => Some(g),
            Device::Cpu => None,
        }
    }

    /// Submits queued GPU work and waits; a no-op on the CPU.
    pub fn sync(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Gpu(g) => g.sync(),
        }
    }
}
