//! End-to-end pipelines built from the models.

pub mod memory;
pub mod single_file;
pub mod stable_diffusion;
