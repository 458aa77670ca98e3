"""Typed symmetry groups: how they act on a model, their mirrors and their symmetric surfaces.

One class per kind, all subclasses of :class:`SymmetryGroup` (``kind`` names the class):

* ``"permutation"``: the ``size`` units of a layer-level family (hidden units, channels, heads, the
  units of a residual stream) permuted together. Element: a permutation ``perm`` (unit u takes the
  weights of unit ``perm[u]``). Mirrors: the swaps of neighbouring units (i, i+1). Surface of the swap
  (i, j): units i and j identical. Distance: min over pairs ‖θ_i − θ_j‖/√2.
* ``"sign_flip"``: odd activations (tanh, sin, identity-like): d ∈ {±1}ⁿ; a unit's incoming weights
  and bias are multiplied by d_u, its outgoing weights by 1/d_u. Mirrors: one sign flip per unit
  (O = I on the unit); surface: the dead unit θ_u = 0. Distance: min over units ‖θ_u‖.
* ``"rescale"``: positively homogeneous activations (ReLU, LeakyReLU, max pooling): d ∈ (0, ∞)ⁿ. A
  continuous group with no reflection, so ``mirrors()`` is empty; its zero state θ_u = 0 is still
  absorbing (σ(0) = 0), but Theorem 1's threshold does not apply. Distance: min over units ‖θ_u‖.
* ``"scale"``: linear paths where only per-unit scaling passes (e.g. a norm's affine output read by a
  Linear): d ∈ (ℝ∖0)ⁿ, containing both the sign flips (its mirrors) and the rescalings.
* ``"bn_scale"``: the weights that feed a BatchNorm: per channel, scaling them by s > 0 is absorbed by
  the normalisation (the running statistics are adjusted so that eval mode is exact: mean·s,
  var → s²(var + eps) − eps; in train mode it is exact up to eps) and a sign flip is absorbed by
  negating the BatchNorm weight γ: the (W, b, γ) → (−W, −b, −γ) mirror. Distance: min over channels
  of ‖(W_c, b_c, γ_c)‖.
* ``"rotation"``: two linear maps with only linear operations between them (Linear → Linear, LoRA
  factors B·A, attention W_Q W_Kᵀ per head and W_V → W_O per head): Q ∈ O(n) acts on the shared
  axis (rows of the writer, columns of the reader, both sides of a q·k contraction). ``mirrors()``
  samples reflections I − 2vvᵀ. Distance: σ_min of the n × F matrix whose row u stacks every
  coordinate of unit u: the distance to the nearest surface "Mᵀv = 0 for some unit v", i.e. to the
  nearest rank-deficient configuration.

``params`` is a core slice spec ``{name: (dim, [indices])}`` over ``named_parameters()`` names;
``buffers`` the same over buffers (BatchNorm running statistics) that move with the units.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core import Mirror
from ..core.slices import parse_spec

ROTATION_MIRROR_LIMIT = 20_000_000  # entries of the dense O per sampled rotation mirror


@dataclass
class Member:
    """One tensor moved by a group: positions ``index[u]`` along ``dim`` belong to unit u.

    ``role``: "source" (writes the units: scaled by d), "sink" (reads them: scaled by 1/d), "gamma"
    (a BatchNorm weight: takes the sign of d), "running_mean" / "running_var" (adjusted as described
    in the module docstring), "passive" (only permuted).
    """

    name: str
    dim: int
    index: torch.Tensor  # (n, m) long
    role: str
    buffer: bool = False
    eps: float = 0.0


@dataclass(repr=False)
class SymmetryGroup:
    """A verified, typed group acting on named parameter slices: the base of one class per kind
    (:class:`Permutation`, :class:`SignFlip`, :class:`Rescale`, :class:`Scale`, :class:`BNScale`,
    :class:`Rotation`; see the module docstring). Build one with :func:`make_group`.

    Every class owns ``random_element`` (never the identity), ``apply_`` (in place, function-preserving),
    ``mirrors`` (its reflections as core Mirrors), ``distance`` (to its nearest symmetric surface) and
    ``unit_matrix`` (one row of coordinates per unit). Names are ``named_parameters()`` names of the plain
    model; on a model under ``torch.nn.utils.parametrize`` (e.g. ``ms.constrain``) they name the
    parametrized tensors' current values, read through the parametrization and written back through
    its ``right_inverse``.
    """

    kind: ClassVar[str] = ""
    # roles that carry a unit's coordinates in unit_matrix (passive members only move with the units)
    unit_roles: ClassVar[tuple[str, ...] | None] = None

    size: int
    members: list[Member]
    layers: list[str]
    signs: bool = True  # BNScale: whether the sign flips are part of the group
    # verification: max relative output change (float64, eval mode) after one non-identity element of
    # this group alone
    error: float | None = None
    label: str = ""
    notes: list[str] = field(default_factory=list)
    shapes: dict = field(default_factory=dict, repr=False)  # name -> shape of every moved tensor

    @classmethod
    def from_spec(
        cls,
        spec: dict,
        size: int,
        *,
        roles: dict[str, str] | None = None,
        like: dict[str, torch.Tensor] | None = None,
        label: str = "",
    ) -> SymmetryGroup:
        """A group of this class written by hand as a slice spec ``{name: (dim, indices)}``.

        Each index list holds r pieces of ``size`` units, piece-major: unit u of piece j sits at
        ``indices[j·size + u]`` (e.g. a head's query rows then its key rows of a packed projection).
        ``roles``: per tensor name, "source" (scaled by d), "sink" (by 1/d) or "passive" (default:
        "source" for diagonal kinds, else "passive"). ``like``: the model's parameters, to record shapes
        (needed by ``mirrors()`` and ``num_coordinates``)."""
        default = "source" if issubclass(cls, _Diagonal) else "passive"
        members = []
        for s in parse_spec(spec):
            if len(s.indices) % size:
                raise ValueError(f"{s.name!r} lists {len(s.indices)} indices, not a multiple of size={size}")
            index = torch.tensor(s.indices, dtype=torch.long).reshape(-1, size).T.contiguous()
            members.append(Member(s.name, s.dim, index, (roles or {}).get(s.name, default)))
        layers = list(dict.fromkeys(m.name.rpartition(".")[0] or "<root>" for m in members))
        shapes = {m.name: tuple(like[m.name].shape) for m in members} if like is not None else {}
        return cls(size, members, layers, label=label or f"{cls.kind} [{', '.join(layers[:3])}]", shapes=shapes)

    # ------------------------------------------------------------------ description
    @property
    def params(self) -> dict[str, tuple[int, list[int]]]:
        """The parameter slices this group moves, as a core slice spec. A tensor moved along two dims
        (a Linear from a residual stream back into it) is listed with its first dim; see ``members``."""
        return self._spec(buffers=False)

    @property
    def buffers(self) -> dict[str, tuple[int, list[int]]]:
        """The buffer slices (e.g. BatchNorm running statistics) that move with the units."""
        return self._spec(buffers=True)

    def _spec(self, buffers: bool) -> dict[str, tuple[int, list[int]]]:
        out: dict[str, tuple[int, list[int]]] = {}
        for m in self.members:
            if m.buffer != buffers:
                continue
            dim, idx = out.setdefault(m.name, (m.dim, []))
            if dim == m.dim:
                idx.extend(m.index.reshape(-1).tolist())
        return {k: (d, sorted(set(i))) for k, (d, i) in out.items()}

    @property
    def num_coordinates(self) -> int:
        """How many parameter entries the group moves (spec rows × the rest of each tensor)."""
        return sum(
            int(m.index.numel()) * _rest_size(m, self.shapes[m.name]) for m in self.members if not m.buffer
        )

    def __repr__(self) -> str:
        err = "unverified" if self.error is None else f"err={self.error:.1e}"
        return f"{type(self).__name__}(size={self.size}, layers={self.layers}, {err})"

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "kind": self.kind,
            "size": self.size,
            "layers": self.layers,
            "params": {k: [d, i] for k, (d, i) in self.params.items()},
            "buffers": {k: [d, i] for k, (d, i) in self.buffers.items()},
            "verification_error": self.error,
            "notes": self.notes,
        }

    # ------------------------------------------------------------------ the interface of every kind
    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random element of the group that is never the identity."""
        raise NotImplementedError(f"{type(self).__name__} must define random_element")

    def mirrors(
        self, include_buffers: bool = False, count: int | None = None, generator: torch.Generator | None = None
    ) -> list[Mirror]:
        """The reflections in this group as core Mirrors (each kind says which)."""
        raise NotImplementedError(f"{type(self).__name__} must define mirrors")

    def distance(self, model: nn.Module) -> float:
        """Euclidean distance of the current parameters to the nearest symmetric surface of this group."""
        raise NotImplementedError(f"{type(self).__name__} must define distance")

    def _act_(self, t: torch.Tensor, m: Member, element: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _act_")

    # ------------------------------------------------------------------ shared machinery
    def apply_(self, model: nn.Module, element: torch.Tensor) -> nn.Module:
        """Act on ``model``'s parameters and buffers in place with ``element``; returns ``model``."""
        element = torch.as_tensor(element)
        with torch.no_grad(), _writable(model, self.members) as tensors:
            for m in self.members:
                self._act_(tensors[m.name], m, element)
        return model

    def unit_matrix(self, model: nn.Module) -> torch.Tensor:
        """(size, F) float64: row u stacks every parameter coordinate of unit u (buffers excluded)."""
        rows = []
        for m in self.members:
            if m.buffer or (self.unit_roles is not None and m.role not in self.unit_roles):
                continue
            t = _tensor(model, m.name, False).detach().double()
            sub = t.index_select(m.dim, m.index.reshape(-1).to(t.device)).movedim(m.dim, 0)
            rows.append(sub.reshape(self.size, -1).cpu())
        return torch.cat(rows, dim=1)

    def canonical_units(self, model: nn.Module) -> torch.Tensor:
        """(size, F) float64 unit vectors with this group's own action quotiented out, so that two units
        that differ only by an element of the group compare equal (diagnose counts duplicates on these).
        The base class returns :meth:`unit_matrix`; diagonal kinds pick one representative per orbit."""
        return self.unit_matrix(model)

    def _role_blocks(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources (size, F_s), sinks (size, F_k)) float64: the coordinates scaled by d and by 1/d."""
        parts: dict[str, list[torch.Tensor]] = {"source": [], "sink": []}
        for m in self.members:
            if m.buffer or m.role not in parts:
                continue
            t = _tensor(model, m.name, False).detach().double()
            sub = t.index_select(m.dim, m.index.reshape(-1).to(t.device)).movedim(m.dim, 0)
            parts[m.role].append(sub.reshape(self.size, -1).cpu())
        empty = torch.zeros(self.size, 0, dtype=torch.float64)
        sources, sinks = (torch.cat(v, dim=1) if v else empty for v in parts.values())
        return sources, sinks

    def _checked_members(self, include_buffers: bool, roles: tuple[str, ...] | None = None) -> list[Member]:
        """Members a core Mirror can express (one dim per tensor), else a ValueError that says so."""
        members = [m for m in self.members if include_buffers or not m.buffer]
        if roles is not None:
            members = [m for m in members if m.role in roles]
        names: dict[str, int] = {}
        for m in members:
            if names.setdefault(m.name, m.dim) != m.dim:
                raise ValueError(
                    f"{self.label or self.kind}: {m.name!r} moves along dims {names[m.name]} and {m.dim}; a "
                    "core Mirror moves a tensor along one dim only, so this group has no Mirror form. "
                    "Use g.apply_(model, g.random_element()) instead."
                )
        return members


@dataclass(repr=False)
class Permutation(SymmetryGroup):
    """The units permuted together. Element: ``perm`` (n,) long, unit u takes the weights of unit
    ``perm[u]``. Mirrors: swaps of units (surface: two identical units). Distance: min ‖θ_i − θ_j‖/√2."""

    kind: ClassVar[str] = "permutation"

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random permutation that moves at least two units."""
        return _moving_permutation(self.size, generator)

    def _act_(self, t: torch.Tensor, m: Member, element: torch.Tensor) -> None:
        _permute_(t, m, element)

    def mirrors(
        self, include_buffers: bool = False, count: int | None = None, generator: torch.Generator | None = None
    ) -> list[Mirror]:
        """Swaps (i, i+1) of neighbouring units, or ``count`` random pairs."""
        members = self._checked_members(include_buffers)
        n = self.size
        if count is None:
            pairs = [(i, i + 1) for i in range(n - 1)]
        else:
            pairs = [tuple(torch.randperm(n, generator=generator)[:2].tolist()) for _ in range(count)]
        return [Mirror.swap(_unit_spec(members, i), _unit_spec(members, j)) for i, j in pairs]

    def distance(self, model: nn.Module) -> float:
        units = self.unit_matrix(model)
        d = torch.cdist(units, units)
        d.fill_diagonal_(float("inf"))
        return float(d.min()) / math.sqrt(2.0)


@dataclass(repr=False)
class _Diagonal(SymmetryGroup):
    """Per-unit scalings d (n,) float64: sources × d, sinks × 1/d (see :class:`Member`)."""

    unit_roles: ClassVar[tuple[str, ...] | None] = ("source", "sink", "gamma", "running_mean", "running_var")
    mirror_roles: ClassVar[tuple[str, ...]] = ("source", "sink", "gamma", "running_mean")

    def _draw(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-normal scales, signs with at least one −1), from one generator in a fixed order."""
        n = self.size
        scale = torch.exp(0.5 * torch.randn(n, generator=generator, dtype=torch.float64))
        sign = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
        if bool((sign > 0).all()):
            sign[torch.randint(n, (1,), generator=generator)] = -1.0
        return scale, sign

    def _act_(self, t: torch.Tensor, m: Member, element: torch.Tensor) -> None:
        _scale_(t, m, element)

    def mirrors(
        self, include_buffers: bool = False, count: int | None = None, generator: torch.Generator | None = None
    ) -> list[Mirror]:
        """One sign flip per unit (the ``count`` first units); none for positive-only groups."""
        members = self._checked_members(include_buffers, self.mirror_roles)
        if not self.has_sign_flips:
            return []
        units = range(self.size if count is None else min(count, self.size))
        return [Mirror.sign_flip(_unit_spec(members, u)) for u in units]

    @property
    def has_sign_flips(self) -> bool:
        return True

    @property
    def has_rescale(self) -> bool:
        """Whether the group's elements include positive rescalings d > 0 (all but SignFlip)."""
        return True

    def distance(self, model: nn.Module) -> float:
        """min over units of ‖θ_u‖: the distance to the nearest dead-unit surface."""
        return float(self.unit_matrix(model).norm(dim=1).min())

    def canonical_units(self, model: nn.Module) -> torch.Tensor:
        """For groups with positive rescalings (Rescale, Scale, BNScale): [sources · c_u, sinks / c_u] with
        c_u > 0 balancing ‖sources‖ = ‖sinks‖ (the orbit point of least norm under positive rescaling; a
        unit with an all-zero side is then all zero: it is dead). Then, for groups with sign flips, the
        sign that makes the largest source coordinate positive. A SignFlip group (tanh) has no rescaling:
        (w, b, v) and (2w, 2b, v/2) compute different functions and stay different here."""
        src, snk = self._role_blocks(model)
        a, b = src.norm(dim=1, keepdim=True), snk.norm(dim=1, keepdim=True)
        if self.has_rescale and src.shape[1] and snk.shape[1]:
            alive = (a > 0) & (b > 0)
            c = torch.where(alive, torch.sqrt(b / torch.where(alive, a, 1.0)), 0.0)
            src, snk = src * c, snk * torch.where(alive, 1.0 / torch.where(alive, c, 1.0), 0.0)
        units = torch.cat([src, snk], dim=1)
        if self.has_sign_flips and src.shape[1]:
            lead = src.gather(1, src.abs().argmax(1, keepdim=True))
            units = units * torch.where(lead < 0, -1.0, 1.0)
        return units


@dataclass(repr=False)
class SignFlip(_Diagonal):
    """Odd activations (tanh, sin, identity-like): d ∈ {±1}ⁿ. Mirrors: one sign flip per unit (surface:
    the dead unit θ_u = 0)."""

    kind: ClassVar[str] = "sign_flip"

    @property
    def has_rescale(self) -> bool:
        return False

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Signs with at least one −1."""
        return self._draw(generator)[1]


@dataclass(repr=False)
class Rescale(_Diagonal):
    """Positively homogeneous activations (ReLU family, max pooling): d ∈ (0, ∞)ⁿ. A continuous group
    with no reflection (``mirrors()`` is empty); its zero state is still absorbing, but Theorem 1's
    threshold does not apply."""

    kind: ClassVar[str] = "rescale"

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-normal factors (≠ 1 almost surely)."""
        return self._draw(generator)[0]

    @property
    def has_sign_flips(self) -> bool:
        return False


@dataclass(repr=False)
class Scale(_Diagonal):
    """Linear paths where only per-unit scaling passes: d ∈ (ℝ∖0)ⁿ (sign flips and rescalings)."""

    kind: ClassVar[str] = "scale"

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-normal factors times signs with at least one −1."""
        scale, sign = self._draw(generator)
        return scale * sign


@dataclass(repr=False)
class BNScale(_Diagonal):
    """The weights feeding a BatchNorm: per channel, scaling by s > 0 is absorbed by the normalisation
    and, when ``signs``, a sign flip by negating the BatchNorm weight (the (W, b, γ) → (−W, −b, −γ)
    mirror). Running statistics are adjusted so that eval mode is exact."""

    kind: ClassVar[str] = "bn_scale"

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        scale, sign = self._draw(generator)
        return scale * sign if self.signs else scale

    @property
    def has_sign_flips(self) -> bool:
        return self.signs


@dataclass(repr=False)
class Rotation(SymmetryGroup):
    """Q ∈ O(n) on the axis shared by two linear maps with only linear operations between them (rows of
    the writer, columns of the reader, both sides of a q·k contraction). Element: Q (n, n) float64.
    Mirrors: reflections I − 2vvᵀ. Distance: σ_min of the unit matrix (the distance to the nearest
    rank-deficient configuration)."""

    kind: ClassVar[str] = "rotation"

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A Haar rotation, never the identity."""
        return _non_identity(haar_orthogonal(1, self.size, generator)[0])

    def _act_(self, t: torch.Tensor, m: Member, element: torch.Tensor) -> None:
        _rotate_(t, m, element)

    def mirrors(
        self, include_buffers: bool = False, count: int | None = None, generator: torch.Generator | None = None
    ) -> list[Mirror]:
        """``count`` (default ``size``) sampled reflections I − 2vvᵀ, built densely (raises when O would
        exceed ``ROTATION_MIRROR_LIMIT`` entries)."""
        members = self._checked_members(include_buffers)
        count = count or self.size
        spec = _merged_spec(members, range(self.size))
        coords_per_unit = sum(_rest_size(m, self.shapes[m.name]) * m.index.shape[1] for m in members)
        if self.size * coords_per_unit**2 > ROTATION_MIRROR_LIMIT:
            raise ValueError(
                f"{self.label}: a rotation mirror over {self.size} units × {coords_per_unit} coordinates "
                f"needs a dense O of {self.size * coords_per_unit**2:.2e} entries "
                f"(> {ROTATION_MIRROR_LIMIT:.0e}); use g.apply_ with a reflection element I − 2vvᵀ instead"
            )
        out = []
        for _ in range(count):
            v = torch.randn(self.size, generator=generator, dtype=torch.float64)
            out.append(Mirror.from_basis(_rotation_basis(members, self.shapes, v / v.norm()), spec))
        return out

    def reflection(self, v: torch.Tensor, include_buffers: bool = False) -> Mirror:
        """The core Mirror of the reflection I − 2vvᵀ/‖v‖² on the unit index (its surface: every member's
        component along v is zero, e.g. W_Aᵀv = 0 and W_B v = 0)."""
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        if v.shape[0] != self.size:
            raise ValueError(f"v has {v.shape[0]} entries; this group acts on {self.size} units")
        members = [m for m in self.members if include_buffers or not m.buffer]
        return Mirror.from_basis(
            _rotation_basis(members, self.shapes, v / v.norm()), _merged_spec(members, range(self.size))
        )

    def distance(self, model: nn.Module) -> float:
        M = self.unit_matrix(model)
        if M.shape[1] < M.shape[0]:
            return 0.0
        return float(torch.linalg.svdvals(M)[-1])

    def factors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weight matrices the rotation acts between, (size, F) each: one per parameter member with
        ≥ 2 dims and per column j of its index (a packed ``in_proj_weight`` holds a head's query rows in
        column 0 and its key rows in column 1). Their invariant product M_aᵀ M_b (W_Qᵀ W_K per head,
        W_O W_V, U W) carries the ranks that diagnose reports."""
        out: dict[str, torch.Tensor] = {}
        for m in self.members:
            t = _tensor(model, m.name, m.buffer)
            if m.buffer or t.dim() < 2:
                continue
            for j in range(m.index.shape[1]):
                key, n = m.name, 0
                while key in out:
                    n += 1
                    key = f"{m.name}[{n}]"
                out[key] = t.detach().index_select(m.dim, m.index[:, j].to(t.device)).movedim(m.dim, 0).reshape(
                    self.size, -1
                )
        return out


GROUP_TYPES: dict[str, type[SymmetryGroup]] = {
    cls.kind: cls for cls in (Permutation, SignFlip, Rescale, Scale, BNScale, Rotation)
}
KINDS = tuple(GROUP_TYPES)


def make_group(kind: str, size: int, members: list[Member], layers: list[str], **fields: Any) -> SymmetryGroup:
    """The group of ``kind`` (one of :data:`KINDS`) over ``members``."""
    try:
        cls = GROUP_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown group kind {kind!r}; known: {list(GROUP_TYPES)}") from None
    return cls(size, members, layers, **fields)


# ---------------------------------------------------------------------------- actions


def _tensor(model: nn.Module, name: str, buffer: bool) -> torch.Tensor:
    """The tensor ``name`` of ``model``: a parameter or buffer, or the current value of a parametrized
    tensor (``ms.constrain`` and other ``torch.nn.utils.parametrize`` users) under its plain name."""
    path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
        if parametrize.is_parametrized(module, leaf):
            return getattr(module, leaf)
        return model.get_buffer(name) if buffer else model.get_parameter(name)
    except AttributeError as exc:
        raise KeyError(
            f"the group moves {name!r}, which this model does not have; apply a group only to "
            "the model it was found on (or a copy of it)"
        ) from exc


@contextlib.contextmanager
def _writable(model: nn.Module, members: list[Member]):
    """{name: tensor to modify in place}; parametrized tensors are edited as copies and written back
    through their parametrization's ``right_inverse`` when the block ends."""
    tensors, writeback = {}, []
    for m in members:
        if m.name in tensors:
            continue
        path, _, leaf = m.name.rpartition(".")
        module = model.get_submodule(path) if path else model
        if parametrize.is_parametrized(module, leaf):
            tensors[m.name] = getattr(module, leaf).detach().clone()
            writeback.append((module, leaf, m.name))
        else:
            tensors[m.name] = _tensor(model, m.name, m.buffer)
    yield tensors
    for module, leaf, name in writeback:
        setattr(module, leaf, tensors[name])


def _units_view(t: torch.Tensor, m: Member) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, m, ...) view-or-copy of the member's slices with the unit index first, and the flat index
    (None when the member is the whole dim in unit order, so the tensor can be written in place)."""
    n, k = m.index.shape
    flat = m.index.reshape(-1).to(t.device)
    if k == 1 and n == t.shape[m.dim] and torch.equal(m.index[:, 0], torch.arange(n)):
        return t.movedim(m.dim, 0).unsqueeze(1), None
    sub = t.index_select(m.dim, flat).movedim(m.dim, 0)
    return sub.reshape(n, k, *sub.shape[1:]), flat


def _write(t: torch.Tensor, m: Member, flat: torch.Tensor | None, new: torch.Tensor) -> None:
    """Write (n, m, ...) unit-major values back into the member's slices."""
    new = new.reshape(-1, *new.shape[2:]).movedim(0, m.dim)
    if flat is None:
        t.copy_(new)
    else:
        t.index_copy_(m.dim, flat, new)


def _along(t: torch.Tensor, dim: int, v: torch.Tensor) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[dim] = -1
    return v.reshape(shape)


def _permute_(t: torch.Tensor, m: Member, perm: torch.Tensor) -> None:
    perm = perm.to(t.device)
    idx = m.index.to(t.device)
    moved = t.index_select(m.dim, idx[perm].reshape(-1))
    if _is_whole(t, m, idx.reshape(-1)):
        t.copy_(moved)
    else:
        t.index_copy_(m.dim, idx.reshape(-1), moved)


def _rotate_(t: torch.Tensor, m: Member, q: torch.Tensor) -> None:
    q = q.to(device=t.device, dtype=t.dtype)
    sub, flat = _units_view(t, m)
    _write(t, m, flat, (q @ sub.reshape(sub.shape[0], -1)).reshape(sub.shape))


def haar_orthogonal(count: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` Haar-distributed orthogonal (n, n) float64 matrices (QR of Gaussians, signs fixed)."""
    a = torch.randn(count, n, n, generator=generator, dtype=torch.float64)
    qn, rn = np.linalg.qr(a.numpy())  # numpy's batched LAPACK QR: far faster than torch's on small CPU matrices
    q, r = torch.from_numpy(qn), torch.from_numpy(rn)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _moving_permutation(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random permutation conditioned on not being the identity (n ≥ 2)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        if n < 2 or not torch.equal(perm, torch.arange(n)):
            return perm


def _non_identity(q: torch.Tensor) -> torch.Tensor:
    """``q`` unless it is (numerically) the identity, then the reflection of its first axis."""
    if torch.allclose(q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-6):
        q = q.clone()
        q[:, 0] = -q[:, 0]
    return q


def random_elements(groups: list[SymmetryGroup], generator: torch.Generator | None = None) -> list:
    """One random non-identity element per group, drawing the rotations of each size in one batched QR."""
    out: list = [None] * len(groups)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if isinstance(g, Rotation):
            by_size.setdefault(g.size, []).append(i)
        else:
            out[i] = g.random_element(generator=generator)
    for n, idx in sorted(by_size.items()):
        for i, q in zip(idx, haar_orthogonal(len(idx), n, generator), strict=True):
            out[i] = _non_identity(q)
    return out


def _scale_(t: torch.Tensor, m: Member, d: torch.Tensor) -> None:
    """Per-unit scaling by role (see Member); every position of unit u gets unit u's factor."""
    if m.role == "passive":
        return
    d = d.to(device=t.device, dtype=t.dtype).repeat_interleave(m.index.shape[1])
    flat = m.index.reshape(-1).to(t.device)
    whole = _is_whole(t, m, flat)
    sub = t if whole else t.index_select(m.dim, flat)
    if m.role == "running_var":
        new = _along(t, m.dim, d * d) * (sub + m.eps) - m.eps
    else:
        factor = {"source": d, "sink": 1.0 / d, "gamma": torch.sign(d), "running_mean": d}[m.role]
        if whole:
            t.mul_(_along(t, m.dim, factor))
            return
        new = sub * _along(t, m.dim, factor)
    if whole:
        t.copy_(new)
    else:
        t.index_copy_(m.dim, flat, new)


def _is_whole(t: torch.Tensor, m: Member, flat: torch.Tensor) -> bool:
    """The member covers the whole dim in position order (so it can be updated in place)."""
    n = t.shape[m.dim]
    return flat.numel() == n and torch.equal(flat, torch.arange(n, device=flat.device))


# ---------------------------------------------------------------------------- mirror helpers


def _unit_spec(members: list[Member], u: int) -> dict:
    return _merged_spec(members, [u])


def _merged_spec(members: list[Member], units) -> dict:
    spec: dict[str, tuple[int, list[int]]] = {}
    for m in members:
        entry = spec.setdefault(m.name, (m.dim, []))
        for u in units:
            entry[1].extend(m.index[u].tolist())
    return spec


def _rest_size(m: Member, shape) -> int:
    return math.prod(n for d, n in enumerate(shape) if d != m.dim)


def _rotation_basis(members: list[Member], shapes: dict, v: torch.Tensor) -> torch.Tensor:
    """Dense O (n_coords, F) for the reflection I − 2vvᵀ on the unit index, in the spec's coordinate
    order (per tensor: index_select along dim of all units' indices, flattened row-major)."""
    spec = _merged_spec(members, range(v.shape[0]))
    blocks = []
    offset_cols = 0
    total_cols = 0
    layout = []
    for name, (dim, idx) in spec.items():
        shape = list(shapes[name])
        rest = math.prod(n for d, n in enumerate(shape) if d != dim)
        layout.append((name, dim, idx, shape, rest))
        ms = [m for m in members if m.name == name]
        total_cols += rest * sum(m.index.shape[1] for m in ms)
    for name, dim, idx, shape, _rest in layout:
        ms = [m for m in members if m.name == name]
        pos = {p: k for k, p in enumerate(idx)}
        sub_shape = list(shape)
        sub_shape[dim] = len(idx)
        n_coords = math.prod(sub_shape)
        coord = torch.arange(n_coords).reshape(sub_shape).movedim(dim, 0)  # (len(idx), rest...)
        coord = coord.reshape(len(idx), -1)
        O = torch.zeros(n_coords, total_cols, dtype=torch.float64)
        for m in ms:
            for j in range(m.index.shape[1]):
                rows = coord[[pos[int(p)] for p in m.index[:, j]]]  # (n, rest)
                cols = torch.arange(rows.shape[1]) + offset_cols
                O[rows, cols.expand_as(rows)] = v[:, None].expand_as(rows)
                offset_cols += rows.shape[1]
        blocks.append(O)
    return torch.cat(blocks, dim=0)
