"""The plain single-model PyTorch loop that one sweep run is equivalent to.

It trains ``model_factory(seed)`` with ``torch.optim.SGD(lr, momentum, weight_decay)`` on the same
minibatches (:func:`mirrorsym.sweep.rng.batch_indices`), adding the options' terms to ``p.grad``
before ``opt.step()``: ``σ ξ`` for ``noise`` and, for ``decay_to_offset_sigma``, ``λ(θ − θ₀)`` in place
of torch's own decay. It is the sequential baseline of ``benchmarks/bench_sweep.py`` and documents
what the vmapped engine computes; it records the same metrics at the same steps (no divergence
freezing: a diverged run simply shows NaN/inf).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import functional_call

from . import rng
from .engine import Problem, build_copy, gather_rows, record_steps, resolve_device


def train_plain(problem: Problem, config: Mapping, device="cpu") -> dict[str, list[float]]:
    """Train one config with a plain loop; return ``{"history_step": [...], "history_<metric>": [...]}``."""
    device = resolve_device(device)
    model = build_copy(problem, config).to(device)
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype
    cast = lambda t: t.to(device=device, dtype=dtype if t.dtype.is_floating_point else t.dtype)  # noqa: E731
    data = tuple(cast(t) for t in problem.data)
    eval_data = tuple(cast(t) for t in problem.eval_data)
    offset = config["decay_to_offset_sigma"] > 0
    lam = config["weight_decay"]
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=0.0 if offset else lam)
    sigma0 = config["decay_to_offset_sigma"]
    anchors = [sigma0 * rng.gaussian(config["seed"], rng.OFFSET, 0, i, p.shape, dtype, device)
               for i, p in enumerate(params.values())]
    marks = record_steps(config["steps"], problem.record_every)
    later_marks = set(marks[1:])
    history: dict[str, list[float]] = {"history_step": marks, **{f"history_{m}": [] for m in problem.metrics}}
    buffers = dict(model.named_buffers())

    def record():
        with torch.no_grad():
            p = {k: v.detach() for k, v in params.items()}
            for name, metric in problem.metrics.items():
                value = metric(p, eval_data, lambda q, x: functional_call(model, (q, buffers), (x,)))
                history[f"history_{name}"].append(float(value))

    record()
    n, B = problem.n, config["batch_size"]
    for t in range(config["steps"]):
        idx = rng.batch_indices(config["seed"], t, n, B, device=device)
        batch = tuple(gather_rows(d, idx) for d in data)
        loss = problem.loss_fn(model(batch[0]), *batch[1:])
        opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            for i, p in enumerate(params.values()):
                if offset:
                    p.grad.add_(p - anchors[i], alpha=lam)
                if config["noise"] > 0:
                    p.grad.add_(rng.gaussian(config["seed"], rng.NOISE, t, i, p.shape, dtype, device),
                                alpha=config["noise"])
        opt.step()
        if t + 1 in later_marks:
            record()
    return history
