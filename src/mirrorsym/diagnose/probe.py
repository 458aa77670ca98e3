"""Activation-based metrics on probe data: forward hooks, streamed statistics, no training.

Data forms accepted by :func:`iter_batches`:

* a Tensor: model inputs (no labels), cut into batches of ``batch_size`` rows;
* a tuple ``(x, y)`` of two Tensors with the same first dimension: inputs and labels (a *list* is
  read as a sequence of batches);
* any iterable (e.g. a ``DataLoader``) yielding ``x``, ``(x, y, ...)`` or a dict with ``"x"``/``"input"``
  and optionally ``"y"``/``"label"``; ``x`` may itself be a tuple of model arguments.

Unit axis of a probed layer's output: channels (dim 1) for convolutions and any output with ≥ 4 dims,
where each sample's positions are reduced (active = non-zero at any position, ReDO uses the mean |h|
over positions, the representation is the spatial mean); otherwise the last dim, every leading index
(sample, token) being one probe row.

Mode: the probe pass runs under ``torch.no_grad()`` and, with ``mode="eval"`` (the default), in eval
mode; every submodule's own ``training`` flag is restored afterwards, so the model is left exactly as
it was. ``mode="current"`` runs the model as it is (BatchNorm in training mode would then update its
running statistics: that is why eval is the default).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.finite import check_finite

ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
    nn.Softsign,
    nn.LogSigmoid,
)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Representations wider than this skip the effective rank (a D×D Gram matrix is accumulated).
MAX_GRAM_DIM = 4096


def _as_args(x: object) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def batch_rows(x: object) -> int:
    first = _as_args(x)[0]
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1


def iter_batches(data: object, batch_size: int = 256) -> Iterator[tuple[tuple, torch.Tensor | None]]:
    """Yield ``(model_args, labels_or_None)`` from any accepted data form (module docstring); a batch
    with NaN/Inf inputs raises :class:`~mirrorsym.core.finite.NonFiniteError` naming it."""
    for i, (args, y) in enumerate(_batches(data, batch_size)):
        check_finite([(f"batch {i} input {j}", a) for j, a in enumerate(args)], "probe data")
        yield args, y


def _batches(data: object, batch_size: int) -> Iterator[tuple[tuple, torch.Tensor | None]]:
    labels: torch.Tensor | None
    if isinstance(data, torch.Tensor):
        x, labels = data, None
    elif (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].dim() > 0
        and data[1].dim() > 0
        and data[0].shape[0] == data[1].shape[0]
    ):
        x, labels = data
    else:
        yield from _iter_loader(data)
        return
    n = x.shape[0]
    for s in range(0, n, batch_size):
        yield (x[s : s + batch_size],), (labels[s : s + batch_size] if labels is not None else None)


def _iter_loader(data: object) -> Iterator[tuple[tuple, torch.Tensor | None]]:
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a Tensor, a tuple (x, y) of Tensors or an iterable of batches "
            f"(e.g. a DataLoader), got {type(data).__name__}"
        )
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield (batch,), None
        elif isinstance(batch, Mapping):
            x = next((batch[k] for k in ("x", "input", "inputs", "image", "images") if k in batch), None)
            if x is None:
                raise ValueError(
                    f"a data batch is a dict without an input key ('x', 'input', 'image'): keys {list(batch)}"
                )
            y = next((batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None)
            yield _as_args(x), y
        elif isinstance(batch, (tuple, list)) and batch:
            yield _as_args(batch[0]), (batch[1] if len(batch) > 1 else None)
        else:
            raise TypeError(f"cannot read a data batch of type {type(batch).__name__}; yield x or (x, y)")


def resolve_modules(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Module]:
    """The probed modules: ``names`` checked against the model, or by default every activation module.
    A model without activation modules (activations applied functionally, ``torch.relu`` in ``forward``)
    has no module whose output is a hidden layer: then the Linear / Conv leaves are probed except the
    last (the logits), with a warning naming them, since their outputs are *pre*-activations."""
    modules = dict(model.named_modules())
    if names is not None:
        return {n: get_module(model, n, modules) for n in names}
    acts: dict[str, nn.Module] = {n: m for n, m in modules.items() if isinstance(m, ACTIVATIONS)}
    if acts:
        return acts
    layers = {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, *CONVS))}
    hidden = dict(list(layers.items())[:-1])
    if hidden:
        warnings.warn(
            f"diagnose: {type(model).__name__} has no activation modules (functional activations?), so the "
            f"probe reads the pre-activations of {list(hidden)[:6]}: a dead ReLU shows there as a negative, "
            "not a zero, output. Use activation modules (nn.ReLU, ...) or pass layers= naming them.",
            UserWarning,
            stacklevel=4,
        )
    return hidden


def get_module(model: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None) -> nn.Module:
    """``model``'s submodule ``name``; a clear error with close matches if there is none."""
    modules = dict(model.named_modules()) if modules is None else modules
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
        raise ValueError(
            f"the model has no layer named {name!r}"
            + (f"; did you mean {close}?" if close else f"; layers: {[n for n in modules if n][:12]}")
        )
    return modules[name]


@contextmanager
def probe_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run in eval mode (``"eval"``) or as is (``"current"``); restore every module's flag after."""
    if mode not in ("eval", "current"):
        raise ValueError(f"mode must be 'eval' or 'current', got {mode!r}")
    flags = {m: m.training for m in model.modules()}
    try:
        if mode == "eval":
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@dataclass
class LayerStats:
    """Streamed statistics of one probed layer's output (per unit)."""

    channel_first: bool
    rows: int = 0
    active: torch.Tensor | None = None  # (units,) number of probe rows where the unit is active
    abs_sum: torch.Tensor | None = None  # (units,) Σ mean|h| per row, for ReDO
    gram: torch.Tensor | None = None  # (units, units) Σ zzᵀ of the representation rows, float64
    shape: tuple = field(default_factory=tuple)

    def update(self, out: torch.Tensor, rel_floor: float) -> None:
        """Add one batch. A unit counts as active on a row when |h| exceeds ``rel_floor`` × the largest
        |h| of the whole layer in this batch: the same floor at the layer's scale that the weight-based
        dead count uses, so a unit left with tiny positive activations (a decayed ReLU unit with a 1e-14
        bias) is dead by both counts."""
        out = out.detach()
        if self.channel_first and out.dim() >= 3:
            flat = out.flatten(2)  # (N, C, positions)
            floor = rel_floor * flat.abs().amax()
            active = (flat.abs() > floor).any(2)
            mean_abs = flat.abs().mean(2)
            rep = flat.mean(2)
        else:
            rep = out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(-1, 1)
            floor = rel_floor * rep.abs().amax()
            active, mean_abs = rep.abs() > floor, rep.abs()
        self.shape = tuple(out.shape[1:])
        add = {"active": active.sum(0, dtype=torch.float64), "abs_sum": mean_abs.double().sum(0)}
        for k, v in add.items():
            setattr(self, k, v if getattr(self, k) is None else getattr(self, k) + v)
        if rep.shape[1] <= MAX_GRAM_DIM:
            r = rep.double()
            self.gram = r.T @ r if self.gram is None else self.gram + r.T @ r
        self.rows += rep.shape[0]


def channel_first(module: nn.Module, example_out: torch.Tensor | None = None) -> bool:
    return isinstance(module, CONVS) or (example_out is not None and example_out.dim() >= 4)


def run_model(model: nn.Module, args: tuple, example_inputs: object) -> object:
    """``model(*args)``; a shape error becomes a clear one naming the batch and example shapes."""
    try:
        return model(*args)
    except (RuntimeError, ValueError, TypeError) as exc:
        got = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        ex = [
            tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            for a in _as_args(example_inputs)
        ]
        raise ValueError(
            f"the model cannot run on a probe batch with input shapes {got} (example_inputs: {ex}): {exc}. "
            "Give data whose inputs are shaped like example_inputs (same feature dims, any batch size)."
        ) from exc


def to_device(args: tuple, device: torch.device, dtype: torch.dtype | None) -> tuple:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.to(device)
            if dtype is not None and a.dtype.is_floating_point:
                a = a.to(dtype)
        out.append(a)
    return tuple(out)
