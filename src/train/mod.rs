//! Training: the objectives (SFT, Diffusion-DPO, Poly-DPO, Diffusion-KTO) and LoRA adapters.

pub mod config;
pub mod lora;
pub mod objective;
pub mod trainer;
