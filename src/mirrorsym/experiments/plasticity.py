"""Loss of plasticity on task sequences: does the fraction of units on symmetric surfaces track it, and does
removing the symmetries keep plasticity? (docs/theory.md#plasticity, #syre, #baselines, #duplicated-units)

A ReLU MLP (``width`` × ``depth``) is trained on a sequence of tasks built from scikit-learn's digits,
one after another, with minibatch SGD and no reset between tasks:

* ``random_labels``: every task is the same set of images with freshly drawn random labels, trained to
  memorise (Kumar et al.); trainability of a task is the training accuracy reached at its end;
* ``permuted``: every task applies a new fixed permutation to the 64 pixels (true labels); trainability
  of a task is its online accuracy (each minibatch scored before the update on it), averaged over the task.

Methods (same init, task sequence and minibatch order within a seed): plain SGD; L2 (coupled decay
towards 0, torch ``weight_decay=λ``, i.e. L + γ‖θ‖² with γ = λ/2); L2-Init (decay towards the initial
weights, :func:`mirrorsym.constrain.l2_init`); shrink-and-perturb
(:func:`mirrorsym.constrain.shrink_and_perturb`, decay towards 0 plus lr·noise·σ·ξ per step); continual
backprop (:class:`~mirrorsym.experiments.continual.ContinualBackprop`); and symmetry removal
(:func:`mirrorsym.remove_symmetries`, decay towards a fixed random θ₀ with σ₀ = sigma × init std):
``syre`` at the library default sigma = 0.01 and ``syre_large`` at ``syre_large_sigma`` (1 × init std),
with two more points of a σ₀ sweep (``syre_small`` 0.001, ``syre_mid`` 0.1); ``syre_large`` is close to
L2-Init (decay towards a random point of the init's size). The decay methods share λ and take the
library's optimizer-mode step (a decoupled step φ ← φ − lr·λ(φ − θ₀) after each SGD step; for SGD that is
the objective L + (λ/2)‖φ − θ₀‖²). The centres θ₀, the noise scales σ and the noise generators are the
library's own (each copy's θ₀ is ``remove_symmetries(copy, ...).offsets``).

Engine: ``ctx.sweep`` is not used: task switches and method-specific steps (decoupled decay, noise,
unit replacement) do not fit its grid of optimizer settings. The seeds go through ``ctx.map`` instead (one
job here; on Ray as many jobs as workers, each a consecutive range of seeds, with the same per-seed
results), and within a job every (method, seed) pair is one copy
of a :class:`~mirrorsym.experiments.continual.BatchedMLP` (seeds vectorised by hand: one batched matmul
per layer for all copies, each copy fed its own seed's minibatch) and the method steps are applied per
copy (:class:`Methods`; the tests check each against the library's optimizer hooks on single models).

Measured after each task, per copy:

* **surface fraction** = (dead + duplicated units) / hidden units, by the rules of
  docs/theory.md#duplicated-units (dead: ‖u_i‖ ≤ 10⁻³ max_j ‖u_j‖; duplicated: living units within 5 %
  of another), on the unit vectors u_i = [incoming weights, bias, outgoing weights], computed twice: on θ
  and on ψ = θ − θ₀, the displacement from the method's decay centre (θ₀ = 0 for plain, L2, shrink-and-
  perturb and CBP, so ψ = θ there; θ₀ = θ_init for L2-Init; the random offset for syre). A unit that
  collapsed onto the offset (ψ_i ≈ 0) is on a surface in ψ but is passed as alive by θ = θ₀ + ψ when θ₀
  is nonzero; for L2-Init ψ_i ≈ 0 means the unit sits at its init;
* activation-dead units (zero on every probe input), dormant units (active on < 1 % of the probe), the
  effective rank of the last hidden representation, the weight norm ‖θ‖, and the closest pair of units
  of a layer, min ‖u_i − u_j‖/√2 on θ (the distance to the nearest swap surface).

Trainability of a copy = its mean trainability over the last ``last`` tasks. Findings (one statistic per
seed, 95 % t-intervals over ``seeds`` seeds; the rules are fixed here, before the run):

* plain SGD loses plasticity (best task − mean of the last tasks > ``acc_margin``);
* (a) the mechanism: per seed, Spearman's ρ across the methods between the surface fraction (mean over
  the last tasks; on θ, and separately on ψ) and trainability; reproduced iff the interval of mean ρ lies
  below ``rho_threshold`` (−0.5), contradicted iff above 0;
* (b) syre at the library default σ₀ keeps plasticity: trainability syre − L2 > 0 and syre − plain > 0
  (contradicted iff < 0), and fewer surface units (on ψ) than L2;
* (c) the same for the larger σ₀ (``syre_large``), and syre_large − L2-Init (does a random centre add
  anything over the init as centre?);
* (d) which metric tracks trainability: the same per-seed ρ for activation-dead, dormant (predicted
  negative), effective rank (positive) and weight norm (negative), sign-adjusted, reproduced iff above 0.5;
* (random labels) decay towards 0 (L2) keeps the permutation mirrors and pulls the closest pair of units
  onto a swap surface, decay towards a large random θ₀ does not: closest-pair distance L2 / syre_large < 0.1.

The old syre-vs-plain comparisons are kept for both σ₀: activation-dead units and weight norm lower, and
(random labels) feature rank higher than plain SGD. One check: every copy of the batched model computes
what an ``MLP`` with its weights computes.

What the quick size shows (5 seeds; mean and 95 % interval of the per-seed statistic). Random labels:
plain SGD peaks near 0.9 and ends at 0.15 (loss 0.76 [0.68, 0.84]) while 54 % of its units are
activation-dead, yet none of its units is on a weight-space surface (its dead ReLUs are frozen at nonzero
weights: a ReLU unit has no sign-flip mirror, docs/theory.md#rescaling). L2 is the only method with many
surface units (11 % dead on θ, growing after task ~15); syre at the default σ₀ has 0 on θ but 2.4 % on ψ
(units collapsed onto θ₀, which θ = θ₀ + ψ hides). So (a) is not reproduced: −ρ = 0.35 [0.18, 0.52] on θ
and 0.28 [0.18, 0.37] on ψ, negative but below the 0.5 bar; (d) activation-dead (0.95 [0.86, 1.04]),
dormant (0.95) and effective rank (0.93) track trainability, the weight norm is contradicted (the best
method, CBP, has the largest norm). (b) syre at σ₀ = 0.01 beats plain SGD (+0.39 [0.31, 0.47]) but not
L2 (+0.10 [−0.20, 0.39], not reproduced); (c) syre at σ₀ = 1 × init std beats L2 (+0.34 [0.07, 0.61]) and
plain, and is indistinguishable from L2-Init (−0.04 [−0.13, 0.05]): what helps is decay towards a large
random point, as with L2-Init. L2 pulls the closest pair onto a swap surface (distance ratio to syre_large
0.001). Permuted pixels: plasticity loss is mild (plain: 0.12 [0.07, 0.17], not reproduced), no unit of
any method reaches a surface (ρ undefined, (a) not reproduced), activation-dead and dormant units still
track trainability; syre at σ₀ = 0.01 is within noise of L2 and plain, syre at σ₀ = 1 beats both
slightly (+0.06, +0.03) and is slightly worse than L2-Init (−0.02 [−0.04, −0.01], contradicted).
Quick run: ~50 s wall (31 s CPU) on a loaded 2-core machine.

With ``--full --data-dir DIR`` and MNIST in ``DIR/MNIST/raw/`` (torchvision's layout), a third setting
``permuted_mnist`` runs the permuted-MNIST benchmark of the plasticity literature (Dohare et al. 2024: an
MLP with 3 hidden ReLU layers of 2000 units, SGD step size 0.003, a new pixel permutation per task),
scaled down through the ``mnist_*`` config fields, on ``ctx.device``; same methods, metrics and findings as
``permuted``. Without MNIST on disk it is skipped. The digits settings run on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..constrain.remove import l2_init, remove_symmetries, shrink_and_perturb
from ..core.threads import single_threaded
from .base import Claim, Context, finding, tensor_sum
from .continual import MLP, BatchedCBP, BatchedMLP, batched_unit_matrices, spearman, surface_counts
from .data import digits, has_mnist, mnist
from .plotting import figure, save

NAME = "plasticity"
TITLE = ("Loss of plasticity: units on symmetric surfaces vs trainability; plain SGD, L2, L2-Init, "
         "shrink-and-perturb, CBP, syre (default and large σ₀)")

METHODS = ("plain", "l2", "l2_init", "shrink_perturb", "cbp", "syre", "syre_large", "syre_small", "syre_mid")
LABELS = {"plain": "plain SGD", "l2": "L2", "l2_init": "L2-Init", "shrink_perturb": "shrink & perturb",
          "cbp": "continual backprop", "syre": "syre, σ₀ = 0.01 × init std (library default)",
          "syre_large": "syre, larger σ₀ (syre_large_sigma × init std)",
          "syre_small": "syre, σ₀ = 0.001 × init std (σ₀ sweep)", "syre_mid": "syre, σ₀ = 0.1 × init std (σ₀ sweep)"}
#: the σ₀ sweep: syre method → its σ₀ / init std field of Config, in increasing σ₀
SIGMA_SWEEP = (("syre_small", "syre_small_sigma"), ("syre", "syre_sigma"), ("syre_mid", "syre_mid_sigma"),
               ("syre_large", "syre_large_sigma"))
#: per-copy metrics, each a list over tasks
METRICS = ("final_acc", "online_acc", "surface_theta", "surface_psi", "dead_theta", "dup_theta", "dead_psi",
           "dup_psi", "distinct", "dead", "act_dead", "dormant", "eff_rank", "weight_norm", "psi_norm",
           "perm_distance")
#: (d): candidate metrics and the sign of their predicted correlation with trainability
TRACKERS = (("surface_theta", -1, "fraction of units on symmetric surfaces (θ)"),
            ("surface_psi", -1, "fraction of units on symmetric surfaces (ψ = θ − θ₀)"),
            ("act_dead", -1, "fraction of activation-dead units"),
            ("dormant", -1, "fraction of dormant units (active on < 1 %)"),
            ("eff_rank", 1, "effective rank of the last hidden representation"),
            ("weight_norm", -1, "weight norm ‖θ‖"))


@dataclass(frozen=True)
class Config:
    settings: tuple[str, ...] = ("random_labels", "permuted")
    methods: tuple[str, ...] = METHODS
    seeds: int = 5
    width: int = 64
    depth: int = 2
    batch: int = 32
    tasks: int = 20
    # random labels: n images, epochs per task, SGD lr
    rl_n: int = 128
    rl_epochs: int = 60
    rl_lr: float = 0.3
    # permuted pixels: n training images per task, epochs per task, SGD lr
    perm_n: int = 600
    perm_epochs: int = 3
    perm_lr: float = 0.3
    weight_decay: float = 5e-3  # torch λ (γ = λ/2) for L2, L2-Init, shrink-and-perturb, syre
    sp_noise: float = 0.1  # shrink-and-perturb noise, in units of lr × init std
    cbp_rate: float = 1e-3
    cbp_maturity: int = 50
    syre_sigma: float = 0.01  # "syre": the library default σ₀ / init std
    syre_large_sigma: float = 1.0  # "syre_large": a larger σ₀ / init std (L2-Init-like)
    syre_small_sigma: float = 0.001  # σ₀ sweep points beside the default and the large one
    syre_mid_sigma: float = 0.1
    probe: int = 500
    acc_margin: float = 0.2
    rho_threshold: float = -0.5  # (a)/(d): mean Spearman ρ must lie below this (sign-adjusted: above −this)
    last: int = 5  # trainability and end-of-run metrics average the last `last` tasks
    seed: int = 0
    # permuted MNIST (only with ctx.data_dir holding MNIST): the literature's 3×2000 MLP and SGD lr 0.003;
    # n training images per task (of 60 000), passes per task, number of tasks, probe images
    mnist: bool = False
    mnist_width: int = 2000
    mnist_depth: int = 3
    mnist_lr: float = 0.003
    mnist_batch: int = 16
    mnist_n: int = 10000
    mnist_epochs: int = 1
    mnist_tasks: int = 50
    mnist_probe: int = 2000


CONFIGS = {
    "tiny": Config(settings=("random_labels",), seeds=3, width=24, tasks=4, rl_n=64, rl_epochs=12, probe=200,
                   last=2, cbp_maturity=10, cbp_rate=1e-2),
    "quick": Config(),
    "full": Config(seeds=10, width=256, depth=3, tasks=100, rl_n=1000, rl_epochs=50, perm_n=1500, perm_epochs=5,
                   probe=1797, mnist=True),
}


def _seed(cfg: Config, s: int, offset: int) -> int:
    """The generator seed of seed index ``s`` for one purpose (``offset``): init 1, θ₀ 3, noise 2, CBP 4,
    tasks 0, minibatch order 5."""
    return 1000 * (cfg.seed + s) + offset


class Methods:
    """The copies (method m, seed s) → k = m·S + s of a :class:`BatchedMLP`, and their update rules.

    :meth:`step` after ``loss.backward()`` applies, per copy and parameter tensor p with gradient g:
    coupled L2 ``p ← p − lr(g + λp)`` (torch SGD ``weight_decay=λ``), else ``p ← p − lr·g``; then the
    decoupled decay ``p ← p − lr·λ(p − θ₀)`` (L2-Init, syre, shrink-and-perturb with θ₀ = 0); then the
    shrink-and-perturb noise ``p ← p + lr·noise·σ·ξ`` (σ the tensor's init scale, ξ ~ N(0, I) from the
    copy's generator, drawn tensor by tensor as the library does); then continual backprop's unit
    replacement (:class:`BatchedCBP`) on the CBP copies."""

    def __init__(self, cfg: Config, methods: tuple[str, ...], d_in: int, d_out: int, device="cpu"):
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"plasticity: unknown methods {unknown}; known: {METHODS}")
        S, lam = cfg.seeds, cfg.weight_decay
        self.methods, self.S = tuple(methods), S
        self.copies = [(m, s) for m in methods for s in range(S)]
        self.seed_of = torch.tensor([s for _, s in self.copies], dtype=torch.int64, device=device)
        inits = [MLP(d_in, cfg.width, cfg.depth, d_out, torch.Generator().manual_seed(_seed(cfg, s, 1)))
                 for s in range(S)]
        self.net = BatchedMLP.stack([inits[s] for _, s in self.copies], device)
        params = self.net.params()
        names = [n for n, _ in inits[0].named_parameters()]
        K = len(self.copies)
        self.coupled = torch.zeros(K, dtype=params[0].dtype, device=device)
        self.decoupled = torch.zeros_like(self.coupled)
        self.centres = [torch.zeros_like(p.detach()) for p in params]
        self.noise: list[tuple[int, torch.Generator, list[float]]] = []  # (copy, generator, σ per tensor)
        cbp_copies, cbp_gens = [], []
        for k, (m, s) in enumerate(self.copies):
            model = MLP(d_in, cfg.width, cfg.depth, d_out, torch.Generator().manual_seed(_seed(cfg, s, 1)))
            handle = None
            if m == "l2":
                self.coupled[k] = lam
            elif m == "l2_init":
                handle = l2_init(model, mode="optimizer", weight_decay=lam)
            elif m in dict(SIGMA_SWEEP):
                sigma = getattr(cfg, dict(SIGMA_SWEEP)[m])
                handle = remove_symmetries(model, sigma=sigma, seed=_seed(cfg, s, 3), mode="optimizer",
                                           weight_decay=lam)
            elif m == "shrink_perturb":
                handle = shrink_and_perturb(model, weight_decay=lam, noise=cfg.sp_noise, seed=_seed(cfg, s, 2))
                self.noise.append((k, torch.Generator(device=device).manual_seed(_seed(cfg, s, 2)),
                                   [cfg.sp_noise * handle.sigmas[n] for n in names]))
            elif m == "cbp":
                cbp_copies.append(k)
                cbp_gens.append(torch.Generator().manual_seed(_seed(cfg, s, 4)))
            if handle is not None:
                self.decoupled[k] = lam
                for c, n in zip(self.centres, names, strict=True):
                    c[k] = handle.offsets[n].to(device)
        self.cbp = BatchedCBP(self.net, cbp_copies, cfg.cbp_rate, cbp_gens, maturity=cfg.cbp_maturity)
        self._any_coupled, self._any_decoupled = bool(self.coupled.any()), bool(self.decoupled.any())

    def index(self, method: str) -> list[int]:
        return [k for k, (m, _) in enumerate(self.copies) if m == method]

    @torch.no_grad()
    def step(self, lr: float, acts: list[torch.Tensor] | None = None) -> None:
        for p, c in zip(self.net.params(), self.centres, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            if self._any_coupled:
                p.mul_(1 - lr * self.coupled.view(shape))
            grad = p.grad
            if grad is None:
                raise RuntimeError("plasticity: Methods.step needs the gradients of loss.backward()")
            p.add_(grad, alpha=-lr)
            if self._any_decoupled:
                p.lerp_(c, lr * self.decoupled.view(shape))
            p.grad = None
        for k, gen, sigmas in self.noise:
            for p, sig in zip(self.net.params(), sigmas, strict=True):
                xi = torch.randn(p.shape[1:], generator=gen, device=p.device, dtype=p.dtype)
                p[k].add_(xi, alpha=lr * sig)
        if acts is not None:
            self.cbp.step(acts)

    @torch.no_grad()
    def psi(self) -> list[torch.Tensor]:
        """ψ = θ − θ₀ per parameter tensor (θ₀ = 0 for the methods without an offset)."""
        return [p.detach() - c for p, c in zip(self.net.params(), self.centres, strict=True)]


class Tasks:
    """The task sequence of every seed (one generator per seed, so every method of a seed sees the same
    tasks): ``task(t)`` → (X (S, n, d), y (S, n), probe (S, P, d)), drawn in order t = 0, 1, …"""

    def __init__(self, setting: str, cfg: Config, X: torch.Tensor, y: torch.Tensor):
        if setting not in ("random_labels", "permuted"):
            raise ValueError(f"plasticity: unknown setting {setting!r}; use 'random_labels' or 'permuted'")
        self.setting, self.cfg, self.X, self.y = setting, cfg, X, y
        self.gens = [torch.Generator().manual_seed(_seed(cfg, s, 0)) for s in range(cfg.seeds)]
        self.probes = [X[torch.randperm(len(X), generator=g)[: cfg.probe]] for g in self.gens]
        if setting == "random_labels":
            self.idx = [torch.randperm(len(X), generator=g)[: cfg.rl_n] for g in self.gens]

    def task(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Xs, ys, ps = [], [], []
        for s, g in enumerate(self.gens):
            if self.setting == "random_labels":
                Xs.append(self.X[self.idx[s]])
                ys.append(torch.randint(0, 10, (self.cfg.rl_n,), generator=g))
                ps.append(self.probes[s])
            else:
                perm = torch.randperm(self.X.shape[1], generator=g)
                idx = torch.randperm(len(self.X), generator=g)[: self.cfg.perm_n]
                Xs.append(self.X[idx][:, perm])
                ys.append(self.y[idx])
                ps.append(self.probes[s][:, perm])
        return torch.stack(Xs), torch.stack(ys), torch.stack(ps)


def mnist_config(cfg: Config) -> Config:
    """The config of the ``permuted_mnist`` setting: the ``permuted`` fields replaced by the ``mnist_*`` ones."""
    return replace(cfg, width=cfg.mnist_width, depth=cfg.mnist_depth, perm_lr=cfg.mnist_lr, batch=cfg.mnist_batch,
                   perm_n=cfg.mnist_n, perm_epochs=cfg.mnist_epochs, tasks=cfg.mnist_tasks, probe=cfg.mnist_probe)


def run_setting(setting: str, cfg: Config, data_dir=None, device: torch.device | str = "cpu", track=None) -> dict:
    """Every method × seed on one setting, batched. Returns {"per_seed": {method: {metric: [S][T]}},
    "batched_vs_mlp": max |logit difference| of the batched copies against MLPs with their weights,
    "cbp_replaced": units replaced per CBP copy}. ``permuted_mnist`` reads MNIST from ``data_dir`` and
    trains on ``device``; the digits settings stay on the CPU."""
    if setting == "permuted_mnist":
        (X, y), cfg, setting, dev = mnist(data_dir, train=True), mnist_config(cfg), "permuted", torch.device(device)
    else:
        (X, y), dev = digits(), torch.device("cpu")
    rl = setting == "random_labels"
    lr, epochs = (cfg.rl_lr, cfg.rl_epochs) if rl else (cfg.perm_lr, cfg.perm_epochs)
    tasks = Tasks(setting, cfg, X, y)
    methods = Methods(cfg, cfg.methods, X.shape[1], 10, dev)
    net, seed_of, S = methods.net, methods.seed_of, cfg.seeds
    K = len(methods.copies)
    order_gens = [torch.Generator().manual_seed(_seed(cfg, s, 5)) for s in range(S)]
    rows: dict[str, dict[str, list[list[float]]]] = {m: {k: [[] for _ in range(S)] for k in METRICS}
                                                     for m in cfg.methods}
    rs = torch.arange(S, device=dev)[:, None]
    for t in (track or (lambda it, _d: it))(range(cfg.tasks), f"plasticity: {setting} tasks"):
        Xt, yt, probe = (a.to(dev) for a in tasks.task(t))
        n = Xt.shape[1]
        correct = torch.zeros(K, dtype=torch.int64, device=dev)
        for _ in range(epochs):
            order = torch.stack([torch.randperm(n, generator=g) for g in order_gens]).to(dev)
            for st in range(0, n, cfg.batch):
                b = order[:, st : st + cfg.batch]
                xb, yb = Xt[rs, b][seed_of], yt[rs, b][seed_of]
                logits, acts = net(xb)
                correct += (logits.detach().argmax(2) == yb).sum(1)
                loss = F.cross_entropy(logits.reshape(-1, 10), yb.reshape(-1), reduction="none").view(K, -1)
                loss.mean(1).sum().backward()
                methods.step(lr, acts)
        online = (correct.double() / (epochs * n)).tolist()
        for k, v in measure(methods, Xt, yt, probe, cfg.depth).items():
            for j, (m, s) in enumerate(methods.copies):
                rows[m][k][s].append(v[j])
        for j, (m, s) in enumerate(methods.copies):
            rows[m]["online_acc"][s].append(online[j])
    with torch.no_grad():
        logits = net(probe[seed_of].to(dev))[0].double().cpu()
        probes = probe.double().cpu()
        gap = max(float((net.copy(k)(probes[s])[0] - logits[k]).abs().max()) for k, (_, s) in enumerate(methods.copies))
    return {"per_seed": rows, "batched_vs_mlp": gap, "cbp_replaced": methods.cbp.replaced}


@torch.no_grad()
def measure(methods: Methods, Xt: torch.Tensor, yt: torch.Tensor, probe: torch.Tensor, depth: int) -> dict:
    """The per-copy metrics after a task (lists of length K); see the module docstring."""
    net, seed_of = methods.net, methods.seed_of
    final = (net(Xt[seed_of])[0].argmax(2) == yt[seed_of]).double().mean(1).tolist()
    _, acts = net(probe[seed_of])
    units = sum(a.shape[2] for a in acts)
    active = [(a > 0).double().mean(1) for a in acts]  # (K, H): fraction of probe inputs each unit fires on
    act_dead = (tensor_sum((a == 0).sum(1) for a in active).double() / units).tolist()
    dormant = (tensor_sum((a < 0.01).sum(1) for a in active).double() / units).tolist()
    eff_rank = batched_eff_rank(acts[-1]).tolist()
    theta = [p.detach() for p in net.params()]
    psi = methods.psi()
    weight_norm = torch.sqrt(tensor_sum((p.double() ** 2).flatten(1).sum(1) for p in theta)).tolist()
    psi_norm = torch.sqrt(tensor_sum((p.double() ** 2).flatten(1).sum(1) for p in psi)).tolist()
    out = {"final_acc": final, "act_dead": act_dead, "dormant": dormant, "eff_rank": eff_rank,
           "weight_norm": weight_norm, "psi_norm": psi_norm,
           "dead": [round(v * units) for v in act_dead]}
    for name, params in (("theta", theta), ("psi", psi)):
        per_layer = [surface_counts(batched_unit_matrices(params, l)) for l in range(depth)]
        # int64 counts per copy, summed over the layers
        dead: np.ndarray = np.sum([c[0] for c in per_layer], axis=0)
        dup: np.ndarray = np.sum([c[1] for c in per_layer], axis=0)
        out[f"dead_{name}"] = (dead / units).tolist()
        out[f"dup_{name}"] = (dup / units).tolist()
        out[f"surface_{name}"] = ((dead + dup) / units).tolist()
        if name == "theta":
            out["distinct"] = (units - dead - dup).astype(float).tolist()
            out["perm_distance"] = np.min([c[2] for c in per_layer], axis=0).tolist()
    return out


def batched_eff_rank(features: torch.Tensor) -> torch.Tensor:
    """Effective rank (RankMe, docs/theory.md#ranks) of each (N, D) representation of a (K, N, D) batch:
    exp(H(σ/‖σ‖₁)), 0 for an all-zero matrix (as :func:`mirrorsym.diagnose.metrics.representation_eff_rank`)."""
    sv = torch.linalg.svdvals(features.double())
    total = sv.sum(1, keepdim=True)
    p = sv / torch.where(total > 0, total, torch.ones_like(total))
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return torch.where(total[:, 0] > 0, torch.exp(-plogp.sum(1)), torch.zeros_like(total[:, 0]))


def run(cfg: Config, ctx: Context) -> dict:
    settings = list(cfg.settings) + (["permuted_mnist"] if cfg.mnist and has_mnist(ctx.data_dir) else [])
    out, checks = {}, {}
    for s in settings:
        parts = ctx.map(run_seeds, [(s, cfg, seeds, ctx.data_dir, ctx.device, ctx.track)
                                    for seeds in ctx.split(cfg.seeds)],
                        f"plasticity-{s}", runs=cfg.seeds * len(cfg.methods))
        out[s] = {m: {k: [row for p in parts for row in p["per_seed"][m][k]] for k in METRICS} for m in cfg.methods}
        checks[s] = {"batched_vs_mlp": max(p["batched_vs_mlp"] for p in parts),
                     "cbp_replaced": [r for p in parts for r in p["cbp_replaced"]]}
    means = {s: {m: {k: np.nanmean(np.asarray(v, dtype=float), axis=0).tolist() for k, v in rows.items()}
                 for m, rows in out[s].items()} for s in settings}
    units = {s: cfg.mnist_width * cfg.mnist_depth if s == "permuted_mnist" else cfg.width * cfg.depth
             for s in settings}
    return {"settings": settings, "methods": list(cfg.methods), "seeds": cfg.seeds, "last": cfg.last, "units": units,
            "results": means, "per_seed": out, "checks": checks}


def run_seeds(setting: str, cfg: Config, seeds: range, data_dir, device, track=None) -> dict:
    """:func:`run_setting` for the seeds ``seeds`` (consecutive indices) only: one job of ``ctx.map``.
    Every generator of seed s is keyed by ``cfg.seed + s`` (:func:`_seed`), so the seeds of a shifted config
    are the same seeds, and each copy of a batched run is computed on its own: any cut of the seeds into
    jobs gives the very same per-seed rows."""
    cpu = setting != "permuted_mnist" or torch.device(device).type == "cpu"
    with single_threaded() if cpu else contextlib.nullcontext():  # many tiny batched ops
        return run_setting(setting, replace(cfg, seed=cfg.seed + seeds.start, seeds=len(seeds)), data_dir, device,
                           track)


def _acc_key(setting: str) -> str:
    return "final_acc" if setting == "random_labels" else "online_acc"


def trainability(results: dict, setting: str, method: str, last: int) -> np.ndarray:
    """Per seed: mean trainability (final training accuracy / online accuracy) over the last ``last`` tasks."""
    a = np.asarray(results["per_seed"][setting][method][_acc_key(setting)], dtype=float)
    return a[:, -last:].mean(1)


def end_metric(results: dict, setting: str, method: str, key: str, last: int) -> np.ndarray:
    """Per seed: a metric averaged over the last ``last`` tasks."""
    return np.asarray(results["per_seed"][setting][method][key], dtype=float)[:, -last:].mean(1)


def rho_per_seed(results: dict, setting: str, key: str, last: int) -> list[float | None]:
    """Per seed: Spearman's ρ across the methods between ``key`` (mean over the last tasks) and trainability;
    None where it is undefined (a constant metric or constant trainability)."""
    ms_ = results["methods"]
    tr = np.stack([trainability(results, setting, m, last) for m in ms_])  # (M, S)
    mv = np.stack([end_metric(results, setting, m, key, last) for m in ms_])
    out = []
    for s in range(tr.shape[1]):
        r = spearman(mv[:, s], tr[:, s])
        out.append(None if not math.isfinite(r) else r)
    return out


def plot(results: dict, ctx: Context) -> list:
    paths = []
    panels = [("acc", "trainability", "plasticity"),
              ("surface_theta", "(dead + duplicated) / units, on θ", "units on symmetric surfaces (θ)"),
              ("surface_psi", "(dead + duplicated) / units, on ψ = θ − θ₀", "units on symmetric surfaces (ψ)"),
              ("act_dead", "fraction dead on the probe", "activation-dead units"),
              ("eff_rank", "effective rank, last hidden layer", "feature rank"),
              ("weight_norm", "‖θ‖₂", "weight norm"),
              ("perm_distance", "min ‖u_i − u_j‖/√2 (θ)", "distance to nearest swap surface")]
    last = results["last"]
    for s in results["settings"]:
        fig, axes = figure(3, 3, width=4.0, height=3.1)
        ax = axes.reshape(-1)
        for i, m in enumerate(results["methods"]):
            r = results["results"][s][m]
            style = {"lw": 2.0} if m in ("plain", "l2", "syre", "syre_large") else {"lw": 1, "alpha": 0.8}
            for j, (key, label, title) in enumerate(panels):
                vals = r[_acc_key(s)] if key == "acc" else r[key]
                ax[j].plot(np.arange(1, len(vals) + 1), vals, "o-", ms=2.5, color=f"C{i}", label=LABELS[m], **style)
                ax[j].set_xlabel("task")
                ax[j].set_ylabel(label)
                ax[j].set_title(title)
            tr = trainability(results, s, m, last)
            for key, marker in (("surface_theta", "o"), ("surface_psi", "x")):
                ax[7].scatter(end_metric(results, s, m, key, last), tr, marker=marker, color=f"C{i}", s=18)
        ax[0].set_ylabel("final training accuracy" if s == "random_labels" else "online accuracy")
        ax[0].set_title(f"{s.replace('_', ' ')}: plasticity (mean over {results['seeds']} seeds)")
        ax[6].set_yscale("log")
        ax[7].set_xlabel(f"surface fraction, last {last} tasks (o: θ, x: ψ)")
        ax[7].set_ylabel(f"trainability, last {last} tasks")
        ax[7].set_title("per method × seed")
        handles, labels = ax[0].get_legend_handles_labels()
        ax[8].axis("off")
        ax[8].legend(handles, labels, loc="center", fontsize=8)
        paths.append(save(fig, ctx.out_dir, f"plasticity_{s}"))
    return paths


def claims(results: dict, cfg: Config) -> list[Claim]:
    out = []
    n, methods = cfg.last, results["methods"]
    for s in results["settings"]:
        chk = results["checks"][s]
        out.append(Claim(f"{s}: every batched copy computes what an MLP with its weights computes "
                         "(max |logit difference| on the probe, float32 vs float64)", "< 1e-4",
                         chk["batched_vs_mlp"], chk["batched_vs_mlp"] < 1e-4))

        def tr(m, s=s):
            return trainability(results, s, m, n)

        def mean_of(m, key, s=s):
            return end_metric(results, s, m, key, n)

        if "plain" in methods:
            acc = np.asarray(results["per_seed"][s]["plain"][_acc_key(s)], dtype=float)
            drop = acc.max(1) - acc[:, -n:].mean(1)
            out.append(finding(f"{s}: plain SGD loses plasticity: best task − mean of the last {n} tasks",
                               f"> {cfg.acc_margin}", {"best": acc.max(1).mean(), "last": acc[:, -n:].mean()},
                               drop, statistic=f"plain SGD: best task's trainability − mean over the last {n} tasks",
                               better="higher", threshold=cfg.acc_margin, contradict=0.0))
        if len(methods) >= 3:
            for key, sign, word in TRACKERS:
                rho = rho_per_seed(results, s, key, n)
                e = [None if r is None else sign * r for r in rho]
                tag = "(a) mechanism" if key.startswith("surface") else "(d) which metric tracks trainability"
                pred = "ρ < 0" if sign < 0 else "ρ > 0"
                out.append(finding(
                    f"{s}: {tag}: across methods, {word} vs trainability (mean of the last {n} tasks): {pred}",
                    f"{'−' if sign < 0 else ''}ρ > {-cfg.rho_threshold:g}",
                    {"rho_per_seed": rho, "by_method": {m: float(np.mean(mean_of(m, key))) for m in methods},
                     "trainability": {m: float(np.mean(tr(m))) for m in methods}},
                    e, statistic=f"{'−' if sign < 0 else ''}Spearman ρ across the {len(methods)} methods between "
                    f"{word} and trainability, per seed", better="higher", threshold=-cfg.rho_threshold,
                    contradict=0.0))
        pairs = [("syre", "l2", "(b)"), ("syre", "plain", "(b)"), ("syre_large", "l2", "(c)"),
                 ("syre_large", "plain", "(c)"), ("syre_large", "l2_init", "(c)")]
        for a, b, tag in pairs:
            if a in methods and b in methods:
                out.append(finding(f"{s}: {tag} {LABELS[a]} keeps plasticity vs {LABELS[b]}: trainability "
                                   f"(mean of the last {n} tasks), {a} − {b} > 0", "> 0",
                                   {a: float(tr(a).mean()), b: float(tr(b).mean())}, tr(a) - tr(b),
                                   statistic=f"trainability over the last {n} tasks, {a} − {b}",
                                   better="higher", threshold=0.0))
        for a, tag in (("syre", "(b)"), ("syre_large", "(c)")):
            if a in methods and "l2" in methods:
                pa, pl = mean_of(a, "surface_psi"), mean_of("l2", "surface_psi")
                out.append(finding(f"{s}: {tag} {LABELS[a]} has fewer units on symmetric surfaces than L2 "
                                   f"(on ψ = θ − θ₀, mean of the last {n} tasks)", "l2 − syre > 0",
                                   {a: float(pa.mean()), "l2": float(pl.mean())}, pl - pa,
                                   statistic=f"surface fraction on ψ, last {n} tasks, l2 − {a}",
                                   better="higher", threshold=0.0))
        metrics = [("act_dead", "activation-dead units", 1), ("weight_norm", "weight norm", 1)]
        if s == "random_labels":
            metrics.append(("eff_rank", "feature effective rank", -1))
        for a, tag in (("syre", "(b)"), ("syre_large", "(c)")):
            if a not in methods or "plain" not in methods:
                continue
            for key, word, sign in metrics:
                p_, a_ = mean_of("plain", key), mean_of(a, key)
                order = f"plain > {a}" if sign > 0 else f"{a} > plain"
                out.append(finding(f"{s}: {tag} {word}, mean over the last {n} tasks, {order}", order,
                                   {"plain": float(p_.mean()), a: float(a_.mean())}, sign * (p_ - a_),
                                   statistic=f"{word}, mean over the last {n} tasks, "
                                   + (f"plain − {a}" if sign > 0 else f"{a} − plain"),
                                   better="higher", threshold=0.0))
        if s == "random_labels" and "l2" in methods and "syre_large" in methods:
            d_l2 = np.asarray(results["per_seed"][s]["l2"]["perm_distance"], dtype=float)[:, -1]
            d_sy = np.asarray(results["per_seed"][s]["syre_large"]["perm_distance"], dtype=float)[:, -1]
            extra = ({"syre": float(np.asarray(results["per_seed"][s]["syre"]["perm_distance"])[:, -1].mean())}
                     if "syre" in methods else {})
            out.append(finding(f"{s}: decay towards 0 (L2) keeps the permutation mirrors and pulls the closest pair "
                               "of units onto a swap surface; decay towards a large random θ₀ (syre_large) does not: "
                               "distance after the last task, L2 < 0.1 × syre_large", "L2 < 0.1 × syre_large",
                               {"l2": float(d_l2.mean()), "syre_large": float(d_sy.mean()), **extra},
                               [a / b if b > 0 else None for a, b in zip(d_l2, d_sy, strict=True)],
                               statistic="closest-pair swap-surface distance on θ after the last task, L2 / syre_large",
                               better="lower", threshold=0.1, contradict=1.0))
        sweep = [(m, getattr(cfg, f)) for m, f in SIGMA_SWEEP if m in methods]
        if len(sweep) >= 3:
            trs = np.stack([tr(m) for m, _ in sweep])  # (σ₀ values, seeds)
            rho = [spearman(np.arange(len(sweep), dtype=float), trs[:, k]) for k in range(trs.shape[1])]
            out.append(finding(
                f"{s}: σ₀ sweep: trainability rises with syre's offset scale σ₀ "
                f"({', '.join(f'{v:g}' for _, v in sweep)} × init std)", f"ρ > {-cfg.rho_threshold:g}",
                {"trainability": {f"{v:g}": float(tr(m).mean()) for m, v in sweep},
                 "surface_psi": {f"{v:g}": float(mean_of(m, "surface_psi").mean()) for m, v in sweep}},
                [r if r is not None and math.isfinite(r) else None for r in rho],
                statistic="Spearman ρ between σ₀ and trainability over the sweep, per seed", better="higher",
                threshold=-cfg.rho_threshold, contradict=0.0))
    return out
