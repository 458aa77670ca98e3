"""Layer 6: one module per claim of the paper (see :mod:`mirrorsym.experiments.base`)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .base import Claim, Context, finding

# Order is the report's order.
MODULES = [
    "detection",
    "theorem1",
    "sparsity",
    "lowrank",
    "permutation",
    "stochastic_collapse",
    "noise",
    "transformer",
    "dcs",
    "plasticity",
    "posterior",
    "dimensional",
    "neural_collapse",
    "discriminating",
]


def registry() -> dict[str, ModuleType]:
    """``{NAME: module}`` for every experiment, in report order."""
    mods = [importlib.import_module(f"{__name__}.{m}") for m in MODULES]
    return {m.NAME: m for m in mods}


__all__ = ["Claim", "Context", "MODULES", "finding", "registry"]
