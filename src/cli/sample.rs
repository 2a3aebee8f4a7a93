//! `vipo sample`: text to image from a Stable Diffusion folder, PNGs with their parameters.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::image_io::{images_from_decoded, write_png};
use crate::pipelines::stable_diffusion::{LoadOptions, SampleRequest, StableDiffusion};
use crate::tensor::Tensor;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/; no vae/ for a pixel-space model), or one original checkpoint file (`v1-5-pruned-emaonly.safetensors` style).
    #[arg(long)]
    pub model: PathBuf,
    /// With a single-file --model: the folder with its configs, tokenizer and scheduler
    /// (default: SD1.5's, shipped in models/sd15).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// ddim, ddpm, euler, euler_a or dpmpp_2m.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// DDIM's eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pixels, a multiple of 8 (default: the UNet's sample size x 8; in pixel space the
    /// sample size, a multiple of 2^(UNet levels - 1)).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Initial latents (B, 4, H/8, W/8), or (B, 3, H, W) in pixel space, from a safetensors file (its only tensor, or `latents`),
    /// to compare runs with other implementations.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Weights variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// Keep the weights in f16 (half the memory); compute stays f32. The models are frozen.
    #[arg(long)]
    pub half_weights: bool,
    /// A LoRA for the UNet (`pytorch_lora_weights.safetensors` as diffusers' `save_lora_weights`
    /// writes it, or PEFT's names), merged into the weights before sampling.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Multiplier on the LoRA's effect (diffusers' `lora_scale`; 0 gives the base model).
    #[arg(long, default_value_t = 1.0, requires = "lora")]
    pub lora_scale: f32,
    /// Cut prompts longer than the text encoder's 77 tokens instead of refusing them.
    #[arg(long)]
    pub truncate: bool,
    /// Print the estimated peak memory for this model, size and batch, and exit (reads only
    /// configs and weight-file headers).
    #[arg(long)]
    pub dry_run: bool,
    /// Output PNG; with --batch N, `out-0.png` .. `out-(N-1).png`.
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
}

fn read_latents(path: &Path, device: &Device) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::File { path: path.to_path_buf(), msg };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let names = st.names();
    let name = if names.len() == 1 {
        names[0].to_string()
    } else if names.contains(&"latents") {
        "latents".to_string()
    } else {
        return Err(bad(format!("holds {} tensors; expected one, or one named `latents`", names.len())));
    };
    let view = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(bad(format!("`{name}` is {:?}; f32 latents expected", view.dtype())));
    }
    let data: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Tensor::from_vec(data, view.shape(), device)
}

fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    (0..n).map(|i| out.with_file_name(format!("{stem}-{i}.png"))).collect()
}

/// The dry run: parameter counts from the weight headers, shapes from the configs.
fn dry_run(args: &Args, device: &Device) -> Result<()> {
    use crate::models::autoencoder_kl::AutoencoderKLConfig;
    use crate::models::ldm_convert::{Component, SingleFileConfigs};
    use crate::models::unet_2d_condition::{PerBlock, UNet2DConditionConfig};
    use crate::pipelines::memory::{estimate, fmt_bytes, header_param_count, SdShapes};
    use crate::pipelines::stable_diffusion::folder_has_vae;
    // vae_cfg is None for a pixel-space folder.
    let (params, unet_cfg, vae_cfg) = if args.model.is_file() {
        let c = SingleFileConfigs::from_dir_or_sd15(args.config.as_deref())?;
        (
            header_param_count(&args.model)?,
            UNet2DConditionConfig::from_json_str(c.config(Component::Unet))?,
            Some(AutoencoderKLConfig::from_json(c.config(Component::Vae))?),
        )
    } else {
        let has_vae = folder_has_vae(&args.model)?;
        let mut params = 0;
        for (part, stems) in
            [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
        {
            if part == "vae" && !has_vae {
                continue;
            }
            let name = match &args.variant {
                Some(v) => format!("{stems}.{v}.safetensors"),
                None => format!("{stems}.safetensors"),
            };
            params += header_param_count(&args.model.join(part).join(name))?;
        }
        (
            params,
            UNet2DConditionConfig::from_file(args.model.join("unet").join("config.json"))?,
            has_vae.then(|| AutoencoderKLConfig::from_file(args.model.join("vae").join("config.json"))).transpose()?,
        )
    };
    let vae_channels = vae_cfg.map(|c| c.block_out_channels).unwrap_or_default();
    let f = 1usize << vae_channels.len().saturating_sub(1);
    let lpb = match &unet_cfg.layers_per_block {
        PerBlock::One(n) => *n,
        PerBlock::Many(v) => v.iter().copied().max().unwrap_or(2),
    };
    let default = unet_cfg.sample_size.as_ref().map_or(512, |s| match s {
        PerBlock::One(s) => s * f,
        PerBlock::Many(v) => v.first().map_or(512, |s| s * f),
    });
    let shapes = SdShapes {
        unet_channels: unet_cfg.block_out_channels.clone(),
        layers_per_block: lpb,
        vae_channels,
        width: args.width.unwrap_or(default),
        height: args.height.unwrap_or(default),
        batch: args.batch,
    };
    let (bytes_per_weight, dtype) = if args.half_weights { (2, "f16") } else { (4, "f32") };
    let e = estimate(params, bytes_per_weight, &shapes);
    println!("model        {} ({:.0}M parameters, {dtype} in memory)", args.model.display(), params as f64 / 1e6);
    println!("size         {}x{} px, batch {} (x2 for guidance)", shapes.width, shapes.height, shapes.batch);
    println!("weights      {}", fmt_bytes(e.weight_bytes));
    let vae_line = if shapes.vae_channels.is_empty() {
        "none (pixel space)".to_string()
    } else {
        fmt_bytes(e.vae_activation_bytes)
    };
    println!("activations  UNet {}, VAE decode {vae_line}", fmt_bytes(e.unet_activation_bytes));
    println!("peak         {} (estimate)", fmt_bytes(e.peak_bytes));
    println!("largest      {} in one tensor", fmt_bytes(e.largest_tensor_bytes));
    if let Device::Gpu(g) = device {
        let limit = g.limits.max_storage_buffer_binding_size;
        if e.largest_tensor_bytes > limit {
            println!(
                "warning      exceeds {} ({}'s max_storage_buffer_binding_size): use a smaller size",
                fmt_bytes(limit),
                g.info.name
            );
        }
    }
    Ok(())
}

pub fn run(args: &Args, device_arg: &str) -> Result<()> {
    let sel = Device::from_arg(Some(device_arg))?;
    if args.dry_run {
        return dry_run(args, &sel.device);
    }
    eprintln!("device: {}", sel.reason);
    let t0 = Instant::now();
    let sd = if args.model.is_file() {
        let sd = StableDiffusion::from_single_file(&args.model, args.config.as_deref(), &sel.device)?;
        if args.half_weights {
            sd.freeze_weights_as(crate::tensor::DType::F16)?;
        }
        sd
    } else {
        let opts = LoadOptions { variant: args.variant.clone(), half_weights: args.half_weights };
        StableDiffusion::load(&args.model, &sel.device, &opts)?
    };
    for (what, text) in [("prompt", Some(&args.prompt)), ("negative prompt", args.negative_prompt.as_ref())] {
        let Some(text) = text else { continue };
        if let Some(n) = sd.tokenizer.encode_prompt(text)?.truncated_from {
            if !args.truncate {
                return Err(Error::Invalid(format!(
                    "{what} too long: {n} tokens, the text encoder takes {}; shorten it or pass --truncate",
                    sd.tokenizer.max_length()
                )));
            }
        }
    }
    if let Some(path) = &args.lora {
        let lora = crate::train::lora::Lora::load(&sd.unet, path)?;
        lora.set_multiplier(args.lora_scale);
        let n = lora.len();
        lora.merge()?;
        eprintln!("merged LoRA {} ({n} layers) at scale {}", path.display(), args.lora_scale);
    }
    eprintln!(
        "loaded {} in {:.1}s ({:.1} MiB of {} weights)",
        args.model.display(),
        t0.elapsed().as_secs_f64(),
        sd.weight_bytes() as f64 / (1 << 20) as f64,
        if args.half_weights { "f16" } else { "f32" }
    );
    // The UNet's latent sample size x the VAE factor (SD1.5: 64 -> 512 px; pixel space: x 1);
    // 512 when the config has none.
    let f = sd.vae_scale_factor();
    let size = match &sd.unet.config.sample_size {
        Some(crate::models::unet_2d_condition::PerBlock::One(s)) => s * f,
        Some(crate::models::unet_2d_condition::PerBlock::Many(v)) if !v.is_empty() => v[0] * f,
        _ => 512,
    };
    let req = SampleRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.clone(),
        eta: args.eta,
        seed: args.seed,
        width: args.width.unwrap_or(size),
        height: args.height.unwrap_or(size),
        batch: args.batch,
        latents: args.latents.as_deref().map(|p| read_latents(p, &sel.device)).transpose()?,
    };
    let bar = indicatif::ProgressBar::new(req.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t1 = Instant::now();
    let out = sd.sample(
        &req,
        |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        },
        false,
    )?;
    bar.finish_and_clear();
    if let Some(w) = &out.truncation {
        eprintln!("warning: {w}");
    }
    let secs = t1.elapsed().as_secs_f64();
    let images = images_from_decoded(&out.decoded)?;
    let model_name = args.model.file_name().and_then(|s| s.to_str()).unwrap_or("model");
    let mut text = req.prompt.clone();
    if let Some(neg) = &req.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {neg}"));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model_name}",
        req.steps, req.scheduler, req.guidance, req.seed, req.width, req.height
    ));
    if let Some(path) = &args.lora {
        let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("lora");
        text.push_str(&format!(", Lora: {name} ({})", args.lora_scale));
    }
    for (path, img) in output_paths(&args.out, images.len()).iter().zip(&images) {
        write_png(path, img, Some(&text))?;
        println!("{}", path.display());
    }
    eprintln!(
        "{} step(s) in {secs:.1}s ({:.2} steps/s) on {}",
        req.steps,
        req.steps as f64 / secs.max(1e-9),
        sel.device
    );
    Ok(())
}
