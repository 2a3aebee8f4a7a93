//! `UNet2DConditionModel` against diffusers' outputs on the tiny SD1.5-shaped fixture (every
//! top-level block, two cases, CPU and GPU), config parsing of the SD1.x and SD2.x shapes,
//! the errors for unsupported configs and mismatched checkpoints, and one backward pass.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use vipo::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use vipo::params::ParamStore;
use vipo::{Device, Tensor};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/unet_tiny")
}

/// Every tensor of a safetensors file as f32 values with its shape (f64 and i64 converted).
fn read_tensors(path: &Path) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals: Vec<f32> = match v.dtype() {
                Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
                Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name.to_string(), (vals, v.shape().to_vec()))
        })
        .collect()
}

fn fixtures() -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    read_tensors(&fixture_dir().join("fixtures.safetensors"))
}

fn tensor(fx: &BTreeMap<String, (Vec<f32>, Vec<usize>)>, name: &str, dev: &Device) -> Tensor {
    let (v, s) = &fx[name];
    Tensor::from_slice(v, s, dev).unwrap()
}

/// Max relative error of every stored output and intermediate, checked against `tol`.
fn check_against_fixture(model: &UNet2DConditionModel, dev: &Device, tol: f64) {
    let fx = fixtures();
    let _g = vipo::autograd::no_grad();
    let (out, inter) = model
        .forward_with_intermediates(
            &tensor(&fx, "sample", dev),
            &tensor(&fx, "timestep", dev),
            &tensor(&fx, "encoder_hidden_states", dev),
        )
        .unwrap();
    let mut checked = 0;
    for (name, t) in &inter {
        let key = format!("intermediate.{name}");
        let Some((want, shape)) = fx.get(&key) else { continue };
        assert_eq!(t.shape(), shape.as_slice(), "{key} on {dev}");
        let got = t.to_vec().unwrap();
        eprintln!("{dev}: {key:<32} rel err {:.2e}", rel_err(&got, want));
        assert_close(&format!("{key} on {dev}"), &got, want, tol, 0);
        checked += 1;
    }
    let stored = fx.keys().filter(|k| k.starts_with("intermediate.")).count();
    assert_eq!(checked, stored, "every stored intermediate is compared");
    let cases = [
        ("out", "out_f64", out),
        ("out_b", "out_b_f64", {
            model
                .forward(
                    &tensor(&fx, "sample_b", dev),
                    &tensor(&fx, "timestep_b", dev),
                    &tensor(&fx, "encoder_hidden_states_b", dev),
                )
                .unwrap()
        }),
    ];
    for (name, name64, t) in cases {
        let got = t.to_vec().unwrap();
        assert_eq!(t.shape(), fx[name].1.as_slice());
        eprintln!(
            "{dev}: {name:<32} rel err {:.2e} (vs float64: {:.2e})",
            rel_err(&got, &fx[name].0),
            rel_err(&got, &fx[name64].0)
        );
        assert_close(&format!("{name} on {dev}"), &got, &fx[name].0, tol, 0);
    }
}

// Measured: every output and intermediate within 2e-6 relative of diffusers' float32 on the
// CPU and on lavapipe; 1e-5 leaves room for other summation orders.
const TOL: f64 = 1e-5;

#[test]
fn fixture_outputs_and_intermediates_cpu() {
    let (model, _store) = UNet2DConditionModel::from_dir(fixture_dir(), &Device::Cpu, None).unwrap();
    check_against_fixture(&model, &Device::Cpu, TOL);
}

#[test]
fn fixture_outputs_and_intermediates_gpu() {
    let Some(dev) = gpu() else { return };
    let (model, _store) = UNet2DConditionModel::from_dir(fixture_dir(), &dev, None).unwrap();
    assert!(model.conv_in.weight.device() == dev);
    check_against_fixture(&model, &dev, TOL);
}

#[test]
fn attention_modules_are_listed_by_key() {
    let (model, _store) = UNet2DConditionModel::from_dir(fixture_dir(), &Device::Cpu, None).unwrap();
    let mods = model.attention_modules();
    // 2 transformers in down_blocks.0, 1 in the mid block, 3 in up_blocks.1; attn1 + attn2 each.
    assert_eq!(mods.len(), 12);
    assert_eq!(mods[0].0, "down_blocks.0.attentions.0.transformer_blocks.0.attn1");
    assert_eq!(mods[1].0, "down_blocks.0.attentions.0.transformer_blocks.0.attn2");
    assert_eq!(mods[4].0, "mid_block.attentions.0.transformer_blocks.0.attn1");
    assert_eq!(mods[11].0, "up_blocks.1.attentions.2.transformer_blocks.0.attn2");
    for (name, a) in &mods {
        assert_eq!(a.heads, 8, "{name}");
        assert_eq!(a.to_q.weight.name(), format!("{name}.to_q.weight"));
    }
}

const SD15_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

const SD21_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
  "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "use_linear_projection": true, "upcast_attention": true, "torch_dtype": "float16"
}"#;

#[test]
fn sd1_and_sd2_configs_parse_with_diffusers_head_counts() {
    let sd15 = UNet2DConditionConfig::from_json_str(SD15_CONFIG).unwrap();
    let plan = sd15.validate().unwrap();
    assert_eq!(plan.num_attention_heads, vec![8; 4]);
    assert_eq!(plan.head_dims(&sd15.block_out_channels), vec![40, 80, 160, 160]);
    assert_eq!(plan.cross_attention_dim, vec![768; 4]);
    assert_eq!(plan.temb_channels, 1280);
    assert!(!sd15.use_linear_projection);

    let sd21 = UNet2DConditionConfig::from_json_str(SD21_CONFIG).unwrap();
    let plan = sd21.validate().unwrap();
    // diffusers: num_attention_heads = attention_head_dim, so [5, 10, 20, 20] heads of 64.
    assert_eq!(plan.num_attention_heads, vec![5, 10, 20, 20]);
    assert_eq!(plan.head_dims(&sd21.block_out_channels), vec![64; 4]);
    assert_eq!(plan.cross_attention_dim, vec![1024; 4]);
    assert!(sd21.use_linear_projection && sd21.upcast_attention);

    // The fixture's config, and a set `num_attention_heads` (diffusers refuses it too).
    let tiny = UNet2DConditionConfig::from_file(fixture_dir().join("config.json")).unwrap();
    assert_eq!(tiny.validate().unwrap().num_attention_heads, vec![8, 8]);
    let with_heads = SD15_CONFIG.replace("\"act_fn\"", "\"num_attention_heads\": 8, \"act_fn\"");
    let err = UNet2DConditionConfig::from_json_str(&with_heads).unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("num_attention_heads"), "{err}");
    // A list of the wrong length names its key.
    let short = SD21_CONFIG.replace("[5, 10, 20, 20]", "[5, 10]");
    let err = UNet2DConditionConfig::from_json_str(&short).unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("attention_head_dim"), "{err}");
}

/// A temp folder with `config.json` from `config` and the given weights.
fn temp_model_dir(tag: &str, config: &str, weights: &BTreeMap<String, (Vec<f32>, Vec<usize>)>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vipo_unet_{tag}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        weights.iter().map(|(k, (v, s))| (k.clone(), bytemuck::cast_slice(v).to_vec(), s.clone())).collect();
    let views: Vec<(String, TensorView<'_>)> =
        bytes.iter().map(|(k, b, s)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    dir
}

fn fixture_config() -> String {
    std::fs::read_to_string(fixture_dir().join("config.json")).unwrap()
}

fn fixture_weights() -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    read_tensors(&fixture_dir().join("diffusion_pytorch_model.safetensors"))
}

fn load_err(tag: &str, config: &str, weights: &BTreeMap<String, (Vec<f32>, Vec<usize>)>) -> String {
    let dir = temp_model_dir(tag, config, weights);
    let res = UNet2DConditionModel::from_dir(&dir, &Device::Cpu, None);
    let _ = std::fs::remove_dir_all(&dir);
    match res {
        Ok(_) => panic!("{tag}: loaded without error"),
        Err(e) => {
            eprintln!("{tag}: {e}");
            e.to_string()
        }
    }
}

#[test]
fn unsupported_configs_are_errors_naming_the_key() {
    let cfg = fixture_config();
    let weights = fixture_weights();
    let cases = [
        ("\"DownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"", "SimpleCrossAttnDownBlock2D"),
        ("\"UpBlock2D\"", "\"ResnetUpsampleBlock2D\"", "ResnetUpsampleBlock2D"),
        (
            "\"mid_block_type\": \"UNetMidBlock2DCrossAttn\"",
            "\"mid_block_type\": \"UNetMidBlock2DSimpleCrossAttn\"",
            "mid_block_type",
        ),
        ("\"class_embed_type\": null", "\"class_embed_type\": \"timestep\"", "class_embed_type"),
        ("\"addition_embed_type\": null", "\"addition_embed_type\": \"text_time\"", "addition_embed_type"),
        ("\"time_embedding_type\": \"positional\"", "\"time_embedding_type\": \"fourier\"", "time_embedding_type"),
        (
            "\"resnet_time_scale_shift\": \"default\"",
            "\"resnet_time_scale_shift\": \"scale_shift\"",
            "resnet_time_scale_shift",
        ),
        ("\"act_fn\": \"silu\"", "\"act_fn\": \"gelu\"", "act_fn"),
        ("\"attention_head_dim\": 8", "\"attention_head_dim\": \"eight\"", "attention_head_dim"),
    ];
    for (i, (from, to, key)) in cases.iter().enumerate() {
        assert!(cfg.contains(from), "fixture config lacks {from}");
        let err = load_err(&format!("cfg{i}"), &cfg.replacen(from, to, 1), &weights);
        assert!(err.contains(key), "{to}: error does not name `{key}`: {err}");
        assert!(err.contains("config.json"), "{to}: error does not name the file: {err}");
    }
}

#[test]
fn mismatched_checkpoints_are_errors_naming_the_key() {
    let cfg = fixture_config();
    let good = fixture_weights();

    let mut missing = good.clone();
    let gone = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight";
    missing.remove(gone).unwrap();
    let err = load_err("missing", &cfg, &missing);
    assert!(err.contains(gone), "{err}");

    let mut extra = good.clone();
    let spare = "down_blocks.1.attentions.0.norm.weight";
    extra.insert(spare.into(), (vec![1.0; 64], vec![64]));
    let err = load_err("extra", &cfg, &extra);
    assert!(err.contains(spare), "{err}");

    let mut shaped = good.clone();
    let bad = "up_blocks.0.resnets.2.conv1.weight";
    let (v, _) = shaped[bad].clone();
    shaped.insert(bad.into(), (v, vec![64, 96, 9]));
    let err = load_err("shape", &cfg, &shaped);
    assert!(err.contains(bad) && err.contains("[64, 96, 9]"), "{err}");

    let dir = temp_model_dir("noweights", &cfg, &good);
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let err = UNet2DConditionModel::from_dir(&dir, &Device::Cpu, Some("fp16")).err().unwrap().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("diffusion_pytorch_model.fp16.safetensors"), "{err}");
}

/// `use_linear_projection` (SD2.x): the same weights as Linear layers must give the same
/// output as the 1x1 convs, and `attention_head_dim` as a list as the number.
#[test]
fn linear_projection_matches_conv_projection() {
    let fx = fixtures();
    let mut cfg = UNet2DConditionConfig::from_json_str(&fixture_config()).unwrap();
    cfg.use_linear_projection = true;
    cfg.attention_head_dim = vipo::models::unet_2d_condition::PerBlock::Many(vec![8, 8]);
    let mut store = ParamStore::new();
    for (k, (v, s)) in fixture_weights() {
        let is_proj = k.ends_with("proj_in.weight") || k.ends_with("proj_out.weight");
        let shape = if is_proj { s[..2].to_vec() } else { s };
        store.insert(k, Tensor::from_vec(v, &shape, &Device::Cpu).unwrap(), false).unwrap();
    }
    let model = UNet2DConditionModel::load(&store, &cfg, &Device::Cpu).unwrap();
    let _g = vipo::autograd::no_grad();
    let dev = Device::Cpu;
    let out = model
        .forward(
            &tensor(&fx, "sample", &dev),
            &tensor(&fx, "timestep", &dev),
            &tensor(&fx, "encoder_hidden_states", &dev),
        )
        .unwrap();
    assert_close("linear projection out", &out.to_vec().unwrap(), &fx["out"].0, TOL, 0);
}

/// One backward through the whole tiny UNet: every parameter gets a finite, nonzero gradient.
#[test]
fn backward_reaches_every_parameter() {
    let fx = fixtures();
    let dev = Device::Cpu;
    let (model, store) = UNet2DConditionModel::from_dir(fixture_dir(), &dev, None).unwrap();
    let out = model
        .forward(
            &tensor(&fx, "sample", &dev),
            &tensor(&fx, "timestep", &dev),
            &tensor(&fx, "encoder_hidden_states", &dev),
        )
        .unwrap();
    let r = Tensor::from_vec(randn(out.numel(), 7), out.shape(), &dev).unwrap();
    out.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(store.len() > 300);
    for (name, p) in store.iter() {
        let g = p.grad().unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.shape(), p.shape(), "{name}");
        let g = g.to_vec().unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{name}: non-finite gradient");
        assert!(g.iter().any(|&v| v != 0.0), "{name}: all-zero gradient");
    }
}

/// Sizes that are not multiples of 2^levels: diffusers then upsamples to the skip's size
/// (`upsample_size`); the output keeps the input's size and the GPU agrees with the CPU.
#[test]
fn odd_sizes_upsample_to_the_skip_size() {
    let fx = fixtures();
    let ehs = &fx["encoder_hidden_states_b"];
    let shape = [1, 4, 7, 10];
    let inputs = [(randn(numel(&shape), 3), shape.to_vec()), (vec![321.5], vec![1]), ehs.clone()];
    let run = |dev: &Device| {
        let (model, _store) = UNet2DConditionModel::from_dir(fixture_dir(), dev, None).unwrap();
        let t: Vec<Tensor> = inputs.iter().map(|(v, s)| Tensor::from_slice(v, s, dev).unwrap()).collect();
        let _g = vipo::autograd::no_grad();
        model.forward(&t[0], &t[1], &t[2]).unwrap()
    };
    let cpu = run(&Device::Cpu);
    assert_eq!(cpu.shape(), &shape);
    let want = cpu.to_vec().unwrap();
    assert!(want.iter().all(|v| v.is_finite()));
    if let Some(g) = gpu() {
        assert_close("odd size gpu vs cpu", &run(&g).to_vec().unwrap(), &want, TOL, 3);
    }
}

/// Gradient checkpointing recomputes every resnet and transformer in the backward: the
/// gradients of every parameter (and of the input) equal the plain backward's, on the CPU and
/// on the GPU, and the forward output is unchanged.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let fx = fixtures();
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu());
    for dev in devices {
        let run = |ckpt: bool| {
            let (model, store) = UNet2DConditionModel::from_dir(fixture_dir(), &dev, None).unwrap();
            model.set_gradient_checkpointing(ckpt);
            let x = tensor(&fx, "sample", &dev).requires_grad();
            let out = model.forward(&x, &tensor(&fx, "timestep", &dev), &tensor(&fx, "encoder_hidden_states", &dev));
            let out = out.unwrap();
            let r = Tensor::from_vec(randn(out.numel(), 11), out.shape(), &dev).unwrap();
            out.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut grads: BTreeMap<String, Vec<f32>> =
                store.iter().map(|(k, p)| (k.to_string(), p.grad().unwrap().to_vec().unwrap())).collect();
            grads.insert("input".into(), x.grad().unwrap().to_vec().unwrap());
            (out.to_vec().unwrap(), grads)
        };
        let (out_a, plain) = run(false);
        let (out_b, ckpt) = run(true);
        assert_eq!(out_a, out_b, "{dev:?}: checkpointing changed the forward");
        assert_eq!(plain.len(), ckpt.len());
        for (k, g) in &plain {
            // The recomputation runs the same kernels on the same inputs: equal up to the
            // order gradients are summed in (1e-5 relative to the largest entry).
            assert_close(&format!("{dev:?} {k}"), &ckpt[k], g, 1e-5, 0);
        }
    }
}

#[test]
fn bench_model_runs_the_tiny_unet_with_f32_and_f16_weights() {
    // `vipo bench model` end to end on the tiny SD1.5-shaped config: the forward and the LoRA
    // step, with the frozen weights in f32 and in f16 (kernels reading f16), on the CPU and
    // on the GPU under test; every record has a time and a peak, and `--profile` (f32 run)
    // the training step's phases.
    let cfg = fixture_dir().join("config.json");
    let mut on = vec!["cpu".to_string()];
    if let Some(g) = gpu() {
        on.push(format!("gpu:{}", g.gpu().unwrap().index));
    }
    for half in [false, true] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"));
        cmd.args(["bench", "model", "--latent", "8", "--pairs", "1", "--repeats", "1", "--json", "--on"]);
        cmd.arg(on.join(",")).arg("--config").arg(&cfg);
        if half {
            cmd.arg("--half-weights");
        } else {
            cmd.arg("--profile");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "half {half}: {}", String::from_utf8_lossy(&out.stderr));
        let recs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(recs.len(), 2 * on.len(), "{recs:?}");
        for r in &recs {
            let case = r["case"].as_str().unwrap();
            assert_eq!(case.ends_with(" f16w"), half, "{case}");
            assert!(r["seconds"].as_f64().unwrap() > 0.0 && r["peak_bytes"].as_u64().unwrap() > 0, "{r}");
            // --profile on a GPU (lavapipe has timestamps): every case once more with each
            // dispatch timed, by kernel; the step's list has the backward's kernels too.
            let k = &r["gpu_kernels"];
            let timestamps = gpu().is_some_and(|g| g.gpu().unwrap().features.contains(wgpu::Features::TIMESTAMP_QUERY));
            if half || r["device"] == "cpu" || !timestamps {
                assert!(k.is_null(), "{r}");
            } else {
                let names: Vec<String> = k["kernels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| format!("{}/{}", k["shader"].as_str().unwrap(), k["entry"].as_str().unwrap()))
                    .collect();
                for want in ["conv2d_fwd_", "attention_", "matmul_", "norm"] {
                    assert!(names.iter().any(|n| n.starts_with(want)), "no {want} kernel in {names:?}");
                }
                assert_eq!(case.starts_with("lora"), names.iter().any(|n| n.ends_with("/backward_dq")), "{names:?}");
                let secs = k["seconds"].as_f64().unwrap();
                assert!(secs > 0.0 && secs.is_finite(), "{r}");
            }
            // --profile: the step's phases; on the CPU its backward by op, within the phase.
            let p = &r["profile"];
            if half || !case.starts_with("lora") {
                assert!(p.is_null(), "{r}");
                continue;
            }
            let backward = p["backward"].as_f64().unwrap();
            assert!(p["forwards"].as_f64().unwrap() > 0.0 && backward > 0.0, "{r}");
            let ops = p["backward_ops"].as_array().unwrap();
            if r["device"] == "cpu" {
                let op = |name: &str| ops.iter().find(|o| o["op"] == name);
                for name in ["conv2d", "attention", "linear", "group_norm_silu"] {
                    assert!(op(name).is_some_and(|o| o["calls"].as_u64().unwrap() > 0), "{name} missing: {r}");
                }
                let sum: f64 = ops.iter().map(|o| o["seconds"].as_f64().unwrap()).sum();
                assert!(sum > 0.0 && sum <= backward * 1.001, "ops {sum} s, backward {backward} s");
            } else {
                assert!(ops.is_empty(), "{r}");
            }
        }
    }
}
