//! Backward of matmul (all transposes, shared weights), fused attention (self, cross, wide
//! heads) and GEGLU: CPU against central finite differences, GPU against CPU.
mod common;
use common::*;

const FD_TOL: f64 = 3e-3;
const GPU_TOL: f64 = 5e-5;

#[test]
fn matmul_grads_every_layout() {
    let (m, n, k) = (5, 7, 9);
    for (ti, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
        let seed = 700 + ti as u64;
        let ash = if ta { vec![k, m] } else { vec![m, k] };
        let bsh = if tb { vec![n, k] } else { vec![k, n] };
        let inputs = [(randn(m * k, seed), ash), (randn(k * n, seed + 1), bsh)];
        check_grads(&format!("matmul ta={ta} tb={tb}"), seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| {
            t[0].matmul_t(&t[1], ta, tb)
        });
    }
}

#[test]
fn matmul_grads_batched_and_shared() {
    // A linear layer: batched activations against a shared (Cout, Cin) weight, read transposed.
    let inputs = [(randn(2 * 3 * 6, 1), vec![2, 3, 6]), (randn(4 * 6, 2), vec![4, 6])];
    check_grads("linear", 1, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].matmul_t(&t[1], false, true));
    check_grads("linear frozen weight", 1, &inputs, &[1], 1e-2, FD_TOL, GPU_TOL, |t| t[0].matmul_t(&t[1], false, true));
    // Both batched; and a shared left operand against a batched right one.
    let inputs = [(randn(3 * 4 * 5, 3), vec![3, 4, 5]), (randn(3 * 5 * 2, 4), vec![3, 5, 2])];
    check_grads("batched", 3, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].matmul(&t[1]));
    let inputs = [(randn(4 * 5, 5), vec![4, 5]), (randn(3 * 5 * 2, 6), vec![3, 5, 2])];
    check_grads("shared left", 5, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].matmul(&t[1]));
}

#[test]
fn linear_with_bias_and_residual_grads() {
    // The bias gets dY summed over every row, the residual dY; frozen weight as under LoRA.
    let inputs = [
        (randn(2 * 3 * 6, 21), vec![2, 3, 6]),
        (randn(4 * 6, 22), vec![4, 6]),
        (randn(4, 23), vec![4]),
        (randn(2 * 3 * 4, 24), vec![2, 3, 4]),
    ];
    let f = |t: &[vipo::Tensor]| t[0].linear(&t[1], Some(&t[2]), Some(&t[3]));
    check_grads("linear + bias + residual", 21, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, f);
    check_grads("linear frozen w, b", 21, &inputs, &[1, 2], 1e-2, FD_TOL, GPU_TOL, f);
    check_grads("linear frozen x, residual", 21, &inputs, &[0, 3], 1e-2, FD_TOL, GPU_TOL, f);
    let inputs2 = &inputs[..3];
    check_grads("linear + bias", 25, inputs2, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].linear(&t[1], Some(&t[2]), None));
}

#[test]
fn frozen_weights_keep_no_activations_alive() {
    // Under LoRA the base weights are frozen: dX needs the weight, not X, so a linear layer
    // must not keep its input alive for a weight gradient nobody asked for.
    let Some(shared) = gpu() else { return };
    let dev = vipo::Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = dev.gpu().unwrap().clone();
    let x = vipo::Tensor::randn(&[512, 64], 1, &dev).unwrap().requires_grad();
    let live_after_forward = |trainable: bool| {
        let ws: Vec<vipo::Tensor> = (0..6)
            .map(|i| {
                let w = vipo::Tensor::randn(&[64, 64], 10 + i, &dev).unwrap().mul_scalar(0.1).unwrap();
                if trainable {
                    w.requires_grad()
                } else {
                    w
                }
            })
            .collect();
        ctx.sync().unwrap();
        let before = ctx.pool_stats().live_bytes;
        let mut h = x.clone();
        for w in &ws {
            h = h.linear(w, None, None).unwrap();
        }
        let live = ctx.pool_stats().live_bytes - before;
        h.square().unwrap().mean_all().unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().shape(), &[512, 64]);
        live
    };
    let frozen = live_after_forward(false);
    let trainable = live_after_forward(true);
    // Trainable weights keep the five (512, 64) inputs after x; frozen ones keep none of them.
    assert!(frozen * 3 < trainable, "frozen weights: {frozen} bytes live after the forward, trainable {trainable}");
}

#[test]
fn attention_grads() {
    // (batch, heads, Lq, Lk, D, Dv): self, cross, two keys, tiles not full, and a head wider
    // than the fused kernel (its GPU path is differentiated through the ops it is built from).
    // Also the fixed-head GPU kernels (40 and 80; D == Dv).
    let cases = [
        (1, 2, 9, 9, 4, 4),
        (2, 1, 5, 3, 6, 5),
        (1, 1, 4, 2, 3, 3),
        (1, 1, 70, 11, 8, 8),
        (1, 1, 6, 5, 165, 3),
        (1, 1, 6, 11, 40, 40),
        (1, 1, 5, 3, 80, 80),
    ];
    for (ci, &(b, h, lq, lk, d, dv)) in cases.iter().enumerate() {
        let seed = 800 + ci as u64;
        let inputs = [
            (randn(b * h * lq * d, seed), vec![b, h, lq, d]),
            (randn(b * h * lk * d, seed + 1), vec![b, h, lk, d]),
            (randn(b * h * lk * dv, seed + 2), vec![b, h, lk, dv]),
        ];
        check_grads(&format!("attention {:?}", cases[ci]), seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| {
            t[0].attention(&t[1], &t[2], None)
        });
    }
    // Cross-attention with frozen keys and values (text embeddings): only dQ is computed.
    let inputs = [
        (randn(2 * 7 * 4, 9), vec![2, 7, 4]),
        (randn(2 * 5 * 4, 10), vec![2, 5, 4]),
        (randn(2 * 5 * 6, 11), vec![2, 5, 6]),
    ];
    check_grads("attention frozen k, v", 9, &inputs, &[1, 2], 1e-2, FD_TOL, GPU_TOL, |t| {
        t[0].attention(&t[1], &t[2], Some(0.7))
    });
}

#[test]
fn geglu_grads() {
    let x: Vec<f32> = randn(3 * 2 * 10, 12).iter().map(|v| v * 1.5).collect();
    check_grads("geglu", 12, &[(x, vec![3, 2, 10])], &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].geglu());
}
