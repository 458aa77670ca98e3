"""Mirrors: reflections R = I − 2OOᵀ acting on a few named parameter slices.

Convention (docs/theory.md#conventions): θ is the concatenation of the coordinates a mirror touches, O has
orthonormal columns over those coordinates, R = I − 2OOᵀ negates range(O) and fixes ker(Oᵀ). With an
offset point θ′ the reflection is θ ↦ θ′ + R(θ − θ′) and the symmetric surface is S = {Oᵀ(θ − θ′) = 0}.
Coordinates a mirror does not touch are left alone, and O is never formed as a d×d matrix.

A mirror is a sequence of *blocks* over disjoint coordinates; each block is one of

* ``sign``:  O = I on its coordinates (negate them; surface: they are zero, e.g. a dead unit);
* ``swap``:  O = (e_a − e_b)/√2 for each pair of coordinates (exchange two slices; surface: equal);
* ``basis``: a dense orthonormal O (n, k) over its coordinates.

Composing mirrors over disjoint coordinates concatenates their blocks (O = blockdiag(O₁, O₂)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .finite import check_finite
from .slices import Params, Slice, check_disjoint, check_shapes, gather, parse_spec, scatter, spec_of

ORTHONORMAL_TOL = 1e-5


@dataclass(frozen=True)
class _Block:
    kind: str  # "sign" | "swap" | "basis"
    slices: tuple[Slice, ...]
    basis: torch.Tensor | None = None  # (n, k) for "basis"
    offset: torch.Tensor | None = None  # (n,) coordinates of θ′ on this block, or None for the origin

    def _basis(self) -> torch.Tensor:
        """O of a ``basis`` block (only ``basis`` blocks carry one)."""
        if self.basis is None:
            raise ValueError(f"a {self.kind!r} mirror block has no basis O; only 'basis' blocks carry one")
        return self.basis

    def coeffs(self, x: torch.Tensor) -> torch.Tensor:
        """Oᵀx for x of shape (*batch, n)."""
        if self.kind == "sign":
            return x
        if self.kind == "swap":
            a, b = x.chunk(2, dim=-1)
            return (a - b) / math.sqrt(2.0)
        O = self._basis().to(device=x.device, dtype=x.dtype)
        return x @ O

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Os for s of shape (*batch, k)."""
        if self.kind == "sign":
            return s
        if self.kind == "swap":
            h = s / math.sqrt(2.0)
            return torch.cat([h, -h], dim=-1)
        O = self._basis().to(device=s.device, dtype=s.dtype)
        return s @ O.T

    @property
    def rank(self) -> int:
        """k: the number of reflected directions (unknown for sign/swap until shapes are seen)."""
        return self._basis().shape[1] if self.kind == "basis" else -1

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "basis" and x.shape[-1] != self._basis().shape[0]:
            names = [s.name for s in self.slices]
            raise ValueError(
                f"the basis O has {self._basis().shape[0]} rows but the slices of {names} hold {x.shape[-1]} "
                "coordinates; O needs one row per coordinate, in spec order"
            )
        return x if self.offset is None else x - self.offset.to(device=x.device, dtype=x.dtype)

    def map(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        """x − factor·OOᵀ(x − x′): factor 2 reflects, 1 projects. Sign and swap reflections are exact
        (negation, exchange) so that they commute bit-for-bit with the model's own symmetry."""
        c = self.centered(x)
        if factor == 2.0 and self.kind in ("sign", "swap"):
            rc = -c if self.kind == "sign" else torch.cat(c.chunk(2, dim=-1)[::-1], dim=-1)
            return rc if self.offset is None else rc + (x - c)
        return x - factor * self.expand(self.coeffs(c))


@dataclass(frozen=True)
class Mirror:
    """A reflection symmetry candidate over named parameter slices (see the module docstring).

    Build with :meth:`sign_flip`, :meth:`swap` or :meth:`from_basis`; combine disjoint mirrors with
    :meth:`compose` (or ``m1 & m2``); move the fixed point with :meth:`through`.

    Every method takes ``params: dict[str, Tensor]`` keyed like ``named_parameters()`` and an optional
    ``batch_dims``: that many leading dimensions of every tensor are a batch (e.g. vmapped copies) and
    the slice specs index the dimensions after them.
    """

    blocks: tuple[_Block, ...] = field(default=())

    # ------------------------------------------------------------------ constructors
    @classmethod
    def sign_flip(cls, spec: Mapping[str, object], *, like: Params | None = None) -> Mirror:
        """Negate every coordinate of ``spec``: O = I there; the surface is "these coordinates are 0".

        ``like``: parameters (or shapes) by name; when given, dims and index ranges are checked now
        rather than at first use."""
        slices = parse_spec(spec)
        check_disjoint(slices)
        if like is not None:
            check_shapes(slices, like)
        return cls((_Block("sign", slices),))

    @classmethod
    def swap(cls, spec_a: Mapping[str, object], spec_b: Mapping[str, object], *,
             like: Params | None = None) -> Mirror:
        """Exchange the slices of ``spec_a`` with those of ``spec_b`` (same names, same slice shapes).

        O has one column (e_a − e_b)/√2 per exchanged coordinate pair; the surface is "a equals b".
        ``like`` as in :meth:`sign_flip`.
        """
        a, b = parse_spec(spec_a), parse_spec(spec_b)
        if [s.name for s in a] != [s.name for s in b]:
            raise ValueError(
                f"swap needs the same tensors on both sides in the same order, got "
                f"{[s.name for s in a]} and {[s.name for s in b]}"
            )
        for sa, sb in zip(a, b, strict=True):
            if sa.dim != sb.dim or len(sa.indices) != len(sb.indices):
                raise ValueError(
                    f"swap of {sa.name!r}: the two slices differ in shape (dim {sa.dim}, {len(sa.indices)} "
                    f"indices vs dim {sb.dim}, {len(sb.indices)} indices); swapped slices must match"
                )
        check_disjoint(a + b)
        if like is not None:
            check_shapes(a + b, like)
        return cls((_Block("swap", a + b),))

    @classmethod
    def from_basis(cls, O: torch.Tensor, spec: Mapping[str, object], tol: float = ORTHONORMAL_TOL, *,
                   like: Params | None = None) -> Mirror:
        """General mirror: ``O`` of shape (n, k), 1 ≤ k ≤ n, finite, with orthonormal columns over the n
        coordinates of ``spec`` (in spec order, each slice flattened row-major). ``like``: parameters (or
        shapes) by name; when given, n is checked against the spec now, else at first use."""
        slices = parse_spec(spec)
        check_disjoint(slices)
        O = torch.as_tensor(O)
        if O.dim() == 1:
            O = O[:, None]
        if O.dim() != 2 or not O.dtype.is_floating_point:
            raise ValueError(f"O must be a floating (n, k) matrix, got dtype {O.dtype}, shape {tuple(O.shape)}")
        if O.shape[1] == 0 or O.shape[0] < O.shape[1]:
            raise ValueError(f"O must have 1 <= k <= n columns, got shape {tuple(O.shape)}: a mirror reflects "
                             "at least one direction and at most as many as there are coordinates")
        check_finite({"O": O}, "basis")
        if like is not None:
            n = check_shapes(slices, like)
            if n != O.shape[0]:
                raise ValueError(f"O has {O.shape[0]} rows but the spec names {n} coordinates; O needs one row "
                                 "per coordinate, in spec order")
        gram = O.T.double() @ O.double()
        err = (gram - torch.eye(O.shape[1], dtype=torch.float64)).abs().max().item()
        if err > tol:
            raise ValueError(
                f"O's columns are not orthonormal (max |OᵀO − I| = {err:.2e} > {tol:g}); "
                "orthonormalise first, e.g. O = torch.linalg.qr(O).Q"
            )
        return cls((_Block("basis", slices, basis=O.detach().clone()),))

    def compose(self, *others: Mirror) -> Mirror:
        """The product of mirrors over disjoint coordinates: one reflection with O = blockdiag(...)."""
        blocks = self.blocks + tuple(b for m in others for b in m.blocks)
        check_disjoint([s for b in blocks for s in b.slices])
        return Mirror(blocks)

    __and__ = compose

    def through(self, point: Params, batch_dims: int = 0) -> Mirror:
        """The same mirror through the point θ′ (``point``): θ ↦ θ′ + R(θ − θ′), S = {Oᵀ(θ − θ′) = 0}."""
        return Mirror(
            tuple(
                _Block(b.kind, b.slices, b.basis, gather(point, b.slices, batch_dims).detach().clone())
                for b in self.blocks
            )
        )

    # ------------------------------------------------------------------ info
    @property
    def slices(self) -> tuple[Slice, ...]:
        return tuple(s for b in self.blocks for s in b.slices)

    @property
    def spec(self) -> dict[str, tuple[int, list[int]]]:
        """The slice spec of every coordinate this mirror touches."""
        return spec_of(self.slices)

    def dim(self, params: Params) -> int:
        """k: the number of reflected directions (columns of O)."""
        return int(self.coefficients(params).shape[-1])

    def __repr__(self) -> str:
        parts = []
        for b in self.blocks:
            names = ", ".join(f"{s.name}[{s.dim}:{list(s.indices)[:4]}{'…' if len(s.indices) > 4 else ''}]"
                              for s in b.slices)
            parts.append(f"{b.kind}({names})")
        return f"Mirror({' & '.join(parts)})"

    # ------------------------------------------------------------------ actions
    def coefficients(self, params: Params, batch_dims: int = 0, tangent: bool = False) -> torch.Tensor:
        """s = Oᵀ(θ − θ′), shape (*batch, k). ``tangent=True`` treats ``params`` as a direction v and
        returns Oᵀv (no offset)."""
        parts = []
        for b in self.blocks:
            x = gather(params, b.slices, batch_dims)
            c = b.centered(x)
            parts.append(b.coeffs(x if tangent else c))
        return torch.cat(parts, dim=-1)

    def _map(self, params: Params, factor: float, batch_dims: int) -> dict[str, torch.Tensor]:
        out = dict(params)
        for b in self.blocks:
            out = scatter(out, b.slices, b.map(gather(out, b.slices, batch_dims), factor), batch_dims)
        return out

    def reflect(self, params: Params, batch_dims: int = 0) -> dict[str, torch.Tensor]:
        """Rθ (through θ′ if set): a new dict; untouched tensors are shared, the input is not mutated."""
        return self._map(params, 2.0, batch_dims)

    def project(self, params: Params, batch_dims: int = 0) -> dict[str, torch.Tensor]:
        """The orthogonal projection of θ onto the surface S: θ − O Oᵀ(θ − θ′)."""
        return self._map(params, 1.0, batch_dims)

    def distance(self, params: Params, batch_dims: int = 0) -> torch.Tensor:
        """‖Oᵀ(θ − θ′)‖: the Euclidean distance from θ to S (0-dim, or shape ``batch`` if batched)."""
        return torch.linalg.vector_norm(self.coefficients(params, batch_dims), dim=-1)

    def direction(self, coeffs: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        """The tangent vector Os as a params-shaped dict (zeros off the mirror); ``coeffs`` has shape (k,)."""
        out = {n: torch.zeros_like(t) for n, t in params.items()}
        offset = 0
        for b in self.blocks:
            k = b.coeffs(gather(params, b.slices)).shape[-1]
            out = scatter(out, b.slices, b.expand(coeffs[offset : offset + k].to(out[b.slices[0].name].dtype)))
            offset += k
        if offset != coeffs.shape[-1]:
            raise ValueError(f"coeffs has {coeffs.shape[-1]} entries but the mirror has {offset} directions")
        return out

    def project_tangent(self, v: Params) -> dict[str, torch.Tensor]:
        """P v = O Oᵀ v for a direction v (no offset)."""
        return self.direction(self.coefficients(v, tangent=True), v)


def check_invariance(fn: Callable[[dict[str, torch.Tensor]], object], params: Params, mirror: Mirror) -> float:
    """Max relative change of ``fn``'s output(s) under the reflection: how far ``mirror`` is from a
    symmetry of ``fn``.

    ``fn(params)`` returns a Tensor, or a tuple/list/dict of Tensors. For each output y the change is
    max|y(Rθ) − y(θ)| / max(max|y(θ)|, tiny); the result is the largest over the outputs. Run it in
    float64 to see round-off (~1e-15) for a true symmetry. Non-finite parameters or outputs raise
    :class:`~mirrorsym.core.finite.NonFiniteError` (a NaN must never read as "invariant"); an output
    that turns non-finite only after the reflection counts as an infinite change.
    """
    check_finite({n: t for n, t in params.items() if n in {s.name for s in mirror.slices}}, "parameter")
    with torch.no_grad():
        before = fn(dict(params))
        after = fn(mirror.reflect(params))
    return output_change(before, after)


def output_change(before: object, after: object) -> float:
    """max over outputs of max|after − before| / max(max|before|, tiny): the relative change that every
    invariance check in mirrorsym reports. Integer outputs count 0 if equal, else ∞. Non-finite
    ``before`` raises :class:`~mirrorsym.core.finite.NonFiniteError`; non-finite ``after`` is ∞."""
    return OutputReference(before).change(after)


class OutputReference:
    """Clean outputs checked once (finite, else :class:`~mirrorsym.core.finite.NonFiniteError`) with their
    scales, so that many perturbed outputs are compared against them cheaply: ``change(after)`` is
    :func:`output_change` ``(before, after)``."""

    def __init__(self, before: object) -> None:
        self.ys = _flatten_outputs(before)
        check_finite([(f"output {i} (shape {tuple(y.shape)})", y) for i, y in enumerate(self.ys)], "model")
        self.scales = [
            max(float(y.abs().max()), torch.finfo(y.dtype).tiny) if y.is_floating_point() and y.numel() else 0.0
            for y in self.ys
        ]

    def change(self, after: object) -> float:
        ys = _flatten_outputs(after)
        if len(ys) != len(self.ys):
            raise ValueError(f"the function returned {len(self.ys)} outputs before and {len(ys)} after the change")
        worst = 0.0
        for y0, y1, scale in zip(self.ys, ys, self.scales, strict=True):
            if y0.shape != y1.shape:
                raise ValueError(f"an output changed shape: {tuple(y0.shape)} vs {tuple(y1.shape)}")
            if y0.numel() == 0:
                continue
            if not y0.is_floating_point():
                worst = max(worst, 0.0 if torch.equal(y0, y1) else math.inf)
                continue
            d = float((y1 - y0).abs().max())  # NaN or Inf in after gives NaN or Inf here
            if not math.isfinite(d):
                return math.inf
            worst = max(worst, d / scale)
        return worst


def _flatten_outputs(y: object) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y.detach()]
    if isinstance(y, Mapping):
        return [t for k in sorted(y) for t in _flatten_outputs(y[k])]
    if isinstance(y, Sequence) and not isinstance(y, str):
        return [t for item in y for t in _flatten_outputs(item)]
    if isinstance(y, (int, float)):
        return [torch.tensor(float(y), dtype=torch.float64)]
    raise TypeError(f"fn must return Tensors (or tuples/dicts of them), got {type(y).__name__}")
