"""What a rule sees and says: tensors as lists of axes, and the coupling events between them.

A rule (one per op or module type, see :mod:`mirrorsym.detect.rules`) receives a :class:`RuleContext`
and states, in terms of the axes of its inputs, outputs and parameters:

* which axes are the same units (:meth:`RuleContext.same`), i.e. must be permuted together;
* how a per-unit transform travels (the *diagonal* analysis behind sign_flip / rescale / bn_scale and
  the *rotation* analysis): ``elementwise`` (transparent; which scalings commute with it and whether it
  is linear), ``source`` (a parameter writes the units: Linear rows, biases, norm affine parameters),
  ``sink`` (a parameter reads them: Linear columns), ``contract`` (two activations are contracted, as
  in ``q @ k.T``), ``bn_exit`` (BatchNorm absorbs the scale), ``passive`` (a parameter moves with the
  units but does not take part in the transform), ``stop`` (nothing per-unit passes);
* which axes are fixed (:meth:`RuleContext.pin`): nothing may permute them.

Scaling groups are bit sets: ``POS`` = positive scalings commute with the op (ReLU family), ``NEG`` =
sign flips do (odd functions), ``ANY = POS | NEG`` = every non-zero scaling (linear ops).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .axes import AxisStore

if TYPE_CHECKING:
    from .trace import Detector

NONE, POS, NEG = 0, 1, 2
ANY = POS | NEG


class UnsupportedCall(Exception):
    """Raised by a rule for a variant of its op that it does not analyse (e.g. grouped transposed convs).
    The tracer then treats the call like an unknown op: everything it touches is fixed, with a warning."""


@dataclass(eq=False)
class TensorAxes:
    """One tensor as the detector sees it: its shape and, per dim, a list of atoms (outer to inner).

    ``param`` is the qualified parameter/buffer name when the tensor *is* that parameter (a get_attr
    node or a module's own parameter), else None. ``vid`` identifies the value in the event graph.
    """

    shape: tuple[int, ...]
    dims: list[list[int]]
    vid: int
    param: str | None = None
    dtype: torch.dtype | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self, d: int) -> int:
        return d % self.ndim


@dataclass
class Events:
    """Everything the rules said, resolved to leaf classes after the whole graph is read."""

    edges: list[tuple] = field(default_factory=list)  # (node_a, node_b, group, linear)
    constraints: list[tuple] = field(default_factory=list)  # (node, group, rotation_ok)
    members: list[tuple] = field(default_factory=list)  # (node, param, dim, role) role: source|sink|bn_exit
    passive: list[tuple] = field(default_factory=list)  # (node, param, dim)
    absorbing: list[tuple] = field(default_factory=list)  # nodes read by an even function (they read the sign)


class RuleContext:
    """Handed to every rule. ``inputs``: the tensor arguments (TensorAxes), ``args``/``kwargs``: the call's
    arguments with tensors replaced by TensorAxes, ``output``: the result (TensorAxes, or a tuple of them),
    ``module``/``path``: the module and its qualified name for module rules (path also for functions),
    ``values``: the real (example) argument values, for reading e.g. a ``dim=`` argument, ``graph_node``: the
    graph node being read (a ``torch.export`` / ``torch.fx`` node, or None for calls made by composite
    rules), for rules that look at how an operand was produced."""

    def __init__(
        self,
        detector: Detector,
        target: object,
        path: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        output: Any,
        module: nn.Module | None = None,
        real_args: Sequence[Any] = (),
        real_kwargs: Mapping[str, Any] | None = None,
        node: fx.Node | None = None,
    ) -> None:
        self.detector = detector
        self.graph_node = node
        self.store: AxisStore = detector.store
        self.target = target
        self.path = path
        self.args = args
        self.kwargs = kwargs or {}
        self.output = output
        # Any: a module rule reads its own module type's attributes (m.num_groups, m.normalized_shape, ...)
        self.module: Any = module
        self.real_args = real_args
        self.real_kwargs = real_kwargs or {}
        self.inputs = [
            a for a in _flat(args) + _flat(list(self.kwargs.values())) if isinstance(a, TensorAxes)
        ]

    # ------------------------------------------------------------------ lookup
    def param(self, name: str) -> TensorAxes | None:
        """The module's own parameter or buffer ``name`` (e.g. "weight"), or None when it is None."""
        full = f"{self.path}.{name}" if self.path else name
        return self.detector.param_axes(full)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """The real value of argument ``i`` / keyword ``name`` (for ints, dims, flags)."""
        if name in self.real_kwargs:
            return self.real_kwargs[name]
        if i < len(self.real_args):
            return self.real_args[i]
        return default

    def new_value(self, shape: Iterable[int]) -> TensorAxes:
        return self.detector.new_value(tuple(shape))

    def call(self, name: str, *inputs: TensorAxes, output: Any = None) -> Any:
        """Apply the rule of submodule ``name`` (a composite rule, e.g. TransformerEncoderLayer)."""
        if self.module is None:
            raise TypeError(f"{self.where()}: call({name!r}) needs a module rule (only modules have submodules)")
        sub = self.module.get_submodule(name)
        path = f"{self.path}.{name}" if self.path else name
        if output is None:
            output = self.new_value(inputs[0].shape)
        self.detector.apply_module_rule(sub, path, list(inputs), {}, output)
        return output

    def call_function(
        self, fn: Callable[..., Any], *inputs: TensorAxes, output: Any = None, **kwargs: Any
    ) -> Any:
        """Apply the rule of function ``fn`` to internal values (for composite rules)."""
        if output is None:
            output = self.new_value(inputs[0].shape)
        self.detector.apply_function_rule(fn, self.path, list(inputs), kwargs, output)
        return output

    # ------------------------------------------------------------------ coupling
    def same(self, a: TensorAxes, da: int, b: TensorAxes, db: int) -> None:
        """Dim ``da`` of ``a`` and dim ``db`` of ``b`` are the same units (permuted together)."""
        la, lb = a.dims[a.dim(da)], b.dims[b.dim(db)]
        if not self.store.unite_lists(la, lb):
            reason = (
                f"{self.where()}: cannot align axes of sizes {a.shape[a.dim(da)]} and {b.shape[b.dim(db)]}"
            )
            self.store.pin_dims([la, lb], reason)

    def pin(self, t: TensorAxes, dim: int | None = None, reason: str = "") -> None:
        """Fix dim ``dim`` of ``t`` (every dim if None): nothing may permute it. Also stops transforms."""
        dims = range(t.ndim) if dim is None else [t.dim(dim)]
        why = reason or f"fixed by {self.where()}"
        for d in dims:
            self.store.pin_dims([t.dims[d]], why)
            self.stop(t, d)

    def stop(self, t: TensorAxes, dim: int | None = None) -> None:
        """No per-unit scaling or rotation passes through dim ``dim`` of ``t`` (every dim if None)."""
        dims = range(t.ndim) if dim is None else [t.dim(dim)]
        for d in dims:
            self.detector.events.constraints.append((self._node(t, d), NONE, False))

    def absorb_signs(self, t: TensorAxes, dim: int) -> None:
        """An even function reads ``t[dim]`` (x², |x|): sign flips of its units stop there without a trace
        (the even function is a reader that absorbs them), so only sign flips may pass through this node
        (other scalings and rotations would change the result)."""
        node = self._node(t, dim)
        self.detector.events.constraints.append((node, NEG, False))
        self.detector.events.absorbing.append(node)

    def absorb_orthogonal(self, t: TensorAxes, dim: int) -> None:
        """``t[dim]`` is read here only through the sum of its squares over that dim (the statistic of a
        gain-free RMS norm, ``sum_i x_i²``): every orthogonal transform of the units (a rotation, and so
        every sign flip and permutation) leaves it unchanged, so rotations may pass through this node and,
        of the per-unit scalings, only sign flips (as :meth:`absorb_signs`, which this relaxes)."""
        node = self._node(t, dim)
        self.detector.events.constraints.append((node, NEG, True))
        self.detector.events.absorbing.append(node)

    def stop_rotation(self, t: TensorAxes, dim: int) -> None:
        """Per-unit scalings still pass at ``t[dim]``, rotations do not."""
        self.detector.events.constraints.append((self._node(t, dim), ANY, False))

    def elementwise(
        self, a: TensorAxes, da: int, b: TensorAxes, db: int, group: int = ANY, linear: bool = True
    ) -> None:
        """``b[db]`` is computed from ``a[da]`` unit by unit: same units; per-unit scalings in ``group``
        and (if ``linear``) rotations carry over from ``a`` to ``b``."""
        self.same(a, da, b, db)
        self.detector.events.edges.append((self._node(a, da), self._node(b, db), group, linear))

    def source(
        self, p: TensorAxes | None, pdim: int, y: TensorAxes, ydim: int, rotation: bool = True
    ) -> None:
        """Parameter ``p`` writes the units of ``y[ydim]`` along ``p[pdim]`` (rows of a Linear, a bias,
        a norm's affine parameters). ``rotation=False`` if it is elementwise (norm affine)."""
        if p is None:
            return
        self.same(p, pdim, y, ydim)
        node = self._node(y, ydim)
        self.detector.events.members.append((node, p.param, p.dim(pdim), "source"))
        if not rotation:
            self.detector.events.constraints.append((node, ANY, False))

    def sink(self, x: TensorAxes, xdim: int, p: TensorAxes | None, pdim: int) -> None:
        """Parameter ``p`` reads the units of ``x[xdim]`` along ``p[pdim]`` (columns of a Linear)."""
        if p is None:
            return
        self.same(x, xdim, p, pdim)
        self.detector.events.members.append((self._node(x, xdim), p.param, p.dim(pdim), "sink"))

    def add_member(self, t: TensorAxes, d: int, p: TensorAxes | None, pdim: int, role: str) -> None:
        """Record ``p[pdim]`` as a ``role`` of the units of ``t[d]`` without uniting the two dims (for
        composite rules that split ``p[pdim]`` themselves). Roles: "source" | "sink" (as :meth:`source`,
        :meth:`sink`) and "absorb": an elementwise weight ``p ⊙ t`` that takes ``t``'s per-unit sign (or
        scale) into itself, so that its product with ``t`` does not change (an RMSNorm weight reading the
        normalised stream); a weight that absorbs and writes the units of one segment stays unchanged."""
        if p is not None:
            self.detector.events.members.append((self._node(t, d), p.param, p.dim(pdim), role))

    def bn_exit(self, x: TensorAxes, xdim: int, path: str) -> None:
        """A BatchNorm at ``path`` normalises ``x[xdim]`` per unit: it absorbs a per-unit scale (running
        statistics adjusted) and a sign (its weight negated)."""
        self.detector.events.members.append((self._node(x, xdim), path, x.dim(xdim), "bn_exit"))

    def passive(self, p: TensorAxes | None, pdim: int, y: TensorAxes, ydim: int) -> None:
        """``p`` moves with the units of ``y[ydim]`` under permutations but takes no part in scalings."""
        if p is None:
            return
        self.same(p, pdim, y, ydim)
        self.detector.events.passive.append((self._node(y, ydim), p.param, p.dim(pdim)))
        self.detector.events.constraints.append((self._node(y, ydim), ANY, False))

    def link(
        self, a: TensorAxes, da: int, b: TensorAxes, db: int, group: int = ANY, linear: bool = True
    ) -> None:
        """Like :meth:`elementwise` for dims that already share their atoms (reshape, transpose)."""
        self.detector.events.edges.append((self._node(a, da), self._node(b, db), group, linear))

    def contract(self, a: TensorAxes, da: int, b: TensorAxes, db: int) -> None:
        """``a[da]`` and ``b[db]`` are summed over together (``q @ k.T``): same units; a rotation must act
        on both at once; no per-unit scaling passes (its diagonal part is inside the rotation)."""
        self.same(a, da, b, db)
        na, nb = self._node(a, da), self._node(b, db)
        self.detector.events.edges.append((na, nb, NONE, True))

    # ------------------------------------------------------------------ helpers
    def _node(self, t: TensorAxes, d: int) -> tuple[tuple[str, object, int], tuple[int, ...]]:
        d = t.dim(d)
        key = ("p", t.param, d) if t.param is not None else ("v", t.vid, d)
        return key, tuple(t.dims[d])

    def where(self) -> str:
        name = getattr(self.target, "__name__", str(self.target))
        return f"{name} at {self.path or '<root>'}"


def _flat(xs: Iterable[Any]) -> list[Any]:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(x))
        else:
            out.append(x)
    return out
