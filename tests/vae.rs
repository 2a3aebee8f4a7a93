//! `AutoencoderKL` against diffusers: `../shared/fixtures/vae_tiny/` (encoder posterior, a sample,
//! decodes and per-block intermediates) and the VAE of `../shared/fixtures/sd15_tiny_pipeline/`
//! (its f32 and fp16 files decoding the pipeline's final latents), on the CPU and the GPU.
mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use vipo::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use vipo::params::ParamStore;
use vipo::{Device, Tensor};

/// Against diffusers' float32 outputs (and float64 ones): the fixtures allow ~1e-4 for summation
/// order; CPU and lavapipe land within 4e-6, so 2e-5 still catches e.g. a wrong norm eps.
const TOL: f64 = 2e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}
fn tiny_dir() -> PathBuf {
    fixtures().join("vae_tiny")
}
fn sd15_dir() -> PathBuf {
    fixtures().join("sd15_tiny_pipeline")
}

/// Every float tensor of a safetensors file as f32 values and a shape.
fn read_tensors(path: &Path) -> HashMap<String, (Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let b = view.data();
        let v: Vec<f32> = match view.dtype() {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => continue,
        };
        out.insert(name, (v, view.shape().to_vec()));
    }
    out
}

struct Fx(HashMap<String, (Vec<f32>, Vec<usize>)>);

impl Fx {
    fn vals(&self, name: &str) -> &[f32] {
        &self.0.get(name).unwrap_or_else(|| panic!("no fixture tensor `{name}`")).0
    }
    fn tensor(&self, name: &str, dev: &Device) -> Tensor {
        let (v, s) = self.0.get(name).unwrap_or_else(|| panic!("no fixture tensor `{name}`"));
        Tensor::from_slice(v, s, dev).unwrap()
    }
}

fn tiny_fx() -> Fx {
    Fx(read_tensors(&tiny_dir().join("fixtures.safetensors")))
}

fn check(what: &str, got: &Tensor, want: &[f32], tol: f64) -> f64 {
    let g = got.to_vec().unwrap();
    assert_close(what, &g, want, tol, 0);
    let e = rel_err(&g, want);
    eprintln!("  {what}: rel err {e:.2e}");
    e
}

/// A scratch folder per test and process, emptied first.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo_vae_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Encoder posterior, sample, both decodes and every stored intermediate on `dev`.
fn tiny_against_diffusers(dev: &Device) {
    let _ng = vipo::autograd::no_grad();
    let fx = tiny_fx();
    let vae = AutoencoderKL::from_dir(tiny_dir(), dev, None).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    let x = fx.tensor("x", dev);
    let dist = vae.encode(&x).unwrap();
    assert_eq!(dist.mean.shape(), &[2, 4, 16, 16]);
    check("mean", &dist.mean, fx.vals("mean"), TOL);
    check("logvar", &dist.logvar, fx.vals("logvar"), TOL);
    check("mean vs f64", &dist.mean, fx.vals("mean_f64"), TOL);
    check("logvar vs f64", &dist.logvar, fx.vals("logvar_f64"), TOL);
    check("std", &dist.std().unwrap(), fx.vals("std"), TOL);
    let sample = dist.sample(&fx.tensor("eps", dev)).unwrap();
    check("latent_sample", &sample, fx.vals("latent_sample"), TOL);
    let decoded = vae.decode(&fx.tensor("z", dev)).unwrap();
    assert_eq!(decoded.shape(), &[2, 3, 32, 32]);
    check("decoded", &decoded, fx.vals("decoded"), TOL);
    check("decoded vs f64", &decoded, fx.vals("decoded_f64"), TOL);
    check("decoded_of_mean", &vae.decode(&dist.mean).unwrap(), fx.vals("decoded_of_mean"), TOL);

    // The latent helpers are the same maths with the scaling factor around it.
    let s = vae.scaling_factor();
    let lat = vae.latents_from_image(&x, Some(&fx.tensor("eps", dev))).unwrap();
    let want: Vec<f32> = fx.vals("latent_sample").iter().map(|v| v * s).collect();
    check("latents_from_image", &lat, &want, TOL);
    let img = vae.image_from_latents(&fx.tensor("z", dev).mul_scalar(s).unwrap()).unwrap();
    check("image_from_latents", &img, fx.vals("decoded"), TOL);

    // Intermediates (batch element 0), block by block, to localise a mismatch.
    let it = |name: &str| fx.vals(&format!("intermediate.{name}")).to_vec();
    let e = &vae.encoder;
    let mut h = e.conv_in.forward(&x.slice(0, 0, 1).unwrap()).unwrap();
    check("encoder.conv_in", &h, &it("encoder.conv_in"), TOL);
    for (i, b) in e.down_blocks.iter().enumerate() {
        h = b.forward(&h).unwrap();
        check(&format!("encoder.down_blocks.{i}"), &h, &it(&format!("encoder.down_blocks.{i}")), TOL);
    }
    h = e.mid_block.forward(&h).unwrap();
    check("encoder.mid_block", &h, &it("encoder.mid_block"), TOL);
    h = e.conv_out.forward(&e.conv_norm_out.forward(&h).unwrap().silu().unwrap()).unwrap();
    check("encoder.conv_out", &h, &it("encoder.conv_out"), TOL);
    h = vae.quant_conv.as_ref().unwrap().forward(&h).unwrap();
    check("quant_conv", &h, &it("quant_conv"), TOL);

    let d = &vae.decoder;
    let mut h = vae.post_quant_conv.as_ref().unwrap().forward(&fx.tensor("z", dev).slice(0, 0, 1).unwrap()).unwrap();
    check("post_quant_conv", &h, &it("post_quant_conv"), TOL);
    h = d.conv_in.forward(&h).unwrap();
    check("decoder.conv_in", &h, &it("decoder.conv_in"), TOL);
    h = d.mid_block.forward(&h).unwrap();
    check("decoder.mid_block", &h, &it("decoder.mid_block"), TOL);
    for (i, b) in d.up_blocks.iter().enumerate() {
        h = b.forward(&h).unwrap();
        check(&format!("decoder.up_blocks.{i}"), &h, &it(&format!("decoder.up_blocks.{i}")), TOL);
    }
    h = d.conv_out.forward(&d.conv_norm_out.forward(&h).unwrap().silu().unwrap()).unwrap();
    check("decoder.conv_out", &h, &it("decoder.conv_out"), TOL);
}

#[test]
fn tiny_vae_matches_diffusers_on_cpu() {
    tiny_against_diffusers(&Device::Cpu);
}

#[test]
fn tiny_vae_matches_diffusers_on_gpu() {
    if let Some(g) = gpu() {
        tiny_against_diffusers(&g);
    }
}

/// The pipeline's final latents of every case and run, as one batch (B, 4, 8, 8), and the names.
fn pipeline_latents(exp: &Fx, prefix: &str, dev: &Device) -> (Tensor, Vec<String>) {
    let mut names = Vec::new();
    let mut ts = Vec::new();
    for case in ["case0", "case1"] {
        for run in ["ddim10", "euler8"] {
            let n = format!("{prefix}{case}.{run}");
            ts.push(exp.tensor(&format!("{n}.final_latents"), dev));
            names.push(n);
        }
    }
    (Tensor::concat(&ts.iter().collect::<Vec<_>>(), 0).unwrap(), names)
}

/// `(image / 2 + 0.5).clamp(0, 1)` in NHWC: what the pipeline returns with `output_type='np'`.
fn postprocess(img: &Tensor) -> Tensor {
    img.affine(0.5, 0.5).unwrap().clamp(0.0, 1.0).unwrap().permute(&[0, 2, 3, 1]).unwrap()
}

/// The SD1.5-shaped VAE (4 levels, factor 8, 2 layers per block) decodes the pipeline's final
/// latents like diffusers, from the f32 files and from the fp16 variant.
fn sd15_vae_decodes_pipeline_latents(dev: &Device) {
    let _ng = vipo::autograd::no_grad();
    let dir = sd15_dir().join("vae");
    let exp = Fx(read_tensors(&sd15_dir().join("expected.safetensors")));
    let vae = AutoencoderKL::from_dir(&dir, dev, None).unwrap();
    assert_eq!(vae.config.block_out_channels, [8, 8, 16, 16]);
    let (lat, names) = pipeline_latents(&exp, "", dev);
    let img = vae.image_from_latents(&lat).unwrap();
    assert_eq!(img.shape(), &[4, 3, 64, 64]);
    for (i, n) in names.iter().enumerate() {
        check(&format!("{n}.image_raw"), &img.slice(0, i, 1).unwrap(), exp.vals(&format!("{n}.image_raw")), TOL);
    }

    // fp16 weights (widened to f32) decode the fp16 pipeline's latents like diffusers does.
    let vae16 = AutoencoderKL::from_dir(&dir, dev, Some("fp16")).unwrap();
    let (lat16, names16) = pipeline_latents(&exp, "fp16w.", dev);
    let img16 = postprocess(&vae16.image_from_latents(&lat16).unwrap());
    for (i, n) in names16.iter().enumerate() {
        check(&format!("{n}.image"), &img16.slice(0, i, 1).unwrap(), exp.vals(&format!("{n}.image")), TOL);
    }

    // The same latents through both files differ by f16 rounding of the weights only.
    let a = vae.decode(&lat).unwrap().to_vec().unwrap();
    let b = vae16.decode(&lat).unwrap().to_vec().unwrap();
    let e = rel_err(&b, &a);
    eprintln!("  fp16 vs f32 weights, same latents: rel err {e:.2e}");
    assert!(e > 0.0 && e < 5e-3, "fp16 vs f32 decode: rel err {e:.2e} (expected f16 rounding: (0, 5e-3))");
}

#[test]
fn sd15_vae_decodes_pipeline_latents_on_cpu() {
    sd15_vae_decodes_pipeline_latents(&Device::Cpu);
}

#[test]
fn sd15_vae_decodes_pipeline_latents_on_gpu() {
    if let Some(g) = gpu() {
        sd15_vae_decodes_pipeline_latents(&g);
    }
}

#[test]
fn fp16_variant_holds_the_f32_weights_rounded() {
    let dir = sd15_dir().join("vae");
    let v32 = AutoencoderKL::from_dir(&dir, &Device::Cpu, None).unwrap();
    let v16 = AutoencoderKL::from_dir(&dir, &Device::Cpu, Some("fp16")).unwrap();
    assert_eq!(v32.store().len(), v16.store().len());
    for (k, p) in v32.store().iter() {
        let want: Vec<f32> =
            p.frozen_value().to_vec().unwrap().iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let got = v16.store().get(k).unwrap().frozen_value().to_vec().unwrap();
        assert_eq!(got, want, "`{k}`: fp16 variant is not the f32 weight rounded to f16");
    }
}

fn tiny_config_json() -> serde_json::Value {
    let text = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn config_parses_real_files_and_rejects_unsupported_values() {
    let c = AutoencoderKLConfig::from_file(tiny_dir().join("config.json")).unwrap();
    assert_eq!(c.block_out_channels, [32, 64]);
    assert_eq!((c.layers_per_block, c.latent_channels, c.norm_num_groups), (1, 4, 8));
    assert_eq!(c.shift_factor, None);
    assert!(c.mid_block_add_attention && c.force_upcast && c.use_quant_conv && c.use_post_quant_conv);
    let c = AutoencoderKLConfig::from_file(sd15_dir().join("vae/config.json")).unwrap();
    assert_eq!(c.down_block_types.len(), 4);

    // Unknown keys are ignored; absent optional ones take diffusers' defaults.
    let mut v = tiny_config_json();
    v["some_future_option"] = serde_json::json!([1, 2]);
    v.as_object_mut().unwrap().remove("mid_block_add_attention");
    v.as_object_mut().unwrap().remove("use_quant_conv");
    let c = AutoencoderKLConfig::from_json(&v.to_string()).unwrap();
    assert!(c.mid_block_add_attention && c.use_quant_conv);

    let cases: [(&str, serde_json::Value, &str); 7] = [
        ("down_block_types", serde_json::json!(["DownEncoderBlock2D", "CrossAttnDownBlock2D"]), "down_block_types[1]"),
        ("up_block_types", serde_json::json!(["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]), "up_block_types[0]"),
        ("up_block_types", serde_json::json!(["UpDecoderBlock2D"]), "up_block_types"),
        ("act_fn", serde_json::json!("gelu"), "act_fn"),
        ("latents_mean", serde_json::json!([0.1, 0.2, 0.3, 0.4]), "latents_mean"),
        ("_class_name", serde_json::json!("AutoencoderKLTemporalDecoder"), "_class_name"),
        ("norm_num_groups", serde_json::json!(5), "norm_num_groups"),
    ];
    for (key, value, named) in cases {
        let mut v = tiny_config_json();
        v[key] = value.clone();
        let err = AutoencoderKLConfig::from_json(&v.to_string()).expect_err(key).to_string();
        assert!(err.contains(&format!("`{named}`")), "{key} = {value}: error does not name `{named}`: {err}");
        eprintln!("  {key} = {value}: {err}");
    }

    // Through from_dir, the error also names the file.
    let d = scratch("bad_config");
    let mut v = tiny_config_json();
    v["down_block_types"] = serde_json::json!(["DownEncoderBlock2D", "SomeBlock"]);
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    std::fs::copy(
        tiny_dir().join("diffusion_pytorch_model.safetensors"),
        d.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = AutoencoderKL::from_dir(&d, &Device::Cpu, None).err().expect("bad block type loads").to_string();
    assert!(err.contains("config.json") && err.contains("SomeBlock"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The fixture's weights as a store with `edit` applied to the (name, value) list.
fn edited_store(edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> ParamStore {
    let base =
        ParamStore::load_safetensors(tiny_dir().join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let mut items: Vec<(String, Tensor)> = base.iter().map(|(k, p)| (k.to_string(), p.frozen_value())).collect();
    edit(&mut items);
    let mut s = ParamStore::new();
    for (k, t) in items {
        s.insert(k, t, true).unwrap();
    }
    s
}

fn tiny_config() -> AutoencoderKLConfig {
    AutoencoderKLConfig::from_file(tiny_dir().join("config.json")).unwrap()
}

#[test]
fn missing_unexpected_and_misshaped_keys_are_named() {
    let gone = "encoder.mid_block.attentions.0.to_k.bias";
    let s = edited_store(|items| items.retain(|(k, _)| k != gone));
    let err = AutoencoderKL::load(s, &tiny_config()).err().expect("missing key loads").to_string();
    assert!(err.contains(gone), "{err}");

    let extra = "decoder.up_blocks.1.upsamplers.0.conv.weight";
    let s = edited_store(|items| items.push((extra.into(), Tensor::randn(&[32, 32, 3, 3], 1, &Device::Cpu).unwrap())));
    let err = AutoencoderKL::load(s, &tiny_config()).err().expect("unexpected key loads").to_string();
    assert!(err.contains(extra), "{err}");

    // Without mid-block attention, the checkpoint's attention weights are unexpected.
    let mut c = tiny_config();
    c.mid_block_add_attention = false;
    let s = edited_store(|_| {});
    let err = AutoencoderKL::load(s, &c).err().expect("attention keys unused").to_string();
    assert!(err.contains("encoder.mid_block.attentions.0.to_q.weight"), "{err}");

    // A config that disagrees with the weights: the key and both shapes are named.
    let mut c = tiny_config();
    c.latent_channels = 3;
    let err = AutoencoderKL::load(edited_store(|_| {}), &c).err().expect("wrong shapes load").to_string();
    assert!(err.contains("encoder.conv_out.weight") && err.contains("[8, 64, 3, 3]"), "{err}");

    // A variant that is not there: the error names the file looked for.
    let err = AutoencoderKL::from_dir(tiny_dir(), &Device::Cpu, Some("fp16")).err().expect("no fp16 file").to_string();
    assert!(err.contains("diffusion_pytorch_model.fp16.safetensors"), "{err}");
}

/// A checkpoint with the old attention names (`query/key/value/proj_attn`, diffusers < 0.14)
/// loads with the names converted and computes the same posterior.
#[test]
fn old_attention_key_names_are_converted() {
    let src = std::fs::read(tiny_dir().join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&src).unwrap();
    let rename = |k: &str| {
        [("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")]
            .iter()
            .fold(k.to_string(), |k, (new, old)| {
                k.replace(&format!("attentions.0.{new}"), &format!("attentions.0.{old}"))
            })
    };
    let views: Vec<(String, TensorView<'_>)> = st.tensors().into_iter().map(|(k, v)| (rename(&k), v)).collect();
    let renamed = views.iter().filter(|(k, _)| k.contains(".query.") || k.contains(".proj_attn.")).count();
    assert_eq!(renamed, 8, "expected q and out projections of both mid blocks renamed");
    let d = scratch("old_names");
    safetensors::serialize_to_file(views, None, &d.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::copy(tiny_dir().join("config.json"), d.join("config.json")).unwrap();

    let _ng = vipo::autograd::no_grad();
    let old = AutoencoderKL::from_dir(&d, &Device::Cpu, None).unwrap();
    assert!(old.store().contains("decoder.mid_block.attentions.0.to_out.0.weight"));
    assert!(!old.store().contains("decoder.mid_block.attentions.0.proj_attn.weight"));
    let new = AutoencoderKL::from_dir(tiny_dir(), &Device::Cpu, None).unwrap();
    let x = tiny_fx().tensor("x", &Device::Cpu);
    let a = old.encode(&x).unwrap().mean.to_vec().unwrap();
    let b = new.encode(&x).unwrap().mean.to_vec().unwrap();
    assert_eq!(a, b, "renamed checkpoint computes a different posterior");
    let z = tiny_fx().tensor("z", &Device::Cpu);
    assert_eq!(old.decode(&z).unwrap().to_vec().unwrap(), new.decode(&z).unwrap().to_vec().unwrap());
    let _ = std::fs::remove_dir_all(&d);
}

/// Backward through decode to the latents on the CPU (frozen VAE weights): finite, non-zero, and
/// agreeing with central differences of a float64 loss at a few coordinates.
#[test]
fn decode_backward_gives_latent_gradients() {
    let vae = AutoencoderKL::from_dir(tiny_dir(), &Device::Cpu, None).unwrap();
    vae.store().freeze_all();
    let z0 = tiny_fx().vals("z")[..4 * 16 * 16].to_vec();
    let shape = [1, 4, 16, 16];
    let z = Tensor::from_slice(&z0, &shape, &Device::Cpu).unwrap().requires_grad();
    let out = vae.decode(&z).unwrap();
    let r = randn(out.numel(), 77);
    let rt = Tensor::from_slice(&r, out.shape(), &Device::Cpu).unwrap();
    out.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
    let g = z.grad().expect("latents got no gradient").to_vec().unwrap();
    assert!(g.iter().all(|v| v.is_finite()), "non-finite latent gradient");
    let scale = g.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    assert!(scale > 0.0, "latent gradient is all zeros");
    assert!(vae.store().iter().all(|(_, p)| p.grad().is_none()), "a frozen weight got a gradient");

    let _ng = vipo::autograd::no_grad();
    let loss = |z: &[f32]| -> f64 {
        let y = vae.decode(&Tensor::from_slice(z, &shape, &Device::Cpu).unwrap()).unwrap().to_vec().unwrap();
        y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for j in [0, 300, 517, 1023] {
        let (mut p, mut m) = (z0.clone(), z0.clone());
        p[j] += eps;
        m[j] -= eps;
        let numeric = (loss(&p) - loss(&m)) / (2.0 * eps as f64);
        let err = (numeric - g[j] as f64).abs() / scale;
        worst = worst.max(err);
        assert!(err < 1e-2, "d/dz[{j}]: analytic {} vs numeric {numeric} (rel err {err:.2e})", g[j]);
    }
    eprintln!("  decode backward: max |dz| {scale:.3e}, finite-difference rel err {worst:.2e}");
}
