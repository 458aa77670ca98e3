"""Optional Lightning callback (extra ``mirrorsym[lightning]``). Importing this module never imports
Lightning; ``SymmetryMonitorCallback`` is built on first access and needs ``lightning`` (or the older
``pytorch_lightning``) installed.

    from mirrorsym.diagnose.lightning import SymmetryMonitorCallback
    callback = SymmetryMonitorCallback(example_inputs, every=100, figures=True)
    trainer = L.Trainer(callbacks=[callback], logger=TensorBoardLogger("tb"))   # or CSVLogger, WandbLogger, ...
    ...; callback.history  # DataFrame, as SymmetryMonitor.history; callback.monitor.plot("history.png")

The diagnosis is recorded when training starts and then whenever ``trainer.global_step`` is a multiple of
``every``; each record goes to every logger of the trainer through ``logger.log_metrics(scalars, step)``
(names ``mirrorsym/<group>/<metric>``: :mod:`mirrorsym.diagnose.monitor`), so a ``CSVLogger``'s
``metrics.csv`` gets one column per scalar. With ``figures=True`` the report's figures and the history plot
go to loggers that take figures: ``TensorBoardLogger`` (``experiment.add_figure``) and loggers with
``log_image`` (``WandbLogger``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .monitor import callback_class

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
    from torch import nn

    from ..detect.smap import ExampleInputs

__all__ = ["SymmetryMonitorCallback"]  # noqa: F822 (built lazily by __getattr__)


def _callback_base() -> Any:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name).Callback
        except ImportError:
            continue
    raise ImportError(
        "SymmetryMonitorCallback needs Lightning: pip install 'mirrorsym[lightning]' "
        "(or use mirrorsym.SymmetryMonitor in a plain loop)"
    )


def to_device(inputs: Any, device: torch.device | str | None) -> Any:
    """``inputs`` (a Tensor or a tuple/list of them) moved to ``device``; anything else unchanged."""
    import torch

    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    return inputs


def log_to_loggers(
    loggers: Iterable[Any] | None, values: Mapping[str, float], figures: Mapping[str, Figure], step: int
) -> None:
    """Scalars through ``logger.log_metrics(values, step)`` for every logger; figures through
    ``logger.experiment.add_figure`` (TensorBoard) or ``logger.log_image`` (W&B) where there is one.
    The figures are closed."""
    import matplotlib.pyplot as plt

    try:
        for logger in loggers or []:
            if values:
                logger.log_metrics(values, step=step)
            if not figures:
                continue
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_figure"):
                for name, fig in figures.items():
                    experiment.add_figure(f"mirrorsym/{name}", fig, step, close=False)
            elif hasattr(logger, "log_image"):
                for name, fig in figures.items():
                    logger.log_image(key=f"mirrorsym/{name}", images=[fig], step=step)
    finally:
        for fig in figures.values():
            plt.close(fig)


def _build(base: Any) -> type:
    from .monitor import SymmetryMonitor, scalars

    class SymmetryMonitorCallback(base):
        """Records :class:`SymmetryMonitor` on the LightningModule when training starts and every
        ``every`` optimizer steps, and logs each record to the trainer's loggers (module docstring)."""

        def __init__(self, example_inputs: ExampleInputs, every: int = 100, data: object = None,
                     figures: bool = False, **diagnose_kwargs: Any) -> None:
            super().__init__()
            self.example_inputs, self.every, self.data, self.figures, self.kwargs = (
                example_inputs,
                every,
                data,
                bool(figures),
                diagnose_kwargs,
            )
            self.monitor: SymmetryMonitor | None = None

        def _monitor(self, pl_module: nn.Module) -> SymmetryMonitor:
            if self.monitor is None:
                device = getattr(pl_module, "device", None)
                self.monitor = SymmetryMonitor(
                    pl_module, to_device(self.example_inputs, device), every=self.every,
                    data=to_device(self.data, device), figures=self.figures, **self.kwargs,
                )
            return self.monitor

        def _log(self, trainer: Any, step: int) -> None:
            loggers = getattr(trainer, "loggers", None)
            if not loggers or self.monitor is None or self.monitor.last is None:
                return
            figs = self.monitor.report_figures() if self.figures else {}
            log_to_loggers(loggers, scalars(self.monitor.last), figs, step)

        def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
            monitor = self._monitor(pl_module)
            step = int(getattr(trainer, "global_step", 0) or 0)
            if monitor.last_step != step:
                monitor.record(step=step)
                self._log(trainer, step)

        def on_train_batch_end(
            self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            monitor = self._monitor(pl_module)
            step = getattr(trainer, "global_step", None)
            rep = monitor.step(None if step is None else int(step))
            if rep is not None and monitor.last_step is not None:  # a record sets last_step
                self._log(trainer, monitor.last_step)

        @property
        def history(self) -> pd.DataFrame | None:
            return None if self.monitor is None else self.monitor.history

    return SymmetryMonitorCallback


_BUILT: dict[Any, type] = {}


def __getattr__(name: str) -> type:
    return callback_class(__name__, name, _callback_base, _build, _BUILT)
