//! `pipeline_tiny`: the StableDiffusionPipeline loop written out by hand in the fixture
//! (ids -> CLIP -> UNet with guidance 7.5 -> DDIM 10 steps -> VAE decode), step by step,
//! on the CPU and the GPU, through vipo's `denoise`.
mod common;
use common::*;
use std::path::PathBuf;
use vipo::models::autoencoder_kl::AutoencoderKL;
use vipo::models::clip_text::ClipTextModel;
use vipo::models::unet_2d_condition::UNet2DConditionModel;
use vipo::pipelines::stable_diffusion::denoise;
use vipo::schedulers::{NoiseScheduler, Scheduler, SchedulerConfig};
use vipo::{Device, Tensor};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures").join(p)
}

fn run(dev: &Device) {
    let bytes = std::fs::read(fx("pipeline_tiny/fixtures.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    let ids = |n: &str| -> Vec<u32> {
        st.tensor(n).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    };
    let _g = vipo::autograd::no_grad();
    let clip = ClipTextModel::from_dir(fx("clip_text_tiny"), dev).unwrap();
    let (unet, _) = UNet2DConditionModel::from_dir(fx("unet_tiny"), dev, None).unwrap();
    let vae = AutoencoderKL::from_dir(fx("vae_tiny"), dev, None).unwrap();
    let uncond = clip.forward(&[ids("uncond_ids")]).unwrap().last_hidden_state;
    let cond = clip.forward(&[ids("cond_ids")]).unwrap().last_hidden_state;
    let context = Tensor::concat(&[&uncond, &cond], 0).unwrap();
    assert_close(
        &format!("encoder_hidden_states on {dev}"),
        &context.to_vec().unwrap(),
        &f32s("encoder_hidden_states"),
        1e-4,
        0,
    );

    let cfg = SchedulerConfig::from_file(fx("schedulers/scheduler_config_ddim.json")).unwrap();
    let mut sched = Scheduler::from_name("ddim", &cfg).unwrap();
    sched.set_timesteps(10).unwrap();
    let want_t: Vec<f32> = ids("timesteps").iter().map(|&t| t as f32).collect();
    assert_eq!(sched.timesteps(), &want_t[..]);
    let init = Tensor::from_vec(f32s("latents_init"), &[1, 4, 16, 16], dev).unwrap();
    let mut rng = vipo::rng::Rng::new(0);
    let (latents, steps) = denoise(&unet, &mut sched, &context, &init, 7.5, &mut rng, true, &mut |_, _| {}).unwrap();
    for (i, s) in steps.iter().enumerate() {
        assert_close(&format!("latents.{i} on {dev}"), &s.to_vec().unwrap(), &f32s(&format!("latents.{i}")), 1e-4, 0);
    }
    let image = vae.decode(&latents.mul_scalar(1.0 / 0.18215).unwrap()).unwrap();
    assert_close(&format!("image on {dev}"), &image.to_vec().unwrap(), &f32s("image"), 1e-4, 0);
    let u8s: Vec<u8> =
        image.to_vec().unwrap().iter().map(|v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let want = st.tensor("image_uint8").unwrap().data().to_vec();
    assert!(u8s.iter().zip(&want).all(|(a, b)| a.abs_diff(*b) <= 1), "uint8 image differs by more than 1 on {dev}");
}

#[test]
fn pipeline_tiny_on_cpu() {
    run(&Device::Cpu);
}

#[test]
fn pipeline_tiny_on_gpu() {
    if let Some(g) = gpu() {
        run(&g);
    }
}
