#!/usr/bin/env python3
"""PyTorch CPU peer measurements for `vipo bench`.

Times the same operator cases that `vipo bench` prints (matmul, conv2d 3x3,
scaled-dot-product attention, group_norm), on the CPU, in float32, under
torch.no_grad(), so the two outputs can be joined by case name.

Each case gets warm-up runs (at least --warmup calls and ~0.2 s), then the
median over --repeats timed samples is reported. Small cases run several
calls per sample (so a sample lasts at least --min-sample-ms); big cases get
fewer repeats (at least 3) so that no case takes much more than
--case-budget-s. The whole run takes well under three
minutes on a 2-core machine.

Usage (needs only torch; benches/README.md says how to install it):

    python3 benches/pytorch_ops.py                 # readable table
    python3 benches/pytorch_ops.py --json > torch.json
    python3 benches/pytorch_ops.py --threads 2 --json > torch.json
    python3 benches/pytorch_ops.py --filter matmul  # only cases whose name contains "matmul"

With --json, stdout is a JSON array of
    {"name", "device": "pytorch-cpu", "threads", "ms", "gflops", "gbps"}
objects ("ms" is the median milliseconds per call; "gflops" / "gbps" is null
where it does not apply), and the torch version and thread count go to stderr.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DEVICE = "pytorch-cpu"
TORCH_DEVICE = "cpu"


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float32, device=TORCH_DEVICE)


def _sync():
    # CUDA launches are asynchronous: time finished work, as vipo's bench does.
    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def case_matmul(m, n, k):
    def setup():
        a = _randn(m, k)
        b = _randn(k, n)
        return lambda: torch.matmul(a, b)

    return (f"matmul {m}x{n}x{k}", setup, 2.0 * m * n * k, None)


def case_matmul_f16(m, n, k):
    # PyTorch's half matmul: f16 in and out; on CUDA, cuBLAS on tensor cores with f32
    # accumulation. vipo's f16 case reads f16 and computes in f32 on the shader cores.
    def setup():
        a = _randn(m, k).half()
        b = _randn(k, n).half()
        return lambda: torch.matmul(a, b)

    return (f"matmul f16 {m}x{n}x{k}", setup, 2.0 * m * n * k, None)


def case_conv2d(c, px, batch=1):
    def setup():
        x = _randn(batch, c, px, px)
        w = _randn(c, c, 3, 3) * (1.0 / math.sqrt(c * 9))
        b = _randn(c)
        return lambda: F.conv2d(x, w, b, stride=1, padding=1)

    tag = f" b{batch}" if batch > 1 else ""
    return (f"conv2d {c}ch {px}px{tag}", setup, 2.0 * batch * c * c * 9 * px * px, None)


def case_conv2d_f16(c, px):
    # PyTorch's half conv (no bias: vipo's f16 case has none either).
    def setup():
        x = _randn(1, c, px, px).half()
        w = (_randn(c, c, 3, 3) * (1.0 / math.sqrt(c * 9))).half()
        return lambda: F.conv2d(x, w, None, stride=1, padding=1)

    return (f"conv2d f16 {c}ch {px}px", setup, 2.0 * c * c * 9 * px * px, None)


def case_conv2d_grad_input(c, px):
    # The input gradient alone (a frozen weight: what the LoRA step's resnets need).
    def setup():
        dy = _randn(1, c, px, px)
        w = _randn(c, c, 3, 3) * (1.0 / math.sqrt(c * 9))
        return lambda: torch.nn.grad.conv2d_input((1, c, px, px), w, dy, stride=1, padding=1)

    return (f"conv2d grad_input {c}ch {px}px", setup, 2.0 * c * c * 9 * px * px, None)


def case_attention(kind, lq, lk, heads, d, batch=1):
    def setup():
        q = _randn(batch, heads, lq, d)
        k = _randn(batch, heads, lk, d)
        v = _randn(batch, heads, lk, d)
        return lambda: F.scaled_dot_product_attention(q, k, v)

    name = f"attention {kind} {lq}x{lk} h{heads} d{d}"
    return (name, setup, 4.0 * batch * heads * lq * lk * d, None)


def case_attention_backward(lq, heads, d):
    # Forward and backward, q, k and v all requiring grad, dY given (vipo's case: the same).
    def setup():
        q, k, v = (_randn(1, heads, lq, d).requires_grad_() for _ in range(3))
        dy = _randn(1, heads, lq, d)

        def run():
            with torch.enable_grad():  # the cases run under no_grad
                out = F.scaled_dot_product_attention(q, k, v)
                return torch.autograd.grad(out, (q, k, v), dy)

        return run

    name = f"attention self fwd+bwd {lq}x{lq} h{heads} d{d}"
    return (name, setup, 14.0 * heads * lq * lq * d, None)


def case_group_norm(c, px, groups, batch):
    def setup():
        x = _randn(batch, c, px, px)
        w = _randn(c)
        b = _randn(c)
        return lambda: F.group_norm(x, groups, w, b, eps=1e-5)

    numel = batch * c * px * px
    return (f"group_norm {c}ch {px}px g{groups}", setup, None, 2.0 * numel * 4)


CASES = [
    case_matmul(512, 512, 512),
    case_matmul(1024, 1024, 1024),
    case_matmul(2048, 2048, 2048),
    case_matmul(4096, 4096, 4096),
    case_matmul(4096, 320, 320),
    case_matmul(4096, 1280, 320),
    case_matmul(4, 320, 16384),
    case_matmul(320, 4, 16384),
    case_matmul_f16(512, 512, 512),
    case_matmul_f16(4096, 4096, 4096),
    case_matmul_f16(4096, 1280, 320),
    case_conv2d(320, 64),
    case_conv2d(640, 32),
    case_conv2d(1280, 16),
    case_conv2d(1280, 8),
    case_conv2d(320, 64, 4),
    case_conv2d(1280, 8, 4),
    case_conv2d_f16(320, 64),
    case_conv2d_f16(1280, 8),
    case_conv2d_grad_input(320, 64),
    case_conv2d_grad_input(640, 32),
    case_conv2d_grad_input(1280, 8),
    case_attention("self", 4096, 4096, 8, 40),
    case_attention_backward(4096, 8, 40),
    case_attention("cross", 4096, 77, 8, 40),
    case_group_norm(320, 64, 32, batch=1),
    case_group_norm(1280, 16, 32, batch=2),
]


def time_case(fn, warmup, repeats, min_sample_ms, case_budget_s):
    """Median milliseconds per call of fn(), the number of samples, calls per sample."""
    # Warm-up: at least `warmup` calls and at least ~0.2 s (first calls pay for
    # allocation, page faults and kernel selection).
    t_end = time.perf_counter() + 0.2
    done = 0
    while done < max(1, warmup) or (time.perf_counter() < t_end and done < 1000):
        fn()
        done += 1
    _sync()

    # Calibrate calls per sample: double until one sample lasts min_sample_ms.
    inner = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync()
        t_sample = time.perf_counter() - t0
        if t_sample * 1e3 >= min_sample_ms or inner >= 1 << 16:
            break
        inner *= 2

    # Samples: --repeats, fewer (but at least 3) for cases too big for the budget.
    n = max(3, min(repeats, int(case_budget_s / max(t_sample, 1e-9))))

    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync()
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples), n, inner


def main(argv=None):
    p = argparse.ArgumentParser(
        description="PyTorch CPU peer measurements for `vipo bench`.")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads(N) (default: os.cpu_count())")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed samples per case; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls before timing each case, at least ~0.2 s of them (default 2)")
    p.add_argument("--min-sample-ms", type=float, default=200.0,
                   help="small cases run several calls per sample to last this long (default 200)")
    p.add_argument("--case-budget-s", type=float, default=8.0,
                   help="rough time limit for the timed samples of one case (default 8)")
    p.add_argument("--filter", default=None,
                   help="only run cases whose name contains this string")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array to stdout (info goes to stderr)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: time on the GPU, fp32 with TF32 off (the peer of vipo's f32 kernels)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms per shape (torch.backends.cudnn.benchmark); "
                        "without it, fp32 convs of some shapes take a path 40x slower than the rest")
    args = p.parse_args(argv)

    global DEVICE, TORCH_DEVICE
    TORCH_DEVICE = args.device
    DEVICE = "pytorch-" + args.device
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = sys.stderr if args.json else sys.stdout
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"float32, {args.device}", file=info, flush=True)

    results = []
    t_start = time.perf_counter()
    with torch.no_grad():
        for name, setup, flops, nbytes in CASES:
            if args.filter and args.filter not in name:
                continue
            fn = setup()
            ms, n, inner = time_case(fn, args.warmup, args.repeats,
                                     args.min_sample_ms, args.case_budget_s)
            del fn
            secs = ms / 1e3
            row = {
                "name": name,
                "device": DEVICE,
                "threads": args.threads,
                "ms": round(ms, 4),
                "gflops": round(flops / secs / 1e9, 3) if flops else None,
                "gbps": round(nbytes / secs / 1e9, 3) if nbytes else None,
            }
            results.append(row)
            if args.json:
                print(f"  {name}: {ms:.3f} ms ({n} samples x {inner} calls)",
                      file=sys.stderr, flush=True)
            else:
                rate = (f"{row['gflops']:10.2f} GFLOP/s" if flops
                        else f"{row['gbps']:10.2f} GB/s   ")
                print(f"{name:<36} {ms:11.3f} ms {rate}   "
                      f"({n} samples x {inner} calls)", flush=True)
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s", file=info, flush=True)

    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
