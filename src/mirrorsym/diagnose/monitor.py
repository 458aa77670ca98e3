"""``SymmetryMonitor``: the per-group diagnosis recorded every ``every`` steps of a plain training loop, written
to TensorBoard / Weights & Biases if asked, and drawn over training with :meth:`SymmetryMonitor.plot`.

Scalar names (the same for every logger: this monitor, the Lightning and the Hugging Face callbacks):
``mirrorsym/<group>/<metric>`` with ``<group>`` the group's label from the report (``permutation#0 [0, 2]``,
spaces removed: ``permutation#0[0,2]``) and ``<metric>`` one of :data:`SCALAR_METRICS` that has a value for
the group (dead / distinct / duplicated for unit groups, the ranks for rotation groups, distance for all);
with probe data also ``mirrorsym/probe/<layer>/<dead|dormant|eff_rank>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn

from ..detect.smap import ExampleInputs
from .report import GROUP_COLUMNS, DiagnoseReport, Symmetries, diagnose

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: per-group columns of the report written as scalars (those that are not NaN for the group)
SCALAR_METRICS = ("dead", "duplicated", "distinct", "distance", "eff_rank", "approx_rank", "srank",
                  "stable_rank", "num_rank")
#: per-probed-layer columns written as scalars
PROBE_METRICS = ("dead", "dormant", "eff_rank")


def _tag(text: object) -> str:
    return "".join(str(text).split())


def scalars(rep: DiagnoseReport) -> dict[str, float]:
    """The report as flat scalars ``{"mirrorsym/<group>/<metric>": value}`` (module docstring); NaN metrics
    (rank columns of unit groups, dead/distinct of rotation groups) are left out."""
    out: dict[str, float] = {}
    seen: dict[str, int] = {}
    g = rep.groups
    for row in g.to_dict("records") if g is not None else []:
        row = dict(row)
        if not _nan(row.get("dead")) and not _nan(row.get("distinct")):
            row["duplicated"] = row["units"] - row["dead"] - row["distinct"]
        base = f"mirrorsym/{_tag(row['group'])}"
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:  # two groups with one label: keep both
            base = f"{base}~{seen[base] - 1}"
        for metric in SCALAR_METRICS:
            value = row.get(metric)
            if not _nan(value):
                out[f"{base}/{metric}"] = float(row[metric])  # = value, known not None
    a = rep.activations
    for row in a.to_dict("records") if a is not None else []:
        for metric in PROBE_METRICS:
            if not _nan(row.get(metric)):
                out[f"mirrorsym/probe/{_tag(row['layer'])}/{metric}"] = float(row[metric])
    return out


def _nan(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def write_scalars(writer: Any, values: Mapping[str, float], step: int) -> None:
    """Write ``values`` at ``step`` to ``writer``: ``add_scalar(tag, value, step)`` (TensorBoard
    ``SummaryWriter`` and anything shaped like it), else ``log(dict)`` (a Weights & Biases run; the step
    goes in as ``mirrorsym/step``, so W&B's own step counter is left to the training loop)."""
    if writer is None or not values:
        return
    if hasattr(writer, "add_scalar"):
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        if hasattr(writer, "flush"):
            writer.flush()
    elif hasattr(writer, "log"):
        writer.log({**values, "mirrorsym/step": step})
    else:
        raise TypeError(
            f"writer must have add_scalar (torch.utils.tensorboard.SummaryWriter) or log (a wandb run), "
            f"got {type(writer).__name__}"
        )


def write_figures(writer: Any, figures: Mapping[str, Figure], step: int) -> None:
    """Write matplotlib ``figures`` ``{name: Figure}`` as ``mirrorsym/<name>``: ``add_figure`` (TensorBoard;
    closes them) or ``log`` (W&B, as ``wandb.Image`` when wandb is importable); closes every figure."""
    import matplotlib.pyplot as plt

    try:
        if writer is None or not figures:
            return
        if hasattr(writer, "add_figure"):
            for name, fig in figures.items():
                writer.add_figure(f"mirrorsym/{name}", fig, step)
        elif hasattr(writer, "log"):
            try:
                import wandb

                images = {f"mirrorsym/{n}": wandb.Image(f) for n, f in figures.items()}
            except ImportError:
                images = {f"mirrorsym/{n}": f for n, f in figures.items()}
            writer.log({**images, "mirrorsym/step": step})
    finally:
        for fig in figures.values():
            plt.close(fig)


def _check_writer(writer: object) -> None:
    if writer is not None and not (hasattr(writer, "add_scalar") or hasattr(writer, "log")):
        raise TypeError(
            f"writer must be a torch.utils.tensorboard.SummaryWriter (or have add_scalar/add_figure) or a "
            f"wandb run (have log), got {type(writer).__name__}"
        )


class SymmetryMonitor:
    """Record :func:`diagnose` every ``every`` calls of :meth:`step` (the first call records step 0).

    The SymmetryMap is found once, at construction (``symmetries=`` to pass one), and reused: the
    groups of a model do not change while its weights train. Weights-only by default (cheap: no
    forward pass); with ``data`` each record also runs the probe pass (see :func:`diagnose` for the
    mode handling). Extra keyword arguments go to :func:`diagnose`.

    ``writer``: a ``torch.utils.tensorboard.SummaryWriter`` (or any object with ``add_scalar`` /
    ``add_figure``) or a Weights & Biases run (``log``): each record writes :func:`scalars` (names in the
    module docstring) at the record's step, and with ``figures=True`` the report's figures too.

    ``history``: DataFrame with one row per (recorded step, group): ``step`` plus the columns of
    ``DiagnoseReport.to_pandas()``. ``activation_history``: the same for the probe table, if any.
    :meth:`plot` draws the history. For Lightning, ``mirrorsym.diagnose.lightning.SymmetryMonitorCallback``
    wraps this class (extra ``mirrorsym[lightning]``); for the Hugging Face ``Trainer``,
    ``mirrorsym.diagnose.hf.SymmetryMonitorCallback``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        every: int = 100,
        data: object = None,
        symmetries: Symmetries | None = None,
        writer: Any = None,
        figures: bool = False,
        **diagnose_kwargs: Any,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (record every `every` steps), got {every!r}")
        _check_writer(writer)
        if symmetries is None:
            from .report import default_symmetries

            symmetries = default_symmetries(model, example_inputs)
        self.model, self.example_inputs, self.every, self.data = model, example_inputs, every, data
        self.symmetries, self.writer, self.figures = symmetries, writer, bool(figures)
        self.kwargs = {"plots": bool(figures), **diagnose_kwargs}
        self.steps = 0
        self.last: DiagnoseReport | None = None
        self.last_step: int | None = None
        self._groups: list[pd.DataFrame] = []
        self._acts: list[pd.DataFrame] = []

    def step(self, global_step: int | None = None) -> DiagnoseReport | None:
        """Count one training step; record (and return the report) on steps 0, every, 2·every, …

        ``global_step``: the trainer's own step count instead of this monitor's (so the records line up
        with the trainer's logs): records when it is a multiple of ``every`` and not recorded yet (a
        step seen twice, as under gradient accumulation, records once)."""
        if global_step is None:
            s = self.steps
            self.steps += 1
        else:
            s = int(global_step)
            self.steps = s + 1
        if s % self.every or s == self.last_step:
            return None
        return self.record(step=s)

    def record(self, step: int | None = None) -> DiagnoseReport:
        """Diagnose now, append to the history and write to ``writer``, whatever the step count;
        ``step`` labels the record (default: the number of :meth:`step` calls so far)."""
        s = self.steps if step is None else int(step)
        rep = diagnose(self.model, self.example_inputs, self.data, symmetries=self.symmetries, **self.kwargs)
        self._groups.append(rep.to_pandas().assign(step=s))
        if rep.activations is not None:
            self._acts.append(rep.activations.assign(step=s))
        self.last, self.last_step = rep, s
        if self.writer is not None:
            write_scalars(self.writer, scalars(rep), s)
            if self.figures:
                write_figures(self.writer, self.report_figures(rep), s)
        return rep

    def scalars(self) -> dict[str, float]:
        """The last record as flat scalars (:func:`scalars`); empty before the first record."""
        return {} if self.last is None else scalars(self.last)

    def report_figures(self, rep: DiagnoseReport | None = None) -> dict[str, Figure]:
        """``{name: Figure}`` of the report's figures (last record by default) plus the history plot."""
        from .plots import history_figure, report_figures

        rep = self.last if rep is None else rep
        figs = {} if rep is None else report_figures(rep)
        hist = history_figure(self.history)
        if hist is not None:
            figs["history"] = hist
        return figs

    def plot(self, path: str | Path | None = None) -> Figure | Path:
        """The history, one panel per metric (dead, distinct, distance, ranks) and one line per group vs
        step (colour = layer, line style = kind). Returns the matplotlib Figure, or with ``path`` saves it
        (PNG by the suffix) and returns the Path. Raises before the first record."""
        from .plots import _save, history_figure

        fig = history_figure(self.history)
        if fig is None:
            raise ValueError("nothing to plot yet: the monitor has no record (call step() or record() first)")
        if path is None:
            return fig
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _save(fig, path)

    @property
    def history(self) -> pd.DataFrame:
        if not self._groups:
            return pd.DataFrame(columns=["step", *GROUP_COLUMNS])
        df = pd.concat(self._groups, ignore_index=True)
        return df[["step", *[c for c in df.columns if c != "step"]]]

    @property
    def activation_history(self) -> pd.DataFrame | None:
        if not self._acts:
            return None
        df = pd.concat(self._acts, ignore_index=True)
        return df[["step", *[c for c in df.columns if c != "step"]]]


def callback_class(module: str, name: str, base: Callable[[], Any], build: Callable[[Any], type],
                   cache: dict[Any, type]) -> type:
    """``SymmetryMonitorCallback`` of a framework module (Lightning, Hugging Face), built lazily: one class
    per base class, looked up on every access (not cached in the module's globals), so the class always
    derives from the framework Callback that is importable now."""
    if name != "SymmetryMonitorCallback":
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    b = base()
    if b not in cache:
        cache[b] = build(b)
    return cache[b]
