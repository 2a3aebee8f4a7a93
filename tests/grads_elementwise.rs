//! Backward of unary, scalar, binary (broadcasting), where and reshape: CPU against central
//! finite differences, GPU against CPU.
mod common;
use common::*;
use vipo::ops::unary::UnaryOp;
use vipo::Device;
use vipo::Tensor;

// f32 central differences with step 1e-2 on O(1) values: truncation ~1e-5 relative to the
// largest gradient, rounding ~1e-5; smooth ops pass well inside 2e-3.
const FD_TOL: f64 = 2e-3;
const GPU_TOL: f64 = 2e-5;

#[test]
fn unary_grads() {
    let smooth = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Silu,
        UnaryOp::GeluErf,
        UnaryOp::GeluTanh,
        UnaryOp::QuickGelu,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Square,
        UnaryOp::Affine(-1.5, 0.25),
    ];
    for (k, op) in smooth.into_iter().enumerate() {
        let x = randn(3 * 37, 300 + k as u64);
        check_grads(&format!("{op:?}"), 300 + k as u64, &[(x, vec![3, 37])], &[], 1e-2, FD_TOL, GPU_TOL, |t| {
            t[0].unary(op)
        });
    }
    // Positive-domain ops.
    for (k, op) in [UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Rsqrt, UnaryOp::PowScalar(1.7), UnaryOp::RDivScalar(2.0)]
        .into_iter()
        .enumerate()
    {
        let x = uniform(41, 0.5, 3.0, 310 + k as u64);
        check_grads(&format!("{op:?}"), 310 + k as u64, &[(x, vec![41])], &[], 1e-3, FD_TOL, GPU_TOL, |t| {
            t[0].unary(op)
        });
    }
    // Kinks: values kept away from the kink so the finite difference does not straddle it.
    for (k, op) in
        [UnaryOp::Relu, UnaryOp::Abs, UnaryOp::MaxScalar(0.3), UnaryOp::MinScalar(-0.2), UnaryOp::Clamp(-0.5, 0.7)]
            .into_iter()
            .enumerate()
    {
        let x: Vec<f32> = randn(53, 320 + k as u64)
            .into_iter()
            .map(|v| {
                let near = [0.0f32, 0.3, -0.2, -0.5, 0.7].iter().any(|&c| (v - c).abs() < 0.03);
                if near {
                    v + 0.06
                } else {
                    v
                }
            })
            .collect();
        check_grads(&format!("{op:?}"), 320 + k as u64, &[(x, vec![53])], &[], 1e-2, FD_TOL, GPU_TOL, |t| {
            t[0].unary(op)
        });
    }
}

#[test]
fn binary_grads_reduce_to_broadcast_shapes() {
    let cases: &[(&[usize], &[usize])] = &[(&[4, 7], &[4, 7]), (&[2, 3, 5], &[3, 1]), (&[1, 6], &[5, 1]), (&[9], &[1])];
    for (ci, (sa, sb)) in cases.iter().enumerate() {
        let seed = 400 + ci as u64;
        let a = randn(numel(sa), seed);
        let b: Vec<f32> = randn(numel(sb), seed + 1).iter().map(|v| v.signum() * (v.abs() + 0.5)).collect();
        let inputs = [(a, sa.to_vec()), (b, sb.to_vec())];
        check_grads("add", seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].add(&t[1]));
        check_grads("sub", seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].sub(&t[1]));
        check_grads("mul", seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].mul(&t[1]));
        check_grads("div", seed, &inputs, &[], 1e-3, FD_TOL, GPU_TOL, |t| t[0].div(&t[1]));
        // For max/min, b centred like a, so each side wins somewhere (even a single b).
        let mm = [inputs[0].clone(), (randn(numel(sb), seed + 2).iter().map(|v| v * 0.5).collect(), sb.to_vec())];
        check_grads("maximum", seed, &mm, &[], 1e-3, FD_TOL, GPU_TOL, |t| t[0].maximum(&t[1]));
        check_grads("minimum", seed, &mm, &[], 1e-3, FD_TOL, GPU_TOL, |t| t[0].minimum(&t[1]));
        // One side frozen: it gets no gradient and costs nothing.
        check_grads("mul frozen b", seed, &inputs, &[1], 1e-2, FD_TOL, GPU_TOL, |t| t[0].mul(&t[1]));
    }
}

#[test]
fn where_and_reshape_grads() {
    let cond: Vec<f32> = (0..12).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let inputs = [(cond, vec![1, 12]), (randn(36, 1), vec![3, 12]), (randn(3, 2), vec![3, 1])];
    check_grads("where", 1, &inputs, &[0], 1e-2, FD_TOL, GPU_TOL, |t| t[0].where_cond(&t[1], &t[2]));
    check_grads("reshape", 2, &[(randn(24, 2), vec![2, 3, 4])], &[], 1e-2, FD_TOL, GPU_TOL, |t| {
        t[0].reshape(&[4, -1])?.mul_scalar(2.0)?.reshape_to(&[6, 4])
    });
}

#[test]
fn gradients_accumulate_until_cleared_and_frozen_tensors_record_nothing() {
    let x = Tensor::from_slice(&[1.0, -2.0, 3.0], &[3], &Device::Cpu).unwrap().requires_grad();
    let w = Tensor::from_slice(&[0.5, 0.5, 0.5], &[3], &Device::Cpu).unwrap();
    for _ in 0..2 {
        x.mul(&w).unwrap().square().unwrap().sum_all().unwrap().backward().unwrap();
    }
    // d/dx sum((x w)^2) = 2 x w^2, twice.
    assert_eq!(x.grad().unwrap().to_vec().unwrap(), vec![1.0, -2.0, 3.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
    let y = w.mul(&w).unwrap();
    assert!(!y.is_tracked(), "frozen inputs must not record");
    {
        let _g = vipo::autograd::no_grad();
        assert!(!x.mul(&w).unwrap().is_tracked(), "no_grad must not record");
    }
    let loss = x.square().unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    let e = loss.backward().unwrap_err().to_string();
    assert!(e.contains("already used"), "{e}");
}
