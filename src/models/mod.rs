//! Loaders and building blocks of the diffusion models vipo trains (diffusers layouts).

pub mod clip_tokenizer;
