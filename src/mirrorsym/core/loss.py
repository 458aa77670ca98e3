"""The one loss convention of mirrorsym (docs/theory.md#conventions).

A loss is ``loss_fn(params, batch) -> 0-dim Tensor``:

* ``params``: ``dict[str, Tensor]``, the parameters by their ``named_parameters`` names (the point θ);
* ``batch``: whatever the function reads its data from, usually a tuple ``(x, *targets)`` of tensors indexed
  along dim 0. A loss that closes over its data may ignore it (``batch=None``);
* the value is L(θ) **without** weight decay: the theory adds γ‖θ‖² itself. Where minibatches matter
  (:mod:`mirrorsym.theory.noise`) it must be the **mean** of per-sample losses over the batch.

Every function that takes a loss (``ms.theory.critical_weight_decay``, ``lyapunov_exponent``, ...) takes
it in this form, with ``batch`` as a separate argument. Metrics of :class:`mirrorsym.sweep.Sweep` have the
same signature, ``metric(params, batch) -> scalar``. From a module and a criterion,
:func:`loss_from_model` builds the function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Batch = Any
"""What a loss reads its data from: usually ``(x, *targets)``, tensors indexed along dim 0; None for a
loss that closes over its data."""

LossFn = Callable[[dict[str, torch.Tensor], Batch], torch.Tensor]
"""``loss_fn(params, batch) -> 0-dim Tensor``: L without decay (see the module docstring)."""


def loss_from_model(model: nn.Module, criterion: Callable[..., torch.Tensor]) -> LossFn:
    """``loss_fn(params, (x, *targets)) = criterion(model(x), *targets)`` evaluated with ``params`` in place
    of the model's parameters (``torch.func.functional_call``; the model's buffers are used as they are,
    the model itself is not modified). Parameters missing from ``params`` keep the model's values, so a
    dict of only some tensors (e.g. one layer) is a valid point.

    >>> loss = loss_from_model(model, torch.nn.functional.cross_entropy)
    >>> ms.theory.critical_weight_decay(loss, dict(model.named_parameters()), mirror, (x, labels))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"loss_from_model: model must be an nn.Module, got {type(model).__name__}")
    if not callable(criterion):
        raise TypeError(f"loss_from_model: criterion must be callable (e.g. F.mse_loss), got {criterion!r}")

    def loss_fn(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or not batch:
            raise TypeError("a loss from loss_from_model takes batch = (x, *targets), a non-empty tuple; "
                            f"got {type(batch).__name__}")
        x, *targets = batch
        return criterion(functional_call(model, dict(params), (x,), strict=False), *targets)

    return loss_fn


def bind(loss_fn: LossFn, batch: Batch) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """θ ↦ ``loss_fn(θ, batch)``: the loss on a fixed batch, as the curvature code uses it. A function that
    cannot take two arguments is refused with the convention spelled out."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}")
    try:
        inspect.signature(loss_fn).bind(None, None)
    except TypeError:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TypeError(f"loss_fn {name} must take (params, batch): mirrorsym's one loss convention is "
                        "loss_fn(params, batch) -> 0-dim Tensor. A loss that closes over its data takes and "
                        "ignores batch (lambda params, batch: ...); from a module and a criterion use "
                        "ms.core.loss_from_model(model, criterion)") from None
    except ValueError:  # no signature (some builtins): let the call decide
        pass
    return lambda params: loss_fn(params, batch)
