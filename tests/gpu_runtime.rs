//! GPU plumbing: device selection, the buffer pool in a steady loop, batched submits,
//! and the binding-size limit.
mod common;
use common::*;
use vipo::{Device, DeviceRequest, Error, Tensor};

#[test]
fn device_requests_parse() {
    assert_eq!("auto".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
    assert_eq!("CPU".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
    assert_eq!("gpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Gpu);
    assert_eq!("gpu:3".parse::<DeviceRequest>().unwrap(), DeviceRequest::GpuIndex(3));
    for bad in ["gpu:", "gpu:x", "cuda", "gpu:-1"] {
        let e = bad.parse::<DeviceRequest>().unwrap_err().to_string();
        assert!(e.contains("auto, cpu, gpu or gpu:N"), "{bad}: {e}");
    }
    assert!(Device::select(DeviceRequest::GpuIndex(999)).unwrap_err().to_string().contains("gpu:999"));
}

#[test]
fn auto_never_takes_a_software_adapter() {
    let adapters = vipo::device::list_adapters();
    let sel = Device::select(DeviceRequest::Auto).unwrap();
    match &sel.device {
        Device::Gpu(g) => assert!(!g.is_software(), "auto took {}", sel.device),
        Device::Cpu => assert!(
            adapters.iter().all(|a| a.software),
            "auto took the CPU although a hardware adapter exists: {adapters:?}"
        ),
    }
    assert!(!sel.reason.is_empty());
}

#[test]
fn steady_loop_reuses_pooled_buffers_and_batches_submits() {
    let Some(shared) = gpu() else { return };
    // A context of its own, so parallel tests do not move its counters.
    let g = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = g.gpu().unwrap().clone();
    let x = Tensor::randn(&[37, 129], 5, &g).unwrap();
    let w = Tensor::randn(&[129, 61], 6, &g).unwrap();
    let step = |x: &Tensor| -> Tensor {
        x.matmul(&w)
            .unwrap()
            .silu()
            .unwrap()
            .matmul_t(&w, false, true)
            .unwrap()
            .mul_scalar(0.01)
            .unwrap()
            .add(x)
            .unwrap()
    };
    let mut y = step(&x);
    y = step(&y);
    ctx.sync().unwrap();
    let before = ctx.pool_stats();
    for _ in 0..50 {
        y = step(&y);
    }
    let after = ctx.pool_stats();
    assert_eq!(
        after.device_allocations, before.device_allocations,
        "the pool allocated in a steady loop: {before:?} -> {after:?}"
    );
    assert_eq!(after.live_bytes, before.live_bytes, "live bytes grew: {before:?} -> {after:?}");
    // 250 dispatches with no readback fit in one batch: nothing was submitted.
    assert_eq!(after.submits, before.submits, "ops submitted without a readback: {before:?} -> {after:?}");
    // The loop computed something real: compare with the same loop on the CPU.
    let (xc, wc) = (x.to(&Device::Cpu).unwrap(), w.to(&Device::Cpu).unwrap());
    let stepc = |x: &Tensor| -> Tensor {
        x.matmul(&wc)
            .unwrap()
            .silu()
            .unwrap()
            .matmul_t(&wc, false, true)
            .unwrap()
            .mul_scalar(0.01)
            .unwrap()
            .add(x)
            .unwrap()
    };
    let mut yc = stepc(&xc);
    for _ in 0..51 {
        yc = stepc(&yc);
    }
    let submits = ctx.pool_stats().submits;
    assert_close("steady loop gpu vs cpu", &y.to_vec().unwrap(), &yc.to_vec().unwrap(), 1e-4, 5);
    assert_eq!(ctx.pool_stats().submits, submits + 1, "one readback, one submit");
    drop(y);
    assert!(ctx.pool_stats().live_bytes < after.live_bytes);
}

#[test]
fn uploads_and_thousands_of_dispatches_make_one_command_buffer() {
    let Some(shared) = gpu() else { return };
    let g = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = g.gpu().unwrap().clone();
    ctx.set_dispatches_per_submit(0);
    // Each iteration uploads a small tensor and records two dispatches that read it, then drops
    // it: the next upload takes the same pooled buffer while the dispatch that reads the old
    // contents has not run yet, so the copy must be ordered after it. 3000 dispatches also
    // fill several uniform arenas.
    let n = 37;
    let x0 = randn(n, 41);
    let mut y = Tensor::from_slice(&x0, &[n], &g).unwrap();
    ctx.sync().unwrap();
    let before = ctx.pool_stats().submits;
    let mut yc = x0.clone();
    for i in 0..1500 {
        let c: Vec<f32> = (0..n).map(|j| ((i * 7 + j) % 11) as f32 - 5.0).collect();
        let ct = Tensor::from_slice(&c, &[n], &g).unwrap();
        y = y.add(&ct).unwrap().mul_scalar(0.5).unwrap();
        yc.iter_mut().zip(&c).for_each(|(v, &c)| *v = (*v + c) * 0.5);
    }
    let got = y.to_vec().unwrap();
    assert_eq!(ctx.pool_stats().submits, before + 1, "1500 uploads and 3000 dispatches, one readback: one submit");
    // Halving and adding small integers is exact in f32 here: the results must be identical.
    assert_eq!(got, yc, "a copy ran before the dispatch that read the buffer's old contents");
    // The default submits every 512 dispatches, so a long graph starts running early.
    let g2 = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx2 = g2.gpu().unwrap().clone();
    let mut y = Tensor::from_slice(&x0, &[n], &g2).unwrap();
    ctx2.sync().unwrap();
    let before = ctx2.pool_stats().submits;
    for _ in 0..1100 {
        y = y.mul_scalar(1.0).unwrap();
    }
    let _ = y.to_vec().unwrap();
    assert_eq!(ctx2.pool_stats().submits, before + 3, "1100 dispatches by 512, then the readback");
}

#[test]
fn tensors_over_the_binding_limit_are_refused_by_name() {
    let Some(g) = gpu() else { return };
    let limit = g.gpu().unwrap().limits.max_storage_buffer_binding_size;
    let n = (limit / 4 + 1) as usize;
    let err = vipo::Tensor::from_vec(vec![1.0; n], &[n], &g).unwrap_err();
    match &err {
        Error::TooLarge { bytes, limit: l, .. } => {
            assert_eq!(*l, limit);
            assert!(*bytes > limit);
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    assert!(err.to_string().contains("max_storage_buffer_binding_size"), "{err}");
}

#[test]
fn gpu_timer_sums_the_dispatches_between_start_and_stop() {
    let Some(dev) = gpu() else { return };
    let Device::Gpu(ctx) = &dev else { panic!("gpu() gave {dev}") };
    // Only this test runs the timer (other tests' dispatches may be timed too while it runs).
    assert_eq!(ctx.gpu_timer_stop(), None, "a timer that was never started reads nothing");
    if !ctx.gpu_timer_start() {
        assert!(!ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY), "timestamps exist but the timer refused");
        return;
    }
    let a = Tensor::randn(&[300, 200], 1, &dev).unwrap();
    let b = Tensor::randn(&[200, 170], 2, &dev).unwrap();
    let t0 = std::time::Instant::now();
    let c = a.matmul(&b).unwrap().gelu().unwrap();
    c.to_vec().unwrap();
    let times = ctx.gpu_timer_stop().expect("the timer was running");
    let wall = t0.elapsed().as_secs_f64();
    let secs = times.seconds;
    // Two kernels ran, on a queue that runs one pass at a time: some time, never more than the
    // wall time around them (with slack for clock domains).
    assert!(secs > 0.0 && secs.is_finite(), "GPU time {secs}");
    assert!(secs <= wall * 1.5 + 1e-3, "GPU time {secs} s > wall time {wall} s");
    // By kernel: a matmul tile and the unary kernel, once each, most time first, adding up.
    let names: Vec<&str> = times.kernels.iter().map(|k| k.shader).collect();
    assert!(names.iter().any(|n| n.starts_with("matmul_")), "no matmul kernel in {names:?}");
    assert!(names.contains(&"unary"), "no unary kernel in {names:?}");
    for k in &times.kernels {
        assert!(k.seconds >= 0.0 && k.dispatches >= 1, "{k:?}");
    }
    // (At least once: the shared context may run other tests' work meanwhile.)
    let matmul = times.kernels.iter().find(|k| k.shader.starts_with("matmul_")).map(|k| k.dispatches);
    assert!(matmul.is_some_and(|n| n >= 1), "{:?}", times.kernels);
    assert!(times.kernels.windows(2).all(|w| w[0].seconds >= w[1].seconds), "{:?}", times.kernels);
    let sum: f64 = times.kernels.iter().map(|k| k.seconds).sum();
    assert!((sum - secs).abs() <= 1e-9 * secs.max(1.0), "kernels sum to {sum}, total {secs}");
    assert_eq!(ctx.gpu_timer_stop(), None, "stop ends the timer");
}

#[test]
fn shader_dir_builds_a_module_from_its_file_and_names_a_bad_one() {
    // VIPO_SHADER_DIR: a variant of matmul_64x64 that doubles its output is what runs (the
    // bench's GPU-vs-CPU error becomes ~1); a file that does not compile, or lacks the entry
    // point, is an error naming it, not wgpu's panic. Through the CLI: the variable is read
    // when a GPU context is made, and the tests' context is shared.
    let Some(dev) = gpu() else { return };
    let index = dev.gpu().unwrap().index;
    let src = vipo::shaders::MATMUL_64.source;
    let store = "c[o + j] = v[j];";
    assert!(src.contains(store), "matmul.wgsl's store changed: update this test");
    let run = |text: &str| {
        let dir = std::env::temp_dir().join(format!("vipo-shader-dir-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("matmul_64x64.wgsl"), text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
            .args(["--device", &format!("gpu:{index}"), "bench", "--quick", "--json", "--min-time", "0"])
            .args(["--filter", "matmul 512x512x512"])
            .env("VIPO_SHADER_DIR", &dir)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).ok();
        out
    };
    let gpu_err = |out: &std::process::Output| -> f64 {
        let recs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let r = recs.iter().find(|r| r["device"].as_str().unwrap().starts_with("gpu")).expect("a GPU record");
        r["rel_err"].as_f64().unwrap()
    };
    let same = run(src);
    assert!(same.status.success(), "{}", String::from_utf8_lossy(&same.stderr));
    assert!(String::from_utf8_lossy(&same.stderr).contains("VIPO_SHADER_DIR: matmul_64x64 from"));
    assert!(gpu_err(&same) < 1e-5, "the unchanged source: rel err {}", gpu_err(&same));
    let doubled = run(&src.replace(store, "c[o + j] = 2.0 * v[j];"));
    assert!(doubled.status.success(), "{}", String::from_utf8_lossy(&doubled.stderr));
    assert!((gpu_err(&doubled) - 1.0).abs() < 1e-3, "the doubling variant ran? rel err {}", gpu_err(&doubled));
    for (bad, why) in
        [("fn main( {", "does not parse"), (&*src.replace("fn main(", "fn main2("), "no entry point main")]
    {
        let out = run(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: it ran");
        assert!(err.contains("VIPO_SHADER_DIR") && err.contains("matmul_64x64"), "{why}: {err}");
        assert!(!err.contains("panicked"), "{why}: {err}");
    }
}
