"""Loss of plasticity on task sequences, and the remedies (docs/theory.md#syre and #metrics).

A ReLU MLP is trained on a sequence of tasks built from scikit-learn's digits, one after another, with
SGD and no reset between tasks:

* ``random_labels``: every task is the same set of images with freshly drawn random labels, trained to
  memorise (Kumar et al.); the measure is the training accuracy reached at the end of each task;
* ``permuted``: every task applies a new fixed permutation to the 64 pixels (true labels); the measure
  is the online accuracy (each minibatch scored before the update on it), averaged over the task.

Methods, all with the same init, task sequence and minibatch order: plain SGD; L2 (coupled decay towards
0, torch ``weight_decay=λ`` i.e. γ = λ/2); L2-Init (decay towards the initial weights,
:func:`mirrorsym.constrain.remove.l2_init`); shrink-and-perturb
(:func:`~mirrorsym.constrain.remove.shrink_and_perturb`); continual backprop
(:class:`~mirrorsym.experiments.continual.ContinualBackprop`); and symmetry removal
(:func:`mirrorsym.remove_symmetries`: decay towards a fixed random θ₀, σ₀ = ``syre_sigma`` × init std).
The decay methods share λ and run in the library's optimizer mode (decoupled step after each SGD step;
for SGD this is the same objective as coupled decay).

Mechanism (docs/theory.md#common-symmetries and #syre): a ReLU unit whose pre-activation is negative on
every input gets no
gradient, so plain SGD never revives it: dead units accumulate. Decay towards a generic θ₀ pulls every
unit towards a random point where it is active on part of the data again; decay towards 0 (L2) keeps the
zero state absorbing (ReLU(0) = 0 has zero gradient) and only slows the drift. After each task the
structure metrics of :func:`~mirrorsym.experiments.continual.structure_metrics` are recorded on a fixed
probe set.

What the quick size shows (seed 0; plain's collapse and syre's hold were also checked on seeds 1–3):
on random labels plain SGD (lr 0.3) peaks near 0.9 training accuracy by task ~5, then falls to ≈ 0.2 as
dead units climb past 60 of 128, the feature effective rank drops from ~28 to ~5 and the weight norm
saturates; syre (σ₀ = init std), L2-Init and shrink-and-perturb stay near 0.8 with flat metrics,
continual backprop does best (≈ 1.0), L2 and syre with the library's default σ₀ = 0.01 × init std sit in
between (θ₀ ≈ 0 is close to plain decay towards the origin). Units do drift towards duplication where
the mirrors survive: under L2 and small-σ₀ syre the closest pair of hidden units approaches a permutation
surface (SymmetryMonitor's distance ‖u_i − u_j‖/√2 falls from ~0.4 to ~1e-3: dead units shrink towards
the same zero point), while it stays ~0.6 under syre with σ₀ = init std, plain SGD and L2-Init; within
20 tasks no pair gets inside the distinct-unit tolerance (√eps relative), so the distinct count stays
128 for every method. On permuted pixels the effect is mild at this size (plain's online accuracy sags
late); the claims there are that syre costs no accuracy and has fewer dead units and a smaller norm.

With ``--full --data-dir DIR`` and MNIST in ``DIR/MNIST/raw/`` (torchvision's layout), a third setting
``permuted_mnist`` runs the permuted-MNIST benchmark of the plasticity literature (Dohare et al. 2024: an
MLP with 3 hidden ReLU layers of 2000 units, SGD step size 0.003, a new pixel permutation per task),
scaled down through the ``mnist_*`` config fields (images per task, passes, number of tasks), on
``ctx.device``; the same methods, metrics and claims as ``permuted``. Without MNIST on disk it is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..constrain.remove import l2_init, remove_symmetries, shrink_and_perturb
from ..diagnose.monitor import SymmetryMonitor
from .base import Claim, Context, finding
from .continual import MLP, ContinualBackprop, structure_metrics
from .data import digits, has_mnist, mnist
from .plotting import figure, save

NAME = "plasticity"
TITLE = "Loss of plasticity on task sequences: plain SGD vs L2, L2-Init, shrink-and-perturb, CBP, syre"

METHODS = ("plain", "l2", "l2_init", "shrink_perturb", "cbp", "syre", "syre_small")
LABELS = {"plain": "plain SGD", "l2": "L2", "l2_init": "L2-Init", "shrink_perturb": "shrink & perturb",
          "cbp": "continual backprop", "syre": "syre, σ₀ = init std", "syre_small": "syre, σ₀ = 0.01 init std"}


@dataclass(frozen=True)
class Config:
    settings: tuple[str, ...] = ("random_labels", "permuted")
    methods: tuple[str, ...] = METHODS
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
    syre_sigma: float = 1.0  # σ₀ / init std for "syre"; "syre_small" uses the library default 0.01
    probe: int = 500
    acc_margin: float = 0.2
    last: int = 5  # accuracy claims average the last `last` tasks
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
    "tiny": Config(settings=("random_labels",), methods=("plain", "l2", "syre"), probe=300),
    "quick": Config(),
    "full": Config(width=256, depth=3, tasks=100, rl_n=1000, rl_epochs=50, perm_n=1500, perm_epochs=5,
                   probe=1797, mnist=True),
}


def make_tasks(setting: str, cfg: Config, X: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """[(X_task, y_task, probe_inputs)] for ``cfg.tasks`` tasks; same for every method (same generator)."""
    probe = X[torch.randperm(len(X), generator=gen)[: cfg.probe]]
    tasks = []
    if setting == "random_labels":
        idx = torch.randperm(len(X), generator=gen)[: cfg.rl_n]
        for _ in range(cfg.tasks):
            tasks.append((X[idx], torch.randint(0, 10, (cfg.rl_n,), generator=gen), probe))
    elif setting == "permuted":
        for _ in range(cfg.tasks):
            perm = torch.randperm(X.shape[1], generator=gen)
            idx = torch.randperm(len(X), generator=gen)[: cfg.perm_n]
            tasks.append((X[idx][:, perm], y[idx], probe[:, perm]))
    else:
        raise ValueError(f"plasticity: unknown setting {setting!r}; use 'random_labels' or 'permuted'")
    return tasks


def build(method: str, cfg: Config, d_in: int, lr: float, device: torch.device | str = "cpu"):
    """(model, optimizer, per-step hook or None) for one method; same init for every method."""
    model = MLP(d_in, cfg.width, cfg.depth, 10, torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=cfg.weight_decay if method == "l2" else 0.0)
    hook = None
    if method == "l2_init":
        l2_init(model, mode="optimizer", weight_decay=cfg.weight_decay, optimizer=opt)
    elif method == "shrink_perturb":
        shrink_and_perturb(model, weight_decay=cfg.weight_decay, noise=cfg.sp_noise, seed=cfg.seed + 2,
                           optimizer=opt)
    elif method in ("syre", "syre_small"):
        sigma = cfg.syre_sigma if method == "syre" else 0.01
        remove_symmetries(model, sigma=sigma, seed=cfg.seed + 3, mode="optimizer",
                          weight_decay=cfg.weight_decay, optimizer=opt)
    elif method == "cbp":
        hook = ContinualBackprop(model, cfg.cbp_rate, torch.Generator().manual_seed(cfg.seed + 4),
                                 maturity=cfg.cbp_maturity).step
    elif method not in ("plain", "l2"):
        raise ValueError(f"plasticity: unknown method {method!r}; known: {METHODS}")
    return model, opt, hook


def train_task(model, opt, hook, X, y, epochs: int, batch: int, gen: torch.Generator) -> tuple[float, float]:
    """SGD over ``epochs`` shuffled passes; returns (online accuracy, final training accuracy)."""
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        for s in range(0, len(X), batch):
            b = order[s : s + batch]
            logits, acts = model(X[b])
            correct += (logits.detach().argmax(1) == y[b]).sum()
            seen += len(b)
            loss = F.cross_entropy(logits, y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hook is not None:
                hook(acts)
    with torch.no_grad():
        final = (model(X)[0].argmax(1) == y).double().mean()
    return float(correct) / seen, float(final)


def mnist_config(cfg: Config) -> Config:
    """The config of the ``permuted_mnist`` setting: the ``permuted`` fields replaced by the ``mnist_*`` ones."""
    return replace(cfg, width=cfg.mnist_width, depth=cfg.mnist_depth, perm_lr=cfg.mnist_lr, batch=cfg.mnist_batch,
                   perm_n=cfg.mnist_n, perm_epochs=cfg.mnist_epochs, tasks=cfg.mnist_tasks, probe=cfg.mnist_probe)


def run_method(setting: str, method: str, cfg: Config, data_dir=None,
               device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """One method on one setting. ``permuted_mnist`` reads MNIST from ``data_dir`` and trains on ``device``
    (the digits settings stay on the CPU: their models are too small to gain from an accelerator)."""
    if setting == "permuted_mnist":
        (X, y), cfg, setting, dev = mnist(data_dir, train=True), mnist_config(cfg), "permuted", torch.device(device)
    else:
        (X, y), dev = digits(), torch.device("cpu")
    tasks = make_tasks(setting, cfg, X, y, torch.Generator().manual_seed(cfg.seed))
    rl = setting == "random_labels"
    model, opt, hook = build(method, cfg, X.shape[1], cfg.rl_lr if rl else cfg.perm_lr, dev)
    order_gen = torch.Generator().manual_seed(cfg.seed + 5)
    epochs = cfg.rl_epochs if rl else cfg.perm_epochs
    monitor = SymmetryMonitor(LogitsOnly(model), (tasks[0][2][:8].to(dev),), data=tasks[0][2].to(dev))
    rows: dict[str, list[float]] = {}
    for Xt, yt, probe in tasks:
        Xt, yt, probe = Xt.to(dev), yt.to(dev), probe.to(dev)
        online, final = train_task(model, opt, hook, Xt, yt, epochs, cfg.batch, order_gen)
        monitor.data = probe
        metrics = {"online_acc": online, "final_acc": final, **structure_metrics(model, probe),
                   **monitor_metrics(monitor)}
        for k, v in metrics.items():
            rows.setdefault(k, []).append(v)
    return rows


class LogitsOnly(nn.Module):
    """The MLP seen through its logits only (its hidden activations are extra outputs, and a function
    whose outputs include the units is, correctly, not permutation-symmetric)."""

    def __init__(self, model: MLP):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def monitor_metrics(monitor: SymmetryMonitor) -> dict[str, float]:
    """Record the monitor now; return the smallest distance to a permutation surface (the closest pair of
    hidden units, ‖u_i − u_j‖/√2, docs/theory.md#common-symmetries) and its distinct-unit count over
    permutation groups."""
    rep = monitor.record()
    groups = rep.to_pandas()
    perm = groups[groups["kind"] == "permutation"]
    if perm.empty:
        raise RuntimeError("plasticity: SymmetryMonitor found no permutation group in the MLP; the "
                           "surface-distance metric needs them (check mirrorsym.find_symmetries on it)")
    return {"perm_distance": float(perm["distance"].min()), "monitor_distinct": float(perm["distinct"].sum())}


def run(cfg: Config, ctx: Context) -> dict:
    settings = list(cfg.settings) + (["permuted_mnist"] if cfg.mnist and has_mnist(ctx.data_dir) else [])
    jobs = [(s, m) for s in settings for m in cfg.methods]
    out: dict = {s: {} for s in settings}
    for s, m in ctx.track(jobs, "plasticity: settings × methods"):
        out[s][m] = run_method(s, m, cfg, ctx.data_dir, ctx.device)
    units = {s: cfg.mnist_width * cfg.mnist_depth if s == "permuted_mnist" else cfg.width * cfg.depth
             for s in settings}
    return {"settings": settings, "methods": list(cfg.methods), "units": units, "results": out}


def _acc_key(setting: str) -> str:
    return "final_acc" if setting == "random_labels" else "online_acc"


def plot(results: dict, ctx: Context) -> list:
    paths = []
    panels = [("acc", "accuracy", "plasticity"), ("dead", "dead units (all hidden layers)", "dead ReLU units"),
              ("dormant", "dormant units (active on < 1 %)", "dormant units"),
              ("distinct", "distinct units (all hidden layers)", "independent units"),
              ("eff_rank", "effective rank, last hidden layer", "feature rank"),
              ("weight_norm", "weight norm ‖θ‖₂", "weight norm"),
              ("perm_distance", "min ‖u_i − u_j‖/√2 (SymmetryMonitor)", "distance to nearest permutation surface")]
    for s in results["settings"]:
        fig, axes = figure(4, 2, width=3.6, height=3.0)
        ax = axes.reshape(-1)
        for m in results["methods"]:
            r = results["results"][s][m]
            style = {"lw": 2.2} if m in ("plain", "syre") else {"lw": 1, "alpha": 0.8}
            for j, (key, label, title) in enumerate(panels):
                vals = r[_acc_key(s)] if key == "acc" else r[key]
                ax[j].plot(np.arange(1, len(vals) + 1), vals, "o-", ms=2.5, label=LABELS[m], **style)
                ax[j].set_xlabel("task")
                ax[j].set_ylabel(label)
                ax[j].set_title(title)
        ax[0].set_ylabel("final training accuracy" if s == "random_labels" else "online accuracy")
        ax[0].set_title(f"{s.replace('_', ' ')}: plasticity")
        ax[3].axhline(results["units"][s], color="k", ls=":", lw=1)
        handles, labels = ax[0].get_legend_handles_labels()
        ax[7].axis("off")
        ax[7].legend(handles, labels, loc="center")
        paths.append(save(fig, ctx.out_dir, f"plasticity_{s}"))
    return paths


def claims(results: dict, cfg: Config) -> list[Claim]:
    out = []
    for s in results["settings"]:
        r = results["results"][s]
        key = _acc_key(s)
        plain, syre = np.array(r["plain"][key]), np.array(r["syre"][key])
        n = cfg.last
        last_plain, last_syre = float(plain[-n:].mean()), float(syre[-n:].mean())
        if s == "random_labels":
            peak = float(plain.max())
            out.append(finding(f"{s}: plain SGD loses plasticity: best task − mean of last {n} tasks",
                               f"> {cfg.acc_margin}", {"best": peak, "last": last_plain}, [peak - last_plain],
                               statistic=f"plain SGD: best task accuracy − mean over the last {n} tasks",
                               better="higher", threshold=cfg.acc_margin, contradict=0.0))
            out.append(finding(f"{s}: syre keeps plasticity: mean accuracy over the last {n} tasks, syre − plain",
                               f"> {cfg.acc_margin}", {"syre": last_syre, "plain": last_plain},
                               [last_syre - last_plain],
                               statistic=f"mean accuracy over the last {n} tasks, syre − plain",
                               better="higher", threshold=cfg.acc_margin, contradict=0.0))
        else:  # no plasticity loss at this size: the claim is that removing symmetries costs nothing
            half = len(plain) // 2
            mp, ms_ = float(plain[half:].mean()), float(syre[half:].mean())
            out.append(finding(f"{s}: syre costs no accuracy: mean online accuracy over the second half of the "
                               "tasks, syre ≥ plain − 0.03", "syre ≥ plain − 0.03", {"syre": ms_, "plain": mp},
                               [ms_ - mp], statistic="mean online accuracy over the second half, syre − plain",
                               better="higher", threshold=-0.03, inclusive=True))
        metrics = [("dead", "dead units", 1), ("weight_norm", "weight norm", 1)]
        if s == "random_labels":
            metrics.append(("eff_rank", "feature effective rank", -1))
        for metric, word, sign in metrics:
            p_, s_ = float(np.mean(r["plain"][metric][-n:])), float(np.mean(r["syre"][metric][-n:]))
            order = "plain > syre" if sign > 0 else "syre > plain"
            out.append(finding(f"{s}: {word}, mean over the last {n} tasks, {order}", order,
                               {"plain": p_, "syre": s_}, [sign * (p_ - s_)],
                               statistic=f"{word}, mean over the last {n} tasks, "
                                         + ("plain − syre" if sign > 0 else "syre − plain"),
                               better="higher", threshold=0.0))
        if s == "random_labels" and "l2" in r:
            d_l2, d_syre = r["l2"]["perm_distance"][-1], r["syre"]["perm_distance"][-1]
            out.append(finding(f"{s}: decay towards 0 (L2) keeps the permutation mirrors and pulls the closest "
                               "pair of units onto a permutation surface; decay towards θ₀ (syre) does not: "
                               "distance after the last task, L2 < 0.1 × syre", "L2 < 0.1 × syre",
                               {"l2": d_l2, "syre": d_syre}, [d_l2 / d_syre if d_syre > 0 else None],
                               statistic="closest-pair permutation distance after the last task, L2 / syre",
                               better="lower", threshold=0.1, contradict=1.0))
    return out
