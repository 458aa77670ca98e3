"""Export: bake the DCS parametrizations and return a physically smaller plain ``nn.Module``.

Steps, on a deep copy (the input model is not touched):

1. remember which Linear weights carry a :class:`LowRank` parametrization, then bake every
   parametrization into a plain tensor (``remove_parametrizations(leave_parametrized=True)``);
2. for every permutation group (:func:`mirrorsym.constrain.units.unit_groups`), drop the units whose
   slices are *all* zero (max |entry| ≤ ``tol``) from every coupled tensor (and BatchNorm running stats),
   keeping at least one unit per group; module attributes (``in_features``, ``out_channels``,
   ``num_features``, ...) follow;
3. split each low-rank Linear into ``Linear(in, r, bias=False) → Linear(r, out)`` when r(in + out) < in·out,
   r = #{σ_i > tol · max(1, σ_1)};
4. check that the outputs on ``example_inputs`` match the constrained model within ``rtol`` (relative to the
   largest output entry), both run as eval-mode copies (dropout off; the returned model keeps the input's
   train/eval mode); a mismatch raises.

What it refuses (kept dense, with a warning and an entry in the report): groups that touch a module other
than Linear / Conv (groups = 1) / BatchNorm (e.g. LayerNorm normalises across the dropped channels, so
dropping one changes the function); low-rank splits of Linear subclasses used functionally (e.g. the
``out_proj`` of ``nn.MultiheadAttention``) and of non-Linear tensors (conv kernels, ``in_proj_weight``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..detect import Permutation, SymmetryMap
from ..detect.find import private_class
from ..detect.smap import ExampleInputs
from .parametrizations import LowRank
from .units import BATCHNORMS, CONVS, merged_members, unit_groups


@dataclass
class ExportReport:
    """What :func:`export` did. ``params_before`` counts the baked (dense) model."""

    params_before: int
    params_after: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)  # group label → dropped units
    split: dict[str, int] = field(default_factory=dict)  # Linear path → rank
    refused: list[str] = field(default_factory=list)
    max_rel_error: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"params {self.params_before} → {self.params_after} "
            f"({self.params_after / max(self.params_before, 1):.1%}); max rel. output error "
            f"{self.max_rel_error:.1e}"
        ]
        lines += [f"  dropped {len(u)} units of {k}" for k, u in self.dropped.items() if u]
        lines += [f"  split {k} at rank {r}" for k, r in self.split.items()]
        lines += [f"  refused: {r}" for r in self.refused]
        return "\n".join(lines)


class ExportResult(NamedTuple):
    """What :func:`export` returns: the smaller plain ``model`` and the :class:`ExportReport`
    (``small, report = ms.constrain.export(...)``)."""

    model: nn.Module
    report: ExportReport


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(model: nn.Module, example_inputs: ExampleInputs) -> object:
    with torch.no_grad():
        return model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)


def bake(model: nn.Module) -> dict[str, int]:
    """Remove every parametrization in place, keeping the current values; returns {Linear path: rank
    of its LowRank factors} for the Linear weights that had one (candidates for a split)."""
    low_rank_linears = {}
    for path, module in list(model.named_modules()):
        plist = getattr(module, "parametrizations", None)
        if not plist:
            continue
        private_class(module)
        for name in list(plist):
            if (
                name == "weight"
                and parametrize.type_before_parametrizations(module) is nn.Linear
                and any(isinstance(p, LowRank) for p in plist[name])
            ):
                low_rank_linears[path] = next(p.rank for p in plist[name] if isinstance(p, LowRank))
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return low_rank_linears


def _tensor(model, full_name):
    path, _, name = full_name.rpartition(".")
    module = model.get_submodule(path) if path else model
    return module, name, getattr(module, name)


def _check_group_modules(model, group: Permutation) -> str | None:
    """Why the group cannot be shrunk safely, or None."""
    for name, dim, index, _ in merged_members(group):
        try:
            module, leaf, _ = _tensor(model, name)
        except AttributeError:
            return f"{name!r} is not a tensor of the model"
        if isinstance(module, (nn.Linear, *CONVS)) and leaf in ("weight", "bias"):
            if type(module) not in (nn.Linear, *CONVS) or getattr(module, "groups", 1) != 1:
                return f"{name!r} belongs to {type(module).__name__}, which export does not resize"
            if dim == 0 and index.shape[1] > 1:
                return (
                    f"each unit spans {index.shape[1]} outputs of {name!r} (attention heads?); "
                    "the forward code may hard-code their count"
                )
            continue
        if isinstance(module, BATCHNORMS) and dim == 0:
            continue
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            return (
                f"{name!r} belongs to {type(module).__name__}, which normalises across the channels: "
                "dropping one, even an all-zero one, changes the statistics and the function"
            )
        return f"{name!r} belongs to {type(module).__name__}, which export does not know how to resize"
    return None


def _zero_units(model, group: Permutation, tol: float) -> list[int]:
    """Units whose every coupled parameter slice is within ``tol`` of zero (buffers need not be zero)."""
    alive = None
    for name, dim, index, buffer in merged_members(group):
        if buffer:
            continue
        _, _, t = _tensor(model, name)
        sub = t.detach().index_select(dim, index.reshape(-1).to(t.device)).movedim(dim, 0)
        per_unit = sub.reshape(group.size, -1).abs().amax(dim=1) > tol
        alive = per_unit if alive is None else alive | per_unit
    if alive is None:
        return []
    dead = (~alive).nonzero().flatten().tolist()
    return dead[:-1] if len(dead) == group.size else dead  # keep one unit: zero-width layers are not modules


def _shrink(model, group: Permutation, dead: list[int]) -> None:
    members = list(merged_members(group))
    listed = {name for name, *_ in members}
    for name, dim, index, _ in members:
        module, leaf, t = _tensor(model, name)
        drop = set(index[dead].reshape(-1).tolist())
        keep = torch.tensor([i for i in range(t.shape[dim]) if i not in drop], device=t.device)
        _replace(module, leaf, t.detach().index_select(dim, keep))
        if isinstance(module, BATCHNORMS) and leaf == "weight" and module.running_mean is not None:
            prefix = name[: -len("weight")]
            if prefix + "running_mean" not in listed and module.running_var is not None:  # set with running_mean
                module.running_mean = module.running_mean.index_select(0, keep)
                module.running_var = module.running_var.index_select(0, keep)
        _sync_attributes(module)


def _replace(module, name, value):
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value.clone(), requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value.clone()


def _sync_attributes(module):
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, CONVS):
        module.out_channels, module.in_channels = (
            module.weight.shape[0],
            module.weight.shape[1] * module.groups,
        )
    elif isinstance(module, BATCHNORMS):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]


def _split_linear(model, path: str, tol: float) -> tuple[int, nn.Module] | None:
    """Replace the Linear at ``path`` by two smaller ones if that saves parameters; returns the rank and
    the replacement (for ``path == ""``, the model itself is the Linear: the caller swaps the root)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    lin = model.get_submodule(path)
    W = lin.weight.detach()
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = max(1, int((S > tol * max(1.0, S[0].item())).sum().item()))
    m, n = W.shape
    if r * (m + n) >= m * n:
        return None
    root = S[:r].sqrt()
    first = nn.Linear(n, r, bias=False, device=W.device, dtype=W.dtype)
    second = nn.Linear(r, m, bias=lin.bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * Vh[:r]).to(W.dtype))
        second.weight.copy_((U[:, :r] * root).to(W.dtype))
        if lin.bias is not None:
            second.bias.copy_(lin.bias)
    split = nn.Sequential(first, second)
    if path:
        setattr(parent, attr, split)
    return r, split


def _max_rel_error(y0, y1) -> float:
    if isinstance(y0, torch.Tensor):
        scale = y0.detach().abs().max().clamp_min(torch.finfo(y0.dtype).tiny)
        return ((y1 - y0).abs().max() / scale).item()
    if isinstance(y0, dict):
        return max((_max_rel_error(y0[k], y1[k]) for k in y0), default=0.0)
    return max((_max_rel_error(a, b) for a, b in zip(y0, y1, strict=True)), default=0.0)


def export(
    model: nn.Module,
    example_inputs: ExampleInputs,
    tol: float = 1e-8,
    *,
    groups: SymmetryMap | Iterable[Permutation] | None = None,
    rtol: float = 1e-5,
    split_low_rank: bool = True,
) -> ExportResult:
    """A plain, physically smaller copy of the constrained ``model`` with the same function.

    ``groups``: the coupled unit groups (:func:`unit_groups`: the permutation groups ``find_symmetries``
    finds by default; names are the plain, unparametrized ones). ``tol``: an entry (singular value,
    relative to max(1, σ₁)) at or below it counts as zero. Raises if the outputs on ``example_inputs``
    differ by more than ``rtol``. Returns :class:`ExportResult` ``(model, report)``; the report lists
    params before/after, dropped units, splits and refusals.
    """
    if tol < 0 or rtol <= 0:
        raise ValueError(f"tol must be >= 0 and rtol > 0, got tol={tol}, rtol={rtol}")
    reference = _run(copy.deepcopy(model).eval(), example_inputs)  # eval: dropout off
    small = copy.deepcopy(model)
    low_rank_linears = bake(small)
    report = ExportReport(params_before=count_params(small))
    for group in unit_groups(small, example_inputs, groups=groups):
        label = group.label
        reason = _check_group_modules(small, group)
        if reason is not None:
            report.refused.append(f"unit group {label}: {reason}")
            warnings.warn(f"export: unit group {label} kept whole: {reason}", UserWarning, stacklevel=2)
            continue
        dead = _zero_units(small, group, tol)
        report.dropped[label] = dead
        if dead:
            _shrink(small, group, dead)
    if split_low_rank:
        for path, _ in low_rank_linears.items():
            done = _split_linear(small, path, tol)
            if done is not None:
                report.split[path] = done[0]
                if not path:  # the model itself was the low-rank Linear
                    small = done[1]
    _refuse_functional_low_rank(model, report)
    report.params_after = count_params(small)
    try:
        shrunk_output = _run(copy.deepcopy(small).eval(), example_inputs)
    except (RuntimeError, AttributeError) as exc:
        raise RuntimeError(
            f"the exported model no longer runs ({type(exc).__name__}: {exc}); a shrunk or split module is "
            "used in a way export cannot see (e.g. its .weight read functionally by its parent). Pass "
            f"groups= without that module, or split_low_rank=False.\n{report}"
        ) from exc
    report.max_rel_error = _max_rel_error(reference, shrunk_output)
    if not report.max_rel_error <= rtol:
        raise RuntimeError(
            f"export changed the function: max relative output error {report.max_rel_error:.2e} > "
            f"rtol={rtol}. Raise tol only if the near-zero units are meant to be dropped.\n{report}"
        )
    return ExportResult(small, report)


def _refuse_functional_low_rank(model, report):
    for path, module in model.named_modules():
        for name, chain in (getattr(module, "parametrizations", None) or {}).items():
            if any(isinstance(p, LowRank) for p in chain) and not (
                name == "weight" and parametrize.type_before_parametrizations(module) is nn.Linear
            ):
                report.refused.append(
                    f"low-rank split of {path}.{name} ({type(module).__name__}): kept dense, "
                    "only plain nn.Linear weights are split"
                )
