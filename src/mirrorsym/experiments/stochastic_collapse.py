"""Stochastic collapse: SGD noise drives an over-wide student onto simpler subnetworks of dead and identical
units (Chen et al. 2023, docs/theory.md#gradient-noise, #permutation).

Swapping two hidden units (incoming row, bias, outgoing weight) is a mirror whose surface is "the two units
are identical"; tanh's sign flip (w, b, a) → (−w, −b, −a) is a mirror whose surface is "the unit is dead"
(docs/theory.md#permutation, #rescaling). On either surface no per-sample gradient points off it, so SGD's
noise enters the off-surface part only multiplicatively and, when strong enough (large lr, small batch),
makes the surface attractive even where it is a saddle of the loss (docs/theory.md#no-additive-noise).
Chen et al. show this in over-parameterised networks as a loss of *independent* neurons at large
learning rates; no weight decay is used here (γ = 0): the collapse is noise alone.

Problem. Regression on ``n`` samples x ~ N(0, I_d) labelled by a ``teacher``-unit committee
Σ_j tanh(w*_j·x), w*_j ~ N(0, teacher_scale² I), plus Gaussian label noise ``label_noise``. The student
f(x) = Σ_j a_j tanh(w_j·x + b_j) has ``hidden`` = 8 units (4× the teacher), all trainable, initialised
w ~ N(0, I/d), b = 0, a ~ N(0, 1/hidden) (float64). Loss mean (f − y)².

Measurement. Plain SGD (minibatches without replacement, as the theory assumes) on the sweep engine
(``ctx.sweep``, ``keep_params``) for every (lr, batch size, seed), ``steps`` steps. The largest batch is
``n``: full-batch gradient descent at the same learning rates, the noiseless control. Each run's trained
parameters are read by ``ms.diagnose`` (permutation group of the hidden layer: dead = ‖u‖ ≤ 1e-3 of the
layer's largest unit, duplicated = living units within 5 % relative distance of another on sign-fixed
canonical units, distinct = the number of clusters of living units; its documented defaults) and
functionally (tanh activations on the data, sign fixed: dead = never above 1e-3 of the layer's largest
activation; duplicated = activation vectors within 5 % relative distance). A run *lost units* when fewer
than ``hidden`` of its units are distinct. A run that diverged counts as neither.

Findings (rules fixed here, before any run of this configuration; one value per seed, 5 seeds):
(a) at the smallest batch SGD loses units somewhere on the lr grid (hidden − the fewest distinct units over
the lrs > 0.5); (b) full-batch GD at the same lrs loses none (< 0.5), and the paired difference of (a) and
(b) is positive; (c) the collapse includes merged units: the most ms.diagnose-duplicated units over the
SGD cells (batch < n) > 0.5, and the same by activation patterns; dead units likewise, reported
separately; (d) smaller batches collapse at smaller learning rates: the *onset* of a (seed, batch) is the
smallest grid lr whose run lost units, and log(onset at the largest SGD batch / onset at the smallest) > 0
(no collapse at a batch: one grid step above the grid).

What came out (quick, 5 seeds, 100 runs, ≈ 10 s): every finding reproduced. Batch 1 loses 6 of 8 units on
every seed and full-batch GD none at any lr up to 0.4; the onset lr is 0.1 at batch 1 and 0.4 at batch 16
on every seed (batch 4: 0.2 or 0.4). The strongest noise (batch 1 at lr 0.2, batch 4 at lr 0.4) collapses
onto the sign-flip surface: 6 dead units, 2 distinct living ones, as many as the teacher has; merged
(duplicated) units appear at intermediate noise (batch 4 at lr 0.2, batch 16 at lr 0.4: 1–3 per seed, the
same by activations). Batch 1 at lr 0.4 diverges on every seed and batch 4 at lr 0.4 on one.

Why not the Lyapunov threshold. An earlier version tested ``ms.theory.critical_learning_rate`` of the swap
mirror on a two-unit committee (outgoing weights fixed to 1, 20 % off the symmetric saddle θ*). The theory
predicted a merge above η_c ≈ 0.026 (batch 1); no run merged at any lr up to 0.32 (units ended 1.1–1.7
apart). Investigated (a script, not part of this module): from a split of 1e-8 the split grew at ≈ +0.01
per step at lr 0.04, batch 1, where the theory at θ* gives Λ = −0.0003. The linearisation point is the
flaw: θ* is a nearly degenerate saddle (mean projected curvature μ = −0.006 against a per-sample variance
0.70), and under SGD the shared, on-surface coordinates of the pair diffuse (standard deviation ≈ 0.15 of
the shared weight at lr 0.04); displacing the on-surface point by that much makes μ −0.19 to −0.38, a
60× steeper saddle that the noise cannot overcome. The theory holds at a fixed θ_∥ (as in the ``noise``
experiment, whose surfaces are chosen so that θ_∥ does not move); for an alive pair of units whose shared
coordinates diffuse it is not a prediction, so this experiment tests the qualitative statement of Chen et
al. instead, in their setting: an over-wide student with label noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from matplotlib.ticker import NullFormatter
from torch import nn

from .base import Claim, Context, finding
from .plotting import figure, save

NAME = "stochastic_collapse"
TITLE = "Stochastic collapse: SGD noise leaves fewer distinct units (dead or merged) at large lr / small batch"


@dataclass(frozen=True)
class Config:
    d: int = 2
    n: int = 64
    teacher: int = 2
    teacher_scale: float = 2.0
    label_noise: float = 0.5
    hidden: int = 8
    lrs: tuple[float, ...] = (0.025, 0.05, 0.1, 0.2, 0.4)
    batches: tuple[int, ...] = (1, 4, 16, 64)  # the largest must be n: full-batch GD, the control
    steps: int = 3000
    seeds: int = 5
    seed: int = 0


CONFIGS = {
    "tiny": Config(lrs=(0.05, 0.4), batches=(1, 64), steps=600),
    "quick": Config(),
    "full": Config(lrs=tuple(float(x) for x in np.geomspace(0.0125, 0.4, 11)), batches=(1, 2, 4, 8, 16, 64),
                   steps=20000, seeds=20),
}


class Student(nn.Module):
    """f(x) = Σ_j a_j tanh(w_j·x + b_j): ``hidden`` (Linear d → k) and ``out`` (Linear k → 1, no bias), float64."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(d, hidden, dtype=torch.float64)
        self.out = nn.Linear(hidden, 1, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


def make_student(d: int, hidden: int, seed: int) -> Student:
    """The student initialised from ``seed``: w ~ N(0, I/d), b = 0, a ~ N(0, 1/hidden)."""
    model = Student(d, hidden)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        model.hidden.weight.copy_(torch.randn(hidden, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        model.hidden.bias.zero_()
        model.out.weight.copy_(torch.randn(1, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden))
    return model


def make_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n, cfg.d, generator=g, dtype=torch.float64)
    w = cfg.teacher_scale * torch.randn(cfg.teacher, cfg.d, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w.T).sum(-1)
    return x, y + cfg.label_noise * torch.randn(cfg.n, generator=g, dtype=torch.float64)


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
    from ..sweep import Sweep, final_params

    if max(cfg.batches) != cfg.n:
        raise ValueError("the largest batch must be n (full-batch GD, the noiseless control)")
    x, y = make_data(cfg)
    factory = partial(make_student, cfg.d, cfg.hidden)
    template = factory(cfg.seed)
    grid = [{"lr": lr, "batch_size": b, "steps": cfg.steps, "seed": cfg.seed + s, "sampling": "without_replacement"}
            for b in cfg.batches for lr in cfg.lrs for s in range(cfg.seeds)]
    sweep = Sweep(factory, nn.functional.mse_loss, (x, y), grid, metrics={"loss": "loss"}, record_every=cfg.steps,
                  name="stochastic-collapse", keep_params=True)
    df = ctx.sweep(sweep)

    smap = find_symmetries(template, x[:1])
    init = [weight_counts(factory(cfg.seed + s), x, smap) for s in range(cfg.seeds)]
    runs = []
    for _, row in df.iterrows():
        rec = {"lr": float(row["lr"]), "batch": int(row["batch_size"]), "seed": int(row["seed"]) - cfg.seed,
               "status": row["status"], "loss": float(row["loss"]), "weights": None, "functional": None}
        if row["status"] == "ok":
            model = Student(cfg.d, cfg.hidden)
            model.load_state_dict(final_params(row))
            rec["weights"] = weight_counts(model, x, smap)
            rec["functional"] = functional_counts(model, x)
        runs.append(rec)
    return {"init": init, "runs": runs, "lrs": list(cfg.lrs), "batches": list(cfg.batches), "seeds": cfg.seeds,
            "hidden": cfg.hidden}


# ---------------------------------------------------------------------------------------------- analysis
def _cell(results: dict, b: int, lr: float, seed: int) -> dict | None:
    for r in results["runs"]:
        if r["batch"] == b and r["seed"] == seed and math.isclose(r["lr"], lr):
            return r
    return None


def count(results: dict, b: int, lr: float, seed: int, what: str, where: str = "weights") -> int | None:
    """``what`` (dead / distinct / duplicated) of one run, by ms.diagnose (``weights``) or by activations
    (``functional``); None for a diverged run."""
    r = _cell(results, b, lr, seed)
    return None if r is None or r[where] is None else int(r[where][what])


def lost_units(results: dict, b: int, seed: int) -> int | None:
    """hidden − the fewest distinct units over the lr grid at batch ``b`` (None: every run diverged)."""
    vals = [v for lr in results["lrs"] if (v := count(results, b, lr, seed, "distinct")) is not None]
    return None if not vals else results["hidden"] - min(vals)


def most(results: dict, seed: int, what: str, where: str = "weights") -> int | None:
    """The largest ``what`` count over the SGD cells (batch < n) of a seed (None: all diverged)."""
    full = max(results["batches"])
    vals = [v for b in results["batches"] if b < full for lr in results["lrs"]
            if (v := count(results, b, lr, seed, what, where)) is not None]
    return None if not vals else max(vals)


def onset(results: dict, b: int, seed: int) -> float | None:
    """The smallest grid lr whose run (batch ``b``) has fewer than ``hidden`` distinct units; None if none."""
    for lr in sorted(results["lrs"]):
        c = count(results, b, lr, seed, "distinct")
        if c is not None and c < results["hidden"]:
            return lr
    return None


def _mean_over_seeds(results: dict, b: int, lr: float, what: str) -> float:
    v = [c for s in range(results["seeds"]) if (c := count(results, b, lr, s, what)) is not None]
    return float(np.mean(v)) if v else math.nan


def plot(results: dict, ctx: Context) -> list:
    fig, ax = figure(3, width=4.4)
    lrs = np.array(results["lrs"])
    full = max(results["batches"])
    for b in results["batches"]:
        label = f"batch {b}" + (" (full-batch GD)" if b == full else "")
        for k, what in enumerate(("distinct", "dead", "duplicated")):
            ax[0, k].plot(lrs, [_mean_over_seeds(results, b, lr, what) for lr in lrs], "o-", label=label)
    for k, what in enumerate(("distinct", "dead", "duplicated")):
        ax[0, k].set_xscale("log")
        ax[0, k].xaxis.set_minor_formatter(NullFormatter())
        ax[0, k].set_xlabel("learning rate η")
        ax[0, k].set_ylabel(f"{what} units (mean over seeds)")
        ax[0, k].legend(fontsize=7)
    ax[0, 0].axhline(results["hidden"], color="k", ls=":", lw=1)
    ax[0, 0].set_title(f"Distinct units of {results['hidden']} (diverged runs left out)")
    ax[0, 1].set_title("Dead units (sign-flip surface)")
    ax[0, 2].set_title("Duplicated units (swap surface)")
    return [save(fig, ctx.out_dir, "stochastic_collapse")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    seeds = range(results["seeds"])
    b_min, full = min(cfg.batches), max(cfg.batches)
    sgd = sorted(b for b in cfg.batches if b < full)
    init_lost = sum(c["units"] - c["distinct"] for c in results["init"])
    out = [Claim(f"at the start every unit is distinct and alive (ms.diagnose, {results['seeds']} seeds)", 0,
                 init_lost, init_lost == 0)]
    lost_sgd = [lost_units(results, b_min, s) for s in seeds]
    lost_gd = [lost_units(results, full, s) for s in seeds]
    out.append(finding(f"(a) SGD at batch {b_min} collapses the {cfg.hidden}-unit student onto fewer distinct units "
                       f"(dead or merged) somewhere on the lr grid {list(cfg.lrs)}", "> 0", lost_sgd, lost_sgd,
                       statistic=f"hidden − fewest distinct units (ms.diagnose) over the lrs at batch {b_min}",
                       better="higher", threshold=0.5))
    out.append(finding(f"(b) full-batch GD (batch {full} = n) at the same lrs keeps every unit distinct", 0, lost_gd,
                       lost_gd, statistic=f"hidden − fewest distinct units over the lrs at batch {full}",
                       better="lower", threshold=0.5))
    diff = [None if a is None or b is None else a - b for a, b in zip(lost_sgd, lost_gd, strict=True)]
    out.append(finding(f"(b) the collapse is the noise's: batch {b_min} loses more units than full-batch GD (same "
                       "seed, same lrs)", "> 0", diff, diff, statistic="units lost at batch "
                       f"{b_min} − at batch {full}", better="higher", threshold=0.0))
    for what, where, text in (("duplicated", "weights", "merged units: ms.diagnose counts duplicated units"),
                              ("duplicated", "functional", "functionally merged units: two units with the same "
                               "activations on the data (within 5 %, sign fixed)"),
                              ("dead", "weights", "dead units: ms.diagnose counts units at ≤ 1e-3 of the largest")):
        vals = [most(results, s, what, where) for s in seeds]
        out.append(finding(f"(c) SGD noise collapses onto the swap or sign-flip surface: {text}, in some SGD run "
                           f"(batch < {full}) of each seed", "> 0", vals, vals,
                           statistic=f"largest {what} count ({'ms.diagnose' if where == 'weights' else 'activations'})"
                           f" over the SGD cells of a seed", better="higher", threshold=0.5))
    if len(sgd) > 1:
        b_hi = sgd[-1]
        top = max(cfg.lrs) * math.sqrt(sorted(cfg.lrs)[-1] / sorted(cfg.lrs)[-2])
        ratio: list[float | None] = []
        for s in seeds:
            lo_b, hi_b = onset(results, sgd[0], s), onset(results, b_hi, s)
            ratio.append(None if lo_b is None else math.log((hi_b if hi_b is not None else top) / lo_b))
        out.append(finding(f"(d) a smaller batch collapses at a smaller lr: onset(batch {sgd[0]}) < onset(batch "
                           f"{b_hi})", "> 0", [[onset(results, b, s) for b in sgd] for s in seeds], ratio,
                           statistic=f"log(onset at batch {b_hi} / onset at batch {sgd[0]}); onset = smallest lr "
                           "whose run lost a unit; none at the larger batch: one grid step above the grid",
                           better="higher", threshold=0.0))
    return out
