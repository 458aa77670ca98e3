"""Save and load constrained and exported models as tensors plus plain data: every file these helpers write
loads with ``torch.load(weights_only=True)`` (no pickled code), and these helpers never read a file any other
way.

Constrained models (``ms.constrain.apply`` / ``sparse`` / ``group_sparse`` / ``low_rank`` / ``linear`` /
``remove_symmetries(mode="parametrize")``): their ``state_dict`` keys (``0.parametrizations.weight.original``,
``...original0``, ``....0.gate``) only fit a model carrying the same parametrizations.
:func:`save_constrained` stores the state dict with a description of which parametrization sits where
(kind and constructor arguments, gates shared between tensors); :func:`load_constrained` re-registers them on
a fresh plain model (same architecture) and loads the state strictly::

    ms.constrain.save_constrained(model, "dcs.pt")
    model = ms.constrain.load_constrained(make_plain_model, "dcs.pt")   # a factory or a plain nn.Module

Exported models (``ms.constrain.export(...).model``): their architecture differs from the class that built
the original (fewer units, split Linears), so :func:`save_exported` stores a tree of standard torch modules
with their constructor arguments (:data:`LEAVES`; ``nn.Sequential`` containers) beside the weights, and
:func:`load_exported` rebuilds it without any code of yours::

    small = ms.constrain.export(model, x).model
    ms.constrain.save_exported(small, "small.pt")
    small = ms.constrain.load_exported("small.pt")

A module that is not one of these exact types (a custom class, a subclass, a module with hooks or
parametrizations) is refused with an error naming its type and path. The file is a dict with
``"mirrorsym_format": "constrained" | "exported"`` and ``"version"``; ``mirrorsym diagnose`` reads both.
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .apply import UnitGate
from .parametrizations import GroupSparse, LinearConstraint, LowRank, Sparse
from .remove import Offset

if TYPE_CHECKING:
    from ..detect.smap import ExampleInputs
    from .export import ExportReport, ExportResult

PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | None

FORMAT_KEY = "mirrorsym_format"
VERSION = 1
CONSTRAINED, EXPORTED = "constrained", "exported"


# ---------------------------------------------------------------------------------------------- files
def _save(obj: dict[str, Any], path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def read(path: PathLike, map_location: MapLocation = None) -> dict[str, Any]:
    """The dict of a mirrorsym file, read with ``torch.load(weights_only=True)``; a ValueError when the file
    holds anything but tensors and plain data, or is not a mirrorsym file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(
            f"{path} cannot be read weights-only ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "mirrorsym files hold only tensors and plain data, and are never unpickled with code"
        ) from exc
    if not isinstance(obj, Mapping) or obj.get(FORMAT_KEY) not in (CONSTRAINED, EXPORTED):
        raise ValueError(
            f"{path} is not a file written by ms.constrain.save_constrained / save_exported (no "
            f"{FORMAT_KEY!r} key); a plain state_dict loads with model.load_state_dict(torch.load(path))"
        )
    if int(obj.get("version", 0)) > VERSION:
        raise ValueError(f"{path} has format version {obj['version']}; this mirrorsym reads up to {VERSION}")
    return dict(obj)


def file_format(obj: object) -> str | None:
    """``"constrained"`` / ``"exported"`` for a loaded mirrorsym dict, else None."""
    return obj.get(FORMAT_KEY) if isinstance(obj, Mapping) and obj.get(FORMAT_KEY) in (CONSTRAINED, EXPORTED) \
        else None


# --------------------------------------------------------------------------------- constrained models
def _scale(p) -> float:
    return float(p.scale)


def describe_constrained(model: nn.Module) -> list[dict[str, Any]]:
    """``[{"module": path, "tensor": name, "chain": [{"kind": ..., args}, ...]}]`` for every parametrized
    tensor of ``model``, in registration order. Unit gates carry ``"gate": i`` (the i-th distinct gate
    Parameter: tensors of one unit group share it). Unknown parametrization types are refused by name."""
    gates: dict[int, int] = {}
    out = []
    for path, module in model.named_modules():
        chains = getattr(module, "parametrizations", None)
        if not chains or not parametrize.is_parametrized(module):
            continue
        for name, chain in chains.items():
            specs = []
            for i, p in enumerate(chain):
                where = f"{path or '<root>'}.{name} (parametrization {i})"
                t = type(p)
                if t is UnitGate:
                    gid = gates.setdefault(id(p.gate), len(gates))
                    specs.append({"kind": "unit_gate", "dim": int(p.dim), "ndim": int(p.ndim), "gate": gid})
                elif t is Sparse:
                    specs.append({"kind": "sparse", "scale": _scale(p)})
                elif t is GroupSparse:
                    specs.append({"kind": "group_sparse", "dim": int(p.dim), "ndim": int(p.ndim), "scale": _scale(p)})
                elif t is LowRank:
                    specs.append({"kind": "low_rank", "shape": [int(s) for s in p.shape], "rank": int(p.rank),
                                  "scale": _scale(p)})
                elif t is LinearConstraint:
                    specs.append({"kind": "linear", "shape": [int(s) for s in p.shape], "scale": _scale(p)})
                elif t is Offset:
                    specs.append({"kind": "offset", "scaled": p.scale is not None})
                else:
                    raise TypeError(
                        f"save_constrained: {where} is a {t.__module__}.{t.__qualname__}, which mirrorsym cannot "
                        "describe (it saves its own DCS parametrizations: UnitGate, Sparse, GroupSparse, LowRank, "
                        "LinearConstraint, Offset); remove it first, or save a plain state_dict"
                    )
            out.append({"module": path, "tensor": name, "chain": specs})
    return out


def save_constrained(model: nn.Module, path: PathLike) -> Path:
    """Save a constrained ``model``: its state dict and :func:`describe_constrained` (module docstring).
    Loadable with ``torch.load(weights_only=True)``; rebuild with :func:`load_constrained`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_constrained needs an nn.Module, got {type(model).__name__}")
    described = describe_constrained(model)
    if not described:
        raise ValueError(
            f"save_constrained: {type(model).__name__} carries no parametrization; save a plain model with "
            "torch.save(model.state_dict(), path) (or save_exported for an exported one)"
        )
    return _save({FORMAT_KEY: CONSTRAINED, "version": VERSION, "parametrizations": described,
                  "state_dict": model.state_dict()}, path)


def _state_tensor(state: Mapping, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"load_constrained: the file has no {key!r} for {where}; was it written by save_constrained?")
    return state[key]


def _build_parametrization(spec: dict, prefix: str, tensor: torch.Tensor, state: Mapping, gates: dict):
    kind, where = spec.get("kind"), prefix.rsplit(".parametrizations.", 1)[0]
    dev = tensor.device
    if kind == "unit_gate":
        unit_of_entry = _state_tensor(state, prefix + "unit_of_entry", where).to(dev)
        gate_state = _state_tensor(state, prefix + "gate", where)
        gid = int(spec["gate"])
        if gid not in gates:
            gates[gid] = nn.Parameter(torch.ones(gate_state.shape, dtype=gate_state.dtype, device=dev))
        return UnitGate(gates[gid], int(spec["dim"]), int(spec["ndim"]), unit_of_entry)
    if kind == "sparse":
        return Sparse(float(spec["scale"]))
    if kind == "group_sparse":
        return GroupSparse(int(spec["dim"]), int(spec["ndim"]), float(spec["scale"]))
    if kind == "low_rank":
        return LowRank(torch.Size(spec["shape"]), int(spec["rank"]), float(spec["scale"]))
    if kind == "linear":
        O = _state_tensor(state, prefix + "O", where).to(dev)
        return LinearConstraint(O, torch.Size(spec["shape"]), float(spec["scale"]))
    if kind == "offset":
        offset = _state_tensor(state, prefix + "offset", where).to(dev)
        scale = _state_tensor(state, prefix + "scale", where).to(dev) if spec.get("scaled") else None
        return Offset(offset, scale)
    raise ValueError(f"load_constrained: unknown parametrization kind {kind!r} for {where}")


def constrain_like(model: nn.Module, parametrizations: list[dict], state: Mapping) -> nn.Module:
    """Register on the plain ``model`` the parametrizations described by :func:`describe_constrained`
    (buffers such as unit maps and bases taken from ``state``), in place; returns ``model``."""
    gates: dict[int, nn.Parameter] = {}
    for entry in parametrizations:
        path, name = entry["module"], entry["tensor"]
        where = f"{path or '<root>'}.{name}"
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise ValueError(f"load_constrained: the model has no submodule {path!r} (for {where}); is it the "
                             "architecture the file was saved from?") from None
        if parametrize.is_parametrized(module, name):
            raise ValueError(f"load_constrained: {where} already carries a parametrization; pass a plain model "
                             "(a fresh one from the factory, before ms.constrain.apply)")
        tensor = getattr(module, name, None)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"load_constrained: {where} is not a tensor of the model")
        for i, spec in enumerate(entry["chain"]):
            prefix = f"{path + '.' if path else ''}parametrizations.{name}.{i}."
            current = getattr(module, name)
            p = _build_parametrization(spec, prefix, current, state, gates)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parametrize.register_parametrization(module, name, p)
    return model


def load_constrained(model_factory_or_plain_model: nn.Module | Callable[[], nn.Module], path: PathLike,
                     map_location: MapLocation = None) -> nn.Module:
    """A constrained model from :func:`save_constrained`'s ``path``: the parametrizations re-registered on
    the plain model (or on ``factory()``) and the state loaded strictly. The file is read weights-only;
    tensors land on the model's device unless ``map_location`` says otherwise."""
    model = model_factory_or_plain_model
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError("load_constrained needs a plain nn.Module or a factory returning one, got "
                            f"{type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_constrained: the factory returned a {type(model).__name__}, not an nn.Module")
    if map_location is None:
        ref = next(iter(model.parameters()), None)
        map_location = ref.device if ref is not None else "cpu"
    obj = read(path, map_location)
    if obj[FORMAT_KEY] != CONSTRAINED:
        raise ValueError(f"{path} holds an exported model (architecture included): use ms.constrain.load_exported")
    state = obj["state_dict"]
    constrain_like(model, obj["parametrizations"], state)
    mine = model.state_dict()
    cast = sorted({(str(state[k].dtype), str(mine[k].dtype)) for k in state
                   if k in mine and state[k].is_floating_point() and state[k].dtype != mine[k].dtype})
    if cast:
        warnings.warn(f"load_constrained: the file holds {', '.join(a for a, _ in cast)} tensors and the model "
                      f"{', '.join(b for _, b in cast)}; the values are cast (build the model in the saved dtype, "
                      "e.g. model.double(), to keep them exactly)", UserWarning, stacklevel=2)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"load_constrained: {path} does not fit the model: {exc}") from exc
    return model


# ------------------------------------------------------------------------------------ exported models
def _conv_args(transpose: bool):
    names = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
             "padding_mode"]
    return ([*names, "output_padding"] if transpose else names), {"bias": lambda m: m.bias is not None}


def _leaves() -> dict[type, tuple[list[str], dict]]:
    """Exact module type → (attributes that are constructor arguments of the same name, {argument: getter})."""
    has_bias = {"bias": lambda m: m.bias is not None}
    conv: type[nn.Module]
    act: type[nn.Module]
    pool: type[nn.Module]
    table: dict[type, tuple[list[str], dict]] = {
        nn.Linear: (["in_features", "out_features"], has_bias),
        nn.LayerNorm: (["normalized_shape", "eps", "elementwise_affine"], has_bias),
        nn.GroupNorm: (["num_groups", "num_channels", "eps", "affine"], {}),
        nn.Embedding: (["num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                        "scale_grad_by_freq", "sparse"], {}),
        nn.Flatten: (["start_dim", "end_dim"], {}),
        nn.Unflatten: (["dim", "unflattened_size"], {}),
        nn.Identity: ([], {}),
        nn.LeakyReLU: (["negative_slope", "inplace"], {}),
        nn.ELU: (["alpha", "inplace"], {}),
        nn.CELU: (["alpha", "inplace"], {}),
        nn.GELU: (["approximate"], {}),
        nn.Softplus: (["beta", "threshold"], {}),
        nn.Hardtanh: (["min_val", "max_val", "inplace"], {}),
        nn.Softmax: (["dim"], {}),
        nn.LogSoftmax: (["dim"], {}),
        nn.PReLU: (["num_parameters"], {}),
    }
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        table[conv] = _conv_args(False)
    for conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        table[conv] = _conv_args(True)
    for bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        table[bn] = (["num_features", "eps", "momentum", "affine", "track_running_stats"], {})
    for act in (nn.ReLU, nn.ReLU6, nn.SELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid):
        table[act] = (["inplace"], {})
    for act in (nn.Tanh, nn.Sigmoid, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid):
        table[act] = ([], {})
    for drop in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
        table[drop] = (["p", "inplace"], {})
    for pool in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        table[pool] = (["kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"], {})
    table[nn.AvgPool1d] = (["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"], {})
    for pool in (nn.AvgPool2d, nn.AvgPool3d):
        table[pool] = (["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                        "divisor_override"], {})
    for pool in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
        table[pool] = (["output_size"], {})
    for pool in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
        table[pool] = (["output_size", "return_indices"], {})
    return table


#: the module types :func:`save_exported` describes (exactly these classes, not subclasses), plus
#: ``nn.Sequential`` containers
LEAVES = _leaves()
_BY_NAME = {cls.__name__: cls for cls in LEAVES} | {"Sequential": nn.Sequential}


def _plain(value, where: str):
    """A constructor argument as JSON-able data (tuples → lists); refuses anything else by name."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return [_plain(v, where) for v in value]
    raise TypeError(f"save_exported: {where} has a constructor argument of type {type(value).__name__}, "
                    "which cannot be stored as plain data")


def _unplain(value):
    return tuple(_unplain(v) for v in value) if isinstance(value, list) else value


def _hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def describe_module(module: nn.Module, path: str = "") -> dict[str, Any]:
    """The architecture tree of ``module``: ``{"type": "Sequential", "children": [[name, tree], ...]}`` or
    ``{"type": "Linear", "args": {...}}``; refuses (TypeError naming type and path) what it cannot rebuild."""
    where = f"{path or '<root>'} ({type(module).__module__}.{type(module).__qualname__})"
    if parametrize.is_parametrized(module):
        raise TypeError(f"save_exported: {where} carries parametrizations; bake them first "
                        "(ms.constrain.export(...).model), or use ms.constrain.save_constrained")
    if _hooks(module):
        raise TypeError(f"save_exported: {where} has forward/backward hooks, which are code and cannot be saved; "
                        "remove them first")
    if type(module) is nn.Sequential:
        return {"type": "Sequential", "children": [
            [name, describe_module(child, f"{path}.{name}" if path else name)]
            for name, child in module.named_children()]}
    spec = LEAVES.get(type(module))
    if spec is None:
        supported = ", ".join(sorted(_BY_NAME))
        raise TypeError(
            f"save_exported cannot describe {where}: only nn.Sequential trees of standard torch modules are "
            f"rebuilt without code ({supported}). Save a state_dict and rebuild the architecture in your code, "
            "or write the model as an nn.Sequential"
        )
    if next(module.children(), None) is not None:
        raise TypeError(f"save_exported: {where} has submodules added by hand; it cannot be rebuilt")
    names, getters = spec
    args = {n: _plain(getattr(module, n), where) for n in names}
    args.update({n: _plain(get(module), where) for n, get in getters.items()})
    return {"type": type(module).__name__, "args": args}


def build_module(tree: Mapping) -> nn.Module:
    """Rebuild a module from :func:`describe_module`'s tree (random initial values; load the weights)."""
    kind = tree.get("type") if isinstance(tree, Mapping) else None
    cls = _BY_NAME.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"load_exported: unknown module type {kind!r} in the architecture description")
    if cls is nn.Sequential:
        return nn.Sequential(collections.OrderedDict((str(n), build_module(t)) for n, t in tree["children"]))
    args = {k: _unplain(v) for k, v in tree.get("args", {}).items()}
    if cls is nn.LayerNorm and isinstance(args.get("normalized_shape"), tuple):
        args["normalized_shape"] = list(args["normalized_shape"])
    return cls(**args)


def _rebuild(architecture: Mapping, state: Mapping, training: bool) -> nn.Module:
    with torch.device("meta"):
        model = build_module(architecture)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"load_exported: the file holds no values for {left[:3]}")
    return model.train(training)


def _outputs_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_outputs_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def save_exported(
    small_model: nn.Module | ExportResult, path: PathLike, example_inputs: ExampleInputs | None = None
) -> Path:
    """Save an exported (plain, standard-module) model: weights plus :func:`describe_module`'s architecture
    tree, loadable with ``torch.load(weights_only=True)``; rebuild with :func:`load_exported`. Accepts
    ``ms.constrain.export``'s result (its ``.model``; the report is stored as plain data). The tree is
    rebuilt at once and checked against the state dict (names and shapes), and with ``example_inputs``
    the rebuilt model must give the very same outputs."""
    report: ExportReport | None = None
    if not isinstance(small_model, nn.Module) and hasattr(small_model, "model") and hasattr(small_model, "report"):
        report = small_model.report
        small_model = small_model.model
    if not isinstance(small_model, nn.Module):
        raise TypeError(f"save_exported needs an nn.Module (or export's result), got {type(small_model).__name__}")
    architecture = describe_module(small_model)
    state = small_model.state_dict()
    with torch.device("meta"):
        probe = build_module(architecture)
    want = {k: tuple(v.shape) for k, v in state.items()}
    got = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"save_exported: the described architecture does not rebuild the model's tensors {diff}; "
                         "a module's attributes disagree with its weights")
    training = small_model.training
    if example_inputs is not None:
        rebuilt = _rebuild(architecture, {k: v.clone() for k, v in state.items()}, False)
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        try:
            with torch.no_grad():
                same = _outputs_equal(small_model.eval()(*args), rebuilt(*args))
        finally:
            small_model.train(training)
        if not same:
            raise ValueError("save_exported: the rebuilt model computes a different function on example_inputs")
    return _save({FORMAT_KEY: EXPORTED, "version": VERSION, "architecture": architecture, "state_dict": state,
                  "training": training, "report": _report_dict(report)}, path)


def _report_dict(report) -> dict | None:
    """export's report as plain data (for the record; load_exported does not need it)."""
    if report is None:
        return None
    from dataclasses import asdict, is_dataclass

    data = asdict(report) if is_dataclass(report) and not isinstance(report, type) else dict(report)
    return {k: {str(a): _plain(b, k) for a, b in v.items()} if isinstance(v, dict) else _plain(v, k)
            for k, v in data.items()}


def load_exported(path: PathLike, map_location: MapLocation = "cpu") -> nn.Module:
    """The model saved by :func:`save_exported`, rebuilt from its architecture tree (no code from the file:
    it is read weights-only) with its weights, in the train/eval mode it was saved in."""
    obj = read(path, map_location)
    if obj[FORMAT_KEY] != EXPORTED:
        raise ValueError(f"{path} holds a constrained model (no architecture): use "
                         "ms.constrain.load_constrained(factory, path)")
    return model_from_exported(obj, str(path))


def model_from_exported(obj: Mapping, where: str = "the exported model") -> nn.Module:
    """The module described by an already loaded ``"exported"`` dict (what :func:`load_exported` and
    ``mirrorsym diagnose`` use); a ValueError when it does not rebuild."""
    if int(obj.get("version", 0)) > VERSION:
        raise ValueError(f"{where} has format version {obj['version']}; this mirrorsym reads up to {VERSION}")
    try:
        return _rebuild(obj["architecture"], obj["state_dict"], bool(obj.get("training", False)))
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{where} does not rebuild ({type(exc).__name__}: {exc})") from exc
