"""Model-wide DCS: one gate per coupled unit (structured sparsity), or a DCS on every weight.

``apply(model, example_inputs, kind="units")`` puts one scalar gate s_j on every hidden unit j of every
permutation unit group (see :mod:`mirrorsym.constrain.units`) and multiplies *all* of the unit's coupled
slices by it: incoming row, bias, BatchNorm entries, the next layer's columns. With coupled weight decay λ
on the gates and the tensors, the penalty on unit j is λ‖θ_j‖₂ over the union of its slices (group lasso),
so a unit dies with all its slices at once, exactly, and :func:`mirrorsym.constrain.export` can drop it. A
tensor in two groups (the middle weight of a 3-layer MLP: columns of one group, rows of the next) gets both
gates: an overlapping group penalty. State-dict keys: ``<path>.parametrizations.<name>.original`` for the
tensor and ``<path>.parametrizations.<name>.<i>.gate`` for the (shared) gate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.finite import check_materialized
from ..detect import Permutation, SymmetryMap
from ..detect.smap import ExampleInputs
from ._checks import parametrization_chain, warn_if_in_optimizer
from .parametrizations import low_rank, sparse
from .units import BATCHNORMS, CONVS, merged_members, unit_groups


class UnitGate(nn.Module):
    """θ = w · s[unit(i)] along ``dim`` (entries of no unit keep factor 1). ``gate`` may be shared by the
    parametrizations of several tensors (one group). Gates start at 1, so registration is the identity."""

    unit_of_entry: torch.Tensor  # a buffer

    def __init__(self, gate: nn.Parameter, dim: int, ndim: int, unit_of_entry: torch.Tensor) -> None:
        super().__init__()
        self.gate, self.dim, self.ndim = gate, dim, ndim
        self.register_buffer("unit_of_entry", unit_of_entry)
        n, per_unit = gate.numel(), max(1, unit_of_entry.numel() // gate.numel())
        contiguous = torch.arange(n, device=unit_of_entry.device).repeat_interleave(per_unit)
        # fast path (one op): every entry belongs to a unit, in unit order, ``per_unit`` entries each
        self.per_unit = per_unit if torch.equal(unit_of_entry, contiguous) else 0
        self.shape = [1] * ndim
        self.shape[dim] = -1

    def factor(self) -> torch.Tensor:
        if self.per_unit == 1:
            return self.gate.view(self.shape)
        if self.per_unit:
            return self.gate.repeat_interleave(self.per_unit).view(self.shape)
        ext = torch.cat([self.gate, self.gate.new_ones(1)])
        return ext[self.unit_of_entry].view(self.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.factor()

    def right_inverse(self, theta: torch.Tensor) -> torch.Tensor:
        return theta / self.factor()


def _resolve(model: nn.Module, full_name: str) -> tuple[nn.Module, str]:
    path, _, name = full_name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        raise KeyError(f"unit group names {full_name!r}, but the model has no submodule {path!r}") from None
    return module, name


def gate_group(model: nn.Module, group: Permutation, optimizer: torch.optim.Optimizer | None = None) -> nn.Parameter:
    """Register a shared :class:`UnitGate` on every parameter entry of ``group``; returns the gate."""
    members = [m for m in merged_members(group) if not m[3]]  # buffers (running stats): export slices them
    first_module, first_name = _resolve(model, members[0][0])
    ref = getattr(first_module, first_name)
    gate = nn.Parameter(torch.ones(group.size, dtype=ref.dtype, device=ref.device))
    for name, dim, index, _ in members:
        module, leaf = _resolve(model, name)
        tensor = getattr(module, leaf, None)
        if not isinstance(tensor, torch.Tensor):
            raise KeyError(f"unit group names {name!r}, which is not a tensor of the model")
        if not parametrize.is_parametrized(module, leaf):
            warn_if_in_optimizer(optimizer, tensor, name)
        device = tensor.device
        unit_of_entry = torch.full((tensor.shape[dim],), group.size, dtype=torch.long, device=device)
        unit_of_entry[index.reshape(-1).to(device)] = torch.arange(group.size, device=device).repeat_interleave(
            index.shape[1]
        )
        with torch.no_grad():
            parametrize.register_parametrization(module, leaf, UnitGate(gate, dim, tensor.dim(), unit_of_entry))
    return gate


def _refuse_gated(model: nn.Module, groups: list[Permutation]) -> None:
    gated = []
    for group in groups:
        for name, *_ in merged_members(group):
            module, leaf = _resolve(model, name)
            if parametrize.is_parametrized(module, leaf) and any(
                isinstance(p, UnitGate) for p in parametrization_chain(module, leaf)
            ):
                gated.append(name)
    if gated:
        raise ValueError(
            f"{', '.join(sorted(set(gated))[:3])} already carry unit gates: apply(kind='units') was called on "
            "this model before, and a second call would stack a second gate on every unit. Call it once per "
            "model, or bake the gates in first with ms.constrain.export(model)"
        )


def apply(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    kind: str = "units",
    *,
    groups: SymmetryMap | Iterable[Permutation] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[Permutation] | list[str]:
    """Constrain the whole model (in place; the function is unchanged at registration).

    ``kind``:
      * ``"units"``: a shared gate per unit of every permutation group (module docstring); returns the
        :class:`~mirrorsym.detect.Permutation` groups used (``groups=`` as in :func:`unit_groups`).
      * ``"sparse"``: elementwise DCS on the weight of every Linear / Conv; returns the module paths.
      * ``"low_rank"``: low-rank DCS on the weight of every Linear; returns the module paths.

    Use coupled weight decay on the result (see :func:`weight_decay_for`, :func:`param_groups`). A model
    whose unit tensors already carry a :class:`UnitGate` is refused (a second call would stack a second
    gate), and so is a model with nothing of the requested kind to constrain.
    """
    check_materialized(model)
    if kind == "units":
        found = unit_groups(model, example_inputs, groups=groups)
        if not found:
            raise ValueError(
                "apply(kind='units') found no permutation group in the model (ms.find_symmetries reports "
                "none: no hidden units between two layers); pass groups= explicitly"
            )
        _refuse_gated(model, found)
        for group in found:
            gate_group(model, group, optimizer)
        return found
    if kind in ("sparse", "low_rank"):
        targets = (nn.Linear, *CONVS) if kind == "sparse" else (nn.Linear,)
        done = []
        for path, module in model.named_modules():
            if isinstance(module, targets) and not isinstance(module, BATCHNORMS):
                (sparse if kind == "sparse" else low_rank)(module, "weight", optimizer=optimizer)
                done.append(path)
        if not done:
            names = ", ".join(t.__name__ for t in targets)
            raise ValueError(f"apply(kind={kind!r}) found no {names} module in {type(model).__name__}; constrain "
                             "individual tensors with ms.constrain.sparse(module, 'weight') instead")
        return done
    raise ValueError(f"kind must be 'units', 'sparse' or 'low_rank', got {kind!r}")
