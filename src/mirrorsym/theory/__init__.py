"""Layer 3: the theory's predictions (docs/theory.md#theorem-1 and #gradient-noise).

Convention: L_γ = L + γ‖θ‖², torch λ = 2γ.
"""

from .noise import (
    CriticalLRResult,
    LyapunovCurve,
    LyapunovResult,
    MinibatchCurvature,
    SecondOrder,
    critical_learning_rate,
    lyapunov_exponent,
    minibatch_curvature,
)
from .threshold import (
    CriticalWeightDecay,
    critical_weight_decay,
    hessian_cross_norm,
    projected_curvature,
    projected_hessian,
    stationarity_residual,
    torch_weight_decay,
)

__all__ = [
    "CriticalLRResult",
    "CriticalWeightDecay",
    "LyapunovCurve",
    "LyapunovResult",
    "MinibatchCurvature",
    "SecondOrder",
    "critical_learning_rate",
    "lyapunov_exponent",
    "minibatch_curvature",
    "critical_weight_decay",
    "hessian_cross_norm",
    "projected_curvature",
    "projected_hessian",
    "stationarity_residual",
    "torch_weight_decay",
]
