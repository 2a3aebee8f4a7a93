//! Named params and safetensors checkpoints (f32/f16/bf16, key/shape errors, atomic saves),
//! AdamW against a float64 closed form and GPU against CPU, clipping, schedules, optimizer
//! state round trips and gradient accumulation.
mod common;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use vipo::optim::{self, AdamW, AdamWConfig, AdamWParams, LrSchedule};
use vipo::params::{Param, ParamStore};
use vipo::{DType, Device, Tensor};

// AdamW in f32 against the f64 closed form over a few steps, relative to max |p|: the
// update's terms are O(lr) and each carries ~1e-7 relative rounding.
const REF_TOL: f64 = 1e-6;
// GPU against the CPU twin (same order of operations; fma contraction and WGSL's sqrt /
// division rounding differ by an ulp or two).
const GPU_TOL: f64 = 1e-6;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo_params_optim_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn t(v: &[f32], s: &[usize], d: &Device) -> Tensor {
    Tensor::from_slice(v, s, d).unwrap()
}

/// torch.optim.AdamW in float64 on one param over the given gradients and learning rates.
fn adamw_ref(p0: &[f32], grads: &[Vec<f32>], lrs: &[f32], cfg: &AdamWConfig) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b1, b2, eps, wd) = (cfg.beta1 as f64, cfg.beta2 as f64, cfg.eps as f64, cfg.weight_decay as f64);
    let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let mut m = vec![0f64; p.len()];
    let mut v = vec![0f64; p.len()];
    for (k, (g, &lr)) in grads.iter().zip(lrs).enumerate() {
        let step = (k + 1) as i32;
        let lr = lr as f64;
        for i in 0..p.len() {
            let g = g[i] as f64;
            p[i] -= lr * wd * p[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let mh = m[i] / (1.0 - b1.powi(step));
            let vh = v[i] / (1.0 - b2.powi(step));
            p[i] -= lr * mh / (vh.sqrt() + eps);
        }
    }
    (p, m, v)
}

fn f64_to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Runs AdamW for `grads.len()` steps on one param of `shape` on `dev`; returns the values.
fn run_adamw(dev: &Device, p0: &[f32], shape: &[usize], grads: &[Vec<f32>], lrs: &[f32], cfg: AdamWConfig) -> Vec<f32> {
    let p = Arc::new(Param::new("w", t(p0, shape, dev), true).unwrap());
    let mut opt = AdamW::new(cfg).unwrap();
    for (g, &lr) in grads.iter().zip(lrs) {
        p.set_grad(Some(t(g, shape, dev))).unwrap();
        assert_eq!(opt.step(std::slice::from_ref(&p), lr).unwrap(), 1);
        assert!(p.frozen_value().device() == *dev);
    }
    assert_eq!(opt.steps(), grads.len() as u64);
    p.frozen_value().to_vec().unwrap()
}

#[test]
fn adamw_matches_float64_closed_form_cpu_and_gpu() {
    let shape = [3usize, 37];
    let n = 111;
    let lrs = [0.01f32, 0.02, 0.05, 0.03];
    for (case, wd) in [0.0f32, 0.1].into_iter().enumerate() {
        let seed = 10 + case as u64;
        let p0 = randn(n, seed);
        let grads: Vec<Vec<f32>> = (0..lrs.len()).map(|k| randn(n, seed * 100 + k as u64)).collect();
        let cfg = AdamWConfig { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: wd };
        let (want, _, _) = adamw_ref(&p0, &grads, &lrs, &cfg);
        let want = f64_to_f32(&want);
        // The reference moved far beyond the tolerance, so the check can fail.
        assert!(rel_err(&p0, &want) > 100.0 * REF_TOL);
        let cpu = run_adamw(&Device::Cpu, &p0, &shape, &grads, &lrs, cfg);
        assert_close(&format!("adamw wd={wd} cpu vs f64"), &cpu, &want, REF_TOL, seed);
        eprintln!("adamw wd={wd}: cpu vs f64 rel err {:.2e}", rel_err(&cpu, &want));
        if let Some(g) = gpu() {
            let gpu_v = run_adamw(&g, &p0, &shape, &grads, &lrs, cfg);
            assert_close(&format!("adamw wd={wd} gpu vs cpu"), &gpu_v, &cpu, GPU_TOL, seed);
            eprintln!("adamw wd={wd}: gpu vs cpu rel err {:.2e}", rel_err(&gpu_v, &cpu));
        }
    }
}

#[test]
fn adamw_kernel_gpu_vs_cpu_awkward_sizes() {
    let cfg = AdamWConfig { lr: 0.03, beta1: 0.85, beta2: 0.99, eps: 1e-6, weight_decay: 0.05 };
    // 70_007 elements: more than 256 workgroups, a partial last one; and a single element.
    for (k, shape) in [vec![7usize, 10_001], vec![1], vec![1, 3, 1]].into_iter().enumerate() {
        let seed = 40 + k as u64;
        let n = numel(&shape);
        let inputs: Vec<Vec<f32>> = vec![
            randn(n, seed),
            randn(n, seed + 1),
            randn(n, seed + 2).iter().map(|x| 0.1 * x).collect(),
            uniform(n, 0.01, 0.5, seed + 3),
        ];
        let h = AdamWParams::for_step(&cfg, 0.02, 7, 0);
        let run = |d: &Device| {
            let ts: Vec<Tensor> = inputs.iter().map(|v| t(v, &shape, d)).collect();
            let (w, m, v) = optim::adamw_update(&ts[0], &ts[1], &ts[2], &ts[3], &h).unwrap();
            assert!(w.device() == *d && w.shape() == shape.as_slice());
            [w.to_vec().unwrap(), m.to_vec().unwrap(), v.to_vec().unwrap()]
        };
        let cpu = run(&Device::Cpu);
        // CPU against float64 for this one step (state given).
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        let (bc1, bc2) = (1.0 - b1.powi(7), 1.0 - b2.powi(7));
        let mut want = [vec![0f32; n], vec![0f32; n], vec![0f32; n]];
        for i in 0..n {
            let (w, g, m, v) = (inputs[0][i] as f64, inputs[1][i] as f64, inputs[2][i] as f64, inputs[3][i] as f64);
            let w = w * (1.0 - 0.02 * cfg.weight_decay as f64);
            let m = b1 * m + (1.0 - b1) * g;
            let v = b2 * v + (1.0 - b2) * g * g;
            want[0][i] = (w - 0.02 * (m / bc1) / ((v / bc2).sqrt() + cfg.eps as f64)) as f32;
            want[1][i] = m as f32;
            want[2][i] = v as f32;
        }
        for (j, what) in ["param", "m", "v"].iter().enumerate() {
            assert_close(&format!("adamw_update {what} {shape:?} cpu vs f64"), &cpu[j], &want[j], REF_TOL, seed);
        }
        if let Some(g) = gpu() {
            let got = run(&g);
            for (j, what) in ["param", "m", "v"].iter().enumerate() {
                assert_close(&format!("adamw_update {what} {shape:?} gpu vs cpu"), &got[j], &cpu[j], GPU_TOL, seed);
                eprintln!("adamw_update {what} {shape:?}: gpu vs cpu rel err {:.2e}", rel_err(&got[j], &cpu[j]));
            }
        }
    }
}

#[test]
fn adamw_is_functional_and_rejects_bad_input() {
    let d = Device::Cpu;
    let w = t(&[1.0, 2.0], &[2], &d);
    let g = t(&[0.5, -0.5], &[2], &d);
    let z = t(&[0.0, 0.0], &[2], &d);
    let h = AdamWParams::for_step(&AdamWConfig::default(), 0.1, 1, 0);
    let (w2, _, _) = optim::adamw_update(&w, &g, &z, &z, &h).unwrap();
    assert!(!w2.same_storage(&w));
    assert_eq!(w.to_vec().unwrap(), vec![1.0, 2.0], "the input storage was mutated");
    let bad = t(&[1.0, 2.0, 3.0], &[3], &d);
    let e = optim::adamw_update(&w, &bad, &z, &z, &h).unwrap_err().to_string();
    assert!(e.contains("adamw") && e.contains("[3]"), "{e}");
    assert!(AdamW::new(AdamWConfig { beta2: 1.0, ..Default::default() }).is_err());
    let p = Arc::new(Param::new("w", w, true).unwrap());
    p.set_grad(Some(g)).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    assert!(opt.step(&[p.clone(), p.clone()], 0.1).is_err(), "a param listed twice");
    assert!(opt.step(std::slice::from_ref(&p), f32::NAN).is_err());
    assert_eq!(p.frozen_value().to_vec().unwrap(), vec![1.0, 2.0], "a failed step changed the param");
    assert!(p.set_grad(Some(bad)).is_err());
}

#[test]
fn frozen_params_record_nothing_and_are_skipped() {
    let d = Device::Cpu;
    let mut store = ParamStore::new();
    let a = store.insert("a", t(&randn(6, 1), &[2, 3], &d), true).unwrap();
    let b = store.insert("b", t(&randn(6, 2), &[2, 3], &d), false).unwrap();
    assert!(a.value().is_tracked());
    assert!(!b.value().is_tracked());
    assert!(!a.frozen_value().is_tracked());
    let y = a.value().mul(&b.value()).unwrap();
    y.backward_with(t(&randn(6, 3), &[2, 3], &d)).unwrap();
    assert!(a.grad().is_some());
    assert!(b.grad().is_none(), "a frozen param got a gradient");
    let b_before = b.frozen_value().to_vec().unwrap();
    let a_before = a.frozen_value().to_vec().unwrap();
    // Even with a gradient set by hand, the optimizer leaves a frozen param alone.
    b.set_grad(Some(t(&[1.0; 6], &[2, 3], &d))).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    assert_eq!(opt.step(&store.params(), 0.1).unwrap(), 1);
    assert_eq!(b.frozen_value().to_vec().unwrap(), b_before);
    assert_ne!(a.frozen_value().to_vec().unwrap(), a_before);
    assert_eq!(store.trainable().len(), 1);
    assert_eq!(store.num_params(), 12);
    assert_eq!(store.num_trainable_params(), 6);
    // The slot survives the update: a new graph accumulates into the same gradient.
    let g0 = a.grad().unwrap().to_vec().unwrap();
    a.value().mul(&b.value()).unwrap().backward_with(t(&randn(6, 3), &[2, 3], &d)).unwrap();
    let g1 = a.grad().unwrap().to_vec().unwrap();
    for i in 0..6 {
        assert!((g1[i] - 2.0 * g0[i]).abs() <= 1e-6 * g0[i].abs().max(1.0), "{i}: {g0:?} {g1:?}");
    }
    store.zero_grad();
    assert!(a.grad().is_none());
    a.set_trainable(false);
    assert!(!a.value().is_tracked());
}

#[test]
fn clip_grad_norm_scales_like_torch() {
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for d in devs {
        let ga = randn(3 * 37, 60);
        let gb = randn(5, 61);
        let want_norm = ga.iter().chain(&gb).map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mk = || {
            let a = Arc::new(Param::new("a", t(&randn(111, 1), &[3, 37], &d), true).unwrap());
            let b = Arc::new(Param::new("b", t(&randn(5, 2), &[5], &d), true).unwrap());
            let c = Arc::new(Param::new("c", t(&[1.0], &[1], &d), true).unwrap()); // no gradient
            a.set_grad(Some(t(&ga, &[3, 37], &d))).unwrap();
            b.set_grad(Some(t(&gb, &[5], &d))).unwrap();
            vec![a, b, c]
        };
        // Below the norm: scaled by max / (norm + 1e-6).
        let ps = mk();
        let max = 2.5f32;
        let norm = optim::clip_grad_norm(&ps, max).unwrap();
        assert!(((norm as f64) - want_norm).abs() <= 1e-5 * want_norm, "{d}: {norm} vs {want_norm}");
        let coef = max as f64 / (want_norm + 1e-6);
        for (p, g) in ps.iter().zip([&ga, &gb]) {
            let want: Vec<f32> = g.iter().map(|&x| (x as f64 * coef) as f32).collect();
            assert_close(
                &format!("clipped {} on {d}", p.name()),
                &p.grad().unwrap().to_vec().unwrap(),
                &want,
                2e-6,
                60,
            );
        }
        assert!(ps[2].grad().is_none());
        // The new norm is max_norm.
        let n2 = optim::clip_grad_norm(&ps, 1e3).unwrap();
        assert!((n2 - max).abs() < 1e-4, "{d}: {n2}");
        // Above the norm: gradients untouched, bit for bit.
        let ps = mk();
        let norm = optim::clip_grad_norm(&ps, (want_norm * 2.0) as f32).unwrap();
        assert!(((norm as f64) - want_norm).abs() <= 1e-5 * want_norm);
        assert_eq!(ps[0].grad().unwrap().to_vec().unwrap(), ga);
        assert_eq!(ps[1].grad().unwrap().to_vec().unwrap(), gb);
    }
    assert_eq!(optim::clip_grad_norm(&[], 1.0).unwrap(), 0.0);
    assert!(optim::clip_grad_norm(&[], 0.0).is_err());
}

#[test]
fn lr_schedules_at_chosen_steps() {
    let base = 1e-3f32;
    let close = |a: f32, b: f64| assert!((a as f64 - b).abs() <= 1e-7 * b.abs().max(1e-12), "{a} vs {b}");
    close(LrSchedule::Constant.lr_at(base, 0), 1e-3);
    close(LrSchedule::Constant.lr_at(base, 12345), 1e-3);
    let w = LrSchedule::LinearWarmup { warmup_steps: 4 };
    close(w.lr_at(base, 0), 0.25e-3);
    close(w.lr_at(base, 1), 0.5e-3);
    close(w.lr_at(base, 3), 1e-3);
    close(w.lr_at(base, 100), 1e-3);
    close(LrSchedule::LinearWarmup { warmup_steps: 0 }.lr_at(base, 0), 1e-3);
    let c = LrSchedule::Cosine { warmup_steps: 10, total_steps: 110, min_lr: 1e-5 };
    close(c.lr_at(base, 0), 1e-4);
    close(c.lr_at(base, 9), 1e-3);
    close(c.lr_at(base, 10), 1e-3);
    // Halfway through the decay: the mean of base and min.
    close(c.lr_at(base, 60), (1e-3 + 1e-5) / 2.0);
    let q = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos());
    close(c.lr_at(base, 35), q);
    close(c.lr_at(base, 110), 1e-5);
    close(c.lr_at(base, 10_000), 1e-5);
    // Serde round trip, as a training config would hold it.
    for s in [LrSchedule::Constant, w, c] {
        let j = serde_json::to_string(&s).unwrap();
        let back: LrSchedule = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s, "{j}");
    }
    let parsed: LrSchedule =
        serde_json::from_str(r#"{"kind":"cosine","warmup_steps":5,"total_steps":50,"min_lr":0.0}"#).unwrap();
    assert_eq!(parsed, LrSchedule::Cosine { warmup_steps: 5, total_steps: 50, min_lr: 0.0 });
    // The optimizer indexes the schedule by its own step count.
    let opt = AdamW::new(AdamWConfig { lr: base, ..Default::default() }).unwrap();
    close(opt.lr_for(&w), 0.25e-3);
}

fn model_store(d: &Device, seed: u64) -> ParamStore {
    let mut s = ParamStore::new();
    s.insert("down_blocks.0.conv.weight", t(&randn(4 * 3 * 3 * 3, seed), &[4, 3, 3, 3], d), true).unwrap();
    s.insert("down_blocks.0.conv.bias", t(&randn(4, seed + 1), &[4], d), true).unwrap();
    s.insert("time_embedding.linear_1.weight", t(&randn(7 * 5, seed + 2), &[7, 5], d), true).unwrap();
    s.insert("norm.weight", t(&randn(5, seed + 3), &[5], d), false).unwrap();
    s
}

fn set_grads(store: &ParamStore, seed: u64) {
    for (k, (_, p)) in store.iter().enumerate() {
        if p.is_trainable() {
            p.set_grad(Some(t(&randn(p.numel(), seed + k as u64), p.shape(), &p.device()))).unwrap();
        }
    }
}

#[test]
fn save_and_resume_reproduces_the_next_step_bit_for_bit() {
    let dir = tmp_dir("resume");
    let d = Device::Cpu;
    let store = model_store(&d, 70);
    let cfg = AdamWConfig { lr: 2e-3, beta1: 0.8, beta2: 0.95, eps: 1e-7, weight_decay: 0.03 };
    let sched = LrSchedule::Cosine { warmup_steps: 2, total_steps: 10, min_lr: 1e-4 };
    let mut opt = AdamW::new(cfg).unwrap();
    for s in 0..3 {
        set_grads(&store, 100 + 10 * s);
        // One param misses a gradient at one step: its own step count falls behind.
        if s == 1 {
            store.get("down_blocks.0.conv.bias").unwrap().zero_grad();
        }
        opt.step(&store.trainable(), opt.lr_for(&sched)).unwrap();
        store.zero_grad();
    }
    let (pf, sf) = (dir.join("model.safetensors"), dir.join("optim.safetensors"));
    store.save_safetensors(&pf, DType::F32).unwrap();
    opt.save_state(&sf).unwrap();

    let store2 = ParamStore::load_safetensors(&pf, &d).unwrap();
    store2.set_trainable_where(|k| k != "norm.weight");
    let mut opt2 = AdamW::new(AdamWConfig::default()).unwrap();
    opt2.load_state(&sf, &store2.trainable()).unwrap();
    assert_eq!(opt2.config, cfg);
    assert_eq!(opt2.steps(), 3);

    for (st, o) in [(&store, &mut opt), (&store2, &mut opt2)] {
        set_grads(st, 500);
        let lr = o.lr_for(&sched);
        o.step(&st.trainable(), lr).unwrap();
    }
    for ((k1, p1), (k2, p2)) in store.iter().zip(store2.iter()) {
        assert_eq!(k1, k2);
        let (a, b) = (p1.frozen_value().to_vec().unwrap(), p2.frozen_value().to_vec().unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{k1} differs after resume");
    }
    // Saving is deterministic: the same state writes the same bytes.
    let (s1, s2) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    opt.save_state(&s1).unwrap();
    opt2.save_state(&s2).unwrap();
    assert_eq!(std::fs::read(&s1).unwrap(), std::fs::read(&s2).unwrap());
    store.save_safetensors(&s1, DType::F32).unwrap();
    store2.save_safetensors(&s2, DType::F32).unwrap();
    assert_eq!(std::fs::read(&s1).unwrap(), std::fs::read(&s2).unwrap());
    // A state file that names a param not given is reported with the file.
    let e = opt2.load_state(&sf, &store2.trainable()[..1]).unwrap_err().to_string();
    assert!(e.contains("optim.safetensors") && e.contains("time_embedding.linear_1.weight"), "{e}");
    let e = opt2.load_state(&pf, &store2.trainable()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("vipo.adamw"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loads_f16_and_bf16_files() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tmp_dir("half");
    let a = randn(2 * 19, 80);
    let b: Vec<f32> = randn(7, 81).iter().map(|x| x * 300.0).collect();
    let a16: Vec<u8> = a.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let b16: Vec<u8> = b.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let views = vec![
        ("a", TensorView::new(Dtype::F16, vec![2, 19], &a16).unwrap()),
        ("b", TensorView::new(Dtype::BF16, vec![7], &b16).unwrap()),
    ];
    let path = dir.join("half.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for d in devs {
        let s = ParamStore::load_safetensors(&path, &d).unwrap();
        let want_a: Vec<f32> = a.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        let want_b: Vec<f32> = b.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        let pa = s.get("a").unwrap();
        assert_eq!(pa.shape(), &[2, 19]);
        assert!(pa.device() == d);
        assert_eq!(pa.frozen_value().to_vec().unwrap(), want_a);
        assert_eq!(s.get("b").unwrap().frozen_value().to_vec().unwrap(), want_b);
        // The rounding is real: the test would see a plain f32 load.
        assert_ne!(want_a, a);
        // Saving as f16 rounds the same way.
        let out = dir.join("out16.safetensors");
        s.save_safetensors(&out, DType::F16).unwrap();
        let back = ParamStore::load_safetensors(&out, &Device::Cpu).unwrap();
        assert_eq!(back.get("a").unwrap().frozen_value().to_vec().unwrap(), want_a);
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().dtype(), Dtype::F16);
    }
    // A value beyond f16's range is an error, not a silent inf; the old file stays.
    let mut big = ParamStore::new();
    big.insert("huge", Tensor::from_slice(&[1.0, 7e4], &[2], &Device::Cpu).unwrap(), true).unwrap();
    let out = dir.join("out16.safetensors");
    let e = big.save_safetensors(&out, DType::F16).unwrap_err().to_string();
    assert!(e.contains("huge") && e.contains("f16"), "{e}");
    assert!(ParamStore::load_safetensors(&out, &Device::Cpu).unwrap().contains("a"));
    assert!(!dir.join("out16.safetensors.tmp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn key_and_shape_errors_are_reported_together() {
    let dir = tmp_dir("errors");
    let d = Device::Cpu;
    let mut file_store = ParamStore::new();
    file_store.insert("a.weight", t(&randn(6, 1), &[2, 3], &d), true).unwrap();
    file_store.insert("b.weight", t(&randn(3, 2), &[3], &d), true).unwrap();
    file_store.insert("d.extra", t(&[1.0], &[1], &d), true).unwrap();
    let path = dir.join("ckpt.safetensors");
    file_store.save_safetensors(&path, DType::F32).unwrap();

    let mut model = ParamStore::new();
    model.insert("a.weight", t(&[0.5; 6], &[2, 3], &d), true).unwrap();
    model.insert("b.weight", t(&[0.5; 4], &[4], &d), true).unwrap();
    model.insert("c.missing", t(&[0.5; 5], &[5], &d), true).unwrap();
    let e = model.load_into(&path).unwrap_err().to_string();
    eprintln!("{e}");
    for needle in ["ckpt.safetensors", "c.missing [5]", "d.extra [1]", "b.weight: the file [3], the model [4]"] {
        assert!(e.contains(needle), "`{needle}` not in: {e}");
    }
    // Nothing was loaded.
    assert_eq!(model.get("a.weight").unwrap().frozen_value().to_vec().unwrap(), vec![0.5; 6]);

    // check() against a model's expectations, naming the file the store came from.
    let loaded = ParamStore::load_safetensors(&path, &d).unwrap();
    let expected: &[(&str, &[usize])] = &[("a.weight", &[2, 3]), ("b.weight", &[4]), ("c.missing", &[5])];
    let e = loaded.check(expected).unwrap_err().to_string();
    for needle in ["ckpt.safetensors", "c.missing [5]", "d.extra [1]", "b.weight: the checkpoint [3], the model [4]"] {
        assert!(e.contains(needle), "`{needle}` not in: {e}");
    }
    loaded.check(&[("a.weight", &[2, 3]), ("b.weight", &[3]), ("d.extra", &[1])]).unwrap();

    // load_into with matching keys works and keeps the params (same Arc).
    let a = loaded.get("a.weight").unwrap();
    let mut other = ParamStore::new();
    other.insert("a.weight", t(&[7.0; 6], &[2, 3], &d), true).unwrap();
    other.insert("b.weight", t(&[7.0; 3], &[3], &d), true).unwrap();
    other.insert("d.extra", t(&[7.0], &[1], &d), true).unwrap();
    let p2 = dir.join("other.safetensors");
    other.save_safetensors(&p2, DType::F32).unwrap();
    loaded.load_into(&p2).unwrap();
    assert_eq!(a.frozen_value().to_vec().unwrap(), vec![7.0; 6]);

    // get: the error names the key and similar ones; the prefix builder composes keys.
    let e = loaded.get("a.weigth").unwrap_err().to_string();
    assert!(e.contains("a.weigth") && e.contains("`a.weight`"), "{e}");
    assert!(loaded.pp("a").get("weight").is_ok());
    let mut s = ParamStore::new();
    s.insert("down_blocks.0.resnets.1.conv1.weight", t(&[1.0], &[1], &d), true).unwrap();
    assert_eq!(s.pp("down_blocks").pp(0).pp("resnets").pp(1).get("conv1.weight").unwrap().shape(), &[1]);
    let e = s.pp("down_blocks").pp(0).get_shaped("resnets.1.conv1.weight", &[2]).unwrap_err().to_string();
    assert!(e.contains("[1]") && e.contains("[2]"), "{e}");
    assert!(s.insert("down_blocks.0.resnets.1.conv1.weight", t(&[1.0], &[1], &d), true).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_and_foreign_files_name_the_file() {
    let dir = tmp_dir("trunc");
    let d = Device::Cpu;
    let store = model_store(&d, 90);
    let path = dir.join("full.safetensors");
    store.save_safetensors(&path, DType::F32).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = ParamStore::load_safetensors(&cut, &d).unwrap_err().to_string();
    assert!(e.contains("cut.safetensors") && e.contains("truncated"), "{e}");
    let e = store.load_into(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.safetensors"), "{e}");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"definitely not a checkpoint").unwrap();
    let e = ParamStore::load_safetensors(&junk, &d).unwrap_err().to_string();
    assert!(e.contains("junk.bin"), "{e}");
    let e = ParamStore::load_safetensors(dir.join("absent.safetensors"), &d).unwrap_err().to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn atomic_save_leaves_no_tmp_behind() {
    let dir = tmp_dir("atomic");
    let d = Device::Cpu;
    let store = model_store(&d, 95);
    let path = dir.join("m.safetensors");
    // An older file is replaced whole.
    std::fs::write(&path, b"old").unwrap();
    store.save_safetensors(&path, DType::F32).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["m.safetensors".to_string()]);
    assert!(!dir.join("m.safetensors.tmp").exists());
    let back = ParamStore::load_safetensors(&path, &d).unwrap();
    for ((k1, p1), (k2, p2)) in store.iter().zip(back.iter()) {
        assert_eq!(k1, k2);
        assert_eq!(p1.frozen_value().to_vec().unwrap(), p2.frozen_value().to_vec().unwrap());
    }
    // A directory that does not exist: an error naming the path, and nothing left anywhere.
    let bad = dir.join("no_such_dir").join("m.safetensors");
    let e = store.save_safetensors(&bad, DType::F32).unwrap_err().to_string();
    assert!(e.contains("no_such_dir"), "{e}");
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    set_grads(&store, 3);
    opt.step(&store.trainable(), 1e-3).unwrap();
    let sp = dir.join("s.safetensors");
    opt.save_state(&sp).unwrap();
    assert!(!dir.join("s.safetensors.tmp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mean squared error of a linear model over `rows` samples, back-propagated; the loss is a
/// mean over those rows (as each micro-batch's loss would be).
fn linear_backward(w: &Param, b: &Param, x: &[f32], y: &[f32], rows: usize, d: &Device) {
    let (fi, fo) = (w.shape()[0], w.shape()[1]);
    let xt = t(x, &[rows, fi], d);
    let yt = t(y, &[rows, fo], d);
    let sq = xt.matmul(&w.value()).unwrap().add(&b.value()).unwrap().sub(&yt).unwrap().square().unwrap();
    // d(mean)/d(each square) = 1 / numel: backward_with seeds that without needing a reduction's backward.
    let seed = Tensor::full(1.0 / (rows * fo) as f32, &[rows, fo], d).unwrap();
    sq.backward_with(seed).unwrap();
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for d in devs {
        let (fi, fo, rows, micro) = (5usize, 3usize, 12usize, 4usize);
        let x = randn(rows * fi, 120);
        let y = randn(rows * fo, 121);
        let mk = || {
            let w = Param::new("w", t(&randn(fi * fo, 122), &[fi, fo], &d), true).unwrap();
            let b = Param::new("b", t(&randn(fo, 123), &[fo], &d), true).unwrap();
            (Arc::new(w), Arc::new(b))
        };
        let (w1, b1) = mk();
        linear_backward(&w1, &b1, &x, &y, rows, &d);
        let (w2, b2) = mk();
        let per = rows / micro;
        for k in 0..micro {
            let xs = &x[k * per * fi..(k + 1) * per * fi];
            let ys = &y[k * per * fo..(k + 1) * per * fo];
            linear_backward(&w2, &b2, xs, ys, per, &d);
        }
        let ps = [w2.clone(), b2.clone()];
        optim::scale_grads(&ps, 1.0 / micro as f32).unwrap();
        for (a, b) in [(&w1, &w2), (&b1, &b2)] {
            let (ga, gb) = (a.grad().unwrap().to_vec().unwrap(), b.grad().unwrap().to_vec().unwrap());
            assert_close(&format!("accumulated grad {} on {d}", a.name()), &gb, &ga, 1e-5, 120);
        }
        // The same steps follow from either.
        let mut o1 = AdamW::new(AdamWConfig::default()).unwrap();
        let mut o2 = AdamW::new(AdamWConfig::default()).unwrap();
        o1.step(&[w1.clone(), b1.clone()], 0.01).unwrap();
        o2.step(&ps, 0.01).unwrap();
        let (v1, v2) = (w1.frozen_value().to_vec().unwrap(), w2.frozen_value().to_vec().unwrap());
        assert_close(&format!("param after accumulated step on {d}"), &v2, &v1, 1e-5, 120);
    }
}

#[test]
fn params_move_between_devices_with_their_state() {
    let Some(g) = gpu() else { return };
    let store = model_store(&Device::Cpu, 130);
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    set_grads(&store, 131);
    opt.step(&store.trainable(), 1e-2).unwrap();
    // A CPU twin of the same run, to compare against.
    let cpu_store = model_store(&Device::Cpu, 130);
    let mut cpu_opt = AdamW::new(AdamWConfig::default()).unwrap();
    set_grads(&cpu_store, 131);
    cpu_opt.step(&cpu_store.trainable(), 1e-2).unwrap();
    // Move to the GPU mid-run: the moments follow on the next step.
    store.to(&g).unwrap();
    assert!(store.iter().all(|(_, p)| p.device() == g));
    for (s, o) in [(&store, &mut opt), (&cpu_store, &mut cpu_opt)] {
        set_grads(s, 132);
        o.step(&s.trainable(), 1e-2).unwrap();
    }
    for ((k, a), (_, b)) in store.iter().zip(cpu_store.iter()) {
        let (va, vb) = (a.frozen_value().to_vec().unwrap(), b.frozen_value().to_vec().unwrap());
        assert_close(&format!("{k} gpu-moved vs cpu"), &va, &vb, GPU_TOL, 130);
    }
    // A GPU state saves and reloads onto CPU params.
    let dir = tmp_dir("move");
    opt.save_state(dir.join("s.safetensors")).unwrap();
    let mut back = AdamW::new(AdamWConfig::default()).unwrap();
    back.load_state(dir.join("s.safetensors"), &cpu_store.trainable()).unwrap();
    assert_eq!(back.steps(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}
