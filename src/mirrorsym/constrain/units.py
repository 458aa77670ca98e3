"""Coupled unit groups: which slices of which tensors make up one hidden unit / channel.

A :class:`UnitGroup` uses the SymmetryMap's slice-spec format: ``params = {name: (dim, indices)}`` with
``size`` units; each index list has ``size × m`` entries and unit j owns the contiguous chunk
``indices[j·m:(j+1)·m]`` (m = 1 for a plain unit; m = H·W for a conv channel read by a Linear after
``Flatten``). Names are ``named_parameters()`` / ``named_buffers()`` names of the *plain* (unparametrized)
model, e.g. ``{"0.weight": (0, [...]), "0.bias": (0, [...]), "1.weight": (0, [...]),
"3.weight": (1, [...])}``.

Where the groups come from (:func:`unit_groups`):

1. ``groups=`` given by the caller (a list of UnitGroup or of ``{"params": ..., "size": ...}`` dicts), or
2. ``mirrorsym.find_symmetries`` when the detect layer is installed: its ``kind == "permutation"`` groups'
   ``.params`` / ``.size`` (residual-coupled groups included), or
3. the built-in fallback :func:`sequential_unit_groups`: the hidden units of every ``nn.Sequential`` chain
   Linear/Conv → (BatchNorm, elementwise activation, Dropout, channel-wise pooling, Flatten)* → Linear/Conv.
   A chain broken by any other module is not used (its units may be read elsewhere).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..diagnose.probe import ACTIVATIONS

# elementwise modules: a unit passes through unchanged in position
ELEMENTWISE = (*ACTIVATIONS, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
CHANNEL_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Entry:
    """Positions ``indices`` of tensor ``name`` along ``dim``; unit j owns chunk j (``len // size``)."""

    name: str
    dim: int
    indices: tuple[int, ...]


@dataclass
class UnitGroup:
    """``size`` interchangeable units spread over ``entries`` (a tensor may appear along two dims, e.g. a
    Linear that reads a residual stream and writes it back)."""

    entries: list[Entry]
    size: int
    source: str = "given"
    label: str = field(default="")

    def __post_init__(self):
        for e in self.entries:
            if len(e.indices) % self.size:
                raise ValueError(
                    f"unit group {self.label or self.names}: {e.name!r} (dim {e.dim}) has {len(e.indices)} "
                    f"indices, not a multiple of its {self.size} units"
                )

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(e.name for e in self.entries))

    @property
    def params(self) -> dict[str, tuple[int, list[int]]]:
        """The slice spec (first dim per tensor), as in a SymmetryMap group."""
        out: dict[str, tuple[int, list[int]]] = {}
        for e in self.entries:
            out.setdefault(e.name, (e.dim, list(e.indices)))
        return out

    def chunk(self, entry: Entry) -> int:
        return len(entry.indices) // self.size

    def unit_indices(self, entry: Entry, units: Sequence[int]) -> list[int]:
        """The indices of ``entry`` (along its dim) owned by ``units``."""
        m = self.chunk(entry)
        return [i for j in units for i in entry.indices[j * m : (j + 1) * m]]


def _indices(idx) -> tuple[int, ...]:
    if isinstance(idx, torch.Tensor):
        return tuple(int(i) for i in idx.reshape(-1).tolist())
    return tuple(int(i) for i in idx)


def _from_members(members, size: int, source: str, label: str) -> UnitGroup:
    """A SymmetryGroup's members (``index`` of shape (size, m): unit u owns ``index[u]``), merged per
    (tensor, dim) so that each unit's positions stay one contiguous chunk."""
    merged: dict[tuple[str, int], list[torch.Tensor]] = {}
    for m in members:
        merged.setdefault((m.name, int(m.dim)), []).append(torch.as_tensor(m.index).reshape(size, -1))
    entries = [Entry(name, dim, _indices(torch.cat(parts, dim=1))) for (name, dim), parts in merged.items()]
    return UnitGroup(entries, size, source, label)


def as_unit_group(obj, source: str = "given") -> UnitGroup:
    """Accept a UnitGroup, a dict ``{"params": {name: (dim, indices)}, "size": n}``, or a SymmetryMap group
    (its ``.members`` are used: they keep the unit ↔ index map and tensors moved along two dims)."""
    if isinstance(obj, UnitGroup):
        return obj
    label = (obj.get("label", "") if isinstance(obj, Mapping) else getattr(obj, "label", "")) or ""
    size = obj.get("size") if isinstance(obj, Mapping) else getattr(obj, "size", None)
    if not isinstance(size, int) or size < 1:
        raise TypeError(f"a unit group needs an int size >= 1, got {obj!r}")
    members = None if isinstance(obj, Mapping) else getattr(obj, "members", None)
    if members:
        return _from_members(members, size, source, label)
    params = obj.get("params") if isinstance(obj, Mapping) else getattr(obj, "params", None)
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"a unit group needs params {{name: (dim, indices)}}, got {obj!r}")
    entries = []
    for name, entry in params.items():
        dim, idx = entry if isinstance(entry, tuple) and len(entry) == 2 else (0, entry)
        entries.append(Entry(name, int(dim), _indices(idx)))
    return UnitGroup(entries, size, source, label)


def _leaf_shapes(model: nn.Module, example_inputs) -> dict[str, torch.Size]:
    """Input shape of every module path, from one no-grad forward pass of a copy (so BatchNorm running
    stats of a model in train mode are not touched)."""
    shapes: dict[str, torch.Size] = {}
    model = copy.deepcopy(model)

    def recorder(path):
        def record(module, args):
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(path, args[0].shape)

        return record

    hooks = [m.register_forward_pre_hook(recorder(path)) for path, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _produces_units(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, CONVS) and m.groups == 1)


def sequential_unit_groups(model: nn.Module, example_inputs=None) -> list[UnitGroup]:
    """The hidden-unit groups of every ``nn.Sequential`` chain in ``model`` (see the module docstring).

    ``example_inputs`` is needed only to size a Flatten between a conv and a Linear.
    """
    shapes = _leaf_shapes(model, example_inputs) if example_inputs is not None else {}
    groups = []
    for path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{path}." if path else ""
        children = list(seq.named_children())
        for start, (name, producer) in enumerate(children):
            if not _produces_units(producer):
                continue
            group = _chain_from(producer, prefix + name, children[start + 1 :], prefix, shapes)
            if group is not None:
                groups.append(group)
    return groups


def _chain_from(producer, pname, rest, prefix, shapes) -> UnitGroup | None:
    n = producer.weight.shape[0]
    units = list(range(n))
    params = {f"{pname}.weight": (0, units)}
    if producer.bias is not None:
        params[f"{pname}.bias"] = (0, units)
    per_unit = 1
    for cname, child in rest:
        full = prefix + cname
        if isinstance(child, BATCHNORMS):
            if child.num_features != n:
                return None
            keys = ("weight", "bias") if child.affine else ()
            keys += ("running_mean", "running_var") if child.track_running_stats and not child.affine else ()
            params.update({f"{full}.{k}": (0, units) for k in keys})
        elif isinstance(child, (*ELEMENTWISE, *CHANNEL_POOLS)):
            if isinstance(child, nn.PReLU) and child.num_parameters != 1:
                return None
        elif isinstance(child, nn.Flatten):
            shape = shapes.get(full)
            if shape is None or child.start_dim not in (1, -len(shape) + 1) or child.end_dim != -1:
                return None
            per_unit = math.prod(shape[2:])
        elif _produces_units(child) or isinstance(child, CONVS):
            fan_in = child.weight.shape[1] * (getattr(child, "groups", 1) or 1)
            if getattr(child, "groups", 1) != 1 or fan_in != n * per_unit:
                return None
            cols = list(range(n * per_unit))
            params[f"{full}.weight"] = (1, cols)
            return as_unit_group({"params": params, "size": n, "label": f"{pname} units"}, "sequential")
        else:
            return None
    return None


def _detected_groups(model, example_inputs, strict: bool) -> list[UnitGroup] | None:
    """Permutation groups from the detect layer (run on a baked copy, so names are the plain ones), or
    None when it is not installed or (``strict=False``) cannot read the model."""
    try:
        from ..detect import find_symmetries
    except ImportError:
        return None
    if any(getattr(m, "parametrizations", None) for m in model.modules()):
        from .export import bake  # local: export builds on this module

        model = copy.deepcopy(model)
        bake(model)
    try:
        smap = find_symmetries(model, example_inputs)
    except Exception as exc:  # the detector is loud on what it cannot read; fall back unless asked not to
        if strict:
            raise
        warnings.warn(
            f"find_symmetries could not read the model ({type(exc).__name__}: {exc}); using the "
            "nn.Sequential fallback for unit groups",
            UserWarning,
            stacklevel=3,
        )
        return None
    return [as_unit_group(g, "find_symmetries") for g in smap.groups if g.kind == "permutation"]


def unit_groups(model: nn.Module, example_inputs=None, groups=None, source: str = "auto") -> list[UnitGroup]:
    """The coupled unit groups of ``model`` (plain parameter names).

    ``source``: "auto" (``groups=`` if given, else ``find_symmetries`` if importable, else the Sequential
    fallback), "detect" (require find_symmetries) or "sequential" (the fallback only).
    """
    if groups is not None:
        return [as_unit_group(g) for g in groups]
    if source not in ("auto", "detect", "sequential"):
        raise ValueError(f"source must be 'auto', 'detect' or 'sequential', got {source!r}")
    if source in ("auto", "detect"):
        if example_inputs is None:
            raise ValueError(
                "unit groups from find_symmetries need example_inputs (or pass source='sequential')"
            )
        detected = _detected_groups(model, example_inputs, strict=source == "detect")
        if detected is not None:
            return detected
        if source == "detect":
            raise ImportError("mirrorsym.detect is not available; use source='sequential' or groups=")
    return sequential_unit_groups(model, example_inputs)
