"""Trace a model (``torch.export`` first, ``torch.fx`` as the fallback), run the graph on the example inputs
and feed every node to its rule.

**torch.export** (``strict=False``, the pre-dispatch training IR): works on models that torch.fx cannot
trace (Hugging Face transformers, ``nn.Transformer``, code that branches on shapes). Parameters and buffers
are lifted to placeholders and mapped back to ``named_parameters()`` names through the graph signature (a
tied parameter, the same tensor under two names, gets one set of axes). Every outermost submodule that has
a module rule is kept as a unit: its call signature is preserved (``preserve_module_call_signature``) and
the nodes of its call are read by that module's rule, exactly as the fx path reads a leaf module. The
remaining nodes are ATen ops, read through the translation table of :mod:`.aten`; an op with no rule is
treated as unknown (everything it touches is fixed, with a :class:`DetectWarning`), except that an op whose
tensor inputs are all fixed already (position and mask arithmetic on the input ids, ...) is fixed quietly:
no symmetry could cross it anyway.

**torch.fx** (symbolic tracing, modules with a rule are leaves): used when export fails.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import operator
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .aten import lookup_aten
from .axes import AxisStore
from .context import Events, RuleContext, TensorAxes
from .registry import lookup_function, lookup_module, lookup_user_by_name


class DetectWarning(UserWarning):
    """Something the detector could not read; it was treated conservatively (no symmetry across it)."""


class UntraceableModelError(RuntimeError):
    """Neither torch.export nor torch.fx could trace the model."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if lookup_module(type(m)) is not None:
            return True
        return super().is_leaf_module(m, qualname)


_FIX_HINT = (
    "Usually this is Python control flow that depends on tensor values. Fix: make that code static, or move "
    "it into a submodule and describe the submodule with ms.detect.register_rule(YourModule, rule) so that "
    "it becomes a leaf, or pass a traceable wrapper model."
)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` symbolic trace with every module that has a rule kept as a leaf."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise UntraceableModelError(
            f"find_symmetries could not trace {type(model).__name__} with torch.fx: {type(exc).__name__}: "
            f"{exc}. {_FIX_HINT}"
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def leaf_paths(model: nn.Module) -> list[str]:
    """The outermost submodules (not the root) that have a module rule: they are read as a whole."""
    out: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if lookup_module(type(child)) is not None:
                out.append(path)
            else:
                walk(child, path)

    walk(model, "")
    return out


def export(model: nn.Module, inputs: tuple, kwargs: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export(model, inputs, kwargs, strict=False)`` with the call signature of every
    module in :func:`leaf_paths` preserved."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        # a failed export prints its partial graph to stderr: the fx fallback or our error says what failed
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # export's own deprecation and tracing notes are not the user's
            return torch.export.export(
                model,
                tuple(inputs),
                dict(kwargs or {}),
                strict=False,
                preserve_module_call_signature=tuple(leaf_paths(model)),
            )
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


def _first_lines(exc: BaseException, n: int = 4, width: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line for line in text.splitlines() if line.strip()][:n]
    out = " | ".join(lines)
    return out if len(out) <= width else out[: width - 3] + "..."


class _Region:
    """The nodes of one call of a module that has a rule (torch.export path)."""

    def __init__(self, call: str, fqn: str, signature: Any) -> None:  # a torch.export ModuleCallSignature
        self.call, self.fqn, self.signature = call, fqn, signature
        self.nodes: list[fx.Node] = []
        self.end: fx.Node | None = None


class Detector:
    """Reads one model: traces it, runs it on the inputs (on a deep copy) and records axis coupling.

    ``Detector(model, inputs, kwargs)`` traces with torch.export and falls back to torch.fx;
    ``Detector(model)`` (no inputs) uses torch.fx only. ``mode`` says which one was used."""

    def __init__(self, model: nn.Module, inputs: tuple | None = None, kwargs: dict[str, Any] | None = None) -> None:
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
        # non-persistent buffers (RoPE frequencies, position ids) are derived constants, not state: a
        # symmetry may not move them
        self.constant_buffers = {
            f"{prefix}.{b}" if prefix else b
            for prefix, m in self.model.named_modules()
            for b in getattr(m, "_non_persistent_buffers_set", ())
        }
        self.unknown: dict[str, list[str]] = {}
        self.unknown_ops_in: dict[str, set[str]] = {}  # module name -> the ATen ops with no rule inside it
        self.ep: torch.export.ExportedProgram | None = None
        self.gm: fx.GraphModule | None = None
        self.export_error: BaseException | None = None
        self.param_dependent: set[fx.Node] = set()
        if inputs is None:
            self.gm = trace(self.model)
            self.mode = "fx"
            return
        try:
            self.ep = export(self.model, inputs, kwargs)
            self.mode = "export"
            return
        except Exception as exc:  # export raises many types; fall back to fx
            self.export_error = exc
        try:
            self.gm = trace(self.model)
        except UntraceableModelError as fx_exc:
            hint = ""
            if "Cache" in str(self.export_error) or "not a known type" in str(self.export_error):
                hint = (
                    " The model returns an object that is not a tensor (e.g. a Hugging Face key/value cache): "
                    "pass example_kwargs={'use_cache': False} (or set model.config.use_cache = False)."
                )
            raise UntraceableModelError(
                f"find_symmetries could not trace {type(model).__name__}. torch.export failed with "
                f"{_first_lines(self.export_error)}.{hint} torch.fx failed with "
                f"{_first_lines(fx_exc.__cause__ or fx_exc)}. "
                f"{_FIX_HINT}"
            ) from self.export_error
        self.mode = "fx"

    # ------------------------------------------------------------------ values
    def new_value(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> TensorAxes:
        self._next_vid += 1
        t = TensorAxes(tuple(shape), self.store.new_dims(shape), self._next_vid, None, dtype)
        self.values[t.vid] = t
        return t

    def param_axes(self, full_name: str) -> TensorAxes | None:
        """The axes of a parameter or buffer by qualified name (None if that attribute is None)."""
        obj: torch.Tensor
        try:
            obj = self.model.get_parameter(full_name)
        except AttributeError:
            try:
                obj = self.model.get_buffer(full_name)
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
            if name in self.constant_buffers:
                self._pin_all(self._param_axes[name], f"non-persistent buffer {name} (a constant)")
        return self._param_axes[name]

    def to_axes(self, real: object) -> Any:  # TensorAxes, a (nested) tuple of them, or None
        if isinstance(real, torch.Tensor):
            return self.new_value(tuple(real.shape), real.dtype)
        if isinstance(real, (tuple, list)):
            return tuple(self.to_axes(r) for r in real)
        return None

    # ------------------------------------------------------------------ running
    def run(self, inputs: tuple, kwargs: dict[str, Any] | None = None) -> None:
        if self.mode == "export":
            self._run_export(tuple(inputs), dict(kwargs or {}))
        else:
            self._run_fx(tuple(inputs), dict(kwargs or {}))

    def _run_fx(self, inputs: tuple, kwargs: dict) -> None:
        if self.gm is None:
            raise RuntimeError("the model was traced with torch.export, not torch.fx")
        gm = self.gm
        det = self
        env: dict[fx.Node, object] = {}
        if kwargs:  # fx placeholders follow forward's parameters: bind the keywords to positions
            bound = inspect.signature(self.model.forward).bind(*inputs, **kwargs)
            bound.apply_defaults()
            inputs = tuple(bound.arguments.values())

        class _Interp(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                det.visit(n, args, kwargs, result, env)
                return result

        with torch.no_grad():
            _Interp(gm).run(*inputs)

    def visit(
        self, n: fx.Node, args: tuple, kwargs: dict[str, Any], result: object, env: dict[fx.Node, Any]
    ) -> None:
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
        self._visit_call(n, args, kwargs, result, env)

    def _visit_call(self, n: fx.Node, args, kwargs, result, env) -> None:
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
            target = str(n.target)  # a call_module node's target is the module's path
            self.apply_module_rule(
                self.model.get_submodule(target), target, list(ax_args), ax_kwargs, out, args, kwargs
            )
        else:
            self.apply_function_rule(
                n.target,
                path,
                list(ax_args),
                ax_kwargs,
                out,
                args,
                kwargs,
                method=n.op == "call_method",
                node=n,
            )

    def _path_of(self, n: fx.Node) -> str:
        stack = n.meta.get("nn_module_stack")
        if stack:
            return list(stack.values())[-1][0]
        return ""

    # ------------------------------------------------------------------ torch.export
    def _run_export(self, inputs: tuple, kwargs: dict) -> None:
        if self.ep is None:
            raise RuntimeError("the model was traced with torch.fx, not torch.export")
        ep = self.ep
        gm = ep.graph_module
        specs = ep.graph_signature.input_specs
        flat = list(ep._graph_module_flat_inputs(inputs, kwargs))
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(specs) or len(flat) != len(specs):
            raise RuntimeError("torch.export graph signature does not match its placeholders")
        kind_of: dict[fx.Node, tuple[str, str | None]] = {}
        for i, (node, spec) in enumerate(zip(placeholders, specs, strict=True)):
            kind = spec.kind.name
            kind_of[node] = (kind, spec.target)
            if kind == "PARAMETER":
                flat[i] = self.model.get_parameter(spec.target)
            elif kind == "BUFFER":
                flat[i] = self.model.get_buffer(spec.target)
        user_outputs = [spec.kind.name in ("USER_OUTPUT", "LOSS_OUTPUT") for spec in ep.graph_signature.output_specs]
        # nodes computed from parameters or state (not only from the inputs and constants)
        self.param_dependent = set()
        for n in gm.graph.nodes:
            kind, target = kind_of.get(n, (None, None))
            if kind == "PARAMETER" or (kind == "BUFFER" and target not in self.constant_buffers):
                self.param_dependent.add(n)
            elif any(a in self.param_dependent for a in n.all_input_nodes):
                self.param_dependent.add(n)
        regions, region_of = self._regions(ep)
        keep_names = {
            arg.name
            for r in regions
            for arg in list(r.signature.inputs) + list(r.signature.outputs)
            if hasattr(arg, "name") and type(arg).__name__ != "ConstantArgument"
        }
        keep: dict[str, object] = {}
        # a kept value is released after the last module call that reads or writes it
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last: dict[str, _Region] = {}
        for r in sorted(regions, key=lambda r: order[r.end]):
            for arg in list(r.signature.inputs) + list(r.signature.outputs):
                if type(arg).__name__ == "TensorArgument":
                    last[arg.name] = r
        release: dict[str, list[str]] = {}
        for name, r in last.items():
            release.setdefault(r.call, []).append(name)
        det = self
        env: dict[fx.Node, object] = {}

        class _Interp(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                if n.name in keep_names:
                    keep[n.name] = result
                region = region_of.get(n)
                if region is not None:
                    if n is region.end:
                        det._visit_region(region, env, keep)
                        for name in release.get(region.call, ()):
                            keep.pop(name, None)
                    return result
                if n.op == "placeholder":
                    det._visit_placeholder(n, kind_of[n], result, env)
                elif n.op == "output":
                    outs = list(n.args[0]) if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
                    for node, is_user in zip(outs, user_outputs, strict=False):
                        if is_user and isinstance(node, fx.Node):
                            det._pin_all(env.get(node), "model output")
                elif n.op == "get_attr":
                    det.visit(n, (), {}, result, env)
                else:
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    det._visit_call(n, args, kwargs, result, env)
                return result

        with torch.no_grad():
            _Interp(gm).run(*flat)

    def _visit_placeholder(self, n: fx.Node, kind: tuple[str, str | None], result, env) -> None:
        what, target = kind
        if what in ("PARAMETER", "BUFFER") and isinstance(result, torch.Tensor):
            axes = self.axes_of_tensor(result)
            if axes is None:
                axes = self.new_value(tuple(result.shape), result.dtype)
                self._pin_all(axes, f"constant tensor {target}")
            env[n] = axes
        elif what == "USER_INPUT":
            env[n] = self.to_axes(result)
            self._pin_all(env[n], "model input")
        elif isinstance(result, torch.Tensor):
            env[n] = self.new_value(tuple(result.shape), result.dtype)
            self._pin_all(env[n], f"constant tensor {target}")
        else:
            env[n] = None

    def _regions(self, ep) -> tuple[list[_Region], dict[fx.Node, _Region]]:
        """The calls of modules with a rule, read as a whole; a call whose nodes are not a clean unit (its
        values used outside other than through its outputs, or used before the call ends) is dropped, and
        its nodes are read op by op instead."""
        leaves = set(leaf_paths(self.model))
        calls: dict[str, _Region] = {}
        for entry in ep.module_call_graph:
            base = entry.fqn.split("@")[0]
            if base in leaves and entry.signature is not None:
                calls[entry.fqn] = _Region(entry.fqn, base, entry.signature)
        if not calls:
            return [], {}
        nodes = list(ep.graph_module.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        for n in nodes:
            for key, value in (n.meta.get("nn_module_stack") or {}).items():
                m = re.search(r"@\d+$", key)
                call = value[0] + (m.group(0) if m else "")
                if call in calls:
                    calls[call].nodes.append(n)
                    break
        kept: list[_Region] = []
        by_name = {n.name: n for n in nodes}
        for r in calls.values():
            if not r.nodes:
                continue
            members = set(r.nodes)
            outs = []
            ok = True
            for arg in r.signature.outputs:
                if type(arg).__name__ == "ConstantArgument":
                    continue
                node = by_name.get(getattr(arg, "name", None))
                if node is None or node not in members or type(arg).__name__ != "TensorArgument":
                    ok = False
                    break
                outs.append(node)
            for arg in r.signature.inputs:
                if type(arg).__name__ not in ("TensorArgument", "ConstantArgument"):
                    ok = False
                elif type(arg).__name__ == "TensorArgument" and by_name.get(arg.name) in members:
                    ok = False
            if not ok:
                continue
            r.end = max(r.nodes, key=index.__getitem__)
            out_set = set(outs)
            for n in r.nodes:
                for user in n.users:
                    if user in members or user.op == "output":
                        continue
                    if n not in out_set or index[user] < index[r.end]:
                        ok = False
            if ok:
                kept.append(r)
        region_of = {n: r for r in kept for n in r.nodes}
        return kept, region_of

    def _visit_region(self, r: _Region, env: dict[fx.Node, Any], keep: dict[str, object]) -> None:
        if self.ep is None:
            raise RuntimeError("module regions exist on the torch.export path only")
        by_name = {n.name: n for n in r.nodes}
        graph_nodes = {n.name: n for n in self.ep.graph_module.graph.nodes}
        ax_flat, real_flat = [], []
        for arg in r.signature.inputs:
            if type(arg).__name__ == "TensorArgument":
                ax_flat.append(env.get(graph_nodes[arg.name]))
                real_flat.append(keep.get(arg.name))
            else:
                ax_flat.append(arg.value)
                real_flat.append(arg.value)
        ax_args, ax_kwargs = pytree.tree_unflatten(ax_flat, r.signature.in_spec)
        real_args, real_kwargs = pytree.tree_unflatten(real_flat, r.signature.in_spec)
        out_flat = []
        for arg in r.signature.outputs:
            if type(arg).__name__ == "TensorArgument":
                axes = self.to_axes(keep.get(arg.name))
                env[by_name[arg.name]] = axes
                out_flat.append(axes)
            else:
                out_flat.append(getattr(arg, "value", None))
        out = pytree.tree_unflatten(out_flat, r.signature.out_spec)
        module = self.model.get_submodule(r.fqn)
        self.apply_module_rule(module, r.fqn, list(ax_args), ax_kwargs, out, real_args, real_kwargs)

    # ------------------------------------------------------------------ rules
    def apply_module_rule(
        self,
        module: nn.Module,
        path: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        out: Any,
        real_args: Sequence[Any] = (),
        real_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        rule = lookup_module(type(module))
        ctx = RuleContext(self, type(module), path, args, kwargs, out, module, real_args, real_kwargs)
        if rule is None:
            self._unknown(ctx, type(module).__name__, module)
            return
        self._run_rule(rule, ctx, type(module).__name__, module)

    def apply_function_rule(
        self,
        target: Callable[..., Any] | str,
        path: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        out: Any,
        real_args: Sequence[Any] = (),
        real_kwargs: Mapping[str, Any] | None = None,
        method: bool = False,
        node: fx.Node | None = None,
    ) -> None:
        rule = lookup_function(target, method)
        if rule is None and isinstance(target, torch._ops.OpOverload):
            # a rule for the packet, the user's rule for the torch function of the same name, the ATen table
            rule = lookup_function(target.overloadpacket) or lookup_user_by_name(target) or lookup_aten(target)
        ctx = RuleContext(self, target, path, args, kwargs, out, None, real_args, real_kwargs, node=node)
        if isinstance(target, torch._ops.OpOverload):
            name = str(target)
        elif method:
            name = f"Tensor.{target}"
        else:
            name = getattr(target, "__qualname__", getattr(target, "__name__", str(target)))
        if rule is None:
            if node is not None:
                name = self._owner_name(node, name)
            self._unknown(ctx, name, None, quiet_if_fixed=node is not None)
            return
        self._run_rule(rule, ctx, name, None)

    def _owner_name(self, node: fx.Node, op: str) -> str:
        """An op with no rule inside a built-in torch.nn module (e.g. ``aten.gru.input`` in ``nn.GRU``) is
        named by the module, as the fx path names a leaf module: a rule for the module is the fix."""
        for path, kind in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
            if path and str(kind).startswith("torch.nn.modules."):
                self.unknown_ops_in.setdefault(str(kind).rsplit(".", 1)[-1], set()).add(op)
                return str(kind).rsplit(".", 1)[-1]
        return op

    def _run_rule(self, rule, ctx, name, module) -> None:
        try:
            rule(ctx)
        except Exception as exc:  # a rule that cannot read this call must not invent anything
            self._unknown(ctx, f"{name} (rule failed: {type(exc).__name__}: {exc})", module)

    def _all_fixed(self, tensors) -> bool:
        for t in tensors:
            for atoms in t.dims:
                for a in atoms:
                    if any(self.store.find(leaf) not in self.store.pinned for leaf in self.store.leaves(a)):
                        return False
        return True

    def _unknown(self, ctx: RuleContext, name: str, module, quiet_if_fixed: bool = False) -> None:
        reason = f"unknown op {name} at {ctx.path or '<root>'}"
        if not (quiet_if_fixed and module is None and self._all_fixed(ctx.inputs)):
            self.unknown.setdefault(name, []).append(ctx.path or "<root>")
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
            ops = self.unknown_ops_in.get(name)
            inside = f" (it calls {', '.join(sorted(ops))})" if ops else ""
            warnings.warn(
                f"mirrorsym.detect: no rule for {name} (at {shown}){inside}; its inputs, outputs and parameters are "
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
