"""What an experiment module provides, and the context it runs in.

An experiment is a module with

* ``NAME`` (registry key) and ``TITLE`` (one line);
* ``CONFIGS``: ``{"tiny": Config(...), "quick": Config(...), "full": Config(...)}`` — dataclass instances;
  ``tiny`` is for the test suite, ``quick`` for the README's main job (all experiments ≤ 10 min on 2 CPU
  cores together), ``full`` for a GPU or a Ray cluster;
* ``run(cfg, ctx) -> dict``: does the work and returns JSON-serialisable results (lists, not tensors);
* ``plot(results, ctx) -> list[Path]``: writes PNG figures into ``ctx.out_dir``;
* ``claims(results, cfg) -> list[Claim]``: prediction vs measurement, each able to fail.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Claim:
    """One checkable statement: what the theory predicts, what was measured, and whether they agree."""

    claim: str
    predicted: Any
    measured: Any
    passed: bool

    def __post_init__(self):
        self.passed = bool(self.passed)
        self.predicted = to_jsonable(self.predicted)
        self.measured = to_jsonable(self.measured)


@dataclass
class Context:
    """Where and how an experiment runs. ``track`` wraps an iterable with the runner's progress bar.
    ``data_dir``: the user's folder of real data sets in torchvision's layout (``--data-dir``), or None."""

    out_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "local"
    address: str | None = None
    size: str = "quick"
    seed: int = 0
    progress: Any = None  # rich.progress.Progress or None
    data_dir: Path | None = None

    def track(self, items: Iterable, description: str = "", total: int | None = None) -> Iterator:
        if self.progress is None:
            yield from items
            return
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        task = self.progress.add_task(f"  {description}", total=total)
        try:
            for item in items:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)


def to_jsonable(x: Any) -> Any:
    """Tensors, numpy values and dataclasses to plain JSON types; NaN and ±inf become None (JSON null),
    which ``np.asarray(x, dtype=float)`` reads back as NaN."""
    if isinstance(x, torch.Tensor):
        return to_jsonable(x.detach().cpu().tolist())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "item") and hasattr(x, "dtype"):  # numpy scalar
        return to_jsonable(x.item())
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def config_key(cfg: Any) -> str:
    """A stable string of a config, stored next to results so that a changed config reruns."""
    return json.dumps(to_jsonable(cfg), sort_keys=True)
