"""Built-in rules: one small function per op or module type (see :mod:`mirrorsym.detect.context`).

Conventions every rule follows: dims that an op treats as a batch (it acts on each index separately but
its result is not a per-unit rescaling, e.g. a Linear's leading dims) are ``same`` + ``stop``; dims an
op depends on the order of (convolution windows, indexing, positions) are pinned; anything a rule does
not understand makes it raise, and the detector then treats the call as unknown (pinned, warned).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .context import ANY, NEG, NONE, POS, RuleContext, TensorAxes, UnsupportedCall
from .registry import builtins_loaded, register_rule

# ---------------------------------------------------------------------------- helpers


def _x(ctx: RuleContext) -> TensorAxes:
    x = ctx.args[0] if ctx.args else ctx.inputs[0]
    if not isinstance(x, TensorAxes):
        raise TypeError("first argument is not a tensor")
    return x


def _y(ctx: RuleContext) -> TensorAxes:
    y = ctx.output[0] if isinstance(ctx.output, tuple) else ctx.output
    if not isinstance(y, TensorAxes):
        raise TypeError("output is not a tensor")
    return y


def _required(ctx: RuleContext, name: str) -> TensorAxes:
    """The module's own parameter ``name``, which the rule cannot do without."""
    p = ctx.param(name)
    if p is None:
        raise UnsupportedCall(f"{ctx.where()} has no {name!r}")
    return p


def _unary(group: int, linear: bool):
    """An elementwise function of one tensor (activations, dropout, casts)."""

    def rule(ctx: RuleContext) -> None:
        x, y = _x(ctx), _y(ctx)
        if x.shape != y.shape:
            raise ValueError("shape changed")
        for d in range(y.ndim):
            ctx.elementwise(x, d, y, d, group, linear)

    return rule


def _batch(ctx: RuleContext, x: TensorAxes, y: TensorAxes, dims_x, dims_y) -> None:
    for dx, dy in zip(dims_x, dims_y, strict=True):
        ctx.same(x, dx, y, dy)
        ctx.stop(x, dx)
        ctx.stop(y, dy)


# ---------------------------------------------------------------------------- activations

_POS_HOMOGENEOUS = [F.relu, torch.relu, F.leaky_relu, F.relu_, torch.relu_]
_ODD = [
    torch.tanh,
    F.tanh,
    torch.sin,
    F.softsign,
    F.tanhshrink,
    F.hardshrink,
    F.softshrink,
    torch.atan,
    torch.asinh,
    torch.sinh,
    torch.erf,
    torch.sign,
    torch.arctan,
    torch.arcsinh,
]
_LINEAR = [
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.neg,
    operator.neg,
    torch.Tensor.contiguous,
    torch.clone,
]
_PERMUTATION_ONLY = [
    torch.sigmoid,
    F.sigmoid,
    F.gelu,
    F.silu,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.mish,
    F.relu6,
    F.hardswish,
    F.hardsigmoid,
    F.logsigmoid,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
]
_EVEN = [torch.abs, torch.square, torch.cos]

fn: object  # the loops below register rules for functions of every signature
for fn in _POS_HOMOGENEOUS:
    register_rule(fn, _unary(POS, False))
for fn in _ODD:
    register_rule(fn, _unary(NEG, False))
for fn in _LINEAR:
    register_rule(fn, _unary(ANY, True))
for fn in _PERMUTATION_ONLY:
    register_rule(fn, _unary(NONE, False))


def _even(ctx: RuleContext, square: bool = False) -> None:
    """An even elementwise function (x², |x|, cos x: f(−x) = f(x)). The result does not see the sign of its
    input's units, so a sign flip stops here (only sign flips may reach the input); the result itself is
    unchanged by any per-unit transform, so nothing per-unit may arrive at it either.

    A square (``square``) whose every use sums or averages it over a dim (``mean(x², -1)``, the statistic of
    an RMS norm) reads that dim of ``x`` only through ``sum_i x_i²``, which every orthogonal transform of
    the units leaves unchanged: rotations of that dim pass here too (:meth:`RuleContext.absorb_orthogonal`).
    Only when the graph node is known (both tracers hand it over) and every use of it is such a reduction
    of the square itself; anything else (x⁴, |x|, a square also read elementwise) keeps the sign flips
    only."""
    x, y = _x(ctx), _y(ctx)
    if x.shape != y.shape:
        raise ValueError("shape changed")
    summed = _summed_dims(ctx.graph_node, y.ndim) if square else set()
    for d in range(y.ndim):
        ctx.same(x, d, y, d)
        if d in summed:
            ctx.absorb_orthogonal(x, d)
        else:
            ctx.absorb_signs(x, d)
        ctx.stop(y, d)


def _square(ctx: RuleContext) -> None:
    _even(ctx, square=True)


_SUMS = {torch.sum, torch.mean, "sum", "mean"}
_SUMS_ATEN_DIM = {torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.dim}
_SUMS_ATEN_ALL = {torch.ops.aten.sum.default, torch.ops.aten.mean.default}


def _summed_dims(node: Any, ndim: int) -> set[int]:
    """The dims that every use of ``node``'s value sums or averages over (``torch.sum`` / ``torch.mean`` /
    the methods / their ATen overloads, with the value as the reduced tensor and nowhere else among the
    arguments); empty when ``node`` is unknown, unused, or has any other use."""
    if not isinstance(node, fx.Node) or not node.users:
        return set()
    out = set(range(ndim))
    for u in node.users:
        dims = _reduced_dims(u, node, ndim)
        if dims is None:
            return set()
        out &= dims
    return out


def _reduced_dims(u: fx.Node, node: fx.Node, ndim: int) -> set[int] | None:
    if u.op not in ("call_function", "call_method") or not u.args or u.args[0] is not node:
        return None
    if any(a is node for a in u.args[1:]) or any(v is node for v in u.kwargs.values()):
        return None
    t = u.target
    if u.op == "call_method" and t not in ("sum", "mean"):
        return None
    if u.op == "call_function":
        if t in _SUMS_ATEN_ALL:
            return set(range(ndim))
        if not (t in _SUMS_ATEN_DIM or (callable(t) and t in _SUMS)):
            return None
    dim = u.kwargs["dim"] if "dim" in u.kwargs else (u.args[1] if len(u.args) > 1 else None)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return set(range(ndim))  # every dim (ATen writes "all" as dim=[])
    out: set[int] = set()
    for d in dim if isinstance(dim, (list, tuple)) else [dim]:
        if not isinstance(d, int) or isinstance(d, bool):
            return None
        out.add(d % ndim)
    return out


for fn in _EVEN:
    register_rule(fn, _square if fn is torch.square else _even)

for name in ["relu", "relu_"]:
    register_rule(name, _unary(POS, False), method=True)
for name in ["tanh", "sin", "sign", "atan", "asinh", "sinh", "erf"]:
    register_rule(name, _unary(NEG, False), method=True)
for name in [
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "to",
    "type_as",
    "neg",
    "requires_grad_",
]:
    register_rule(name, _unary(ANY, True), method=True)
for name in ["sigmoid", "exp", "log", "sqrt", "rsqrt"]:
    register_rule(name, _unary(NONE, False), method=True)
for name in ["abs", "cos"]:
    register_rule(name, _even, method=True)
register_rule("square", _square, method=True)


@register_rule(F.hardtanh)
def _hardtanh(ctx: RuleContext) -> None:
    lo, hi = ctx.arg(1, "min_val", -1.0), ctx.arg(2, "max_val", 1.0)
    _unary(NEG if lo == -hi else NONE, False)(ctx)


for cls in [nn.ReLU, nn.LeakyReLU]:
    register_rule(cls, _unary(POS, False))
for cls in [nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink]:
    register_rule(cls, _unary(NEG, False))
for cls in [nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout]:
    register_rule(cls, _unary(ANY, True))
for cls in [
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
]:
    register_rule(cls, _unary(NONE, False))


@register_rule(nn.Hardtanh)
def _hardtanh_module(ctx: RuleContext) -> None:
    m = ctx.module
    if type(m) is nn.ReLU6:
        return _unary(NONE, False)(ctx)
    return _unary(NEG if m.min_val == -m.max_val else NONE, False)(ctx)


@register_rule(nn.PReLU)
def _prelu(ctx: RuleContext) -> None:
    y = _y(ctx)
    _unary(POS, False)(ctx)
    w = ctx.param("weight")
    if w is not None and w.shape[0] > 1:
        ctx.passive(w, 0, y, 1 if y.ndim > 1 else 0)


# ---------------------------------------------------------------------------- arithmetic


def _aligned(t, y: TensorAxes, d: int) -> int | None:
    """The dim of operand ``t`` that broadcasts to dim ``d`` of ``y`` with the full size, or None."""
    if not isinstance(t, TensorAxes):
        return None
    k = d - (y.ndim - t.ndim)
    if k < 0 or t.shape[k] != y.shape[d] or y.shape[d] == 1:
        return None
    return k


def _additive(ctx: RuleContext) -> None:
    a, b = ctx.args[0], ctx.args[1]
    y = _y(ctx)
    for d in range(y.ndim):
        carried = 0
        for t in (a, b):
            k = _aligned(t, y, d)
            if k is None:
                continue
            carried += 1
            if t.param is not None:
                ctx.source(t, k, y, d)
            else:
                ctx.elementwise(t, k, y, d)
        if carried < 2 and y.shape[d] != 1:
            ctx.stop(y, d)  # one side is constant along this dim: x + c is not per-unit equivariant


def _multiplicative(ctx: RuleContext, divide: bool = False) -> None:
    a, b = ctx.args[0], ctx.args[1]
    y = _y(ctx)
    for d in range(y.ndim):
        ka, kb = _aligned(a, y, d), _aligned(b, y, d)
        if ka is not None and kb is None:
            ctx.elementwise(a, ka, y, d)
        elif ka is None and kb is not None:
            if divide:  # c / x
                ctx.elementwise(b, kb, y, d, NONE, False)
            else:
                ctx.elementwise(b, kb, y, d)
        elif ka is not None and kb is not None:
            pairs = [(a, ka, b, kb)] + ([] if divide else [(b, kb, a, ka)])
            for first, kf, other, ko in pairs:
                if other.param is not None and first.param is None:
                    ctx.elementwise(first, kf, y, d)  # x * p: p rides along with the units
                    ctx.passive(other, ko, y, d)
                    break
            else:  # a product of two activations: permutations pass, nothing else
                ctx.same(a, ka, y, d)
                ctx.same(b, kb, y, d)
                ctx.stop(a, ka)
                ctx.stop(b, kb)
                ctx.stop(y, d)


for fn in [operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub]:
    register_rule(fn, _additive)
for name in ["add", "add_", "sub", "sub_", "__add__", "__sub__", "__radd__"]:
    register_rule(name, _additive, method=True)
for fn in [operator.mul, operator.imul, torch.mul]:
    register_rule(fn, _multiplicative)
for name in ["mul", "mul_", "__mul__", "__rmul__"]:
    register_rule(name, _multiplicative, method=True)


def _div(ctx: RuleContext) -> None:
    _multiplicative(ctx, divide=True)


for fn in [operator.truediv, operator.itruediv, torch.div]:
    register_rule(fn, _div)
for name in ["div", "div_", "__truediv__"]:
    register_rule(name, _div, method=True)


# ---------------------------------------------------------------------------- constants


def _constant(ctx: RuleContext) -> None:
    """Tensor factories (arange, zeros, ...): a constant whose entries depend on position."""
    for t in ctx.inputs:
        ctx.stop(t)
    out = ctx.output if isinstance(ctx.output, tuple) else (ctx.output,)
    for y in out:
        if isinstance(y, TensorAxes):
            ctx.pin(y)


for fn in [
    torch.arange,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.eye,
    torch.tensor,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
]:
    register_rule(fn, _constant)
for name in ["new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"]:
    register_rule(name, _constant, method=True)


def _positional(ctx: RuleContext) -> None:
    """Ops whose result depends on the positions along every dim of their input (tril / triu keep the
    entries on one side of the diagonal): everything they touch is fixed."""
    for t in ctx.inputs:
        ctx.pin(t)
    out = ctx.output if isinstance(ctx.output, tuple) else (ctx.output,)
    for y in out:
        if isinstance(y, TensorAxes):
            ctx.pin(y)


for fn in [torch.tril, torch.triu]:
    register_rule(fn, _positional)
for name in ["tril", "triu"]:
    register_rule(name, _positional, method=True)


def _pow(ctx: RuleContext) -> None:
    """``x ** c`` with a constant exponent: an even integer c is an even function (the sum of squares in an
    RMSNorm), an odd one an odd function (sign flips pass), anything else lets only permutations pass."""
    if not isinstance(ctx.args[0], TensorAxes) or isinstance(ctx.args[1], TensorAxes):
        raise UnsupportedCall("pow with a tensor exponent")
    c = ctx.arg(1, "exponent")
    integer = isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer() and c > 0
    if integer and int(c) % 2 == 0:
        _even(ctx, square=int(c) == 2)
    else:
        _unary(NEG if integer else NONE, False)(ctx)


for fn in [torch.pow, operator.pow]:
    register_rule(fn, _pow)
for name in ["pow", "__pow__"]:
    register_rule(name, _pow, method=True)


# ---------------------------------------------------------------------------- shape ops


def _reshape(ctx: RuleContext) -> None:
    x, y = _x(ctx), _y(ctx)
    atoms = [a for dim in x.dims for atom in dim for a in ctx.store.prod_atoms(atom)]
    parts = ctx.store.group_prod(atoms, list(y.shape))
    if parts is None:
        raise ValueError(f"reshape {x.shape} -> {y.shape} does not split along unit boundaries")
    y.dims = parts
    for i in range(x.ndim):
        for j in range(y.ndim):
            ctx.link(x, i, y, j)


for fn in [torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.ravel]:
    register_rule(fn, _reshape)
for name in [
    "view",
    "reshape",
    "flatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "unflatten",
    "ravel",
]:
    register_rule(name, _reshape, method=True)
for cls in [nn.Flatten, nn.Unflatten]:
    register_rule(cls, _reshape)


def _reorder(ctx: RuleContext, order: list[int]) -> None:
    x, y = _x(ctx), _y(ctx)
    y.dims = [x.dims[k] for k in order]
    for j, k in enumerate(order):
        ctx.link(x, k, y, j)


def _transpose(ctx: RuleContext) -> None:
    x = _x(ctx)
    d0, d1 = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
    order = list(range(x.ndim))
    d0, d1 = d0 % x.ndim, d1 % x.ndim
    order[d0], order[d1] = order[d1], order[d0]
    _reorder(ctx, order)


def _permute(ctx: RuleContext) -> None:
    x = _x(ctx)
    dims = ctx.real_args[1:] if len(ctx.real_args) > 1 else ctx.real_kwargs.get("dims")
    if dims is None:
        raise UnsupportedCall("permute without its dims")
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    _reorder(ctx, [d % x.ndim for d in dims])


def _t(ctx: RuleContext) -> None:
    x = _x(ctx)
    _reorder(ctx, list(range(x.ndim))[::-1] if x.ndim == 2 else list(range(x.ndim)))


def _mT(ctx: RuleContext) -> None:
    x = _x(ctx)
    order = list(range(x.ndim))
    order[-2], order[-1] = order[-1], order[-2]
    _reorder(ctx, order)


for fn in [torch.transpose, torch.swapaxes]:
    register_rule(fn, _transpose)
for name in ["transpose", "swapaxes"]:
    register_rule(name, _transpose, method=True)
register_rule(torch.permute, _permute)
register_rule("permute", _permute, method=True)
register_rule(torch.t, _t)
register_rule("t", _t, method=True)


def _getattr(ctx: RuleContext) -> None:
    name = ctx.arg(1, "name")
    if name == "T" or (name == "mT" and _x(ctx).ndim == 2):
        return _t(ctx)
    if name == "mT":
        return _mT(ctx)
    if name in ("data",):
        return _unary(ANY, True)(ctx)
    raise ValueError(f"attribute {name}")


register_rule(getattr, _getattr)


def _expand(ctx: RuleContext) -> None:
    x, y = _x(ctx), _y(ctx)
    off = y.ndim - x.ndim
    for d in range(y.ndim):
        k = d - off
        if k >= 0 and x.shape[k] == y.shape[d]:
            ctx.elementwise(x, k, y, d)
        else:
            ctx.pin(y, d)


register_rule("expand", _expand, method=True)
register_rule("expand_as", _expand, method=True)


def _getitem(ctx: RuleContext) -> None:
    x, y = _x(ctx), _y(ctx)
    index = ctx.real_args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.Tensor, list)) for i in index):
        raise TypeError("advanced indexing")
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (x.ndim - sum(1 for i in expanded if i is not None)))
    dx = dy = 0
    for i in expanded:
        if i is None:
            dy += 1
        elif isinstance(i, int):
            ctx.pin(x, dx)
            dx += 1
        elif isinstance(i, slice):
            if i == slice(None) or (
                x.shape[dx] == y.shape[dy] and (i.start in (None, 0)) and i.step in (None, 1)
            ):
                ctx.elementwise(x, dx, y, dy)
            else:
                ctx.pin(x, dx)
                ctx.pin(y, dy)
            dx += 1
            dy += 1
        else:
            raise TypeError(f"index {i!r}")


register_rule(operator.getitem, _getitem)


def _cat(ctx: RuleContext) -> None:
    tensors = [t for t in ctx.args[0] if isinstance(t, TensorAxes)]
    y = _y(ctx)
    d = ctx.arg(1, "dim", 0) % y.ndim
    for t in tensors:
        for k in range(y.ndim):
            if k != d:
                ctx.elementwise(t, k, y, k)
    sizes = [t.shape[d] for t in tensors]
    if y.shape[d] == 1 or not y.dims[d]:
        return
    parts = ctx.store.split_atom(y.dims[d][0], "sum", sizes)
    if parts is None:
        raise ValueError("the concatenated axis is already split differently")
    for t, part in zip(tensors, parts, strict=True):
        if t.shape[d] > 1 and not ctx.store.unite_lists(t.dims[d], part):
            ctx.pin(t, d)
        ctx.link(t, d, y, d)


for fn in [torch.cat, torch.concat, torch.concatenate]:
    register_rule(fn, _cat)


def _stack(ctx: RuleContext) -> None:
    tensors = [t for t in ctx.args[0] if isinstance(t, TensorAxes)]
    y = _y(ctx)
    d = ctx.arg(1, "dim", 0) % y.ndim
    for t in tensors:
        for k in range(t.ndim):
            ctx.elementwise(t, k, y, k if k < d else k + 1)
    ctx.pin(y, d)


register_rule(torch.stack, _stack)


def _chunks(ctx: RuleContext, sizes: list[int], d: int) -> None:
    x = _x(ctx)
    outs = list(ctx.output)
    for o in outs:
        for k in range(x.ndim):
            if k != d:
                ctx.elementwise(x, k, o, k)
    atoms = x.dims[d]
    if len(atoms) == 1:
        parts = ctx.store.split_atom(atoms[0], "sum", sizes)
        if parts is None:
            raise ValueError("incompatible split")
    elif len(set(sizes)) == 1 and ctx.store.size[ctx.store.find(atoms[0])] == len(sizes):
        ctx.store.pin(atoms[0], f"chunk at {ctx.path}")
        parts = [atoms[1:]] * len(sizes)
    else:
        raise ValueError("chunk across a composite dim")
    for o, part in zip(outs, parts, strict=True):
        o.dims[d] = list(part)
        ctx.link(x, d, o, d)


def _chunk(ctx: RuleContext) -> None:
    x = _x(ctx)
    d = ctx.arg(2, "dim", 0) % x.ndim
    _chunks(ctx, [o.shape[d] for o in ctx.output], d)


def _split(ctx: RuleContext) -> None:
    x = _x(ctx)
    d = ctx.arg(2, "dim", 0) % x.ndim
    _chunks(ctx, [o.shape[d] for o in ctx.output], d)


register_rule(torch.chunk, _chunk)
register_rule("chunk", _chunk, method=True)
register_rule(torch.split, _split)
register_rule("split", _split, method=True)


# ---------------------------------------------------------------------------- reductions and softmax


def _reduce(group: int, linear: bool):
    def rule(ctx: RuleContext) -> None:
        x = _x(ctx)
        y = _y(ctx)
        dim = ctx.arg(1, "dim", None)
        keep = ctx.arg(2, "keepdim", False)
        if dim is None:
            reduced = set(range(x.ndim))
        else:
            reduced = {d % x.ndim for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
        j = 0
        for d in range(x.ndim):
            if d in reduced:
                ctx.stop(x, d)  # mixes the units (permutation-invariant, not per-unit)
                j += 1 if keep else 0
                continue
            ctx.elementwise(x, d, y, j, group, linear)
            j += 1

    return rule


for fn, name, group, lin in [
    (torch.sum, "sum", ANY, True),
    (torch.mean, "mean", ANY, True),
    (torch.amax, "amax", POS, False),
    (torch.amin, "amin", POS, False),
    (torch.logsumexp, "logsumexp", NONE, False),
    (torch.var, "var", NONE, False),
    (torch.std, "std", NONE, False),
    (torch.norm, "norm", NONE, False),
]:
    register_rule(fn, _reduce(group, lin))
    register_rule(name, _reduce(group, lin), method=True)


def _softmax(ctx: RuleContext) -> None:
    x, y = _x(ctx), _y(ctx)
    for d in range(x.ndim):
        ctx.elementwise(x, d, y, d, NONE, False)


for fn in [F.softmax, F.log_softmax, torch.softmax, torch.log_softmax]:
    register_rule(fn, _softmax)
for name in ["softmax", "log_softmax"]:
    register_rule(name, _softmax, method=True)
for cls in [nn.Softmax, nn.LogSoftmax]:
    register_rule(cls, _softmax)


# ---------------------------------------------------------------------------- contractions


def _einsum_like(ctx: RuleContext, a: TensorAxes, la: str, b: TensorAxes, lb: str, y: TensorAxes, ly: str):
    for letter in sorted(set(la + lb + ly)):
        ia, ib, iy = la.find(letter), lb.find(letter), ly.find(letter)
        in_a = ia >= 0 and a.shape[ia] != 1
        in_b = ib >= 0 and b.shape[ib] != 1
        if iy >= 0 and y.shape[iy] == 1:
            continue
        if iy >= 0 and in_a and in_b:
            _batch(ctx, a, y, [ia], [iy])
            ctx.same(b, ib, y, iy)
            ctx.stop(b, ib)
        elif iy >= 0 and (in_a or in_b):
            t, i = (a, ia) if in_a else (b, ib)
            if t.param is not None:
                ctx.source(t, i, y, iy)
            else:
                ctx.elementwise(t, i, y, iy)
        elif iy < 0 and in_a and in_b:
            if a.param is not None and b.param is None:
                ctx.sink(b, ib, a, ia)
            elif b.param is not None and a.param is None:
                ctx.sink(a, ia, b, ib)
            else:
                ctx.contract(a, ia, b, ib)
        elif iy < 0:
            t, i = (a, ia) if in_a else (b, ib)
            if i >= 0 and t.shape[i] != 1:
                ctx.stop(t, i)
        else:
            ctx.pin(y, iy)


def _matmul(ctx: RuleContext) -> None:
    a, b = ctx.args[0], ctx.args[1]
    y = _y(ctx)
    letters = "abcdefghij"
    if a.ndim == 1 and b.ndim == 1:
        return _einsum_like(ctx, a, "k", b, "k", y, "")
    la = "k" if a.ndim == 1 else letters[: a.ndim - 2] + "nk"
    if b.ndim == 1:
        lb, ly = "k", la[:-1]
    else:
        nb = max(a.ndim, b.ndim) - 2
        batch = letters[:nb]
        la = "k" if a.ndim == 1 else batch[nb - (a.ndim - 2) :] + "nk"
        lb = batch[nb - (b.ndim - 2) :] + "km"
        ly = batch + ("m" if a.ndim == 1 else "nm")
    _einsum_like(ctx, a, la, b, lb, y, ly)


for fn in [torch.matmul, operator.matmul, torch.bmm, torch.mm]:
    register_rule(fn, _matmul)
for name in ["matmul", "bmm", "mm", "__matmul__"]:
    register_rule(name, _matmul, method=True)


@register_rule(torch.einsum)
def _einsum(ctx: RuleContext) -> None:
    eq = ctx.real_args[0].replace(" ", "")
    ops = [t for t in ctx.args[1:] if isinstance(t, TensorAxes)]
    if len(ops) == 1 and isinstance(ctx.args[1], (tuple, list)):
        ops = list(ctx.args[1])
    lhs, ly = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or "." in eq:
        raise ValueError("only two-operand einsum without ellipsis")
    _einsum_like(ctx, ops[0], terms[0], ops[1], terms[1], _y(ctx), ly)


def _linear_core(ctx: RuleContext, x: TensorAxes, w: TensorAxes, b: TensorAxes | None, y: TensorAxes):
    _batch(ctx, x, y, range(x.ndim - 1), range(y.ndim - 1))
    if w.param is not None:
        ctx.sink(x, -1, w, 1)
        ctx.source(w, 0, y, -1)
    else:
        ctx.contract(x, -1, w, 1)
        ctx.elementwise(w, 0, y, -1)
    if b is not None:
        if b.param is not None:
            ctx.source(b, 0, y, -1)
        else:
            ctx.elementwise(b, 0, y, -1)


@register_rule(nn.Linear)
def _linear(ctx: RuleContext) -> None:
    _linear_core(ctx, _x(ctx), _required(ctx, "weight"), ctx.param("bias"), _y(ctx))


@register_rule(F.linear)
def _f_linear(ctx: RuleContext) -> None:
    w = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs["weight"]
    b = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("bias")
    _linear_core(ctx, _x(ctx), w, b if isinstance(b, TensorAxes) else None, _y(ctx))


@register_rule(nn.Bilinear)
def _bilinear(ctx: RuleContext) -> None:
    raise UnsupportedCall("nn.Bilinear")


def _conv_core(ctx: RuleContext, x, w, b, y, groups: int, transposed: bool = False) -> None:
    ctx.same(x, 0, y, 0) if x.ndim == y.ndim else None
    if x.ndim == y.ndim:
        ctx.stop(x, 0)
        ctx.stop(y, 0)
    cx, cy = (1, 1) if x.ndim == y.ndim else (0, 0)
    for d in range(cx + 1, x.ndim):
        ctx.pin(x, d)
    for d in range(cy + 1, y.ndim):
        ctx.pin(y, d)
    win, wout = (0, 1) if transposed else (1, 0)
    if groups == 1:
        ctx.sink(x, cx, w, win)
        ctx.source(w, wout, y, cy)
    elif groups == x.shape[cx] == y.shape[cy] and not transposed:
        # depthwise: channel c is filtered by w[c] alone, so w[c] reads unit c (and absorbs its scale)
        # and writes unit c; per channel, not a rotation on either side
        ctx.same(x, cx, y, cy)
        ctx.sink(x, cx, w, 0)
        ctx.stop_rotation(x, cx)
        ctx.source(w, 0, y, cy, rotation=False)
    else:
        ctx.pin(x, cx)
        ctx.pin(y, cy)
        ctx.pin(w, None)
        if b is not None:
            ctx.pin(b, None)
        return
    if b is not None:
        ctx.source(b, 0, y, cy)
    for d in range(2, w.ndim):
        ctx.pin(w, d)


def _conv(ctx: RuleContext) -> None:
    m = ctx.module
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    if transposed and m.groups != 1:
        raise UnsupportedCall("grouped transposed convolution")
    _conv_core(ctx, _x(ctx), ctx.param("weight"), ctx.param("bias"), _y(ctx), m.groups, transposed)


for cls in [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]:
    register_rule(cls, _conv)


def _f_conv(ctx: RuleContext) -> None:
    w = ctx.args[1]
    b = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("bias")
    groups = ctx.arg(6, "groups", 1)
    _conv_core(ctx, _x(ctx), w, b if isinstance(b, TensorAxes) else None, _y(ctx), groups)


for fn in [F.conv1d, F.conv2d, F.conv3d]:
    register_rule(fn, _f_conv)


@register_rule(nn.Embedding)
def _embedding(ctx: RuleContext) -> None:
    x, y = _x(ctx), _y(ctx)
    w = _required(ctx, "weight")
    _batch(ctx, x, y, range(x.ndim), range(x.ndim))
    ctx.pin(w, 0)  # rows are looked up by token id
    ctx.source(w, 1, y, -1)


# ---------------------------------------------------------------------------- pooling


def _pool(group: int, linear: bool, n_spatial: int):
    """Pooling over the last ``n_spatial`` dims: channels pass through (max pools commute with positive
    scalings only, average pools are linear), the window dims are pinned."""

    def rule(ctx: RuleContext) -> None:
        x, y = _x(ctx), _y(ctx)
        lead = x.ndim - n_spatial
        for d in range(lead):
            ctx.elementwise(x, d, y, d, group, linear)
        for d in range(lead, x.ndim):
            ctx.pin(x, d)
        for d in range(lead, y.ndim):
            ctx.pin(y, d)

    return rule


target: object  # pooling module classes and functions
for n, (mx, amx, av, aav, fmx, famx, fav, faav) in {
    1: (
        nn.MaxPool1d,
        nn.AdaptiveMaxPool1d,
        nn.AvgPool1d,
        nn.AdaptiveAvgPool1d,
        F.max_pool1d,
        F.adaptive_max_pool1d,
        F.avg_pool1d,
        F.adaptive_avg_pool1d,
    ),
    2: (
        nn.MaxPool2d,
        nn.AdaptiveMaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        F.max_pool2d,
        F.adaptive_max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
    ),
    3: (
        nn.MaxPool3d,
        nn.AdaptiveMaxPool3d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool3d,
        F.max_pool3d,
        F.adaptive_max_pool3d,
        F.avg_pool3d,
        F.adaptive_avg_pool3d,
    ),
}.items():
    for target in (mx, amx, fmx, famx):
        register_rule(target, _pool(POS, False, n))
    for target in (av, aav, fav, faav):
        register_rule(target, _pool(ANY, True, n))


# ---------------------------------------------------------------------------- normalisation


@register_rule(nn.modules.batchnorm._BatchNorm)
def _batchnorm(ctx: RuleContext) -> None:
    x, y = _x(ctx), _y(ctx)
    c = 1 if x.ndim > 1 else 0
    for d in range(x.ndim):
        if d != c:
            _batch(ctx, x, y, [d], [d])
    w, b = ctx.param("weight"), ctx.param("bias")
    for name in ("running_mean", "running_var"):
        ctx.passive(ctx.param(name), 0, x, c)
    ctx.same(x, c, y, c)
    if w is not None:
        ctx.bn_exit(x, c, ctx.path)
        ctx.source(w, 0, y, c, rotation=False)
        ctx.source(b, 0, y, c, rotation=False)
    else:
        ctx.stop(x, c)
        ctx.stop(y, c)


@register_rule(nn.LayerNorm)
def _layernorm(ctx: RuleContext) -> None:
    m = ctx.module
    _norm_last(ctx, len(m.normalized_shape), ctx.param("weight"), ctx.param("bias"))


def _norm_last(ctx: RuleContext, k: int, w, b, rms: bool = False) -> None:
    """A norm over the last ``k`` dims. Its statistics mix the units, so nothing per-unit passes, except
    through an RMS norm (``rms``: x / rms(x), no mean subtracted) the units' signs: they go on to the output,
    or into the weight when there is one (w ⊙ x / rms(x) is unchanged when x_i and w_i flip together).
    An RMS norm without a weight commutes with every orthogonal transform of a normalised dim
    (rms(Qx) = rms(x), so (Qx) / rms(Qx) = Q (x / rms(x))): rotations pass it as well. With a weight they
    do not (Q diag(w) Qᵀ is not diagonal), nor through a LayerNorm (the mean subtraction)."""
    x, y = _x(ctx), _y(ctx)
    for d in range(x.ndim - k):
        _batch(ctx, x, y, [d], [d])
    for j in range(k):
        d = x.ndim - k + j
        if rms and w is None:
            ctx.elementwise(x, d, y, d, NEG, True)
            continue
        ctx.same(x, d, y, d)
        if rms and isinstance(w, TensorAxes) and w.param is not None:
            ctx.absorb_signs(x, d)
            ctx.add_member(x, d, w, j, "absorb")
        else:
            ctx.stop(x, d)
        if w is None and b is None:
            ctx.stop(y, d)
        for p in (w, b):
            if isinstance(p, TensorAxes):
                if p.param is not None:
                    ctx.source(p, j, y, d, rotation=False)
                else:
                    ctx.same(p, j, y, d)
                    ctx.stop(y, d)
        if w is None and b is not None:
            ctx.stop(y, d)


@register_rule(F.layer_norm)
def _f_layer_norm(ctx: RuleContext) -> None:
    shape = ctx.arg(1, "normalized_shape")
    w = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("weight")
    b = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("bias")
    _norm_last(
        ctx, len(shape), w if isinstance(w, TensorAxes) else None, b if isinstance(b, TensorAxes) else None
    )


if hasattr(F, "rms_norm"):

    @register_rule(F.rms_norm)
    def _f_rms_norm(ctx: RuleContext) -> None:
        shape = ctx.arg(1, "normalized_shape")
        w = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("weight")
        _norm_last(ctx, len(shape), w if isinstance(w, TensorAxes) else None, None, rms=True)


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    def _rmsnorm(ctx: RuleContext) -> None:
        shape = ctx.module.normalized_shape
        _norm_last(ctx, len(shape), ctx.param("weight"), None, rms=True)


@register_rule(nn.GroupNorm)
def _groupnorm(ctx: RuleContext) -> None:
    m = ctx.module
    x, y = _x(ctx), _y(ctx)
    for d in range(x.ndim):
        if d != 1:
            _batch(ctx, x, y, [d], [d])
    ctx.same(x, 1, y, 1)
    ctx.stop(x, 1)
    if m.num_groups > 1 and x.dims[1]:
        parts = ctx.store.split_atom(x.dims[1][0], "prod", [m.num_groups, x.shape[1] // m.num_groups])
        if parts is None:
            raise ValueError("group split")
    if m.affine:
        ctx.source(ctx.param("weight"), 0, y, 1, rotation=False)
        ctx.source(ctx.param("bias"), 0, y, 1, rotation=False)
    else:
        ctx.stop(y, 1)


# ---------------------------------------------------------------------------- attention


@register_rule(F.scaled_dot_product_attention)
def _sdpa(ctx: RuleContext) -> None:
    q, k, v = ctx.args[0], ctx.args[1], ctx.args[2]
    y = _y(ctx)
    mask = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("attn_mask")
    if isinstance(mask, TensorAxes):
        ctx.pin(mask)
    nb = y.ndim - 2
    for d in range(nb):
        for t in (q, k, v):
            if t.ndim - 2 + d - nb >= 0 and t.shape[d - nb + t.ndim - 2] != 1:
                ctx.same(t, d - nb + t.ndim - 2, y, d)
                ctx.stop(t, d - nb + t.ndim - 2)
        ctx.stop(y, d)
    ctx.contract(q, -1, k, -1)
    ctx.elementwise(v, -1, y, -1)
    _batch(ctx, q, y, [q.ndim - 2], [y.ndim - 2])
    ctx.same(k, -2, v, -2)
    ctx.stop(k, -2)
    ctx.stop(v, -2)


def _attention_core(ctx: RuleContext, q_in, k_in, v_in, out, weights, E: int, H: int) -> None:
    """Heads of ``nn.MultiheadAttention`` (packed in_proj): one head class shared by the q, k, v rows
    and the out_proj columns; per head, q and k share a contracted axis and v feeds out_proj."""
    m = ctx.module
    dh = E // H
    W, B = _required(ctx, "in_proj_weight"), ctx.param("in_proj_bias")
    Wo, Bo = _required(ctx, "out_proj.weight"), ctx.param("out_proj.bias")
    for d in range(q_in.ndim - 1):
        _batch(ctx, q_in, out, [d], [d])
    for d in range(k_in.ndim - 1):
        ctx.same(k_in, d, v_in, d)
        ctx.stop(k_in, d)
        ctx.stop(v_in, d)
    for t in (q_in, k_in, v_in):
        ctx.sink(t, -1, W, 1)
    if B is not None:
        ctx.same(B, 0, W, 0)
    store = ctx.store
    parts = store.split_atom(W.dims[0][0], "sum", [E, E, E])
    if parts is None:
        raise ValueError("in_proj already split differently")
    split = [store.split_atom(p[0], "prod", [H, dh]) for p in parts]
    wo_split = store.split_atom(Wo.dims[1][0], "prod", [H, dh])
    heads = [h for h in split if h is not None]
    if len(heads) != len(split) or wo_split is None:
        raise ValueError("in_proj already split differently")
    wo_parts = wo_split
    if H == 1:
        heads = [[[], p] for p in parts]
        wo_parts = [[], Wo.dims[1]]
    for h in heads[1:] + [wo_parts]:
        if h[0]:
            store.unite(heads[0][0][0], h[0][0])
    store.unite(heads[0][1][0], heads[1][1][0])  # q and k: one contracted axis per head
    store.unite(heads[2][1][0], wo_parts[1][0])  # v and out_proj columns
    vq, vk, vv = (ctx.new_value((H, dh)) for _ in range(3))
    for v, h in zip((vq, vk, vv), heads, strict=True):
        v.dims = [h[0], h[1]]
        ctx.stop(v, 0)  # the head axis itself carries no scaling
        ctx.add_member(v, 1, W, 0, "source")
        if B is not None:
            ctx.add_member(v, 1, B, 0, "source")
    ctx.contract(vq, 1, vk, 1)
    ctx.add_member(vv, 1, Wo, 1, "sink")
    ctx.source(Wo, 0, out, -1)
    ctx.source(Bo, 0, out, -1)
    if isinstance(weights, TensorAxes):
        ctx.pin(weights)
    del m


@register_rule(nn.MultiheadAttention)
def _mha(ctx: RuleContext) -> None:
    m = ctx.module
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedCall("MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn")
    names = ["query", "key", "value"]
    q, k, v = (ctx.args[i] if i < len(ctx.args) else ctx.kwargs[n] for i, n in enumerate(names))
    for name, i in (("key_padding_mask", 3), ("attn_mask", 5)):
        t = ctx.args[i] if i < len(ctx.args) else ctx.kwargs.get(name)
        if isinstance(t, TensorAxes):
            ctx.pin(t)
    out = ctx.output[0] if isinstance(ctx.output, tuple) else ctx.output
    weights = ctx.output[1] if isinstance(ctx.output, tuple) and len(ctx.output) > 1 else None
    _attention_core(ctx, q, k, v, out, weights, m.embed_dim, m.num_heads)


@register_rule(nn.TransformerEncoderLayer)
def _encoder_layer(ctx: RuleContext) -> None:
    m = ctx.module
    x, y = _x(ctx), _y(ctx)
    for t in ctx.inputs[1:]:
        ctx.pin(t)  # masks

    def attention(h: TensorAxes) -> TensorAxes:
        out = ctx.new_value(h.shape)
        ctx.call("self_attn", h, h, h, output=(out, None))
        return ctx.call("dropout1", out)

    def feed_forward(h: TensorAxes) -> TensorAxes:
        a = ctx.call("linear1", h, output=ctx.new_value(h.shape[:-1] + (m.linear1.out_features,)))
        if isinstance(m.activation, nn.Module):
            a = ctx.call("activation", a)
        else:
            a = ctx.call_function(m.activation, a)
        a = ctx.call("dropout", a)
        b = ctx.call("linear2", a, output=ctx.new_value(h.shape))
        return ctx.call("dropout2", b)

    def add(a: TensorAxes, b: TensorAxes) -> TensorAxes:
        return ctx.call_function(operator.add, a, b)

    if m.norm_first:
        h = add(x, attention(ctx.call("norm1", x)))
        h = add(h, feed_forward(ctx.call("norm2", h)))
    else:
        h = ctx.call("norm1", add(x, attention(x)))
        h = ctx.call("norm2", add(h, feed_forward(h)))
    for d in range(y.ndim):
        ctx.elementwise(h, d, y, d)


@register_rule(nn.TransformerEncoder)
def _encoder(ctx: RuleContext) -> None:
    m = ctx.module
    x, y = _x(ctx), _y(ctx)
    for t in ctx.inputs[1:]:
        ctx.pin(t)
    h = x
    for i in range(len(m.layers)):
        h = ctx.call(f"layers.{i}", h)
    if m.norm is not None:
        h = ctx.call("norm", h)
    for d in range(y.ndim):
        ctx.elementwise(h, d, y, d)


builtins_loaded()  # rules registered from here on are the user's (see registry.lookup_user_by_name)
