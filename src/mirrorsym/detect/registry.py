"""The rule registry: one small rule per module type, function or Tensor method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_MODULE_RULES: dict[type[nn.Module], Callable] = {}
_FUNCTION_RULES: dict[object, Callable] = {}
_METHOD_RULES: dict[str, Callable] = {}
_USER: set = set()  # functions and method names registered after the built-in rules (by users)
_BUILTINS_LOADED = False


def register_rule(target: object, rule: Callable | None = None, *, method: bool = False) -> Callable:
    """Describe how ``target`` couples the axes of its inputs, outputs and parameters.

    ``target`` is an ``nn.Module`` subclass (instances become leaves of the trace: read as a whole by
    ``rule`` on both the torch.export and the torch.fx path), a function (e.g. ``torch.tanh``), an ATen
    overload or packet (e.g. ``torch.ops.aten.cumsum.default``: what the torch.export path sees) or, with
    ``method=True``, a Tensor method name (e.g. ``"tanh"``). On the torch.export path a rule for a torch
    function, ``torch.nn.functional`` function or Tensor method also reads the ATen op of the same name
    (``torch.cumsum`` -> ``aten.cumsum``), whose arguments it then receives. ``rule(ctx)``
    receives a :class:`mirrorsym.detect.RuleContext` and states the coupling with its methods
    (``same``, ``elementwise``, ``source``, ``sink``, ``passive``, ``contract``, ``bn_exit``, ``stop``,
    ``pin``). Use as a decorator or call directly. A rule registered later for the same target wins.

    Example: a layer that scales each feature by its own learnable factor, ``y = x * s``. Its factor
    moves with the features under permutation, a sign flip or rescale passes through it unchanged,
    and it does not commute with rotations::

        class FeatureScale(nn.Module):
            def __init__(self, n):
                super().__init__()
                self.s = nn.Parameter(torch.ones(n))

            def forward(self, x):
                return x * self.s

        @ms.detect.register_rule(FeatureScale)
        def _feature_scale(ctx):
            x, y = ctx.inputs[0], ctx.output
            for d in range(x.ndim - 1):
                ctx.same(x, d, y, d)
                ctx.stop(y, d)
            ctx.elementwise(x, -1, y, -1)        # linear, every scaling passes
            ctx.passive(ctx.param("s"), 0, y, -1)  # moves with the units; blocks rotations
    """
    if rule is None:
        return lambda fn: register_rule(target, fn, method=method)
    if isinstance(target, type) and issubclass(target, nn.Module):
        _MODULE_RULES[target] = rule
    elif method or isinstance(target, str):
        _METHOD_RULES[str(target)] = rule
        if _BUILTINS_LOADED:
            _USER.add(("method", str(target)))
    else:
        _FUNCTION_RULES[target] = rule
        if _BUILTINS_LOADED:
            _USER.add(("function", target))
    return rule


def builtins_loaded() -> None:
    """Called once the built-in rules are registered: later registrations are the user's."""
    global _BUILTINS_LOADED
    _BUILTINS_LOADED = True


def lookup_user_by_name(op: object) -> Callable | None:
    """For an ATen overload (torch.export path): a rule the user registered for the torch function,
    ``torch.nn.functional`` function or Tensor method of the same name, else None."""
    packet = getattr(op, "overloadpacket", op)
    name = getattr(packet, "__name__", None)
    if not isinstance(name, str):
        return None
    for fn in (getattr(torch, name, None), getattr(torch.nn.functional, name, None)):
        try:
            if fn is not None and ("function", fn) in _USER:
                return _FUNCTION_RULES.get(fn)
        except TypeError:  # unhashable
            continue
    if ("method", name) in _USER:
        return _METHOD_RULES.get(name)
    return None


def lookup_module(cls: type[nn.Module]) -> Callable | None:
    """The rule for a module class: its own, else that of the nearest registered base class whose
    ``forward`` it does not override (a subclass with its own forward is traced through instead)."""
    for base in cls.__mro__:
        if base is nn.Module:
            return None
        if base in _MODULE_RULES and issubclass(base, nn.Module):  # (every key is a Module class)
            return _MODULE_RULES[base] if cls.forward is base.forward else None
    return None


def lookup_function(target: object, method: bool = False) -> Callable | None:
    if method:
        return _METHOD_RULES.get(str(target))
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None
