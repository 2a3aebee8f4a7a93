//! A first look at the runtime: pick a device, run a few SD-shaped ops on it, and check
//! them against the CPU path.
//!
//! cargo run --release --example ops_tour -- gpu:0      (or cpu, gpu, auto; see `vipo devices`)

use vipo::{Device, Tensor};

fn main() -> vipo::Result<()> {
    let arg = std::env::args().nth(1);
    let sel = Device::from_arg(arg.as_deref())?;
    println!("device: {}", sel.reason);
    let dev = sel.device;

    // A latent (B, C, H, W), a 3x3 conv, group norm + SiLU, and self-attention over its pixels.
    let x = Tensor::randn(&[1, 32, 24, 24], 1, &dev)?;
    let w = Tensor::randn(&[32, 32, 3, 3], 2, &dev)?.mul_scalar(0.05)?;
    let gamma = Tensor::full(1.0, &[32], &dev)?;
    let beta = Tensor::zeros(&[32], &dev)?;
    let h = x.conv2d(&w, None, (1, 1), (1, 1))?.group_norm(8, Some(&gamma), Some(&beta), 1e-5)?.silu()?;
    // (B, C, H, W) -> (B, heads=4, H*W, C/4)
    let tokens = h.reshape(&[1, 4, 8, 24 * 24])?.permute(&[0, 1, 3, 2])?;
    let out = tokens.attention(&tokens, &tokens, None)?;
    let y = out.to_vec()?;
    println!("attention output {:?}, mean {:.5}", out.shape(), y.iter().sum::<f32>() / y.len() as f32);

    if !dev.is_cpu() {
        let cpu = Device::Cpu;
        let hc = x
            .to(&cpu)?
            .conv2d(&w.to(&cpu)?, None, (1, 1), (1, 1))?
            .group_norm(8, Some(&gamma.to(&cpu)?), Some(&beta.to(&cpu)?), 1e-5)?
            .silu()?;
        let tc = hc.reshape(&[1, 4, 8, 24 * 24])?.permute(&[0, 1, 3, 2])?;
        let yc = tc.attention(&tc, &tc, None)?.to_vec()?;
        let err = y.iter().zip(&yc).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("max |gpu - cpu| = {err:.2e}");
    }
    Ok(())
}
