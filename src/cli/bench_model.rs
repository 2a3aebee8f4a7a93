//! `vipo bench model`: an SD1.5-shaped UNet (the real config, random weights) at 64x64
//! latents — the forward pass, and a LoRA Poly-DPO training step as `vipo train` takes it
//! (policy forward + backward, reference forward with the adapters off, the loss head, clipping
//! to norm 1 and AdamW, read back once at the end) — per device, with peak memory.
//! `benches/pytorch_unet.py` runs the same work in PyTorch under the same case names.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::autograd::no_grad;
use crate::device::{Device, DeviceRequest, GpuTimes};
use crate::error::{Error, Result};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::lora::{Lora, LoraConfig};
use crate::train::objective::{
    unet_step_on_device, ForwardProcess, NoiseLevel, Objective, ObjectiveConfig, PreferenceBatch, Reference,
};
use crate::train::trainer::finish_device_step;

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A UNet `config.json` (default: SD1.5's, from models/sd15).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Latent side (64 = 512x512 images).
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Preference pairs per training step (each pair: winner and loser, so 2x images).
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    #[arg(long, default_value_t = 4)]
    pub lora_rank: usize,
    /// Timed runs of each case after one warm-up run.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Activation checkpointing in the training step (resnets and transformers recomputed).
    #[arg(long)]
    pub checkpointing: bool,
    /// Forward only (no training step).
    #[arg(long)]
    pub forward_only: bool,
    /// Keep the UNet's frozen weights in f16 (the kernels read them as f16 where the device
    /// can: the CPU path, GPUs with SHADER_F16), as `vipo sample --half-weights`; LoRA's
    /// adapters stay f32. The cases' names say "f16w".
    #[arg(long)]
    pub half_weights: bool,
    /// Where the time goes: the training step's phases (both forwards and the loss head,
    /// backward, optimizer; a GPU waits after each); on the CPU the backward by op; on a GPU
    /// with timestamp queries one more run of each case with every dispatch timed, by kernel.
    #[arg(long)]
    pub profile: bool,
    /// Devices to run on: `cpu`, `gpu`, `gpu:N`; default: the CPU and every hardware GPU.
    #[arg(long = "on", value_delimiter = ',')]
    pub on: Option<Vec<String>>,
    /// JSON from `benches/pytorch_unet.py --json`: adds its times and the ratio vipo/peer.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct ModelResult {
    pub case: String,
    pub device: String,
    /// Median seconds per run.
    pub seconds: f64,
    /// Pairs per second (training cases).
    pub pairs_per_s: Option<f64>,
    /// Peak bytes: the GPU pool's live peak during the case, or the process's peak resident
    /// set on the CPU (weights included).
    pub peak_bytes: Option<u64>,
    /// GPU command buffers submitted by one run (readbacks and full batches).
    pub submits: Option<u64>,
    pub peer_seconds: Option<f64>,
    /// `--profile`: the training step's phases and backward ops, per step.
    pub profile: Option<StepProfile>,
    /// `--profile` on a GPU: one more run with every dispatch timed; `seconds` against the
    /// case's `seconds` is how busy the GPU was (the rest: recording, submits, waits).
    pub gpu_kernels: Option<GpuTimes>,
}

/// Seconds per training step (mean over the timed runs) in each phase.
#[derive(Debug, Clone, Serialize)]
pub struct StepProfile {
    /// Reference and policy forwards, errors and the loss head (`unet_step_on_device`).
    pub forwards: f64,
    pub backward: f64,
    /// Gradient norm, clipping, AdamW and the step's one read.
    pub optimizer: f64,
    /// The backward by op (CPU only: a GPU's backward functions only record work).
    pub backward_ops: Vec<crate::autograd::OpTime>,
}

/// The process's peak resident set (Linux `VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `repeats` runs after a warm-up, and the submits of the last run.
fn time_runs(repeats: usize, dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Option<u64>)> {
    f()?; // warm-up: pipelines, pool buffers
    if let Some(g) = dev.gpu() {
        g.sync()?;
        g.reset_peak();
    }
    let mut t = Vec::new();
    let mut submits = None;
    for _ in 0..repeats.max(1) {
        let s0 = dev.gpu().map(|g| g.pool_stats().submits);
        let t0 = Instant::now();
        f()?;
        if let Some(g) = dev.gpu() {
            g.sync()?;
        }
        t.push(t0.elapsed().as_secs_f64());
        // The wait above submits nothing new (the run ends on a read or leaves its tail queued).
        submits = s0.zip(dev.gpu()).map(|(s0, g)| g.pool_stats().submits - s0);
    }
    Ok((median(t), submits))
}

/// One more run of `f` with the GPU's timestamps around every dispatch (None on the CPU or
/// without timestamp queries). Each dispatch gets a pass of its own there, so the run's wall
/// time is longer than untimed; the kernels' times are not.
fn gpu_times(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<Option<GpuTimes>> {
    let Some(g) = dev.gpu() else { return Ok(None) };
    g.sync()?;
    if !g.gpu_timer_start() {
        return Ok(None);
    }
    let r = f();
    let times = g.gpu_timer_stop();
    r.map(|()| times)
}

fn peak(dev: &Device) -> Option<u64> {
    match dev.gpu() {
        Some(g) => Some(g.pool_stats().peak_live_bytes),
        None => peak_rss(),
    }
}

/// Runs the cases on one device.
pub fn bench_device(a: &ModelArgs, cfg: &UNet2DConditionConfig, dev: &Device, name: &str) -> Result<Vec<ModelResult>> {
    let (unet, store) = UNet2DConditionModel::init_params(cfg, 0, dev)?;
    // The base is frozen, as in LoRA training (and PyTorch's `requires_grad_(False)` in
    // benches/pytorch_unet.py): no weight gradients, no activations kept for them.
    store.freeze_all();
    let tag = if a.half_weights {
        store.store_frozen_as(crate::tensor::DType::F16)?;
        " f16w"
    } else {
        ""
    };
    let ctx_dim =
        cfg.cross_attention_dim.expand("cross_attention_dim", 1).ok().and_then(|v| v.first().copied()).unwrap_or(768);
    let (c, s) = (cfg.in_channels, a.latent);
    let mut out = Vec::new();
    let (fwd, fwd_peak, fwd_kernels) = {
        let x = Tensor::randn(&[a.batch, c, s, s], 1, dev)?;
        let t = Tensor::full(500.0, &[a.batch], dev)?;
        let ctx = Tensor::randn(&[a.batch, 77, ctx_dim], 2, dev)?;
        let mut run = || {
            let _g = no_grad();
            let y = unet.forward(&x, &t, &ctx)?;
            y.to_vec().map(|_| ())
        };
        let fwd = time_runs(a.repeats, dev, &mut run)?;
        let fwd_peak = peak(dev);
        (fwd, fwd_peak, if a.profile { gpu_times(dev, &mut run)? } else { None })
    };
    out.push(ModelResult {
        case: format!("unet forward b{} {s}x{s}{tag}", a.batch),
        device: name.to_string(),
        seconds: fwd.0,
        pairs_per_s: None,
        peak_bytes: fwd_peak,
        submits: fwd.1,
        peer_seconds: None,
        profile: None,
        gpu_kernels: fwd_kernels,
    });
    if a.forward_only {
        return Ok(out);
    }
    unet.set_gradient_checkpointing(a.checkpointing);
    let lora = Lora::new(&unet, &LoraConfig { rank: a.lora_rank, alpha: a.lora_rank as f32, ..LoraConfig::default() })?;
    let params = lora.params();
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-5, ..AdamWConfig::default() })?;
    let objective = ObjectiveConfig { objective: Objective::PolyDpo { alpha: 1.0 }, ..ObjectiveConfig::default() };
    let sched = crate::schedulers::SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}"#,
    )?;
    let process = ForwardProcess::from_config(&sched)?;
    let n = a.pairs;
    let mut rng = Rng::new(3);
    let batch = PreferenceBatch {
        latents_w: Tensor::randn(&[n, c, s, s], 4, dev)?,
        latents_l: Tensor::randn(&[n, c, s, s], 5, dev)?,
        noise: Tensor::randn(&[n, c, s, s], 6, dev)?,
        level: NoiseLevel::Timesteps((0..n).map(|_| rng.below(1000)).collect()),
        encoder_hidden_states: Tensor::randn(&[n, 77, ctx_dim], 7, dev)?,
    };
    // Phase times of each run (the first is the warm-up, left out).
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let wait = || dev.gpu().map_or(Ok(()), |g| g.sync());
    let mut run = || {
        // By op on the CPU only: a GPU's backward functions take no time of their own.
        if a.profile && dev.is_cpu() && phases.len() == 1 {
            crate::autograd::profile_backward(true);
        }
        let t0 = Instant::now();
        crate::optim::zero_grad(&params);
        let o = unet_step_on_device(&objective, &process, &batch, &unet, Reference::AdaptersOff)?;
        if a.profile {
            wait()?;
        }
        let t1 = Instant::now();
        o.loss.backward()?;
        if a.profile {
            wait()?;
        }
        let t2 = Instant::now();
        // As `vipo train` steps: clipped to norm 1, guarded, one read at the end.
        let done = finish_device_step(&params, &mut opt, 1e-5, 1.0, &objective, std::slice::from_ref(&o))?;
        if !done.taken {
            return Err(Error::Invalid(format!("bench step: not finite (gradient norm {})", done.grad_norm)));
        }
        if a.profile {
            wait()?;
            let t3 = Instant::now();
            phases.push([t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64()));
        }
        Ok(())
    };
    let step = time_runs(a.repeats, dev, &mut run)?;
    let step_peak = peak(dev);
    let step_kernels = if a.profile { gpu_times(dev, &mut run)? } else { None };
    if step_kernels.is_some() {
        phases.pop(); // the timed run's phases: each dispatch in a pass of its own
    }
    let profile = a.profile.then(|| {
        let timed = &phases[1.min(phases.len())..];
        let runs = timed.len().max(1) as f64;
        let mean = |i: usize| timed.iter().map(|p| p[i]).sum::<f64>() / runs;
        let mut ops = crate::autograd::backward_profile();
        crate::autograd::profile_backward(false);
        for t in &mut ops {
            t.seconds /= runs;
            t.calls = (t.calls as f64 / runs).round() as usize;
        }
        StepProfile { forwards: mean(0), backward: mean(1), optimizer: mean(2), backward_ops: ops }
    });
    out.push(ModelResult {
        case: format!("lora poly-dpo step {n} pairs {s}x{s}{}{tag}", if a.checkpointing { " ckpt" } else { "" }),
        device: name.to_string(),
        seconds: step.0,
        pairs_per_s: Some(n as f64 / step.0),
        peak_bytes: step_peak,
        submits: step.1,
        peer_seconds: None,
        profile,
        gpu_kernels: step_kernels,
    });
    Ok(out)
}

pub fn run(a: &ModelArgs) -> Result<()> {
    let path = match &a.config {
        Some(p) => p.clone(),
        None => crate::models::ldm_convert::sd15_config_dir()?.join("unet").join("config.json"),
    };
    let cfg = UNet2DConditionConfig::from_file(&path)?;
    let names: Vec<String> = match &a.on {
        Some(v) => v.clone(),
        None => {
            let mut v = vec!["cpu".to_string()];
            if Device::select(DeviceRequest::Gpu).is_ok() {
                v.push("gpu".into());
            }
            v
        }
    };
    let peer: std::collections::HashMap<String, f64> = match &a.peer {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let v: Vec<serde_json::Value> = serde_json::from_str(&text)
                .map_err(|e| Error::File { path: p.clone(), msg: format!("not the peer's JSON list: {e}") })?;
            v.iter().filter_map(|o| Some((o.get("case")?.as_str()?.to_string(), o.get("seconds")?.as_f64()?))).collect()
        }
        None => Default::default(),
    };
    let mut all = Vec::new();
    for name in &names {
        let sel = Device::select(name.parse()?)?;
        eprintln!("{}: {}", name, sel.reason);
        let mut rs = bench_device(a, &cfg, &sel.device, name)?;
        for r in &mut rs {
            r.peer_seconds = peer.get(&r.case).copied();
            if !a.json {
                let ratio = r.peer_seconds.map(|p| format!("  vipo/peer {:.2}", r.seconds / p)).unwrap_or_default();
                println!(
                    "{:<36} {:<8} {:>9.3} s{}{}{}{}",
                    r.case,
                    r.device,
                    r.seconds,
                    r.pairs_per_s.map(|p| format!("  {p:.3} pairs/s")).unwrap_or_default(),
                    r.peak_bytes
                        .map(|b| format!("  peak {:.2} GiB", b as f64 / (1u64 << 30) as f64))
                        .unwrap_or_default(),
                    r.submits.map(|n| format!("  {n} submits")).unwrap_or_default(),
                    ratio
                );
                if let Some(p) = &r.profile {
                    print_profile(p);
                }
                if let Some(k) = &r.gpu_kernels {
                    print_gpu_kernels(k, r.seconds);
                }
            }
        }
        all.extend(rs);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all).map_err(|e| Error::Invalid(e.to_string()))?);
    }
    Ok(())
}

fn print_profile(p: &StepProfile) {
    let total = p.forwards + p.backward + p.optimizer;
    let pct = |v: f64| 100.0 * v / total.max(f64::MIN_POSITIVE);
    println!(
        "  per step: forwards + loss {:.3} s ({:.0}%), backward {:.3} s ({:.0}%), optimizer {:.3} s ({:.0}%)",
        p.forwards,
        pct(p.forwards),
        p.backward,
        pct(p.backward),
        p.optimizer,
        pct(p.optimizer)
    );
    for t in &p.backward_ops {
        if t.seconds >= 0.0005 * total {
            println!("    backward {:<24} {:>8.3} s  {:>5.1}%  {:>5} calls", t.op, t.seconds, pct(t.seconds), t.calls);
        }
    }
}

/// The GPU's busy time against the run's wall time, and the kernels that take most of it.
fn print_gpu_kernels(t: &GpuTimes, wall: f64) {
    let pct = |v: f64| 100.0 * v / t.seconds.max(f64::MIN_POSITIVE);
    println!(
        "  GPU kernels {:.3} s per run, {:.0}% of its {:.3} s ({} dispatches)",
        t.seconds,
        100.0 * t.seconds / wall.max(f64::MIN_POSITIVE),
        wall,
        t.kernels.iter().map(|k| k.dispatches).sum::<usize>()
    );
    for k in t.kernels.iter().take(16) {
        let name = format!("{}/{}", k.shader, k.entry);
        println!("    {:<36} {:>8.4} s  {:>5.1}%  {:>5} dispatches", name, k.seconds, pct(k.seconds), k.dispatches);
    }
}
