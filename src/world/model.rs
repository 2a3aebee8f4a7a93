//! The world's base model: a standard diffusers pipeline folder (CLIP BPE tokenizer over the
//! grammar's words, a small `CLIPTextModel`, a small pixel-space `UNet2DConditionModel`, a
//! DDIM scheduler) that `vipo world pretrain` trains from scratch with vipo's `sft` objective
//! on rendered images, and that `vipo sample` loads like any other.
//!
//! Pixel space, not a VAE: at 32x32 a VAE would cost more to train than the UNet and would
//! blur the small shapes the scorers count; DeepFloyd IF is the same kind of pipeline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::render::{render, to_pixels};
use super::{vocabulary, Prompt, SIZE};
use crate::autograd::no_grad;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::clip_tokenizer::{bytes_to_unicode, ClipTokenizer};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::params::Param;
use crate::rng::Rng;
use crate::schedulers::SchedulerConfig;
use crate::tensor::{DType, Tensor};
use crate::train::config::write_atomic;
use crate::train::objective::{per_sample_error, ForwardProcess, Objective, ObjectiveConfig};

/// Tokens per prompt: the longest prompt is 7 words, plus start and end.
pub const MAX_LENGTH: usize = 16;

/// BPE merges learned on the grammar's words (most frequent pair first, ties by name), until
/// every word is one token; returns (vocab.json, merges.txt) in CLIP's format: the 256 byte
/// symbols, the same with `</w>`, the merged symbols, then `<|startoftext|>`, `<|endoftext|>`.
pub fn tokenizer_files() -> (String, String) {
    let bu = bytes_to_unicode();
    let mut vocab: Vec<String> = bu.iter().map(|c| c.to_string()).collect();
    vocab.extend(bu.iter().map(|c| format!("{c}</w>")));
    let mut words: Vec<Vec<String>> = vocabulary()
        .iter()
        .map(|w| {
            let chars: Vec<char> = w.chars().collect();
            let n = chars.len();
            chars.iter().enumerate().map(|(i, c)| if i + 1 == n { format!("{c}</w>") } else { c.to_string() }).collect()
        })
        .collect();
    let mut merges = Vec::new();
    loop {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for w in &words {
            for pair in w.windows(2) {
                *counts.entry((pair[0].clone(), pair[1].clone())).or_insert(0) += 1;
            }
        }
        // Highest count; BTreeMap order breaks ties deterministically.
        let Some((best, _)) = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) else { break };
        let best = best.clone();
        let merged = format!("{}{}", best.0, best.1);
        for w in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == best.0 && w[i + 1] == best.1 {
                    out.push(merged.clone());
                    i += 2;
                } else {
                    out.push(w[i].clone());
                    i += 1;
                }
            }
            *w = out;
        }
        if !vocab.contains(&merged) {
            vocab.push(merged);
        }
        merges.push(format!("{} {}", best.0, best.1));
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let vocab_json = serde_json::Value::Object(map).to_string();
    let merges_txt = format!("#version: 0.2\n{}\n", merges.join("\n"));
    (vocab_json, merges_txt)
}

fn vocab_size() -> usize {
    let (v, _) = tokenizer_files();
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&v).map(|m| m.len()).unwrap_or(0)
}

/// The text encoder: 2 layers of width 64 over the grammar's tokens.
pub fn text_encoder_config() -> serde_json::Value {
    let v = vocab_size();
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_act": "quick_gelu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": MAX_LENGTH,
        "projection_dim": 64,
        "layer_norm_eps": 1e-5,
        "vocab_size": v,
        "bos_token_id": v - 2,
        "eos_token_id": v - 1,
        "pad_token_id": v - 1,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "torch_dtype": "float32"
    })
}

/// The UNet: SD1.5's block layout at 32x32 pixels, 3 channels in and out.
pub fn unet_config() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [16, 32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": false,
        "use_linear_projection": false,
        "upcast_attention": false,
        "only_cross_attention": false,
        "transformer_layers_per_block": 1
    })
}

/// DDIM on the cosine schedule with v-prediction, clipping x0 to the image range, "trailing"
/// spacing so a few steps start from pure noise. (Linear betas with epsilon prediction were
/// tried first: at 32x32 the model's small epsilon errors at high noise, divided by sqrt(alpha_bar),
/// left 10-step samples noisy after 1000 steps of pretraining; v keeps x0's error bounded.)
pub fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2",
        "num_train_timesteps": 1000,
        "clip_sample": true,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": true,
        "steps_offset": 0,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing"
    })
}

pub fn model_index() -> serde_json::Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "_vipo": "vipo world pretrain: pixel-space, no VAE",
        "feature_extractor": [null, null],
        "safety_checker": [null, null],
        "requires_safety_checker": false,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [null, null]
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    write_atomic(path, format!("{text}\n").as_bytes())
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))
}

/// Writes every config and the tokenizer of a world pipeline folder (not the weights).
pub fn write_skeleton(dir: &Path) -> Result<()> {
    for sub in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        mkdir(&dir.join(sub))?;
    }
    write_json(&dir.join("model_index.json"), &model_index())?;
    write_json(&dir.join("unet/config.json"), &unet_config())?;
    write_json(&dir.join("text_encoder/config.json"), &text_encoder_config())?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler_config())?;
    let (vocab, merges) = tokenizer_files();
    write_atomic(&dir.join("tokenizer/vocab.json"), vocab.as_bytes())?;
    write_atomic(&dir.join("tokenizer/merges.txt"), merges.as_bytes())?;
    let tok = json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": true,
        "add_prefix_space": false,
        "errors": "replace",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"
    });
    write_json(&dir.join("tokenizer/tokenizer_config.json"), &tok)?;
    let special = json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"
    });
    write_json(&dir.join("tokenizer/special_tokens_map.json"), &special)
}

/// Settings of `vipo world pretrain`.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    pub out: PathBuf,
    pub steps: u64,
    pub batch: usize,
    pub lr: f32,
    pub warmup: u64,
    pub seed: u64,
    /// Probability of training on the empty prompt (so classifier-free guidance works).
    pub uncond_prob: f32,
    /// Write the weights every this many steps (and at the end).
    pub save_every: u64,
    /// Continue from the weights already in `out` (fresh optimizer state).
    pub resume: bool,
    /// Probability that each attribute of a training caption is wrong (see
    /// [`Prompt::miscaption`]); 0 trains on exact captions.
    pub caption_noise: f32,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        PretrainOptions {
            out: PathBuf::from("models/world"),
            steps: 3000,
            batch: 16,
            lr: 1e-3,
            warmup: 200,
            seed: 0,
            uncond_prob: 0.1,
            save_every: 500,
            resume: false,
            caption_noise: 0.0,
        }
    }
}

/// One logged pretraining step.
#[derive(Debug, Clone, Copy)]
pub struct PretrainStep {
    pub step: u64,
    pub loss: f64,
    pub lr: f32,
    pub seconds: f64,
}

fn save_weights(dir: &Path, unet: &crate::params::ParamStore, te: &crate::params::ParamStore) -> Result<()> {
    unet.save_safetensors(dir.join("unet/diffusion_pytorch_model.safetensors"), DType::F32)?;
    te.save_safetensors(dir.join("text_encoder/model.safetensors"), DType::F32)
}

/// Trains the UNet and the text encoder from scratch (or from `out`'s weights with `resume`)
/// on rendered images of random prompts with the `sft` objective (the diffusion loss), and
/// writes the pipeline folder to `out`. `on_step` sees every step.
pub fn pretrain(opts: &PretrainOptions, device: &Device, on_step: &mut dyn FnMut(PretrainStep)) -> Result<()> {
    if opts.batch == 0 || opts.steps == 0 {
        return Err(Error::Invalid("world pretrain: --batch and --steps must be at least 1".into()));
    }
    if !(0.0..=1.0).contains(&opts.caption_noise) {
        return Err(Error::Invalid(format!(
            "world pretrain: --caption-noise must be within 0..1, got {}",
            opts.caption_noise
        )));
    }
    let dir = &opts.out;
    write_skeleton(dir)?;
    let unet_cfg = UNet2DConditionConfig::from_file(dir.join("unet/config.json"))?;
    let te_cfg = ClipTextConfig::from_file(dir.join("text_encoder/config.json"))?;
    let (unet, unet_store, te, te_store) = if opts.resume {
        let (unet, store) = UNet2DConditionModel::from_dir(dir.join("unet"), device, None)?;
        let te_store = crate::params::ParamStore::load_safetensors(dir.join("text_encoder/model.safetensors"), device)?;
        let te = ClipTextModel::load(&te_store, &te_cfg)?;
        (unet, store, te, te_store)
    } else {
        let (unet, store) = UNet2DConditionModel::init_params(&unet_cfg, opts.seed, device)?;
        let (te, te_store) = ClipTextModel::init_params(&te_cfg, opts.seed ^ 0x7e47, device)?;
        (unet, store, te, te_store)
    };
    let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer"))?;
    let sched = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))?;
    let process = ForwardProcess::from_config(&sched)?;
    let objective = ObjectiveConfig { objective: Objective::Sft, ..Default::default() };
    let mut params: Vec<Arc<Param>> = unet_store.trainable();
    params.extend(te_store.trainable());
    let mut opt = AdamW::new(AdamWConfig { lr: opts.lr, weight_decay: 0.0, ..AdamWConfig::default() })?;
    let schedule = LrSchedule::Cosine { warmup_steps: opts.warmup, total_steps: opts.steps, min_lr: opts.lr * 0.05 };
    let uncond = tokenizer.encode_prompt("")?.ids;
    let n = opts.batch;
    for step in 0..opts.steps {
        let t0 = Instant::now();
        let mut rng = Rng::new(opts.seed ^ (step.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ 0x5eed_f00d);
        let mut images = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let p = Prompt::random(&mut rng);
            images.push(render(&p, rng.next_u64()));
            // No draws when the captions are exact, so runs without noise repeat older ones.
            let caption = if opts.caption_noise > 0.0 { p.miscaption(&mut rng, opts.caption_noise) } else { p };
            ids.push(if rng.uniform() < opts.uncond_prob {
                uncond.clone()
            } else {
                tokenizer.encode_prompt(&caption.text())?.ids
            });
        }
        let x0 = Tensor::from_vec(to_pixels(&images), &[n, 3, SIZE, SIZE], device)?; // (N, 3, 32, 32)
        let noise = Tensor::from_vec(rng.normal_vec(n * 3 * SIZE * SIZE), &[n, 3, SIZE, SIZE], device)?;
        let level = process.sample_levels(n, &mut rng);
        let noised = {
            let _g = no_grad();
            process.noise(&x0, &noise, &level)?
        };
        let ctx = te.forward(&ids)?.last_hidden_state; // (N, 16, 64)
        let pred = unet.forward(&noised.noisy, &noised.timesteps, &ctx)?;
        let err = per_sample_error(&pred, &noised.target)?;
        let out = objective.loss_with_labels(&err, None, &vec![true; n])?;
        let loss = out.stats.loss;
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "world pretrain: loss is {loss} at step {step}; the weights saved last are kept in {}",
                dir.display()
            )));
        }
        out.loss.backward()?;
        clip_grad_norm(&params, 1.0)?;
        let lr = schedule.lr_at(opts.lr, step);
        opt.step(&params, lr)?;
        crate::optim::zero_grad(&params);
        on_step(PretrainStep { step: step + 1, loss, lr, seconds: t0.elapsed().as_secs_f64() });
        if (step + 1) % opts.save_every.max(1) == 0 || step + 1 == opts.steps {
            save_weights(dir, &unet_store, &te_store)?;
        }
    }
    Ok(())
}

/// The shipped base model `models/world` (see [`crate::models::shipped_dir`] for where).
pub fn shipped_dir() -> Result<PathBuf> {
    crate::models::shipped_dir(
        "world",
        "unet/diffusion_pytorch_model.safetensors",
        "the built-in world's base model",
        "pass --model, or make one with `vipo world pretrain`",
    )
}
