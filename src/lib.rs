//! vipo: preference optimization (Poly-DPO) for diffusion models on any GPU that wgpu
//! reaches, with a multithreaded CPU path that is both the fallback and the test reference.

pub mod autograd;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod image_io;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod pipelines;
pub mod rng;
pub mod schedulers;
pub mod shaders;
pub mod tensor;
pub mod toy;
pub mod train;
pub mod world;

pub use device::{Device, DeviceRequest};
pub use error::{Error, Result};
pub use tensor::{DType, Tensor};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
