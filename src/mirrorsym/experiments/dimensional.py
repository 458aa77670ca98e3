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

Training: the sweep engine (``ctx.sweep``), one sweep per variant and one run per seed, ``keep_params``.
Run (variant, seed s) has sweep seed r = 1000 · ``cfg.seed`` + s for every variant, and everything random is
keyed by r: the initialisation θ_init (torch generator 1 + 100 r), θ₀ (``remove_symmetries(sigma=σ₀,
seed=2 + 100 r)`` on the freshly built copy, the library's offsets; 0 for plain decay), the minibatches and
the augmentations — so all variants of a seed share init, data order and views (paired comparisons). The
model (:class:`OffsetLinearSSL`) holds ψ as its parameters and θ₀ as buffers, φ = θ₀ + ψ (the parametrize
mode of ``remove_symmetries`` written out, ψ_init = θ_init − θ₀), so the engine's SGD + momentum + coupled
decay λψ is exactly the library's symmetry removal of that copy. The two views come from the engine's
per-run random inputs (``Sweep(random_inputs=4)``: N(0, 1) tensors shaped like the minibatch; keep mask
Φ(ε) < ``keep``, additive noise ``noise`` · ε, the distribution of :func:`augment`); the loss is the
symmetrised InfoNCE of the two views. θ_V = θ₀ + ψ_V is rebuilt from the run's trained ψ and its factory's
θ₀. ``final_loss`` is the sweep's ``loss`` metric: InfoNCE of the clean images (no augmentation) on all
images at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

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


class OffsetLinearSSL(nn.Module):
    """One copy: r = (θ₀_V + ψ_V) x, z = (θ₀_W + ψ_W) r (z = r without a projector). The parameters are the
    learned parts ψ (named ``encoder``, ``projector``); θ₀ are buffers (``encoder_offset``,
    ``projector_offset``; zero for plain decay). This is ``remove_symmetries``' parametrize mode written out
    (φ = θ₀ + ψ, D = I): the engine's coupled decay λψ on the parameters *is* λ(θ − θ₀).

    ``forward(x)`` embeds the clean images and returns them twice, (2, B, D); ``forward(x, ε₀, ε₁, ε₂, ε₃)``
    (the sweep's four random inputs, N(0, 1), shaped like x) embeds two augmented views, view a =
    x ⊙ [Φ(ε₂ₐ) < keep] + noise · ε₂ₐ₊₁ — in distribution exactly :func:`augment` (Φ(ε) ~ U(0, 1), so the mask
    is Bernoulli(keep); the noise is N(0, noise²); all independent)."""

    encoder_offset: torch.Tensor
    projector_offset: torch.Tensor

    def __init__(self, theta: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor], keep: float,
                 noise: float):
        super().__init__()
        self.keep, self.noise = keep, noise
        self.encoder = nn.Parameter(theta["encoder"] - offsets["encoder"])  # ψ = θ_init − θ₀ (right_inverse)
        self.register_buffer("encoder_offset", offsets["encoder"])
        self.has_projector = "projector" in theta
        if self.has_projector:
            self.projector = nn.Parameter(theta["projector"] - offsets["projector"])
            self.register_buffer("projector_offset", offsets["projector"])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        r = x @ (self.encoder_offset + self.encoder).T
        return r @ (self.projector_offset + self.projector).T if self.has_projector else r

    def forward(self, x: torch.Tensor, *eps: torch.Tensor) -> torch.Tensor:
        if not eps:
            z = self.embed(x)
            return torch.stack([z, z])
        m1, n1, m2, n2 = eps
        keep1 = (0.5 * (1 + torch.erf(m1 / math.sqrt(2))) < self.keep).to(x.dtype)
        keep2 = (0.5 * (1 + torch.erf(m2 / math.sqrt(2))) < self.keep).to(x.dtype)
        views = torch.cat([x * keep1 + self.noise * n1, x * keep2 + self.noise * n2])
        return self.embed(views).reshape(2, x.shape[0], -1)


def make_model(d_in: int, rep_dim: int, emb_dim: int | None, sigma: float, keep: float, noise: float,
               seed: int) -> OffsetLinearSSL:
    """The sweep's model factory (bound with ``functools.partial``; ``seed`` = the run seed r): θ_init =
    (V, W), V, W ~ N(0, 1/fan_in) from ``torch.Generator`` seed 1 + 100 r (V first); for σ > 0, θ₀ =
    ``remove_symmetries(plain model, sigma=σ, seed=2 + 100 r).offsets`` (σ × each tensor's init scale, its
    std, × N(0, 1): the library's symmetry removal of this copy), else θ₀ = 0. ψ = θ_init − θ₀, so every
    variant of seed r starts from the same function."""
    gen = torch.Generator().manual_seed(1 + 100 * seed)
    plain = nn.Module()
    plain.encoder = nn.Parameter(torch.randn(rep_dim, d_in, generator=gen) / math.sqrt(d_in))
    if emb_dim:
        plain.projector = nn.Parameter(torch.randn(emb_dim, rep_dim, generator=gen) / math.sqrt(rep_dim))
    theta = {n: p.detach().clone() for n, p in plain.named_parameters()}
    if sigma > 0:
        offsets = dict(remove_symmetries(plain, sigma=sigma, seed=2 + 100 * seed).offsets)
    else:
        offsets = {n: torch.zeros_like(t) for n, t in theta.items()}
    return OffsetLinearSSL(theta, offsets, keep, noise)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetrised InfoNCE with dot-product similarity; positives are the pairs (z1_i, z2_i). Inputs (B, D)
    give a scalar; inputs (..., B, D) give one loss per leading index."""
    logits = z1 @ z2.transpose(-1, -2) / tau
    rows = logits.log_softmax(-1).diagonal(dim1=-2, dim2=-1).mean(-1)
    cols = logits.log_softmax(-2).diagonal(dim1=-2, dim2=-1).mean(-1)
    return -0.5 * (rows + cols)


def views_info_nce(z: torch.Tensor, tau: float) -> torch.Tensor:
    """The sweep's criterion: :func:`info_nce` of the two views ``z = (z1, z2)`` the model returns."""
    return info_nce(z[0], z[1], tau)


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """One augmented view with torch's generator (the reference distribution of the model's views)."""
    keep = (torch.rand(x.shape, generator=gen) < cfg.keep).to(x.dtype)
    return x * keep + cfg.noise * torch.randn(x.shape, generator=gen)


def variant_sigma(variant: str) -> float:
    """σ₀ / init scale of a variant: 0 for plain decay."""
    return float(variant.split("=")[1]) if variant.startswith("syre") else 0.0


def run_seed(cfg: Config, s: int) -> int:
    """The sweep seed of experiment seed s: it keys the initialisation, θ₀, minibatches and augmentations."""
    return 1000 * cfg.seed + s


def variant_sweep(variant: str, X: torch.Tensor, cfg: Config):
    """The :class:`mirrorsym.sweep.Sweep` of one variant: one run per seed, SGD + momentum, coupled decay,
    four random inputs per step (the two views' masks and noise), final parameters kept."""
    from ..sweep import Sweep

    emb = None if variant == "no_projector" else cfg.emb_dim
    factory = partial(make_model, X.shape[1], cfg.rep_dim, emb, variant_sigma(variant), cfg.keep, cfg.noise)
    grid = {"seed": [run_seed(cfg, s) for s in cfg.seeds], "lr": cfg.lr, "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch, "steps": cfg.steps}
    return Sweep(factory, partial(views_info_nce, tau=cfg.tau), (X,), grid, metrics={"loss": "loss"},
                 record_every=cfg.steps, name=f"dimensional-{variant}", keep_params=True, random_inputs=4)


def train_variants(variants: list[str], X: torch.Tensor, cfg: Config, ctx: Context) -> dict:
    """Train every seed of every variant on the sweep engine (``ctx.sweep``, one sweep per variant, one run
    per seed). Run (variant, seed s) has sweep seed r = :func:`run_seed` whatever the variant, so it starts
    from seed s's initialisation and sees seed s's minibatches and augmentations (paired comparisons).

    Returns {variant: {"theta": θ_V (S, rep, d), "psi": ψ_V, "final_loss": [S]}} with ψ_V the trained
    parameter, θ_V = θ₀ + ψ_V (θ₀ rebuilt by the factory) and ``final_loss`` the clean-image InfoNCE of the
    trained encoder on all images (the sweep's ``loss`` metric: views without augmentation)."""
    from ..sweep import final_params

    known = variant_names(cfg)
    if any(v not in known for v in variants):
        raise ValueError(f"dimensional: unknown variant in {variants}; known: {known}")
    out = {}
    for v in ctx.track(variants, "dimensional: variants"):
        sweep = variant_sweep(v, X, cfg)
        slug = v.replace(" σ₀=", "-sigma")
        df = ctx.sweep(sweep, f"sweep-{slug}")
        psi, theta = [], []
        for (_, row), config in zip(df.iterrows(), sweep.configs, strict=True):
            p = final_params(row)["encoder"]
            offset = sweep.problem.model_factory(config["seed"]).encoder_offset
            psi.append(p)
            theta.append(offset + p)
        out[v] = {"theta": torch.stack(theta), "psi": torch.stack(psi), "final_loss": df["loss"].tolist()}
    return out


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
    trained = train_variants(names, X, cfg, ctx)
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
