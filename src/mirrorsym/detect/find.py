"""From recorded coupling to typed groups: classes, segments, kinds, per-head splits, verification."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ..core.finite import check_finite, check_materialized, check_module_finite
from ..core.mirror import OutputReference, _flatten_outputs
from .context import ANY, NEG, NONE, POS
from .groups import Member, Rotation, SymmetryGroup, make_group, random_elements
from .smap import SymmetryMap
from .trace import Detector, DetectWarning

VERIFY_TOL = 1e-6


def find_symmetries(
    model: nn.Module,
    example_inputs,
    example_kwargs: dict | None = None,
    *,
    verify: bool = True,
    tol: float = VERIFY_TOL,
    seed: int = 0,
) -> SymmetryMap:
    """Find the parameter symmetries of ``model`` (see :mod:`mirrorsym.detect`).

    ``example_inputs``: a Tensor or a tuple of Tensors (floating or integer, e.g. token ids), and
    ``example_kwargs``: keyword inputs (e.g. ``{"decoder_input_ids": ids, "use_cache": False}`` for a
    Hugging Face model), passed as ``model(*example_inputs, **example_kwargs)``. The model is traced with
    ``torch.export`` (``strict=False``), or with ``torch.fx`` when export fails. The model
    is not modified: tracing and verification work on deep copies. Every returned group passed
    verification: a random element (generator seeded with ``seed``) applied to a float64 eval-mode
    copy changes every output by at most ``tol`` relative (max |Δy| / max |y|); groups that fail are
    dropped with a :class:`DetectWarning` naming them. Verification runs in eval mode because dropout
    is random and train-mode BatchNorm uses batch statistics; the groups hold in train mode as well
    (in distribution for dropout, up to BatchNorm's eps for bn_scale). A model under
    ``torch.nn.utils.parametrize`` (e.g. ``ms.constrain``) is read as its plain twin
    (:func:`plain_twin`): the groups name the plain tensors, and act on the constrained model through
    its parametrizations.
    """
    check_materialized(model)
    model = plain_twin(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    det = Detector(model, inputs, kwargs)
    det.run(inputs, kwargs)
    det.warn_unknown()
    groups = build_groups(det)
    unknown = dict(det.unknown)
    del det  # the detector holds a deep copy of the model: free it before verification (peak memory)
    smap = SymmetryMap(groups, unknown_ops=unknown)
    if verify:
        kept = []
        errors = verify_groups(model, inputs, groups, seed=seed, kwargs=kwargs)
        for g, err in zip(groups, errors, strict=True):
            g.error = err
            if err <= tol:
                kept.append(g)
            else:
                warnings.warn(
                    f"mirrorsym.detect: dropped {g.label} ({g.kind}, size {g.size}, layers "
                    f"{g.layers}): a random element changed the outputs by {err:.2e} (> {tol:g}) "
                    "relative; please report this model",
                    DetectWarning,
                    stacklevel=2,
                )
        smap = SymmetryMap(kept, unknown_ops=unknown)
    return smap


def plain_twin(model: nn.Module) -> nn.Module:
    """``model`` itself when nothing in it is parametrized, else a deep copy with every
    parametrization baked into a plain tensor (same names as before registration, same function)."""
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if parametrize.is_parametrized(module):
            private_class(module)
            parametrizations = module.parametrizations
            assert isinstance(parametrizations, nn.ModuleDict)  # what torch.nn.utils.parametrize registers
            for name in list(parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return twin


def private_class(module: nn.Module) -> None:
    """Give a parametrized module its own copy of its injected class.

    ``torch.nn.utils.parametrize`` keeps the parametrized tensors as properties of a per-module class that
    a deepcopy *shares*; removing a parametrization deletes the property from that class, which would break
    the original model. A private copy confines the removal to the copy.
    """
    cls = module.__class__
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


# ---------------------------------------------------------------------------- verification


def float64_eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(torch.float64).eval()


def to_float64(inputs: tuple) -> tuple:
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def verification_baseline(model: nn.Module, inputs: tuple, kwargs: dict | None = None):
    """``(base, run)``: a float64 eval-mode copy of ``model`` and ``run()`` = its outputs on the inputs
    (floating inputs and keyword inputs cast to float64). Refuses non-finite parameters, buffers and
    inputs by name (:class:`~mirrorsym.core.finite.NonFiniteError`): on NaN every change compares as
    small, so a NaN model would "verify"."""
    _check_module_finite(model)
    kwargs = dict(kwargs or {})
    named = [(f"input {i}", x) for i, x in enumerate(inputs)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    check_finite(named, "example")
    base = float64_eval_copy(model)
    xs = to_float64(inputs)
    kw = dict(zip(kwargs, to_float64(tuple(kwargs.values())), strict=True))

    def run():
        with torch.no_grad():
            return base(*xs, **kw)

    return base, run


def verify_groups(
    model: nn.Module,
    inputs: tuple,
    groups: list[SymmetryGroup],
    seed: int = 0,
    kwargs: dict | None = None,
    blockwise: bool | None = None,
) -> list[float]:
    """Per group, the max relative output change after one random element (float64, eval mode).

    Each group alone, with an element drawn away from the identity (see
    :func:`~mirrorsym.detect.groups.random_elements`), so no group passes by accident; a joint check
    could pass by two errors cancelling.

    ``blockwise=False``: one forward pass of a float64 copy of the whole model per group.
    ``blockwise=True`` verifies block by block, still in float64 (see :func:`_verify_blockwise`): a group
    whose tensors all belong to one submodule that the forward pass calls once (a ResNet bottleneck, a
    transformer block, its MLP, its attention) is checked on that submodule alone, on the float64 inputs it
    received, and the error is the relative change of *that submodule's* outputs (unchanged block outputs
    leave the model's outputs unchanged); the other groups (the residual stream, a final norm with the LM
    head) by a whole forward pass in which each block is cast to float64 (and transformed) only while it
    runs. If the model cannot run that way (a module reads another's weights without calling it), the
    whole-model float64 copy is used after all.

    ``blockwise=None`` (the default) chooses by cost: blockwise when the float64 weights it expects to
    run (one reference pass plus, per group, the block that checks it) are at most half of what the
    whole-model checks run (one pass per group plus the reference), and always above
    :data:`VERIFY_BLOCKWISE_BYTES` (2 GiB of float64 weights), where a float64 copy of the whole model
    would not fit the memory goal.
    """
    if blockwise is None:
        big = _float64_bytes(model) > VERIFY_BLOCKWISE_BYTES
        errors = _verify_blockwise(model, inputs, groups, seed, kwargs, cheaper_only=not big)
    elif blockwise:
        errors = _verify_blockwise(model, inputs, groups, seed, kwargs)
    else:
        errors = None
    if errors is not None:
        return errors
    base, forward = verification_baseline(model, inputs, kwargs)
    y0 = forward()
    _warn_if_zero(y0)
    ref = OutputReference(y0)
    del y0
    gen = torch.Generator().manual_seed(seed)
    errors = []
    for g, element in zip(groups, random_elements(groups, generator=gen), strict=True):
        # each group alone: a joint check could pass by two errors cancelling
        with restored(base, [g]):
            g.apply_(base, element)
            errors.append(ref.change(forward()))
    return errors


def _check_module_finite(model: nn.Module) -> None:
    """:func:`~mirrorsym.core.finite.check_module_finite` in one pass per tensor: a float64 sum of a tensor
    is finite iff all its entries are (a finite float32 tensor cannot overflow it); the exact check (with
    the message naming the tensors) runs only when a sum is not finite."""
    check_materialized(model)
    for t in _unique_tensors(model).values():
        if t.is_complex() or (t.is_floating_point() and not math.isfinite(float(t.detach().sum(dtype=torch.float64)))):
            check_module_finite(model)
            return


def _warn_if_zero(y0) -> None:
    if all(float(y.abs().max()) == 0.0 for y in _flatten_outputs(y0) if y.is_floating_point() and y.numel()):
        warnings.warn(
            "mirrorsym.detect: the model's outputs are identically zero on these inputs (e.g. a "
            "zero-initialised last layer), so verification cannot fail; re-initialise that layer "
            "or pass other inputs to get a meaningful check",
            DetectWarning,
            stacklevel=4,
        )


# ---------------------------------------------------------------------------- blockwise verification
# (large models: no float64 copy of the whole model)

VERIFY_BLOCKWISE_BYTES = 2 * 2**30
"""verify_groups goes blockwise when a float64 copy of the model's floating tensors would exceed this."""

_BLOCK_MIN_BYTES = 64 * 2**20
_BLOCK_EXACT = 1e-10  # a block's outputs unchanged up to float64 round-off: the group is verified there


def _unique_tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {id(t): t for t in module.parameters()}
    out.update({id(t): t for t in module.buffers()})
    return out


def _float64_bytes(module: nn.Module) -> int:
    return sum(t.numel() * 8 for t in _unique_tensors(module).values() if t.is_floating_point())


def _to64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy (never the model's own storage, so nothing run on the shell can write into it)."""
    return t.detach().to(torch.float64, copy=True) if t.is_floating_point() else t.detach().clone()


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_clone_tree(v) for v in x)
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    return x


class _Swapper:
    """Runs a *shell* of the model (its module tree with every parameter and buffer replaced by a meta
    tensor, so nothing is duplicated) in float64: while a *block* runs, its tensors are float64 copies of
    the model's, transformed by the group being checked. Blocks: the largest submodules whose float64
    tensors fit in ``budget`` bytes; a module above them swaps only its own tensors, and a module inside a
    block that is called without it (a block in an ``nn.ModuleList``) swaps in what is not in yet. A module
    that reads a tensor outside the block being run meets a meta tensor: some ops then fail, others
    (``F.linear``) return uninitialised memory, so the caller compares the pass with the model itself
    (:func:`_shell_agrees`) before trusting it."""

    def __init__(self, model: nn.Module, budget: int, keep: bool = False):
        tensors = _unique_tensors(model)
        # keep=True: every float64 cast is kept for the later runs (at most the float64 copy of the whole
        # model that the plain check makes; only below VERIFY_BLOCKWISE_BYTES)
        self.keep: dict[int, torch.Tensor] | None = {} if keep else None
        memo: dict = {}
        for t in tensors.values():
            meta = torch.empty(t.shape, dtype=torch.float64 if t.is_floating_point() else t.dtype, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
        self.shell = copy.deepcopy(model, memo).eval()
        self.real = {}  # shell module -> [(attr, real tensor)] of its own (recurse=False) tensors
        for m, sm in zip(model.modules(), self.shell.modules(), strict=True):
            own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            self.real[sm] = [(a, t) for a, t in own if t is not None]
        self.members: dict[int, list[Member]] = {}
        self.group: SymmetryGroup | None = None
        self.element: torch.Tensor | None = None
        self.handles: list = []
        self.size = {sm: _float64_bytes(m) for m, sm in zip(model.modules(), self.shell.modules(), strict=True)}
        self.budget = budget

    # -------------------------------------------------------------- tensors
    def set_group(
        self, group: SymmetryGroup | None, element: torch.Tensor | None = None, model: nn.Module | None = None
    ) -> None:
        self.group, self.element, self.members = group, element, {}
        if group is not None:
            if model is None:
                raise ValueError("set_group: a group needs the model whose tensors it names")
            for m in group.members:
                t = model.get_buffer(m.name) if m.buffer else model.get_parameter(m.name)
                self.members.setdefault(id(t), []).append(m)

    def float64_tensors(self, module: nn.Module, recurse: bool, cache: dict,
                        only_meta: bool = False) -> list[tuple[nn.Module, str, object]]:
        """[(shell module, attribute, float64 value)] for ``module``'s own tensors (or its subtree's);
        ``only_meta``: only those not swapped in already (by an enclosing block that is running)."""
        mods = module.modules() if recurse else [module]
        out = []
        for sm in mods:
            for attr, t in self.real.get(sm, ()):
                if only_meta and not getattr(sm, attr).is_meta:
                    continue
                if id(t) not in cache:
                    members = self.members.get(id(t))
                    v = self.cast(t, fresh=bool(members))
                    if members:
                        # members are only recorded by set_group with a group and its element
                        assert self.group is not None and self.element is not None
                        with torch.no_grad():
                            for m in members:
                                self.group._act_(v, m, self.element)
                    cache[id(t)] = v
                v = cache[id(t)]
                out.append((sm, attr, nn.Parameter(v, requires_grad=False) if attr in sm._parameters else v))
        return out

    def cast(self, t: torch.Tensor, fresh: bool) -> torch.Tensor:
        """A float64 copy of ``t``: the kept one (``fresh``: a copy of it, to be transformed) or a new one."""
        if self.keep is None:
            return _to64(t)
        v = self.keep.get(id(t))
        if v is None:
            v = self.keep[id(t)] = _to64(t)
        return v.clone() if fresh else v

    @contextlib.contextmanager
    def swapped(self, items):
        saved = []
        try:
            for sm, attr, v in items:
                saved.append((sm, attr, getattr(sm, attr)))
                setattr(sm, attr, v)
            yield
        finally:
            for sm, attr, old in reversed(saved):
                setattr(sm, attr, old)

    # -------------------------------------------------------------- whole forward, block by block
    def install(self) -> None:
        stack: list = []

        def hooks(module, recurse, nested=False):
            def pre(mod, args):
                cm = self.swapped(self.float64_tensors(mod, recurse, {}, only_meta=nested))
                cm.__enter__()
                stack.append(cm)

            def post(mod, args, out):
                stack.pop().__exit__(None, None, None)

            self.handles.append(module.register_forward_pre_hook(pre))
            self.handles.append(module.register_forward_hook(post, always_call=True))

        def walk(module, is_root):
            if not is_root and self.size[module] <= self.budget:
                hooks(module, True)
                # a block need not be called itself (an nn.ModuleList, or a forward that calls a child of
                # it directly): each descendant holding tensors swaps in, when called, what is not yet in
                for sub in module.modules():
                    if sub is not module and any(self.real[m] for m in sub.modules()):
                        hooks(sub, True, nested=True)
                return
            if self.real[module]:
                hooks(module, False)
            for child in module.children():
                walk(child, False)

        walk(self.shell, True)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


_MEMO_BYTES = 512 * 2**20  # the clean leaf outputs one memo keeps at most
_LEAF_EXACT = 1e-12  # a leaf's outputs unchanged up to this (relative): the rest of the block sees clean values


class _LeafMemo:
    """Within one block check, skip the work that cannot differ from the clean run.

    The clean pass (mode "record") keeps every output of every *leaf* call (a submodule with no children:
    a Conv, a BatchNorm, a Linear, an activation module). In a group's pass (mode "check") a leaf call is

    * **skipped** (the clean outputs are returned; copies where the clean pass modified them in place
      later) when the leaf is one of torch.nn's own modules (its outputs depend only on its arguments and
      its own tensors; not a custom module, which could read state of its own, nor one whose forward was
      patched), none of its tensors is moved by the group, every tensor argument is *clean* (the very
      block input or clean leaf output that the clean pass gave at that call, not modified in place
      since: the tensor's version counter is compared) and every other argument equal; calls whose
      outputs alias or view an input are never skipped;
    * else **run**, and its outputs compared with the clean ones: a relative change of at most
      ``_LEAF_EXACT`` (far below the block's ``_BLOCK_EXACT``) is a *cut*: the clean values replace them
      (written in place when the outputs alias an input) and everything after sees clean values, and
      the largest cut change is part of the group's reported error.

    So a group costs the leaves from the first one it moves to the first one where its change vanishes
    (a bn_scale group: its conv and its BatchNorm), not the whole block. Anything the memo cannot read
    (code outside leaves, a call sequence that differs from the clean run) is simply run."""

    def __init__(self, block: nn.Module, members: Callable[[nn.Module], bool], max_bytes: int) -> None:
        self.room = max_bytes  # bytes of clean outputs it may still keep (later calls are just run)
        self.leaves = [m for m in block.modules() if m is not block and next(m.children(), None) is None]
        self.pure = {  # leaves that may be skipped: torch.nn's own, forward not patched
            id(m) for m in self.leaves if type(m).__module__.startswith("torch.nn.") and "forward" not in m.__dict__
        }
        self.moved = members  # does the current group move a tensor of this leaf
        self.ref: dict[tuple[int, int], tuple] = {}
        self.mode = ""
        self.cut = 0.0
        self.calls: dict[int, int] = {}
        self.clean: dict[int, tuple[int, object, torch.Tensor]] = {}  # id -> (version, token, tensor)
        self.returned: dict[tuple[int, int], list] = {}  # clean run: key -> [(output, its version)]
        self.mutated: set[tuple[int, int]] = set()  # calls whose outputs the clean run modified later
        self.handed: list = []  # (key, kept tensor, version) handed out without a copy in this run

    @contextlib.contextmanager
    def active(self, mode: str, inputs):
        self.mode, self.cut, self.calls, self.clean = mode, 0.0, {}, {}
        if not mode:  # off
            yield self
            return
        leaves, _ = pytree.tree_flatten(inputs)
        for j, t in enumerate(leaves):
            if isinstance(t, torch.Tensor):
                self._mark(t, ("in", j))
        saved = [(m, m.__dict__.get("forward")) for m in self.leaves]  # a forward patched by someone else
        for m in self.leaves:
            m.forward = self._wrap(m, m.forward)  # an instance attribute: nn.Module.__call__ calls it
        try:
            yield self
        finally:
            for m, old in saved:
                if old is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = old
            for key, outs in self.returned.items():  # outputs the clean run modified in place later
                if any(o._version != v for o, v in outs):
                    self.mutated.add(key)
            for key, t, v in self.handed:
                if t._version != v:  # a kept clean value was modified: forget that call
                    self.ref.pop(key, None)
            self.mode, self.calls, self.clean, self.returned, self.handed = "", {}, {}, {}, []

    def _mark(self, t: torch.Tensor, token) -> None:
        self.clean[id(t)] = (t._version, token, t)

    def _signature(self, args, kwargs) -> list | None:
        out: list = []
        for v in pytree.tree_flatten((args, kwargs))[0]:
            if isinstance(v, torch.Tensor):
                c = self.clean.get(id(v))
                if c is None or c[0] != v._version:
                    return None  # not known to hold clean values
                out.append(c[1])
            else:
                out.append(("value", v))
        return out

    def _wrap(self, module: nn.Module, forward):
        def run(*args, **kwargs):
            n = self.calls[id(module)] = self.calls.get(id(module), -1) + 1
            key = (id(module), n)
            sig = self._signature(args, kwargs)
            ins = [t for t in pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if self.mode == "record":
                out = forward(*args, **kwargs)
                outs, spec = pytree.tree_flatten(out)
                aliased = any(_shares(o, ins) for o in outs if isinstance(o, torch.Tensor))
                size = sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
                if size > self.room:
                    return out
                self.room -= size
                kept = [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in outs]
                scales = [_scale_of(o) for o in kept]  # None: not finite
                self.ref[key] = (sig, kept, spec, scales, aliased)
                self.returned[key] = [(o, o._version) for o in outs if isinstance(o, torch.Tensor)]
                self._mark_all(outs, key)
                return out
            ref = self.ref.get(key)
            skippable = id(module) in self.pure and not self.moved(module)
            if ref is not None and sig is not None and ref[0] is not None and not ref[4] and skippable:
                same = False
                with contextlib.suppress(Exception):  # a value that cannot be compared: run the leaf
                    same = bool(sig == ref[0])
                if same:
                    outs = [self._hand_out(key, o) for o in ref[1]]
                    self._mark_all(outs, key)
                    return pytree.tree_unflatten(outs, ref[2])
            out = forward(*args, **kwargs)
            if ref is None:
                return out
            outs, spec = pytree.tree_flatten(out)
            change = _tree_change(outs, spec, ref)
            if change is None or change > _LEAF_EXACT:
                return out
            self.cut = max(self.cut, change)
            with torch.no_grad():
                outs = [
                    (o.copy_(r) if _shares(o, ins) else self._hand_out(key, r)) if isinstance(o, torch.Tensor) else o
                    for o, r in zip(outs, ref[1], strict=True)
                ]
            self._mark_all(outs, key)
            return pytree.tree_unflatten(outs, spec)

        return run

    def _hand_out(self, key, kept):
        """The clean value ``kept`` for the run: a copy if the clean run modified this call's outputs in
        place later (a BatchNorm output that ``out += identity`` adds to), else ``kept`` itself, watched:
        if the run modifies it after all, the call is forgotten (never skipped or cut again)."""
        if not isinstance(kept, torch.Tensor):
            return kept
        if key in self.mutated:
            return kept.clone()
        self.handed.append((key, kept, kept._version))
        return kept

    def _mark_all(self, outs: list, key) -> None:
        for j, o in enumerate(outs):
            if isinstance(o, torch.Tensor):
                self._mark(o, ("out", key, j))


def _shares(t: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """Whether ``t`` is, aliases or views one of ``others`` (same storage)."""
    if t.device.type == "meta":
        return True
    ptr = t.untyped_storage().data_ptr()
    return any(o.device == t.device and o.untyped_storage().data_ptr() == ptr for o in others)


def _scale_of(t) -> float | None:
    """max |t| (at least the dtype's tiny) of a floating tensor, None if ``t`` is not finite, else 0."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
        m = float(t.abs().max())
        return max(m, torch.finfo(t.dtype).tiny) if math.isfinite(m) else None
    return 0.0


_SAMPLE = 4096  # entries compared first: a leaf that changed is usually seen there at once


def _tree_change(outs: list, spec, ref: tuple) -> float | None:
    """The relative change of a leaf's outputs against the clean ones; None if they cannot be compared
    (another structure, shape or dtype, a non-tensor that differs, a non-finite value)."""
    _, kept, ref_spec, scales, _ = ref
    if spec != ref_spec or len(outs) != len(kept):
        return None
    worst = 0.0
    for o, r, scale in zip(outs, kept, scales, strict=True):
        if not isinstance(o, torch.Tensor) or not isinstance(r, torch.Tensor):
            if isinstance(o, torch.Tensor) or isinstance(r, torch.Tensor):
                return None
            try:
                if not bool(o == r):
                    return None
            except Exception:
                return None
            continue
        if o.shape != r.shape or o.dtype != r.dtype:
            return None
        if o.numel() == 0:
            continue
        if not o.is_floating_point():
            if not torch.equal(o, r):
                return None
            continue
        if scale is None:
            return None
        if o.numel() > 4 * _SAMPLE and o.is_contiguous() and r.is_contiguous():
            step = o.numel() // _SAMPLE
            d = float((o.view(-1)[::step] - r.view(-1)[::step]).abs().max())
            if not d <= _LEAF_EXACT * scale:  # changed (or not finite): not a cut
                return None
        d = float((o - r).abs().max())
        if not math.isfinite(d):
            return None
        worst = max(worst, d / scale)
    return worst


def _no_none(y):
    """``y`` without its None entries (an attention module returning ``(out, None)``), so that
    output_change can compare it; other non-tensor leaves raise."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        return {k: _no_none(v) for k, v in y.items() if v is not None}
    if isinstance(y, (tuple, list)):
        return [_no_none(v) for v in y if v is not None]
    return y


def _owner(names: list[str]) -> str:
    """The deepest module path that contains every tensor name ("" = the root)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return ".".join(common)


def _verify_blockwise(
    model, inputs, groups, seed, kwargs, budget: int | None = None, cheaper_only: bool = False,
    leaf_memo: bool = True,
) -> list[float] | None:
    """verify_groups without a float64 copy of the model (see there); None if the model cannot be run
    block by block (then the caller uses the whole-model copy), or, with ``cheaper_only``, if the
    whole-model checks are expected to cost less (see verify_groups).

    A group is first checked on its *owner*, the deepest submodule holding every name of every tensor it
    moves, if the forward pass called that module once and its tensors fit in ``budget``: its float64
    copy (the shell's block, swapped in) runs on the float64 inputs it received, with and without the
    group's element. Unchanged outputs there (relative change <= ``_BLOCK_EXACT``) leave the model's
    outputs unchanged. A group that changes its owner's outputs may still be a symmetry of a larger
    module (a q.k rotation inside one fused projection changes q and k, not q kᵀ): it is checked again
    on the next enclosing module that qualifies, and finally by a whole forward pass, whose error is the
    one reported.

    Below :data:`VERIFY_BLOCKWISE_BYTES` of float64 weights every float64 cast is kept for the later runs
    (the memory of the whole-model float64 copy, which the plain check makes anyway): a weight is cast once,
    and a group's moved tensors are copies of the kept casts. Above it each block is cast while it runs."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        return None  # groups name the plain tensors: act through apply_ on a whole copy
    total = _float64_bytes(model)
    if budget is None:
        budget = max(_BLOCK_MIN_BYTES, total // 16)
    sizes = {path: _float64_bytes(m) for path, m in model.named_modules()}

    def fits(path: str) -> bool:
        return bool(path) and sizes[path] <= budget

    aliases: dict[int, list[str]] = defaultdict(list)
    every = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in every:
        aliases[id(t)].append(name)
    owner_of: dict[int, str] = {}
    for i, g in enumerate(groups):
        names = []
        for m in g.members:
            t = model.get_buffer(m.name) if m.buffer else model.get_parameter(m.name)
            names.extend(aliases[id(t)])
        owner_of[i] = _owner(names)
    if cheaper_only:
        # float64 weights run: a reference pass, then per group its owner block (or a whole pass); the
        # plain check runs the whole model once per group and once for the reference
        blocks = {}
        for i, path in owner_of.items():
            while path and not fits(path):
                path = path.rpartition(".")[0]
            blocks[i] = sizes[path] if path else total
        if 2 * (total + sum(blocks.values())) > (len(groups) + 1) * total:
            return None
    _check_module_finite(model)
    kwargs = dict(kwargs or {})
    named = [(f"input {i}", x) for i, x in enumerate(inputs)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    check_finite(named, "example")
    xs = to_float64(tuple(inputs))
    kw = dict(zip(kwargs, to_float64(tuple(kwargs.values())), strict=True))
    sw = _Swapper(model, budget, keep=total <= VERIFY_BLOCKWISE_BYTES)
    elements = random_elements(groups, generator=torch.Generator().manual_seed(seed))
    shell_mods = dict(sw.shell.named_modules())
    # the inputs of every call of each owner and of every module enclosing one, while they fit the budget
    watched = set()
    for path in owner_of.values():
        while fits(path):
            watched.add(path)
            path = path.rpartition(".")[0]
    captured: dict[str, list] = defaultdict(list)

    def capture(path):
        def pre(mod, args, kwargs_):
            captured[path].append((_clone_tree(args), _clone_tree(kwargs_)))

        return pre

    moved = lambda m: any(id(t) in sw.members for _, t in sw.real.get(m, ()))  # noqa: E731
    # the whole passes (the reference, the groups no block could check) with a memo too: a group of the
    # stem or of the last stage runs from its first moved leaf to where its change vanishes
    whole_memo = _LeafMemo(sw.shell, moved, max_bytes=_MEMO_BYTES)

    def run_whole(mode: str = ""):
        sw.install()
        a, k = _clone_tree((xs, kw))  # a fresh copy each pass: a model that writes into its inputs
        try:
            with torch.no_grad(), whole_memo.active(mode if leaf_memo else "", (a, k)):
                y = sw.shell(*a, **k)
        finally:
            sw.remove()
        if any(t.is_meta for t in _flatten_outputs(y)):
            raise RuntimeError("an output is on the meta device")
        return y

    handles = [shell_mods[p].register_forward_pre_hook(capture(p), with_kwargs=True) for p in watched]
    try:
        sw.set_group(None)
        y0 = run_whole("record")
    except Exception:  # the model reads tensors outside the module that runs: use the whole-model copy
        return None
    finally:
        for h in handles:
            h.remove()
    _warn_if_zero(y0)
    ref = OutputReference(y0)
    del y0
    if not _shell_agrees(model, inputs, kwargs, ref):
        return None  # the block-by-block pass did not compute the model (see _shell_agrees): whole copy

    def block_of(path: str) -> str:
        """``path`` or the nearest module enclosing it that can be checked alone ("" = none)."""
        while fits(path) and len(captured.get(path, ())) != 1:
            path = path.rpartition(".")[0]
        return path if fits(path) else ""

    errors: list[float] = [math.nan] * len(groups)
    pending: dict[str, list[int]] = defaultdict(list)
    for i, path in owner_of.items():
        pending[block_of(path)].append(i)
    while any(pending):
        path = max((p for p in pending if p), key=lambda p: p.count(".") + 1)  # deepest first
        idx = pending.pop(path)
        module = shell_mods[path]
        # deepest first and escalation only goes up: this block's inputs are not needed after it
        args, kwargs_ = captured.pop(path)[0]
        up = block_of(path.rpartition(".")[0])
        try:
            sw.set_group(None)
            base: dict = {}  # the block's float64 tensors, cast once; a group recasts only what it moves
            memo = _LeafMemo(module, moved, max_bytes=_MEMO_BYTES)
            with sw.swapped(sw.float64_tensors(module, True, base)), torch.no_grad():
                a, k = _clone_tree(args), _clone_tree(kwargs_)
                with memo.active("record" if leaf_memo else "", (a, k)):
                    b0 = OutputReference(_no_none(module(*a, **k)))
            for i in idx:
                sw.set_group(groups[i], elements[i], model)
                cache = {k: v for k, v in base.items() if k not in sw.members}
                with sw.swapped(sw.float64_tensors(module, True, cache)), torch.no_grad():
                    a, k = _clone_tree(args), _clone_tree(kwargs_)
                    with memo.active("check" if leaf_memo else "", (a, k)):
                        y = module(*a, **k)
                    errors[i] = max(b0.change(_no_none(y)), memo.cut)
                del y, cache, a, k
                if errors[i] > _BLOCK_EXACT:
                    pending[up].append(i)
        except Exception:  # this block cannot run alone: its groups go one level up
            pending[up].extend(i for i in idx if not errors[i] <= _BLOCK_EXACT and i not in pending[up])
        del args, kwargs_
    for i in sorted(set(pending.get("", []))):
        sw.set_group(groups[i], elements[i], model)
        errors[i] = max(ref.change(run_whole("check")), whole_memo.cut)
    sw.set_group(None)
    return errors


_SHELL_AGREES = 1e-3  # relative: float64 block by block vs the model in its own dtype (float32)


def _shell_agrees(model: nn.Module, inputs: tuple, kwargs: dict | None, ref: OutputReference) -> bool:
    """Whether the block-by-block float64 pass computed what the model computes (in its own dtype, eval
    mode). A tensor read outside the block that runs is a meta tensor there, and some ops (``F.linear``
    with a meta weight) return uninitialised memory instead of failing: never verify on that."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            a, k = _clone_tree((tuple(inputs), dict(kwargs or {})))
            eps = max((torch.finfo(t.dtype).eps for t in _unique_tensors(model).values() if t.is_floating_point()),
                      default=0.0)
            return ref.change(model(*a, **k)) <= max(_SHELL_AGREES, 8 * eps)  # bfloat16: 0.06
    except Exception:
        return False
    finally:
        for m, t in was.items():
            m.training = t


@contextlib.contextmanager
def restored(model: nn.Module, groups: list[SymmetryGroup]):
    """Put back every tensor that ``groups`` move when the block ends."""
    saved = {}
    for g in groups:
        for m in g.members:
            if m.name not in saved:
                t = model.get_buffer(m.name) if m.buffer else model.get_parameter(m.name)
                saved[m.name] = (t, t.detach().clone())
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, old in saved.values():
                t.copy_(old)


# ---------------------------------------------------------------------------- classes and segments


class _UF:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _leaves(det: Detector, atoms) -> set[int]:
    return {leaf for a in atoms for leaf in det.store.leaves(a)}


def _coords_by_leaf(det: Detector) -> dict[int, list[tuple[str, int, torch.Tensor]]]:
    """leaf -> [(tensor name, dim, (size,) unit coordinate or -1)] over every parameter and buffer."""
    out: dict[int, list] = defaultdict(list)
    for name, axes in det._param_axes.items():
        for d, atoms in enumerate(axes.dims):
            if not atoms:
                continue
            for leaf, c in det.store.coords(atoms, axes.shape[d]).items():
                out[leaf].append((name, d, c))
    return out


def _index(coord: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """(n, m) positions of each unit, or None if units occur unevenly."""
    sel = coord >= 0 if mask is None else (coord >= 0) & mask
    pos = sel.nonzero().flatten()
    if pos.numel() == 0 or pos.numel() % n:
        return None
    units = coord[pos]
    order = torch.argsort(units * (pos.max() + 1) + pos)
    pos, units = pos[order], units[order]
    m = pos.numel() // n
    if not torch.equal(units, torch.arange(n).repeat_interleave(m)):
        return None
    return pos.reshape(n, m)


def build_groups(det: Detector) -> list[SymmetryGroup]:
    """Turn the recorded events into candidate groups (not yet verified)."""
    store = det.store
    coords = _coords_by_leaf(det)
    param_names = {name for name, _ in det.model.named_parameters()}
    is_buffer = {name: name not in param_names for name in det._param_axes}
    shapes = {name: tuple(a.shape) for name, a in det._param_axes.items()}
    bn_eps = {
        path: float(m.eps)
        for path, m in det.model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }

    # segments: per leaf, union-find over the nodes that a per-unit transform travels through
    seg = _UF()
    group: dict = defaultdict(lambda: ANY)
    rot: dict = defaultdict(lambda: True)
    contracted: set = set()
    members: dict = defaultdict(set)
    nodes_of_leaf: dict = defaultdict(set)

    def touch(leaf, key):
        nodes_of_leaf[leaf].add(key)
        seg.find((leaf, key))

    for (ka, atoms_a), (kb, atoms_b), grp, linear in det.events.edges:
        common = _leaves(det, atoms_a) & _leaves(det, atoms_b)
        for leaf in common:
            touch(leaf, ka)
            touch(leaf, kb)
            seg.union((leaf, ka), (leaf, kb))
            group[(leaf, ka)] &= grp
            rot[(leaf, ka)] = rot[(leaf, ka)] and linear
            if grp == NONE and linear:
                contracted.add((leaf, ka))
    for (key, atoms), grp, rot_ok in det.events.constraints:
        for leaf in _leaves(det, atoms):
            touch(leaf, key)
            group[(leaf, key)] &= grp
            rot[(leaf, key)] = rot[(leaf, key)] and rot_ok
    for (key, atoms), name, dim, role in det.events.members:
        for leaf in _leaves(det, atoms):
            touch(leaf, key)
            members[(leaf, key)].add((name, dim, role))
    absorbing = set()
    for key, atoms in det.events.absorbing:
        for leaf in _leaves(det, atoms):
            touch(leaf, key)
            absorbing.add((leaf, key))
    _merge_shared_members(det, seg, members, nodes_of_leaf)
    reading = contracted | absorbing  # nodes whose consumer reads the units without a parameter

    values_of: dict[int, list] = defaultdict(list)  # leaf -> the activations that carry it
    for vid, t in det.values.items():
        for leaf in _leaves(det, [a for d in t.dims for a in d]):
            values_of[leaf].append(("v", vid, 0))
    order = {name: i for i, name in enumerate(det._param_axes)}  # first use in the forward pass
    groups: list[SymmetryGroup] = []
    for leaf in sorted(nodes_of_leaf.keys() | coords.keys()):
        r = store.find(leaf)
        if r != leaf or r in store.split or store.size[r] < 2:
            continue
        # units in a fixed order (a model output, e.g. a bare decoder's residual stream) cannot be
        # permuted, but per-unit scalings of segments that do not reach the pin (which stops them) can;
        # not when unknown ops are about (they fix parameters they use without a trace in the segments)
        ordered = r in store.pinned
        if ordered and (det.unknown or store.pinned[r] not in ("model output", "model input")):
            continue
        n = store.size[r]
        class_members = _class_members(coords.get(leaf, []), n, is_buffer)
        if not ordered and (class_members is None or not any(not m.buffer for m in class_members)):
            continue
        segments: dict = defaultdict(list)
        for key in nodes_of_leaf[leaf]:
            segments[seg.find((leaf, key))].append(key)
        seg_groups = []
        for keys in segments.values():
            seg_groups.extend(
                _segment_groups(
                    det, leaf, n, keys, group, rot, reading, members, coords, is_buffer, bn_eps
                )
            )
        # segments come from sets: put their groups in forward order (stable labels from run to run)
        seg_groups.sort(key=lambda g: sorted((order[m.name], m.dim) for m in g.members))
        if ordered:
            groups.extend(g for g in seg_groups if not isinstance(g, Rotation))
            continue
        assert class_members is not None
        rotations = [g for g in seg_groups if isinstance(g, Rotation)]
        covered = {m.name for g in rotations for m in g.members}
        if not (rotations and all(m.name in covered for m in class_members if not m.buffer)):
            groups.extend(_permutation_groups(det, leaf, n, class_members, coords.get(leaf, []), values_of))
        groups.extend(seg_groups)
    for i, g in enumerate(groups):
        g.members.sort(key=lambda m: order[m.name])
        g.layers = _layers(g.members)
        g.shapes = {m.name: shapes[m.name] for m in g.members}
        g.label = f"{g.kind}#{i} [{', '.join(g.layers[:3])}{', ...' if len(g.layers) > 3 else ''}]"
    return groups


def _merge_shared_members(det: Detector, seg: _UF, members: dict, nodes_of_leaf: dict) -> None:
    """A parameter slice that takes part in two segments of one unit class takes one transform, so its
    segments are one: when the parameter is used by two ops (a tied embedding and LM head, a module
    called twice), or when the slice plays the same role in both (the columns of a packed projection
    read both the query stream and the memory). A slice that one op reads in one segment and writes in
    the next (a depthwise conv's channel) is one multiplication and ties nothing."""
    shared = _shared_parameters(det)
    uses: dict = defaultdict(list)  # (leaf, name, dim) -> [(key, role)]
    for (leaf, key), entries in members.items():
        for name, dim, role in entries:
            if role != "bn_exit":
                uses[(leaf, name, dim)].append((key, role))
    for leaf, keys in nodes_of_leaf.items():
        for key in keys:
            if key[0] == "p":  # a parameter used directly as an operand
                uses[(leaf, key[1], key[2])].append((key, "source"))
    for (leaf, name, _), found in uses.items():
        roles = [role for _, role in found]
        if name in shared or len(set(roles)) < len(roles):
            for key, _ in found[1:]:
                seg.union((leaf, found[0][0]), (leaf, key))


def _shared_parameters(det: Detector) -> set[str]:
    """Names of the parameters that more than one op of the traced graph uses."""
    uses: dict[str, int] = defaultdict(int)
    if det.mode == "export" and det.ep is not None:
        graph = det.ep.graph_module.graph
        sig = det.ep.graph_signature
        names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        for node in graph.nodes:
            if node.op == "placeholder" and node.name in names:
                uses[names[node.name]] += len(node.users)
    else:
        if det.gm is None:
            raise RuntimeError("the model was traced with torch.export, not torch.fx")
        graph = det.gm.graph
        modules = dict(det.gm.named_modules())
        for node in graph.nodes:
            if node.op == "get_attr":
                uses[str(node.target)] += len(node.users)
            elif node.op == "call_module":
                for pname, _ in modules[str(node.target)].named_parameters(prefix=str(node.target)):
                    uses[pname] += 1
    canonical = {id(t): n for n, t in det.model.named_parameters()}
    aliases = {n: canonical.get(id(t), n) for n, t in det.model.named_parameters(remove_duplicate=False)}
    total: dict[str, int] = defaultdict(int)
    for name, k in uses.items():
        total[aliases.get(name, name)] += k
    return {name for name, k in total.items() if k > 1}


def _class_members(entries, n, is_buffer) -> list[Member] | None:
    out = []
    for name, dim, coord in entries:
        if (coord == -2).any():
            return None
        idx = _index(coord, n)
        if idx is None:
            return None
        out.append(Member(name, dim, idx, "passive", is_buffer[name]))
    return out


def _layers(members: list[Member]) -> list[str]:
    seen: dict[str, None] = {}
    for m in members:
        seen.setdefault(m.name.rsplit(".", 1)[0] if "." in m.name else "<root>", None)
    return list(seen)


def _segment_groups(det, leaf, n, keys, group, rot, reading, members, coords, is_buffer, bn_eps):
    """The diagonal (sign_flip / rescale / scale / bn_scale) or rotation group of one segment."""
    g = ANY
    r = True
    read = False  # a contraction (q·k) or an even function reads the units
    found: dict[tuple[str, int], set[str]] = {}
    direct: list[tuple[str, int]] = []
    bn_paths: list[str] = []
    for key in keys:
        g &= group[(leaf, key)]
        r = r and rot[(leaf, key)]
        read |= (leaf, key) in reading
        if key[0] == "p":  # a parameter used directly as an operand of a contraction
            direct.append((key[1], key[2]))
        for name, dim, role in members.get((leaf, key), ()):
            if role == "bn_exit":
                bn_paths.append(name)
            else:
                found.setdefault((name, dim), set()).add(role)
    for slot in direct:
        found.setdefault(slot, {"source"})
    roles: dict[tuple[str, int], str] = {}
    for slot, rs in found.items():
        if rs == {"absorb", "source"}:
            continue  # w ⊙ t with t and w ⊙ t in this segment: the sign passes through, w stays as it is
        rs = {"sink" if role == "absorb" else role for role in rs}
        if len(rs) > 1:
            g &= NEG  # tied: the same tensor writes and reads the units; only d = 1/d = ±1 works
        roles[slot] = min(rs)  # one transform per tensor slice ("sink" or "source": equal when d = ±1)
    if not roles:
        return []
    has_source = any(role == "source" for role in roles.values())
    has_reader = any(role == "sink" for role in roles.values()) or bn_paths or read
    if not (has_source and has_reader):
        return []
    coord_of = {(name, d): c for name, d, c in coords.get(leaf, [])}
    if r and not bn_paths:
        return _rotation_groups(det, leaf, n, keys, roles, coord_of, is_buffer)
    if g == NONE:
        return []
    out_members = []
    for (name, dim), role in roles.items():
        idx = _index(coord_of[(name, dim)], n) if (name, dim) in coord_of else None
        if idx is None:
            return []
        out_members.append(Member(name, dim, idx, role, is_buffer[name]))
    for path in bn_paths:
        w = f"{path}.weight"
        idx = _index(coord_of[(w, 0)], n) if (w, 0) in coord_of else None
        if idx is None:
            return []
        out_members.append(Member(w, 0, idx, "gamma", False))
        for stat in ("running_mean", "running_var"):
            if (f"{path}.{stat}", 0) in coord_of:
                out_members.append(Member(f"{path}.{stat}", 0, idx, stat, True, bn_eps.get(path, 0.0)))
    if bn_paths:
        kind = "bn_scale"
    else:
        kind = {ANY: "scale", POS: "rescale", NEG: "sign_flip"}[g]
    grp = make_group(kind, n, out_members, _layers(out_members), signs=bool(g & NEG))
    return [grp]


def _permutation_groups(det, leaf, n, class_members, entries, values_of):
    """One permutation of the units, or one per head when every tensor that carries the units also carries
    a head axis: under grouped-query attention each KV head's query heads permute among themselves,
    independently of the other KV groups (and, alike, channels within each GroupNorm group)."""
    keys = values_of.get(leaf, [])
    heads = _head_axis(det, leaf, keys, entries) if keys else None
    if heads is None:
        return [make_group("permutation", n, class_members, _layers(class_members))]
    head_leaf, head_coords = heads
    out = []
    for h in range(det.store.size[head_leaf]):
        ms = []
        for m, (name, dim, c) in zip(class_members, entries, strict=True):
            idx = _index(c, n, head_coords[(name, dim)] == h)
            if idx is None:
                return [make_group("permutation", n, class_members, _layers(class_members))]
            ms.append(Member(name, dim, idx, m.role, m.buffer))
        grp = make_group("permutation", n, ms, _layers(ms))
        grp.notes.append(f"head {h}")
        out.append(grp)
    return out


def _rotation_groups(det, leaf, n, keys, roles, coord_of, is_buffer):
    """One rotation group, or one per head when every moved tensor and every activation on the way
    also carries a head axis (a leaf that is a product sibling of this one)."""
    store = det.store
    entries = [(name, dim, coord_of.get((name, dim))) for (name, dim) in roles]
    if any(c is None for _, _, c in entries):
        return []
    heads = _head_axis(det, leaf, keys, entries)
    if heads is None:
        ms = []
        for (name, dim, c), role in zip(entries, roles.values(), strict=True):
            idx = _index(c, n)
            if idx is None:
                return []
            ms.append(Member(name, dim, idx, role, is_buffer[name]))
        return [make_group("rotation", n, ms, _layers(ms))]
    head_leaf, head_coords = heads
    out = []
    for h in range(store.size[head_leaf]):
        ms = []
        for (name, dim, c), role in zip(entries, roles.values(), strict=True):
            idx = _index(c, n, head_coords[(name, dim)] == h)
            if idx is None:
                return []
            ms.append(Member(name, dim, idx, role, is_buffer[name]))
        grp = make_group("rotation", n, ms, _layers(ms))
        grp.notes.append(f"head {h}")
        out.append(grp)
    return out


def _head_axis(det, leaf, keys, entries):
    store = det.store
    candidates = None
    head_coords: dict[int, dict[tuple[str, int], torch.Tensor]] = {}
    for name, dim, c in entries:
        axes = det._param_axes[name]
        cs = store.coords(axes.dims[dim], axes.shape[dim])
        here = {k for k, hc in cs.items() if k != leaf and bool(((hc >= 0) | (c < 0)).all())}
        candidates = here if candidates is None else candidates & here
        for k in here:
            head_coords.setdefault(k, {})[(name, dim)] = cs[k]
    if not candidates:
        return None
    for key in keys:
        if key[0] == "v":
            t = det.values.get(key[1])
            if t is None:
                continue
            present = _leaves(det, [a for d in t.dims for a in d])
            candidates &= present
    candidates = {
        k for k in candidates if store.find(k) == k and k not in store.pinned and k not in store.split
    }
    if not candidates:
        return None
    k = min(candidates)
    return k, head_coords[k]


__all__ = ["build_groups", "find_symmetries", "verify_groups"]
