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
Parts 2 and 3 run on the sweep engine (``ms.sweep``; local or Ray, any device), every (batch, lr) and the
control over ``seeds`` seeds (each its own init and minibatch stream, the same data); coupled torch
``weight_decay = 2γ``. The findings take one value per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

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
    seeds: int = 5
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


class Factorised(nn.Module):
    """x ↦ U(Wx) or, with ``residual``, x ↦ U(Wx + x): the two models of Parts 2–3 (float64, U and W
    initialised N(0, 0.3²) from ``seed``; ``seed=None`` keeps torch's default init)."""

    def __init__(self, m: int, residual: bool, seed: int | None = None):
        super().__init__()
        self.W, self.U, self.residual = nn.Linear(m, m, bias=False), nn.Linear(m, m, bias=False), residual
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for lin in (self.W, self.U):
                    lin.weight.copy_(0.3 * torch.randn(m, m, generator=g))
        self.double()

    def forward(self, x):
        h = self.W(x)
        return self.U(h + x if self.residual else h)


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over samples of ‖y − f(x)‖² (summed over outputs, unlike F.mse_loss)."""
    return ((out - y) ** 2).sum(-1).mean()


class MapRank:
    """Sweep metric: rank of the end-to-end map U W (or U(W + I)), singular values above ``tol``."""

    def __init__(self, tol: float, residual: bool):
        self.tol, self.residual = tol, residual

    def __call__(self, params: dict, batch) -> torch.Tensor:
        W = params["W.weight"]
        if self.residual:
            W = W + torch.eye(W.shape[0], dtype=W.dtype)
        A = params["U.weight"] @ W
        finite = torch.isfinite(A).all()  # a diverged run: NaN, not an SVD of NaNs
        rank = (torch.linalg.svdvals(torch.where(finite, A, torch.zeros_like(A))) > self.tol).sum().double()
        return torch.where(finite, rank, torch.full_like(rank, float("nan")))


def regress(X, Y, cfg: Config, ctx: Context, residual: bool, grid: list[dict], store: str):
    """Minibatch SGD on mean‖y − U(Wx [+ x])‖² + γ(‖U‖² + ‖W‖²) on the sweep engine: one run per grid entry
    (lr, batch_size, steps, weight_decay = 2γ, seed); returns its DataFrame with the ``rank`` metric."""
    from ..sweep import Sweep

    m = X.shape[1]
    sweep = Sweep(partial(Factorised, m, residual), squared_error, (X, Y), grid,
                  metrics={"rank": MapRank(cfg.rank_tol, residual)}, record_every=10**9, name=f"lowrank-{store}")
    return ctx.sweep(sweep, store)


def _ranks(df, **where) -> list:
    """Per seed (ascending), the rank metric of the rows matching ``where`` (None for a diverged run)."""
    rows = df
    for k, v in where.items():
        rows = rows[rows[k] == v]
    rows = rows.sort_values("seed")
    return [None if st == "diverged" else int(r) for r, st in zip(rows["rank"], rows["status"], strict=True)]


def detected_rotations(m: int, residual: bool) -> int:
    """Rotation groups that ``ms.find_symmetries`` reports (each one verified numerically)."""
    from ..detect import find_symmetries

    torch.manual_seed(0)
    smap = find_symmetries(Factorised(m, residual), torch.randn(4, m, dtype=torch.float64))
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
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    grid = [{"lr": lr, "batch_size": b, "steps": cfg.sgd_steps, "weight_decay": 2 * cfg.sgd_gamma, "seed": s}
            for b in cfg.sgd_batch for lr in cfg.sgd_lrs for s in seeds]
    df = regress(X, Y, cfg, ctx, False, grid, "noise")
    noise = [{"batch": b, "ranks": [_ranks(df, batch_size=b, lr=lr) for lr in cfg.sgd_lrs]} for b in cfg.sgd_batch]
    control = [{"lr": cfg.sgd_lrs[1], "batch_size": cfg.n, "steps": 2 * cfg.sgd_steps,
                "weight_decay": 2 * cfg.control_gamma, "seed": s} for s in seeds]
    residual = _ranks(regress(X, Y, cfg, ctx, True, control, "residual"))
    plain = _ranks(regress(X, Y, cfg, ctx, False, control, "plain"))
    return {"spectrum": list(cfg.spectrum), "sgd_spectrum": list(cfg.sgd_spectrum), "gammas": list(cfg.gammas),
            "svals": _svals(A), "sgd_lrs": list(cfg.sgd_lrs), "seeds": seeds, "noise": noise,
            "residual_ranks": residual, "plain_ranks": plain,
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
        r = np.array([[np.nan if v is None else v for v in per_lr] for per_lr in row["ranks"]], dtype=float)
        ok = ~np.isnan(r).all(1)  # lrs at which some seed stayed finite
        ax[0, 2].errorbar(np.asarray(lrs)[ok], np.nanmean(r[ok], 1), yerr=np.nanstd(r[ok], 1), fmt="o-",
                          capsize=2, label=f"SGD batch {row['batch']}")
    ax[0, 2].set_xlabel("learning rate η")
    ax[0, 2].set_ylabel(f"rank of the learned map (mean ± sd, {len(results['seeds'])} seeds)")
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
    stable = [i for i, per_seed in enumerate(noisy["ranks"]) if None not in per_seed]
    i = stable[-1] if stable else len(cfg.sgd_lrs) - 1  # the largest lr at which every seed is stable
    diffs = [None if a is None or b is None else a - b for a, b in zip(full["ranks"][i], noisy["ranks"][i],
                                                                        strict=True)]
    out.append(finding(f"SGD batch {noisy['batch']} at the largest lr where every seed is stable "
                       f"(lr={cfg.sgd_lrs[i]}) has lower rank than full-batch GD at that lr (same γ={cfg.sgd_gamma})",
                       "rank difference > 0", {"full_batch": full["ranks"][i], "noisy": noisy["ranks"][i]}, diffs,
                       statistic="rank of full-batch GD − rank of batch-1 SGD, same seed, lr and γ",
                       better="higher", threshold=0.0))
    m = len(results["sgd_spectrum"])
    res, plain = results["residual_ranks"], results["plain_ranks"]
    out.append(finding(f"residual path U(Wx + x) keeps a higher rank than plain UW at the same "
                       f"γ={cfg.control_gamma} (no rotation symmetry, no collapse)",
                       f"residual {m}, plain < {m}", {"residual": res, "plain": plain},
                       [None if a is None or b is None else a - b for a, b in zip(res, plain, strict=True)],
                       statistic="rank of U(Wx + x) − rank of UW, same seed, γ and training",
                       better="higher", threshold=0.0))
    det = results["rotations_detected"]
    out.append(Claim("ms.find_symmetries reports the rotation of U(Wx) and none for U(Wx + x)",
                     "plain 1, residual 0", f"plain {det['plain']}, residual {det['residual']}",
                     det["plain"] == 1 and det["residual"] == 0))
    return out
