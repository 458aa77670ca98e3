"""Rescaling symmetry ⇒ sparsity (the paper's Fig. 1, left), on closed form A.

Hadamard regression f(x) = Σ_i u_i w_i x_i, L = mean (y − f)², decay γ(‖u‖² + ‖w‖²). Each pair
(u_i, w_i) has the sign-flip mirror with surface u_i = w_i = 0. Theory (docs/theory.md#common-symmetries):
coordinate i is
pulled onto its surface iff γ > γ_c,i = |∂L/∂β_i|/2 at the surface point, and globally the model solves
the lasso L(β) + 2γ‖β‖₁, i.e. scikit-learn's ``Lasso(alpha=γ)``.

Part 1 trains one copy per γ with full-batch gradient descent (all copies at once) and compares the
support with the per-coordinate thresholds computed by ``critical_weight_decay`` and the coefficients
with scikit-learn's lasso path. Part 2 fixes γ and raises the learning rate with minibatch SGD on the
sweep engine (``ms.sweep``: every (lr, batch size, seed) a vmapped copy, resumable, local or Ray; 5 seeds,
each its own init and minibatch stream): gradient noise alone drives extra coordinates onto their surfaces
(docs/theory.md#gradient-noise), beyond the lasso support.
A coordinate counts as zero when |u_i w_i| < ``zero_tol``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from ..core import Mirror
from ..theory import critical_weight_decay
from .base import Claim, Context, finding
from .plotting import figure, save

NAME = "sparsity"
TITLE = "Rescaling symmetry ⇒ sparsity: thresholds, lasso path, noise-induced zeros"


@dataclass(frozen=True)
class Config:
    n: int = 200
    d: int = 20
    support: int = 6
    noise: float = 0.5
    gammas: tuple[float, ...] = tuple(float(g) for g in np.geomspace(0.008, 2.0, 14))
    gd_lr: float = 0.05
    gd_steps: int = 30000
    sgd_gamma: float = 0.02
    sgd_batch: tuple[int, ...] = (2, 8)
    sgd_lrs: tuple[float, ...] = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1)
    sgd_steps: int = 10000
    sgd_seeds: int = 5  # independent inits and minibatch streams per (lr, batch): the finding's seeds
    zero_tol: float = 1e-6
    seed: int = 0


CONFIGS = {
    "tiny": Config(n=60, d=8, support=3, gammas=(0.05, 0.3, 1.5), gd_steps=10000, sgd_batch=(2,),
                   sgd_lrs=(0.01, 0.08), sgd_steps=4000),
    "quick": Config(),
    "full": Config(n=1000, d=100, support=20, gammas=tuple(float(g) for g in np.geomspace(0.002, 2.0, 40)),
                   gd_steps=100000, sgd_batch=(1, 2, 4, 8, 32), sgd_lrs=tuple(np.linspace(0.005, 0.12, 24)),
                   sgd_steps=40000),
}


def make_data(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.randn(cfg.n, cfg.d, generator=g, dtype=torch.float64)
    beta = torch.zeros(cfg.d, dtype=torch.float64)
    beta[: cfg.support] = torch.linspace(2.0, 0.3, cfg.support, dtype=torch.float64) * torch.tensor(
        [(-1.0) ** i for i in range(cfg.support)], dtype=torch.float64)
    y = X @ beta + cfg.noise * torch.randn(cfg.n, generator=g, dtype=torch.float64)
    return X, y


def full_batch_gd(X, y, gammas: torch.Tensor, lr: float, steps: int, generator: torch.Generator):
    """Gradient descent on mean (y − X(u ⊙ w))² + γ(‖u‖² + ‖w‖²) for every γ at once; returns β = u ⊙ w
    of shape (K, d)."""
    K, d = len(gammas), X.shape[1]
    u = 0.3 * torch.randn(K, d, generator=generator, dtype=X.dtype)
    w = 0.3 * torch.randn(K, d, generator=generator, dtype=X.dtype)
    g = gammas[:, None]
    gram, xty = X.T @ X / len(X), X.T @ y / len(X)  # ∂L/∂β = 2(Cβ − Xᵀy/n): d×d work per step, not n×d
    for _ in range(steps):
        grad_beta = 2 * ((u * w) @ gram - xty)
        u, w = u - lr * (grad_beta * w + 2 * g * u), w - lr * (grad_beta * u + 2 * g * w)
    return u * w


class Hadamard(nn.Module):
    """f(x) = Σ_i u_i w_i x_i (closed form A), initialised u, w ~ N(0, 0.3²) from ``seed``."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * (self.u * self.w)).sum(-1)


class ZeroFraction:
    """Sweep metric: the fraction of coordinates with |u_i w_i| < tol (a class, so Ray can pickle it)."""

    def __init__(self, tol: float):
        self.tol = tol

    def __call__(self, params: dict, data) -> torch.Tensor:
        return ((params["u"] * params["w"]).abs() < self.tol).double().mean()


def noise_sweep(X, y, cfg: Config, ctx: Context):
    """SGD at γ = cfg.sgd_gamma for every (batch, lr) on ms.sweep: one vmapped chunk per batch size."""
    from ..sweep import Sweep

    grid = [{"lr": lr, "batch_size": b, "steps": cfg.sgd_steps, "weight_decay": 2 * cfg.sgd_gamma,
             "seed": cfg.seed + s} for b in cfg.sgd_batch for lr in cfg.sgd_lrs for s in range(cfg.sgd_seeds)]
    sweep = Sweep(partial(Hadamard, cfg.d), nn.functional.mse_loss, (X, y), grid,
                  metrics={"zero_fraction": ZeroFraction(cfg.zero_tol)},
                  record_every=10**9, name="sparsity-noise")
    return ctx.sweep(sweep)


def hadamard_loss(p: dict, batch: tuple) -> torch.Tensor:
    """L = mean (y − X(u ⊙ w))² on ``batch = (X, y)`` (loss_fn(params, batch))."""
    X, y = batch
    return ((y - X @ (p["u"] * p["w"])) ** 2).mean()


def predicted_support(X, y, beta: torch.Tensor, gamma: float) -> list[bool]:
    """Coordinate i is off its surface iff γ_c,i > γ, γ_c,i from the projected Hessian at β_i = 0."""
    s = beta.sign() * beta.abs().sqrt()
    point = {"u": s, "w": beta.abs().sqrt()}  # any (u, w) with u ⊙ w = β
    return [critical_weight_decay(hadamard_loss, point, Mirror.sign_flip({"u": [i], "w": [i]}), (X, y)).gamma > gamma
            for i in range(len(beta))]


def run(cfg: Config, ctx: Context) -> dict:
    from sklearn.linear_model import lasso_path

    X, y = make_data(cfg)
    gammas = torch.tensor(cfg.gammas, dtype=torch.float64)
    beta = full_batch_gd(X, y, gammas, cfg.gd_lr, cfg.gd_steps, ctx.generator(1))
    beta[beta.abs() < cfg.zero_tol] = 0.0
    alphas, coefs, _ = lasso_path(X.numpy(), y.numpy(), alphas=np.array(cfg.gammas), tol=1e-12, max_iter=100000)
    order = np.argsort(alphas)  # lasso_path returns alphas in decreasing order
    sk = coefs[:, order].T  # (K, d) in our γ order
    predicted = [predicted_support(X, y, beta[k], g) for k, g in enumerate(cfg.gammas)]
    df = noise_sweep(X, y, cfg, ctx)
    noise = []
    for batch in cfg.sgd_batch:  # per lr (ascending), one value per seed
        rows = df[df["batch_size"] == batch].sort_values(["lr", "seed"])
        noise.append({"batch": batch,
                      "zero_fraction": [g["zero_fraction"].tolist() for _, g in rows.groupby("lr", sort=True)],
                      "diverged": [(g["status"] == "diverged").tolist() for _, g in rows.groupby("lr", sort=True)]})
    lasso_at_sgd_gamma = lasso_path(X.numpy(), y.numpy(), alphas=np.array([cfg.sgd_gamma]), tol=1e-12,
                                    max_iter=100000)[1][:, 0]
    return {"gammas": list(cfg.gammas), "sgd_lrs": list(cfg.sgd_lrs), "beta": beta.tolist(), "sklearn": sk.tolist(),
            "predicted": predicted,
            "noise": noise, "lasso_zero_fraction": float(np.mean(np.abs(lasso_at_sgd_gamma) < cfg.zero_tol))}


def plot(results: dict, ctx: Context) -> list:
    g = np.array(results["gammas"])
    beta, sk = np.array(results["beta"]), np.array(results["sklearn"])
    fig, ax = figure(3)
    for i in range(beta.shape[1]):
        line, = ax[0, 0].plot(g, sk[:, i], lw=1)
        ax[0, 0].plot(g, beta[:, i], "o", ms=3, color=line.get_color())
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("weight decay γ")
    ax[0, 0].set_ylabel("coefficient β_i = u_i w_i")
    ax[0, 0].set_title("Lasso path: sklearn (lines) vs trained (dots)")
    ax[0, 1].plot(g, (beta == 0).mean(1), "o-", label="trained: fraction |β_i| < tol")
    ax[0, 1].plot(g, 1 - np.array(results["predicted"]).mean(1), "k--", label="theory: fraction γ ≥ γ_c,i")
    ax[0, 1].set_xscale("log")
    ax[0, 1].set_xlabel("weight decay γ")
    ax[0, 1].set_ylabel("fraction of zero coordinates")
    ax[0, 1].set_title("Sparsity vs weight decay")
    ax[0, 1].legend()
    lrs = results["sgd_lrs"]
    for row in results["noise"]:
        ok = ~np.array(row["diverged"]).any(1)  # lrs at which every seed stayed finite
        zf = np.array(row["zero_fraction"], dtype=float)[ok]
        ax[0, 2].errorbar(np.array(lrs)[ok], zf.mean(1), yerr=zf.std(1), fmt="o-", capsize=2,
                          label=f"SGD, batch {row['batch']} (mean ± sd, {zf.shape[1]} seeds)")
    ax[0, 2].axhline(results["lasso_zero_fraction"], color="k", ls="--", label="lasso (no noise)")
    ax[0, 2].set_xlabel("learning rate η")
    ax[0, 2].set_ylabel("fraction of zero coordinates")
    ax[0, 2].set_title("Gradient noise adds zeros (fixed γ)")
    ax[0, 2].legend()
    return [save(fig, ctx.out_dir, "sparsity")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    beta, sk = np.array(results["beta"]), np.array(results["sklearn"])
    support_ok = int(((beta != 0) == (np.abs(sk) > cfg.zero_tol)).all(1).sum())
    err = float(np.abs(beta - sk).max())
    pred = np.array(results["predicted"])
    pred_ok = int((pred == (beta != 0)).all(1).sum())
    K = len(cfg.gammas)
    out = [
        Claim(f"trained support = sklearn Lasso(alpha=γ) support at every γ ({K} values)", K, support_ok,
              support_ok == K),
        Claim("trained coefficients = sklearn lasso path", "max |Δβ| ≤ 1e-3", err, err <= 1e-3),
        Claim("KKT identity, not a prediction: on the trained β, support = {i : γ_c,i > γ} with γ_c,i from the "
              "projected Hessian (closed form A)", K, pred_ok, pred_ok == K),
    ]
    row = min(results["noise"], key=lambda r: r["batch"])  # the noisiest setting carries the claim
    stable = [z for z, dv in zip(row["zero_fraction"], row["diverged"], strict=True) if not any(dv)]
    lasso = results["lasso_zero_fraction"]
    per_seed = [z - lasso for z in stable[-1]] if stable else [None]
    out.append(finding(f"SGD batch {row['batch']}, largest lr at which every seed is stable: more zeros than the "
                       f"lasso at the same γ={cfg.sgd_gamma} (noise-induced sparsity)", f"> {lasso:.2f}",
                       float(np.mean(stable[-1])) if stable else None, per_seed,
                       statistic="zero fraction of SGD (one seed: init and minibatches) − zero fraction of the lasso",
                       better="higher", threshold=0.0))
    return out
