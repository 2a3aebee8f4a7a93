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

/// Keeps freed memory in the process for the next tensor of the same size, on glibc.
///
/// The CPU path allocates and frees the same large buffers every step (activations, saved
/// tensors). glibc's default raises its mmap threshold to the largest freed block and then
/// trims the heap top above twice that, so buffers go back to the kernel and come back as
/// fresh pages: a page fault and a zeroing per 4 KiB each step. A fixed 32 MiB threshold (the
/// most glibc allows: bigger blocks are still mapped per use) and a 2 GiB trim threshold keep
/// them: a LoRA step at 32x32 latents took 11.9 s instead of 12.9 s on a 2-core VM. Setting
/// the trim threshold alone is worse (it fixes the mmap threshold at 128 KiB). Elsewhere
/// (macOS, Windows, musl) this does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

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
