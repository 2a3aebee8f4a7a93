//! f16 weight storage: the f32 <-> f16 cast (GPU kernel and CPU twin) bit for bit against the
//! `half` crate (PyTorch's `.half()` rounding: nearest even, overflow to inf, subnormals kept),
//! params stored in f16 reading as their rounded f32 values, and the tiny SD pipeline sampled
//! with f16 weights against diffusers' fp16-weights run, at about half the GPU memory.
mod common;
use std::path::PathBuf;

use common::*;
use half::f16;
use vipo::nn::Linear;
use vipo::params::{Param, ParamStore};
use vipo::pipelines::stable_diffusion::{LoadOptions, SampleRequest, StableDiffusion};
use vipo::{DType, Device, Tensor};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sd15_tiny_pipeline")
}

/// Awkward f32 inputs: random bit patterns (every exponent, NaNs, f32 subnormals), normals at
/// scales that hit f16's subnormal range and its overflow, and hand-picked rounding ties.
fn awkward_f32(n: usize, seed: u64) -> Vec<f32> {
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        65504.0,              // f16 max
        65519.99,             // rounds down to 65504
        65520.0,              // tie with inf: rounds to even, i.e. inf
        -1e10,                // overflow
        5.960_464_5e-8,       // 2^-24, the smallest f16 subnormal
        2.980_232_2e-8,       // 2^-25: tie with 0, rounds to 0
        4.470_348_4e-8,       // 3 * 2^-26: rounds up to 2^-24
        6.097_555e-5,         // the largest f16 subnormal
        6.103_515_6e-5,       // 2^-14, the smallest f16 normal
        1.0 + 4.882_812_5e-4, // 1 + 2^-11: tie, rounds to 1 (even)
        1.0 + 1.464_843_8e-3, // 1 + 3 * 2^-11: tie, rounds up to 1 + 2^-9
        1e-40,                // f32 subnormal: to +0
        -1e-40,               // to -0
        -std::f32::consts::PI,
    ];
    let mut rng = vipo::rng::Rng::new(seed);
    let normal = randn(n, seed ^ 7);
    (0..n)
        .map(|i| match i % 5 {
            _ if i < specials.len() => specials[i],
            0 => f32::from_bits((rng.next_u64() >> 32) as u32),
            1 => normal[i] * 1e-5,
            2 => normal[i] * 3e4,
            _ => normal[i],
        })
        .collect()
}

/// Bit-exact comparison, NaN only as NaN (payloads are not part of the contract).
#[track_caller]
fn assert_same_f16(what: &str, got: &[f16], want: &[f16]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: got {g} (bits {:#06x}), want NaN", g.to_bits());
        } else {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g}, want {w}");
        }
    }
}

#[track_caller]
fn assert_same_f32(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: got {g}, want NaN");
        } else {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g:e}, want {w:e}");
        }
    }
}

#[test]
fn f32_to_f16_rounds_like_pytorch_on_cpu_and_gpu() {
    // Odd sizes leave the last packed word half used; 70001 spans several workgroups.
    for (k, n) in [1usize, 3, 19, 257, 1001, 70_001].into_iter().enumerate() {
        let seed = 100 + k as u64;
        let x = awkward_f32(n, seed);
        let want: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let shape = if n % 3 == 0 { vec![3, 1, n / 3] } else { vec![n] };
        let cpu = Tensor::from_slice(&x, &shape, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        assert_eq!((cpu.dtype(), cpu.shape()), (DType::F16, &shape[..]));
        assert_same_f16(&format!("cpu n={n} seed={seed}"), &cpu.to_f16_vec().unwrap(), &want);
        if let Some(g) = gpu() {
            let t = Tensor::from_slice(&x, &shape, &g).unwrap().to_dtype(DType::F16).unwrap();
            assert_eq!((t.dtype(), t.shape()), (DType::F16, &shape[..]));
            assert_same_f16(&format!("gpu n={n} seed={seed}"), &t.to_f16_vec().unwrap(), &want);
            // Back to f32 on the GPU: exact, and what to_vec gives for the f16 tensor.
            let back = t.to_dtype(DType::F32).unwrap();
            let wide: Vec<f32> = want.iter().map(|h| h.to_f32()).collect();
            assert_same_f32(&format!("gpu round trip n={n}"), &back.to_vec().unwrap(), &wide);
            assert_same_f32(&format!("gpu to_vec of f16 n={n}"), &t.to_vec().unwrap(), &wide);
        }
    }
}

#[test]
fn f16_to_f32_is_exact_for_every_bit_pattern() {
    // All 65536 halves (subnormals, inf, NaN) plus one, for an odd count.
    let h: Vec<f16> = (0..=65536u32).map(|b| f16::from_bits(b as u16)).collect();
    let want: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    let n = h.len();
    let cpu = Tensor::from_f16_vec(h.clone(), &[n], &Device::Cpu).unwrap();
    assert_same_f32("cpu", &cpu.to_dtype(DType::F32).unwrap().to_vec().unwrap(), &want);
    if let Some(g) = gpu() {
        let t = Tensor::from_f16_vec(h.clone(), &[1, n], &g).unwrap();
        assert_same_f16("gpu upload", &t.to_f16_vec().unwrap(), &h);
        let wide = t.to_dtype(DType::F32).unwrap();
        assert_eq!(wide.dtype(), DType::F32);
        assert_same_f32("gpu", &wide.to_vec().unwrap(), &want);
        // And through f16 again: every non-NaN value survives the round trip.
        assert_same_f16("gpu f16 -> f32 -> f16", &wide.to_dtype(DType::F16).unwrap().to_f16_vec().unwrap(), &h);
    }
}

#[test]
fn f16_tensors_move_reshape_and_refuse_ops() {
    let x = awkward_f32(37, 5).into_iter().map(|v| if v.is_finite() { v } else { 1.5 }).collect::<Vec<_>>();
    let want: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let cpu = Tensor::from_slice(&x, &[37], &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    // An op names itself and the dtype instead of reading packed halves as floats.
    let err = cpu.add(&cpu).unwrap_err().to_string();
    assert!(err.contains("f16"), "{err}");
    assert!(cpu.to_dtype(DType::F16).unwrap().same_storage(&cpu), "same dtype: no copy");
    let r = cpu.reshape(&[1, 37]).unwrap();
    assert_eq!(r.dtype(), DType::F16);
    assert!(Tensor::from_f16_vec(want.clone(), &[36], &Device::Cpu).is_err());
    if let Some(g) = gpu() {
        let on_gpu = cpu.to(&g).unwrap();
        assert_eq!(on_gpu.dtype(), DType::F16, "to() keeps the dtype");
        let err = on_gpu.exp().unwrap_err().to_string();
        assert!(err.contains("f16"), "{err}");
        let back = on_gpu.reshape(&[37, 1]).unwrap().to(&Device::Cpu).unwrap();
        assert_eq!((back.dtype(), back.shape()), (DType::F16, &[37usize, 1][..]));
        assert_same_f16("gpu -> cpu", &back.to_f16_vec().unwrap(), &want);
    }
}

#[test]
fn cast_passes_the_gradient_through() {
    let x = Tensor::from_vec(randn(11, 3), &[11], &Device::Cpu).unwrap().requires_grad();
    let y = x.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap().mul_scalar(3.0).unwrap();
    y.sum_all().unwrap().backward().unwrap();
    let g = x.grad().expect("gradient").to_vec().unwrap();
    assert!(g.iter().all(|&v| v == 3.0), "{g:?}");
}

/// GPU live bytes for one buffer are its pool bucket (a power of two at these sizes).
#[test]
fn f16_gpu_tensors_take_half_the_memory() {
    let Some(g) = gpu() else { return };
    let Device::Gpu(ctx) = Device::open_private(g.gpu().unwrap().index).unwrap() else { unreachable!() };
    let dev = Device::Gpu(ctx.clone());
    let x = Tensor::randn(&[3, 1, 33_333], 9, &dev).unwrap(); // 99999 values: 399996 bytes
    let base = ctx.pool_stats().live_bytes;
    let h = x.to_dtype(DType::F16).unwrap(); // 50000 words: 200000 bytes
    let added = ctx.pool_stats().live_bytes - base;
    assert_eq!(added, 262_144, "f16 bucket");
    drop(x);
    assert_eq!(ctx.pool_stats().live_bytes, 262_144);
    drop(h);
}

/// Weights (13, 7) and biases (13) with values f16 must round, one subnormal in f16 and one
/// beyond its range (-inf once rounded, as in PyTorch).
fn param_tensors() -> (Vec<f32>, Vec<f32>) {
    let mut w = randn(13 * 7, 21);
    w[4] = 1e-6;
    w[5] = -7e4;
    let b = randn(13, 22).iter().map(|v| v * 0.1).collect();
    (w, b)
}

fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

#[test]
fn a_param_stored_in_f16_gives_the_forward_of_its_rounding() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu());
    for dev in devices {
        let (mut w, b) = param_tensors();
        w[5] = -3e4; // finite after rounding, so the outputs stay comparable
        let x = Tensor::from_vec(randn(5 * 7, 23), &[5, 7], &dev).unwrap(); // (5, 7)
        let mut half = ParamStore::new();
        half.insert("l.weight", Tensor::from_slice(&w, &[13, 7], &dev).unwrap(), true).unwrap();
        half.insert("l.bias", Tensor::from_slice(&b, &[13], &dev).unwrap(), true).unwrap();
        let mut reference = ParamStore::new();
        reference.insert("l.weight", Tensor::from_vec(rounded(&w), &[13, 7], &dev).unwrap(), false).unwrap();
        reference.insert("l.bias", Tensor::from_vec(rounded(&b), &[13], &dev).unwrap(), false).unwrap();

        // Trainable params stay f32.
        let p = half.get("l.weight").unwrap();
        assert!(p.set_storage_dtype(DType::F16).is_err(), "a trainable param refuses f16 storage");
        half.store_frozen_as(DType::F16).unwrap();
        assert_eq!(p.storage_dtype(), DType::F32, "store_frozen_as skips trainable params");
        half.freeze_all();
        let f32_bytes = half.stored_bytes();
        half.store_frozen_as(DType::F16).unwrap();
        assert_eq!(half.stored_bytes() * 2, f32_bytes);
        assert_eq!(p.storage_dtype(), DType::F16);
        assert_eq!(p.value().dtype(), DType::F32, "reads are f32");
        assert_eq!(p.stored_value().dtype(), DType::F16);
        assert!(format!("{p:?}").contains("f16"), "{p:?}");

        let lh = Linear::load(&half.pp("l"), 7, 13, true).unwrap();
        let lr = Linear::load(&reference.pp("l"), 7, 13, true).unwrap();
        let got = lh.forward(&x).unwrap().to_vec().unwrap();
        let want = lr.forward(&x).unwrap().to_vec().unwrap();
        assert_same_f32(&format!("linear on {dev}"), &got, &want);
        assert_same_f32(&format!("value on {dev}"), &p.value().to_vec().unwrap(), &rounded(&w));

        // set_value on a frozen f16 param rounds; making it trainable widens it back to f32.
        p.set_value(Tensor::from_slice(&w, &[13, 7], &dev).unwrap()).unwrap();
        assert_eq!(p.storage_dtype(), DType::F16);
        p.set_trainable(true);
        assert_eq!(p.storage_dtype(), DType::F32);
        assert_same_f32("widened", &p.value().to_vec().unwrap(), &rounded(&w));
        p.set_value(Tensor::from_slice(&w, &[13, 7], &dev).unwrap()).unwrap();
        assert_same_f32("trainable keeps f32", &p.value().to_vec().unwrap(), &w);
    }
}

#[test]
fn f16_params_save_load_and_move() {
    let dir = std::env::temp_dir().join(format!("vipo_half_weights_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (w, b) = param_tensors();
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu());
    for dev in devices {
        let mut store = ParamStore::new();
        store.insert("a.weight", Tensor::from_slice(&w, &[13, 7], &dev).unwrap(), false).unwrap();
        store.insert("a.bias", Tensor::from_slice(&b, &[13], &dev).unwrap(), false).unwrap();
        store.store_frozen_as(DType::F16).unwrap();
        for dtype in [DType::F32, DType::F16] {
            let path = dir.join(format!("p_{dtype}.safetensors"));
            store.save_safetensors(&path, dtype).unwrap();
            let back = ParamStore::load_safetensors(&path, &Device::Cpu).unwrap();
            let got = back.get("a.weight").unwrap().value().to_vec().unwrap();
            // -7e4 is -inf once in f16, and saves as such (not an out-of-range error).
            assert_same_f32(&format!("saved as {dtype} from {dev}"), &got, &rounded(&w));
            // load_into keeps the f16 storage.
            store.load_into(&path).unwrap();
            assert_eq!(store.get("a.weight").unwrap().storage_dtype(), DType::F16);
        }
        store.to(&Device::Cpu).unwrap();
        let p = store.get("a.bias").unwrap();
        assert_eq!((p.storage_dtype(), p.device()), (DType::F16, Device::Cpu));
        assert_same_f32("moved", &p.value().to_vec().unwrap(), &rounded(&b));
        store.store_frozen_as(DType::F32).unwrap();
        assert_eq!(p.storage_dtype(), DType::F32);
        assert_same_f32("widened", &p.value().to_vec().unwrap(), &rounded(&b));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reading_an_f16_param_frees_its_f32_copy() {
    let Some(g) = gpu() else { return };
    let Device::Gpu(ctx) = Device::open_private(g.gpu().unwrap().index).unwrap() else { unreachable!() };
    let dev = Device::Gpu(ctx.clone());
    let p = Param::new("w", Tensor::randn(&[64, 1024], 4, &dev).unwrap(), false).unwrap();
    p.set_storage_dtype(DType::F16).unwrap();
    let held = ctx.pool_stats().live_bytes;
    assert_eq!(held, 131_072, "64 x 1024 halves");
    let v = p.value();
    assert_eq!(ctx.pool_stats().live_bytes, held + 262_144);
    drop(v);
    assert_eq!(ctx.pool_stats().live_bytes, held);
}

#[test]
fn f32_weights_rounded_are_the_fp16_variant_files() {
    // What makes the fp16w.* references (diffusers on the fp16 files) the reference for
    // f16 storage of the f32 files.
    for (part, stem) in
        [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
    {
        let d = fixture().join(part);
        let full = ParamStore::load_safetensors(d.join(format!("{stem}.safetensors")), &Device::Cpu).unwrap();
        let half = ParamStore::load_safetensors(d.join(format!("{stem}.fp16.safetensors")), &Device::Cpu).unwrap();
        full.freeze_all();
        full.store_frozen_as(DType::F16).unwrap();
        assert_eq!(full.len(), half.len());
        for (k, p) in full.iter() {
            let got = p.stored_value().to_f16_vec().unwrap();
            let want = half.get(k).unwrap().frozen_value().to_dtype(DType::F16).unwrap().to_f16_vec().unwrap();
            assert_same_f16(&format!("{part} {k}"), &got, &want);
        }
    }
}

struct Expected(Vec<u8>);

impl Expected {
    fn load() -> Expected {
        Expected(std::fs::read(fixture().join("expected.safetensors")).expect("fixture"))
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let v = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
        v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    fn u8(&self, name: &str) -> Vec<u8> {
        safetensors::SafeTensors::deserialize(&self.0).unwrap().tensor(name).unwrap().data().to_vec()
    }
}

fn init_latents(case: &str, dev: &Device) -> Tensor {
    let bytes = std::fs::read(fixture().join(format!("init_latents/{case}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(st.names()[0]).unwrap();
    let data: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Tensor::from_vec(data, v.shape(), dev).unwrap()
}

// The same tolerance as tests/pipeline.rs: f32 compute against PyTorch's f32 compute.
const PIPELINE_TOL: f64 = 1e-4;

fn sample_half_weights(dev: &Device, variant: Option<&str>) {
    let exp = Expected::load();
    let opts = LoadOptions { variant: variant.map(String::from), half_weights: true };
    let sd = StableDiffusion::load(fixture(), dev, &opts).unwrap();
    for p in sd.unet_params.params().iter().chain(sd.text_encoder.params()).chain(&sd.vae.as_ref().unwrap().params()) {
        assert_eq!((p.storage_dtype(), p.is_trainable()), (DType::F16, false), "{}", p.name());
    }
    let cases = [
        ("case0", "a photo of an astronaut riding a horse on mars", None),
        (
            "case1",
            "a watercolor painting of a red fox in the snow, highly detailed",
            Some("blurry, low quality, deformed"),
        ),
    ];
    let mut worst = 0f64;
    for (case, prompt, negative) in cases {
        for (run, sched, steps) in [("ddim10", "ddim", 10), ("euler8", "euler", 8)] {
            let req = SampleRequest {
                prompt: prompt.into(),
                negative_prompt: negative.map(String::from),
                steps,
                scheduler: sched.into(),
                width: 64,
                height: 64,
                latents: Some(init_latents(case, dev)),
                ..SampleRequest::default()
            };
            let out = sd.sample(&req, |_, _| {}, false).unwrap();
            let what = format!("fp16w.{case}.{run} on {dev} ({variant:?} files)");
            let want = exp.f32(&format!("fp16w.{case}.{run}.final_latents"));
            let got = out.latents.to_vec().unwrap();
            worst = worst.max(rel_err(&got, &want));
            assert_close(&what, &got, &want, PIPELINE_TOL, 0);
            let img = vipo::image_io::images_from_decoded(&out.decoded).unwrap();
            let want_px = exp.u8(&format!("fp16w.{case}.{run}.image_uint8"));
            let big = img[0].data.iter().zip(&want_px).filter(|(a, b)| a.abs_diff(**b) > 1).count();
            let one = img[0].data.iter().zip(&want_px).filter(|(a, b)| a.abs_diff(**b) == 1).count();
            assert_eq!(big, 0, "{what}: pixels off by more than 1");
            assert!(one <= 16, "{what}: {one} pixels off by 1");
        }
    }
    eprintln!("half weights on {dev} ({variant:?} files): worst final-latent rel err {worst:.2e}");
}

#[test]
fn pipeline_with_half_weights_matches_diffusers_fp16_weights_on_cpu() {
    // The f32 files rounded on load, and the fp16 files (widened, then narrowed exactly).
    sample_half_weights(&Device::Cpu, None);
    sample_half_weights(&Device::Cpu, Some("fp16"));
}

#[test]
fn pipeline_with_half_weights_matches_diffusers_fp16_weights_on_gpu() {
    if let Some(g) = gpu() {
        sample_half_weights(&g, None);
    }
}

#[test]
fn half_weights_halve_the_gpu_memory_after_loading() {
    let Some(g) = gpu() else { return };
    let index = g.gpu().unwrap().index;
    let (mut live, mut weights) = (Vec::new(), Vec::new());
    for half_weights in [false, true] {
        // A private context, so no other test's tensors count.
        let dev = Device::open_private(index).unwrap();
        let ctx = dev.gpu().unwrap().clone();
        let opts = LoadOptions { variant: None, half_weights };
        let sd = StableDiffusion::load(fixture(), &dev, &opts).unwrap();
        let stats = ctx.pool_stats();
        eprintln!(
            "half_weights={half_weights}: live {} bytes, peak {} bytes, weights {} bytes",
            stats.live_bytes,
            stats.peak_live_bytes,
            sd.weight_bytes()
        );
        live.push(stats.live_bytes as f64);
        weights.push(sd.weight_bytes());
        if half_weights {
            assert!(stats.peak_live_bytes < live[0] as u64, "narrowing model by model keeps the peak under f32's");
        }
        // One short sample: the widened f32 copies are transient (freed into the pool).
        ctx.reset_peak();
        let req = SampleRequest { prompt: "a fox".into(), steps: 2, width: 64, height: 64, ..Default::default() };
        let out = sd.sample(&req, |_, _| {}, false).unwrap();
        drop(out);
        let after = ctx.pool_stats();
        eprintln!(
            "  after sampling: live {} bytes, peak {} bytes, pool free {} bytes",
            after.live_bytes, after.peak_live_bytes, after.free_bytes
        );
        // CLIP's token table is gathered from a host copy of its stored (f16) value, so no f32
        // copy of any weight stays alive after sampling.
        assert!(after.live_bytes <= stats.live_bytes, "sampling leaves no f32 copy alive");
        drop(sd);
        assert_eq!(ctx.pool_stats().live_bytes, 0, "everything freed with the pipeline");
    }
    assert_eq!(weights[1] * 2, weights[0], "the weights' own bytes halve exactly");
    let ratio = live[1] / live[0];
    eprintln!("live bytes with f16 weights / f32 weights: {ratio:.3}");
    // Not exactly 0.5: pool buckets are powers of two below 1 MiB and 1/8 steps above, so the
    // tiny model's one large tensor (the 49408 x 8 token table) takes 1.625 MiB in f32 and
    // 1 MiB in f16; the rest halves exactly (and tiny tensors share the 16-byte minimum).
    assert!((0.45..0.6).contains(&ratio), "ratio {ratio}");
}

#[test]
fn cli_sample_half_weights_writes_the_fp16w_image() {
    let tmp = std::env::temp_dir().join(format!("vipo-half-sample-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = tmp.join("fox.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
        .args(["--device", "cpu", "sample", "--half-weights", "--model"])
        .arg(fixture())
        .args(["--prompt", "a watercolor painting of a red fox in the snow, highly detailed"])
        .args(["--negative-prompt", "blurry, low quality, deformed", "--steps", "10", "--scheduler", "ddim"])
        .args(["--width", "64", "--height", "64", "--latents"])
        .arg(fixture().join("init_latents/case1.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "vipo sample --half-weights failed: {stderr}");
    assert!(stderr.contains("f16 weights"), "{stderr}");
    let (img, _) = vipo::image_io::read_png(&out).unwrap();
    let want = Expected::load().u8("fp16w.case1.ddim10.image_uint8");
    let big = img.data.iter().zip(&want).filter(|(a, b)| a.abs_diff(**b) > 1).count();
    assert_eq!(big, 0);
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn freeze_weights_as_narrows_and_widens_a_loaded_pipeline() {
    // The route for pipelines loaded otherwise (single files): after loading, on the CPU.
    let sd = StableDiffusion::from_dir(fixture(), &Device::Cpu, None).unwrap();
    let all = |sd: &StableDiffusion| {
        let mut v = sd.unet_params.params();
        v.extend(sd.text_encoder.params().iter().cloned());
        v.extend(sd.vae.as_ref().unwrap().params());
        v
    };
    let f32_bytes = sd.weight_bytes();
    let before: Vec<Vec<f32>> = all(&sd).iter().map(|p| p.value().to_vec().unwrap()).collect();
    sd.freeze_weights_as(DType::F16).unwrap();
    assert_eq!(sd.weight_bytes() * 2, f32_bytes);
    assert!(all(&sd).iter().all(|p| p.storage_dtype() == DType::F16 && !p.is_trainable()));
    sd.freeze_weights_as(DType::F32).unwrap();
    assert_eq!(sd.weight_bytes(), f32_bytes);
    for (p, b) in all(&sd).iter().zip(&before) {
        assert_same_f32(p.name(), &p.value().to_vec().unwrap(), &rounded(b));
    }
}
