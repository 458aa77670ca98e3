"""The vmapped trainer: K copies of one model, one functional optimizer step for all of them.

Every copy k has its own parameters θ_k, optimizer state and hyper-parameters (per-copy tensors). One
step t of every live copy, with B_k,t = ``rng.batch_indices(seed_k, t, n, B)`` and η_t the learning
rate of the copy's schedule at step t (see :mod:`mirrorsym.sweep.config`):

    g  = ∇_θ loss(model_θ(x_B, ε_1 … ε_k), y_B) + σ ξ_t       (ξ_t only with the ``noise`` option)
    g ← g · min(1, c / (‖g‖ + 1e-6))                          (only with ``clip_grad_norm`` = c > 0;
                                                               ‖g‖ over all parameters of the copy)
    d  = θ − θ₀                                                (θ₀ = 0 unless ``decay_to_offset_sigma``)

    sgd:    g ← g + λ d;  m ← μ m + g;  v = g + μ m (nesterov) or m;  θ ← θ − η_t v
    adam:   g ← g + λ d;  then the Adam step below
    adamw:  θ ← θ − η_t λ d  (θ·(1 − η_t λ) for θ₀ = 0);  then the Adam step below
    Adam step (s = t + 1):  a ← a + (1 − β₁)(g − a);  b ← β₂ b + (1 − β₂) g²;
                            θ ← θ − (η_t / (1 − β₁ˢ)) · a / (√b / √(1 − β₂ˢ) + ε)

which is ``torch.optim.SGD(lr, momentum, weight_decay=λ, nesterov)`` / ``Adam(lr, (β₁, β₂), ε,
weight_decay=λ)`` / ``AdamW(...)`` with ``torch.nn.utils.clip_grad_norm_(c)`` before the step and a
``StepLR``/``CosineAnnealingLR`` stepped after it (m, a, b start at 0). ξ_t = ``rng.gaussian(seed, NOISE,
t, i, shape)`` for the i-th parameter in ``named_parameters()`` order; θ₀ = σ₀ · ``rng.gaussian(seed,
OFFSET, 0, i, shape)``. :func:`mirrorsym.sweep.reference.train_plain` is this, written with the torch
optimizers on one model.

**Random inputs** (``Sweep(random_inputs=k)``, ``Problem.random_inputs``; default k = 0: the forward is
``model(x_B)``). The engine has no per-copy random generator inside the traced step, so a model that needs
randomness (augmentation, dropout masks, ...) receives it as inputs: at step t the forward is
``model(x_B, ε_0, …, ε_{k−1})`` with ε_j = ``rng.gaussian(seed, RANDOM_INPUTS, t, j, x_B.shape)`` ~ N(0, 1)
i.i.d., of the minibatch input's shape and dtype (the model turns them into whatever it needs: a Bernoulli(p)
mask is ``Φ(ε) < p``, i.e. ``0.5 · (1 + erf(ε/√2)) < p``). They are drawn on the host with the minibatch, so
they depend on the run's seed and the step only (not on the chunk, K, backend or device), and differ across
seeds. **Metrics** call the model without them, ``model(x)`` (the deterministic evaluation mode: the
model's ``forward(x, *eps)`` must accept an empty ``eps``, e.g. no mask and no added noise), so that
recorded metrics are functions of the parameters only.

A copy whose loss or new parameters are NaN/inf at step t is *frozen*: it keeps its last finite
parameters, is reported ``diverged`` at step t, and its metrics from then on are NaN. Copies never
interact (vmap), so the others are unaffected.

**How a chunk runs.** The step (vmapped gradient + optimizer update, all copies) is traced once per
chunk with ``make_fx`` into a flat graph of ATen calls: no vmap, ``functional_call`` or autograd
machinery is left at run time, so a step costs what a hand-batched program costs. Steps run in
blocks (the intervals between metric records, at most a few hundred steps): the block's minibatch
indices, noise and learning rates are drawn on the host in one go, the steps run without any host
synchronisation, and divergence is checked once at the block's end; a block in which a copy diverged
is replayed from its start with the per-step freezing above (same values for the other copies).
Metrics are evaluated (vmapped) on groups of copies small enough to stay in cache on a CPU.
Models the tracer cannot handle run eagerly (same results up to round-off, with a warning); chunks of
fewer than ``TRACE_MIN_STEPS`` steps always do (tracing would cost more than it saves).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from . import rng
from .config import OPTIONS, run_id

HYPER = ("lr", "weight_decay", "momentum", "noise")  # per-copy tensors (kept for compatibility)
TRACE_MIN_STEPS = 32  # chunks with fewer steps run eagerly
INDEX_BUDGET = 1 << 22  # most pre-drawn minibatch indices (and noise values) per block
MAX_BLOCK = 256  # most steps per block
METRIC_BUDGET = 1 << 21  # CPU: elements of the largest metric intermediate per evaluation call


class UnsupportedModel(ValueError):
    """The model holds something the vmapped engine cannot train correctly (named in the message)."""


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
    criterion: Callable[..., torch.Tensor]
    data: tuple[torch.Tensor, ...]
    eval_data: tuple[torch.Tensor, ...]
    metrics: Mapping[str, Callable]
    record_every: int
    name: str
    compile_step: bool = False  # torch.compile the traced step (see train_chunk)
    keep_params: bool = False  # rows carry each run's final parameters (column final_params, JSON)
    random_inputs: int = 0  # k: the training forward is model(x_B, ε_0, …, ε_{k−1}) (module docstring)

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


def check_trainable(module: nn.Module) -> None:
    """Refuse what vmapped copies cannot train correctly: BatchNorm (or InstanceNorm) updating running
    statistics in train mode, and dropout in train mode (no per-copy random generator). Raises
    :class:`UnsupportedModel` naming the module and the fix."""
    for name, m in module.named_modules():
        label = f"{name or '<root>'!r} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            raise UnsupportedModel(
                f"mirrorsym.sweep: module {label} is a normalisation in train mode with running statistics; "
                "each vmapped copy would have to update its own running mean/var in place, which the engine "
                "cannot do. Fix: in the model factory put it in eval mode (module.eval(): fixed statistics), "
                "use track_running_stats=False (batch statistics only), GroupNorm or LayerNorm, or train "
                "these runs one by one with a plain loop")
        p = getattr(m, "p", 0.0) if isinstance(m, nn.modules.dropout._DropoutNd) else \
            getattr(m, "dropout", 0.0) if isinstance(m, nn.MultiheadAttention) else 0.0
        if m.training and p > 0:
            raise UnsupportedModel(
                f"mirrorsym.sweep: module {label} applies dropout (p={p}) in train mode; the vmapped copies have "
                "no per-copy random generator, so their masks would be neither independent nor reproducible "
                "from each run's seed. Fix: in the model factory set p=0 (or call .eval() on the dropout "
                "modules) and, if the masks matter, build them from the Sweep's random inputs "
                "(Sweep(random_inputs=k): forward(x, *eps), mask = Φ(eps) < 1 − p), or train these runs one by "
                "one with a plain loop")


def _random_op_error(exc: BaseException) -> UnsupportedModel | None:
    if "random operation" in str(exc) or "randomness" in str(exc):
        return UnsupportedModel(
            "mirrorsym.sweep: the model or loss draws random numbers during training (e.g. F.dropout with "
            f"training=True, torch.rand*): {str(exc).splitlines()[0]}. The vmapped copies have no per-copy "
            "random generator, so such draws would be neither independent nor reproducible from each run's "
            "seed. Fix: make the forward deterministic (dropout off) and take the randomness as inputs "
            "(Sweep(random_inputs=k) passes k per-run N(0, 1) tensors: forward(x, *eps)), or train these runs "
            "one by one")
    return None


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


def program_key(config: Mapping) -> tuple:
    """What must be equal for configs to share a chunk (one traced step): everything else is per copy."""
    return (config["batch_size"], config["steps"], config["optimizer"], config["nesterov"],
            config["clip_grad_norm"] > 0, config["sampling"])


# ----------------------------------------------------------------------------- host-side schedules
def lr_schedule(configs: Sequence[Mapping], step0: int, count: int) -> np.ndarray:
    """η_t of every copy for steps step0..step0+count-1, float64, shape (count, K): the closed forms of
    ``StepLR`` and ``CosineAnnealingLR(T_max=steps)``."""
    t = np.arange(step0, step0 + count, dtype=np.float64)[:, None]
    out = np.empty((count, len(configs)))
    for k, c in enumerate(configs):
        lr = c["lr"]
        if c["lr_schedule"] == "step":
            out[:, k] = lr * c["lr_gamma"] ** np.floor(t[:, 0] / c["lr_step_size"])
        elif c["lr_schedule"] == "cosine":
            lo = c["lr_min"]
            out[:, k] = lo + (lr - lo) * (1 + np.cos(np.pi * t[:, 0] / c["steps"])) / 2
        else:
            out[:, k] = lr
    return out


# ----------------------------------------------------------------------------- the chunk
class _Chunk:
    """State of K stacked copies on one device, as flat tensor lists (what the traced step takes)."""

    def __init__(self, problem: Problem, configs: Sequence[Mapping], device: torch.device):
        self.problem, self.configs, self.device = problem, list(configs), device
        keys = {program_key(c) for c in configs}
        if len(keys) != 1:
            raise ValueError("train_chunk needs one batch_size, steps, optimizer, nesterov, clipping on/off and "
                             "sampling per chunk (group the configs with plan_chunks first)")
        modules = [build_copy(problem, c) for c in configs]
        check_trainable(modules[0])
        _check_same_structure(modules, configs)
        params, buffers = stack_module_state(modules)
        self.names = list(params)
        self.params = {k: v.detach().to(device) for k, v in params.items()}
        self.buffers = {k: v.detach().to(device) for k, v in buffers.items()}
        self.base = copy.deepcopy(modules[0]).to("meta")
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        self.K = len(configs)
        c0 = configs[0]
        self.B, self.steps = c0["batch_size"], c0["steps"]
        self.optimizer, self.nesterov = c0["optimizer"], c0["nesterov"]
        self.clip = c0["clip_grad_norm"] > 0
        self.data = _to_device(problem.data, device, self.dtype)
        self.eval_data = _to_device(problem.eval_data, device, self.dtype)
        self.full_batch = self.B == problem.n
        self.replace = c0["sampling"] == "with_replacement"
        self.seeds = _per_copy(configs, "seed", torch.long, device)
        self.streams = rng.Streams(self.seeds)
        self.use_noise = any(c["noise"] > 0 for c in configs)
        self.n_random = int(problem.random_inputs)
        self.use_anchor = any(c["decay_to_offset_sigma"] > 0 for c in configs)
        self.use_momentum = self.optimizer == "sgd" and any(c["momentum"] > 0 for c in configs)
        self.use_decay = any(c["weight_decay"] > 0 for c in configs)  # else the decay terms are skipped
        self.alive = torch.ones(self.K, dtype=torch.bool, device=device)
        self.diverged_step = torch.full((self.K,), -1, dtype=torch.long, device=device)
        self._hyper(configs)
        self.state = self._initial_state()

    # per-copy constants, broadcast once per parameter
    def _hyper(self, configs) -> None:
        def per_param(values: Sequence[float]) -> list[torch.Tensor]:
            v = torch.tensor(values, dtype=self.dtype, device=self.device)
            return [_broadcast(v, p) for p in self.params.values()]

        h: dict[str, list[torch.Tensor]] = {"weight_decay": per_param([c["weight_decay"] for c in configs])}
        if self.use_noise:
            h["noise"] = per_param([c["noise"] for c in configs])
        if self.use_momentum:
            h["momentum"] = per_param([c["momentum"] for c in configs])
        if self.optimizer != "sgd":
            h["one_minus_beta1"] = per_param([1 - c["beta1"] for c in configs])
            h["beta2"] = per_param([c["beta2"] for c in configs])
            h["one_minus_beta2"] = per_param([1 - c["beta2"] for c in configs])
            h["eps"] = per_param([c["eps"] for c in configs])
        if self.clip:
            h["clip"] = [torch.tensor([c["clip_grad_norm"] if c["clip_grad_norm"] > 0 else math.inf
                                       for c in configs], dtype=self.dtype, device=self.device)]
        if self.use_anchor:
            sigma = _per_copy(configs, "decay_to_offset_sigma", self.dtype, self.device)
            h["anchor"] = [_broadcast(sigma, p) * self.streams.gaussian(rng.OFFSET, 0, i, p.shape[1:], p.dtype)
                           for i, p in enumerate(self.params.values())]
        self.hyper_names = list(h)
        self.hyper = [t for name in self.hyper_names for t in h[name]]

    def _initial_state(self) -> list[torch.Tensor]:
        """Flat carry: parameters, then each optimizer-state kind for every parameter."""
        params = list(self.params.values())
        if self.optimizer == "sgd":
            self.state_kinds = ["momentum"] if self.use_momentum else []
        else:
            self.state_kinds = ["exp_avg", "exp_avg_sq"]
        return params + [torch.zeros_like(p) for _ in self.state_kinds for p in params]

    @property
    def schedule_names(self) -> list[str]:
        if self.optimizer == "sgd":
            return ["neg_lr"]
        names = ["neg_step_size", "bc2_sqrt"]
        if self.optimizer == "adamw":
            names.append("decay")
        return names

    def schedule_block(self, step0: int, count: int) -> list[torch.Tensor]:
        """Per-step (K,) scalars of the update for a block, as (count, K) tensors (host float64 maths, then
        cast: the same numbers the torch optimizers compute in Python floats)."""
        lr = lr_schedule(self.configs, step0, count)
        out = {"neg_lr": -lr}
        if self.optimizer != "sgd":
            s = np.arange(step0 + 1, step0 + count + 1, dtype=np.float64)[:, None]
            beta1 = np.array([c["beta1"] for c in self.configs])
            beta2 = np.array([c["beta2"] for c in self.configs])
            out["neg_step_size"] = -(lr / (1 - beta1**s))
            out["bc2_sqrt"] = (1 - beta2**s) ** 0.5
            if self.optimizer == "adamw":
                wd = np.array([c["weight_decay"] for c in self.configs])
                out["decay"] = lr * wd if self.use_anchor else 1 - lr * wd
        return [torch.from_numpy(out[name]).to(device=self.device, dtype=self.dtype) for name in self.schedule_names]

    def noise_block(self, step0: int, count: int) -> list[torch.Tensor]:
        if not self.use_noise:
            return []
        return [self.streams.gaussian_block(rng.NOISE, step0, count, i, p.shape[1:], p.dtype)
                for i, p in enumerate(self.params.values())]

    def random_input_block(self, step0: int, count: int) -> list[torch.Tensor]:
        """The k random inputs of every copy for a block: k tensors (count, K, *x_B.shape) (module docstring)."""
        if not self.n_random:
            return []
        x = self.data[0]
        shape = (x.shape[0] if self.full_batch else self.B, *x.shape[1:])
        return [self.streams.gaussian_block(rng.RANDOM_INPUTS, step0, count, j, shape, x.dtype)
                for j in range(self.n_random)]

    # ------------------------------------------------------------------ the step, as a pure function
    def forward(self, params, buffers, x, *eps):
        return functional_call(self.base, (params, buffers), (x, *eps))

    def _loss(self, params, buffers, *batch_and_eps):
        n_data = len(self.data)
        batch, eps = batch_and_eps[:n_data], batch_and_eps[n_data:]
        return self.problem.criterion(self.forward(params, buffers, batch[0], *eps), *batch[1:])

    def grad_fn(self, full_batch: bool):
        data_dim = None if full_batch else 0
        in_dims = (0, 0) + (data_dim,) * len(self.data) + (0,) * self.n_random
        return vmap(grad_and_value(self._loss), in_dims=in_dims)

    def step_function(self) -> Callable:
        """``step(*carry, *buffers, *hyper, *batch, *schedule_t, *noise_t, *eps_t) -> (*new_carry, loss)``."""
        P, K = len(self.names), self.K
        n_state, n_buf, n_hyper = len(self.state_kinds), len(self.buffers), len(self.hyper)
        n_data, n_sched = len(self.data), len(self.schedule_names)
        grad_fn = self.grad_fn(self.full_batch)
        buffer_names, hyper_names, sched_names = list(self.buffers), self.hyper_names, self.schedule_names
        optimizer, nesterov, clip = self.optimizer, self.nesterov, self.clip
        use_noise, use_anchor, state_kinds = self.use_noise, self.use_anchor, self.state_kinds
        use_decay = self.use_decay
        names = self.names

        def step(*args):
            i = 0
            params = list(args[i:i + P])
            i += P
            state = {kind: list(args[i + j * P:i + (j + 1) * P]) for j, kind in enumerate(state_kinds)}
            i += n_state * P
            buffers = dict(zip(buffer_names, args[i:i + n_buf], strict=True))
            i += n_buf
            flat_hyper = args[i:i + n_hyper]
            i += n_hyper
            h, j = {}, 0
            for name in hyper_names:
                size = 1 if name == "clip" else P
                h[name] = flat_hyper[j:j + size]
                j += size
            batch = args[i:i + n_data]
            i += n_data
            sched = dict(zip(sched_names, args[i:i + n_sched], strict=True))
            i += n_sched
            noise = args[i:i + P] if use_noise else None
            i += P if use_noise else 0
            eps = args[i:]  # the k random inputs of this step, (K, *x_B.shape) each
            grads, loss = grad_fn(dict(zip(names, params, strict=True)), buffers, *batch, *eps)
            g = [grads[k] for k in names]
            if noise is not None:  # use_noise
                g = [gi + h["noise"][j] * noise[j] for j, gi in enumerate(g)]
            if clip:
                norms = [torch.linalg.vector_norm(gi.reshape(K, -1), dim=1) for gi in g]
                total = torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)
                coef = torch.clamp(h["clip"][0] / (total + 1e-6), max=1.0)
                g = [gi * _broadcast(coef, gi) for gi in g]
            new_params: list[torch.Tensor] = []
            new_state: dict[str, list[torch.Tensor]] = {kind: [] for kind in state_kinds}
            for j, p in enumerate(params):
                # x + s·y as one addcmul (s per copy): the same expression torch's optimizers evaluate
                d = p - h["anchor"][j] if use_anchor else p
                gj = g[j]
                if optimizer == "sgd":
                    if use_decay:
                        gj = torch.addcmul(gj, h["weight_decay"][j], d)
                    if state_kinds:
                        buf = torch.addcmul(gj, h["momentum"][j], state["momentum"][j])
                        new_state["momentum"].append(buf)
                        gj = torch.addcmul(gj, h["momentum"][j], buf) if nesterov else buf
                    new_params.append(torch.addcmul(p, _broadcast(sched["neg_lr"], p), gj))
                    continue
                if optimizer == "adam":
                    if use_decay:
                        gj = torch.addcmul(gj, h["weight_decay"][j], d)
                elif use_decay and use_anchor:
                    p = p - _broadcast(sched["decay"], p) * d
                elif use_decay:
                    p = p * _broadcast(sched["decay"], p)
                a = torch.lerp(state["exp_avg"][j], gj, h["one_minus_beta1"][j])
                b = torch.addcmul(state["exp_avg_sq"][j] * h["beta2"][j], h["one_minus_beta2"][j] * gj, gj)
                denom = torch.sqrt(b) / _broadcast(sched["bc2_sqrt"], p) + h["eps"][j]
                new_params.append(torch.addcmul(p, _broadcast(sched["neg_step_size"], p), a / denom))
                new_state["exp_avg"].append(a)
                new_state["exp_avg_sq"].append(b)
            return (*new_params, *[t for kind in state_kinds for t in new_state[kind]], loss)

        return step

    def metric_function(self) -> Callable:
        """``metrics(*params, *buffers, *eval_data) -> tuple of (k,) values`` for k copies. Within one
        evaluation the model's output on the same parameters and inputs is computed once (``loss`` and
        ``accuracy`` share one forward pass)."""
        names, buffer_names = self.names, list(self.buffers)
        P, n_buf = len(names), len(buffer_names)
        metrics = list(self.problem.metrics.values())
        dtype = self.dtype

        def one(params, buffers, *data):
            cache = {}

            def forward(p, x):
                key = (tuple(id(t) for t in p.values()), id(x))
                if key not in cache:  # keep p and x alive: their ids stay theirs during this evaluation
                    cache[key] = (p, x, self.forward(p, buffers, x))
                return cache[key][2]

            return tuple(torch.as_tensor(metric(params, data, forward)).reshape(()).to(dtype) for metric in metrics)

        batched = vmap(one, in_dims=(0, 0) + (None,) * len(self.eval_data))

        def evaluate(*args):
            params = dict(zip(names, args[:P], strict=True))
            buffers = dict(zip(buffer_names, args[P:P + n_buf], strict=True))
            return batched(params, buffers, *args[P + n_buf:])

        return evaluate

    def metric_fn(self, metric):  # kept for callers of the previous engine
        def one(params, buffers, *data):
            value = metric(params, data, lambda p, x: self.forward(p, buffers, x))
            return torch.as_tensor(value).reshape(()).to(self.dtype)

        return vmap(one, in_dims=(0, 0) + (None,) * len(self.eval_data))


# ----------------------------------------------------------------------------- tracing
_warned: set[str] = set()


def _trace(fn: Callable, args: Sequence[torch.Tensor], what: str) -> Callable:
    """``make_fx(fn)`` on example ``args`` (flat ATen graph), or ``fn`` itself if tracing fails."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_fx(fn)(*args)
    except Exception as exc:
        unsupported = _random_op_error(exc)
        if unsupported is not None:
            raise unsupported from exc
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"mirrorsym.sweep: could not trace the {what} ({reason}); running it eagerly "
                          "(slower, same results up to round-off)", stacklevel=4)
        return fn


def _compile(graph_module, example: Sequence[torch.Tensor]) -> Callable:
    """``torch.compile`` a traced step (compiled on this first call), or the graph itself on failure."""
    try:
        compiled = torch.compile(graph_module, dynamic=False, fullgraph=True)
        compiled(*example)
        return compiled
    except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"mirrorsym.sweep: torch.compile of the training step failed ({reason}); running the "
                          "traced step uncompiled", stacklevel=4)
        return graph_module


class _Metrics:
    """Metric evaluation for a chunk (vmapped, eager), on groups of G copies (the last group is padded
    with copies from the start, so that every call has one shape). On a CPU, G keeps the largest
    intermediate (≈ eval rows × widest layer per copy) near ``METRIC_BUDGET`` elements, so that it stays
    in cache; elsewhere G = K. Metrics are not traced: recorded a few dozen times per run, they do not
    repay the tracing time (measured on the benchmark problems)."""

    def __init__(self, chunk: _Chunk):
        self.chunk, self.K = chunk, chunk.K
        self.n_metrics = len(chunk.problem.metrics)
        G = self.K
        if chunk.device.type == "cpu":
            x = chunk.eval_data[0]
            width = max([x[0].numel() if x.dim() > 1 else 1] +
                        [max(p.shape[1:], default=1) for p in chunk.params.values()])
            G = max(1, min(self.K, METRIC_BUDGET // max(1, x.shape[0] * width)))
        groups = -(-self.K // G)
        self.G = -(-self.K // groups)  # balanced: the padding is less than one group
        self.fn = chunk.metric_function()

    def _args(self, params: Sequence[torch.Tensor], lo: int) -> list[torch.Tensor]:
        hi = lo + self.G
        tensors = [*params, *self.chunk.buffers.values()]
        if hi <= self.K:
            part = [t[lo:hi] for t in tensors]
        else:
            part = [torch.cat([t[lo:], t[:hi - self.K]]) for t in tensors]
        return part + list(self.chunk.eval_data)

    def __call__(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every metric of every copy: a list of (K,) tensors (on the device, no synchronisation)."""
        parts = [self.fn(*self._args(params, lo)) for lo in range(0, self.K, self.G)]
        if len(parts) == 1:
            return [parts[0][m] for m in range(self.n_metrics)]
        return [torch.cat([p[m] for p in parts])[:self.K] for m in range(self.n_metrics)]


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


def _blocks(marks: Sequence[int], max_len: int) -> list[tuple[int, int]]:
    """[start, stop) step ranges between consecutive record marks, cut to at most ``max_len`` steps."""
    out = []
    for a, b in zip(marks[:-1], marks[1:], strict=True):
        for s in range(a, b, max_len):
            out.append((s, min(s + max_len, b)))
    return out


def _all_finite(tensors: Sequence[torch.Tensor], K: int) -> torch.Tensor:
    ok = torch.ones(K, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t).reshape(K, -1).all(dim=1)
    return ok


def train_chunk(problem: Problem, configs: Sequence[Mapping], device="auto",
                on_progress: Callable[[int], None] | None = None, trace: bool | None = None) -> list[dict]:
    """Train ``configs`` (one :func:`program_key`: same batch size, steps, optimizer...) as one vmapped
    chunk; one row dict per run.

    ``on_progress(copy_steps)`` is called on the host after each block (no device sync). ``trace``:
    trace the step with ``make_fx`` (default: when the chunk has at least
    ``TRACE_MIN_STEPS`` steps); False runs them eagerly under vmap. With ``problem.compile_step`` the
    traced step is also compiled by ``torch.compile`` (inductor: fused loops, e.g. no (K, B, d)
    intermediate for an elementwise product and its sum). Compiling costs seconds to a minute (less when
    inductor's on-disk cache already holds the graph), so it pays back on long runs only; results equal
    the uncompiled ones up to round-off. If compiling fails, the step runs uncompiled (with a warning).
    """
    with torch.no_grad():
        chunk = _Chunk(problem, configs, resolve_device(device))
    if trace is None:
        trace = chunk.steps >= TRACE_MIN_STEPS
    K, B, n, P = chunk.K, chunk.B, problem.n, len(chunk.names)
    marks = record_steps(chunk.steps, problem.record_every)
    per_step = K * (0 if chunk.full_batch else B) + (K * sum(p[0].numel() for p in chunk.params.values())
                                                      if chunk.use_noise else 0)
    per_step += K * chunk.n_random * (n if chunk.full_batch else B) * math.prod(chunk.data[0].shape[1:])
    blocks = _blocks(marks, max(1, min(MAX_BLOCK, INDEX_BUDGET // max(per_step, 1))))
    step_fn = chunk.step_function()
    metrics = _Metrics(chunk)
    later_marks = set(marks[1:])
    history: list[list[torch.Tensor]] = []
    consts = list(chunk.buffers.values()) + chunk.hyper

    def record(carry):
        values = metrics(carry[:P])
        history.append([torch.where(chunk.alive, v, math.nan) for v in values])

    def inputs(block, s):
        idx, sched, noise, eps = block
        batch = chunk.data if idx is None else tuple(gather_rows(d, idx[s]) for d in chunk.data)
        return (*consts, *batch, *(v[s] for v in sched), *(z[s] for z in noise), *(e[s] for e in eps))

    carry = chunk.state
    program = None
    dead = 0  # copies known (on the host) to be frozen
    try:
        if problem.metrics:
            record(carry)
        for start, stop in blocks:
            count = stop - start
            block = (None if chunk.full_batch else chunk.streams.batch_indices_block(start, count, n, B, chunk.replace),
                     chunk.schedule_block(start, count), chunk.noise_block(start, count),
                     chunk.random_input_block(start, count))
            if program is None:
                example = (*carry, *inputs(block, 0))
                program = _trace(step_fn, example, "training step") if trace else step_fn
                if problem.compile_step and program is not step_fn:
                    program = _compile(program, example)
            snapshot, losses = carry, []
            for s in range(count):
                out = program(*carry, *inputs(block, s))
                carry, loss = list(out[:-1]), out[-1]
                losses.append(loss)
            ok = torch.isfinite(torch.stack(losses)).all(dim=0) & _all_finite(carry[:P], K)
            if bool((chunk.alive & ~ok).any()):  # one host sync per block
                carry = _replay(chunk, program, snapshot, start, count, inputs, block)
                dead = int((~chunk.alive).sum())
            elif dead:
                keep = chunk.alive
                carry = [torch.where(_broadcast(keep, new), new, old) for new, old in zip(carry, snapshot, strict=True)]
            if stop in later_marks and problem.metrics:
                record(carry)
            if on_progress is not None:
                on_progress(K * count)
    except RuntimeError as exc:
        unsupported = _random_op_error(exc)
        if unsupported is not None:
            raise unsupported from exc
        raise
    chunk.state = carry
    chunk.params = dict(zip(chunk.names, carry[:P], strict=True))
    return _rows(problem, configs, chunk, marks, history)


def _replay(chunk: _Chunk, program, carry, start: int, count: int, inputs, block) -> list[torch.Tensor]:
    """Rerun a block from its start, freezing each copy at its first non-finite step (rare path)."""
    K, P = chunk.K, len(chunk.names)
    for s in range(count):
        out = program(*carry, *inputs(block, s))
        new, loss = list(out[:-1]), out[-1]
        finite = torch.isfinite(loss) & _all_finite(new[:P], K)
        keep = chunk.alive & finite
        chunk.diverged_step = torch.where(chunk.alive & ~finite, start + s, chunk.diverged_step)
        carry = [torch.where(_broadcast(keep, n), n, o) for n, o in zip(new, carry, strict=True)]
        chunk.alive = keep
    return carry


def _rows(problem, configs, chunk: _Chunk, marks, history) -> list[dict]:
    names = list(problem.metrics)
    stacked = {name: torch.stack([h[m] for h in history], dim=1).double().cpu().numpy()
               for m, name in enumerate(names)}
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
        if problem.keep_params:
            row["final_params"] = encode_params({n: t[k] for n, t in chunk.params.items()})
        rows.append(row)
    return rows


def encode_params(params: Mapping[str, torch.Tensor]) -> str:
    """One run's parameters as JSON text ``{name: {"dtype", "shape", "values"}}``: exact for float64 and
    float32 (Python floats are doubles), readable by :func:`decode_params`."""
    return json.dumps({n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                           "values": t.detach().double().cpu().reshape(-1).tolist()} for n, t in params.items()})


def final_params(row: Mapping) -> dict[str, torch.Tensor]:
    """The trained parameters of one result row (a DataFrame row or dict) of a sweep run with
    ``keep_params=True``, by their ``named_parameters`` names, in their original dtype."""
    text = row.get("final_params") if hasattr(row, "get") else None
    if not isinstance(text, str):
        raise KeyError("this row has no final_params: run the Sweep with keep_params=True to keep each run's "
                       "trained parameters")
    return decode_params(text)


def decode_params(text: str) -> dict[str, torch.Tensor]:
    """The ``final_params`` of a row (see :func:`encode_params`) as tensors of their original dtype."""
    return {n: torch.tensor(v["values"], dtype=torch.float64).reshape(v["shape"]).to(getattr(torch, v["dtype"]))
            for n, v in json.loads(text).items()}
