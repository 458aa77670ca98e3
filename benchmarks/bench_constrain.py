"""Benchmark the constrain layer (results go to BENCHMARKS.md, section "Constrain").

1. Per-step training time, constrained / plain, measured interleaved in the same process:
   DCS ``sparse`` (every Linear/Conv weight), ``units`` (``apply(kind="units")``), ``low_rank`` (every
   Linear) and ``remove_symmetries`` (parametrize and optimizer modes), on an MLP, a CNN with BatchNorm
   and (``--resnet``, meant for ``--device cuda``) a ResNet-18-like network (BasicBlocks [2, 2, 2, 2]).
2. Digits classifier (scikit-learn ``load_digits``) with the same L1 objective L + κ‖θ‖₁ optimised three
   ways (DCS, L1 subgradient, proximal L1 / ISTA) plus magnitude pruning (``torch.nn.utils.prune``) at the
   DCS sparsity: test accuracy and the fraction of exact zeros.

Usage:  python benchmarks/bench_constrain.py [--device cpu|cuda] [--threads 1] [--resnet] [--quick]
        [--mlp-batch 128] [--kinds sparse,units,low_rank,syre_param,syre_opt] [--skip-cnn]
        [--skip-timing] [--skip-digits]
GPU run (later): python benchmarks/bench_constrain.py --device cuda --resnet --skip-digits
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

import mirrorsym as ms
from mirrorsym.experiments.permutation import ResNet18

console = Console()


# ----------------------------------------------------------------------------- models
def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def constrain(model, kind, x):
    """Apply one constraint in place; returns (model, optimizer-side handle or None)."""
    if kind == "plain":
        return model, None
    if kind in ("sparse", "low_rank"):
        ms.constrain.apply(model, x, kind=kind)
        return model, None
    if kind == "units":
        ms.constrain.apply(model, x, kind="units")
        return model, None
    if kind == "syre_param":
        ms.remove_symmetries(model, sigma=0.01, seed=0)
        return model, None
    if kind == "syre_opt":
        return model, "syre_opt"
    raise ValueError(kind)


def make_step(model, kind, x, y):
    model, handle = constrain(model, kind, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0 if handle else 5e-4)
    if handle == "syre_opt":
        ms.remove_symmetries(model, sigma=0.01, seed=0, mode="optimizer", weight_decay=5e-4, optimizer=opt)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def time_steps(step, n, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def bench_overhead(name, build, x, y, kinds, device, steps, repeats):
    """Median per-step time of each kind, rounds interleaved (plain, k1, k2, ..., plain, k1, ...)."""
    torch.manual_seed(0)
    base = build().to(device)
    steps_fn = {k: make_step(copy.deepcopy(base), k, x, y) for k in ["plain", *kinds]}
    for fn in steps_fn.values():  # warm-up
        time_steps(fn, 3, device)
    samples = {k: [] for k in steps_fn}
    for _ in track(range(repeats), description=f"{name}: timing", console=console, transient=True):
        for k, fn in steps_fn.items():
            samples[k].append(time_steps(fn, steps, device))
    med = {k: statistics.median(v) for k, v in samples.items()}
    best = {k: min(v) for k, v in samples.items()}  # least disturbed by other processes on a shared box
    return [(name, k, med[k] * 1e3, med[k] / med["plain"], best[k] / best["plain"]) for k in steps_fn]


# ----------------------------------------------------------------------------- digits comparison
def digits_data(device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    f = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return f(Xtr, torch.float32), f(ytr, torch.long), f(Xte, torch.float32), f(yte, torch.long)


def digits_net():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def train_digits(method, kappa, data, epochs, seed=0):
    """Minimise CE + κ‖W‖₁ (weights only) with SGD+momentum, minibatch 64; ``method`` picks how."""
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = digits_net().to(Xtr.device)
    lr = 0.05
    if method == "dcs":
        for m in model:
            if isinstance(m, nn.Linear):
                ms.constrain.sparse(m, "weight")
        groups = ms.constrain.param_groups(model, weight_decay=ms.constrain.weight_decay_for(l1=kappa))
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for idx in torch.randperm(len(Xtr), generator=g).split(64):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(Xtr[idx]), ytr[idx])
            if method == "l1_subgradient":
                loss = loss + kappa * sum(w.abs().sum() for w in weights(model))
            loss.backward()
            opt.step()
            if method == "proximal_l1":
                with torch.no_grad():
                    for w in weights(model):
                        w.copy_(torch.sign(w) * (w.abs() - lr * kappa).clamp_min(0))
    return ms.constrain.bake(model) and model or model


def evaluate(model, data):
    _, _, Xte, yte = data
    with torch.no_grad():
        acc = (model(Xte).argmax(1) == yte).float().mean().item()
    w = torch.cat([p.detach().reshape(-1) for p in weights(model)])
    return acc, (w == 0).float().mean().item(), (w.abs() <= 1e-8).float().mean().item()


def magnitude_prune(sparsity, data, epochs):
    """Dense training (κ = 0), global magnitude pruning to ``sparsity``, then fine-tuning with the mask."""
    from torch.nn.utils import prune

    model = train_digits("dense", 0.0, data, epochs)
    prune.global_unstructured(
        [(m, "weight") for m in model if isinstance(m, nn.Linear)],
        pruning_method=prune.L1Unstructured,
        amount=sparsity,
    )
    Xtr, ytr, _, _ = data
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(max(1, epochs // 3)):
        for idx in torch.randperm(len(Xtr), generator=g).split(64):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    for m in model:
        if isinstance(m, nn.Linear):
            prune.remove(m, "weight")
    return model


def threshold_to(model, sparsity):
    """Global magnitude thresholding (no fine-tuning) of the Linear weights to ``sparsity``."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(
        [(m, "weight") for m in linears], pruning_method=prune.L1Unstructured, amount=sparsity
    )
    for m in linears:
        prune.remove(m, "weight")
    return model


def bench_digits(device, epochs, kappas):
    """Per κ: each method's own result, then the others brought to the DCS sparsity s (fraction |w| ≤ 1e-8):
    magnitude thresholding of the L1 solutions (if sparser than s, left as is) and prune + fine-tune."""
    data = digits_data(device)
    rows = []
    for kappa in track(kappas, description="digits", console=console, transient=True):
        models = {m: train_digits(m, kappa, data, epochs) for m in ("dcs", "l1_subgradient", "proximal_l1")}
        results = {m: evaluate(model, data) for m, model in models.items()}
        rows += [(m, f"{kappa:g}", *r) for m, r in results.items()]
        s = results["dcs"][2]
        for m in ("l1_subgradient", "proximal_l1"):
            if results[m][1] < s:
                rows.append(
                    (f"{m} → thresholded to s", f"{kappa:g}", *evaluate(threshold_to(models[m], s), data))
                )
        rows.append(
            (
                "magnitude prune + fine-tune to s",
                f"{kappa:g}",
                *evaluate(magnitude_prune(s, data, epochs), data),
            )
        )
    rows.append(("dense (no penalty)", "0", *evaluate(train_digits("dense", 0.0, data, epochs), data)))
    return rows


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--resnet", action="store_true", help="also time a ResNet-18-like network")
    ap.add_argument("--resnet-width", type=int, default=None, help="default 64 on cuda, 16 on cpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--mlp-batch", type=int, default=128)
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--kinds", default="sparse,units,low_rank,syre_param,syre_opt", help="comma-separated")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    steps, repeats = (3, 3) if args.quick else (20, 15)
    kinds = args.kinds.split(",")

    if not args.skip_timing:
        timing(args, device, kinds, steps, repeats)
    if not args.skip_digits:
        digits(args, device)


def timing(args, device, kinds, steps, repeats):
    rows = []
    bs = args.mlp_batch
    x, y = torch.randn(bs, 784, device=device), torch.randint(0, 10, (bs,), device=device)
    rows += bench_overhead(f"MLP 784-512-512-10, batch {bs}", mlp, x, y, kinds, device, steps, repeats)
    if not args.skip_cnn:
        x, y = torch.randn(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device)
        rows += bench_overhead("CNN 2 conv+BN, 32x32, batch 32", cnn, x, y, kinds, device, steps, repeats)
    if args.resnet:
        width = args.resnet_width or (64 if device.type == "cuda" else 16)
        bs = 128 if device.type == "cuda" else 16
        x, y = torch.randn(bs, 3, 32, 32, device=device), torch.randint(0, 10, (bs,), device=device)
        rows += bench_overhead(
            f"ResNet-18-like width {width}, batch {bs}",
            lambda: ResNet18(width),
            x,
            y,
            [k for k in kinds if k != "low_rank"],  # a ResNet has one Linear: nothing to time
            device,
            steps,
            repeats,
        )
    table = Table(title=f"per-step time, device={device}, threads={torch.get_num_threads()}")
    for col in ("model", "variant", "median ms/step", "ratio (medians)", "ratio (best rounds)"):
        table.add_column(col)
    for name, k, t, r, rb in rows:
        table.add_row(name, k, f"{t:.2f}", f"{r:.3f}", f"{rb:.3f}")
    console.print(table)


def digits(args, device):
    kappas = [1e-3, 3e-3, 1e-2] if not args.quick else [1e-2]
    epochs = 10 if args.quick else 200
    table = Table(title=f"digits MLP 64-128-10: CE + κ‖W‖₁ (SGD+momentum, {epochs} epochs)")
    for col in ("method", "κ", "test acc", "exact zeros", "|w| ≤ 1e-8"):
        table.add_column(col)
    for method, kappa, acc, zeros, tiny in bench_digits(device, epochs, kappas):
        table.add_row(method, kappa, f"{acc:.3f}", f"{zeros:.3f}", f"{tiny:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
