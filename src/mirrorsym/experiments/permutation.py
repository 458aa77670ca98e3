"""Permutation symmetry ⇒ identical or dead units under weight decay (the paper's Fig. 1, right), on
scikit-learn's 8×8 digits; symmetry removal as the control.

Swapping two channels of a layer (incoming filters, bias, outgoing weights) is a mirror whose surface is
"the two channels are identical" (docs/theory.md#permutation); ReLU's positive rescaling adds the surfaces
"this channel is zero" (dead). Weight decay γ‖θ‖² (torch coupled λ = 2γ) makes such surfaces attractive. A
small ReLU CNN is trained with SGD + momentum on the sweep engine (``ctx.sweep``: the CNN has no BatchNorm
or dropout), ``seeds`` seeds per method: no decay ("plain"), decay ("decay"), and decay towards a fixed
random offset θ₀ with ``ms.remove_symmetries(model, sigma=σ₀)`` (syre, docs/theory.md#syre: φ = θ₀ + ψ, the
optimizer's decay acts on ψ, so it pulls φ towards θ₀). The control is syre at the library default
σ₀ = 0.01 (× each tensor's init scale); a sweep over σ₀ ∈ ``syre_sigmas`` shows how the result depends on it.

Counting (per run; dead and duplicated are reported separately, never summed into one claim):

* on θ (the trained weights φ = θ₀ + ψ for syre): ``ms.diagnose`` per permutation group (dead ≤ 1e-3 of the
  layer's largest channel, duplicated = living channels within 5 % relative distance of another, on
  rescale-balanced canonical units: its documented defaults);
* on the learned part ψ = φ − θ₀ (syre only): the same diagnose on a copy of the CNN holding ψ. A channel
  dead on ψ *sits on θ₀*: the decay put it exactly where the offset is, the syre analogue of a dead unit
  (a tiny θ₀ passes the θ count without changing the fact);
* functionally, on the ReLU outputs over the whole data set: dead = never above 1e-3 of the layer's
  largest activation; duplicated = two living channels whose activation maps, each scaled to unit norm
  (ReLU is positively homogeneous), are within 5 % relative distance (``count_units``).

Each run's final parameters come back from the sweep engine (``keep_params``). Every finding has one value
per seed and a rule fixed here.

Configuration (chosen before its verdicts were seen). An earlier (4, 8)-channel, 400-step, λ = 0.01
version left no channel dead or duplicated under decay, so the control had nothing to prevent and the
decay findings were contradicted: decay had not acted. This version takes the setting in which an earlier
version of this experiment saw dead and duplicated channels at reasonable accuracy, torch λ = 0.03 with
(8, 16) channels, and trains long enough for decay to act: with heavy-ball momentum β the decay alone
shrinks a channel that the loss does not hold up by a factor e^{−ηλ/(1−β)} per step, so by 10⁻³ (the
dead threshold) in ln(10³)(1 − β)/(ηλ) = 6.9 · 0.1/(0.05 · 0.03) ≈ 460 steps; ``steps`` = 1000 is about
twice that. Precondition, stated as a finding: the decay model still trains (training accuracy above
``min_accuracy`` = 0.9 on every seed's interval; chance is 0.1); without it dead channels would only say
that decay overwhelmed the loss.

What came out (quick, ≈ 35 s): the precondition is contradicted. With λ = 0.03 two of five decay seeds
end at chance (training accuracy 0.10: decay took the whole network to the trivial solution) and the
others at 0.57–0.81 (mean 0.45, 95 % interval [0.04, 0.86]; no decay: 0.98–0.995). On the seeds that
train, ms.diagnose finds at most 2 dead and 2 duplicated channels (decay findings on θ: not reproduced;
functional duplicates: reproduced, 4.8 per seed, partly from the collapsed seeds), and the control has the
same accuracy and, on the collapsed seeds, the same collapse onto θ₀ (dead on ψ: 8 and 7 channels). So at
this size λ = 0.03 is too strong for the CNN to train and λ = 0.01 (the previous quick setting) too weak
for decay to act within 400 steps; this setting does not test the symmetry-removal control, and the
quick size does not reproduce the paper's dead / identical channels. Not tuned further: the verdicts are
those of the configuration chosen above.

With ``--full --data-dir DIR`` and CIFAR-10 in ``DIR/cifar-10-batches-py/`` (torchvision's layout), the
same three methods (syre at the default σ₀) also train a CIFAR-style ResNet-18 (:class:`ResNet18`,
BatchNorm, random crop and flip, SGD with momentum and a cosine schedule), ``resnet_seeds`` seeds each, in
a plain loop: train-mode BatchNorm updates running statistics in place, which the sweep engine refuses.
Its dead and duplicated channels per permutation group are counted on θ the same way (model in eval mode,
on ``resnet_probe`` training images). Without CIFAR-10 on disk that part is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Claim, Context, finding
from .data import cifar10, digit_images, has_cifar10
from .plotting import figure, save

NAME = "permutation"
TITLE = "Permutation symmetry ⇒ dead / identical units under weight decay; symmetry removal as the control"

METHODS = ("plain", "decay", "decay+syre")
DEFAULT_SIGMA = 0.01  # ms.remove_symmetries' default σ₀ (× init scale): the control

@dataclass(frozen=True)
class Config:
    channels: tuple[int, int] = (8, 16)
    steps: int = 1000  # ≈ 36 epochs of batch 64; ≈ 2 decay-only shrink times (module docstring)
    batch: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.03  # torch coupled λ (= 2γ)
    min_accuracy: float = 0.9  # precondition: the decay model still trains (training accuracy above this)
    syre_sigmas: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # σ₀ / init scale; 0.01 is the control
    seeds: int = 5
    probe: int = 8  # example images for ms.diagnose's tracing
    activation_probe: int = 512  # images whose ReLU outputs give the functional counts
    seed: int = 0
    # ResNet-18 on CIFAR-10 (only with ctx.data_dir holding it): base width, epochs, training images used
    # (0 = all 50 000), test images scored (0 = all 10 000), probe images for ms.diagnose, seeds
    resnet: bool = False
    resnet_width: int = 64
    resnet_epochs: int = 30
    resnet_batch: int = 128
    resnet_lr: float = 0.1
    resnet_weight_decay: float = 5e-3  # torch coupled λ (= 2γ); 10× the usual 5e-4 so that collapse shows
    resnet_train: int = 0
    resnet_test: int = 0
    resnet_probe: int = 64
    resnet_seeds: int = 5


CONFIGS = {
    "tiny": Config(channels=(2, 4), steps=60, syre_sigmas=(0.01, 1.0), activation_probe=128),
    "quick": Config(),
    "full": Config(channels=(32, 64), steps=6000, seeds=10, syre_sigmas=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                   resnet=True),
}


def make_cnn(channels: tuple[int, int]) -> nn.Sequential:
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c2, 10),
    )


def cnn_factory(channels: tuple[int, int], sigma: float | None, seed: int) -> nn.Module:
    """The CNN initialised from ``seed``; with ``sigma``: ``ms.remove_symmetries(model, sigma, seed)``
    (parameters ψ, offsets θ₀ as buffers)."""
    from ..constrain import remove_symmetries

    torch.manual_seed(seed)
    model = make_cnn(channels)
    if sigma is not None:
        remove_symmetries(model, sigma=sigma, seed=seed)
    return model


def split_trained(model: nn.Module, channels, sigma) -> tuple[nn.Module, nn.Module | None]:
    """(plain CNN holding θ = θ₀ + ψ, plain CNN holding ψ, or None without syre) from a trained model."""
    theta, learned = make_cnn(channels), None
    if sigma is not None:
        learned = make_cnn(channels)
    with torch.no_grad():
        for name, _ in theta.named_parameters():
            layer, _, tensor = name.rpartition(".")
            module = model.get_submodule(layer)
            theta.get_parameter(name).copy_(getattr(module, tensor))  # a parametrized tensor is θ₀ + ψ
            if learned is not None:
                learned.get_parameter(name).copy_(getattr(module.parametrizations, tensor).original)
    return theta, learned


def weight_counts(model: nn.Module, probe: torch.Tensor, smap) -> dict:
    """ms.diagnose per permutation group: units, dead, duplicated, distinct; the correlation matrices."""
    from ..diagnose import diagnose

    rep = diagnose(model, probe, symmetries=smap)
    df = rep.to_pandas()
    perm = df[df["kind"] == "permutation"]
    layers = [{"layer": r["layer"], "units": int(r["units"]), "dead": int(r["dead"]), "distinct": int(r["distinct"]),
               "duplicated": int(r["units"] - r["dead"] - r["distinct"])} for _, r in perm.iterrows()]
    corr = [np.asarray(rep.correlations[g]).round(3).tolist() for g in perm["group"] if g in rep.correlations]
    return {"dead": sum(lay["dead"] for lay in layers), "duplicated": sum(lay["duplicated"] for lay in layers),
            "units": sum(lay["units"] for lay in layers), "layers": layers, "correlations": corr}


def activation_counts(model: nn.Module, x: torch.Tensor) -> dict:
    """Dead and duplicated channels from the ReLU outputs on ``x`` (module docstring)."""
    from ..diagnose.metrics import DEAD_TOL, DUPLICATE_TOL, count_units

    acts = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    dead = duplicated = 0
    for a in acts:
        A = a.movedim(1, 0).reshape(a.shape[1], -1).double()  # (channels, N·H·W)
        peak = A.abs().amax(1)
        alive = peak > DEAD_TOL * peak.max()
        norms = A.norm(dim=1, keepdim=True)
        unit = torch.where(alive[:, None], A / norms.clamp_min(1e-300), torch.zeros_like(A))
        c = count_units(unit, DEAD_TOL, DUPLICATE_TOL)
        dead, duplicated = dead + int((~alive).sum()), duplicated + c.duplicated
    return {"dead": dead, "duplicated": duplicated}


def sweep_models(cfg: Config, ctx: Context, x, y, sigma: float | None, decays, store: str) -> list[tuple]:
    """Train ``cnn_factory(channels, sigma, seed)`` with SGD + momentum for every decay in ``decays`` and
    every seed on the sweep engine; returns (decay, seed, status, trained model) per run."""
    from ..sweep import Sweep, final_params

    grid = {"lr": cfg.lr, "momentum": cfg.momentum, "batch_size": cfg.batch, "steps": cfg.steps,
            "weight_decay": list(decays), "seed": [cfg.seed + s for s in range(cfg.seeds)]}
    sweep = Sweep(partial(cnn_factory, cfg.channels, sigma), F.cross_entropy, (x, y), grid,
                  metrics={"loss": "loss"}, record_every=cfg.steps, name=f"permutation-{store}", keep_params=True)
    out = []
    for _, row in ctx.sweep(sweep, store=store).iterrows():
        model = cnn_factory(cfg.channels, sigma, int(row["seed"]))
        with torch.no_grad():
            for name, value in final_params(row).items():
                model.get_parameter(name).copy_(value)
        out.append((float(row["weight_decay"]), int(row["seed"]), row["status"], model.to(x.device)))
    return out


def analyse(model: nn.Module, cfg: Config, sigma, seed: int, x, y, smap) -> dict:
    """Accuracy and the counts on θ, on ψ (syre) and on the activations of a trained model."""
    theta, learned = split_trained(model, cfg.channels, sigma)
    with torch.no_grad():
        acc = float((theta(x).argmax(1) == y).double().mean())
    out = {"status": "ok", "seed": seed, "accuracy": acc, "theta": weight_counts(theta, x[: cfg.probe], smap),
           "functional": activation_counts(theta, x[: cfg.activation_probe])}
    if learned is not None:
        psi = weight_counts(learned, x[: cfg.probe], smap)
        psi.pop("correlations")
        out["psi"] = psi
    return out


def run(cfg: Config, ctx: Context) -> dict:
    from ..detect import find_symmetries

    x, y = (t.to(ctx.device) for t in digit_images())
    smap = find_symmetries(make_cnn(cfg.channels).to(ctx.device), x[: cfg.probe])
    out: dict = {"sigmas": list(cfg.syre_sigmas), "seeds": cfg.seeds, "syre": {}}

    def analysed(runs, sigma):
        return [analyse(m, cfg, sigma, s - cfg.seed, x, y, smap) if status == "ok" else
                {"status": status, "seed": s - cfg.seed} for _, s, status, m in runs]

    runs = sweep_models(cfg, ctx, x, y, None, (0.0, cfg.weight_decay), "plain-decay")
    out["plain"] = analysed([r for r in runs if r[0] == 0.0], None)
    out["decay"] = analysed([r for r in runs if r[0] != 0.0], None)
    for sigma in sorted(set(cfg.syre_sigmas) | {DEFAULT_SIGMA}):
        out["syre"][f"{sigma:g}"] = analysed(sweep_models(cfg, ctx, x, y, sigma, (cfg.weight_decay,),
                                                          f"syre-{sigma:g}"), sigma)
    out["decay+syre"] = out["syre"][f"{DEFAULT_SIGMA:g}"]
    if cfg.resnet and ctx.data_dir is not None and has_cifar10(ctx.data_dir):
        out["resnet18"] = run_resnet(cfg, ctx, cifar10(ctx.data_dir, train=True), cifar10(ctx.data_dir, train=False))
    return out


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or 1×1 conv–BN) shortcut, ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR variant of ResNet-18 (He et al. 2016): 3×3 stem without max-pool, four stages of two
    basic blocks with ``width``·(1, 2, 4, 8) channels (strides 1, 2, 2, 2), global average pool, linear
    head. ``width=64`` is the standard 11.2 M-parameter network."""

    def __init__(self, width: int = 64, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c_in = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**stage
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation per image: random 32×32 crop of the zero-padded (4 px) image, then a
    horizontal flip with probability 1/2; random draws from ``gen`` (CPU), applied on ``x``'s device."""
    n, c, h, w = x.shape
    shift = torch.randint(0, 9, (2, n), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    rows = shift[0, :, None] + torch.arange(h, device=x.device)
    cols = shift[1, :, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    images, channels = torch.arange(n, device=x.device), torch.arange(c, device=x.device)
    return padded[images[:, None, None, None], channels[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def train_resnet(cfg: Config, method: str, seed: int, x: torch.Tensor, y: torch.Tensor, ctx: Context) -> nn.Module:
    """SGD (momentum ``cfg.momentum``, cosine schedule from ``resnet_lr``) on augmented batches; decay
    ``resnet_weight_decay`` for "decay" and "decay+syre" (the latter towards θ₀ at the default σ₀)."""
    import mirrorsym as ms

    torch.manual_seed(seed)
    model = ResNet18(cfg.resnet_width).to(x.device)
    wd = 0.0 if method == "plain" else cfg.resnet_weight_decay
    removal = ms.remove_symmetries(model, sigma=DEFAULT_SIGMA, seed=seed) if method == "decay+syre" else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.resnet_lr, momentum=cfg.momentum, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.resnet_epochs, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in ctx.track(range(cfg.resnet_epochs), f"ResNet-18 {method} seed {seed}"):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.resnet_batch):
            idx = idx.to(x.device)
            opt.zero_grad()
            F.cross_entropy(model(augment(x[idx], gen)), y[idx]).backward()
            opt.step()
        sched.step()
    if removal is not None:
        removal.remove()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    correct = sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(batch), y.split(batch), strict=True))
    return float(correct) / len(y)


def run_resnet(cfg: Config, ctx: Context, train_set, test_set) -> dict:
    """ResNet-18 on CIFAR-10 (``train_set``/``test_set`` = (X, y) from :func:`~.data.cifar10`) for each
    method and seed: test accuracy and dead / duplicated channels (on θ) summed over permutation groups."""
    (x, y), (xt, yt) = train_set, test_set
    x, y = x[: cfg.resnet_train or None].to(ctx.device), y[: cfg.resnet_train or None].to(ctx.device)
    xt, yt = xt[: cfg.resnet_test or None].to(ctx.device), yt[: cfg.resnet_test or None].to(ctx.device)
    probe = x[: cfg.resnet_probe]
    out: dict = {m: [] for m in METHODS}
    for method in METHODS:
        for s in range(cfg.resnet_seeds):
            model = train_resnet(cfg, method, cfg.seed + s, x, y, ctx)
            counts = weight_counts(model, probe, _smap(model, probe))
            counts.pop("correlations")
            out[method].append({"seed": s, "accuracy": accuracy(model, xt, yt), "theta": counts})
    return out


def _smap(model, probe):
    from ..detect import find_symmetries

    return find_symmetries(model, probe)


# ------------------------------------------------------------------------------------------- analysis
def per_seed(runs: list[dict], where: str, what: str) -> list[float | None]:
    """One value per seed: ``runs[i][where][what]`` (None for a diverged run or a missing part)."""
    return [None if r.get("status", "ok") != "ok" or where not in r else float(r[where][what]) for r in runs]


def accuracies(runs: list[dict]) -> list[float | None]:
    return [r["accuracy"] if r.get("status", "ok") == "ok" else None for r in runs]


def _mean(values) -> float:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else math.nan


def aligned_pairs(run: dict, threshold: float = 0.9) -> float | None:
    """Fraction of channel pairs (all layers) whose parameter correlation exceeds ``threshold``."""
    if run.get("status", "ok") != "ok":
        return None
    hits = total = 0
    for corr in run["theta"]["correlations"]:
        c = np.asarray(corr, dtype=float)
        off = c[~np.eye(len(c), dtype=bool)]
        hits, total = hits + int((off > threshold).sum()), total + off.size
    return hits / max(total, 1)


def plot(results: dict, ctx: Context) -> list:
    paths = [plot_sigma(results, ctx), plot_digits(results, ctx)]
    if "resnet18" in results:
        paths.append(plot_resnet(results["resnet18"], ctx))
    return paths


def plot_sigma(results: dict, ctx: Context):
    """Dead and duplicated channels (on θ, on ψ, functional) and accuracy against σ₀, means over seeds."""
    sig = sorted(results["syre"], key=float)
    s = np.array([float(v) for v in sig])
    fig, ax = figure(3, width=4.3)
    for k, what in enumerate(("dead", "duplicated")):
        a = ax[0, k]
        for where, style in (("theta", "o-"), ("psi", "s--"), ("functional", "^:")):
            a.plot(s, [_mean(per_seed(results["syre"][v], where, what)) for v in sig], style,
                   label=f"syre, on {'θ' if where == 'theta' else 'ψ = θ − θ₀' if where == 'psi' else 'activations'}")
        for method, color in (("plain", "gray"), ("decay", "k")):
            a.axhline(_mean(per_seed(results[method], "theta", what)), color=color, lw=1,
                      label=f"{method} (on θ)")
        a.axvline(DEFAULT_SIGMA, color="r", ls=":", lw=1, label="default σ₀ = 0.01")
        a.set_xscale("log")
        a.set_xlabel("σ₀ / init scale")
        a.set_ylabel(f"{what} channels (mean over seeds)")
        a.set_title(f"{what.capitalize()} channels vs the offset scale")
        a.legend(fontsize=6)
    ax[0, 2].plot(s, [_mean(accuracies(results["syre"][v])) for v in sig], "o-", label="decay+syre")
    for method, color in (("plain", "gray"), ("decay", "k")):
        ax[0, 2].axhline(_mean(accuracies(results[method])), color=color, lw=1, label=method)
    ax[0, 2].axvline(DEFAULT_SIGMA, color="r", ls=":", lw=1)
    ax[0, 2].set_xscale("log")
    ax[0, 2].set_xlabel("σ₀ / init scale")
    ax[0, 2].set_ylabel("training accuracy (mean over seeds)")
    ax[0, 2].set_title("Accuracy vs the offset scale")
    ax[0, 2].legend(fontsize=7)
    return save(fig, ctx.out_dir, "permutation_sigma")


def plot_digits(results: dict, ctx: Context):
    """Seed 0's channel correlation matrices (ordered by cluster) for each method."""
    runs = {m: results[m][0] for m in METHODS}
    n_layers = max((len(r["theta"]["correlations"]) for r in runs.values() if r.get("status") == "ok"), default=1)
    fig, ax = figure(len(METHODS), max(n_layers, 1), width=3.4, height=3.0)
    for j, method in enumerate(METHODS):
        r = runs[method]
        if r.get("status") != "ok":
            continue
        for i, corr in enumerate(r["theta"]["correlations"]):
            im = ax[i, j].imshow(np.asarray(corr, dtype=float), vmin=-1, vmax=1, cmap="RdBu_r")
            layer = r["theta"]["layers"][i]
            ax[i, j].set_title(f"{method}: {layer['layer']}\n{layer['dead']} dead, {layer['duplicated']} duplicated "
                               f"/ {layer['units']}", fontsize=8)
            ax[i, j].set_xlabel("channel (ordered by cluster)")
            ax[i, j].set_ylabel("channel")
            ax[i, j].grid(False)
            if j == len(METHODS) - 1:
                fig.colorbar(im, ax=ax[i, j], label="correlation of channel parameters")
    return save(fig, ctx.out_dir, "permutation")


def plot_resnet(res: dict, ctx: Context):
    """Bars: dead and duplicated channels (on θ, mean over seeds) per method."""
    fig, ax = figure(1, 1, width=5.0, height=3.6)
    pos = np.arange(len(METHODS))
    for k, what in enumerate(("dead", "duplicated")):
        ax[0, 0].bar(pos + (k - 0.5) * 0.35, [_mean(per_seed(res[m], "theta", what)) for m in METHODS], width=0.35,
                     label=what)
    ax[0, 0].set_xticks(pos, [f"{m}\n(acc {_mean(accuracies(res[m])):.3f})" for m in METHODS], fontsize=8)
    ax[0, 0].set_ylabel("channels (mean over seeds)")
    ax[0, 0].set_title("ResNet-18 on CIFAR-10: dead and duplicated channels")
    ax[0, 0].legend(fontsize=8)
    return save(fig, ctx.out_dir, "permutation_resnet18")


def claims(results: dict, cfg: Config) -> list[Claim]:
    plain, decay, syre = (results[m] for m in METHODS)
    big = f"{max(cfg.syre_sigmas):g}"
    out = []

    def count(runs, where, what, label, text, better, predicted):
        vals = per_seed(runs, where, what)
        out.append(finding(text, predicted, vals, vals, statistic=label, better=better, threshold=0.5))

    acc_decay = accuracies(decay)
    out.append(finding(f"precondition: with weight decay (torch λ={cfg.weight_decay}) the CNN still trains (training "
                       f"accuracy above {cfg.min_accuracy:g})", f"> {cfg.min_accuracy:g}", acc_decay, acc_decay,
                       statistic="training accuracy with decay", better="higher", threshold=cfg.min_accuracy))
    count(plain, "theta", "dead", "dead channels without decay (ms.diagnose on θ)",
          "without weight decay no channel is dead", "lower", 0)
    count(decay, "theta", "dead", "dead channels with decay (ms.diagnose on θ)",
          f"weight decay (torch λ={cfg.weight_decay}) kills channels: dead channels on θ", "higher", "> 0")
    count(decay, "theta", "duplicated", "duplicated channels with decay (ms.diagnose on θ)",
          f"weight decay (torch λ={cfg.weight_decay}) makes channels identical (homogeneous ensembling): "
          "duplicated living channels on θ", "higher", "> 0")
    count(decay, "functional", "duplicated", "duplicated channels with decay (activation patterns)",
          "weight decay makes channels functionally identical: duplicated activation patterns", "higher", "> 0")
    d = f"default σ₀ = {DEFAULT_SIGMA:g}"
    count(syre, "theta", "dead", f"dead channels with decay+syre ({d}), ms.diagnose on θ = θ₀ + ψ",
          f"the control (same decay, symmetries removed, {d}) leaves no channel dead on θ", "lower", 0)
    count(syre, "psi", "dead", f"dead channels with decay+syre ({d}), ms.diagnose on ψ = θ − θ₀",
          f"the control ({d}) leaves no channel sitting on θ₀ (dead on the learned part ψ)", "lower", 0)
    count(syre, "functional", "dead", f"dead channels with decay+syre ({d}), activations",
          f"the control ({d}) leaves no channel functionally dead (never active on the data)", "lower", 0)
    count(syre, "theta", "duplicated", f"duplicated channels with decay+syre ({d}), ms.diagnose on θ",
          f"the control ({d}) leaves no channel duplicated on θ", "lower", 0)
    acc = [None if a is None or b is None else a - b for a, b in zip(accuracies(syre), accuracies(decay), strict=True)]
    out.append(finding(f"the control ({d}) costs no training accuracy (within 2 points of plain decay)", "≥ −0.02",
                       acc, acc, statistic="training accuracy, decay+syre − decay (same seed)", better="higher",
                       threshold=-0.02, inclusive=True))
    if big != f"{DEFAULT_SIGMA:g}":
        count(results["syre"][big], "psi", "dead",
              f"dead channels on ψ with decay+syre at σ₀ = {big} (not the default)",
              f"not the default: with a larger offset σ₀ = {big} × init scale no channel sits on θ₀ (dead on ψ)",
              "lower", 0)
    a_decay = [aligned_pairs(r) for r in decay]
    a_other = [None if p is None or s is None else max(p, s) for p, s in
               zip((aligned_pairs(r) for r in plain), (aligned_pairs(r) for r in syre), strict=True)]
    diff = [None if a is None or b is None else a - b for a, b in zip(a_decay, a_other, strict=True)]
    out.append(finding("weight decay makes block-structured parameter correlations: more channel pairs with "
                       f"correlation > 0.9 than without decay and than the control ({d})", "> 0", diff, diff,
                       statistic="fraction of pairs > 0.9 with decay − the larger of no decay and decay+syre",
                       better="higher", threshold=0.0))
    if "resnet18" in results:
        out += resnet_claims(results["resnet18"])
    return out


def resnet_claims(res: dict) -> list[Claim]:
    plain, decay, syre = (res[m] for m in METHODS)
    out = []
    for what in ("dead", "duplicated"):
        p, dcy, s = (per_seed(r, "theta", what) for r in (plain, decay, syre))
        more = [None if a is None or b is None else a - b for a, b in zip(dcy, p, strict=True)]
        fewer = [None if a is None or b is None else a - b for a, b in zip(dcy, s, strict=True)]
        out.append(finding(f"ResNet-18 on CIFAR-10: weight decay makes more channels {what} than no decay",
                           "> 0", more, more, statistic=f"{what} channels, decay − no decay (same seed)",
                           better="higher", threshold=0.0))
        out.append(finding(f"ResNet-18 on CIFAR-10: the control (default σ₀ = {DEFAULT_SIGMA:g}) makes fewer "
                           f"channels {what} than the same decay", "> 0", fewer, fewer,
                           statistic=f"{what} channels, decay − decay+syre (same seed)", better="higher",
                           threshold=0.0))
    return out
