"""Layer 4: constrain by symmetry (DCS, docs/theory.md#dcs), export the smaller model, remove symmetries (§6).

Conventions (docs/theory.md#conventions): objective L + γ‖factors‖², torch coupled ``weight_decay = λ = 2γ``; the DCS
penalties are then λ‖θ‖₁ (sparse), λΣ‖θ_g‖₂ (group_sparse, units), λ‖W‖_* (low_rank), λ‖Oᵀθ‖₁ (linear).
Parametrizations change state-dict keys (``w`` → ``parametrizations.w.original{0,1,...}``); ``export`` bakes
them away. Register before building the optimizer.
"""

from .apply import UnitGate, apply
from .export import ExportReport, ExportResult, bake, count_params, export
from .guidance import (
    CalibrationRound,
    DecaySuggestion,
    UnitThresholds,
    decay_steps,
    live_units,
    suggest_decay,
    unit_thresholds,
)
from .parametrizations import (
    GroupSparse,
    LinearConstraint,
    LowRank,
    Sparse,
    dcs_parameters,
    group_sparse,
    linear,
    low_rank,
    param_groups,
    sparse,
    weight_decay_for,
)
from .remove import Offset, SymmetryRemoval, l2_init, remove_symmetries, shrink_and_perturb
from .serialize import load_constrained, load_exported, save_constrained, save_exported
from .units import unit_groups

__all__ = [
    "CalibrationRound",
    "DecaySuggestion",
    "UnitThresholds",
    "decay_steps",
    "live_units",
    "suggest_decay",
    "unit_thresholds",
    "ExportReport",
    "ExportResult",
    "GroupSparse",
    "LinearConstraint",
    "LowRank",
    "Offset",
    "Sparse",
    "SymmetryRemoval",
    "UnitGate",
    "apply",
    "bake",
    "count_params",
    "dcs_parameters",
    "export",
    "group_sparse",
    "l2_init",
    "linear",
    "load_constrained",
    "load_exported",
    "low_rank",
    "param_groups",
    "remove_symmetries",
    "save_constrained",
    "save_exported",
    "shrink_and_perturb",
    "sparse",
    "unit_groups",
    "weight_decay_for",
]
