//! The objectives against `../shared/fixtures/dpo` (PyTorch + diffusers + PEFT): per-sample
//! errors of policy and reference, the DPO logit, Diffusion-DPO / Poly-DPO / diffusers-example
//! losses, gradients w.r.t. every parameter of the full tiny UNet (Poly-DPO) and w.r.t. a
//! rank-4 LoRA (all three loss forms), on the CPU and the GPU; alpha = 0 equal to DPO bit for
//! bit; KTO and SFT against float64 re-implementations written here; the forward processes;
//! and a short LoRA training run that must lower the DPO loss.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};
use vipo::models::unet_2d_condition::UNet2DConditionModel;
use vipo::optim::{AdamW, AdamWConfig};
use vipo::params::ParamStore;
use vipo::schedulers::SchedulerConfig;
use vipo::train::lora::Lora;
use vipo::train::objective::{
    per_sample_error, unet_step, ForwardProcess, NoiseLevel, Objective, ObjectiveConfig, ObjectiveStats,
    PreferenceBatch, Reference, Target,
};
use vipo::{Device, Tensor};

const BETA: f64 = 5000.0;

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}
fn dpo_dir() -> PathBuf {
    fixtures_root().join("dpo")
}

/// name -> (values as f64, shape), from f32, f64 and i64 tensors.
type Fx = BTreeMap<String, (Vec<f64>, Vec<usize>)>;

fn read_tensors(path: &Path) -> Fx {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name.to_string(), (vals, v.shape().to_vec()))
        })
        .collect()
}

fn fx() -> Fx {
    read_tensors(&dpo_dir().join("fixtures.safetensors"))
}

fn v(fx: &Fx, name: &str) -> Vec<f64> {
    fx.get(name).unwrap_or_else(|| panic!("fixture has no `{name}`")).0.clone()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn tensor(fx: &Fx, name: &str, dev: &Device) -> Tensor {
    let (vals, shape) = &fx[name];
    Tensor::from_vec(f32s(vals), shape, dev).unwrap()
}

fn process() -> ForwardProcess {
    let cfg = SchedulerConfig::from_file(fixtures_root().join("schedulers/scheduler_config_ddpm.json")).unwrap();
    ForwardProcess::from_config(&cfg).unwrap()
}

fn batch(fx: &Fx, dev: &Device) -> PreferenceBatch {
    PreferenceBatch {
        latents_w: tensor(fx, "latents_w", dev),
        latents_l: tensor(fx, "latents_l", dev),
        noise: tensor(fx, "noise", dev),
        level: NoiseLevel::Timesteps(v(fx, "timesteps").iter().map(|&t| t as usize).collect()),
        encoder_hidden_states: tensor(fx, "encoder_hidden_states", dev),
    }
}

fn unet(dir: &Path, dev: &Device, trainable: bool) -> (UNet2DConditionModel, ParamStore) {
    let (m, store) = UNet2DConditionModel::from_dir(dir, dev, None).unwrap();
    if !trainable {
        store.freeze_all();
    }
    (m, store)
}

fn poly(alpha: f64, half_factor: bool) -> ObjectiveConfig {
    ObjectiveConfig { objective: Objective::PolyDpo { alpha }, beta: BETA, half_factor, ..Default::default() }
}
fn dpo(half_factor: bool) -> ObjectiveConfig {
    ObjectiveConfig { objective: Objective::Dpo, beta: BETA, half_factor, ..Default::default() }
}

/// max |got - want| / max |want|.
fn rel64(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-300);
    got.iter().zip(want).fold(0f64, |m, (g, w)| m.max((g - w).abs())) / scale
}

fn max_abs_diff(got: &[f64], want: &[f64]) -> f64 {
    got.iter().zip(want).fold(0f64, |m, (g, w)| m.max((g - w).abs()))
}

#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    let e = rel64(got, want);
    eprintln!("{what:<48} rel err {e:.2e}");
    assert!(e <= tol, "{what}: rel err {e:.3e} > {tol:.1e}\n got  {got:?}\n want {want:?}");
    e
}

/// The per-pair DPO statistics of a step against the fixture's float64 values (prefix `full.`
/// or `lora.`). The per-sample errors are ~1.1 and differ between policy and reference in the
/// 4th digit, so z = -2500 * (diff of diffs) carries ~2500 * (f32 error of the errors): about
/// 1e-3 absolute, which is what torch's own float32 run shows against float64 (3.4e-4).
fn check_pair_stats(what: &str, st: &ObjectiveStats, fx: &Fx, prefix: &str, f64_suffix: &str) {
    let n = st.model_diff.len();
    let (pw, pl) = st.policy_err.split_at(n);
    let (rw, rl) = st.ref_err.split_at(n);
    let get = |k: &str| v(fx, &format!("{prefix}{k}{f64_suffix}"));
    close(&format!("{what}: policy errors (winners)"), pw, &get("model_losses_w"), 2e-6);
    close(&format!("{what}: policy errors (losers)"), pl, &get("model_losses_l"), 2e-6);
    close(&format!("{what}: reference errors (winners)"), rw, &get("ref_losses_w"), 2e-6);
    close(&format!("{what}: reference errors (losers)"), rl, &get("ref_losses_l"), 2e-6);
    let dz = max_abs_diff(&st.z, &get("inside_term"));
    eprintln!("{what}: logit z {:?} vs {:?}: max abs diff {dz:.2e}", st.z, get("inside_term"));
    assert!(dz < 2e-3, "{what}: logit off by {dz:.2e}");
    let dp = max_abs_diff(&st.p, &get("p"));
    assert!(dp < 1e-3, "{what}: p off by {dp:.2e}");
}

// ---------------------------------------------------------------------------------------------
// Inputs and forward processes
// ---------------------------------------------------------------------------------------------

#[test]
fn preference_batch_is_laid_out_like_train_diffusion_dpo() {
    let fx = fx();
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        let inp = batch(&fx, &dev).inputs(&process()).unwrap();
        assert_eq!(inp.noised.noisy.shape(), &[4, 4, 16, 16]);
        let (want, _) = &fx["noisy_model_input"];
        assert_close(&format!("noisy_model_input on {dev}"), &inp.noised.noisy.to_vec().unwrap(), &f32s(want), 1e-6, 0);
        // epsilon target = the shared noise, repeated for the losers
        let noise = v(&fx, "noise");
        let target: Vec<f64> = inp.noised.target.to_vec().unwrap().iter().map(|&x| x as f64).collect();
        assert_eq!(target, [noise.clone(), noise].concat(), "target on {dev}");
        assert_eq!(inp.noised.timesteps.to_vec().unwrap(), vec![700.0, 120.0, 700.0, 120.0]);
        assert_eq!(inp.encoder_hidden_states.shape(), &[4, 77, 32]);
        // the reference pass alone reproduces the stored reference prediction
        let (ref_unet, _) = unet(&fixtures_root().join("unet_tiny"), &dev, false);
        let _g = vipo::autograd::no_grad();
        let pred = ref_unet.forward(&inp.noised.noisy, &inp.noised.timesteps, &inp.encoder_hidden_states).unwrap();
        let (want, _) = &fx["ref_pred"];
        assert_close(&format!("ref_pred on {dev}"), &pred.to_vec().unwrap(), &f32s(want), 1e-4, 0);
    }
}

#[test]
fn targets_follow_the_scheduler_config() {
    let parse = |s: &str| SchedulerConfig::from_json_str(s).unwrap();
    assert_eq!(Target::from_config(&parse("{}")).unwrap(), Target::Epsilon);
    assert_eq!(Target::from_config(&parse(r#"{"prediction_type": "epsilon"}"#)).unwrap(), Target::Epsilon);
    assert_eq!(Target::from_config(&parse(r#"{"prediction_type": "v_prediction"}"#)).unwrap(), Target::VPrediction);
    assert_eq!(Target::from_config(&parse(r#"{"prediction_type": "sample"}"#)).unwrap(), Target::Sample);
    let flow =
        parse(r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}"#);
    assert_eq!(Target::from_config(&flow).unwrap(), Target::FlowVelocity);
    let e = Target::from_config(&parse(
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "prediction_type": "v_prediction"}"#,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("prediction_type"), "{e}");

    // v-prediction: the target is get_velocity; flow: (1 - s) x0 + s noise and noise - x0,
    // checked against a float64 loop; mismatched levels are errors.
    let (x0v, nv) = (randn(2 * 3 * 5, 1), randn(2 * 3 * 5, 2));
    let x0 = Tensor::from_slice(&x0v, &[2, 3, 5], &Device::Cpu).unwrap();
    let noise = Tensor::from_slice(&nv, &[2, 3, 5], &Device::Cpu).unwrap();
    let vp = ForwardProcess::from_config(&parse(
        r#"{"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    ))
    .unwrap();
    let ForwardProcess::Ddpm { schedule, .. } = &vp else { panic!("ddpm") };
    let lv = NoiseLevel::Timesteps(vec![999, 3]);
    let n = vp.noise(&x0, &noise, &lv).unwrap();
    let want = schedule.get_velocity(&x0, &noise, &[999, 3]).unwrap();
    assert_eq!(n.target.to_vec().unwrap(), want.to_vec().unwrap());
    let ac = schedule.alphas_cumprod_f64();
    let noisy = n.noisy.to_vec().unwrap();
    for i in 0..30 {
        let t = [999usize, 3][i / 15];
        let w = ac[t].sqrt() * x0v[i] as f64 + (1.0 - ac[t]).sqrt() * nv[i] as f64;
        assert!((noisy[i] as f64 - w).abs() < 1e-5, "{i}: {} vs {w}", noisy[i]);
    }
    assert!(vp.noise(&x0, &noise, &NoiseLevel::Sigmas(vec![0.5, 0.5])).is_err());

    let fp = ForwardProcess::from_config(&flow).unwrap();
    let sig = [0.25f32, 0.875];
    let n = fp.noise(&x0, &noise, &NoiseLevel::Sigmas(sig.to_vec())).unwrap();
    let (noisy, target) = (n.noisy.to_vec().unwrap(), n.target.to_vec().unwrap());
    for i in 0..30 {
        let s = sig[i / 15] as f64;
        let (x, e) = (x0v[i] as f64, nv[i] as f64);
        assert!((noisy[i] as f64 - ((1.0 - s) * x + s * e)).abs() < 1e-6);
        assert!((target[i] as f64 - (e - x)).abs() < 1e-6);
    }
    assert_eq!(n.timesteps.to_vec().unwrap(), vec![250.0, 875.0]);
    assert!(fp.noise(&x0, &noise, &NoiseLevel::Timesteps(vec![1, 2])).is_err());
    assert!(fp.noise(&x0, &noise, &NoiseLevel::Sigmas(vec![0.5])).is_err(), "one level per sample");
}

#[test]
fn per_sample_error_matches_a_float64_loop() {
    let (b, c, h, w) = (3, 2, 5, 7);
    let (pv, tv) = (randn(b * c * h * w, 11), randn(b * c * h * w, 12));
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        let p = Tensor::from_slice(&pv, &[b, c, h, w], &dev).unwrap();
        let t = Tensor::from_slice(&tv, &[b, c, h, w], &dev).unwrap();
        let got = per_sample_error(&p, &t).unwrap().to_vec().unwrap();
        let n = c * h * w;
        let want: Vec<f32> = (0..b)
            .map(|i| {
                ((0..n).map(|j| (tv[i * n + j] as f64 - pv[i * n + j] as f64).powi(2)).sum::<f64>() / n as f64) as f32
            })
            .collect();
        assert_close(&format!("per-sample error on {dev}"), &got, &want, 1e-6, 11);
    }
}

// ---------------------------------------------------------------------------------------------
// The loss head
// ---------------------------------------------------------------------------------------------

/// Float64 references written from the formulas (not from the implementation).
fn poly_ref(e: &[f64], r: &[f64], beta: f64, half: bool, alpha: f64) -> f64 {
    let n = e.len() / 2;
    let s = if half { beta / 2.0 } else { beta };
    (0..n)
        .map(|i| {
            let z = -s * ((e[i] - r[i]) - (e[n + i] - r[n + i]));
            let p = 1.0 / (1.0 + (-z).exp());
            -p.ln() + alpha * (1.0 - p)
        })
        .sum::<f64>()
        / n as f64
}

fn kto_ref(e: &[f64], r: &[f64], labels: &[bool], beta: f64, ld: f64, lu: f64) -> f64 {
    let b = e.len();
    let g: Vec<f64> = (0..b).map(|j| -(e[j] - r[j])).collect();
    let kl = (g.iter().sum::<f64>() / b as f64).max(0.0);
    (0..b)
        .map(|j| {
            let (sgn, lam) = if labels[j] { (1.0, ld) } else { (-1.0, lu) };
            lam * (1.0 - 1.0 / (1.0 + (-(sgn * beta * (g[j] - kl))).exp()))
        })
        .sum::<f64>()
        / b as f64
}

fn sft_ref(e: &[f64], labels: &[bool]) -> f64 {
    let sel: Vec<f64> = e.iter().zip(labels).filter(|(_, &l)| l).map(|(x, _)| *x).collect();
    sel.iter().sum::<f64>() / sel.len() as f64
}

/// Central differences of `f` at `e` against the head's analytic dL/de.
fn check_head_grad(what: &str, got: &[f64], e: &[f64], f: impl Fn(&[f64]) -> f64) {
    let h = 1e-7;
    let scale = got.iter().fold(0f64, |m, g| m.max(g.abs())).max(1e-12);
    for j in 0..e.len() {
        let (mut a, mut b) = (e.to_vec(), e.to_vec());
        a[j] += h;
        b[j] -= h;
        let num = (f(&a) - f(&b)) / (2.0 * h);
        let err = (num - got[j]).abs() / scale;
        assert!(err < 1e-5, "{what}: dL/de[{j}] analytic {} numeric {num} (rel {err:.2e})", got[j]);
    }
}

#[test]
fn loss_head_matches_float64_formulas_and_finite_differences() {
    // Random errors around 1 with per-pair differences of ~1e-4, like the fixture's.
    let b = 6;
    let e: Vec<f64> = randn(b, 5).iter().map(|x| 1.0 + 0.05 * *x as f64).collect();
    let r: Vec<f64> = e.iter().zip(randn(b, 6)).map(|(x, d)| x + 1e-4 * d as f64).collect();
    let labels = [true, false, true, true, false, false];
    for (half, beta, alpha) in [(true, 5000.0, 1.0), (false, 2500.0, -0.5), (true, 500.0, 2.0), (true, 5000.0, 0.0)] {
        let cfg =
            ObjectiveConfig { objective: Objective::PolyDpo { alpha }, beta, half_factor: half, ..Default::default() };
        let st = cfg.head(&e, Some(&r), None).unwrap();
        let want = poly_ref(&e, &r, beta, half, alpha);
        assert!((st.loss - want).abs() <= 1e-12 * want.abs().max(1.0), "poly {alpha} {half}: {} vs {want}", st.loss);
        check_head_grad("poly", &st.dloss_derr, &e, |x| poly_ref(x, &r, beta, half, alpha));
        // dL/dz = -(1 - p)(1 + alpha p) / N, and dz/dmodel_diff = -s
        let s = if half { beta / 2.0 } else { beta };
        for (i, (&p, &g)) in st.p.iter().zip(&st.dloss_dmodel_diff).enumerate() {
            let w = (1.0 - p) * (1.0 + alpha * p) * s / 3.0;
            assert!((g - w).abs() < 1e-9 * w.abs().max(1.0), "pair {i}: {g} vs {w}");
        }
    }
    for (ld, lu) in [(1.0, 1.0), (1.5, 0.5)] {
        let cfg = ObjectiveConfig {
            objective: Objective::Kto,
            beta: 5000.0,
            kto_lambda_desirable: ld,
            kto_lambda_undesirable: lu,
            ..Default::default()
        };
        let st = cfg.head(&e, Some(&r), Some(&labels)).unwrap();
        let want = kto_ref(&e, &r, &labels, 5000.0, ld, lu);
        assert!((st.loss - want).abs() < 1e-12, "kto: {} vs {want}", st.loss);
        // The reference point is held constant (detached in the KTO code), so differentiate
        // with it frozen at its value.
        let kl = st.kto_reference_point.unwrap();
        let frozen = |x: &[f64]| {
            (0..b)
                .map(|j| {
                    let (sgn, lam) = if labels[j] { (1.0, ld) } else { (-1.0, lu) };
                    lam * (1.0 - 1.0 / (1.0 + (-(sgn * 5000.0 * (r[j] - x[j] - kl))).exp()))
                })
                .sum::<f64>()
                / b as f64
        };
        check_head_grad("kto", &st.dloss_derr, &e, frozen);
    }
    let sft = ObjectiveConfig { objective: Objective::Sft, ..Default::default() };
    let st = sft.head(&e, None, None).unwrap();
    assert!((st.loss - sft_ref(&e, &[true, true, true, false, false, false])).abs() < 1e-15);
    check_head_grad("sft", &st.dloss_derr, &e, |x| sft_ref(x, &[true, true, true, false, false, false]));

    // Extreme logits stay finite (softplus, not log(sigmoid)); the gradient saturates right.
    let far = [1.0, 0.0]; // the winner much worse: z = -2500
    let st = dpo(true).head(&far, Some(&[0.0; 2]), None).unwrap();
    assert!((st.loss - 2500.0).abs() < 1e-9, "loss {}", st.loss);
    assert!((st.dloss_dmodel_diff[0] - 2500.0).abs() < 1e-9);
    let st = dpo(true).head(&[0.0, 1.0], Some(&[0.0; 2]), None).unwrap();
    assert!((0.0..1e-300).contains(&st.loss), "loss {}", st.loss);
    // z = 0 exactly (a fresh LoRA): the gradient is the true one, -s/2 per pair / N.
    let st = dpo(true).head(&[1.0, 1.0], Some(&[1.0, 1.0]), None).unwrap();
    assert_eq!(st.z, vec![0.0]);
    assert!((st.loss - std::f64::consts::LN_2).abs() < 1e-15);
    assert!((st.dloss_dmodel_diff[0] - 1250.0).abs() < 1e-9);

    // Bad inputs are errors, not panics.
    assert!(dpo(true).head(&e[..5], Some(&r[..5]), None).is_err(), "odd batch");
    assert!(dpo(true).head(&e, None, None).is_err(), "no reference");
    let bad = ObjectiveConfig { beta: -1.0, ..Default::default() };
    assert!(bad.validate().is_err());
    let cpu = Device::Cpu;
    let et = Tensor::from_vec(f32s(&e), &[b], &cpu).unwrap();
    assert!(dpo(true).loss_with_labels(&et, Some(&et), &labels).is_err(), "labels are for KTO/SFT");
    let rt = Tensor::from_vec(f32s(&r[..4]), &[4], &cpu).unwrap();
    assert!(dpo(true).loss(&et, Some(&rt)).is_err(), "shape mismatch");
}

// ---------------------------------------------------------------------------------------------
// Full UNet: errors, logit, losses and every parameter's gradient
// ---------------------------------------------------------------------------------------------

fn full_unet(dev: &Device, grad_tol: f64) {
    let fx = fx();
    let (policy, pstore) = unet(&dpo_dir().join("policy_unet"), dev, true);
    let (reference, _rstore) = unet(&fixtures_root().join("unet_tiny"), dev, false);
    let t0 = std::time::Instant::now();
    let out = unet_step(&poly(1.0, true), &process(), &batch(&fx, dev), &policy, Reference::Model(&reference)).unwrap();
    out.loss.backward().unwrap();
    eprintln!("full UNet step (policy fwd+bwd, reference fwd) on {dev}: {:.2}s", t0.elapsed().as_secs_f64());
    let st = &out.stats;
    check_pair_stats(&format!("full on {dev}"), st, &fx, "full.", "_f64");
    let lp = out.loss.to_vec().unwrap()[0] as f64;
    close(&format!("full on {dev}: Poly-DPO loss (alpha 1)"), &[lp], &v(&fx, "full.loss_poly_f64"), 1e-3);
    close(
        &format!("full on {dev}: dloss/dmodel_diff (Poly)"),
        &st.dloss_dmodel_diff,
        &v(&fx, "full.dloss_dmodel_diff.loss_poly_f64"),
        1e-3,
    );
    // The other loss forms from the same errors (the fixture uses the half factor; diffusers'
    // example has none).
    let e = &st.policy_err;
    let r = &st.ref_err;
    let d = dpo(true).head(e, Some(r), None).unwrap();
    close(&format!("full on {dev}: Diffusion-DPO loss"), &[d.loss], &v(&fx, "full.loss_dpo_f64"), 1e-3);
    close(
        &format!("full on {dev}: dloss/dmodel_diff (DPO)"),
        &d.dloss_dmodel_diff,
        &v(&fx, "full.dloss_dmodel_diff.loss_dpo_f64"),
        1e-3,
    );
    let ex = dpo(false).head(e, Some(r), None).unwrap();
    close(
        &format!("full on {dev}: diffusers-example loss"),
        &[ex.loss],
        &v(&fx, "full.loss_diffusers_example_f64"),
        1e-3,
    );
    // The (beta, alpha) table of meta.json.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dpo_dir().join("meta.json")).unwrap()).unwrap();
    let mut worst = 0f64;
    for row in meta["loss_table_full_unet_f64"].as_array().unwrap() {
        let (beta, alpha) = (row["beta_dpo"].as_f64().unwrap(), row["alpha_poly"].as_f64().unwrap());
        let cfg = |objective, half_factor| ObjectiveConfig { objective, beta, half_factor, ..Default::default() };
        for (c, key) in [
            (cfg(Objective::Dpo, true), "loss_dpo"),
            (cfg(Objective::PolyDpo { alpha }, true), "loss_poly"),
            (cfg(Objective::Dpo, false), "loss_diffusers_example"),
        ] {
            let got = c.head(e, Some(r), None).unwrap().loss;
            let want = row[key].as_f64().unwrap();
            let rel = (got - want).abs() / want.abs();
            worst = worst.max(rel);
            assert!(rel < 1e-3, "beta {beta} alpha {alpha} {key}: {got} vs {want} (rel {rel:.2e})");
        }
    }
    eprintln!("full on {dev}: loss table (12 beta/alpha rows x 3 forms) worst rel err {worst:.2e}");

    // Every parameter's gradient against the float64 one.
    let want = read_tensors(&dpo_dir().join("grads_full_poly.safetensors"));
    assert_eq!(want.len(), pstore.len(), "one fixture gradient per UNet parameter");
    let (mut worst, mut worst_name, mut num, mut den) = (0f64, String::new(), 0f64, 0f64);
    for (name, p) in pstore.iter() {
        let (w, shape) = want.get(name).unwrap_or_else(|| panic!("no fixture gradient for `{name}`"));
        assert_eq!(p.shape(), shape.as_slice(), "{name}");
        let g: Vec<f64> = p
            .grad()
            .unwrap_or_else(|| panic!("`{name}` got no gradient"))
            .to_vec()
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        let e = rel64(&g, w);
        if e > worst {
            (worst, worst_name) = (e, name.to_string());
        }
        num += g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        den += w.iter().map(|b| b * b).sum::<f64>();
    }
    let nrmse = (num / den).sqrt();
    eprintln!(
        "full on {dev}: gradients of all {} params: worst per-tensor rel err {worst:.2e} ({worst_name}), overall relative \
         L2 error {nrmse:.2e}",
        pstore.len()
    );
    assert!(worst < grad_tol, "gradient of `{worst_name}`: rel err {worst:.2e} > {grad_tol:.0e}");
    assert!(nrmse < 5e-4, "overall gradient L2 error {nrmse:.2e}");
}

#[test]
fn full_unet_poly_dpo_matches_the_fixture_on_cpu() {
    full_unet(&Device::Cpu, 1e-3);
}

#[test]
fn full_unet_poly_dpo_matches_the_fixture_on_gpu() {
    let Some(g) = gpu() else { return };
    full_unet(&g, 1e-3);
}

// ---------------------------------------------------------------------------------------------
// LoRA: errors, losses and the adapter gradients for every loss form
// ---------------------------------------------------------------------------------------------

fn lora_forms() -> Vec<(&'static str, ObjectiveConfig)> {
    vec![("loss_dpo", dpo(true)), ("loss_poly", poly(1.0, true)), ("loss_diffusers_example", dpo(false))]
}

fn lora_grads(dev: &Device, forms: &[&str]) {
    let fx = fx();
    let grads = read_tensors(&dpo_dir().join("grads_lora.safetensors"));
    let (base, _store) = unet(&fixtures_root().join("unet_tiny"), dev, false);
    let lora = Lora::load(&base, dpo_dir().join("lora/pytorch_lora_weights.safetensors")).unwrap();
    lora.store.set_trainable_where(|_| true);
    assert_eq!(lora.len(), 48, "to_q/k/v/out.0 of 12 attention layers (attn1 and attn2 of 6 blocks)");
    let b = batch(&fx, dev);
    for (name, cfg) in lora_forms().into_iter().filter(|(n, _)| forms.contains(n)) {
        lora.store.zero_grad();
        let t0 = std::time::Instant::now();
        let out = unet_step(&cfg, &process(), &b, &base, Reference::AdaptersOff).unwrap();
        out.loss.backward().unwrap();
        eprintln!("LoRA step {name} on {dev}: {:.2}s", t0.elapsed().as_secs_f64());
        if name == "loss_dpo" {
            // the fixture's LoRA statistics were computed in float32 (no float64 run)
            check_pair_stats(&format!("lora on {dev}"), &out.stats, &fx, "lora.", "");
        }
        let loss = out.loss.to_vec().unwrap()[0] as f64;
        close(&format!("lora on {dev}: {name}"), &[loss], &v(&fx, &format!("lora.{name}")), 1e-3);
        close(
            &format!("lora on {dev}: dloss/dmodel_diff {name}"),
            &out.stats.dloss_dmodel_diff,
            &v(&fx, &format!("lora.dloss_dmodel_diff.{name}")),
            1e-3,
        );
        let (mut worst, mut worst_key, mut n) = (0f64, String::new(), 0);
        for (key, p) in lora.store.iter() {
            let (w, _) = grads.get(&format!("{name}/{key}")).unwrap_or_else(|| panic!("no fixture grad {name}/{key}"));
            let g: Vec<f64> = p.grad().unwrap().to_vec().unwrap().iter().map(|&x| x as f64).collect();
            let e = rel64(&g, w);
            if e > worst {
                (worst, worst_key) = (e, key.to_string());
            }
            n += 1;
        }
        assert_eq!(n * 3, grads.len(), "every LoRA key has a fixture gradient per loss");
        eprintln!("lora on {dev}: {name}: gradients of {n} LoRA matrices: worst rel err {worst:.2e} ({worst_key})");
        assert!(worst < 1e-3, "{name}: gradient of `{worst_key}` rel err {worst:.2e}");
    }
}

#[test]
fn lora_dpo_poly_and_diffusers_example_grads_match_on_cpu() {
    lora_grads(&Device::Cpu, &["loss_dpo", "loss_poly", "loss_diffusers_example"]);
}

#[test]
fn lora_poly_grads_match_on_gpu() {
    let Some(g) = gpu() else { return };
    lora_grads(&g, &["loss_poly"]);
}

#[test]
fn lora_poly_grads_match_on_gpu_with_split_k_matmuls() {
    // The adapters' weight gradients are the products split-K is for (rank 4 by K = tokens;
    // 4 images of 16x16 make K = 1024 at the first level, 2 splits): with the opt-in switch on,
    // on a private context, the gradients still match the fixture, and the split sum ran for
    // matmuls (more conv2d_split dispatches than the convolutions alone make).
    let Some(shared) = gpu() else { return };
    let dev = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = dev.gpu().unwrap();
    let split_sums = |on: bool| {
        ctx.set_matmul_split_k(on);
        let timed = ctx.gpu_timer_start();
        lora_grads(&dev, &["loss_poly"]);
        let t = ctx.gpu_timer_stop();
        assert!(timed || std::env::var("CI").is_err(), "CI's lavapipe has TIMESTAMP_QUERY");
        t.map(|t| t.kernels.iter().filter(|k| k.shader == "conv2d_split").map(|k| k.dispatches).sum::<usize>())
    };
    let (off, on) = (split_sums(false), split_sums(true));
    if let (Some(off), Some(on)) = (off, on) {
        assert!(on > off, "split-K matmuls did not run: {on} split sums with the switch on, {off} with it off");
    }
}

#[test]
fn poly_dpo_with_alpha_zero_is_dpo_bit_for_bit() {
    let fx = fx();
    let cpu = Device::Cpu;
    let (base, _store) = unet(&fixtures_root().join("unet_tiny"), &cpu, false);
    let lora = Lora::load(&base, dpo_dir().join("lora/pytorch_lora_weights.safetensors")).unwrap();
    lora.store.set_trainable_where(|_| true);
    let b = batch(&fx, &cpu);
    let run = |cfg: ObjectiveConfig| {
        lora.store.zero_grad();
        let out = unet_step(&cfg, &process(), &b, &base, Reference::AdaptersOff).unwrap();
        out.loss.backward().unwrap();
        let grads: Vec<Vec<u32>> = lora
            .params()
            .iter()
            .map(|p| p.grad().unwrap().to_vec().unwrap().iter().map(|x| x.to_bits()).collect())
            .collect();
        (out.loss.to_vec().unwrap()[0].to_bits(), out.stats, grads)
    };
    let (la, sa, ga) = run(dpo(true));
    let (lb, sb, gb) = run(poly(0.0, true));
    assert_eq!(la, lb, "loss bits");
    assert_eq!(sa, sb, "every statistic");
    assert_eq!(ga, gb, "every gradient bit");
    let (lc, _, _) = run(poly(1.0, true));
    assert_ne!(la, lc, "alpha = 1 is a different loss (the comparison can fail)");
}

// ---------------------------------------------------------------------------------------------
// KTO and SFT on the same batch
// ---------------------------------------------------------------------------------------------

#[test]
fn kto_and_sft_on_the_fixture_batch_match_float64_reimplementations() {
    let fx = fx();
    let cpu = Device::Cpu;
    let (policy, pstore) = unet(&dpo_dir().join("policy_unet"), &cpu, true);
    let (reference, _r) = unet(&fixtures_root().join("unet_tiny"), &cpu, false);
    let b = batch(&fx, &cpu);
    // The fixture's float64 per-sample errors, cat(w, l).
    let e64 = [v(&fx, "full.model_losses_w_f64"), v(&fx, "full.model_losses_l_f64")].concat();
    let r64 = [v(&fx, "full.ref_losses_w_f64"), v(&fx, "full.ref_losses_l_f64")].concat();
    let labels = [true, true, false, false];

    let kto = ObjectiveConfig { objective: Objective::Kto, beta: BETA, ..Default::default() };
    pstore.zero_grad();
    let out = unet_step(&kto, &process(), &b, &policy, Reference::Model(&reference)).unwrap();
    out.loss.backward().unwrap();
    let want = kto_ref(&e64, &r64, &labels, BETA, 1.0, 1.0);
    let got = out.loss.to_vec().unwrap()[0] as f64;
    eprintln!("KTO: {got} vs float64 {want}; reference point {:?}", out.stats.kto_reference_point);
    // g_j - Q is ~1e-4 and carries the f32 error of the errors times beta (as z does).
    assert!((got - want).abs() < 5e-4 * want.abs(), "KTO loss {got} vs {want}");
    // Unequal weights through the labelled entry point.
    let kto2 = ObjectiveConfig { kto_lambda_desirable: 2.0, kto_lambda_undesirable: 0.5, ..kto };
    let et = Tensor::from_vec(f32s(&out.stats.policy_err), &[4], &cpu).unwrap();
    let rt = Tensor::from_vec(f32s(&out.stats.ref_err), &[4], &cpu).unwrap();
    let lab2 = [true, false, false, true];
    let o2 = kto2.loss_with_labels(&et, Some(&rt), &lab2).unwrap();
    let want2 = kto_ref(&out.stats.policy_err, &out.stats.ref_err, &lab2, BETA, 2.0, 0.5);
    assert!((o2.stats.loss - want2).abs() < 1e-12, "{} vs {want2}", o2.stats.loss);
    // Some gradient reached the UNet.
    let gsum: f64 = pstore
        .params()
        .iter()
        .filter_map(|p| p.grad())
        .map(|g| g.to_vec().unwrap().iter().map(|x| x.abs() as f64).sum::<f64>())
        .sum();
    assert!(gsum > 0.0 && gsum.is_finite(), "KTO gradient norm {gsum}");

    let sft = ObjectiveConfig { objective: Objective::Sft, ..Default::default() };
    pstore.zero_grad();
    let out = unet_step(&sft, &process(), &b, &policy, Reference::Model(&reference)).unwrap();
    out.loss.backward().unwrap();
    let want = sft_ref(&e64, &labels);
    let got = out.loss.to_vec().unwrap()[0] as f64;
    eprintln!("SFT: {got} vs float64 {want}");
    assert!((got - want).abs() < 2e-6 * want, "SFT loss {got} vs {want}");
    assert!(out.stats.ref_err.is_empty(), "SFT runs no reference");
    // SFT = plain MSE of the winners: its gradient is the mean of the winners' error gradients,
    // which the full batch's SFT (labels on the winners) reproduces.
    let g_winners: Vec<f32> = pstore.get("conv_out.bias").unwrap().grad().unwrap().to_vec().unwrap();
    pstore.zero_grad();
    let inp = b.inputs(&process()).unwrap();
    let pred = policy.forward(&inp.noised.noisy, &inp.noised.timesteps, &inp.encoder_hidden_states).unwrap();
    let err = per_sample_error(&pred, &inp.noised.target).unwrap();
    let o = sft.loss(&err, None).unwrap();
    o.loss.backward().unwrap();
    let g_pairs = pstore.get("conv_out.bias").unwrap().grad().unwrap().to_vec().unwrap();
    assert_close("SFT gradient, winners-only vs pair batch", &g_winners, &g_pairs, 1e-5, 0);
}

// ---------------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------------

#[test]
fn lora_training_lowers_the_dpo_loss() {
    let fx = fx();
    let cpu = Device::Cpu;
    let (base, store) = unet(&fixtures_root().join("unet_tiny"), &cpu, false);
    let lora = Lora::new(&base, &vipo::train::lora::LoraConfig { rank: 4, alpha: 4.0, seed: 3, ..Default::default() })
        .unwrap();
    lora.train(true);
    assert_eq!(store.num_trainable_params(), 0, "base frozen");
    let mut opt = AdamW::new(AdamWConfig { lr: 2e-3, weight_decay: 0.0, ..Default::default() }).unwrap();
    let b = batch(&fx, &cpu);
    let cfg = dpo(true);
    const STEPS: usize = 6;
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let mut accs = Vec::new();
    for _ in 0..STEPS {
        lora.store.zero_grad();
        let out = unet_step(&cfg, &process(), &b, &base, Reference::AdaptersOff).unwrap();
        out.loss.backward().unwrap();
        opt.step(&lora.params(), 2e-3).unwrap();
        losses.push(out.stats.loss);
        accs.push(out.stats.implicit_acc.unwrap());
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    eprintln!(
        "LoRA DPO training, {STEPS} steps on cpu in {:.1}s: loss {first:.4} -> {last:.4}, implicit acc {} -> {}",
        t0.elapsed().as_secs_f64(),
        accs[0],
        accs.last().unwrap()
    );
    // B starts at zero: the policy is the reference, z = 0, loss = ln 2.
    assert!((first - std::f64::consts::LN_2).abs() < 1e-6, "first loss {first}");
    assert!(last < 0.5 * first, "the DPO loss fell only from {first} to {last}: {losses:?}");
    assert_eq!(*accs.last().unwrap(), 1.0, "both pairs ranked right after training");
    // The adapters-off reference needs adapters.
    lora.detach();
    let e = unet_step(&cfg, &process(), &b, &base, Reference::AdaptersOff).unwrap_err().to_string();
    assert!(e.contains("needs a LoRA"), "{e}");
}
