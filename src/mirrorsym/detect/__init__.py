"""Layer 2: from an ``nn.Module`` and example inputs to a :class:`SymmetryMap` of typed, verified groups.

How it works: the model is traced with ``torch.export`` first (``strict=False``, :mod:`.trace`), which
reads models that symbolic tracing cannot (Hugging Face transformers, ``nn.Transformer``, code that
branches on shapes); every submodule that has a module rule keeps its call signature and is read as a
whole by that rule, and the remaining ATen ops go through a translation table (:mod:`.aten`). When
export fails, ``torch.fx`` symbolic tracing is the fallback (modules with a rule stay leaves). The graph is
run once on the example inputs, and every node is handed to its rule (:mod:`.rules`; add your own with
:func:`register_rule`, which also reads the ATen op of the same name). Rules unite tensor axes in a
union-find (:mod:`.axes`), so the units coupled through elementwise ops, norms, residual additions,
concatenation/splits and reshapes into heads form one class; a class that nothing pins is a permutation
group. Within a class, the paths along which a per-unit transform travels (*segments*) decide whether
sign flips, positive rescalings or rotations are symmetries (:mod:`.groups` documents every kind). Unknown
ops are never guessed: their axes are pinned and a :class:`DetectWarning` names them. Every group is
verified numerically (float64, eval mode) before it is returned; above 2 GiB of float64 weights block by
block, without a float64 copy of the whole model (:func:`verify_groups`).

:func:`fold_norms` returns a copy of a pre-norm transformer with every norm's weight folded into the linear
maps that read it, the form in which SliceGPT-style residual-stream rotations are exact; with
``drop_gains=True`` the folded RMS norms also lose their (all-ones) gains as parameters
(:class:`GainFreeRMSNorm`), and :func:`find_symmetries` then reports the stream rotation.
"""

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .context import ANY, NEG, NONE, POS, RuleContext, TensorAxes
from .find import find_symmetries, verify_groups
from .fold import GainFreeRMSNorm, fold_norms
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
    "GainFreeRMSNorm",
    "Member",
    "RuleContext",
    "SymmetryGroup",
    "SymmetryMap",
    "TensorAxes",
    "UntraceableModelError",
    "find_symmetries",
    "fold_norms",
    "register_rule",
    "verify_groups",
]
