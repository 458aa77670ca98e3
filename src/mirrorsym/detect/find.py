"""From recorded coupling to typed groups: classes, segments, kinds, per-head splits, verification."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.finite import check_finite, check_materialized, check_module_finite
from ..core.mirror import _flatten_outputs, output_change
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
    smap = SymmetryMap(groups, unknown_ops=dict(det.unknown))
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
        smap = SymmetryMap(kept, unknown_ops=dict(det.unknown))
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
    check_module_finite(model)
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

    One forward pass per group, each group alone, with an element drawn away from the identity (see
    :func:`~mirrorsym.detect.groups.random_elements`), so no group passes by accident.

    ``blockwise`` (default ``None``: only when a float64 copy of ``model`` would exceed
    :data:`VERIFY_BLOCKWISE_BYTES`, 2 GiB, i.e. above ~270 M float32 parameters) verifies without a float64
    copy of the whole model, still in float64 (see :func:`_verify_blockwise`): a group whose tensors all
    belong to one submodule that the forward pass calls once (a transformer block, its MLP, its attention)
    is checked on that submodule alone, on the float64 inputs it received, and the error is the relative
    change of *that submodule's* outputs (unchanged block outputs leave the model's outputs unchanged);
    the other groups (the residual stream, a final norm with the LM head) by a whole forward pass in
    which each block is cast to float64 (and transformed) only while it runs. Peak extra memory: about
    one block in float64 instead of twice the model. If the model cannot run that way (a module reads
    another's weights without calling it), the whole-model float64 copy is used after all.
    """
    if blockwise is None:
        blockwise = _float64_bytes(model) > VERIFY_BLOCKWISE_BYTES
    if blockwise:
        errors = _verify_blockwise(model, inputs, groups, seed, kwargs)
        if errors is not None:
            return errors
    base, forward = verification_baseline(model, inputs, kwargs)
    y0 = forward()
    _warn_if_zero(y0)
    gen = torch.Generator().manual_seed(seed)
    errors = []
    for g, element in zip(groups, random_elements(groups, generator=gen), strict=True):
        # each group alone: a joint check could pass by two errors cancelling
        with restored(base, [g]):
            g.apply_(base, element)
            errors.append(output_change(y0, forward()))
    return errors


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
    tensors fit in ``budget`` bytes; a module above them swaps only its own tensors. A module that reads a
    tensor outside the block being run meets a meta tensor and fails loudly (never silently in float32)."""

    def __init__(self, model: nn.Module, budget: int):
        tensors = _unique_tensors(model)
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

    def float64_tensors(self, module: nn.Module, recurse: bool, cache: dict) -> list[tuple[nn.Module, str, object]]:
        """[(shell module, attribute, float64 value)] for ``module``'s own tensors (or its subtree's)."""
        mods = module.modules() if recurse else [module]
        out = []
        for sm in mods:
            for attr, t in self.real.get(sm, ()):
                if id(t) not in cache:
                    v = _to64(t)
                    members = self.members.get(id(t))
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

        def hooks(module, recurse):
            def pre(mod, args):
                cm = self.swapped(self.float64_tensors(mod, recurse, {}))
                cm.__enter__()
                stack.append(cm)

            def post(mod, args, out):
                stack.pop().__exit__(None, None, None)

            self.handles.append(module.register_forward_pre_hook(pre))
            self.handles.append(module.register_forward_hook(post, always_call=True))

        def walk(module, is_root):
            if not is_root and self.size[module] <= self.budget:
                hooks(module, True)
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


def _verify_blockwise(model, inputs, groups, seed, kwargs, budget: int | None = None) -> list[float] | None:
    """verify_groups without a float64 copy of the model (see there); None if the model cannot be run
    block by block (then the caller uses the whole-model copy).

    A group is first checked on its *owner*, the deepest submodule holding every name of every tensor it
    moves, if the forward pass called that module once and its tensors fit in ``budget``: its float64
    copy (the shell's block, swapped in) runs on the float64 inputs it received, with and without the
    group's element. Unchanged outputs there (relative change <= ``_BLOCK_EXACT``) leave the model's
    outputs unchanged. A group that changes its owner's outputs may still be a symmetry of a larger
    module (a q.k rotation inside one fused projection changes q and k, not q kᵀ): it is checked again
    on the next enclosing module that qualifies, and finally by a whole forward pass, whose error is the
    one reported."""
    check_module_finite(model)
    kwargs = dict(kwargs or {})
    named = [(f"input {i}", x) for i, x in enumerate(inputs)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    check_finite(named, "example")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        return None  # groups name the plain tensors: act through apply_ on a whole copy
    xs = to_float64(tuple(inputs))
    kw = dict(zip(kwargs, to_float64(tuple(kwargs.values())), strict=True))
    if budget is None:
        budget = max(_BLOCK_MIN_BYTES, _float64_bytes(model) // 16)
    sw = _Swapper(model, budget)
    elements = random_elements(groups, generator=torch.Generator().manual_seed(seed))
    shell_mods = dict(sw.shell.named_modules())

    def fits(path: str) -> bool:
        return bool(path) and sw.size[shell_mods[path]] <= budget

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

    def run_whole():
        sw.install()
        try:
            with torch.no_grad():
                y = sw.shell(*xs, **kw)
        finally:
            sw.remove()
        if any(t.is_meta for t in _flatten_outputs(y)):
            raise RuntimeError("an output is on the meta device")
        return y

    handles = [shell_mods[p].register_forward_pre_hook(capture(p), with_kwargs=True) for p in watched]
    try:
        sw.set_group(None)
        y0 = run_whole()
    except Exception:  # the model reads tensors outside the module that runs: use the whole-model copy
        return None
    finally:
        for h in handles:
            h.remove()
    _warn_if_zero(y0)

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
        args, kwargs_ = captured[path][0]
        up = block_of(path.rpartition(".")[0])
        try:
            sw.set_group(None)
            base: dict = {}  # the block's float64 tensors, cast once; a group recasts only what it moves
            with sw.swapped(sw.float64_tensors(module, True, base)), torch.no_grad():
                b0 = _no_none(module(*_clone_tree(args), **_clone_tree(kwargs_)))
            for i in idx:
                sw.set_group(groups[i], elements[i], model)
                cache = {k: v for k, v in base.items() if k not in sw.members}
                with sw.swapped(sw.float64_tensors(module, True, cache)), torch.no_grad():
                    y = module(*_clone_tree(args), **_clone_tree(kwargs_))
                errors[i] = output_change(b0, _no_none(y))
                if errors[i] > _BLOCK_EXACT:
                    pending[up].append(i)
        except Exception:  # this block cannot run alone: its groups go one level up
            pending[up].extend(i for i in idx if not errors[i] <= _BLOCK_EXACT and i not in pending[up])
    for i in sorted(set(pending.get("", []))):
        sw.set_group(groups[i], elements[i], model)
        errors[i] = output_change(y0, run_whole())
    sw.set_group(None)
    return errors


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
    _merge_shared_members(det, seg, members, nodes_of_leaf)

    groups: list[SymmetryGroup] = []
    for leaf in sorted(nodes_of_leaf.keys() | coords.keys()):
        r = store.find(leaf)
        if r != leaf or r in store.split or r in store.pinned or store.size[r] < 2:
            continue
        n = store.size[r]
        class_members = _class_members(coords.get(leaf, []), n, is_buffer)
        if class_members is None or not any(not m.buffer for m in class_members):
            continue
        segments: dict = defaultdict(list)
        for key in nodes_of_leaf[leaf]:
            segments[seg.find((leaf, key))].append(key)
        seg_groups = []
        for keys in segments.values():
            seg_groups.extend(
                _segment_groups(
                    det, leaf, n, keys, group, rot, contracted, members, coords, is_buffer, bn_eps
                )
            )
        rotations = [g for g in seg_groups if isinstance(g, Rotation)]
        covered = {m.name for g in rotations for m in g.members}
        if not (rotations and all(m.name in covered for m in class_members if not m.buffer)):
            groups.append(make_group("permutation", n, class_members, _layers(class_members)))
        groups.extend(seg_groups)
    order = {name: i for i, name in enumerate(det._param_axes)}  # first use in the forward pass
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


def _segment_groups(det, leaf, n, keys, group, rot, contracted, members, coords, is_buffer, bn_eps):
    """The diagonal (sign_flip / rescale / scale / bn_scale) or rotation group of one segment."""
    g = ANY
    r = True
    has_contract = False
    roles: dict[tuple[str, int], str] = {}
    bn_paths: list[str] = []
    for key in keys:
        g &= group[(leaf, key)]
        r = r and rot[(leaf, key)]
        has_contract |= (leaf, key) in contracted
        if key[0] == "p":  # a parameter used directly as an operand of a contraction
            roles.setdefault((key[1], key[2]), "source")
        for name, dim, role in members.get((leaf, key), ()):
            if role == "bn_exit":
                bn_paths.append(name)
                continue
            old = roles.setdefault((name, dim), role)
            if old != role:
                g &= NEG  # tied: the same tensor writes and reads the units; only d = 1/d = ±1 works
    if not roles:
        return []
    has_source = any(role == "source" for role in roles.values())
    has_reader = any(role == "sink" for role in roles.values()) or bn_paths or has_contract
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
