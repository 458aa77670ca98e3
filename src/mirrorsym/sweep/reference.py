"""The plain single-model PyTorch loop that one sweep run is equivalent to: the correctness reference.

It trains ``model_factory(seed)`` with the torch optimizer of the config (``torch.optim.SGD(lr,
momentum, weight_decay, nesterov)``, ``Adam(lr, betas, eps, weight_decay)`` or ``AdamW(...)``), its
learning-rate scheduler (``StepLR`` / ``CosineAnnealingLR(T_max=steps)``, stepped after every optimizer
step) and ``torch.nn.utils.clip_grad_norm_`` on the same minibatches
(:func:`mirrorsym.sweep.rng.batch_indices`) and, with ``problem.random_inputs`` = k, the same random
inputs (``model(x_B, ε_0, …, ε_{k−1})``, ε_j = ``rng.gaussian(seed, RANDOM_INPUTS, t, j, x_B.shape)``;
metrics call ``model(x)``). Each step: ``loss.backward()``; the options' ``σ ξ`` added
to ``p.grad`` (``noise``); ``clip_grad_norm_``; for ``decay_to_offset_sigma``, ``λ(θ − θ₀)`` added to
``p.grad`` (sgd, adam) or ``θ ← θ − η λ(θ − θ₀)`` (adamw) in place of torch's own decay; ``opt.step()``;
``scheduler.step()``. It records the same metrics at the same steps (no divergence freezing: a diverged
run simply shows NaN/inf).

``benchmarks/bench_sweep.py`` checks the engine against it; it is *not* the speed baseline there (its
hash-based minibatch draw is slower than ``torch.randint``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import functional_call

from . import rng
from .engine import Problem, build_copy, gather_rows, record_steps, resolve_device


def make_optimizer(params, config: Mapping) -> torch.optim.Optimizer:
    """The torch optimizer a config stands for (weight decay 0 when ``decay_to_offset_sigma`` > 0: the
    caller then adds the offset decay itself)."""
    lam = 0.0 if config.get("decay_to_offset_sigma", 0.0) > 0 else config.get("weight_decay", 0.0)
    kind = config.get("optimizer", "sgd")
    if kind == "sgd":
        return torch.optim.SGD(params, lr=config["lr"], momentum=config.get("momentum", 0.0), weight_decay=lam,
                               nesterov=config.get("nesterov", False))
    betas = (config.get("beta1", 0.9), config.get("beta2", 0.999))
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(params, lr=config["lr"], betas=betas, eps=config.get("eps", 1e-8), weight_decay=lam)


def make_scheduler(opt: torch.optim.Optimizer, config: Mapping):
    """The torch scheduler of ``lr_schedule`` (None for "constant"), to step once per optimizer step."""
    schedule = config.get("lr_schedule", "constant")
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config["lr_step_size"],
                                               gamma=config.get("lr_gamma", 0.1))
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["steps"],
                                                          eta_min=config.get("lr_min", 0.0))
    return None


def train_plain(problem: Problem, config: Mapping, device="cpu") -> dict[str, list[int] | list[float]]:
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
    opt = make_optimizer(model.parameters(), config)
    scheduler = make_scheduler(opt, config)
    sigma0 = config["decay_to_offset_sigma"]
    anchors = [sigma0 * rng.gaussian(config["seed"], rng.OFFSET, 0, i, p.shape, dtype, device)
               for i, p in enumerate(params.values())]
    marks = record_steps(config["steps"], problem.record_every)
    later_marks = set(marks[1:])
    history: dict[str, list[float]] = {f"history_{m}": [] for m in problem.metrics}
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
        idx = rng.batch_indices(config["seed"], t, n, B, device=device,
                                replace=config["sampling"] == "with_replacement")
        batch = tuple(gather_rows(d, idx) for d in data)
        eps = [rng.gaussian(config["seed"], rng.RANDOM_INPUTS, t, j, batch[0].shape, batch[0].dtype, device)
               for j in range(problem.random_inputs)]
        loss = problem.criterion(model(batch[0], *eps), *batch[1:])
        opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            if config["noise"] > 0:
                for i, p in enumerate(params.values()):
                    _grad(p).add_(rng.gaussian(config["seed"], rng.NOISE, t, i, p.shape, dtype, device),
                                alpha=config["noise"])
            if config["clip_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip_grad_norm"])
            if offset:
                lr = opt.param_groups[0]["lr"]
                for i, p in enumerate(params.values()):
                    if config["optimizer"] == "adamw":
                        p.sub_((p - anchors[i]) * (lr * lam))
                    else:
                        _grad(p).add_(p - anchors[i], alpha=lam)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if t + 1 in later_marks:
            record()
    return {"history_step": marks, **history}


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, which ``loss.backward()`` has just filled."""
    if p.grad is None:
        raise RuntimeError("mirrorsym.sweep: a parameter has no gradient after loss.backward() (the loss does "
                           "not depend on it)")
    return p.grad
