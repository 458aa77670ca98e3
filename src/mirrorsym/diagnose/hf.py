"""Optional Hugging Face ``transformers.Trainer`` callback. Importing this module never imports
transformers; ``SymmetryMonitorCallback`` is built on first access and needs ``transformers`` installed.

    from mirrorsym.diagnose.hf import SymmetryMonitorCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    callback = SymmetryMonitorCallback(example_inputs, every=100).attach(trainer)
    trainer.train()
    callback.history          # DataFrame, as SymmetryMonitor.history; callback.monitor.plot("history.png")

The diagnosis is recorded when training starts (``on_train_begin``) and whenever ``state.global_step`` is a
multiple of ``every`` (``on_step_end``). Each record's scalars (``mirrorsym/<group>/<metric>``:
:mod:`mirrorsym.diagnose.monitor`) go

* attached (``.attach(trainer)`` or ``trainer=``): through ``trainer.log(scalars)``, so they are in
  ``trainer.state.log_history`` and reach every ``report_to`` integration (TensorBoard, W&B, ...) like the
  loss does;
* passed as ``Trainer(callbacks=[callback])`` only: the callback has no handle on the trainer (Hugging Face
  callbacks receive ``args, state, control`` and the model), so the scalars are appended to
  ``state.log_history`` (one entry per record, with ``"step"``) but not sent to the ``report_to``
  integrations; pass ``writer=`` (a ``SummaryWriter`` or wandb run) to write them there yourself.

With ``figures=True`` and ``writer=`` the report's figures are written to the writer too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .monitor import callback_class

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from ..detect.smap import ExampleInputs

__all__ = ["SymmetryMonitorCallback"]  # noqa: F822 (built lazily by __getattr__)


def _callback_base() -> Any:
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError(
            "the Hugging Face SymmetryMonitorCallback needs transformers: pip install transformers "
            "(or use mirrorsym.SymmetryMonitor in a plain loop)"
        ) from None
    return TrainerCallback


def _build(base: Any) -> type:
    from .lightning import to_device
    from .monitor import SymmetryMonitor, scalars

    class SymmetryMonitorCallback(base):
        """A ``transformers.TrainerCallback`` that records :class:`SymmetryMonitor` on the Trainer's model
        and adds the scalars to the Trainer's logs (module docstring)."""

        def __init__(
            self,
            example_inputs: ExampleInputs,
            every: int = 100,
            data: object = None,
            trainer: Any = None,
            **monitor_kwargs: Any,
        ) -> None:
            super().__init__()
            self.example_inputs, self.every, self.data, self.kwargs = example_inputs, every, data, monitor_kwargs
            self.trainer = trainer
            self.monitor: SymmetryMonitor | None = None

        def attach(self, trainer: Any) -> SymmetryMonitorCallback:
            """Add this callback to ``trainer`` and log through ``trainer.log``; returns ``self``."""
            self.trainer = trainer
            if self not in trainer.callback_handler.callbacks:
                trainer.add_callback(self)
            return self

        def _monitor(self, model: nn.Module | None) -> SymmetryMonitor:
            if self.monitor is None:
                if model is None:
                    raise ValueError("SymmetryMonitorCallback: the Trainer passed no model to the callback")
                device = next((p.device for p in model.parameters()), None)
                self.monitor = SymmetryMonitor(
                    model, to_device(self.example_inputs, device), every=self.every,
                    data=to_device(self.data, device), **self.kwargs,
                )
            return self.monitor

        def _emit(self, state: Any) -> None:
            if self.monitor is None or self.monitor.last is None:  # called after a record only
                return
            values = scalars(self.monitor.last)
            if not values:
                return
            if self.trainer is not None:
                self.trainer.log(dict(values))
            else:
                state.log_history.append({**values, "step": state.global_step})

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
        ) -> None:
            monitor = self._monitor(model)
            if monitor.last_step != state.global_step:
                monitor.record(step=state.global_step)
                self._emit(state)

        def on_step_end(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
        ) -> None:
            if self._monitor(model).step(state.global_step) is not None:
                self._emit(state)

        @property
        def history(self) -> pd.DataFrame | None:
            return None if self.monitor is None else self.monitor.history

    return SymmetryMonitorCallback


_BUILT: dict[Any, type] = {}


def __getattr__(name: str) -> type:
    return callback_class(__name__, name, _callback_base, _build, _BUILT)
