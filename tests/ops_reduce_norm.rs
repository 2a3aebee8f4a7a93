//! Reductions, `sum_to_shape`, softmax, layer norm and group norm: GPU against the CPU twin on
//! awkward shapes, and the CPU twin against plain float64 loops written here.
mod common;
use common::*;
use vipo::ops::reduce::ReduceOp;
use vipo::{Device, Tensor};

// GPU vs CPU: the GPU sums in f32 (tree order) and uses f32 exp / inverseSqrt, the CPU twins
// accumulate in f64 (the norms: f32 lanes in blocks of 64, blocks in f64); a few ulp of the
// largest output.
const TOL: f64 = 1e-5;
// CPU twin vs an f64 loop: f64 (or f64-accurate) sums, a few f32 roundings per element.
const TOL_F64: f64 = 1e-6;

fn cpu_t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn offset(v: Vec<f32>, by: f32) -> Vec<f32> {
    v.into_iter().map(|x| x + by).collect()
}

/// Plain f64 reduction of `x` (shape) over `axis`, by explicit index arithmetic.
fn ref_reduce(x: &[f32], shape: &[usize], axis: usize, op: ReduceOp) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let vals = (0..len).map(|k| x[(o * len + k) * inner + i] as f64);
            let r = match op {
                ReduceOp::Sum => vals.sum::<f64>(),
                ReduceOp::Mean => vals.sum::<f64>() / len as f64,
                ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
            };
            out.push(r as f32);
        }
    }
    out
}

fn ref_softmax(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let m = row.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        out.extend(row.iter().map(|&v| ((v as f64 - m).exp() / s) as f32));
    }
    out
}

/// Normalises the elements at `idx` of `x` into `out` with per-element channels `ch`.
#[allow(clippy::too_many_arguments)]
fn ref_norm_set(
    x: &[f32],
    idx: &[usize],
    ch: &[usize],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
    out: &mut [f32],
) {
    let n = idx.len() as f64;
    let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / n;
    let var = idx.iter().map(|&i| (x[i] as f64 - mean) * (x[i] as f64 - mean)).sum::<f64>() / n;
    for (&i, &c) in idx.iter().zip(ch) {
        let mut v = (x[i] as f64 - mean) / (var + eps).sqrt();
        if let Some(w) = w {
            v *= w[c] as f64;
        }
        if let Some(b) = b {
            v += b[c] as f64;
        }
        out[i] = v as f32;
    }
}

fn ref_layer_norm(x: &[f32], c: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    let ch: Vec<usize> = (0..c).collect();
    for r in 0..x.len() / c {
        let idx: Vec<usize> = (r * c..(r + 1) * c).collect();
        ref_norm_set(x, &idx, &ch, w, b, eps, &mut out);
    }
    out
}

fn ref_group_norm(
    x: &[f32],
    shape: &[usize],
    groups: usize,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
) -> Vec<f32> {
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let cpg = c / groups;
    let mut out = vec![f32::NAN; x.len()];
    for ni in 0..n {
        for g in 0..groups {
            let mut idx = Vec::new();
            let mut ch = Vec::new();
            for ci in g * cpg..(g + 1) * cpg {
                for si in 0..s {
                    idx.push((ni * c + ci) * s + si);
                    ch.push(ci);
                }
            }
            ref_norm_set(x, &idx, &ch, w, b, eps, &mut out);
        }
    }
    out
}

#[test]
fn reduce_axes_gpu_vs_cpu_vs_f64() {
    let cases: &[(&[usize], &[isize])] = &[
        (&[3, 257, 5], &[0, 1, -1]),
        (&[1, 1000], &[0, 1, -1]),
        (&[7, 1], &[0, 1, -1]),
        (&[4, 1, 6], &[1, -3]),
        (&[300], &[0]),
        (&[2, 3, 4, 33], &[2, -1]),
    ];
    let mut seed = 1000;
    let mut worst = 0f64;
    for (shape, axes) in cases {
        for &axis in *axes {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                for keepdim in [false, true] {
                    seed += 1;
                    let x = randn(numel(shape), seed);
                    let what = format!("{op:?} axis {axis} keepdim {keepdim} of {shape:?}");
                    let got = gpu_vs_cpu(&what, TOL, seed, &[(x.clone(), shape.to_vec())], |t| {
                        t[0].reduce(axis, keepdim, op)
                    });
                    let a = if axis < 0 { axis + shape.len() as isize } else { axis } as usize;
                    let mut want_shape = shape.to_vec();
                    if keepdim {
                        want_shape[a] = 1;
                    } else {
                        want_shape.remove(a);
                    }
                    assert_eq!(got.shape(), want_shape.as_slice(), "{what}");
                    let want = ref_reduce(&x, shape, a, op);
                    let got = got.to_vec().unwrap();
                    worst = worst.max(rel_err(&got, &want));
                    assert_close(&format!("{what} cpu vs f64"), &got, &want, TOL_F64, seed);
                }
            }
        }
    }
    eprintln!("reduce: worst cpu vs f64 rel err {worst:.2e}");
}

#[test]
fn reduce_long_axes() {
    // Two-pass GPU rows (axis > 8192), a long non-last axis (pairwise loop), and whole-tensor
    // sums; positive values so the sums are large and rounding would show.
    let cases: &[(&[usize], isize)] = &[(&[2, 40_000], -1), (&[20_001], 0), (&[9_000, 3], 0)];
    for (k, (shape, axis)) in cases.iter().enumerate() {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
            let seed = 2000 + 10 * k as u64 + op as u64;
            let x = uniform(numel(shape), 0.5, 1.5, seed);
            let what = format!("{op:?} axis {axis} of {shape:?}");
            let got = gpu_vs_cpu(&what, TOL, seed, &[(x.clone(), shape.to_vec())], |t| t[0].reduce(*axis, false, op));
            let a = if *axis < 0 { axis + shape.len() as isize } else { *axis } as usize;
            let want = ref_reduce(&x, shape, a, op);
            assert_close(&what, &got.to_vec().unwrap(), &want, TOL_F64, seed);
        }
    }
    let seed = 2100;
    let shape = vec![3, 33_335];
    let x = uniform(numel(&shape), 0.5, 1.5, seed);
    let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
    let s = gpu_vs_cpu("sum_all", TOL, seed, &[(x.clone(), shape.clone())], |t| t[0].sum_all());
    assert_eq!(s.shape(), &[] as &[usize]);
    assert_close("sum_all", &s.to_vec().unwrap(), &[want_sum as f32], TOL_F64, seed);
    let m = gpu_vs_cpu("mean_all", TOL, seed, &[(x.clone(), shape)], |t| t[0].mean_all());
    let want_mean = (want_sum / x.len() as f64) as f32;
    assert_close("mean_all", &m.to_vec().unwrap(), &[want_mean], TOL_F64, seed);
    // Small whole-tensor sums go through the one-pass path.
    let x = randn(77, seed + 1);
    let s = gpu_vs_cpu("sum_all small", TOL, seed + 1, &[(x.clone(), vec![7, 11])], |t| t[0].sum_all());
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    assert_close("sum_all small", &s.to_vec().unwrap(), &[want as f32], TOL_F64, seed + 1);
}

#[test]
fn reduce_cpu_parallel_paths_vs_f64() {
    // Above the CPU's parallel threshold: few long rows, many rows, a non-last axis.
    let cases: &[(&[usize], usize)] = &[(&[3, 50_000], 1), (&[40_000, 2], 1), (&[300, 200], 0)];
    for (k, (shape, axis)) in cases.iter().enumerate() {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
            let seed = 2500 + 10 * k as u64 + op as u64;
            let x = randn(numel(shape), seed);
            let got = cpu_t(&x, shape).reduce(*axis as isize, false, op).unwrap();
            let want = ref_reduce(&x, shape, *axis, op);
            let what = format!("cpu {op:?} axis {axis} of {shape:?}");
            assert_close(&what, &got.to_vec().unwrap(), &want, TOL_F64, seed);
        }
    }
}

#[test]
fn sum_to_shape_matches_broadcast_sum() {
    let src = [2usize, 3, 4, 5];
    let targets: &[&[usize]] =
        &[&[3, 1, 5], &[4, 1], &[5], &[], &[1, 1, 1, 1], &[2, 1, 4, 1], &[1, 3, 1, 1], &[2, 3, 4, 5], &[1, 4, 5]];
    for (k, target) in targets.iter().enumerate() {
        let seed = 3000 + k as u64;
        let x = randn(numel(&src), seed);
        let what = format!("sum_to_shape {src:?} -> {target:?}");
        let got = gpu_vs_cpu(&what, TOL, seed, &[(x.clone(), src.to_vec())], |t| t[0].sum_to_shape(target));
        assert_eq!(got.shape(), *target, "{what}");
        // Reference: add each source element into the target element it broadcasts from.
        let lead = src.len() - target.len();
        let mut want = vec![0f64; numel(target)];
        for (i, &v) in x.iter().enumerate() {
            let mut rest = i;
            let mut coord = [0usize; 4];
            for d in (0..4).rev() {
                coord[d] = rest % src[d];
                rest /= src[d];
            }
            let mut ti = 0;
            for (d, &t) in target.iter().enumerate() {
                let c = if t == 1 { 0 } else { coord[d + lead] };
                ti = ti * t + c;
            }
            want[ti] += v as f64;
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_close(&what, &got.to_vec().unwrap(), &want, TOL_F64, seed);
    }
}

#[test]
fn softmax_gpu_vs_cpu_vs_f64() {
    let cases: &[&[usize]] = &[&[5, 1], &[3, 77], &[4, 300], &[2, 1025], &[2, 3, 77], &[129]];
    for (k, shape) in cases.iter().enumerate() {
        for big_offset in [false, true] {
            let seed = 4000 + 2 * k as u64 + big_offset as u64;
            let mut x: Vec<f32> = randn(numel(shape), seed).iter().map(|v| v * 3.0).collect();
            if big_offset {
                x = offset(x, 1000.0);
            }
            let what = format!("softmax {shape:?} offset {big_offset}");
            let got = gpu_vs_cpu(&what, TOL, seed, &[(x.clone(), shape.to_vec())], |t| t[0].softmax_last());
            let cols = *shape.last().unwrap();
            let want = ref_softmax(&x, cols);
            assert_close(&what, &got.to_vec().unwrap(), &want, TOL_F64, seed);
        }
    }
    // Extreme logits: the max subtraction keeps exp finite.
    let x = vec![1e4, -1e4, 0.0, 88.0, 89.0, -50.0];
    let got = gpu_vs_cpu("softmax extreme", TOL, 0, &[(x.clone(), vec![2, 3])], |t| t[0].softmax_last());
    assert_close("softmax extreme", &got.to_vec().unwrap(), &ref_softmax(&x, 3), TOL_F64, 0);
}

#[test]
fn softmax_and_norms_many_rows() {
    // More rows than one grid dimension holds (65535): rows come through the 2-D grid.
    let rows = 66_000;
    let seed = 4500;
    let x = randn(rows * 3, seed);
    let got = gpu_vs_cpu("softmax many rows", TOL, seed, &[(x.clone(), vec![rows, 3])], |t| t[0].softmax_last());
    assert_close("softmax many rows", &got.to_vec().unwrap(), &ref_softmax(&x, 3), TOL_F64, seed);
    let got = gpu_vs_cpu("layer_norm many rows", TOL, seed, &[(x.clone(), vec![rows, 3])], |t| {
        t[0].layer_norm(None, None, 1e-5)
    });
    let want = ref_layer_norm(&x, 3, None, None, 1e-5);
    assert_close("layer_norm many rows", &got.to_vec().unwrap(), &want, TOL_F64, seed);
}

/// An optional weight and an optional bias, both (C,).
type Affine = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Affine variants: none, weight only, bias only, both.
fn affine_variants(c: usize, seed: u64) -> Vec<Affine> {
    let w = uniform(c, 0.5, 1.5, seed);
    let b = randn(c, seed + 1);
    vec![(None, None), (Some(w.clone()), None), (None, Some(b.clone())), (Some(w), Some(b))]
}

/// Inputs for `gpu_vs_cpu`: x, then weight and bias where present.
fn norm_inputs(x: &[f32], shape: &[usize], w: &Option<Vec<f32>>, b: &Option<Vec<f32>>) -> Vec<(Vec<f32>, Vec<usize>)> {
    let mut v = vec![(x.to_vec(), shape.to_vec())];
    if let Some(w) = w {
        v.push((w.clone(), vec![w.len()]));
    }
    if let Some(b) = b {
        v.push((b.clone(), vec![b.len()]));
    }
    v
}

/// Weight and bias tensors out of the inputs `norm_inputs` made.
fn wb(t: &[Tensor], has_w: bool, has_b: bool) -> (Option<&Tensor>, Option<&Tensor>) {
    let w = has_w.then(|| &t[1]);
    let b = has_b.then(|| &t[1 + has_w as usize]);
    (w, b)
}

#[test]
fn layer_norm_gpu_vs_cpu_vs_f64() {
    let eps = 1e-5;
    let cases: &[&[usize]] = &[&[6, 1], &[5, 33], &[3, 320], &[2, 3, 33], &[320]];
    for (k, shape) in cases.iter().enumerate() {
        let c = *shape.last().unwrap();
        for (a, (w, b)) in affine_variants(c, 5000 + k as u64).into_iter().enumerate() {
            if c == 1 && b.is_none() {
                continue; // every output is exactly 0; checked below
            }
            for big_offset in [false, true] {
                let seed = 5100 + 10 * k as u64 + 2 * a as u64 + big_offset as u64;
                let mut x = randn(numel(shape), seed);
                if big_offset {
                    x = offset(x, 1000.0);
                }
                let (hw, hb) = (w.is_some(), b.is_some());
                let what = format!("layer_norm {shape:?} w {hw} b {hb} offset {big_offset}");
                let inputs = norm_inputs(&x, shape, &w, &b);
                let got = gpu_vs_cpu(&what, TOL, seed, &inputs, |t| {
                    let (wt, bt) = wb(t, hw, hb);
                    t[0].layer_norm(wt, bt, eps)
                });
                let want = ref_layer_norm(&x, c, w.as_deref(), b.as_deref(), eps as f64);
                assert_close(&what, &got.to_vec().unwrap(), &want, TOL_F64, seed);
            }
        }
    }
    let x = vec![1.0, -2.0, 1000.5];
    let y = cpu_t(&x, &[3, 1]).layer_norm(None, None, eps).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![0.0; 3]);
    if let Some(g) = gpu() {
        let y = Tensor::from_slice(&x, &[3, 1], &g).unwrap().layer_norm(None, None, eps).unwrap();
        assert_eq!(y.to_vec().unwrap(), vec![0.0; 3]);
    }
}

#[test]
fn group_norm_gpu_vs_cpu_vs_f64() {
    let eps = 1e-6;
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 12, 5, 7], &[3, 4, 12, 1]),
        (&[1, 32, 9, 9], &[32]),
        (&[2, 6], &[2, 3]),
        (&[2, 8, 10], &[4]),
        (&[1, 4, 3, 2, 5], &[2]),
    ];
    for (k, (shape, groups)) in cases.iter().enumerate() {
        let c = shape[1];
        for &g in *groups {
            for (a, (w, b)) in affine_variants(c, 6000 + k as u64).into_iter().enumerate() {
                for big_offset in [false, true] {
                    let seed = 6100 + 100 * k as u64 + 10 * g as u64 + 2 * a as u64 + big_offset as u64;
                    let mut x = randn(numel(shape), seed);
                    if big_offset {
                        x = offset(x, 1000.0);
                    }
                    let (hw, hb) = (w.is_some(), b.is_some());
                    let what = format!("group_norm {shape:?} groups {g} w {hw} b {hb} offset {big_offset}");
                    let inputs = norm_inputs(&x, shape, &w, &b);
                    let got = gpu_vs_cpu(&what, TOL, seed, &inputs, |t| {
                        let (wt, bt) = wb(t, hw, hb);
                        t[0].group_norm(g, wt, bt, eps)
                    });
                    let want = ref_group_norm(&x, shape, g, w.as_deref(), b.as_deref(), eps as f64);
                    assert_close(&what, &got.to_vec().unwrap(), &want, TOL_F64, seed);
                }
            }
        }
    }
}

#[test]
fn group_norm_silu_gpu_vs_cpu_vs_f64() {
    // The fused norm + SiLU against the f64 norm followed by an f64 SiLU; shapes whose rows are
    // not multiples of the 256-thread workgroup, one group per channel, and a row long enough
    // (3 x 300) for each thread to take several elements; the large offset as for the norm.
    let eps = 1e-5;
    let cases: &[(&[usize], &[usize])] =
        &[(&[2, 12, 5, 7], &[3, 12]), (&[1, 6, 300], &[2]), (&[3, 4, 11], &[4, 1]), (&[2, 6], &[3])];
    for (k, (shape, groups)) in cases.iter().enumerate() {
        let c = shape[1];
        for &g in *groups {
            for (a, (w, b)) in affine_variants(c, 6500 + k as u64).into_iter().enumerate() {
                for big_offset in [false, true] {
                    let seed = 6600 + 100 * k as u64 + 10 * g as u64 + 2 * a as u64 + big_offset as u64;
                    let mut x = randn(numel(shape), seed);
                    if big_offset {
                        x = offset(x, 1000.0);
                    }
                    let (hw, hb) = (w.is_some(), b.is_some());
                    let what = format!("group_norm_silu {shape:?} groups {g} w {hw} b {hb} offset {big_offset}");
                    let inputs = norm_inputs(&x, shape, &w, &b);
                    let got = gpu_vs_cpu(&what, TOL, seed, &inputs, |t| {
                        let (wt, bt) = wb(t, hw, hb);
                        t[0].group_norm_silu(g, wt, bt, eps)
                    });
                    let want: Vec<f32> = ref_group_norm(&x, shape, g, w.as_deref(), b.as_deref(), eps as f64)
                        .iter()
                        .map(|&z| (z as f64 / (1.0 + (-(z as f64)).exp())) as f32)
                        .collect();
                    assert_close(&what, &got.to_vec().unwrap(), &want, TOL_F64, seed);
                }
            }
        }
    }
    // Above the parallel threshold on the CPU (rows split over threads).
    let shape = [2, 32, 40, 40];
    let (x, w, b) = (randn(numel(&shape), 6690), uniform(32, 0.5, 1.5, 6691), randn(32, 6692));
    let inputs = norm_inputs(&x, &shape, &Some(w.clone()), &Some(b.clone()));
    let got = gpu_vs_cpu("group_norm_silu (2, 32, 40, 40)", TOL, 6690, &inputs, |t| {
        t[0].group_norm_silu(8, Some(&t[1]), Some(&t[2]), eps)
    });
    let want: Vec<f32> = ref_group_norm(&x, &shape, 8, Some(&w), Some(&b), eps as f64)
        .iter()
        .map(|&z| (z as f64 / (1.0 + (-(z as f64)).exp())) as f32)
        .collect();
    assert_close("group_norm_silu (2, 32, 40, 40)", &got.to_vec().unwrap(), &want, TOL_F64, 6690);
}

#[test]
fn reduction_kernels_on_subgroups_and_on_the_tree_agree() {
    // Where the adapter has subgroups the norms, softmax and row reductions reduce with them;
    // the tree is the fallback.
    // Both against the CPU twin, forward and the fused backward, on a private context so the
    // switch touches no other test. (lavapipe has 8-lane subgroups: 32 partials per row.)
    let Some(shared) = gpu() else { return };
    let g = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = g.gpu().unwrap().clone();
    let has = ctx.features.contains(wgpu::Features::SUBGROUP);
    assert_eq!(ctx.subgroups(), has, "the subgroup kernels follow the adapter's feature");
    let shape = [2, 12, 9, 31];
    let (x, w, b) = (randn(numel(&shape), 6700), uniform(12, 0.5, 1.5, 6701), randn(12, 6702));
    let dy = randn(numel(&shape), 6703);
    let run = |dev: &Device| {
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, dev).unwrap();
        let xt = t(&x, &shape).requires_grad();
        let (wt, bt) = (t(&w, &[12]).requires_grad(), t(&b, &[12]).requires_grad());
        let y = xt.group_norm_silu(3, Some(&wt), Some(&bt), 1e-5).unwrap();
        let l = xt.layer_norm(None, None, 1e-5).unwrap();
        y.backward_with(t(&dy, &shape)).unwrap();
        let grads = [xt.grad().unwrap(), wt.grad().unwrap(), bt.grad().unwrap()].map(|g| g.to_vec().unwrap());
        // The other kernels on the same reductions: softmax (forward and backward) and the
        // row reductions (sum, mean and max over a long contiguous axis, split in chunks).
        let _ng = vipo::autograd::no_grad();
        let rows = t(&x, &[shape[0] * shape[1] * shape[2], shape[3]]);
        let sm = rows.softmax_last().unwrap();
        let smb = sm.softmax_backward(&rows.mul_scalar(0.5).unwrap()).unwrap();
        let long = t(&x, &[2, numel(&shape) / 2]);
        let red = [
            long.sum(1, false).unwrap(),
            long.mean(1, false).unwrap(),
            long.max(1, false).unwrap(),
            rows.max(1, false).unwrap(),
        ];
        let others = [sm, smb].into_iter().chain(red).map(|t| t.to_vec().unwrap()).collect::<Vec<_>>();
        (y.to_vec().unwrap(), l.to_vec().unwrap(), grads, others)
    };
    let want = run(&Device::Cpu);
    for on in [true, false] {
        ctx.set_subgroups(on);
        assert_eq!(ctx.subgroups(), on && has);
        let got = run(&g);
        let what = format!("subgroups {}", on && has);
        assert_close(&format!("group_norm_silu {what}"), &got.0, &want.0, TOL, 6700);
        assert_close(&format!("layer_norm {what}"), &got.1, &want.1, TOL, 6700);
        for (k, (gg, wg)) in got.2.iter().zip(&want.2).enumerate() {
            assert_close(&format!("gradient {k} {what}"), gg, wg, 5e-6, 6700);
        }
        let names = ["softmax", "softmax backward", "sum", "mean", "max (long)", "max (rows)"];
        for ((name, go), wo) in names.iter().zip(&got.3).zip(&want.3) {
            assert_close(&format!("{name} {what}"), go, wo, TOL, 6700);
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        assert!(has, "CI's adapter (lavapipe) has subgroups: the subgroup kernels must run there");
    }
}

#[test]
fn norms_and_softmax_cpu_parallel_paths_vs_f64() {
    // Above the CPU's parallel threshold.
    let seed = 6900;
    let x = offset(randn(200 * 320, seed), 1000.0);
    let w = uniform(320, 0.5, 1.5, seed + 1);
    let b = randn(320, seed + 2);
    let (wt, bt) = (cpu_t(&w, &[320]), cpu_t(&b, &[320]));
    let got = cpu_t(&x, &[200, 320]).layer_norm(Some(&wt), Some(&bt), 1e-5).unwrap();
    let want = ref_layer_norm(&x, 320, Some(&w), Some(&b), 1e-5);
    assert_close("cpu layer_norm (200, 320)", &got.to_vec().unwrap(), &want, TOL_F64, seed);
    let got = cpu_t(&x, &[200, 320]).softmax_last().unwrap();
    assert_close("cpu softmax (200, 320)", &got.to_vec().unwrap(), &ref_softmax(&x, 320), TOL_F64, seed);
    let shape = [2, 32, 40, 40];
    let x = randn(numel(&shape), seed + 3);
    let w = uniform(32, 0.5, 1.5, seed + 4);
    let wt = cpu_t(&w, &[32]);
    let got = cpu_t(&x, &shape).group_norm(8, Some(&wt), None, 1e-5).unwrap();
    let want = ref_group_norm(&x, &shape, 8, Some(&w), None, 1e-5);
    assert_close("cpu group_norm (2, 32, 40, 40)", &got.to_vec().unwrap(), &want, TOL_F64, seed);
}

/// The error text of `r`, which must be an error.
fn err_text(r: vipo::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got {t:?}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error '{msg}' does not mention '{p}'");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let d = Device::Cpu;
    let x = Tensor::randn(&[2, 12, 5, 7], 1, &d).unwrap();
    let w11 = Tensor::randn(&[11], 2, &d).unwrap();
    let w12 = Tensor::randn(&[12], 3, &d).unwrap();
    let w7 = Tensor::randn(&[1, 7], 4, &d).unwrap();

    let m = err_text(x.group_norm(5, None, None, 1e-5));
    assert_mentions(&m, &["group_norm", "[2, 12, 5, 7]", "5 groups"]);
    assert_mentions(&err_text(x.group_norm(0, None, None, 1e-5)), &["group_norm", "0 groups"]);
    let m = err_text(x.group_norm(4, Some(&w11), None, 1e-5));
    assert_mentions(&m, &["group_norm", "weight", "[11]", "[12]"]);
    let m = err_text(x.group_norm(4, Some(&w12), Some(&w11), 1e-5));
    assert_mentions(&m, &["group_norm", "bias", "[11]", "[12]"]);
    let v = Tensor::randn(&[12], 5, &d).unwrap();
    assert_mentions(&err_text(v.group_norm(4, None, None, 1e-5)), &["group_norm", "[12]"]);

    let m = err_text(x.layer_norm(Some(&w12), None, 1e-5));
    assert_mentions(&m, &["layer_norm", "weight", "[12]", "[7]"]);
    let m = err_text(x.layer_norm(None, Some(&w7), 1e-5));
    assert_mentions(&m, &["layer_norm", "bias", "[1, 7]"]);
    let s = Tensor::randn(&[], 6, &d).unwrap();
    assert_mentions(&err_text(s.layer_norm(None, None, 1e-5)), &["layer_norm", "[]"]);
    assert_mentions(&err_text(s.softmax_last()), &["softmax_last", "[]"]);

    assert_mentions(&err_text(x.sum(4, false)), &["sum", "axis 4", "[2, 12, 5, 7]"]);
    assert_mentions(&err_text(x.mean(-5, true)), &["mean", "axis -5"]);
    let e = Tensor::zeros(&[3, 0], &d).unwrap();
    assert_mentions(&err_text(e.max(1, false)), &["max", "[3, 0]", "empty"]);

    let m = err_text(x.sum_to_shape(&[12, 5]));
    assert_mentions(&m, &["sum_to_shape", "[2, 12, 5, 7]", "[12, 5]"]);
    let m = err_text(x.sum_to_shape(&[1, 2, 12, 5, 7]));
    assert_mentions(&m, &["sum_to_shape", "[1, 2, 12, 5, 7]"]);
    let m = err_text(x.sum_to_shape(&[3, 1, 1]));
    assert_mentions(&m, &["sum_to_shape", "[3, 1, 1]"]);
}

#[test]
fn empty_and_degenerate_shapes() {
    let d = Device::Cpu;
    // Sum over an empty axis is 0 (as in NumPy); empty outputs stay empty.
    let e = Tensor::zeros(&[3, 0], &d).unwrap();
    assert_eq!(e.sum(1, false).unwrap().to_vec().unwrap(), vec![0.0; 3]);
    assert_eq!(e.sum(0, false).unwrap().shape(), &[0]);
    assert_eq!(e.softmax_last().unwrap().shape(), &[3, 0]);
    assert_eq!(e.layer_norm(None, None, 1e-5).unwrap().shape(), &[3, 0]);
    if let Some(g) = gpu() {
        let e = Tensor::zeros(&[3, 0], &g).unwrap();
        assert_eq!(e.sum(1, false).unwrap().to_vec().unwrap(), vec![0.0; 3]);
        let e = Tensor::zeros(&[0, 4], &g).unwrap();
        assert_eq!(e.sum(1, true).unwrap().shape(), &[0, 1]);
        assert_eq!(e.softmax_last().unwrap().shape(), &[0, 4]);
        assert_eq!(e.group_norm(2, None, None, 1e-5).unwrap().shape(), &[0, 4]);
    }
}
