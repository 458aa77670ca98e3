"""Dimensional collapse in contrastive self-supervised learning, and the rotation mirror behind it.

Setup: scikit-learn's digits (pixels scaled to [0, 1], centred), two augmented views per image
(x ⊙ m + s·ε: each pixel kept with probability ``keep``, Gaussian noise of std ``noise``), a linear
encoder r = V x (the representation) and, optionally, a linear projector z = W r (the embedding the loss
sees). Loss: InfoNCE with dot-product similarity, ℓ = mean_i −log softmax_j(z_iᵀ z'_j / τ) over a
minibatch (positives on the diagonal), symmetrised over the two views, plus weight decay γ‖θ‖² (torch
coupled ``weight_decay = λ = 2γ``, docs/theory.md#conventions), minibatch SGD with momentum.

Symmetry (docs/theory.md#rotation): W V is unchanged by (W, V) → (WQᵀ, QV) for orthogonal Q, so each unit
vector n gives a mirror with surface W n = 0, nᵀV = 0 — a representation direction switched off. Decay keeps
these mirrors and turns the product's penalty into a nuclear-norm penalty on W V (closed form C), so weak
directions are pulled onto their surfaces: the representation's covariance has many eigenvalues ≈ 0
(dimensional collapse, docs/theory.md#dimensional-collapse). Variants, same data, initialisation, γ,
minibatches and augmentations for a given seed: ``projector`` (W V, plain decay); ``no_projector`` (z = V x:
no product; InfoNCE is invariant under z → Qz, so V alone still has the mirrors nᵀV = 0, but its decay stays
a Frobenius penalty); ``syre`` (W V, ``ms.remove_symmetries``: θ = θ₀ + ψ, decay of ψ, i.e. towards a fixed
random θ₀, docs/theory.md#syre) at the library default σ₀ = 0.01 × each tensor's init scale — THE control —
and over a σ₀ sweep (``syre_sigmas``, in units of the init scale), larger σ₀ labelled as such.

Measured on each seed, on the clean images (:func:`~mirrorsym.diagnose.metrics.embedding_spectrum`, count of
eigenvalues ≤ ``zero_tol`` × the largest):

* collapse of the *learned part*: the spectrum of ψ_V x, ψ = θ − θ₀ (= θ for plain decay). A direction that
  sits on θ₀ has ψ ≈ 0 there; θ₀ alone cannot pass this count;
* the spectrum of the representation r = θ_V x itself (θ₀ fills the collapsed directions at ≈ σ₀² × the init
  scale, so its count is reported but carries no finding);
* functionally: the accuracy of a linear probe (logistic regression, r scaled by √(largest eigenvalue),
  train/test split of the digits) on r.

Training: a plain loop in which all seeds of all variants with a projector are one batched model (parameters
(copies, out, in); the summed loss gives each copy its own gradient, and SGD acts elementwise), the
no-projector seeds a second one. Not on
the sweep engine: the two augmented views are drawn inside every step (random operations, which the engine
refuses), and its metrics see only the trained tensors ψ, not θ₀.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..constrain.remove import remove_symmetries
from ..diagnose.metrics import effective_rank, embedding_spectrum
from .base import Claim, Context, finding
from .data import digits
from .plotting import figure, save

NAME = "dimensional"
TITLE = "Dimensional collapse in contrastive learning: the projector's rotation mirror; symmetry removal vs σ₀"

LABELS = {"projector": "linear projector W·V", "no_projector": "no projector (V only)"}


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
    syre_sigmas: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # σ₀ / each tensor's init scale
    control_sigma: float = 0.01  # the library default: the control's verdict
    zero_tol: float = 1e-5
    margin: int = 4
    n_probe_train: int = 1200  # the rest of the 1797 digits is the probe's test set
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seed: int = 0


CONFIGS = {
    "tiny": Config(rep_dim=16, emb_dim=16, steps=300, margin=3, syre_sigmas=(0.01, 1.0), seeds=(0, 1)),
    "quick": Config(),
    "full": Config(rep_dim=64, emb_dim=64, steps=10000, batch=256, seeds=tuple(range(10))),
}


def variant_names(cfg: Config) -> list[str]:
    return ["projector", "no_projector"] + [f"syre σ₀={s:g}" for s in cfg.syre_sigmas]


class StackedLinearSSL(nn.Module):
    """S independent copies r_s = V_s x_s, z_s = W_s r_s (z = r without a projector), initialised
    V, W ~ N(0, 1/fan_in) from one generator per copy."""

    def __init__(self, d_in: int, rep_dim: int, emb_dim: int | None, gens: list[torch.Generator]):
        super().__init__()

        def init(rows, cols):
            return nn.Parameter(torch.stack([torch.randn(rows, cols, generator=g) / math.sqrt(cols) for g in gens]))

        self.encoder = init(rep_dim, d_in)
        self.projector = init(emb_dim, rep_dim) if emb_dim else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (S, B, d_in) → (r, z), each (S, B, ·)."""
        r = x @ self.encoder.transpose(-1, -2)
        return r, (r @ self.projector.transpose(-1, -2) if self.projector is not None else r)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetrised InfoNCE with dot-product similarity; positives are the pairs (z1_i, z2_i). Inputs (B, D)
    give a scalar; inputs (..., B, D) give one loss per leading index."""
    logits = z1 @ z2.transpose(-1, -2) / tau
    rows = logits.log_softmax(-1).diagonal(dim1=-2, dim2=-1).mean(-1)
    cols = logits.log_softmax(-2).diagonal(dim1=-2, dim2=-1).mean(-1)
    return -0.5 * (rows + cols)


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(x.shape, generator=gen) < cfg.keep).to(x.dtype)
    return x * keep + cfg.noise * torch.randn(x.shape, generator=gen)


def learned_encoder(model: StackedLinearSSL, removal=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_V, ψ_V) of every copy, (S, rep_dim, d_in): the encoder and its learned part ψ = θ − θ₀ (θ₀ = the
    offset of ``removal``, a :func:`remove_symmetries` handle, or 0)."""
    theta = model.encoder.detach()
    offset = removal.offsets["encoder"] if removal is not None else torch.zeros_like(theta)
    return theta, theta - offset


def train_variants(variants: list[str], X: torch.Tensor, cfg: Config) -> dict:
    """Train every seed of every variant in ``variants`` (one architecture: all with a projector, or all
    without) as one batched model, copy j·S + i = variant j, seed i. Copy (j, i) starts from seed i's
    initialisation and sees seed i's minibatches and augmentations, whatever j (paired comparisons).

    Symmetry removal: ``remove_symmetries(model, sigma=1, seed)`` parametrises every tensor as θ = θ₀ + ψ
    (θ₀ = the tensor's init scale × N(0, 1)); each copy's θ₀ slice is then scaled to its own σ₀ (0 for plain
    decay: θ = ψ exactly) and ψ reset to θ_init − θ₀, so each copy is the library's symmetry removal at its σ₀.
    Returns {variant: {"theta": θ_V (S, rep, d), "psi": ψ_V, "final_loss": [S]}}."""
    known = variant_names(cfg)
    if any(v not in known for v in variants):
        raise ValueError(f"dimensional: unknown variant in {variants}; known: {known}")
    with_projector = {v != "no_projector" for v in variants}
    if len(with_projector) != 1:
        raise ValueError("dimensional: train variants with and without a projector separately")
    S, V = len(cfg.seeds), len(variants)
    gens = [torch.Generator().manual_seed(cfg.seed + 1 + 100 * s) for _ in variants for s in cfg.seeds]
    model = StackedLinearSSL(X.shape[1], cfg.rep_dim, cfg.emb_dim if with_projector.pop() else None, gens)
    sigmas = torch.tensor([float(v.split("=")[1]) if v.startswith("syre") else 0.0 for v in variants])
    per_copy = sigmas.repeat_interleave(S)
    removal = remove_symmetries(model, sigma=1.0, seed=cfg.seed + 2)  # parametrize: decay is towards θ₀
    with torch.no_grad():
        for name, offset in removal.offsets.items():
            theta = getattr(model, name).clone()
            offset.mul_(per_copy.view(-1, 1, 1).to(offset.dtype))
            setattr(model, name, theta)  # right_inverse: ψ = θ_init − θ₀, the function is unchanged
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed + 3)
    loss = torch.full((V * S,), math.nan)
    for _ in range(cfg.steps):
        x = X[torch.randint(0, len(X), (S, cfg.batch), generator=data_gen)]
        v1, v2 = augment(x, cfg, data_gen).repeat(V, 1, 1), augment(x, cfg, data_gen).repeat(V, 1, 1)
        loss = info_nce(model(v1)[1], model(v2)[1], cfg.tau)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # copies are independent: each gets the gradient of its own loss
        opt.step()
    theta, psi = learned_encoder(model, removal)
    losses = loss.detach()
    return {v: {"theta": theta[j * S:(j + 1) * S], "psi": psi[j * S:(j + 1) * S],
                "final_loss": losses[j * S:(j + 1) * S].tolist()} for j, v in enumerate(variants)}


def probe_accuracy(r: torch.Tensor, y: torch.Tensor, n_train: int) -> float:
    """Test accuracy of a logistic-regression probe on r (scaled by the square root of the largest covariance
    eigenvalue, so that only the representation's shape matters), trained on the first ``n_train`` rows."""
    from sklearn.linear_model import LogisticRegression

    ev = embedding_spectrum(r)
    z = (r.double() / math.sqrt(float(ev[0]))).numpy() if float(ev[0]) > 0 else r.double().numpy()
    clf = LogisticRegression(max_iter=2000).fit(z[:n_train], y[:n_train].numpy())
    return float(clf.score(z[n_train:], y[n_train:].numpy()))


def measure(theta_v: torch.Tensor, psi_v: torch.Tensor, X: torch.Tensor, y: torch.Tensor, cfg: Config) -> dict:
    """One copy: spectra of ψ_V x and θ_V x on the clean images, collapsed counts, eff. rank, probe."""
    r, r_psi = X @ theta_v.T, X @ psi_v.T
    ev, ev_psi = embedding_spectrum(r), embedding_spectrum(r_psi)
    return {"spectrum": ev.tolist(), "psi_spectrum": ev_psi.tolist(),
            "collapsed": int((ev <= cfg.zero_tol * ev[0]).sum()),
            "collapsed_psi": int((ev_psi <= cfg.zero_tol * ev_psi[0]).sum()),
            "eff_rank": float(effective_rank(r - r.mean(0))),
            "probe_accuracy": probe_accuracy(r, y, cfg.n_probe_train)}


def run(cfg: Config, ctx: Context) -> dict:
    X, y = digits()
    X = X - X.mean(0)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(cfg.seed))  # probe split
    names = variant_names(cfg)
    groups = [[v for v in names if v != "no_projector"], ["no_projector"]]
    trained = {}
    for group in ctx.track(groups, "dimensional: with / without projector"):
        trained.update(train_variants(group, X, cfg))
    out = {}
    for v in names:
        t = trained[v]
        out[v] = [{"seed": s, **measure(t["theta"][i], t["psi"][i], X[perm], y[perm], cfg),
                   "final_loss": t["final_loss"][i]} for i, s in enumerate(cfg.seeds)]
    return {"variants": out, "rep_dim": cfg.rep_dim, "zero_tol": cfg.zero_tol, "seeds": list(cfg.seeds),
            "syre_sigmas": list(cfg.syre_sigmas), "control_sigma": cfg.control_sigma}


# ------------------------------------------------------------------------------------------ analysis
def _values(results: dict, variant: str, key: str) -> list:
    return [r[key] for r in results["variants"][variant]]


def _mean(values) -> float:
    return float(np.mean([v for v in values if v is not None]))


def plot(results: dict, ctx: Context) -> list:
    fig, ax = figure(3)
    ctrl = f"syre σ₀={results['control_sigma']:g}"
    big = f"syre σ₀={max(results['syre_sigmas']):g}"
    for v in dict.fromkeys(["projector", "no_projector", ctrl, big]):
        if v not in results["variants"]:
            continue
        ev = np.array(_values(results, v, "psi_spectrum"))
        rel = np.maximum(ev / ev[:, :1], 1e-18).mean(0)
        ax[0, 0].semilogy(np.arange(1, len(rel) + 1), rel, "o-", ms=3,
                          label=f"{LABELS.get(v, v)}: {_mean(_values(results, v, 'collapsed_psi')):.1f} collapsed")
    ax[0, 0].axhline(results["zero_tol"], color="k", ls=":", lw=1, label="collapse tolerance")
    ax[0, 0].set_xlabel("eigenvalue index")
    ax[0, 0].set_ylabel("eigenvalue / largest (mean over seeds)")
    ax[0, 0].set_title("Spectrum of the learned part ψ_V x")
    ax[0, 0].legend(fontsize=6)
    sig = results["syre_sigmas"]
    names = [f"syre σ₀={s:g}" for s in sig]
    ax[0, 1].plot(sig, [_mean(_values(results, n, "collapsed_psi")) for n in names], "o-",
                  label="syre: collapsed, learned part ψ")
    ax[0, 1].plot(sig, [_mean(_values(results, n, "collapsed")) for n in names], "s--",
                  label="syre: collapsed, θ = θ₀ + ψ")
    ax[0, 1].axhline(_mean(_values(results, "projector", "collapsed")), color="tab:blue", ls=":",
                     label="plain decay (projector)")
    ax[0, 1].axvline(results["control_sigma"], color="r", lw=0.8, label="library default σ₀")
    ax[0, 1].set_xscale("log")
    ax[0, 1].set_xlabel("σ₀ / init scale")
    ax[0, 1].set_ylabel(f"collapsed eigenvalues (of {results['rep_dim']}), mean")
    ax[0, 1].set_title("Symmetry removal vs σ₀")
    ax[0, 1].legend(fontsize=6, loc="center left")
    acc = ax[0, 1].twinx()
    acc.plot(sig, [_mean(_values(results, n, "probe_accuracy")) for n in names], "g^-")
    acc.axhline(_mean(_values(results, "projector", "probe_accuracy")), color="g", ls=":", lw=0.8)
    acc.set_ylim(0, 1.02)
    acc.set_ylabel("linear-probe accuracy (triangles; dotted: plain)", color="g")
    variants = list(results["variants"])
    means = [_mean(_values(results, v, "probe_accuracy")) for v in variants]
    ax[0, 2].bar(range(len(variants)), means, color="tab:green")
    ax[0, 2].set_xticks(range(len(variants)), [LABELS.get(v, v) for v in variants], fontsize=6, rotation=30)
    ax[0, 2].set_ylim(0, 1.02)
    ax[0, 2].set_ylabel("linear-probe test accuracy, mean over seeds")
    ax[0, 2].set_title("Functional: linear probe on r = θ_V x")
    return [save(fig, ctx.out_dir, "dimensional")]


def _diff(a: list, b: list) -> list:
    return [x - y for x, y in zip(a, b, strict=True)]


def claims(results: dict, cfg: Config) -> list[Claim]:
    p = _values(results, "projector", "collapsed_psi")
    n = _values(results, "no_projector", "collapsed_psi")
    tol = f"eigenvalues ≤ {cfg.zero_tol:g} × largest"
    out = [
        finding(f"linear projector + decay: the representation collapses (≥ {cfg.margin} of {cfg.rep_dim} {tol})",
                f"≥ {cfg.margin}", p, p, statistic="collapsed dimensions with a linear projector", better="higher",
                threshold=cfg.margin, inclusive=True, contradict=0.5),
        finding("without a projector (no product, no nuclear-norm penalty): fewer collapsed dimensions",
                f"no_projector ≤ projector − {cfg.margin}", {"no_projector": n, "projector": p}, _diff(p, n),
                statistic="collapsed dimensions, projector − no projector", better="higher",
                threshold=cfg.margin, inclusive=True, contradict=0.0),
    ]
    for sigma in sorted({cfg.control_sigma, max(cfg.syre_sigmas)}):
        v = f"syre σ₀={sigma:g}"
        if v not in results["variants"]:
            continue
        tag = (f"symmetry removal at the library default σ₀={sigma:g} × init (THE control)"
               if sigma == cfg.control_sigma else
               f"symmetry removal at a LARGER σ₀={sigma:g} × init ({sigma / cfg.control_sigma:g} × the library "
               "default; not the control)")
        s = _values(results, v, "collapsed_psi")
        out.append(finding(f"{tag} prevents the collapse: collapsed dimensions of the learned part ψ_V x ({tol}), "
                           "syre vs projector", f"syre ≤ projector − {cfg.margin}", {"syre": s, "projector": p},
                           _diff(p, s), statistic=f"collapsed dimensions of ψ_V x, projector − syre σ₀={sigma:g}",
                           better="higher", threshold=cfg.margin, inclusive=True, contradict=0.0))
        pa, sa = _values(results, "projector", "probe_accuracy"), _values(results, v, "probe_accuracy")
        out.append(finding(f"{tag}: a better linear-probe accuracy of r = θ_V x than plain decay (functional)",
                           "syre − projector > 0", {"syre": sa, "projector": pa}, _diff(sa, pa),
                           statistic=f"probe accuracy, syre σ₀={sigma:g} − projector", better="higher",
                           threshold=0.0, contradict=0.0))
    return out
