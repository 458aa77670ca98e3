"""Dimensional collapse in contrastive self-supervised learning, and the rotation mirror behind it.

Setup: scikit-learn's digits (pixels scaled to [0, 1], centred), two augmented views per image
(x ⊙ m + s·ε: each pixel kept with probability ``keep``, Gaussian noise of std ``noise``), a linear
encoder r = V x (the representation) and, optionally, a linear projector z = W r (the embedding the loss
sees). Loss: InfoNCE with dot-product similarity, ℓ = mean_i −log softmax_j(z_iᵀ z'_j / τ) over a
minibatch (positives on the diagonal), symmetrised over the two views, plus weight decay γ‖θ‖² (torch
``weight_decay = λ = 2γ``, docs/theory.md#conventions), minibatch SGD with momentum.

Symmetry (docs/theory.md#common-symmetries): W V is unchanged by (W, V) → (WQᵀ, QV) for orthogonal Q, so each
unit vector n
gives a mirror with surface W n = 0, nᵀV = 0 — a representation direction switched off. Decay keeps
these mirrors (R is orthogonal) and turns the product's penalty into a nuclear-norm penalty on W V
(closed form C), so weak directions are pulled exactly onto their surfaces: the representation's
covariance has many eigenvalues ≈ 0 (dimensional collapse, Jing et al. 2022). Variants, same data, init,
γ and minibatches: ``projector`` (W V, plain decay); ``syre`` (W V, decay towards a fixed random θ₀ via
:func:`mirrorsym.remove_symmetries`: no reflection of the regularised loss is left, so no surface is
absorbing); ``no_projector`` (z = V x: one layer, no product). InfoNCE is itself invariant under
z → Qz, so V alone still has the mirrors nᵀV = 0, but its decay stays a Frobenius (not nuclear-norm)
penalty: a direction collapses only where the loss curvature across the surface is below 2γ (Theorem 1's
threshold), not wherever its gradient gain is below 2γ, so fewer directions collapse. The measurement is
:func:`~mirrorsym.diagnose.metrics.embedding_spectrum` of r on the clean images and the count of its
eigenvalues below ``zero_tol`` × the largest. At the quick size the projector's collapsed eigenvalues sit
at round-off (~1e-15 relative) while the no-projector tail is still shrinking slowly (its mirrors are
stable only where the curvature condition holds), so its count depends on the training length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..constrain.remove import remove_symmetries
from ..diagnose.metrics import effective_rank, embedding_spectrum
from .base import Claim, Context, finding
from .data import digits
from .plotting import figure, save

NAME = "dimensional"
TITLE = "Dimensional collapse in contrastive learning: the projector's rotation mirror, removed by syre"

VARIANTS = ("projector", "syre", "no_projector")
LABELS = {"projector": "linear projector W·V", "syre": "W·V + syre", "no_projector": "no projector (V only)"}


@dataclass(frozen=True)
class Config:
    rep_dim: int = 32
    emb_dim: int = 32
    keep: float = 0.7
    noise: float = 0.3
    tau: float = 1.0
    weight_decay: float = 0.02  # torch λ = 2γ
    lr: float = 0.05
    momentum: float = 0.9
    batch: int = 128
    steps: int = 1500
    syre_sigma: float = 1.0
    zero_tol: float = 1e-5
    margin: int = 4
    seed: int = 0


CONFIGS = {
    "tiny": Config(rep_dim=16, emb_dim=16, steps=800, margin=3),
    "quick": Config(),
    "full": Config(rep_dim=64, emb_dim=64, steps=10000, batch=256),
}


class LinearSSL(nn.Module):
    """r = V x, z = W r (or z = r without a projector)."""

    def __init__(self, d_in: int, rep_dim: int, emb_dim: int | None, gen: torch.Generator):
        super().__init__()
        self.encoder = nn.Linear(d_in, rep_dim, bias=False)
        self.projector = nn.Linear(rep_dim, emb_dim, bias=False) if emb_dim else None
        with torch.no_grad():
            for lin in (self.encoder, self.projector):
                if lin is not None:
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / np.sqrt(lin.weight.shape[1]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.encoder(x)
        return r, (self.projector(r) if self.projector is not None else r)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetrised InfoNCE with dot-product similarity; positives are the pairs (z1_i, z2_i)."""
    logits = z1 @ z2.T / tau
    target = torch.arange(len(z1))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(x.shape, generator=gen) < cfg.keep).to(x.dtype)
    return x * keep + cfg.noise * torch.randn(x.shape, generator=gen)


def train_variant(variant: str, X: torch.Tensor, cfg: Config) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model = LinearSSL(X.shape[1], cfg.rep_dim, None if variant == "no_projector" else cfg.emb_dim, gen)
    if variant == "syre":
        remove_symmetries(model, sigma=cfg.syre_sigma, seed=cfg.seed + 2)  # parametrize: decay is towards θ₀
    elif variant not in VARIANTS:
        raise ValueError(f"dimensional: unknown variant {variant!r}; known: {VARIANTS}")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed + 3)
    for _ in range(cfg.steps):
        x = X[torch.randint(0, len(X), (cfg.batch,), generator=data_gen)]
        _, z1 = model(augment(x, cfg, data_gen))
        _, z2 = model(augment(x, cfg, data_gen))
        loss = info_nce(z1, z2, cfg.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        r, z = model(X)
    ev = embedding_spectrum(r)
    return {"spectrum": ev.tolist(), "collapsed": int((ev <= cfg.zero_tol * ev[0]).sum()),
            "eff_rank": float(effective_rank(r - r.mean(0))), "final_loss": float(loss.detach()),
            "emb_spectrum": embedding_spectrum(z).tolist()}


def run(cfg: Config, ctx: Context) -> dict:
    X, _ = digits()
    X = X - X.mean(0)
    out = {v: train_variant(v, X, cfg) for v in ctx.track(VARIANTS, "dimensional: variants")}
    return {"variants": out, "rep_dim": cfg.rep_dim, "zero_tol": cfg.zero_tol}


def plot(results: dict, ctx: Context) -> list:
    fig, ax = figure(2)
    for v, r in results["variants"].items():
        ev = np.array(r["spectrum"])
        ax[0, 0].semilogy(np.arange(1, len(ev) + 1), np.maximum(ev / ev[0], 1e-18), "o-", ms=3,
                          label=f"{LABELS[v]}: {r['collapsed']} collapsed")
    ax[0, 0].axhline(results.get("zero_tol", 1e-5), color="k", ls=":", lw=1, label="collapse tolerance")
    ax[0, 0].set_xlabel("eigenvalue index")
    ax[0, 0].set_ylabel("eigenvalue / largest")
    ax[0, 0].set_title("Spectrum of the representation covariance")
    ax[0, 0].legend(fontsize=7)
    names = list(results["variants"])
    ax[0, 1].bar(range(len(names)), [results["variants"][v]["collapsed"] for v in names], color=["C0", "C1", "C2"])
    ax[0, 1].set_xticks(range(len(names)), [LABELS[v] for v in names], fontsize=7)
    ax[0, 1].set_ylabel(f"collapsed eigenvalues (of {results['rep_dim']})")
    ax[0, 1].set_title("Collapsed dimensions")
    return [save(fig, ctx.out_dir, "dimensional")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    v = results["variants"]
    p, s, n = v["projector"]["collapsed"], v["syre"]["collapsed"], v["no_projector"]["collapsed"]
    return [
        finding(f"linear projector + decay: the representation collapses (≥ {cfg.margin} of {cfg.rep_dim} "
                f"eigenvalues ≤ {cfg.zero_tol:g} × largest)", f"≥ {cfg.margin}", p, [p],
                statistic="collapsed dimensions with a linear projector", better="higher", threshold=cfg.margin,
                inclusive=True, contradict=0.5),
        finding("removing the rotation symmetry (syre) prevents it: collapsed dimensions, syre vs projector",
                f"syre ≤ projector − {cfg.margin}", {"syre": s, "projector": p}, [p - s],
                statistic="collapsed dimensions, projector − syre", better="higher", threshold=cfg.margin,
                inclusive=True, contradict=0.0),
        finding("without a projector (no product, no nuclear-norm penalty): fewer collapsed dimensions",
                f"no_projector ≤ projector − {cfg.margin}", {"no_projector": n, "projector": p}, [p - n],
                statistic="collapsed dimensions, projector − no projector", better="higher",
                threshold=cfg.margin, inclusive=True, contradict=0.0),
    ]
