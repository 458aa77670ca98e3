"""Benchmark: ``ms.diagnose`` (weights only) on torchvision ResNet-50 and ViT-B/16, CPU.

Needs torchvision (not in the main venv): run with the zoo venv, e.g.

    .venv-zoo/bin/python benchmarks/bench_diagnose.py --threads 2

Weights are the architectures' random initialisation (seeded; no download), which is what a weights-only
diagnosis costs regardless of the values. Measured per model: one forward pass on one 224×224 image
(the baseline: the ratio column is time / forward), ``find_symmetries``, ``diagnose`` given the map
without plot data, and ``diagnose`` with plot data plus ``plot()``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

import mirrorsym as ms


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def build(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def bench(name: str) -> dict:
    model = build(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_fwd, _ = _timed(lambda: model(x), repeat=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_find, smap = _timed(lambda: ms.detect.find_symmetries(model, x))
    t_diag, rep = _timed(lambda: ms.diagnose(model, x, symmetries=smap, plots=False))
    with tempfile.TemporaryDirectory() as out:
        t_plot, _ = _timed(lambda: ms.diagnose(model, x, symmetries=smap).plot(out))
    kinds = rep.to_pandas()["kind"].value_counts().to_dict()
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "groups": len(smap.groups),
            "kinds": kinds, "forward": t_fwd, "find": t_find, "diagnose": t_diag, "diagnose+plot": t_plot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print("| model | params | groups | forward (s) | find_symmetries (s) | diagnose (s) | ratio | "
          "diagnose + plot (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name)
        f = r["forward"]
        print(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['groups']} | {f:.3f} | {r['find']:.2f} | "
              f"{r['diagnose']:.2f} | {r['diagnose'] / f:.0f}× | {r['diagnose+plot']:.2f} | "
              f"{r['diagnose+plot'] / f:.0f}× |", flush=True)
        print(f"<!-- {r['model']} group kinds: {r['kinds']}; load {os.getloadavg()[0]:.1f} -->", flush=True)


if __name__ == "__main__":
    main()
