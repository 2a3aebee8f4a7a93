//! Matmul (all transpose combinations, batch broadcasting), fused attention and GEGLU:
//! GPU against the CPU twin, and the CPU against plain float64 loops.
mod common;
use common::*;
use vipo::{Device, Tensor};

/// f64 reference of op(A) x op(B) for one batch.
#[allow(clippy::too_many_arguments)]
fn matmul_f64(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[test]
fn matmul_transposes_and_awkward_sizes() {
    // (M, N, K): below, at and above the 64x64x16 tile; 1-sized dims.
    let sizes = [(1, 1, 1), (7, 5, 3), (65, 63, 17), (64, 64, 16), (130, 1, 33), (1, 97, 200), (33, 70, 129)];
    for (si, &(m, n, k)) in sizes.iter().enumerate() {
        for (ti, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
            let seed = (si * 4 + ti) as u64;
            let a = randn(m * k, seed);
            let b = randn(k * n, seed + 500);
            let ash = if ta { vec![k, m] } else { vec![m, k] };
            let bsh = if tb { vec![n, k] } else { vec![k, n] };
            let c = gpu_vs_cpu(
                &format!("matmul {m}x{n}x{k} ta={ta} tb={tb}"),
                1e-5,
                seed,
                &[(a.clone(), ash), (b.clone(), bsh)],
                |t| t[0].matmul_t(&t[1], ta, tb),
            );
            assert_eq!(c.shape(), &[m, n]);
            assert_close("matmul cpu vs f64", &c.to_vec().unwrap(), &matmul_f64(&a, &b, m, n, k, ta, tb), 1e-5, seed);
        }
    }
}

#[test]
fn matmul_every_tile_shape() {
    // One shape per GPU tile (64x64, 128x64, 64x128, 128x128), none a tile multiple, K not a
    // multiple of the K step, in every layout: the staging loads walk a different dimension
    // for each transpose, and the edges are partial in both directions.
    let cases = [(70, 90, 37, 1), (1500, 1000, 13, 1), (1000, 1500, 11, 1), (1800, 1830, 9, 1), (400, 390, 21, 12)];
    let want_tiles = [(64, 64), (128, 64), (64, 128), (128, 128), (128, 128)];
    for (ci, (&(m, n, k, batch), &want)) in cases.iter().zip(&want_tiles).enumerate() {
        assert_eq!(vipo::ops::matmul::tile(m, n, batch), want, "{m}x{n} batch {batch}");
        for (ti, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
            let seed = 900 + (ci * 4 + ti) as u64;
            let a = randn(batch * m * k, seed);
            let b = randn(batch * k * n, seed + 1);
            let ash = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
            let bsh = if tb { vec![batch, n, k] } else { vec![batch, k, n] };
            let c = gpu_vs_cpu(
                &format!("matmul {batch}x{m}x{n}x{k} ta={ta} tb={tb} tile {want:?}"),
                1e-5,
                seed,
                &[(a.clone(), ash), (b.clone(), bsh)],
                |t| t[0].matmul_t(&t[1], ta, tb),
            );
            // The last batch against float64 (the first is covered by the smaller tests).
            let got = c.to_vec().unwrap();
            let bi = batch - 1;
            assert_close(
                "tiled matmul cpu vs f64",
                &got[bi * m * n..],
                &matmul_f64(&a[bi * m * k..], &b[bi * k * n..], m, n, k, ta, tb),
                1e-5,
                seed,
            );
        }
    }
}

#[test]
fn linear_epilogue_every_tile_gpu_vs_cpu_vs_f64() {
    // x (B, M, K) x w (N, K)^T + bias (N) + residual (B, M, N), each term on or off; one case
    // per GPU tile (chosen by M, N and the batch), and a small batched case.
    let cases = [(1, 70, 90, 37), (1, 1500, 1000, 13), (1, 1000, 1500, 11), (1, 1800, 1830, 9), (3, 5, 7, 3)];
    for (ci, &(batch, m, n, k)) in cases.iter().enumerate() {
        for mask in 0..4u32 {
            let (with_b, with_r) = (mask & 1 != 0, mask & 2 != 0);
            let seed = 950 + (4 * ci) as u64 + mask as u64;
            let (x, w) = (randn(batch * m * k, seed), randn(n * k, seed + 1));
            let (b, r) = (randn(n, seed + 2), randn(batch * m * n, seed + 3));
            let inputs = [
                (x.clone(), vec![batch, m, k]),
                (w.clone(), vec![n, k]),
                (b.clone(), vec![n]),
                (r.clone(), vec![batch, m, n]),
            ];
            let what = format!("linear {batch}x{m}x{n}x{k} bias {with_b} residual {with_r}");
            let got = gpu_vs_cpu(&what, 1e-5, seed, &inputs, |t| {
                t[0].linear(&t[1], with_b.then(|| &t[2]), with_r.then(|| &t[3]))
            });
            assert_eq!(got.shape(), &[batch, m, n]);
            // The last batch against float64.
            let bi = batch - 1;
            let mut want = matmul_f64(&x[bi * m * k..], &w, m, n, k, false, true);
            for (i, v) in want.iter_mut().enumerate() {
                let mut s = *v as f64;
                s += if with_b { b[i % n] as f64 } else { 0.0 };
                s += if with_r { r[bi * m * n + i] as f64 } else { 0.0 };
                *v = s as f32;
            }
            assert_close(&format!("{what} cpu vs f64"), &got.to_vec().unwrap()[bi * m * n..], &want, 1e-5, seed);
        }
    }
    // Shapes of the added terms are checked and named.
    let cpu = |s: &[usize]| Tensor::from_slice(&randn(s.iter().product(), 3), s, &Device::Cpu).unwrap();
    let (x, w) = (cpu(&[2, 3, 4]), cpu(&[5, 4]));
    let e = x.linear(&w, Some(&cpu(&[4])), None).unwrap_err().to_string();
    assert!(e.contains("bias [4]") && e.contains("[5]"), "{e}");
    let e = x.linear(&w, None, Some(&cpu(&[2, 3, 4]))).unwrap_err().to_string();
    assert!(e.contains("residual [2, 3, 4]") && e.contains("[2, 3, 5]"), "{e}");
}

#[test]
fn cpu_skinny_products_split_k_alike_on_any_thread_count() {
    // The CPU path splits K for products with at most 16 rows or columns and K >= 2048 (a
    // LoRA adapter's gradients), in fixed ranges: against float64, every layout, a linear
    // layer's bias and residual (the accumulating GEMM), and the same bits on 1 and 3 threads.
    let on = |threads: usize, f: &(dyn Fn() -> Vec<f32> + Sync)| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    };
    for (ci, &(m, n, k)) in
        [(4usize, 70usize, 5000usize), (300, 3, 4100), (16, 16, 2048), (5, 40, 2047)].iter().enumerate()
    {
        for (ti, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
            let seed = 2300 + (ci * 4 + ti) as u64;
            let (a, b) = (randn(m * k, seed), randn(k * n, seed + 1));
            let ash = if ta { [k, m] } else { [m, k] };
            let bsh = if tb { [n, k] } else { [k, n] };
            let run = || {
                let at = Tensor::from_slice(&a, &ash, &Device::Cpu).unwrap();
                let bt = Tensor::from_slice(&b, &bsh, &Device::Cpu).unwrap();
                at.matmul_t(&bt, ta, tb).unwrap().to_vec().unwrap()
            };
            let (one, three) = (on(1, &run), on(3, &run));
            let what = format!("cpu matmul {m}x{n}x{k} ta={ta} tb={tb}");
            assert_close(&what, &three, &matmul_f64(&a, &b, m, n, k, ta, tb), 1e-5, seed);
            assert!(one.iter().zip(&three).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: 1 and 3 threads differ");
        }
    }
    // x (1, 5, 3000) w (9, 3000), bias and residual: the split sum lands on the epilogue's values.
    let (m, n, k) = (5, 9, 3000);
    let (x, w, bias, res) = (randn(m * k, 2400), randn(n * k, 2401), randn(n, 2402), randn(m * n, 2403));
    let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &Device::Cpu).unwrap();
    let got = t(&x, &[1, m, k]).linear(&t(&w, &[n, k]), Some(&t(&bias, &[n])), Some(&t(&res, &[1, m, n]))).unwrap();
    let mut want = matmul_f64(&x, &w, m, n, k, false, true);
    for (i, v) in want.iter_mut().enumerate() {
        *v += bias[i % n] + res[i];
    }
    assert_close("cpu skinny linear with bias and residual", &got.to_vec().unwrap(), &want, 1e-5, 2400);
}

#[test]
fn matmul_split_k_every_layout_and_epilogue() {
    // Opt-in split-K for products with few output tiles and a long K (a LoRA adapter's
    // gradients: 4 rows or columns, K = tokens): partials per K range, then their sum with bias
    // and residual. On a private context with the switch on (off by default); 2 to 16 splits,
    // a last split shorter than the others, batches, every layout, against the CPU twin and
    // float64; the GPU's timestamps show the partials' sum ran, and did not with the switch off.
    use vipo::ops::matmul::{k_splits, tile};
    let Some(shared) = gpu() else { return };
    let dev = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = dev.gpu().unwrap();
    assert!(!ctx.matmul_split_k() || std::env::var("VIPO_MATMUL_SPLIT_K").is_ok_and(|v| v == "1"), "opt-in");
    ctx.set_matmul_split_k(true);
    let on_both = |what: &str, seed: u64, inputs: &[(Vec<f32>, Vec<usize>)], f: &dyn Fn(&[Tensor]) -> Tensor| {
        let put =
            |d: &Device| -> Vec<Tensor> { inputs.iter().map(|(v, s)| Tensor::from_slice(v, s, d).unwrap()).collect() };
        let want = f(&put(&Device::Cpu));
        let got = f(&put(&dev));
        assert_close(&format!("{what} gpu vs cpu"), &got.to_vec().unwrap(), &want.to_vec().unwrap(), 1e-5, seed);
        want
    };
    // (M, N, K, batch, (splits, chunk)): an adapter's A gradient (rank 4 x 70 features), its B
    // gradient (37 x rank 4), a batched one, a 16-split one capped at SPLIT_MAX.
    let cases = [
        (4, 70, 8300, 1, (16, 528)),
        (37, 4, 2100, 1, (4, 528)),
        (4, 70, 5000, 3, (9, 560)),
        (130, 20, 1100, 1, (2, 560)),
    ];
    for (ci, &(m, n, k, batch, split)) in cases.iter().enumerate() {
        let t = tile(m, n, batch);
        let tiles = m.div_ceil(t.0) * n.div_ceil(t.1) * batch;
        assert_eq!(k_splits(tiles, k), Some(split), "{m}x{n}x{k} batch {batch}");
        for (ti, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
            let seed = 2000 + (ci * 4 + ti) as u64;
            let a = randn(batch * m * k, seed);
            let b = randn(batch * k * n, seed + 1);
            let ash = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
            let bsh = if tb { vec![batch, n, k] } else { vec![batch, k, n] };
            let what = format!("split-K matmul {batch}x{m}x{n}x{k} ta={ta} tb={tb}");
            let c =
                on_both(&what, seed, &[(a.clone(), ash), (b.clone(), bsh)], &|t| t[0].matmul_t(&t[1], ta, tb).unwrap());
            let bi = batch - 1;
            let want = matmul_f64(&a[bi * m * k..], &b[bi * k * n..], m, n, k, ta, tb);
            assert_close(&format!("{what} cpu vs f64"), &c.to_vec().unwrap()[bi * m * n..], &want, 1e-5, seed);
        }
    }
    // A linear layer's bias and residual through the split sum: x (2, 20, 1300), w (7, 1300).
    let (bsz, m, n, k) = (2, 20, 7, 1300);
    for mask in 0..4u32 {
        let (with_b, with_r) = (mask & 1 != 0, mask & 2 != 0);
        let seed = 2100 + mask as u64;
        let inputs = [
            (randn(bsz * m * k, seed), vec![bsz, m, k]),
            (randn(n * k, seed + 1), vec![n, k]),
            (randn(n, seed + 2), vec![n]),
            (randn(bsz * m * n, seed + 3), vec![bsz, m, n]),
        ];
        let what = format!("split-K linear bias {with_b} residual {with_r}");
        on_both(&what, seed, &inputs, &|t| t[0].linear(&t[1], with_b.then(|| &t[2]), with_r.then(|| &t[3])).unwrap());
    }
    // f16 operands (storage) take the same path.
    if ctx.features.contains(wgpu::Features::SHADER_F16) {
        use vipo::tensor::DType;
        let half = |v: &[f32], s: &[usize], d: &Device| {
            Tensor::from_slice(v, s, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap().to(d).unwrap()
        };
        let (av, bv) = (randn(37 * 2100, 2200), randn(2100 * 4, 2201));
        let want = half(&av, &[37, 2100], &Device::Cpu).matmul(&half(&bv, &[2100, 4], &Device::Cpu)).unwrap();
        let got = half(&av, &[37, 2100], &dev).matmul(&half(&bv, &[2100, 4], &dev)).unwrap();
        assert_close("split-K f16 matmul gpu vs cpu", &got.to_vec().unwrap(), &want.to_vec().unwrap(), 1e-5, 2200);
    }
    // Which kernels ran, with the switch on and off.
    if !ctx.gpu_timer_start() {
        assert!(std::env::var("CI").is_err(), "CI's lavapipe has TIMESTAMP_QUERY");
        return;
    }
    let a = Tensor::from_slice(&randn(37 * 2100, 1), &[37, 2100], &dev).unwrap();
    let b = Tensor::from_slice(&randn(2100 * 4, 2), &[2100, 4], &dev).unwrap();
    let ran = |c: Tensor| {
        c.to_vec().unwrap();
        let t = ctx.gpu_timer_stop().unwrap();
        t.kernels.iter().map(|k| format!("{}/{}", k.shader, k.entry)).collect::<Vec<_>>()
    };
    let on = ran(a.matmul(&b).unwrap());
    assert!(on.iter().any(|r| r == "conv2d_split/main"), "the partials were not summed: {on:?}");
    ctx.set_matmul_split_k(false);
    assert!(ctx.gpu_timer_start());
    let off = ran(a.matmul(&b).unwrap());
    assert!(!off.iter().any(|r| r.starts_with("conv2d_split")), "split with the switch off: {off:?}");
}

#[test]
fn matmul_f16_operands_every_tile_and_layout() {
    // f16 storage, f32 arithmetic: the f16 kernels against the CPU twin (which widens the same
    // f16 values) and against float64 loops on those values; one shape per tile, every layout.
    // A product of two f16 values is exact in f32, so only the summation order differs.
    use vipo::tensor::DType;
    let cases = [(70, 90, 37, 1), (1500, 1000, 13, 1), (1000, 1500, 11, 1), (1800, 1830, 9, 1), (40, 39, 21, 3)];
    let g = gpu_f16();
    for (ci, &(m, n, k, batch)) in cases.iter().enumerate() {
        for (ti, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
            let seed = 980 + (ci * 4 + ti) as u64;
            let ash = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
            let bsh = if tb { vec![batch, n, k] } else { vec![batch, k, n] };
            let half = |v: Vec<f32>, s: &[usize], dev: &Device| {
                Tensor::from_slice(&v, s, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap().to(dev).unwrap()
            };
            let (av, bv) = (randn(batch * m * k, seed), randn(batch * k * n, seed + 1));
            let (a, b) = (half(av.clone(), &ash, &Device::Cpu), half(bv.clone(), &bsh, &Device::Cpu));
            let what = format!("f16 matmul {batch}x{m}x{n}x{k} ta={ta} tb={tb}");
            let want = a.matmul_t(&b, ta, tb).unwrap();
            assert_eq!(want.dtype(), DType::F32, "{what}: the product is f32");
            // The last batch on the CPU against float64 on the rounded values.
            let (a16, b16) = (a.to_vec().unwrap(), b.to_vec().unwrap());
            let bi = batch - 1;
            let w = want.to_vec().unwrap();
            let reference = matmul_f64(&a16[bi * m * k..], &b16[bi * k * n..], m, n, k, ta, tb);
            assert_close(&format!("{what} cpu vs f64"), &w[bi * m * n..], &reference, 1e-5, seed);
            if let Some(d) = &g {
                let (ag, bg) = (half(av, &ash, d), half(bv, &bsh, d));
                let got = ag.matmul_t(&bg, ta, tb).unwrap_or_else(|e| panic!("{what} on gpu: {e}"));
                assert_close(&format!("{what} gpu vs cpu"), &got.to_vec().unwrap(), &w, 1e-5, seed);
            }
        }
    }
    // An f16 left operand with an f32 right one, and a tracked f16 operand, are errors.
    let a = Tensor::from_slice(&randn(6, 1), &[2, 3], &Device::Cpu).unwrap();
    let h = a.to_dtype(DType::F16).unwrap();
    let e = h.matmul_t(&a, false, true).unwrap_err().to_string();
    assert!(e.contains("f16 x f32"), "{e}");
    let e = h.requires_grad().matmul_t(&h, false, true).unwrap_err().to_string();
    assert!(e.contains("no backward"), "{e}");
}

/// What f16 arithmetic computes, emulated: A's values rounded to f16, each K step of `bk`
/// products summed in f16, the steps summed in f32. WGSL lets `fma` round once (`fused`) or
/// after the product and the sum (lavapipe does the latter).
#[allow(clippy::too_many_arguments)]
fn matmul_f16_math_ref(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    bk: usize,
    fused: bool,
) -> Vec<f32> {
    use half::f16;
    let h = |v: f32| f16::from_f32(v).to_f64();
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for k0 in (0..k).step_by(bk) {
                let mut part = 0f64;
                for p in k0..(k0 + bk).min(k) {
                    let av = h(if ta { a[p * m + i] } else { a[i * k + p] });
                    let bv = h(if tb { b[j * k + p] } else { b[p * n + j] });
                    let prod = if fused { av * bv } else { f16::from_f64(av * bv).to_f64() };
                    part = f16::from_f64(prod + part).to_f64();
                }
                acc += part as f32;
            }
            c[i * n + j] = acc;
        }
    }
    c
}

#[test]
fn matmul_f16_arithmetic_every_tile_and_layout() {
    // Opt-in f16 arithmetic (f16 tiles, each K step summed in f16, f32 across steps), for f16
    // operands and for an f32 A with an f16 B, on a private context (the switch would change
    // other tests' f16 results). Against an emulation of exactly that arithmetic, and further
    // from exact float64 than the f32-arithmetic kernels are: so f16 math really ran.
    use vipo::tensor::DType;
    let Some(shared) = gpu_f16() else {
        eprintln!("no GPU with SHADER_F16: skipped");
        return;
    };
    let dev = Device::open_private(shared.gpu().unwrap().index).unwrap();
    let ctx = dev.gpu().unwrap();
    assert!(!ctx.f16_math() || std::env::var("VIPO_F16_MATH").is_ok_and(|v| v == "1"), "f16 math is opt-in");
    ctx.set_f16_math(true);
    assert!(ctx.f16_math());
    let cases = [(70, 90, 37, 1), (1500, 1000, 45, 1), (1000, 1500, 29, 1), (1800, 1830, 19, 1), (40, 39, 21, 3)];
    for (ci, &(m, n, k, batch)) in cases.iter().enumerate() {
        let (tm, tn) = vipo::ops::matmul::tile(m, n, batch);
        let bk = if (tm, tn) == (64, 64) { 16 } else { 8 };
        for (ti, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
            for a_half in [true, false] {
                let seed = 1200 + (ci * 8 + ti * 2) as u64 + a_half as u64;
                let ash = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
                let bsh = if tb { vec![batch, n, k] } else { vec![batch, k, n] };
                let (av, bv) = (randn(batch * m * k, seed), randn(batch * k * n, seed + 1));
                let a = Tensor::from_slice(&av, &ash, &dev).unwrap();
                let a = if a_half { a.to_dtype(DType::F16).unwrap() } else { a };
                let b = Tensor::from_slice(&bv, &bsh, &dev).unwrap().to_dtype(DType::F16).unwrap();
                let what = format!("f16-math matmul {batch}x{m}x{n}x{k} ta={ta} tb={tb} f16 A {a_half}");
                let got = a.matmul_t(&b, ta, tb).unwrap_or_else(|e| panic!("{what}: {e}")).to_vec().unwrap();
                let bi = batch - 1;
                let got = &got[bi * m * n..];
                let (asl, bsl) = (&av[bi * m * k..], &bv[bi * k * n..]);
                let fused = matmul_f16_math_ref(asl, bsl, m, n, k, ta, tb, bk, true);
                let unfused = matmul_f16_math_ref(asl, bsl, m, n, k, ta, tb, bk, false);
                let (e_fused, e_unfused) = (rel_err(got, &fused), rel_err(got, &unfused));
                let emulated = if e_fused <= e_unfused { &fused } else { &unfused };
                let h = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect::<Vec<_>>();
                let exact = matmul_f64(&h(asl), &h(bsl), m, n, k, ta, tb);
                let e_exact = rel_err(got, &exact);
                eprintln!("{what}: vs fused f16 {e_fused:.2e}, unfused {e_unfused:.2e}, exact {e_exact:.2e}");
                // Ties of the two roundings aside, the kernel is one of the two, to the bit.
                assert_close(&format!("{what} vs emulated f16 arithmetic"), got, emulated, 1e-4, seed);
                assert!(e_exact > 1e-5, "{what}: as exact as f32 arithmetic ({e_exact:.2e}): f16 math did not run");
                assert!(e_exact < 1e-2, "{what}: {e_exact:.2e} from exact");
            }
        }
    }
}

#[test]
fn linear_with_an_f16_weight_is_the_f32_linear_of_its_rounding() {
    // A frozen weight stored in f16 is read as f16 by the kernels (f32 activations): the
    // result must be the f32 kernel's on the rounded weight, bit for bit (the products of
    // widened values are the same, in the same order), per tile and for dX in the backward.
    use vipo::tensor::DType;
    let cases = [(70, 90, 37, 1), (1500, 1000, 13, 1), (1000, 1500, 11, 1), (1800, 1830, 9, 1), (40, 39, 21, 3)];
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu_f16());
    for dev in devs {
        for (ci, &(m, n, k, batch)) in cases.iter().enumerate() {
            let seed = 1100 + ci as u64;
            let x = Tensor::from_slice(&randn(batch * m * k, seed), &[batch, m, k], &dev).unwrap().requires_grad();
            let w16 = Tensor::from_slice(&randn(n * k, seed + 1), &[n, k], &dev).unwrap().to_dtype(DType::F16).unwrap();
            let w32 = w16.to_dtype(DType::F32).unwrap();
            let b = Tensor::from_slice(&randn(n, seed + 2), &[n], &dev).unwrap();
            let what = format!("linear f16 weight {batch}x{m}x{n}x{k} on {dev}");
            let got = x.linear(&w16, Some(&b), None).unwrap();
            let want = x.linear(&w32, Some(&b), None).unwrap();
            assert!(
                got.to_vec().unwrap() == want.to_vec().unwrap(),
                "{what}: not the f32 result on the rounded weight"
            );
            let dy = Tensor::from_slice(&randn(batch * m * n, seed + 3), &[batch, m, n], &dev).unwrap();
            got.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            let g16 = x.grad().unwrap().to_vec().unwrap();
            x.zero_grad();
            want.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g16 == x.grad().unwrap().to_vec().unwrap(), "{what}: dX differs");
        }
    }
}

#[test]
fn matmul_batched_and_broadcast() {
    let (m, n, k) = (19, 23, 37);
    // Both batched (2, 3, ...), and a shared 2-D weight on either side.
    let cases: [(Vec<usize>, Vec<usize>); 3] =
        [(vec![2, 3, m, k], vec![2, 3, k, n]), (vec![2, 3, m, k], vec![k, n]), (vec![m, k], vec![5, k, n])];
    for (ci, (sa, sb)) in cases.into_iter().enumerate() {
        let seed = 40 + ci as u64;
        let a = randn(numel(&sa), seed);
        let b = randn(numel(&sb), seed + 1);
        let c = gpu_vs_cpu(
            &format!("batched matmul {sa:?} x {sb:?}"),
            1e-5,
            seed,
            &[(a.clone(), sa.clone()), (b.clone(), sb.clone())],
            |t| t[0].matmul(&t[1]),
        );
        let batch = c.numel() / (m * n);
        let got = c.to_vec().unwrap();
        for bi in 0..batch {
            let ab = if sa.len() > 2 { &a[bi * m * k..(bi + 1) * m * k] } else { &a[..] };
            let bb = if sb.len() > 2 { &b[bi * k * n..(bi + 1) * k * n] } else { &b[..] };
            assert_close(
                "batched cpu vs f64",
                &got[bi * m * n..(bi + 1) * m * n],
                &matmul_f64(ab, bb, m, n, k, false, false),
                1e-5,
                seed,
            );
        }
    }
}

#[test]
fn matmul_shape_errors_name_the_shapes() {
    let a = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4, 5], &Device::Cpu).unwrap();
    let e = a.matmul(&b).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[2, 3]") && e.contains("[4, 5]") && e.contains("3 != 4"), "{e}");
    let c = Tensor::zeros(&[2, 3, 5], &Device::Cpu).unwrap();
    let d = Tensor::zeros(&[3, 5, 2], &Device::Cpu).unwrap();
    assert!(c.matmul(&d).unwrap_err().to_string().contains("batch"));
}

/// f64 attention for one (batch*head): softmax(q k^T * scale) v.
#[allow(clippy::too_many_arguments)]
fn attention_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f64,
) -> Vec<f32> {
    let mut o = vec![0.0; bh * lq * dv];
    for b in 0..bh {
        for i in 0..lq {
            let s: Vec<f64> = (0..lk)
                .map(|j| {
                    (0..d).map(|c| q[(b * lq + i) * d + c] as f64 * k[(b * lk + j) * d + c] as f64).sum::<f64>() * scale
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..dv {
                o[(b * lq + i) * dv + c] =
                    ((0..lk).map(|j| e[j] * v[(b * lk + j) * dv + c] as f64).sum::<f64>() / z) as f32;
            }
        }
    }
    o
}

#[test]
fn attention_self_and_cross() {
    // (batch, heads, Lq, Lk, D, Dv): self, cross with a 77-like key length, a single key,
    // query counts off the 64-row tile and key counts off the 8-key tile, SD1.5's largest head (160), and a wider head that takes the chunked GPU path.
    let cases = [
        (1, 2, 70, 70, 40, 40),
        (2, 3, 65, 13, 8, 8),
        (1, 1, 5, 1, 3, 3),
        (2, 1, 129, 77, 16, 24),
        (1, 1, 33, 9, 160, 160),
        (1, 2, 11, 6, 192, 170),
        // The fixed-head kernels (40, 64, 80), keys off the 8-key tile.
        (1, 2, 66, 77, 40, 40),
        (1, 1, 70, 13, 64, 64),
        (2, 1, 67, 29, 80, 80),
        // Equal dims that have no fixed kernel, and 40 against another Dv: the generic one.
        (1, 1, 20, 11, 48, 48),
        (1, 1, 20, 11, 40, 24),
    ];
    for (ci, &(b, h, lq, lk, d, dv)) in cases.iter().enumerate() {
        let seed = 60 + ci as u64;
        let q = randn(b * h * lq * d, seed);
        let k = randn(b * h * lk * d, seed + 1);
        let v = randn(b * h * lk * dv, seed + 2);
        let inputs = [(q.clone(), vec![b, h, lq, d]), (k.clone(), vec![b, h, lk, d]), (v.clone(), vec![b, h, lk, dv])];
        let o = gpu_vs_cpu(&format!("attention {:?}", cases[ci]), 2e-5, seed, &inputs, |t| {
            t[0].attention(&t[1], &t[2], None)
        });
        assert_eq!(o.shape(), &[b, h, lq, dv]);
        let want = attention_f64(&q, &k, &v, b * h, lq, lk, d, dv, 1.0 / (d as f64).sqrt());
        assert_close("attention cpu vs f64", &o.to_vec().unwrap(), &want, 2e-5, seed);
    }
}

#[test]
fn attention_is_stable_for_large_scores() {
    // Scores around 1e3 overflow a naive exp; the online softmax must not.
    let (lq, lk, d) = (9, 20, 4);
    let q: Vec<f32> = randn(lq * d, 1).iter().map(|x| x * 40.0).collect();
    let k: Vec<f32> = randn(lk * d, 2).iter().map(|x| x * 40.0).collect();
    let v = randn(lk * d, 3);
    let inputs = [(q.clone(), vec![1, lq, d]), (k.clone(), vec![1, lk, d]), (v.clone(), vec![1, lk, d])];
    let o = gpu_vs_cpu("attention large scores", 2e-5, 1, &inputs, |t| t[0].attention(&t[1], &t[2], Some(1.0)));
    let got = o.to_vec().unwrap();
    assert!(got.iter().all(|x| x.is_finite()));
    assert_close("attention large cpu vs f64", &got, &attention_f64(&q, &k, &v, 1, lq, lk, d, d, 1.0), 2e-5, 1);
}

#[test]
fn attention_rejects_mismatched_shapes() {
    let q = Tensor::zeros(&[1, 4, 8], &Device::Cpu).unwrap();
    let k = Tensor::zeros(&[1, 5, 7], &Device::Cpu).unwrap();
    let e = q.attention(&k, &k, None).unwrap_err().to_string();
    assert!(e.contains("attention") && e.contains("[1, 4, 8]") && e.contains("[1, 5, 7]"), "{e}");
}

#[test]
fn geglu_gpu_vs_cpu_and_f64() {
    let shape = vec![3, 7, 2 * 45];
    let x = randn(numel(&shape), 9).iter().map(|v| v * 2.0).collect::<Vec<_>>();
    let y = gpu_vs_cpu("geglu", 2e-6, 9, &[(x.clone(), shape)], |t| t[0].geglu());
    assert_eq!(y.shape(), &[3, 7, 45]);
    let got = y.to_vec().unwrap();
    for r in 0..21 {
        for c in 0..45 {
            let h = x[r * 90 + c] as f64;
            let g = x[r * 90 + 45 + c] as f64;
            let want = h * 0.5 * g * (1.0 + erf_ref(g / std::f64::consts::SQRT_2));
            assert!((got[r * 45 + c] as f64 - want).abs() < 1e-5, "geglu at {r},{c}");
        }
    }
    assert!(Tensor::zeros(&[2, 3], &Device::Cpu).unwrap().geglu().is_err());
}
