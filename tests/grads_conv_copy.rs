//! Backward of conv2d, nearest upsampling and the layout copies: CPU against central finite
//! differences, GPU against CPU (`check_grads`); conv2d's input and weight gradients also
//! against a float64 loop on the CPU, including the blocked and per-image-parallel paths.
mod common;
use common::*;
use vipo::{Device, Tensor};

// All these ops are linear in each input, so central differences are exact up to f32
// rounding of the loss (~1e-6 relative to the largest gradient at step 1e-2).
const FD_TOL: f64 = 2e-3;
const EPS: f32 = 1e-2;
// GPU sums in another order (tiles, stride phases, split reductions) than the GEMM crate.
const GPU_TOL: f64 = 2e-5;
// CPU gradients against float64 loops: sums of up to ~60k f32 products.
const F64_TOL: f64 = 2e-5;

/// (N, Cin, H, W), (Cout, KH, KW), stride, padding, bias.
type Case = ([usize; 4], [usize; 3], (usize, usize), (usize, usize), bool);

#[test]
fn conv2d_grads() {
    // Kernels 1x1, 3x3, 5x3; strides 1, 2, (2, 1), (1, 2); paddings 0, 1, (2, 1); GEMM dims not
    // multiples of 64 (and past one 64 tile); a 1x1 stride-2 kernel, whose odd-phase input
    // pixels get no tap at all; a reduction long enough for the GPU to split it.
    let cases: &[Case] = &[
        ([1, 3, 5, 7], [5, 1, 1], (1, 1), (0, 0), true),
        ([2, 5, 6, 7], [3, 1, 1], (2, 2), (0, 0), false),
        ([2, 3, 7, 6], [5, 3, 3], (1, 1), (1, 1), true),
        ([1, 5, 9, 8], [17, 3, 3], (2, 2), (1, 1), true),
        ([2, 3, 8, 7], [5, 5, 3], (2, 1), (2, 1), false),
        ([1, 17, 5, 6], [3, 5, 3], (1, 1), (2, 1), true),
        ([2, 3, 6, 5], [5, 3, 3], (1, 2), (0, 0), false),
        ([1, 3, 4, 3], [5, 3, 3], (2, 2), (2, 1), true),
        ([1, 70, 4, 5], [66, 3, 3], (1, 1), (1, 1), true),
        ([2, 3, 13, 12], [5, 3, 3], (1, 1), (1, 1), true),
    ];
    let mut worst = 0f64;
    for (ci, &(xs, [cout, kh, kw], stride, pad, with_bias)) in cases.iter().enumerate() {
        let seed = 700 + ci as u64;
        let ws = [cout, xs[1], kh, kw];
        let mut inputs = vec![(randn(numel(&xs), seed), xs.to_vec()), (randn(numel(&ws), seed + 1), ws.to_vec())];
        if with_bias {
            inputs.push((randn(cout, seed + 2), vec![cout]));
        }
        let what = format!("conv2d x{xs:?} w{ws:?} s{stride:?} p{pad:?} bias {with_bias}");
        let f = |t: &[Tensor]| t[0].conv2d(&t[1], t.get(2), stride, pad);
        worst = worst.max(check_grads(&what, seed, &inputs, &[], EPS, FD_TOL, GPU_TOL, f));
        // LoRA-style frozen weight: only the input (and bias) get gradients.
        worst = worst.max(check_grads(&format!("{what} frozen w"), seed, &inputs, &[1], EPS, FD_TOL, GPU_TOL, f));
        // Data input: only the parameters get gradients.
        worst = worst.max(check_grads(&format!("{what} frozen x"), seed, &inputs, &[0], EPS, FD_TOL, GPU_TOL, f));
    }
    eprintln!("conv2d grads: worst finite-difference error {worst:.2e}");
}

#[test]
fn conv2d_add_grads() {
    // Gradients of the fused epilogue's terms: temb gets dY summed over pixels, the residual dY;
    // strided and stride-1 (the GPU's fused input-gradient path) kernels; frozen weight as LoRA.
    use vipo::ops::conv2d::ConvAdd;
    type AddCase = ([usize; 4], [usize; 4], (usize, usize));
    let cases: &[AddCase] = &[([2, 3, 7, 6], [5, 3, 3, 3], (1, 1)), ([3, 4, 9, 8], [6, 4, 3, 3], (2, 2))];
    for (ci, &(xs, ws, stride)) in cases.iter().enumerate() {
        let seed = 790 + ci as u64;
        let oh = (xs[2] + 2 - 3) / stride.0 + 1;
        let ow = (xs[3] + 2 - 3) / stride.1 + 1;
        let ys = vec![xs[0], ws[0], oh, ow];
        let inputs = vec![
            (randn(numel(&xs), seed), xs.to_vec()),
            (randn(numel(&ws), seed + 1), ws.to_vec()),
            (randn(ws[0], seed + 2), vec![ws[0]]),
            (randn(xs[0] * ws[0], seed + 3), vec![xs[0], ws[0]]),
            (randn(numel(&ys), seed + 4), ys),
        ];
        let f = |t: &[Tensor]| {
            t[0].conv2d_add(&t[1], Some(&t[2]), stride, (1, 1), ConvAdd { temb: Some(&t[3]), residual: Some(&t[4]) })
        };
        let what = format!("conv2d_add x{xs:?} w{ws:?} s{stride:?}");
        check_grads(&what, seed, &inputs, &[], EPS, FD_TOL, GPU_TOL, f);
        check_grads(&format!("{what} frozen w, b"), seed, &inputs, &[1, 2], EPS, FD_TOL, GPU_TOL, f);
        check_grads(&format!("{what} frozen x, residual"), seed, &inputs, &[0, 4], EPS, FD_TOL, GPU_TOL, f);
    }
}

#[test]
fn conv2d_frozen_weight_and_untracked_inputs_record_nothing_extra() {
    let cpu = Device::Cpu;
    let x = Tensor::randn(&[1, 3, 5, 5], 1, &cpu).unwrap();
    let w = Tensor::randn(&[4, 3, 3, 3], 2, &cpu).unwrap();
    assert!(!x.conv2d(&w, None, (1, 1), (1, 1)).unwrap().is_tracked(), "nothing requires grad");
    let xt = x.requires_grad();
    let y = xt.conv2d(&w, None, (1, 1), (1, 1)).unwrap();
    assert!(y.is_tracked());
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(xt.grad().unwrap().shape(), &[1, 3, 5, 5]);
    assert!(w.grad().is_none());
}

/// Float64 loops for both gradients of `y = conv2d(x, w)` given dy.
#[allow(clippy::too_many_arguments)]
fn conv_grads_ref(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    dy: &[f32],
    stride: (usize, usize),
    pad: (usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let [n, cin, h, wd] = xs;
    let [cout, _, kh, kw] = ws;
    let oh = (h + 2 * pad.0 - kh) / stride.0 + 1;
    let ow = (wd + 2 * pad.1 - kw) / stride.1 + 1;
    let mut dx = vec![0f64; x.len()];
    let mut dw = vec![0f64; w.len()];
    for ni in 0..n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dy[((ni * cout + co) * oh + oy) * ow + ox] as f64;
                    for ci in 0..cin {
                        for ky in 0..kh {
                            let iy = (oy * stride.0 + ky) as isize - pad.0 as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride.1 + kx) as isize - pad.1 as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((ni * cin + ci) * h + iy as usize) * wd + ix as usize;
                                let wi = ((co * cin + ci) * kh + ky) * kw + kx;
                                dx[xi] += w[wi] as f64 * g;
                                dw[wi] += x[xi] as f64 * g;
                            }
                        }
                    }
                }
            }
        }
    }
    (dx.into_iter().map(|v| v as f32).collect(), dw.into_iter().map(|v| v as f32).collect())
}

#[test]
fn conv2d_grad_fns_match_f64_loop() {
    // Many small images (one rayon task each); images big enough for several CPU blocks of
    // output rows (K * OH * OW > 2^20 floats), strided and not, the last block shorter.
    let cases: &[Case] = &[
        ([4, 3, 6, 5], [5, 3, 3], (1, 1), (1, 1), false),
        ([5, 4, 3, 4], [3, 1, 1], (1, 1), (0, 0), false),
        ([1, 32, 80, 70], [2, 3, 3], (1, 1), (1, 1), false),
        ([2, 48, 130, 90], [2, 5, 3], (2, 1), (2, 1), false),
        // Stride 1: the GPU's input gradient is a flipped convolution, padding KH-1-PH ...
        ([2, 6, 9, 11], [7, 5, 3], (1, 1), (2, 0), false),
        // ... unless the padding reaches past the kernel (then the strided-phase kernel).
        ([1, 3, 4, 5], [4, 1, 1], (1, 1), (1, 1), false),
    ];
    let (mut worst_ref, mut worst_gpu) = (0f64, 0f64);
    for (ci, &(xs, [cout, kh, kw], stride, pad, _)) in cases.iter().enumerate() {
        let seed = 800 + ci as u64;
        let ws = [cout, xs[1], kh, kw];
        let oh = (xs[2] + 2 * pad.0 - kh) / stride.0 + 1;
        let ow = (xs[3] + 2 * pad.1 - kw) / stride.1 + 1;
        let ys = [xs[0], cout, oh, ow];
        let (x, w, dy) = (randn(numel(&xs), seed), randn(numel(&ws), seed + 1), randn(numel(&ys), seed + 2));
        let (want_dx, want_dw) = conv_grads_ref(&x, xs, &w, ws, &dy, stride, pad);
        let what = format!("conv2d x{xs:?} w{ws:?} s{stride:?} p{pad:?}");
        let dx = gpu_vs_cpu(
            &format!("{what} grad_input"),
            GPU_TOL,
            seed,
            &[(dy.clone(), ys.to_vec()), (w.clone(), ws.to_vec())],
            |t| t[0].conv2d_grad_input(&t[1], &xs, stride, pad),
        );
        let dw = gpu_vs_cpu(
            &format!("{what} grad_weight"),
            GPU_TOL,
            seed,
            &[(x.clone(), xs.to_vec()), (dy.clone(), ys.to_vec())],
            |t| t[0].conv2d_grad_weight(&t[1], &ws, stride, pad),
        );
        let (dx, dw) = (dx.to_vec().unwrap(), dw.to_vec().unwrap());
        assert_close(&format!("{what} dx cpu vs f64"), &dx, &want_dx, F64_TOL, seed);
        assert_close(&format!("{what} dw cpu vs f64"), &dw, &want_dw, F64_TOL, seed);
        worst_ref = worst_ref.max(rel_err(&dx, &want_dx)).max(rel_err(&dw, &want_dw));
        if let Some(dev) = gpu() {
            let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
            let gdx = t(&dy, &ys).conv2d_grad_input(&t(&w, &ws), &xs, stride, pad).unwrap();
            let gdw = t(&x, &xs).conv2d_grad_weight(&t(&dy, &ys), &ws, stride, pad).unwrap();
            worst_gpu = worst_gpu.max(rel_err(&gdx.to_vec().unwrap(), &dx)).max(rel_err(&gdw.to_vec().unwrap(), &dw));
        }
    }
    eprintln!("conv2d grad fns: max rel err cpu vs f64 {worst_ref:.2e}, gpu vs cpu {worst_gpu:.2e}");
}

#[test]
fn conv2d_grad_fns_reject_bad_shapes() {
    let cpu = Device::Cpu;
    let dy = Tensor::zeros(&[1, 4, 3, 3], &cpu).unwrap();
    let w = Tensor::zeros(&[4, 3, 3, 3], &cpu).unwrap();
    let e = dy.conv2d_grad_input(&w, &[1, 3, 6, 6], (1, 1), (1, 1)).unwrap_err().to_string();
    assert!(e.contains("grad_input") && e.contains("[1, 4, 3, 3]") && e.contains("[1, 4, 6, 6]"), "{e}");
    let x = Tensor::zeros(&[1, 3, 5, 5], &cpu).unwrap();
    let e = x.conv2d_grad_weight(&dy, &[4, 2, 3, 3], (1, 1), (0, 0)).unwrap_err().to_string();
    assert!(e.contains("[4, 2, 3, 3]"), "{e}");
}

#[test]
fn upsample_grads() {
    for (ci, (xs, f)) in
        [([2, 3, 4, 5], (2, 2)), ([1, 2, 3, 1], (3, 1)), ([1, 1, 1, 4], (1, 2)), ([3, 1, 2, 3], (2, 3))]
            .into_iter()
            .enumerate()
    {
        let seed = 900 + ci as u64;
        let what = format!("upsample_nearest {xs:?} x{f:?}");
        check_grads(&what, seed, &[(randn(numel(&xs), seed), xs.to_vec())], &[], EPS, FD_TOL, GPU_TOL, |t| {
            t[0].upsample_nearest(f.0, f.1)
        });
    }
    check_grads("upsample_nearest2x", 910, &[(randn(30, 910), vec![1, 2, 3, 5])], &[], EPS, FD_TOL, GPU_TOL, |t| {
        t[0].upsample_nearest2x()
    });
    let e = Tensor::zeros(&[1, 1, 3, 4], &Device::Cpu).unwrap().upsample_nearest_backward(2, 2).unwrap_err();
    assert!(e.to_string().contains("[1, 1, 3, 4]"), "{e}");
}

#[test]
fn permute_and_transpose_grads() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[7], &[0]),
        (&[3, 5], &[1, 0]),
        (&[1, 4], &[1, 0]),
        (&[2, 1, 5], &[2, 0, 1]),
        (&[3, 4, 5], &[1, 2, 0]),
        (&[2, 3, 1, 5], &[3, 1, 0, 2]),
        (&[1, 3, 4, 1], &[3, 0, 2, 1]),
    ];
    for (ci, &(shape, perm)) in cases.iter().enumerate() {
        let seed = 1000 + ci as u64;
        let what = format!("permute {shape:?} {perm:?}");
        check_grads(&what, seed, &[(randn(numel(shape), seed), shape.to_vec())], &[], EPS, FD_TOL, GPU_TOL, |t| {
            t[0].permute(perm)
        });
    }
    check_grads("transpose", 1010, &[(randn(60, 1010), vec![3, 1, 4, 5])], &[], EPS, FD_TOL, GPU_TOL, |t| {
        t[0].transpose(-1, 0)?.transpose(1, 2)
    });
}

#[test]
fn slice_and_pad_grads() {
    // (shape, axis, start, len)
    let cases: &[(&[usize], isize, usize, usize)] = &[
        (&[9], 0, 2, 5),
        (&[4, 7], 1, 3, 4),
        (&[4, 7], 0, 0, 1),
        (&[1, 6, 5], -2, 1, 3),
        (&[3, 5, 1], 1, 4, 1),
        (&[2, 3, 4, 5], 2, 1, 2),
        (&[2, 1, 4, 5], 3, 0, 5),
    ];
    for (ci, &(shape, axis, start, len)) in cases.iter().enumerate() {
        let seed = 1100 + ci as u64;
        let x = [(randn(numel(shape), seed), shape.to_vec())];
        check_grads(&format!("slice {shape:?} {axis} {start}+{len}"), seed, &x, &[], EPS, FD_TOL, GPU_TOL, |t| {
            t[0].slice(axis, start, len)
        });
        check_grads(&format!("narrow {shape:?}"), seed, &x, &[], EPS, FD_TOL, GPU_TOL, |t| {
            t[0].narrow(axis, start, len)
        });
        check_grads(&format!("pad_axis {shape:?} {axis}"), seed, &x, &[], EPS, FD_TOL, GPU_TOL, |t| {
            t[0].pad_axis(axis, start, len)
        });
    }
}

#[test]
fn pad_axis_matches_index_loop() {
    let shape = [2usize, 3, 4];
    let x = randn(24, 1150);
    let want: Vec<f32> = (0..2 * 6 * 4)
        .map(|i| {
            let (a, b, c) = (i / 24, (i / 4) % 6, i % 4);
            if (2..5).contains(&b) {
                x[(a * 3 + b - 2) * 4 + c]
            } else {
                0.0
            }
        })
        .collect();
    let got = gpu_vs_cpu("pad_axis", 0.0, 1150, &[(x.clone(), shape.to_vec())], |t| t[0].pad_axis(1, 2, 1));
    assert_eq!(got.shape(), &[2, 6, 4]);
    assert_eq!(got.to_vec().unwrap(), want);
}

#[test]
fn concat_grads() {
    // Shapes per input, and the axis.
    let cases: &[(&[&[usize]], isize)] = &[
        (&[&[3], &[5], &[1]], 0),
        (&[&[2, 3], &[2, 1], &[2, 4]], 1),
        (&[&[1, 4], &[3, 4]], 0),
        (&[&[2, 1, 5], &[2, 3, 5]], -2),
        (&[&[2, 3, 1, 2], &[2, 3, 2, 2], &[2, 3, 1, 2]], 2),
        (&[&[1, 2, 3, 1], &[1, 2, 3, 4]], 3),
    ];
    for (ci, &(shapes, axis)) in cases.iter().enumerate() {
        let seed = 1200 + ci as u64;
        let inputs: Vec<(Vec<f32>, Vec<usize>)> =
            shapes.iter().enumerate().map(|(k, s)| (randn(numel(s), seed + 10 * k as u64), s.to_vec())).collect();
        let f = |t: &[Tensor]| Tensor::concat(&t.iter().collect::<Vec<_>>(), axis);
        check_grads(&format!("concat {shapes:?} {axis}"), seed, &inputs, &[], EPS, FD_TOL, GPU_TOL, f);
        // One input frozen: it gets nothing, the others their slices.
        check_grads(&format!("concat {shapes:?} frozen 0"), seed, &inputs, &[0], EPS, FD_TOL, GPU_TOL, f);
    }
}

#[test]
fn broadcast_to_grads() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[1], &[6]),
        (&[4], &[3, 4]),
        (&[3, 1], &[3, 5]),
        (&[1, 5], &[2, 4, 5]),
        (&[2, 1, 3], &[2, 4, 3]),
        (&[1, 3, 1, 2], &[2, 3, 4, 2]),
        (&[5], &[1, 1, 5]),
        (&[2, 3], &[2, 3]),
    ];
    for (ci, &(src, dst)) in cases.iter().enumerate() {
        let seed = 1300 + ci as u64;
        check_grads(
            &format!("broadcast_to {src:?} -> {dst:?}"),
            seed,
            &[(randn(numel(src), seed), src.to_vec())],
            &[],
            EPS,
            FD_TOL,
            GPU_TOL,
            |t| t[0].broadcast_to(dst),
        );
    }
}

#[test]
fn copies_compose() {
    // A chain through every copy op, with one input used twice.
    let inputs = [(randn(24, 1400), vec![2, 3, 4]), (randn(6, 1401), vec![3, 2])];
    check_grads("copy chain", 1400, &inputs, &[], EPS, FD_TOL, GPU_TOL, |t| {
        let a = t[0].permute(&[2, 0, 1])?.slice(0, 1, 3)?; // (3, 2, 3)
        let b = t[1].transpose(0, 1)?.reshape_to(&[1, 2, 3])?.broadcast_to(&[3, 2, 3])?;
        let c = Tensor::concat(&[&a, &b, &a], 2)?; // (3, 2, 9)
        c.pad_axis(1, 1, 0)?.mul(&c.pad_axis(1, 0, 1)?)
    });
}

#[test]
fn timestep_embedding_records_nothing() {
    let t = Tensor::from_slice(&[1.0, 250.0, 999.0], &[3], &Device::Cpu).unwrap().requires_grad();
    let e = Tensor::timestep_embedding(&t, 8, true, 1.0, 10000.0).unwrap();
    assert!(!e.is_tracked(), "timestep_embedding must not record a gradient");
    if let Some(dev) = gpu() {
        let tg = t.detach().to(&dev).unwrap().requires_grad();
        assert!(!Tensor::timestep_embedding(&tg, 8, true, 1.0, 10000.0).unwrap().is_tracked());
    }
}
