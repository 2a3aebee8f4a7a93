//! Pixel-space pipelines: a diffusers folder without a VAE (`"vae": [null, null]`, no `vae/`),
//! whose UNet denoises 3-channel images directly. Built here from the tiny SD1.5 fixture's
//! tokenizer, text encoder and scheduler plus a randomly initialised 3-in/3-out UNet: it loads,
//! samples (CPU and GPU), trains (DPO + LoRA), runs through `vipo sample`, and a folder that names
//! a VAE it lacks still fails. Also the seeded random-init constructors of the UNet and CLIP.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use vipo::image_io::{read_png, write_png, RgbImage};
use vipo::models::clip_text::{ClipTextConfig, ClipTextModel};
use vipo::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use vipo::params::ParamStore;
use vipo::pipelines::stable_diffusion::{SampleRequest, StableDiffusion};
use vipo::tensor::DType;
use vipo::train::config::{FinetuneKind, ObjectiveKind, TrainConfig};
use vipo::train::trainer::Trainer;
use vipo::{Device, Tensor};

/// GPU against CPU after 3 DDIM steps of a random UNet: max |gpu - cpu| / max |cpu|. Kernels
/// sum in another order than the CPU (lavapipe measured 8.5e-7); 1e-4 is the fixtures' f32 bound.
const GPU_TOL: f64 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sd15_tiny_pipeline")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo-pixel-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The fixture UNet's config with 3 input and output channels.
fn pixel_unet_config() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("unet/config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["in_channels"] = 3.into();
    cfg["out_channels"] = 3.into();
    cfg
}

/// A pixel-space pipeline folder under the temp dir: `vae` is model_index.json's entry (None:
/// no key), `unet` the UNet config; the UNet's weights are random with seed 11.
fn pixel_folder(name: &str, vae: Option<serde_json::Value>, unet: &serde_json::Value) -> PathBuf {
    let dir = tmp(name);
    for part in ["tokenizer", "text_encoder", "scheduler"] {
        copy_dir(&fixture().join(part), &dir.join(part));
    }
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    std::fs::write(dir.join("unet/config.json"), serde_json::to_string_pretty(unet).unwrap()).unwrap();
    let cfg = UNet2DConditionConfig::from_file(dir.join("unet/config.json")).unwrap();
    let (_, store) = UNet2DConditionModel::init_params(&cfg, 11, &Device::Cpu).unwrap();
    store.save_safetensors(dir.join("unet/diffusion_pytorch_model.safetensors"), DType::F32).unwrap();
    let text = std::fs::read_to_string(fixture().join("model_index.json")).unwrap();
    let mut index: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = index.as_object_mut().unwrap();
    match vae {
        Some(v) => map.insert("vae".into(), v),
        None => map.remove("vae"),
    };
    std::fs::write(dir.join("model_index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    dir
}

fn null_vae() -> Option<serde_json::Value> {
    Some(serde_json::json!([null, null]))
}

fn saved_bytes(store: &ParamStore, dir: &Path, name: &str) -> Vec<u8> {
    let path = dir.join(name);
    store.save_safetensors(&path, DType::F32).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn random_init_is_seeded_finite_and_loads_back() {
    let dir = tmp("init");
    std::fs::write(dir.join("config.json"), serde_json::to_string(&pixel_unet_config()).unwrap()).unwrap();
    let cfg = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
    let (unet, store) = UNet2DConditionModel::init_params(&cfg, 1, &Device::Cpu).unwrap();
    let (_, again) = UNet2DConditionModel::init_params(&cfg, 1, &Device::Cpu).unwrap();
    let (_, other) = UNet2DConditionModel::init_params(&cfg, 2, &Device::Cpu).unwrap();
    let a = saved_bytes(&store, &dir, "diffusion_pytorch_model.safetensors");
    assert_eq!(a, saved_bytes(&again, &dir, "again.safetensors"), "same seed, different UNet weights");
    assert_ne!(a, saved_bytes(&other, &dir, "other.safetensors"), "another seed gave the same UNet weights");
    // Every key the fixture's (4-channel) UNet has, except the channel count of conv_in/conv_out.
    let fixture_store =
        ParamStore::load_safetensors(fixture().join("unet/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        store.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        fixture_store.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    assert!(store.iter().all(|(_, p)| p.is_trainable()));
    let vals = |k: &str| store.get(k).unwrap().value().to_vec().unwrap();
    assert!(vals("conv_norm_out.weight").iter().all(|&v| v == 1.0));
    assert!(vals("conv_norm_out.bias").iter().all(|&v| v == 0.0));
    let conv = vals("conv_in.weight"); // (8, 3, 3, 3): bound 1/sqrt(27)
    assert!(conv.iter().all(|v| v.abs() <= 1.0 / 27f32.sqrt()) && conv.iter().any(|&v| v != 0.0));
    let lin = vals("time_embedding.linear_1.weight");
    let std = (lin.iter().map(|v| v * v).sum::<f32>() / lin.len() as f32).sqrt();
    assert!((0.01..0.03).contains(&std), "linear init std {std}");

    // Finite outputs, and the saved weights load back to the same model.
    let x = Tensor::from_vec(randn(2 * 3 * 16 * 16, 3), &[2, 3, 16, 16], &Device::Cpu).unwrap();
    let t = Tensor::from_vec(vec![10.0, 500.0], &[2], &Device::Cpu).unwrap();
    let ctx = Tensor::from_vec(randn(2 * 77 * 8, 4), &[2, 77, 8], &Device::Cpu).unwrap();
    let y = unet.forward(&x, &t, &ctx).unwrap().to_vec().unwrap();
    assert!(y.iter().all(|v| v.is_finite()) && y.iter().any(|&v| v != 0.0));
    std::fs::remove_file(dir.join("again.safetensors")).unwrap();
    std::fs::remove_file(dir.join("other.safetensors")).unwrap();
    let (loaded, _) = UNet2DConditionModel::from_dir(&dir, &Device::Cpu, None).unwrap();
    assert_eq!(loaded.forward(&x, &t, &ctx).unwrap().to_vec().unwrap(), y);

    // The text encoder: the fixture's config, keys under `text_model.` like real checkpoints.
    let tcfg = ClipTextConfig::from_file(fixture().join("text_encoder/config.json")).unwrap();
    let (clip, tstore) = ClipTextModel::init_params(&tcfg, 5, &Device::Cpu).unwrap();
    let (_, tagain) = ClipTextModel::init_params(&tcfg, 5, &Device::Cpu).unwrap();
    let (_, tother) = ClipTextModel::init_params(&tcfg, 6, &Device::Cpu).unwrap();
    let tdir = dir.join("text_encoder");
    std::fs::create_dir_all(&tdir).unwrap();
    let b = saved_bytes(&tstore, &tdir, "model.safetensors");
    assert_eq!(b, saved_bytes(&tagain, &dir, "t-again.safetensors"), "same seed, different CLIP weights");
    assert_ne!(b, saved_bytes(&tother, &dir, "t-other.safetensors"), "another seed gave the same CLIP weights");
    assert_eq!(clip.prefix, "text_model");
    assert_eq!(clip.params().len(), tstore.len());
    let fixture_clip =
        ParamStore::load_safetensors(fixture().join("text_encoder/model.safetensors"), &Device::Cpu).unwrap();
    let keys = |s: &ParamStore| s.iter().map(|(k, p)| (k.to_string(), p.shape().to_vec())).collect::<Vec<_>>();
    assert_eq!(keys(&tstore), keys(&fixture_clip));
    let ids: Vec<u32> = (0..77).map(|i| (i * 37 % 1000) as u32).collect();
    let out = clip.forward(std::slice::from_ref(&ids)).unwrap().last_hidden_state.to_vec().unwrap();
    assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|&v| v != 0.0));
    std::fs::copy(fixture().join("text_encoder/config.json"), tdir.join("config.json")).unwrap();
    let loaded = ClipTextModel::from_dir(&tdir, &Device::Cpu).unwrap();
    assert_eq!(loaded.forward(&[ids]).unwrap().last_hidden_state.to_vec().unwrap(), out);
    let _ = std::fs::remove_dir_all(&dir);
}

fn request(width: usize, height: usize) -> SampleRequest {
    SampleRequest {
        prompt: "a red square on a blue background".into(),
        negative_prompt: Some("green".into()),
        steps: 3,
        guidance: 4.0,
        seed: 9,
        width,
        height,
        batch: 2,
        ..SampleRequest::default()
    }
}

#[test]
fn pixel_space_pipeline_loads_and_samples_on_cpu_and_gpu() {
    let dir = pixel_folder("sample", null_vae(), &pixel_unet_config());
    let sd = StableDiffusion::from_dir(&dir, &Device::Cpu, None).unwrap();
    assert!(sd.is_pixel_space() && sd.vae.is_none());
    assert_eq!((sd.vae_scale_factor(), sd.size_multiple()), (1, 8));
    let out = sd.sample(&request(16, 16), |_, _| {}, true).unwrap();
    assert_eq!(out.latents.shape(), &[2, 3, 16, 16]);
    assert_eq!(out.decoded.shape(), &[2, 3, 16, 16]);
    let decoded = out.decoded.to_vec().unwrap();
    assert_eq!(decoded, out.latents.to_vec().unwrap(), "pixel space: decoded must be the final latents");
    assert!(decoded.iter().all(|v| v.is_finite()));
    assert_eq!(out.steps.len(), 3);
    // A non-square size, and the helpers' identities.
    assert_eq!(sd.sample(&request(24, 16), |_, _| {}, false).unwrap().decoded.shape(), &[2, 3, 16, 24]);
    assert_eq!(sd.decode_latents(&out.latents).unwrap().to_vec().unwrap(), decoded);
    let mut rng = vipo::rng::Rng::new(1);
    assert_eq!(sd.encode_pixels(&out.latents, &mut rng).unwrap().to_vec().unwrap(), decoded);
    assert_eq!(rng.next_u64(), vipo::rng::Rng::new(1).next_u64(), "pixel space drew encoder noise");
    // Sizes the UNet cannot halve 3 times, and latents of the wrong shape.
    let e = sd.sample(&request(12, 16), |_, _| {}, false).err().unwrap().to_string();
    assert!(e.contains("multiples of 8") && e.contains("12x16"), "{e}");
    let bad = Tensor::zeros(&[2, 4, 2, 2], &Device::Cpu).unwrap();
    let e = sd.sample(&SampleRequest { latents: Some(bad), ..request(16, 16) }, |_, _| {}, false).err().unwrap();
    assert!(e.to_string().contains("[2, 3, 16, 16]"), "{e}");
    // The weights' bytes count only the UNet and the text encoder.
    let te: usize = sd.text_encoder.params().iter().map(|p| p.numel() * 4).sum();
    assert_eq!(sd.weight_bytes(), te + sd.unet_params.num_params() * 4);
    sd.freeze_weights_as(DType::F16).unwrap();
    assert_eq!(sd.weight_bytes(), (te + sd.unet_params.num_params() * 4) / 2);

    if let Some(g) = gpu() {
        let sdg = StableDiffusion::from_dir(&dir, &g, None).unwrap();
        let got = sdg.sample(&request(16, 16), |_, _| {}, false).unwrap();
        assert_eq!(got.decoded.shape(), &[2, 3, 16, 16]);
        let got = got.decoded.to_vec().unwrap();
        eprintln!("pixel-space sample gpu vs cpu: rel err {:.2e}", rel_err(&got, &decoded));
        assert_close("pixel-space sample gpu vs cpu", &got, &decoded, GPU_TOL, 9);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_vae_entry_loads_and_a_named_vae_without_its_folder_fails() {
    let unet = pixel_unet_config();
    // No `vae` key at all: pixel space too.
    let dir = pixel_folder("no-key", None, &unet);
    assert!(StableDiffusion::from_dir(&dir, &Device::Cpu, None).unwrap().is_pixel_space());
    let _ = std::fs::remove_dir_all(&dir);

    let dir = pixel_folder("named", Some(serde_json::json!(["diffusers", "AutoencoderKL"])), &unet);
    let e = StableDiffusion::from_dir(&dir, &Device::Cpu, None).err().unwrap().to_string();
    assert!(e.contains(&dir.join("vae").display().to_string()) && e.contains("missing component folder"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);

    // A latent-sized UNet with no VAE to decode its output.
    let mut four = unet.clone();
    four["in_channels"] = 4.into();
    four["out_channels"] = 4.into();
    let dir = pixel_folder("four", null_vae(), &four);
    let e = StableDiffusion::from_dir(&dir, &Device::Cpu, None).err().unwrap().to_string();
    assert!(e.contains("unet") && e.contains("config.json") && e.contains("in_channels = 4"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two preference pairs of flat-coloured 20x18 PNGs (resized and cropped to the resolution).
fn write_pairs(dir: &Path) -> PathBuf {
    let img = |r: u8, g: u8, b: u8| RgbImage {
        width: 20,
        height: 18,
        data: (0..20 * 18).flat_map(|i| [r, g.wrapping_add((i % 20) as u8 * 4), b]).collect(),
    };
    let mut lines = Vec::new();
    for (i, (w, l)) in [((200, 20, 20), (20, 20, 200)), ((20, 200, 20), (120, 120, 120))].into_iter().enumerate() {
        write_png(&dir.join(format!("{i}_w.png")), &img(w.0, w.1, w.2), None).unwrap();
        write_png(&dir.join(format!("{i}_l.png")), &img(l.0, l.1, l.2), None).unwrap();
        lines.push(format!(r#"{{"prompt": "pair {i}", "chosen": "{i}_w.png", "rejected": "{i}_l.png"}}"#));
    }
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn dpo_with_lora_trains_on_pixels() {
    let dir = pixel_folder("train", null_vae(), &pixel_unet_config());
    let data = write_pairs(&dir);
    let cfg = TrainConfig {
        model: dir.clone(),
        data,
        objective: ObjectiveKind::Dpo,
        finetune: FinetuneKind::Lora,
        resolution: 16,
        batch: 2,
        lr: 1e-3,
        steps: 2,
        checkpoint_every: 2,
        seed: 3,
        validation_prompts: vec!["pair 0".into()],
        validation_steps: 2,
        output: dir.join("run"),
        device: "cpu".into(),
        ..Default::default()
    };
    let mut t = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let s = t.run().unwrap();
    let m = s.last.unwrap();
    assert_eq!(s.steps, 2);
    assert!(m.loss.is_finite() && m.grad_norm > 0.0, "{m:?}");
    let (img, _) = read_png(&t.validate().unwrap()).unwrap();
    assert_eq!((img.width, img.height), (16, 16));

    // Nothing to cache without a VAE: a clear error, not a missing-folder one.
    let cache = TrainConfig { latent_cache: Some(dir.join("cache")), output: dir.join("run2"), ..cfg };
    let e = Trainer::new(cache, &Device::Cpu).err().unwrap();
    assert!(matches!(e, vipo::Error::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("nothing to cache"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vipo_sample_and_dry_run_take_a_pixel_folder() {
    let dir = pixel_folder("cli", null_vae(), &pixel_unet_config());
    let bin = env!("CARGO_BIN_EXE_vipo");
    let out = dir.join("x.png");
    let o = std::process::Command::new(bin)
        .args(["--device", "cpu", "sample", "--model"])
        .arg(&dir)
        .args(["--prompt", "a red square", "--steps", "2", "--width", "16", "--height", "16", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (img, text) = read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (16, 16));
    assert!(text.is_some_and(|t| t.contains("Size: 16x16")));

    let o = std::process::Command::new(bin)
        .args(["--device", "cpu", "sample", "--dry-run", "--prompt", "p", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    // The UNet's sample_size (8) is the default size: no VAE factor.
    assert!(text.contains("8x8 px") && text.contains("VAE decode none (pixel space)"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
