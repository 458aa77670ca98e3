"""Optional Lightning callback (extra ``mirrorsym[lightning]``). Importing this module never imports
Lightning; ``SymmetryMonitorCallback`` is built on first access and needs ``lightning`` (or the older
``pytorch_lightning``) installed.

    from mirrorsym.diagnose.lightning import SymmetryMonitorCallback
    trainer = L.Trainer(callbacks=[SymmetryMonitorCallback(example_inputs, every=100)])
    ...; callback.history  # DataFrame, as SymmetryMonitor.history
"""

from __future__ import annotations

import importlib

__all__ = ["SymmetryMonitorCallback"]  # noqa: F822 (built lazily by __getattr__)


def _callback_base():
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name).Callback
        except ImportError:
            continue
    raise ImportError(
        "SymmetryMonitorCallback needs Lightning: pip install 'mirrorsym[lightning]' "
        "(or use mirrorsym.SymmetryMonitor in a plain loop)"
    )


def _build():
    from .monitor import SymmetryMonitor

    class SymmetryMonitorCallback(_callback_base()):
        """Calls :class:`SymmetryMonitor.step` after every training batch of the LightningModule."""

        def __init__(self, example_inputs, every: int = 100, data=None, **diagnose_kwargs) -> None:
            super().__init__()
            self.example_inputs, self.every, self.data, self.kwargs = (
                example_inputs,
                every,
                data,
                diagnose_kwargs,
            )
            self.monitor: SymmetryMonitor | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.monitor is None:
                self.monitor = SymmetryMonitor(
                    pl_module, self.example_inputs, every=self.every, data=self.data, **self.kwargs
                )
            self.monitor.step()

        @property
        def history(self):
            return None if self.monitor is None else self.monitor.history

    return SymmetryMonitorCallback


def __getattr__(name: str):
    if name == "SymmetryMonitorCallback":
        cls = _build()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
