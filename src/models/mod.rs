//! Loaders and building blocks of the diffusion models vipo trains (diffusers layouts).

pub mod autoencoder_kl;
pub mod clip_text;
pub mod clip_tokenizer;
pub mod ldm_convert;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
