"""Neural collapse (NC1–NC4) against weight decay for a digits classifier trained to zero training error.

A ReLU MLP 64 → H → H → 10 is trained on a fixed training subset of scikit-learn's digits with minibatch
SGD + momentum and a cosine learning-rate decay to 0, one copy per (weight decay, seed) (all copies at
once, batched weights; within a seed every decay shares the init and minibatches, each seed has its own),
once with squared error to one-hot targets (MSE) and once with cross-entropy (CE). The grid runs on the
sweep engine (``ms.sweep``: momentum, cosine schedule, every (decay, seed) a vmapped copy); the NC metrics
are computed from each run's trained parameters (``keep_params``). Decay is coupled,
L + γ‖θ‖² with γ = λ/2 for the listed torch ``weight_decay`` λ (docs/theory.md#conventions). After
training, on the training set, with features h = the last hidden layer and the head's classifier (W, b),
:func:`mirrorsym.diagnose.metrics.neural_collapse` gives
NC1 = Tr(Σ_W Σ_B⁺)/C, NC2 (equinorm: CV of the centred class-mean norms; equiangularity: mean
|cos + 1/(C−1)|, 0 for a simplex ETF), NC3 = ‖W/‖W‖ − Mᵀ/‖M‖‖², NC4 = disagreement of the classifier
with the nearest class mean.

Expectation (Papyan et al. 2020; Han et al. 2022 for MSE; unconstrained-features models with
regularisation, where the collapsed configuration is the decayed optimum): at zero training error,
decay pulls the features and classifier towards the collapsed, self-dual simplex configuration.
The same findings are stated for both losses, each over ``seeds`` seeds: NC2 (angles) and NC3
(self-duality) fall monotonically with λ, NC3 at least ``nc3_factor`` times smaller at the largest λ, and
some λ > 0 sharpens NC1. At this size and training length they tend to hold for MSE and not for CE (where
decay does not sharpen NC1 and NC3 barely moves); each comes out with its own verdict in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..diagnose.metrics import neural_collapse
from .base import Claim, Context, finding
from .data import digits
from .plotting import figure, save

NAME = "neural_collapse"
TITLE = "Neural collapse NC1–NC4 vs weight decay (digits MLP at zero training error)"

METRICS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4")


@dataclass(frozen=True)
class Config:
    n_train: int = 500
    width: int = 64
    weight_decays: tuple[float, ...] = (0.0, 3e-4, 1e-3, 3e-3)
    losses: tuple[str, ...] = ("mse", "ce")  # squared error to one-hot targets; cross-entropy
    lrs: tuple[float, ...] = (0.05, 0.1)  # per loss
    momentum: float = 0.9
    batch: int = 100
    steps: int = 4000
    nc3_factor: float = 2.0
    seeds: int = 5
    seed: int = 0


CONFIGS = {
    "tiny": Config(n_train=300, width=48, weight_decays=(0.0, 1e-3, 3e-3), steps=1500),
    "quick": Config(),
    "full": Config(n_train=1797, width=256, weight_decays=(0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), steps=30000,
                   batch=128),
}


def mlp(width: int, seed: int) -> nn.Sequential:
    """The classifier 64 → width → width → 10 (ReLU), torch's default init from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def features_and_logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features h = the last hidden layer, logits) of :func:`mlp` with parameters ``params``."""
    h = torch.relu(x @ params["0.weight"].T + params["0.bias"])
    h = torch.relu(h @ params["2.weight"].T + params["2.bias"])
    return h, h @ params["4.weight"].T + params["4.bias"]


def one_hot_squared_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over samples of ‖logits − one_hot(y)‖² (the MSE criterion; the one-hot by comparison, which vmaps,
    where F.one_hot checks the labels' range with a host sync)."""
    target = (y[..., None] == torch.arange(logits.shape[-1], device=y.device)).to(logits.dtype)
    return ((logits - target) ** 2).sum(-1).mean()


CRITERIA: dict[str, Callable[..., torch.Tensor]] = {"ce": F.cross_entropy, "mse": one_hot_squared_error}


def data_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-copy mean loss (K,) of logits (K, N, C) with labels (N,) shared or (K, N) per copy: cross-entropy,
    or squared error to one-hot targets."""
    K, N, C = logits.shape
    y = y.expand(K, N)
    if kind == "ce":
        return F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none").reshape(K, -1).mean(1)
    if kind == "mse":
        return ((logits - F.one_hot(y, C).to(logits.dtype)) ** 2).sum(2).mean(1)
    raise ValueError(f"neural_collapse: Config.loss must be 'ce' or 'mse', got {kind!r}")


def run(cfg: Config, ctx: Context) -> dict:
    from ..sweep import Sweep, final_params

    X, y = digits()
    idx = torch.randperm(len(X), generator=ctx.generator(cfg.seed))[: cfg.n_train]
    X, y = X[idx], y[idx]
    out = {}
    seeds = [cfg.seed + 1 + 1000 * s for s in range(cfg.seeds)]
    for kind, lr in ctx.track(list(zip(cfg.losses, cfg.lrs, strict=True)), "neural collapse: losses"):
        if kind not in CRITERIA:
            raise ValueError(f"neural_collapse: Config.losses entries must be in {sorted(CRITERIA)}, got {kind!r}")
        grid = {"lr": lr, "momentum": cfg.momentum, "lr_schedule": "cosine", "batch_size": cfg.batch,
                "steps": cfg.steps, "weight_decay": list(cfg.weight_decays), "seed": seeds}
        sweep = Sweep(partial(mlp, cfg.width), CRITERIA[kind], (X, y), grid, metrics={"loss": "loss"},
                      record_every=10**9, name=f"neural-collapse-{kind}", keep_params=True)
        df = ctx.sweep(sweep, f"sweep-{kind}")
        rows = []  # one row per decay; every value a list over seeds
        for wd in cfg.weight_decays:
            per_seed = []
            for seed in seeds:
                (row,) = [r for _, r in df.iterrows() if r["weight_decay"] == wd and r["seed"] == seed]
                p = final_params(row)
                with torch.no_grad():
                    feats, logits = features_and_logits(p, X)
                nc = neural_collapse(feats, y, weight=p["4.weight"], bias=p["4.bias"], num_classes=10)
                per_seed.append({"train_acc": float((logits.argmax(1) == y).double().mean()),
                                 "train_loss": float(data_loss(logits[None], y, kind)[0]),
                                 **{m: float(nc[m]) for m in METRICS}})
            rows.append({"weight_decay": wd, **{m: [q[m] for q in per_seed] for m in per_seed[0]}})
        out[kind] = rows
    return {"losses": out, "seeds": cfg.seeds}


def plot(results: dict, ctx: Context) -> list:
    titles = {"nc1": "NC1 Tr(Σ_W Σ_B⁺)/C", "nc2_equinorm": "NC2 equinorm (CV of norms)",
              "nc2_equiangular": "NC2 equiangularity |cos + 1/(C−1)|", "nc3": "NC3 self-duality",
              "nc4": "NC4 classifier ≠ nearest mean"}
    fig, axes = figure(3, 2, width=4.0, height=3.0)
    ax = axes.reshape(-1)
    for n, (kind, rows) in enumerate(results["losses"].items()):
        wd = np.array([r["weight_decay"] for r in rows])
        x = np.where(wd > 0, wd, wd[wd > 0].min() / 4 if (wd > 0).any() else 1e-5)  # λ = 0 drawn at far left
        label = {"mse": "MSE (one-hot)", "ce": "cross-entropy"}.get(kind, kind)
        for j, m in enumerate(METRICS):  # mean over seeds, bars: min–max
            v = np.array([r[m] for r in rows], dtype=float)
            mean = v.mean(1)
            ax[j].errorbar(x, mean, yerr=[mean - v.min(1), v.max(1) - mean], fmt="o-", capsize=2, color=f"C{n}",
                           label=f"{label} ({v.shape[1]} seeds)")
        ax[5].plot(x, [np.mean(r["train_acc"]) for r in rows], "o-", color=f"C{n}", label=f"{label}: train accuracy")
        ax[5].plot(x, [np.mean(r["train_loss"]) for r in rows], "s--", color=f"C{n}", label=f"{label}: train loss")
    for j, m in enumerate(METRICS):
        ax[j].set_xscale("log")
        ax[j].set_yscale("log" if m != "nc4" else "linear")
        ax[j].set_xlabel("torch weight_decay λ (λ = 0 at far left)")
        ax[j].set_ylabel(m + " (collapse: → 0)")
        ax[j].set_title(titles[m])
    ax[0].legend(fontsize=7)
    ax[5].set_xscale("log")
    ax[5].set_xlabel("torch weight_decay λ")
    ax[5].set_title("Fit of the training set")
    ax[5].legend(fontsize=6)
    return [save(fig, ctx.out_dir, "neural_collapse")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    """The same findings for each loss, one statistic per seed (rows hold one list over seeds per metric)."""
    out = []
    for kind, rows in results["losses"].items():
        seeds = range(len(rows[0]["train_acc"]))
        acc = [min(r["train_acc"][s] for r in rows) for s in seeds]
        out.append(finding(f"{kind}: every weight decay reaches zero training error (the terminal phase; a "
                           "precondition of the findings here)", "train accuracy = 1", acc, acc,
                           statistic="lowest training accuracy over the decays", better="higher", threshold=1.0,
                           inclusive=True, contradict=None))
        nc4 = [max(r["nc4"][s] for r in rows) for s in seeds]
        out.append(finding(f"{kind}: NC4, classifier = nearest class mean, at every decay", "≤ 0.01", nc4, nc4,
                           statistic="largest NC4 over the decays", better="lower", threshold=0.01,
                           inclusive=True))
        for m in ("nc3", "nc2_equiangular"):
            steps = [max(b[m][s] - a[m][s] for a, b in zip(rows, rows[1:], strict=False)) for s in seeds]
            out.append(finding(f"{kind}: {m} falls monotonically with weight decay", "strictly decreasing",
                               [[r[m][s] for r in rows] for s in seeds], steps,
                               statistic=f"largest change of {m} from one decay to the next", better="lower",
                               threshold=0.0))
        first, last = rows[0], rows[-1]
        ratio = [first["nc3"][s] / last["nc3"][s] if last["nc3"][s] > 0 else None for s in seeds]
        out.append(finding(f"{kind}: NC3 at the largest decay × {cfg.nc3_factor:g} < NC3 without decay",
                           f"ratio > {cfg.nc3_factor:g}", ratio, ratio,
                           statistic="NC3 without decay / NC3 at the largest decay", better="higher",
                           threshold=cfg.nc3_factor, contradict=1.0))
        gain = [min(r["nc1"][s] for r in rows[1:]) - first["nc1"][s] for s in seeds]
        out.append(finding(f"{kind}: some decay > 0 sharpens NC1 (min over λ > 0 < NC1 at λ = 0)", "< 0", gain, gain,
                           statistic="smallest NC1 over λ > 0 − NC1 at λ = 0", better="lower", threshold=0.0))
    return out
