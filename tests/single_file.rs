//! Single-file LDM checkpoints: the generated key tables against the fixture's map, the
//! fixture's float16 single file against the folder's fp16 weights, a write/read round trip
//! through the reverse table, the errors, and the shipped SD1.5 configs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use vipo::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use vipo::models::clip_text::{ClipTextConfig, ClipTextModel};
use vipo::models::ldm_convert::{
    is_skipped_ldm_key, load_single_file, save_single_file, sd15_config_dir, Component, KeyTable, LdmKey, LdmKeyTables,
    SingleFileConfigs,
};
use vipo::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use vipo::params::ParamStore;
use vipo::{DType, Device, Tensor};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sd15_tiny_pipeline")
}

fn tiny_configs() -> SingleFileConfigs {
    SingleFileConfigs::from_dir(fixture_dir()).expect("tiny pipeline configs")
}

fn single_file() -> PathBuf {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("meta.json")).unwrap()).unwrap();
    fixture_dir().join(meta["single_file"]["file"].as_str().expect("meta.json single_file.file"))
}

/// A fresh scratch path, unique per test and process.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vipo_single_file_{}_{name}", std::process::id()))
}

/// The folder's weights of one component (`variant` Some("fp16") for the fp16 files).
fn folder_store(c: Component, variant: Option<&str>, device: &Device) -> ParamStore {
    let stem = match c {
        Component::TextEncoder => "model",
        _ => "diffusion_pytorch_model",
    };
    let file = match variant {
        Some(v) => format!("{stem}.{v}.safetensors"),
        None => format!("{stem}.safetensors"),
    };
    ParamStore::load_safetensors(fixture_dir().join(c.name()).join(file), device).unwrap()
}

/// Same keys, shapes and bit-identical values.
fn assert_stores_equal(what: &str, got: &ParamStore, want: &ParamStore) {
    let gk: Vec<&str> = got.iter().map(|(k, _)| k).collect();
    let wk: Vec<&str> = want.iter().map(|(k, _)| k).collect();
    assert_eq!(gk, wk, "{what}: key sets differ");
    let mut n = 0;
    for ((k, g), (_, w)) in got.iter().zip(want.iter()) {
        assert_eq!(g.shape(), w.shape(), "{what}: `{k}` shape");
        let (gv, wv) = (g.frozen_value().to_vec().unwrap(), w.frozen_value().to_vec().unwrap());
        assert!(wv.iter().any(|&x| x != 0.0) || k.contains("bias"), "{what}: `{k}` is all zeros in the reference");
        let same = gv.iter().zip(&wv).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: `{k}` values differ");
        n += gv.len();
    }
    eprintln!("{what}: {} tensors, {n} values identical", gk.len());
}

// (a) ---------------------------------------------------------------------------------------

#[test]
fn key_tables_reproduce_the_fixture_map() {
    let map: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("ldm_key_map.json")).unwrap()).unwrap();
    let tables = LdmKeyTables::new(&tiny_configs()).unwrap();
    for c in Component::ALL {
        let want: BTreeMap<String, String> = map[c.name()]
            .as_object()
            .unwrap_or_else(|| panic!("ldm_key_map.json has no `{c}`"))
            .iter()
            .map(|(d, l)| (d.clone(), l.as_str().unwrap().to_string()))
            .collect();
        let table = tables.table(c);
        let got: BTreeMap<String, String> =
            table.pairs().iter().map(|p| (p.diffusers.clone(), p.ldm.clone())).collect();
        assert_eq!(got.len(), table.len(), "{c}: a diffusers name appears twice in the table");
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{c}: missing {missing:?}, extra {extra:?}");
        for (d, l) in &want {
            assert_eq!(&got[d], l, "{c}: `{d}`");
            // And back: LDM -> diffusers through the classifier the loader uses.
            match tables.classify(l) {
                Ok(LdmKey::Param(cc, p)) => assert_eq!((cc, p.diffusers.as_str()), (c, d.as_str())),
                other => panic!("{c}: `{l}` classified as {other:?}"),
            }
        }
        eprintln!("{c}: {} pairs match ldm_key_map.json", want.len());
    }
    // The reshaped (1x1 conv) entries are exactly the fixture's list.
    let want_reshaped: Vec<String> = map["reshaped"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut got_reshaped: Vec<String> = Component::ALL
        .iter()
        .flat_map(|&c| tables.table(c).pairs().iter().filter(|p| p.conv1x1).map(|p| p.ldm.clone()))
        .collect();
    got_reshaped.sort();
    assert_eq!(got_reshaped, want_reshaped);
    // The extra keys real files carry are skipped, not errors.
    for k in map["not_used_by_diffusers"].as_array().unwrap() {
        let k = k.as_str().unwrap();
        assert!(is_skipped_ldm_key(k), "`{k}` should be skipped");
        assert!(matches!(tables.classify(k), Ok(LdmKey::Skipped)));
    }
    for k in [
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
        "model_ema.diffusion_modelout0weight",
    ] {
        assert!(matches!(tables.classify(k), Ok(LdmKey::Skipped)), "`{k}`");
    }
    // Old (transformers < 4.11) CLIP names without `text_model.`.
    match tables.classify("cond_stage_model.transformer.encoder.layers.1.mlp.fc2.bias") {
        Ok(LdmKey::Param(Component::TextEncoder, p)) => {
            assert_eq!(p.diffusers, "text_model.encoder.layers.1.mlp.fc2.bias")
        }
        other => panic!("old CLIP layout: {other:?}"),
    }
}

// (b) ---------------------------------------------------------------------------------------

#[test]
fn fixture_single_file_gives_the_fp16_folder_weights() {
    let (unet, vae, text) = load_single_file(single_file(), &tiny_configs(), &Device::Cpu).unwrap();
    for (c, store) in [(Component::Unet, &unet), (Component::Vae, &vae), (Component::TextEncoder, &text)] {
        assert_stores_equal(
            &format!("single file {c} vs {c}/*.fp16.safetensors"),
            store,
            &folder_store(c, Some("fp16"), &Device::Cpu),
        );
    }
    // VAE attention weights came in as (C, C, 1, 1) and leave as (C, C).
    let q = vae.get("encoder.mid_block.attentions.0.to_q.weight").unwrap();
    assert_eq!(q.shape(), &[16, 16]);
}

#[test]
fn fixture_single_file_loads_onto_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    let (unet, vae, text) = load_single_file(single_file(), &tiny_configs(), &gpu).unwrap();
    for (c, store) in [(Component::Unet, &unet), (Component::Vae, &vae), (Component::TextEncoder, &text)] {
        assert!(store.iter().all(|(_, p)| p.device() == gpu), "{c} not on the GPU");
        assert_stores_equal(&format!("gpu {c}"), store, &folder_store(c, Some("fp16"), &Device::Cpu));
    }
}

// (c) ---------------------------------------------------------------------------------------

#[test]
fn reverse_table_round_trip() {
    let configs = tiny_configs();
    let dev = Device::Cpu;
    let [u, v, t] = [Component::Unet, Component::Vae, Component::TextEncoder].map(|c| folder_store(c, None, &dev));

    let f32_path = scratch("roundtrip_f32.safetensors");
    save_single_file(&f32_path, &u, &v, &t, &configs, DType::F32).unwrap();
    // The written file is in LDM layout: the same key set as the fixture's single file, less
    // the extras, with the attention weights as 1x1 convs.
    let bytes = std::fs::read(&f32_path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let fixture_bytes = std::fs::read(single_file()).unwrap();
    let fixture = SafeTensors::deserialize(&fixture_bytes).unwrap();
    let mut written: Vec<&str> = st.names();
    written.sort();
    let mut want: Vec<&str> = fixture.names().into_iter().filter(|k| !is_skipped_ldm_key(k)).collect();
    want.sort();
    assert_eq!(written, want);
    for name in &written {
        assert_eq!(st.tensor(name).unwrap().shape(), fixture.tensor(name).unwrap().shape(), "`{name}` shape");
    }

    let (u2, v2, t2) = load_single_file(&f32_path, &configs, &dev).unwrap();
    assert_stores_equal("round trip unet", &u2, &u);
    assert_stores_equal("round trip vae", &v2, &v);
    assert_stores_equal("round trip text_encoder", &t2, &t);

    // Written as f16 (round to nearest even, as torch's .half()), it reads back as the fp16 variant.
    let f16_path = scratch("roundtrip_f16.safetensors");
    save_single_file(&f16_path, &u, &v, &t, &configs, DType::F16).unwrap();
    let (u3, v3, t3) = load_single_file(&f16_path, &configs, &dev).unwrap();
    assert_stores_equal("f16 unet", &u3, &folder_store(Component::Unet, Some("fp16"), &dev));
    assert_stores_equal("f16 vae", &v3, &folder_store(Component::Vae, Some("fp16"), &dev));
    assert_stores_equal("f16 text_encoder", &t3, &folder_store(Component::TextEncoder, Some("fp16"), &dev));

    // Text-encoder stores without the `text_model.` prefix write the same file.
    let mut bare = ParamStore::new();
    for (k, p) in t.iter() {
        bare.insert(k.strip_prefix("text_model.").unwrap(), p.frozen_value(), true).unwrap();
    }
    let bare_path = scratch("roundtrip_bare.safetensors");
    save_single_file(&bare_path, &u, &v, &bare, &configs, DType::F32).unwrap();
    assert_eq!(std::fs::read(&bare_path).unwrap(), bytes, "bare text-encoder names write other bytes");
    for p in [f32_path, f16_path, bare_path] {
        let _ = std::fs::remove_file(p);
    }
}

/// The models build from the single file's stores (every key used) and compute what the
/// folder's fp16 models compute; the VAE also reproduces diffusers' `from_single_file` images.
#[test]
fn models_from_the_single_file_match_the_folder_models() {
    let _g = vipo::autograd::no_grad();
    let dev = Device::Cpu;
    let dir = fixture_dir();
    let (u, v, t) = load_single_file(single_file(), &tiny_configs(), &dev).unwrap();
    let bits_equal = |what: &str, a: &Tensor, b: &Tensor| {
        assert_eq!(a.shape(), b.shape(), "{what}");
        let (a, b) = (a.to_vec().unwrap(), b.to_vec().unwrap());
        assert!(b.iter().any(|&x| x != 0.0), "{what}: all zeros");
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: outputs differ");
    };

    let ucfg = UNet2DConditionConfig::from_file(dir.join("unet/config.json")).unwrap();
    let unet_a = UNet2DConditionModel::load(&u, &ucfg, &dev).unwrap();
    let (unet_b, _) = UNet2DConditionModel::from_dir(dir.join("unet"), &dev, Some("fp16")).unwrap();
    let x = Tensor::from_vec(common::randn(2 * 4 * 8 * 8, 7), &[2, 4, 8, 8], &dev).unwrap(); // (B, C, H, W)
    let ts = Tensor::from_slice(&[901.0, 17.0], &[2], &dev).unwrap(); // (B,)
    let enc = Tensor::from_vec(common::randn(2 * 77 * 8, 8), &[2, 77, 8], &dev).unwrap(); // (B, L, D)
    bits_equal("unet", &unet_a.forward(&x, &ts, &enc).unwrap(), &unet_b.forward(&x, &ts, &enc).unwrap());

    let ccfg = ClipTextConfig::from_file(dir.join("text_encoder/config.json")).unwrap();
    let clip_a = ClipTextModel::load(&t, &ccfg).unwrap();
    let clip_b = ClipTextModel::from_dir_variant(dir.join("text_encoder"), &dev, Some("fp16")).unwrap();
    let ids: Vec<u32> = (0..77).map(|i| [49406, 320, 1125, 539, 550, 18376][i % 6]).collect();
    let (a, b) = (clip_a.forward(&[&ids]).unwrap(), clip_b.forward(&[&ids]).unwrap());
    bits_equal("clip last_hidden_state", &a.last_hidden_state, &b.last_hidden_state);
    bits_equal("clip pooled", &a.pooled, &b.pooled);

    let vcfg = AutoencoderKLConfig::from_file(dir.join("vae/config.json")).unwrap();
    let vae_a = AutoencoderKL::load(v, &vcfg).unwrap();
    let vae_b = AutoencoderKL::from_dir(dir.join("vae"), &dev, Some("fp16")).unwrap();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |k: &str| -> Vec<f32> {
        st.tensor(k).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    let sf = vae_a.scaling_factor();
    for case in ["case0", "case1"] {
        let lat: Vec<f32> = f32s(&format!("fp16w.{case}.ddim10.final_latents")).iter().map(|x| x / sf).collect();
        let z = Tensor::from_vec(lat, &[1, 4, 8, 8], &dev).unwrap(); // (B, latent, h, w)
        let (img_a, img_b) = (vae_a.decode(&z).unwrap(), vae_b.decode(&z).unwrap()); // (1, 3, 64, 64)
        bits_equal("vae decode", &img_a, &img_b);
        // diffusers: (image_raw / 2 + 0.5).clamp(0, 1), NHWC.
        let raw = img_a.to_vec().unwrap();
        let mut nhwc = vec![0f32; raw.len()];
        for c in 0..3 {
            for p in 0..64 * 64 {
                nhwc[p * 3 + c] = (raw[c * 64 * 64 + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            }
        }
        let want = f32s(&format!("fp16w.{case}.ddim10.image"));
        eprintln!("{case} vae image vs diffusers from_single_file: rel err {:.2e}", common::rel_err(&nhwc, &want));
        common::assert_close(&format!("{case} vae image"), &nhwc, &want, 1e-4, 0);
    }
}

// (d) ---------------------------------------------------------------------------------------

/// The fixture's single file with `edit` applied to its (name, dtype, shape, bytes) list.
fn edited_copy(name: &str, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let bytes = std::fs::read(single_file()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        st.iter().map(|(k, v)| (k.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut entries);
    let views: Vec<(String, TensorView<'_>)> =
        entries.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let path = scratch(name);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn load_err(path: &Path, configs: &SingleFileConfigs) -> String {
    match load_single_file(path, configs, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_missing_and_truncated_are_errors_naming_them() {
    let configs = tiny_configs();
    let half_one = half::f16::from_f32(0.5).to_le_bytes().to_vec();

    let unknown = "model.diffusion_model.input_blocks.1.0.in_layers.7.weight";
    let path = edited_copy("unknown.safetensors", |e| e.push((unknown.into(), Dtype::F16, vec![1], half_one.clone())));
    let msg = load_err(&path, &configs);
    assert!(msg.contains(unknown) && msg.contains(&path.display().to_string()), "{msg}");
    eprintln!("unknown key: {msg}");

    let sd2 = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    let path = edited_copy("sd2.safetensors", |e| e.push((sd2.into(), Dtype::F16, vec![1], half_one.clone())));
    let msg = load_err(&path, &configs);
    assert!(msg.contains(sd2) && msg.contains("OpenCLIP"), "{msg}");

    let gone = "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight";
    let path = edited_copy("missing.safetensors", |e| e.retain(|(k, ..)| k != gone));
    let msg = load_err(&path, &configs);
    assert!(msg.contains(gone) && msg.contains("decoder.up_blocks.2.resnets.0.conv_shortcut.weight"), "{msg}");
    eprintln!("missing key: {msg}");

    let int_key = "model.diffusion_model.out.2.bias";
    let path = edited_copy("int.safetensors", |e| {
        let t = e.iter_mut().find(|(k, ..)| k == int_key).unwrap();
        t.1 = Dtype::I16; // same byte size as f16
    });
    let msg = load_err(&path, &configs);
    assert!(msg.contains(int_key) && msg.contains("I16"), "{msg}");

    let bad_shape = "first_stage_model.encoder.mid.attn_1.k.weight";
    let path = edited_copy("shape.safetensors", |e| {
        let t = e.iter_mut().find(|(k, ..)| k == bad_shape).unwrap();
        t.2 = vec![16, 4, 2, 2];
    });
    let msg = load_err(&path, &configs);
    assert!(msg.contains(bad_shape), "{msg}");

    // A download cut short, and a file that is not safetensors at all.
    let bytes = std::fs::read(single_file()).unwrap();
    let cut = scratch("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let msg = load_err(&cut, &configs);
    assert!(msg.contains(&cut.display().to_string()) && msg.contains("truncated"), "{msg}");
    eprintln!("truncated: {msg}");
    std::fs::write(&cut, &bytes[..5]).unwrap();
    assert!(load_err(&cut, &configs).contains(&cut.display().to_string()));
    let _ = std::fs::remove_file(&cut);
    let msg = load_err(&scratch("does_not_exist.safetensors"), &configs);
    assert!(msg.contains("does_not_exist.safetensors"), "{msg}");

    // Configs of another layout (here one resnet per level) leave keys over, named.
    let mut cfg = configs.clone();
    cfg.unet = cfg.unet.replace("\"layers_per_block\": 2", "\"layers_per_block\": 1");
    let msg = load_err(&single_file(), &cfg);
    assert!(
        msg.contains("unknown key(s)") && msg.contains("`model.diffusion_model.input_blocks.10.0.emb_layers.1.bias`"),
        "{msg}"
    );

    // Writing: a key outside the table is an error naming it.
    let dev = Device::Cpu;
    let [u, v, t] = [Component::Unet, Component::Vae, Component::TextEncoder].map(|c| folder_store(c, None, &dev));
    let mut extra = ParamStore::new();
    for (k, p) in u.iter() {
        extra.insert(k, p.frozen_value(), true).unwrap();
    }
    extra.insert("mid_block.foo.weight", vipo::Tensor::full(1.0, &[2], &dev).unwrap(), true).unwrap();
    let out = scratch("bad_write.safetensors");
    let msg = save_single_file(&out, &extra, &v, &t, &configs, DType::F32).unwrap_err().to_string();
    assert!(msg.contains("mid_block.foo.weight"), "{msg}");
    assert!(!out.exists());

    // Configs the conversion cannot name are refused naming the key and the value.
    let mut cfg = configs.clone();
    cfg.unet = cfg.unet.replace("\"DownBlock2D\"", "\"AttnDownBlock2D\"");
    let msg = LdmKeyTables::new(&cfg).unwrap_err().to_string();
    assert!(msg.contains("down_block_types[3]") && msg.contains("AttnDownBlock2D"), "{msg}");

    for name in ["unknown", "sd2", "missing", "int", "shape"] {
        let _ = std::fs::remove_file(scratch(&format!("{name}.safetensors")));
    }
}

// (e) ---------------------------------------------------------------------------------------

#[test]
fn shipped_sd15_configs() {
    let dir = sd15_config_dir().unwrap();
    assert!(dir.ends_with("models/sd15"), "{}", dir.display());
    let on_disk = SingleFileConfigs::from_dir(&dir).unwrap();
    let embedded = SingleFileConfigs::sd15();
    for c in Component::ALL {
        assert_eq!(on_disk.config(c), embedded.config(c), "{c}: embedded != models/sd15");
    }
    let json = |rel: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(rel)).unwrap()).unwrap_or_else(|e| panic!("{rel}: {e}"))
    };

    let unet = json("unet/config.json");
    assert_eq!(unet["block_out_channels"], serde_json::json!([320, 640, 1280, 1280]));
    assert_eq!(unet["layers_per_block"], 2);
    assert_eq!(unet["attention_head_dim"], 8);
    assert_eq!(unet["cross_attention_dim"], 768);
    assert_eq!(unet["sample_size"], 64);
    assert_eq!(unet["norm_num_groups"], 32);
    assert_eq!(unet["in_channels"], 4);
    assert_eq!(unet["out_channels"], 4);
    assert_eq!(unet["flip_sin_to_cos"], true);
    assert_eq!(unet["freq_shift"], 0);

    let vae = json("vae/config.json");
    assert_eq!(vae["block_out_channels"], serde_json::json!([128, 256, 512, 512]));
    assert_eq!(vae["latent_channels"], 4);
    assert_eq!(vae["scaling_factor"], 0.18215);
    assert_eq!(vae["sample_size"], 512);
    assert_eq!(vae["layers_per_block"], 2);
    assert_eq!(vae["norm_num_groups"], 32);

    let te = json("text_encoder/config.json");
    for (k, v) in [
        ("hidden_size", 768),
        ("num_hidden_layers", 12),
        ("num_attention_heads", 12),
        ("intermediate_size", 3072),
        ("max_position_embeddings", 77),
        ("vocab_size", 49408),
    ] {
        assert_eq!(te[k], v, "text_encoder {k}");
    }
    assert_eq!(te["hidden_act"], "quick_gelu");

    assert_eq!(json("scheduler/scheduler_config.json"), {
        let p = fixture_dir().join("scheduler/scheduler_config.json");
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap()
    });
    let index = json("model_index.json");
    assert_eq!(index["unet"], serde_json::json!(["diffusers", "UNet2DConditionModel"]));
    assert_eq!(index["text_encoder"], serde_json::json!(["transformers", "CLIPTextModel"]));

    // The models' own config parsers accept them.
    let u = UNet2DConditionConfig::from_file(dir.join("unet/config.json")).unwrap();
    u.validate().unwrap();
    assert_eq!(u.block_out_channels, vec![320, 640, 1280, 1280]);
    let v = AutoencoderKLConfig::from_file(dir.join("vae/config.json")).unwrap();
    v.validate().unwrap();
    assert_eq!((v.latent_channels, v.scaling_factor), (4, 0.18215));
    let c = ClipTextConfig::from_file(dir.join("text_encoder/config.json")).unwrap();
    c.validate().unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.head_dim()), (768, 12, 64));

    // The tokenizer folder is SD1.5's.
    let tok = vipo::models::clip_tokenizer::ClipTokenizer::from_dir(dir.join("tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(tok.max_length(), 77);

    // The real SD1.5 checkpoint's parameter counts per component (diffusers state dicts).
    let origin = |c: Component| embedded.origin(c);
    assert_eq!(KeyTable::unet(&embedded.unet, &origin(Component::Unet)).unwrap().len(), 686);
    assert_eq!(KeyTable::vae(&embedded.vae, &origin(Component::Vae)).unwrap().len(), 248);
    assert_eq!(KeyTable::text_encoder(&embedded.text_encoder, &origin(Component::TextEncoder)).unwrap().len(), 196);
    // Spot checks against names in the released v1-5-pruned-emaonly file.
    let tables = LdmKeyTables::new(&embedded).unwrap();
    for (ldm, diffusers) in [
        (
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
            "down_blocks.1.resnets.0.conv_shortcut.weight",
        ),
        ("model.diffusion_model.input_blocks.9.0.op.bias", "down_blocks.2.downsamplers.0.conv.bias"),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("model.diffusion_model.output_blocks.8.2.conv.weight", "up_blocks.2.upsamplers.0.conv.weight"),
        (
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        ),
        (
            "first_stage_model.decoder.up.1.block.0.nin_shortcut.bias",
            "decoder.up_blocks.2.resnets.0.conv_shortcut.bias",
        ),
        ("first_stage_model.decoder.up.3.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
        (
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
            "text_model.encoder.layers.11.mlp.fc2.bias",
        ),
    ] {
        match tables.classify(ldm) {
            Ok(LdmKey::Param(_, p)) => assert_eq!(p.diffusers, diffusers, "`{ldm}`"),
            other => panic!("`{ldm}`: {other:?}"),
        }
    }
    for absent in [
        "model.diffusion_model.input_blocks.1.0.skip_connection.weight",
        "first_stage_model.decoder.up.0.upsample.conv.weight",
    ] {
        assert!(tables.classify(absent).is_err(), "`{absent}` should not exist in SD1.5");
    }
}
