"""SymmetryMap: the verified groups of one model, as rows of a table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from .groups import SymmetryGroup

ExampleInputs = torch.Tensor | tuple[Any, ...]
"""What a model is called with: one Tensor, or a tuple of positional inputs (``model(*inputs)``)."""


@dataclass
class SymmetryMap:
    """The typed, verified symmetry groups of a model (``groups``) and the ops the detector could not
    read (``unknown_ops``: op name -> module paths; nothing crosses them)."""

    groups: list[SymmetryGroup]
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[SymmetryGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> SymmetryGroup:
        return self.groups[i]

    def by_kind(self, kind: str) -> list[SymmetryGroup]:
        return [g for g in self.groups if g.kind == kind]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.kind] = out.get(g.kind, 0) + 1
        return out

    def verify(self, model: nn.Module, example_inputs: ExampleInputs, seed: int = 0,
               example_kwargs: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per group: the max relative output change after one random element of that group
        alone (generator seeded with ``seed``; never the identity), in float64 and eval mode, by
        :func:`~mirrorsym.detect.find.verify_groups` (``model`` is untouched): on a float64 copy of
        ``model``, or block by block where that is cheaper (then a group checked on one block reports the
        relative change of that block's outputs). Non-finite weights or inputs raise
        :class:`~mirrorsym.core.finite.NonFiniteError`."""
        from .find import verify_groups

        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        errors = verify_groups(model, inputs, self.groups, seed=seed, kwargs=example_kwargs)
        rows = [
            {"group": g.label, "kind": g.kind, "size": g.size, "max_rel_change": err}
            for g, err in zip(self.groups, errors, strict=True)
        ]
        return pd.DataFrame(rows, columns=["group", "kind", "size", "max_rel_change"])

    def to_pandas(self) -> pd.DataFrame:
        """One row per group: label, kind, size, layers, tensors moved, coordinates moved, error."""
        rows = [
            {
                "group": g.label,
                "kind": g.kind,
                "size": g.size,
                "layers": ", ".join(g.layers),
                "tensors": ", ".join(g.params),
                "coordinates": g.num_coordinates,
                "verification_error": g.error,
                "notes": "; ".join(g.notes),
            }
            for g in self.groups
        ]
        cols = ["group", "kind", "size", "layers", "tensors", "coordinates", "verification_error", "notes"]
        return pd.DataFrame(rows, columns=cols)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(
            {"groups": [g.to_dict() for g in self.groups], "unknown_ops": self.unknown_ops}, indent=indent
        )

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return f"{len(self.groups)} symmetry groups ({counts or 'none'})"
