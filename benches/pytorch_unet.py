#!/usr/bin/env python3
"""PyTorch peer of `vipo bench model`: diffusers' UNet2DConditionModel from the same config
(random weights), float32, the same cases under the same names:

  unet forward b{B} {S}x{S}              forward of B latents (B, 4, S, S), timestep 500, context (B, 77, 768)
  lora poly-dpo step {N} pairs {S}x{S}   LoRA (rank R on to_q/to_k/to_v/to_out.0) Poly-DPO step: reference
                                         forward with the adapters off, policy forward + backward, gradients
                                         clipped to norm 1 (as vipo and diffusers' DPO script), AdamW

Usage: python benches/pytorch_unet.py [--config models/sd15/unet/config.json] [--latent 64] [--batch 1]
       [--pairs 2] [--rank 4] [--repeats 2] [--threads N] [--device cpu|cuda] [--checkpointing]
       [--cudnn-benchmark] [--json]
Needs torch and diffusers (no weights are downloaded: the model is built from the config).
"""
import argparse, json, statistics, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoraLinear(nn.Module):
    """base(x) + scale * up(down(x)), PEFT's layout; `enabled` switches the adapter off for the reference."""

    enabled = True

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        # On the base layer's device: the UNet is already there when the adapters are added.
        dev = base.weight.device
        self.down = nn.Linear(base.in_features, rank, bias=False, device=dev)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.scale = 1.0

    def forward(self, x):
        y = self.base(x)
        if LoraLinear.enabled:
            y = y + self.scale * self.up(self.down(x))
        return y


def add_lora(unet, rank):
    params = []
    for name, module in list(unet.named_modules()):
        for child_name in ("to_q", "to_k", "to_v"):
            child = getattr(module, child_name, None)
            if isinstance(child, nn.Linear):
                lora = LoraLinear(child, rank)
                setattr(module, child_name, lora)
                params += [lora.down.weight, lora.up.weight]
        to_out = getattr(module, "to_out", None)
        if isinstance(to_out, nn.ModuleList) and isinstance(to_out[0], nn.Linear):
            lora = LoraLinear(to_out[0], rank)
            to_out[0] = lora
            params += [lora.down.weight, lora.up.weight]
    return params


def timed(fn, repeats, device):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="models/sd15/unet/config.json")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the training step")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN time its algorithms per shape (torch.backends.cudnn.benchmark)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = json.load(open(a.config))
    unet = UNet2DConditionModel.from_config(cfg).to(a.device).float()
    unet.requires_grad_(False)
    s, c, dev = a.latent, unet.config.in_channels, a.device
    ctx_dim = unet.config.cross_attention_dim
    out = []

    x = torch.randn(a.batch, c, s, s, device=dev)
    t = torch.full((a.batch,), 500.0, device=dev)
    ctx = torch.randn(a.batch, 77, ctx_dim, device=dev)

    def fwd():
        with torch.no_grad():
            unet(x, t, ctx).sample.cpu()

    out.append({"case": f"unet forward b{a.batch} {s}x{s}", "device": dev, "seconds": timed(fwd, a.repeats, dev),
                "peak_bytes": peak(dev)})

    if not a.forward_only:
        params = add_lora(unet, a.rank)
        if a.checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        opt = torch.optim.AdamW(params, lr=1e-5)
        n = a.pairs
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0).float().to(dev)
        lw, ll = torch.randn(n, c, s, s, device=dev), torch.randn(n, c, s, s, device=dev)
        noise = torch.randn(n, c, s, s, device=dev)
        ts = torch.randint(0, 1000, (n,), device=dev)
        ehs = torch.randn(n, 77, ctx_dim, device=dev)
        beta, alpha = 5000.0, 1.0

        def step():
            opt.zero_grad(set_to_none=True)
            x0 = torch.cat([lw, ll])
            eps = torch.cat([noise, noise])
            tt = torch.cat([ts, ts])
            ab = abar[tt].view(-1, 1, 1, 1)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            cond = torch.cat([ehs, ehs])
            with torch.no_grad():
                LoraLinear.enabled = False
                ref = unet(xt, tt, cond).sample
                LoraLinear.enabled = True
            pred = unet(xt, tt, cond).sample
            e = F.mse_loss(pred, eps, reduction="none").mean(dim=[1, 2, 3])
            r = F.mse_loss(ref, eps, reduction="none").mean(dim=[1, 2, 3])
            z = -0.5 * beta * ((e[:n] - r[:n]) - (e[n:] - r[n:]))
            p = torch.sigmoid(z)
            loss = (-F.logsigmoid(z) + alpha * (1 - p)).mean()
            loss.backward()
            # As vipo's step (and diffusers' train_diffusion_dpo.py): clipped to norm 1.
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        sec = timed(step, a.repeats, dev)
        ck = " ckpt" if a.checkpointing else ""
        out.append({"case": f"lora poly-dpo step {n} pairs {s}x{s}{ck}", "device": dev, "seconds": sec,
                    "pairs_per_s": n / sec, "peak_bytes": peak(dev)})

    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for r in out:
            print(f"{r['case']:<36} {r['device']:<6} {r['seconds']:9.3f} s")


if __name__ == "__main__":
    main()
