//! conv2d, nearest upsampling, layout copies and the timestep embedding: GPU against the CPU
//! twin on awkward shapes, and the CPU against plain loops (float64 for the arithmetic ones).
mod common;
use common::*;
use vipo::{Device, Tensor};

// Conv sums up to 10809 products in f32 (in up to 16 split-K partials); the GPU (fma, K-order tiles) and the GEMM crate
// (its own blocking) round differently, both well inside this.
const CONV_TOL: f64 = 2e-5;

/// Row-major index of `coord` in `shape`.
fn lin(coord: &[usize], shape: &[usize]) -> usize {
    coord.iter().zip(shape).fold(0, |acc, (&c, &d)| acc * d + c)
}

/// Coordinates of element `i` of a contiguous `shape`.
fn coords(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        c[d] = i % shape[d];
        i /= shape[d];
    }
    c
}

/// Direct convolution in float64: x (N, Cin, H, W), w (Cout, Cin, KH, KW) -> (N, Cout, OH, OW).
fn conv_ref(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    b: Option<&[f32]>,
    stride: (usize, usize),
    pad: (usize, usize),
) -> (Vec<f32>, Vec<usize>) {
    let [n, cin, h, wd] = xs;
    let [cout, _, kh, kw] = ws;
    let oh = (h + 2 * pad.0 - kh) / stride.0 + 1;
    let ow = (wd + 2 * pad.1 - kw) / stride.1 + 1;
    let mut y = vec![0.0f32; n * cout * oh * ow];
    for ni in 0..n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = b.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride.0 + ky) as isize - pad.0 as isize;
                                let ix = (ox * stride.1 + kx) as isize - pad.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[lin(&[ni, ci, iy as usize, ix as usize], &xs)];
                                s += xv as f64 * w[lin(&[co, ci, ky, kx], &ws)] as f64;
                            }
                        }
                    }
                    y[lin(&[ni, co, oy, ox], &[n, cout, oh, ow])] = s as f32;
                }
            }
        }
    }
    (y, vec![n, cout, oh, ow])
}

#[test]
fn conv2d_gpu_vs_cpu_vs_f64_loop() {
    // (N, Cin, H, W), (Cout, KH, KW), stride, padding, bias. GEMM dims are not multiples of 64;
    // 1x1 direct, im2col with serial and parallel fills, per-image parallel batches, an output
    // row of height 1, and channel counts past one 64-row tile.
    type Case = ([usize; 4], [usize; 3], (usize, usize), (usize, usize), bool);
    let cases: &[Case] = &[
        ([1, 3, 7, 9], [5, 1, 1], (1, 1), (0, 0), true),
        ([2, 70, 5, 6], [3, 1, 1], (1, 1), (0, 0), false),
        ([2, 17, 12, 11], [70, 3, 3], (1, 1), (1, 1), true),
        ([2, 5, 9, 10], [17, 3, 3], (2, 2), (1, 1), false),
        ([1, 3, 8, 7], [5, 5, 3], (1, 2), (2, 1), true),
        ([2, 70, 5, 6], [3, 1, 1], (2, 2), (0, 0), false),
        ([1, 5, 3, 6], [17, 3, 3], (1, 1), (0, 0), true),
        ([2, 3, 5, 5], [70, 5, 3], (2, 1), (2, 1), false),
        ([1, 17, 20, 19], [70, 3, 3], (1, 1), (1, 1), true),
        ([3, 5, 1, 1], [3, 3, 3], (2, 1), (1, 1), true),
        ([1, 3, 6, 6], [5, 3, 3], (2, 2), (0, 0), false),
        // Big enough for the CPU's blocked path (output rows split across threads), with a
        // last block shorter than the others.
        ([1, 3, 53, 47], [5, 3, 3], (1, 1), (1, 1), true),
        ([1, 2, 70, 33], [3, 3, 1], (1, 1), (1, 0), false),
    ];
    let mut worst_gpu_cpu = 0f64;
    let mut worst_cpu_ref = 0f64;
    for (ci, &(xs, [cout, kh, kw], stride, pad, with_bias)) in cases.iter().enumerate() {
        let seed = 500 + ci as u64;
        let ws = [cout, xs[1], kh, kw];
        let x = randn(numel(&xs), seed);
        let w = randn(numel(&ws), seed + 1);
        let b = randn(cout, seed + 2);
        let mut inputs = vec![(x.clone(), xs.to_vec()), (w.clone(), ws.to_vec())];
        if with_bias {
            inputs.push((b.clone(), vec![cout]));
        }
        let what = format!("conv2d x{xs:?} w{ws:?} s{stride:?} p{pad:?} bias {with_bias}");
        let got = gpu_vs_cpu(&what, CONV_TOL, seed, &inputs, |t| t[0].conv2d(&t[1], t.get(2), stride, pad));
        let (want, shape) = conv_ref(&x, xs, &w, ws, with_bias.then_some(&b[..]), stride, pad);
        assert_eq!(got.shape(), &shape[..], "{what}");
        let g = got.to_vec().unwrap();
        assert_close(&format!("{what} cpu vs f64"), &g, &want, CONV_TOL, seed);
        worst_cpu_ref = worst_cpu_ref.max(rel_err(&g, &want));
        // Measured again only to report the worst case (gpu_vs_cpu asserted it).
        if let Some(dev) = gpu() {
            let gx = Tensor::from_slice(&x, &xs, &dev).unwrap();
            let gw = Tensor::from_slice(&w, &ws, &dev).unwrap();
            let gb = Tensor::from_slice(&b, &[cout], &dev).unwrap();
            let out = gx.conv2d(&gw, with_bias.then_some(&gb), stride, pad).unwrap();
            worst_gpu_cpu = worst_gpu_cpu.max(rel_err(&out.to_vec().unwrap(), &g));
        }
    }
    eprintln!("conv2d: max rel err cpu vs f64 {worst_cpu_ref:.2e}, gpu vs cpu {worst_gpu_cpu:.2e}");
}

#[test]
fn conv2d_every_tile_shape() {
    // The GPU forward picks its tile like matmul (rows = Cout, columns = pixels, batch =
    // images); one case per big tile, none a tile multiple, K = Cin*9 not a multiple of the K
    // step. The CPU path is checked against float64 loops above.
    type Case = ([usize; 4], usize, bool, (usize, usize));
    let cases: &[Case] = &[
        ([1, 2, 70, 70], 520, true, (128, 128)),
        ([2, 1, 33, 33], 1100, false, (128, 64)),
        ([3, 2, 60, 60], 130, true, (64, 128)),
        // Few output tiles and partial tiles both ways: K = 999 is one pass, K = 2700 split-K
        // (forward and input gradient; conv2d_split_k_gpu_vs_cpu_vs_f64_loop has more).
        ([1, 111, 5, 7], 70, true, (64, 64)),
        ([1, 300, 5, 7], 70, true, (64, 64)),
    ];
    for (ci, &(xs, cout, with_bias, tile)) in cases.iter().enumerate() {
        assert_eq!(vipo::ops::matmul::tile(cout, xs[2] * xs[3], xs[0]), tile, "{xs:?} -> {cout}");
        let seed = 700 + ci as u64;
        let ws = [cout, xs[1], 3, 3];
        let mut inputs = vec![(randn(numel(&xs), seed), xs.to_vec()), (randn(numel(&ws), seed + 1), ws.to_vec())];
        if with_bias {
            inputs.push((randn(cout, seed + 2), vec![cout]));
        }
        let what = format!("conv2d x{xs:?} w{ws:?} tile {tile:?}");
        gpu_vs_cpu(&what, CONV_TOL, seed, &inputs, |t| t[0].conv2d(&t[1], t.get(2), (1, 1), (1, 1)));
        // The stride-1 input gradient runs the same kernel with the roles swapped: dY shaped
        // like x, the weight (xs[1], cout, 3, 3), dX with `cout` channels, so the same tile.
        let wt = [xs[1], cout, 3, 3];
        let dx_shape = [xs[0], cout, xs[2], xs[3]];
        let inputs = [(randn(numel(&xs), seed + 3), xs.to_vec()), (randn(numel(&wt), seed + 4), wt.to_vec())];
        let what = format!("conv2d grad_input dy{xs:?} w{wt:?} tile {tile:?}");
        gpu_vs_cpu(&what, CONV_TOL, seed, &inputs, |t| t[0].conv2d_grad_input(&t[1], &dx_shape, (1, 1), (1, 1)));
    }
}

/// `y0` (N, Cout, OH, OW) plus, in float64, the epilogue's terms where given: [bias (Cout),
/// temb (N, Cout), residual (like y0)].
fn add_terms(y0: &[f32], ys: &[usize], [b, t, r]: [Option<&[f32]>; 3]) -> Vec<f32> {
    let (cout, ncol) = (ys[1], ys[2] * ys[3]);
    let term = |v: Option<&[f32]>, i: usize| v.map_or(0.0, |v| v[i] as f64);
    y0.iter()
        .enumerate()
        .map(|(i, &v)| {
            let (ni, co) = (i / (cout * ncol), (i / ncol) % cout);
            (v as f64 + term(b, co) + term(t, ni * cout + co) + term(r, i)) as f32
        })
        .collect()
}

#[test]
fn conv2d_add_epilogue_gpu_vs_cpu_vs_f64_loop() {
    // The fused epilogue (bias, per-image temb, residual, each on or off) against the f64
    // convolution plus the terms added in f64; one case per tile, strided and pointwise kernels.
    use vipo::ops::conv2d::ConvAdd;
    type Case = ([usize; 4], [usize; 4], (usize, usize), (usize, usize));
    let cases: &[Case] = &[
        ([2, 3, 7, 6], [5, 3, 3, 3], (1, 1), (1, 1)),
        ([3, 5, 9, 8], [17, 5, 3, 3], (2, 2), (1, 1)),
        ([2, 7, 5, 6], [3, 7, 1, 1], (1, 1), (0, 0)),
        ([1, 2, 70, 70], [130, 2, 3, 3], (1, 1), (1, 1)),
        ([2, 1, 33, 33], [1100, 1, 3, 3], (1, 1), (1, 1)),
    ];
    for (ci, &(xs, ws, stride, pad)) in cases.iter().enumerate() {
        for mask in 1..8u32 {
            let (with_b, with_t, with_r) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
            let seed = 760 + 10 * ci as u64 + mask as u64;
            let (x, w) = (randn(numel(&xs), seed), randn(numel(&ws), seed + 1));
            let (y0, ys) = conv_ref(&x, xs, &w, ws, None, stride, pad);
            let (n, cout) = (ys[0], ys[1]);
            let (b, t, r) = (randn(cout, seed + 2), randn(n * cout, seed + 3), randn(y0.len(), seed + 4));
            let terms = [with_b.then_some(&b[..]), with_t.then_some(&t[..]), with_r.then_some(&r[..])];
            let want = add_terms(&y0, &ys, terms);
            let inputs = vec![(x, xs.to_vec()), (w, ws.to_vec()), (b, vec![cout]), (t, vec![n, cout]), (r, ys.clone())];
            let what = format!("conv2d_add x{xs:?} w{ws:?} bias {with_b} temb {with_t} residual {with_r}");
            let got = gpu_vs_cpu(&what, CONV_TOL, seed, &inputs, |t| {
                let add = ConvAdd { temb: with_t.then(|| &t[3]), residual: with_r.then(|| &t[4]) };
                t[0].conv2d_add(&t[1], with_b.then(|| &t[2]), stride, pad, add)
            });
            assert_close(&what, &got.to_vec().unwrap(), &want, CONV_TOL, seed);
        }
    }
    // Wrong shapes of the added terms name them.
    let cpu = |s: &[usize]| Tensor::from_slice(&randn(numel(s), 5), s, &Device::Cpu).unwrap();
    let (x, w) = (cpu(&[2, 3, 5, 5]), cpu(&[4, 3, 3, 3]));
    let bad_t = cpu(&[1, 4]);
    let e = x.conv2d_add(&w, None, (1, 1), (1, 1), ConvAdd { temb: Some(&bad_t), residual: None }).unwrap_err();
    assert!(e.to_string().contains("temb [1, 4]"), "{e}");
    let bad_r = cpu(&[2, 4, 5, 4]);
    let e = x.conv2d_add(&w, None, (1, 1), (1, 1), ConvAdd { temb: None, residual: Some(&bad_r) }).unwrap_err();
    assert!(e.to_string().contains("residual [2, 4, 5, 4]") && e.to_string().contains("[2, 4, 5, 5]"), "{e}");
}

#[test]
fn conv2d_split_k_gpu_vs_cpu_vs_f64_loop() {
    // Layers with few output tiles and a long K run split-K on the GPU (partial products per
    // K range, then a sum that adds the epilogue's terms): forward with every epilogue term
    // on and off, and the stride-1 input gradient, against the CPU twin and float64 loops.
    // The cases cover 2 to 16 splits, a last split shorter than the others, batches, a
    // strided and a pointwise kernel; each asserts that it does take the split path.
    use vipo::ops::conv2d::ConvAdd;
    use vipo::ops::matmul::k_splits;
    type Case = ([usize; 4], [usize; 4], (usize, usize), (usize, usize), (usize, usize));
    let cases: &[Case] = &[
        // (x, w, stride, pad, (splits, chunk))
        ([1, 300, 5, 7], [70, 300, 3, 3], (1, 1), (1, 1), (5, 544)),
        ([2, 130, 9, 6], [45, 130, 3, 3], (2, 2), (1, 1), (2, 592)),
        ([1, 1500, 6, 5], [33, 1500, 1, 1], (1, 1), (0, 0), (2, 752)),
        ([1, 1201, 4, 3], [20, 1201, 3, 3], (1, 1), (1, 1), (16, 688)),
        ([3, 200, 6, 5], [40, 200, 3, 3], (1, 1), (1, 1), (3, 608)),
    ];
    for (ci, &(xs, ws, stride, pad, split)) in cases.iter().enumerate() {
        let seed = 1900 + 10 * ci as u64;
        let (x, w) = (randn(numel(&xs), seed), randn(numel(&ws), seed + 1));
        let (y0, ys) = conv_ref(&x, xs, &w, ws, None, stride, pad);
        let (n, cout, ncol) = (ys[0], ys[1], ys[2] * ys[3]);
        let t = vipo::ops::matmul::tile(cout, ncol, n);
        let tiles = cout.div_ceil(t.0) * ncol.div_ceil(t.1) * n;
        assert_eq!(k_splits(tiles, ws[1] * ws[2] * ws[3]), Some(split), "x{xs:?} w{ws:?}");
        let (b, tv, r) = (randn(cout, seed + 2), randn(n * cout, seed + 3), randn(y0.len(), seed + 4));
        for mask in [0u32, 1, 6, 7] {
            let (with_b, with_t, with_r) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
            let terms = [with_b.then_some(&b[..]), with_t.then_some(&tv[..]), with_r.then_some(&r[..])];
            let want = add_terms(&y0, &ys, terms);
            let inputs = vec![
                (x.clone(), xs.to_vec()),
                (w.clone(), ws.to_vec()),
                (b.clone(), vec![cout]),
                (tv.clone(), vec![n, cout]),
                (r.clone(), ys.clone()),
            ];
            let what = format!("split-K conv2d x{xs:?} w{ws:?} bias {with_b} temb {with_t} residual {with_r}");
            let got = gpu_vs_cpu(&what, CONV_TOL, seed + mask as u64, &inputs, |t| {
                let add = ConvAdd { temb: with_t.then(|| &t[3]), residual: with_r.then(|| &t[4]) };
                t[0].conv2d_add(&t[1], with_b.then(|| &t[2]), stride, pad, add)
            });
            assert_close(&what, &got.to_vec().unwrap(), &want, CONV_TOL, seed);
        }
        // The stride-1 input gradient: dY (N, Cout', H, W) with the weight (Cout', Cin', KH, KW)
        // makes dX of Cin' channels over K = Cout' * KH * KW, as many tiles as this forward.
        if stride == (1, 1) {
            let wt = [xs[1], cout, ws[2], ws[3]];
            let dx_shape = [xs[0], cout, xs[2], xs[3]];
            assert_eq!(k_splits(tiles, xs[1] * ws[2] * ws[3]), Some(split), "grad_input w{wt:?}");
            let inputs = [(randn(numel(&xs), seed + 5), xs.to_vec()), (randn(numel(&wt), seed + 6), wt.to_vec())];
            let what = format!("split-K conv2d grad_input dy{xs:?} w{wt:?}");
            gpu_vs_cpu(&what, CONV_TOL, seed + 5, &inputs, |t| t[0].conv2d_grad_input(&t[1], &dx_shape, (1, 1), pad));
        }
    }
    // One pass where the output has enough tiles, or K is too short to share.
    assert_eq!(k_splits(vipo::ops::matmul::BIG_TILE_GROUPS, 100_000), None);
    assert_eq!(k_splits(4, 1023), None);
    // The GPU's own record of what ran (timestamps, which lavapipe has): the split kernels,
    // so the cases above did not pass through the one-pass kernel.
    let Some(dev) = gpu() else { return };
    let Device::Gpu(ctx) = &dev else { panic!("gpu() gave {dev}") };
    if !ctx.gpu_timer_start() {
        assert!(!ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY), "timestamps exist but the timer refused");
        return;
    }
    let (xs, ws) = ([1, 300, 5, 7], [70, 300, 3, 3]);
    let x = Tensor::from_slice(&randn(numel(&xs), 1), &xs, &dev).unwrap();
    let w = Tensor::from_slice(&randn(numel(&ws), 2), &ws, &dev).unwrap();
    x.conv2d(&w, None, (1, 1), (1, 1)).unwrap().to_vec().unwrap();
    // dY = x with a (300, 70, 3, 3) weight: dX (1, 70, 5, 7) over K = 2700.
    let wt = Tensor::from_slice(&randn(numel(&ws), 3), &[300, 70, 3, 3], &dev).unwrap();
    x.conv2d_grad_input(&wt, &[1, 70, 5, 7], (1, 1), (1, 1)).unwrap().to_vec().unwrap();
    let ran: Vec<String> =
        ctx.gpu_timer_stop().unwrap().kernels.iter().map(|k| format!("{}/{}", k.shader, k.entry)).collect();
    for want in ["conv2d_fwd_64x64/main_split", "conv2d_fwd_64x64/grad_input_s1_split", "conv2d_split/main"] {
        assert!(ran.iter().any(|r| r == want), "{want} did not run: {ran:?}");
    }
}

/// (N, Cin, H, W), Cout, stride of the f16 tests: one per GPU tile (as in
/// `conv2d_every_tile_shape`) and a strided one; 3x3 kernels, padding 1. Split-K: the
/// 300-channel input's forward (K = 2700) and the 300-channel output's input gradient.
const F16_CASES: &[([usize; 4], usize, (usize, usize))] = &[
    ([1, 2, 70, 70], 520, (1, 1)),
    ([2, 1, 33, 33], 1100, (1, 1)),
    ([3, 2, 60, 60], 130, (1, 1)),
    ([1, 300, 5, 7], 70, (1, 1)),
    ([1, 70, 5, 7], 300, (1, 1)),
    ([2, 5, 9, 8], 17, (2, 2)),
];

#[test]
fn conv2d_f16_input_and_weight_every_tile() {
    // f16 storage, f32 arithmetic: GPU f16 kernels against the CPU twin (the same f16 values
    // widened) and the CPU against float64 on the rounded values; the epilogue stays f32.
    use vipo::ops::conv2d::ConvAdd;
    use vipo::DType;
    for (ci, &(xs, cout, stride)) in F16_CASES.iter().enumerate() {
        let seed = 1700 + ci as u64;
        let ws = [cout, xs[1], 3, 3];
        let half =
            |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        let (x, w) = (half(&randn(numel(&xs), seed), &xs), half(&randn(numel(&ws), seed + 1), &ws));
        let b = Tensor::from_slice(&randn(cout, seed + 2), &[cout], &Device::Cpu).unwrap();
        let want = x.conv2d(&w, Some(&b), stride, (1, 1)).unwrap();
        assert_eq!(want.dtype(), DType::F32);
        let (x16, w16) = (x.to_vec().unwrap(), w.to_vec().unwrap());
        let (reference, _) = conv_ref(&x16, xs, &w16, ws, Some(&b.to_vec().unwrap()), stride, (1, 1));
        let what = format!("f16 conv2d x{xs:?} w{ws:?} s{stride:?}");
        assert_close(&format!("{what} cpu vs f64"), &want.to_vec().unwrap(), &reference, CONV_TOL, seed);
        if let Some(g) = gpu_f16() {
            let to = |t: &Tensor| t.to(&g).unwrap();
            let got = to(&x).conv2d(&to(&w), Some(&to(&b)), stride, (1, 1)).unwrap();
            assert_close(
                &format!("{what} gpu vs cpu"),
                &got.to_vec().unwrap(),
                &want.to_vec().unwrap(),
                CONV_TOL,
                seed,
            );
            // With the residual epilogue too.
            let r = to(&want);
            let add = ConvAdd { temb: None, residual: Some(&r) };
            let got2 = to(&x).conv2d_add(&to(&w), None, stride, (1, 1), add).unwrap().to_vec().unwrap();
            let w_vec = want.to_vec().unwrap();
            let b_vec = b.to_vec().unwrap();
            let plane = want.shape()[2] * want.shape()[3];
            let want2: Vec<f32> = w_vec.iter().enumerate().map(|(i, &v)| 2.0 * v - b_vec[(i / plane) % cout]).collect();
            assert_close(&format!("{what} + residual gpu"), &got2, &want2, CONV_TOL, seed);
        }
    }
    let x = Tensor::from_slice(&randn(2 * 3 * 25, 1), &[2, 3, 5, 5], &Device::Cpu).unwrap();
    let w = Tensor::from_slice(&randn(4 * 27, 2), &[4, 3, 3, 3], &Device::Cpu).unwrap();
    let e = x.to_dtype(DType::F16).unwrap().conv2d(&w, None, (1, 1), (1, 1)).unwrap_err().to_string();
    assert!(e.contains("f16 x f32"), "{e}");
}

/// The convolution as f16 arithmetic computes it: x and w rounded to f16, the im2col K axis
/// (ci, ky, kx) cut in steps of `bk`, each step's products summed in f16 (`fused`: one rounding
/// per multiply-add; else the product rounded, then the sum), the steps summed in f32.
#[allow(clippy::too_many_arguments)]
fn conv_f16_math_ref(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    stride: (usize, usize),
    pad: (usize, usize),
    bk: usize,
    fused: bool,
) -> Vec<f32> {
    use half::f16;
    let h16 = |v: f32| f16::from_f32(v).to_f64();
    let (x, w): (Vec<f64>, Vec<f64>) = (x.iter().map(|&v| h16(v)).collect(), w.iter().map(|&v| h16(v)).collect());
    let [n, cin, h, wd] = xs;
    let [cout, _, kh, kw] = ws;
    let oh = (h + 2 * pad.0 - kh) / stride.0 + 1;
    let ow = (wd + 2 * pad.1 - kw) / stride.1 + 1;
    let k = cin * kh * kw;
    let mut y = vec![0.0f32; n * cout * oh * ow];
    for ni in 0..n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut acc, mut part) = (0f32, 0f64);
                    for kidx in 0..k {
                        let (ci, ky, kx) = (kidx / (kh * kw), (kidx / kw) % kh, kidx % kw);
                        let iy = (oy * stride.0 + ky) as isize - pad.0 as isize;
                        let ix = (ox * stride.1 + kx) as isize - pad.1 as isize;
                        if iy >= 0 && ix >= 0 && iy < h as isize && ix < wd as isize {
                            let xv = x[lin(&[ni, ci, iy as usize, ix as usize], &xs)];
                            let prod = xv * w[lin(&[co, ci, ky, kx], &ws)];
                            let prod = if fused { prod } else { f16::from_f64(prod).to_f64() };
                            part = f16::from_f64(prod + part).to_f64();
                        }
                        if kidx % bk == bk - 1 || kidx == k - 1 {
                            acc += part as f32;
                            part = 0.0;
                        }
                    }
                    y[lin(&[ni, co, oy, ox], &[n, cout, oh, ow])] = acc;
                }
            }
        }
    }
    y
}

/// The GPU's result against the nearer of the two emulated roundings (1e-4: the split-K
/// partials are summed in another f32 order), and further from exact than f32 arithmetic.
#[track_caller]
fn assert_f16_math(what: &str, got: &[f32], emulate: impl Fn(bool) -> Vec<f32>, exact: &[f32], seed: u64) {
    let (fused, unfused) = (emulate(true), emulate(false));
    let (e_f, e_u, e_x) = (rel_err(got, &fused), rel_err(got, &unfused), rel_err(got, exact));
    eprintln!("{what}: vs fused f16 {e_f:.2e}, unfused {e_u:.2e}, exact {e_x:.2e}");
    assert_close(
        &format!("{what} vs emulated f16 arithmetic"),
        got,
        if e_f <= e_u { &fused } else { &unfused },
        1e-4,
        seed,
    );
    assert!(e_x > 1e-5, "{what}: as exact as f32 arithmetic ({e_x:.2e}): f16 math did not run");
}

#[test]
fn conv2d_f16_arithmetic_every_tile_split_and_input_gradient() {
    // Opt-in f16 arithmetic on a private context (the switch would change the other tests'
    // f16 results): the forward with f16 input and weight, with an f32 input and an f16 weight,
    // and the stride-1 input gradient through an f16 weight (dY rounded to f16), every tile and
    // the split-K cases of F16_CASES, against an emulation of that arithmetic.
    use vipo::DType;
    let Some(shared) = gpu_f16() else {
        eprintln!("no GPU with SHADER_F16: skipped");
        return;
    };
    let dev = Device::open_private(shared.gpu().unwrap().index).unwrap();
    dev.gpu().unwrap().set_f16_math(true);
    let bk = |m: usize, n: usize, batch: usize| if vipo::ops::matmul::tile(m, n, batch) == (64, 64) { 16 } else { 8 };
    let r16 = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect::<Vec<_>>();
    for (ci, &(xs, cout, stride)) in F16_CASES.iter().enumerate() {
        let seed = 1900 + ci as u64;
        let ws = [cout, xs[1], 3, 3];
        let (xv, wv) = (randn(numel(&xs), seed), randn(numel(&ws), seed + 1));
        let w16 = Tensor::from_slice(&wv, &ws, &dev).unwrap().to_dtype(DType::F16).unwrap();
        let (exact, ys) = conv_ref(&r16(&xv), xs, &r16(&wv), ws, None, stride, (1, 1));
        let fb = bk(cout, ys[2] * ys[3], xs[0]);
        for x_half in [true, false] {
            let x = Tensor::from_slice(&xv, &xs, &dev).unwrap();
            let x = if x_half { x.to_dtype(DType::F16).unwrap() } else { x.requires_grad() };
            let what = format!("f16-math conv2d x{xs:?} w{ws:?} s{stride:?} f16 x {x_half}");
            let y = x.conv2d(&w16, None, stride, (1, 1)).unwrap();
            let emulate = |fused| conv_f16_math_ref(&xv, xs, &wv, ws, stride, (1, 1), fb, fused);
            assert_f16_math(&what, &y.to_vec().unwrap(), emulate, &exact, seed);
            if x_half || stride != (1, 1) {
                continue;
            }
            // dX = conv(dY, W') with W'[ci, co, ky, kx] = W[co, ci, 2 - ky, 2 - kx], padding 1.
            let dyv = randn(y.numel(), seed + 2);
            let dy = Tensor::from_slice(&dyv, y.shape(), &dev).unwrap();
            y.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = x.grad().unwrap().to_vec().unwrap();
            let wt_s = [xs[1], cout, 3, 3];
            let mut wt = vec![0f32; wv.len()];
            for (i, v) in wt.iter_mut().enumerate() {
                let c = coords(i, &wt_s);
                *v = wv[lin(&[c[1], c[0], 2 - c[2], 2 - c[3]], &ws)];
            }
            let dys = [ys[0], ys[1], ys[2], ys[3]];
            let (exact_dx, _) = conv_ref(&r16(&dyv), dys, &r16(&wt), wt_s, None, (1, 1), (1, 1));
            let gb = bk(xs[1], xs[2] * xs[3], xs[0]);
            let emulate = |fused| conv_f16_math_ref(&dyv, dys, &wt, wt_s, (1, 1), (1, 1), gb, fused);
            assert_f16_math(&format!("{what} input gradient"), &dx, emulate, &exact_dx, seed);
        }
    }
}

#[test]
fn conv2d_with_an_f16_weight_is_the_f32_conv_of_its_rounding() {
    // A frozen f16-stored weight read as f16 (f32 input): forward and the input gradient
    // (stride 1: the fused kernel reads the f16 weight; strided: widened for the phase
    // kernel) equal the f32 path on the rounded weight bit for bit, every tile.
    use vipo::DType;
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu_f16());
    for dev in devs {
        for (ci, &(xs, cout, stride)) in F16_CASES.iter().enumerate() {
            let seed = 1800 + ci as u64;
            let ws = [cout, xs[1], 3, 3];
            let x = Tensor::from_slice(&randn(numel(&xs), seed), &xs, &dev).unwrap().requires_grad();
            let w16 =
                Tensor::from_slice(&randn(numel(&ws), seed + 1), &ws, &dev).unwrap().to_dtype(DType::F16).unwrap();
            let w32 = w16.to_dtype(DType::F32).unwrap();
            let what = format!("conv2d f16 weight x{xs:?} w{ws:?} s{stride:?} on {dev}");
            let got = x.conv2d(&w16, None, stride, (1, 1)).unwrap();
            let want = x.conv2d(&w32, None, stride, (1, 1)).unwrap();
            assert!(got.to_vec().unwrap() == want.to_vec().unwrap(), "{what}: not the f32 result");
            let dy = Tensor::from_slice(&randn(got.numel(), seed + 2), got.shape(), &dev).unwrap();
            got.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            let g16 = x.grad().unwrap().to_vec().unwrap();
            x.zero_grad();
            want.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g16 == x.grad().unwrap().to_vec().unwrap(), "{what}: dX differs");
        }
    }
}

#[test]
fn conv2d_rejects_bad_arguments() {
    let cpu = Device::Cpu;
    let x = Tensor::zeros(&[1, 3, 4, 4], &cpu).unwrap();
    let w = Tensor::zeros(&[5, 3, 3, 3], &cpu).unwrap();
    let err = |r: vipo::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(x.conv2d(&Tensor::zeros(&[5, 2, 3, 3], &cpu).unwrap(), None, (1, 1), (0, 0)));
    assert!(e.contains("conv2d") && e.contains("[1, 3, 4, 4]") && e.contains("[5, 2, 3, 3]"), "{e}");
    let e = err(x.conv2d(&Tensor::zeros(&[5, 3, 7, 3], &cpu).unwrap(), None, (1, 1), (1, 1)));
    assert!(e.contains("larger than the padded input"), "{e}");
    let e = err(x.conv2d(&w, Some(&Tensor::zeros(&[4], &cpu).unwrap()), (1, 1), (0, 0)));
    assert!(e.contains("bias") && e.contains("[4]"), "{e}");
    let e = err(x.conv2d(&w, None, (0, 1), (0, 0)));
    assert!(e.contains("stride"), "{e}");
    let e = err(x.reshape(&[3, 4, 4]).unwrap().conv2d(&w, None, (1, 1), (0, 0)));
    assert!(e.contains("(N, Cin, H, W)"), "{e}");
    // A kernel exactly as large as the padded input is fine: a 1x1 output.
    let y = x.conv2d(&Tensor::zeros(&[5, 3, 6, 6], &cpu).unwrap(), None, (1, 1), (1, 1));
    assert_eq!(y.unwrap().shape(), &[1, 5, 1, 1]);
    if let Some(g) = gpu() {
        let e = err(x.conv2d(&w.to(&g).unwrap(), None, (1, 1), (0, 0)));
        assert!(e.contains("different devices"), "{e}");
    }
}

#[test]
fn upsample_nearest_gpu_vs_cpu_vs_loop() {
    for (k, shape) in [[2usize, 3, 5, 7], [1, 1, 1, 1], [1, 4, 1, 3], [3, 2, 33, 17]].iter().enumerate() {
        let seed = 700 + k as u64;
        let x = randn(numel(shape), seed);
        let got = gpu_vs_cpu(&format!("upsample {shape:?}"), 0.0, seed, &[(x.clone(), shape.to_vec())], |t| {
            t[0].upsample_nearest2x()
        });
        let [n, c, h, w] = *shape;
        assert_eq!(got.shape(), &[n, c, 2 * h, 2 * w]);
        let g = got.to_vec().unwrap();
        for (i, &v) in g.iter().enumerate() {
            let [a, b, oy, ox] = coords(i, got.shape())[..] else { unreachable!() };
            assert_eq!(v, x[lin(&[a, b, oy / 2, ox / 2], shape)], "{shape:?} at {i}");
        }
    }
    let e = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap().upsample_nearest2x().unwrap_err().to_string();
    assert!(e.contains("upsample") && e.contains("[2, 3]"), "{e}");
}

#[test]
fn permute_and_transpose_match_index_loops() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[7], &[0]),
        (&[3, 1, 5], &[2, 0, 1]),
        (&[2, 3, 4, 5], &[0, 2, 1, 3]),
        (&[1, 4, 1, 3, 2], &[4, 2, 0, 3, 1]),
        (&[2, 1, 3], &[1, 0, 2]),
        (&[3, 2, 1, 4, 5], &[4, 3, 2, 1, 0]),
        (&[9, 70], &[1, 0]),
        // Past the CPU's parallel threshold.
        (&[8, 64, 9, 8], &[0, 2, 1, 3]),
    ];
    for (k, &(shape, perm)) in cases.iter().enumerate() {
        let seed = 800 + k as u64;
        let x = randn(numel(shape), seed);
        let got = gpu_vs_cpu(&format!("permute {shape:?} {perm:?}"), 0.0, seed, &[(x.clone(), shape.to_vec())], |t| {
            t[0].permute(perm)
        });
        let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        assert_eq!(got.shape(), &out[..]);
        let g = got.to_vec().unwrap();
        for (i, &v) in g.iter().enumerate() {
            let oc = coords(i, &out);
            let mut ic = vec![0; shape.len()];
            for (d, &p) in perm.iter().enumerate() {
                ic[p] = oc[d];
            }
            assert_eq!(v, x[lin(&ic, shape)], "permute {shape:?} {perm:?} at {i}");
        }
    }
    let shape = [3, 4, 5];
    let x = randn(60, 850);
    let got = gpu_vs_cpu("transpose", 0.0, 850, &[(x.clone(), shape.to_vec())], |t| t[0].transpose(-1, 0));
    assert_eq!(got.shape(), &[5, 4, 3]);
    let g = got.to_vec().unwrap();
    for (i, &v) in g.iter().enumerate() {
        let c = coords(i, &[5, 4, 3]);
        assert_eq!(v, x[lin(&[c[2], c[1], c[0]], &shape)]);
    }
    let t = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap();
    for bad in [&[0usize, 0][..], &[0], &[0, 2], &[1, 0, 2]] {
        let e = t.permute(bad).unwrap_err().to_string();
        assert!(e.contains("permute") && e.contains("[2, 3]"), "{e}");
    }
    assert!(t.transpose(0, 2).is_err());
}

#[test]
fn slice_matches_index_loop() {
    // (shape, axis, start, len)
    let cases: &[(&[usize], isize, usize, usize)] = &[
        (&[10], 0, 3, 5),
        (&[5, 7, 3], 1, 2, 4),
        (&[5, 7, 3], -1, 2, 1),
        (&[5, 7, 3], 0, 4, 1),
        (&[2, 1, 3, 4, 2], 3, 1, 2),
        (&[2, 1, 3, 4, 2], 1, 0, 1),
        (&[4, 9], 1, 0, 0),
        (&[3, 130, 100], 1, 7, 111),
    ];
    for (k, &(shape, axis, start, len)) in cases.iter().enumerate() {
        let seed = 900 + k as u64;
        let x = randn(numel(shape), seed);
        let ax = axis.rem_euclid(shape.len() as isize) as usize;
        let mut out = shape.to_vec();
        out[ax] = len;
        let what = format!("slice {shape:?} axis {axis} {start}+{len}");
        let got = if numel(&out) == 0 {
            let t = Tensor::from_slice(&x, shape, &Device::Cpu).unwrap();
            t.slice(axis, start, len).unwrap()
        } else {
            gpu_vs_cpu(&what, 0.0, seed, &[(x.clone(), shape.to_vec())], |t| t[0].narrow(axis, start, len))
        };
        assert_eq!(got.shape(), &out[..], "{what}");
        let g = got.to_vec().unwrap();
        for (i, &v) in g.iter().enumerate() {
            let mut c = coords(i, &out);
            c[ax] += start;
            assert_eq!(v, x[lin(&c, shape)], "{what} at {i}");
        }
    }
    let t = Tensor::zeros(&[4, 5], &Device::Cpu).unwrap();
    let e = t.slice(1, 3, 3).unwrap_err().to_string();
    assert!(e.contains("slice") && e.contains("[4, 5]"), "{e}");
    assert!(t.slice(2, 0, 1).is_err());
    assert!(t.slice(0, usize::MAX, 2).is_err());
    assert_eq!(t.slice(-1, 0, 5).unwrap().shape(), &[4, 5]);
}

#[test]
fn concat_matches_index_loop() {
    // (shapes, axis)
    let cases: &[(&[&[usize]], isize)] = &[
        (&[&[4], &[7], &[1]], 0),
        (&[&[2, 3, 4], &[2, 1, 4], &[2, 5, 4]], 1),
        (&[&[2, 3, 4], &[1, 3, 4]], 0),
        (&[&[3, 2], &[3, 5]], -1),
        (&[&[2, 1, 3, 1, 2], &[2, 1, 4, 1, 2], &[2, 1, 1, 1, 2]], 2),
        (&[&[2, 3, 4], &[2, 0, 4], &[2, 2, 4]], 1),
        (&[&[2, 40, 300], &[2, 17, 300]], 1),
    ];
    for (k, &(shapes, axis)) in cases.iter().enumerate() {
        let seed = 1000 + k as u64;
        let inputs: Vec<(Vec<f32>, Vec<usize>)> =
            shapes.iter().enumerate().map(|(j, s)| (randn(numel(s), seed * 10 + j as u64), s.to_vec())).collect();
        let what = format!("concat {shapes:?} axis {axis}");
        let got = gpu_vs_cpu(&what, 0.0, seed, &inputs, |t| {
            let refs: Vec<&Tensor> = t.iter().collect();
            Tensor::concat(&refs, axis)
        });
        let ax = axis.rem_euclid(shapes[0].len() as isize) as usize;
        let mut out = shapes[0].to_vec();
        out[ax] = shapes.iter().map(|s| s[ax]).sum();
        assert_eq!(got.shape(), &out[..], "{what}");
        let g = got.to_vec().unwrap();
        for (i, &v) in g.iter().enumerate() {
            let mut c = coords(i, &out);
            let mut j = 0;
            while c[ax] >= shapes[j][ax] {
                c[ax] -= shapes[j][ax];
                j += 1;
            }
            assert_eq!(v, inputs[j].0[lin(&c, shapes[j])], "{what} at {i}");
        }
    }
    let cpu = Device::Cpu;
    let a = Tensor::zeros(&[2, 3], &cpu).unwrap();
    let b = Tensor::zeros(&[3, 3], &cpu).unwrap();
    let e = Tensor::concat(&[&a, &b], 1).unwrap_err().to_string();
    assert!(e.contains("concat") && e.contains("[3, 3]"), "{e}");
    assert!(Tensor::concat(&[&a, &b], 0).is_ok());
    assert!(Tensor::concat(&[&a, &b], 2).is_err());
    assert!(Tensor::concat(&[], 0).is_err());
    let c = Tensor::zeros(&[2], &cpu).unwrap();
    assert!(Tensor::concat(&[&a, &c], 0).is_err());
    if let Some(g) = gpu() {
        let ag = a.to(&g).unwrap();
        let e = Tensor::concat(&[&ag, &a], 0).unwrap_err().to_string();
        assert!(e.contains("different devices"), "{e}");
    }
}

#[test]
fn broadcast_to_matches_index_loop() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[3, 1, 5], &[2, 3, 4, 5]),
        (&[1], &[7, 3]),
        (&[4], &[2, 1, 4]),
        (&[1, 1], &[1, 1]),
        (&[2, 1, 3, 1, 1], &[2, 4, 3, 2, 5]),
        (&[1, 70], &[600, 70]),
    ];
    for (k, &(src, dst)) in cases.iter().enumerate() {
        let seed = 1100 + k as u64;
        let x = randn(numel(src), seed);
        let what = format!("broadcast_to {src:?} -> {dst:?}");
        let got = gpu_vs_cpu(&what, 0.0, seed, &[(x.clone(), src.to_vec())], |t| t[0].broadcast_to(dst));
        assert_eq!(got.shape(), dst, "{what}");
        let g = got.to_vec().unwrap();
        let lead = dst.len() - src.len();
        for (i, &v) in g.iter().enumerate() {
            let c = coords(i, dst);
            let sc: Vec<usize> = (0..src.len()).map(|d| if src[d] == 1 { 0 } else { c[d + lead] }).collect();
            assert_eq!(v, x[lin(&sc, src)], "{what} at {i}");
        }
    }
    let t = Tensor::zeros(&[3, 2], &Device::Cpu).unwrap();
    for bad in [&[3usize][..], &[3, 4], &[2, 6, 2]] {
        let e = t.broadcast_to(bad).unwrap_err().to_string();
        assert!(e.contains("broadcast_to") && e.contains("[3, 2]"), "{e}");
    }
}

/// diffusers' `get_timestep_embedding` with PyTorch's f32 frequencies and arguments and
/// float64 sin/cos; `f32_steps = false` does everything in float64 instead.
fn timestep_ref(t: &[f32], dim: usize, flip: bool, shift: f32, f32_steps: bool) -> Vec<f32> {
    let half = dim / 2;
    let mut y = vec![0.0f32; t.len() * dim];
    for (r, &tv) in t.iter().enumerate() {
        for j in 0..half {
            let a = if f32_steps {
                let scale = -(10000f64.ln()) as f32;
                let f = (scale * j as f32 / (half as f32 - shift)).exp();
                (tv * f) as f64
            } else {
                tv as f64 * (-(10000f64.ln()) * j as f64 / (half as f64 - shift as f64)).exp()
            };
            let (first, second) = if flip { (a.cos(), a.sin()) } else { (a.sin(), a.cos()) };
            y[r * dim + j] = first as f32;
            y[r * dim + half + j] = second as f32;
        }
    }
    y
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
}

#[test]
fn timestep_embedding_matches_f64_loop() {
    let t = vec![0.0f32, 1.0, 37.5, 999.0];
    let (mut cpu_ref, mut gpu_cpu, mut f32_vs_f64) = (0f64, 0f64, 0f64);
    for dim in [32usize, 33, 320] {
        for flip in [false, true] {
            for shift in [0.0f32, 1.0] {
                let what = format!("timestep dim {dim} flip {flip} shift {shift}");
                let got = gpu_vs_cpu(&what, 2e-6, dim as u64, &[(t.clone(), vec![4])], |x| {
                    Tensor::timestep_embedding(&x[0], dim, flip, shift, 10000.0)
                });
                assert_eq!(got.shape(), &[4, dim]);
                let g = got.to_vec().unwrap();
                let want = timestep_ref(&t, dim, flip, shift, true);
                let e = max_abs(&g, &want);
                assert!(e <= 1e-6, "{what}: cpu vs f64 loop max abs {e:.2e}");
                cpu_ref = cpu_ref.max(e);
                if dim % 2 == 1 {
                    assert!((0..4).all(|r| g[r * dim + dim - 1] == 0.0), "{what}: pad");
                }
                if let Some(dev) = gpu() {
                    let tg = Tensor::from_slice(&t, &[4], &dev).unwrap();
                    let out = Tensor::timestep_embedding(&tg, dim, flip, shift, 10000.0).unwrap();
                    gpu_cpu = gpu_cpu.max(max_abs(&out.to_vec().unwrap(), &g));
                }
                // PyTorch's f32 rounding of the frequency and argument costs up to
                // ~ulp(1000) radians against an all-float64 computation.
                let e64 = max_abs(&g, &timestep_ref(&t, dim, flip, shift, false));
                assert!(e64 <= 5e-4, "{what}: vs all-f64 {e64:.2e}");
                f32_vs_f64 = f32_vs_f64.max(e64);
            }
        }
    }
    eprintln!(
        "timestep_embedding: max abs cpu vs f64 loop {cpu_ref:.2e}, gpu vs cpu {gpu_cpu:.2e}, \
         f32-step formula vs all-f64 {f32_vs_f64:.2e}"
    );
    let e = Tensor::timestep_embedding(&Tensor::zeros(&[2, 1], &Device::Cpu).unwrap(), 8, false, 0.0, 10000.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("timestep_embedding") && e.contains("[2, 1]"), "{e}");
}

#[test]
fn timestep_embedding_gpu_large_arguments() {
    // The explicit range reduction holds for arguments far past [-pi, pi] in both signs.
    let t: Vec<f32> = vec![-999.0, -3.7, 0.5, 123.25, 999.0, 2500.0, 9000.0, 12000.0];
    gpu_vs_cpu("timestep large args", 2e-6, 7, &[(t, vec![8])], |x| {
        Tensor::timestep_embedding(&x[0], 66, true, 1.0, 10000.0)
    });
}
