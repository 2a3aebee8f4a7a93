//! `vipo bench`: kernel throughput on each device, with an optional peer (PyTorch) for ratios.
//!
//! Case names match `benches/pytorch_ops.py`, so `--peer torch.json` joins the two by name.

use std::collections::HashMap;
use std::time::Instant;

use crate::device::{list_adapters, Device, DeviceRequest};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON (one object per case and device) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only cases whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// The small cases only (for software adapters, where the full set takes many minutes).
    #[arg(long)]
    pub quick: bool,
    /// Seconds to spend per case after warm-up (at least one run is always timed).
    #[arg(long, default_value_t = 1.0)]
    pub min_time: f64,
    /// JSON from `benches/pytorch_ops.py --json`: adds its times and the ratio vipo/peer.
    #[arg(long)]
    pub peer: Option<std::path::PathBuf>,
    /// Training steps of the toy network (conv, group norm, attention, linear; AdamW) instead
    /// of kernels: time per step and peak GPU buffer bytes of a step.
    #[arg(long)]
    pub train: bool,
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchWhat {
    /// An SD1.5-shaped UNet (real config, random weights): forward, and a LoRA Poly-DPO step.
    Model(crate::cli::bench_model::ModelArgs),
}

/// One benchmark: inputs are built once, `run` is timed.
struct Case {
    name: String,
    /// FLOPs per run (compute-bound cases) or bytes moved (memory-bound ones).
    work: f64,
    is_bytes: bool,
    quick: bool,
    shapes: Vec<Vec<usize>>,
    /// Inputs cast to f16 before timing (GPU: adapters with SHADER_F16 only).
    f16: bool,
    /// GPU only, with a switch of the context on (f16 arithmetic, split-K matmuls); compared
    /// with the CPU's result and the peer's time of the case without the switch's word.
    switch: Switch,
    run: fn(&[Tensor]) -> Result<Tensor>,
}

/// The opt-in GPU switches a case may turn on while it is timed.
#[derive(Clone, Copy, PartialEq)]
enum Switch {
    Off,
    /// `GpuContext::set_f16_math`; " f16 math " in the name.
    F16Math,
    /// `GpuContext::set_matmul_split_k`; " split-K " in the name.
    SplitK,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (m, n, k, quick) in [
        (512, 512, 512, true),
        (1024, 1024, 1024, false),
        (2048, 2048, 2048, false),
        (4096, 4096, 4096, false),
        (4096, 320, 320, false),
        (4096, 1280, 320, false),
    ] {
        v.push(Case {
            name: format!("matmul {m}x{n}x{k}"),
            work: 2.0 * m as f64 * n as f64 * k as f64,
            is_bytes: false,
            quick,
            shapes: vec![vec![m, k], vec![k, n]],
            f16: false,
            switch: Switch::Off,
            run: |t| t[0].matmul(&t[1]),
        });
    }
    // A LoRA adapter's weight gradients at 64x64 latents, batch 4 (K = 16384 tokens, rank 4):
    // 5 output tiles, so a GPU is nearly idle unless K is split (opt-in: " split-K ").
    for (split, (m, n, k)) in [false, true].into_iter().flat_map(|s| [(4, 320, 16384), (320, 4, 16384)].map(|c| (s, c)))
    {
        v.push(Case {
            name: format!("matmul {}{m}x{n}x{k}", if split { "split-K " } else { "" }),
            work: 2.0 * m as f64 * n as f64 * k as f64,
            is_bytes: false,
            quick: false,
            shapes: vec![vec![m, k], vec![k, n]],
            f16: false,
            switch: if split { Switch::SplitK } else { Switch::Off },
            run: |t| t[0].matmul(&t[1]),
        });
    }
    // f16 storage, f32 arithmetic (the CPU path widens the same f16 values); then f16
    // arithmetic ("math": opt-in on GPUs with SHADER_F16, each K step's products summed in f16).
    for (math, (m, n, k, quick)) in [false, true]
        .into_iter()
        .flat_map(|m| [(512, 512, 512, true), (4096, 4096, 4096, false), (4096, 1280, 320, false)].map(|c| (m, c)))
    {
        v.push(Case {
            name: format!("matmul f16 {}{m}x{n}x{k}", if math { "math " } else { "" }),
            work: 2.0 * m as f64 * n as f64 * k as f64,
            is_bytes: false,
            quick,
            shapes: vec![vec![m, k], vec![k, n]],
            f16: true,
            switch: if math { Switch::F16Math } else { Switch::Off },
            run: |t| t[0].matmul(&t[1]),
        });
    }
    // Batch 4 as well: the LoRA step's forwards run 4 images (2 pairs) at once.
    for (c, px, b, quick) in [
        (320, 64, 1, false),
        (640, 32, 1, false),
        (1280, 16, 1, false),
        (1280, 8, 1, true),
        (320, 64, 4, false),
        (1280, 8, 4, false),
    ] {
        v.push(Case {
            name: format!("conv2d {c}ch {px}px{}", if b > 1 { format!(" b{b}") } else { String::new() }),
            work: 2.0 * (b * c * c * 9) as f64 * (px * px) as f64,
            is_bytes: false,
            quick,
            shapes: vec![vec![b, c, px, px], vec![c, c, 3, 3], vec![c]],
            f16: false,
            switch: Switch::Off,
            run: |t| t[0].conv2d(&t[1], Some(&t[2]), (1, 1), (1, 1)),
        });
    }
    for (math, (c, px, quick)) in
        [false, true].into_iter().flat_map(|m| [(320, 64, false), (1280, 8, true)].map(|c| (m, c)))
    {
        v.push(Case {
            name: format!("conv2d f16 {}{c}ch {px}px", if math { "math " } else { "" }),
            work: 2.0 * (c * c * 9) as f64 * (px * px) as f64,
            is_bytes: false,
            quick,
            shapes: vec![vec![1, c, px, px], vec![c, c, 3, 3]],
            f16: true,
            switch: if math { Switch::F16Math } else { Switch::Off },
            run: |t| t[0].conv2d(&t[1], None, (1, 1), (1, 1)),
        });
    }
    // The input gradient alone (a frozen weight, as in the LoRA step's resnets): dY (1, C, px,
    // px) and W (C, C, 3, 3) -> dX of dY's shape.
    for (c, px, quick) in [(320, 64, false), (640, 32, false), (1280, 8, true)] {
        v.push(Case {
            name: format!("conv2d grad_input {c}ch {px}px"),
            work: 2.0 * (c * c * 9) as f64 * (px * px) as f64,
            is_bytes: false,
            quick,
            shapes: vec![vec![1, c, px, px], vec![c, c, 3, 3]],
            f16: false,
            switch: Switch::Off,
            run: |t| t[0].conv2d_grad_input(&t[1], t[0].shape(), (1, 1), (1, 1)),
        });
    }
    v.push(Case {
        name: "attention self 4096x4096 h8 d40".into(),
        work: 4.0 * 8.0 * 4096.0 * 4096.0 * 40.0,
        is_bytes: false,
        quick: false,
        shapes: vec![vec![1, 8, 4096, 40], vec![1, 8, 4096, 40], vec![1, 8, 4096, 40]],
        f16: false,
        switch: Switch::Off,
        run: |t| t[0].attention(&t[1], &t[2], None),
    });
    // Forward and backward with q, k and v all trainable (as behind LoRA adapters), dY given:
    // 7 products of L x L x D (the forward's 2, the recomputed scores, dV, dP, dQ, dK).
    v.push(Case {
        name: "attention self fwd+bwd 4096x4096 h8 d40".into(),
        work: 14.0 * 8.0 * 4096.0 * 4096.0 * 40.0,
        is_bytes: false,
        quick: false,
        shapes: vec![vec![1, 8, 4096, 40]; 4],
        f16: false,
        switch: Switch::Off,
        run: |t| {
            let (q, k, v) = (t[0].requires_grad(), t[1].requires_grad(), t[2].requires_grad());
            q.attention(&k, &v, None)?.backward_with(t[3].clone())?;
            q.grad().ok_or_else(|| crate::error::Error::Invalid("attention backward left no dQ".into()))
        },
    });
    v.push(Case {
        name: "attention cross 4096x77 h8 d40".into(),
        work: 4.0 * 8.0 * 4096.0 * 77.0 * 40.0,
        is_bytes: false,
        quick: true,
        shapes: vec![vec![1, 8, 4096, 40], vec![1, 8, 77, 40], vec![1, 8, 77, 40]],
        f16: false,
        switch: Switch::Off,
        run: |t| t[0].attention(&t[1], &t[2], None),
    });
    for (shape, quick) in [(vec![1, 320, 64, 64], false), (vec![2, 1280, 16, 16], true)] {
        let numel: usize = shape.iter().product();
        v.push(Case {
            name: format!("group_norm {}ch {}px g32", shape[1], shape[2]),
            work: 2.0 * numel as f64 * 4.0,
            is_bytes: true,
            quick,
            shapes: vec![shape.clone(), vec![shape[1]], vec![shape[1]]],
            f16: false,
            switch: Switch::Off,
            run: |t| t[0].group_norm(32, Some(&t[1]), Some(&t[2]), 1e-5),
        });
    }
    v
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: String,
    pub device: String,
    pub ms: f64,
    pub gflops: Option<f64>,
    pub gbps: Option<f64>,
    /// Peak bytes held in GPU buffers during the case (GPU only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_ms: Option<f64>,
    /// vipo time / peer time (below 1: vipo is faster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// GPU records: this time / the CPU path's time for the same case in this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_cpu: Option<f64>,
    /// GPU records: ms per run with QUEUED runs recorded back to back and one wait at the
    /// end (median of 3), so the wait for each result is not counted: the kernels' own time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<f64>,
    /// GPU records: ms per run by the GPU's own timestamps around each dispatch (QUEUED runs;
    /// None where the adapter has no timestamp queries): the kernels alone, no host time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_ms: Option<f64>,
    /// GPU records: ||gpu - cpu|| / ||cpu|| of the case's output, the same inputs on both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel_err: Option<f64>,
}

/// ||got - want|| / ||want|| in f64 (NaN anywhere gives NaN, never a pass).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    let (mut d, mut w) = (0f64, 0f64);
    for (&g, &x) in got.iter().zip(want) {
        d += (g as f64 - x as f64).powi(2);
        w += (x as f64).powi(2);
    }
    (d / w.max(1e-300)).sqrt()
}

/// GPU runs recorded back to back for `queued_ms`.
const QUEUED: usize = 10;

/// Toy training cases: (channels, image size, batch).
const TRAIN_CASES: [(usize, usize, usize); 2] = [(16, 8, 4), (64, 16, 8)];

fn time_train(channels: usize, size: usize, batch: usize, device: &Device, min_time: f64) -> Result<Record> {
    use crate::toy::{toy_batch, toy_optimizer, train_step, ToyNet};
    let net = ToyNet::new(channels, 1, device)?;
    let mut opt = toy_optimizer()?;
    let (x, y) = toy_batch(batch, size, 2, device)?;
    // Two warm-up steps: pipelines compiled, optimizer state allocated, pool filled.
    for _ in 0..2 {
        train_step(&net, &mut opt, &x, &y, 1e-3)?;
    }
    if let Device::Gpu(g) = device {
        g.sync()?;
        g.reset_peak();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed().as_secs_f64() < min_time && times.len() < 200) {
        let t0 = Instant::now();
        train_step(&net, &mut opt, &x, &y, 1e-3)?; // reads the loss back: the step is finished
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    Ok(Record {
        name: format!("train toy c{channels} {size}px b{batch}"),
        device: device_name(device),
        ms: secs * 1e3,
        gflops: None,
        gbps: None,
        peak_bytes: device.gpu().map(|g| g.pool_stats().peak_live_bytes),
        peer_ms: None,
        ratio: None,
        vs_cpu: None,
        queued_ms: None,
        gpu_ms: None,
        rel_err: None,
    })
}

/// The case a switched case is compared with (same inputs, the switch off).
fn twin(name: &str) -> String {
    name.replacen(" f16 math ", " f16 ", 1).replacen(" split-K ", " ", 1)
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Gpu(g) => format!("gpu:{} {}", g.index, g.info.name),
    }
}

/// Times one case; also returns its output (read back once, after the timing).
fn time_case(case: &Case, device: &Device, min_time: f64) -> Result<(Record, Vec<f32>)> {
    let inputs: Vec<Tensor> = case
        .shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = Tensor::randn(s, 1 + i as u64, device)?;
            if case.f16 {
                t.to_dtype(crate::tensor::DType::F16)
            } else {
                Ok(t)
            }
        })
        .collect::<Result<_>>()?;
    if let Device::Gpu(g) = device {
        g.sync()?;
        g.reset_peak();
    }
    // Warm-up: pipelines compiled, pool filled, caches warm.
    drop((case.run)(&inputs)?);
    device.sync()?;
    let mut times = Vec::new();
    let start = Instant::now();
    let mut last = None;
    while times.is_empty() || (start.elapsed().as_secs_f64() < min_time && times.len() < 50) {
        drop(last.take());
        let t0 = Instant::now();
        let out = (case.run)(&inputs)?;
        device.sync()?;
        times.push(t0.elapsed().as_secs_f64());
        last = Some(out);
    }
    let output = match last {
        Some(t) => t.to_vec()?,
        None => Vec::new(),
    };
    let queued_ms = match device {
        Device::Cpu => None,
        Device::Gpu(_) => {
            let mut q = Vec::new();
            for _ in 0..3 {
                let t0 = Instant::now();
                for _ in 0..QUEUED {
                    drop((case.run)(&inputs)?);
                }
                device.sync()?;
                q.push(t0.elapsed().as_secs_f64() * 1e3 / QUEUED as f64);
            }
            q.sort_by(f64::total_cmp);
            Some(q[1])
        }
    };
    let gpu_ms = match device {
        Device::Gpu(g) if g.gpu_timer_start() => {
            for _ in 0..QUEUED {
                drop((case.run)(&inputs)?);
            }
            g.gpu_timer_stop().map(|t| t.seconds * 1e3 / QUEUED as f64)
        }
        _ => None,
    };
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let rate = case.work / secs / 1e9;
    let record = Record {
        name: case.name.clone(),
        device: device_name(device),
        ms: secs * 1e3,
        gflops: (!case.is_bytes).then_some(rate),
        gbps: case.is_bytes.then_some(rate),
        peak_bytes: device.gpu().map(|g| g.pool_stats().peak_live_bytes),
        peer_ms: None,
        ratio: None,
        vs_cpu: None,
        queued_ms,
        gpu_ms,
        rel_err: None,
    };
    Ok((record, output))
}

/// Devices to measure: the CPU path (every GPU number is also given as a ratio to it) and
/// the GPU asked for, or with `auto` every hardware adapter.
fn devices(device_arg: &str) -> Result<Vec<Device>> {
    let req: DeviceRequest = device_arg.parse()?;
    match req {
        DeviceRequest::Cpu => return Ok(vec![Device::Cpu]),
        DeviceRequest::Gpu | DeviceRequest::GpuIndex(_) => return Ok(vec![Device::Cpu, Device::select(req)?.device]),
        DeviceRequest::Auto => {}
    }
    let mut v = vec![Device::Cpu];
    for a in list_adapters().iter().filter(|a| !a.software) {
        match Device::select(DeviceRequest::GpuIndex(a.index)) {
            Ok(s) => v.push(s.device),
            Err(e) => eprintln!("skipping gpu:{}: {e}", a.index),
        }
    }
    Ok(v)
}

pub fn run(args: &Args, device_arg: &str) -> Result<()> {
    if let Some(BenchWhat::Model(m)) = &args.what {
        return crate::cli::bench_model::run(m);
    }
    let peer: HashMap<String, f64> = match &args.peer {
        None => HashMap::new(),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let recs: Vec<Record> = serde_json::from_str(&text)
                .map_err(|e| Error::File { path: p.clone(), msg: format!("not a bench JSON array: {e}") })?;
            recs.into_iter().map(|r| (r.name, r.ms)).collect()
        }
    };
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| args.filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())))
        .filter(|c| !args.quick || c.quick)
        .collect();
    if selected.is_empty() {
        return Err(Error::Invalid("bench: no case matches the filter".into()));
    }
    let mut records: Vec<Record> = Vec::new();
    if !args.json {
        println!(
            "{:<34} {:<34} {:>10} {:>9} {:>9} {:>12} {:>10} {:>9} {:>8} {:>9}",
            "case",
            "device",
            "ms",
            "ms x10",
            "GPU ms",
            if args.train { "peak GPU" } else { "GFLOP/s|GB/s" },
            "peer ms",
            "vipo/peer",
            "vs cpu",
            "err"
        );
    }
    // The CPU path's output of each case, to check the GPU's against (same inputs).
    let mut cpu_out: HashMap<String, Vec<f32>> = HashMap::new();
    for device in devices(device_arg)? {
        let runs: Vec<Result<(Record, Vec<f32>)>> = if args.train {
            TRAIN_CASES
                .iter()
                .filter(|(c, s, b)| !args.quick || (*c, *s, *b) == TRAIN_CASES[0])
                .map(|&(c, s, b)| time_train(c, s, b, &device, args.min_time).map(|r| (r, Vec::new())))
                .collect()
        } else {
            // f16 cases where the device can run them (the CPU path always can).
            let f16_ok = device.gpu().is_none_or(|g| g.features.contains(wgpu::Features::SHADER_F16));
            selected
                .iter()
                .filter(|c| (f16_ok || !c.f16) && (c.switch == Switch::Off || !device.is_cpu()))
                .map(|case| match device.gpu() {
                    // Each case runs with exactly the switches its name says (a case without
                    // " f16 math " or " split-K " has them off, whatever the environment set),
                    // so a switched case and its twin always compare the two settings.
                    Some(g) => {
                        let was = (g.f16_math(), g.matmul_split_k());
                        g.set_f16_math(case.switch == Switch::F16Math);
                        g.set_matmul_split_k(case.switch == Switch::SplitK);
                        let r = time_case(case, &device, args.min_time);
                        g.set_f16_math(was.0);
                        g.set_matmul_split_k(was.1);
                        r
                    }
                    None => time_case(case, &device, args.min_time),
                })
                .collect()
        };
        for r in runs {
            let (mut r, out) = r?;
            if device.is_cpu() {
                cpu_out.insert(r.name.clone(), out);
            } else if let Some(want) = cpu_out.get(&twin(&r.name)).filter(|w| !w.is_empty()) {
                r.rel_err = Some(rel_err(&out, want));
            }
            if let Some(&p) = peer.get(&r.name).or_else(|| peer.get(&twin(&r.name))) {
                r.peer_ms = Some(p);
                r.ratio = Some(r.ms / p);
            }
            if !device.is_cpu() {
                let cpu = records.iter().find(|c| c.name == r.name && c.device.starts_with("cpu"));
                r.vs_cpu = cpu.map(|c| r.ms / c.ms);
            }
            if !args.json {
                let rate = r.gflops.or(r.gbps).or(r.peak_bytes.map(|b| b as f64 / 1048576.0)).unwrap_or(0.0);
                let unit = if r.gbps.is_some() {
                    "GB/s"
                } else if r.gflops.is_some() {
                    "GF/s"
                } else {
                    "MiB "
                };
                let peer = r.peer_ms.map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into());
                let ratio = r.ratio.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
                let vs_cpu = r.vs_cpu.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
                let err = r.rel_err.map(|x| format!("{x:.1e}")).unwrap_or_else(|| "-".into());
                let queued = r.queued_ms.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
                let gpu = r.gpu_ms.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
                println!(
                    "{:<34} {:<34} {:>10.2} {:>9} {:>9} {:>7.1} {unit} {:>10} {:>9} {:>8} {:>9}",
                    r.name, r.device, r.ms, queued, gpu, rate, peer, ratio, vs_cpu, err
                );
            }
            records.push(r);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records).map_err(|e| Error::Invalid(e.to_string()))?);
    }
    Ok(())
}
