"""Layer 2: from an ``nn.Module`` and example inputs to a :class:`SymmetryMap` of typed, verified groups.

How it works: the model is traced with ``torch.fx`` (modules with a rule stay leaves), run once on the
example inputs, and every node is handed to its rule (:mod:`.rules`; add your own with
:func:`register_rule`). Rules unite tensor axes in a union-find (:mod:`.axes`), so the units coupled
through elementwise ops, norms, residual additions, concatenation/splits and reshapes into heads form
one class; a class that nothing pins is a permutation group. Within a class, the paths along which a
per-unit transform travels (*segments*) decide whether sign flips, positive rescalings or rotations are
symmetries (:mod:`.groups` documents every kind). Unknown ops are never guessed: their axes are pinned
and a :class:`DetectWarning` names them. Every group is verified numerically before it is returned.
"""

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .context import ANY, NEG, NONE, POS, RuleContext, TensorAxes
from .find import find_symmetries, verify_groups
from .groups import (
    KINDS,
    BNScale,
    Member,
    Permutation,
    Rescale,
    Rotation,
    Scale,
    SignFlip,
    SymmetryGroup,
    make_group,
)
from .registry import register_rule
from .smap import SymmetryMap
from .trace import DetectWarning, UntraceableModelError

__all__ = [
    "ANY",
    "BNScale",
    "Permutation",
    "Rescale",
    "Rotation",
    "Scale",
    "SignFlip",
    "make_group",
    "KINDS",
    "NEG",
    "NONE",
    "POS",
    "DetectWarning",
    "Member",
    "RuleContext",
    "SymmetryGroup",
    "SymmetryMap",
    "TensorAxes",
    "UntraceableModelError",
    "find_symmetries",
    "register_rule",
    "verify_groups",
]
