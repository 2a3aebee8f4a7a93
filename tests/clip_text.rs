//! transformers' `CLIPTextModel` against `../shared/fixtures/clip_text_tiny/` (last hidden state,
//! pooled output, every layer; float32 and float64 references) and the text encoder of
//! `../shared/fixtures/sd15_tiny_pipeline/` (prompt embeddings of its stored token ids), on the
//! CPU and the GPU; plus a float64 reference written here for the `gelu` variant, the pooling
//! rule, the embedding's gradient, and the loader's errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use safetensors::{Dtype, SafeTensors};
use vipo::models::clip_text::{embedding, eos_positions, ClipTextConfig, ClipTextModel, ClipTextOutput};
use vipo::params::ParamStore;
use vipo::{DType, Device, Tensor};

/// Target of the fixtures' README for a float32 implementation.
const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}
fn tiny_dir() -> PathBuf {
    fixtures().join("clip_text_tiny")
}
fn sd15_dir() -> PathBuf {
    fixtures().join("sd15_tiny_pipeline")
}

/// A safetensors file's tensors as f64, with shapes; int64 ids too.
struct Fixture(HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Fixture {
    fn read(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut m = HashMap::new();
        for (name, v) in st.tensors() {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                _ => continue,
            };
            m.insert(name.to_string(), (v.shape().to_vec(), vals));
        }
        Fixture(m)
    }
    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.0.get(name).unwrap_or_else(|| panic!("fixture tensor `{name}` missing"))
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        self.get(name).1.iter().map(|&v| v as f32).collect()
    }
    fn ids(&self, name: &str) -> Vec<Vec<u32>> {
        let (shape, v) = self.get(name);
        v.chunks(shape[1]).map(|r| r.iter().map(|&x| x as u32).collect()).collect()
    }
}

fn tiny_fixture() -> Fixture {
    Fixture::read(&tiny_dir().join("fixtures.safetensors"))
}

fn tiny_config() -> ClipTextConfig {
    ClipTextConfig::from_file(tiny_dir().join("config.json")).unwrap()
}

fn run(model: &ClipTextModel, ids: &[Vec<u32>], hidden: bool) -> ClipTextOutput {
    let _ng = vipo::autograd::no_grad();
    model.forward_with(ids, hidden).unwrap()
}

fn v(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

/// Checks every output of the tiny model against the fixture; returns the worst error.
fn check_tiny(model: &ClipTextModel, fx: &Fixture, label: &str) -> f64 {
    let ids = fx.ids("input_ids");
    let out = run(model, &ids, true);
    assert_eq!(out.last_hidden_state.shape(), &[3, 77, 32]);
    assert_eq!(out.pooled.shape(), &[3, 32]);
    let hs = out.hidden_states.as_ref().expect("hidden states");
    assert_eq!(hs.len(), 4);
    let mut worst = 0f64;
    let mut check = |what: &str, got: &Tensor, want: Vec<f32>| {
        let e = rel_err(&v(got), &want);
        eprintln!("{label} {what}: rel err {e:.2e}");
        assert_close(&format!("{label} {what}"), &v(got), &want, TOL, 0);
        worst = worst.max(e);
    };
    for (i, h) in hs.iter().enumerate() {
        check(&format!("hidden_states.{i}"), h, fx.f32(&format!("hidden_states.{i}")));
    }
    check("last_hidden_state", &out.last_hidden_state, fx.f32("last_hidden_state"));
    check("last_hidden_state vs f64", &out.last_hidden_state, fx.f32("last_hidden_state_f64"));
    check("pooler_output", &out.pooled, fx.f32("pooler_output"));
    worst
}

#[test]
fn tiny_matches_transformers_on_cpu() {
    let store = ParamStore::load_safetensors(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let model = ClipTextModel::load(&store, &tiny_config()).unwrap();
    assert_eq!(model.prefix, "text_model");
    let fx = tiny_fixture();
    check_tiny(&model, &fx, "cpu");
    // forward == forward_with(.., false), without hidden states
    let ids = fx.ids("input_ids");
    let _ng = vipo::autograd::no_grad();
    let plain = model.forward(&ids).unwrap();
    assert!(plain.hidden_states.is_none());
    assert_eq!(v(&plain.last_hidden_state), v(&run(&model, &ids, true).last_hidden_state));
    // a batch of one, and rows as slices, give the same rows
    let one = model.forward(&[ids[1].as_slice()]).unwrap();
    assert_close(
        "batch of one",
        &v(&one.last_hidden_state),
        &v(&plain.last_hidden_state)[77 * 32..2 * 77 * 32],
        1e-6,
        0,
    );
}

#[test]
fn tiny_matches_transformers_on_gpu() {
    let Some(g) = gpu() else { return };
    let t0 = std::time::Instant::now();
    let model = ClipTextModel::from_dir(tiny_dir(), &g).unwrap();
    assert!(model.device() == g);
    check_tiny(&model, &tiny_fixture(), "gpu");
    // The host copy of the token table is reused until the param's value changes.
    let fx = tiny_fixture();
    let ids = fx.ids("input_ids");
    let a = run(&model, &ids[..1], false).last_hidden_state;
    let w = &model.embeddings.token_embedding.weight;
    let new = w.frozen_value().mul_scalar(2.0).unwrap();
    w.set_value(new).unwrap();
    let b = run(&model, &ids[..1], false).last_hidden_state;
    assert!(rel_err(&v(&b), &v(&a)) > 1e-2, "a new token table was not picked up on the GPU");
    eprintln!("gpu tiny: {:.1} s", t0.elapsed().as_secs_f64());
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("vipo_clip_text_{tag}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tiny checkpoint's tensors with each key renamed by `rename` (None drops it).
fn renamed_store(rename: impl Fn(&str) -> Option<String>) -> ParamStore {
    let src = ParamStore::load_safetensors(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out = ParamStore::new();
    for (k, p) in src.iter() {
        if let Some(n) = rename(k) {
            out.insert(n, p.frozen_value(), true).unwrap();
        }
    }
    out
}

#[test]
fn loads_without_the_text_model_prefix() {
    let tmp = TempDir::new("stripped");
    let store = renamed_store(|k| Some(k.strip_prefix("text_model.").unwrap().to_string()));
    assert!(store.contains("embeddings.token_embedding.weight"));
    store.save_safetensors(tmp.0.join("model.safetensors"), DType::F32).unwrap();
    std::fs::copy(tiny_dir().join("config.json"), tmp.0.join("config.json")).unwrap();
    let stripped = ClipTextModel::from_dir(&tmp.0, &Device::Cpu).unwrap();
    assert_eq!(stripped.prefix, "");
    let fx = tiny_fixture();
    check_tiny(&stripped, &fx, "cpu, no prefix");
    let with = ClipTextModel::from_dir(tiny_dir(), &Device::Cpu).unwrap();
    let ids = fx.ids("input_ids");
    assert_eq!(v(&run(&stripped, &ids, false).last_hidden_state), v(&run(&with, &ids, false).last_hidden_state));
    if let Some(g) = gpu() {
        let m = ClipTextModel::from_dir(&tmp.0, &g).unwrap();
        let got = run(&m, &ids[2..], false).last_hidden_state;
        assert_close("gpu, no prefix", &v(&got), &fx.f32("last_hidden_state")[2 * 77 * 32..], TOL, 0);
    }
}

/// transformers < 4.31 saved the int64 `position_ids` buffer (SD1.5's original file has it).
#[test]
fn loads_a_checkpoint_with_the_position_ids_buffer() {
    let tmp = TempDir::new("position_ids");
    let bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(k, t)| (k.to_string(), t)).collect();
    let pos = safetensors::tensor::TensorView::new(Dtype::I64, vec![1, 77], &ids).unwrap();
    views.push(("text_model.embeddings.position_ids".into(), pos));
    safetensors::serialize_to_file(views, None, &tmp.0.join("model.safetensors")).unwrap();
    std::fs::copy(tiny_dir().join("config.json"), tmp.0.join("config.json")).unwrap();
    let m = ClipTextModel::from_dir(&tmp.0, &Device::Cpu).unwrap();
    assert_eq!(m.params().len(), 52);
    check_tiny(&m, &tiny_fixture(), "cpu, with position_ids");
}

/// The sd15 pipeline's text encoder on the ids diffusers fed it: prompt embeddings.
fn check_sd15(model: &ClipTextModel, tol: f64, label: &str) -> f64 {
    let fx = Fixture::read(&sd15_dir().join("expected.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sd15_dir().join("meta.json")).unwrap()).unwrap();
    let mut worst = 0f64;
    for (ci, case) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let n_tok = case["n_tokens_with_bos_eos"]["prompt"].as_u64().unwrap() as usize;
        // cond and uncond in one batch, as diffusers' CFG does it (they ran separately there)
        let ids =
            [fx.ids(&format!("{name}.input_ids")).remove(0), fx.ids(&format!("{name}.uncond_input_ids")).remove(0)];
        let out = run(model, &ids, false);
        let lhs = v(&out.last_hidden_state);
        let (cond, uncond) = lhs.split_at(77 * 8);
        for (what, got, key) in
            [("prompt_embeds", cond, "prompt_embeds"), ("negative_prompt_embeds", uncond, "negative_prompt_embeds")]
        {
            let want = fx.f32(&format!("{name}.{key}"));
            let e = rel_err(got, &want);
            eprintln!("{label} {name} {what}: rel err {e:.2e}");
            assert_close(&format!("{label} {name} {what}"), got, &want, tol, ci as u64);
            worst = worst.max(e);
        }
        // eos_token_id = 2 in this config: pooled at the largest id, the first EOS (49407).
        let pos = eos_positions(&ids, model.config.eos_token_id);
        assert_eq!(pos[0], n_tok - 1, "{name}: pooled position");
        assert_eq!(ids[0][pos[0]], 49407);
        let pooled = v(&out.pooled);
        assert_eq!(&pooled[..8], &cond[pos[0] * 8..pos[0] * 8 + 8]);
        assert_eq!(&pooled[8..], &uncond[pos[1] * 8..pos[1] * 8 + 8]);
    }
    worst
}

#[test]
fn sd15_text_encoder_reproduces_the_prompt_embeddings() {
    let dir = sd15_dir().join("text_encoder");
    let model = ClipTextModel::from_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.config.vocab_size, 49408);
    assert_eq!(model.config.eos_token_id, 2);
    check_sd15(&model, TOL, "cpu");
    // the fp16 variant: the same weights rounded to half precision
    let half = ClipTextModel::from_dir_variant(&dir, &Device::Cpu, Some("fp16")).unwrap();
    let e = check_sd15(&half, 2e-3, "cpu fp16 weights");
    eprintln!("fp16 weights vs f32 reference: {e:.2e}");
    if let Some(g) = gpu() {
        let m = ClipTextModel::from_dir(&dir, &g).unwrap();
        check_sd15(&m, TOL, "gpu");
    }
}

// ---------------------------------------------------------------------------------------------
// float64 reference of the whole model, for the `gelu` variant

struct RefModel {
    w: HashMap<String, Vec<f64>>,
    c: usize,
    heads: usize,
    layers: usize,
    eps: f64,
    act: fn(f64) -> f64,
}

fn quick_gelu64(x: f64) -> f64 {
    x / (1.0 + (-1.702 * x).exp())
}
fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2))
}

impl RefModel {
    fn new(act: fn(f64) -> f64) -> RefModel {
        let fx = Fixture::read(&tiny_dir().join("model.safetensors"));
        let cfg = tiny_config();
        RefModel {
            w: fx.0.into_iter().map(|(k, (_, v))| (k, v)).collect(),
            c: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            eps: cfg.layer_norm_eps,
            act,
        }
    }
    fn p(&self, k: &str) -> &[f64] {
        &self.w[&format!("text_model.{k}")]
    }
    /// x (L, in) -> (L, out) with weight (out, in).
    fn linear(&self, x: &[f64], name: &str) -> Vec<f64> {
        let (w, b) = (self.p(&format!("{name}.weight")), self.p(&format!("{name}.bias")));
        let (out, inn) = (b.len(), w.len() / b.len());
        x.chunks(inn)
            .flat_map(|r| (0..out).map(move |o| b[o] + (0..inn).map(|i| w[o * inn + i] * r[i]).sum::<f64>()))
            .collect()
    }
    fn layer_norm(&self, x: &[f64], name: &str) -> Vec<f64> {
        let (w, b) = (self.p(&format!("{name}.weight")), self.p(&format!("{name}.bias")));
        x.chunks(self.c)
            .flat_map(|r| {
                let m = r.iter().sum::<f64>() / r.len() as f64;
                let var = r.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / r.len() as f64;
                let s = 1.0 / (var + self.eps).sqrt();
                r.iter().enumerate().map(move |(i, v)| (v - m) * s * w[i] + b[i])
            })
            .collect()
    }
    /// One row of ids -> (hidden states per layer, last hidden state), each (L, C).
    fn forward(&self, ids: &[u32]) -> (Vec<Vec<f64>>, Vec<f64>) {
        let (c, l) = (self.c, ids.len());
        let (tok, pos) = (self.p("embeddings.token_embedding.weight"), self.p("embeddings.position_embedding.weight"));
        let mut h: Vec<f64> = ids
            .iter()
            .enumerate()
            .flat_map(|(t, &id)| (0..c).map(move |j| tok[id as usize * c + j] + pos[t * c + j]))
            .collect();
        let mut states = vec![h.clone()];
        let d = c / self.heads;
        for n in 0..self.layers {
            let pre = format!("encoder.layers.{n}");
            let x = self.layer_norm(&h, &format!("{pre}.layer_norm1"));
            let q = self.linear(&x, &format!("{pre}.self_attn.q_proj"));
            let k = self.linear(&x, &format!("{pre}.self_attn.k_proj"));
            let vv = self.linear(&x, &format!("{pre}.self_attn.v_proj"));
            let mut o = vec![0f64; l * c];
            for hd in 0..self.heads {
                for i in 0..l {
                    // causal: keys 0..=i only
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d).map(|e| q[i * c + hd * d + e] * k[j * c + hd * d + e]).sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - m).exp() / z;
                        for e in 0..d {
                            o[i * c + hd * d + e] += p * vv[j * c + hd * d + e];
                        }
                    }
                }
            }
            let a = self.linear(&o, &format!("{pre}.self_attn.out_proj"));
            h.iter_mut().zip(&a).for_each(|(h, a)| *h += a);
            let x = self.layer_norm(&h, &format!("{pre}.layer_norm2"));
            let f: Vec<f64> = self.linear(&x, &format!("{pre}.mlp.fc1")).into_iter().map(self.act).collect();
            let m = self.linear(&f, &format!("{pre}.mlp.fc2"));
            h.iter_mut().zip(&m).for_each(|(h, m)| *h += m);
            states.push(h.clone());
        }
        let last = self.layer_norm(&h, "final_layer_norm");
        (states, last)
    }
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn gelu_variant_matches_a_float64_reference() {
    let fx = tiny_fixture();
    let ids = fx.ids("input_ids");
    // The reference itself, with quick_gelu, against transformers' float64 run.
    let quick = RefModel::new(quick_gelu64);
    let want64 = &fx.get("last_hidden_state_f64").1;
    for (b, row) in ids.iter().enumerate() {
        let (_, last) = quick.forward(row);
        let scale = want64.iter().fold(0f64, |m, x| m.max(x.abs()));
        let err = last.iter().zip(&want64[b * 77 * 32..]).fold(0f64, |m, (a, w)| m.max((a - w).abs())) / scale;
        assert!(err < 1e-10, "f64 reference vs transformers f64, row {b}: {err:.2e}");
    }
    // gelu: the same weights, hidden_act switched.
    let text = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap().replace("\"quick_gelu\"", "\"gelu\"");
    let cfg = ClipTextConfig::from_json_str(&text).unwrap();
    let gelu = RefModel::new(gelu64);
    let rows = [ids[0].clone(), ids[2].clone()];
    let mut want = Vec::new();
    let mut want_hidden = Vec::new();
    for row in &rows {
        let (states, last) = gelu.forward(row);
        want.extend(to32(&last));
        want_hidden.push(to32(&states[2]));
    }
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu());
    for dev in devices {
        let store = ParamStore::load_safetensors(tiny_dir().join("model.safetensors"), &dev).unwrap();
        let model = ClipTextModel::load(&store, &cfg).unwrap();
        let out = run(&model, &rows, true);
        let got = v(&out.last_hidden_state);
        eprintln!("gelu on {dev}: rel err vs f64 {:.2e}", rel_err(&got, &want));
        assert_close(&format!("gelu last_hidden_state on {dev}"), &got, &want, TOL, 0);
        let h2 = v(&out.hidden_states.unwrap()[2]);
        assert_close(&format!("gelu hidden_states.2 row 1 on {dev}"), &h2[77 * 32..], &want_hidden[1], TOL, 0);
        // and the activation did change the result
        let quick_lhs = fx.f32("last_hidden_state");
        let quick_rows: Vec<f32> = quick_lhs[..77 * 32].iter().chain(&quick_lhs[2 * 77 * 32..]).cloned().collect();
        assert!(rel_err(&got, &quick_rows) > 1e-3, "gelu and quick_gelu agree: the activation was not switched");
    }
}

#[test]
fn pooling_follows_transformers() {
    // eos_token_id != 2: the first EOS, position 0 when there is none
    let rows = vec![vec![5, 7, 9, 9, 3], vec![9, 1, 2, 3, 4], vec![1, 2, 3, 4, 5]];
    assert_eq!(eos_positions(&rows, 9), vec![2, 0, 0]);
    // eos_token_id == 2 (legacy configs): the argmax of the ids, first one on ties
    let rows = vec![vec![0, 5, 49407, 49407], vec![3, 2, 1, 0], vec![4, 8, 8, 1]];
    assert_eq!(eos_positions(&rows, 2), vec![2, 0, 1]);
}

#[test]
fn embedding_gathers_rows_and_its_gradient_scatters() {
    let (vocab, dim) = (7, 5);
    let ids = [3u32, 0, 6, 3, 3, 1]; // repeats accumulate, row 2/4/5 get nothing
    let w = randn(vocab * dim, 41);
    let out = embedding(&ids, &Tensor::from_slice(&w, &[vocab, dim], &Device::Cpu).unwrap()).unwrap();
    assert_eq!(out.shape(), &[ids.len(), dim]);
    let want: Vec<f32> = ids.iter().flat_map(|&i| w[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
    assert_eq!(v(&out), want);
    if let Some(g) = gpu() {
        let o = embedding(&ids, &Tensor::from_slice(&w, &[vocab, dim], &g).unwrap()).unwrap();
        assert!(o.device() == g);
        assert_eq!(v(&o), want);
    }
    let worst =
        check_grads("embedding", 41, &[(w, vec![vocab, dim])], &[], 1e-2, 1e-3, 1e-6, |x| embedding(&ids, &x[0]));
    eprintln!("embedding grad vs finite differences: {worst:.2e}");
    let err = embedding(&[7], &Tensor::from_slice(&randn(vocab * dim, 1), &[vocab, dim], &Device::Cpu).unwrap());
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("token id 7") && msg.contains("vocabulary of 7"), "{msg}");
}

/// Gradients through the whole model (CPU): token and position embeddings, a projection.
#[test]
fn model_backward_matches_finite_differences() {
    let store = ParamStore::load_safetensors(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let model = ClipTextModel::load(&store, &tiny_config()).unwrap();
    let ids = vec![vec![998u32, 17, 400, 17, 999, 999, 999]]; // 7 positions
    let r = randn(7 * 32, 77);
    let rt = Tensor::from_slice(&r, &[1, 7, 32], &Device::Cpu).unwrap();
    let loss_of = |m: &ClipTextModel| -> f64 {
        let _ng = vipo::autograd::no_grad();
        let y = v(&m.forward(&ids).unwrap().last_hidden_state);
        y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let out = model.forward(&ids).unwrap();
    out.last_hidden_state.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
    let checks = [
        ("text_model.embeddings.token_embedding.weight", 17 * 32 + 3),
        ("text_model.embeddings.token_embedding.weight", 999 * 32 + 30),
        ("text_model.embeddings.position_embedding.weight", 5 * 32 + 11),
        ("text_model.encoder.layers.1.self_attn.q_proj.weight", 40),
        ("text_model.encoder.layers.0.mlp.fc1.bias", 9),
    ];
    for (key, j) in checks {
        let p = store.get(key).unwrap();
        let g = v(&p.grad().unwrap_or_else(|| panic!("{key}: no gradient")));
        let scale = g.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        let base = v(&p.frozen_value());
        let eps = 1e-2f32;
        let at = |delta: f32| {
            let mut w = base.clone();
            w[j] += delta;
            p.set_value(Tensor::from_vec(w, p.shape(), &Device::Cpu).unwrap()).unwrap();
            loss_of(&model)
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        p.set_value(Tensor::from_vec(base, p.shape(), &Device::Cpu).unwrap()).unwrap();
        let err = (numeric - g[j] as f64).abs() / scale;
        eprintln!("{key}[{j}]: analytic {} numeric {numeric:.6} rel err {err:.2e}", g[j]);
        assert!(err < 1e-2, "{key}[{j}]: analytic {} vs numeric {numeric}", g[j]);
    }
    // unused token rows get exactly zero
    let g = v(&store.get("text_model.embeddings.token_embedding.weight").unwrap().grad().unwrap());
    assert!(g[18 * 32..19 * 32].iter().all(|&x| x == 0.0));
    // frozen: nothing records
    model.set_trainable(false);
    assert!(!model.forward(&ids).unwrap().last_hidden_state.is_tracked());
}

fn err_text<T>(r: vipo::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_parsing_and_errors() {
    let text = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap();
    let cfg = ClipTextConfig::from_json_str(&text).unwrap();
    assert_eq!((cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.eos_token_id), (1000, 32, 3, 999));
    assert_eq!(cfg.checkpoint_dtype(), Some("float32"));
    // transformers 4 spelling, unknown keys, defaults for what is absent
    let old = r#"{"hidden_size": 16, "num_attention_heads": 2, "torch_dtype": "float16", "some_future_key": [1, 2]}"#;
    let cfg = ClipTextConfig::from_json_str(old).unwrap();
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings, cfg.eos_token_id), (49408, 77, 49407));
    assert_eq!(cfg.checkpoint_dtype(), Some("float16"));
    let msg = err_text(ClipTextConfig::from_json_str(&text.replace("\"quick_gelu\"", "\"gelu_new\"")));
    assert!(msg.contains("hidden_act") && msg.contains("gelu_new"), "{msg}");
    let msg = err_text(ClipTextConfig::from_json_str(r#"{"hidden_size": 30, "num_attention_heads": 4}"#));
    assert!(msg.contains("num_attention_heads") && msg.contains("hidden_size = 30"), "{msg}");
    // an unsupported activation in a folder names the file
    let tmp = TempDir::new("bad_act");
    std::fs::write(tmp.0.join("config.json"), text.replace("\"quick_gelu\"", "\"relu\"")).unwrap();
    let msg = err_text(ClipTextModel::from_dir(&tmp.0, &Device::Cpu));
    assert!(msg.contains("hidden_act") && msg.contains("relu") && msg.contains("config.json"), "{msg}");
    // a folder without weights names the file
    let msg = err_text(ClipTextModel::from_dir_variant(tiny_dir(), &Device::Cpu, Some("bf16")));
    assert!(msg.contains("model.bf16.safetensors"), "{msg}");
}

#[test]
fn missing_unexpected_and_misshapen_keys_are_named() {
    let cfg = tiny_config();
    let missing = "text_model.encoder.layers.1.mlp.fc2.bias";
    let store = renamed_store(|k| (k != missing).then(|| k.to_string()));
    let msg = err_text(ClipTextModel::load(&store, &cfg));
    assert!(msg.contains(missing), "{msg}");

    let mut store = renamed_store(|k| Some(k.to_string()));
    let extra = "text_model.encoder.layers.3.mlp.fc1.bias";
    store.insert(extra, Tensor::from_slice(&randn(64, 3), &[64], &Device::Cpu).unwrap(), true).unwrap();
    let msg = err_text(ClipTextModel::load(&store, &cfg));
    assert!(msg.contains(extra), "{msg}");

    // a config that disagrees with the weights (more layers, wider vocabulary)
    let mut more = cfg.clone();
    more.num_hidden_layers = 4;
    let msg = err_text(ClipTextModel::load(&renamed_store(|k| Some(k.to_string())), &more));
    assert!(msg.contains("text_model.encoder.layers.3.layer_norm1.weight"), "{msg}");
    let mut wide = cfg.clone();
    wide.vocab_size = 1001;
    let msg = err_text(ClipTextModel::load(&renamed_store(|k| Some(k.to_string())), &wide));
    assert!(msg.contains("token_embedding.weight") && msg.contains("[1000, 32]"), "{msg}");
}

#[test]
fn bad_ids_are_errors() {
    let model = ClipTextModel::from_dir(tiny_dir(), &Device::Cpu).unwrap();
    let _ng = vipo::autograd::no_grad();
    let msg = err_text(model.forward(&[vec![998u32, 1000, 999]]));
    assert!(msg.contains("token id 1000"), "{msg}");
    let msg = err_text(model.forward(&[vec![998u32, 5, 999], vec![998, 999]]));
    assert!(msg.contains("row 1 has 2 ids"), "{msg}");
    let msg = err_text(model.forward(&[vec![999u32; 78]]));
    assert!(msg.contains("78") && msg.contains("max_position_embeddings"), "{msg}");
    let empty: [Vec<u32>; 0] = [];
    assert!(model.forward(&empty).is_err());
    // shorter sequences than 77 run (positions 0..L) and, the mask being causal, equal the
    // first L positions of the padded sequence
    let out = model.forward(&[vec![998u32, 5, 999]]).unwrap();
    assert_eq!(out.last_hidden_state.shape(), &[1, 3, 32]);
    let mut padded = vec![999u32; 77];
    padded[..2].copy_from_slice(&[998, 5]);
    let full = model.forward(&[padded]).unwrap();
    assert_close("prefix of a padded row", &v(&out.last_hidden_state), &v(&full.last_hidden_state)[..3 * 32], 1e-5, 0);
    assert_eq!(v(&out.pooled), v(&out.last_hidden_state)[2 * 32..]);
}
