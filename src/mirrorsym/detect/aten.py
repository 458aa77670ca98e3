"""ATen rules for the ``torch.export`` path: a translation table from ATen overloads to the rules of
:mod:`.rules`.

Most ATen schemas put their arguments where the torch function does (``aten.linear(input, weight, bias)``
is ``F.linear``), so the table maps them to the same rule; a small adapter reorders the others
(``aten.embedding(weight, indices)``, ``aten.addmm(bias, mat1, mat2)``, ``aten.convolution``, reductions
whose ``dim=[]`` means "all"). A few rules exist only here because the patterns only appear once a model
is written out in ATen:

* ``mul`` of a parameter with a *normalised* activation (``x * rsqrt(mean(x²) + eps)``, the way Hugging Face
  writes RMSNorm, or a hand-written LayerNorm): the parameter is the norm's affine weight, so it writes the
  units (a ``source`` without rotations) exactly like ``nn.LayerNorm``'s weight;
* ``mul`` of two activations where exactly one comes out of a nonlinear activation (SwiGLU / GeGLU
  ``act(gate) * up``): the gate side is stopped and per-unit scalings pass from the other side (``up``
  rows scaled with ``down`` columns), never rotations;
* ``expand`` of a size-1 dim (grouped-query attention's ``repeat_kv``): the new dim is constant along
  its positions, so permuting it changes nothing: it is stopped, not pinned (pinned when the input is
  computed from the model inputs and constants alone: position and mask arithmetic);
* uniform constants (``zeros``, ``ones``, ``full``, ``*_like``): every permutation leaves them unchanged,
  so they are stopped, not pinned; position-dependent ones (``arange``, ``empty``, random) are pinned;
* ``scaled_dot_product_attention``'s mask is coupled to the batch, head and position dims it is added
  to instead of being pinned whole (T5 passes its per-head position bias as the mask).

Anything not in the table is an unknown op (see :mod:`.trace`). Rules registered with
:func:`~mirrorsym.detect.register_rule` for an ATen overload (``torch.ops.aten.foo.default``) win over
this table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch._ops import OpOverload

from . import rules as R
from .context import ANY, NEG, NONE, POS, RuleContext, TensorAxes, UnsupportedCall

aten = torch.ops.aten
_TABLE: dict[object, Callable[[RuleContext], None]] = {}


def lookup_aten(target: object) -> Callable[[RuleContext], None] | None:
    """The table's rule for an ATen overload (by overload, then by its packet), or None."""
    try:
        rule = _TABLE.get(target)
        if rule is None and isinstance(target, OpOverload):
            rule = _TABLE.get(target.overloadpacket)
        return rule
    except TypeError:  # unhashable target
        return None


def _ops(*names: str) -> list:
    """``"relu.default"`` -> the overload, ``"arange"`` -> the packet (all overloads); names this torch
    version does not have are skipped."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        try:
            op = getattr(aten, packet)
            if overload:
                op = getattr(op, overload)
        except (AttributeError, RuntimeError):
            continue
        out.append(op)
    return out


def _reg(names, rule) -> None:
    for op in _ops(*names):
        _TABLE[op] = rule


def _with(ctx: RuleContext, args, real_args=None, kwargs=None, real_kwargs=None, output=None) -> RuleContext:
    """The same call with its arguments rearranged for a rule of :mod:`.rules`."""
    c = RuleContext(
        ctx.detector,
        ctx.target,
        ctx.path,
        list(args),
        kwargs if kwargs is not None else {},
        ctx.output if output is None else output,
        ctx.module,
        tuple(real_args) if real_args is not None else ctx.real_args,
        real_kwargs if real_kwargs is not None else {},
        node=ctx.graph_node,
    )
    return c


def _outputs(ctx: RuleContext) -> list[TensorAxes]:
    out = ctx.output if isinstance(ctx.output, (tuple, list)) else (ctx.output,)
    return [y for y in out if isinstance(y, TensorAxes)]


# ---------------------------------------------------------------------------- elementwise

_reg(["relu.default", "relu_.default", "leaky_relu.default", "leaky_relu_.default"], R._unary(POS, False))
_reg(
    [
        "tanh.default",
        "tanh_.default",
        "sin.default",
        "atan.default",
        "asinh.default",
        "sinh.default",
        "erf.default",
        "sign.default",
        "hardshrink.default",
        "softshrink.default",
    ],
    R._unary(NEG, False),
)
_reg(["hardtanh.default", "hardtanh_.default"], R._hardtanh)
_reg(
    [
        "neg.default",
        "alias.default",
        "detach.default",
        "clone.default",
        "contiguous.default",
        "lift_fresh_copy.default",
        "positive.default",
        "dropout.default",
        "dropout_.default",
        "feature_dropout.default",
        "alpha_dropout.default",
        "feature_alpha_dropout.default",
    ],
    R._unary(ANY, True),
)
_reg(
    [
        "sigmoid.default",
        "sigmoid_.default",
        "gelu.default",
        "gelu_.default",
        "silu.default",
        "silu_.default",
        "elu.default",
        "selu.default",
        "celu.default",
        "softplus.default",
        "mish.default",
        "hardswish.default",
        "hardsigmoid.default",
        "relu6.default",
        "exp.default",
        "log.default",
        "log1p.default",
        "expm1.default",
        "sqrt.default",
        "rsqrt.default",
        "reciprocal.default",
    ],
    R._unary(NONE, False),
)
_reg(["abs.default", "cos.default"], R._even)
_reg(["square.default"], R._square)
_reg(["pow.Tensor_Scalar"], R._pow)


def _to(ctx: RuleContext) -> None:
    """Casts and copies: linear between floating dtypes; to or from an integer / bool dtype only the
    positions survive (rounding)."""
    x, y = R._x(ctx), R._y(ctx)
    floating = all(t.dtype is None or t.dtype.is_floating_point or t.dtype.is_complex for t in (x, y))
    R._unary(ANY if floating else NONE, floating)(_with(ctx, [x], ctx.real_args[:1]))


_reg(["to", "_to_copy.default", "type_as.default"], _to)


def _pointwise(ctx: RuleContext) -> None:
    """An elementwise function of several tensors that only commutes with permutations (comparisons,
    logical ops, where, masked_fill, maximum, clamp with tensor bounds)."""
    y = R._y(ctx)
    operands = ctx.inputs
    for d in range(y.ndim):
        carried = False
        for t in operands:
            k = R._aligned(t, y, d)
            if k is not None:
                ctx.elementwise(t, k, y, d, NONE, False)
                carried = True
        if not carried and y.shape[d] != 1:
            ctx.stop(y, d)


_reg(
    [
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "logical_and.default",
        "logical_or.default",
        "logical_xor.default",
        "logical_not.default",
        "__and__",
        "__or__",
        "__xor__",
        "bitwise_and",
        "bitwise_or",
        "bitwise_xor",
        "bitwise_not.default",
        "where.self",
        "where.ScalarOther",
        "where.ScalarSelf",
        "where.Scalar",
        "masked_fill.Scalar",
        "masked_fill.Tensor",
        "masked_fill_.Scalar",
        "masked_fill_.Tensor",
        "maximum.default",
        "minimum.default",
        "min.other",
        "max.other",
        "clamp.default",
        "clamp.Tensor",
        "clamp_min.default",
        "clamp_max.default",
        "isnan.default",
        "isinf.default",
    ],
    _pointwise,
)


# ---------------------------------------------------------------------------- arithmetic

_reg(
    [
        "add.Tensor",
        "add.Scalar",
        "add_.Tensor",
        "add_.Scalar",
        "sub.Tensor",
        "sub.Scalar",
        "sub_.Tensor",
        "sub_.Scalar",
        "rsub.Tensor",
        "rsub.Scalar",
    ],
    R._additive,
)
_reg(["div.Tensor", "div.Scalar", "div_.Tensor", "div_.Scalar"], R._div)

_TRANSPARENT = set(
    _ops("to", "_to_copy.default", "alias.default", "clone.default", "contiguous.default", "detach.default")
)
_REDUCTIONS = set(
    _ops("mean", "sum", "var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm", "amax", "logsumexp")
)
_GATES = set(
    _ops(
        "silu.default",
        "gelu.default",
        "sigmoid.default",
        "tanh.default",
        "relu.default",
        "leaky_relu.default",
        "elu.default",
        "selu.default",
        "celu.default",
        "softplus.default",
        "mish.default",
        "hardswish.default",
        "hardsigmoid.default",
        "hardtanh.default",
        "relu6.default",
    )
)


def _in(target, ops: set) -> bool:
    """``target`` (an overload) is in ``ops`` (overloads and packets)."""
    return target in ops or getattr(target, "overloadpacket", None) in ops


def _peel(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and _in(node.target, _TRANSPARENT):
        node = node.args[0]
    return node


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _from_reduction(node, depth: int = 8) -> bool:
    """Whether ``node`` is computed from a reduction within ``depth`` ops (statistics of a norm)."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt: list[fx.Node] = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if _in(n.target, _REDUCTIONS):
                return True
            nxt.extend(a for a in n.all_input_nodes)
        frontier = nxt
    return False


def _normalized(node) -> bool:
    """``node`` (up to casts) is ``x * s`` or ``x / s`` with ``s`` size 1 along the last dim and computed
    from a reduction: a normalised activation (RMSNorm / LayerNorm written with ATen ops)."""
    n = _peel(node)
    if not (isinstance(n, fx.Node) and n.op == "call_function"):
        return False
    if n.target not in (aten.mul.Tensor, aten.div.Tensor):
        return False
    for s in n.args[:2]:
        shape = _shape(s)
        if shape and shape[-1] == 1 and _from_reduction(s):
            return True
    return False


def _is_gate(node) -> bool:
    """``node`` (up to casts) is the output of a nonlinear activation (an ATen activation op, or the last op
    of an activation module written out, e.g. Hugging Face's ``NewGELUActivation``)."""
    n = _peel(node)
    if not (isinstance(n, fx.Node) and n.op == "call_function"):
        return False
    if _in(n.target, _GATES):
        return True
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        name = str(kind).rsplit(".", 1)[-1]
        if name.endswith("Activation") or str(kind).startswith("torch.nn.modules.activation."):
            # the last op of the activation's call (its output), not an op inside it
            return all((u.meta.get("nn_module_stack") or {}) != stack for u in n.users if u.op == "call_function")
    return False


def _mul(ctx: RuleContext) -> None:
    a, b = ctx.args[0], ctx.args[1]
    y = R._y(ctx)
    node = ctx.graph_node
    special = None
    if isinstance(a, TensorAxes) and isinstance(b, TensorAxes) and node is not None:
        na, nb = node.args[0], node.args[1]
        if (a.param is None) != (b.param is None):
            x, p, nx = (a, b, na) if b.param is not None else (b, a, nb)
            if (
                p.ndim == 1
                and p.shape[0] > 1
                and x.ndim >= 1
                and x.shape[-1] == p.shape[0] == y.shape[-1]
                and _normalized(nx)
            ):
                special = ("affine", x, p)
        elif a.param is None and b.param is None:
            ga, gb = _is_gate(na), _is_gate(nb)
            if ga != gb:
                special = ("gate", a, b) if ga else ("gate", b, a)
    if special is None:
        R._multiplicative(ctx)
        return
    kind, s1, s2 = special
    for d in range(y.ndim):
        k1, k2 = R._aligned(s1, y, d), R._aligned(s2, y, d)
        if kind == "affine" and d == y.ndim - 1 and k1 is not None:  # (it is: x's last dim is y's, size > 1)
            # y = w ⊙ normalised(x): w writes the units (like nn.LayerNorm's weight); a per-unit sign that
            # reached the normalised activation (RMSNorm: x / rms(x), the statistics are even) is absorbed
            # by w; what reached it is decided upstream (a LayerNorm's mean subtraction stops everything)
            ctx.same(s1, k1, y, d)
            ctx.add_member(s1, k1, s2, 0, "absorb")
            ctx.stop_rotation(s1, k1)
            ctx.source(s2, 0, y, d, rotation=False)
        elif kind == "gate" and k1 is not None and k2 is not None:
            # y = act(g) ⊙ u: scaling u's units scales y's (read back by the next Linear); not rotations
            ctx.same(s1, k1, y, d)
            ctx.stop(s1, k1)
            ctx.elementwise(s2, k2, y, d, ANY, False)
        elif k1 is not None and k2 is None:
            ctx.elementwise(s1, k1, y, d)
        elif k2 is not None and k1 is None:
            ctx.elementwise(s2, k2, y, d)


_reg(["mul.Tensor", "mul.Scalar", "mul_.Tensor", "mul_.Scalar"], _mul)


# ---------------------------------------------------------------------------- contractions

_reg(["linear.default"], R._f_linear)
_reg(["matmul.default", "mm.default", "bmm.default", "dot.default", "mv.default"], R._matmul)


def _addmm(ctx: RuleContext) -> None:
    """``beta * bias + alpha * (mat1 @ mat2)`` (Hugging Face's GPT-2 ``Conv1D``)."""
    bias, m1, m2 = ctx.args[0], ctx.args[1], ctx.args[2]
    y = R._y(ctx)
    z = ctx.new_value(y.shape)
    R._matmul(_with(ctx, [m1, m2], (), output=z))
    if ctx.arg(3, "beta", 1) == 0 or not isinstance(bias, TensorAxes):
        for d in range(y.ndim):
            ctx.elementwise(z, d, y, d)
        return
    R._additive(_with(ctx, [bias, z], ()))


_reg(["addmm.default"], _addmm)


def _einsum(ctx: RuleContext) -> None:
    eq, tensors = ctx.real_args[0], ctx.args[1]
    R._einsum(_with(ctx, [eq, *tensors], [eq]))


_reg(["einsum.default"], _einsum)


# ---------------------------------------------------------------------------- convolution, pooling, norms

_reg(["conv1d", "conv2d", "conv3d"], R._f_conv)


def _convolution(ctx: RuleContext) -> None:
    transposed, groups = bool(ctx.arg(6, "transposed", False)), int(ctx.arg(8, "groups", 1))
    if transposed and groups != 1:
        raise UnsupportedCall("grouped transposed convolution")
    b = ctx.args[2] if isinstance(ctx.args[2], TensorAxes) else None
    R._conv_core(ctx, R._x(ctx), ctx.args[1], b, R._y(ctx), groups, transposed)


def _conv_transpose(ctx: RuleContext) -> None:
    if int(ctx.arg(6, "groups", 1)) != 1:
        raise UnsupportedCall("grouped transposed convolution")
    b = ctx.args[2] if len(ctx.args) > 2 and isinstance(ctx.args[2], TensorAxes) else None
    R._conv_core(ctx, R._x(ctx), ctx.args[1], b, R._y(ctx), 1, True)


_reg(["convolution.default"], _convolution)
_reg(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], _conv_transpose)


def _with_indices(rule):
    """Pools that also return indices: the indices are positions (pinned)."""

    def wrapped(ctx: RuleContext) -> None:
        rule(ctx)
        for extra in _outputs(ctx)[1:]:
            ctx.pin(extra)

    return wrapped


for _n in (1, 2, 3):
    _reg([f"max_pool{_n}d.default"], R._pool(POS, False, _n))
    _reg(
        [f"max_pool{_n}d_with_indices.default", f"adaptive_max_pool{_n}d.default"],
        _with_indices(R._pool(POS, False, _n)),
    )
    _reg([f"avg_pool{_n}d.default", f"adaptive_avg_pool{_n}d.default"], R._pool(ANY, True, _n))

_reg(["layer_norm.default"], R._f_layer_norm)


def _rms_norm(ctx: RuleContext) -> None:
    shape = ctx.arg(1, "normalized_shape")
    w = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("weight")
    w = w if isinstance(w, TensorAxes) else None
    # without a weight: x / rms(x), which rotations pass (see _norm_last)
    R._norm_last(ctx, len(shape), w, None, rms=w is None)


_reg(["rms_norm.default"], _rms_norm)


def _group_norm(ctx: RuleContext) -> None:
    x, y = R._x(ctx), R._y(ctx)
    groups = int(ctx.arg(1, "num_groups"))
    w = ctx.args[2] if len(ctx.args) > 2 and isinstance(ctx.args[2], TensorAxes) else None
    b = ctx.args[3] if len(ctx.args) > 3 and isinstance(ctx.args[3], TensorAxes) else None
    for d in range(x.ndim):
        if d != 1:
            R._batch(ctx, x, y, [d], [d])
    ctx.same(x, 1, y, 1)
    ctx.stop(x, 1)
    if groups > 1 and x.dims[1]:
        if ctx.store.split_atom(x.dims[1][0], "prod", [groups, x.shape[1] // groups]) is None:
            raise ValueError("group split")
    if w is None and b is None:
        ctx.stop(y, 1)
        return
    for p in (w, b):
        if p is not None and p.param is not None:
            ctx.source(p, 0, y, 1, rotation=False)
        elif p is not None:
            ctx.same(p, 0, y, 1)
            ctx.stop(y, 1)


_reg(["group_norm.default"], _group_norm)


def _embedding(ctx: RuleContext) -> None:
    """``aten.embedding(weight, indices)``: rows are looked up by id (pinned), columns write the units."""
    w, x = ctx.args[0], ctx.args[1]
    y = R._y(ctx)
    R._batch(ctx, x, y, range(x.ndim), range(x.ndim))
    ctx.pin(w, 0)
    if w.param is not None:
        ctx.source(w, 1, y, -1)
    else:
        ctx.elementwise(w, 1, y, -1)


_reg(["embedding.default"], _embedding)


def _repeat_heads(ctx: RuleContext, t: TensorAxes, g: int) -> TensorAxes:
    """``t`` (..., H, S, E) with every head repeated ``g`` times (head j of the result is head j // g), as
    ``enable_gqa`` does: an expand of a new size-g dim after the heads, then a reshape (Hugging Face's
    ``repeat_kv``)."""
    lead, h = t.shape[:-3], t.shape[-3]
    e = ctx.new_value(lead + (h, g) + t.shape[-2:])
    for d in range(t.ndim):
        ctx.elementwise(t, d, e, d if d < t.ndim - 2 else d + 1)
    ctx.stop(e, t.ndim - 2)  # the copies of a head: equal, so permuting them changes nothing
    r = ctx.new_value(lead + (h * g,) + t.shape[-2:])
    R._reshape(_with(ctx, [e], (), output=r))
    return r


def _sdpa(ctx: RuleContext) -> None:
    q, k, v = ctx.args[0], ctx.args[1], ctx.args[2]
    y = R._y(ctx)
    if ctx.arg(7, "enable_gqa", False) and q.shape[-3] != k.shape[-3]:
        if q.ndim < 3 or q.shape[-3] % k.shape[-3] or k.shape[-3] != v.shape[-3]:
            raise UnsupportedCall("scaled_dot_product_attention with enable_gqa and uneven heads")
        g = q.shape[-3] // k.shape[-3]
        k, v = _repeat_heads(ctx, k, g), _repeat_heads(ctx, v, g)
    R._sdpa(_with(ctx, [q, k, v], ctx.real_args[:3]))
    mask = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("attn_mask")
    if not isinstance(mask, TensorAxes):
        return
    # the mask is added to (or selects) the scores (*batch, L, S): its dims are the batch / head dims of
    # the output, the query positions and the key positions
    for dm in range(mask.ndim):
        if mask.shape[dm] == 1:
            continue
        j = y.ndim - mask.ndim + dm  # the dim of the scores it broadcasts to
        if j == y.ndim - 1:
            ctx.same(mask, dm, k, -2)
        elif j == y.ndim - 2:
            ctx.same(mask, dm, q, -2)
        elif j >= 0 and y.shape[j] == mask.shape[dm]:
            ctx.same(mask, dm, y, j)
        else:
            ctx.pin(mask, dm)
        ctx.stop(mask, dm)


_reg(["scaled_dot_product_attention.default"], _sdpa)
_reg(
    ["_softmax.default", "softmax.int", "_log_softmax.default", "log_softmax.int", "_safe_softmax.default"], R._softmax
)


def _reduction(group: int, linear: bool, dim_i: int = 1, keep_i: int = 2):
    """Reductions: ``dim`` at ``dim_i`` (``None`` or ``[]``: every dim), ``keepdim`` at ``keep_i``."""

    def rule(ctx: RuleContext) -> None:
        dim = ctx.arg(dim_i, "dim", None)
        if isinstance(dim, (tuple, list)) and len(dim) == 0:
            dim = None
        keep = bool(ctx.arg(keep_i, "keepdim", False))
        R._reduce(group, linear)(_with(ctx, ctx.args[:1], (ctx.real_args[0], dim, keep)))

    return rule


_reg(["mean.dim", "mean.default", "sum.dim_IntList", "sum.default"], _reduction(ANY, True))
_reg(["amax.default", "amin.default"], _reduction(POS, False))
_reg(["logsumexp.default"], _reduction(NONE, False))
_reg(["var.correction", "var.dim", "std.correction", "std.dim", "var.default", "std.default"], _reduction(NONE, False))
_reg(["linalg_vector_norm.default"], _reduction(NONE, False, 2, 3))


# ---------------------------------------------------------------------------- shapes

_reg(
    [
        "view.default",
        "_unsafe_view.default",
        "reshape.default",
        "view_as.default",
        "reshape_as.default",
        "_reshape_alias.default",
        "view_copy.default",
        "flatten.using_ints",
        "unflatten.int",
        "squeeze.default",
        "squeeze.dim",
        "squeeze.dims",
        "unsqueeze.default",
        "ravel.default",
    ],
    R._reshape,
)
_reg(["permute.default"], R._permute)
_reg(["transpose.int", "swapaxes.default", "swapdims.default"], R._transpose)
_reg(["t.default"], R._t)


def _movedim(ctx: RuleContext) -> None:
    x = R._x(ctx)
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    order = list(range(x.ndim))
    src, dst = src % x.ndim, dst % x.ndim
    order.pop(src)
    order.insert(dst, src)
    R._reorder(ctx, order)


_reg(["movedim.int"], _movedim)
_reg(["numpy_T.default"], lambda ctx: R._reorder(ctx, list(range(R._x(ctx).ndim))[::-1]))
_reg(["mT.default", "adjoint.default"], R._mT)


def _expand(ctx: RuleContext) -> None:
    x, y = R._x(ctx), R._y(ctx)
    node = ctx.graph_node
    source = node.args[0] if node is not None and node.args else None
    constant = isinstance(source, fx.Node) and source not in ctx.detector.param_dependent
    off = y.ndim - x.ndim
    for d in range(y.ndim):
        k = d - off
        if k >= 0 and x.shape[k] == y.shape[d]:
            ctx.elementwise(x, k, y, d)
        elif y.shape[d] != 1:
            # broadcast: y is the same along this dim, so a permutation of it changes nothing
            (ctx.pin if constant else ctx.stop)(y, d)


_reg(["expand.default", "expand_as.default"], _expand)


def _slice(ctx: RuleContext) -> None:
    x, y = R._x(ctx), R._y(ctx)
    d = ctx.arg(1, "dim", 0) % x.ndim
    step = ctx.arg(4, "step", 1)
    whole = x.shape[d] == y.shape[d] and step in (None, 1)
    _keep_but(ctx, x, y, d, whole)


def _narrow(ctx: RuleContext) -> None:
    x, y = R._x(ctx), R._y(ctx)
    d = ctx.arg(1, "dim") % x.ndim
    _keep_but(ctx, x, y, d, x.shape[d] == y.shape[d])


def _keep_but(ctx: RuleContext, x: TensorAxes, y: TensorAxes, d: int, whole: bool) -> None:
    for k in range(x.ndim):
        if k != d or whole:
            ctx.elementwise(x, k, y, k)
        else:  # a part of the positions: their order matters
            ctx.pin(x, k)
            ctx.pin(y, k)


_reg(["slice.Tensor"], _slice)
_reg(["narrow.default"], _narrow)


def _select(ctx: RuleContext) -> None:
    x, y = R._x(ctx), R._y(ctx)
    d = ctx.arg(1, "dim") % x.ndim
    ctx.pin(x, d)
    for k in range(x.ndim):
        if k != d:
            ctx.elementwise(x, k, y, k if k < d else k - 1)


def _index_select(ctx: RuleContext) -> None:
    x, y = R._x(ctx), R._y(ctx)
    d = ctx.arg(1, "dim") % x.ndim
    for t in ctx.inputs[1:]:
        ctx.pin(t)
    ctx.pin(x, d)
    ctx.pin(y, d)
    for k in range(x.ndim):
        if k != d:
            ctx.elementwise(x, k, y, k)


def _unbind(ctx: RuleContext) -> None:
    x = R._x(ctx)
    d = ctx.arg(1, "dim", 0) % x.ndim
    ctx.pin(x, d)
    for o in _outputs(ctx):
        for k in range(x.ndim):
            if k != d:
                ctx.elementwise(x, k, o, k if k < d else k - 1)


_reg(["select.int"], _select)
_reg(["index_select.default"], _index_select)
_reg(["unbind.int"], _unbind)
_reg(["cat.default", "concat.default", "concatenate.default"], R._cat)
_reg(["stack.default"], R._stack)
_reg(["split.Tensor", "split_with_sizes.default"], R._split)
_reg(["chunk.default"], R._chunk)


# ---------------------------------------------------------------------------- constants


def _uniform(ctx: RuleContext) -> None:
    """A constant with the same value everywhere (zeros, ones, full, *_like): no permutation changes it,
    so its dims are only stopped (nothing per-unit passes), not pinned; its inputs give only a shape."""
    for y in _outputs(ctx):
        ctx.stop(y)


def _pin_everything(ctx: RuleContext) -> None:
    """Ops that depend on the positions of every dim (tril / triu)."""
    for t in ctx.inputs + _outputs(ctx):
        ctx.pin(t)


_reg(
    [
        "zeros.default",
        "ones.default",
        "full.default",
        "zeros_like.default",
        "ones_like.default",
        "full_like.default",
        "new_zeros.default",
        "new_ones.default",
        "new_full.default",
        "scalar_tensor.default",
        "fill.Scalar",
    ],
    _uniform,
)
_reg(
    [
        "arange",
        "eye",
        "empty.memory_format",
        "empty_like.default",
        "new_empty.default",
        "empty_strided.default",
        "rand",
        "randn",
        "randint",
        "rand_like.default",
        "randn_like.default",
        "randint_like",
    ],
    R._constant,
)
_reg(["tril.default", "triu.default"], _pin_everything)
