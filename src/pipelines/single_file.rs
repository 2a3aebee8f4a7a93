//! Stable Diffusion from one original (LDM) checkpoint file, with configs, tokenizer and
//! scheduler from a diffusers-style folder (default: the shipped `models/sd15`).

use std::path::Path;

use crate::device::Device;
use crate::error::Result;
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::ldm_convert::{load_single_file, sd15_config_dir, Component, SingleFileConfigs};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipelines::stable_diffusion::StableDiffusion;
use crate::schedulers::SchedulerConfig;

impl StableDiffusion {
    /// Loads `v1-5-pruned-emaonly.safetensors`-style files (LDM key names, any float dtype).
    /// `config_dir` holds `unet/`, `vae/`, `text_encoder/` configs, `tokenizer/` and
    /// `scheduler/`; without it, SD1.5's shipped in `models/sd15`.
    pub fn from_single_file(
        path: impl AsRef<Path>,
        config_dir: Option<&Path>,
        device: &Device,
    ) -> Result<StableDiffusion> {
        let path = path.as_ref();
        let configs = SingleFileConfigs::from_dir_or_sd15(config_dir)?;
        let dir = match config_dir {
            Some(d) => d.to_path_buf(),
            None => sd15_config_dir()?,
        };
        let (unet_store, vae_store, text_store) = load_single_file(path, &configs, device)?;
        let in_file = |e: crate::Error| crate::Error::File { path: path.to_path_buf(), msg: e.to_string() };
        let unet_cfg = UNet2DConditionConfig::from_json_str(configs.config(Component::Unet))?;
        let unet = UNet2DConditionModel::load(&unet_store, &unet_cfg, device).map_err(in_file)?;
        let vae_cfg = AutoencoderKLConfig::from_json(configs.config(Component::Vae))?;
        let vae = AutoencoderKL::load(vae_store, &vae_cfg).map_err(in_file)?;
        let text_cfg = ClipTextConfig::from_json_str(configs.config(Component::TextEncoder))?;
        let text_encoder = ClipTextModel::load(&text_store, &text_cfg).map_err(in_file)?;
        Ok(StableDiffusion {
            tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer"))?,
            text_encoder,
            unet,
            unet_params: unet_store,
            vae: Some(vae),
            scheduler_config: SchedulerConfig::from_file(dir.join("scheduler").join("scheduler_config.json"))?,
            device: device.clone(),
            dir,
        })
    }
}
