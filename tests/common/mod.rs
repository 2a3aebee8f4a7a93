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
