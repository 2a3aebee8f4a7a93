//! The whole tiny SD1.5 pipeline against diffusers' StableDiffusionPipeline, step by step,
//! on the CPU and the GPU, and `vipo sample` end to end from prompt text to PNG.
mod common;
use common::*;
use std::path::PathBuf;
use vipo::image_io::{images_from_decoded, read_png};
use vipo::pipelines::stable_diffusion::{SampleRequest, StableDiffusion};
use vipo::{Device, Tensor};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sd15_tiny_pipeline")
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load() -> Expected {
        Expected { bytes: std::fs::read(dir().join("expected.safetensors")).expect("fixture") }
    }
    fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
        (v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(), v.shape().to_vec())
    }
    fn ids(&self, name: &str) -> Vec<u32> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap();
        v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    }
    fn u8(&self, name: &str) -> Vec<u8> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name).unwrap().data().to_vec()
    }
}

const CASES: [(&str, &str, Option<&str>); 2] = [
    ("case0", "a photo of an astronaut riding a horse on mars", None),
    ("case1", "a watercolor painting of a red fox in the snow, highly detailed", Some("blurry, low quality, deformed")),
];
const RUNS: [(&str, &str, usize); 2] = [("ddim10", "ddim", 10), ("euler8", "euler", 8)];

fn init_latents(case: &str, dev: &Device) -> Tensor {
    let bytes = std::fs::read(dir().join(format!("init_latents/{case}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = st.names()[0].to_string();
    let v = st.tensor(&name).unwrap();
    let data: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Tensor::from_vec(data, v.shape(), dev).unwrap()
}

/// Max number of uint8 values off by more than `tol`, and by exactly 1 (rounding boundaries).
fn pixel_diff(got: &[u8], want: &[u8]) -> (usize, usize) {
    let big = got.iter().zip(want).filter(|(a, b)| a.abs_diff(**b) > 1).count();
    let one = got.iter().zip(want).filter(|(a, b)| a.abs_diff(**b) == 1).count();
    (big, one)
}

fn check_device(dev: &Device, variant: Option<&str>) {
    let exp = Expected::load();
    let sd = StableDiffusion::from_dir(dir(), dev, variant).unwrap();
    let prefix = if variant.is_some() { "fp16w." } else { "" };
    for (case, prompt, negative) in CASES {
        if variant.is_none() {
            let (ids, _) = sd.tokenize(prompt).unwrap();
            assert_eq!(ids, exp.ids(&format!("{case}.input_ids")), "{case} ids");
            let (e, _) = exp.f32(&format!("{case}.prompt_embeds"));
            assert_close(
                &format!("{case} prompt embeds on {dev}"),
                &sd.encode_ids(&ids).unwrap().to_vec().unwrap(),
                &e,
                1e-4,
                0,
            );
            let (nids, _) = sd.tokenize(negative.unwrap_or("")).unwrap();
            let (ne, _) = exp.f32(&format!("{case}.negative_prompt_embeds"));
            assert_close(
                &format!("{case} negative embeds on {dev}"),
                &sd.encode_ids(&nids).unwrap().to_vec().unwrap(),
                &ne,
                1e-4,
                0,
            );
        }
        for (run, sched, steps) in RUNS {
            let req = SampleRequest {
                prompt: prompt.into(),
                negative_prompt: negative.map(String::from),
                steps,
                guidance: 7.5,
                scheduler: sched.into(),
                width: 64,
                height: 64,
                latents: Some(init_latents(case, dev)),
                ..SampleRequest::default()
            };
            let out = sd.sample(&req, |_, _| {}, variant.is_none()).unwrap();
            let what = format!("{prefix}{case}.{run} on {dev}");
            if variant.is_none() {
                let (want_steps, _) = exp.f32(&format!("{case}.{run}.latents_steps"));
                let per = want_steps.len() / steps;
                for (i, s) in out.steps.iter().enumerate() {
                    assert_close(
                        &format!("{what} step {i}"),
                        &s.to_vec().unwrap(),
                        &want_steps[i * per..(i + 1) * per],
                        1e-4,
                        0,
                    );
                }
                let (raw, _) = exp.f32(&format!("{case}.{run}.image_raw"));
                assert_close(&format!("{what} decoded"), &out.decoded.to_vec().unwrap(), &raw, 1e-4, 0);
            }
            let (fin, _) = exp.f32(&format!("{prefix}{case}.{run}.final_latents"));
            assert_close(&format!("{what} final latents"), &out.latents.to_vec().unwrap(), &fin, 1e-4, 0);
            let img = images_from_decoded(&out.decoded).unwrap();
            let (big, one) = pixel_diff(&img[0].data, &exp.u8(&format!("{prefix}{case}.{run}.image_uint8")));
            assert_eq!(big, 0, "{what}: pixels off by more than 1");
            assert!(one <= 16, "{what}: {one} pixels off by 1 (rounding boundaries)");
        }
    }
}

#[test]
fn pipeline_matches_diffusers_on_cpu() {
    check_device(&Device::Cpu, None);
}

#[test]
fn pipeline_matches_diffusers_on_gpu() {
    if let Some(g) = gpu() {
        check_device(&g, None);
    }
}

#[test]
fn fp16_weights_match_diffusers_fp16_run() {
    check_device(&Device::Cpu, Some("fp16"));
}

#[test]
fn cli_sample_writes_the_fixture_image() {
    let mut devices = vec!["cpu".to_string()];
    if let Some(g) = gpu() {
        devices.push(format!("gpu:{}", g.gpu().unwrap().index));
    }
    for device in devices {
        let tmp = std::env::temp_dir().join(format!("vipo-sample-{}-{}", std::process::id(), device.replace(':', "")));
        std::fs::create_dir_all(&tmp).unwrap();
        let out = tmp.join("fox.png");
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
            .args(["--device", &device, "sample", "--model"])
            .arg(dir())
            .args([
                "--prompt",
                CASES[1].1,
                "--negative-prompt",
                CASES[1].2.unwrap(),
                "--steps",
                "10",
                "--scheduler",
                "ddim",
            ])
            .args(["--width", "64", "--height", "64", "--latents"])
            .arg(dir().join("init_latents/case1.safetensors"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(status.status.success(), "vipo sample on {device} failed: {}", String::from_utf8_lossy(&status.stderr));
        assert!(String::from_utf8_lossy(&status.stdout).contains("fox.png"), "prints where the file went");
        let (img, params) = read_png(&out).unwrap();
        assert_eq!((img.width, img.height), (64, 64));
        let (big, _) = pixel_diff(&img.data, &Expected::load().u8("case1.ddim10.image_uint8"));
        assert_eq!(big, 0, "{device}");
        let params = params.expect("parameters text chunk");
        assert!(
            params.contains("Negative prompt: blurry") && params.contains("Steps: 10") && params.contains("Seed: 0"),
            "{params}"
        );
        std::fs::remove_dir_all(&tmp).ok();
    }
}

#[test]
fn cli_sample_reports_bad_input_in_one_line() {
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
            .args(["--device", "cpu", "sample"])
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let d = dir();
    let d = d.to_str().unwrap();
    let e = run(&["--model", "/nonexistent/sd", "--prompt", "x"]);
    assert!(e.contains("/nonexistent/sd"), "{e}");
    let e = run(&["--model", d, "--prompt", "x", "--width", "60", "--height", "64", "--steps", "1"]);
    assert!(e.contains("multiples of 8"), "{e}");
    let long = "a very long prompt ".repeat(30);
    let e = run(&["--model", d, "--prompt", &long, "--steps", "1"]);
    assert!(e.contains("prompt too long") && e.contains("--truncate"), "{e}");
    let e = run(&["--model", d, "--prompt", "x", "--scheduler", "plms", "--steps", "1"]);
    assert!(e.contains("plms") || e.contains("scheduler"), "{e}");
}

#[test]
fn cli_sample_from_a_single_file_checkpoint() {
    // The same weights as one float16 LDM file: diffusers' from_single_file reproduces the
    // fp16-weights run exactly, and so must vipo.
    let tmp = std::env::temp_dir().join(format!("vipo-single-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = tmp.join("astronaut.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
        .args(["--device", "cpu", "sample", "--model"])
        .arg(dir().join("sd15_tiny_single_file.safetensors"))
        .arg("--config")
        .arg(dir())
        .args(["--prompt", CASES[0].1, "--steps", "10", "--width", "64", "--height", "64", "--latents"])
        .arg(dir().join("init_latents/case0.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "vipo sample failed: {}", String::from_utf8_lossy(&o.stderr));
    let (img, _) = read_png(&out).unwrap();
    let (big, _) = pixel_diff(&img.data, &Expected::load().u8("fp16w.case0.ddim10.image_uint8"));
    assert_eq!(big, 0);
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn dry_run_estimate_is_close_to_the_measured_peak() {
    use vipo::pipelines::memory::{estimate, header_param_count, SdShapes};
    let Some(shared) = gpu() else { return };
    let dev = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = dev.gpu().unwrap().clone();
    let sd = StableDiffusion::from_dir(dir(), &dev, None).unwrap();
    ctx.sync().unwrap();
    ctx.reset_peak();
    let req = SampleRequest {
        prompt: "a cat".into(),
        steps: 2,
        width: 128,
        height: 128,
        batch: 2,
        ..SampleRequest::default()
    };
    let out = sd.sample(&req, |_, _| {}, false).unwrap();
    assert_eq!(out.decoded.shape(), &[2, 3, 128, 128]);
    let measured = ctx.pool_stats().peak_live_bytes;
    let params: u64 = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"]
        .iter()
        .map(|p| header_param_count(&dir().join(format!("{p}.safetensors"))).unwrap())
        .sum();
    let shapes = SdShapes {
        unet_channels: sd.unet.config.block_out_channels.clone(),
        layers_per_block: 2,
        vae_channels: sd.vae.as_ref().unwrap().config.block_out_channels.clone(),
        width: 128,
        height: 128,
        batch: 2,
    };
    let e = estimate(params, 4, &shapes);
    let ratio = e.peak_bytes as f64 / measured as f64;
    eprintln!("dry-run estimate {} B, measured peak {} B (ratio {ratio:.2})", e.peak_bytes, measured);
    assert!((0.5..=2.0).contains(&ratio), "estimate {} vs measured {measured}", e.peak_bytes);
}
