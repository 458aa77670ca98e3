"""The unit groups that ``apply(kind="units")`` gates and ``export`` shrinks: the model's permutation groups.

A unit group is a :class:`mirrorsym.detect.Permutation` (from ``ms.find_symmetries``, or written by hand
with ``Permutation.from_spec``): its members say which positions of which tensors make up each unit (the
incoming rows, bias entries, BatchNorm entries and the next layers' columns of a hidden unit or channel,
residual streams included). There is no second detector: a model that ``find_symmetries`` cannot read is
an error, not a guess.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..detect import Permutation, SymmetryMap, find_symmetries
from ..detect.smap import ExampleInputs

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def unit_groups(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    groups: SymmetryMap | Iterable[Permutation] | None = None,
) -> list[Permutation]:
    """The permutation groups of ``model`` (plain parameter names; a constrained model is read as its
    plain twin): ``groups`` when given (Permutation groups or a SymmetryMap, whose permutation groups are
    used), else those ``ms.find_symmetries(model, example_inputs)`` finds."""
    if groups is None:
        if example_inputs is None:
            raise ValueError("unit groups come from ms.find_symmetries, which needs example_inputs (or pass groups=)")
        groups = find_symmetries(model, example_inputs)
    if isinstance(groups, SymmetryMap):
        return [g for g in groups if isinstance(g, Permutation)]
    groups = list(groups)
    bad = [type(g).__name__ for g in groups if not isinstance(g, Permutation)]
    if bad:
        raise TypeError(
            f"groups= must be Permutation groups (from ms.find_symmetries or Permutation.from_spec), got {bad}"
        )
    return groups


def merged_members(group: Permutation) -> Iterable[tuple[str, int, torch.Tensor, bool]]:
    """``(name, dim, index (n, m), buffer)`` per tensor and dim: unit u owns positions ``index[u]``. Members
    of one tensor along one dim are merged, so each unit's positions are one row."""
    merged: dict[tuple[str, int], list] = {}
    for m in group.members:
        merged.setdefault((m.name, m.dim), [m.buffer, []])[1].append(m.index.reshape(group.size, -1))
    for (name, dim), (buffer, parts) in merged.items():
        yield name, dim, torch.cat(parts, dim=1), buffer
