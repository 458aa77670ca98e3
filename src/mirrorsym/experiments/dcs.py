"""Differentiable constraint by symmetry (DCS, docs/theory.md#dcs): exact constraints above a predicted threshold,
and structured sparsity that exports to a physically smaller CNN.

Part (a), a general linear constraint Oᵀθ = 0. Linear regression L(θ) = mean (y − Xθ)² with θ ∈ R^d and a
random O ∈ R^{d×k} with orthonormal columns. ``ms.constrain.linear`` reparametrises θ = (I − OOᵀ)w +
O(u ⊙ v); coupled torch ``weight_decay = λ = 2γ`` on (w, u, v) is, after minimising over the factors,
F(θ) = L(θ) + γ‖(I − OOᵀ)θ‖² + 2γ‖Oᵀθ‖₁, so s = Oᵀθ is *exactly* 0 at a minimum iff
‖Oᵀ∇L(θ*_S)‖_∞ ≤ 2γ, with θ*_S = argmin_{Oᵀθ=0} L(θ) + γ‖θ‖² (closed form for a quadratic L). The
predicted threshold γ_c is where ‖Oᵀ∇L(θ*_S(γ))‖_∞ = 2γ (bisection). The models are trained with
full-batch heavy-ball GD on a grid of γ around γ_c and compared with (i) the threshold: ‖Oᵀθ‖ ≤ 1e-6 above,
clearly non-zero below; (ii) an independent solver of the convex F (proximal gradient in float64), per
coordinate. This part runs in float64: the 1e-6 criterion is within a few float32 round-offs of ‖θ‖.

Part (b), structured sparsity. A ReLU CNN on scikit-learn's digits gets one scalar gate per unit of every
coupled unit group (``ms.constrain.apply(model, x, kind="units")``: conv channels and hidden units, each gate
multiplying the unit's incoming filter, bias and outgoing weights), trained with coupled decay λ on the
gated tensors and gates (a group lasso over units). ``ms.constrain.export`` drops the exactly-zero units
and returns a plain, smaller ``nn.Sequential``. Reported: parameters before/after, test accuracy of the
constrained model, of the exported model (outputs must agree to 1e-5 relative) and of a dense baseline
trained the same way without DCS.

Part (c), choosing the decay for a target width (``ms.constrain.suggest_decay``). A 64-``tw_hidden``-10 ReLU
MLP on digits is fitted densely (full-batch heavy-ball GD), then gated (``apply(kind="units")``) and trained
on with coupled decay 2γ on the gates and gated tensors, raised linearly over ``tw_ramp`` steps and held for
the suggested number of steps. For each target width the suggestion is calibrated once, on seed 0 (greedy
global thresholds of the dense fit, then up to ``tw_rounds`` calibration runs), and then tested on
``tw_seeds`` fresh seeds (new initialisation, new dense fit, DCS at the suggested γ and steps): the reached
width is what ``ms.constrain.export`` keeps. Rule fixed before the run: |reached − target| ≤
max(2, 0.25 · target) units, per seed.

Engine: the gated models train in their own loops (parametrised gates, a decay ramp), which the sweep
engine's grid of optimizer settings does not express; the seeds of parts (b) and (c) are independent jobs of
``ctx.map`` instead, so ``--backend ray`` trains them on the cluster (one task per seed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..constrain._checks import parametrization_chain
from ..constrain.units import merged_members
from .base import Claim, Context, finding
from .data import digit_images, digits
from .plotting import figure, save

NAME = "dcs"
TITLE = "DCS: a linear constraint met exactly above the predicted threshold; a CNN exported smaller"


@dataclass(frozen=True)
class Config:
    # part (a): linear constraint on a regression weight
    n: int = 256
    d: int = 16
    k: int = 4
    s_true: tuple[float, ...] = (0.8, -0.5, 0.3, -0.15)  # Oᵀθ_true: spread per-direction thresholds
    noise: float = 0.5
    gamma_factors: tuple[float, ...] = (0.3, 0.6, 0.85, 1.2, 1.6, 3.0)  # grid, in units of predicted γ_c
    lin_lr: float = 0.05
    lin_momentum: float = 0.9
    lin_steps: int = 1000
    exact_tol: float = 1e-6  # "met exactly": ‖Oᵀθ‖ ≤ this
    nonzero_tol: float = 1e-3  # "clearly non-zero": ‖Oᵀθ‖ > this
    ref_tol: float = 1e-4  # trained s vs the convex reference, max abs
    # part (b): structured sparsity of a CNN on digits
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    epochs: int = 100
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    dense_weight_decay: float = 5e-4  # the dense baseline (and the DCS model's non-gated tensors)
    dcs_weight_decay: float = 7e-3  # coupled λ on the gated tensors and gates: group lasso λΣ‖θ_unit‖₂
    n_test: int = 497
    export_tol: float = 1e-8  # an entry |θ| ≤ tol counts as zero
    export_rtol: float = 1e-5
    max_accuracy_drop: float = 0.03  # DCS vs dense baseline, test accuracy
    max_param_ratio: float = 0.7  # exported / dense
    cnn_seeds: int = 5
    # part (c): decay for a target width, MLP on digits
    tw_hidden: int = 32
    tw_targets: tuple[int, ...] = (8, 12)
    tw_seeds: int = 5
    tw_n_train: int = 1300
    tw_dense_steps: int = 300
    tw_ramp: int = 400  # steps of the linear decay warm-up (then the suggested steps at full decay)
    tw_lr: float = 0.1
    tw_momentum: float = 0.9
    tw_rounds: int = 3
    seed: int = 0


CONFIGS = {
    # tiny (CI smoke size): narrow layers lose more accuracy to the group penalty, hence the looser bound
    "tiny": Config(lin_steps=600, gamma_factors=(0.5, 2.0), channels=(8, 16), hidden=32, epochs=35, cnn_seeds=2,
                   dcs_weight_decay=1.5e-2, max_accuracy_drop=0.12, tw_hidden=16, tw_targets=(4, 8), tw_seeds=2,
                   tw_dense_steps=150, tw_ramp=200, tw_rounds=3),
    "quick": Config(),
    "full": Config(n=2048, d=64, k=12, s_true=tuple(float(s) for s in np.linspace(1.0, 0.1, 12)),
                   gamma_factors=tuple(float(f) for f in np.geomspace(0.2, 5.0, 16)), lin_steps=10000,
                   channels=(32, 64), hidden=128, epochs=120),
}


# ---------------------------------------------------------------------------------------------- part (a)
def linear_problem(cfg: Config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """X (n, d) standard normal, O (d, k) random orthonormal, θ_true with Oᵀθ_true = ``s_true``, y."""
    if len(cfg.s_true) != cfg.k:
        raise ValueError(f"Config.s_true has {len(cfg.s_true)} entries, expected k={cfg.k}")
    X = torch.randn(cfg.n, cfg.d, generator=gen, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(cfg.d, cfg.d, generator=gen, dtype=torch.float64)).Q
    O, O_perp = basis[:, : cfg.k], basis[:, cfg.k :]
    theta = O_perp @ torch.randn(cfg.d - cfg.k, generator=gen, dtype=torch.float64) + O @ torch.tensor(
        cfg.s_true, dtype=torch.float64)
    y = X @ theta + cfg.noise * torch.randn(cfg.n, generator=gen, dtype=torch.float64)
    return {"X": X, "y": y, "O": O, "O_perp": O_perp}


def loss_gradient(X: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """∇L for L = mean (y − Xθ)²."""
    return -2.0 * X.T @ (y - X @ theta) / len(y)


def surface_minimiser(p: dict, gamma: float) -> torch.Tensor:
    """θ*_S = argmin L(θ) + γ‖θ‖² subject to Oᵀθ = 0 (θ = O⊥ t, a ridge problem in t)."""
    Z = p["X"] @ p["O_perp"]
    n = len(p["y"])
    A = Z.T @ Z / n + gamma * torch.eye(Z.shape[1], dtype=Z.dtype)
    return p["O_perp"] @ torch.linalg.solve(A, Z.T @ p["y"] / n)


def surface_gradient(p: dict, gamma: float) -> torch.Tensor:
    """∂L/∂s = Oᵀ∇L(θ*_S(γ)): s = 0 is optimal for F iff ‖this‖_∞ ≤ 2γ (docs/theory.md#dcs)."""
    return p["O"].T @ loss_gradient(p["X"], p["y"], surface_minimiser(p, gamma))


def predicted_threshold(p: dict, iters: int = 200) -> float:
    """γ_c with ‖Oᵀ∇L(θ*_S(γ_c))‖_∞ = 2γ_c, by bisection (the left side is bounded, the right grows)."""
    def excess(g):
        return surface_gradient(p, g).abs().max().item() - 2 * g

    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        hi *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
        if hi - lo <= 1e-14 * hi:
            break
    return hi


def reference_solution(p: dict, gamma: float, iters: int = 500) -> torch.Tensor:
    """argmin F(θ) = L(θ) + γ‖(I − OOᵀ)θ‖² + 2γ‖Oᵀθ‖₁ by proximal gradient (ISTA) in float64, in the
    coordinates θ = O s + O⊥ t; returns s. F is strongly convex here (X has full column rank)."""
    Q = torch.cat([p["O"], p["O_perp"]], dim=1)
    Z, y, k = p["X"] @ Q, p["y"], p["O"].shape[1]
    n = len(y)
    hess = 2 * Z.T @ Z / n
    hess[k:, k:] += 2 * gamma * torch.eye(Z.shape[1] - k, dtype=Z.dtype)
    step = 1.0 / torch.linalg.eigvalsh(hess).max().item()
    a = torch.zeros(Z.shape[1], dtype=Z.dtype)
    b = 2 * Z.T @ y / n
    for _ in range(iters):
        a = a - step * (hess @ a - b)
        a[:k] = a[:k].sign() * (a[:k].abs() - 2 * gamma * step).clamp_min(0)
    return a[:k]


def train_linear_constraint(p: dict, gamma: float, cfg: Config) -> dict:
    """nn.Linear(d, 1) with ``ms.constrain.linear(model, "weight", O)``, heavy-ball GD, coupled decay 2γ on
    every factor. Returns s = Oᵀθ (from the parametrized weight) and u ⊙ v."""
    import mirrorsym as ms

    torch.manual_seed(cfg.seed)
    model = nn.Linear(cfg.d, 1, bias=False).double()
    ms.constrain.linear(model, "weight", p["O"])
    groups = ms.constrain.param_groups(model, ms.theory.torch_weight_decay(gamma))
    opt = torch.optim.SGD(groups, lr=cfg.lin_lr, momentum=cfg.lin_momentum)
    X, y = p["X"], p["y"]
    for _ in range(cfg.lin_steps):
        opt.zero_grad(set_to_none=True)
        ((y - model(X)[:, 0]) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        s = p["O"].T @ model.weight.reshape(-1)
        factors = parametrization_chain(model, "weight")  # original0 = w, original1 = u, original2 = v
        uv = factors.get_parameter("original1") * factors.get_parameter("original2")
    return {"s": s, "uv": uv}


def run_linear(cfg: Config, ctx: Context) -> dict:
    p = linear_problem(cfg, ctx.generator(cfg.seed))
    gamma_c = predicted_threshold(p)
    gammas = [f * gamma_c for f in cfg.gamma_factors]
    trained = [train_linear_constraint(p, g, cfg) for g in ctx.track(gammas, "linear constraint γ grid")]
    curve = np.geomspace(min(gammas) / 2, max(gammas) * 1.5, 40).tolist()
    return {
        "gamma_c": gamma_c,
        "gammas": gammas,
        "s": [t["s"] for t in trained],
        "uv": [t["uv"] for t in trained],
        "reference_s": [reference_solution(p, g) for g in gammas],
        "curve_gammas": curve,
        "curve_reference_s": [reference_solution(p, g, iters=300) for g in curve],
        "curve_surface_grad": [surface_gradient(p, g).abs() for g in curve],
    }


# ---------------------------------------------------------------------------------------------- part (b)
def digits_split(cfg: Config, gen: torch.Generator):
    """:func:`digit_images` with a fixed random train/test split."""
    x, y = digit_images()
    perm = torch.randperm(len(x), generator=gen)
    test, train = perm[: cfg.n_test], perm[cfg.n_test :]
    return (x[train], y[train]), (x[test], y[test])


def make_cnn(cfg: Config) -> nn.Sequential:
    c1, c2 = cfg.channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * 4, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10),
    )


def train_cnn(cfg: Config, train, dcs: bool, ctx: Context, seed: int | None = None) -> nn.Module:
    """SGD with momentum; ``dcs``: unit gates via ``ms.constrain.apply`` and coupled decay
    ``dcs_weight_decay`` on the gated tensors and gates, ``dense_weight_decay`` on the rest. ``seed``
    (default ``cfg.seed``) sets the initial weights (shared by the dense and DCS models) and minibatches."""
    import mirrorsym as ms

    seed = cfg.seed if seed is None else seed
    x, y = train
    torch.manual_seed(seed)  # the same initial weights for both models
    model = make_cnn(cfg).to(x.device)
    if dcs:
        ms.constrain.apply(model, x[:8], kind="units")
        groups = ms.constrain.param_groups(model, cfg.dcs_weight_decay, other_weight_decay=cfg.dense_weight_decay)
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.dense_weight_decay}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(seed + 3)
    for _ in ctx.track(range(cfg.epochs), "CNN " + ("DCS units" if dcs else "dense")):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch):
            idx = idx.to(x.device)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def _accuracy(model: nn.Module, x, y) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean()


def _widths(model: nn.Module) -> list[int]:
    """Output width of every Conv / Linear layer, in order."""
    return [m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _layer_names(model: nn.Module) -> list[str]:
    return [f"{path} ({type(m).__name__})" for path, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def run_cnn(cfg: Config, ctx: Context) -> dict:
    """Part (b) for ``cnn_seeds`` seeds: the first seed in detail (figure), every seed's sizes and accuracies
    under ``seeds`` (the findings' values)."""
    train, test = digits_split(cfg, ctx.generator(cfg.seed + 10))
    train = tuple(t.to(ctx.device) for t in train)
    test = tuple(t.to(ctx.device) for t in test)
    runs = ctx.map(run_cnn_seed, [(cfg, ctx, train, test, cfg.seed + 100 * s) for s in range(cfg.cnn_seeds)],
                   "dcs-cnn", runs=2 * cfg.cnn_seeds)  # a dense and a DCS model per seed
    keys = ("params_before", "params_after", "acc_dense", "acc_dcs", "acc_exported", "export_rel_error")
    return {**runs[0], "seeds": [{k: r[k] for k in keys} for r in runs]}


def run_cnn_seed(cfg: Config, ctx: Context, train, test, seed: int) -> dict:
    import mirrorsym as ms

    dense = train_cnn(cfg, train, False, ctx, seed)
    model = train_cnn(cfg, train, True, ctx, seed).eval()
    x_all = torch.cat([train[0], test[0]])
    small, report = ms.constrain.export(model, x_all, tol=cfg.export_tol, rtol=cfg.export_rtol)
    with torch.no_grad():
        y_dcs, y_small = model(x_all), small(x_all)
    baked = copy.deepcopy(model)
    ms.constrain.bake(baked)
    return {
        "params_dense": ms.constrain.count_params(dense),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "widths_before": _widths(baked),
        "widths_after": _widths(small),
        "layer_names": _layer_names(baked),
        "acc_dense": float(_accuracy(dense, *test)),
        "acc_dcs": float(_accuracy(model, *test)),
        "acc_exported": float(_accuracy(small, *test)),
        "export_rel_error": ((y_small - y_dcs).abs().max() / y_dcs.abs().max()).item(),
        "unit_norms": [_unit_norms(baked, g) for g in ms.constrain.unit_groups(baked, x_all[:8])],
        "group_labels": [g.label for g in ms.constrain.unit_groups(baked, x_all[:8])],
    }


def _unit_norms(model: nn.Module, group) -> list[float]:
    """‖θ_unit‖₂ over all slices of each unit of ``group`` (the group-lasso coordinates)."""
    params = dict(model.named_parameters())
    total = torch.zeros(group.size, dtype=torch.float64)
    for name, dim, index, buffer in merged_members(group):
        if buffer:
            continue
        t = params[name].detach().double().index_select(dim, index.reshape(-1)).movedim(dim, 0)
        total += t.reshape(group.size, -1).square().sum(1)
    return total.sqrt().tolist()


# ---------------------------------------------------------------------------------------------- part (c)
def width_allowance(target: int) -> float:
    """The rule of part (c), fixed before the run: |reached − target| ≤ max(2, 0.25 · target) units."""
    return max(2.0, 0.25 * target)


def make_mlp(cfg: Config, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, cfg.tw_hidden), nn.ReLU(), nn.Linear(cfg.tw_hidden, 10))


def fit_mlp(model: nn.Module, data, steps: int, lr: float, momentum: float, gamma: float = 0.0,
            ramp: int = 0) -> nn.Module:
    """Full-batch heavy-ball GD on the cross-entropy, in place. ``gamma > 0``: gate the units first
    (``ms.constrain.apply``) and put coupled decay 2γ on the gates and gated tensors, raised linearly over
    ``ramp`` steps; nothing else is decayed."""
    import mirrorsym as ms

    x, y = data
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    if gamma > 0:
        ms.constrain.apply(model, x[:8], kind="units")
        groups = ms.constrain.param_groups(model, 2 * gamma)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    for t in range(steps):
        if gamma > 0:
            opt.param_groups[0]["weight_decay"] = 2 * gamma * min(1.0, (t + 1) / max(ramp, 1))
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model



def run_width(cfg: Config, ctx: Context) -> dict:
    """Part (c): per target, calibrate ``suggest_decay`` on seed 0, then train fresh seeds at the suggestion."""
    import mirrorsym as ms

    x, y = digits()
    perm = torch.randperm(len(x), generator=ctx.generator(cfg.seed + 20))
    train = (x[perm[: cfg.tw_n_train]].to(ctx.device), y[perm[: cfg.tw_n_train]].to(ctx.device))
    test = (x[perm[cfg.tw_n_train :]].to(ctx.device), y[perm[cfg.tw_n_train :]].to(ctx.device))
    lr, momentum = cfg.tw_lr, cfg.tw_momentum
    dense0 = fit_mlp(make_mlp(cfg, cfg.seed).to(ctx.device), train, cfg.tw_dense_steps, lr, momentum)
    suggestions = []
    for target in ctx.track(cfg.tw_targets, "target widths"):
        def calibrate(gamma, steps):
            return fit_mlp(copy.deepcopy(dense0), train, cfg.tw_ramp + steps, lr, momentum, gamma=gamma,
                           ramp=cfg.tw_ramp)

        suggestions.append(ms.constrain.suggest_decay(dense0, nn.functional.cross_entropy, train, target,
                                                      train=calibrate, rounds=cfg.tw_rounds, min_steps=0, lr=lr,
                                                      momentum=momentum))
    settings = [(s.gamma, s.steps, s.tol) for s in suggestions]
    fresh = ctx.map(run_width_seed, [(cfg, cfg.seed + 1 + i, train, test, settings) for i in range(cfg.tw_seeds)],
                    "dcs-width", runs=cfg.tw_seeds * (1 + len(settings)))
    out = [{"target": target, "gamma": s.gamma, "torch_weight_decay": s.torch_weight_decay,
            "steps": cfg.tw_ramp + s.steps, "first_gamma": s.rounds[0].gamma if s.rounds else s.gamma,
            "rounds": [[r.gamma, r.steps, r.width] for r in s.rounds],
            "reached": [f["reached"][j] for f in fresh], "accuracy": [f["accuracy"][j] for f in fresh],
            "curve_gammas": s.gammas, "curve_widths": s.widths}
           for j, (target, s) in enumerate(zip(cfg.tw_targets, suggestions, strict=True))]
    return {"hidden": cfg.tw_hidden, "dense_accuracy": [f["dense_accuracy"] for f in fresh], "targets": out}


def run_width_seed(cfg: Config, seed: int, train, test, settings: list[tuple[float, int, float]]) -> dict:
    """One fresh seed of part (c), a job of ``ctx.map``: the dense fit from ``seed``, then DCS from it at
    each suggested (γ, steps, export tolerance); the exported hidden width and test accuracy of each."""
    import mirrorsym as ms

    lr, momentum = cfg.tw_lr, cfg.tw_momentum
    dense = fit_mlp(make_mlp(cfg, seed).to(train[0].device), train, cfg.tw_dense_steps, lr, momentum)
    reached, acc = [], []
    for gamma, steps, tol in settings:
        model = fit_mlp(copy.deepcopy(dense), train, cfg.tw_ramp + steps, lr, momentum, gamma=gamma,
                        ramp=cfg.tw_ramp)
        small, _ = ms.constrain.export(model, train[0], tol=tol)
        hidden = small[0] if isinstance(small, nn.Sequential) else None
        if not isinstance(hidden, nn.Linear):
            raise TypeError(f"dcs: the exported model does not start with an nn.Linear: {small}")
        reached.append(hidden.out_features)
        acc.append(float(_accuracy(small, *test)))
    return {"dense_accuracy": float(_accuracy(dense, *test)), "reached": reached, "accuracy": acc}


def run(cfg: Config, ctx: Context) -> dict:
    return {"linear": run_linear(cfg, ctx), "cnn": run_cnn(cfg, ctx), "width": run_width(cfg, ctx)}


# ---------------------------------------------------------------------------------------------- report
FLOOR = 1e-19  # exact zeros drawn at this height on log axes (float64 round-off of Oᵀθ is ~1e-16)


def _ratio_axis(ax) -> None:
    """Log x axis of γ/γ_c with plain labels (the range spans little more than one decade)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([0.2, 0.5, 1.0, 2.0, 5.0]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(results: dict, ctx: Context) -> list:
    lin, cnn = results["linear"], results["cnn"]
    gc, g = lin["gamma_c"], np.array(lin["gammas"])
    curve = np.array(lin["curve_gammas"])
    fig, ax = figure(4)
    grad = np.array(lin["curve_surface_grad"])
    for i in range(grad.shape[1]):
        ax[0, 0].plot(curve / gc, grad[:, i], lw=1, label=f"|∂L/∂s_{i + 1}| at θ*_S(γ)")
    ax[0, 0].plot(curve / gc, 2 * curve, "k--", label="2γ")
    ax[0, 0].axvline(1.0, color="grey", ls=":", label=f"predicted γ_c = {gc:.3g}")
    _ratio_axis(ax[0, 0])
    ax[0, 0].set_xlabel("weight decay γ / γ_c")
    ax[0, 0].set_ylabel("gradient on the constraint surface")
    ax[0, 0].set_title("Threshold: s = 0 is a minimum iff max|∂L/∂s_i| ≤ 2γ", fontsize=9)
    ax[0, 0].legend(fontsize=7)
    ref = np.abs(np.array(lin["curve_reference_s"]))
    s = np.abs(np.array(lin["s"]))
    for i in range(ref.shape[1]):
        line, = ax[0, 1].plot(curve / gc, np.maximum(ref[:, i], FLOOR), lw=1,
                              label="convex reference (lines)" if i == 0 else None)
        ax[0, 1].plot(g / gc, np.maximum(s[:, i], FLOOR), "o", ms=4, color=line.get_color(),
                      label="trained with ms.constrain.linear (dots)" if i == 0 else None)
    ax[0, 1].plot(g / gc, np.maximum(np.linalg.norm(s, axis=1), FLOOR), "kx", ms=7, label="‖Oᵀθ‖ trained")
    ax[0, 1].axhline(1e-6, color="r", ls="--", lw=0.8, label="1e-6 (exact)")
    ax[0, 1].axvline(1.0, color="grey", ls=":")
    _ratio_axis(ax[0, 1])
    ax[0, 1].set_yscale("log")
    ax[0, 1].set_xlabel("weight decay γ / γ_c")
    ax[0, 1].set_ylabel(f"|s_i| = |(Oᵀθ)_i| (exact 0 drawn at {FLOOR:g})")
    ax[0, 1].set_title(f"Linear constraint, k = {s.shape[1]} directions", fontsize=9)
    ax[0, 1].legend(fontsize=7, loc="center left")
    before, after = cnn["widths_before"][:-1], cnn["widths_after"][:-1]
    pos = np.arange(len(before))
    ax[0, 2].bar(pos - 0.2, before, 0.4, label="before export (dense)")
    ax[0, 2].bar(pos + 0.2, after, 0.4, label="after export")
    ax[0, 2].set_xticks(pos, cnn["layer_names"][:-1])
    ax[0, 2].set_ylabel("units (channels / neurons)")
    ax[0, 2].set_title(f"CNN on digits: params {cnn['params_before']} → {cnn['params_after']}\n"
                       f"test acc dense {cnn['acc_dense']:.3f}, DCS {cnn['acc_dcs']:.3f}, exported "
                       f"{cnn['acc_exported']:.3f}", fontsize=8)
    ax[0, 2].legend(fontsize=7)
    if "width" in results:
        plot_width(ax[0, 3], results["width"])
    return [save(fig, ctx.out_dir, "dcs")]


def plot_width(ax, width: dict) -> None:
    """Target vs reached width (one dot per fresh seed), the rule's band and the identity."""
    targets = [t["target"] for t in width["targets"]]
    top = width["hidden"]
    grid = np.linspace(0, top, 50)
    ax.fill_between(grid, grid - np.maximum(2, 0.25 * grid), grid + np.maximum(2, 0.25 * grid), color="C2",
                    alpha=0.15, label="rule: ±max(2, 25 %)")
    ax.plot(grid, grid, "k--", lw=0.8, label="reached = target")
    rng = np.random.default_rng(0)
    for i, t in enumerate(width["targets"]):
        r = np.array(t["reached"], dtype=float)
        ax.plot(t["target"] + rng.uniform(-0.3, 0.3, len(r)), r, "o", ms=4, color="C0",
                label="fresh seeds" if i == 0 else None)
        ax.plot([t["target"]], [r.mean()], "_", ms=16, mew=2, color="C3", label="mean" if i == 0 else None)
        ax.annotate(f"γ = {t['gamma']:.3g}\n{t['steps']} steps", (t["target"], r.max()), fontsize=7,
                    textcoords="offset points", xytext=(4, 6))
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xticks(targets)
    ax.set_xlabel(f"target width (of {top} hidden units)")
    ax.set_ylabel("width kept by export")
    ax.set_title("ms.constrain.suggest_decay: target vs reached", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def claims(results: dict, cfg: Config) -> list[Claim]:
    lin, cnn = results["linear"], results["cnn"]
    runs = cnn["seeds"]
    gc = lin["gamma_c"]
    norms = [float(np.linalg.norm(s)) for s in lin["s"]]
    above = [n for g, n in zip(lin["gammas"], norms, strict=True) if g > gc]
    below = [n for g, n in zip(lin["gammas"], norms, strict=True) if g < gc]
    ref, s = np.array(lin["reference_s"]), np.array(lin["s"])
    zeros_ref = (np.abs(ref) <= cfg.exact_tol).sum(1).tolist()
    zeros_got = (np.abs(s) <= cfg.exact_tol).sum(1).tolist()
    err = float(np.abs(ref - s).max())
    out = [
        Claim(f"above the predicted γ_c = {gc:.4g}: ‖Oᵀθ‖ ≤ {cfg.exact_tol:g} at every grid γ ({len(above)})",
              f"≤ {cfg.exact_tol:g}", max(above, default=None),
              bool(above) and max(above) <= cfg.exact_tol),
        Claim(f"below γ_c: ‖Oᵀθ‖ clearly non-zero (> {cfg.nonzero_tol:g}) at every grid γ ({len(below)})",
              f"> {cfg.nonzero_tol:g}", min(below, default=None), bool(below) and min(below) > cfg.nonzero_tol),
        Claim("per direction: exact zeros of Oᵀθ match the convex solution of L + γ‖(I−P)θ‖² + 2γ‖Oᵀθ‖₁",
              zeros_ref, zeros_got, zeros_ref == zeros_got),
        Claim("trained Oᵀθ = convex reference", f"max |Δs| ≤ {cfg.ref_tol:g}", err, err <= cfg.ref_tol),
        Claim("software identity (export verifies it and raises otherwise): the exported CNN has the same "
              "outputs as the constrained one", f"rel. error ≤ {cfg.export_rtol:g}",
              max(r["export_rel_error"] for r in runs), max(r["export_rel_error"] for r in runs) <= cfg.export_rtol),
        Claim("software identity (same outputs ⇒ same predictions): the exported CNN has the same test accuracy",
              [r["acc_dcs"] for r in runs], [r["acc_exported"] for r in runs],
              all(r["acc_exported"] == r["acc_dcs"] for r in runs)),
        finding("exported CNN is physically smaller (one init and minibatch order per seed)",
                f"≤ {cfg.max_param_ratio} × {cnn['params_before']}", [r["params_after"] for r in runs],
                [r["params_after"] / r["params_before"] for r in runs],
                statistic="parameters after export / before", better="lower", threshold=cfg.max_param_ratio,
                inclusive=True, contradict=None),
        finding("DCS accuracy close to the dense baseline of the same seed", f"≥ dense − {cfg.max_accuracy_drop}",
                {"dcs": [r["acc_dcs"] for r in runs], "dense": [r["acc_dense"] for r in runs]},
                [r["acc_dcs"] - r["acc_dense"] for r in runs],
                statistic="test accuracy, DCS − dense baseline", better="higher",
                threshold=-cfg.max_accuracy_drop, inclusive=True),
    ]
    for t in results.get("width", {}).get("targets", []):
        allowed = width_allowance(t["target"])
        out.append(finding(
            f"suggest_decay reaches the target width {t['target']} of {results['width']['hidden']} (MLP on digits, "
            f"γ = {t['gamma']:.3g}, {t['steps']} steps, calibrated on another seed)",
            f"{t['target']} ± {allowed:g}", t["reached"], [abs(r - t["target"]) for r in t["reached"]],
            statistic="|reached width − target| in units (fresh seed)", better="lower", threshold=allowed,
            inclusive=True))
    return out
