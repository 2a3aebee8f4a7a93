//! Activation checkpointing: the same gradients as the plain graph, with the block's
//! activations recomputed instead of kept.
mod common;
use common::*;
use vipo::autograd::checkpoint;
use vipo::{Device, Tensor};

/// A block with captured weights: gelu(x W1) W2 + x, on (rows, C).
fn block(x: &Tensor, w1: &Tensor, w2: &Tensor) -> vipo::Result<Tensor> {
    x.matmul(w1)?.gelu()?.matmul(w2)?.add(x)
}

fn grads(dev: &Device, ckpt: bool) -> Vec<Vec<f32>> {
    let x = Tensor::from_slice(&randn(6 * 5, 1), &[6, 5], dev).unwrap().requires_grad();
    let w1 = Tensor::from_slice(&randn(5 * 7, 2), &[5, 7], dev).unwrap().requires_grad();
    let w2 = Tensor::from_slice(&randn(7 * 5, 3), &[7, 5], dev).unwrap().requires_grad();
    let y = if ckpt {
        let (a, b) = (w1.clone(), w2.clone());
        let h = checkpoint(&[&x], move |t| block(&t[0], &a, &b)).unwrap();
        let (a, b) = (w1.clone(), w2.clone());
        checkpoint(&[&h], move |t| block(&t[0], &a, &b)).unwrap()
    } else {
        let h = block(&x, &w1, &w2).unwrap();
        block(&h, &w1, &w2).unwrap()
    };
    y.square().unwrap().mean_all().unwrap().backward().unwrap();
    [x, w1, w2].iter().map(|t| t.grad().unwrap().to_vec().unwrap()).collect()
}

/// The backward profile is process-wide: the tests of this binary run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn checkpointed_blocks_give_the_same_gradients() {
    let _s = serial();
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu());
    for dev in devices {
        let plain = grads(&dev, false);
        let ckpt = grads(&dev, true);
        for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
            assert_close(&format!("checkpoint grad {i} on {dev}"), b, a, 1e-6, 0);
        }
    }
}

#[test]
fn checkpoint_keeps_no_activations() {
    let _s = serial();
    let Some(shared) = gpu() else { return };
    let dev = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = dev.gpu().unwrap().clone();
    let x = Tensor::randn(&[256, 64], 1, &dev).unwrap().requires_grad();
    let w1 = Tensor::randn(&[64, 256], 2, &dev).unwrap().mul_scalar(0.1).unwrap().requires_grad();
    let w2 = Tensor::randn(&[256, 64], 3, &dev).unwrap().mul_scalar(0.1).unwrap().requires_grad();
    let live_after_forward = |ckpt: bool| {
        ctx.sync().unwrap();
        let before = ctx.pool_stats().live_bytes;
        let mut h = x.clone();
        for _ in 0..4 {
            let (a, b) = (w1.clone(), w2.clone());
            h = if ckpt {
                checkpoint(&[&h], move |t| block(&t[0], &a, &b)).unwrap()
            } else {
                block(&h, &w1, &w2).unwrap()
            };
        }
        let live = ctx.pool_stats().live_bytes - before;
        h.square().unwrap().mean_all().unwrap().backward().unwrap();
        live
    };
    let plain = live_after_forward(false);
    let ckpt = live_after_forward(true);
    // Plain keeps each block's (256, 256) hidden activations; checkpointed keeps block outputs only.
    assert!(ckpt * 3 < plain, "checkpointed forward holds {ckpt} bytes, plain {plain}");
}

#[test]
fn backward_profile_times_each_op_kind_while_on() {
    // Its ops (two matmuls, the gelu) are counted while on; off clears and stops it.
    let _s = serial();
    let dev = Device::Cpu;
    let run = || {
        let x = Tensor::from_slice(&randn(6 * 5, 4), &[6, 5], &dev).unwrap().requires_grad();
        let w1 = Tensor::from_slice(&randn(5 * 7, 5), &[5, 7], &dev).unwrap();
        let w2 = Tensor::from_slice(&randn(7 * 5, 6), &[7, 5], &dev).unwrap();
        block(&x, &w1, &w2).unwrap().square().unwrap().mean_all().unwrap().backward().unwrap();
    };
    vipo::autograd::profile_backward(true);
    run();
    let p = vipo::autograd::backward_profile();
    let calls = |op: &str| p.iter().find(|t| t.op == op).map_or(0, |t| t.calls);
    assert!(calls("matmul") == 2 && calls("unary") >= 1, "{p:?}");
    assert!(p.iter().all(|t| t.seconds >= 0.0) && p.windows(2).all(|w| w[0].seconds >= w[1].seconds), "{p:?}");
    vipo::autograd::profile_backward(false);
    run();
    assert!(vipo::autograd::backward_profile().is_empty());
}
