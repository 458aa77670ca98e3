"""Shared training code for the collapse experiments: digits data, a ReLU MLP that exposes its hidden
activations, continual backprop, and the per-layer structure metrics of docs/theory.md#metrics.

Conventions: a hidden layer ``l`` of :class:`MLP` is ``model.layers[l]`` (nn.Linear, weight (out, in));
its *unit matrix* has one row per hidden unit i: [incoming weights W_l[i, :], bias b_l[i], outgoing
weights W_{l+1}[:, i]] — the coordinates a permutation of two units swaps
(docs/theory.md#common-symmetries). Every random
choice takes a ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diagnose.metrics import (
    dead_activations,
    distinct_units,
    dormant_activations,
    representation_eff_rank,
)


class MLP(nn.Module):
    """x → ReLU(W_1 x + b_1) → … → ReLU(W_L h + b_L) → head. ``forward`` returns (logits, [h_1 … h_L])."""

    def __init__(self, d_in: int, width: int, depth: int, d_out: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=dtype) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.head = nn.Linear(width, d_out, dtype=dtype)
        with torch.no_grad():
            for lin in [*self.layers, self.head]:
                init_linear_(lin.weight, lin.bias, generator)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        acts = []
        for lin in self.layers:
            x = torch.relu(lin(x))
            acts.append(x)
        return self.head(x), acts

    def outgoing(self, layer: int) -> nn.Linear:
        """The nn.Linear that reads hidden layer ``layer``."""
        return self.layers[layer + 1] if layer + 1 < len(self.layers) else self.head


@torch.no_grad()
def init_linear_(weight: torch.Tensor, bias: torch.Tensor | None, generator: torch.Generator) -> None:
    """nn.Linear's default distribution, U(−1/√fan_in, 1/√fan_in) for weight and bias, from ``generator``."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    weight.copy_((2 * torch.rand(weight.shape, generator=generator, dtype=weight.dtype) - 1) * bound)
    if bias is not None:
        bias.copy_((2 * torch.rand(bias.shape, generator=generator, dtype=bias.dtype) - 1) * bound)


def unit_matrix(model: MLP, layer: int) -> torch.Tensor:
    """Rows [W_l[i, :], b_l[i], W_{l+1}[:, i]] of hidden layer ``layer`` (see module docstring)."""
    lin, out = model.layers[layer], model.outgoing(layer)
    return torch.cat([lin.weight, lin.bias[:, None], out.weight.T], dim=1).detach()


@torch.no_grad()
def structure_metrics(model: MLP, probe: torch.Tensor) -> dict[str, float]:
    """docs/theory.md#metrics metrics summed over hidden layers: ``dead`` (zero on every probe input), ``dormant``
    (active on < 1 % of them), ``distinct`` (clusters of identical units, default rtol), ``eff_rank`` of
    the last hidden representation on the probe, and ``weight_norm`` ‖θ‖₂ over all parameters."""
    _, acts = model(probe)
    n_layers = len(model.layers)
    return {
        "dead": float(sum(int(dead_activations(a).sum()) for a in acts)),
        "dormant": float(sum(int(dormant_activations(a).sum()) for a in acts)),
        "distinct": float(sum(distinct_units(unit_matrix(model, l)) for l in range(n_layers))),
        "eff_rank": float(representation_eff_rank(acts[-1])),
        "weight_norm": float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters()))),
    }


class ContinualBackprop:
    """Continual backprop (Dohare et al., Nature 2024): keep re-initialising the least useful hidden units.

    Per hidden unit i of layer l: contribution utility u_i ← η u_i + (1 − η)·mean_x|h_i(x)|·Σ_k|W_{l+1}[k, i]|
    and age a_i (steps since its last re-initialisation). After every optimizer step (:meth:`step`, fed the
    hidden activations of that step's forward pass), each layer accrues ``rate`` × #mature units (age >
    ``maturity``); for every whole unit accrued the mature unit of lowest utility is replaced: its incoming
    weights and bias are redrawn from the init distribution (:func:`init_linear_`), its outgoing weights
    are set to 0 (so the network's function loses only that unit's old contribution), and u_i, a_i ← 0.
    The optimizer should be plain SGD (no state to reset). ``replaced`` counts replacements per layer.
    """

    def __init__(self, model: MLP, rate: float, generator: torch.Generator, decay: float = 0.99,
                 maturity: int = 100):
        if not 0 <= rate < 1:
            raise ValueError(f"ContinualBackprop: rate must be in [0, 1), got {rate}")
        self.model, self.rate, self.gen, self.decay, self.maturity = model, rate, generator, decay, maturity
        widths = [lin.weight.shape[0] for lin in model.layers]
        dtype = model.head.weight.dtype
        self.utility = [torch.zeros(w, dtype=dtype) for w in widths]
        self.age = [torch.zeros(w, dtype=torch.int64) for w in widths]
        self.accrued = [0.0 for _ in widths]
        self.replaced = [0 for _ in widths]

    @torch.no_grad()
    def step(self, acts: list[torch.Tensor]) -> None:
        for l, h in enumerate(acts):
            out_w = self.model.outgoing(l).weight
            contrib = h.detach().abs().mean(0) * out_w.abs().sum(0)
            self.utility[l].mul_(self.decay).add_(contrib, alpha=1 - self.decay)
            self.age[l] += 1
            mature = self.age[l] > self.maturity
            n_mature = int(mature.sum())  # a host sync per layer and step: cheap at these widths
            self.accrued[l] += self.rate * n_mature
            n = min(int(self.accrued[l]), n_mature)
            if n > 0:
                self.accrued[l] -= n
                score = torch.where(mature, self.utility[l], torch.full_like(self.utility[l], float("inf")))
                self.reinit_units(l, torch.topk(score, n, largest=False).indices)

    @torch.no_grad()
    def reinit_units(self, layer: int, idx: torch.Tensor) -> None:
        """Re-initialise units ``idx`` of hidden layer ``layer`` (see the class docstring)."""
        lin, out = self.model.layers[layer], self.model.outgoing(layer)
        w = torch.empty(len(idx), lin.weight.shape[1], dtype=lin.weight.dtype)
        b = torch.empty(len(idx), dtype=lin.bias.dtype)
        init_linear_(w, None, self.gen)
        bound = 1.0 / math.sqrt(lin.weight.shape[1])
        b.copy_((2 * torch.rand(len(idx), generator=self.gen, dtype=b.dtype) - 1) * bound)
        lin.weight[idx] = w
        lin.bias[idx] = b
        out.weight[:, idx] = 0.0
        self.utility[layer][idx] = 0.0
        self.age[layer][idx] = 0
        self.replaced[layer] += len(idx)
