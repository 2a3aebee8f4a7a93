//! The training loop of `vipo train`: preference pairs streamed with a resumable cursor,
//! images to latents with the VAE and prompts to embeddings (both without gradients), one
//! timestep and one noise draw per pair shared by winner and loser, the policy forward with
//! gradients and the reference forward without, the objective, backward over `grad_accum`
//! micro-batches, clipping and AdamW with a schedule; metrics to `metrics.jsonl`, atomic
//! checkpoints, exact resume, and validation grids.
//!
//! Reproducibility: every random draw of step s, micro-batch m comes from its own
//! `Rng::new(stream(seed, s, m))`, and the loader's crops from (seed, draw); so the RNG state a
//! checkpoint needs is the seed, the step, the loader's draw count and (with
//! `category_weights`) the category sampler's state, and a resumed run takes the same draws as
//! a straight one. LoRA dropout masks come from (seed, step, micro-batch, call number), so they
//! need no saved state either.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::autograd::no_grad;
use crate::data::cache::{CacheKey, LatentCache};
use crate::data::{
    parse_category_weights, CategorySampler, Crop, Cursor, DataSource, LoaderOptions, PairLoader, PairStream,
    PreferencePair, Resample, SamplerState, StreamOptions,
};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::image_io::{images_from_decoded, write_png, RgbImage};
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::optim::{clip_grad_norm, scale_grads, zero_grad, AdamW, LrSchedule};
use crate::params::{Param, ParamStore};
use crate::pipelines::stable_diffusion::{SampleRequest, StableDiffusion};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use crate::train::config::{write_atomic, DataFormat, FinetuneKind, TrainConfig};
use crate::train::lora::Lora;
use crate::train::objective::{
    as_reference, per_sample_error, unet_step, unet_step_on_device, DeviceLoss, ForwardProcess, ObjectiveConfig,
    ObjectiveOutput, ObjectiveStats, PreferenceBatch, Reference,
};

/// The LoRA in diffusers' / PEFT's file naming (what `vipo sample --lora` and diffusers load).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The LoRA's A and B exactly as trained (unscaled), for an exact resume.
pub const LORA_STATE_FILE: &str = "lora_state.safetensors";
/// Full fine-tuning: the UNet as a diffusers folder (`unet/config.json` + weights).
pub const UNET_DIR: &str = "unet";
pub const UNET_FILE: &str = "diffusion_pytorch_model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What a checkpoint records besides the weights and the optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// The seed every per-step RNG stream derives from (with the step).
    pub seed: u64,
    /// Where the data stream continues.
    pub cursor: Cursor,
    /// Pairs the loader has drawn (its crop/flip stream position).
    pub draws: u64,
    /// Completed passes over the data.
    pub epoch: u64,
    pub finetune: FinetuneKind,
    /// With `category_weights`: where the category sampler is (`cursor` is then unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<SamplerState>,
}

/// One optimizer step's numbers (a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Mean over the micro-batches.
    pub loss: f64,
    /// DPO forms: fraction of pairs whose implicit reward favours the winner (KTO: of samples).
    pub implicit_acc: Option<f64>,
    pub mean_p: Option<f64>,
    pub reward_margin: Option<f64>,
    /// Before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub pairs_per_s: f64,
    pub epoch: u64,
    /// GPU runs: the device pool's peak live bytes so far (None on the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<u64>,
}

/// What a finished [`Trainer::run`] reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub last: Option<StepMetrics>,
    pub last_checkpoint: Option<PathBuf>,
    pub mean_pairs_per_s: f64,
    /// GPU runs: the device pool's peak live bytes at the end (None on the CPU).
    pub peak_gpu_bytes: Option<u64>,
}

/// Where the loader's pairs come from: the data in order, or drawn by category.
pub enum Pairs {
    Stream(Box<PairStream>),
    Sampler(Box<CategorySampler>),
}

impl Iterator for Pairs {
    type Item = Result<PreferencePair>;
    fn next(&mut self) -> Option<Result<PreferencePair>> {
        match self {
            Pairs::Stream(s) => s.next(),
            Pairs::Sampler(s) => s.next(),
        }
    }
}

/// A training run in memory.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub sd: StableDiffusion,
    /// LoRA fine-tuning: the adapters being trained.
    pub lora: Option<Lora>,
    /// Full fine-tuning: the frozen reference UNet (on the CPU with `offload_reference`).
    reference: Option<(UNet2DConditionModel, ParamStore)>,
    params: Vec<Arc<Param>>,
    opt: AdamW,
    schedule: LrSchedule,
    process: ForwardProcess,
    objective: ObjectiveConfig,
    source: DataSource,
    loader_opts: LoaderOptions,
    stream_opts: StreamOptions,
    loader: PairLoader<Pairs>,
    /// Cached latents replace image decoding and the VAE when set.
    cache: Option<LatentCache>,
    epoch: u64,
    step: u64,
    last_checkpoint: Option<PathBuf>,
    /// Device-resident steps where they apply (see [`Trainer::set_device_resident`]).
    resident: bool,
}

/// What a device-resident step read back at its end ([`finish_device_step`]).
#[derive(Debug, Clone)]
pub struct DeviceStep {
    /// The loss and gradient norm were finite, so AdamW stepped; if not, nothing changed.
    pub taken: bool,
    /// Of the averaged gradient, before clipping.
    pub grad_norm: f64,
    /// Each micro-batch's statistics.
    pub stats: Vec<ObjectiveStats>,
}

/// The end of a training step whose micro-batch losses are still on the device (their
/// backwards done): gradients averaged over the micro-batches, their norm, clipping to
/// `max_norm` and the AdamW step at `lr`, skipped on the device where the loss or the norm is
/// not finite — all recorded without a read. Then the step's one read: the guard and every
/// micro-batch's statistics. A skipped step's optimizer counters are taken back, so the
/// weights and the optimizer are exactly as before it. Gradients are left in place.
pub fn finish_device_step(
    params: &[Arc<Param>],
    opt: &mut AdamW,
    lr: f32,
    max_norm: f32,
    objective: &ObjectiveConfig,
    losses: &[DeviceLoss],
) -> Result<DeviceStep> {
    use crate::ops::train_step::{step_guard, sumsq_partials, GUARD_LEN};
    let Some(first) = losses.first() else {
        return Err(Error::Invalid("device step: no micro-batch".into()));
    };
    let _g = no_grad();
    if losses.len() > 1 {
        scale_grads(params, 1.0 / losses.len() as f32)?;
    }
    let grads: Vec<Tensor> = params.iter().filter_map(|p| p.grad()).collect();
    let partials = if grads.is_empty() {
        Tensor::zeros(&[1], &first.loss.device())?
    } else {
        sumsq_partials(&grads.iter().collect::<Vec<_>>())?
    };
    let values: Vec<Tensor> = losses.iter().map(|l| l.loss.reshape_to(&[1])).collect::<Result<_>>()?;
    let loss_values = Tensor::concat(&values.iter().collect::<Vec<_>>(), 0)?; // (A,)
    let guard = step_guard(&partials, &loss_values, max_norm)?;
    let undo = opt.step_guarded(params, lr, &guard)?;
    let mut parts = vec![&guard];
    for l in losses {
        parts.extend(l.readout());
    }
    let read = || -> Result<DeviceStep> {
        let read = Tensor::concat(&parts, 0)?.to_vec()?;
        let mut stats = Vec::with_capacity(losses.len());
        let mut at = GUARD_LEN;
        for l in losses {
            let len = l.readout_len();
            stats.push(objective.stats_from_readout(&read[at..at + len], l.kind)?);
            at += len;
        }
        Ok(DeviceStep { taken: read[1] != 0.0, grad_norm: read[2] as f64, stats })
    };
    // A failed read leaves the step in doubt: the counters go back as for a skipped step.
    match read() {
        Ok(out) => {
            if !out.taken {
                opt.undo(undo);
            }
            Ok(out)
        }
        Err(e) => {
            opt.undo(undo);
            Err(e)
        }
    }
}

/// The mean of the micro-batches' losses (each divided first, as the gradients are averaged).
fn mean_loss(stats: &[ObjectiveStats]) -> f64 {
    let n = stats.len() as f64;
    stats.iter().map(|s| s.loss / n).sum()
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The RNG of step `step`, micro-batch `micro`: independent of every other step's.
pub fn step_rng(seed: u64, step: u64, micro: u64) -> Rng {
    Rng::new(mix(seed ^ mix(step.wrapping_mul(0x1_0000).wrapping_add(micro) ^ 0x7EA1_11ED)))
}

fn data_source(cfg: &TrainConfig) -> Result<DataSource> {
    let src = DataSource::detect(&cfg.data, cfg.split.as_deref())?;
    let ok = matches!(
        (cfg.data_format, &src),
        (DataFormat::Auto, _)
            | (DataFormat::Parquet, DataSource::Parquet { .. })
            | (DataFormat::Jsonl, DataSource::Jsonl { .. })
    );
    if !ok {
        return Err(Error::Invalid(format!(
            "train config: data_format = {:?} but {} is {}",
            cfg.data_format,
            cfg.data.display(),
            src.describe()
        )));
    }
    Ok(src)
}

/// The pair source at its start: the stream, or the category sampler seeded by the run seed.
fn open_pairs(cfg: &TrainConfig, source: &DataSource, opts: &StreamOptions) -> Result<Pairs> {
    match &cfg.category_weights {
        Some(w) => {
            let weights = parse_category_weights(w)?;
            Ok(Pairs::Sampler(Box::new(CategorySampler::new(source, opts, &weights, cfg.seed)?)))
        }
        None => Ok(Pairs::Stream(Box::new(PairStream::open(source, opts)?))),
    }
}

impl Trainer {
    /// Loads the pipeline on `device`, sets up the trainable weights (new LoRA adapters, or the
    /// whole UNet with a frozen reference copy), the optimizer and the data stream at its start.
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Trainer> {
        cfg.validate()?;
        let source = data_source(&cfg)?;
        let sd = StableDiffusion::from_dir(&cfg.model, device, None)?;
        sd.text_encoder.params().iter().for_each(|p| p.set_trainable(false));
        if let Some(vae) = &sd.vae {
            vae.store().freeze_all();
        }
        sd.unet.set_gradient_checkpointing(cfg.gradient_checkpointing);
        let process = ForwardProcess::from_config(&sd.scheduler_config)?;
        let objective = cfg.objective_config();
        let (lora, reference, params) = match cfg.finetune {
            FinetuneKind::Lora => {
                sd.unet_params.freeze_all();
                let lora = Lora::new(&sd.unet, &cfg.lora_config())?;
                let params = lora.params();
                (Some(lora), None, params)
            }
            FinetuneKind::Full => {
                sd.unet_params.set_trainable_where(|_| true);
                let reference = if objective.needs_reference() {
                    let ref_dev = if cfg.offload_reference { Device::Cpu } else { device.clone() };
                    let (m, store) = UNet2DConditionModel::from_dir(cfg.model.join("unet"), &ref_dev, None)?;
                    store.freeze_all();
                    Some((m, store))
                } else {
                    None
                };
                (None, reference, sd.unet_params.trainable())
            }
        };
        if cfg.half_weights {
            // Frozen params only: the text encoder, the VAE, LoRA's base, the reference copy.
            sd.text_encoder.params().iter().try_for_each(|p| p.set_storage_dtype(DType::F16))?;
            if let Some(vae) = &sd.vae {
                vae.store().store_frozen_as(DType::F16)?;
            }
            sd.unet_params.store_frozen_as(DType::F16)?;
            if let Some((_, store)) = &reference {
                store.store_frozen_as(DType::F16)?;
            }
        }
        let opt = AdamW::new(cfg.adamw_config())?;
        let loader_opts = LoaderOptions {
            size: cfg.resolution,
            resample: Resample::Bilinear,
            crop: if cfg.random_crop { Crop::Random } else { Crop::Center },
            flip: cfg.flip,
            seed: cfg.seed,
        };
        let stream_opts = StreamOptions { keep_ties: cfg.keep_ties };
        let loader = PairLoader::new(open_pairs(&cfg, &source, &stream_opts)?, loader_opts)?;
        let cache = match &cfg.latent_cache {
            Some(dir) if sd.is_pixel_space() => {
                return Err(Error::Invalid(format!(
                    "train config: latent_cache = {}: {} has no VAE (a pixel-space model), so there is nothing \
                     to cache; the pixels are used directly, drop latent_cache",
                    dir.display(),
                    cfg.model.display()
                )));
            }
            Some(dir) => {
                let key = CacheKey::for_vae(&cfg.model.join("vae"), None, cfg.resolution, Resample::Bilinear)?;
                let c = LatentCache::open_checked(dir, &key)?;
                if c.manifest().keep_ties != cfg.keep_ties {
                    return Err(Error::File {
                        path: dir.clone(),
                        msg: format!(
                            "latent cache built with keep_ties = {}, the config says {}",
                            c.manifest().keep_ties,
                            cfg.keep_ties
                        ),
                    });
                }
                Some(c)
            }
            None => None,
        };
        Ok(Trainer {
            cache,
            schedule: cfg.lr_schedule(),
            cfg,
            sd,
            lora,
            reference,
            params,
            opt,
            process,
            objective,
            source,
            loader_opts,
            stream_opts,
            loader,
            epoch: 0,
            step: 0,
            last_checkpoint: None,
            resident: true,
        })
    }

    /// [`Trainer::new`], then the state of checkpoint `dir`: weights, optimizer, step, data
    /// cursor (or category sampler). The run continues exactly as the uninterrupted one would
    /// have, bit for bit.
    pub fn resume(cfg: TrainConfig, device: &Device, dir: impl AsRef<Path>) -> Result<Trainer> {
        let mut t = Trainer::new(cfg, device)?;
        t.load_checkpoint(dir.as_ref())?;
        Ok(t)
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let st: TrainerState = serde_json::from_str(&text)
            .map_err(|e| Error::File { path: state_path.clone(), msg: format!("bad trainer state: {e}") })?;
        if st.finetune != self.cfg.finetune {
            return Err(Error::File {
                path: state_path,
                msg: format!("checkpoint of a {:?} run, but the config says {:?}", st.finetune, self.cfg.finetune),
            });
        }
        match &self.lora {
            Some(lora) => lora.store.load_into(dir.join(LORA_STATE_FILE))?,
            None => self.sd.unet_params.load_into(dir.join(UNET_DIR).join(UNET_FILE))?,
        }
        self.opt.load_state(dir.join(OPTIMIZER_FILE), &self.params)?;
        let pairs = match (&st.sampler, &self.cfg.category_weights) {
            (None, None) => {
                Pairs::Stream(Box::new(PairStream::open_at(&self.source, &self.stream_opts, Some(&st.cursor))?))
            }
            (Some(ss), Some(w)) => {
                // The saved state carries its own weights; a changed flag must not be ignored.
                let want: Vec<(String, f64)> =
                    parse_category_weights(w)?.into_iter().filter(|(_, x)| *x > 0.0).collect();
                let have: Vec<(String, f64)> = ss.categories.iter().map(|c| (c.name.clone(), c.weight)).collect();
                if want != have || ss.seed != st.seed {
                    return Err(Error::File {
                        path: state_path,
                        msg: format!("checkpoint drew categories with weights {have:?}, the config says {want:?}"),
                    });
                }
                Pairs::Sampler(Box::new(CategorySampler::resume(&self.source, &self.stream_opts, ss)?))
            }
            (saved, _) => {
                return Err(Error::File {
                    path: state_path,
                    msg: format!(
                        "checkpoint {} category_weights, the config {}",
                        if saved.is_some() { "used" } else { "had no" },
                        if saved.is_some() { "has none" } else { "sets them" }
                    ),
                })
            }
        };
        self.loader = PairLoader::new(pairs, self.loader_opts)?.with_draws(st.draws);
        self.step = st.step;
        self.epoch = st.epoch;
        self.cfg.seed = st.seed;
        self.last_checkpoint = Some(dir.to_path_buf());
        Ok(())
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The params the optimizer updates (LoRA A/B, or every UNet weight).
    pub fn trainable_params(&self) -> &[Arc<Param>] {
        &self.params
    }

    pub fn device(&self) -> Device {
        self.sd.device.clone()
    }

    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }

    /// The next `n` decodable pairs, starting a new pass over the data when it runs out.
    fn next_pairs(&mut self, n: usize) -> Result<Vec<crate::data::DecodedPair>> {
        let mut out = self.loader.next_batch(n)?;
        let mut fresh = false;
        while out.len() < n {
            if fresh {
                return Err(Error::Invalid(format!(
                    "{}: a full pass gave no decodable preference pair",
                    self.source.describe()
                )));
            }
            let draws = self.loader.draws();
            let stream = PairStream::open(&self.source, &self.stream_opts)?;
            self.loader = PairLoader::new(Pairs::Stream(Box::new(stream)), self.loader_opts)?.with_draws(draws);
            self.epoch += 1;
            let more = self.loader.next_batch(n - out.len())?;
            fresh = more.is_empty();
            out.extend(more);
        }
        Ok(out)
    }

    /// A micro-batch: pairs -> latents (VAE, sampled with this step's noise) and prompt
    /// embeddings, with one noise level and one noise draw per pair.
    fn micro_batch(&mut self, rng: &mut Rng) -> Result<PreferenceBatch> {
        if self.cache.is_some() {
            return self.cached_micro_batch(rng);
        }
        let n = self.cfg.batch;
        let pairs = self.next_pairs(n)?;
        let dev = self.device();
        let _g = no_grad();
        let pixels = crate::data::image::stack_pairs(&pairs, &dev)?; // (2N, 3, S, S), cat(w, l)
        let latents = self.sd.encode_pixels(&pixels, rng)?; // (2N, C, h, w); the pixels in pixel space
        let mut ctx = Vec::with_capacity(n);
        for p in &pairs {
            let (ids, _) = self.sd.tokenize(&p.pair.prompt)?;
            ctx.push(self.sd.encode_ids(&ids)?); // (1, 77, D)
        }
        let encoder_hidden_states = Tensor::concat(&ctx.iter().collect::<Vec<_>>(), 0)?; // (N, 77, D)
        let level = self.process.sample_levels(n, rng);
        let lshape = latents.shape()[1..].to_vec();
        let mut nshape = vec![n];
        nshape.extend_from_slice(&lshape);
        let noise = Tensor::from_vec(rng.normal_vec(nshape.iter().product()), &nshape, &dev)?;
        Ok(PreferenceBatch {
            latents_w: latents.slice(0, 0, n)?,
            latents_l: latents.slice(0, n, n)?,
            noise,
            level,
            encoder_hidden_states,
        })
    }

    /// The next `n` pairs found in the latent cache, in stream order (pairs the cache lacks,
    /// i.e. undecodable ones, are skipped); the loader is bypassed, its draw count unchanged.
    fn next_cached(&mut self, n: usize) -> Result<Vec<crate::data::cache::CachedPair>> {
        let mut out = Vec::with_capacity(n);
        // Only a pass read from the start that finds nothing proves the cache useless.
        let (mut from_start, mut found_this_pass) = (false, false);
        while out.len() < n {
            let Some(cache) = &self.cache else { return Ok(out) };
            match self.loader.source_mut().next() {
                Some(p) => {
                    if let Some(cp) = cache.get(p?.index)? {
                        found_this_pass = true;
                        out.push(cp);
                    }
                }
                None => {
                    if from_start && !found_this_pass {
                        return Err(Error::Invalid(format!(
                            "{}: a full pass found no pair in the latent cache",
                            self.source.describe()
                        )));
                    }
                    let draws = self.loader.draws();
                    let stream = PairStream::open(&self.source, &self.stream_opts)?;
                    self.loader = PairLoader::new(Pairs::Stream(Box::new(stream)), self.loader_opts)?.with_draws(draws);
                    self.epoch += 1;
                    (from_start, found_this_pass) = (true, false);
                }
            }
        }
        Ok(out)
    }

    fn cached_micro_batch(&mut self, rng: &mut Rng) -> Result<PreferenceBatch> {
        let n = self.cfg.batch;
        let pairs = self.next_cached(n)?;
        let dev = self.device();
        let _g = no_grad();
        let shape = self.cache.as_ref().map(|c| c.latent_shape()).unwrap_or_default(); // (C, h, w)
        let mut lshape = vec![n];
        lshape.extend_from_slice(&shape);
        let (mut w, mut l) = (Vec::new(), Vec::new());
        let mut ctx = Vec::with_capacity(n);
        for p in &pairs {
            w.extend_from_slice(&p.chosen);
            l.extend_from_slice(&p.rejected);
            let (ids, _) = self.sd.tokenize(&p.info.prompt)?;
            ctx.push(self.sd.encode_ids(&ids)?); // (1, 77, D)
        }
        let encoder_hidden_states = Tensor::concat(&ctx.iter().collect::<Vec<_>>(), 0)?; // (N, 77, D)
        let level = self.process.sample_levels(n, rng);
        let noise = Tensor::from_vec(rng.normal_vec(lshape.iter().product()), &lshape, &dev)?;
        Ok(PreferenceBatch {
            latents_w: Tensor::from_vec(w, &lshape, &dev)?,
            latents_l: Tensor::from_vec(l, &lshape, &dev)?,
            noise,
            level,
            encoder_hidden_states,
        })
    }

    /// The objective on one batch: policy with gradients, reference without.
    fn evaluate(&self, batch: &PreferenceBatch) -> Result<ObjectiveOutput> {
        let policy = &self.sd.unet;
        match &self.reference {
            None => unet_step(&self.objective, &self.process, batch, policy, Reference::AdaptersOff),
            Some((m, _)) if m.device().is_cpu() == policy.device().is_cpu() => {
                unet_step(&self.objective, &self.process, batch, policy, Reference::Model(m))
            }
            Some((m, _)) => {
                // Offloaded reference: its inputs go to the CPU, its errors come back.
                let inp = batch.inputs(&self.process)?;
                let (x, t, c) = (&inp.noised.noisy, &inp.noised.timesteps, &inp.encoder_hidden_states);
                let cpu = Device::Cpu;
                let err_ref = as_reference(|| {
                    let pred = m.forward(&x.to(&cpu)?, &t.to(&cpu)?, &c.to(&cpu)?)?;
                    per_sample_error(&pred, &inp.noised.target.to(&cpu)?)?.to(&policy.device())
                })?;
                let pred = policy.forward(x, t, c)?;
                let err = per_sample_error(&pred, &inp.noised.target)?;
                self.objective.loss(&err, Some(&err_ref))
            }
        }
    }

    /// Draws micro-batch `micro` of the next step from the data stream (advancing it), with
    /// that step's random noise levels and noise.
    pub fn draw_batch(&mut self, micro: u64) -> Result<PreferenceBatch> {
        let mut rng = step_rng(self.cfg.seed, self.step, micro);
        self.micro_batch(&mut rng)
    }

    /// The objective's statistics on a batch with the current weights, without gradients.
    pub fn evaluate_batch(&self, batch: &PreferenceBatch) -> Result<crate::train::objective::ObjectiveStats> {
        let _g = no_grad();
        Ok(self.evaluate(batch)?.stats)
    }

    /// One optimizer step over `grad_accum` micro-batches drawn from the data. A non-finite
    /// loss or gradient is an error naming the step; the weights are then left as they were.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let mut batches = Vec::with_capacity(self.cfg.grad_accum);
        for micro in 0..self.cfg.grad_accum {
            batches.push(self.draw_batch(micro as u64)?);
        }
        self.train_on_from(&batches, t0)
    }

    /// One optimizer step on the given micro-batches (gradients averaged over them).
    pub fn train_on(&mut self, batches: &[PreferenceBatch]) -> Result<StepMetrics> {
        self.train_on_from(batches, Instant::now())
    }

    /// Device-resident steps (on by default): on a GPU, with any objective and the
    /// reference on the policy's device, a step computes its loss head, gradient norm,
    /// clipping and NaN guard on the GPU and reads back once, at its end; with
    /// `VIPO_DISPATCHES_PER_SUBMIT=0` it is then one command buffer. Off: the f64 host head and
    /// host clipping (a read after the forwards and one for the norm), for comparisons.
    pub fn set_device_resident(&mut self, on: bool) {
        self.resident = on;
    }

    /// Whether the next step is device-resident.
    pub fn device_resident(&self) -> bool {
        let policy = &self.sd.unet;
        self.resident && !policy.device().is_cpu() && self.reference.as_ref().is_none_or(|(m, _)| !m.device().is_cpu())
    }

    fn train_on_from(&mut self, batches: &[PreferenceBatch], t0: Instant) -> Result<StepMetrics> {
        let step = self.step + 1;
        let accum = batches.len();
        if accum == 0 {
            return Err(Error::Invalid(format!("step {step}: no micro-batch")));
        }
        if self.device_resident() {
            return self.train_on_device(batches, t0);
        }
        let stats = match self.accumulate(batches, step) {
            Ok(v) => v,
            Err(e) => {
                zero_grad(&self.params);
                return Err(e);
            }
        };
        if accum > 1 {
            scale_grads(&self.params, 1.0 / accum as f32)?;
        }
        let norm = clip_grad_norm(&self.params, self.cfg.max_grad_norm)?;
        if !norm.is_finite() {
            zero_grad(&self.params);
            let loss = mean_loss(&stats);
            return Err(Error::Invalid(format!("step {step}: the gradient norm is {norm} (loss {loss})")));
        }
        let lr = self.opt.lr_for(&self.schedule);
        self.opt.step(&self.params, lr)?;
        zero_grad(&self.params);
        self.step = step;
        Ok(self.step_metrics(&stats, norm as f64, lr, batches, t0))
    }

    /// The metrics of step `self.step`, just taken, from its micro-batches' statistics.
    fn step_metrics(
        &self,
        stats: &[ObjectiveStats],
        grad_norm: f64,
        lr: f32,
        batches: &[PreferenceBatch],
        t0: Instant,
    ) -> StepMetrics {
        let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let pairs: usize = batches.iter().map(|b| b.latents_w.shape()[0]).sum();
        StepMetrics {
            step: self.step,
            loss: mean_loss(stats),
            implicit_acc: mean(stats.iter().filter_map(|s| s.implicit_acc).collect()),
            mean_p: mean(stats.iter().filter_map(|s| s.mean_p).collect()),
            reward_margin: mean(stats.iter().filter_map(|s| s.reward_margin).collect()),
            grad_norm,
            lr: lr as f64,
            pairs_per_s: pairs as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            epoch: self.epoch,
            peak_gpu_bytes: self.peak_gpu_bytes(),
        }
    }

    /// [`Self::train_on_from`] as a device-resident step: nothing is read until the end.
    fn train_on_device(&mut self, batches: &[PreferenceBatch], t0: Instant) -> Result<StepMetrics> {
        let step = self.step + 1;
        let losses = self.backward_on_device(batches, step);
        let lr = self.opt.lr_for(&self.schedule);
        let res = losses.and_then(|losses| {
            finish_device_step(&self.params, &mut self.opt, lr, self.cfg.max_grad_norm, &self.objective, &losses)
        });
        zero_grad(&self.params);
        let out = res?;
        let loss = mean_loss(&out.stats);
        if !out.taken {
            // The same errors as the host path's; nothing changed.
            if !loss.is_finite() {
                return Err(Error::Invalid(format!("step {step}: the loss is {loss}")));
            }
            return Err(Error::Invalid(format!("step {step}: the gradient norm is {} (loss {loss})", out.grad_norm)));
        }
        self.step = step;
        Ok(self.step_metrics(&out.stats, out.grad_norm, lr, batches, t0))
    }

    /// Forward and backward of every micro-batch with the loss head on the device.
    fn backward_on_device(&self, batches: &[PreferenceBatch], step: u64) -> Result<Vec<DeviceLoss>> {
        self.each_micro_batch(batches, step, |batch| {
            let reference = match &self.reference {
                None => Reference::AdaptersOff,
                Some((m, _)) => Reference::Model(m),
            };
            let l = unet_step_on_device(&self.objective, &self.process, batch, &self.sd.unet, reference)
                .map_err(|e| Error::Invalid(format!("step {step}: {e}")))?;
            l.loss.backward()?;
            Ok(l)
        })
    }

    /// Gradients zeroed, then `one` (a forward and backward) on every micro-batch in training
    /// mode, LoRA dropout drawn from (step, micro); gradients add up in the params.
    fn each_micro_batch<T>(
        &self,
        batches: &[PreferenceBatch],
        step: u64,
        mut one: impl FnMut(&PreferenceBatch) -> Result<T>,
    ) -> Result<Vec<T>> {
        zero_grad(&self.params);
        if let Some(l) = &self.lora {
            l.train(true);
        }
        let out = batches
            .iter()
            .enumerate()
            .map(|(micro, batch)| {
                if let Some(l) = &self.lora {
                    l.set_dropout_stream(step, micro as u64);
                }
                one(batch)
            })
            .collect();
        if let Some(l) = &self.lora {
            l.train(false);
        }
        out
    }

    /// The GPU pool's peak live bytes (None on the CPU).
    pub fn peak_gpu_bytes(&self) -> Option<u64> {
        self.device().gpu().map(|g| g.pool_stats().peak_live_bytes)
    }

    /// Forward and backward of every micro-batch; gradients add up in the params.
    fn accumulate(&self, batches: &[PreferenceBatch], step: u64) -> Result<Vec<ObjectiveStats>> {
        self.each_micro_batch(batches, step, |batch| {
            let out = self.evaluate(batch).map_err(|e| Error::Invalid(format!("step {step}: {e}")))?;
            if !out.stats.loss.is_finite() {
                return Err(Error::Invalid(format!("step {step}: the loss is {}", out.stats.loss)));
            }
            out.loss.backward()?;
            Ok(out.stats)
        })
    }

    pub fn checkpoint_dir(&self, step: u64) -> PathBuf {
        self.cfg.output.join(format!("checkpoint-{step}"))
    }

    /// Writes `output/checkpoint-<step>/` atomically: everything goes to a hidden temporary
    /// folder first, which is then renamed (a crash leaves the previous checkpoints intact).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = &self.cfg.output;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let dir = self.checkpoint_dir(self.step);
        let tmp = out.join(format!(".checkpoint-{}.tmp", self.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        match &self.lora {
            Some(lora) => {
                lora.save(tmp.join(LORA_FILE))?;
                lora.store.save_safetensors(tmp.join(LORA_STATE_FILE), DType::F32)?;
            }
            None => {
                let u = tmp.join(UNET_DIR);
                std::fs::create_dir_all(&u).map_err(|e| Error::io(&u, e))?;
                let src = self.cfg.model.join("unet").join("config.json");
                std::fs::copy(&src, u.join("config.json")).map_err(|e| Error::io(&src, e))?;
                self.sd.unet_params.save_safetensors(u.join(UNET_FILE), DType::F32)?;
            }
        }
        self.opt.save_state(tmp.join(OPTIMIZER_FILE))?;
        let (cursor, sampler) = match self.loader.source() {
            Pairs::Stream(s) => (s.cursor(), None),
            Pairs::Sampler(s) => (Cursor::start(&self.source), Some(s.state())),
        };
        let st = TrainerState {
            version: 1,
            step: self.step,
            seed: self.cfg.seed,
            cursor,
            sampler,
            draws: self.loader.draws(),
            epoch: self.epoch,
            finetune: self.cfg.finetune,
        };
        let json = serde_json::to_string_pretty(&st).map_err(|e| Error::Invalid(format!("trainer state: {e}")))?;
        write_atomic(&tmp.join(STATE_FILE), json.as_bytes())?;
        self.cfg.save(tmp.join(CONFIG_FILE))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Samples every validation prompt with its seed using the current policy weights and
    /// writes one PNG grid, `output/validation/step-<step>.png`.
    pub fn validate(&self) -> Result<PathBuf> {
        let prompts = &self.cfg.validation_prompts;
        if prompts.is_empty() || self.cfg.validation_seeds.is_empty() {
            return Err(Error::Invalid("validate: no validation_prompts / validation_seeds".into()));
        }
        if let Some(l) = &self.lora {
            l.train(false);
        }
        let mut images = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            let seed = self.cfg.validation_seeds[i % self.cfg.validation_seeds.len()];
            let req = SampleRequest {
                prompt: prompt.clone(),
                steps: self.cfg.validation_steps,
                guidance: self.cfg.validation_guidance,
                scheduler: self.cfg.validation_scheduler.clone(),
                seed,
                width: self.cfg.resolution,
                height: self.cfg.resolution,
                ..Default::default()
            };
            let out = self.sd.sample(&req, |_, _| {}, false)?;
            images.extend(images_from_decoded(&out.decoded)?);
        }
        let grid = grid(&images)?;
        let dir = self.cfg.output.join("validation");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("step-{}.png", self.step));
        let text = format!("{}, step {}, seeds {:?}", prompts.join(" | "), self.step, self.cfg.validation_seeds);
        write_png(&path, &grid, Some(&text))?;
        Ok(path)
    }

    /// Trains to `cfg.steps`: metrics to `metrics.jsonl` and a progress bar, checkpoints every
    /// `checkpoint_every` steps and at the end, validation every `validate_every`. A failing
    /// step (a NaN loss, say) stops the run with an error naming the step and the last good
    /// checkpoint, which is left as it was.
    pub fn run(&mut self) -> Result<RunSummary> {
        let out = self.cfg.output.clone();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        self.cfg.save(out.join(CONFIG_FILE))?;
        let mpath = out.join(METRICS_FILE);
        let mut metrics =
            std::fs::OpenOptions::new().create(true).append(true).open(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let pb = indicatif::ProgressBar::new(self.cfg.steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(self.step);
        let (mut last, mut rate_sum, mut n) = (None, 0.0, 0u64);
        while self.step < self.cfg.steps {
            let m = match self.train_step() {
                Ok(m) => m,
                Err(e) => {
                    pb.abandon();
                    let keep = match &self.last_checkpoint {
                        Some(p) => format!("the last good checkpoint is {}", p.display()),
                        None => "no checkpoint was written".into(),
                    };
                    return Err(Error::Invalid(format!("training stopped: {e}; {keep}")));
                }
            };
            let line = serde_json::to_string(&m).map_err(|e| Error::Invalid(format!("metrics: {e}")))?;
            writeln!(metrics, "{line}").map_err(|e| Error::io(&mpath, e))?;
            pb.set_position(m.step);
            pb.set_message(format!(
                "loss {:.4} acc {} p {} margin {} |g| {:.3e} lr {:.2e} {:.2} pairs/s",
                m.loss,
                fmt_opt(m.implicit_acc),
                fmt_opt(m.mean_p),
                fmt_opt(m.reward_margin),
                m.grad_norm,
                m.lr,
                m.pairs_per_s
            ));
            rate_sum += m.pairs_per_s;
            n += 1;
            let s = m.step;
            last = Some(m);
            let every = |k: u64| k > 0 && s % k == 0;
            if every(self.cfg.checkpoint_every) {
                self.save_checkpoint()?;
            }
            if every(self.cfg.validate_every) {
                let p = self.validate()?;
                pb.println(format!("validation grid: {}", p.display()));
            }
        }
        if self.last_checkpoint.as_deref() != Some(self.checkpoint_dir(self.step).as_path()) {
            self.save_checkpoint()?;
        }
        pb.finish();
        Ok(RunSummary {
            steps: self.step,
            last,
            last_checkpoint: self.last_checkpoint.clone(),
            mean_pairs_per_s: if n > 0 { rate_sum / n as f64 } else { 0.0 },
            peak_gpu_bytes: self.peak_gpu_bytes(),
        })
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

/// Images side by side in a near-square grid (all of the first image's size).
pub fn grid(images: &[RgbImage]) -> Result<RgbImage> {
    let Some(first) = images.first() else {
        return Err(Error::Invalid("grid: no images".into()));
    };
    let (w, h) = (first.width, first.height);
    if images.iter().any(|i| i.width != w || i.height != h) {
        return Err(Error::Invalid("grid: images of different sizes".into()));
    }
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    let rows = images.len().div_ceil(cols);
    let (gw, gh) = (cols * w, rows * h);
    let mut data = vec![0u8; gw * gh * 3];
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for y in 0..h {
            let src = &img.data[y * w * 3..(y + 1) * w * 3];
            let off = ((r * h + y) * gw + c * w) * 3;
            data[off..off + w * 3].copy_from_slice(src);
        }
    }
    Ok(RgbImage { width: gw, height: gh, data })
}
