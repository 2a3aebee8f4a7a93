//! `vipo train`: fine-tune a Stable Diffusion pipeline on preference pairs. Every setting can
//! come from `--config cfg.toml` (see `vipo::train::config::TrainConfig`); flags override it.

use std::path::PathBuf;

use clap::Args as ClapArgs;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::train::config::{DataFormat, FinetuneKind, ObjectiveKind, ScheduleKind, TrainConfig};
use crate::train::trainer::Trainer;

#[derive(ClapArgs, Debug, Default)]
pub struct Args {
    /// A TOML file with any of the settings below (keys as the flags, with `_` for `-`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from a checkpoint folder (`<output>/checkpoint-N`), exactly where it stopped.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Print the effective config and exit.
    #[arg(long)]
    pub print_config: bool,

    /// A diffusers Stable Diffusion pipeline folder.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Pick-a-Pic parquet shards (a folder or one file) or a `.jsonl` manifest.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub data_format: Option<DataFormat>,
    #[arg(long)]
    pub split: Option<String>,
    /// A latent cache folder from `vipo data cache-latents` (same data, VAE and resolution).
    #[arg(long)]
    pub latent_cache: Option<PathBuf>,
    #[arg(long)]
    pub keep_ties: Option<bool>,
    /// Random crops instead of center crops (not with --latent-cache).
    #[arg(long)]
    pub random_crop: Option<bool>,
    /// Random horizontal flips (not with --latent-cache).
    #[arg(long)]
    pub flip: Option<bool>,
    /// Draw pairs by category with these weights: `aesthetics=2,composition=1`.
    #[arg(long)]
    pub category_weights: Option<String>,
    #[arg(long, value_enum)]
    pub objective: Option<ObjectiveKind>,
    /// Poly-DPO's alpha.
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long)]
    pub beta: Option<f64>,
    /// `true`: z = -(beta/2)[...] (the paper); `false`: z = -beta[...] (diffusers' example).
    #[arg(long)]
    pub half_factor: Option<bool>,
    #[arg(long, value_enum)]
    pub finetune: Option<FinetuneKind>,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Comma-separated module names (`to_q,to_k,to_v,to_out.0`).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    #[arg(long)]
    pub offload_reference: Option<bool>,
    /// Recompute activations in the backward (less memory, about a third more compute).
    #[arg(long)]
    pub gradient_checkpointing: Option<bool>,
    /// Keep the frozen weights (text encoder, VAE, LoRA's base UNet or the reference) in f16.
    #[arg(long)]
    pub half_weights: Option<bool>,
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Pairs per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub min_lr: Option<f32>,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    #[arg(long)]
    pub validate_every: Option<u64>,
    /// A validation prompt (repeat the flag for several).
    #[arg(long = "validation-prompt")]
    pub validation_prompts: Option<Vec<String>>,
    #[arg(long = "validation-seed")]
    pub validation_seeds: Option<Vec<u64>>,
    #[arg(long)]
    pub validation_steps: Option<usize>,
    #[arg(long)]
    pub validation_guidance: Option<f32>,
    #[arg(long)]
    pub output: Option<PathBuf>,
}

macro_rules! over {
    ($cfg:ident, $a:ident, $($f:ident),*) => { $( if let Some(v) = &$a.$f { $cfg.$f = v.clone(); } )* };
}

/// The config file (or the defaults), then every flag given.
pub fn effective_config(a: &Args) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_file(p)?,
        None => TrainConfig::default(),
    };
    over!(
        c,
        a,
        model,
        data,
        data_format,
        keep_ties,
        random_crop,
        flip,
        objective,
        alpha,
        beta,
        half_factor,
        finetune,
        lora_rank,
        lora_alpha,
        lora_dropout,
        lora_targets,
        offload_reference,
        gradient_checkpointing,
        half_weights,
        resolution,
        batch,
        grad_accum,
        lr,
        schedule,
        warmup_steps,
        min_lr,
        weight_decay,
        max_grad_norm,
        steps,
        seed,
        checkpoint_every,
        validate_every,
        validation_prompts,
        validation_seeds,
        validation_steps,
        validation_guidance,
        output
    );
    if a.split.is_some() {
        c.split = a.split.clone();
    }
    if a.category_weights.is_some() {
        c.category_weights = a.category_weights.clone();
    }
    if a.latent_cache.is_some() {
        c.latent_cache = a.latent_cache.clone();
    }
    Ok(c)
}

pub fn run(args: &Args, device_arg: &str) -> Result<()> {
    let mut cfg = effective_config(args)?;
    // The global flag (or VIPO_DEVICE) wins unless it is the default `auto`.
    let env = std::env::var("VIPO_DEVICE").ok();
    let dev = if device_arg != "auto" || env.is_some() { device_arg.to_string() } else { cfg.device.clone() };
    cfg.device = dev.clone();
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    cfg.validate()?;
    let sel = Device::select(dev.parse()?)?;
    eprintln!("device: {}", sel.reason);
    let mut t = match &args.resume {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(Error::File { path: dir.clone(), msg: "no such checkpoint folder".into() });
            }
            Trainer::resume(cfg, &sel.device, dir)?
        }
        None => Trainer::new(cfg, &sel.device)?,
    };
    eprintln!(
        "training {} params ({:?}, {:?}) from step {} to {}; output {}",
        t.trainable_params().iter().map(|p| p.numel()).sum::<usize>(),
        t.cfg.finetune,
        t.cfg.objective,
        t.step(),
        t.cfg.steps,
        t.cfg.output.display()
    );
    let s = t.run()?;
    let peak = s.peak_gpu_bytes.map(|b| format!("; peak GPU pool {:.1} MiB", b as f64 / 1048576.0));
    eprintln!(
        "done: {} steps, {:.3} pairs/s on average; last checkpoint {}{}",
        s.steps,
        s.mean_pairs_per_s,
        s.last_checkpoint.map(|p| p.display().to_string()).unwrap_or_default(),
        peak.unwrap_or_default()
    );
    Ok(())
}
