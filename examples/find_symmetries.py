"""Tutorial: find the parameter symmetries of your model.

``ms.find_symmetries(model, example_inputs)`` traces the model, works out which hidden axes can be
permuted, sign-flipped, rescaled or rotated without changing the function, and verifies every group
numerically. This script

1. scans three small models (a tanh/ReLU MLP, a BatchNorm CNN, a pre-LN attention block) and prints
   their symmetry maps;
2. applies a random element of each group to a copy and measures the output change;
3. turns groups into mirrors (reflections R = I − 2OOᵀ), checks the invariance in float64 and projects
   the weights onto a symmetric surface (a dead unit, two identical units);
4. shows the residual-path counterexample: U(Wx) has a rotation symmetry, U(Wx + x) has none.

Run: ``python examples/find_symmetries.py [--tiny] [--out DIR]`` (figures go to DIR).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import mirrorsym as ms  # noqa: E402

pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 12)
pd.set_option("display.max_colwidth", 36)


# --------------------------------------------------------------------------------------- three models
def mlp(width: int) -> nn.Module:
    """tanh hidden layer (odd: sign flips), then a ReLU hidden layer (positive rescalings)."""
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))


def cnn(channels: int) -> nn.Module:
    """conv-BN-ReLU twice, global pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    )


class AttentionBlock(nn.Module):
    """A pre-LN transformer block written with plain Linear layers (GPT style)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.out((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class Factorised(nn.Module):
    """f(x) = U(Wx) or, with ``residual=True``, f(x) = U(Wx + x): the residual path pins the hidden axis."""

    def __init__(self, dim: int = 6, residual: bool = False):
        super().__init__()
        self.W, self.U, self.residual = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False), residual

    def forward(self, x):
        h = self.W(x)
        return self.U(h + x if self.residual else h)


def output_change(model: nn.Module, group, x: torch.Tensor, seed: int = 0) -> float:
    """Max relative output change after applying one random element of ``group`` to a float64 copy."""
    base = copy.deepcopy(model).double().eval()
    moved = copy.deepcopy(base)
    group.apply_(moved, group.random_element(generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        y0, y1 = base(x.double()), moved(x.double())
    return ((y1 - y0).abs().max() / y0.abs().max()).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("MIRRORSYM_TINY")),
                        help="test sizes (also set by the MIRRORSYM_TINY environment variable)")
    parser.add_argument("--out", type=Path, default=Path("out/find_symmetries"), help="folder for the figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    width = 8 if args.tiny else 32

    # 1. Scan three models ----------------------------------------------------------------------------
    models = {
        "MLP (tanh, ReLU)": (mlp(width), torch.randn(4, 8)),
        "CNN (BatchNorm)": (cnn(width // 2), torch.randn(2, 1, 8, 8)),
        "attention block": (AttentionBlock(16, 4), torch.randn(2, 5, 16)),
    }
    maps = {}
    for name, (model, x) in models.items():
        smap = ms.find_symmetries(model, x)
        maps[name] = smap
        print(f"\n== {name}: {smap.summary()}")
        print(smap.to_pandas()[["group", "kind", "size", "tensors", "verification_error", "notes"]])

    # 2. Every group is a function-preserving action: apply a random element, compare outputs ----------
    errors = {}
    for name, (model, x) in models.items():
        errors[name] = [output_change(model, g, x, seed=i) for i, g in enumerate(maps[name])]
        print(f"{name}: max relative output change over {len(errors[name])} groups = {max(errors[name]):.1e}")
    # SymmetryMap.verify does the same for every group at once, on its own float64 eval-mode copy:
    model, x = models["MLP (tanh, ReLU)"]
    print(maps["MLP (tanh, ReLU)"].verify(model, x))

    # 3. Groups → mirrors → symmetric surfaces ---------------------------------------------------------
    model, x = copy.deepcopy(models["MLP (tanh, ReLU)"][0]).double(), models["MLP (tanh, ReLU)"][1].double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    sign_group = maps["MLP (tanh, ReLU)"].by_kind("sign_flip")[0]
    perm_group = maps["MLP (tanh, ReLU)"].by_kind("permutation")[0]
    dead = sign_group.mirrors()[3]          # R negates unit 3's incoming row, bias and outgoing column
    twins = perm_group.mirrors()[0]         # R swaps units 0 and 1
    print("\nsign-flip mirror:", dead, " invariance error:", ms.check_invariance(f, params, dead))
    print("swap mirror:     ", twins, " invariance error:", ms.check_invariance(f, params, twins))
    # A rescale group (ReLU) has no reflection, so no mirror, but its zero state is still absorbing.
    print("rescale group mirrors:", maps["MLP (tanh, ReLU)"].by_kind("rescale")[0].mirrors())
    on_dead, on_twins = dead.project(params), twins.project(params)
    print(f"distance to 'unit 3 dead': {dead.distance(params):.3f} -> {dead.distance(on_dead):.1e} after projection")
    print(f"distance to 'units 0, 1 identical': {twins.distance(params):.3f} -> {twins.distance(on_twins):.1e}")
    # on the surface the mirror fixes the weights, and the gradient has no component along O (Theorem 1)
    y = torch.randn(x.shape[0], 3, dtype=torch.float64)

    def loss(p, batch):  # the one loss convention, loss(params, batch); here batch = the targets
        return ((f(p) - batch) ** 2).mean()

    print(f"‖Oᵀ∇L‖ on the dead-unit surface: {ms.theory.stationarity_residual(loss, on_dead, dead, y):.1e}")
    off = ms.theory.stationarity_residual(loss, params, dead, y, project=False)
    print(f"‖Oᵀ∇L‖ at the original weights:  {off:.1e}")

    # 4. The residual-path counterexample --------------------------------------------------------------
    # Rotating the hidden axis (W -> QW, U -> UQᵀ) preserves U(Wx) but not U(Wx + x): the detector agrees.
    xr = torch.randn(16, 6, dtype=torch.float64)
    found, rotated = {}, {}
    for residual in (False, True):
        net = Factorised(6, residual).double()
        found[residual] = ms.find_symmetries(net, xr).summary()
        changes = []
        for seed in range(5):
            Q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(seed),
                                            dtype=torch.float64)).Q
            moved = copy.deepcopy(net)
            with torch.no_grad():
                moved.W.weight.copy_(Q @ net.W.weight)
                moved.U.weight.copy_(net.U.weight @ Q.T)
                y0, y1 = net(xr), moved(xr)
            changes.append(((y1 - y0).abs().max() / y0.abs().max()).item())
        rotated[residual] = changes
        print(f"U(Wx{' + x' if residual else ''}): {found[residual]}; output change under a hidden rotation: "
              f"{max(changes):.1e}")

    # Figures --------------------------------------------------------------------------------------------
    kinds_all = sorted({k for smap in maps.values() for k in smap.counts()})
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    bottom = [0] * len(maps)
    for kind in kinds_all:
        counts = [smap.counts().get(kind, 0) for smap in maps.values()]
        ax[0].bar(list(maps), counts, bottom=bottom, label=kind)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax[0].set_ylabel("symmetry groups")
    ax[0].set_title("Groups found, by kind")
    ax[0].legend(fontsize=8)
    for i, errs in enumerate(errors.values()):
        ax[1].scatter([i] * len(errs), [max(e, 1e-18) for e in errs], alpha=0.7)
    ax[1].set_xticks(range(len(errors)), list(errors))
    ax[1].set_yscale("log")
    ax[1].set_ylim(1e-19, 1e-12)
    ax[1].set_ylabel("relative output change (float64)")
    ax[1].set_title("A random element of each group: function unchanged")
    fig.tight_layout()
    fig.savefig(args.out / "groups.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, residual in enumerate((False, True)):
        ax.scatter([i] * len(rotated[residual]), [max(c, 1e-18) for c in rotated[residual]], s=40)
    ax.set_xticks([0, 1], [f"U(Wx)\n{found[False]}", f"U(Wx + x)\n{found[True]}"], fontsize=8)
    ax.set_xlim(-0.5, 1.5)
    ax.set_yscale("log")
    ax.set_ylabel("relative output change")
    ax.set_title("Rotating the hidden axis: W → QW, U → UQᵀ (5 random Q)")
    fig.tight_layout()
    fig.savefig(args.out / "residual.png", dpi=110)
    plt.close(fig)
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
