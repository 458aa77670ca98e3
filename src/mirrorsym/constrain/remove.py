"""Removing symmetries (syre, docs/theory.md#syre) and the two baselines with the same interface.

``remove_symmetries``: train ℓ(φ) + γ‖D(φ − θ₀)‖² with a fixed random offset θ₀ ~ N(0, σ₀²I) per tensor,
σ₀ = ``sigma`` × the tensor's init scale (its std at the call; for a constant tensor such as a BatchNorm
weight or a zero bias: the std of its module's ``weight``, else 1), and D = diag(1 + ε_i), ε_i ~ U(−ε, ε)
(``advanced_eps``; ε = 0 gives D = I). A generic θ₀ leaves no reflection that maps the regularised loss to
itself, so no symmetric surface (dead, duplicated, low-rank) stays absorbing. Torch coupled ``weight_decay=λ``
is γ = λ/2 (docs/theory.md#conventions).

Two modes, same objective:

* ``mode="parametrize"``: φ = θ₀ + ψ/d with ψ the trained tensor (``right_inverse``: ψ = d(φ − θ₀), the
  function is unchanged). The optimizer's own weight decay on ψ *is* the decay of φ towards θ₀, with any
  optimizer (SGD/Adam coupled, AdamW decoupled in ψ). State-dict keys: ``<name>`` →
  ``parametrizations.<name>.original`` (ψ); θ₀ and d are buffers of the parametrization.
* ``mode="optimizer"``: the model is not changed; after every ``optimizer.step()`` a decoupled step
  φ ← φ − lr·λ·d²(φ − θ₀) is applied (a step post-hook; lr and λ are read from the param group,
  ``weight_decay`` of the param groups should then be 0 — pass the strength as ``weight_decay=``).
  Works with SGD, Adam and AdamW alike.

Baselines, same interface: :func:`l2_init` (θ₀ = the weights at the call, D = I) and
:func:`shrink_and_perturb` (optimizer mode only: φ ← (1 − lr·λ)φ + lr·noise·σ·ξ each step, ξ ~ N(0, I)).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ._checks import describe, nonnegative, warn_if_in_optimizer


class Offset(nn.Module):
    """φ = θ₀ + ψ / d (elementwise). ``right_inverse``: ψ = d (φ − θ₀). ``scale=None`` means d = 1."""

    offset: torch.Tensor  # buffers
    scale: torch.Tensor | None

    def __init__(self, offset: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("offset", offset)
        self.register_buffer("scale", scale)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.offset + (psi if self.scale is None else psi / self.scale)

    def right_inverse(self, phi: torch.Tensor) -> torch.Tensor:
        centred = phi - self.offset
        return centred if self.scale is None else centred * self.scale


def init_scale(tensor: torch.Tensor, module: nn.Module) -> float:
    """The tensor's std; for a constant tensor the std of ``module.weight``; else 1 (see module docstring)."""
    for t in (tensor, getattr(module, "weight", None)):
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            s = t.detach().double().std().item()
            if s > 0:
                return s
    return 1.0


class SymmetryRemoval:
    """Handle returned by :func:`remove_symmetries`, :func:`l2_init` and :func:`shrink_and_perturb`.

    ``offsets``: {param name: θ₀}; ``scales``: {param name: d}. In optimizer mode call :meth:`attach`
    (done for you when ``optimizer=`` is given) or :meth:`step` after each ``optimizer.step()``.
    :meth:`remove` undoes the parametrizations (keeping the current values) / detaches the hook.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        offsets: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
        weight_decay: float,
        noise: float,
        sigmas: dict[str, float],
        seed: int,
    ) -> None:
        self.model, self.mode = model, mode
        self.offsets, self.scales, self.sigmas = offsets, scales, sigmas
        self.weight_decay, self.noise, self.seed = weight_decay, noise, int(seed)
        self._hook: RemovableHandle | None = None
        self._generators: dict[str, torch.Generator] = {}
        self._params = dict(model.named_parameters()) if mode == "optimizer" else {}
        self._uniform = all(bool((d == 1).all()) for d in scales.values())
        self._d2 = {n: d.square() for n, d in scales.items()}

    def attach(self, optimizer: torch.optim.Optimizer) -> SymmetryRemoval:
        if self.mode != "optimizer":
            raise ValueError(
                "attach() is for mode='optimizer'; in parametrize mode the optimizer's weight decay "
                "does the work"
            )
        self._lr_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        return self

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        """The decoupled step on every tracked parameter: φ ← φ − lr·λ·d²(φ − θ₀) (+ noise), one fused
        ``lerp`` per optimizer param group (lr is read from the group at each step, so schedulers work)."""
        for step_lr, names in self._batches(lr):
            params: list[torch.Tensor] = [self._params[n] for n in names]
            c = step_lr * self.weight_decay
            if c:
                if self._uniform:
                    torch._foreach_lerp_(params, [self.offsets[n] for n in names], c)
                else:
                    for n, p in zip(names, params, strict=True):
                        p.lerp_(self.offsets[n], c * self._d2[n])
            if self.noise:
                for n, p in zip(names, params, strict=True):
                    xi = torch.randn(
                        p.shape, generator=self._generator(p.device), device=p.device, dtype=p.dtype
                    )
                    p.add_(xi, alpha=step_lr * self.noise * self.sigmas[n])

    def _batches(self, lr: float | None) -> list[tuple[float, list[str]]]:
        tracked = [n for n in self._params if n in self.offsets]
        if lr is not None:
            return [(lr, tracked)]
        lr_of = getattr(self, "_lr_of", None)
        if lr_of is None:
            raise ValueError("step() needs lr= when no optimizer was attached")
        by_group: dict[int, tuple[dict, list[str]]] = {}
        for n in tracked:
            group = lr_of.get(id(self._params[n]))
            if group is None:
                raise ValueError(f"{n!r} is not in the attached optimizer; add it or pass params=")
            by_group.setdefault(id(group), (group, []))[1].append(n)
        return [(group["lr"], names) for group, names in by_group.values()]

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.mode == "parametrize":
            for full in self.offsets:
                path, _, name = full.rpartition(".")
                module = self.model.get_submodule(path) if path else self.model
                if parametrize.is_parametrized(module, name):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def _targets(model: nn.Module, names: Collection[str] | None) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    out: list[tuple[str, nn.Module, str, torch.Tensor]] = []
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if names is not None:
        missing = [n for n in names if n not in own]
        if missing:
            raise KeyError(
                f"params {missing} are not trainable parameters of {describe(model)}; "
                f"known: {list(own)[:8]}{'...' if len(own) > 8 else ''}"
            )
        own = {n: own[n] for n in names}
    for full, p in own.items():
        if ".parametrizations." in full:
            raise ValueError(
                f"{full!r} is already parametrized; call remove_symmetries before other "
                "parametrizations or pass params= to skip it"
            )
        path, _, name = full.rpartition(".")
        out.append((full, model.get_submodule(path) if path else model, name, p))
    return out


def _build(
    model: nn.Module,
    *,
    offsets_from: str,
    sigma: float,
    advanced_eps: float,
    seed: int,
    mode: str,
    weight_decay: float,
    noise: float,
    params: Collection[str] | None,
    optimizer: torch.optim.Optimizer | None,
) -> SymmetryRemoval:
    sigma = nonnegative(sigma, "sigma")
    eps = nonnegative(advanced_eps, "advanced_eps")
    if eps >= 1:
        raise ValueError(f"advanced_eps must be < 1 so that D = diag(1 + ε) stays positive, got {eps}")
    weight_decay = nonnegative(weight_decay, "weight_decay")
    noise = nonnegative(noise, "noise")
    if mode not in ("parametrize", "optimizer"):
        raise ValueError(f"mode must be 'parametrize' or 'optimizer', got {mode!r}")
    if mode == "parametrize" and weight_decay > 0:
        raise ValueError(
            "weight_decay= is for mode='optimizer'; in parametrize mode the optimizer's own weight_decay on "
            "the new parameters is the decay towards θ₀: pass it to the optimizer"
        )
    if mode == "optimizer" and weight_decay == 0 and noise == 0:
        warnings.warn(
            "mode='optimizer' with weight_decay=0 does nothing: the method needs a decay strength > 0",
            UserWarning,
            stacklevel=3,
        )
    gen = torch.Generator().manual_seed(int(seed))  # CPU generator: same θ₀ on every device
    offsets: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    sigmas: dict[str, float] = {}
    for full, module, name, p in _targets(model, params):
        sigmas[full] = init_scale(p, module)
        if offsets_from == "random":
            theta0 = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (sigma * sigmas[full])
        else:
            theta0 = p.detach().double().cpu()
        d = 1 + (2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1) * eps
        offsets[full] = theta0.to(device=p.device, dtype=p.dtype)
        scales[full] = d.to(device=p.device, dtype=p.dtype)
        if mode == "parametrize":
            warn_if_in_optimizer(optimizer, p, full)
            with torch.no_grad():
                scale = scales[full] if eps > 0 else None
                parametrize.register_parametrization(module, name, Offset(offsets[full], scale))
    handle = SymmetryRemoval(model, mode, offsets, scales, weight_decay, noise, sigmas, seed)
    if mode == "optimizer" and optimizer is not None:
        handle.attach(optimizer)
    return handle


def remove_symmetries(
    model: nn.Module,
    sigma: float = 0.01,
    seed: int = 0,
    *,
    advanced_eps: float = 0.0,
    mode: str = "parametrize",
    weight_decay: float = 0.0,
    params: Collection[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> SymmetryRemoval:
    """Remove the model's symmetries: fixed random offset θ₀ (σ₀ = ``sigma`` × init scale) + decay towards it.

    ``mode="parametrize"`` (default): in place; train with any optimizer and a coupled/decoupled
    ``weight_decay`` > 0 (the method needs γ > 0). ``mode="optimizer"``: pass ``weight_decay=`` (λ) and
    ``optimizer=`` (or call ``.attach(opt)``); the decoupled step runs after each ``optimizer.step()``.
    ``params``: names to treat (default: every trainable parameter). See the module docstring.
    """
    return _build(
        model,
        offsets_from="random",
        sigma=sigma,
        advanced_eps=advanced_eps,
        seed=seed,
        mode=mode,
        weight_decay=weight_decay,
        noise=0.0,
        params=params,
        optimizer=optimizer,
    )


def l2_init(
    model: nn.Module,
    *,
    mode: str = "parametrize",
    weight_decay: float = 0.0,
    params: Collection[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> SymmetryRemoval:
    """L2-Init baseline: decay towards the weights at the call (θ₀ = φ_init, D = I)."""
    return _build(
        model,
        offsets_from="init",
        sigma=0.0,
        advanced_eps=0.0,
        seed=0,
        mode=mode,
        weight_decay=weight_decay,
        noise=0.0,
        params=params,
        optimizer=optimizer,
    )


def shrink_and_perturb(
    model: nn.Module,
    weight_decay: float,
    noise: float = 0.01,
    seed: int = 0,
    *,
    params: Collection[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> SymmetryRemoval:
    """Shrink-and-perturb baseline (optimizer mode): each step φ ← φ − lr·λ·φ + lr·noise·σ·ξ, ξ ~ N(0, I),
    σ the tensor's init scale; θ₀ = 0, so decay alone keeps every mirror through the origin and the
    noise is what breaks the symmetric surfaces."""
    handle = _build(
        model,
        offsets_from="random",
        sigma=0.0,
        advanced_eps=0.0,
        seed=seed,
        mode="optimizer",
        weight_decay=weight_decay,
        noise=noise,
        params=params,
        optimizer=optimizer,
    )
    return handle
