//! Backward of reductions, `sum_to_shape`, softmax, layer norm and group norm: CPU against
//! central finite differences, GPU against CPU (`check_grads`), and the CPU backward of softmax
//! and the norms against float64 references written here.
mod common;
use common::*;
use vipo::ops::reduce::ReduceOp;
use vipo::{Device, Tensor};

// f32 central differences with step 1e-2 on O(1) values: truncation and rounding ~1e-5 of the
// largest gradient entry; smooth ops pass well inside 2e-3.
const FD_TOL: f64 = 2e-3;
// GPU vs CPU backward: the GPU sums rows in f32 (tree order); the CPU twins sum in f32 lanes
// within blocks of 64 added in f64, relative to the row's first value, and do the elementwise
// work in f32 as the shader does. Observed <= 4e-7 on lavapipe.
const GPU_TOL: f64 = 5e-6;
// CPU backward vs a float64 reference: the CPU's few f32 roundings per element against exact
// (the f64 central differences' error is ~1e-9).
const TOL_F64: f64 = 1e-6;

fn cpu_t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

/// Distinct values at least 0.07 apart (a shuffled ladder plus jitter), so a max never ties and
/// the finite differences (step 1e-2) never cross a kink.
fn spaced(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = vipo::rng::Rng::new(seed);
    let mut rungs: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        rungs.swap(i, rng.below(i + 1));
    }
    let jitter = uniform(n, 0.0, 0.03, seed + 1);
    rungs.iter().zip(jitter).map(|(&k, j)| (k as f32 - n as f32 / 2.0) * 0.1 + j).collect()
}

#[test]
fn reduce_axes_grads() {
    let shapes: &[&[usize]] = &[&[3, 5, 7], &[4, 1, 6], &[1, 11]];
    let mut seed = 100;
    for shape in shapes {
        for axis in [0isize, 1, -1] {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                for keepdim in [false, true] {
                    seed += 1;
                    let x = spaced(numel(shape), seed);
                    let what = format!("{op:?} axis {axis} keepdim {keepdim} of {shape:?}");
                    let w = check_grads(&what, seed, &[(x, shape.to_vec())], &[], 1e-2, FD_TOL, GPU_TOL, |t| {
                        t[0].reduce(axis, keepdim, op)
                    });
                    assert!(w < FD_TOL);
                }
            }
        }
    }
}

#[test]
fn max_splits_the_gradient_evenly_among_ties() {
    // Rows [1, 3, 3, 2] and [5, 5, 5, -1]: the gradient of 1 goes half/half and in thirds.
    let x = [1.0, 3.0, 3.0, 2.0, 5.0, 5.0, 5.0, -1.0];
    let third = 1.0f32 / 3.0;
    let want_last = [0.0, 0.5, 0.5, 0.0, third, third, third, 0.0];
    // Over axis 0: columns (1, 5) (3, 5) (3, 5) (2, -1): no ties, all to the larger.
    let want_first = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        for (axis, want) in [(-1isize, want_last), (0, want_first)] {
            let t = Tensor::from_slice(&x, &[2, 4], &dev).unwrap().requires_grad();
            t.max(axis, false).unwrap().sum_all().unwrap().backward().unwrap();
            let got = t.grad().unwrap().to_vec().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-7, "max ties axis {axis} on {dev}: {got:?} vs {want:?}");
            }
        }
    }
}

#[test]
fn whole_tensor_grads() {
    for (k, shape) in [vec![3usize, 7], vec![1], vec![2, 1, 5]].into_iter().enumerate() {
        let seed = 200 + k as u64;
        let inputs = [(randn(numel(&shape), seed), shape.clone())];
        check_grads("sum_all", seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].sum_all());
        check_grads("mean_all", seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].mean_all());
        // Through a nonlinearity, so the gradient is not constant.
        check_grads("mean_all of square", seed, &inputs, &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].square()?.mean_all());
    }
}

#[test]
fn sum_to_shape_grads() {
    let src = [2usize, 3, 4, 5];
    let targets: &[&[usize]] =
        &[&[3, 1, 5], &[4, 1], &[5], &[], &[1, 1, 1, 1], &[2, 1, 4, 1], &[1, 3, 1, 1], &[2, 3, 4, 5], &[1, 4, 5]];
    for (k, target) in targets.iter().enumerate() {
        let seed = 300 + k as u64;
        let what = format!("sum_to_shape {src:?} -> {target:?}");
        check_grads(&what, seed, &[(randn(numel(&src), seed), src.to_vec())], &[], 1e-2, FD_TOL, GPU_TOL, |t| {
            t[0].sum_to_shape(target)
        });
    }
    // A source with size-1 dims of its own.
    check_grads(
        "sum_to_shape [3, 1, 4] -> [1, 4]",
        320,
        &[(randn(12, 320), vec![3, 1, 4])],
        &[],
        1e-2,
        FD_TOL,
        GPU_TOL,
        |t| t[0].sum_to_shape(&[1, 4]),
    );
}

/// f64 softmax of each row and `y * (dy - sum(dy * y))`.
fn ref_softmax_backward(x: &[f32], dy: &[f32], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for (xr, dr) in x.chunks(cols).zip(dy.chunks(cols)) {
        let m = xr.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = xr.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let y: Vec<f64> = e.iter().map(|v| v / s).collect();
        let dot: f64 = y.iter().zip(dr).map(|(a, &b)| a * b as f64).sum();
        out.extend(y.iter().zip(dr).map(|(a, &b)| (a * (b as f64 - dot)) as f32));
    }
    out
}

#[test]
fn softmax_grads() {
    let shapes: &[&[usize]] = &[&[4, 7], &[2, 77], &[3, 130], &[2, 2, 7]];
    for (k, shape) in shapes.iter().enumerate() {
        let seed = 400 + k as u64;
        let x: Vec<f32> = randn(numel(shape), seed).iter().map(|v| v * 2.0).collect();
        let what = format!("softmax {shape:?}");
        check_grads(&what, seed, &[(x.clone(), shape.to_vec())], &[], 1e-2, FD_TOL, GPU_TOL, |t| t[0].softmax_last());
        // The CPU backward against the f64 formula.
        let cols = *shape.last().unwrap();
        let dy = randn(x.len(), seed + 50);
        let xt = cpu_t(&x, shape).requires_grad();
        xt.softmax_last().unwrap().backward_with(cpu_t(&dy, shape)).unwrap();
        let want = ref_softmax_backward(&x, &dy, cols);
        assert_close(&format!("{what} cpu vs f64"), &xt.grad().unwrap().to_vec().unwrap(), &want, TOL_F64, seed);
    }
    // Rows of length 1: softmax is constant 1, so its gradient is exactly 0; times x, the
    // product's gradient (1) is not all zeros, and the softmax part must contribute nothing.
    check_grads("softmax [5, 1] times x", 410, &[(randn(5, 410), vec![5, 1])], &[], 1e-2, FD_TOL, GPU_TOL, |t| {
        t[0].softmax_last()?.mul(&t[0])
    });
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        let x = Tensor::from_slice(&randn(5, 411), &[5, 1], &dev).unwrap().requires_grad();
        x.softmax_last().unwrap().backward_with(Tensor::from_slice(&randn(5, 412), &[5, 1], &dev).unwrap()).unwrap();
        assert_eq!(x.grad().unwrap().to_vec().unwrap(), vec![0.0; 5], "softmax [5, 1] on {dev}");
    }
}

/// An optional weight and an optional bias, both (C,).
type Affine = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Affine variants: none, weight only, bias only, both.
fn affine_variants(c: usize, seed: u64) -> Vec<Affine> {
    let w = uniform(c, 0.5, 1.5, seed);
    let b = randn(c, seed + 1);
    vec![(None, None), (Some(w.clone()), None), (None, Some(b.clone())), (Some(w), Some(b))]
}

/// Inputs for `check_grads`: x, then weight and bias where present.
fn norm_inputs(x: &[f32], shape: &[usize], w: &Option<Vec<f32>>, b: &Option<Vec<f32>>) -> Vec<(Vec<f32>, Vec<usize>)> {
    let mut v = vec![(x.to_vec(), shape.to_vec())];
    v.extend(w.iter().map(|w| (w.clone(), vec![w.len()])));
    v.extend(b.iter().map(|b| (b.clone(), vec![b.len()])));
    v
}

/// Weight and bias tensors out of the inputs `norm_inputs` made.
fn wb(t: &[Tensor], has_w: bool, has_b: bool) -> (Option<&Tensor>, Option<&Tensor>) {
    (has_w.then(|| &t[1]), has_b.then(|| &t[1 + has_w as usize]))
}

#[test]
fn layer_norm_grads() {
    // C = 1 has an identically zero x gradient and C = 2 one of order eps (x-hat is +-1 for
    // any input), both degenerate for relative checks: C = 1 is checked exactly below.
    let eps = 1e-5;
    let shapes: &[&[usize]] = &[&[4, 3], &[3, 5], &[2, 3, 33]];
    for (k, shape) in shapes.iter().enumerate() {
        let c = *shape.last().unwrap();
        for (a, (w, b)) in affine_variants(c, 500 + k as u64).into_iter().enumerate() {
            let seed = 510 + 10 * k as u64 + a as u64;
            let x = randn(numel(shape), seed);
            let (hw, hb) = (w.is_some(), b.is_some());
            let what = format!("layer_norm {shape:?} w {hw} b {hb}");
            check_grads(&what, seed, &norm_inputs(&x, shape, &w, &b), &[], 1e-2, FD_TOL, GPU_TOL, |t| {
                let (wt, bt) = wb(t, hw, hb);
                t[0].layer_norm(wt, bt, eps)
            });
        }
    }
    // Frozen weight and bias: only x gets a gradient; frozen x: only the affine ones.
    let (w, b) = (uniform(5, 0.5, 1.5, 590), randn(5, 591));
    let inputs = norm_inputs(&randn(15, 592), &[3, 5], &Some(w), &Some(b));
    let f = |t: &[Tensor]| t[0].layer_norm(Some(&t[1]), Some(&t[2]), eps);
    check_grads("layer_norm frozen affine", 592, &inputs, &[1, 2], 1e-2, FD_TOL, GPU_TOL, f);
    check_grads("layer_norm frozen x", 593, &inputs, &[0], 1e-2, FD_TOL, GPU_TOL, f);
    check_grads("layer_norm frozen x, b", 594, &inputs, &[0, 2], 1e-2, FD_TOL, GPU_TOL, f);
    // C = 1: y = bias whatever x is, so dx = 0 and dw = 0 exactly, db = sum of dy.
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap().requires_grad();
        let (x, w, b) = (t(&[1.0, -2.0, 1000.5], &[3, 1]), t(&[1.5], &[1]), t(&[0.25], &[1]));
        let dy = Tensor::from_slice(&[0.5, -1.0, 2.0], &[3, 1], &dev).unwrap();
        x.layer_norm(Some(&w), Some(&b), eps).unwrap().backward_with(dy).unwrap();
        assert_eq!(x.grad().unwrap().to_vec().unwrap(), vec![0.0; 3], "C = 1 dx on {dev}");
        assert_eq!(w.grad().unwrap().to_vec().unwrap(), vec![0.0], "C = 1 dw on {dev}");
        assert_eq!(b.grad().unwrap().to_vec().unwrap(), vec![1.5], "C = 1 db on {dev}");
    }
}

#[test]
fn group_norm_grads() {
    let eps = 1e-5;
    // Step 3e-3: groups of 3 elements curve fast enough that 1e-2 truncates at ~2e-3.
    let cases: &[(&[usize], &[usize])] = &[(&[2, 6, 5, 3], &[1, 2, 3, 6]), (&[1, 8, 9], &[4]), (&[3, 6], &[2])];
    for (k, (shape, groups)) in cases.iter().enumerate() {
        let c = shape[1];
        for &g in *groups {
            for (a, (w, b)) in affine_variants(c, 600 + k as u64).into_iter().enumerate() {
                let seed = 610 + 100 * k as u64 + 10 * g as u64 + a as u64;
                let x = randn(numel(shape), seed);
                let (hw, hb) = (w.is_some(), b.is_some());
                let what = format!("group_norm {shape:?} groups {g} w {hw} b {hb}");
                check_grads(&what, seed, &norm_inputs(&x, shape, &w, &b), &[], 3e-3, FD_TOL, GPU_TOL, |t| {
                    let (wt, bt) = wb(t, hw, hb);
                    t[0].group_norm(g, wt, bt, eps)
                });
            }
        }
    }
}

#[test]
fn group_norm_silu_grads() {
    // The fused backward (dz = dy * silu'(z), z recomputed) by finite differences on the CPU and
    // GPU against CPU, every affine variant; then frozen inputs, among them the case where only
    // the bias learns (the kernel then runs for dz alone).
    let eps = 1e-5;
    let cases: &[(&[usize], &[usize])] = &[(&[2, 6, 5, 3], &[1, 3, 6]), (&[1, 8, 9], &[4]), (&[2, 4, 70], &[2])];
    for (k, (shape, groups)) in cases.iter().enumerate() {
        let c = shape[1];
        for &g in *groups {
            for (a, (w, b)) in affine_variants(c, 800 + k as u64).into_iter().enumerate() {
                let seed = 810 + 100 * k as u64 + 10 * g as u64 + a as u64;
                let x = randn(numel(shape), seed);
                let (hw, hb) = (w.is_some(), b.is_some());
                let what = format!("group_norm_silu {shape:?} groups {g} w {hw} b {hb}");
                check_grads(&what, seed, &norm_inputs(&x, shape, &w, &b), &[], 3e-3, FD_TOL, GPU_TOL, |t| {
                    let (wt, bt) = wb(t, hw, hb);
                    t[0].group_norm_silu(g, wt, bt, eps)
                });
            }
        }
    }
    let (w, b) = (uniform(6, 0.5, 1.5, 890), randn(6, 891));
    let inputs = norm_inputs(&randn(2 * 6 * 7, 892), &[2, 6, 7], &Some(w), &Some(b));
    let f = |t: &[Tensor]| t[0].group_norm_silu(3, Some(&t[1]), Some(&t[2]), eps);
    for (k, frozen) in [&[1usize, 2][..], &[0], &[0, 1], &[0, 2], &[2]].iter().enumerate() {
        let what = format!("group_norm_silu frozen {frozen:?}");
        check_grads(&what, 893 + k as u64, &inputs, frozen, 3e-3, FD_TOL, GPU_TOL, f);
    }
}

#[test]
fn norm_grads_with_a_large_common_offset() {
    // Values near 100 with unit spread: the backward must work relative to the mean (as the
    // forward does) or the GPU's f32 deviations lose digits. The finite differences still hold
    // at FD_TOL: a 1e-2 step at 100 is off by at most half an ulp (3.8e-6), 4e-4 relative.
    let (w, b) = (uniform(33, 0.5, 1.5, 700), randn(33, 701));
    let x: Vec<f32> = randn(4 * 33, 702).iter().map(|v| v + 100.0).collect();
    check_grads(
        "layer_norm offset 100",
        702,
        &norm_inputs(&x, &[4, 33], &Some(w), &Some(b)),
        &[],
        1e-2,
        FD_TOL,
        GPU_TOL,
        |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5),
    );
    let (w, b) = (uniform(6, 0.5, 1.5, 710), randn(6, 711));
    let x: Vec<f32> = randn(2 * 6 * 15, 712).iter().map(|v| v + 100.0).collect();
    for g in [1, 3] {
        let what = format!("group_norm offset 100 groups {g}");
        check_grads(
            &what,
            712,
            &norm_inputs(&x, &[2, 6, 5, 3], &Some(w.clone()), &Some(b.clone())),
            &[],
            1e-2,
            FD_TOL,
            GPU_TOL,
            |t| t[0].group_norm(g, Some(&t[1]), Some(&t[2]), 1e-5),
        );
    }
}

/// f64 group norm of x (N, C, S) with `groups` groups; layer norm of (R, C) is the case
/// N = R, S = 1, one group.
fn ref_group_norm_f64(x: &[f64], shape: [usize; 3], groups: usize, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let [n, c, s] = shape;
    let cpg = c / groups;
    let mut out = vec![0.0; x.len()];
    for ni in 0..n {
        for g in 0..groups {
            let idx: Vec<usize> =
                (g * cpg..(g + 1) * cpg).flat_map(|ci| (0..s).map(move |si| (ni * c + ci) * s + si)).collect();
            let m = idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len() as f64;
            let v = idx.iter().map(|&i| (x[i] - m).powi(2)).sum::<f64>() / idx.len() as f64;
            for &i in &idx {
                let ci = (i / s) % c;
                out[i] = (x[i] - m) / (v + eps).sqrt() * w[ci] + b[ci];
            }
        }
    }
    out
}

#[test]
fn norm_cpu_grads_vs_f64_differences() {
    // The CPU backward against central differences of the f64 forward above (step 1e-6 on O(1)
    // values: error ~1e-9), at every coordinate of x, weight and bias.
    let cases: &[([usize; 3], usize, bool, f32)] = &[
        ([3, 5, 1], 1, false, 0.0),   // layer norm (3, 5)
        ([2, 6, 15], 2, true, 0.0),   // group norm (2, 6, 5, 3)
        ([1, 8, 9], 4, true, 0.0),    // group norm (1, 8, 9)
        ([2, 6, 15], 3, true, 100.0), // large common offset
        ([2, 6, 23], 2, true, 0.0),   // rows of 69: a full block of 64 and a ragged tail
        ([2, 130, 1], 1, false, 0.0), // layer norm (2, 130): the same for one channel per element
    ];
    let eps = 1e-5f32;
    for (k, &(shape, groups, is_gn, off)) in cases.iter().enumerate() {
        let seed = 800 + k as u64;
        let [n, c, s] = shape;
        let x: Vec<f32> = randn(n * c * s, seed).iter().map(|v| v + off).collect();
        let w = uniform(c, 0.5, 1.5, seed + 1);
        let b = randn(c, seed + 2);
        let dy = randn(x.len(), seed + 3);
        // Analytic, from the CPU backward.
        let (xt, wt, bt) =
            (cpu_t(&x, &shape).requires_grad(), cpu_t(&w, &[c]).requires_grad(), cpu_t(&b, &[c]).requires_grad());
        let y = if is_gn {
            xt.group_norm(groups, Some(&wt), Some(&bt), eps).unwrap()
        } else {
            xt.reshape_to(&[n, c]).unwrap().layer_norm(Some(&wt), Some(&bt), eps).unwrap()
        };
        y.backward_with(cpu_t(&dy, y.shape())).unwrap();
        // Numeric, in f64.
        let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (x64, w64, b64, dy64) = (to64(&x), to64(&w), to64(&b), to64(&dy));
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            ref_group_norm_f64(x, shape, groups, w, b, eps as f64).iter().zip(&dy64).map(|(a, d)| a * d).sum()
        };
        let h = 1e-6;
        let fd = |which: usize, len: usize| -> Vec<f32> {
            (0..len)
                .map(|j| {
                    let mut p = [x64.clone(), w64.clone(), b64.clone()];
                    let mut m = p.clone();
                    p[which][j] += h;
                    m[which][j] -= h;
                    ((loss(&p[0], &p[1], &p[2]) - loss(&m[0], &m[1], &m[2])) / (2.0 * h)) as f32
                })
                .collect()
        };
        for (which, t, len) in [(0, &xt, x.len()), (1, &wt, c), (2, &bt, c)] {
            let what = format!("norm case {k} grad {which} cpu vs f64 differences");
            assert_close(&what, &t.grad().unwrap().to_vec().unwrap(), &fd(which, len), TOL_F64, seed);
        }
    }
}

#[test]
fn long_rows_grads() {
    // Rows longer than a workgroup (256), so each thread loops; softmax and both norms.
    let x: Vec<f32> = randn(2 * 600, 900).iter().map(|v| v * 2.0).collect();
    check_grads("softmax [2, 600]", 900, &[(x.clone(), vec![2, 600])], &[], 1e-2, FD_TOL, GPU_TOL, |t| {
        t[0].softmax_last()
    });
    let (w, b) = (uniform(600, 0.5, 1.5, 901), randn(600, 902));
    check_grads(
        "layer_norm [2, 600]",
        903,
        &norm_inputs(&x, &[2, 600], &Some(w), &Some(b)),
        &[],
        1e-2,
        FD_TOL,
        GPU_TOL,
        |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5),
    );
    let (w, b) = (uniform(4, 0.5, 1.5, 904), randn(4, 905));
    check_grads(
        "group_norm [1, 4, 10, 30] groups 2",
        906,
        &norm_inputs(&x, &[1, 4, 10, 30], &Some(w), &Some(b)),
        &[],
        1e-2,
        FD_TOL,
        GPU_TOL,
        |t| t[0].group_norm(2, Some(&t[1]), Some(&t[2]), 1e-5),
    );
}

#[test]
fn long_column_sums() {
    // More rows than GPU_COL_SPLIT_LEN (1024): the weight and bias gradients, column sums over
    // the rows, take the GPU's two-pass chunked path, as do sum, mean and max over such an axis.
    let (w, b) = (uniform(5, 0.5, 1.5, 950), randn(5, 951));
    let x = randn(1100 * 5, 952);
    check_grads(
        "layer_norm [1100, 5]",
        952,
        &norm_inputs(&x, &[1100, 5], &Some(w), &Some(b)),
        &[],
        1e-2,
        FD_TOL,
        GPU_TOL,
        |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5),
    );
    let shape = [2usize, 1300, 3];
    let x = spaced(numel(&shape), 953);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        let what = format!("{op:?} axis 1 of {shape:?}");
        let got = gpu_vs_cpu(&what, GPU_TOL, 953, &[(x.clone(), shape.to_vec())], |t| t[0].reduce(1, false, op));
        // f64 reference, by index arithmetic.
        let want: Vec<f32> = (0..2)
            .flat_map(|o| (0..3).map(move |i| (o, i)))
            .map(|(o, i)| {
                let vals = (0..1300).map(|k| x[(o * 1300 + k) * 3 + i] as f64);
                (match op {
                    ReduceOp::Sum => vals.sum::<f64>(),
                    ReduceOp::Mean => vals.sum::<f64>() / 1300.0,
                    ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                }) as f32
            })
            .collect();
        assert_close(&format!("{what} cpu vs f64"), &got.to_vec().unwrap(), &want, TOL_F64, 953);
    }
}

#[test]
fn many_rows_backward() {
    // More rows than one grid dimension holds (65535): the backward kernels' 2-D grid.
    let rows = 66_000;
    let seed = 960;
    let inputs = [(randn(rows * 3, seed), vec![rows, 3]), (randn(rows * 3, seed + 1), vec![rows, 3])];
    let grad_of = |t: &[Tensor], f: &dyn Fn(&Tensor) -> vipo::Result<Tensor>| {
        let x = t[0].requires_grad();
        f(&x)?.backward_with(t[1].clone())?;
        Ok(x.grad().expect("x has a gradient"))
    };
    gpu_vs_cpu("softmax backward many rows", GPU_TOL, seed, &inputs, |t| grad_of(t, &|x| x.softmax_last()));
    gpu_vs_cpu("layer_norm backward many rows", GPU_TOL, seed, &inputs, |t| {
        grad_of(t, &|x| x.layer_norm(None, None, 1e-5))
    });
}
