"""Layer 1: mirrors over named parameter slices and matrix-free curvature (no model classes here)."""

from .hessian import HVP, ProjectedHessian, checked_loss, gradient, lanczos_min_eig
from .loss import Batch, LossFn, loss_from_model
from .mirror import Mirror, check_invariance
from .slices import Slice, gather, parse_spec, scatter, spec_of
from .threads import single_threaded

__all__ = [
    "HVP",
    "Batch",
    "LossFn",
    "Mirror",
    "ProjectedHessian",
    "Slice",
    "check_invariance",
    "checked_loss",
    "gather",
    "gradient",
    "lanczos_min_eig",
    "loss_from_model",
    "parse_spec",
    "scatter",
    "single_threaded",
    "spec_of",
]
