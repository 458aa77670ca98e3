"""Sweep configurations: the grid, its validation, method options and stable run ids.

A *run config* is a flat dict with one value for every standard field and every registered option:

==========================  =========================================================================
``lr``                      learning rate η > 0 (required)
``batch_size``              minibatch size B, 1 ≤ B ≤ n (required); B = n is full-batch GD
``steps``                   number of optimisation steps ≥ 1 (required)
``weight_decay``            torch's *coupled* λ ≥ 0 (default 0): the gradient gets + λθ. In docs/theory.md's
                            L + γ‖θ‖² convention **γ = λ/2**
``momentum``                heavy-ball μ ∈ [0, 1) (default 0), torch.optim.SGD semantics
                            (dampening 0, no Nesterov)
``sampling``                option: ``"with_replacement"`` (default: B independent uniform indices) or
                            ``"without_replacement"`` (a uniform random B-subset of the n samples, what the
                            noise theory of docs/theory.md#gradient-noise assumes; costs n hash words a step)
``seed``                    int in [0, 2³²) (default 0): the model factory's seed and the key of every
                            random draw of the run (see :mod:`mirrorsym.sweep.rng`)
``noise``                   option: std σ ≥ 0 of Gaussian noise added to every gradient coordinate
``decay_to_offset_sigma``   option: σ₀ ≥ 0; decay pulls towards a fixed random point θ₀ ~ N(0, σ₀²I)
                            drawn once per run (λ(θ − θ₀) replaces λθ; docs/theory.md#syre). No effect at λ = 0
==========================  =========================================================================

Optimizer options (each equal to the torch optimizer on the same minibatches; see
:mod:`mirrorsym.sweep.engine` for the exact update and ``tests/test_sweep_optim.py``):

==========================  =========================================================================
``optimizer``               ``"sgd"`` (default; ``torch.optim.SGD``), ``"adam"`` (``torch.optim.Adam``)
                            or ``"adamw"`` (``torch.optim.AdamW``). ``weight_decay`` is *coupled*
                            (+ λθ in the gradient, i.e. the penalty γ‖θ‖² with γ = λ/2) for sgd and
                            adam, *decoupled* for adamw (θ ← θ − ηλθ before the Adam step: not an L2
                            penalty, so γ_c and the other thresholds of the theory do not transfer)
``nesterov``                sgd only: Nesterov momentum (needs ``momentum`` > 0), default False
``beta1``, ``beta2``        adam/adamw only: moment decay rates (defaults 0.9, 0.999)
``eps``                     adam/adamw only: denominator ε (default 1e-8)
``lr_schedule``             ``"constant"`` (default), ``"step"`` (``StepLR``: η·γ^⌊t/s⌋ at step t) or
                            ``"cosine"`` (``CosineAnnealingLR`` with T_max = ``steps``:
                            η_min + (η − η_min)(1 + cos(πt/T))/2); the scheduler steps once per step
``lr_step_size``, ``lr_gamma``  step schedule: s ≥ 1 (required with "step") and γ > 0 (default 0.1)
``lr_min``                  cosine schedule: η_min ≥ 0 (default 0)
``clip_grad_norm``          c ≥ 0: clip the run's gradient to global L2 norm ≤ c
                            (``torch.nn.utils.clip_grad_norm_``, before the optimizer adds its decay);
                            0 (default) = off
==========================  =========================================================================

Settings that would have no effect are refused (momentum with adam, beta1 with sgd, lr_min without the
cosine schedule, ...): a grid that mixes optimizers is a list of grids, one per optimizer.

More options plug in with :func:`register_option` (e.g. a DCS parametrisation or ``remove_symmetries``
as a ``transform_model`` hook applied to every freshly built copy).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

SEED_LIMIT = 2**32


@dataclass(frozen=True)
class Field:
    """A config field: its type, default (``None``: required) and validity check (message or None)."""

    name: str
    kind: type
    default: object
    check: Callable[[object], str | None]
    doc: str = ""


@dataclass(frozen=True)
class Option(Field):
    """A method option. ``transform_model(module, value, config) -> module`` runs on each copy after the
    factory (before its parameters are stacked; ``config`` is the run's full config, e.g. for its seed);
    ``None`` for the built-in options, which act inside the optimiser step."""

    transform_model: Callable[[nn.Module, object, dict], nn.Module] | None = None


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _momentum(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _seed(v):
    return None if 0 <= v < SEED_LIMIT else f"must be in [0, 2**32), got {v}"


def _steps(v):
    return None if v >= 1 else "must be >= 1"


STANDARD: dict[str, Field] = {
    f.name: f
    for f in (
        Field("lr", float, None, _positive, "learning rate"),
        Field("weight_decay", float, 0.0, _non_negative, "coupled torch λ = 2γ"),
        Field("batch_size", int, None, _positive, "minibatch size (= n: full batch)"),
        Field("momentum", float, 0.0, _momentum, "heavy-ball momentum"),
        Field("seed", int, 0, _seed, "model factory seed and key of all random draws"),
        Field("steps", int, None, _steps, "optimisation steps"),
    )
}

OPTIONS: dict[str, Option] = {}


def register_option(name: str, default, check: Callable[[object], str | None] | None = None,
                    transform_model: Callable[[nn.Module, object, dict], nn.Module] | None = None,
                    doc: str = "") -> Option:
    """Add a method option to every sweep's grid vocabulary.

    ``default`` fixes the type (float, int, bool or str) and should mean "method off"; ``check(value)``
    returns an error message or None; ``transform_model(module, value, config)`` returns the module to
    train, e.g. parametrised (runs also at the default value, so make it a no-op there). Run ids only
    hash options that differ from their default, so registering an option changes no existing id.
    Example, symmetry removal as a parametrisation (docs/theory.md#syre)::

        def remove(module, sigma, config):
            if sigma > 0:
                ms.remove_symmetries(module, sigma=sigma, seed=config["seed"])
            return module

        ms.sweep.register_option("syre_sigma", 0.0, lambda v: None if v >= 0 else "must be >= 0",
                                 transform_model=remove)
    """
    if name in STANDARD:
        raise ValueError(f"register_option: {name!r} is a standard sweep field; choose another name")
    if not isinstance(default, (bool, int, float, str)):
        raise TypeError(f"register_option({name!r}): default must be a bool, int, float or str")
    opt = Option(name, type(default), default, check or (lambda v: None), doc, transform_model)
    OPTIONS[name] = opt
    return opt


register_option("noise", 0.0, _non_negative, doc="std of Gaussian noise added to each gradient coordinate")
register_option("decay_to_offset_sigma", 0.0, _non_negative,
                doc="decay towards a fixed random θ₀ ~ N(0, σ₀²I) instead of 0")

SAMPLINGS = ("with_replacement", "without_replacement")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def _one_of(choices):
    return lambda v: None if v in choices else f"must be one of {choices}"


def _unit_interval(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


# optimizer options: registered like method options, so that run ids only hash them away from their
# defaults (the ids of plain SGD runs keep their form) and stored rows of older versions stay readable
register_option("optimizer", "sgd", _one_of(OPTIMIZERS), doc="sgd | adam | adamw")
register_option("sampling", "with_replacement", _one_of(SAMPLINGS),
                doc="minibatches: with_replacement | without_replacement (a uniform random subset)")
register_option("nesterov", False, doc="sgd: Nesterov momentum")
register_option("beta1", 0.9, _unit_interval, doc="adam/adamw: first-moment decay")
register_option("beta2", 0.999, _unit_interval, doc="adam/adamw: second-moment decay")
register_option("eps", 1e-8, _non_negative, doc="adam/adamw: denominator epsilon")
register_option("lr_schedule", "constant", _one_of(SCHEDULES), doc="constant | step | cosine")
register_option("lr_step_size", 0, _non_negative, doc="step schedule: steps between decays")
register_option("lr_gamma", 0.1, _positive, doc="step schedule: decay factor")
register_option("lr_min", 0.0, _non_negative, doc="cosine schedule: final learning rate")
register_option("clip_grad_norm", 0.0, _non_negative, doc="max global gradient norm per run (0: off)")
BUILTIN_OPTIONS = ("noise", "decay_to_offset_sigma", "optimizer", "nesterov", "beta1", "beta2", "eps",
                   "lr_schedule", "lr_step_size", "lr_gamma", "lr_min", "clip_grad_norm")


def check_combination(config: Mapping) -> None:
    """Refuse settings that have no effect for the chosen optimizer or schedule (a likely mistake)."""
    opt, schedule = config["optimizer"], config["lr_schedule"]

    def refuse(name, why):
        raise ValueError(f"mirrorsym.sweep grid[{name!r}] = {config[name]!r}: {why} (this config: optimizer "
                         f"{opt!r}, lr_schedule {schedule!r}); give a list of grids to combine optimizers "
                         "or schedules with their own settings")

    if opt != "sgd":
        for name in ("momentum", "nesterov"):
            if config[name] != fields()[name].default:
                refuse(name, f"an SGD setting; {opt} has beta1/beta2 instead")
    else:
        for name in ("beta1", "beta2", "eps"):
            if config[name] != fields()[name].default:
                refuse(name, "an Adam/AdamW setting; set optimizer='adam' or 'adamw'")
        if config["nesterov"] and config["momentum"] == 0:
            refuse("nesterov", "Nesterov momentum needs momentum > 0")
    if schedule == "step" and config["lr_step_size"] < 1:
        raise ValueError("mirrorsym.sweep: lr_schedule 'step' needs lr_step_size >= 1 (steps between decays)")
    if schedule != "step":
        for name in ("lr_step_size", "lr_gamma"):
            if config[name] != fields()[name].default:
                refuse(name, "a setting of lr_schedule='step'")
    if schedule != "cosine" and config["lr_min"] != fields()["lr_min"].default:
        refuse("lr_min", "a setting of lr_schedule='cosine'")


def fields() -> dict[str, Field]:
    return {**STANDARD, **OPTIONS}


def _coerce(name: str, field: Field, value):
    """Cast ``value`` to the field's type, refusing lossy or odd values (bools as numbers, 1.5 as int)."""
    kind = field.kind
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is str and isinstance(value, str))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
    )
    if not ok:
        try:  # numpy / torch scalars
            if kind in (int, float) and hasattr(value, "item"):
                return _coerce(name, field, value.item())
        except (TypeError, ValueError):
            pass
        raise TypeError(f"mirrorsym.sweep grid[{name!r}]: expected {kind.__name__}, got {value!r}")
    value = kind(value)
    if kind is float and not math.isfinite(value):
        raise ValueError(f"mirrorsym.sweep grid[{name!r}]: {value} is not finite")
    return value


def _axis(name: str, values) -> list:
    """A grid axis: a list/tuple/range (or 1-D array) of values; anything else is one value."""
    if hasattr(values, "tolist") and getattr(values, "ndim", 0) > 0:
        values = values.tolist()
    if not isinstance(values, (list, tuple, range)):
        return [values]
    if len(values) == 0:
        raise ValueError(f"mirrorsym.sweep grid[{name!r}] is empty: give at least one value")
    return list(values)


def expand_grid(grid: Mapping | Sequence[Mapping]) -> list[dict]:
    """Run configs of a grid: a dict ``{field: value or list}`` is a cartesian product (last key
    fastest); a list of such dicts is the concatenation of their products. Defaults fill the rest."""
    grids = [grid] if isinstance(grid, Mapping) else list(grid)
    if not grids:
        raise ValueError("mirrorsym.sweep: the grid is empty; give e.g. {'lr': [0.1], 'batch_size': 32, "
                         "'steps': 1000}")
    known = fields()
    configs = []
    for g in grids:
        if not isinstance(g, Mapping):
            raise TypeError(f"mirrorsym.sweep: a grid is a dict or a list of dicts, got {type(g).__name__}")
        unknown = sorted(set(g) - set(known))
        if unknown:
            raise ValueError(f"mirrorsym.sweep: unknown grid option(s) {unknown}; known: {sorted(known)} "
                             "(add methods with mirrorsym.sweep.register_option)")
        axes = {k: _axis(k, v) for k, v in g.items()}
        for combo in itertools.product(*axes.values()):
            configs.append(dict(zip(axes, combo, strict=True)))
    return [complete(c) for c in configs]


def complete(config: Mapping) -> dict:
    """Fill defaults, coerce types and check every value (data-independent checks only)."""
    out = {}
    for name, field in fields().items():
        if name not in config:
            if field.default is None:
                raise ValueError(f"mirrorsym.sweep: the grid must set {name!r} ({field.doc})")
            out[name] = field.default
            continue
        value = _coerce(name, field, config[name])
        problem = field.check(value)
        if problem:
            raise ValueError(f"mirrorsym.sweep grid[{name!r}] = {value!r}: {problem}")
        out[name] = value
    check_combination(out)
    return out


def check_against_data(configs: Sequence[Mapping], n: int) -> None:
    """Refuse batch sizes larger than the data set (n samples along dim 0)."""
    too_big = sorted({c["batch_size"] for c in configs if c["batch_size"] > n})
    if too_big:
        raise ValueError(f"mirrorsym.sweep grid['batch_size'] = {too_big}: larger than the data ({n} samples "
                         "along dim 0); use batch_size <= n (batch_size = n is full-batch GD)")


def run_id(name: str, config: Mapping) -> str:
    """A stable id: the first 16 hex digits of sha256 over the canonical JSON of the sweep name, the
    standard fields and the options that differ from their defaults (so registering a new option
    leaves existing ids unchanged)."""
    options = {k: v for k, v in config.items()
               if k not in STANDARD and (k not in OPTIONS or v != OPTIONS[k].default)}
    standard = {k: config[k] for k in STANDARD}
    blob = json.dumps({"sweep": name, "config": standard, "options": options}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
