"""Gradient noise drives SGD onto a symmetric surface (docs/theory.md#gradient-noise): phase diagram over
(lr, batch size).

Near a surface S the linearised SGD step is z_{t+1} = (I − η(Ĥ_t + 2γI)) z_t (no additive noise), and SGD
collapses onto S iff the top Lyapunov exponent Λ(η, b) < 0, even at a saddle of the expected loss.
``ms.theory.critical_learning_rate`` gives the root η_c(b) of Λ = 0 and the paper's second-order estimate
2|μ|/(μ² + s²). Both are compared with the real, nonlinear minibatch SGD of the full model started at
distance ``start`` from S along a random mirror direction: a run *collapses* when its distance to S
shrinks by ``shrink`` (10⁶), *escapes* when it grows by the same factor (or diverges); undecided runs
after ``max_steps`` count as not collapsed. ``runs`` runs per (lr, b), all on the sweep engine (``ms.sweep``;
``--device`` and ``--backend ray`` reach them), with minibatches drawn without replacement as the theory
assumes.

Three surfaces, each at a point θ_∥ that every per-sample gradient (plus decay) leaves exactly fixed, so
that the linearisation is the whole first-order story:

* ``hadamard`` (closed form A): f = Σ_i u_i w_i x_i, sign-flip mirror of (u₀, w₀), γ = 0. Ten samples
  carry only feature 0 (noisy targets), two carry only features 1–2 and are fitted exactly by the
  on-surface coordinates (u₁w₁, u₂w₂) ≠ 0. The blocks [[0, g],[g, 0]] commute, so Λ is also enumerated
  exactly over all C(n, b) minibatches.
* ``dead_neuron`` (closed form B): f = Σ_j a_j tanh(w_jᵀx + b_j), every unit dead (θ_∥ = 0), sign-flip
  mirror of unit 0, γ > 0. Per-sample blocks [[0, −c],[−c, 0]], c = 2y(x, 1), do not commute: QR method.
* ``swap``: the same network, mirror = swap of units 1 and 2 (surface: identical units) at a dead,
  duplicated pair. The decay is needed: at γ = 0 a rank-2 per-sample block leaves k − 2 directions
  exactly neutral and Λ ≥ 0 (never collapses). Alive duplicated pairs with γ > 0 are not used because
  their on-surface parameters diffuse under SGD noise, which the linear theory does not model.

Claims: for every problem and batch size the measured boundary (first lr with collapse fraction ≥ ½)
is within one step of the 20-point geometric lr grid of η_c; Λ by the QR method matches the exact
enumeration (closed form A); and the Λ root is at least as close to the measurement as the second-order
formula (where that formula deviates, the figure shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from matplotlib.ticker import NullFormatter
from torch import nn

from ..core import Mirror
from ..core.loss import LossFn
from ..theory.noise import MinibatchCurvature, minibatch_curvature
from .base import Claim, Context
from .plotting import figure, save

NAME = "noise"
TITLE = "Gradient noise: Lyapunov exponent and the collapse boundary over (lr, batch size)"


@dataclass(frozen=True)
class Config:
    problems: tuple[str, ...] = ("hadamard", "dead_neuron", "swap")
    batch_sizes: tuple[int, ...] = (1, 2, 3)
    num_lrs: int = 20
    lr_span: tuple[float, float] = (0.3, 1.2)  # grid: lo × min_b η_c(b) … hi × max_b upper(b), geometric
    runs: int = 32
    max_steps: int = 4000
    num_samples: int = 20000  # minibatches per Λ estimate
    start: float = 1e-7
    shrink: float = 1e6
    check_lrs: int = 5  # grid points around η_c at which QR Λ is compared with exact enumeration
    seed: int = 0


CONFIGS = {
    "tiny": Config(batch_sizes=(2,), max_steps=1500, num_samples=3000),
    "quick": Config(max_steps=3000),
    "full": Config(batch_sizes=(1, 2, 3, 4), runs=128, max_steps=20000, num_samples=100000, check_lrs=10),
}


# ---------------------------------------------------------------------- problems
@dataclass
class NoiseProblem:
    """A loss ``loss_fn(params, (x, y))`` (mean over samples), a point on a mirror's surface, data, γ."""

    name: str
    loss_fn: LossFn
    params: dict
    mirror: Mirror
    data: tuple
    gamma: float


def _quantiles(n: int, gen: torch.Generator) -> torch.Tensor:
    """Standard normal quantiles in random order: noise with exactly zero mean and unit spread."""
    q = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return q[torch.randperm(n, generator=gen)]


def hadamard_loss(p, batch):
    x, y = batch
    return ((y - x @ (p["u"] * p["w"])) ** 2).mean()


def hadamard_problem(seed: int = 0, n_noisy: int = 10, n_fit: int = 2) -> NoiseProblem:
    """Closed form A at a saddle of coordinate 0 with the other coordinates exactly fitted (γ = 0)."""
    g = torch.Generator().manual_seed(seed)
    n = n_noisy + n_fit
    x = torch.zeros(n, 3, dtype=torch.float64)
    x[:n_noisy, 0] = torch.randint(0, 2, (n_noisy,), generator=g).double() * 2 - 1
    x[n_noisy:, 1:] = torch.randn(n_fit, 2, generator=g, dtype=torch.float64)
    beta = torch.tensor([0.7, -0.5], dtype=torch.float64)
    y = torch.cat([x[:n_noisy, 0] * (0.2 + 1.5 * _quantiles(n_noisy, g)), x[n_noisy:, 1:] @ beta])
    params = {
        "u": torch.tensor([0.0, 1.5, 0.8], dtype=torch.float64),
        "w": torch.tensor([0.0, 0.7 / 1.5, -0.5 / 0.8], dtype=torch.float64),
    }  # unbalanced split of β
    return NoiseProblem(
        "hadamard", hadamard_loss, params, Mirror.sign_flip({"u": [0], "w": [0]}), (x, y), 0.0
    )


def tanh_loss(p, batch):
    x, y = batch
    return ((y - torch.tanh(x @ p["w"].T + p["b"]) @ p["a"]) ** 2).mean()


def _unit(j: int) -> dict:
    return {"w": [j], "b": [j], "a": [j]}


def _tanh_data(seed: int, n: int, offset: float):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, offset + 0.3 * x[:, 0] + _quantiles(n, g)


def _dead_network(hidden: int = 3) -> dict:
    return {
        "w": torch.zeros(hidden, 2, dtype=torch.float64),
        "b": torch.zeros(hidden, dtype=torch.float64),
        "a": torch.zeros(hidden, dtype=torch.float64),
    }


def dead_neuron_problem(seed: int = 0, n: int = 12, gamma: float = 0.4) -> NoiseProblem:
    """Closed form B: a tanh network with every unit dead; the mirror flips the sign of unit 0."""
    return NoiseProblem(
        "dead_neuron",
        tanh_loss,
        _dead_network(),
        Mirror.sign_flip(_unit(0)),
        _tanh_data(seed, n, 0.2),
        gamma,
    )


def swap_problem(seed: int = 2, n: int = 12, gamma: float = 0.3) -> NoiseProblem:
    """Units 1 and 2 of a dead tanh network are duplicates; the mirror swaps them."""
    return NoiseProblem(
        "swap",
        tanh_loss,
        _dead_network(),
        Mirror.swap(_unit(1), _unit(2)),
        _tanh_data(seed, n, 0.3),
        gamma,
    )


PROBLEMS = {"hadamard": hadamard_problem, "dead_neuron": dead_neuron_problem, "swap": swap_problem}


# ---------------------------------------------------------------------- simulation (on the sweep engine)
class KickedModel(nn.Module):
    """Problem ``name``'s model at θ_∥ + O z₀: θ_∥ its point on the surface, ‖z₀‖ = ``start``, the direction of
    z₀ uniform on the sphere from ``seed`` (float64). ``forward(x)`` is the model its loss fits."""

    # the parameters, registered by name in __init__: u, w (hadamard) or w, b, a (the tanh problems)
    u: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor

    def __init__(self, name: str, start: float, seed: int):
        super().__init__()
        problem = PROBLEMS[name]()
        self.kind = "hadamard" if name == "hadamard" else "tanh"
        mirror, theta = problem.mirror, problem.mirror.project(problem.params)
        z0 = torch.randn(mirror.dim(theta), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        kick = mirror.direction(start * z0 / z0.norm(), theta)
        for key, value in theta.items():
            self.register_parameter(key, nn.Parameter((value + kick[key]).clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hadamard":
            return x @ (self.u * self.w)
        return torch.tanh(x @ self.w.T + self.b) @ self.a


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean (y − f(x))²: the problems' loss as a criterion of the model's output."""
    return ((y - out) ** 2).mean()


class SurfaceDistance:
    """Sweep metric: the distance of a run's parameters to the surface of problem ``name``'s mirror."""

    def __init__(self, name: str):
        self.name = name
        self.mirror = PROBLEMS[name]().mirror

    def __call__(self, params: dict, batch) -> torch.Tensor:
        return self.mirror.distance(params)


def simulate_collapse(
    name: str,
    lrs,
    batch_sizes,
    runs: int,
    max_steps: int,
    ctx: Context,
    seed: int = 0,
    start: float = 1e-7,
    shrink: float = 1e6,
    check_every: int = 25,
) -> list[dict]:
    """Nonlinear minibatch SGD on L + γ‖θ‖² (coupled torch ``weight_decay = 2γ``) of problem ``name``:
    ``runs`` runs per (lr, batch size) on the sweep engine (``ctx.sweep``: any device, local or Ray).

    Run r starts at θ_∥ + O z₀ (:class:`KickedModel`, seed ``seed + r``); minibatches are uniform random
    subsets of ``batch_size`` samples (``sampling="without_replacement"``, the theory's model), independent
    per run and step. The distance to the surface is recorded every ``check_every`` steps; a run
    *collapsed* when it first falls below start/shrink, *escaped* when it first rises above start·shrink
    or is not finite (a diverged run), whichever comes first; otherwise undecided. Returns per batch size
    the fractions collapsed / escaped / undecided per lr."""
    from ..sweep import Sweep

    gamma = PROBLEMS[name]().gamma
    grid = [{"lr": float(lr), "batch_size": b, "steps": max_steps, "weight_decay": 2 * gamma, "seed": seed + r,
             "sampling": "without_replacement"} for b in batch_sizes for lr in lrs for r in range(runs)]
    problem = PROBLEMS[name]()
    sweep = Sweep(partial(KickedModel, name, start), squared_error, problem.data, grid,
                  metrics={"distance": SurfaceDistance(name)}, record_every=check_every, name=f"noise-{name}")
    df = ctx.sweep(sweep, f"sweep-{name}", chunk_size=len(lrs) * runs)  # tiny models: one chunk per batch size
    out = []
    for b in batch_sizes:
        fractions: dict[str, list[float]] = {"collapsed": [], "escaped": [], "undecided": []}
        for lr in lrs:
            rows = df[(df["batch_size"] == b) & (df["lr"] == float(lr))]
            states = [_fate(h, start, shrink) for h in rows["history_distance"]]
            for key in fractions:
                fractions[key].append(sum(st == key for st in states) / len(states))
        out.append({"batch_size": b, **fractions, "steps": max_steps})
    return out


def _fate(history, start: float, shrink: float) -> str:
    d = np.asarray(history, dtype=float)
    low = np.nonzero(d <= start / shrink)[0]
    high = np.nonzero(~np.isfinite(d) | (d >= start * shrink))[0]
    if len(low) and (not len(high) or low[0] < high[0]):
        return "collapsed"
    return "escaped" if len(high) else "undecided"


# ---------------------------------------------------------------------- experiment
def lr_grid(curv: MinibatchCurvature, cfg: Config, gamma: float, gen_seed: int) -> tuple[np.ndarray, list]:
    """The geometric lr grid from ``lr_span[0]`` × the smallest predicted boundary to ``lr_span[1]`` × the
    largest upper root (where SGD turns unstable off the surface), so that every batch size's collapse
    window lies inside it; and the predictions."""
    preds = [
        curv.critical_learning_rate(b, gamma, cfg.num_samples, torch.Generator().manual_seed(gen_seed))
        for b in cfg.batch_sizes
    ]
    roots = (
        [p.value for p in preds if np.isfinite(p.value) and p.value > 0]
        or [p.second_order for p in preds if np.isfinite(p.second_order)]
        or [1.0]
    )
    uppers = [p.upper for p in preds if np.isfinite(p.upper)] or [2 * max(roots)]
    return np.geomspace(cfg.lr_span[0] * min(roots), cfg.lr_span[1] * max(uppers), cfg.num_lrs), preds


def run_problem(problem: NoiseProblem, cfg: Config, ctx: Context, offset: int) -> dict:
    curv = minibatch_curvature(problem.loss_fn, problem.params, problem.mirror, problem.data)
    gamma = problem.gamma
    lrs, preds = lr_grid(curv, cfg, gamma, cfg.seed + offset)
    sims = simulate_collapse(problem.name, lrs, cfg.batch_sizes, cfg.runs, cfg.max_steps, ctx,
                             cfg.seed + offset, cfg.start, cfg.shrink)
    rows = []
    for b, pred, sim in zip(cfg.batch_sizes, preds, sims, strict=True):
        curve = curv.lyapunov_curve(
            list(lrs), b, gamma, cfg.num_samples, torch.Generator().manual_seed(cfg.seed + offset)
        )
        row = {
            "batch_size": b,
            "eta_c": pred.value,
            "upper": pred.upper,
            "second_order": pred.second_order,
            "mu": pred.mu,
            "s2": pred.s2,
            "method": curve.method,
            "lambda": curve.values.tolist(),
            "lambda_stderr": curve.stderrs.tolist(),
            **{k: v for k, v in sim.items() if k != "batch_size"},
        }
        if curv.commuting:  # Λ by QR on sampled minibatches vs the exact enumeration, around η_c
            row["check"] = _check_against_exact(curv, lrs, pred.value, b, gamma, cfg, offset)
        rows.append(row)
    return {
        "name": problem.name,
        "gamma": gamma,
        "k": curv.k,
        "n": curv.n,
        "commuting": curv.commuting,
        "lrs": lrs.tolist(),
        "rows": rows,
    }


def _check_against_exact(curv, lrs, eta_c, b, gamma, cfg: Config, offset: int) -> dict:
    centre = int(np.searchsorted(lrs, eta_c)) if np.isfinite(eta_c) else len(lrs) // 2
    lo = max(0, min(centre - cfg.check_lrs // 2, len(lrs) - cfg.check_lrs))
    pts = list(lrs[lo : lo + cfg.check_lrs])
    exact = curv.lyapunov_curve(pts, b, gamma, method="exact")
    qr = curv.lyapunov_curve(
        pts, b, gamma, cfg.num_samples, torch.Generator().manual_seed(cfg.seed + offset + 7), method="qr"
    )
    return {"lrs": pts, "exact": exact.values.tolist(), "qr": qr.values.tolist(), "qr_stderr": qr.stderrs.tolist()}


def run(cfg: Config, ctx: Context) -> dict:
    return {"problems": [run_problem(PROBLEMS[name](), cfg, ctx, 1000 * i) for i, name in enumerate(cfg.problems)]}


# ---------------------------------------------------------------------- claims
def first_index(lrs, value) -> int | None:
    """Index of the first grid lr ≥ value (None if value is NaN or beyond the grid)."""
    if value is None or not np.isfinite(value):
        return None
    i = int(np.searchsorted(np.asarray(lrs), value))
    return i if i < len(lrs) else None


def measured_index(collapsed) -> int | None:
    """Index of the first grid lr where at least half the runs collapsed (None if none did)."""
    hits = np.nonzero(np.asarray(collapsed) >= 0.5)[0]
    return int(hits[0]) if len(hits) else None


def _gap(a, b, n: int) -> int:
    if a is None and b is None:
        return 0
    return abs((n if a is None else a) - (n if b is None else b))


def claims(results: dict, cfg: Config) -> list[Claim]:
    out = []
    root_err = second_err = 0
    for prob in results["problems"]:
        n = len(prob["lrs"])
        pred, meas, second = [], [], []
        for row in prob["rows"]:
            pred.append(first_index(prob["lrs"], row["eta_c"]))
            meas.append(measured_index(row["collapsed"]))
            second.append(first_index(prob["lrs"], row["second_order"]))
        gaps = [_gap(p, m, n) for p, m in zip(pred, meas, strict=True)]
        root_err += sum(gaps)
        second_err += sum(_gap(s, m, n) for s, m in zip(second, meas, strict=True))
        out.append(
            Claim(
                f"{prob['name']}: collapse boundary (first lr with ≥ ½ of {cfg.runs} SGD runs shrinking "
                f"×{cfg.shrink:g}) within one lr-grid step of the root of Λ = 0, batch sizes "
                f"{list(cfg.batch_sizes)} (grid indices)",
                pred,
                meas,
                all(g <= 1 for g in gaps) and any(m is not None for m in meas),
            )
        )
        for row in prob["rows"]:
            if "check" in row:
                c = row["check"]
                z = [
                    abs(q - e) / max(s, 1e-12)
                    for q, e, s in zip(c["qr"], c["exact"], c["qr_stderr"], strict=True)
                ]
                out.append(
                    Claim(
                        f"{prob['name']}, batch {row['batch_size']}: Λ by the QR method "
                        f"({cfg.num_samples} minibatches) = exact enumeration of all minibatches "
                        f"at {len(z)} lrs",
                        "|Δ| ≤ 4 stderr",
                        f"max |Δ|/stderr = {max(z):.2f}",
                        max(z) <= 4.0,
                    )
                )
    out.append(
        Claim(
            "the root of Λ = 0 is at least as close to the measured boundary as the second-order "
            "formula 2|μ|/(μ² + s²) (sum of grid-step errors)",
            f"≤ {second_err}",
            root_err,
            root_err <= second_err,
        )
    )
    return out


# ---------------------------------------------------------------------- figure
def plot(results: dict, ctx: Context) -> list:
    probs = results["problems"]
    fig, ax = figure(len(probs) + 1)
    for i, prob in enumerate(probs):
        _phase_panel(ax[0, i], prob)
    _lambda_panel(ax[0, len(probs)], probs)
    return [save(fig, ctx.out_dir, "noise_phase")]


def _edges(x: np.ndarray) -> np.ndarray:
    r = np.sqrt(x[1:] / x[:-1])
    return np.concatenate([[x[0] / r[0]], x[:-1] * r, [x[-1] * r[-1]]])


def _phase_panel(a, prob: dict) -> None:
    lrs = np.asarray(prob["lrs"])
    bs = np.array([r["batch_size"] for r in prob["rows"]], dtype=float)
    frac = np.array([r["collapsed"] for r in prob["rows"]])
    yb = np.arange(len(bs) + 1) - 0.5
    mesh = a.pcolormesh(_edges(lrs), yb, frac, vmin=0, vmax=1, cmap="viridis", shading="flat")
    lam = np.array([r["lambda"] for r in prob["rows"]], dtype=float)
    if len(bs) > 1:
        a.contour(lrs, np.arange(len(bs)), lam, levels=[0.0], colors="w", linewidths=1.2)
    rows = prob["rows"]
    yy = np.arange(len(bs))
    a.plot([r["eta_c"] for r in rows], yy, "o", color="w", mec="k", label="Λ = 0 (root)")
    a.plot([r["upper"] for r in rows], yy, "s", color="w", mec="k", ms=4, label="Λ = 0 (upper root)")
    a.plot([r["second_order"] for r in rows], yy, "x--", color="tab:red", label="2|μ|/(μ²+s²)")
    a.set_xscale("log")
    a.xaxis.set_minor_formatter(NullFormatter())
    a.grid(False)
    a.set_yticks(yy, [str(int(b)) for b in bs])
    a.set_xlabel("learning rate η")
    a.set_ylabel("batch size")
    a.set_title(f"{prob['name']} (γ={prob['gamma']:g}, k={prob['k']}): collapse fraction", fontsize=8)
    a.legend(fontsize=6, loc="upper left", framealpha=0.6)
    a.figure.colorbar(mesh, ax=a, fraction=0.05)


def _lambda_panel(a, probs: list) -> None:
    for prob in probs:
        for row in prob["rows"]:
            (line,) = a.plot(prob["lrs"], row["lambda"], lw=1, label=f"{prob['name']}, b={row['batch_size']}")
            if "check" in row:
                c = row["check"]
                a.plot(c["lrs"], c["exact"], "k+", ms=6)
    a.axhline(0, color="k", lw=0.8)
    a.set_xscale("log")
    a.xaxis.set_minor_formatter(NullFormatter())
    a.set_xlabel("learning rate η")
    a.set_ylabel("Λ per step")
    a.set_title("Λ(η) (common random numbers); + exact enumeration", fontsize=8)
    a.legend(fontsize=6)
