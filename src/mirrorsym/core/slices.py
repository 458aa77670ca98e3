"""Slice specs: the named pieces of parameter tensors that a mirror touches.

A slice spec is a non-empty dict ``{name: entry}``. The accepted entries, and nothing else:

* ``(dim, indices)``: a 2-tuple whose first item is an int ``dim ≥ 0``: the positions ``indices`` along
  ``dim``. ``{"fc1.weight": (1, 3)}`` is column 3 of ``fc1.weight``; ``(1, [3, 5])`` columns 3 and 5.
* ``indices`` alone (a list, a ``range``, a 1-D integer tensor or array, or a single int): ``dim = 0``.

``indices`` are non-negative Python/NumPy/torch integers (floats and bools are refused, never
truncated), at least one, none repeated. A bare tuple of ints other than ``(dim, indices)`` is refused
as ambiguous: write indices as a list. The coordinates a spec names are, in order: for each name in the
dict's order, the sub-tensor ``t.index_select(dim, indices)`` flattened in row-major order. Batched
tensors carry ``batch_dims`` leading dimensions that every spec skips. Ranges (``dim`` exists, indices
below its size) are checked against real shapes by :func:`check_shapes` (at construction when a mirror
is given ``like=``) and at every use.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard

import torch

Params = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Slice:
    """Entries ``indices`` of tensor ``name`` along ``dim`` (every other dimension whole)."""

    name: str
    dim: int
    indices: tuple[int, ...]

    def index(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.indices, dtype=torch.long, device=device)

    def numel(self, shape: Sequence[int]) -> int:
        rest = 1
        for d, n in enumerate(shape):
            if d != self.dim:
                rest *= n
        return rest * len(self.indices)

    def check(self, shape: Sequence[int]) -> None:
        if self.dim < 0 or self.dim >= len(shape):
            raise ValueError(
                f"slice of {self.name!r}: dim {self.dim} does not exist for a tensor of shape "
                f"{tuple(shape)}; use a dim in [0, {len(shape) - 1}]"
            )
        bad = [i for i in self.indices if i < 0 or i >= shape[self.dim]]
        if bad:
            raise IndexError(
                f"slice of {self.name!r}: indices {bad[:5]} out of range for dim {self.dim} "
                f"of size {shape[self.dim]}"
            )


def _is_int(x: object) -> TypeGuard[numbers.Integral | torch.Tensor]:
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.dtype.is_floating_point and x.dtype != torch.bool
    return isinstance(x, numbers.Integral)


def _as_indices(name: str, idx: object) -> tuple[int, ...]:
    if _is_int(idx):
        return (int(idx),)
    if isinstance(idx, torch.Tensor) or hasattr(idx, "__array__"):
        t = torch.as_tensor(idx)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 1:
            raise TypeError(f"slice of {name!r}: indices must be a 1-D integer tensor/array, got {t.dtype} "
                            f"of shape {tuple(t.shape)}")
        return tuple(int(i) for i in t.tolist())
    if isinstance(idx, (str, bytes, Mapping)) or not isinstance(idx, Iterable):
        raise TypeError(f"slice of {name!r}: indices must be ints (a list, range or integer tensor), got {idx!r}")
    items = list(idx)
    bad = [i for i in items if not _is_int(i)]
    if bad:
        raise TypeError(f"slice of {name!r}: indices must be integers, got {bad[:3]!r} (floats are not "
                        "truncated: convert them explicitly)")
    return tuple(int(i) for i in items)


def _entry(name: str, entry: object) -> tuple[int, object]:
    """``(dim, indices)`` of one spec entry (see the module docstring for the accepted forms)."""
    if isinstance(entry, tuple):
        if len(entry) != 2 or not _is_int(entry[0]):
            raise ValueError(
                f"slice of {name!r}: a tuple must be (dim, indices) with an int dim, got {entry!r}; "
                "write bare indices as a list, e.g. [1, 3]"
            )
        return int(entry[0]), entry[1]
    return 0, entry


def parse_spec(spec: Mapping[str, object]) -> tuple[Slice, ...]:
    """Turn a slice spec (module docstring) into validated :class:`Slice` objects."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"a slice spec is a non-empty dict {{name: (dim, indices)}}, got {spec!r}")
    out = []
    for name, entry in spec.items():
        if not isinstance(name, str):
            raise TypeError(f"slice spec keys are parameter names (str), got {name!r}")
        dim, idx = _entry(name, entry)
        if dim < 0:
            raise ValueError(f"slice of {name!r}: dim must be >= 0, got {dim}")
        indices = _as_indices(name, idx)
        if not indices:
            raise ValueError(f"slice of {name!r} selects no indices")
        if min(indices) < 0:
            raise ValueError(f"slice of {name!r}: indices must be >= 0, got {[i for i in indices if i < 0][:5]}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"slice of {name!r} repeats an index: {list(indices)}")
        out.append(Slice(name, dim, indices))
    return tuple(out)


def check_shapes(slices: Sequence[Slice], like: Mapping[str, torch.Tensor | Sequence[int]]) -> int:
    """Check every slice against the shapes in ``like`` (tensors or shapes by name); returns the number
    of coordinates the slices name."""
    total = 0
    for s in slices:
        if s.name not in like:
            names = list(like)
            more = "..." if len(names) > 8 else ""
            raise KeyError(f"the spec names {s.name!r}, which is not among {names[:8]}{more}")
        t = like[s.name]
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
        s.check(shape)
        total += s.numel(shape)
    return total


def check_disjoint(slices: Sequence[Slice]) -> None:
    """Refuse two slices that share a coordinate.

    Slices of one tensor along different dims always intersect (row i meets column j), so a tensor may
    appear along one dim only, with no index twice.
    """
    seen: dict[str, tuple[int, set[int]]] = {}
    for s in slices:
        if s.name in seen:
            dim, used = seen[s.name]
            if dim != s.dim:
                raise ValueError(
                    f"slices of {s.name!r} along dims {dim} and {s.dim} overlap (a row and a column "
                    "always share an entry); a mirror may move a tensor along one dim only"
                )
            common = used.intersection(s.indices)
            if common:
                raise ValueError(f"slices of {s.name!r} overlap at indices {sorted(common)[:5]} (dim {dim})")
            used.update(s.indices)
        else:
            seen[s.name] = (s.dim, set(s.indices))


def _lookup(params: Params, s: Slice) -> torch.Tensor:
    try:
        return params[s.name]
    except KeyError:
        names = list(params)
        hint = f" (known: {names[:8]}{'...' if len(names) > 8 else ''})"
        raise KeyError(f"the mirror moves {s.name!r}, which is not in params{hint}") from None


def gather(params: Params, slices: Sequence[Slice], batch_dims: int = 0) -> torch.Tensor:
    """Coordinates named by ``slices`` as one tensor of shape ``(*batch, n)``."""
    parts = []
    for s in slices:
        t = _lookup(params, s)
        if t.dim() < batch_dims:
            raise ValueError(f"{s.name!r} has {t.dim()} dims, fewer than batch_dims={batch_dims}")
        s.check(t.shape[batch_dims:])
        sub = t.index_select(s.dim + batch_dims, s.index(t.device))
        parts.append(sub.reshape(*t.shape[:batch_dims], -1))
    return torch.cat(parts, dim=-1)


def scatter(
    params: Params, slices: Sequence[Slice], values: torch.Tensor, batch_dims: int = 0
) -> dict[str, torch.Tensor]:
    """A new params dict equal to ``params`` except that the ``slices`` hold ``values`` (``(*batch, n)``).

    Untouched tensors are shared with the input, touched ones are copied: the input is never mutated.
    """
    out = dict(params)
    offset = 0
    for s in slices:
        t = out[s.name]
        shape = list(t.shape)
        shape[s.dim + batch_dims] = len(s.indices)
        n = s.numel(t.shape[batch_dims:])
        piece = values[..., offset : offset + n].reshape(shape).to(t.dtype)
        out[s.name] = t.index_copy(s.dim + batch_dims, s.index(t.device), piece)
        offset += n
    return out


def spec_of(slices: Sequence[Slice]) -> dict[str, tuple[int, list[int]]]:
    """The slice-spec dict of ``slices`` (inverse of :func:`parse_spec`)."""
    out: dict[str, tuple[int, list[int]]] = {}
    for s in slices:  # a composed mirror may hold several disjoint slices of one tensor
        out.setdefault(s.name, (s.dim, []))[1].extend(s.indices)
    return out
