"""mirrorsym: find, diagnose, predict and control the parameter symmetries of PyTorch models.

Conventions (docs/theory.md#conventions): θ is every trainable parameter keyed by ``named_parameters()`` names;
weight decay is L + γ‖θ‖², i.e. torch ``weight_decay = 2γ`` (coupled); a mirror is R = I − 2OOᵀ with
surface Oᵀθ = 0; a loss is ``loss_fn(params, batch)`` (``ms.loss_from_model(model, criterion)`` builds one).
"""

# diagnose is a callable module: ms.diagnose(model, ...)
from . import constrain, core, detect, diagnose, sweep, theory
from .constrain import remove_symmetries
from .core import Mirror, check_invariance, loss_from_model
from .detect import SymmetryMap, find_symmetries
from .diagnose import DiagnoseReport, SymmetryMonitor

__version__ = "0.1.0"

__all__ = ["DiagnoseReport", "Mirror", "SymmetryMap", "SymmetryMonitor", "__version__", "check_invariance",
           "constrain", "core", "detect", "diagnose", "find_symmetries", "loss_from_model", "remove_symmetries",
           "sweep", "theory"]
