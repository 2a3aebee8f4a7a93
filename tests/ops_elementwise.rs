//! Unary, scalar, binary (broadcasting) and `where`: GPU against the CPU twin on awkward shapes.
mod common;
use common::*;
use vipo::ops::binary::BinaryOp;
use vipo::ops::unary::UnaryOp;
use vipo::{Device, Tensor};

// f32 transcendental functions on GPUs differ from the f64-inside CPU twin by a few ulp.
const TOL: f64 = 2e-5;

#[test]
fn unary_ops_gpu_vs_cpu() {
    let ops = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Silu,
        UnaryOp::GeluErf,
        UnaryOp::GeluTanh,
        UnaryOp::QuickGelu,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Relu,
        UnaryOp::Abs,
        UnaryOp::Square,
        UnaryOp::Affine(-1.5, 0.25),
        UnaryOp::MaxScalar(0.3),
        UnaryOp::MinScalar(-0.2),
        UnaryOp::Clamp(-0.5, 0.7),
        UnaryOp::RDivScalar(2.0),
    ];
    for (k, op) in ops.into_iter().enumerate() {
        let seed = 100 + k as u64;
        let shape = vec![3, 1, 257];
        let x = randn(numel(&shape), seed).iter().map(|v| v * 3.0).collect();
        gpu_vs_cpu(&format!("{op:?}"), TOL, seed, &[(x, shape)], |t| t[0].unary(op));
    }
    // Ops defined for positive inputs only.
    for (k, op) in [UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Rsqrt, UnaryOp::PowScalar(1.7)].into_iter().enumerate() {
        let seed = 200 + k as u64;
        let x = uniform(1000, 0.05, 20.0, seed);
        gpu_vs_cpu(&format!("{op:?}"), TOL, seed, &[(x, vec![1000])], |t| t[0].unary(op));
    }
}

#[test]
fn unary_cpu_matches_closed_forms() {
    // Values of torch.nn.functional at chosen points, computed by hand from their definitions.
    let x = Tensor::from_slice(&[-2.0, -0.5, 0.3, 1.0, 4.0], &[5], &Device::Cpu).unwrap();
    let gelu = x.gelu().unwrap().to_vec().unwrap();
    for (g, v) in gelu.iter().zip([-2.0f64, -0.5, 0.3, 1.0, 4.0]) {
        // v * Phi(v) from tables of the normal CDF (Phi(-2) = 0.0227501319, ...).
        let want = match v {
            -2.0 => -0.045_500_263_9,
            -0.5 => -0.154_268_769_4,
            0.3 => 0.185_373_426_7,
            1.0 => 0.841_344_746_1,
            _ => 3.999_873_315_0,
        };
        assert!((*g as f64 - want).abs() < 3e-7, "gelu({v}) = {g}, want {want}");
    }
    let s = x.silu().unwrap().to_vec().unwrap();
    assert!((s[3] as f64 - 1.0 / (1.0 + (-1f64).exp())).abs() < 1e-7);
    let t = Tensor::from_slice(&[-100.0, 100.0], &[2], &Device::Cpu).unwrap();
    assert_eq!(t.tanh().unwrap().to_vec().unwrap(), vec![-1.0, 1.0]);
    let s = t.sigmoid().unwrap().to_vec().unwrap();
    assert!(s[0] < 1e-40 && s[1] == 1.0, "{s:?}");
}

#[test]
fn erf_approximation_is_within_its_bound() {
    for i in -800..=800 {
        let x = i as f64 / 100.0;
        let (got, want) = (vipo::ops::unary::erf(x), erf_ref(x));
        assert!((got - want).abs() < 2e-7, "erf({x}) = {got}, reference {want}");
    }
}

#[test]
fn gpu_tanh_and_sigmoid_saturate_without_nan() {
    let x: Vec<f32> = vec![-1e4, -90.0, -20.0, 20.0, 90.0, 1e4, 0.0];
    for op in [UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Silu, UnaryOp::GeluTanh, UnaryOp::GeluErf, UnaryOp::QuickGelu]
    {
        gpu_vs_cpu(&format!("{op:?} extremes"), TOL, 0, &[(x.clone(), vec![7])], |t| t[0].unary(op));
    }
}

#[test]
fn binary_broadcasting_gpu_vs_cpu() {
    // (a shape, b shape): same shape, broadcast from either side, size-1 axes, rank mismatch, scalar.
    let cases: &[(&[usize], &[usize])] = &[
        (&[5, 7, 13], &[5, 7, 13]),
        (&[2, 3, 17, 9], &[3, 1, 1]),
        (&[3, 1, 1], &[2, 3, 17, 9]),
        (&[4, 1, 6], &[1, 5, 1]),
        (&[259], &[1]),
        (&[1], &[31, 3]),
        (&[2, 1, 3, 1, 5], &[7, 1, 4, 1]),
    ];
    let ops = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Maximum, BinaryOp::Minimum];
    for (ci, (sa, sb)) in cases.iter().enumerate() {
        for (oi, op) in ops.iter().enumerate() {
            let seed = (ci * 10 + oi) as u64;
            let a = randn(numel(sa), seed);
            // Divisors kept away from zero so the comparison measures the kernel, not 1/0.
            let b: Vec<f32> = randn(numel(sb), seed + 1000)
                .iter()
                .map(|v| if *op == BinaryOp::Div { v.signum() * (v.abs() + 0.5) } else { *v })
                .collect();
            let want = gpu_vs_cpu(
                &format!("{op:?} {sa:?} {sb:?}"),
                1e-6,
                seed,
                &[(a.clone(), sa.to_vec()), (b.clone(), sb.to_vec())],
                |t| t[0].binary(&t[1], *op),
            );
            // And the CPU against a plain index loop over the broadcast shape.
            let out = want.shape().to_vec();
            let idx = |shape: &[usize], i: usize| -> usize {
                let mut rem = i;
                let mut coord = vec![0; out.len()];
                for d in (0..out.len()).rev() {
                    coord[d] = rem % out[d];
                    rem /= out[d];
                }
                let lead = out.len() - shape.len();
                let mut off = 0;
                for d in 0..shape.len() {
                    let c = if shape[d] == 1 { 0 } else { coord[d + lead] };
                    off = off * shape[d] + c;
                }
                off
            };
            let got = want.to_vec().unwrap();
            for i in 0..got.len() {
                let w = op.eval(a[idx(sa, i)], b[idx(sb, i)]);
                assert_eq!(got[i], w, "{op:?} {sa:?} {sb:?} at {i} (seed {seed})");
            }
        }
    }
}

#[test]
fn binary_rejects_bad_shapes_and_devices() {
    let a = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4], &Device::Cpu).unwrap();
    let e = a.add(&b).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4]"), "{e}");
    if let Some(g) = gpu() {
        let c = Tensor::zeros(&[2, 3], &g).unwrap();
        let e = a.add(&c).unwrap_err().to_string();
        assert!(e.contains("different devices"), "{e}");
    }
}

#[test]
fn where_broadcasts_three_ways() {
    let cond: Vec<f32> = (0..12).map(|i| ((i * 7) % 3 == 0) as u8 as f32).collect();
    let a = randn(5 * 12, 3);
    let b = randn(1, 4);
    let got = gpu_vs_cpu(
        "where",
        0.0,
        3,
        &[(cond.clone(), vec![1, 12]), (a.clone(), vec![5, 12]), (b.clone(), vec![1])],
        |t| t[0].where_cond(&t[1], &t[2]),
    );
    let g = got.to_vec().unwrap();
    for r in 0..5 {
        for c in 0..12 {
            let w = if cond[c] != 0.0 { a[r * 12 + c] } else { b[0] };
            assert_eq!(g[r * 12 + c], w);
        }
    }
}

#[test]
fn reshape_shares_storage_and_to_moves() {
    let x = Tensor::randn(&[2, 3, 4], 1, &Device::Cpu).unwrap();
    let y = x.reshape(&[6, -1]).unwrap();
    assert_eq!(y.shape(), &[6, 4]);
    assert!(x.same_storage(&y));
    assert!(x.reshape(&[5, -1]).is_err());
    if let Some(g) = gpu() {
        let xg = x.to(&g).unwrap();
        assert_eq!(xg.to_vec().unwrap(), x.to_vec().unwrap());
        assert_eq!(xg.to(&Device::Cpu).unwrap().to_vec().unwrap(), x.to_vec().unwrap());
    }
}
