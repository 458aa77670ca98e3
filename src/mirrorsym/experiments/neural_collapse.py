"""Neural collapse (NC1–NC4) against weight decay for a digits classifier trained to zero training error.

A ReLU MLP 64 → H → H → 10 is trained on a fixed training subset of scikit-learn's digits with minibatch
SGD + momentum and a cosine learning-rate decay to 0, one copy per weight decay (all copies at once,
batched weights, the same init and minibatches), once with squared error to one-hot targets (MSE) and
once with cross-entropy (CE). Decay is coupled, L + γ‖θ‖² with γ = λ/2 for the listed torch
``weight_decay`` λ (docs/theory.md#conventions). After training, on the training set, with features h = the last
hidden layer and the head's classifier (W, b), :func:`mirrorsym.diagnose.metrics.neural_collapse` gives
NC1 = Tr(Σ_W Σ_B⁺)/C, NC2 (equinorm: CV of the centred class-mean norms; equiangularity: mean
|cos + 1/(C−1)|, 0 for a simplex ETF), NC3 = ‖W/‖W‖ − Mᵀ/‖M‖‖², NC4 = disagreement of the classifier
with the nearest class mean.

Expectation (Papyan et al. 2020; Han et al. 2022 for MSE; unconstrained-features models with
regularisation, where the collapsed configuration is the decayed optimum): at zero training error,
decay pulls the features and classifier towards the collapsed, self-dual simplex configuration.
What this size shows, and the claims check: with MSE, NC2 (angles) and NC3 (self-duality) fall
monotonically with λ and NC1 improves at moderate λ but rises again at the largest one; with CE, at
this size and training length, decay does *not* reduce NC1 (it grows with λ) and NC2/NC3 barely move —
only zero training error and NC4 are claimed for CE. Both are drawn in the figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
    seed: int = 0


CONFIGS = {
    "tiny": Config(n_train=300, width=48, weight_decays=(0.0, 1e-3, 3e-3), steps=1500),
    "quick": Config(),
    "full": Config(n_train=1797, width=256, weight_decays=(0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), steps=30000,
                   batch=128),
}


def init_params(K: int, d_in: int, width: int, C: int, gen: torch.Generator) -> list[torch.Tensor]:
    """K identical copies of nn.Linear-default-initialised weights [W1, b1, W2, b2, W3, b3] (K leading)."""
    out = []
    for a, b in ((d_in, width), (width, width), (width, C)):
        bound = 1 / math.sqrt(a)
        W = (2 * torch.rand(b, a, generator=gen) - 1) * bound
        bias = (2 * torch.rand(b, generator=gen) - 1) * bound
        out += [W.expand(K, b, a).clone().requires_grad_(), bias.expand(K, b).clone().requires_grad_()]
    return out


def forward(params: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, d) shared by all copies → (logits (K, N, C), features (K, N, H))."""
    W1, b1, W2, b2, W3, b3 = params
    h = torch.relu(torch.einsum("nd,khd->knh", x, W1) + b1[:, None])
    h = torch.relu(h @ W2.transpose(1, 2) + b2[:, None])
    return h @ W3.transpose(1, 2) + b3[:, None], h


def train(cfg: Config, loss_kind: str, lr: float, X, y, gen: torch.Generator) -> list[torch.Tensor]:
    K = len(cfg.weight_decays)
    params = init_params(K, X.shape[1], cfg.width, 10, gen)
    gamma = torch.tensor(cfg.weight_decays) / 2  # L + γ‖θ‖², torch λ = 2γ
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    for t in range(cfg.steps):
        for g in opt.param_groups:  # cosine decay to 0: the end point is a converged one
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / cfg.steps))
        idx = torch.randint(0, len(X), (cfg.batch,), generator=gen)
        logits, _ = forward(params, X[idx])
        ce = data_loss(logits, y[idx], loss_kind)
        decay = sum((p.reshape(K, -1) ** 2).sum(1) for p in params)
        loss = (ce + gamma * decay).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return params


def data_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-copy mean loss (K,) of logits (K, N, C): cross-entropy, or squared error to one-hot targets."""
    K, _, C = logits.shape
    if kind == "ce":
        return F.cross_entropy(logits.reshape(-1, C), y.repeat(K), reduction="none").reshape(K, -1).mean(1)
    if kind == "mse":
        return ((logits - F.one_hot(y, C).to(logits.dtype)) ** 2).sum(2).mean(1)
    raise ValueError(f"neural_collapse: Config.loss must be 'ce' or 'mse', got {kind!r}")


def run(cfg: Config, ctx: Context) -> dict:
    X, y = digits()
    idx = torch.randperm(len(X), generator=ctx.generator(cfg.seed))[: cfg.n_train]
    X, y = X[idx], y[idx]
    out = {}
    for kind, lr in ctx.track(list(zip(cfg.losses, cfg.lrs, strict=True)), "neural collapse: losses"):
        params = train(cfg, kind, lr, X, y, ctx.generator(cfg.seed + 1))
        with torch.no_grad():
            logits, feats = forward(params, X)
        rows = []
        for k, wd in enumerate(cfg.weight_decays):
            nc = neural_collapse(feats[k], y, weight=params[4][k].detach(), bias=params[5][k].detach(),
                                 num_classes=10)
            rows.append({"weight_decay": wd, "train_acc": float((logits[k].argmax(1) == y).double().mean()),
                         "train_loss": float(data_loss(logits[k : k + 1], y, kind)[0]),
                         **{m: float(nc[m]) for m in METRICS}})
        out[kind] = rows
    return {"losses": out}


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
        for j, m in enumerate(METRICS):
            ax[j].plot(x, [r[m] for r in rows], "o-", color=f"C{n}", label=label)
        ax[5].plot(x, [r["train_acc"] for r in rows], "o-", color=f"C{n}", label=f"{label}: train accuracy")
        ax[5].plot(x, [r["train_loss"] for r in rows], "s--", color=f"C{n}", label=f"{label}: train loss")
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
    out = []
    for kind, rows in results["losses"].items():
        accs = [r["train_acc"] for r in rows]
        out.append(finding(f"{kind}: every weight decay reaches zero training error (the terminal phase; a "
                           "precondition of the findings here)", "train accuracy = 1", accs, [min(accs)],
                           statistic="lowest training accuracy over the decays", better="higher", threshold=1.0,
                           inclusive=True, contradict=None))
        nc4 = max(r["nc4"] for r in rows)
        out.append(finding(f"{kind}: NC4, classifier = nearest class mean, at every decay", "≤ 0.01", nc4, [nc4],
                           statistic="largest NC4 over the decays", better="lower", threshold=0.01,
                           inclusive=True))
    rows = results["losses"].get("mse")
    if rows is None:
        return out
    first, last = rows[0], rows[-1]
    for m in ("nc3", "nc2_equiangular"):
        seq = [r[m] for r in rows]
        out.append(finding(f"mse: {m} falls monotonically with weight decay", "strictly decreasing", seq,
                           [max(b - a for a, b in zip(seq, seq[1:], strict=False))],
                           statistic=f"largest change of {m} from one decay to the next", better="lower",
                           threshold=0.0))
    out.append(finding(f"mse: NC3 at the largest decay × {cfg.nc3_factor:g} < NC3 without decay",
                       f"< {first['nc3'] / cfg.nc3_factor:.3g}", last["nc3"],
                       [first["nc3"] / last["nc3"] if last["nc3"] > 0 else None],
                       statistic="NC3 without decay / NC3 at the largest decay", better="higher",
                       threshold=cfg.nc3_factor, contradict=1.0))
    best = min(r["nc1"] for r in rows[1:])
    out.append(finding("mse: some decay > 0 sharpens NC1 (min over λ > 0 < NC1 at λ = 0; not monotone: it "
                       "rises again at the largest decay)", f"< {first['nc1']:.3g}", best, [best - first["nc1"]],
                       statistic="smallest NC1 over λ > 0 − NC1 at λ = 0", better="lower", threshold=0.0))
    return out
