"""Slice specs: the named pieces of parameter tensors that a mirror touches.

A slice spec is ``{name: (dim, indices)}``; a bare index list means ``dim = 0``. ``indices`` may be a
list of ints, a ``range``, a 1-D integer tensor or a single int. The coordinates a spec names are, in
order: for each name in the dict's order, the sub-tensor ``t.index_select(dim, indices)`` flattened in
row-major order. Batched tensors carry ``batch_dims`` leading dimensions that every spec skips.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def _as_indices(name: str, idx) -> tuple[int, ...]:
    if isinstance(idx, int):
        return (idx,)
    if isinstance(idx, torch.Tensor):
        if idx.dtype.is_floating_point or idx.dim() > 1:
            raise TypeError(f"slice of {name!r}: indices must be a 1-D integer tensor, got {idx.dtype} "
                            f"of shape {tuple(idx.shape)}")
        return tuple(int(i) for i in idx.reshape(-1).tolist())
    try:
        out = tuple(int(i) for i in idx)
    except TypeError as exc:
        raise TypeError(f"slice of {name!r}: indices must be ints, got {idx!r}") from exc
    return out


def parse_spec(spec: Mapping[str, object]) -> tuple[Slice, ...]:
    """Turn ``{name: (dim, indices)}`` or ``{name: indices}`` into checked :class:`Slice` objects."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"a slice spec is a non-empty dict {{name: (dim, indices)}}, got {spec!r}")
    out = []
    for name, entry in spec.items():
        if not isinstance(name, str):
            raise TypeError(f"slice spec keys are parameter names (str), got {name!r}")
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], int) and not isinstance(
            entry[1], int
        ):
            dim, idx = entry
        else:
            dim, idx = 0, entry
        indices = _as_indices(name, idx)
        if not indices:
            raise ValueError(f"slice of {name!r} selects no indices")
        if len(set(indices)) != len(indices):
            raise ValueError(f"slice of {name!r} repeats an index: {list(indices)}")
        out.append(Slice(name, int(dim), indices))
    return tuple(out)


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


def scatter(params: Params, slices: Sequence[Slice], values: torch.Tensor, batch_dims: int = 0) -> dict:
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
