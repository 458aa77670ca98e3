"""Differentiable constraint by symmetry (DCS, docs/theory.md#dcs): parametrizations whose weight decay is a
sparsity / group-sparsity / low-rank / linear-constraint penalty.

Convention (docs/theory.md#conventions): the objective is L(θ) + γ‖factors‖², i.e. *coupled* torch
``weight_decay = λ = 2γ``
on the factor parameters. Minimising over the factors at a fixed product gives

* ``sparse``:       θ = u ⊙ v              → λ‖θ‖₁ = 2γ‖θ‖₁                     (lasso)
* ``group_sparse``: θ_g = s_g · w_g         → λ Σ_g ‖θ_g‖₂                       (group lasso)
* ``low_rank``:     W = A Bᵀ               → λ‖W‖_*                              (nuclear norm)
* ``linear``:       θ = (I − OOᵀ)w + O(u ⊙ v) → λ‖Oᵀθ‖₁ + (λ/2)‖(I − OOᵀ)θ‖²
  (Oᵀθ = 0 exactly above the threshold)

so a constraint coordinate is exactly zero at a minimum once |∂L/∂s| ≤ λ. With scikit-learn's
``Lasso(alpha)`` and L = mean squared error, ``alpha = γ = λ/2`` (closed form A).

The equivalences hold for any optimizer that minimises the *coupled* objective (SGD with or without
momentum, Adam/RMSProp with ``weight_decay=λ``: their fixed points are the stationary points of
L + (λ/2)‖·‖²).
Decoupled decay (AdamW) still shrinks the factors multiplicatively and still produces exact zeros, but
its fixed point is not the minimiser of a fixed penalty: the effective strength per coordinate is scaled by
Adam's preconditioner, so the lasso / group-lasso / nuclear-norm correspondence (and the alpha mapping) is
lost.

Splits are **unbalanced** (docs/theory.md#balanced-split): the second factor starts at a constant ``scale`` (c)
not tied to |θ|, the first at θ/c. A balanced split (|u| = |v|) would sit on the mirror surface u = ±v,
which Theorem 1 makes absorbing, and no weight could ever change sign.

Registration goes through ``torch.nn.utils.parametrize`` with ``right_inverse``, so the module computes
the same function right after registration. **State-dict keys change**: ``fc.weight`` becomes
``fc.parametrizations.weight.original0`` (and ``original1``, ...), the factors in the order of each class's
``forward`` arguments. :func:`mirrorsym.constrain.export` bakes them back into plain tensors. Register before
building the optimizer (pass ``optimizer=`` to get a warning if you did not).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core import Mirror
from ..core.mirror import ORTHONORMAL_TOL
from ._checks import describe, nonnegative, positive, tensor_of, warn_if_in_optimizer


class Sparse(nn.Module):
    """θ = u ⊙ v (elementwise). ``right_inverse``: u = θ/c, v = c (unbalanced). Decay λ → λ‖θ‖₁."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = positive(scale, "scale")

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return u * v

    def right_inverse(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return theta / self.scale, torch.full_like(theta, self.scale)


class GroupSparse(nn.Module):
    """θ[..., i, ...] = s_i · w[..., i, ...] along ``dim``: one scalar gate s_i per slice.

    ``right_inverse``: s = c, w = θ/c. Decay λ on (w, s) → λ Σ_i ‖θ_i‖₂ (group lasso over the slices).
    """

    def __init__(self, dim: int, ndim: int, scale: float = 1.0):
        super().__init__()
        self.dim, self.ndim, self.scale = dim, ndim, positive(scale, "scale")

    def _view(self, s: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.ndim
        shape[self.dim] = -1
        return s.reshape(shape)

    def forward(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return w * self._view(s)

    def right_inverse(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.full((theta.shape[self.dim],), self.scale, dtype=theta.dtype, device=theta.device)
        return theta / self.scale, gates


class LowRank(nn.Module):
    """W = A Bᵀ with W viewed as a matrix (out, rest) (conv kernels are flattened after dim 0).

    ``right_inverse`` (SVD, unbalanced): A = U_r S_r / c, B = c V_r, so B starts with orthonormal columns;
    directions with σ = 0 then have B n ≠ 0 and are *not* on the absorbing surface An = Bn = 0 (a balanced
    split of a rank-deficient W would freeze them). Decay λ on (A, B) → λ‖W‖_*.
    """

    def __init__(self, shape: torch.Size, rank: int, scale: float = 1.0):
        super().__init__()
        self.shape, self.rank, self.scale = tuple(shape), int(rank), positive(scale, "scale")

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (A @ B.T).reshape(self.shape)

    def right_inverse(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mat = W.reshape(W.shape[0], -1)
        U, S, Vh = torch.linalg.svd(mat.double() if mat.dtype != torch.float64 else mat, full_matrices=False)
        r = self.rank
        A = (U[:, :r] * S[:r]) / self.scale
        B = Vh[:r].T * self.scale
        return A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous()


class LinearConstraint(nn.Module):
    """θ = (I − OOᵀ)w + O(u ⊙ v) over the flattened tensor, O (n, k) with orthonormal columns.

    ``right_inverse``: w = (I − OOᵀ)θ, u = Oᵀθ / c, v = c. Decay λ on (w, u, v) → λ‖Oᵀθ‖₁ plus ridge
    (λ/2)‖(I − OOᵀ)θ‖²: the constraint Oᵀθ = 0 holds exactly at a minimum where every |∂L/∂s_i| ≤ λ.
    """

    O: torch.Tensor  # a buffer

    def __init__(self, O: torch.Tensor, shape: torch.Size, scale: float = 1.0):
        super().__init__()
        self.shape, self.scale = tuple(shape), positive(scale, "scale")
        self.register_buffer("O", O)

    def _surface(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(-1)
        return flat - self.O @ (self.O.T @ flat)

    def forward(self, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self._surface(w) + self.O @ (u * v)).reshape(self.shape)

    def right_inverse(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        O = self.O.to(device=theta.device, dtype=theta.dtype)
        s = O.T @ theta.reshape(-1)
        w = self._surface(theta).reshape(self.shape)
        return w, s / self.scale, torch.full_like(s, self.scale)

    def coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        """s = Oᵀθ: the constrained coordinates (0 on the surface)."""
        return self.O.T @ theta.reshape(-1)


DCS_TYPES = (Sparse, GroupSparse, LowRank, LinearConstraint)


def _register(
    module: nn.Module,
    name: str,
    parametrization: nn.Module,
    tensor: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
) -> nn.Module:
    warn_if_in_optimizer(optimizer, tensor, f"{describe(module)}.{name}")
    with torch.no_grad():
        parametrize.register_parametrization(module, name, parametrization)
    return module


def sparse(
    module: nn.Module, name: str = "weight", *, scale: float = 1.0, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Elementwise DCS: ``module.<name>`` = u ⊙ v. Coupled ``weight_decay=λ`` on (u, v) is the L1 penalty
    λ‖θ‖₁ (scikit-learn ``Lasso(alpha=λ/2)`` for an MSE loss). Returns ``module``.

    ``scale`` (c > 0): the constant the second factor starts at (u = θ/c, v = c); c = 1 makes the first
    steps behave like plain training at the same learning rate. State-dict keys become
    ``<name>`` → ``parametrizations.<name>.original0`` (u) and ``original1`` (v).
    """
    t = tensor_of(module, name)
    return _register(module, name, Sparse(scale), t, optimizer)


def group_sparse(
    module: nn.Module,
    name: str = "weight",
    dim: int = 0,
    *,
    scale: float = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Group DCS: one scalar gate per slice of ``module.<name>`` along ``dim`` (dim 0 of a Linear/Conv
    weight = output units/channels). Coupled ``weight_decay=λ`` is the group lasso λ Σ_i ‖θ_i‖₂.
    State-dict keys: ``original0`` (w, same shape as θ) and ``original1`` (gates, one per slice)."""
    t = tensor_of(module, name)
    if not isinstance(dim, int) or not -t.dim() <= dim < t.dim():
        raise ValueError(f"{describe(module)}.{name} has shape {tuple(t.shape)}: dim={dim!r} does not exist")
    return _register(module, name, GroupSparse(dim % t.dim(), t.dim(), scale), t, optimizer)


def low_rank(
    module: nn.Module,
    name: str = "weight",
    rank: int | None = None,
    *,
    scale: float = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Low-rank DCS: ``module.<name>`` = A Bᵀ (viewed as (shape[0], rest)). Coupled ``weight_decay=λ`` is
    the nuclear-norm penalty λ‖W‖_*, which soft-thresholds the singular values (closed form C).

    ``rank=None`` keeps the full inner dimension min(m, n) (the function is unchanged). A smaller ``rank``
    truncates the SVD at registration; that changes the function whenever W has more than ``rank``
    non-zero singular values, and a warning states the relative change. State-dict keys: ``original0``
    (A, m×r), ``original1`` (B, n×r).
    """
    t = tensor_of(module, name)
    if t.dim() < 2:
        raise ValueError(
            f"{describe(module)}.{name} has shape {tuple(t.shape)}; low_rank needs a matrix "
            "(or a kernel whose dims after the first are flattened)"
        )
    m, n = t.shape[0], t[0].numel()
    full = min(m, n)
    r = full if rank is None else int(rank)
    if not 1 <= r <= full:
        raise ValueError(
            f"rank={rank!r} for {describe(module)}.{name} of matrix shape ({m}, {n}): "
            f"use 1 <= rank <= {full} or None"
        )
    if r < full:
        with torch.no_grad():
            S = torch.linalg.svdvals(t.detach().reshape(m, -1).double())
            lost = (S[r:].square().sum().sqrt() / S.square().sum().sqrt().clamp_min(1e-300)).item()
        if lost > 1e-12:
            warnings.warn(
                f"low_rank(rank={r}) truncates {describe(module)}.{name}: relative Frobenius "
                f"change {lost:.2e}; the function changes at registration (use rank=None to keep it)",
                UserWarning,
                stacklevel=2,
            )
    return _register(module, name, LowRank(t.shape, r, scale), t, optimizer)


def linear(
    module: nn.Module,
    name: str,
    O: torch.Tensor,
    *,
    scale: float = 1.0,
    tol: float = ORTHONORMAL_TOL,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """General DCS for the linear constraint Oᵀθ = 0 on the flattened ``module.<name>`` (row-major).

    ``O``: (n, k) with orthonormal columns, n = θ.numel() (a 1-D O is one direction). Coupled
    ``weight_decay=λ`` penalises λ‖Oᵀθ‖₁, so Oᵀθ = 0 *exactly* once |∂L/∂(Oᵀθ)_i| ≤ λ (above the
    threshold), and not below it. State-dict keys: ``original0`` (w), ``original1`` (u), ``original2`` (v);
    O is a buffer of the parametrization (it follows ``.to()``).
    """
    t = tensor_of(module, name)
    O = torch.as_tensor(O)
    where = f"{describe(module)}.{name}"
    if O.dim() == 1:
        O = O[:, None]
    if O.dim() != 2 or O.shape[0] != t.numel():
        raise ValueError(
            f"O for {where} must have shape ({t.numel()}, k): one row per entry of the flattened "
            f"tensor of shape {tuple(t.shape)}; got {tuple(O.shape)}"
        )
    if O.shape[1] > O.shape[0]:
        raise ValueError(f"O for {where} has {O.shape[1]} columns > {O.shape[0]} rows: not orthonormal")
    try:  # the core Mirror owns the orthonormality check; the spec covers the whole tensor, row-major
        Mirror.from_basis(O, {name: (0, list(range(t.shape[0])))} if t.dim() else {name: [0]}, tol=tol)
    except ValueError as exc:
        raise ValueError(f"O for {where}: {exc}") from None
    O = O.detach().to(device=t.device, dtype=t.dtype).clone()
    return _register(module, name, LinearConstraint(O, t.shape, scale), t, optimizer)


def weight_decay_for(
    l1: float | None = None, group: float | None = None, nuclear: float | None = None
) -> float:
    """The coupled torch ``weight_decay`` λ that gives the penalty you ask for on DCS factors.

    With L + (λ/2)‖factors‖² (torch coupled decay λ = 2γ), minimising over the factors gives λ‖θ‖₁ (sparse),
    λ Σ‖θ_g‖₂ (group_sparse) and λ‖W‖_* (low_rank): each coefficient *is* λ. For scikit-learn's
    ``Lasso(alpha)`` / ``MultiTaskLasso(alpha)`` with an MSE loss, the L1 coefficient is 2·alpha.

    One optimizer param group has one λ: give one strength, or equal ones; put factors needing different
    strengths (and plain parameters you do not want decayed) in separate param groups
    (see :func:`param_groups`). AdamW's decoupled decay breaks these equivalences (module docstring).
    """
    given = {
        k: nonnegative(v, k)
        for k, v in {"l1": l1, "group": group, "nuclear": nuclear}.items()
        if v is not None
    }
    if not given:
        raise ValueError("weight_decay_for needs at least one of l1=, group=, nuclear=")
    values = set(given.values())
    if len(values) > 1:
        raise ValueError(
            f"different strengths {given} cannot share one torch weight_decay; use one param group "
            "per strength (mirrorsym.constrain.param_groups)"
        )
    return values.pop()


def dcs_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of a DCS parametrization chain (factors, unit gates) in ``model``, deduplicated
    (a unit gate shared by several tensors appears once)."""
    from .apply import UnitGate  # local: apply builds on this module

    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for chain in (getattr(module, "parametrizations", None) or {}).values():
            if any(isinstance(p, (*DCS_TYPES, UnitGate)) for p in chain):
                for p in chain.parameters():
                    seen.setdefault(id(p), p)
    return list(seen.values())


def param_groups(model: nn.Module, weight_decay: float, other_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer param groups: DCS factors with ``weight_decay`` λ, every other parameter with
    ``other_weight_decay`` (default 0: only the constraint is penalised)."""
    nonnegative(weight_decay, "weight_decay")
    nonnegative(other_weight_decay, "other_weight_decay")
    factors = dcs_parameters(model)
    ids = {id(p) for p in factors}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": factors, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": other_weight_decay})
    return groups
