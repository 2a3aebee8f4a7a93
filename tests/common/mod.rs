//! Shared test helpers: the GPU under test, seeded inputs, and one comparison that reports
//! max abs error, relative error and NMSE with the seed.
#![allow(dead_code)]

use std::sync::OnceLock;

use vipo::{Device, Tensor};

/// Any adapter, software ones included. With `CI=true`, no adapter is a failure, not a skip.
pub fn gpu() -> Option<Device> {
    static GPU: OnceLock<Option<Device>> = OnceLock::new();
    GPU.get_or_init(|| {
        let d = Device::first_gpu_any();
        match &d {
            Some(d) => eprintln!("GPU tests run on {d}"),
            None if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
                panic!("CI=true but no GPU adapter was found: install mesa-vulkan-drivers (lavapipe) and set WGPU_BACKEND=vulkan")
            }
            None => eprintln!("no GPU adapter: GPU comparisons are skipped on this machine (CI fails instead)"),
        }
        d
    })
    .clone()
}

/// The GPU under test when it can read f16 (SHADER_F16), for the f16 kernels; None otherwise.
/// CI's lavapipe has it, so there its absence is a failure, not a skip.
pub fn gpu_f16() -> Option<Device> {
    let g = gpu()?;
    let has = g.gpu().is_some_and(|c| c.features.contains(wgpu::Features::SHADER_F16));
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        assert!(has, "CI's adapter (lavapipe) has SHADER_F16: the f16 kernels must run there");
    }
    has.then_some(g)
}

/// Seeded standard-normal values.
pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    vipo::rng::Rng::new(seed).normal_vec(n)
}

/// Seeded uniform values in [lo, hi).
pub fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut r = vipo::rng::Rng::new(seed);
    (0..n).map(|_| lo + (hi - lo) * r.uniform()).collect()
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Relative error as max|got - want| / max|want|: scale-free, and not fooled by tiny entries.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs())).max(1e-30);
    let max_abs = got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    max_abs / scale
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64, seed: u64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ (seed {seed})");
    assert!(!want.is_empty(), "{what}: empty reference (seed {seed})");
    assert!(
        want.iter().any(|&w| w != 0.0),
        "{what}: the reference is all zeros, so the test cannot fail (seed {seed})"
    );
    let nan_got = got.iter().any(|v| v.is_nan());
    let nan_want = want.iter().any(|v| v.is_nan());
    assert_eq!(nan_got, nan_want, "{what}: NaN in one result only (seed {seed})");
    let max_abs = got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    let power: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>().max(1e-30);
    let nmse = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum::<f64>() / power;
    let rel = rel_err(got, want);
    assert!(
        rel <= tol,
        "{what}: rel err {rel:.3e} > tol {tol:.1e} (max abs {max_abs:.3e}, nmse {nmse:.3e}, seed {seed})"
    );
}

/// Runs `f` on the CPU and on the GPU with the same inputs and compares the outputs.
/// Returns the CPU output so callers can also check it against a float64 loop.
#[track_caller]
pub fn gpu_vs_cpu(
    what: &str,
    tol: f64,
    seed: u64,
    inputs: &[(Vec<f32>, Vec<usize>)],
    f: impl Fn(&[Tensor]) -> vipo::Result<Tensor>,
) -> Tensor {
    let cpu_in: Vec<Tensor> = inputs.iter().map(|(v, s)| Tensor::from_slice(v, s, &Device::Cpu).unwrap()).collect();
    let want = f(&cpu_in).unwrap_or_else(|e| panic!("{what} on cpu: {e} (seed {seed})"));
    if let Some(g) = gpu() {
        let gin: Vec<Tensor> = inputs.iter().map(|(v, s)| Tensor::from_slice(v, s, &g).unwrap()).collect();
        let got = f(&gin).unwrap_or_else(|e| panic!("{what} on gpu: {e} (seed {seed})"));
        assert_eq!(got.shape(), want.shape(), "{what}: shapes differ (seed {seed})");
        assert!(got.device() == g, "{what}: GPU op returned a tensor on {}", got.device());
        assert_close(&format!("{what} gpu vs cpu"), &got.to_vec().unwrap(), &want.to_vec().unwrap(), tol, seed);
    }
    want
}

/// An erf independent of the kernels' approximation: Taylor series below 3, the asymptotic
/// erfc expansion above (absolute error < 1e-12 and < 1e-9 respectively).
pub fn erf_ref(x: f64) -> f64 {
    let z = x.abs();
    let r = if z < 3.0 {
        let (mut term, mut sum, mut n) = (z, z, 0.0f64);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -z * z / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let z2 = z * z;
        let series =
            1.0 - 1.0 / (2.0 * z2) + 3.0 / (4.0 * z2 * z2) - 15.0 / (8.0 * z2 * z2 * z2) + 105.0 / (16.0 * z2.powi(4));
        1.0 - (-z2).exp() / (z * std::f64::consts::PI.sqrt()) * series
    };
    r.copysign(x)
}

/// Loss `sum(f(x) * r)` in float64 on the host, with `r` fixed random weights (so every
/// output element matters differently and a wrong index cannot hide).
fn weighted_loss(y: &Tensor, r: &[f32]) -> f64 {
    y.to_vec().unwrap().iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Gradient check of `f` with respect to each input not listed in `frozen`:
/// 1. on the CPU, backward of `sum(f(x) * r)` against central differences with step `eps`
///    at up to 24 coordinates per input; error relative to the largest gradient entry;
/// 2. on the GPU (when there is one), the backward's gradients against the CPU's.
///
/// Returns the worst finite-difference error seen.
#[track_caller]
#[allow(clippy::too_many_arguments)]
pub fn check_grads(
    what: &str,
    seed: u64,
    inputs: &[(Vec<f32>, Vec<usize>)],
    frozen: &[usize],
    eps: f32,
    fd_tol: f64,
    gpu_tol: f64,
    f: impl Fn(&[Tensor]) -> vipo::Result<Tensor>,
) -> f64 {
    let make = |dev: &Device| -> Vec<Tensor> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, (v, s))| {
                let t = Tensor::from_slice(v, s, dev).unwrap();
                if frozen.contains(&i) {
                    t
                } else {
                    t.requires_grad()
                }
            })
            .collect()
    };
    let analytic = |dev: &Device| -> (Vec<Option<Vec<f32>>>, Vec<f32>) {
        let xs = make(dev);
        let y = f(&xs).unwrap_or_else(|e| panic!("{what} forward on {dev}: {e} (seed {seed})"));
        let r = randn(y.numel(), seed ^ 0x5eed);
        let rt = Tensor::from_slice(&r, y.shape(), dev).unwrap();
        let loss = y.mul(&rt).unwrap().sum_all().unwrap();
        loss.backward().unwrap_or_else(|e| panic!("{what} backward on {dev}: {e} (seed {seed})"));
        let grads = xs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if frozen.contains(&i) {
                    assert!(x.grad().is_none(), "{what}: frozen input {i} got a gradient");
                    return None;
                }
                let g = x.grad().unwrap_or_else(|| panic!("{what}: input {i} got no gradient (seed {seed})"));
                assert_eq!(g.shape(), x.shape(), "{what}: gradient {i} has the wrong shape");
                Some(g.to_vec().unwrap())
            })
            .collect();
        (grads, r)
    };
    let (cpu_grads, r) = analytic(&Device::Cpu);
    let mut worst = 0f64;
    let mut rng = vipo::rng::Rng::new(seed ^ 0xfd);
    for (i, g) in cpu_grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let n = g.len();
        let coords: Vec<usize> = if n <= 24 { (0..n).collect() } else { (0..24).map(|_| rng.below(n)).collect() };
        let scale = g.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-4);
        for &j in &coords {
            let eval = |delta: f32| {
                let _ng = vipo::autograd::no_grad();
                let xs: Vec<Tensor> = inputs
                    .iter()
                    .enumerate()
                    .map(|(k, (v, s))| {
                        let mut v = v.clone();
                        if k == i {
                            v[j] += delta;
                        }
                        Tensor::from_slice(&v, s, &Device::Cpu).unwrap()
                    })
                    .collect();
                weighted_loss(&f(&xs).unwrap(), &r)
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let err = (numeric - g[j] as f64).abs() / scale;
            worst = worst.max(err);
            assert!(
                err <= fd_tol,
                "{what}: d/d input{i}[{j}]: analytic {} vs numeric {numeric} (rel err {err:.2e} > {fd_tol:.0e}, seed {seed})",
                g[j]
            );
        }
    }
    if let Some(dev) = gpu() {
        let (gpu_grads, _) = analytic(&dev);
        for (i, (gg, cg)) in gpu_grads.iter().zip(&cpu_grads).enumerate() {
            if let (Some(gg), Some(cg)) = (gg, cg) {
                assert_close(&format!("{what} grad {i} gpu vs cpu"), gg, cg, gpu_tol, seed);
            }
        }
    }
    worst
}
