"""Guidance for DCS over units: which weight decay, and how many steps, give a target width.

Conventions (docs/theory.md#conventions): the objective is L(θ) + γ‖θ‖² over the gates and the gated
tensors, with L a **mean** loss; a coupled torch optimizer takes ``weight_decay = λ = 2γ``. Everything here
assumes coupled decay and (heavy-ball) SGD; AdamW optimises another objective.

Why the local threshold says nothing here
-----------------------------------------
``ms.constrain.apply(kind="units")`` gives hidden unit j the gate s_j, so its baked slices are
θ_j = s_j w_j (incoming row, bias, outgoing column, ...). The unit's contribution to the output is a
product of at least three factors (gate × incoming × outgoing), so near the dead state (s_j, w_j) = 0 the
loss changes by O(‖(s_j, w_j)‖³): the Hessian block of the unit's mirror vanishes there and
``ms.theory.critical_weight_decay`` returns γ_c = 0 for every γ. A dead gated unit is a strict local minimum
at every γ > 0 (docs/theory.md#global, the depth-3 case of ``experiments/discriminating.py``). The
projected-Hessian threshold is the right number for an *ungated* unit whose mirror block is quadratic
(e.g. a tanh unit's sign flip, docs/theory.md#closed-form-b); for gated units the useful thresholds are
**global along the unit's own direction**.

The thresholds
--------------
Minimising the decay over the gate scale (AM–GM, s_j² + ‖w_j‖² ≥ 2|s_j|‖w_j‖) turns training into
F(θ) = L(θ) + 2γ Σ_j ‖θ_j‖₂ in the baked coordinates (docs/theory.md#dcs). Hold every other unit fixed,
write θ_j = r u_j with ‖u_j‖ = 1 the unit's current direction, and ΔL_j(r) = L(r u_j) − L(0) (the loss
with the unit at scale r minus the loss without it). Along that ray F − F(unit removed) = ΔL_j(r) + 2γr, so

* the unit is worth keeping (a point r > 0 beats r = 0) iff γ < **γ_j^global = sup_r −ΔL_j(r) / (2r)**;
* a point r > 0 with ∂F/∂r = 0 and a descent path from larger r exists iff
  γ < **γ_j^spinodal = sup_r −ΔL_j′(r) / 2** (the steepest descent slope of ΔL_j).

γ_j^global ≤ γ_j^spinodal (a secant slope is at most the steepest tangent slope). Between the two, r = 0 is
the global minimum along the ray but a non-zero local minimum exists: gradient descent that starts alive
can stay there. This is exactly the depth-3 picture (zero global iff σ ≤ 2γ^{3/4}, a non-zero minimum
exists iff σ ≥ 4(γ/3)^{3/4}). For a two-factor unit whose output scales as r² (linear or ReLU unit,
ΔL_j(r) = −σr² + r⁴/4 for a one-direction regression with strength σ), γ^global = 2σ^{3/2}/(3√3) and
γ^spinodal = (2σ/3)^{3/2} = √2 γ^global. The number ΔL_j(‖θ_j‖)/(2‖θ_j‖) at the current norm (``removal``)
is one point of the sup, a lower bound of γ^global that under-predicts the decay a target needs.

The width curve and the suggestion
----------------------------------
Thresholds depend on the other units: when a unit dies, the others take over part of its work and become
more valuable. :func:`unit_thresholds` therefore eliminates **greedily**: evaluate every live unit's
threshold with the removed units at zero, remove the weakest (a few at a time while many are alive, one at
a time near the end), re-evaluate. The running maximum of the removal thresholds is a non-decreasing path
p₁ ≤ p₂ ≤ … (width n − i for γ in (p_i, p_{i+1})), the predicted width per γ; :func:`suggest_decay` takes the
geometric mean of the two thresholds that bracket the target.

Thresholds measured at a point depend on that point: a dense model has not been shrunk by the decay (at a
DCS solution every surviving unit is smaller, so the residual, and every threshold, is larger), and its
units are not aligned with the solution's. Hence the **calibration** that ``suggest_decay(train=...)``
runs: suggest → train at the suggestion (your own training function) → count the reached width and
re-evaluate the thresholds on the trained model → propose again, with every measured width kept as a
bracket (width is non-increasing in γ). The returned γ is the last one trained, or, if no round reached
the target, the last proposal (``reached`` says which).

Training length
---------------
On the dead surface the loss gradient of a gated unit is O(‖(s_j, w_j)‖²), so the last stretch of dying is
pure decay: heavy-ball SGD (learning rate η, momentum μ, λ = 2γ) iterates p_{t+1} = (1 + μ − ηλ) p_t − μ p_{t−1}
on every factor, which shrinks like ρᵗ with ρ the largest root modulus of z² − (1 + μ − ηλ) z + μ
(ρ = 1 − ηλ without momentum, ≈ 1 − ηλ/(1 − μ) for small ηλ). θ_j = s_j w_j is a product of two such factors,
so it shrinks like ρ^{2t}, and reaching the export tolerance from norm r₀ takes
**ln(r₀ / tol) / (−2 ln ρ)** steps (:func:`decay_steps`; with momentum, plus the start-up of an empty
buffer). This is a lower bound for the whole run: it assumes the unit has nothing left to do from the
start; while the loss still supports it, it shrinks slower.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..detect import Permutation, SymmetryMap
from .export import bake
from .units import merged_members, unit_groups

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
THRESHOLDS = ("global", "spinodal", "removal")


# ---------------------------------------------------------------------------------------------- steps
def decay_rate(gamma: float, lr: float, momentum: float = 0.0) -> float:
    """ρ: per-step factor of a factor on the dead surface under heavy-ball SGD with coupled decay λ = 2γ
    (largest root modulus of z² − (1 + μ − ηλ) z + μ)."""
    if gamma <= 0 or lr <= 0:
        raise ValueError(f"gamma and lr must be > 0, got gamma={gamma}, lr={lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    b = 1 + momentum - lr * 2 * gamma
    disc = b * b - 4 * momentum
    if disc < 0:
        return math.sqrt(momentum)
    return max(abs(b + math.sqrt(disc)), abs(b - math.sqrt(disc))) / 2


def decay_steps(gamma: float, lr: float, momentum: float = 0.0, r0: float = 1.0, tol: float = 1e-6) -> int:
    """Steps for a dying gated unit to shrink from ‖θ_j‖ = ``r0`` to ``tol`` by decay alone: θ_j is a product of
    two factors that each shrink by :func:`decay_rate` ρ per step, so ⌈ln(c² r0/tol) / (−2 ln ρ)⌉, where c is
    the amplitude of the slow mode of heavy-ball started with an empty momentum buffer (c = 1 without
    momentum; with it, p₁ = (1 − ηλ)p₀ gives c = (1 − ηλ − z₂)/(z₁ − z₂), the roots z₁ > z₂)."""
    rho = decay_rate(gamma, lr, momentum)
    if rho >= 1:
        raise ValueError(f"lr={lr}, momentum={momentum} and weight_decay={2 * gamma} do not contract (ρ = {rho:.4g} "
                         "≥ 1): the learning rate is too large for the decay")
    if r0 <= tol:
        return 0
    c = 1.0
    b = 1 + momentum - lr * 2 * gamma
    disc = b * b - 4 * momentum
    if momentum > 0 and disc > 0:
        z1, z2 = (b + math.sqrt(disc)) / 2, (b - math.sqrt(disc)) / 2
        c = max(1.0, abs((1 - lr * 2 * gamma - z2) / (z1 - z2)))
    return max(0, math.ceil(math.log(c * c * r0 / tol) / (-2 * math.log(rho))))


# ---------------------------------------------------------------------------------------------- evaluation
class UnitLoss:
    """L(θ with unit j of ``group`` scaled by c_j), batched over scale vectors c ∈ ℝⁿ, on a baked copy of
    ``model`` in eval mode. ``group`` names plain (baked) parameters."""

    def __init__(self, model: nn.Module, criterion: Criterion, data: tuple[torch.Tensor, torch.Tensor],
                 group: Permutation, chunk: int = 16) -> None:
        self.model = model
        self.criterion, (self.x, self.y), self.chunk = criterion, data, chunk
        self.n = group.size
        self.params = {k: v.detach() for k, v in model.named_parameters()}
        self.buffers = {k: v.detach() for k, v in model.named_buffers()}
        self.members = []  # (name, dim, unit_of_entry)
        for name, dim, index, buffer in merged_members(group):
            if buffer:
                continue
            if name not in self.params:
                raise KeyError(f"unit group names {name!r}, which is not a parameter of the model")
            t = self.params[name]
            uoe = torch.full((t.shape[dim],), self.n, dtype=torch.long, device=t.device)
            uoe[index.reshape(-1).to(t.device)] = torch.arange(self.n, device=t.device).repeat_interleave(
                index.shape[1])
            self.members.append((name, dim, uoe))
        self._vmap = True

    def norms(self) -> torch.Tensor:
        """‖θ_j‖₂ over every parameter slice of each unit (float64)."""
        total = torch.zeros(self.n + 1, dtype=torch.float64)
        for name, dim, uoe in self.members:
            t = self.params[name].double().movedim(dim, 0)
            sq = t.reshape(t.shape[0], -1).square().sum(1).cpu()
            total.index_add_(0, uoe.cpu(), sq)
        return total[: self.n].sqrt()

    def _scaled(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        p = dict(self.params)
        ext = torch.cat([c, c.new_ones(1)])
        for name, dim, uoe in self.members:
            shape = [1] * p[name].dim()
            shape[dim] = -1
            p[name] = p[name] * ext[uoe].view(shape)
        return p

    def _one(self, c: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(self.model, (self._scaled(c), self.buffers), (self.x,))
        return self.criterion(out, self.y)

    @torch.no_grad()
    def __call__(self, scales: torch.Tensor) -> torch.Tensor:
        """Losses (B,) float64 for scale vectors ``scales`` (B, n)."""
        scales = scales.to(device=self.x.device, dtype=next(iter(self.params.values())).dtype)
        out = []
        for part in scales.split(self.chunk):
            if self._vmap:
                try:
                    out.append(torch.func.vmap(self._one)(part).double().cpu())
                    continue
                except Exception:  # noqa: BLE001 - an op without a batching rule: evaluate one by one
                    self._vmap = False
            out.append(torch.stack([self._one(c) for c in part]).double().cpu())
        return torch.cat(out)


def _ray_thresholds(losses: torch.Tensor, base: torch.Tensor, radii: torch.Tensor, at_one: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From losses (m, G) along each unit's ray at radii (m, G) (increasing, > 0) and the loss without the
    unit ``base`` (m,): (global, spinodal, removal) thresholds, each ≥ 0."""
    gain = base[:, None] - losses  # −ΔL(r)
    glob = (gain / (2 * radii)).amax(1).clamp_min(0)
    r = torch.cat([torch.zeros_like(radii[:, :1]), radii], 1)
    g = torch.cat([torch.zeros_like(gain[:, :1]), gain], 1)
    spin = ((g[:, 1:] - g[:, :-1]) / (r[:, 1:] - r[:, :-1]) / 2).amax(1).clamp_min(0)
    removal = (gain[:, at_one] / (2 * radii[:, at_one])).clamp_min(0)
    return glob, torch.maximum(spin, glob), removal


@dataclass(frozen=True)
class UnitThresholds:
    """Per-unit thresholds of one unit group, in γ (for L + γ‖θ‖²; torch ``weight_decay`` = 2γ), evaluated at
    one point (module docstring). ``global_``, ``spinodal``, ``removal``: per unit with every other unit as it
    is (0 for a dead unit). ``order``: the greedy elimination order (dead units first); ``path``: the
    non-decreasing γ at which the width drops from n − i to n − i − 1 (``path[i]``, i = 0 … n − 2), computed
    with ``threshold``."""

    group: str
    threshold: str
    norms: list[float]
    global_: list[float]
    spinodal: list[float]
    removal: list[float]
    order: list[int]
    path: list[float]

    @property
    def size(self) -> int:
        return len(self.norms)

    def width(self, gamma: float) -> int:
        """Predicted number of live units at decay γ: n minus the path entries at or below γ."""
        return self.size - sum(1 for p in self.path if p <= gamma)

    def gamma_for(self, target_units: int) -> float:
        """A γ in the middle (geometric mean) of the interval where :meth:`width` equals ``target_units``:
        between the threshold of the last unit removed to get there and the next one. For ``target_units = n``,
        half the first threshold; 0 if the path says that width is not reachable from this point (units
        already dead)."""
        n = self.size
        _check_target(target_units, n)
        drop = n - target_units  # removals needed
        lo = self.path[drop - 1] if drop >= 1 else 0.0
        hi = self.path[drop] if drop < len(self.path) else math.inf
        if math.isinf(hi):  # one unit left: export keeps one, so any γ above lo
            return 2 * lo if lo > 0 else 0.0
        if lo <= 0:
            return hi / 2
        return math.sqrt(lo * hi)


def _check_target(target_units: int, n: int) -> None:
    if isinstance(target_units, bool) or not isinstance(target_units, int):
        raise TypeError(f"target_units must be an int, got {type(target_units).__name__}")
    if not 1 <= target_units <= n:
        raise ValueError(f"target_units must be between 1 and the group's width {n}, got {target_units}")


def _baked(model: nn.Module) -> nn.Module:
    plain = copy.deepcopy(model)
    bake(plain)
    return plain.eval()


def _pick_group(plain: nn.Module, example_inputs, group) -> Permutation:
    if isinstance(group, Permutation):
        return group
    found = unit_groups(plain, example_inputs, groups=group if isinstance(group, SymmetryMap) else None)
    if not found:
        raise ValueError("the model has no permutation unit group (ms.find_symmetries finds no hidden units)")
    if group is None or isinstance(group, SymmetryMap):
        if len(found) > 1:
            labels = [g.label for g in found]
            raise ValueError(f"the model has {len(found)} unit groups {labels}; say which one the target width is "
                             "for with group= (an index, a label or a Permutation)")
        return found[0]
    if isinstance(group, int) and not isinstance(group, bool):
        return found[group]
    for g in found:
        if g.label == group:
            return g
    raise KeyError(f"no unit group labelled {group!r}; the model has {[g.label for g in found]}")


def unit_thresholds(model: nn.Module, criterion: Criterion, data: tuple[torch.Tensor, torch.Tensor], *,
                    group: int | str | Permutation | None = None, example_inputs=None,
                    threshold: str = "global", scales: Sequence[float] | None = None, max_samples: int | None = 512,
                    alive_tol: float = 1e-6, greedy_fraction: float = 0.2) -> UnitThresholds:
    """Global, spinodal and removal thresholds (module docstring) of every unit of one group at the current
    weights, and the greedy elimination path (with ``threshold``).

    ``model``: a plain or DCS-gated model (gates are baked into a copy; the model is not changed).
    ``criterion(outputs, targets)``: the mean training loss (e.g. ``torch.nn.functional.cross_entropy``);
    ``data = (inputs, targets)``: the data it is averaged over (the first ``max_samples`` rows are used).
    ``group``: which permutation group (index, label or :class:`~mirrorsym.detect.Permutation`; needed when
    the model has several), found by ``ms.find_symmetries`` on ``example_inputs`` (default: 8 rows of data).
    ``scales``: the ray is sampled at r = c‖θ_j‖ for these c (default 16 values from 0.02 to 4, log-spaced,
    plus 1). Units with ‖θ_j‖ ≤ ``alive_tol`` are dead (threshold 0). ``greedy_fraction``: the share of the live
    units removed between two re-evaluations (at least one)."""
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    x, y = data
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    plain = _baked(model)
    grp = _pick_group(plain, x[:8] if example_inputs is None else example_inputs, group)
    f = UnitLoss(plain, criterion, (x, y), grp)
    n = grp.size
    c = sorted(set(torch.logspace(math.log10(0.02), math.log10(4.0), 16).tolist() + [1.0])
               if scales is None else {float(s) for s in scales} | {1.0})
    if c[0] <= 0:
        raise ValueError("scales must be > 0")
    grid = torch.tensor(c, dtype=torch.float64)
    at_one = c.index(1.0)
    norms = f.norms()
    alive = norms > alive_tol
    zeros = torch.zeros(n, dtype=torch.float64)
    first: tuple | None = None
    order = [int(j) for j in (~alive).nonzero().flatten()]
    path = [0.0] * len(order)
    while int(alive.sum()) > 0:
        live = alive.nonzero().flatten()
        base_scale = alive.double()
        m, G = len(live), len(grid)
        S = base_scale.repeat(m * (G + 1), 1).view(m, G + 1, n)
        S[torch.arange(m), :, live] = torch.cat([grid.new_zeros(1), grid]).expand(m, G + 1)
        L = f(S.view(-1, n)).view(m, G + 1)
        glob, spin, rem = _ray_thresholds(L[:, 1:], L[:, 0], grid[None, :] * norms[live, None], at_one)
        if first is None:
            first = tuple(zeros.clone().index_copy_(0, live, v) for v in (glob, spin, rem))
        score = {"global": glob, "spinodal": spin, "removal": rem}[threshold]
        k = max(1, int(greedy_fraction * m)) if m > 1 else 1
        for idx in score.argsort()[:k].tolist():
            j = int(live[idx])
            order.append(j)
            path.append(max([float(score[idx])] + path[-1:]))
            alive[j] = False
    first = first or (zeros, zeros, zeros)
    return UnitThresholds(group=grp.label, threshold=threshold, norms=norms.tolist(), global_=first[0].tolist(),
                          spinodal=first[1].tolist(), removal=first[2].tolist(), order=order, path=path[:-1])


def live_units(model: nn.Module, example_inputs, *, group: int | str | Permutation | None = None,
               tol: float = 1e-6) -> int:
    """Units of ``group`` with some parameter entry above ``tol`` in absolute value (what
    ``ms.constrain.export(tol=tol)`` keeps)."""
    plain = _baked(model)
    grp = _pick_group(plain, example_inputs, group)
    params = dict(plain.named_parameters())
    alive = torch.zeros(grp.size, dtype=torch.bool)
    for name, dim, index, buffer in merged_members(grp):
        if buffer:
            continue
        t = params[name].detach().index_select(dim, index.reshape(-1).to(params[name].device)).movedim(dim, 0)
        alive |= (t.reshape(grp.size, -1).abs().amax(1) > tol).cpu()
    return int(alive.sum())


# ---------------------------------------------------------------------------------------------- suggestion
@dataclass(frozen=True)
class CalibrationRound:
    """One ``train`` call of :func:`suggest_decay`: the γ and steps it trained with, the width it reached, and
    the γ the thresholds of the trained model proposed next."""

    gamma: float
    steps: int
    width: int
    proposed: float


@dataclass(frozen=True)
class DecaySuggestion:
    """What :func:`suggest_decay` suggests for ``target_units`` live units of ``group``.

    ``gamma``: the decay γ of L + γ‖θ‖² on the gates and gated tensors; ``torch_weight_decay`` = 2γ for a
    coupled optimizer (``ms.constrain.param_groups(model, s.torch_weight_decay)``); ``steps``: at least this many
    optimizer steps at ``lr`` / ``momentum`` (:func:`decay_steps` from the largest unit norm ``r0`` to ``tol``).
    ``thresholds``: the last evaluated :class:`UnitThresholds`; ``gammas`` / ``widths``: its predicted width
    per γ. ``rounds``: the calibration runs; ``width``: the width the calibration reached at ``gamma`` and
    ``reached``: whether it is within ``tolerance`` of the target (both None without calibration)."""

    target_units: int
    gamma: float
    steps: int
    lr: float
    momentum: float
    tol: float
    r0: float
    group: str
    thresholds: UnitThresholds
    gammas: list[float]
    widths: list[int]
    rounds: list[CalibrationRound] = field(default_factory=list)
    width: int | None = None
    reached: bool | None = None

    @property
    def torch_weight_decay(self) -> float:
        return 2.0 * self.gamma

    def predicted_width(self, gamma: float) -> int:
        return self.thresholds.width(gamma)

    def __str__(self) -> str:
        lines = [f"target {self.target_units} units of {self.group}: γ = {self.gamma:.4g} (torch weight_decay "
                 f"{self.torch_weight_decay:.4g}), ≥ {self.steps} steps at lr {self.lr:g}, momentum {self.momentum:g}"]
        lines += [f"  round {i}: γ = {r.gamma:.4g}, {r.steps} steps → width {r.width}"
                  for i, r in enumerate(self.rounds)]
        if self.reached is not None:
            lines.append(f"  calibrated: width {self.width} at γ = {self.gamma:.4g} (within tolerance: {self.reached})")
        return "\n".join(lines)


def _width_curve(th: UnitThresholds) -> tuple[list[float], list[int]]:
    positive = [p for p in th.path if p > 0]
    if not positive:
        return [], []
    gammas = torch.logspace(math.log10(min(positive) / 3), math.log10(max(positive) * 3), 60).tolist()
    return gammas, [th.width(g) for g in gammas]


def suggest_decay(model: nn.Module, criterion: Criterion, data: tuple[torch.Tensor, torch.Tensor],
                  target_units: int, *, lr: float, momentum: float = 0.0,
                  train: Callable[[float, int], nn.Module] | None = None, rounds: int = 4,
                  tolerance: int = 0, group: int | str | Permutation | None = None,
                  example_inputs=None, threshold: str = "global", tol: float = 1e-6, min_steps: int = 0,
                  max_samples: int | None = 512) -> DecaySuggestion:
    """Suggest the decay γ (and torch ``weight_decay`` = 2γ) and a number of steps for which DCS over units
    (``ms.constrain.apply(kind="units")``) ends with ``target_units`` live units in ``group``.

    ``model``: a trained model, plain or gated (e.g. a dense fit, or a gated model trained briefly at a small
    decay): the first thresholds are evaluated there (:func:`unit_thresholds`, with ``criterion``, ``data``,
    ``threshold``). ``train(gamma, steps) -> model``: optional, your training function (fresh model, DCS gates,
    coupled ``weight_decay = 2 * gamma`` on ``ms.constrain.param_groups``, at least ``steps`` steps at ``lr`` /
    ``momentum``); with it, up to ``rounds`` calibration runs refine γ (module docstring), stop at the first
    width within ``tolerance`` units of the target (default 0: exact), and the trained γ whose width came
    closest is returned. ``steps`` is max(``min_steps``, :func:`decay_steps` from the largest unit norm of
    ``model`` to ``tol``).

    Practical notes (measured on digits, see the ``dcs`` experiment): start ``train`` from the fitted model and
    raise the decay linearly over the first few hundred steps; a large decay switched on at once can drive
    every unit into the basin of the dead state (zero is a local minimum at every γ) before the loss can
    hold any of them.

    Raises ValueError for a target outside 1 … width of the group.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    x = data[0]
    ex = x[:8] if example_inputs is None else example_inputs
    grp = _pick_group(_baked(model), ex, group)
    _check_target(target_units, grp.size)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 units, got {tolerance}")
    def thresholds_at(m: nn.Module) -> UnitThresholds:
        return unit_thresholds(m, criterion, data, group=grp, threshold=threshold, max_samples=max_samples)

    th0 = th = thresholds_at(model)
    r0 = max(max(th0.norms), tol)

    def steps_for(g: float) -> int:
        return max(min_steps, decay_steps(g, lr, momentum, r0, tol)) if g > 0 else min_steps

    gamma = th0.gamma_for(target_units)
    if gamma <= 0:
        raise ValueError(f"the thresholds at this model give no positive decay for {target_units} units (its live "
                         f"units: {sum(n > 0 for n in th0.norms)}); pass a model with more live units")
    history: list[CalibrationRound] = []
    for _ in range(rounds):
        if train is None:
            break
        steps = steps_for(gamma)
        trained = train(gamma, steps)
        got = live_units(trained, ex, group=grp, tol=tol)
        if abs(got - target_units) <= tolerance:
            history.append(CalibrationRound(gamma, steps, got, gamma))
            break
        if got > target_units:  # re-evaluate where training went: the thresholds of the shrunk model
            th = thresholds_at(trained)
        proposal = _next_gamma(history + [CalibrationRound(gamma, steps, got, math.nan)], target_units, th)
        history.append(CalibrationRound(gamma, steps, got, proposal))
        gamma = proposal
    reached: bool | None = None
    width: int | None = None
    if history:  # the trained γ whose width came closest (the latest on ties)
        best = min(reversed(history), key=lambda r: abs(r.width - target_units))
        gamma, width, reached = best.gamma, best.width, abs(best.width - target_units) <= tolerance
    gammas, widths = _width_curve(th)
    return DecaySuggestion(target_units=target_units, gamma=gamma, steps=steps_for(gamma), lr=lr, momentum=momentum,
                           tol=tol, r0=r0, group=grp.label, thresholds=th, gammas=gammas, widths=widths,
                           rounds=history, width=width, reached=reached)


def _next_gamma(history: list[CalibrationRound], target: int, th: UnitThresholds) -> float:
    """The next γ to train: inside the measured bracket (width is non-increasing in γ), by interpolation of
    log γ against width between the closest measurements on both sides; with measurements on one side only,
    the thresholds of the last trained model (too many units), or a step down by the ratio the first path
    predicts, at most 4× (too few)."""
    above = [r for r in history if r.width > target]  # γ too small
    below = [r for r in history if r.width < target]  # γ too large
    last = history[-1]
    if above and below:
        a = max(above, key=lambda r: r.gamma)
        b = min(below, key=lambda r: r.gamma)
        if a.gamma >= b.gamma:  # non-monotone measurements (dynamics): split the difference
            return math.sqrt(a.gamma * b.gamma)
        w = (a.width - target) / (a.width - b.width)
        w = min(max(w, 0.2), 0.8)  # safeguard: stay clear of the ends
        return math.exp((1 - w) * math.log(a.gamma) + w * math.log(b.gamma))
    if above:
        proposal = th.gamma_for(target)
        return proposal if proposal > last.gamma else 2 * last.gamma
    here, there = th.gamma_for(min(max(last.width, 1), th.size)), th.gamma_for(target)
    step = here / there if here > 0 and there > 0 else 4.0
    return last.gamma / min(max(step, 1.5), 4.0)
