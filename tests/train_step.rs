//! The device-resident training step: the Poly-DPO and KTO heads (and SFT's mean), the gradients' sums of squares and
//! the step guard (`shaders/train_step.wgsl`) against their CPU twins and against float64;
//! AdamW under a guard; and the trainer's GPU step, which reads back once: the same numbers
//! as the host head and clipping, one command buffer with `VIPO_DISPATCHES_PER_SUBMIT=0`,
//! and a NaN that leaves weights and optimizer exactly as they were.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use vipo::ops::train_step::{kto_head, poly_dpo_head, step_guard, sumsq_partials, HeadLayout, KtoLayout, SUMSQ_CHUNK};
use vipo::optim::{adamw_update, adamw_update_guarded, AdamWConfig, AdamWParams};
use vipo::train::config::{ObjectiveKind, TrainConfig};
use vipo::train::objective::{DeviceHead, Objective, ObjectiveConfig};
use vipo::train::trainer::Trainer;
use vipo::{Device, Tensor};

/// Errors that are multiples of 2^-20 in [0.5, 1): every difference the head takes is exact
/// in f32, so f32 and float64 differ only by the scale's rounding and exp/log.
fn errors(n: usize, seed: u64) -> Vec<f32> {
    uniform(n, 0.5, 1.0, seed).iter().map(|&v| (v * 1048576.0).floor() / 1048576.0).collect()
}

/// Policy errors near the reference's, so that z = -s (model_diff - ref_diff) spreads over
/// about [-12, 12], with a few pairs far out (|z| in the hundreds) for the tails.
fn policy_errors(r: &[f32], s: f32, seed: u64) -> Vec<f32> {
    let d = randn(r.len(), seed);
    r.iter()
        .zip(&d)
        .enumerate()
        .map(|(i, (&r, &d))| {
            let spread = if i % 11 == 5 { 100.0 } else { 4.0 };
            let v = r + d * spread / s;
            ((v * 1048576.0).round() / 1048576.0).clamp(0.5, 0.999)
        })
        .collect()
}

fn segment(v: &[f32], at: usize, len: usize) -> Vec<f32> {
    v[at..at + len].to_vec()
}

#[test]
fn poly_dpo_head_matches_float64_and_gpu_matches_cpu() {
    for (k, &(n, alpha, beta, half)) in
        [(1usize, 0.0, 5000.0, true), (3, 1.0, 5000.0, true), (37, 2.5, 2500.0, false), (301, 0.0, 3.0, true)]
            .iter()
            .enumerate()
    {
        let seed = 40 + k as u64;
        let cfg = ObjectiveConfig {
            objective: if alpha == 0.0 { Objective::Dpo } else { Objective::PolyDpo { alpha } },
            beta,
            half_factor: half,
            ..ObjectiveConfig::default()
        };
        let s = cfg.logit_scale() as f32;
        let r = errors(2 * n, seed);
        let e = policy_errors(&r, s, seed + 100);
        let want = cfg
            .head(
                &e.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                Some(&r.iter().map(|&v| v as f64).collect::<Vec<_>>()),
                None,
            )
            .unwrap();
        let lay = HeadLayout { pairs: n };
        let what = format!("head n={n} alpha={alpha} s={s}");
        let cpu = {
            let et = Tensor::from_slice(&e, &[2 * n], &Device::Cpu).unwrap();
            let rt = Tensor::from_slice(&r, &[2 * n], &Device::Cpu).unwrap();
            poly_dpo_head(&et, &rt, s, alpha as f32).unwrap().to_vec().unwrap()
        };
        assert_eq!(cpu.len(), lay.size());
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        // Against float64: the differences exactly, z to its one rounding, the rest to exp/log.
        assert_eq!(segment(&cpu, lay.model_diff(), n), f32s(&want.model_diff), "{what}: model_diff");
        assert_eq!(segment(&cpu, lay.ref_diff(), n), f32s(&want.ref_diff), "{what}: ref_diff");
        assert_close(&format!("{what} z"), &segment(&cpu, lay.z(), n), &f32s(&want.z), 1e-6, seed);
        assert_close(&format!("{what} p"), &segment(&cpu, lay.p(), n), &f32s(&want.p), 1e-5, seed);
        assert_close(
            &format!("{what} dL/derr"),
            &segment(&cpu, lay.dloss_derr(), 2 * n),
            &f32s(&want.dloss_derr),
            1e-5,
            seed,
        );
        assert_close(&format!("{what} loss"), &cpu[..1], &[want.loss as f32], 1e-5, seed);
        // The statistics read back from a device loss are the host head's.
        let mut read = cpu.clone();
        read.extend(&e);
        read.extend(&r);
        let st = cfg.stats_from_readout(&read, DeviceHead::Dpo { pairs: n }).unwrap();
        assert_eq!(st.implicit_acc, want.implicit_acc, "{what}: implicit accuracy");
        assert!(
            (st.reward_margin.unwrap() - want.reward_margin.unwrap()).abs()
                <= 1e-5 * (1.0 + want.reward_margin.unwrap().abs())
        );
        assert_eq!(st.policy_err, want.policy_err);
        if let Some(g) = gpu() {
            let et = Tensor::from_slice(&e, &[2 * n], &g).unwrap();
            let rt = Tensor::from_slice(&r, &[2 * n], &g).unwrap();
            let got = poly_dpo_head(&et, &rt, s, alpha as f32).unwrap().to_vec().unwrap();
            for (name, at, len, tol) in [
                ("loss", 0, 1, 1e-4),
                ("z", lay.z(), n, 1e-6),
                ("p", lay.p(), n, 1e-5),
                ("model_diff", lay.model_diff(), n, 0.0),
                ("ref_diff", lay.ref_diff(), n, 0.0),
                ("dL/derr", lay.dloss_derr(), 2 * n, 1e-5),
            ] {
                assert_close(
                    &format!("{what} {name} gpu vs cpu"),
                    &segment(&got, at, len),
                    &segment(&cpu, at, len),
                    tol,
                    seed,
                );
            }
        }
    }
}

#[test]
fn kto_head_matches_float64_and_gpu_matches_cpu() {
    // (samples, desirable, beta, lambda_D, lambda_U): the trainer's cat(w, l) halves, and
    // uneven labels (the kernel takes any count of leading desirable samples).
    for (k, &(b, good, beta, ld, lu)) in [
        (2usize, 1usize, 5000.0, 1.0, 1.0),
        (6, 3, 2000.0, 1.0, 1.5),
        (7, 2, 5000.0, 0.7, 1.0),
        (602, 301, 500.0, 1.0, 1.0),
    ]
    .iter()
    .enumerate()
    {
        let seed = 60 + k as u64;
        let cfg = ObjectiveConfig {
            objective: Objective::Kto,
            beta,
            kto_lambda_desirable: ld,
            kto_lambda_undesirable: lu,
            ..ObjectiveConfig::default()
        };
        let r = errors(b, seed);
        // Cases 1 and 3 have their policy errors lowered by 64/beta, so that the mean of
        // g = r - e is positive and Q = max(mean g, 0) is that mean (in the others it may be 0).
        let bias = if k % 2 == 1 { ((64.0 / beta) * 1048576.0f64).round() as f32 / 1048576.0 } else { 0.0 };
        let e: Vec<f32> = policy_errors(&r, beta as f32, seed + 100).iter().map(|&v| v - bias).collect();
        let labels: Vec<bool> = (0..b).map(|j| j < good).collect();
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let want = cfg.head(&f64s(&e), Some(&f64s(&r)), Some(&labels)).unwrap();
        let lay = KtoLayout { samples: b };
        let what = format!("kto head b={b} desirable={good} beta={beta}");
        let on = |d: &Device| {
            let et = Tensor::from_slice(&e, &[b], d).unwrap();
            let rt = Tensor::from_slice(&r, &[b], d).unwrap();
            kto_head(&et, &rt, good, beta as f32, ld as f32, lu as f32).unwrap().to_vec().unwrap()
        };
        let cpu = on(&Device::Cpu);
        assert_eq!(cpu.len(), lay.size());
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let q = want.kto_reference_point.unwrap() as f32;
        assert!(q > 0.0 || bias == 0.0, "{what}: Q {q} with the policy's errors lowered");
        if q == 0.0 {
            assert_eq!(cpu[lay.q()], 0.0, "{what}: Q is clamped at 0");
        } else {
            assert_close(&format!("{what} Q"), &cpu[lay.q()..lay.q() + 1], &[q], 1e-6, seed);
        }
        assert_close(&format!("{what} u"), &segment(&cpu, lay.u(), b), &f32s(&want.z), 1e-5, seed);
        assert_close(&format!("{what} h"), &segment(&cpu, lay.h(), b), &f32s(&want.p), 1e-5, seed);
        let dl = segment(&cpu, lay.dloss_derr(), b);
        assert_close(&format!("{what} dL/derr"), &dl, &f32s(&want.dloss_derr), 1e-5, seed);
        assert_close(&format!("{what} loss"), &cpu[..1], &[want.loss as f32], 1e-5, seed);
        // The statistics read back in the trainer's layout (cat(w, l), winners desirable).
        if 2 * good == b {
            let mut read = cpu.clone();
            read.extend(&e);
            read.extend(&r);
            let st = cfg.stats_from_readout(&read, DeviceHead::Kto { samples: b }).unwrap();
            assert_eq!(st.implicit_acc, want.implicit_acc, "{what}: implicit accuracy");
            assert_eq!((st.policy_err, st.ref_err), (want.policy_err.clone(), want.ref_err.clone()));
        }
        if let Some(g) = gpu() {
            let got = on(&g);
            for (name, at, len, tol) in [
                ("loss", 0, 1, 1e-5),
                ("Q", lay.q(), 1, 1e-6),
                ("u", lay.u(), b, 1e-5),
                ("h", lay.h(), b, 1e-5),
                ("dL/derr", lay.dloss_derr(), b, 1e-5),
            ] {
                let (gv, cv) = (segment(&got, at, len), segment(&cpu, at, len));
                if cv.iter().all(|&v| v == 0.0) {
                    assert_eq!(gv, cv, "{what} {name}: gpu vs cpu");
                } else {
                    assert_close(&format!("{what} {name} gpu vs cpu"), &gv, &cv, tol, seed);
                }
            }
        }
    }
}

#[test]
fn sft_and_kto_device_losses_match_the_host_heads() {
    // loss_on_device for SFT (a mean, its gradient 1/B) and KTO (the kernel) against the f64
    // host head, loss and the gradient it sends into the errors, on every device.
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        for objective in [Objective::Sft, Objective::Kto] {
            let cfg = ObjectiveConfig { objective, beta: 2000.0, ..ObjectiveConfig::default() };
            let r = errors(6, 70);
            let e = policy_errors(&r, 2000.0, 71);
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let labels = vec![true, true, true, false, false, false];
            let (host, b) = match objective {
                // SFT trains on the winners alone, all desirable.
                Objective::Sft => (cfg.head(&f64s(&e[..3]), None, Some(&[true; 3])).unwrap(), 3),
                _ => (cfg.head(&f64s(&e), Some(&f64s(&r)), Some(&labels)).unwrap(), 6),
            };
            let err = Tensor::from_slice(&e[..b], &[b], &dev).unwrap().requires_grad();
            let rt = Tensor::from_slice(&r, &[6], &dev).unwrap();
            let out = cfg.loss_on_device(&err, Some(&rt)).unwrap();
            out.loss.backward().unwrap();
            let what = format!("{objective:?} on {dev}");
            let grad = err.grad().unwrap().to_vec().unwrap();
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
            assert_close(&format!("{what}: dL/derr"), &grad, &f32s(&host.dloss_derr), 1e-5, 70);
            let mut parts = vec![];
            for t in out.readout() {
                parts.extend(t.to_vec().unwrap());
            }
            assert_eq!(parts.len(), out.readout_len(), "{what}");
            let st = cfg.stats_from_readout(&parts, out.kind).unwrap();
            assert_close(&format!("{what}: loss"), &[st.loss as f32], &[host.loss as f32], 1e-5, 70);
            assert_close(&format!("{what}: read dL/derr"), &f32s(&st.dloss_derr), &f32s(&host.dloss_derr), 1e-5, 70);
            assert_eq!(st.implicit_acc, host.implicit_acc, "{what}");
            assert_eq!(st.policy_err, f64s(&e[..b]), "{what}");
        }
    }
    // KTO without the reference's errors is an error, SFT needs none.
    let cfg = ObjectiveConfig { objective: Objective::Kto, ..ObjectiveConfig::default() };
    let e = Tensor::from_slice(&[0.5, 0.6], &[2], &Device::Cpu).unwrap();
    assert!(cfg.loss_on_device(&e, None).unwrap_err().to_string().contains("reference"));
}

#[test]
fn poly_dpo_head_rejects_bad_shapes() {
    let d = Device::Cpu;
    let t3 = Tensor::from_slice(&[0.5, 0.6, 0.7], &[3], &d).unwrap();
    let t4 = Tensor::from_slice(&[0.5, 0.6, 0.7, 0.8], &[4], &d).unwrap();
    let m = Tensor::from_slice(&[0.5, 0.6, 0.7, 0.8], &[2, 2], &d).unwrap();
    for (e, r) in [(&t3, &t3), (&t4, &t3), (&m, &m)] {
        let err = poly_dpo_head(e, r, 1.0, 0.0).unwrap_err().to_string();
        assert!(err.contains("poly_dpo_head"), "{err}");
    }
    assert!(poly_dpo_head(&t4, &t4, f32::NAN, 0.0).is_err());
}

fn grads(sizes: &[usize], seed: u64) -> Vec<Vec<f32>> {
    sizes.iter().enumerate().map(|(i, &n)| randn(n, seed + i as u64)).collect()
}

/// Sums of squares in float64, chunk by chunk, and the guard's four values.
fn guard_f64(gs: &[Vec<f32>], losses: &[f32], max_norm: f64) -> (Vec<f32>, [f64; 4]) {
    let mut parts = vec![];
    for g in gs {
        for c in g.chunks(SUMSQ_CHUNK) {
            parts.push(c.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() as f32);
        }
    }
    let norm = gs.iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let loss = losses.iter().map(|&v| v as f64).sum::<f64>() / losses.len() as f64;
    let ok = norm.is_finite() && loss.is_finite();
    let coef = if ok { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
    (parts, [coef, if ok { 1.0 } else { 0.0 }, norm, loss])
}

#[test]
fn gradient_norm_and_guard_match_float64_on_every_device() {
    let sizes = [1usize, 7, 4095, 4097, 3 * SUMSQ_CHUNK + 11];
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in &devs {
        for (case, poison) in ["finite", "nan grad", "inf grad", "nan loss", "inf loss"].iter().enumerate() {
            let seed = 60 + case as u64;
            let mut gs = grads(&sizes, seed);
            let mut losses = vec![0.7f32, 0.61, 0.9];
            let clean_norm = guard_f64(&gs, &losses, 1.0).1[2];
            match *poison {
                "nan grad" => gs[3][4096] = f32::NAN,
                "inf grad" => gs[4][5000] = f32::INFINITY,
                "nan loss" => losses[1] = f32::NAN,
                "inf loss" => losses[2] = f32::INFINITY,
                _ => {}
            }
            let ts: Vec<Tensor> =
                gs.iter().zip(&sizes).map(|(g, &n)| Tensor::from_slice(g, &[n], dev).unwrap()).collect();
            let parts = sumsq_partials(&ts.iter().collect::<Vec<_>>()).unwrap();
            for max_norm in [0.5 * clean_norm, 2.0 * clean_norm] {
                let (want_parts, want) = guard_f64(&gs, &losses, max_norm);
                let what = format!("{poison} on {dev}, max_norm {max_norm:.1}");
                let got_parts = parts.to_vec().unwrap();
                assert_eq!(got_parts.len(), sizes.iter().map(|n| n.div_ceil(SUMSQ_CHUNK)).sum::<usize>());
                if *poison == "finite" || poison.ends_with("loss") {
                    assert_close(&format!("{what}: partial sums"), &got_parts, &want_parts, 1e-5, seed);
                }
                let lt = Tensor::from_slice(&losses, &[losses.len()], dev).unwrap();
                let g = step_guard(&parts, &lt, max_norm as f32).unwrap().to_vec().unwrap();
                assert_eq!(g[1] as f64, want[1], "{what}: ok flag {g:?} want {want:?}");
                if want[1] == 1.0 {
                    for (i, name) in [(0, "coef"), (2, "norm"), (3, "loss")] {
                        let rel = (g[i] as f64 - want[i]).abs() / want[i].abs();
                        assert!(rel < 1e-5, "{what}: {name} {} want {} (rel {rel:.2e})", g[i], want[i]);
                    }
                    assert!(
                        (g[0] < 1.0) == (max_norm < want[2]),
                        "{what}: clipping on exactly when the norm is over max_norm ({g:?})"
                    );
                } else {
                    assert_eq!(g[0], 1.0, "{what}: a skipped step has coefficient 1");
                }
            }
        }
    }
}

#[test]
fn guarded_adamw_clips_or_leaves_everything_as_it_was() {
    let n = 1031;
    let cfg = AdamWConfig { lr: 3e-3, weight_decay: 0.1, ..AdamWConfig::default() };
    let h = AdamWParams::for_step(&cfg, cfg.lr, 3, 0);
    let (w, g, m) = (randn(n, 1), randn(n, 2), randn(n, 3));
    let v: Vec<f32> = uniform(n, 0.01, 1.0, 4);
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    let mut cpu_out: Option<Vec<Vec<f32>>> = None;
    for dev in &devs {
        let t = |x: &[f32]| Tensor::from_slice(x, &[n], dev).unwrap();
        let (wt, gt, mt, vt) = (t(&w), t(&g), t(&m), t(&v));
        // Clipped: the same as the plain update on the gradient times the coefficient.
        let coef = 0.37f32;
        let guard = Tensor::from_slice(&[coef, 1.0, 2.7, 0.69], &[4], dev).unwrap();
        let (w1, m1, v1) = adamw_update_guarded(&wt, &gt, &mt, &vt, &h, &guard).unwrap();
        let scaled: Vec<f32> = g.iter().map(|&x| x * coef).collect();
        let (w2, m2, v2) = adamw_update(&wt, &t(&scaled), &mt, &vt, &h).unwrap();
        let got: Vec<Vec<f32>> = [&w1, &m1, &v1].iter().map(|x| x.to_vec().unwrap()).collect();
        for (a, b) in got.iter().zip([&w2, &m2, &v2]) {
            assert_eq!(a, &b.to_vec().unwrap(), "guarded update on {dev} differs from the scaled one");
        }
        assert!(got[0].iter().zip(&w).any(|(a, b)| a != b), "the update changed nothing on {dev}");
        match &cpu_out {
            None => cpu_out = Some(got),
            Some(c) => {
                for (k, (a, b)) in got.iter().zip(c).enumerate() {
                    assert_close(&format!("guarded adamw output {k} gpu vs cpu"), a, b, 1e-6, 5);
                }
            }
        }
        // Skipped: bit-for-bit copies, whatever the coefficient.
        let skip = Tensor::from_slice(&[0.37, 0.0, f32::NAN, f32::NAN], &[4], dev).unwrap();
        let nan_g = t(&vec![f32::NAN; n]);
        let (w3, m3, v3) = adamw_update_guarded(&wt, &nan_g, &mt, &vt, &h, &skip).unwrap();
        assert_eq!(w3.to_vec().unwrap(), w, "skipped step changed the weights on {dev}");
        assert_eq!(m3.to_vec().unwrap(), m, "skipped step changed m on {dev}");
        assert_eq!(v3.to_vec().unwrap(), v, "skipped step changed v on {dev}");
        let bad = Tensor::from_slice(&[1.0, 1.0], &[2], dev).unwrap();
        assert!(adamw_update_guarded(&wt, &gt, &mt, &vt, &h, &bad).is_err());
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn config(name: &str) -> TrainConfig {
    let out = std::env::temp_dir().join(format!("vipo-train-step-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    TrainConfig {
        model: fixtures().join("sd15_tiny_pipeline"),
        data: fixtures().join("pickapic_tiny/pairs.jsonl"),
        resolution: 64,
        batch: 2,
        grad_accum: 2,
        lr: 1e-3,
        steps: 3,
        seed: 11,
        objective: ObjectiveKind::PolyDpo,
        alpha: 1.5,
        output: out,
        device: "gpu".into(),
        ..Default::default()
    }
}

fn values(t: &Trainer) -> Vec<Vec<f32>> {
    t.trainable_params().iter().map(|p| p.value().to_vec().unwrap()).collect()
}

/// A private context, so that no other test's work shows in its submit count.
fn private_gpu() -> Option<Device> {
    let g = gpu()?;
    Some(Device::open_private(g.gpu()?.index).unwrap())
}

#[test]
fn gpu_step_on_the_device_matches_the_host_head_and_submits_once() {
    // Every objective: the DPO forms' and KTO's kernels, SFT's mean. The two runs drift apart
    // by rounding (AdamW's first steps turn tiny gradient differences into whole updates),
    // fastest under KTO's beta: its tolerance is looser.
    // max_norm: small enough that clipping is on at every step (checked below).
    for (kind, tol, max_norm) in
        [(ObjectiveKind::PolyDpo, 1e-4, 0.05), (ObjectiveKind::Kto, 5e-4, 0.05), (ObjectiveKind::Sft, 1e-4, 0.01)]
    {
        device_step_against_host_step(kind, tol, max_norm);
    }
}

fn device_step_against_host_step(kind: ObjectiveKind, tol: f64, max_norm: f32) {
    let Some(dev) = private_gpu() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let ctx = dev.gpu().unwrap().clone();
    ctx.set_dispatches_per_submit(0);
    let mut cfg = config(&format!("resident-{kind:?}"));
    cfg.objective = kind;
    cfg.max_grad_norm = max_norm;
    let mut res = Trainer::new(cfg.clone(), &dev).unwrap();
    let mut host = Trainer::new(cfg.clone(), &dev).unwrap();
    host.set_device_resident(false);
    assert!(res.device_resident() && !host.device_resident());
    for step in 1..=3u64 {
        let batches: Vec<_> = (0..2).map(|m| res.draw_batch(m).unwrap()).collect();
        let hb: Vec<_> = (0..2).map(|m| host.draw_batch(m).unwrap()).collect();
        ctx.sync().unwrap();
        let s0 = ctx.pool_stats().submits;
        let a = res.train_on(&batches).unwrap();
        let s1 = ctx.pool_stats().submits;
        let b = host.train_on(&hb).unwrap();
        let s2 = ctx.pool_stats().submits;
        eprintln!(
            "{kind:?} step {step}: device loss {} |g| {} ({} submits); host loss {} |g| {} ({} submits)",
            a.loss,
            a.grad_norm,
            s1 - s0,
            b.loss,
            b.grad_norm,
            s2 - s1
        );
        assert_eq!(s1 - s0, 1, "step {step}: a device-resident step is one command buffer");
        assert!(s2 - s1 >= 2, "step {step}: the host path reads the errors and the norm");
        assert!(a.grad_norm > cfg.max_grad_norm as f64, "clipping is not exercised");
        assert!((a.loss - b.loss).abs() < tol * (1.0 + b.loss.abs()), "step {step}: loss {} vs {}", a.loss, b.loss);
        assert!(
            (a.grad_norm - b.grad_norm).abs() < tol * b.grad_norm,
            "step {step}: norm {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
        if kind == ObjectiveKind::Kto {
            // KTO's u = y beta (g - Q) cluster at 0 after its first step (every u is 0 at the
            // start, Q near the mean), so the two runs' rounding-level weight differences can
            // flip a sign: the mean probability is compared instead.
            let (pa, pb) = (a.mean_p.unwrap(), b.mean_p.unwrap());
            assert!((pa - pb).abs() < 1e-3, "step {step}: mean p {pa} vs {pb}");
        } else {
            assert_eq!(a.implicit_acc, b.implicit_acc, "step {step}");
        }
        assert_eq!(res.step(), step);
    }
    let (va, vb) = (values(&res), values(&host));
    let flat = |v: &[Vec<f32>]| v.concat();
    assert_close(
        &format!("{kind:?}: weights after 3 steps, device step vs host step"),
        &flat(&va),
        &flat(&vb),
        tol,
        11,
    );
    let _ = std::fs::remove_dir_all(&cfg.output);
}

#[test]
fn gpu_step_with_a_nan_changes_nothing() {
    let Some(dev) = gpu() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let mut cfg = config("nan");
    cfg.grad_accum = 1;
    let mut a = Trainer::new(cfg.clone(), &dev).unwrap();
    let mut b = Trainer::new(cfg.clone(), &dev).unwrap();
    assert!(a.device_resident(), "the device path is what this test is about");
    let batch = a.draw_batch(0).unwrap();
    let first = a.train_on(std::slice::from_ref(&batch)).unwrap();
    b.train_on(std::slice::from_ref(&batch)).unwrap();
    // A NaN in one adapter weight: the loss is NaN, the step is skipped on the GPU.
    let p = a.trainable_params()[1].clone();
    let good = p.value();
    let mut v = good.to_vec().unwrap();
    v[0] = f32::NAN;
    p.set_value(Tensor::from_slice(&v, good.shape(), &dev).unwrap()).unwrap();
    let before = values(&a);
    let err = a.train_on(std::slice::from_ref(&batch)).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("step 2") && err.contains("loss is NaN"), "{err}");
    assert_eq!(a.step(), 1);
    let after = values(&a);
    let bits = |v: &[Vec<f32>]| v.concat().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&before), bits(&after), "a skipped step changed a weight");
    assert!(a.trainable_params().iter().all(|p| p.grad().is_none()), "gradients left behind");
    // With the weight mended, the next step is the step the other run takes: the optimizer's
    // counters and moments are as if the failed step never ran.
    p.set_value(good).unwrap();
    let ma = a.train_on(std::slice::from_ref(&batch)).unwrap();
    let mb = b.train_on(std::slice::from_ref(&batch)).unwrap();
    assert_eq!(
        (ma.step, ma.loss.to_bits(), ma.grad_norm.to_bits()),
        (mb.step, mb.loss.to_bits(), mb.grad_norm.to_bits())
    );
    assert_eq!(bits(&values(&a)), bits(&values(&b)), "the step after a skipped one differs");
    assert!(first.loss.is_finite());
    let _ = std::fs::remove_dir_all(&cfg.output);
}

#[test]
fn gpu_device_steps_resume_bit_for_bit() {
    // 4 straight steps against 2 + resume + 2, device-resident on the GPU: the same weights,
    // to the bit (the step keeps no host state but the optimizer's counters, saved with it).
    let Some(dev) = gpu() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let mut cfg = config("resume-a");
    cfg.steps = 4;
    cfg.checkpoint_every = 2;
    let mut a = Trainer::new(cfg.clone(), &dev).unwrap();
    assert!(a.device_resident());
    a.run().unwrap();
    let mut cfg_b = config("resume-b");
    cfg_b.steps = 2;
    cfg_b.checkpoint_every = 2;
    Trainer::new(cfg_b.clone(), &dev).unwrap().run().unwrap();
    cfg_b.steps = 4;
    let mut b = Trainer::resume(cfg_b.clone(), &dev, cfg_b.output.join("checkpoint-2")).unwrap();
    b.run().unwrap();
    assert_eq!(b.step(), 4);
    let bits = |t: &Trainer| values(t).concat().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&a) == bits(&b), "the resumed device-resident run differs from the straight one");
    for d in [&cfg.output, &cfg_b.output] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn device_step_with_a_finite_loss_and_a_nan_gradient_is_skipped() {
    // finish_device_step on hand-made gradients, on every device: a NaN in one gradient (the
    // loss finite) skips the update and takes the optimizer's counters back; the same step
    // with the NaN mended is taken, clipped to max_norm.
    use std::sync::Arc;
    use vipo::optim::AdamW;
    use vipo::params::Param;
    use vipo::train::trainer::finish_device_step;
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        let cfg = ObjectiveConfig { objective: Objective::PolyDpo { alpha: 1.0 }, ..ObjectiveConfig::default() };
        let r = errors(6, 7);
        let e = policy_errors(&r, cfg.logit_scale() as f32, 8);
        let err = Tensor::from_slice(&e, &[6], &dev).unwrap().requires_grad();
        let loss = cfg.loss_on_device(&err, Some(&Tensor::from_slice(&r, &[6], &dev).unwrap())).unwrap();
        let sizes = [5000usize, 17];
        let params: Vec<Arc<Param>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let v = Tensor::from_slice(&randn(n, 20 + i as u64), &[n], &dev).unwrap();
                Arc::new(Param::new(format!("p{i}"), v, true).unwrap())
            })
            .collect();
        let before: Vec<Vec<f32>> = params.iter().map(|p| p.value().to_vec().unwrap()).collect();
        let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, ..AdamWConfig::default() }).unwrap();
        let set_grads = |nan: bool| {
            for (i, p) in params.iter().enumerate() {
                let mut g = randn(sizes[i], 30 + i as u64);
                if nan && i == 0 {
                    g[4321] = f32::NAN;
                }
                p.set_grad(Some(Tensor::from_slice(&g, &[sizes[i]], &dev).unwrap())).unwrap();
            }
        };
        set_grads(true);
        let out = finish_device_step(&params, &mut opt, 1e-2, 1.0, &cfg, std::slice::from_ref(&loss)).unwrap();
        assert!(!out.taken && out.grad_norm.is_nan(), "on {dev}: {out:?}");
        assert!(out.stats[0].loss.is_finite(), "on {dev}: the loss itself was finite");
        assert_eq!(opt.steps(), 0, "on {dev}: the skipped step's counter was not taken back");
        let after: Vec<Vec<f32>> = params.iter().map(|p| p.value().to_vec().unwrap()).collect();
        assert_eq!(before, after, "on {dev}: a skipped step changed a weight");
        set_grads(false);
        let out = finish_device_step(&params, &mut opt, 1e-2, 1.0, &cfg, std::slice::from_ref(&loss)).unwrap();
        assert!(out.taken && out.grad_norm > 1.0, "on {dev}: {out:?}");
        assert_eq!(opt.steps(), 1);
        let moved = params.iter().zip(&before).all(|(p, b)| p.value().to_vec().unwrap() != *b);
        assert!(moved, "on {dev}: the taken step left a weight unchanged");
    }
}
