//! Command-line front end: one file per subcommand; `main.rs` only parses and dispatches.

pub mod bench;
pub mod bench_model;
pub mod data;
pub mod demo;
pub mod devices;
pub mod sample;
pub mod train;
pub mod world;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vipo",
    version,
    about = "Visual preference optimization (Poly-DPO) for diffusion models, on any GPU wgpu reaches or on the CPU"
)]
pub struct Cli {
    /// Device: auto (a hardware GPU if there is one, else the CPU), cpu, gpu, or gpu:N from `vipo devices`.
    #[arg(long, global = true, env = "VIPO_DEVICE", default_value = "auto")]
    pub device: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every GPU adapter wgpu finds, with the features and limits that matter to vipo.
    Devices(devices::Args),
    /// Measure kernel throughput (GFLOP/s, GB/s) on the CPU path and on GPUs.
    Bench(bench::Args),
    /// Text to image with a Stable Diffusion pipeline folder; writes PNGs.
    Sample(sample::Args),
    /// Preference data: `stats` (counts, sizes), `cache-latents` (encode once with a VAE).
    Data(data::Args),
    /// Fine-tune with SFT, Diffusion-DPO, Poly-DPO or KTO on preference pairs (LoRA or full).
    // Boxed: its many flags make it far larger than the other variants.
    Train(Box<train::Args>),
    /// Poly-DPO on the built-in world, end to end: preference data from the base model's samples,
    /// training, held-out scores before and after, a sample grid and curves.
    Demo(demo::Args),
    /// The built-in world: pretrain its base model, render and score prompts.
    World(world::Args),
}
