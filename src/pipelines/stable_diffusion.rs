//! Text-to-image with Stable Diffusion 1.x/2.x from a diffusers folder: tokenizer, CLIP text
//! encoder, UNet, VAE and a scheduler, with classifier-free guidance, as diffusers'
//! `StableDiffusionPipeline` computes it. A folder without a VAE (`"vae": [null, null]` in
//! model_index.json, no `vae/`) is a pixel-space model: the UNet denoises RGB images directly.

use std::path::{Path, PathBuf};

use crate::autograd::no_grad;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::clip_text::ClipTextModel;
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::schedulers::{Noise, NoiseScheduler, Scheduler, SchedulerConfig};
use crate::tensor::{DType, Tensor};

pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    /// The UNet's parameters by checkpoint key (LoRA and fine-tuning reach them here).
    pub unet_params: crate::params::ParamStore,
    /// None for a pixel-space model: the "latents" are the images.
    pub vae: Option<AutoencoderKL>,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub dir: PathBuf,
}

/// How [`StableDiffusion::load`] reads a pipeline folder.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Weights variant: `fp16` reads `*.fp16.safetensors`.
    pub variant: Option<String>,
    /// Freeze the text encoder, UNet and VAE and keep their weights in f16 (half the memory);
    /// they are widened to f32 where a layer reads them, so compute stays f32. Results match
    /// PyTorch running the `.half()`-rounded weights in float32.
    pub half_weights: bool,
}

/// What to sample. Sizes are in pixels and must be multiples of 8 (SD); see
/// [`StableDiffusion::size_multiple`].
#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance: f32,
    /// `ddim`, `ddpm`, `euler`, `euler_a` or `dpmpp_2m`.
    pub scheduler: String,
    pub eta: f32,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    /// Initial latents (B, C, H/f, W/f) with f = [`StableDiffusion::vae_scale_factor`], before `init_noise_sigma` scaling (as diffusers' `latents=`).
    pub latents: Option<Tensor>,
}

impl Default for SampleRequest {
    fn default() -> Self {
        SampleRequest {
            prompt: String::new(),
            negative_prompt: None,
            steps: 30,
            guidance: 7.5,
            scheduler: "ddim".into(),
            eta: 0.0,
            seed: 0,
            width: 512,
            height: 512,
            batch: 1,
            latents: None,
        }
    }
}

pub struct SampleOutput {
    /// Final latents (B, C, h, w); the images themselves for a pixel-space model.
    pub latents: Tensor,
    /// Decoded images (B, 3, H, W) in about [-1, 1].
    pub decoded: Tensor,
    /// Latents after each step, when asked for (tests and debugging).
    pub steps: Vec<Tensor>,
    /// Token ids of the prompt and of the negative (or empty) prompt.
    pub input_ids: Vec<u32>,
    pub uncond_ids: Vec<u32>,
    /// A note when the prompt was cut to the model's length.
    pub truncation: Option<String>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })
}

/// The text encoder keeps its params in a list, not a store.
fn freeze_text_encoder_as(te: &ClipTextModel, dtype: DType) -> Result<()> {
    te.set_trainable(false);
    te.params().iter().try_for_each(|p| p.set_storage_dtype(dtype))
}

fn freeze_store_as(store: &crate::params::ParamStore, dtype: DType) -> Result<()> {
    store.freeze_all();
    store.store_frozen_as(dtype)
}

/// Whether model_index.json names a VAE: `["diffusers", "AutoencoderKL"]` does; `[null, null]`,
/// `null` or no `vae` key does not.
fn index_names_vae(idx: &serde_json::Value) -> bool {
    match idx.get("vae") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(v)) => v.iter().any(|x| !x.is_null()),
        Some(_) => true,
    }
}

/// Whether the pipeline folder `dir` has a VAE: model_index.json names one, or there is a
/// `vae/` folder. False means a pixel-space model.
pub fn folder_has_vae(dir: &Path) -> Result<bool> {
    let idx = read_json(&dir.join("model_index.json"))?;
    Ok(index_names_vae(&idx) || dir.join("vae").is_dir())
}

impl StableDiffusion {
    /// Loads a diffusers pipeline folder; `variant` picks `*.{variant}.safetensors` weights.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device, variant: Option<&str>) -> Result<StableDiffusion> {
        let opts = LoadOptions { variant: variant.map(String::from), half_weights: false };
        StableDiffusion::load(dir, device, &opts)
    }

    /// Loads a diffusers pipeline folder as `opts` says. With `half_weights`, each model is
    /// narrowed right after it loads, so at most one model is held in f32 at a time.
    pub fn load(dir: impl AsRef<Path>, device: &Device, opts: &LoadOptions) -> Result<StableDiffusion> {
        let variant = opts.variant.as_deref();
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::File {
                path: dir.to_path_buf(),
                msg: "no such folder (expected a diffusers pipeline folder)".into(),
            });
        }
        let index = dir.join("model_index.json");
        let idx = read_json(&index)?;
        let class = idx.get("_class_name").and_then(|v| v.as_str()).unwrap_or("");
        if !class.starts_with("StableDiffusion") {
            return Err(Error::File {
                path: index,
                msg: format!("_class_name `{class}`: vipo runs StableDiffusionPipeline folders here"),
            });
        }
        // Pixel space only when neither the index nor the folder has a VAE: a named VAE whose
        // folder is missing is a broken download, not a pixel-space model.
        let has_vae = index_names_vae(&idx) || dir.join("vae").is_dir();
        let parts: &[&str] = if has_vae {
            &["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        } else {
            &["unet", "text_encoder", "tokenizer", "scheduler"]
        };
        for part in parts {
            if !dir.join(part).is_dir() {
                return Err(Error::File { path: dir.join(part), msg: "missing component folder".into() });
            }
        }
        let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer"))?;
        let text_encoder = ClipTextModel::from_dir_variant(dir.join("text_encoder"), device, variant)?;
        if opts.half_weights {
            freeze_text_encoder_as(&text_encoder, DType::F16)?;
        }
        let (unet, unet_params) = UNet2DConditionModel::from_dir(dir.join("unet"), device, variant)?;
        if opts.half_weights {
            freeze_store_as(&unet_params, DType::F16)?;
        }
        let vae = if has_vae { Some(AutoencoderKL::from_dir(dir.join("vae"), device, variant)?) } else { None };
        if let (Some(vae), true) = (&vae, opts.half_weights) {
            freeze_store_as(vae.store(), DType::F16)?;
        }
        if vae.is_none() && (unet.config.in_channels != 3 || unet.config.out_channels != 3) {
            return Err(Error::File {
                path: dir.join("unet").join("config.json"),
                msg: format!(
                    "in_channels = {}, out_channels = {}: a pipeline without a VAE denoises RGB pixels, so both must be 3",
                    unet.config.in_channels, unet.config.out_channels
                ),
            });
        }
        let scheduler_config = SchedulerConfig::from_file(dir.join("scheduler").join("scheduler_config.json"))?;
        Ok(StableDiffusion {
            tokenizer,
            text_encoder,
            unet,
            unet_params,
            vae,
            scheduler_config,
            device: device.clone(),
            dir: dir.to_path_buf(),
        })
    }

    /// Freezes the text encoder, UNet and VAE and keeps their weights as `dtype` (F16: half the
    /// memory, compute stays f32; F32 widens them back, exactly).
    pub fn freeze_weights_as(&self, dtype: DType) -> Result<()> {
        freeze_text_encoder_as(&self.text_encoder, dtype)?;
        freeze_store_as(&self.unet_params, dtype)?;
        self.vae.as_ref().map_or(Ok(()), |v| freeze_store_as(v.store(), dtype))
    }

    /// Bytes the three models' weights take in their storage dtypes.
    pub fn weight_bytes(&self) -> usize {
        let te: usize = self.text_encoder.params().iter().map(|p| p.numel() * p.storage_dtype().size()).sum();
        te + self.unet_params.stored_bytes() + self.vae.as_ref().map_or(0, |v| v.store().stored_bytes())
    }

    /// True for a model without a VAE, whose UNet denoises pixels.
    pub fn is_pixel_space(&self) -> bool {
        self.vae.is_none()
    }

    /// Pixels per latent along each side: `2^(len(vae.block_out_channels) - 1)` (8 for SD), 1
    /// in pixel space.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.as_ref().map_or(1, |v| 1 << v.config.block_out_channels.len().saturating_sub(1))
    }

    /// What image sides must be multiples of: the VAE factor for SD (the UNet pads odd latent
    /// sizes as diffusers does); in pixel space `2^(down blocks - 1)`, so every UNet level
    /// halves the image exactly.
    pub fn size_multiple(&self) -> usize {
        match &self.vae {
            Some(_) => self.vae_scale_factor(),
            None => 1 << self.unet.config.block_out_channels.len().saturating_sub(1),
        }
    }

    /// Latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1]: the VAE decoder after
    /// undoing its scaling, one image at a time; in pixel space the latents are the images.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let Some(vae) = &self.vae else { return Ok(latents.clone()) };
        let b = latents.shape().first().copied().unwrap_or(0);
        // One at a time: at 512 px the decoder's widest map is 128 MiB per image, the WebGPU
        // binding limit, so a batch must not be decoded at once.
        let z = latents.mul_scalar(1.0 / vae.scaling_factor())?;
        let parts: Vec<Tensor> = (0..b).map(|i| vae.decode(&z.slice(0, i, 1)?)).collect::<Result<_>>()?;
        Tensor::concat(&parts.iter().collect::<Vec<_>>(), 0)
    }

    /// Images (N, 3, H, W) in [-1, 1] -> training latents (N, C, h, w): a VAE posterior sample
    /// (noise drawn from `rng`, image by image), scaled and shifted as the UNet was trained;
    /// in pixel space the pixels themselves (no noise, no scaling, `rng` untouched).
    pub fn encode_pixels(&self, pixels: &Tensor, rng: &mut crate::rng::Rng) -> Result<Tensor> {
        let Some(vae) = &self.vae else { return Ok(pixels.clone()) };
        let dev = pixels.device();
        let n = pixels.shape().first().copied().unwrap_or(0);
        // One image at a time: at 512 px the encoder's widest map is a whole storage binding.
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let dist = vae.encode(&pixels.slice(0, i, 1)?)?;
            let shape = dist.mean.shape().to_vec(); // (1, C, h, w)
            let eps = Tensor::from_vec(rng.normal_vec(dist.mean.numel()), &shape, &dev)?;
            let sf = vae.scaling_factor();
            lat.push(dist.sample(&eps)?.affine(sf, -vae.shift_factor() * sf)?);
        }
        Tensor::concat(&lat.iter().collect::<Vec<_>>(), 0)
    }

    /// Token ids padded to the model's length, and a note if the prompt was cut.
    pub fn tokenize(&self, text: &str) -> Result<(Vec<u32>, Option<String>)> {
        let t = self.tokenizer.encode_prompt(text)?;
        let warn = t.truncation_warning();
        Ok((t.ids, warn))
    }

    /// CLIP's last hidden state (1, 77, C) for padded ids.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let _g = no_grad();
        Ok(self.text_encoder.forward(&[ids.to_vec()])?.last_hidden_state)
    }

    pub fn sample(
        &self,
        req: &SampleRequest,
        mut on_step: impl FnMut(usize, usize),
        keep_steps: bool,
    ) -> Result<SampleOutput> {
        let _g = no_grad();
        let m = self.size_multiple();
        if !req.width.is_multiple_of(m) || !req.height.is_multiple_of(m) || req.width == 0 || req.height == 0 {
            let why = if self.is_pixel_space() {
                format!(" (a pixel-space UNet with {} levels)", self.unet.config.block_out_channels.len())
            } else {
                String::new()
            };
            return Err(Error::Invalid(format!(
                "width and height must be positive multiples of {m}{why}, got {}x{}",
                req.width, req.height
            )));
        }
        if req.batch == 0 || req.steps == 0 {
            return Err(Error::Invalid("batch and steps must be at least 1".into()));
        }
        let (input_ids, truncation) = self.tokenize(&req.prompt)?;
        let (uncond_ids, _) = self.tokenize(req.negative_prompt.as_deref().unwrap_or(""))?;
        let cond = self.encode_ids(&input_ids)?; // (1, 77, C)
        let uncond = self.encode_ids(&uncond_ids)?;
        let b = req.batch;
        let ctx_len = cond.shape()[1];
        let width = cond.shape()[2];
        // (2B, 77, C): the unconditional half first, as diffusers concatenates.
        let reps: Vec<&Tensor> = std::iter::repeat_n(&uncond, b).chain(std::iter::repeat_n(&cond, b)).collect();
        let context = Tensor::concat(&reps, 0)?.reshape_to(&[2 * b, ctx_len, width])?;

        let mut scheduler = Scheduler::from_name(&req.scheduler, &self.scheduler_config)?.with_eta(req.eta)?;
        scheduler.set_timesteps(req.steps)?;
        let f = self.vae_scale_factor();
        let latent_shape = [b, self.unet.config.in_channels, req.height / f, req.width / f];
        let init = match &req.latents {
            Some(l) => {
                if l.shape() != latent_shape {
                    return Err(Error::shape(
                        "sample",
                        format!(
                            "initial latents {:?}, expected {latent_shape:?} for {b} image(s) of {}x{}",
                            l.shape(),
                            req.width,
                            req.height
                        ),
                    ));
                }
                l.to(&self.device)?
            }
            None => Tensor::randn(&latent_shape, req.seed, &self.device)?,
        };
        let mut rng = crate::rng::Rng::new(req.seed ^ 0x5ca1_ab1e);
        let (latents, steps) =
            denoise(&self.unet, &mut scheduler, &context, &init, req.guidance, &mut rng, keep_steps, &mut on_step)?;
        let decoded = self.decode_latents(&latents)?; // (B, 3, H, W)
        Ok(SampleOutput { latents, decoded, steps, input_ids, uncond_ids, truncation })
    }
}

/// The denoising loop with classifier-free guidance: `context` (2B, L, C) holds the
/// unconditional embeddings first; `init` (B, C, h, w) is scaled by `init_noise_sigma`.
/// Returns the final latents and, when `keep_steps`, the latents after every step.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    unet: &UNet2DConditionModel,
    scheduler: &mut Scheduler,
    context: &Tensor,
    init: &Tensor,
    guidance: f32,
    rng: &mut crate::rng::Rng,
    keep_steps: bool,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<(Tensor, Vec<Tensor>)> {
    let _g = no_grad();
    let b = init.shape()[0];
    if context.shape()[0] != 2 * b {
        return Err(Error::shape(
            "denoise",
            format!("context {:?} for {b} latents: expected 2x the batch (uncond, cond)", context.shape()),
        ));
    }
    let device = init.device();
    let mut latents = init.mul_scalar(scheduler.init_noise_sigma())?;
    let n = scheduler.timesteps().len();
    let mut steps = Vec::new();
    for i in 0..n {
        let t = scheduler.timestep(i)?;
        let doubled = Tensor::concat(&[&latents, &latents], 0)?;
        let input = scheduler.scale_model_input(&doubled, i)?;
        let ts = Tensor::full(t, &[2 * b], &device)?;
        let eps = unet.forward(&input, &ts, context)?; // (2B, 4, h, w)
        let eps_uncond = eps.slice(0, 0, b)?;
        let eps_text = eps.slice(0, b, b)?;
        let guided = eps_uncond.add(&eps_text.sub(&eps_uncond)?.mul_scalar(guidance)?)?;
        latents = scheduler.step(i, &guided, &latents, Noise::Rng(rng))?.prev_sample;
        if keep_steps {
            steps.push(latents.clone());
        }
        on_step(i + 1, n);
    }
    Ok((latents, steps))
}
