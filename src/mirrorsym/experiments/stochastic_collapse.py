"""Stochastic collapse: SGD noise merges two hidden units into one (Chen et al. 2023, docs/theory.md#gradient-noise).

Swapping two hidden units (incoming row and bias; the outgoing weights are fixed to 1) is a mirror whose
surface is "the two units are identical" (docs/theory.md#permutation). On that surface every per-sample
gradient has no component off it, so near it SGD's off-surface part z evolves as z ← (I − ηĤ_t)z with the
random projected minibatch Hessian Ĥ_t, and SGD merges the units iff the top Lyapunov exponent Λ(η, b) < 0
(docs/theory.md#no-additive-noise). No weight decay is used (γ = 0): the merging here is noise alone.

Problem. Regression with a tanh soft committee machine f(x) = Σ_j tanh(w_j·x + b_j) of ``hidden`` = 2
units on ``n`` samples x ~ N(0, I_d) labelled by a 2-unit committee Σ_j tanh(w*_j·x) plus Gaussian label
noise; loss mean (f − y)². (Fixed outgoing weights: with trainable ones the one-unit function is a whole
flat line of configurations, and in trials SGD noise drove one unit dead along it instead of merging.)
The reference point θ* is the best fit with both units identical (LBFGS, deterministic): a stationary
point on the swap surface (the committee's symmetric plateau) that fits worse than two distinct units, so
the surface is a saddle of the expected loss (μ < 0: gradient descent leaves it). This is the setting in
which the noise theory predicts a learning-rate threshold: a student with more units than the teacher
needs has its duplicated configurations at flat, zero-residual points, where nothing pushes identical
units apart and there is no threshold to test.

Prediction. ``ms.theory.critical_learning_rate`` for the swap mirror ``ms.Mirror.swap`` of the two units at
θ* (``loss_fn(params, batch)`` the mean loss over a batch), one η_c per batch size b: above η_c (and below
the upper root, if any) Λ < 0 and SGD is predicted to merge the units; below it they separate.

Measurement. Every (lr, batch size, seed) is one run of plain SGD on the sweep engine (``ctx.sweep``) from
θ* + a random off-surface displacement that puts the units ``init_split`` apart (relative to their norm:
distinct at the start), for ``steps`` steps. The final parameters come back from the sweep as one metric
per parameter entry and are read by ``ms.diagnose`` (per permutation group: dead, distinct, and duplicated
= units − dead − distinct living units that duplicate another, at its documented tolerances: dead ≤ 1e-3 of
the layer's largest unit, duplicate ≤ 5 % relative distance) and functionally (tanh activations on the
data: a unit is dead when it never exceeds 1e-3 of the layer's largest activation, two units are
duplicated when their activation vectors, sign fixed, are within 5 % relative distance). A run *merged*
when ms.diagnose counts a duplicated unit. The *merge boundary* of a seed and batch size is the geometric
mean of the largest grid lr below the first merged lr and that lr (the first merged lr: the smallest lr
from which every larger stable lr merged too).

Findings (rules fixed here): (a) at the smallest batch the units merge at the largest lr (duplicated > 0)
and not at the smallest lr, and the distinct fraction falls between them; smaller batches merge at smaller
lr; (b) per batch size, the merge boundary lies within a factor ``factor`` of η_c: |log(boundary/η_c)| <
log(factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from .base import Claim, Context, finding
from .permutation import entry_metrics, params_from_row
from .plotting import figure, save

NAME = "stochastic_collapse"
TITLE = "Stochastic collapse: SGD noise merges hidden units into identical ones above a critical learning rate"


@dataclass(frozen=True)
class Config:
    d: int = 1
    n: int = 32
    teacher_scale: float = 1.0
    label_noise: float = 1.0
    hidden: int = 2
    init_split: float = 0.2  # relative distance between the two units at the start
    lrs: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
    batches: tuple[int, ...] = (1, 4)
    steps: int = 3000
    seeds: int = 5
    factor: float = 2.0  # (b): merge boundary within this factor of the predicted η_c
    num_samples: int = 20000  # minibatches for the Lyapunov exponents
    record: int = 20  # records of the split distance per run (for the figure)
    seed: int = 0


CONFIGS = {
    "tiny": Config(lrs=(0.01, 0.08, 0.32), steps=600, seeds=5, num_samples=2000),
    "quick": Config(),
    "full": Config(lrs=tuple(float(x) for x in np.geomspace(0.005, 0.6, 25)), batches=(1, 2, 4, 8), steps=40000,
                   seeds=20, num_samples=100000),
}


class Student(nn.Module):
    """Soft committee machine f(x) = Σ_j tanh(w_j·x + b_j) (outgoing weights fixed to 1), float64."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(d, hidden, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(x)).sum(-1)


def make_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n, cfg.d, generator=g, dtype=torch.float64)
    w = cfg.teacher_scale * torch.randn(2, cfg.d, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w.T).sum(-1)
    return x, y + cfg.label_noise * torch.randn(cfg.n, generator=g, dtype=torch.float64)


def batch_loss(params: dict, batch: tuple) -> torch.Tensor:
    """Mean squared error of the student with ``params`` (its named parameters) on ``batch`` = (x, y)."""
    x, y = batch
    h = torch.tanh(x @ params["hidden.weight"].T + params["hidden.bias"])
    return ((h.sum(-1) - y) ** 2).mean()


def swap_mirror(i: int = 0, j: int = 1):
    """The swap mirror of hidden units i and j: incoming row, bias, outgoing column."""
    from ..core import Mirror

    return Mirror.swap({"hidden.weight": [i], "hidden.bias": [i]}, {"hidden.weight": [j], "hidden.bias": [j]})


def reference_point(x: torch.Tensor, y: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """θ*: every unit the same (w, b), the best such fit (LBFGS from a fixed start on the loss of
    f = hidden · tanh(w·x + b)): a stationary point on every swap surface (the committee's symmetric plateau)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    k = cfg.hidden
    w = (0.5 * torch.randn(1, cfg.d, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=5000, tolerance_grad=1e-14, tolerance_change=1e-18,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = batch_loss({"hidden.weight": w.expand(k, -1), "hidden.bias": b.expand(k)}, (x, y))
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return {"hidden.weight": w.detach().repeat(k, 1), "hidden.bias": b.detach().repeat(k)}


def unit_matrix(params: dict) -> torch.Tensor:
    """(hidden, d + 1): incoming row and bias of every unit."""
    return torch.cat([params["hidden.weight"], params["hidden.bias"][:, None]], dim=1)


def make_student(d: int, hidden: int, theta: tuple[torch.Tensor, ...], split: float, seed: int) -> Student:
    """The student at θ* (``theta``: its tensors in named_parameters order) moved off the swap surface of
    units 0 and 1 by a random direction (from ``seed``) such that ‖u_0 − u_1‖ = split · ‖u_0 + u_1‖/2."""
    model = Student(d, hidden)
    names = [n for n, _ in model.named_parameters()]
    point = dict(zip(names, theta, strict=True))
    mirror = swap_mirror()
    g = torch.Generator().manual_seed(10_000 + seed)
    xi = torch.randn(mirror.dim(point), generator=g, dtype=torch.float64)
    step = mirror.direction(xi / xi.norm(), point)
    U = unit_matrix(point)
    # along O, a unit coefficient vector moves u_0 − u_1 by √2 in norm
    scale = split * U[0].norm().item() / math.sqrt(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(point[n] + scale * step[n])
    return model


class SplitDistance:
    """Sweep metric: ‖u_0 − u_1‖ / max(‖u_0‖, ‖u_1‖) of the raw unit vectors (a class: Ray pickles it)."""

    def __call__(self, params: dict, data) -> torch.Tensor:
        U = torch.cat([params["hidden.weight"], params["hidden.bias"][:, None]], dim=1)
        return (U[0] - U[1]).norm() / torch.maximum(U[0].norm(), U[1].norm())


def functional_counts(model: Student, x: torch.Tensor) -> dict:
    """Dead and duplicated units from the tanh activations on ``x`` (see the module docstring)."""
    from ..diagnose.metrics import DEAD_TOL, DUPLICATE_TOL, count_units

    with torch.no_grad():
        acts = torch.tanh(model.hidden(x)).T.double()  # (units, N)
    lead = acts.gather(1, acts.abs().argmax(1, keepdim=True))
    acts = acts * torch.where(lead < 0, -1.0, 1.0)  # tanh is odd: a sign-flipped unit is the same unit
    c = count_units(acts, DEAD_TOL, DUPLICATE_TOL)
    return {"dead": c.dead, "duplicated": c.duplicated, "distinct": c.distinct}


def weight_counts(model: nn.Module, x: torch.Tensor, smap) -> dict:
    """ms.diagnose's dead / distinct / duplicated units of the hidden layer (its permutation group)."""
    from ..diagnose import diagnose

    df = diagnose(model, x[:1], symmetries=smap, plots=False).to_pandas()
    row = df[df["kind"] == "permutation"].iloc[0]
    units, dead, distinct = int(row["units"]), int(row["dead"]), int(row["distinct"])
    return {"units": units, "dead": dead, "distinct": distinct, "duplicated": units - dead - distinct}


def run(cfg: Config, ctx: Context) -> dict:
    from ..detect import find_symmetries
    from ..sweep import Sweep
    from ..theory import critical_learning_rate, minibatch_curvature

    x, y = make_data(cfg)
    theta = reference_point(x, y, cfg)
    template = Student(cfg.d, cfg.hidden)
    names = [n for n, _ in template.named_parameters()]
    theta_t = tuple(theta[n] for n in names)
    grad = torch.func.grad(batch_loss)(theta, (x, y))
    grad_norm = float(torch.sqrt(sum((g**2).sum() for g in grad.values())))
    mirror = swap_mirror()

    # theory at θ*
    curv = minibatch_curvature(batch_loss, theta, mirror, (x, y))
    mean_eigs = torch.linalg.eigvalsh(curv.mean_block()).tolist()
    eta_grid = np.geomspace(min(cfg.lrs) / 2, max(cfg.lrs) * 1.5, 40)
    theory = []
    for b in cfg.batches:
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        crit = critical_learning_rate(batch_loss, theta, mirror, (x, y), batch_size=b, num_samples=cfg.num_samples,
                                      generator=gen, bracket=(min(cfg.lrs) / 4, max(cfg.lrs) * 2))
        curve = curv.lyapunov_curve(list(eta_grid), b, num_samples=cfg.num_samples,
                                    generator=torch.Generator().manual_seed(cfg.seed + 3))
        on_grid = curv.lyapunov_curve(list(cfg.lrs), b, num_samples=cfg.num_samples,
                                      generator=torch.Generator().manual_seed(cfg.seed + 3))
        theory.append({"batch": b, "critical_lr": crit.value, "upper": crit.upper, "second_order": crit.second_order,
                       "mu": crit.mu, "s2": crit.s2, "etas": eta_grid.tolist(), "lambda": curve.values.tolist(),
                       "lambda_stderr": curve.stderrs.tolist(), "lambda_on_grid": on_grid.values.tolist()})

    # SGD on the sweep engine
    factory = partial(make_student, cfg.d, cfg.hidden, theta_t, cfg.init_split)
    metrics = {"loss": "loss", "split": SplitDistance(), **entry_metrics(template)}
    grid = [{"lr": lr, "batch_size": b, "steps": cfg.steps, "seed": cfg.seed + s}
            for b in cfg.batches for lr in cfg.lrs for s in range(cfg.seeds)]
    sweep = Sweep(factory, nn.functional.mse_loss, (x, y), grid, metrics=metrics,
                  record_every=max(1, cfg.steps // cfg.record), name="stochastic-collapse")
    df = ctx.sweep(sweep)

    smap = find_symmetries(template, x[:1])
    init = [weight_counts(factory(cfg.seed + s), x, smap) for s in range(cfg.seeds)]
    runs = []
    for _, row in df.iterrows():
        rec = {"lr": float(row["lr"]), "batch": int(row["batch_size"]), "seed": int(row["seed"]) - cfg.seed,
               "status": row["status"], "loss": float(row["loss"]), "split": float(row["split"]),
               "split_history": [float(v) for v in row["history_split"]], "weights": None, "functional": None}
        if row["status"] == "ok":
            model = Student(cfg.d, cfg.hidden)
            model.load_state_dict(params_from_row(row, template))
            rec["weights"] = weight_counts(model, x, smap)
            rec["functional"] = functional_counts(model, x)
        runs.append(rec)
    return {"grad_norm_at_reference": grad_norm, "reference": {n: theta[n].tolist() for n in names},
            "mean_block_eigs": mean_eigs, "theory": theory, "init": init, "runs": runs,
            "history_step": [int(s) for s in df["history_step"].iloc[0]], "lrs": list(cfg.lrs),
            "batches": list(cfg.batches), "seeds": cfg.seeds, "hidden": cfg.hidden}


# ---------------------------------------------------------------------------------------------- analysis
def _cell(results: dict, b: int, lr: float, seed: int) -> dict | None:
    for r in results["runs"]:
        if r["batch"] == b and r["seed"] == seed and math.isclose(r["lr"], lr):
            return r
    return None


def merged(rec: dict | None) -> bool | None:
    """ms.diagnose counts a duplicated hidden unit (None for a diverged run)."""
    return None if rec is None or rec["weights"] is None else rec["weights"]["duplicated"] > 0


def merge_boundary(results: dict, b: int, seed: int) -> float | None:
    """Geometric mean of the first merged lr (every larger stable lr merged too) and the grid lr below it;
    None when no lr merges or the smallest lr already does (the boundary is off the grid)."""
    lrs = sorted(results["lrs"])
    flags = [merged(_cell(results, b, lr, seed)) for lr in lrs]
    first = None
    for i in range(len(lrs) - 1, -1, -1):
        if flags[i] is None:  # a diverged run: skip it (it neither merged nor separated)
            continue
        if not flags[i]:
            break
        first = i
    if first is None or first == 0:
        return None
    return math.sqrt(lrs[first] * lrs[first - 1])


def merged_fraction(results: dict, b: int) -> list[float]:
    """Per grid lr: the fraction of stable seeds whose units merged."""
    out = []
    for lr in results["lrs"]:
        flags = [merged(_cell(results, b, lr, s)) for s in range(results["seeds"])]
        stable = [f for f in flags if f is not None]
        out.append(float(np.mean(stable)) if stable else math.nan)
    return out


def plot(results: dict, ctx: Context) -> list:
    fig, ax = figure(3, width=4.4)
    lrs = np.array(results["lrs"])
    for th in results["theory"]:
        b = th["batch"]
        line, = ax[0, 0].plot(lrs, merged_fraction(results, b), "o-", label=f"SGD batch {b}")
        if th["critical_lr"] is not None and math.isfinite(th["critical_lr"] or math.nan):
            ax[0, 0].axvline(th["critical_lr"], color=line.get_color(), ls="--", lw=1)
            ax[0, 1].axvline(th["critical_lr"], color=line.get_color(), ls="--", lw=1)
        ax[0, 1].plot(th["etas"], np.array(th["lambda"], dtype=float) * 1e3, color=line.get_color(),
                      label=f"batch {b}: η_c = {th['critical_lr'] if th['critical_lr'] is not None else math.nan:.3g}")
        for s in range(results["seeds"]):
            rec = [_cell(results, b, lr, s) for lr in lrs]
            ax[0, 2].plot(lrs, [r["split"] if r and r["status"] == "ok" else np.nan for r in rec], ".",
                          color=line.get_color(), alpha=0.6, label=f"batch {b}" if s == 0 else None)
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("learning rate η")
    ax[0, 0].set_ylabel("fraction of seeds with a duplicated unit")
    ax[0, 0].set_title("Units merged (ms.diagnose); dashed: predicted η_c")
    ax[0, 0].legend(fontsize=7)
    ax[0, 1].axhline(0, color="k", lw=0.8)
    ax[0, 1].set_xscale("log")
    ax[0, 1].set_xlabel("learning rate η")
    ax[0, 1].set_ylabel("Λ × 10³ (per step)")
    ax[0, 1].set_title("Lyapunov exponent of the swap mirror at θ*")
    ax[0, 1].legend(fontsize=7)
    ax[0, 2].axhline(0.05, color="k", ls=":", lw=1, label="5 % (duplicate tolerance)")
    ax[0, 2].axhline(CONFIGS["quick"].init_split, color="gray", ls="--", lw=1, label="start")
    ax[0, 2].set_xscale("log")
    ax[0, 2].set_yscale("log")
    ax[0, 2].set_xlabel("learning rate η")
    ax[0, 2].set_ylabel("‖u₀ − u₁‖ / max‖u‖ after training")
    ax[0, 2].set_title("Distance between the two units")
    ax[0, 2].legend(fontsize=7)
    return [save(fig, ctx.out_dir, "stochastic_collapse")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    seeds = range(results["seeds"])
    lo, hi = min(cfg.lrs), max(cfg.lrs)
    b_min, b_max = min(cfg.batches), max(cfg.batches)
    th = {t["batch"]: t for t in results["theory"]}
    init_dup = sum(c["duplicated"] for c in results["init"])
    gnorm = results["grad_norm_at_reference"]
    out = [
        Claim("the reference point θ* (one-unit fit, duplicated) is stationary: ‖∇L(θ*)‖ ≤ 1e-7", "≤ 1e-7", gnorm,
              gnorm <= 1e-7),
        Claim(f"at the start no unit is duplicated (ms.diagnose, {results['seeds']} seeds: units {cfg.init_split:g} "
              "apart)", 0, init_dup, init_dup == 0),
        Claim("θ* is a saddle of the swap mirror (μ < 0): gradient descent alone separates the units",
              "μ < 0", th[b_min]["mu"], (th[b_min]["mu"] or 0.0) < 0),
    ]

    def dup(b, lr, s):
        r = _cell(results, b, lr, s)
        return None if r is None or r["weights"] is None else r["weights"]["duplicated"]

    def distinct_fraction(b, lr, s):
        r = _cell(results, b, lr, s)
        return None if r is None or r["weights"] is None else r["weights"]["distinct"] / r["weights"]["units"]

    big = [dup(b_min, hi, s) for s in seeds]
    small = [dup(b_min, lo, s) for s in seeds]
    out.append(finding(f"(a) SGD noise merges hidden units: at batch {b_min} and the largest lr {hi:g} ms.diagnose "
                       "counts a duplicated unit", "> 0", big, big,
                       statistic=f"duplicated units (ms.diagnose) at batch {b_min}, lr {hi:g}", better="higher",
                       threshold=0.5))
    out.append(finding(f"(a) ... and not at the smallest lr {lo:g} (batch {b_min}): the units stay distinct", 0,
                       small, small, statistic=f"duplicated units (ms.diagnose) at batch {b_min}, lr {lo:g}",
                       better="lower", threshold=0.5))
    fa = [distinct_fraction(b_min, lo, s) for s in seeds]
    fb = [distinct_fraction(b_min, hi, s) for s in seeds]
    drop = [None if a is None or b is None else a - b for a, b in zip(fa, fb, strict=True)]
    out.append(finding(f"(a) the fraction of distinct units falls from lr {lo:g} to lr {hi:g} (batch {b_min})",
                       "> 0", drop, drop, statistic="distinct fraction at the smallest lr − at the largest lr",
                       better="higher", threshold=0.0))
    fdup = [None if (r := _cell(results, b_min, hi, s)) is None or r["functional"] is None
            else r["functional"]["duplicated"] for s in seeds]
    out.append(finding(f"(a) functionally too: at batch {b_min}, lr {hi:g} two units have the same activations "
                       "on the data (within 5 %, sign fixed)", "> 0", fdup, fdup,
                       statistic="duplicated units by activation pattern", better="higher", threshold=0.5))
    if b_max != b_min:
        top = hi * math.sqrt(sorted(cfg.lrs)[-1] / sorted(cfg.lrs)[-2])
        ratio: list[float | None] = []
        for s in seeds:
            small_b, large_b = merge_boundary(results, b_min, s), merge_boundary(results, b_max, s)
            if small_b is None:
                ratio.append(None)
                continue
            # no merge at the larger batch: its boundary is above the grid (censored at one step above it)
            ratio.append(math.log((large_b if large_b is not None else top) / small_b))
        out.append(finding(f"(a) a smaller batch merges at a smaller lr: boundary(batch {b_min}) < boundary(batch "
                           f"{b_max})", "> 0", ratio, ratio,
                           statistic=f"log(merge boundary at batch {b_max} / at batch {b_min}); no merge at batch "
                           f"{b_max}: one grid step above the grid", better="higher", threshold=0.0))
    for b in cfg.batches:
        eta_c = th[b]["critical_lr"]
        vals = []
        for s in seeds:
            m = merge_boundary(results, b, s)
            ok = m is not None and eta_c is not None and math.isfinite(eta_c) and eta_c > 0
            vals.append(abs(math.log(m / eta_c)) if ok else None)
        bounds = [merge_boundary(results, b, s) for s in seeds]
        out.append(finding(f"(b) batch {b}: the measured merge boundary lies within a factor {cfg.factor:g} of the "
                           f"noise theory's critical lr η_c (swap mirror at θ*; None = no boundary on the grid "
                           "or no η_c)", eta_c, bounds, vals,
                           statistic="|log(merge boundary / η_c)|", better="lower",
                           threshold=math.log(cfg.factor)))
    return out
