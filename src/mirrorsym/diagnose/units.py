"""The rank metrics of a rotation group: the spectrum of its invariant product.

A rotation group's *factors* (:meth:`mirrorsym.detect.Rotation.factors`) are (k, F) matrices with the
unit axis first. A rotation Q of the unit space maps every factor M ↦ Q M, so the product M_aᵀ M_b of two
factors is invariant: it is the map the symmetry cannot see into (U W for linear→linear layers, W_Qᵀ W_K
per attention head, W_O W_V per head, B A for LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def invariant_product(fs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """M_aᵀ M_b for exactly two factors ``fs`` (a rotation group's factors), else None (ranks do not apply)."""
    factors = list(fs.values())
    if len(factors) != 2:
        return None
    a, b = factors
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).T @ b.to(dtype)


def product_spectrum(fs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """Singular values of the invariant product M_aᵀ M_b without forming it, and the product's shape.

    With QR factorisations M_aᵀ = Q_a R_a, M_bᵀ = Q_b R_b (R: k×k), M_aᵀ M_b = Q_a (R_a R_bᵀ) Q_bᵀ, so
    its non-zero singular values are those of the k×k core R_a R_bᵀ (the remaining min(F_a, F_b) − k
    are exactly zero and change none of the rank metrics). None unless there are exactly two factors.
    """
    factors = list(fs.values())
    if len(factors) != 2:
        return None
    a, b = factors
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    shape = (a.shape[1], b.shape[1])
    if a.shape[0] > min(shape):  # more units than the product's rank can show: form it (small anyway)
        return torch.linalg.svdvals(a.T @ b), shape
    ra = torch.linalg.qr(a.T, mode="r").R
    rb = torch.linalg.qr(b.T, mode="r").R
    return torch.linalg.svdvals(ra @ rb.T), shape
