"""Embedded data sets: scikit-learn's 8×8 digits (shipped with the package, no download)."""

from __future__ import annotations

import torch


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """X (1797, 64) with pixel values scaled to [0, 1], y (1797,) int64 in 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=dtype), torch.tensor(d.target, dtype=torch.int64)


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The same digits as images (1797, 1, 8, 8), standardised to mean 0 and std 1 (float32)."""
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    return (x - x.mean()) / x.std(), y
