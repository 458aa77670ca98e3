"""Sweep configurations: the grid, its validation, method options and stable run ids.

A *run config* is a flat dict with one value for every standard field and every registered option:

==========================  =========================================================================
``lr``                      learning rate η > 0 (required)
``batch_size``              minibatch size B, 1 ≤ B ≤ n (required); B = n is full-batch GD
``steps``                   number of optimisation steps ≥ 1 (required)
``weight_decay``            torch's *coupled* λ ≥ 0 (default 0): the gradient gets + λθ. In THEORY.md's
                            L + γ‖θ‖² convention **γ = λ/2**
``momentum``                heavy-ball μ ∈ [0, 1) (default 0), torch.optim.SGD semantics
                            (dampening 0, no Nesterov)
``seed``                    int in [0, 2³²) (default 0): the model factory's seed and the key of every
                            random draw of the run (see :mod:`mirrorsym.sweep.rng`)
``noise``                   option: std σ ≥ 0 of Gaussian noise added to every gradient coordinate
``decay_to_offset_sigma``   option: σ₀ ≥ 0; decay pulls towards a fixed random point θ₀ ~ N(0, σ₀²I)
                            drawn once per run (λ(θ − θ₀) replaces λθ; THEORY.md §6). No effect at λ = 0
==========================  =========================================================================

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
    Example, symmetry removal as a parametrisation (THEORY.md §6)::

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
