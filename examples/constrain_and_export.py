"""Tutorial: constrain by symmetry (DCS) and export a smaller model.

A differentiable constraint by symmetry reparametrises a tensor so that it gains an artificial mirror,
e.g. θ = u ⊙ v; coupled weight decay λ on the factors then *is* an L1 / group-lasso / nuclear-norm penalty
with coefficient λ, and the constraint holds exactly (not approximately) above its threshold. This script

1. ``ms.constrain.sparse``: linear regression with θ = u ⊙ v trained by plain gradient descent lands on
   scikit-learn's lasso solution with ``alpha = λ/2``;
2. ``ms.constrain.low_rank``: W = A Bᵀ fitted to a matrix M lands on the soft-thresholded singular
   values max(σ_i(M) − λ, 0), and ``ms.constrain.export`` splits W into two thin Linear layers;
3. ``ms.constrain.apply(kind="units")``: one gate per hidden unit of an MLP on scikit-learn's digits
   (group lasso over units); ``ms.constrain.export`` drops the dead units and returns a physically smaller
   ``nn.Sequential`` with the same function.

Run: ``python examples/constrain_and_export.py [--tiny] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import Lasso  # noqa: E402
from torch import nn  # noqa: E402

import mirrorsym as ms  # noqa: E402


def sparse_regression(steps: int, lam: float = 0.2):
    """θ = u ⊙ v, L = mean (y − Xθ)², coupled decay λ on (u, v)  ⇔  L + λ‖θ‖₁  ⇔  Lasso(alpha = λ/2)."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 20
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    beta = torch.zeros(d, dtype=torch.float64)
    beta[:5] = torch.tensor([2.0, -1.5, 1.0, -0.5, 0.25], dtype=torch.float64)
    y = x @ beta + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)

    lin = nn.Linear(d, 1, bias=False).double()
    ms.constrain.sparse(lin, "weight")                       # lin.weight is now u ⊙ v (same values)
    opt = torch.optim.SGD(ms.constrain.param_groups(lin, weight_decay=lam), lr=0.05)
    for _ in range(steps):
        loss = ((lin(x).squeeze(1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    theta = lin.weight.detach().squeeze(0).numpy()
    lasso = Lasso(alpha=lam / 2, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x.numpy(), y.numpy())
    return theta, lasso.coef_, beta.numpy()


def low_rank_fit(steps: int, lam: float = 1.5):
    """W = A Bᵀ, L = ½‖W − M‖²_F, coupled decay λ on (A, B)  ⇔  L + λ‖W‖_*  ⇒  σ_i(W) = max(σ_i(M) − λ, 0)."""
    g = torch.Generator().manual_seed(1)
    m, n = 12, 10
    M = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    M = M + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(n, m, bias=False)).double()   # export splits Linear layers inside a parent
    ms.constrain.low_rank(net[0], "weight")
    opt = torch.optim.SGD(ms.constrain.param_groups(net, weight_decay=lam), lr=0.05)
    for _ in range(steps):
        loss = 0.5 * ((net[0].weight - M) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sv_trained = torch.linalg.svdvals(net[0].weight.detach())
    sv_m = torch.linalg.svdvals(M)
    small, report = ms.constrain.export(net, torch.randn(4, n, dtype=torch.float64))
    return sv_m.numpy(), sv_trained.numpy(), (sv_m - lam).clamp_min(0).numpy(), small, report


def digits():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train_classifier(model, train, epochs: int, param_groups, seed: int = 0) -> None:
    x, y = train
    opt = torch.optim.SGD(param_groups, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("MIRRORSYM_TINY")),
                        help="test sizes (also set by the MIRRORSYM_TINY environment variable)")
    parser.add_argument("--out", type=Path, default=Path("out/constrain_and_export"), help="folder for the figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps, epochs = (800, 4) if args.tiny else (3000, 60)

    # 1. Elementwise DCS = lasso ---------------------------------------------------------------------------
    theta, lasso, beta = sparse_regression(steps)
    print(f"sparse: max |θ − lasso| = {np.abs(theta - lasso).max():.1e}; support {int((np.abs(theta) > 1e-8).sum())} "
          f"(lasso {int((lasso != 0).sum())}, truth {int((beta != 0).sum())})")

    # 2. Low-rank DCS = nuclear norm; export splits the Linear --------------------------------------------
    sv_m, sv_w, predicted, small_lr, report_lr = low_rank_fit(steps)
    print(f"low_rank: max |σ(W) − max(σ(M) − λ, 0)| = {np.abs(sv_w - predicted).max():.1e}")
    print(small_lr)
    print(report_lr)

    # 3. One gate per unit = group lasso over units; export drops the dead ones ----------------------------
    train, test = digits()
    dense = mlp()
    train_classifier(dense, train, epochs, dense.parameters())
    model = mlp()
    groups = ms.constrain.apply(model, train[0][:8], kind="units")    # gates on both hidden layers
    print(f"\nunit groups gated: {[g.label for g in groups]}")
    train_classifier(model, train, epochs, ms.constrain.param_groups(model, weight_decay=1e-2))
    small, report = ms.constrain.export(model, train[0][:64])     # a plain nn.Sequential, narrower
    print(small)
    print(report)
    accs = {"dense": accuracy(dense, test), "DCS (gated)": accuracy(model, test), "exported": accuracy(small, test)}
    print("test accuracy:", {k: round(v, 3) for k, v in accs.items()})

    # Figures ----------------------------------------------------------------------------------------------
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    idx = np.arange(len(theta))
    ax[0].stem(idx, lasso, linefmt="C0-", markerfmt="C0o", basefmt=" ", label="scikit-learn Lasso(alpha = λ/2)")
    ax[0].plot(idx, theta, "C3x", ms=9, label="u ⊙ v trained by SGD, decay λ")
    ax[0].plot(idx, beta, "k_", ms=12, label="ground truth")
    ax[0].set_xlabel("coordinate")
    ax[0].set_ylabel("coefficient")
    ax[0].set_title("ms.constrain.sparse = lasso")
    ax[0].legend(fontsize=8)
    k = np.arange(1, len(sv_m) + 1)
    ax[1].plot(k, sv_m, "o-", color="gray", label="σ_i(M)")
    ax[1].plot(k, predicted, "s", mfc="none", ms=10, color="C0", label="max(σ_i(M) − λ, 0) (closed form C)")
    ax[1].plot(k, sv_w, "x", color="C3", ms=9, label="σ_i(A Bᵀ) trained")
    ax[1].set_xlabel("i")
    ax[1].set_ylabel("singular value")
    rank = next(iter(report_lr.split.values()), min(sv_m.shape[0], 12))
    ax[1].set_title(f"ms.constrain.low_rank = nuclear norm (exported at rank {rank})")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "sparse_low_rank.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    widths_before = [64, 64]
    widths_after = [small[0].out_features, small[2].out_features]
    pos = np.arange(2)
    ax[0].bar(pos - 0.2, widths_before, 0.4, label="before export")
    ax[0].bar(pos + 0.2, widths_after, 0.4, label="after export")
    ax[0].set_xticks(pos, ["hidden layer 1", "hidden layer 2"])
    ax[0].set_ylabel("units")
    ax[0].set_title(f"params {report.params_before} → {report.params_after}")
    ax[0].legend(fontsize=8)
    ax[1].bar(list(accs), list(accs.values()), color=["gray", "C0", "C1"])
    ax[1].set_ylim(0, 1)
    ax[1].set_ylabel("test accuracy (digits)")
    ax[1].set_title("Same function after export")
    fig.tight_layout()
    fig.savefig(args.out / "units_export.png", dpi=110)
    plt.close(fig)
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
