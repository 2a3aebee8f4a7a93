//! `vipo devices`: what wgpu finds, and what `auto` would take.

use crate::device::{list_adapters, Device};
use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn mib(b: u64) -> String {
    format!("{} MiB", b >> 20)
}

pub fn run(args: &Args, device_arg: &str) -> Result<()> {
    let adapters = list_adapters();
    if args.json {
        let s = serde_json::to_string_pretty(&adapters).map_err(|e| crate::Error::Invalid(e.to_string()))?;
        println!("{s}");
        return Ok(());
    }
    if adapters.is_empty() {
        println!("no GPU adapters found (on Linux, install Vulkan drivers, e.g. mesa-vulkan-drivers)");
    }
    for a in &adapters {
        println!(
            "gpu:{}  {}  [{} {}{}]",
            a.index,
            a.name,
            a.backend,
            a.device_type,
            if a.software { ", software: only by name" } else { "" }
        );
        println!("        driver: {}", if a.driver.is_empty() { "-" } else { &a.driver });
        println!(
            "        f16: {}  subgroups: {}{}",
            if a.shader_f16 { "yes" } else { "no" },
            if a.subgroups { "yes" } else { "no" },
            if a.subgroups { format!(" (size {}..{})", a.subgroup_size.0, a.subgroup_size.1) } else { String::new() }
        );
        println!(
            "        max storage binding: {}  max buffer: {}  workgroup storage: {} KiB  invocations/workgroup: {}",
            mib(a.max_storage_binding_bytes),
            mib(a.max_buffer_bytes),
            a.workgroup_storage_bytes / 1024,
            a.max_invocations_per_workgroup
        );
    }
    println!("cpu    {} threads (rayon), gemm crate", rayon::current_num_threads());
    let sel = Device::from_arg(Some(device_arg))?;
    println!("--device {device_arg} -> {}", sel.reason);
    Ok(())
}
