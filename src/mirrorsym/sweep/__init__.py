"""Layer 5: train many copies at once (torch.func vmap), store the results, resume, scale out with Ray.

Entry points: :class:`Sweep` (``.run(out_dir, backend="local"|"ray", address=None, device="auto",
chunk_size=128) -> DataFrame``; ``out_dir`` a path or a filesystem URL), :func:`load_results` and, for
sweeps with ``keep_params=True``, :func:`final_params` (a row's trained parameters); :func:`map_jobs` for
independent runs that are not a grid of optimizer settings (their own training loops), here or on Ray.
Optimizers: SGD (momentum, Nesterov), Adam, AdamW, step/cosine schedules and gradient clipping
(:mod:`mirrorsym.sweep.config`). Conventions: ``weight_decay`` is torch's coupled λ, i.e. γ = λ/2 in
L + γ‖θ‖² (docs/theory.md#conventions), except for AdamW (decoupled decay: no penalty); every random draw of a run is
a function of its seed (:mod:`mirrorsym.sweep.rng`), so a plain PyTorch loop reproduces any run
(:func:`mirrorsym.sweep.reference.train_plain`).
"""

from . import rng
from .backends import map_jobs
from .config import OPTIONS, STANDARD, expand_grid, register_option, run_id
from .engine import UnsupportedModel, final_params, resolve_device, train_chunk
from .reference import train_plain
from .store import ResultStore, load_results
from .sweep import Sweep, plan_chunks

__all__ = [
    "OPTIONS",
    "STANDARD",
    "ResultStore",
    "Sweep",
    "UnsupportedModel",
    "expand_grid",
    "final_params",
    "load_results",
    "map_jobs",
    "plan_chunks",
    "register_option",
    "resolve_device",
    "rng",
    "run_id",
    "train_chunk",
    "train_plain",
]
