"""The vmapped trainer: K copies of one model, one functional SGD step for all of them.

Every copy k has its own parameters θ_k, momentum buffer m_k and hyper-parameters (per-copy tensors).
One step t, for every live copy, with B_k,t = ``rng.batch_indices(seed_k, t, n, B)``:

    g   = ∇_θ loss(model_θ(x_B), y_B) + λ (θ − θ₀) + σ ξ_t          (θ₀ = 0 unless decay_to_offset_sigma)
    m  ← μ m + g                                                      (m starts at 0, so m₁ = g)
    θ  ← θ − η m

which is ``torch.optim.SGD(lr=η, momentum=μ, weight_decay=λ, dampening=0, nesterov=False)`` plus the
options. ξ_t = ``rng.gaussian(seed, NOISE, t, i, shape)`` for the i-th parameter in
``named_parameters()`` order; θ₀ = σ₀ · ``rng.gaussian(seed, OFFSET, 0, i, shape)``.

A copy whose loss or new parameters are NaN/inf at step t is *frozen*: it keeps its last finite
parameters, is reported ``diverged`` at step t, and its metrics from then on are NaN. Copies never
interact (vmap), so the others are unaffected.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from . import rng
from .config import OPTIONS, run_id

HYPER = ("lr", "weight_decay", "momentum", "noise")  # per-copy tensors


def resolve_device(device) -> torch.device:
    """``"auto"`` (or None): CUDA if available, else CPU; anything else is passed to torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Problem:
    """What every run of a sweep shares: picklable (cloudpickle) so that Ray workers can receive it.

    ``metrics`` maps a name to ``fn(params, data, forward) -> 0-dim Tensor`` where ``forward(params, x)``
    applies the model; they run under vmap over copies.
    """

    model_factory: Callable[[int], nn.Module]
    loss_fn: Callable[..., torch.Tensor]
    data: tuple[torch.Tensor, ...]
    eval_data: tuple[torch.Tensor, ...]
    metrics: Mapping[str, Callable]
    record_every: int
    name: str

    @property
    def n(self) -> int:
        return int(self.data[0].shape[0])


def build_copy(problem: Problem, config: Mapping) -> nn.Module:
    """``model_factory(seed)`` followed by every option's ``transform_model`` hook."""
    module = problem.model_factory(config["seed"])
    if not isinstance(module, nn.Module):
        raise TypeError(f"mirrorsym.sweep: model_factory({config['seed']}) returned "
                        f"{type(module).__name__}, expected an nn.Module")
    for name, opt in OPTIONS.items():
        if opt.transform_model is not None and name in config:
            module = opt.transform_model(module, config[name], dict(config))
    return module


def _check_same_structure(modules: Sequence[nn.Module], configs: Sequence[Mapping]) -> None:
    ref = [(n, tuple(p.shape), p.dtype) for n, p in modules[0].named_parameters()]
    if not ref:
        raise ValueError("mirrorsym.sweep: the model has no trainable parameters")
    for m, c in zip(modules[1:], configs[1:], strict=True):
        got = [(n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()]
        if got != ref:
            raise ValueError(
                f"mirrorsym.sweep: the model built for seed {c['seed']} differs in parameter names/shapes/"
                f"dtypes from the one for seed {configs[0]['seed']}; model_factory must build one "
                "architecture for every seed"
            )


def _per_copy(configs, key, dtype, device) -> torch.Tensor:
    return torch.tensor([c[key] for c in configs], dtype=dtype, device=device)


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) → (K, 1, …, 1) to scale a (K, *shape) tensor."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _to_device(data, device, dtype):
    return tuple(t.to(device=device, dtype=dtype if t.dtype.is_floating_point else t.dtype) for t in data)


class _Chunk:
    """State of K stacked copies on one device."""

    def __init__(self, problem: Problem, configs: Sequence[Mapping], device: torch.device):
        self.problem, self.configs, self.device = problem, list(configs), device
        modules = [build_copy(problem, c) for c in configs]
        _check_same_structure(modules, configs)
        params, buffers = stack_module_state(modules)
        self.params = {k: v.detach().to(device) for k, v in params.items()}
        self.buffers = {k: v.detach().to(device) for k, v in buffers.items()}
        self.base = copy.deepcopy(modules[0]).to("meta")
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        self.K = len(configs)
        self.data = _to_device(problem.data, device, self.dtype)
        self.eval_data = _to_device(problem.eval_data, device, self.dtype)
        self.seeds = _per_copy(configs, "seed", torch.long, device)
        self.streams = rng.Streams(self.seeds)
        hyper = {k: _per_copy(configs, k, self.dtype, device) for k in HYPER}
        self.hyper = {k: {n: _broadcast(v, p) for n, p in self.params.items()} for k, v in hyper.items()}
        self.use_noise = any(c["noise"] > 0 for c in configs)
        self.anchor = self._offsets() if any(c["decay_to_offset_sigma"] > 0 for c in configs) else None
        self.momentum_buf = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.alive = torch.ones(self.K, dtype=torch.bool, device=device)
        self.diverged_step = torch.full((self.K,), -1, dtype=torch.long, device=device)

    def _offsets(self) -> dict[str, torch.Tensor]:
        sigma = _per_copy(self.configs, "decay_to_offset_sigma", self.dtype, self.device)
        out = {}
        for i, (name, p) in enumerate(self.params.items()):
            z = self.streams.gaussian(rng.OFFSET, 0, i, p.shape[1:], p.dtype)
            out[name] = _broadcast(sigma, p) * z
        return out

    def forward(self, params, buffers, x):
        return functional_call(self.base, (params, buffers), (x,))

    def _loss(self, params, buffers, *batch):
        return self.problem.loss_fn(self.forward(params, buffers, batch[0]), *batch[1:])

    def grad_fn(self, full_batch: bool):
        data_dim = None if full_batch else 0
        in_dims = (0, 0) + (data_dim,) * len(self.data)
        return vmap(grad_and_value(self._loss), in_dims=in_dims)

    def metric_fn(self, metric):
        def one(params, buffers, *data):
            value = metric(params, data, lambda p, x: self.forward(p, buffers, x))
            return torch.as_tensor(value).reshape(()).to(self.dtype)

        return vmap(one, in_dims=(0, 0) + (None,) * len(self.eval_data))

    def step(self, t: int, grads: dict, loss: torch.Tensor) -> None:
        new_params, new_buf = {}, {}
        finite = torch.isfinite(loss)
        for i, (name, p) in enumerate(self.params.items()):
            g = grads[name]
            decay_point = p if self.anchor is None else p - self.anchor[name]
            g = g + self.hyper["weight_decay"][name] * decay_point
            if self.use_noise:
                xi = self.streams.gaussian(rng.NOISE, t, i, p.shape[1:], p.dtype)
                g = g + self.hyper["noise"][name] * xi
            buf = self.hyper["momentum"][name] * self.momentum_buf[name] + g
            new_p = p - self.hyper["lr"][name] * buf
            finite &= torch.isfinite(new_p).reshape(self.K, -1).all(dim=1)
            new_params[name], new_buf[name] = new_p, buf
        keep = self.alive & finite
        self.diverged_step = torch.where(self.alive & ~finite, t, self.diverged_step)
        for name in self.params:
            mask = _broadcast(keep, new_params[name])
            self.params[name] = torch.where(mask, new_params[name], self.params[name])
            self.momentum_buf[name] = torch.where(mask, new_buf[name], self.momentum_buf[name])
        self.alive = keep


def gather_rows(data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``data[idx]`` for an index tensor of any shape, via index_select (much faster than advanced
    indexing on CPU)."""
    return data.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *data.shape[1:])


def record_steps(steps: int, record_every: int) -> list[int]:
    """The steps at which metrics are recorded: 0, r, 2r, … and always the final step."""
    out = list(range(0, steps + 1, record_every))
    if out[-1] != steps:
        out.append(steps)
    return out


def train_chunk(problem: Problem, configs: Sequence[Mapping], device="auto",
                on_progress: Callable[[int], None] | None = None) -> list[dict]:
    """Train ``configs`` (same ``batch_size`` and ``steps``) as one vmapped chunk; one row dict per run.

    ``on_progress(copy_steps)`` is called on the host after each recording interval (no device sync).
    """
    batch_sizes = {c["batch_size"] for c in configs}
    steps_set = {c["steps"] for c in configs}
    if len(batch_sizes) != 1 or len(steps_set) != 1:
        raise ValueError("train_chunk needs one batch_size and one steps value per chunk (group them first)")
    B, steps = batch_sizes.pop(), steps_set.pop()
    with torch.no_grad():
        chunk = _Chunk(problem, configs, resolve_device(device))
    n = problem.n
    grad_fn = chunk.grad_fn(full_batch=B == n)
    metric_fns = {name: chunk.metric_fn(m) for name, m in problem.metrics.items()}
    marks = record_steps(steps, problem.record_every)
    later_marks = set(marks[1:])
    history = {name: [] for name in metric_fns}

    def record():
        for name, fn in metric_fns.items():
            value = fn(chunk.params, chunk.buffers, *chunk.eval_data)
            history[name].append(torch.where(chunk.alive, value, math.nan))

    record()
    done = 0
    for t in range(steps):
        if B == n:
            batch = chunk.data
        else:
            idx = chunk.streams.batch_indices(t, n, B)
            batch = tuple(gather_rows(d, idx) for d in chunk.data)
        grads, loss = grad_fn(chunk.params, chunk.buffers, *batch)
        with torch.no_grad():
            chunk.step(t, grads, loss)
        if t + 1 in later_marks:
            record()
            if on_progress is not None:
                on_progress(chunk.K * (t + 1 - done))
                done = t + 1
    return _rows(problem, configs, chunk, marks, history)


def _rows(problem, configs, chunk: _Chunk, marks, history) -> list[dict]:
    stacked = {name: torch.stack(vals, dim=1).double().cpu().numpy() for name, vals in history.items()}
    diverged = chunk.diverged_step.cpu().tolist()
    rows = []
    for k, c in enumerate(configs):
        row = {"run_id": run_id(problem.name, c), **c}
        row["status"] = "diverged" if diverged[k] >= 0 else "ok"
        row["diverged_step"] = diverged[k]
        for name, h in stacked.items():
            row[name] = float(h[k, -1])
        row["history_step"] = list(marks)
        for name, h in stacked.items():
            row[f"history_{name}"] = h[k].tolist()
        rows.append(row)
    return rows
