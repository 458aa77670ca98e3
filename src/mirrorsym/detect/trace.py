"""Trace a model with torch.fx, run it on the example inputs, and feed every node to its rule."""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.fx as fx
from torch import nn

from .axes import AxisStore
from .context import Events, RuleContext, TensorAxes
from .registry import lookup_function, lookup_module


class DetectWarning(UserWarning):
    """Something the detector could not read; it was treated conservatively (no symmetry across it)."""


class UntraceableModelError(RuntimeError):
    """torch.fx could not trace the model."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if lookup_module(type(m)) is not None:
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` symbolic trace with every module that has a rule kept as a leaf."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise UntraceableModelError(
            f"find_symmetries could not trace {type(model).__name__} with torch.fx: {type(exc).__name__}: "
            f"{exc}. Usually this is Python control flow that depends on tensor values or shapes. Fix: make "
            "that code static, or move it into a submodule and describe the submodule with "
            "ms.detect.register_rule(YourModule, rule) so that it becomes a leaf, or pass a traceable "
            "wrapper model."
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


class Detector:
    """Reads one model: traces it, runs it on the inputs (on a deep copy) and records axis coupling."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model)
        self.store = AxisStore()
        self.events = Events()
        self._next_vid = 0
        self._param_axes: dict[str, TensorAxes] = {}
        self.values: dict[int, TensorAxes] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self._name_of: dict[int, str] = {}
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if id(t) not in self._name_of:
                self._name_of[id(t)] = name
                self.tensors[name] = t
        self.unknown: dict[str, list[str]] = {}
        self.gm = trace(self.model)

    # ------------------------------------------------------------------ values
    def new_value(self, shape: tuple[int, ...], dtype=None) -> TensorAxes:
        self._next_vid += 1
        t = TensorAxes(tuple(shape), self.store.new_dims(shape), self._next_vid, None, dtype)
        self.values[t.vid] = t
        return t

    def param_axes(self, full_name: str) -> TensorAxes | None:
        """The axes of a parameter or buffer by qualified name (None if that attribute is None)."""
        try:
            obj = self.gm.get_parameter(full_name)
        except AttributeError:
            try:
                obj = self.gm.get_buffer(full_name)
            except AttributeError:
                return None
        return self.axes_of_tensor(obj)

    def axes_of_tensor(self, obj: torch.Tensor) -> TensorAxes | None:
        name = self._name_of.get(id(obj))
        if name is None:
            return None
        if name not in self._param_axes:
            self._next_vid += 1
            self._param_axes[name] = TensorAxes(
                tuple(obj.shape), self.store.new_dims(obj.shape), self._next_vid, name, obj.dtype
            )
        return self._param_axes[name]

    def to_axes(self, real):
        if isinstance(real, torch.Tensor):
            return self.new_value(tuple(real.shape), real.dtype)
        if isinstance(real, (tuple, list)):
            return tuple(self.to_axes(r) for r in real)
        return None

    # ------------------------------------------------------------------ running
    def run(self, inputs: tuple) -> None:
        det = self
        env: dict[fx.Node, object] = {}

        class _Interp(fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                det.visit(n, args, kwargs, result, env)
                return result

        with torch.no_grad():
            _Interp(self.gm).run(*inputs)

    def visit(self, n: fx.Node, args, kwargs, result, env) -> None:
        if n.op == "placeholder":
            env[n] = self.to_axes(result)
            self._pin_all(env[n], "model input")
            return
        if n.op == "get_attr":
            axes = self.axes_of_tensor(result) if isinstance(result, torch.Tensor) else None
            if axes is None and isinstance(result, torch.Tensor):
                axes = self.new_value(tuple(result.shape), result.dtype)
                self._pin_all(axes, f"constant tensor {n.target}")
            env[n] = axes
            return
        if n.op == "output":
            self._pin_all(fx.node.map_arg(n.args, lambda a: env.get(a)), "model output")
            return
        ax_args = fx.node.map_arg(n.args, lambda a: env.get(a))
        ax_kwargs = fx.node.map_arg(n.kwargs, lambda a: env.get(a))
        out = self.to_axes(result)
        env[n] = out
        if n.op == "call_function" and n.target is _getitem and isinstance(ax_args[0], tuple):
            env[n] = ax_args[0][args[1]]  # picking from a tuple of values: no op
            return
        if out is None or not _has_tensor(out):
            return  # size arithmetic and other non-tensor results
        path = self._path_of(n)
        if n.op == "call_module":
            self.apply_module_rule(
                self.gm.get_submodule(n.target), n.target, list(ax_args), ax_kwargs, out, args, kwargs
            )
        else:
            self.apply_function_rule(
                n.target, path, list(ax_args), ax_kwargs, out, args, kwargs, method=n.op == "call_method"
            )

    def _path_of(self, n: fx.Node) -> str:
        stack = n.meta.get("nn_module_stack")
        if stack:
            return list(stack.values())[-1][0]
        return ""

    # ------------------------------------------------------------------ rules
    def apply_module_rule(self, module, path, args, kwargs, out, real_args=(), real_kwargs=None) -> None:
        rule = lookup_module(type(module))
        ctx = RuleContext(self, type(module), path, args, kwargs, out, module, real_args, real_kwargs)
        if rule is None:
            self._unknown(ctx, type(module).__name__, module)
            return
        self._run_rule(rule, ctx, type(module).__name__, module)

    def apply_function_rule(
        self, target, path, args, kwargs, out, real_args=(), real_kwargs=None, method: bool = False
    ) -> None:
        rule = lookup_function(target, method)
        ctx = RuleContext(self, target, path, args, kwargs, out, None, real_args, real_kwargs)
        name = (
            f"Tensor.{target}"
            if method
            else getattr(target, "__qualname__", getattr(target, "__name__", str(target)))
        )
        if rule is None:
            self._unknown(ctx, name, None)
            return
        self._run_rule(rule, ctx, name, None)

    def _run_rule(self, rule, ctx, name, module) -> None:
        try:
            rule(ctx)
        except Exception as exc:  # a rule that cannot read this call must not invent anything
            self._unknown(ctx, f"{name} (rule failed: {type(exc).__name__}: {exc})", module)

    def _unknown(self, ctx: RuleContext, name: str, module) -> None:
        self.unknown.setdefault(name, []).append(ctx.path or "<root>")
        reason = f"unknown op {name} at {ctx.path or '<root>'}"
        for t in ctx.inputs:
            ctx.pin(t, None, reason)
        self._pin_all(ctx.output, reason)
        if module is not None:
            for _, p in list(module.named_parameters()) + list(module.named_buffers()):
                axes = self.axes_of_tensor(p)
                if axes is not None:
                    self._pin_all(axes, reason)

    def _pin_all(self, axes, reason: str) -> None:
        if isinstance(axes, TensorAxes):
            self.store.pin_dims(axes.dims, reason)
            ctx = RuleContext(self, "pin", "", (), {}, None)
            ctx.stop(axes)
        elif isinstance(axes, (tuple, list)):
            for a in axes:
                self._pin_all(a, reason)
        elif isinstance(axes, dict):
            for a in axes.values():
                self._pin_all(a, reason)

    def warn_unknown(self) -> None:
        for name, paths in self.unknown.items():
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            warnings.warn(
                f"mirrorsym.detect: no rule for {name} (at {shown}); its inputs, outputs and parameters are "
                "treated as fixed, so no symmetry crosses it. If it has symmetries, describe it with "
                "ms.detect.register_rule(...).",
                DetectWarning,
                stacklevel=3,
            )


def _has_tensor(x) -> bool:
    if isinstance(x, TensorAxes):
        return True
    if isinstance(x, (tuple, list)):
        return any(_has_tensor(a) for a in x)
    return False


_getitem = operator.getitem
