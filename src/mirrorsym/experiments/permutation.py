"""Permutation symmetry ⇒ homogeneous ensembling (the paper's Fig. 1, right), on scikit-learn's digits.

Swapping two channels of a layer (incoming filters, bias, outgoing weights) is a mirror whose surface is
"the two channels are identical"; weight decay makes such surfaces (and the dead-unit surface, where all
dead channels coincide at zero) attractive. A small ReLU CNN is trained on the 8×8 digits three ways
with the same seed: no weight decay, weight decay, and weight decay towards a fixed random offset θ₀
(``ms.remove_symmetries``: the control the paper lacked — same decay, no symmetric surface through the
minimiser). ``ms.find_symmetries`` finds the permutation groups and ``ms.diagnose`` counts the distinct
channels per layer (clusters of identical channels, relative tolerance ``rtol``, THEORY.md §7); the
figures show the channel correlation matrices ordered by cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import Claim, Context
from .data import digit_images
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
    rtol: float = 1e-2  # channels within 1 % (relative) are identical; below 1 % of the largest: dead
    seed: int = 0


CONFIGS = {
    "tiny": Config(channels=(8, 16), epochs=15),
    "quick": Config(),
    "full": Config(channels=(32, 64), epochs=200),
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


def run(cfg: Config, ctx: Context) -> dict:
    import mirrorsym as ms

    x, y = (t.to(ctx.device) for t in digit_images())
    out = {}
    for method in METHODS:
        model = train(cfg, method, x, y, ctx)
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        rep = ms.diagnose(model, x[:8], rtol=cfg.rtol)
        df = rep.to_pandas()
        perm = df[df["kind"] == "permutation"]
        layers = []
        for _, row in perm.iterrows():
            layers.append({"group": row["group"], "layer": row["layer"], "units": int(row["units"]),
                           "dead": int(row["dead"]), "distinct": int(row["distinct"])})
        # cluster-ordered channel correlation matrices of the permutation groups
        corr = [np.asarray(rep.correlations[g]).round(4).tolist() for g in perm["group"] if g in rep.correlations]
        out[method] = {"accuracy": acc, "layers": layers, "correlations": corr}
    return out


def plot(results: dict, ctx: Context) -> list:
    n_layers = max(len(r["correlations"]) for r in results.values())
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
    return [save(fig, ctx.out_dir, "permutation")]


def collapsed(results: dict, method: str) -> int:
    """Channels on a symmetric surface: dead ones plus those identical to another (units − distinct)."""
    return sum(layer["dead"] + layer["units"] - layer["distinct"] for layer in results[method]["layers"])


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
    return [
        Claim("weight decay makes block-structured correlations: more channel pairs with correlation > 0.9 "
              "than without decay and than with symmetries removed",
              f"> max({a_plain:.3f}, {a_syre:.3f})", a_decay, a_decay > max(a_plain, a_syre)),
        Claim("without weight decay no channel is dead or duplicated", 0, plain, plain == 0),
        Claim(f"weight decay (torch λ={cfg.weight_decay}) puts channels on symmetric surfaces (dead/duplicated)",
              "> 0", decay, decay > 0),
        Claim("the same decay with symmetries removed leaves no channel dead or duplicated", 0, syre, syre == 0),
        Claim("symmetry removal costs no training accuracy (within 2 points of plain decay)",
              f"≥ {results['decay']['accuracy'] - 0.02:.3f}", results["decay+syre"]["accuracy"],
              results["decay+syre"]["accuracy"] >= results["decay"]["accuracy"] - 0.02),
    ]
