"""Layer 6: run the experiments and render the reproduction report."""

from .runner import run_experiment, run_reproduction

__all__ = ["run_experiment", "run_reproduction"]
