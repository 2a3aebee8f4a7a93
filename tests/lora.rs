//! LoRA: the fixture LoRA (PEFT-made, saved by diffusers) applied to the tiny UNet reproduces
//! PEFT's output and equals the merged model; the adapters switch off for the reference pass;
//! a LoRA vipo writes reads back in diffusers' format and equals its merge; the key variants
//! diffusers/PEFT produce load; dropout is seeded and train-only; and `vipo sample --lora`.
mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use vipo::image_io::read_png;
use vipo::models::unet_2d_condition::UNet2DConditionModel;
use vipo::params::ParamStore;
use vipo::pipelines::stable_diffusion::{SampleRequest, StableDiffusion};
use vipo::train::lora::{lora_off, matches_target, unet_linears, Lora, LoraConfig, LoraInit};
use vipo::{Device, Tensor};

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}
fn fixture_lora() -> PathBuf {
    fixtures_root().join("dpo/lora/pytorch_lora_weights.safetensors")
}
fn pipeline_dir() -> PathBuf {
    fixtures_root().join("sd15_tiny_pipeline")
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo-lora-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn base_unet(dev: &Device) -> (UNet2DConditionModel, ParamStore) {
    let (m, s) = UNet2DConditionModel::from_dir(fixtures_root().join("unet_tiny"), dev, None).unwrap();
    s.freeze_all();
    (m, s)
}

/// (name, f32 values, shape).
type Named = (String, Vec<f32>, Vec<usize>);

/// The tensors of a safetensors file in name order, with its metadata.
fn read_file(path: &Path) -> (Vec<Named>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Named> = st
        .iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), Dtype::F32, "{n}");
            let vals = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (n.to_string(), vals, v.shape().to_vec())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, meta.metadata().clone().unwrap_or_default())
}

fn write_file(path: &Path, tensors: &[Named], meta: Option<HashMap<String, String>>) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v, _)| bytemuck_f32(v)).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, _, s), b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The DPO fixture's UNet inputs (batch 4, 16x16).
struct Inputs {
    x: Tensor,
    t: Tensor,
    c: Tensor,
}

fn dpo_inputs(dev: &Device) -> (Inputs, Vec<f32>) {
    let bytes = std::fs::read(fixtures_root().join("dpo/fixtures.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f = |name: &str| -> (Vec<f32>, Vec<usize>) {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::F32, "{name}");
        (v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(), v.shape().to_vec())
    };
    let (x, xs) = f("noisy_model_input");
    let (c, cs) = f("encoder_hidden_states");
    let t = st.tensor("timesteps").unwrap();
    let t: Vec<f32> = t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect();
    let (pred, _) = f("lora.model_pred");
    let inputs = Inputs {
        x: Tensor::from_vec(x, &xs, dev).unwrap(),
        t: Tensor::from_vec([t.clone(), t].concat(), &[4], dev).unwrap(),
        c: Tensor::from_vec([c.clone(), c].concat(), &[2 * cs[0], cs[1], cs[2]], dev).unwrap(),
    };
    (inputs, pred)
}

fn run(unet: &UNet2DConditionModel, i: &Inputs) -> Vec<f32> {
    let _g = vipo::autograd::no_grad();
    unet.forward(&i.x, &i.t, &i.c).unwrap().to_vec().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Sets every B (up) matrix of `lora` to seeded N(0, std^2) values.
fn randomize_up(lora: &Lora, std: f32, seed: u64) {
    for (i, (key, p)) in lora.store.iter().enumerate() {
        if key.ends_with(".lora.up.weight") {
            let v: Vec<f32> = randn(p.numel(), seed + i as u64).iter().map(|x| x * std).collect();
            p.set_value(Tensor::from_vec(v, p.shape(), &p.device()).unwrap()).unwrap();
        }
    }
}

fn fixture_lora_on(dev: &Device) {
    let (inputs, peft_pred) = dpo_inputs(dev);
    let (unet, _store) = base_unet(dev);
    let y_base = run(&unet, &inputs);
    let lora = Lora::load(&unet, fixture_lora()).unwrap();
    assert_eq!(lora.len(), 48);
    assert!(lora.params().is_empty(), "a loaded LoRA is frozen");
    assert_eq!(lora.scale_of("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"), Some(1.0));
    let y_lora = run(&unet, &inputs);
    // PEFT's output with the same adapters (diffusers' UNet, float32)
    assert_close(&format!("LoRA UNet vs PEFT on {dev}"), &y_lora, &peft_pred, 1e-4, 0);
    let effect = rel_err(&y_lora, &y_base);
    eprintln!("{dev}: the fixture LoRA moves the output by {effect:.2e} (relative)");
    assert!(effect > 1e-3, "the LoRA changes the output ({effect:.2e})");
    // Off for the reference pass: the base model, bit for bit.
    {
        let _off = lora_off();
        assert_eq!(bits(&run(&unet, &inputs)), bits(&y_base), "lora_off on {dev}");
    }
    lora.set_enabled(false);
    assert_eq!(bits(&run(&unet, &inputs)), bits(&y_base), "set_enabled(false) on {dev}");
    lora.set_enabled(true);
    // Merged into the weights: the same function.
    lora.merge().unwrap();
    assert!(unet_linears(&unet).iter().all(|(_, l)| l.lora.read().unwrap().is_none()), "merge detaches");
    let y_merged = run(&unet, &inputs);
    assert_close(&format!("merged vs adapters on {dev}"), &y_merged, &y_lora, 1e-5, 0);
}

#[test]
fn fixture_lora_matches_peft_switches_off_and_merges_on_cpu() {
    fixture_lora_on(&Device::Cpu);
}

#[test]
fn fixture_lora_matches_peft_switches_off_and_merges_on_gpu() {
    let Some(g) = gpu() else { return };
    fixture_lora_on(&g);
}

#[test]
fn a_lora_vipo_writes_reads_back_in_diffusers_format_and_equals_its_merge() {
    let cpu = Device::Cpu;
    let (inputs, _) = dpo_inputs(&cpu);
    let (unet, _s) = base_unet(&cpu);
    let mut targets = LoraConfig::default().target_modules;
    targets.push("ff.net.2".into());
    let cfg = LoraConfig { rank: 3, alpha: 6.0, target_modules: targets, seed: 5, ..Default::default() };
    let lora = Lora::new(&unet, &cfg).unwrap();
    assert_eq!(lora.len(), 48 + 6);
    assert_eq!(lora.params().len(), 2 * 54, "A and B train");
    // B = 0 at init (PEFT): the model is unchanged.
    let y_base = {
        let _off = lora_off();
        run(&unet, &inputs)
    };
    assert_eq!(bits(&run(&unet, &inputs)), bits(&y_base), "a new LoRA leaves the output as it was");
    randomize_up(&lora, 0.05, 100);
    let y_adapter = run(&unet, &inputs);
    assert!(rel_err(&y_adapter, &y_base) > 1e-3);

    let dir = tmp_dir("roundtrip");
    let path = lora.save_dir(&dir).unwrap();
    assert_eq!(path.file_name().unwrap(), "pytorch_lora_weights.safetensors");
    let (tensors, meta) = read_file(&path);
    assert_eq!(meta, HashMap::from([("format".to_string(), "pt".to_string())]), "diffusers' metadata");
    assert_eq!(tensors.len(), 2 * 54);
    for (k, v, s) in &tensors {
        assert!(k.starts_with("unet.") && (k.ends_with(".lora.down.weight") || k.ends_with(".lora.up.weight")), "{k}");
        if k.ends_with(".lora.up.weight") {
            // alpha / rank = 2 folded into B, so diffusers (alpha = rank) computes the same.
            let p = lora.store.get(k).unwrap();
            let b: Vec<f32> = p.frozen_value().to_vec().unwrap().iter().map(|x| x * 2.0).collect();
            assert_eq!(v, &b, "{k}");
            assert_eq!(s[1], 3, "{k}: (out, rank)");
        }
    }
    // The fixture's key for the same layer is present verbatim.
    let (fixture_keys, _) = read_file(&fixture_lora());
    let ours: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    for (k, _, _) in &fixture_keys {
        assert!(ours.contains(&k.as_str()), "fixture key {k} missing from vipo's file");
    }
    // Saving twice writes the same bytes.
    let again = dir.join("again.safetensors");
    lora.save(&again).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());

    let (fresh, _s2) = base_unet(&cpu);
    let loaded = Lora::load(&fresh, &path).unwrap();
    assert_eq!(loaded.module_names(), lora.module_names());
    assert_eq!(loaded.scale_of("mid_block.attentions.0.transformer_blocks.0.ff.net.2"), Some(1.0));
    let y_loaded = run(&fresh, &inputs);
    assert_close("read back vs the LoRA that wrote it", &y_loaded, &y_adapter, 1e-5, 0);
    loaded.merge().unwrap();
    let y_merged = run(&fresh, &inputs);
    assert_close("merged vs read back", &y_merged, &y_loaded, 1e-5, 0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn peft_names_alpha_keys_processor_names_and_adapter_metadata_load() {
    let cpu = Device::Cpu;
    let (inputs, _) = dpo_inputs(&cpu);
    let (fixture, _) = read_file(&fixture_lora());
    let dir = tmp_dir("variants");
    let load = |tensors: &[Named], meta: Option<HashMap<String, String>>, name: &str| {
        let p = dir.join(name);
        write_file(&p, tensors, meta);
        let (unet, s) = base_unet(&cpu);
        let lora = Lora::load(&unet, &p);
        (unet, s, lora)
    };
    // Reference: the fixture with B doubled, in diffusers' names (scale 1).
    let doubled: Vec<_> = fixture
        .iter()
        .map(|(k, v, s)| {
            let v = if k.ends_with(".lora.up.weight") { v.iter().map(|x| x * 2.0).collect() } else { v.clone() };
            (k.clone(), v, s.clone())
        })
        .collect();
    let (u, _s, l) = load(&doubled, None, "doubled.safetensors");
    let _l = l.unwrap();
    let want = run(&u, &inputs);

    // PEFT names + `<module>.alpha` = 8 for rank 4: scale 2.
    let mut peft = Vec::new();
    for (k, v, s) in &fixture {
        let m = k.strip_prefix("unet.").unwrap();
        let (m, part) = match m.strip_suffix(".lora.down.weight") {
            Some(m) => (m, "lora_A"),
            None => (m.strip_suffix(".lora.up.weight").unwrap(), "lora_B"),
        };
        peft.push((format!("base_model.model.{m}.{part}.weight"), v.clone(), s.clone()));
        if part == "lora_A" {
            peft.push((format!("base_model.model.{m}.alpha"), vec![8.0], vec![]));
        }
    }
    let (u, _s, l) = load(&peft, None, "peft.safetensors");
    let l = l.unwrap();
    assert_eq!(l.scale_of("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), Some(2.0));
    assert_close("PEFT names with alpha keys", &run(&u, &inputs), &want, 1e-5, 0);

    // diffusers' lora_adapter_metadata (pipeline saver: `unet.`-prefixed fields).
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "lora_adapter_metadata".to_string(),
            r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": false}"#.to_string(),
        ),
    ]);
    let (u, _s, l) = load(&fixture, Some(meta), "meta.safetensors");
    assert_eq!(l.unwrap().scale_of("mid_block.attentions.0.transformer_blocks.0.attn1.to_v"), Some(2.0));
    assert_close("lora_adapter_metadata alpha", &run(&u, &inputs), &want, 1e-5, 0);

    // The older attention-processor names.
    let old: Vec<_> = fixture
        .iter()
        .map(|(k, v, s)| {
            let (head, rest) = k.rsplit_once(".attn").unwrap();
            let (n, rest) = rest.split_once('.').unwrap();
            let (layer, tail) = rest.split_once(".lora.").unwrap();
            let layer = if layer == "to_out.0" { "to_out".to_string() } else { layer.to_string() };
            (format!("{head}.attn{n}.processor.{layer}_lora.{tail}"), v.clone(), s.clone())
        })
        .collect();
    assert!(old[0].0.contains(".processor.to_k_lora.down.weight"), "{}", old[0].0);
    let (u, _s, l) = load(&old, None, "old.safetensors");
    let _l = l.unwrap();
    let (u2, _s2, l2) = load(&fixture, None, "plain.safetensors");
    let _l2 = l2.unwrap();
    assert_eq!(bits(&run(&u, &inputs)), bits(&run(&u2, &inputs)), "processor names = diffusers names");

    // Errors name the key or the layer.
    let err = |tensors: Vec<Named>, name: &str| -> String { load(&tensors, None, name).2.expect_err(name).to_string() };
    let mut bad = fixture.clone();
    bad[0].0 = bad[0].0.replace("down_blocks.0", "down_blocks.7");
    let e = err(bad, "unknown.safetensors");
    assert!(e.contains("down_blocks.7") && e.contains("unknown.safetensors"), "{e}");
    let mut bad = fixture.clone();
    bad[0].1.truncate(4 * 16);
    bad[0].2 = vec![4, 16];
    let e = err(bad, "shape.safetensors");
    assert!(
        e.contains(fixture[0].0.trim_start_matches("unet.").split(".lora").next().unwrap()) && e.contains("[4, 16]"),
        "{e}"
    );
    let mut bad = fixture.clone();
    bad.push((
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight".into(),
        vec![1.0; 4],
        vec![1, 4],
    ));
    let e = err(bad, "te.safetensors");
    assert!(e.contains("text-encoder"), "{e}");
    let e = err(fixture[..1].to_vec(), "half.safetensors");
    assert!(e.contains("only one of its two"), "{e}");
    let e = err(vec![("unet.conv_in.weight".into(), vec![1.0; 4], vec![4])], "notlora.safetensors");
    assert!(e.contains("unet.conv_in.weight"), "{e}");

    // One adapter per layer: a second LoRA on the same layers is refused.
    let (unet, _s) = base_unet(&cpu);
    let _first = Lora::load(&unet, fixture_lora()).unwrap();
    let e = Lora::load(&unet, fixture_lora()).unwrap_err().to_string();
    assert!(e.contains("already has an adapter"), "{e}");
    // The fixture LoRA (width 32) on the SD1.5 tiny pipeline's UNet (width 8): a shape error.
    let (small, _s) = UNet2DConditionModel::from_dir(pipeline_dir().join("unet"), &cpu, None).unwrap();
    let e = Lora::load(&small, fixture_lora()).unwrap_err().to_string();
    assert!(e.contains("do not fit") || e.contains("no layer"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn targets_match_like_peft_and_bad_configs_are_errors() {
    let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(matches_target("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", &t(&["to_q"])));
    assert!(matches_target("a.attn2.to_out.0", &t(&["to_out.0"])));
    assert!(!matches_target("a.attn2.to_out.0", &t(&["out.0x"])));
    assert!(!matches_target("a.attn2.xto_q", &t(&["to_q"])), "whole name parts only");
    assert!(matches_target("a.attn2.to_k", &t(&["attn2.to_k"])));
    let cpu = Device::Cpu;
    let (unet, _s) = base_unet(&cpu);
    let count = |targets: &[&str]| {
        let l = Lora::new(&unet, &LoraConfig { target_modules: t(targets), ..Default::default() }).unwrap();
        let n = l.len();
        l.detach();
        n
    };
    assert_eq!(count(&["to_q"]), 12);
    assert_eq!(count(&["attn2.to_k"]), 6);
    assert_eq!(count(&["ff.net.0.proj", "ff.net.2"]), 12);
    let e = Lora::new(&unet, &LoraConfig { target_modules: t(&["conv1"]), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("match no layer"), "{e}");
    for bad in [
        LoraConfig { rank: 0, ..Default::default() },
        LoraConfig { alpha: -1.0, ..Default::default() },
        LoraConfig { dropout: 1.0, ..Default::default() },
    ] {
        assert!(Lora::new(&unet, &bad).is_err(), "{bad:?}");
    }
    // PEFT's inits: A ~ U(+-1/sqrt(in)) (kaiming_uniform a=sqrt 5) or N(0, 1/r^2); B = 0.
    for (init, check) in [(LoraInit::KaimingUniform, 0), (LoraInit::Gaussian, 1)] {
        let l = Lora::new(&unet, &LoraConfig { init, rank: 8, target_modules: t(&["to_q"]), ..Default::default() })
            .unwrap();
        let a = l.store.get("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight").unwrap();
        let v = a.frozen_value().to_vec().unwrap();
        let bound = 1.0 / (a.shape()[1] as f32).sqrt();
        if check == 0 {
            assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|x| x.abs() > 0.5 * bound));
        } else {
            let sd = (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
            assert!((sd - 0.125).abs() < 0.03, "std {sd}");
        }
        let b = l.store.get("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight").unwrap();
        assert!(b.frozen_value().to_vec().unwrap().iter().all(|&x| x == 0.0));
        l.detach();
    }
}

#[test]
fn dropout_is_seeded_train_only_and_differentiable() {
    let cpu = Device::Cpu;
    let (inputs, _) = dpo_inputs(&cpu);
    let (unet, _s) = base_unet(&cpu);
    let cfg = LoraConfig { dropout: 0.5, seed: 9, ..Default::default() };
    let outputs = |train: bool| {
        let l = Lora::new(&unet, &cfg).unwrap();
        randomize_up(&l, 0.05, 7);
        l.train(train);
        let y1 = run(&unet, &inputs);
        let y2 = run(&unet, &inputs);
        l.detach();
        (y1, y2)
    };
    let (e1, e2) = outputs(false);
    assert_eq!(bits(&e1), bits(&e2), "eval mode: no dropout");
    let (t1, t2) = outputs(true);
    assert!(rel_err(&t1, &e1) > 1e-4 && rel_err(&t2, &t1) > 1e-4, "train mode drops out, a new mask per call");
    let (r1, r2) = outputs(true);
    assert_eq!((bits(&r1), bits(&r2)), (bits(&t1), bits(&t2)), "the same seed gives the same masks");
    // Gradients flow to A and B through the dropped-out input.
    let l = Lora::new(&unet, &cfg).unwrap();
    randomize_up(&l, 0.05, 7);
    l.train(true);
    let y = unet.forward(&inputs.x, &inputs.t, &inputs.c).unwrap();
    y.square().unwrap().mean_all().unwrap().backward().unwrap();
    assert!(l.params().iter().all(|p| p.grad().is_some_and(|g| g.to_vec().unwrap().iter().any(|&x| x != 0.0))));
    l.detach();
}

// ---------------------------------------------------------------------------------------------
// vipo sample --lora
// ---------------------------------------------------------------------------------------------

const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

fn sample_cli(out: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
        .args(["--device", "cpu", "sample", "--model"])
        .arg(pipeline_dir())
        .args(["--prompt", PROMPT, "--steps", "4", "--width", "64", "--height", "64", "--latents"])
        .arg(pipeline_dir().join("init_latents/case0.safetensors"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn vipo_sample_applies_a_lora() {
    // The fixture LoRA is for the 32-wide DPO UNet; the pipeline's UNet is 8 wide, so the CLI
    // gets a LoRA vipo makes for it (and must refuse the fixture's).
    let cpu = Device::Cpu;
    let dir = tmp_dir("cli");
    let (unet, _s) = UNet2DConditionModel::from_dir(pipeline_dir().join("unet"), &cpu, None).unwrap();
    let lora = Lora::new(&unet, &LoraConfig { rank: 2, alpha: 1.0, seed: 4, ..Default::default() }).unwrap();
    randomize_up(&lora, 1.0, 50);
    let file = lora.save_dir(&dir).unwrap();
    let file_s = file.to_str().unwrap();

    let png = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let o = sample_cli(&out, extra);
        assert!(o.status.success(), "vipo sample {extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        read_png(&out).unwrap()
    };
    let (base, _) = png("base.png", &[]);
    let (zero, _) = png("zero.png", &["--lora", file_s, "--lora-scale", "0"]);
    assert_eq!(zero.data, base.data, "--lora-scale 0 is the base model");
    let (half, params) = png("half.png", &["--lora", file_s, "--lora-scale", "0.5"]);
    let changed = half.data.iter().zip(&base.data).filter(|(a, b)| a.abs_diff(**b) > 2).count();
    eprintln!("--lora at 0.5 changes {changed} of {} bytes", base.data.len());
    assert!(changed > base.data.len() / 20, "the LoRA changes the image ({changed} bytes)");
    assert!(params.unwrap().contains("Lora: pytorch_lora_weights.safetensors (0.5)"));

    // The same as the library: load, scale 0.5, merge, sample.
    let sd = StableDiffusion::from_dir(pipeline_dir(), &cpu, None).unwrap();
    let l = Lora::load(&sd.unet, &file).unwrap();
    l.set_multiplier(0.5);
    l.merge().unwrap();
    let bytes = std::fs::read(pipeline_dir().join("init_latents/case0.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(st.names()[0]).unwrap();
    let lat: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let req = SampleRequest {
        prompt: PROMPT.into(),
        steps: 4,
        width: 64,
        height: 64,
        latents: Some(Tensor::from_vec(lat, v.shape(), &cpu).unwrap()),
        ..SampleRequest::default()
    };
    let out = sd.sample(&req, |_, _| {}, false).unwrap();
    let img = &vipo::image_io::images_from_decoded(&out.decoded).unwrap()[0];
    assert_eq!(img.data, half.data, "CLI = library");

    // Bad LoRAs fail in one line naming what is wrong; --lora-scale needs --lora.
    let o = sample_cli(&dir.join("x.png"), &["--lora", fixture_lora().to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("pytorch_lora_weights.safetensors") && (e.contains("do not fit") || e.contains("no layer")),
        "{e}"
    );
    let o = sample_cli(&dir.join("x.png"), &["--lora-scale", "0.5"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lora"));
    std::fs::remove_dir_all(&dir).ok();
}
