"""Layer 3: the theory's predictions (THEORY.md §2, §4). Convention: L_γ = L + γ‖θ‖², torch λ = 2γ."""

from .threshold import (
    CurvatureResult,
    critical_weight_decay,
    hessian_cross_norm,
    projected_curvature,
    projected_hessian,
    stationarity_residual,
    torch_weight_decay,
)

__all__ = [
    "CurvatureResult",
    "critical_weight_decay",
    "hessian_cross_norm",
    "projected_curvature",
    "projected_hessian",
    "stationarity_residual",
    "torch_weight_decay",
]
