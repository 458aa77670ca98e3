"""Shared training code for the collapse experiments: digits data, a ReLU MLP that exposes its hidden
activations, continual backprop, and the per-layer structure metrics of docs/theory.md#metrics.

Conventions: a hidden layer ``l`` of :class:`MLP` is ``model.layers[l]`` (nn.Linear, weight (out, in));
its *unit matrix* has one row per hidden unit i: [incoming weights W_l[i, :], bias b_l[i], outgoing
weights W_{l+1}[:, i]] — the coordinates a permutation of two units swaps
(docs/theory.md#common-symmetries). Every random
choice takes a ``torch.Generator``.

For many copies at once (the plasticity experiment trains every method × seed together):
:class:`BatchedMLP` (K stacked MLPs, one batched matmul per layer), :class:`BatchedCBP` (continual
backprop per copy, the same draws as :class:`ContinualBackprop`), :func:`batched_unit_matrices` and
:func:`surface_counts` (dead / duplicated units and the distance to the nearest swap surface,
docs/theory.md#duplicated-units, for K unit matrices at once), and :func:`spearman` (rank correlation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from ..diagnose.metrics import (
    DEAD_TOL,
    DUPLICATE_TOL,
    dead_activations,
    distinct_units,
    dormant_activations,
    representation_eff_rank,
)
from .base import tensor_sum


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

    def linear(self, layer: int) -> nn.Linear:
        """The nn.Linear of hidden layer ``layer`` (``self.layers[layer]``, typed as such)."""
        lin = self.layers[layer]
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"MLP: layer {layer} is a {type(lin).__name__}, not an nn.Linear")
        return lin

    def outgoing(self, layer: int) -> nn.Linear:
        """The nn.Linear that reads hidden layer ``layer``."""
        return self.linear(layer + 1) if layer + 1 < len(self.layers) else self.head


@torch.no_grad()
def init_linear_(weight: torch.Tensor, bias: torch.Tensor | None, generator: torch.Generator) -> None:
    """nn.Linear's default distribution, U(−1/√fan_in, 1/√fan_in) for weight and bias, from ``generator``."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    weight.copy_((2 * torch.rand(weight.shape, generator=generator, dtype=weight.dtype) - 1) * bound)
    if bias is not None:
        bias.copy_((2 * torch.rand(bias.shape, generator=generator, dtype=bias.dtype) - 1) * bound)


def unit_matrix(model: MLP, layer: int) -> torch.Tensor:
    """Rows [W_l[i, :], b_l[i], W_{l+1}[:, i]] of hidden layer ``layer`` (see module docstring)."""
    lin, out = model.linear(layer), model.outgoing(layer)
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
        "weight_norm": float(torch.sqrt(tensor_sum((p.detach().double() ** 2).sum() for p in model.parameters()))),
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
        widths = [model.linear(l).weight.shape[0] for l in range(len(model.layers))]
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
        lin, out = self.model.linear(layer), self.model.outgoing(layer)
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


# ------------------------------------------------------------------------------- batched copies (K at once)
class BatchedMLP:
    """K copies of :class:`MLP` as stacked tensors, trained at once (one batched matmul per layer).

    ``weights[l]`` (K, out, in) and ``biases[l]`` (K, out) for l = 0 … depth−1 (hidden layers) and
    l = depth (the head); :meth:`params` lists them in ``MLP.named_parameters()`` order
    ``[W_0, b_0, …, W_head, b_head]``. Copy k computes exactly what ``MLP`` with those weights computes
    (:meth:`copy` builds that MLP)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor]):
        self.weights, self.biases = weights, biases

    @classmethod
    def stack(cls, models: list[MLP], device: torch.device | str = "cpu") -> BatchedMLP:
        lins = [[*m.layers, m.head] for m in models]
        weights = [torch.stack([ls[l].weight.detach() for ls in lins]).to(device).requires_grad_()
                   for l in range(len(lins[0]))]
        biases = [torch.stack([ls[l].bias.detach() for ls in lins]).to(device).requires_grad_()
                  for l in range(len(lins[0]))]
        return cls(weights, biases)

    @property
    def depth(self) -> int:
        return len(self.weights) - 1

    def params(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.weights, self.biases, strict=True) for t in pair]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (K, N, d), one input batch per copy → (logits (K, N, C), [h_1 … h_L] each (K, N, H))."""
        acts = []
        for W, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            x = torch.relu(torch.baddbmm(b[:, None, :], x, W.transpose(1, 2)))
            acts.append(x)
        return torch.baddbmm(self.biases[-1][:, None, :], x, self.weights[-1].transpose(1, 2)), acts

    __call__ = forward

    @torch.no_grad()
    def copy(self, k: int) -> MLP:
        """Copy k as an :class:`MLP` (CPU, float64 weights of the same values)."""
        W0 = self.weights[0]
        model = MLP(W0.shape[2], W0.shape[1], self.depth, self.weights[-1].shape[1], torch.Generator(),
                    dtype=torch.float64)
        for lin, W, b in zip([*model.layers, model.head], self.weights, self.biases, strict=True):
            lin.weight.copy_(W[k].double().cpu())
            lin.bias.copy_(b[k].double().cpu())
        return model


def batched_unit_matrices(params: list[torch.Tensor], layer: int) -> torch.Tensor:
    """(K, H, in + 1 + out) unit matrices of hidden layer ``layer`` from batched ``[W_0, b_0, …]`` (the
    :class:`BatchedMLP` order): row i of copy k is [W_l[k, i, :], b_l[k, i], W_{l+1}[k, :, i]], as
    :func:`unit_matrix`. Works on any tensors of that layout, e.g. ψ = θ − θ₀."""
    W, b, W_out = params[2 * layer], params[2 * layer + 1], params[2 * layer + 2]
    return torch.cat([W, b[..., None], W_out.transpose(1, 2)], dim=2).detach()


def surface_counts(units: torch.Tensor, dead_tol: float = DEAD_TOL,
                   duplicate_tol: float = DUPLICATE_TOL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dead, duplicated, closest), each (K,), of K unit matrices (K, H, F), by the rules of
    docs/theory.md#duplicated-units (those of :func:`mirrorsym.diagnose.metrics.count_units`, batched):
    dead ‖u_i‖ ≤ dead_tol · max_j ‖u_j‖ (on the surface u_i = 0); duplicated = living units − clusters of
    living units (single linkage, ‖u_i − u_j‖ ≤ duplicate_tol · max(‖u_i‖, ‖u_j‖): near a swap surface
    u_i = u_j); closest = min_{i≠j} ‖u_i − u_j‖/√2 over all units (the distance to the nearest swap
    surface). Distances are exact differences (no Gram trick), in float64."""
    U = units.detach().double()
    K, H = U.shape[0], U.shape[1]
    norms = torch.linalg.vector_norm(U, dim=2)
    dead = norms <= dead_tol * norms.max(1, keepdim=True).values
    dist = torch.cdist(U, U, compute_mode="donot_use_mm_for_euclid_dist")
    eye = torch.eye(H, dtype=torch.bool, device=U.device)
    closest = dist.masked_fill(eye, math.inf).flatten(1).min(1).values / math.sqrt(2) if H > 1 else \
        torch.full((K,), math.nan, dtype=U.dtype)
    alive = ~dead
    edge = (dist <= duplicate_tol * torch.maximum(norms[:, :, None], norms[:, None, :])) & ~eye
    edge &= alive[:, :, None] & alive[:, None, :]
    n_alive = alive.sum(1).cpu().numpy()
    dup = np.zeros(K, dtype=np.int64)
    has_edge = edge.flatten(1).any(1).cpu().numpy()
    for k in np.nonzero(has_edge)[0]:
        a = alive[k].cpu().numpy()
        e = edge[k].cpu().numpy()[np.ix_(a, a)]
        n_clusters = connected_components(csr_matrix(e), directed=False)[0]
        dup[k] = n_alive[k] - n_clusters
    return dead.sum(1).cpu().numpy(), dup, closest.cpu().numpy()


class BatchedCBP:
    """:class:`ContinualBackprop` on the copies ``copies`` of a :class:`BatchedMLP`, one generator per
    copy; copy ``copies[j]`` evolves exactly as ``ContinualBackprop(copy, rate, generators[j], decay,
    maturity)`` would on the single MLP (same utility, age, accrual, replacement draws)."""

    def __init__(self, net: BatchedMLP, copies: list[int], rate: float, generators: list[torch.Generator],
                 decay: float = 0.99, maturity: int = 100):
        if not 0 <= rate < 1:
            raise ValueError(f"BatchedCBP: rate must be in [0, 1), got {rate}")
        if len(generators) != len(copies):
            raise ValueError("BatchedCBP: one generator per copy")
        self.net, self.copies, self.rate, self.gens = net, list(copies), rate, generators
        self.decay, self.maturity = decay, maturity
        dev = net.weights[0].device
        self.idx = torch.tensor(self.copies, dtype=torch.int64, device=dev)
        n, dtype = len(copies), net.weights[0].dtype
        self.utility = [torch.zeros(n, W.shape[1], dtype=dtype, device=dev) for W in net.weights[:-1]]
        self.age = [torch.zeros(n, W.shape[1], dtype=torch.int64, device=dev) for W in net.weights[:-1]]
        self.accrued = [[0.0] * net.depth for _ in copies]
        self.replaced = [[0] * net.depth for _ in copies]

    @torch.no_grad()
    def step(self, acts: list[torch.Tensor]) -> None:
        """After an optimizer step, with the hidden activations (K, N, H) of that step's forward pass."""
        if not self.copies:
            return
        for l, h in enumerate(acts):
            out_w = self.net.weights[l + 1][self.idx]
            contrib = h.detach()[self.idx].abs().mean(1) * out_w.abs().sum(1)
            self.utility[l].mul_(self.decay).add_(contrib, alpha=1 - self.decay)
            self.age[l] += 1
            mature = self.age[l] > self.maturity
            n_mature = mature.sum(1).tolist()
            for j, nm in enumerate(n_mature):
                self.accrued[j][l] += self.rate * nm
                n = min(int(self.accrued[j][l]), nm)
                if n > 0:
                    self.accrued[j][l] -= n
                    score = torch.where(mature[j], self.utility[l][j], torch.full_like(self.utility[l][j], math.inf))
                    self.reinit_units(j, l, torch.topk(score, n, largest=False).indices)

    @torch.no_grad()
    def reinit_units(self, j: int, layer: int, idx: torch.Tensor) -> None:
        """Re-initialise units ``idx`` of hidden layer ``layer`` of copy ``copies[j]`` (see ContinualBackprop)."""
        k, gen = self.copies[j], self.gens[j]
        W, b, W_out = self.net.weights[layer], self.net.biases[layer], self.net.weights[layer + 1]
        fan_in = W.shape[2]
        bound = 1.0 / math.sqrt(fan_in)
        w = (2 * torch.rand(len(idx), fan_in, generator=gen, dtype=W.dtype) - 1) * bound
        bias = (2 * torch.rand(len(idx), generator=gen, dtype=b.dtype) - 1) * bound
        idx = idx.to(W.device)
        W[k, idx] = w.to(W.device)
        b[k, idx] = bias.to(b.device)
        W_out[k, :, idx] = 0.0
        self.utility[layer][j, idx] = 0.0
        self.age[layer][j, idx] = 0
        self.replaced[j][layer] += len(idx)


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences: the Pearson correlation of their ranks,
    ties sharing the mean rank; NaN when either sequence is constant (no ranking) or has fewer than 3
    finite pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
