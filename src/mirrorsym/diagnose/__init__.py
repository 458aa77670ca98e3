"""Layer 3: diagnose symmetry-induced structure (docs/theory.md#metrics): dead, duplicated and low-rank units,
collapse metrics on probe data, and a monitor over training. Reads models through a SymmetryMap.

``mirrorsym.diagnose`` is both this subpackage and the function: calling the module,
``ms.diagnose(model, example_inputs, data=None, ...)``, calls :func:`report.diagnose`, while
``ms.diagnose.metrics``, ``mirrorsym.diagnose.lightning`` etc. stay importable as submodules.
"""

import sys
import types
from typing import Any

from . import metrics
from .monitor import SymmetryMonitor
from .report import DiagnoseReport, diagnose, group_table, probe_data

__all__ = ["DiagnoseReport", "SymmetryMonitor", "diagnose", "group_table", "metrics", "probe_data"]


class _CallableModule(types.ModuleType):
    """The subpackage, callable as :func:`diagnose` (so ``ms.diagnose(...)`` and ``ms.diagnose.metrics``
    both work without one name shadowing the other)."""

    def __call__(self, *args: Any, **kwargs: Any) -> DiagnoseReport:
        return diagnose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
