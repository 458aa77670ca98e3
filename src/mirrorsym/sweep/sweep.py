"""``Sweep``: a model factory + loss + data + grid + metrics, trained as vmapped chunks, stored, resumable.

Example (Hadamard regression, docs/theory.md#closed-form-a)::

    sweep = ms.sweep.Sweep(
        model_factory=lambda seed: Hadamard(d=100, seed=seed),
        criterion=torch.nn.functional.mse_loss,             # criterion(model(x), *targets) -> scalar
        data=(X, y),                                        # tensors indexed along dim 0
        grid={"lr": [0.01, 0.03], "weight_decay": [0.0, 1e-3, 1e-2], "seed": range(8),
              "batch_size": 32, "steps": 2000, "momentum": 0.9},
        metrics={"loss": "loss", "support": lambda p, data: ((p["u"] * p["w"]).abs() > 1e-3).sum()},
        record_every=100,
    )
    df = sweep.run("runs/hadamard", backend="local", device="auto", chunk_size=128)

``weight_decay`` is torch's coupled λ: the objective is L + γ‖θ‖² with **γ = λ/2** (docs/theory.md#conventions), for
``optimizer`` "sgd" (default) and "adam"; "adamw" decays decoupled (θ ← θ − ηλθ), which is no penalty
(see :mod:`mirrorsym.sweep.config` for optimizers, schedules and clipping).

**Run identity.** A run's id hashes the sweep name, its config and the sweep's *fingerprint*: digests of
everything else that determines its result (see :meth:`Sweep.fingerprint`): the data tensors (bytes,
shape, dtype), the model factory (source or bytecode, closure and referenced globals, and the initial
parameters it builds for the first config's seed), the loss, the metrics, the model hooks of the options
in use, the number of random inputs of the forward (``random_inputs``), and the mirrorsym version with the
sweep code. The parts are stored in ``sweep.json``. A rerun
with the same inputs meets the same ids and resumes; a rerun with other inputs gets new ids, trains
everything and warns once, naming what changed ("data changed", "loss changed", ...), so stored rows
are never returned for inputs they were not computed from. Lists, dicts and sets that the factory,
loss or metrics read from a closure, module global or object attribute are taken as state (counters,
caches), not hashed; pass settings as arguments, tuples, tensors or ``functools.partial`` arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import sys
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from ..core.io import source_tree_hash
from . import backends
from .config import OPTIONS, check_against_data, expand_grid, run_id
from .engine import Problem, UnsupportedModel, check_trainable, program_key, train_chunk
from .store import ResultStore, StorePath

BACKENDS = ("local", "ray")
POLL_SECONDS = 0.1  # how often a process waiting for chunks claimed by another one looks again


def _builtin_metric(name: str, criterion) -> Callable:
    if name == "loss":
        return lambda p, data, forward: criterion(forward(p, data[0]), *data[1:])
    if name == "accuracy":
        return lambda p, data, forward: (forward(p, data[0]).argmax(-1) == data[1]).to(torch.float64).mean()
    if name == "param_norm":
        return lambda p, data, forward: torch.sqrt(sum((t.double() ** 2).sum() for t in p.values()))
    raise ValueError(f"mirrorsym.sweep: unknown built-in metric {name!r}; built-ins are 'loss', 'accuracy', "
                     "'param_norm', or pass a function (params, data) -> scalar")


def _as_metric(name: str, metric, criterion) -> Callable:
    """Normalise to ``fn(params, data, forward)``; user functions may take (params, data) only."""
    if isinstance(metric, str):
        return _builtin_metric(metric, criterion)
    if not callable(metric):
        raise TypeError(f"mirrorsym.sweep metrics[{name!r}] must be a callable or a built-in name, "
                        f"got {metric!r}")
    try:
        n_args = len(inspect.signature(metric).parameters)
    except (TypeError, ValueError):
        n_args = 3
    if n_args == 2:
        return _TwoArgMetric(metric)
    return metric


class _TwoArgMetric:
    """Adapter (picklable) for metrics written as ``fn(params, data)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, params, data, forward):
        return self.fn(params, data)


def _as_data(data, what: str) -> tuple[torch.Tensor, ...]:
    data = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    if not data or not all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(f"mirrorsym.sweep {what} must be a Tensor or a tuple of Tensors (inputs, targets...)")
    n = data[0].shape[0] if data[0].dim() else 0
    if n == 0 or any(t.dim() == 0 or t.shape[0] != n for t in data):
        shapes = [tuple(t.shape) for t in data]
        raise ValueError(f"mirrorsym.sweep {what}: every tensor needs the same non-zero length along dim 0, "
                         f"got shapes {shapes}")
    return data


# ---------------------------------------------------------------- fingerprints of a sweep's inputs
_SIMPLE = (type(None), bool, int, float, str)
_MAX_DEPTH = 4  # how far closures, attributes and same-module helpers are followed


def _hex(blob: bytes | str) -> str:
    return hashlib.sha256(blob.encode() if isinstance(blob, str) else blob).hexdigest()[:16]


def tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    """blake2b over the shape, dtype and bytes of each tensor (any device or layout), 16 hex digits."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        if t.is_meta:
            continue
        if t.layout != torch.strided:
            t = t.to_dense()
        flat = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)  # the array's memoryview: its bytes, not copied
    return h.hexdigest()[:16]


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join("x".join(map(str, t.shape)) + f" {str(t.dtype).removeprefix('torch.')}" for t in tensors)


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _code_digest(code: types.CodeType) -> str:
    """Bytecode, names and constants (nested code recursively): a function's body when no source exists."""
    consts = [_code_digest(c) if isinstance(c, types.CodeType) else
              sorted(map(repr, c)) if isinstance(c, frozenset) else repr(c) for c in code.co_consts]
    return _hex(code.co_code + json.dumps([consts, code.co_names, code.co_varnames]).encode())


@functools.lru_cache(maxsize=4096)
def _source_digest(obj) -> str | None:
    """Digest of a function's or class's source. Cached: ``inspect.getsource`` of a class scans its whole
    file, and a sweep may describe the same class once per metric object (thousands of times)."""
    try:
        return _hex(inspect.getsource(obj))
    except (OSError, TypeError):
        return None


def _describe_function(fn: types.FunctionType, depth: int, seen: frozenset) -> dict:
    """Code, closure, defaults and module-level inputs of a function. Lists, dicts and sets reached
    through the closure or module globals count as state (counters, caches), not as inputs: their
    contents are not hashed, or a factory that counts its calls would never resume."""
    # a lambda's source is its whole line (other arguments too): its bytecode pins it down exactly
    body = None if fn.__name__ == "<lambda>" else _source_digest(fn)
    out: dict[str, object] = {"function": _qualname(fn), "code": body or _code_digest(fn.__code__)}
    if fn.__closure__:
        cells = []
        for cell in fn.__closure__:
            try:
                cells.append(_describe(cell.cell_contents, depth + 1, seen, containers=False))
            except ValueError:  # an empty cell
                cells.append("<empty>")
        out["closure"] = cells
    if fn.__defaults__ or fn.__kwdefaults__:
        out["defaults"] = _describe([fn.__defaults__, fn.__kwdefaults__], depth + 1, seen)
    # module-level values the body reads (constants, tensors, helpers of the same module): edits to
    # them change the result as much as edits to the body
    used = {}
    for name in sorted(_code_names(fn.__code__)):
        if name not in fn.__globals__:
            continue
        value = fn.__globals__[name]
        if isinstance(value, (types.FunctionType, type)):
            if getattr(value, "__module__", None) == fn.__module__:
                used[name] = _describe(value, depth + 1, seen, containers=False)
        elif not isinstance(value, (types.ModuleType, types.BuiltinFunctionType)) and not callable(value):
            used[name] = _describe(value, depth + 1, seen, containers=False)
    if used:
        out["globals"] = used
    return out


def _describe(obj, depth: int = 0, seen: frozenset = frozenset(), containers: bool = True):
    """A deterministic JSON description of a callable or value (no memory addresses), for hashing.
    ``containers=False``: lists, dicts and sets (also inside objects met from here) are named by type
    only, as mutable state rather than inputs (see :func:`_describe_function`)."""
    if isinstance(obj, _SIMPLE):
        return obj
    if isinstance(obj, torch.Tensor):
        return {"tensor": tensor_digest([obj])}
    if isinstance(obj, np.ndarray):
        return {"array": tensor_digest([torch.from_numpy(np.ascontiguousarray(obj))])} \
            if obj.dtype != object else {"array": repr(obj.shape)}
    if isinstance(obj, bytes):
        return {"bytes": _hex(obj)}
    if isinstance(obj, (np.generic, torch.dtype, torch.device)):
        return repr(obj)
    if depth > _MAX_DEPTH or id(obj) in seen:
        return {"type": _qualname(type(obj))}
    seen = seen | {id(obj)}
    if not containers and isinstance(obj, (list, dict, set, bytearray)):
        return {"state": type(obj).__name__}
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1, seen, containers) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth + 1, seen, containers)
                for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (set, frozenset)):
        return sorted(json.dumps(_describe(v, depth + 1, seen, containers), sort_keys=True) for v in obj)
    if isinstance(obj, functools.partial):
        return {"partial": _describe(obj.func, depth + 1, seen),
                "args": _describe(obj.args, depth + 1, seen, containers),
                "keywords": _describe(dict(obj.keywords), depth + 1, seen, containers)}
    if isinstance(obj, types.MethodType):
        return {"method": _describe(obj.__func__, depth + 1, seen),
                "self": _describe(obj.__self__, depth + 1, seen, containers)}
    if isinstance(obj, types.FunctionType):
        return _describe_function(obj, depth, seen)
    if isinstance(obj, types.ModuleType):
        return {"module": obj.__name__}
    if isinstance(obj, type):
        return {"class": _qualname(obj), "source": _source_digest(obj)}
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return {"builtin": _qualname(obj)}
    out = {"object": _describe(type(obj), depth + 1, seen)}
    if isinstance(obj, nn.Module):
        out["state"] = tensor_digest([t for _, t in sorted(obj.state_dict().items())])
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, _SIMPLE)}
    else:
        try:
            attrs = dict(vars(obj))
        except TypeError:  # no __dict__ (slots, C types): the class is all we know
            attrs = {}
    if attrs:
        # an object's lists and dicts are usually its state (history, cache), not settings
        out["attrs"] = {k: _describe(v, depth + 1, seen, containers=False) for k, v in sorted(attrs.items())}
    return out


def describe_digest(obj) -> str:
    """16 hex digits identifying a callable by its code, closure, defaults and module-level inputs."""
    return _hex(json.dumps(_describe(obj), sort_keys=True))


# what each fingerprint part means, for the message that names what changed
_CHANGES = {"data": "data changed", "eval_data": "eval_data changed", "model_factory": "model factory changed",
            "model_init": "model factory changed (other initial parameters)", "loss": "loss changed",
            "metrics": "metrics changed", "options": "model hooks of the options changed",
            "random_inputs": "random_inputs changed",
            "mirrorsym": "mirrorsym version or sweep code changed"}


def _mirrorsym_version() -> str:
    pkg = sys.modules.get("mirrorsym")
    version = getattr(pkg, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        try:
            version = dist_version("mirrorsym")
        except PackageNotFoundError:
            version = "unknown"
    return version


@functools.lru_cache(maxsize=1)
def _sweep_code_digest() -> str:
    return source_tree_hash(Path(__file__).parent)[:16]


def what_changed(old: Mapping | None, new: Mapping) -> list[str]:
    """Human-readable differences between two fingerprints (``{"id", "parts"}``), [] if none."""
    if old is None:
        return []
    if not old.get("parts"):
        return ["the store was written by a mirrorsym without input fingerprints"]
    changed: list[str] = []
    for key, new_value in new["parts"].items():
        if old["parts"].get(key) != new_value:
            label = _CHANGES.get(key, f"{key} changed")
            if label.startswith("model factory changed") and any(c.startswith("model factory") for c in changed):
                continue
            changed.append(label)
    return changed or (["fingerprint changed"] if old.get("id") != new["id"] else [])


def plan_chunks(configs: Sequence[dict], chunk_size: int, workers: int = 1) -> list[list[dict]]:
    """Group configs by :func:`~mirrorsym.sweep.engine.program_key` (batch size, steps, optimizer,
    Nesterov, clipping on/off) in order of first appearance, then cut each group into consecutive chunks.

    Each group is cut into chunks of ``chunk_size`` (the last one shorter), as the local backend does.
    With ``workers > 1`` (Ray) a group that this cuts into fewer than ``workers`` chunks is cut instead
    into ``min(workers, len(group))`` chunks of balanced sizes, so that every worker gets a share.
    Deterministic for given arguments, so a rerun with the same ``chunk_size`` (and worker count) meets
    the very same chunks."""
    groups: dict[tuple, list[dict]] = {}
    for c in configs:
        groups.setdefault(program_key(c), []).append(c)
    chunks = []
    for g in groups.values():
        if -(-len(g) // chunk_size) >= min(workers, len(g)):
            chunks += [g[i : i + chunk_size] for i in range(0, len(g), chunk_size)]
            continue
        count = min(workers, len(g))
        size, extra = divmod(len(g), count)
        start = 0
        for i in range(count):
            stop = start + size + (1 if i < extra else 0)
            chunks.append(g[start:stop])
            start = stop
    return chunks


class Sweep:
    """Many training runs of one model family; see the module docstring for an example.

    Args:
        model_factory: ``seed -> nn.Module``, deterministic in the seed, one architecture for all seeds.
            Buffers are constants during training: BatchNorm in train mode (running statistics updated in
            place) and dropout in train mode (no per-copy generator) are refused with
            :class:`~mirrorsym.sweep.engine.UnsupportedModel` naming the module; use eval-mode norms,
            GroupNorm or LayerNorm and p = 0, or train such runs one by one. The forward and loss are
            traced once per chunk (``make_fx``): Python side effects in them run once, not every step.
        criterion: ``criterion(model(x), *targets) -> 0-dim Tensor`` (a mean over the batch): the sweep owns
            the model, so it takes the (model, criterion) form; the loss it trains is
            ``ms.loss_from_model(model, criterion)``, the one convention ``loss_fn(params, batch)``.
        data: a Tensor or tuple ``(x, *targets)`` indexed along dim 0 (floating tensors are cast to the
            parameters' dtype; integer targets are kept).
        grid: ``{field: value | list}`` (cartesian product) or a list of such dicts; fields and options
            in :mod:`mirrorsym.sweep.config`. ``lr``, ``batch_size`` and ``steps`` are required.
        metrics: ``{name: fn | "loss" | "accuracy" | "param_norm"}``, ``fn(params, batch) -> scalar`` (the
            loss convention's signature) or ``fn(params, batch, forward)`` with ``forward(params, x)`` the
            model; evaluated under vmap on
            ``eval_data`` (default: ``data``) at steps 0, r, 2r, … and the last. Default ``{"loss": "loss"}``.
        record_every: r above.
        name: part of every run id; two sweeps with different names never share rows.
        keep_params: store each run's final parameters (column ``final_params``; read a row's with
            :func:`mirrorsym.sweep.final_params`), for analyses that need the trained weights (spectra,
            thresholds at the trained point, features). Off by default: it costs one float per parameter
            per run on disk.
        random_inputs: k ≥ 0 (default 0). With k > 0 every training step calls the model as
            ``model(x_B, ε_0, …, ε_{k−1})``: k tensors of standard normals with the minibatch input's shape
            and dtype, drawn from the run's own counter-based stream (``rng.RANDOM_INPUTS``, keyed by
            (seed, step, j)), so identical for a run whatever the chunking, backend or device, and
            different across seeds. This is how a model gets randomness (augmentations, dropout-like masks:
            a Bernoulli(p) mask is ``0.5 * (1 + torch.erf(eps / 2 ** 0.5)) < p``) in place of torch.rand*
            or dropout, which the engine refuses. Metrics (and the ``loss`` metric) call ``model(x)``
            without them: the forward must accept an empty ``eps`` and evaluate deterministically then.
            Part of every run's fingerprint (another k never reuses stored rows). See
            :mod:`mirrorsym.sweep.engine`.

    Everything is validated here, before any work: an empty grid, a non-positive lr or batch size, a
    batch size above the data size, an unknown option or metric raise ``ValueError``/``TypeError``.
    """

    def __init__(self, model_factory: Callable[[int], nn.Module], criterion: Callable, data, grid,
                 metrics: Mapping[str, Callable | str] | None = None, record_every: int = 100,
                 eval_data=None, name: str = "sweep", keep_params: bool = False, random_inputs: int = 0):
        if not callable(model_factory) or not callable(criterion):
            raise TypeError("mirrorsym.sweep: model_factory and criterion must be callables")
        if isinstance(random_inputs, bool) or not isinstance(random_inputs, int) or random_inputs < 0:
            raise ValueError(f"mirrorsym.sweep: random_inputs must be an int >= 0, got {random_inputs!r}")
        if not isinstance(record_every, int) or record_every < 1:
            raise ValueError(f"mirrorsym.sweep: record_every must be an int >= 1, got {record_every!r}")
        data = _as_data(data, "data")
        eval_data = data if eval_data is None else _as_data(eval_data, "eval_data")
        self.configs = expand_grid(grid)
        check_against_data(self.configs, int(data[0].shape[0]))
        if len({run_id(name, c) for c in self.configs}) != len(self.configs):
            raise ValueError("mirrorsym.sweep: the grid repeats a config; every run must be distinct")
        metrics = {"loss": "loss"} if metrics is None else dict(metrics)
        clash = sorted(set(metrics) & (set(self.configs[0]) | {"run_id", "status", "diverged_step"}))
        if clash or any(m.startswith("history_") for m in metrics):
            raise ValueError(f"mirrorsym.sweep: metric names {clash or list(metrics)} clash with result "
                             "columns; rename them")
        self.name = name
        self._user_metrics = metrics  # as given: what the fingerprint describes
        self._eval_is_data = eval_data is data
        self.problem = Problem(model_factory, criterion, data, eval_data,
                               {k: _as_metric(k, v, criterion) for k, v in metrics.items()}, record_every, name,
                               keep_params=bool(keep_params), random_inputs=random_inputs)
        self._fingerprint: dict | None = None

    def __len__(self) -> int:
        return len(self.configs)

    def fingerprint(self) -> dict:
        """``{"id": 16 hex, "parts": {part: digest}}`` of everything besides the config that determines a
        run's result; stored in ``sweep.json`` and hashed into every run id.

        Parts: ``data``/``eval_data`` (blake2b of each tensor's bytes, shape and dtype, with the shapes
        spelled out), ``model_factory`` (source, or bytecode for lambdas, plus closure, defaults and the
        module-level values and same-module helpers it reads), ``model_init`` (digest of the state_dict
        ``model_factory`` builds for the first config's seed: catches changes the code digest cannot see,
        e.g. in a helper of another module), ``loss``, ``metrics`` (built-in names or function digests),
        ``options`` (the ``transform_model`` hooks of options set away from their default),
        ``random_inputs`` (k: how many random tensors the forward gets) and
        ``mirrorsym`` (package version and a digest of the sweep code). Computed afresh by every
        :meth:`run` (it builds one model), so data changed in place is noticed too. A model factory that
        is not deterministic in its seed gives another ``model_init`` each time, so every rerun of it
        trains afresh.
        """
        p = self.problem
        seed = self.configs[0]["seed"]
        try:
            init = p.model_factory(seed)
        except Exception as exc:
            raise RuntimeError(f"mirrorsym.sweep: model_factory({seed}) failed while fingerprinting the sweep's "
                               f"inputs: {exc}") from exc
        if not isinstance(init, nn.Module):
            raise TypeError(f"mirrorsym.sweep: model_factory({seed}) returned {type(init).__name__}, expected "
                            "an nn.Module")
        check_trainable(init)  # train-mode BatchNorm, dropout: refused by name before any work
        used_hooks = {name: opt.transform_model for name, opt in sorted(OPTIONS.items())
                      if opt.transform_model is not None and any(c.get(name, opt.default) != opt.default
                                                                   for c in self.configs)}
        parts = {
            "data": f"{_shapes(p.data)}: {tensor_digest(p.data)}",
            "eval_data": "= data" if self._eval_is_data else f"{_shapes(p.eval_data)}: {tensor_digest(p.eval_data)}",
            "model_factory": describe_digest(p.model_factory),
            "model_init": f"seed {seed}: " + tensor_digest([t for _, t in sorted(init.state_dict().items())]),
            "loss": describe_digest(p.criterion),
            "metrics": describe_digest(self._user_metrics),
            "options": describe_digest(used_hooks),
            "random_inputs": str(p.random_inputs),
            "mirrorsym": f"{_mirrorsym_version()} sweep code {_sweep_code_digest()}",
        }
        self._fingerprint = {"id": _hex(json.dumps(parts, sort_keys=True)), "parts": parts}
        return self._fingerprint

    @property
    def run_ids(self) -> list[str]:
        """The run ids in grid order: ``run_id(f"{name}#{fingerprint id}", config)`` (computes the
        fingerprint if no :meth:`run` did yet)."""
        fp = self._fingerprint or self.fingerprint()
        return [run_id(self._salted_name(fp), c) for c in self.configs]

    def _salted_name(self, fp: Mapping) -> str:
        return f"{self.name}#{fp['id']}"

    def _meta(self, fp: Mapping) -> dict:
        meta = {"name": self.name, "metrics": sorted(self.problem.metrics),
                "record_every": self.problem.record_every, "fingerprint": dict(fp)}
        if self.problem.keep_params:  # only when on: stores written without it keep their identity
            meta["keep_params"] = True
        return meta

    def _trial(self, problem: Problem, device) -> None:
        """One step of the first config (K = 1) so that shape or dtype mistakes fail before any work."""
        trial = dict(self.configs[0], steps=1)
        try:
            train_chunk(problem, [trial], device)
        except UnsupportedModel:
            raise  # already names the module and the fix
        except Exception as exc:
            raise RuntimeError(f"mirrorsym.sweep: a one-step trial of config {trial} failed: {exc}") from exc

    def run(self, out_dir, backend: str = "local", address: str | None = None, device="auto",
            chunk_size: int = 128, progress: bool = True, ray_options: dict | None = None,
            wait_timeout: float = 3600.0, compile: bool = False) -> pd.DataFrame:
        """Train every run not yet in ``out_dir`` and return this sweep's rows in grid order.

        ``out_dir``: a local path, a ``file://`` URL, or a pyarrow/fsspec filesystem URL (``s3://...``;
        see :mod:`mirrorsym.sweep.store` for what a remote store guarantees). ``backend="local"`` trains
        the chunks in this process; ``"ray"`` sends them as Ray tasks to the cluster at ``address`` (None:
        start a local instance; see :mod:`mirrorsym.sweep.backends`), cut into at least as many chunks as
        the cluster runs tasks at once. ``device``: "auto" (CUDA if available, else CPU), or e.g. "cpu",
        "cuda:1"; on Ray it is resolved on each worker. ``chunk_size``: most copies per vmapped step
        (lower it if memory runs out). Finished chunks are written atomically with a checksum; rerunning
        resumes. With the same ``chunk_size`` (and on Ray the same number of workers) a resumed sweep
        meets the very same chunks and its rows are bit-identical to an uninterrupted run's; otherwise
        the remaining runs are regrouped (results then agree to round-off, as vmapped matmuls may block
        differently for another K; minibatches and noise depend on each run's seed and step only). Ctrl-C
        stops after saving what is finished and re-raises ``KeyboardInterrupt``.

        Stored rows are reused only for the very same inputs (see :meth:`fingerprint`); with other data,
        model factory, loss or metrics every run is trained again and a warning names what changed. A
        damaged chunk is reported, moved aside and its runs are trained again in this call.

        Several processes may run the same sweep into one ``out_dir`` at once: each trains the chunks no
        other live process has claimed, then waits for the others' chunks; ``wait_timeout`` seconds
        without any chunk finishing raise ``TimeoutError`` naming the processes waited for.

        ``compile=True`` compiles each chunk's traced step with ``torch.compile`` (inductor): several times
        faster per step for elementwise-heavy models, but compiling takes seconds to a minute per chunk
        shape, so it pays back on long runs only (see BENCHMARKS.md). Results equal the uncompiled ones
        up to round-off.
        """
        if backend not in BACKENDS:
            raise ValueError(f"mirrorsym.sweep: backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"mirrorsym.sweep: chunk_size must be an int >= 1, got {chunk_size!r}")
        fp = self.fingerprint()
        problem = dataclasses.replace(self.problem, name=self._salted_name(fp),  # rows get the salted ids
                                      compile_step=bool(compile))
        ids = self.run_ids
        store = ResultStore(out_dir)
        old = store.open(self._meta(fp), write=False)  # written after the trial: broken inputs leave no trace
        finished = store.finished_ids()
        todo = [c for c, rid in zip(self.configs, ids, strict=True) if rid not in finished]
        changed = what_changed(None if old is None else old.get("fingerprint") or {}, fp)
        if changed:
            reused = len(self) - len(todo)
            warnings.warn(f"mirrorsym.sweep: {store.root} was last run with other inputs ({', '.join(changed)}); "
                          f"the rows stored for those inputs are not returned and this sweep trains its {len(todo)} "
                          "runs" + (f" (reusing {reused} stored earlier for these very inputs)" if reused else ""),
                          stacklevel=2)
        if todo:
            self._trial(problem, device if backend == "local" else "cpu")
        store.write_meta()
        console = Console(stderr=True, quiet=not progress)
        if not todo:
            console.print(f"sweep {self.name!r}: all {len(self)} runs already stored in {store.root}",
                          markup=False, highlight=False)
        start = time.perf_counter()
        counts = {"done": 0}
        with contextlib.ExitStack() as stack:
            workers = 1
            if backend == "ray" and todo:
                workers = stack.enter_context(backends.ray_session(address, ray_options))
            bar = stack.enter_context(Progress(
                TextColumn("[bold]sweep[/] {task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not progress or not todo))
            task = bar.add_task(f"0/{len(todo)} runs", total=sum(c["steps"] for c in todo))

            def advance(copy_steps: int) -> None:
                bar.advance(task, copy_steps)

            def on_chunk(chunk) -> None:
                counts["done"] += len(chunk)
                bar.update(task, description=f"{counts['done']}/{len(todo)} runs")

            def train(chunks) -> list:
                if backend == "local":
                    return backends.run_local(problem, chunks, store, device, advance, on_chunk)
                return backends.run_ray(problem, chunks, store, device, advance, on_chunk, address, ray_options)

            def say(message: str) -> None:  # above the progress bar if there is one, else plain stderr
                if progress:
                    console.print(message, markup=False, highlight=False)
                else:
                    print(message, file=sys.stderr)

            try:
                df = self._train_until_complete(problem, store, ids, chunk_size, train, wait_timeout, say,
                                                workers)
            except KeyboardInterrupt:
                saved = len(set(ids) & finished) + counts["done"]
                console.print(f"[yellow]sweep interrupted[/]: {saved}/{len(self)} runs saved in "
                              f"{store.root}; run again to resume")
                raise
        self._summary(console, df, counts["done"], time.perf_counter() - start, backend)
        return df

    def _train_until_complete(self, problem: Problem, store: ResultStore, ids: list[str], chunk_size: int,
                              train: Callable, wait_timeout: float, say: Callable[[str], None],
                              workers: int = 1) -> pd.DataFrame:
        """Train what is neither stored nor claimed by another live process, wait for what is, and repeat
        until every run is stored and verified; returns the rows in grid order."""
        attempts: Counter[StorePath] = Counter()
        waiting_since, last_count, incomplete = None, -1, 0
        while True:
            finished = store.finished_ids()
            todo = [c for c, rid in zip(self.configs, ids, strict=True) if rid not in finished]
            if not todo:
                df = self._rows(store, ids)
                if len(df) == len(ids):
                    return df
                incomplete += 1  # a chunk was found damaged while loading: its runs are not finished now
                if incomplete > 2:
                    raise RuntimeError(f"mirrorsym.sweep: {store.runs} keeps losing verified chunks while they "
                                       "are loaded; is another program changing it?")
                continue
            chunks = plan_chunks(todo, chunk_size, workers)
            trained = train(chunks)
            for chunk in trained:
                path = store.chunk_path(run_id(problem.name, c) for c in chunk)
                attempts[path] += 1
                if attempts[path] > 2:
                    raise RuntimeError(f"mirrorsym.sweep: the chunk file {path}, written by this process, fails "
                                       f"verification every time; check {store.runs} (disk full? another "
                                       "program changing it?)")
            if trained:
                waiting_since = None
                continue
            # every remaining chunk is claimed by another live process: wait for it to finish them
            now = time.monotonic()
            if waiting_since is None:
                owners = store.claim_owners([[run_id(problem.name, c) for c in ch] for ch in chunks])
                say(f"mirrorsym.sweep: waiting for {len(todo)} runs in {store.runs} claimed by another process "
                    f"({', '.join(owners) or 'claims just released'})")
                waiting_since, last_count = now, len(finished)
            elif len(finished) != last_count:
                waiting_since, last_count = now, len(finished)
            elif now - waiting_since > wait_timeout:
                owners = store.claim_owners([[run_id(problem.name, c) for c in ch] for ch in chunks])
                raise TimeoutError(
                    f"mirrorsym.sweep: waited {wait_timeout:g} s for {len(todo)} runs in {store.runs} claimed by "
                    f"{', '.join(owners) or 'another process'} without any chunk finishing; that process still "
                    "runs (it holds its claims). Rerun later to collect its results, or raise wait_timeout"
                )
            time.sleep(POLL_SECONDS)

    def _rows(self, store: ResultStore, ids: list[str]) -> pd.DataFrame:
        df = store.load(run_ids=ids)
        if df.empty:
            return df
        order = {rid: i for i, rid in enumerate(ids)}
        df = df[df["run_id"].isin(order)]
        return df.iloc[df["run_id"].map(order).argsort()].reset_index(drop=True)

    def _summary(self, console: Console, df: pd.DataFrame, trained: int, seconds: float,
                 backend: str) -> None:
        table = Table(title=f"sweep {self.name!r}")
        for col in ("runs", "trained now", "already stored", "ok", "diverged", "seconds", "backend"):
            table.add_column(col, justify="right")
        status = df["status"].value_counts() if len(df) else {}
        table.add_row(str(len(df)), str(trained), str(len(df) - trained), str(status.get("ok", 0)),
                      str(status.get("diverged", 0)), f"{seconds:.1f}", backend)
        console.print(table)
