"""mirrorsym: find, diagnose, predict and control the parameter symmetries of PyTorch models.

Conventions (THEORY.md §0): θ is every trainable parameter keyed by ``named_parameters()`` names;
weight decay is L + γ‖θ‖², i.e. torch ``weight_decay = 2γ`` (coupled); a mirror is R = I − 2OOᵀ with
surface Oᵀθ = 0.
"""

from . import core, theory
from .core import Mirror, check_invariance

__version__ = "0.1.0"

__all__ = ["Mirror", "__version__", "check_invariance", "core", "theory"]
