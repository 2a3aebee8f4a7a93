//! The one error type of vipo. Every variant names what the user must look at:
//! the op and the shapes, the file, the key or the limit.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that an op cannot combine, e.g. `matmul: (2, 3) x (4, 5): inner dims 3 != 4`.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },

    /// Two tensors on different devices, or a tensor on a device an op does not support.
    #[error("{op}: {msg}")]
    Device { op: &'static str, msg: String },

    /// A dtype an op cannot run on yet (f16 storage is planned for several ops).
    #[error("{op}: dtype {dtype} is not supported here (supported: {supported})")]
    DType { op: &'static str, dtype: String, supported: &'static str },

    /// A buffer bigger than one storage binding of the adapter.
    #[error("{op}: tensor of {bytes} bytes exceeds the adapter's max_storage_buffer_binding_size of {limit} bytes; use a smaller batch or the CPU device")]
    TooLarge { op: &'static str, bytes: u64, limit: u64 },

    /// No device of the kind asked for.
    #[error("device: {0}")]
    NoDevice(String),

    /// Something the GPU or its driver reported.
    #[error("gpu: {0}")]
    Gpu(String),

    /// A bad argument value, naming the argument.
    #[error("{0}")]
    Invalid(String),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
