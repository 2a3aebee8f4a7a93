//! Schedulers against diffusers 0.42.1 (`../shared/fixtures/schedulers/`, float32 and float64):
//! config parsing, betas and alphas_cumprod, timesteps and sigmas per spacing, add_noise,
//! get_velocity, and the DDIM / Euler / DDPM loops step by step on the CPU and the GPU.
//! Euler ancestral and DPM-Solver++ 2M (no fixture) run against float64 re-implementations
//! written here from diffusers' formulas, and every scheduler must recover x0 from a perfect
//! denoiser for epsilon and v_prediction.
mod common;
use common::{assert_close, gpu, randn, rel_err};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use vipo::rng::Rng;
use vipo::schedulers::{
    Noise, NoiseSchedule, NoiseScheduler, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use vipo::{Device, Tensor};

/// Float32 loops against diffusers' float32 loops: ~1 ulp per op, accumulated over 10 steps.
const LOOP_TOL: f64 = 5e-6;
/// Float32 against the float64 re-implementations here.
const F64_TOL: f64 = 5e-6;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// The scheduler fixtures, every dtype widened to f64.
struct Fx(HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Fx {
    fn load() -> Fx {
        let path = fixtures().join("schedulers/fixtures.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut map = HashMap::new();
        for (name, view) in st.tensors() {
            let d = view.data();
            let v: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => {
                    d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                safetensors::Dtype::F64 => {
                    d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
                }
                safetensors::Dtype::I64 => {
                    d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            map.insert(name, (view.shape().to_vec(), v));
        }
        Fx(map)
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn f64(&self, name: &str) -> &[f64] {
        &self.0.get(name).unwrap_or_else(|| panic!("fixture {name} missing")).1
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        self.f64(name).iter().map(|&v| v as f32).collect()
    }
    fn tensor(&self, name: &str, dev: &Device) -> Tensor {
        let shape = &self.0[name].0;
        Tensor::from_vec(self.f32(name), shape, dev).unwrap()
    }
}

fn config(name: &str) -> SchedulerConfig {
    SchedulerConfig::from_file(fixtures().join("schedulers").join(name)).unwrap()
}

fn pndm_config() -> SchedulerConfig {
    SchedulerConfig::from_file(fixtures().join("sd15_tiny_pipeline/scheduler/scheduler_config.json")).unwrap()
}

/// Devices to run the loops on: the CPU, and the GPU when an adapter exists.
fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(gpu());
    d
}

fn tmp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vipo_sched_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn err_text<T: std::fmt::Debug>(r: vipo::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

// ---------------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------------

#[test]
fn real_configs_parse() {
    let ddim = config("scheduler_config_ddim.json");
    assert_eq!(ddim.class_name.as_deref(), Some("DDIMScheduler"));
    assert_eq!(ddim.num_train_timesteps, Some(1000));
    assert_eq!(ddim.beta_start, Some(0.00085));
    assert_eq!(ddim.timestep_spacing, Some(TimestepSpacing::Leading));
    assert_eq!(ddim.steps_offset, Some(1));
    assert_eq!(ddim.set_alpha_to_one, Some(false));
    assert_eq!(ddim.trained_betas, None);
    assert_eq!(ddim.prediction_type, Some(PredictionType::Epsilon));
    assert_eq!(Scheduler::from_config(&ddim).unwrap().kind(), SchedulerKind::Ddim);
    assert_eq!(Scheduler::from_config(&config("scheduler_config_ddpm.json")).unwrap().kind(), SchedulerKind::Ddpm);
    let euler = config("scheduler_config_euler.json");
    assert_eq!(Scheduler::from_config(&euler).unwrap().kind(), SchedulerKind::Euler);
    assert_eq!(euler.timestep_spacing, Some(TimestepSpacing::Linspace));

    // SD1.5's PNDM config: parses, has no spacing, and every scheduler builds from it.
    let pndm = pndm_config();
    assert_eq!(pndm.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(pndm.timestep_spacing, None);
    assert_eq!(pndm.clip_sample, Some(false));
    for kind in SchedulerKind::ALL {
        let mut s = Scheduler::new(kind, &pndm).unwrap();
        s.set_timesteps(10).unwrap();
        assert_eq!(s.kind(), kind);
        assert_eq!(s.timesteps().len(), 10, "{kind}");
    }
    // It names a class vipo lacks: the error says so, names the key and the file.
    let e = err_text(Scheduler::from_config(&pndm));
    assert!(e.contains("PNDMScheduler") && e.contains("_class_name") && e.contains("scheduler_config.json"), "{e}");
}

#[test]
fn names_pick_schedulers() {
    for kind in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_name(kind.name()).unwrap(), kind);
        assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(SchedulerKind::from_class_name(kind.class_name()), Some(kind));
        assert_eq!(Scheduler::from_name(kind.name(), &pndm_config()).unwrap().kind(), kind);
    }
    assert_eq!(SchedulerKind::from_name("EULER_A").unwrap(), SchedulerKind::EulerAncestral);
    let e = err_text(SchedulerKind::from_name("pndm"));
    assert!(e.contains("pndm") && e.contains("dpmpp_2m") && e.contains("euler_a"), "{e}");
    // eta belongs to DDIM.
    assert!(Scheduler::from_name("euler", &pndm_config()).unwrap().with_eta(0.5).is_err());
    assert!(Scheduler::from_name("ddim", &pndm_config()).unwrap().with_eta(-1.0).is_err());
}

#[test]
fn config_errors_name_file_and_key() {
    let missing = fixtures().join("schedulers/no_such_config.json");
    let e = err_text(SchedulerConfig::from_file(&missing));
    assert!(e.contains("no_such_config.json"), "{e}");

    let cases = [
        ("bad_schedule.json", r#"{"beta_schedule": "cosine", "beta_start": 0.1}"#, "beta_schedule"),
        ("bad_type.json", r#"{"num_train_timesteps": "1000"}"#, "num_train_timesteps"),
        ("bad_number.json", r#"{"beta_end": "0.012"}"#, "beta_end"),
        ("bad_prediction.json", r#"{"prediction_type": "flow_prediction"}"#, "prediction_type"),
        ("bad_spacing.json", r#"{"timestep_spacing": "middle"}"#, "timestep_spacing"),
        ("not_json.json", r#"{"beta_start": 0.1,"#, "not valid JSON"),
    ];
    for (file, text, key) in cases {
        let p = tmp_file(file, text);
        let e = err_text(SchedulerConfig::from_file(&p));
        assert!(e.contains(file) && e.contains(key), "{file}: {e}");
    }

    // Valid JSON, refused when a scheduler is built: the error still names file and key.
    let refused = [
        ("thresh.json", r#"{"thresholding": true}"#, "thresholding", SchedulerKind::Ddim),
        ("karras.json", r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas", SchedulerKind::Euler),
        ("karras2.json", r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas", SchedulerKind::DpmPp2m),
        ("order3.json", r#"{"solver_order": 3}"#, "solver_order", SchedulerKind::DpmPp2m),
        ("sde.json", r#"{"algorithm_type": "sde-dpmsolver++"}"#, "algorithm_type", SchedulerKind::DpmPp2m),
        ("learned.json", r#"{"variance_type": "learned_range"}"#, "variance_type", SchedulerKind::Ddpm),
        ("loglin.json", r#"{"interpolation_type": "log_linear"}"#, "interpolation_type", SchedulerKind::Euler),
        (
            "short.json",
            r#"{"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}"#,
            "trained_betas",
            SchedulerKind::Ddim,
        ),
        ("range.json", r#"{"beta_start": 1.5}"#, "beta_start", SchedulerKind::Ddpm),
    ];
    for (file, text, key, kind) in refused {
        let cfg = SchedulerConfig::from_file(tmp_file(file, text)).unwrap();
        let e = err_text(Scheduler::new(kind, &cfg));
        assert!(e.contains(file) && e.contains(key), "{file}: {e}");
    }
    // From a string, errors name the key.
    let e = err_text(SchedulerConfig::from_json_str(r#"{"steps_offset": -1}"#));
    assert!(e.contains("steps_offset"), "{e}");
}

#[test]
fn config_quirks_of_diffusers_files() {
    // Unknown keys are ignored; Python's -Infinity is read; `_use_default_values` keys count
    // as missing (diffusers' from_config then uses the target class's default).
    let cfg = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "some_future_key": [1, {"a": NaN}], "note": "Infinity stays a string",
            "timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]}"#,
    )
    .unwrap();
    assert_eq!(cfg.lambda_min_clipped, Some(f64::NEG_INFINITY));
    assert_eq!(cfg.timestep_spacing, None);
    let mut s = Scheduler::from_config(&cfg).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.kind(), SchedulerKind::DpmPp2m);

    // trained_betas replace the schedule.
    let betas: Vec<f64> = (0..50).map(|i| 0.001 + 0.01 * i as f64 / 49.0).collect();
    let json = format!(r#"{{"trained_betas": {betas:?}, "num_train_timesteps": 50}}"#);
    let sched = NoiseSchedule::new(&SchedulerConfig::from_json_str(&json).unwrap()).unwrap();
    let want: Vec<f32> = betas.iter().map(|&b| b as f32).collect();
    assert_eq!(sched.betas(), want.as_slice());

    // Zero-terminal-SNR rescale: supported; DDIM ends at alphas_cumprod 0, the sigma
    // schedulers floor it at 2^-24 so their last sigma stays finite.
    let cfg = SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": true,
            "timestep_spacing": "trailing", "prediction_type": "v_prediction"}"#,
    )
    .unwrap();
    let ddim = Scheduler::new(SchedulerKind::Ddim, &cfg).unwrap();
    let ac = ddim.schedule().alphas_cumprod();
    assert_eq!(ac[999], 0.0);
    let plain = NoiseSchedule::new(&pndm_config()).unwrap();
    assert!((ac[0] - plain.alphas_cumprod()[0]).abs() < 1e-6, "rescale keeps alphas_cumprod[0]");
    let ac64 = ddim.schedule().alphas_cumprod_f64();
    let ac_f32: Vec<f32> = ac64.iter().map(|&v| v as f32).collect();
    assert_close("rescaled alphas_cumprod f32 vs f64", ac, &ac_f32, 1e-6, 0);
    let mut euler = Scheduler::new(SchedulerKind::Euler, &cfg).unwrap();
    assert_eq!(euler.schedule().alphas_cumprod()[999], 2f32.powi(-24));
    euler.set_timesteps(4).unwrap();
    assert!(euler.sigmas().unwrap().iter().all(|s| s.is_finite()));
    assert_eq!(euler.sigmas().unwrap()[0], ((1.0 - 2f32.powi(-24)) / 2f32.powi(-24)).sqrt());

    // squaredcos_cap_v2: diffusers' betas_for_alpha_bar, capped at 0.999.
    let cos = NoiseSchedule::new(&SchedulerConfig::from_json_str(r#"{"beta_schedule": "squaredcos_cap_v2"}"#).unwrap())
        .unwrap();
    let ab = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    for i in [0usize, 1, 500, 998, 999] {
        let want = (1.0 - ab((i + 1) as f64 / 1000.0) / ab(i as f64 / 1000.0)).min(0.999);
        assert!((cos.betas()[i] as f64 - want).abs() <= want * 1e-7, "cos beta {i}");
    }
    assert_eq!(cos.betas()[999], 0.999f32);
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

#[test]
fn betas_and_alphas_cumprod_match_diffusers() {
    let fx = Fx::load();
    let sched = NoiseSchedule::new(&config("scheduler_config_ddim.json")).unwrap();
    // Bit for bit: PyTorch's linspace (fused multiply-adds) and f64-accumulated cumprod.
    assert_eq!(sched.betas(), fx.f32("betas").as_slice(), "betas differ from diffusers' float32");
    assert_eq!(sched.alphas_cumprod(), fx.f32("alphas_cumprod").as_slice(), "alphas_cumprod differ");
    let got = sched.alphas_cumprod_f64();
    let want = fx.f64("alphas_cumprod_f64");
    let worst = got.iter().zip(want).map(|(g, w)| ((g - w) / w).abs()).fold(0.0, f64::max);
    assert!(worst <= 1e-15, "alphas_cumprod_f64: rel err {worst:.2e}");
    // The same from the PNDM config every pipeline starts with.
    assert_eq!(NoiseSchedule::new(&pndm_config()).unwrap().alphas_cumprod(), sched.alphas_cumprod());
}

/// Sigmas within 2 ulp: vipo takes a correctly rounded f32 sqrt of `(1 - a) / a`, while
/// PyTorch's `** 0.5` on the fixture machine was off by up to 1 ulp (4 of the 10 Euler sigmas).
#[track_caller]
fn assert_ulps(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
        assert!(ulps <= 2, "{what}[{k}]: {g} vs {w} ({ulps} ulp)\n got {got:?}\nwant {want:?}");
    }
}

#[test]
fn timesteps_and_sigmas_per_spacing() {
    let fx = Fx::load();
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let steps = |kind, cfg: &SchedulerConfig, n| {
        let mut s = Scheduler::new(kind, cfg).unwrap();
        s.set_timesteps(n).unwrap();
        s
    };
    // Fixtures: leading (+1) for DDIM and DDPM, linspace for Euler.
    let ddim = steps(SchedulerKind::Ddim, &config("scheduler_config_ddim.json"), 10);
    assert_eq!(ddim.timesteps(), as_f32(fx.f64("ddim.timesteps")).as_slice());
    let ddpm = steps(SchedulerKind::Ddpm, &config("scheduler_config_ddpm.json"), 10);
    assert_eq!(ddpm.timesteps(), as_f32(fx.f64("ddpm.timesteps")).as_slice());
    let euler = steps(SchedulerKind::Euler, &config("scheduler_config_euler.json"), 10);
    assert_eq!(euler.timesteps(), as_f32(fx.f64("euler.timesteps")).as_slice());
    assert_ulps("euler.sigmas", euler.sigmas().unwrap(), &as_f32(fx.f64("euler.sigmas")));
    assert_ulps("euler.init_noise_sigma", &[euler.init_noise_sigma()], &as_f32(fx.f64("euler.init_noise_sigma")));

    // The pipeline fixture's runs: schedulers swapped in from the PNDM config, Euler with 8
    // fractional timesteps (numpy interp of the sigmas).
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sd15_tiny_pipeline/meta.json")).unwrap())
            .unwrap();
    let list =
        |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let e8 = steps(SchedulerKind::Euler, &pndm_config(), 8);
    assert_eq!(e8.timesteps(), list(&meta["runs"]["euler8"]["timesteps"]).as_slice());
    assert_ulps("euler8 sigmas", e8.sigmas().unwrap(), &list(&meta["runs"]["euler8"]["sigmas"]));
    let want_init = meta["runs"]["euler8"]["init_noise_sigma"].as_f64().unwrap() as f32;
    assert_ulps("euler8 init_noise_sigma", &[e8.init_noise_sigma()], &[want_init]);
    let d10 = steps(SchedulerKind::Ddim, &pndm_config(), 10);
    assert_eq!(d10.timesteps(), list(&meta["runs"]["ddim10"]["timesteps"]).as_slice());
    assert_eq!(d10.init_noise_sigma(), 1.0);

    // Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (10 steps).
    let with = |spacing: &str, offset: usize| {
        SchedulerConfig::from_json_str(&format!(
            r#"{{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "timestep_spacing": "{spacing}", "steps_offset": {offset}}}"#
        ))
        .unwrap()
    };
    let ints = |v: &[f32]| v.iter().map(|&t| t as i64).collect::<Vec<_>>();
    for kind in [SchedulerKind::Ddim, SchedulerKind::Ddpm, SchedulerKind::Euler, SchedulerKind::EulerAncestral] {
        let trailing = steps(kind, &with("trailing", 0), 10);
        assert_eq!(ints(trailing.timesteps()), vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99], "{kind}");
        let linspace = steps(kind, &with("linspace", 0), 10);
        assert_eq!(ints(linspace.timesteps()), vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0], "{kind}");
        let leading = steps(kind, &with("leading", 1), 10);
        assert_eq!(ints(leading.timesteps()), vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1], "{kind}");
        // A step ratio that numpy's arange cannot hit exactly: 1000, 666.67, 333.33 -> -1.
        let three = steps(kind, &with("trailing", 0), 3);
        assert_eq!(ints(three.timesteps()), vec![999, 666, 332], "{kind}");
    }
    // Euler with leading spacing: init_noise_sigma = sqrt(max^2 + 1), on a fractional grid.
    let lead = steps(SchedulerKind::Euler, &with("leading", 1), 10);
    let s0 = lead.sigmas().unwrap()[0];
    assert_eq!(lead.init_noise_sigma(), (s0 * s0 + 1.0).sqrt());
    assert_eq!(lead.sigmas().unwrap().len(), 11);
    assert_eq!(*lead.sigmas().unwrap().last().unwrap(), 0.0);
    // DPM-Solver linspace: round(linspace(0, 999, n + 1)) without the 0; 499.5 rounds to even.
    let dpm = steps(SchedulerKind::DpmPp2m, &with("linspace", 0), 10);
    assert_eq!(ints(dpm.timesteps()), vec![999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
    let table = dpm.schedule().alphas_cumprod();
    for (k, &t) in dpm.timesteps().iter().enumerate() {
        let a = table[t as usize];
        assert_eq!(dpm.sigmas().unwrap()[k], ((1.0 - a) / a).sqrt());
    }
    let dpm_lead = steps(SchedulerKind::DpmPp2m, &with("leading", 1), 10);
    assert_eq!(ints(dpm_lead.timesteps()), vec![901, 811, 721, 631, 541, 451, 361, 271, 181, 91]);
    let dpm_trail = steps(SchedulerKind::DpmPp2m, &with("trailing", 0), 10);
    assert_eq!(ints(dpm_trail.timesteps()), vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);

    // Out of range step counts are errors, not panics.
    let mut s = Scheduler::new(SchedulerKind::Ddim, &pndm_config()).unwrap();
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    let e = err_text(s.set_timesteps(1000));
    assert!(e.contains("1000") && e.contains("steps_offset"), "leading + offset 1 overflows: {e}");
}

// ---------------------------------------------------------------------------------------------
// Forward process
// ---------------------------------------------------------------------------------------------

#[test]
fn add_noise_and_velocity_match_diffusers() {
    let fx = Fx::load();
    let sched = NoiseSchedule::new(&config("scheduler_config_ddpm.json")).unwrap();
    let ts: Vec<usize> = fx.f64("add_noise.timesteps").iter().map(|&t| t as usize).collect();
    for dev in devices() {
        let x0 = fx.tensor("add_noise.x0", &dev);
        let noise = fx.tensor("add_noise.noise", &dev);
        let noisy = sched.add_noise(&x0, &noise, &ts).unwrap();
        assert!(noisy.device() == dev);
        let v = sched.get_velocity(&x0, &noise, &ts).unwrap();
        let (got_n, got_v) = (noisy.to_vec().unwrap(), v.to_vec().unwrap());
        let (want_n, want_v) = (fx.f32("add_noise.out"), fx.f32("get_velocity.out"));
        eprintln!(
            "add_noise on {dev}: rel err {:.2e}; get_velocity: {:.2e}",
            rel_err(&got_n, &want_n),
            rel_err(&got_v, &want_v)
        );
        assert_close(&format!("add_noise on {dev}"), &got_n, &want_n, 1e-6, 0);
        assert_close(&format!("get_velocity on {dev}"), &got_v, &want_v, 1e-6, 0);
    }
    // Bad inputs are errors.
    let x0 = fx.tensor("add_noise.x0", &Device::Cpu);
    let noise = fx.tensor("add_noise.noise", &Device::Cpu);
    assert!(sched.add_noise(&x0, &noise, &[1]).is_err(), "one timestep for a batch of 2");
    assert!(sched.add_noise(&x0, &noise, &[1, 1000]).is_err(), "timestep 1000");
    assert!(sched.get_velocity(&x0, &noise.reshape(&[4, -1]).unwrap(), &[1, 2]).is_err(), "shapes differ");
}

// ---------------------------------------------------------------------------------------------
// Loops against diffusers
// ---------------------------------------------------------------------------------------------

/// Runs the fixture's loop `prefix` (ddim, euler, ddpm) with the stand-in model
/// `0.9 * scale_model_input(x_i) + 0.1 * eps_i`, from its own previous output, comparing every
/// recorded tensor. Returns the worst relative error.
fn replay(fx: &Fx, kind: SchedulerKind, cfg: &str, prefix: &str, dev: &Device) -> f64 {
    let mut s = Scheduler::new(kind, &config(cfg)).unwrap();
    s.set_timesteps(10).unwrap();
    let want_ts: Vec<f32> = fx.f64(&format!("{prefix}.timesteps")).iter().map(|&t| t as f32).collect();
    assert_eq!(s.timesteps(), want_ts.as_slice());
    // The fixture's x_init already carries init_noise_sigma.
    let mut x = fx.tensor(&format!("{prefix}.x_init"), dev);
    let mut worst = 0f64;
    let mut check = |what: String, got: &Tensor| {
        if fx.has(&what) {
            let (g, w) = (got.to_vec().unwrap(), fx.f32(&what));
            worst = worst.max(rel_err(&g, &w));
            assert_close(&format!("{what} on {dev}"), &g, &w, LOOP_TOL, 0);
        }
    };
    for i in 0..10 {
        let mi = s.scale_model_input(&x, i).unwrap();
        check(format!("{prefix}.model_input.{i}"), &mi);
        let eps = fx.tensor(&format!("{prefix}.eps.{i}"), dev);
        let m = mi.mul_scalar(0.9).unwrap().add(&eps.mul_scalar(0.1).unwrap()).unwrap();
        let noise_name = format!("{prefix}.variance_noise.{i}");
        let z = fx.has(&noise_name).then(|| fx.tensor(&noise_name, dev));
        let noise = z.as_ref().map_or(Noise::None, Noise::Given);
        let out = s.step(i, &m, &x, noise).unwrap();
        assert!(out.prev_sample.device() == *dev);
        check(format!("{prefix}.pred_original_sample.{i}"), &out.pred_original_sample);
        check(format!("{prefix}.x.{i}"), &out.prev_sample);
        x = out.prev_sample;
    }
    worst
}

#[test]
fn ddim_loop_matches_diffusers() {
    let fx = Fx::load();
    for dev in devices() {
        let worst = replay(&fx, SchedulerKind::Ddim, "scheduler_config_ddim.json", "ddim", &dev);
        eprintln!("ddim 10 steps on {dev}: worst rel err {worst:.2e}");
    }
}

#[test]
fn ddim_eta1_step_matches_diffusers() {
    let fx = Fx::load();
    for dev in devices() {
        let mut s =
            Scheduler::new(SchedulerKind::Ddim, &config("scheduler_config_ddim.json")).unwrap().with_eta(1.0).unwrap();
        s.set_timesteps(10).unwrap();
        let t = fx.f64("ddim_eta1.timestep")[0] as f32;
        let i = s.timesteps().iter().position(|&x| x == t).unwrap();
        let sample = fx.tensor("ddim_eta1.sample", &dev);
        let m = fx.tensor("ddim_eta1.model_output", &dev);
        let z = fx.tensor("ddim_eta1.variance_noise", &dev);
        let out = s.step(i, &m, &sample, Noise::Given(&z)).unwrap();
        let (g, w) = (out.prev_sample.to_vec().unwrap(), fx.f32("ddim_eta1.prev_sample"));
        eprintln!("ddim eta=1 step on {dev}: rel err {:.2e}", rel_err(&g, &w));
        assert_close(&format!("ddim eta=1 on {dev}"), &g, &w, LOOP_TOL, 0);
        // eta > 0 needs noise.
        assert!(s.step(i, &m, &sample, Noise::None).is_err());
    }
}

#[test]
fn euler_loop_matches_diffusers() {
    let fx = Fx::load();
    for dev in devices() {
        let worst = replay(&fx, SchedulerKind::Euler, "scheduler_config_euler.json", "euler", &dev);
        eprintln!("euler 10 steps on {dev}: worst rel err {worst:.2e}");
    }
}

#[test]
fn ddpm_loop_matches_diffusers() {
    let fx = Fx::load();
    for dev in devices() {
        let worst = replay(&fx, SchedulerKind::Ddpm, "scheduler_config_ddpm.json", "ddpm", &dev);
        eprintln!("ddpm 10 steps on {dev}: worst rel err {worst:.2e}");
    }
    // DDPM draws noise for t > 0: without a source the step fails, naming the scheduler.
    let mut s = Scheduler::new(SchedulerKind::Ddpm, &config("scheduler_config_ddpm.json")).unwrap();
    s.set_timesteps(10).unwrap();
    let x = fx.tensor("ddpm.x_init", &Device::Cpu);
    let e = err_text(s.step(0, &x, &x, Noise::None));
    assert!(e.contains("ddpm"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Euler ancestral and DPM-Solver++ 2M against float64 re-implementations
// ---------------------------------------------------------------------------------------------

/// numpy's interp over a unit grid, written out again for the references.
fn interp64(t: f64, table: &[f64]) -> f64 {
    let j = (t.floor() as usize).min(table.len() - 2);
    table[j] + (table[j + 1] - table[j]) * (t - j as f64)
}

fn sd15_cfg(extra: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&format!(
        r#"{{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
             "clip_sample": false, "set_alpha_to_one": false {extra}}}"#
    ))
    .unwrap()
}

/// Sigma table `sqrt((1 - a) / a)` in f64 from the fixture's float32 alphas_cumprod (the same
/// inputs the scheduler starts from).
fn sigma_table64(fx: &Fx) -> Vec<f64> {
    fx.f64("alphas_cumprod").iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

#[test]
fn euler_ancestral_matches_f64_reference() {
    let fx = Fx::load();
    let table = sigma_table64(&fx);
    let shape = [2usize, 3, 5, 7];
    let n_el: usize = shape.iter().product();
    for (n, pred) in [(10usize, "epsilon"), (8, "epsilon"), (7, "v_prediction")] {
        let cfg = sd15_cfg(&format!(r#", "prediction_type": "{pred}""#));
        let v_pred = pred == "v_prediction";
        // Reference: linspace timesteps rounded to f32 as diffusers stores them, interp in f64.
        let ts: Vec<f64> = (0..n).map(|k| ((999.0 * (n - 1 - k) as f64 / (n - 1) as f64) as f32) as f64).collect();
        let mut sig: Vec<f64> = ts.iter().map(|&t| interp64(t, &table)).collect();
        sig.push(0.0);
        let x_init = randn(n_el, 7).iter().map(|&v| v as f64 * sig[0]).collect::<Vec<f64>>();
        let eps: Vec<Vec<f32>> = (0..n).map(|i| randn(n_el, 100 + i as u64)).collect();
        let noise: Vec<Vec<f32>> = (0..n).map(|i| randn(n_el, 200 + i as u64)).collect();

        let mut x64 = x_init.clone();
        let mut ref_steps = Vec::new();
        for i in 0..n {
            let (s, s_to) = (sig[i], sig[i + 1]);
            let c = (s * s + 1.0).sqrt();
            let m: Vec<f64> = x64.iter().zip(&eps[i]).map(|(&x, &e)| 0.9 * x / c + 0.1 * e as f64).collect();
            let up = (s_to * s_to * (s * s - s_to * s_to) / (s * s)).sqrt();
            let down = (s_to * s_to - up * up).sqrt();
            x64 = x64
                .iter()
                .zip(&m)
                .zip(&noise[i])
                .map(|((&x, &m), &z)| {
                    let x0 = if v_pred { m * (-s / c) + x / (c * c) } else { x - s * m };
                    x + (x - x0) / s * (down - s) + z as f64 * up
                })
                .collect();
            ref_steps.push(x64.iter().map(|&v| v as f32).collect::<Vec<f32>>());
        }

        for dev in devices() {
            let mut s = Scheduler::new(SchedulerKind::EulerAncestral, &cfg).unwrap();
            s.set_timesteps(n).unwrap();
            assert_eq!(s.init_noise_sigma(), s.sigmas().unwrap()[0]);
            let got_sig: Vec<f64> = s.sigmas().unwrap().iter().map(|&v| v as f64).collect();
            for (g, w) in got_sig.iter().zip(&sig) {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "sigmas {got_sig:?} vs {sig:?}");
            }
            let xi: Vec<f32> = x_init.iter().map(|&v| v as f32).collect();
            let mut x = Tensor::from_vec(xi, &shape, &dev).unwrap();
            let mut worst = 0f64;
            for i in 0..n {
                let mi = s.scale_model_input(&x, i).unwrap();
                let e = Tensor::from_slice(&eps[i], &shape, &dev).unwrap();
                let m = mi.mul_scalar(0.9).unwrap().add(&e.mul_scalar(0.1).unwrap()).unwrap();
                let z = Tensor::from_slice(&noise[i], &shape, &dev).unwrap();
                x = s.step(i, &m, &x, Noise::Given(&z)).unwrap().prev_sample;
                let g = x.to_vec().unwrap();
                worst = worst.max(rel_err(&g, &ref_steps[i]));
                assert_close(&format!("euler_a {pred} n={n} step {i} on {dev}"), &g, &ref_steps[i], F64_TOL, 7);
            }
            eprintln!("euler_a {pred} {n} steps on {dev}: worst rel err vs f64 {worst:.2e}");
        }
    }
}

/// DPM-Solver++ 2M in float64, from diffusers' formulas: first order on the first step and
/// on the last (final sigma 0), second order (midpoint or heun) in between.
fn dpmpp_2m_reference(sig: &[f64], x_init: &[f64], eps: &[Vec<f32>], v_pred: bool, heun: bool) -> Vec<Vec<f32>> {
    let n = sig.len() - 1;
    let alpha_sigma = |s: f64| (1.0 / (s * s + 1.0).sqrt(), s / (s * s + 1.0).sqrt());
    let lambda = |s: f64| {
        let (a, sg) = alpha_sigma(s);
        a.ln() - sg.ln()
    };
    let mut x = x_init.to_vec();
    let mut prev_x0: Option<Vec<f64>> = None;
    let mut out = Vec::new();
    for i in 0..n {
        let (a_s, s_s) = alpha_sigma(sig[i]);
        let m: Vec<f64> = x.iter().zip(&eps[i]).map(|(&x, &e)| 0.9 * x + 0.1 * e as f64).collect();
        let x0: Vec<f64> =
            x.iter().zip(&m).map(|(&x, &m)| if v_pred { a_s * x - s_s * m } else { (x - s_s * m) / a_s }).collect();
        let first_order = prev_x0.is_none() || i == n - 1;
        x = if sig[i + 1] == 0.0 {
            // sigma_t = 0: lambda_t = inf, the update lands on x0.
            x0.clone()
        } else {
            let (a_t, s_t) = alpha_sigma(sig[i + 1]);
            let h = lambda(sig[i + 1]) - lambda(sig[i]);
            let c = a_t * ((-h).exp() - 1.0);
            if first_order {
                x.iter().zip(&x0).map(|(&x, &d0)| s_t / s_s * x - c * d0).collect()
            } else {
                let h0 = lambda(sig[i]) - lambda(sig[i - 1]);
                let r0 = h0 / h;
                let m1 = prev_x0.as_ref().unwrap();
                x.iter()
                    .zip(&x0)
                    .zip(m1)
                    .map(|((&x, &d0), &m1)| {
                        let d1 = (d0 - m1) / r0;
                        let second = if heun { -a_t * (((-h).exp() - 1.0) / h + 1.0) * d1 } else { 0.5 * c * d1 };
                        s_t / s_s * x - c * d0 - second
                    })
                    .collect()
            }
        };
        prev_x0 = Some(x0);
        out.push(x.iter().map(|&v| v as f32).collect());
    }
    out
}

#[test]
fn dpmpp_2m_matches_f64_reference() {
    let fx = Fx::load();
    let table = sigma_table64(&fx);
    let shape = [1usize, 4, 9, 11];
    let n_el: usize = shape.iter().product();
    let cases = [
        (10usize, "epsilon", "midpoint"),
        (20, "epsilon", "midpoint"),
        (10, "v_prediction", "midpoint"),
        (12, "epsilon", "heun"),
    ];
    for (n, pred, solver) in cases {
        let cfg = sd15_cfg(&format!(r#", "prediction_type": "{pred}", "solver_type": "{solver}""#));
        // Timesteps round(linspace(0, 999, n + 1)) half to even, the 0 dropped.
        let ts: Vec<usize> = (1..=n).rev().map(|k| (999.0 * k as f64 / n as f64).round_ties_even() as usize).collect();
        let mut sig: Vec<f64> = ts.iter().map(|&t| table[t]).collect();
        sig.push(0.0);
        let x_init: Vec<f64> = randn(n_el, 11).iter().map(|&v| v as f64).collect();
        let eps: Vec<Vec<f32>> = (0..n).map(|i| randn(n_el, 300 + i as u64)).collect();
        let want = dpmpp_2m_reference(&sig, &x_init, &eps, pred == "v_prediction", solver == "heun");
        for dev in devices() {
            let mut s = Scheduler::new(SchedulerKind::DpmPp2m, &cfg).unwrap();
            s.set_timesteps(n).unwrap();
            let got_ts: Vec<usize> = s.timesteps().iter().map(|&t| t as usize).collect();
            assert_eq!(got_ts, ts);
            assert_eq!(s.init_noise_sigma(), 1.0);
            let xi: Vec<f32> = x_init.iter().map(|&v| v as f32).collect();
            let mut x = Tensor::from_vec(xi, &shape, &dev).unwrap();
            let mut worst = 0f64;
            for i in 0..n {
                let mi = s.scale_model_input(&x, i).unwrap();
                let e = Tensor::from_slice(&eps[i], &shape, &dev).unwrap();
                let m = mi.mul_scalar(0.9).unwrap().add(&e.mul_scalar(0.1).unwrap()).unwrap();
                x = s.step(i, &m, &x, Noise::None).unwrap().prev_sample;
                let g = x.to_vec().unwrap();
                worst = worst.max(rel_err(&g, &want[i]));
                assert_close(&format!("dpmpp_2m {pred} {solver} n={n} step {i} on {dev}"), &g, &want[i], F64_TOL, 11);
            }
            eprintln!("dpmpp_2m {pred} {solver} {n} steps on {dev}: worst rel err vs f64 {worst:.2e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Perfect denoiser: every scheduler recovers x0, for epsilon and v_prediction
// ---------------------------------------------------------------------------------------------

/// The VP noise level `(alpha_i, sigma_i)` the model sees at step i (its input is
/// `alpha_i * x0 + sigma_i * eps` for every scheduler here).
fn vp_level(s: &Scheduler, i: usize) -> (f64, f64) {
    match s.sigmas() {
        Some(sig) => {
            let sg = sig[i] as f64;
            (1.0 / (sg * sg + 1.0).sqrt(), sg / (sg * sg + 1.0).sqrt())
        }
        None => {
            let a = s.schedule().alphas_cumprod()[s.timesteps()[i] as usize] as f64;
            (a.sqrt(), (1.0 - a).sqrt())
        }
    }
}

/// What the sample should be after step i on the deterministic path `x = a x0 + s eps`
/// (`x0 + sigma eps` for the Euler ones).
fn on_path(s: &Scheduler, i: usize, x0: &[f32], eps: &[f32]) -> Option<Vec<f32>> {
    let (a, sg) = match s.kind() {
        SchedulerKind::Ddim => {
            let ac = s.schedule().alphas_cumprod();
            let prev = s.timesteps()[i] as i64 - (1000 / s.timesteps().len()) as i64;
            let a = if prev >= 0 { ac[prev as usize] as f64 } else { 1.0 };
            (a.sqrt(), (1.0 - a).sqrt())
        }
        SchedulerKind::Euler => (1.0, s.sigmas().unwrap()[i + 1] as f64),
        SchedulerKind::DpmPp2m => {
            let sg = s.sigmas().unwrap()[i + 1] as f64;
            (1.0 / (sg * sg + 1.0).sqrt(), sg / (sg * sg + 1.0).sqrt())
        }
        _ => return None,
    };
    Some(x0.iter().zip(eps).map(|(&x, &e)| (a * x as f64 + sg * e as f64) as f32).collect())
}

#[test]
fn perfect_denoiser_recovers_x0() {
    let shape = [2usize, 4, 5, 7];
    let n_el: usize = shape.iter().product();
    let x0v = randn(n_el, 21);
    let epsv = randn(n_el, 22);
    for pred in ["epsilon", "v_prediction"] {
        // set_alpha_to_one so DDIM's last step lands on x0; no clipping of the randn x0.
        let cfg = SchedulerConfig::from_json_str(&format!(
            r#"{{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                 "clip_sample": false, "set_alpha_to_one": true, "prediction_type": "{pred}"}}"#
        ))
        .unwrap();
        for kind in SchedulerKind::ALL {
            for dev in devices() {
                let mut s = Scheduler::new(kind, &cfg).unwrap();
                s.set_timesteps(12).unwrap();
                let x0 = Tensor::from_slice(&x0v, &shape, &dev).unwrap();
                let eps = Tensor::from_slice(&epsv, &shape, &dev).unwrap();
                // Start on the path: alpha x0 + sigma eps, in the scheduler's own space.
                let (a0, s0) = vp_level(&s, 0);
                let scale = if s.sigmas().is_some() && kind != SchedulerKind::DpmPp2m { 1.0 / a0 } else { 1.0 };
                let mut x = x0
                    .mul_scalar((a0 * scale) as f32)
                    .unwrap()
                    .add(&eps.mul_scalar((s0 * scale) as f32).unwrap())
                    .unwrap();
                let mut rng = Rng::new(5);
                for i in 0..12 {
                    let mi = s.scale_model_input(&x, i).unwrap();
                    let (a, sg) = vp_level(&s, i);
                    // The exact target for the model's input.
                    let eps_hat =
                        mi.sub(&x0.mul_scalar(a as f32).unwrap()).unwrap().mul_scalar((1.0 / sg) as f32).unwrap();
                    let m = match pred {
                        "epsilon" => eps_hat,
                        _ => eps_hat.mul_scalar(a as f32).unwrap().sub(&x0.mul_scalar(sg as f32).unwrap()).unwrap(),
                    };
                    let out = s.step(i, &m, &x, Noise::Rng(&mut rng)).unwrap();
                    let what = format!("{kind} {pred} step {i} on {dev}");
                    assert_close(&format!("{what}: x0"), &out.pred_original_sample.to_vec().unwrap(), &x0v, 2e-5, 21);
                    if let Some(want) = on_path(&s, i, &x0v, &epsv) {
                        assert_close(&format!("{what}: on path"), &out.prev_sample.to_vec().unwrap(), &want, 2e-5, 21);
                    }
                    x = out.prev_sample;
                }
                let got = x.to_vec().unwrap();
                eprintln!("{kind} {pred} on {dev}: final vs x0 rel err {:.2e}", rel_err(&got, &x0v));
                assert_close(&format!("{kind} {pred} final on {dev}"), &got, &x0v, 2e-5, 21);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Noise sources and misuse
// ---------------------------------------------------------------------------------------------

#[test]
fn noise_sources_replay_and_misuse_fails() {
    let shape = [1usize, 4, 3, 5];
    let n_el: usize = shape.iter().product();
    let x = Tensor::from_vec(randn(n_el, 1), &shape, &Device::Cpu).unwrap();
    let m = Tensor::from_vec(randn(n_el, 2), &shape, &Device::Cpu).unwrap();
    let run = |noise_seed: u64, use_fn: bool| {
        let mut s = Scheduler::from_name("euler_a", &pndm_config()).unwrap();
        s.set_timesteps(5).unwrap();
        let mut rng = Rng::new(noise_seed);
        let mut draws = 0;
        let mut f = |sh: &[usize], d: &Device| {
            draws += 1;
            Tensor::from_vec(Rng::new(noise_seed).normal_vec(sh.iter().product()), sh, d)
        };
        let noise = if use_fn { Noise::Fn(&mut f) } else { Noise::Rng(&mut rng) };
        let out = s.step(0, &m, &x, noise).unwrap().prev_sample.to_vec().unwrap();
        (out, draws)
    };
    let (a, _) = run(9, false);
    assert_eq!(a, run(9, false).0, "same seed, same step");
    assert_ne!(a, run(10, false).0, "the noise matters");
    let (b, draws) = run(9, true);
    assert_eq!(draws, 1, "one draw per step");
    assert_eq!(a, b, "a closure drawing the same values gives the same step");

    let mut s = Scheduler::from_name("euler", &pndm_config()).unwrap();
    let e = err_text(s.step(0, &m, &x, Noise::None));
    assert!(e.contains("set_timesteps"), "{e}");
    s.set_timesteps(5).unwrap();
    assert!(s.step(5, &m, &x, Noise::None).is_err(), "index past the end");
    assert!(s.step(0, &m.reshape(&[4, -1]).unwrap(), &x, Noise::None).is_err(), "shapes differ");
    assert!(s.timestep(5).is_err());
    assert_eq!(s.timestep(0).unwrap(), 999.0);
    let mut a = Scheduler::from_name("euler_a", &pndm_config()).unwrap();
    a.set_timesteps(5).unwrap();
    let wrong = Tensor::zeros(&[1, 4, 3, 4], &Device::Cpu).unwrap();
    assert!(a.step(0, &m, &x, Noise::Given(&wrong)).is_err(), "noise of the wrong shape");
}
