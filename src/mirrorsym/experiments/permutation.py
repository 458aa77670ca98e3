"""Permutation symmetry ⇒ homogeneous ensembling (the paper's Fig. 1, right), on scikit-learn's digits.

Swapping two channels of a layer (incoming filters, bias, outgoing weights) is a mirror whose surface is
"the two channels are identical"; weight decay makes such surfaces (and the dead-unit surface, where all
dead channels coincide at zero) attractive. A small ReLU CNN is trained on the 8×8 digits three ways
with the same seed: no weight decay, weight decay, and weight decay towards a fixed random offset θ₀
(``ms.remove_symmetries``: the control the paper lacked — same decay, no symmetric surface through the
minimiser). ``ms.find_symmetries`` finds the permutation groups and ``ms.diagnose`` counts the distinct
channels per layer (clusters of identical living channels, relative tolerance ``duplicate_tol``; dead
below ``dead_tol`` of the layer's largest channel); the
figures show the channel correlation matrices ordered by cluster.

With ``--full --data-dir DIR`` and CIFAR-10 in ``DIR/cifar-10-batches-py/`` (torchvision's layout), the
same three methods also train a CIFAR-style ResNet-18 (:class:`ResNet18`, BatchNorm, random crop and flip,
SGD with momentum and a cosine schedule); its dead and duplicated channels per permutation group are
counted the same way (model in eval mode, on ``resnet_probe`` training images) and compared in a bar
chart. Without CIFAR-10 on disk that part is skipped; the digits part is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Claim, Context, finding
from .data import cifar10, digit_images, has_cifar10
from .plotting import figure, save

NAME = "permutation"
TITLE = "Permutation symmetry ⇒ identical units under weight decay; symmetry removal prevents it"

METHODS = ("plain", "decay", "decay+syre")


@dataclass(frozen=True)
class Config:
    channels: tuple[int, int] = (16, 32)
    epochs: int = 30
    batch: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.03  # torch coupled λ (= 2γ)
    syre_sigma: float = 0.5  # σ₀ = 0.5 × init std: the offset is well above the tolerance below
    duplicate_tol: float = 1e-2  # channels within 1 % (relative) are identical
    dead_tol: float = 1e-2  # below 1 % of the layer's largest channel: dead
    seed: int = 0
    # ResNet-18 on CIFAR-10 (only with ctx.data_dir holding it): base width, epochs, training images used
    # (0 = all 50 000), test images scored (0 = all 10 000), probe images for ms.diagnose
    resnet: bool = False
    resnet_width: int = 64
    resnet_epochs: int = 30
    resnet_batch: int = 128
    resnet_lr: float = 0.1
    resnet_weight_decay: float = 5e-3  # torch coupled λ (= 2γ); 10× the usual 5e-4 so that collapse shows
    resnet_train: int = 0
    resnet_test: int = 0
    resnet_probe: int = 64


CONFIGS = {
    "tiny": Config(channels=(8, 16), epochs=15),
    "quick": Config(),
    "full": Config(channels=(32, 64), epochs=200, resnet=True),
}


def make_cnn(channels: tuple[int, int]) -> nn.Sequential:
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c2, 10),
    )


def train(cfg: Config, method: str, x, y, ctx: Context) -> nn.Module:
    import mirrorsym as ms

    torch.manual_seed(cfg.seed)
    model = make_cnn(cfg.channels).to(x.device)
    wd = 0.0 if method == "plain" else cfg.weight_decay
    removal = ms.remove_symmetries(model, sigma=cfg.syre_sigma, seed=cfg.seed) if method == "decay+syre" else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(x)
    for _ in ctx.track(range(cfg.epochs), f"train {method}"):
        for idx in torch.randperm(n, generator=gen).split(cfg.batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if removal is not None:
        removal.remove()  # back to plain parameters, keeping the trained values
    return model


def _diagnose(model, probe, cfg):
    from ..diagnose import diagnose

    return diagnose(model, probe, dead_tol=cfg.dead_tol, duplicate_tol=cfg.duplicate_tol)


def permutation_layers(rep) -> tuple[list[dict], list]:
    """Per permutation group of a diagnose report: {group, layer, units, dead, distinct}; and the group's
    cluster-ordered channel correlation matrix."""
    df = rep.to_pandas()
    perm = df[df["kind"] == "permutation"]
    layers = [{"group": row["group"], "layer": row["layer"], "units": int(row["units"]), "dead": int(row["dead"]),
               "distinct": int(row["distinct"])} for _, row in perm.iterrows()]
    corr = [np.asarray(rep.correlations[g]).round(4).tolist() for g in perm["group"] if g in rep.correlations]
    return layers, corr


def run(cfg: Config, ctx: Context) -> dict:

    x, y = (t.to(ctx.device) for t in digit_images())
    out = {}
    for method in METHODS:
        model = train(cfg, method, x, y, ctx)
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        layers, corr = permutation_layers(_diagnose(model, x[:8], cfg))
        out[method] = {"accuracy": acc, "layers": layers, "correlations": corr}
    if cfg.resnet and has_cifar10(ctx.data_dir):
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


def train_resnet(cfg: Config, method: str, x: torch.Tensor, y: torch.Tensor, ctx: Context) -> nn.Module:
    """SGD (momentum ``cfg.momentum``, cosine schedule from ``resnet_lr``) on augmented batches; decay
    ``resnet_weight_decay`` for "decay" and "decay+syre" (the latter towards a fixed random θ₀)."""
    import mirrorsym as ms

    torch.manual_seed(cfg.seed)
    model = ResNet18(cfg.resnet_width).to(x.device)
    wd = 0.0 if method == "plain" else cfg.resnet_weight_decay
    removal = ms.remove_symmetries(model, sigma=cfg.syre_sigma, seed=cfg.seed) if method == "decay+syre" else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.resnet_lr, momentum=cfg.momentum, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.resnet_epochs, 1))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in ctx.track(range(cfg.resnet_epochs), f"ResNet-18 {method}"):
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
    method: test accuracy and the dead/distinct channel counts per permutation group (no correlation
    matrices: 512 × 512 per group is too much to store)."""

    (x, y), (xt, yt) = train_set, test_set
    x, y = x[: cfg.resnet_train or None].to(ctx.device), y[: cfg.resnet_train or None].to(ctx.device)
    xt, yt = xt[: cfg.resnet_test or None].to(ctx.device), yt[: cfg.resnet_test or None].to(ctx.device)
    probe = x[: cfg.resnet_probe]
    out = {}
    for method in METHODS:
        model = train_resnet(cfg, method, x, y, ctx)
        layers, _ = permutation_layers(_diagnose(model, probe, cfg))
        out[method] = {"accuracy": accuracy(model, xt, yt), "layers": layers}
    return out


def plot(results: dict, ctx: Context) -> list:
    paths = [plot_digits(results, ctx)]
    if "resnet18" in results:
        paths.append(plot_resnet(results["resnet18"], ctx))
    return paths


def plot_resnet(res: dict, ctx: Context):
    """Bars: dead and duplicated channels (units − distinct) per permutation group, per method."""
    groups = [layer["layer"].split(",")[0].split(" ")[0] for layer in res[METHODS[0]]["layers"]]
    fig, ax = figure(1, 1, width=max(6.0, 0.45 * len(groups)), height=4.0)
    pos = np.arange(len(groups))
    for k, method in enumerate(METHODS):
        layers = res[method]["layers"]
        bad = [lay["units"] - lay["distinct"] for lay in layers]
        ax[0, 0].bar(pos + (k - 1) * 0.27, bad, width=0.27,
                     label=f"{method} (test acc {res[method]['accuracy']:.3f})")
    ax[0, 0].set_xticks(pos, groups, rotation=70, fontsize=6)
    ax[0, 0].set_xlabel("permutation group (first layer)")
    ax[0, 0].set_ylabel("channels dead or duplicated")
    ax[0, 0].set_title("ResNet-18 on CIFAR-10: channels on symmetric surfaces")
    ax[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, ctx.out_dir, "permutation_resnet18")


def plot_digits(results: dict, ctx: Context):
    n_layers = max(len(results[m]["correlations"]) for m in METHODS)
    fig, ax = figure(len(METHODS), max(n_layers, 1), width=3.4, height=3.0)
    for j, method in enumerate(METHODS):
        for i, corr in enumerate(results[method]["correlations"]):
            im = ax[i, j].imshow(np.asarray(corr, dtype=float), vmin=-1, vmax=1, cmap="RdBu_r")
            layer = results[method]["layers"][i]
            ax[i, j].set_title(f"{method}: {layer['layer']}\n{layer['distinct']} distinct / {layer['units']}, "
                               f"{layer['dead']} dead", fontsize=8)
            ax[i, j].set_xlabel("channel (ordered by cluster)")
            ax[i, j].set_ylabel("channel")
            ax[i, j].grid(False)
            if j == len(METHODS) - 1:
                fig.colorbar(im, ax=ax[i, j], label="correlation of channel parameters")
    return save(fig, ctx.out_dir, "permutation")


def collapsed(results: dict, method: str) -> int:
    """Channels on a symmetric surface: dead ones plus those identical to another (units − distinct: dead
    channels are never distinct)."""
    return sum(layer["units"] - layer["distinct"] for layer in results[method]["layers"])


def aligned_pairs(results: dict, method: str, threshold: float = 0.9) -> float:
    """Fraction of channel pairs (all layers) whose parameter correlation exceeds ``threshold``: the
    block structure of the correlation matrices, a graded measure of nearness to permutation surfaces."""
    hits = total = 0
    for corr in results[method]["correlations"]:
        c = np.asarray(corr, dtype=float)
        off = c[~np.eye(len(c), dtype=bool)]
        hits, total = hits + int((off > threshold).sum()), total + off.size
    return hits / max(total, 1)


def claims(results: dict, cfg: Config) -> list[Claim]:
    plain, decay, syre = (collapsed(results, m) for m in METHODS)
    a_plain, a_decay, a_syre = (aligned_pairs(results, m) for m in METHODS)
    acc_decay, acc_syre = results["decay"]["accuracy"], results["decay+syre"]["accuracy"]
    out = [
        finding("weight decay makes block-structured correlations: more channel pairs with correlation > 0.9 "
                "than without decay and than with symmetries removed",
                f"> max({a_plain:.3f}, {a_syre:.3f})", a_decay, [a_decay - max(a_plain, a_syre)],
                statistic="fraction of pairs > 0.9 with decay − the larger of no decay and decay+syre",
                better="higher", threshold=0.0),
        finding("without weight decay no channel is dead or duplicated", 0, plain, [plain],
                statistic="dead + duplicated channels without decay", better="lower", threshold=0.5),
        finding(f"weight decay (torch λ={cfg.weight_decay}) puts channels on symmetric surfaces (dead/duplicated)",
                "> 0", decay, [decay], statistic="dead + duplicated channels with decay", better="higher",
                threshold=0.5),
        finding("the same decay with symmetries removed leaves no channel dead or duplicated", 0, syre, [syre],
                statistic="dead + duplicated channels with decay+syre", better="lower", threshold=0.5),
        finding("symmetry removal costs no training accuracy (within 2 points of plain decay)",
                f"≥ {acc_decay - 0.02:.3f}", acc_syre, [acc_syre - acc_decay],
                statistic="training accuracy, decay+syre − decay", better="higher", threshold=-0.02,
                inclusive=True),
    ]
    if "resnet18" in results:
        out += resnet_claims(results["resnet18"])
    return out


def resnet_claims(res: dict) -> list[Claim]:
    plain, decay, syre = (collapsed(res, m) for m in METHODS)
    return [
        finding("ResNet-18 on CIFAR-10: weight decay puts more channels on symmetric surfaces (dead/duplicated) "
                "than no decay", f"> {plain}", decay, [decay - plain],
                statistic="dead + duplicated channels, decay − no decay", better="higher", threshold=0.0),
        finding("ResNet-18 on CIFAR-10: the same decay with symmetries removed puts fewer channels there",
                f"< {decay}", syre, [decay - syre],
                statistic="dead + duplicated channels, decay − decay+syre", better="higher", threshold=0.0),
    ]
