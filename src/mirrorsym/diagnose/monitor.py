"""``SymmetryMonitor``: the per-group diagnosis recorded every ``every`` steps of a plain training loop."""

from __future__ import annotations

import pandas as pd
from torch import nn

from .report import GROUP_COLUMNS, DiagnoseReport, diagnose


class SymmetryMonitor:
    """Record :func:`diagnose` every ``every`` calls of :meth:`step` (the first call records step 0).

    The SymmetryMap is found once, at construction (``symmetries=`` to pass one), and reused: the
    groups of a model do not change while its weights train. Weights-only by default (cheap: no
    forward pass); with ``data`` each record also runs the probe pass (see :func:`diagnose` for the
    mode handling). Extra keyword arguments go to :func:`diagnose`.

    ``history``: DataFrame with one row per (recorded step, group): ``step`` plus the columns of
    ``DiagnoseReport.to_pandas()``. ``activation_history``: the same for the probe table, if any.
    For Lightning, ``mirrorsym.diagnose.lightning.SymmetryMonitorCallback`` wraps this class (extra
    ``mirrorsym[lightning]``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        every: int = 100,
        data=None,
        symmetries=None,
        **diagnose_kwargs,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (record every `every` steps), got {every!r}")
        if symmetries is None:
            from .report import default_symmetries

            symmetries = default_symmetries(model, example_inputs)
        self.model, self.example_inputs, self.every, self.data = model, example_inputs, every, data
        self.symmetries = symmetries
        self.kwargs = {"plots": False, **diagnose_kwargs}
        self.steps = 0
        self.last: DiagnoseReport | None = None
        self._groups: list[pd.DataFrame] = []
        self._acts: list[pd.DataFrame] = []

    def step(self) -> DiagnoseReport | None:
        """Count one training step; record (and return the report) on steps 0, every, 2·every, …"""
        rep = self.record() if self.steps % self.every == 0 else None
        self.steps += 1
        return rep

    def record(self) -> DiagnoseReport:
        """Diagnose now and append to the history, whatever the step count."""
        rep = diagnose(self.model, self.example_inputs, self.data, symmetries=self.symmetries, **self.kwargs)
        self._groups.append(rep.to_pandas().assign(step=self.steps))
        if rep.activations is not None:
            self._acts.append(rep.activations.assign(step=self.steps))
        self.last = rep
        return rep

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
