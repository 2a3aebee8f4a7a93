//! End-to-end pipelines built from the models.

pub mod stable_diffusion;
