//! The training loop on the tiny SD1.5 pipeline and the tiny Pick-a-Pic data (parquet and
//! JSONL) on the CPU: every objective with LoRA and with full fine-tuning, exact resume (bit
//! for bit against an uninterrupted run), the NaN stop, checkpoints that load (the LoRA through
//! `vipo sample --lora`), a DPO run on a fixed batch that must lower the loss, the TOML config,
//! and the first-step loss on the GPU against the CPU.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use vipo::params::ParamStore;
use vipo::train::config::{FinetuneKind, ObjectiveKind, TrainConfig};
use vipo::train::lora::Lora;
use vipo::train::trainer::{Trainer, LORA_FILE, METRICS_FILE, OPTIMIZER_FILE, STATE_FILE, UNET_DIR, UNET_FILE};
use vipo::{DType, Device};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small run: 64 px, 2 pairs a micro-batch, checkpoints every 2 steps.
fn config(name: &str, jsonl: bool) -> TrainConfig {
    let data = if jsonl { fixtures().join("pickapic_tiny/pairs.jsonl") } else { fixtures().join("pickapic_tiny/data") };
    TrainConfig {
        model: fixtures().join("sd15_tiny_pipeline"),
        data,
        resolution: 64,
        batch: 2,
        lr: 1e-3,
        steps: 4,
        checkpoint_every: 2,
        seed: 7,
        output: tmp(name),
        device: "cpu".into(),
        ..Default::default()
    }
}

fn values(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    t.trainable_params()
        .iter()
        .map(|p| (p.name().to_string(), p.value().to_vec().unwrap().iter().map(|v| v.to_bits()).collect()))
        .collect()
}

#[test]
fn every_objective_trains_with_lora_and_full() {
    let objectives = [ObjectiveKind::Sft, ObjectiveKind::Dpo, ObjectiveKind::PolyDpo, ObjectiveKind::Kto];
    for (k, obj) in objectives.into_iter().enumerate() {
        for full in [false, true] {
            let name = format!("obj-{obj:?}-{full}");
            let mut cfg = config(&name, (k + full as usize).is_multiple_of(2));
            cfg.objective = obj;
            cfg.alpha = 2.0;
            cfg.steps = 2;
            cfg.grad_accum = 2;
            cfg.finetune = if full { FinetuneKind::Full } else { FinetuneKind::Lora };
            cfg.offload_reference = full && obj == ObjectiveKind::Dpo;
            let mut t = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
            let before = values(&t);
            let s = t.run().unwrap_or_else(|e| panic!("{name}: {e}"));
            let m = s.last.unwrap();
            eprintln!("{name}: {m:?}");
            assert_eq!(s.steps, 2);
            assert!(m.loss.is_finite() && m.grad_norm > 0.0, "{name}: {m:?}");
            assert_eq!(m.implicit_acc.is_some(), obj != ObjectiveKind::Sft, "{name}");
            assert_ne!(before, values(&t), "{name}: no weight moved");
            let dir = cfg.output.join("checkpoint-2");
            for f in [OPTIMIZER_FILE, STATE_FILE, "config.toml"] {
                assert!(dir.join(f).is_file(), "{name}: {f} missing");
            }
            let lines = std::fs::read_to_string(cfg.output.join(METRICS_FILE)).unwrap();
            assert_eq!(lines.lines().count(), 2);
            // The saved weights load into a fresh model.
            let (unet, store) = vipo::models::unet_2d_condition::UNet2DConditionModel::from_dir(
                cfg.model.join("unet"),
                &Device::Cpu,
                None,
            )
            .unwrap();
            if full {
                let saved = ParamStore::load_safetensors(dir.join(UNET_DIR).join(UNET_FILE), &Device::Cpu).unwrap();
                assert_eq!(saved.len(), store.len());
                let (u2, _) = vipo::models::unet_2d_condition::UNet2DConditionModel::from_dir(
                    dir.join(UNET_DIR),
                    &Device::Cpu,
                    None,
                )
                .unwrap();
                drop(u2);
            } else {
                let l = Lora::load(&unet, dir.join(LORA_FILE)).unwrap();
                assert_eq!(l.len(), t.lora.as_ref().unwrap().len());
            }
            let _ = std::fs::remove_dir_all(&cfg.output);
        }
    }
}

/// 4 steps straight against 2 + resume + 2: the same weights, bit for bit.
#[test]
fn resume_continues_bit_for_bit() {
    for (full, jsonl) in [(false, false), (true, true)] {
        let mut cfg = config(&format!("resume-a-{full}"), jsonl);
        cfg.objective = ObjectiveKind::PolyDpo;
        cfg.alpha = 1.0;
        cfg.grad_accum = 2;
        cfg.batch = 3; // 6 pairs a step over 24 (fewer after ties): crosses an epoch boundary
        cfg.schedule = vipo::train::config::ScheduleKind::Cosine;
        cfg.warmup_steps = 1;
        cfg.finetune = if full { FinetuneKind::Full } else { FinetuneKind::Lora };
        let mut a = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        a.run().unwrap();
        let straight = values(&a);

        let mut cfg_b = cfg.clone();
        cfg_b.output = tmp(&format!("resume-b-{full}"));
        cfg_b.steps = 2;
        let mut b = Trainer::new(cfg_b.clone(), &Device::Cpu).unwrap();
        b.run().unwrap();
        drop(b);
        cfg_b.steps = 4;
        let mut c = Trainer::resume(cfg_b.clone(), &Device::Cpu, cfg_b.output.join("checkpoint-2")).unwrap();
        assert_eq!(c.step(), 2);
        c.run().unwrap();
        let resumed = values(&c);
        assert_eq!(straight.len(), resumed.len());
        for ((n, x), (_, y)) in straight.iter().zip(&resumed) {
            assert!(x == y, "full={full}: `{n}` differs after resume");
        }
        // The metrics of steps 3 and 4 match too.
        let ma = std::fs::read_to_string(cfg.output.join(METRICS_FILE)).unwrap();
        let mb = std::fs::read_to_string(cfg_b.output.join(METRICS_FILE)).unwrap();
        let loss = |s: &str| -> Vec<String> {
            s.lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    format!("{} {}", v["step"], v["loss"])
                })
                .collect()
        };
        assert_eq!(loss(&ma), loss(&mb), "full={full}");
        let _ = std::fs::remove_dir_all(&cfg.output);
        let _ = std::fs::remove_dir_all(&cfg_b.output);
    }
}

/// An absurd learning rate blows the weights up; the next step's loss is not finite: the run
/// stops with an error naming that step and keeps the last good checkpoint.
#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let mut cfg = config("nan", true);
    cfg.lr = 1e35;
    cfg.max_grad_norm = 1e30;
    cfg.steps = 6;
    cfg.checkpoint_every = 1;
    cfg.finetune = FinetuneKind::Full;
    let mut t = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let err = t.run().unwrap_err().to_string();
    eprintln!("{err}");
    let step = t.step() + 1;
    assert!((2..=6).contains(&step), "stopped after {} steps", t.step());
    assert!(err.contains(&format!("step {step}")), "error does not name step {step}: {err}");
    let last = cfg.output.join(format!("checkpoint-{}", step - 1));
    assert!(err.contains(&last.display().to_string()), "error does not name the last checkpoint: {err}");
    assert!(last.join(STATE_FILE).is_file());
    assert!(!cfg.output.join(format!("checkpoint-{step}")).exists());
    let _ = std::fs::remove_dir_all(&cfg.output);
}

/// DPO on one fixed batch: 15 steps must lower its loss well below ln 2 (where a new LoRA
/// starts); a broken gradient sign or a no-op optimizer fails this.
#[test]
fn dpo_on_a_fixed_batch_lowers_the_loss() {
    let mut cfg = config("fixed", false);
    cfg.objective = ObjectiveKind::Dpo;
    cfg.lr = 2e-3;
    cfg.lora_rank = 8;
    cfg.lora_alpha = 8.0;
    let mut t = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let batch = t.draw_batch(0).unwrap();
    let l0 = t.evaluate_batch(&batch).unwrap().loss;
    assert!((l0 - std::f64::consts::LN_2).abs() < 1e-9, "a new LoRA starts at ln 2, got {l0}");
    let mut losses = vec![];
    for _ in 0..15 {
        losses.push(t.train_on(std::slice::from_ref(&batch)).unwrap().loss);
    }
    let l1 = t.evaluate_batch(&batch).unwrap().loss;
    eprintln!("fixed-batch DPO loss {l0:.4} -> {l1:.4} ({losses:?})");
    assert!(l1 < 0.5 * l0, "loss {l0} -> {l1}: did not fall by half");
}

#[test]
fn toml_config_round_trips_and_rejects_typos() {
    let text = r#"
model = "m"
data = "d.jsonl"
objective = "poly-dpo"
alpha = 5.0
beta = 2500.0
half_factor = false
finetune = "full"
offload_reference = true
resolution = 256
batch = 4
grad_accum = 2
lr = 1e-6
schedule = "cosine"
warmup_steps = 10
steps = 100
validation_prompts = ["a cat"]
validation_seeds = [1, 2]
validate_every = 50
"#;
    let c = TrainConfig::from_toml(text).unwrap();
    assert_eq!(c.objective, ObjectiveKind::PolyDpo);
    assert_eq!(c.finetune, FinetuneKind::Full);
    assert!(!c.half_factor && c.offload_reference && c.batch == 4 && c.validation_seeds == vec![1, 2]);
    c.validate().unwrap();
    let again = TrainConfig::from_toml(&c.to_toml().unwrap()).unwrap();
    assert_eq!(c, again);
    let e = TrainConfig::from_toml("lerning_rate = 1e-5").unwrap_err().to_string();
    assert!(e.contains("lerning_rate"), "{e}");
    let bad = TrainConfig { resolution: 60, ..c };
    assert!(bad.validate().unwrap_err().to_string().contains("resolution"));
}

/// `vipo train` from a TOML file with a flag overriding it, then `vipo sample --lora` on the
/// checkpoint; validation writes a grid.
#[test]
fn cli_train_then_sample_with_the_lora() {
    let out = tmp("cli");
    std::fs::create_dir_all(&out).unwrap();
    let cfg_path = out.join("cfg.toml");
    let cfg = format!(
        "model = {:?}\ndata = {:?}\nresolution = 64\nbatch = 1\nsteps = 5\ncheckpoint_every = 2\nlr = 1e-3\n\
         validate_every = 2\nvalidation_prompts = [\"a red fox\", \"a lighthouse\"]\nvalidation_seeds = [3]\n\
         validation_steps = 2\noutput = {:?}\n",
        fixtures().join("sd15_tiny_pipeline"),
        fixtures().join("pickapic_tiny/data"),
        out.join("run")
    );
    std::fs::write(&cfg_path, cfg).unwrap();
    let bin = env!("CARGO_BIN_EXE_vipo");
    let st = std::process::Command::new(bin)
        .args(["--device", "cpu", "train", "--config"])
        .arg(&cfg_path)
        .args(["--steps", "3", "--objective", "poly-dpo", "--alpha", "3"])
        .status()
        .unwrap();
    assert!(st.success());
    let run = out.join("run");
    let saved = TrainConfig::from_file(run.join("config.toml")).unwrap();
    assert_eq!((saved.steps, saved.objective, saved.alpha), (3, ObjectiveKind::PolyDpo, 3.0));
    assert!(run.join("checkpoint-2").is_dir() && run.join("checkpoint-3").is_dir());
    assert!(run.join("validation/step-2.png").is_file());
    let (img, _) = vipo::image_io::read_png(&run.join("validation/step-2.png")).unwrap();
    assert_eq!((img.width, img.height), (128, 64));
    let st = std::process::Command::new(bin)
        .args(["--device", "cpu", "sample", "--model"])
        .arg(fixtures().join("sd15_tiny_pipeline"))
        .args(["--prompt", "a red fox", "--steps", "2", "--width", "64", "--height", "64", "--lora"])
        .arg(run.join("checkpoint-3").join(LORA_FILE))
        .arg("--out")
        .arg(out.join("fox.png"))
        .status()
        .unwrap();
    assert!(st.success());
    assert!(out.join("fox.png").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

/// The first step's loss of a LoRA DPO run on the GPU (lavapipe in CI) against the CPU's.
#[test]
fn gpu_first_step_loss_matches_cpu() {
    let Some(dev) = gpu() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let mut cfg = config("gpu-cpu", true);
    cfg.batch = 1;
    cfg.steps = 1;
    let mut c = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let t0 = std::time::Instant::now();
    let mc = c.train_step().unwrap();
    let cpu_s = t0.elapsed().as_secs_f64();
    cfg.output = tmp("gpu-gpu");
    let mut g = Trainer::new(cfg.clone(), &dev).unwrap();
    let t0 = std::time::Instant::now();
    let mg = g.train_step().unwrap();
    let mg2 = g.train_step().unwrap();
    let gpu_s = t0.elapsed().as_secs_f64() / 2.0;
    eprintln!(
        "first-step loss cpu {} gpu {} (diff {:.2e}); pairs/s cpu {:.2} ({cpu_s:.2}s) gpu {:.3} ({gpu_s:.2}s/step); \
         2nd gpu step loss {}",
        mc.loss,
        mg.loss,
        (mc.loss - mg.loss).abs(),
        mc.pairs_per_s,
        mg2.pairs_per_s,
        mg2.loss
    );
    assert!((mc.loss - mg.loss).abs() < 1e-4);
    // A new LoRA starts at z = 0 (loss ln 2 on any device), so the gradient is the real check
    // of the first step: its norm agrees to f32 accuracy.
    let gn = (mc.grad_norm - mg.grad_norm).abs() / mc.grad_norm;
    eprintln!("first-step grad norm cpu {} gpu {} (rel {gn:.2e})", mc.grad_norm, mg.grad_norm);
    assert!(gn < 1e-3, "grad norm cpu {} gpu {}", mc.grad_norm, mg.grad_norm);
    // The second step (z != 0): z = -(beta/2) * (difference of per-sample errors ~1) carries
    // 2500 x the f32 error of the errors (~1e-3 absolute, as torch's own f32 run shows against
    // f64 in tests/dpo.rs), so the loss agrees to a few 1e-4.
    let mc2 = c.train_step().unwrap();
    assert!((mc2.loss - mg2.loss).abs() < 1e-3, "second step: cpu {} gpu {}", mc2.loss, mg2.loss);
    // The metrics carry the GPU pool's peak (the CPU's none). Batch 2 at 64 px, peak of one
    // step from a reset (other tests on the shared device can raise it when run in parallel).
    assert!(mc2.peak_gpu_bytes.is_none() && mg2.peak_gpu_bytes.is_some_and(|b| b > 0));
    drop(g);
    cfg.batch = 2;
    cfg.output = tmp("gpu-peak");
    let mut g = Trainer::new(cfg.clone(), &dev).unwrap();
    if let Some(ctx) = dev.gpu() {
        ctx.reset_peak();
    }
    let m = g.train_step().unwrap();
    let peak = m.peak_gpu_bytes.unwrap_or(0);
    eprintln!("LoRA DPO batch 2 at 64 px: peak GPU pool {peak} bytes ({:.1} MiB)", peak as f64 / 1048576.0);
    assert!(peak > 0);
    for d in [&cfg.output, &tmp("gpu-gpu")] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Training from a latent cache (`vipo data cache-latents`): runs, and resumes bit for bit.
#[test]
fn latent_cache_trains_and_resumes_exactly() {
    let out = tmp("cache");
    let cache = out.join("latents");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
        .args(["--device", "cpu", "data", "cache-latents", "--size", "64", "--shard-pairs", "5", "--vae"])
        .arg(fixtures().join("sd15_tiny_pipeline/vae"))
        .arg("--out")
        .arg(&cache)
        .arg(fixtures().join("pickapic_tiny/pairs.jsonl"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut cfg = config("cache-a", true);
    cfg.latent_cache = Some(cache.clone());
    cfg.batch = 5; // crosses the end of the data within 4 steps
    cfg.objective = ObjectiveKind::Kto;
    let mut a = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let s = a.run().unwrap();
    assert!(s.last.unwrap().loss.is_finite());
    let mut cfg_b = cfg.clone();
    cfg_b.output = tmp("cache-b");
    cfg_b.steps = 2;
    Trainer::new(cfg_b.clone(), &Device::Cpu).unwrap().run().unwrap();
    cfg_b.steps = 4;
    let mut c = Trainer::resume(cfg_b.clone(), &Device::Cpu, cfg_b.output.join("checkpoint-2")).unwrap();
    c.run().unwrap();
    assert!(values(&a) == values(&c), "cached run differs after resume");
    // A cache of another resolution is refused.
    let mut bad = cfg.clone();
    bad.resolution = 32;
    let e = Trainer::new(bad, &Device::Cpu).err().expect("a 32 px run accepted a 64 px cache").to_string();
    eprintln!("{e}");
    for d in [&out, &cfg.output, &cfg_b.output] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Full fine-tuning on the GPU with the reference offloaded to the CPU: at the first step the
/// policy equals the reference, so the DPO loss is ln 2 up to the two devices' f32 differences
/// (amplified by beta/2 = 2500 in z).
#[test]
fn gpu_full_finetune_with_offloaded_reference() {
    let Some(dev) = gpu() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let mut cfg = config("gpu-offload", false);
    cfg.batch = 1;
    cfg.lr = 1e-5;
    cfg.finetune = FinetuneKind::Full;
    cfg.offload_reference = true;
    let mut t = Trainer::new(cfg, &dev).unwrap();
    let m = t.train_step().unwrap();
    eprintln!("offloaded reference: first-step loss {} (ln 2 = {})", m.loss, std::f64::consts::LN_2);
    assert!((m.loss - std::f64::consts::LN_2).abs() < 5e-3 && m.grad_norm.is_finite() && m.grad_norm > 0.0);
}

/// Runs `cfg` straight to 4 steps, and to 2 + resume + 2 in `<output>-b`: the same weights
/// and the same losses, bit for bit. Returns the resumed run's output folder.
fn assert_resumes_exactly(cfg: &TrainConfig, what: &str) -> PathBuf {
    let mut a = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let s = a.run().unwrap();
    assert_eq!(s.peak_gpu_bytes, None, "{what}: a CPU run has no GPU pool");
    let mut cfg_b = cfg.clone();
    cfg_b.output = PathBuf::from(format!("{}-b", cfg.output.display()));
    let _ = std::fs::remove_dir_all(&cfg_b.output);
    cfg_b.steps = 2;
    Trainer::new(cfg_b.clone(), &Device::Cpu).unwrap().run().unwrap();
    cfg_b.steps = cfg.steps;
    let mut c = Trainer::resume(cfg_b.clone(), &Device::Cpu, cfg_b.output.join("checkpoint-2")).unwrap();
    c.run().unwrap();
    let (x, y) = (values(&a), values(&c));
    for ((n, x), (_, y)) in x.iter().zip(&y) {
        assert!(x == y, "{what}: `{n}` differs after resume");
    }
    let losses = |d: &Path| -> Vec<String> {
        std::fs::read_to_string(d.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {}", v["step"], v["loss"])
            })
            .collect()
    };
    assert_eq!(losses(&cfg.output), losses(&cfg_b.output), "{what}");
    let _ = std::fs::remove_dir_all(&cfg.output);
    cfg_b.output
}

/// Random crops + flips, category-weighted sampling and LoRA dropout each resume bit for bit.
#[test]
fn augmentation_categories_and_dropout_resume_bit_for_bit() {
    // Random crops and flips: the batch differs from the center crop, and resume is exact.
    let mut cfg = config("aug", true);
    cfg.random_crop = true;
    cfg.flip = true;
    let center = Trainer::new(config("aug-center", true), &Device::Cpu).unwrap().draw_batch(0).unwrap();
    let aug = Trainer::new(cfg.clone(), &Device::Cpu).unwrap().draw_batch(0).unwrap();
    assert_ne!(center.latents_w.to_vec().unwrap(), aug.latents_w.to_vec().unwrap(), "crop/flip changed nothing");
    let out = assert_resumes_exactly(&cfg, "random_crop + flip");
    let _ = std::fs::remove_dir_all(out);

    // Category weights: the sampler's state is in the checkpoint; other weights are refused.
    let mut cfg = config("cats", true);
    cfg.category_weights = Some("aesthetics=2,composition=1,text rendering=0.5".into());
    cfg.batch = 3; // 12 draws over 3 + 3 + 3 pairs: categories wrap around
    let out = assert_resumes_exactly(&cfg, "category_weights");
    let ck = out.join("checkpoint-2");
    let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck.join(STATE_FILE)).unwrap()).unwrap();
    assert_eq!(st["sampler"]["draws"], 6, "{st}");
    let mut other = cfg.clone();
    other.category_weights = Some("aesthetics=1".into());
    let e = Trainer::resume(other, &Device::Cpu, &ck).err().expect("changed weights accepted").to_string();
    assert!(e.contains("weights"), "{e}");
    let mut none = cfg.clone();
    none.category_weights = None;
    let e = Trainer::resume(none, &Device::Cpu, &ck).err().expect("dropped weights accepted").to_string();
    assert!(e.contains("category_weights"), "{e}");
    let _ = std::fs::remove_dir_all(out);

    // LoRA dropout: the masks come from (seed, step, micro, call), so resume is exact; and
    // dropout does change the run.
    let mut cfg = config("dropout", false);
    cfg.lora_dropout = 0.1;
    cfg.grad_accum = 2;
    cfg.batch = 1;
    let out = assert_resumes_exactly(&cfg, "lora_dropout");
    let mut plain = cfg.clone();
    plain.lora_dropout = 0.0;
    plain.steps = 2;
    plain.output = tmp("dropout-plain");
    Trainer::new(plain.clone(), &Device::Cpu).unwrap().run().unwrap();
    let m = |d: &Path| std::fs::read_to_string(d.join(METRICS_FILE)).unwrap().lines().nth(1).unwrap().to_string();
    let (with, without) = (m(&out), m(&plain.output));
    let loss = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].clone();
    assert_ne!(loss(&with), loss(&without), "dropout 0.1 changed nothing");
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(&plain.output);
}

/// Cached latents are center crops: a latent cache with random_crop or flip is an error.
#[test]
fn latent_cache_refuses_augmentation() {
    for (crop, flip) in [(true, false), (false, true)] {
        let mut cfg = config("cache-aug", true);
        cfg.latent_cache = Some(tmp("no-cache"));
        cfg.random_crop = crop;
        cfg.flip = flip;
        let e = Trainer::new(cfg, &Device::Cpu).err().expect("augmentation with a cache accepted").to_string();
        eprintln!("{e}");
        assert!(e.contains("latent_cache") && e.contains(if crop { "random_crop" } else { "flip" }), "{e}");
    }
    let e = TrainConfig::from_toml("category_weights = \"a=x\"\nmodel = \"m\"\ndata = \"d.jsonl\"")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a number"), "{e}");
}

#[test]
fn half_weights_keep_the_frozen_weights_in_f16_and_train() {
    // LoRA with the frozen base, text encoder and VAE in f16: a new LoRA still starts exactly
    // at ln 2 (policy and reference read the same f16 base), a few steps lower the loss on a
    // fixed batch, and the adapters stay f32; on the CPU and on the GPU under test.
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        let mut cfg = config(&format!("half-{}", dev.is_cpu()), false);
        cfg.objective = ObjectiveKind::Dpo;
        cfg.lr = 2e-3;
        cfg.lora_rank = 8;
        cfg.lora_alpha = 8.0;
        cfg.half_weights = true;
        let mut t = Trainer::new(cfg, &dev).unwrap();
        assert!(t.trainable_params().iter().all(|p| p.storage_dtype() == DType::F32), "adapters stay f32");
        let base = t.sd.unet_params.params();
        assert!(base.iter().all(|p| p.storage_dtype() == DType::F16), "the frozen base is f16 on {dev}");
        assert!(t.sd.text_encoder.params().iter().all(|p| p.storage_dtype() == DType::F16));
        let batch = t.draw_batch(0).unwrap();
        let l0 = t.evaluate_batch(&batch).unwrap().loss;
        assert!((l0 - std::f64::consts::LN_2).abs() < 1e-9, "a new LoRA starts at ln 2 on {dev}, got {l0}");
        for _ in 0..15 {
            t.train_on(std::slice::from_ref(&batch)).unwrap();
        }
        let l1 = t.evaluate_batch(&batch).unwrap().loss;
        assert!(l1 < 0.5 * l0, "half weights on {dev}: loss {l0} -> {l1}: did not fall by half");
    }
}
