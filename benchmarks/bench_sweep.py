"""Sweep engine: vmapped chunks vs the sequential loop over configs, in the same process.

1. Sparsity sweep (THEORY.md §3 closed form A): Hadamard regression f(x) = Σ u_i w_i x_i, d = 100,
   n = 1000 isotropic samples, 10-sparse teacher, noise 0.1; 256 configs = 8 weight decays × 4 lrs ×
   8 seeds, minibatch 32, 2000 steps, metrics (loss, support size) every 100 steps.
2. Digits MLP: scikit-learn ``load_digits`` (1797 × 64), MLP 64-64-10 tanh, cross-entropy; 64 configs =
   4 lrs × 4 weight decays × 4 seeds, minibatch 64, momentum 0.9, 500 steps.

The baseline is :func:`mirrorsym.sweep.train_plain`: one model, ``torch.optim.SGD``, the same minibatches
and metrics. It is timed on an evenly spaced subset of ``--baseline-runs`` configs and extrapolated
linearly to the whole grid (runs are identical in cost); its results are checked against the sweep's.

    python benchmarks/bench_sweep.py                 # CPU (threads: torch default)
    python benchmarks/bench_sweep.py --device cuda   # GPU variant
    python benchmarks/bench_sweep.py --quick         # smoke run (fewer steps)

The last line is ``speedup: <float>`` for the sparsity sweep.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
from torch import nn

import mirrorsym as ms


class Hadamard(nn.Module):
    """f(x) = Σ_i u_i w_i x_i: lasso in disguise (THEORY.md §3 A)."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = nn.Parameter(torch.randn(d, generator=g) * 0.5)
        self.w = nn.Parameter(torch.randn(d, generator=g) * 0.5)

    def forward(self, x):
        return (x * (self.u * self.w)).sum(-1)


def hadamard_factory(seed: int) -> nn.Module:
    return Hadamard(100, seed)


def support(params, data):
    return ((params["u"] * params["w"]).abs() > 1e-3).sum()


def hadamard_sweep(steps: int) -> ms.sweep.Sweep:
    g = torch.Generator().manual_seed(0)
    n, d = 1000, 100
    X = torch.randn(n, d, generator=g)
    beta = torch.zeros(d)
    beta[:10] = torch.randn(10, generator=g)
    y = X @ beta + 0.1 * torch.randn(n, generator=g)
    grid = {"weight_decay": [0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0], "lr": [0.003, 0.01, 0.02, 0.04],
            "seed": list(range(8)), "batch_size": 32, "steps": steps}
    return ms.sweep.Sweep(hadamard_factory, nn.functional.mse_loss, (X, y), grid,
                          metrics={"loss": "loss", "support": support}, record_every=100, name="hadamard")


def mlp_factory(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def digits_sweep(steps: int) -> ms.sweep.Sweep:
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    grid = {"lr": [0.01, 0.03, 0.1, 0.3], "weight_decay": [0.0, 1e-4, 1e-3, 1e-2], "seed": [0, 1, 2, 3],
            "momentum": 0.9, "batch_size": 64, "steps": steps}
    return ms.sweep.Sweep(mlp_factory, nn.functional.cross_entropy, (X, y), grid,
                          metrics={"loss": "loss", "accuracy": "accuracy"}, record_every=100, name="digits")


def compare(sweep: ms.sweep.Sweep, device: str, baseline_runs: int, chunk_size: int) -> float:
    """Time the whole sweep vmapped, and ``baseline_runs`` configs sequentially; return the ratio."""
    with tempfile.TemporaryDirectory() as out:
        warmup = [dict(c, steps=10) for c in sweep.configs[:chunk_size]]
        ms.sweep.train_chunk(sweep.problem, warmup, device)  # allocator, kernels, vmap caches
        t0 = time.perf_counter()
        df = sweep.run(out + "/timed", device=device, chunk_size=chunk_size, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        vmapped = time.perf_counter() - t0
    picks = np.linspace(0, len(sweep) - 1, baseline_runs).round().astype(int)
    t0 = time.perf_counter()
    refs = [ms.sweep.train_plain(sweep.problem, sweep.configs[i], device=device) for i in picks]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    sequential = (time.perf_counter() - t0) * len(sweep) / len(picks)
    diffs = [abs(r["history_loss"][-1] - df["loss"][i]) / max(1.0, abs(r["history_loss"][-1]))
             for r, i in zip(refs, picks, strict=True)]
    speedup = sequential / vmapped
    print(f"  {sweep.problem.name}: {len(sweep)} configs, vmapped {vmapped:.2f} s, sequential "
          f"{sequential:.2f} s (timed {len(picks)} configs, extrapolated x{len(sweep) / len(picks):.0f}), "
          f"speedup {speedup:.1f}x; max rel. final-loss diff vs plain loop {max(diffs):.1e}; "
          f"diverged {int((df['status'] == 'diverged').sum())}")
    return speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--quick", action="store_true", help="200 / 100 steps instead of 2000 / 500")
    parser.add_argument("--baseline-runs", type=int, default=16, help="configs timed sequentially")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(ms.sweep.resolve_device(args.device))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}, "
          f"device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""))
    digits = compare(digits_sweep(100 if args.quick else 500), device, min(args.baseline_runs, 8),
                     args.chunk_size)
    print(f"digits speedup: {digits:.2f}")
    hadamard = compare(hadamard_sweep(200 if args.quick else 2000), device, args.baseline_runs,
                       args.chunk_size)
    print(f"speedup: {hadamard:.2f}")


if __name__ == "__main__":
    main()
