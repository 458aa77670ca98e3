"""Sweep engine against the loop a user writes, and against a hand-batched ceiling, in the same process.

Three ways to train the same grid of runs, timed in interleaved rounds (medians reported):

(a) **plain** — the loop a user writes, one run after the other: an ``nn.Module``, ``torch.optim.SGD``
    with ``weight_decay`` (and ``momentum``), ``torch.randint`` minibatches from a ``torch.Generator`` per
    run, and the same metrics every 100 steps (``.item()`` on the host, as anyone would). Timed on
    ``--plain-runs`` evenly spaced configs and extrapolated linearly to the whole grid (all runs cost the
    same). **This is the baseline of every ratio.**
(b) **engine** — ``ms.sweep.Sweep.run`` (local backend, one chunk of all configs, metrics recorded,
    results written to Parquet in a temporary directory): what a user of mirrorsym runs.
(c) **ideal** — the same runs hand-batched as one tensor program: stacked parameters, manual gradient,
    ``torch.randint`` minibatches, no metrics, no divergence checks, nothing stored. The ceiling.
(b') with ``--compile``: the engine with ``Sweep.run(..., compile=True)`` (the traced step compiled by
    inductor), compile time included; the first round may pay a cold inductor cache, later rounds find
    it warm (per-round times are printed).

The engine draws its minibatches from its own counter-based generator (:mod:`mirrorsym.sweep.rng`), not
from ``torch.randint``; :func:`mirrorsym.sweep.train_plain` replays a run with ``torch.optim`` on exactly
those minibatches. It is the *correctness reference* (checked, not timed): the engine's final losses must
equal its own to float round-off.

Problems:

1. Sparsity sweep (docs/theory.md#closed-form-a): Hadamard regression f(x) = Σ u_i w_i x_i, d = 100,
   n = 1000 isotropic samples, 10-sparse teacher, noise 0.1; 256 configs = 8 weight decays × 4 lrs ×
   8 seeds, minibatch 32, 2000 steps, metrics (loss, support size) every 100 steps.
2. Digits MLP (compute-bound): scikit-learn ``load_digits`` (1797 × 64), MLP 64-64-10 tanh,
   cross-entropy; 64 configs = 4 lrs × 4 weight decays × 4 seeds, minibatch 64, momentum 0.9, 500 steps,
   metrics (loss, accuracy) every 100 steps.

    python benchmarks/bench_sweep.py                 # CPU, torch's default threads
    python benchmarks/bench_sweep.py --threads 1
    python benchmarks/bench_sweep.py --device cuda   # GPU variant
    python benchmarks/bench_sweep.py --quick         # smoke run (fewer steps, one round)
    python benchmarks/bench_sweep.py --compile       # also time the engine with compile=True

The last line is ``speedup: <float>``: engine vs plain on the sparsity sweep.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

import mirrorsym as ms


# ----------------------------------------------------------------------------- problems
class Hadamard(nn.Module):
    """f(x) = Σ_i u_i w_i x_i: lasso in disguise (docs/theory.md#closed-form-a)."""

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


# ----------------------------------------------------------------------------- (a) the plain loop
def plain_hadamard(factory, X, y, config, device, record_every=100):
    """What a user writes: module, torch.optim.SGD(weight_decay=...), torch.randint minibatches."""
    model = factory(config["seed"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"])
    gen = torch.Generator(device=device).manual_seed(config["seed"])
    n, batch = X.shape[0], config["batch_size"]
    history = []
    for step in range(config["steps"]):
        idx = torch.randint(n, (batch,), generator=gen, device=device)
        loss = nn.functional.mse_loss(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % record_every == 0 or step + 1 == config["steps"]:
            with torch.no_grad():
                full = nn.functional.mse_loss(model(X), y).item()
                nonzero = int(((model.u * model.w).abs() > 1e-3).sum())
            history.append((full, nonzero))
    return history


def plain_digits(factory, X, y, config, device, record_every=100):
    model = factory(config["seed"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"])
    gen = torch.Generator(device=device).manual_seed(config["seed"])
    n, batch = X.shape[0], config["batch_size"]
    history = []
    for step in range(config["steps"]):
        idx = torch.randint(n, (batch,), generator=gen, device=device)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % record_every == 0 or step + 1 == config["steps"]:
            with torch.no_grad():
                out = model(X)
                history.append((nn.functional.cross_entropy(out, y).item(),
                                (out.argmax(-1) == y).double().mean().item()))
    return history


# ----------------------------------------------------------------------------- (c) the hand-batched ceiling
def _hyper(configs, key, device, dtype=torch.float32):
    return torch.tensor([c[key] for c in configs], dtype=dtype, device=device)


def ideal_hadamard(factory, X, y, configs, device):
    """All runs as one program: β = u ⊙ w, r = X_B β − y_B, ∇_β = 2/B X_Bᵀ r; coupled decay, plain SGD."""
    models = [factory(c["seed"]) for c in configs]
    u = torch.stack([m.u.detach() for m in models]).to(device)
    w = torch.stack([m.w.detach() for m in models]).to(device)
    lr, wd = _hyper(configs, "lr", device)[:, None], _hyper(configs, "weight_decay", device)[:, None]
    K, batch, steps = len(configs), configs[0]["batch_size"], configs[0]["steps"]
    n, d = X.shape
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(n, (K * batch,), generator=gen, device=device)
        xb, yb = X.index_select(0, idx).view(K, batch, d), y.index_select(0, idx).view(K, batch)
        r = torch.bmm(xb, (u * w).unsqueeze(-1)).squeeze(-1) - yb
        g_beta = torch.bmm(r.unsqueeze(1), xb).squeeze(1).mul_(2.0 / batch)
        u, w = u - lr * (g_beta * w + wd * u), w - lr * (g_beta * u + wd * w)
    return u * w


def ideal_digits(factory, X, y, configs, device):
    """Two-layer tanh MLP, cross-entropy, manual backward with bmm; momentum SGD with coupled decay."""
    models = [factory(c["seed"]) for c in configs]
    params = [torch.stack([list(m.parameters())[i].detach() for m in models]).to(device) for i in range(4)]
    bufs = [torch.zeros_like(p) for p in params]
    K, batch, steps = len(configs), configs[0]["batch_size"], configs[0]["steps"]
    lr, wd, mu = (_hyper(configs, k, device) for k in ("lr", "weight_decay", "momentum"))
    shape = lambda v, p: v.view(-1, *([1] * (p.dim() - 1)))  # noqa: E731
    n, d = X.shape
    classes = 10
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(n, (K * batch,), generator=gen, device=device)
        xb, yb = X.index_select(0, idx).view(K, batch, d), y.index_select(0, idx).view(K, batch)
        w1, b1, w2, b2 = params
        h = torch.tanh(torch.baddbmm(b1.unsqueeze(1), xb, w1.transpose(1, 2)))
        logits = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))
        dlogits = torch.softmax(logits, -1)
        dlogits -= nn.functional.one_hot(yb, classes).to(dlogits.dtype)
        dlogits /= batch
        dh = torch.bmm(dlogits, w2) * (1 - h * h)
        grads = [torch.bmm(dh.transpose(1, 2), xb), dh.sum(1), torch.bmm(dlogits.transpose(1, 2), h),
                 dlogits.sum(1)]
        new = []
        for p, g, b in zip(params, grads, bufs, strict=True):
            g = g + shape(wd, p) * p
            b.mul_(shape(mu, p)).add_(g)
            new.append(p - shape(lr, p) * b)
        params = new
    return params


# ----------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _load() -> str:
    return "{:.2f}/{:.2f}/{:.2f}".format(*os.getloadavg())


def compare(sweep: ms.sweep.Sweep, plain, ideal, device: str, plain_runs: int, rounds: int,
            chunk_size: int, compile_step: bool = False) -> dict:
    """Interleaved rounds of (a) plain on a subset, (b) the engine, (c) the ideal; medians and ratios."""
    data = tuple(t.to(device) for t in sweep.problem.data)
    factory = sweep.problem.model_factory
    picks = np.linspace(0, len(sweep) - 1, plain_runs).round().astype(int)
    warm = [dict(c, steps=10) for c in sweep.configs[:chunk_size]]
    ms.sweep.train_chunk(sweep.problem, warm, device)  # allocator, vmap caches
    ideal(factory, *data, warm, device)
    plain(factory, *data, dict(sweep.configs[0], steps=10), device)
    times: dict[str, list[float]] = {"plain": [], "engine": [], "ideal": []}
    if compile_step:
        times["compiled"] = []
    loads = []
    df = None
    plain_hist = {}
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        for i in picks:
            plain_hist[int(i)] = plain(factory, *data, sweep.configs[i], device)
        _sync(device)
        times["plain"].append((time.perf_counter() - t0) * len(sweep) / len(picks))
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            df = sweep.run(out + "/timed", device=device, chunk_size=chunk_size, progress=False)
            _sync(device)
            times["engine"].append(time.perf_counter() - t0)
            if compile_step:
                t0 = time.perf_counter()
                dfc = sweep.run(out + "/compiled", device=device, chunk_size=chunk_size, progress=False,
                                compile=True)
                _sync(device)
                times["compiled"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ideal(factory, *data, sweep.configs, device)
        _sync(device)
        times["ideal"].append(time.perf_counter() - t0)
    loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    # correctness reference: the engine = torch.optim on the engine's own minibatches (not timed)
    ref_picks = picks[:: max(1, len(picks) // 4)]
    refs = [ms.sweep.train_plain(sweep.problem, sweep.configs[i], device=device) for i in ref_picks]
    ref_diff = max(abs(r["history_loss"][-1] - df["loss"][i]) / max(1.0, abs(r["history_loss"][-1]))
                   for r, i in zip(refs, ref_picks, strict=True))
    # the plain loop solves the same problem (other minibatches): final losses agree statistically
    stat_diff = float(np.median([abs(plain_hist[int(i)][-1][0] - df["loss"][i]) / max(1e-12, abs(df["loss"][i]))
                                 for i in picks]))
    name = sweep.problem.name
    print(f"  {name}: {len(sweep)} configs; medians of {rounds} interleaved rounds (load during rounds "
          f"{min(loads):.2f}-{max(loads):.2f})")
    print(f"    (a) plain   {med['plain']:8.2f} s  (timed {len(picks)} runs, x{len(sweep) / len(picks):.0f}; "
          f"rounds {', '.join(f'{t:.1f}' for t in times['plain'])})")
    labels = [("engine", "(b) engine"), ("ideal", "(c) ideal ")]
    if compile_step:
        labels.insert(1, ("compiled", "(b') comp."))
    for key, label in labels:
        per_round = [p / t for p, t in zip(times["plain"], times[key], strict=True)]
        print(f"    {label}  {med[key]:8.2f} s  {med['plain'] / med[key]:6.1f}x plain  (rounds "
              f"{', '.join(f'{t:.2f}' for t in times[key])}; per-round ratio "
              f"{', '.join(f'{r:.1f}' for r in per_round)})")
    print(f"    engine time / ideal time: {med['engine'] / med['ideal']:.2f}")
    if compile_step:
        drift = float(np.max(np.abs(dfc["loss"] - df["loss"]) / np.maximum(1.0, np.abs(df["loss"]))))
        print(f"    compiled vs uncompiled engine: max rel. final-loss diff {drift:.1e}")
    print(f"    engine vs its correctness reference (train_plain, engine minibatches): max rel. final-loss "
          f"diff {ref_diff:.1e} over {len(refs)} runs; vs plain (other minibatches): median rel. diff "
          f"{stat_diff:.1e}; diverged {int((df['status'] == 'diverged').sum())}")
    return {**med, "ref_diff": ref_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--quick", action="store_true", help="200 / 100 steps, 1 round")
    parser.add_argument("--plain-runs", type=int, default=16, help="configs of the plain loop timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", choices=["hadamard", "digits"], default=None)
    parser.add_argument("--compile", action="store_true", help="also time Sweep.run(..., compile=True)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    device = str(ms.sweep.resolve_device(args.device))
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, cpus {os.cpu_count()}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""))
    print(f"load average (1/5/15 min) at start: {_load()}")
    hadamard = None
    if args.only in (None, "digits"):
        digits = compare(digits_sweep(100 if args.quick else 500), plain_digits, ideal_digits, device,
                         min(args.plain_runs, 8), rounds, args.chunk_size, args.compile)
        print(f"digits speedup: {digits['plain'] / digits['engine']:.2f}")
    if args.only in (None, "hadamard"):
        hadamard = compare(hadamard_sweep(200 if args.quick else 2000), plain_hadamard, ideal_hadamard, device,
                           args.plain_runs, rounds, args.chunk_size, args.compile)
    print(f"load average (1/5/15 min) at end: {_load()}")
    if hadamard is not None:
        print(f"speedup: {hadamard['plain'] / hadamard['engine']:.2f}")


if __name__ == "__main__":
    main()
