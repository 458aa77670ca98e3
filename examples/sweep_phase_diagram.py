"""Tutorial: sweep a phase diagram, locally or on a Ray cluster.

``ms.sweep.Sweep`` trains many copies of one model at once (torch.func: stacked parameters, vmapped
steps, per-copy learning rate / weight decay / batch size / seed as tensors), stores every finished chunk
in a resumable results store and returns a DataFrame. This script sweeps the Hadamard model
f(x) = xᵀ(u ⊙ w) (closed form A: with coupled decay λ, full-batch training reaches the lasso with
``alpha = λ/2``) over weight decay λ × learning rate η at a small batch size, and draws the phase diagram
of the support size |{i : |u_i w_i| > 10⁻³}|. Minibatch noise adds zeros: at large η the support falls
below the lasso's.

Run: ``python examples/sweep_phase_diagram.py [--tiny] [--out DIR] [--backend local|ray] [--address ADDR]``.
With ``--backend ray`` and no ``--address`` Ray starts a local instance; on a cluster, run
``ray start --head`` there and pass ``--address auto`` (or ``ray://host:10001``). A rerun with the same
``--out`` loads the finished runs instead of training them again.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import Lasso  # noqa: E402
from torch import nn  # noqa: E402

import mirrorsym as ms  # noqa: E402

D = 20


class Hadamard(nn.Module):
    """f(x) = xᵀ(u ⊙ w): every coordinate has the rescaling mirror symmetries of closed form A."""

    def __init__(self, d: int = D, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = nn.Parameter(0.5 * torch.randn(d, generator=g))
        self.w = nn.Parameter(0.5 * torch.randn(d, generator=g))

    def forward(self, x):
        return x @ (self.u * self.w)


def make_model(seed: int) -> nn.Module:
    """The sweep's model factory: seed -> module (deterministic in the seed)."""
    return Hadamard(D, seed)


def support(params, data):
    """A metric: the number of coordinates off the collapsed surface u_i = w_i = 0."""
    return ((params["u"] * params["w"]).abs() > 1e-3).sum()


def regression_data(n: int = 256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    beta = torch.zeros(D)
    beta[:6] = torch.tensor([2.0, -1.5, 1.0, -0.7, 0.4, 0.2])
    return x, x @ beta + 0.5 * torch.randn(n, generator=g)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("MIRRORSYM_TINY")),
                        help="test sizes (also set by the MIRRORSYM_TINY environment variable)")
    parser.add_argument("--out", type=Path, default=Path("out/sweep_phase_diagram"), help="folder for the figures")
    parser.add_argument("--runs", type=Path, default=None, help="results store (default: OUT/runs)")
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--address", default=None, help="Ray cluster address (with --backend ray)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs or args.out / "runs"
    x, y = regression_data()
    if args.tiny:
        decays, lrs, seeds, steps = [0.0, 0.2, 0.6], [0.02, 0.1], [0], 300
    else:
        decays = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8]
        lrs, seeds, steps = [0.01, 0.03, 0.06, 0.1, 0.15], [0, 1], 4000

    sweep = ms.sweep.Sweep(
        make_model,
        torch.nn.functional.mse_loss,                 # criterion(model(x), y), a mean over the batch
        (x, y),
        grid={"weight_decay": decays, "lr": lrs, "seed": seeds, "batch_size": 8, "steps": steps},
        metrics={"loss": "loss", "support": support},
        record_every=max(steps // 10, 1),
        name="hadamard-phase",
    )
    t0 = time.perf_counter()
    df = sweep.run(runs, backend=args.backend, address=args.address, progress=False)
    t1 = time.perf_counter()
    again = sweep.run(runs, backend=args.backend, address=args.address, progress=False)   # resumes: nothing to do
    t2 = time.perf_counter()
    print(f"{len(df)} runs in {t1 - t0:.1f} s ({df['status'].value_counts().to_dict()}); "
          f"rerun from the store in {t2 - t1:.2f} s, identical: {again['support'].equals(df['support'])}")
    print(df[["weight_decay", "lr", "seed", "status", "loss", "support"]].head(8))
    print("ms.sweep.load_results gives the same rows:", len(ms.sweep.load_results(runs)) == len(df))

    # The lasso reference (the lr → 0, full-batch limit): support of Lasso(alpha = λ/2).
    lasso_support = [
        int((Lasso(alpha=max(lam / 2, 1e-6), fit_intercept=False, max_iter=50_000)
             .fit(x.double().numpy(), y.double().numpy()).coef_ != 0).sum())
        for lam in decays
    ]

    # Figures ----------------------------------------------------------------------------------------------
    ok = df[df["status"] == "ok"]
    table = ok.groupby(["lr", "weight_decay"])["support"].mean().unstack()
    table = table.reindex(index=lrs, columns=decays)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    im = ax[0].imshow(table.to_numpy(), origin="lower", aspect="auto", cmap="viridis")
    ax[0].set_xticks(range(len(decays)), [f"{d:g}" for d in decays])
    ax[0].set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        ax[0].text(j, i, "div." if np.isnan(value) else f"{value:.0f}", ha="center", va="center",
                   color="w", fontsize=8)
    ax[0].set_xlabel("torch weight_decay λ (γ = λ/2)")
    ax[0].set_ylabel("learning rate η")
    ax[0].set_title("Support size (mean over seeds), batch size 8")
    fig.colorbar(im, ax=ax[0], label="|{i : |u_i w_i| > 1e-3}|")
    for lr in lrs:
        sub = ok[ok["lr"] == lr].groupby("weight_decay")["support"].mean()
        ax[1].plot(sub.index, sub.to_numpy(), "o-", ms=4, label=f"SGD η = {lr:g}")
    ax[1].plot(decays, lasso_support, "k--", lw=2, label="lasso, alpha = λ/2")
    ax[1].set_xlabel("torch weight_decay λ")
    ax[1].set_ylabel("support size")
    ax[1].set_title("Large η: minibatch noise adds zeros beyond the lasso's")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "phase_diagram.png", dpi=110)
    plt.close(fig)
    print(f"\nfigures written to {args.out}; results stored in {runs}")


if __name__ == "__main__":
    main()
