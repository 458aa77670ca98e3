"""Rotation symmetry ⇒ low rank (the paper's Fig. 1, middle), on closed form C.

A product A = UW is unchanged by U → UQᵀ, W → QW for orthogonal Q; each unit vector n gives a mirror
whose surface is Un = 0, nᵀW = 0. Theory (docs/theory.md#common-symmetries, closed form C): min ‖M − UW‖²_F +
γ(‖U‖²_F + ‖W‖²_F) soft-thresholds the singular values, σ_i(A) = max(σ_i(M) − γ, 0), so
rank A = #{σ_i(M) > γ}.

Part 1 trains one factorisation per γ with gradient descent (all at once) and compares rank and
singular values with the closed form. Part 2 fits y = Mx with minibatch SGD at a fixed γ where the
closed form keeps most directions: gradient noise (large lr, small batch) collapses extra directions.
Part 3 is the control: a residual path f(x) = U(Wx + x) breaks the rotation symmetry and the learned
map stays full rank at a γ where the plain product loses a rank. Ranks count singular values above ``rank_tol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import Claim, Context, finding
from .plotting import figure, save

NAME = "lowrank"
TITLE = "Rotation symmetry ⇒ low rank: closed form C, gradient noise, residual control"


@dataclass(frozen=True)
class Config:
    spectrum: tuple[float, ...] = (3.0, 2.2, 1.6, 1.1, 0.7, 0.4, 0.2, 0.1)
    gammas: tuple[float, ...] = (0.05, 0.15, 0.3, 0.55, 0.9, 1.35, 1.9, 2.6, 3.5)
    gd_lr: float = 0.02
    gd_steps: int = 20000
    # Parts 2–3: regression y = M'x + noise, x with ±1 entries (bounded, so small batches stay stable)
    sgd_spectrum: tuple[float, ...] = tuple(float(s) for s in np.linspace(1.0, 0.25, 8))
    n: int = 256
    sgd_gamma: float = 0.2  # below every σ_i(M'): full-batch GD keeps full rank
    sgd_batch: tuple[int, ...] = (256, 4, 1)
    sgd_lrs: tuple[float, ...] = (0.01, 0.04, 0.07, 0.1, 0.13)
    sgd_steps: int = 4000
    control_gamma: float = 0.3  # between σ_7 and σ_8 of M': plain UW drops one rank
    rank_tol: float = 1e-4
    seed: int = 0


CONFIGS = {
    "tiny": Config(spectrum=(2.0, 1.0, 0.3), gammas=(0.1, 0.6, 1.5), gd_steps=6000, sgd_batch=(256, 1),
                   sgd_lrs=(0.01, 0.1), sgd_steps=4000),
    "quick": Config(),
    "full": Config(spectrum=tuple(float(s) for s in np.geomspace(4.0, 0.05, 32)),
                   gammas=tuple(float(g) for g in np.geomspace(0.03, 4.5, 30)), gd_steps=60000, n=2048,
                   sgd_batch=(2048, 64, 16, 4, 1), sgd_lrs=tuple(np.linspace(0.005, 0.08, 16)),
                   sgd_steps=40000),
}


def target(spectrum, gen: torch.Generator) -> torch.Tensor:
    """A random m×m matrix with the given singular values."""
    m = len(spectrum)
    q1 = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64)).Q
    return q1 @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q2.T


def factorise(M, gammas, lr: float, steps: int, gen) -> torch.Tensor:
    """GD on ‖M − UW‖²_F + γ(‖U‖² + ‖W‖²) for every γ at once; returns the products (K, m, m)."""
    K, m = len(gammas), M.shape[0]
    g = torch.as_tensor(gammas, dtype=M.dtype)[:, None, None]
    U = 0.3 * torch.randn(K, m, m, generator=gen, dtype=M.dtype)
    W = 0.3 * torch.randn(K, m, m, generator=gen, dtype=M.dtype)
    for _ in range(steps):
        R = U @ W - M
        U, W = U - lr * (2 * R @ W.transpose(1, 2) + 2 * g * U), W - lr * (2 * U.transpose(1, 2) @ R + 2 * g * W)
    return U @ W


def regress(X, Y, gamma: float, lrs, batch: int, steps: int, gen, residual: bool = False) -> torch.Tensor:
    """Minibatch SGD on mean‖y − U(Wx [+ x])‖² + γ(‖U‖² + ‖W‖²), one copy per lr; returns the learned
    end-to-end maps (K, m, m) (NaN where a copy diverged)."""
    K, (n, m) = len(lrs), X.shape
    lr = torch.as_tensor(lrs, dtype=X.dtype)[:, None, None]
    U = 0.3 * torch.randn(K, m, m, generator=gen, dtype=X.dtype)
    W = 0.3 * torch.randn(K, m, m, generator=gen, dtype=X.dtype)
    for _ in range(steps):
        idx = torch.rand(K, n, generator=gen).argsort(1)[:, :batch]
        Xb, Yb = X[idx], Y[idx]
        H = Xb @ W.transpose(1, 2) + (Xb if residual else 0)
        R = H @ U.transpose(1, 2) - Yb
        gU = 2 * R.transpose(1, 2) @ H / batch
        gW = 2 * (R @ U).transpose(1, 2) @ Xb / batch
        U, W = U - lr * (gU + 2 * gamma * U), W - lr * (gW + 2 * gamma * W)
    eye = torch.eye(m, dtype=X.dtype)
    return U @ (W + eye) if residual else U @ W


class Factorised(nn.Module):
    """x ↦ U(Wx) or, with ``residual``, x ↦ U(Wx + x): the two models of Parts 2–3 as nn.Modules."""

    def __init__(self, m: int, residual: bool):
        super().__init__()
        self.W, self.U, self.residual = nn.Linear(m, m, bias=False), nn.Linear(m, m, bias=False), residual

    def forward(self, x):
        h = self.W(x)
        return self.U(h + x if self.residual else h)


def detected_rotations(m: int, residual: bool) -> int:
    """Rotation groups that ``ms.find_symmetries`` reports (each one verified numerically)."""
    from ..detect import find_symmetries

    torch.manual_seed(0)
    smap = find_symmetries(Factorised(m, residual), torch.randn(4, m))
    return sum(g.kind == "rotation" for g in smap.groups)


def _svals(A: torch.Tensor) -> list:
    finite = torch.isfinite(A).flatten(1).all(1)
    sv = torch.linalg.svdvals(torch.where(finite[:, None, None], A, torch.zeros_like(A)))
    sv[~finite] = float("nan")
    return sv.tolist()


def run(cfg: Config, ctx: Context) -> dict:
    gen = ctx.generator(0)
    A = factorise(target(cfg.spectrum, gen), cfg.gammas, cfg.gd_lr, cfg.gd_steps, gen)
    M = target(cfg.sgd_spectrum, gen)
    m = M.shape[0]
    X = torch.randint(0, 2, (cfg.n, m), generator=gen).double() * 2 - 1
    Y = X @ M.T + 0.1 * torch.randn(cfg.n, m, generator=gen, dtype=torch.float64)
    noise = []
    for batch in ctx.track(cfg.sgd_batch, "SGD batch sizes"):
        maps = regress(X, Y, cfg.sgd_gamma, cfg.sgd_lrs, batch, cfg.sgd_steps, gen)
        noise.append({"batch": batch, "svals": _svals(maps)})
    lr_control = cfg.sgd_lrs[1]
    control = regress(X, Y, cfg.control_gamma, [lr_control], cfg.n, 2 * cfg.sgd_steps, gen, residual=True)
    plain = regress(X, Y, cfg.control_gamma, [lr_control], cfg.n, 2 * cfg.sgd_steps, gen, residual=False)
    return {"spectrum": list(cfg.spectrum), "sgd_spectrum": list(cfg.sgd_spectrum), "gammas": list(cfg.gammas),
            "svals": _svals(A), "sgd_lrs": list(cfg.sgd_lrs), "noise": noise, "residual_svals": _svals(control)[0],
            "plain_svals": _svals(plain)[0],
            "rotations_detected": {"plain": detected_rotations(m, False), "residual": detected_rotations(m, True)}}


def _rank(sv, tol) -> int | None:
    """Singular values above ``tol``; None for a diverged copy (NaN singular values)."""
    sv = np.asarray(sv, dtype=float)
    return None if np.isnan(sv).any() else int(np.sum(sv > tol))


def plot(results: dict, ctx: Context) -> list:
    g, spec = np.array(results["gammas"]), np.array(results["spectrum"])
    sv = np.array(results["svals"])
    tol = 1e-4
    fig, ax = figure(3)
    grid = np.geomspace(g.min(), g.max(), 200)
    ax[0, 0].plot(grid, [(spec > x).sum() for x in grid], "k--", label="closed form C: #{σ_i(M) > γ}")
    ax[0, 0].plot(g, [_rank(s, tol) for s in sv], "o", label="trained UW")
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("weight decay γ")
    ax[0, 0].set_ylabel("rank")
    ax[0, 0].set_title("Rank vs weight decay")
    ax[0, 0].legend()
    for i, x in enumerate(g):
        ax[0, 1].plot(np.full(len(spec), x), sv[i], "o", ms=3, color="tab:blue")
    for s in spec:
        ax[0, 1].plot(grid, np.maximum(s - grid, 0), "k-", lw=0.6)
    ax[0, 1].set_xscale("log")
    ax[0, 1].set_xlabel("weight decay γ")
    ax[0, 1].set_ylabel("singular values of UW")
    ax[0, 1].set_title("σ_i(UW) = max(σ_i(M) − γ, 0) (lines)")
    lrs = results["sgd_lrs"]
    for row in results["noise"]:
        ax[0, 2].plot(lrs, [np.nan if r is None else r for r in (_rank(s, tol) for s in row["svals"])], "o-",
                      label=f"SGD batch {row['batch']}")
    ax[0, 2].set_xlabel("learning rate η")
    ax[0, 2].set_ylabel("rank of the learned map")
    ax[0, 2].set_title("Gradient noise lowers the rank (fixed γ)")
    ax[0, 2].legend()
    return [save(fig, ctx.out_dir, "lowrank")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    spec = np.array(results["spectrum"])
    sv = np.array(results["svals"])
    pred_rank = [int((spec > g).sum()) for g in results["gammas"]]
    got_rank = [_rank(s, cfg.rank_tol) for s in sv]
    pred_sv = np.array([np.sort(np.maximum(spec - g, 0))[::-1] for g in results["gammas"]])
    err = float(np.abs(pred_sv - sv).max())
    out = [
        Claim("rank(UW) = #{σ_i(M) > γ} at every γ (closed form C)", pred_rank, got_rank, pred_rank == got_rank),
        Claim("singular values = max(σ_i(M) − γ, 0)", "max error ≤ 1e-3", err, err <= 1e-3),
    ]
    full = max(results["noise"], key=lambda r: r["batch"])
    noisy = min(results["noise"], key=lambda r: r["batch"])
    full_rank = _rank(full["svals"][-1], cfg.rank_tol)
    stable = [r for r in (_rank(s, cfg.rank_tol) for s in noisy["svals"]) if r is not None]
    noisy_rank = stable[-1] if stable else None
    out.append(finding(f"SGD batch {noisy['batch']} at its largest stable lr has lower rank than full-batch GD "
                       f"(same γ={cfg.sgd_gamma}, lr={cfg.sgd_lrs[-1]})", f"< {full_rank}", noisy_rank,
                       [None if noisy_rank is None or full_rank is None else full_rank - noisy_rank],
                       statistic="rank of full-batch GD − rank of the noisiest SGD at its largest stable lr",
                       better="higher", threshold=0.0))
    m = len(results["sgd_spectrum"])
    res_rank = _rank(results["residual_svals"], cfg.rank_tol)
    plain_rank = _rank(results["plain_svals"], cfg.rank_tol)
    out.append(finding(f"residual path U(Wx + x) keeps a higher rank than plain UW at the same "
                       f"γ={cfg.control_gamma} (no rotation symmetry, no collapse)",
                       f"residual {m}, plain < {m}", f"residual {res_rank}, plain {plain_rank}",
                       [None if res_rank is None or plain_rank is None else res_rank - plain_rank],
                       statistic="rank of U(Wx + x) − rank of UW, same γ and training",
                       better="higher", threshold=0.0))
    det = results["rotations_detected"]
    out.append(Claim("ms.find_symmetries reports the rotation of U(Wx) and none for U(Wx + x)",
                     "plain 1, residual 0", f"plain {det['plain']}, residual {det['residual']}",
                     det["plain"] == 1 and det["residual"] == 0))
    return out
