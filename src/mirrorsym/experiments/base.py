"""What an experiment module provides, and the context it runs in.

An experiment is a module with

* ``NAME`` (registry key) and ``TITLE`` (one line);
* ``CONFIGS``: ``{"tiny": Config(...), "quick": Config(...), "full": Config(...)}`` — dataclass instances;
  ``tiny`` is for the test suite, ``quick`` for the README's main job (all experiments ≤ 10 min on 2 CPU
  cores together), ``full`` for a GPU or a Ray cluster;
* ``run(cfg, ctx) -> dict``: does the work and returns JSON-serialisable results (lists, not tensors);
* ``plot(results, ctx) -> list[Path]``: writes PNG figures into ``ctx.out_dir``;
* ``claims(results, cfg) -> list[Claim]``: prediction vs measurement, each able to fail.

Claims are of two kinds. A **check** is a mathematical or software identity (a closed form, an invariance,
an exact threshold, a KKT condition, an exported model computing the same function): it must pass, and a
failed check makes ``mirrorsym reproduce`` exit non-zero. A **finding** is an empirical statement of the
paper or of its follow-ups (e.g. "weight decay makes channels identical"). Its ``verdict`` is
"reproduced", "not reproduced" or "contradicted", decided by a ``rule`` fixed in the code before the run
from one statistic per seed (``seeds`` values, their ``mean`` and 95 % t-interval ``ci95``; with one seed
there is no interval and ``ci95`` is None). A finding never makes the command fail: a finding that does
not reproduce is reported as such. Build findings with :func:`finding`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

KINDS = ("check", "finding")
VERDICTS = ("reproduced", "not reproduced", "contradicted")


@dataclass
class Claim:
    """One statement: what is predicted, what was measured, and how they compare.

    ``kind="check"`` (the default, so ``Claim(text, predicted, measured, passed)`` is a check): ``passed``
    is a bool and a False fails the reproduction. ``kind="finding"``: ``passed`` is None and ``verdict``,
    ``rule``, ``seeds``, ``mean`` and ``ci95`` say what was found (see :func:`finding`)."""

    claim: str
    predicted: Any
    measured: Any
    passed: bool | None = None
    kind: str = "check"
    verdict: str | None = None
    rule: str | None = None
    seeds: int | None = None
    mean: float | None = None
    ci95: list[float] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Claim kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "check":
            if self.passed is None:
                raise ValueError(f"a check needs passed=True/False: {self.claim!r}")
            if self.verdict is not None:
                raise ValueError(f"a check has no verdict (only findings do): {self.claim!r}")
            self.passed = bool(self.passed)
        else:
            if self.passed is not None:
                raise ValueError(f"a finding has a verdict, not passed: {self.claim!r}")
            if self.verdict not in VERDICTS:
                raise ValueError(f"a finding's verdict must be one of {VERDICTS}, got {self.verdict!r}")
            if not self.rule:
                raise ValueError(f"a finding needs the text of its decision rule: {self.claim!r}")
            if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
                raise ValueError(f"a finding needs seeds >= 1 (the runs it rests on), got {self.seeds!r}")
            if self.ci95 is not None and self.seeds < 2:
                raise ValueError("a 95 % interval needs at least two seeds")
        self.predicted = to_jsonable(self.predicted)
        self.measured = to_jsonable(self.measured)
        self.mean = to_jsonable(self.mean)
        self.ci95 = to_jsonable(self.ci95)

    @property
    def failed(self) -> bool:
        """A failed check (findings never fail)."""
        return self.kind == "check" and not self.passed

    def to_dict(self) -> dict:
        return {"claim": self.claim, "kind": self.kind, "predicted": self.predicted, "measured": self.measured,
                "passed": self.passed, "verdict": self.verdict, "rule": self.rule, "seeds": self.seeds,
                "mean": self.mean, "ci95": self.ci95}


def t_interval(values) -> tuple[float | None, list[float] | None]:
    """(mean, 95 % t-interval [lo, hi]) of the finite values; the interval is None below two values,
    the mean None without any."""
    from scipy import stats

    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    n, mean = len(v), sum(v) / len(v)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]


def finding(claim: str, predicted: Any, measured: Any, values, *, statistic: str, better: str,
            threshold: float, contradict: float | None | str = "threshold", inclusive: bool = False) -> Claim:
    """A finding decided by a threshold rule on one statistic e per seed (``values``; None for a seed
    that produced no usable value, e.g. a diverged run).

    ``better="higher"``: **reproduced** iff the 95 % t-interval of mean e lies entirely above
    ``threshold`` (one seed: iff e > threshold); **contradicted** iff it lies entirely below
    ``contradict`` (one seed: iff e < contradict); otherwise **not reproduced**. ``better="lower"``
    mirrors every inequality; ``inclusive=True`` reproduces also at the threshold (≥ / ≤, e.g. "at least
    3 dimensions"). ``contradict`` defaults to ``threshold``; None: never contradicted. Set it to the
    no-effect value when the claim is an effect of a stated size: between the two the effect is not
    reproduced, beyond no-effect it is contradicted. The rule text is stored with the claim; it depends
    only on these arguments, never on the data."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    if isinstance(contradict, str):
        if contradict != "threshold":
            raise ValueError(f"contradict must be a number, None or 'threshold', got {contradict!r}")
        contradict = threshold
    values = list(values)
    if not values:
        raise ValueError("a finding needs at least one seed's value")
    up = better == "higher"
    side, other = ("above", "below") if up else ("below", "above")
    gt, lt = (">", "<") if up else ("<", ">")
    if inclusive:
        side, gt = f"at or {side}", {">": "≥", "<": "≤"}[gt]
    rule = (f"e = {statistic}, one value per seed. Reproduced iff the 95 % t-interval of the mean of e lies "
            f"entirely {side} {threshold:g} (one seed, no interval: iff e {gt} {threshold:g})")
    rule += ("; never contradicted" if contradict is None else
             f"; contradicted iff it lies entirely {other} {contradict:g} (one seed: iff e {lt} {contradict:g})")
    rule += "; otherwise not reproduced."
    mean, ci = t_interval(values)
    verdict = "not reproduced"
    if mean is not None:
        lo, hi = ci if ci is not None else (mean, mean)
        sign = 1.0 if up else -1.0
        worst, best = (lo, hi) if up else (hi, lo)
        margin = sign * (worst - threshold)
        if margin > 0 or (inclusive and margin == 0):
            verdict = "reproduced"
        elif contradict is not None and sign * (best - contradict) < 0:
            verdict = "contradicted"
    return Claim(claim, predicted, measured, None, kind="finding", verdict=verdict, rule=rule,
                 seeds=len(values), mean=mean, ci95=ci)


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ terms, added left to right exactly as the built-in ``sum`` would add them, typed as a tensor
    (``sum`` starts from the int 0, so its type is ``Tensor | int``). Needs at least one term."""
    total: torch.Tensor | None = None
    for t in terms:
        total = t if total is None else total + t
    if total is None:
        raise ValueError("tensor_sum: no terms")
    return total


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
    sweeps: list[dict] = field(default_factory=list)  # what each ``ctx.sweep`` ran (see ``execution``)
    jobs: list[dict] = field(default_factory=list)  # what each ``ctx.map`` ran

    def __getstate__(self) -> dict:
        """A context sent to a Ray worker (pickled) carries no progress bar and no records."""
        return {**self.__dict__, "progress": None, "sweeps": [], "jobs": []}

    @property
    def ray_options(self) -> dict | None:
        """What each Ray task asks for: one GPU when the experiment runs on CUDA (a task without one sees no
        GPU), else the default (one CPU)."""
        return {"num_gpus": 1} if self.device.type == "cuda" else None

    def sweep(self, sweep: Any, store: str = "sweep", chunk_size: int = 128):
        """Run a :class:`mirrorsym.sweep.Sweep` with this context's backend, address and device into
        ``out_dir/<store>`` (resumable) and record what ran; returns its DataFrame. Every grid of an
        experiment that the engine can express goes through here, so ``--device`` and ``--backend ray``
        reach it."""
        df = sweep.run(self.out_dir / store, backend=self.backend, address=self.address, device=self.device,
                       progress=False, chunk_size=chunk_size, ray_options=self.ray_options)
        self.sweeps.append({"store": store, "name": sweep.name, "n_runs": int(len(df))})
        return df

    def map(self, fn: Callable, jobs: Sequence[tuple], name: str, runs: int | None = None) -> list:
        """``[fn(*args) for args in jobs]`` with this context's backend (Ray tasks with ``--backend ray``;
        :func:`mirrorsym.sweep.backends.map_jobs`), for the seeds and grids that the sweep engine cannot
        express (their own training loops); ``fn`` must be a module-level function. Records the jobs and
        ``runs`` (the training runs they hold; default one per job) for ``execution``."""
        from ..sweep.backends import map_jobs

        out = map_jobs(fn, jobs, backend=self.backend, address=self.address, ray_options=self.ray_options)
        self.jobs.append({"name": name, "n_jobs": len(jobs), "n_runs": len(jobs) if runs is None else runs})
        return out

    def split(self, n: int) -> list[range]:
        """Cut ``n`` independent units (seeds) into consecutive jobs for :meth:`map`: one job here (code that
        batches the units stays batched), ``min(n, workers)`` balanced jobs on Ray."""
        if self.backend != "ray" or n <= 1:
            return [range(n)]
        from ..sweep.backends import ray_session

        with ray_session(self.address, self.ray_options) as workers:
            k = min(n, workers)
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def execution(self) -> dict:
        """What the experiment ran on, for its ``results.json``: the engine (``mirrorsym.sweep`` when any
        grid went through :meth:`sweep`, ``jobs`` when only :meth:`map` ran work, else ``in-process``),
        backend, device and number of training runs."""
        engine = "mirrorsym.sweep" if self.sweeps else "jobs" if self.jobs else "in-process"
        return {"engine": engine, "backend": self.backend if engine != "in-process" else "local",
                "device": str(self.device), "n_runs": sum(s["n_runs"] for s in self.sweeps + self.jobs),
                "sweeps": list(self.sweeps), "jobs": list(self.jobs)}

    def track(self, items: Iterable, description: str = "", total: int | None = None) -> Iterator:
        if self.progress is None:
            yield from items
            return
        if total is None and isinstance(items, Sized):
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
