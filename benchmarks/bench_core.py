"""Core curvature costs on CPU: one HVP relative to one gradient, and critical_weight_decay on a 1 M-parameter MLP.

Usage: python benchmarks/bench_core.py [--device cpu|cuda] [--repeats 20]
Prints one line per measurement; the ratio is measured in the same process on the same model and batch.
"""

from __future__ import annotations

import argparse
import time

import torch

import mirrorsym as ms
from mirrorsym.core import HVP, gradient


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 512),
                                torch.nn.Tanh(), torch.nn.Linear(512, 1)).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(256, 512, device=dev), torch.randn(256, 1, device=dev)
    params = {k: v.detach() for k, v in model.named_parameters()}

    loss = ms.loss_from_model(model, lambda out, target: ((out - target) ** 2).mean())
    data = (x, y)
    hvp = HVP(loss, params, data)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    t_grad = timed(lambda: gradient(loss, params, data), args.repeats, dev)
    t_hvp = timed(lambda: hvp(v), args.repeats, dev)
    t_dbl = timed(lambda: hvp._double_backward(v), args.repeats, dev)
    print(f"model: MLP 512-1024-512-1 tanh, {n_params:,} parameters, batch 256, {dev}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"gradient: {t_grad * 1e3:.2f} ms   HVP (forward-over-reverse): {t_hvp * 1e3:.2f} ms   "
          f"ratio HVP/gradient: {t_hvp / t_grad:.2f}")
    print(f"HVP by double backward (the fallback): {t_dbl * 1e3:.2f} ms   ratio to gradient: {t_dbl / t_grad:.2f}")
    m = ms.Mirror.sign_flip({"0.weight": (0, [7]), "0.bias": (0, [7]), "2.weight": (1, [7])})
    t0 = time.perf_counter()
    res = ms.theory.projected_curvature(loss, params, m, data, max_hvps=100)
    t_cwd = time.perf_counter() - t0
    print(f"critical_weight_decay (k = {m.dim(params)}, Lanczos): {t_cwd:.3f} s, {res.hvps} HVPs, "
          f"gamma_c = {res.gamma:.4g}")


if __name__ == "__main__":
    main()
