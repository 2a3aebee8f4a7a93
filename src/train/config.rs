//! The training config: one TOML file holds every setting of `vipo train` (CLI flags override
//! it), and the effective config is saved as `config.toml` beside the checkpoints.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::LrSchedule;
use crate::train::lora::{LoraConfig, LoraInit};
use crate::train::objective::{Objective, ObjectiveConfig};

/// Which loss (`objective = "poly-dpo"` in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectiveKind {
    Sft,
    Dpo,
    PolyDpo,
    Kto,
}

/// The data's format; `auto` goes by the path (a `.jsonl` manifest, a `.parquet` shard or a
/// folder of shards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Auto,
    Parquet,
    Jsonl,
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneKind {
    /// LoRA adapters on the UNet; the reference is the same UNet with the adapters off.
    Lora,
    /// Every UNet weight; the reference is a frozen copy.
    Full,
}

/// Learning-rate schedule kind (`warmup_steps` and `min_lr` parameterise it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    LinearWarmup,
    Cosine,
}

/// Every setting of a training run. Unknown keys in a file are errors (a typo must not be
/// silently ignored); missing keys take the defaults below (SD1.5 Diffusion-DPO with LoRA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// A diffusers Stable Diffusion pipeline folder.
    pub model: PathBuf,
    /// Preference pairs: a folder of Pick-a-Pic parquet shards, one shard, or a `.jsonl` manifest.
    pub data: PathBuf,
    pub data_format: DataFormat,
    /// Parquet only: which split's shards (`train`) when the folder mixes several.
    pub split: Option<String>,
    /// A latent cache folder (`vipo data cache-latents`) of this data at `resolution`: the
    /// cached VAE posterior means are used instead of decoding and encoding the images.
    pub latent_cache: Option<PathBuf>,
    /// Keep Pick-a-Pic's 0.5/0.5 ties (image 0 as the winner); dropped by default.
    pub keep_ties: bool,
    /// torchvision's `RandomCrop` instead of the center crop (not with a latent cache, whose
    /// latents are center crops).
    pub random_crop: bool,
    /// Mirror each image with probability 1/2 (not with a latent cache).
    pub flip: bool,
    /// Draw pairs by category with these weights (`aesthetics=2,composition=1`), seeded by
    /// `seed`; None: the data in order.
    pub category_weights: Option<String>,

    pub objective: ObjectiveKind,
    /// Poly-DPO's alpha (ignored by the other objectives).
    pub alpha: f64,
    /// KL strength beta.
    pub beta: f64,
    /// DPO/Poly-DPO logit `z = -(beta/2)[...]` when true (the ViPO paper and Diffusion-DPO),
    /// `z = -beta[...]` when false (diffusers' `train_diffusion_dpo.py`).
    pub half_factor: bool,

    pub finetune: FinetuneKind,
    pub lora_rank: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    /// Module names by PEFT's rule (`to_q` matches every `...attn1.to_q`).
    pub lora_targets: Vec<String>,
    /// Full fine-tuning: keep the frozen reference UNet on the CPU (saves device memory).
    pub offload_reference: bool,
    /// Recompute each resnet's and transformer's activations in the backward instead of
    /// keeping them (diffusers' `--gradient_checkpointing`): less memory, more compute.
    pub gradient_checkpointing: bool,
    /// Keep the frozen weights in f16 (the text encoder, the VAE, LoRA's base UNet or full
    /// fine-tuning's reference copy): half their memory; the matmul and conv kernels read them
    /// as f16 and compute in f32. The trained weights stay f32.
    pub half_weights: bool,

    /// Training image side in pixels (center crop).
    pub resolution: usize,
    /// Pairs per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f32,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    /// Cosine only: the floor.
    pub min_lr: f32,
    pub weight_decay: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    pub max_grad_norm: f32,
    /// Optimizer steps.
    pub steps: u64,
    pub seed: u64,

    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Sample the validation prompts every this many steps (0: never).
    pub validate_every: u64,
    pub validation_prompts: Vec<String>,
    /// One seed per prompt (cycled when shorter).
    pub validation_seeds: Vec<u64>,
    pub validation_steps: usize,
    pub validation_guidance: f32,
    pub validation_scheduler: String,

    pub output: PathBuf,
    /// `auto`, `cpu`, `gpu` or `gpu:N`; the global `--device` flag overrides it.
    pub device: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            data_format: DataFormat::Auto,
            split: None,
            latent_cache: None,
            keep_ties: false,
            random_crop: false,
            flip: false,
            category_weights: None,
            objective: ObjectiveKind::Dpo,
            alpha: 0.0,
            beta: 5000.0,
            half_factor: true,
            finetune: FinetuneKind::Lora,
            lora_rank: 4,
            lora_alpha: 4.0,
            lora_dropout: 0.0,
            lora_targets: ["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| s.to_string()).collect(),
            offload_reference: false,
            gradient_checkpointing: false,
            half_weights: false,
            resolution: 512,
            batch: 1,
            grad_accum: 1,
            lr: 1e-5,
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            min_lr: 0.0,
            weight_decay: 1e-2,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            steps: 1000,
            seed: 0,
            checkpoint_every: 500,
            validate_every: 0,
            validation_prompts: Vec::new(),
            validation_seeds: vec![0],
            validation_steps: 25,
            validation_guidance: 7.5,
            validation_scheduler: "ddim".into(),
            output: PathBuf::from("vipo-train"),
            device: "auto".into(),
        }
    }
}

impl TrainConfig {
    pub fn from_toml(text: &str) -> Result<TrainConfig> {
        toml::from_str(text).map_err(|e| Error::Invalid(format!("train config: {e}")))
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<TrainConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::File { path: path.to_path_buf(), msg: e.to_string() })
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Invalid(format!("train config: {e}")))
    }

    /// Writes the config atomically (`path.tmp`, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), self.to_toml()?.as_bytes())
    }

    pub fn objective_config(&self) -> ObjectiveConfig {
        let objective = match self.objective {
            ObjectiveKind::Sft => Objective::Sft,
            ObjectiveKind::Dpo => Objective::Dpo,
            ObjectiveKind::PolyDpo => Objective::PolyDpo { alpha: self.alpha },
            ObjectiveKind::Kto => Objective::Kto,
        };
        ObjectiveConfig { objective, beta: self.beta, half_factor: self.half_factor, ..Default::default() }
    }

    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.lora_targets.clone(),
            init: LoraInit::KaimingUniform,
            seed: self.seed,
        }
    }

    pub fn lr_schedule(&self) -> LrSchedule {
        match self.schedule {
            ScheduleKind::Constant => LrSchedule::Constant,
            ScheduleKind::LinearWarmup => LrSchedule::LinearWarmup { warmup_steps: self.warmup_steps },
            ScheduleKind::Cosine => {
                LrSchedule::Cosine { warmup_steps: self.warmup_steps, total_steps: self.steps, min_lr: self.min_lr }
            }
        }
    }

    pub fn adamw_config(&self) -> crate::optim::AdamWConfig {
        crate::optim::AdamWConfig {
            lr: self.lr,
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Checks what can be checked without touching the files; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, v: String| Err(Error::Invalid(format!("train config: {k} = {v}")));
        if self.model.as_os_str().is_empty() {
            return bad("model", "\"\" (set the pipeline folder)".into());
        }
        if self.data.as_os_str().is_empty() {
            return bad("data", "\"\" (set the preference data)".into());
        }
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad("resolution", format!("{} (needs a positive multiple of 8)", self.resolution));
        }
        if self.batch == 0 {
            return bad("batch", "0".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "0".into());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad("max_grad_norm", format!("{} (needs a positive number)", self.max_grad_norm));
        }
        if self.validate_every > 0 && self.validation_prompts.is_empty() {
            return bad("validate_every", format!("{} with no validation_prompts", self.validate_every));
        }
        if self.validate_every > 0 && self.validation_seeds.is_empty() {
            return bad("validation_seeds", "[] (needs at least one)".into());
        }
        if self.offload_reference && self.finetune == FinetuneKind::Lora {
            return bad(
                "offload_reference",
                "true with finetune = \"lora\" (the LoRA reference is the policy itself)".into(),
            );
        }
        if self.latent_cache.is_some() && (self.random_crop || self.flip) {
            return bad(
                if self.random_crop { "random_crop" } else { "flip" },
                "true with a latent_cache (cached latents are center crops, unflipped); drop the cache \
                 or the augmentation"
                    .into(),
            );
        }
        if let Some(w) = &self.category_weights {
            crate::data::parse_category_weights(w)?;
        }
        self.adamw_config().validate()?;
        self.objective_config().validate()?;
        if self.finetune == FinetuneKind::Lora {
            self.lora_config().validate()?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path.tmp`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
