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

#[test]
fn checkpointed_blocks_give_the_same_gradients() {
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
