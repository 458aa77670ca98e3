"""``Sweep``: a model factory + loss + data + grid + metrics, trained as vmapped chunks, stored, resumable.

Example (Hadamard regression, THEORY.md §3 closed form A)::

    sweep = ms.sweep.Sweep(
        model_factory=lambda seed: Hadamard(d=100, seed=seed),
        loss_fn=torch.nn.functional.mse_loss,               # loss_fn(model(x), *targets) -> scalar
        data=(X, y),                                        # tensors indexed along dim 0
        grid={"lr": [0.01, 0.03], "weight_decay": [0.0, 1e-3, 1e-2], "seed": range(8),
              "batch_size": 32, "steps": 2000, "momentum": 0.9},
        metrics={"loss": "loss", "support": lambda p, data: ((p["u"] * p["w"]).abs() > 1e-3).sum()},
        record_every=100,
    )
    df = sweep.run("runs/hadamard", backend="local", device="auto", chunk_size=128)

``weight_decay`` is torch's coupled λ: the objective is L + γ‖θ‖² with **γ = λ/2** (THEORY.md §0).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from . import backends
from .config import check_against_data, expand_grid, run_id
from .engine import Problem, train_chunk
from .store import ResultStore

BACKENDS = ("local", "ray")


def _builtin_metric(name: str, loss_fn) -> Callable:
    if name == "loss":
        return lambda p, data, forward: loss_fn(forward(p, data[0]), *data[1:])
    if name == "accuracy":
        return lambda p, data, forward: (forward(p, data[0]).argmax(-1) == data[1]).to(torch.float64).mean()
    if name == "param_norm":
        return lambda p, data, forward: torch.sqrt(sum((t.double() ** 2).sum() for t in p.values()))
    raise ValueError(f"mirrorsym.sweep: unknown built-in metric {name!r}; built-ins are 'loss', 'accuracy', "
                     "'param_norm', or pass a function (params, data) -> scalar")


def _as_metric(name: str, metric, loss_fn) -> Callable:
    """Normalise to ``fn(params, data, forward)``; user functions may take (params, data) only."""
    if isinstance(metric, str):
        return _builtin_metric(metric, loss_fn)
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


def plan_chunks(configs: Sequence[dict], chunk_size: int) -> list[list[dict]]:
    """Group configs by (batch_size, steps) in order of first appearance, then cut each group into
    consecutive chunks of ``chunk_size``. Deterministic, so a rerun meets the very same chunks."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for c in configs:
        groups.setdefault((c["batch_size"], c["steps"]), []).append(c)
    return [g[i : i + chunk_size] for g in groups.values() for i in range(0, len(g), chunk_size)]


class Sweep:
    """Many training runs of one model family; see the module docstring for an example.

    Args:
        model_factory: ``seed -> nn.Module``, deterministic in the seed, one architecture for all seeds.
            Buffers are constants during training (no BatchNorm in train mode: running stats cannot be
            updated in place under vmap; use eval-mode norms, GroupNorm or LayerNorm).
        loss_fn: ``loss_fn(model(x), *targets) -> 0-dim Tensor`` (a mean over the batch).
        data: a Tensor or tuple ``(x, *targets)`` indexed along dim 0 (floating tensors are cast to the
            parameters' dtype; integer targets are kept).
        grid: ``{field: value | list}`` (cartesian product) or a list of such dicts; fields and options
            in :mod:`mirrorsym.sweep.config`. ``lr``, ``batch_size`` and ``steps`` are required.
        metrics: ``{name: fn | "loss" | "accuracy" | "param_norm"}``, ``fn(params, data) -> scalar`` or
            ``fn(params, data, forward)`` with ``forward(params, x)`` the model; evaluated under vmap on
            ``eval_data`` (default: ``data``) at steps 0, r, 2r, … and the last. Default ``{"loss": "loss"}``.
        record_every: r above.
        name: part of every run id; two sweeps with different names never share rows.

    Everything is validated here, before any work: an empty grid, a non-positive lr or batch size, a
    batch size above the data size, an unknown option or metric raise ``ValueError``/``TypeError``.
    """

    def __init__(self, model_factory: Callable[[int], nn.Module], loss_fn: Callable, data, grid,
                 metrics: Mapping[str, Callable | str] | None = None, record_every: int = 100,
                 eval_data=None, name: str = "sweep"):
        if not callable(model_factory) or not callable(loss_fn):
            raise TypeError("mirrorsym.sweep: model_factory and loss_fn must be callables")
        if not isinstance(record_every, int) or record_every < 1:
            raise ValueError(f"mirrorsym.sweep: record_every must be an int >= 1, got {record_every!r}")
        data = _as_data(data, "data")
        eval_data = data if eval_data is None else _as_data(eval_data, "eval_data")
        self.configs = expand_grid(grid)
        check_against_data(self.configs, int(data[0].shape[0]))
        self.run_ids = [run_id(name, c) for c in self.configs]
        if len(set(self.run_ids)) != len(self.run_ids):
            raise ValueError("mirrorsym.sweep: the grid repeats a config; every run must be distinct")
        metrics = {"loss": "loss"} if metrics is None else dict(metrics)
        clash = sorted(set(metrics) & (set(self.configs[0]) | {"run_id", "status", "diverged_step"}))
        if clash or any(m.startswith("history_") for m in metrics):
            raise ValueError(f"mirrorsym.sweep: metric names {clash or list(metrics)} clash with result "
                             "columns; rename them")
        self.problem = Problem(model_factory, loss_fn, data, eval_data,
                               {k: _as_metric(k, v, loss_fn) for k, v in metrics.items()}, record_every, name)

    def __len__(self) -> int:
        return len(self.configs)

    def _meta(self) -> dict:
        return {"name": self.problem.name, "metrics": sorted(self.problem.metrics),
                "record_every": self.problem.record_every}

    def _trial(self, device) -> None:
        """One step of the first config (K = 1) so that shape or dtype mistakes fail before any work."""
        trial = dict(self.configs[0], steps=1)
        try:
            train_chunk(self.problem, [trial], device)
        except Exception as exc:
            raise RuntimeError(f"mirrorsym.sweep: a one-step trial of config {trial} failed: {exc}") from exc

    def run(self, out_dir, backend: str = "local", address: str | None = None, device="auto",
            chunk_size: int = 128, progress: bool = True, ray_options: dict | None = None) -> pd.DataFrame:
        """Train every run not yet in ``out_dir`` and return this sweep's rows in grid order.

        ``backend="local"`` trains the chunks in this process; ``"ray"`` sends them as Ray tasks to the
        cluster at ``address`` (None: start a local instance; see :mod:`mirrorsym.sweep.backends`).
        ``device``: "auto" (CUDA if available, else CPU), or e.g. "cpu", "cuda:1"; on Ray it is resolved
        on each worker. ``chunk_size``: copies per vmapped step (lower it if memory runs out). Finished
        chunks are written atomically; rerunning resumes. With the same ``chunk_size`` a resumed sweep
        meets the very same chunks and its rows are bit-identical to an uninterrupted run's; another
        ``chunk_size`` regroups the remaining runs (results then agree to round-off, as vmapped matmuls
        may block differently for another K). Ctrl-C stops after saving what is finished and re-raises
        ``KeyboardInterrupt``.
        """
        if backend not in BACKENDS:
            raise ValueError(f"mirrorsym.sweep: backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"mirrorsym.sweep: chunk_size must be an int >= 1, got {chunk_size!r}")
        store = ResultStore(out_dir)
        store.open(self._meta())
        finished = store.finished_ids()
        todo = [c for c, rid in zip(self.configs, self.run_ids, strict=True) if rid not in finished]
        chunks = plan_chunks(todo, chunk_size)
        if chunks:
            self._trial(device if backend == "local" else "cpu")
        console = Console(stderr=True, quiet=not progress)
        start = time.perf_counter()
        counts = {"done": 0}
        with Progress(TextColumn("[bold]sweep[/] {task.description}"), BarColumn(),
                      TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console, disable=not progress) as bar:
            task = bar.add_task(f"0/{len(todo)} runs", total=sum(c["steps"] for c in todo))

            def advance(copy_steps: int) -> None:
                bar.advance(task, copy_steps)

            def on_chunk(chunk) -> None:
                counts["done"] += len(chunk)
                bar.update(task, description=f"{counts['done']}/{len(todo)} runs")

            try:
                if backend == "local":
                    backends.run_local(self.problem, chunks, store, device, advance, on_chunk)
                else:
                    backends.run_ray(self.problem, chunks, store, device, advance, on_chunk, address,
                                     ray_options)
            except KeyboardInterrupt:
                saved = len(finished) + counts["done"]
                console.print(f"[yellow]sweep interrupted[/]: {saved}/{len(self)} runs saved in "
                              f"{store.root}; run again to resume")
                raise
        df = self._rows(store)
        self._summary(console, df, len(todo), time.perf_counter() - start, backend)
        return df

    def _rows(self, store: ResultStore) -> pd.DataFrame:
        df = store.load()
        order = {rid: i for i, rid in enumerate(self.run_ids)}
        df = df[df["run_id"].isin(order)]
        return df.iloc[df["run_id"].map(order).argsort()].reset_index(drop=True)

    def _summary(self, console: Console, df: pd.DataFrame, trained: int, seconds: float,
                 backend: str) -> None:
        table = Table(title=f"sweep {self.problem.name!r}")
        for col in ("runs", "trained now", "already stored", "ok", "diverged", "seconds", "backend"):
            table.add_column(col, justify="right")
        status = df["status"].value_counts() if len(df) else {}
        table.add_row(str(len(df)), str(trained), str(len(df) - trained), str(status.get("ok", 0)),
                      str(status.get("diverged", 0)), f"{seconds:.1f}", backend)
        console.print(table)
