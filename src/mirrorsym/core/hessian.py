"""Matrix-free curvature: Hessian-vector products and the projected Hessian Oᵀ∇²L O.

Losses follow the one convention of :mod:`mirrorsym.core.loss`: ``loss_fn(params, batch) -> 0-dim Tensor``,
a pure function of the parameter dict on a fixed ``batch`` (None for a loss that closes over its data). HVPs
use forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``); where an op lacks forward-mode AD
they fall back to double backward. Nothing here forms a d×d matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.func import grad, jvp

from .loss import Batch, LossFn, bind
from .mirror import Mirror
from .slices import Params

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

Objective = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # θ ↦ L(θ) on a fixed batch (internal)


def checked_loss(loss_fn: LossFn, params: Params, batch: Batch = None) -> torch.Tensor:
    """Evaluate ``loss_fn(params, batch)`` once and refuse anything but a real scalar."""
    value = bind(loss_fn, batch)(dict(params))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss_fn must return a 0-dim Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar, got shape {tuple(value.shape)}; reduce it (e.g. .mean()) first"
        )
    if not value.dtype.is_floating_point:
        raise TypeError(f"loss_fn must return a floating scalar, got {value.dtype}")
    return value


def _scalar(objective: Objective) -> Objective:
    return lambda p: objective(p).reshape(())


def gradient(loss_fn: LossFn, params: Params, batch: Batch = None) -> dict[str, torch.Tensor]:
    """∇L at ``params`` (on ``batch``) as a dict (detached)."""
    g = grad(_scalar(bind(loss_fn, batch)))(dict(params))
    return {k: v.detach() for k, v in g.items()}


class HVP:
    """v ↦ ∇²L(θ) v at a fixed θ (and batch); counts its calls in ``.calls``."""

    def __init__(self, loss_fn: LossFn, params: Params, batch: Batch = None) -> None:
        checked_loss(loss_fn, params, batch)
        self.loss_fn = _scalar(bind(loss_fn, batch))
        self.params = {k: v.detach() for k, v in params.items()}
        self.calls = 0
        self._forward_mode = True

    def __call__(self, v: Params) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self._forward_mode:
            try:
                hv = jvp(grad(self.loss_fn), (self.params,), (dict(v),))[1]  # (value, tangent): no has_aux
                return {k: t.detach() for k, t in hv.items()}
            except (RuntimeError, NotImplementedError) as exc:
                warnings.warn(f"forward-mode AD failed ({exc}); using double backward for HVPs", stacklevel=2)
                self._forward_mode = False
        return self._double_backward(v)

    def _double_backward(self, v: Params) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            p = {k: t.clone().requires_grad_(True) for k, t in self.params.items()}
            g = torch.autograd.grad(self.loss_fn(p), list(p.values()), create_graph=True, allow_unused=True)
            terms = [(gi * v[k]).sum() for gi, k in zip(g, p, strict=True) if gi is not None]
            if not terms:
                raise ValueError("loss_fn depends on none of the parameters; its Hessian is not defined here")
            dot = sum(terms[1:], terms[0])
            hv = torch.autograd.grad(dot, list(p.values()), allow_unused=True)
        return {k: (h.detach() if h is not None else torch.zeros_like(p[k])) for k, h in zip(p, hv, strict=True)}


class ProjectedHessian:
    """The k×k operator s ↦ Oᵀ ∇²L(θ) O s of a mirror, matrix-free.

    ``matvec`` takes and returns tensors of shape (k,); ``to_dense()`` builds the k×k matrix with k
    HVPs; ``as_linear_operator()`` wraps it for ``scipy.sparse.linalg``; ``hvp.calls`` counts HVPs.
    """

    def __init__(self, loss_fn: LossFn, params: Params, mirror: Mirror, batch: Batch = None) -> None:
        self.mirror = mirror
        self.params = {k: v.detach() for k, v in params.items()}
        self.hvp = HVP(loss_fn, self.params, batch)
        self.k = mirror.dim(self.params)
        ref = next(iter(self.params.values()))
        self.dtype, self.device = ref.dtype, ref.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.k)

    def matvec(self, s: torch.Tensor) -> torch.Tensor:
        hv = self.hvp(self.mirror.direction(s.to(self.dtype), self.params))
        return self.mirror.coefficients(hv, tangent=True)

    def to_dense(self) -> torch.Tensor:
        eye = torch.eye(self.k, dtype=self.dtype, device=self.device)
        H = torch.stack([self.matvec(eye[i]) for i in range(self.k)], dim=1)
        return (H + H.T) / 2

    def as_linear_operator(self) -> LinearOperator:
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            s = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(s).cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, dtype=np.float64)


class MinEigenvalue(NamedTuple):
    """λ_min of a symmetric operator and the number of matvecs it took."""

    value: float
    matvecs: int


def lanczos_min_eig(matvec: Callable[[torch.Tensor], torch.Tensor], k: int, dtype: torch.dtype,
                    device: torch.device | str | None, max_iter: int = 100, tol: float = 1e-10,
                    generator: torch.Generator | None = None) -> MinEigenvalue:
    """Smallest eigenvalue of a symmetric k×k operator by Lanczos with full re-orthogonalisation.

    Stops when the residual of the smallest Ritz pair falls below ``tol × max(1, |λ|)``, when the Krylov
    space is exhausted, or after ``max_iter`` matvecs. Returns (λ_min, number of matvecs).
    """
    gen = generator or torch.Generator().manual_seed(0)
    q = torch.randn(k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    Q = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    lam = 0.0
    for j in range(min(max_iter, k)):
        w = matvec(Q[j])
        alpha = torch.dot(w, Q[j])
        w = w - alpha * Q[j] - (betas[-1] * Q[j - 1] if j > 0 else 0)
        Qm = torch.stack(Q)
        w = w - Qm.T @ (Qm @ w)  # full re-orthogonalisation, twice is enough
        w = w - Qm.T @ (Qm @ w)
        alphas.append(float(alpha))
        beta = float(w.norm())
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        evals, evecs = np.linalg.eigh(T)
        lam = float(evals[0])
        if beta * abs(evecs[-1, 0]) <= tol * max(1.0, abs(lam)) or beta < 1e-14 * max(1.0, abs(alphas[0])):
            return MinEigenvalue(lam, j + 1)
        betas.append(beta)
        Q.append(w / beta)
    return MinEigenvalue(lam, min(max_iter, k))
