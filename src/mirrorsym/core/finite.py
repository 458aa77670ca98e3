"""Non-finite values are failures, never passes.

``max(worst, nan)`` keeps ``worst`` and ``nan < tol`` is False, so a NaN that reaches a comparison can
make a broken model look symmetric (or a broken metric look small). Every check that compares numbers
first asks :func:`check_finite` and raises :class:`NonFiniteError` naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class NonFiniteError(ValueError):
    """A tensor that a check needs holds NaN or ±Inf entries; the message names it."""


def describe_nonfinite(t: torch.Tensor) -> str | None:
    """``"3 NaN and 1 Inf of 64 entries"`` or None when every entry is finite (integer tensors are)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    t = t.detach()
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    if n_nan == 0 and n_inf == 0:
        return None
    parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
    return f"{' and '.join(parts)} of {t.numel()} entries"


def check_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise :class:`NonFiniteError` naming every non-finite tensor (``what`` says whose, e.g.
    ``"parameter"``, ``"input"``, ``"model output"``)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = []
    for name, t in items:
        if isinstance(t, torch.Tensor):
            d = describe_nonfinite(t)
            if d is not None:
                bad.append(f"{name} ({d})")
    if bad:
        raise NonFiniteError(
            f"{what} {_some(bad)} is not finite; a check on non-finite values would pass "
            "by accident, so it is refused. Fix the model or data (e.g. reload the weights, lower the "
            "learning rate) and run it again."
        )


def _some(names: list[str]) -> str:
    """The first three names, and how many more."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more}"


def check_materialized(model: torch.nn.Module) -> None:
    """Refuse parameters or buffers on the ``meta`` device (shapes without values) by name."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{_some(meta)} of {type(model).__name__} are on the meta device (shapes without "
            "values, e.g. a model built under torch.device('meta')); materialise them first, e.g. "
            "model.to_empty(device='cpu') and then load or initialise the weights"
        )


def check_module_finite(model: torch.nn.Module) -> None:
    """Every parameter and buffer of ``model`` is real (not meta) and finite (else an error naming them)."""
    check_materialized(model)
    check_finite(model.named_parameters(), "parameter")
    check_finite(model.named_buffers(), "buffer")
