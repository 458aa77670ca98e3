"""From recorded coupling to typed groups: classes, segments, kinds, per-head splits, verification."""

from __future__ import annotations

import contextlib
import copy
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
            for name in list(module.parametrizations):
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
    model: nn.Module, inputs: tuple, groups: list[SymmetryGroup], seed: int = 0, kwargs: dict | None = None
) -> list[float]:
    """Per group, the max relative output change after one random element (float64, eval mode).

    One forward pass per group, each group alone, with an element drawn away from the identity (see
    :func:`~mirrorsym.detect.groups.random_elements`), so no group passes by accident.
    """
    base, forward = verification_baseline(model, inputs, kwargs)
    y0 = forward()
    if all(float(y.abs().max()) == 0.0 for y in _flatten_outputs(y0) if y.is_floating_point() and y.numel()):
        warnings.warn(
            "mirrorsym.detect: the model's outputs are identically zero on these inputs (e.g. a "
            "zero-initialised last layer), so verification cannot fail; re-initialise that layer "
            "or pass other inputs to get a meaningful check",
            DetectWarning,
            stacklevel=3,
        )
    gen = torch.Generator().manual_seed(seed)
    errors = []
    for g, element in zip(groups, random_elements(groups, generator=gen), strict=True):
        # each group alone: a joint check could pass by two errors cancelling
        with restored(base, [g]):
            g.apply_(base, element)
            errors.append(output_change(y0, forward()))
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
    _merge_shared_members(seg, members, nodes_of_leaf)

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


def _merge_shared_members(seg: _UF, members: dict, nodes_of_leaf: dict) -> None:
    """A parameter slice that takes part in two segments of one unit class (a tied embedding and LM head,
    a module called twice) takes one transform: its segments are one."""
    first: dict = {}
    for (leaf, key), entries in members.items():
        for name, dim, role in entries:
            if role != "bn_exit":
                seg.union((leaf, first.setdefault((leaf, name, dim), key)), (leaf, key))
    for leaf, keys in nodes_of_leaf.items():
        for key in keys:
            if key[0] == "p":  # a parameter used directly as an operand
                seg.union((leaf, first.setdefault((leaf, key[1], key[2]), key)), (leaf, key))


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
    head_coords = {}
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
