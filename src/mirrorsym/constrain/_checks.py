"""Input checks shared by the constrain layer: clear errors that name the culprit and the fix."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize


def describe(module: nn.Module) -> str:
    """A short name for error messages: the module's class (and ``extra_repr`` when short)."""
    extra = module.extra_repr()
    return f"{type(module).__name__}({extra})" if len(extra) < 60 else type(module).__name__


def parametrization_chain(module: nn.Module, name: str) -> parametrize.ParametrizationList:
    """``module.parametrizations[name]``, checked (``nn.Module`` attributes are typed ``Tensor | Module``)."""
    chains = getattr(module, "parametrizations", None)
    chain = chains[name] if isinstance(chains, nn.ModuleDict) and name in chains else None
    if not isinstance(chain, parametrize.ParametrizationList):
        raise KeyError(f"{describe(module)}.{name} carries no parametrization")
    return chain


def tensor_of(module: nn.Module, name: str, *, allow_parametrized: bool = False) -> torch.Tensor:
    """The parameter ``module.<name>``, refusing names that are missing or not parameters."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"the tensor name must be a str, got {name!r}")
    if parametrize.is_parametrized(module, name):
        if not allow_parametrized:
            raise ValueError(
                f"{describe(module)}.{name} already has a parametrization "
                f"({[type(p).__name__ for p in parametrization_chain(module, name)]}); remove it first with "
                f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})"
            )
        return getattr(module, name)
    own = dict(module.named_parameters(recurse=False))
    if name not in own:
        known = sorted(own) + sorted(getattr(module, "parametrizations", {}) or {})
        raise KeyError(
            f"{describe(module)} has no parameter {name!r}; its own parameters are {known}. "
            "Pass the submodule that owns the tensor (e.g. model.fc1, 'weight')"
        )
    return own[name]


def nonnegative(value: float, what: str) -> float:
    """Refuse negative or non-finite strengths."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return value


def positive(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
    return value


def warn_if_in_optimizer(optimizer: torch.optim.Optimizer | None, tensor: torch.Tensor, where: str) -> None:
    """Warn when ``tensor`` is already handed to ``optimizer``.

    Registering a parametrization replaces the parameter by new ones (the factors); an optimizer built
    before that keeps updating the old tensor, which no longer affects the model. The check needs the
    optimizer: pass ``optimizer=`` to the registering function (documented mechanism; we do not scan
    live objects).
    """
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if id(tensor) in held:
        warnings.warn(
            f"{where} is already in the optimizer {type(optimizer).__name__}: after this registration the "
            "optimizer keeps updating the old tensor, which no longer affects the model, and it does not see "
            "the new factor parameters. Register constraints before building the optimizer (or rebuild it "
            "from model.parameters()).",
            UserWarning,
            stacklevel=3,
        )
