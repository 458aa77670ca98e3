"""Tutorial: choose the DCS weight decay (and training length) for a target width.

``ms.constrain.apply(kind="units")`` gates every hidden unit; coupled decay λ = 2γ then prunes units exactly
(a group lasso over units), but which γ leaves k units? ``ms.constrain.suggest_decay`` answers from the
units' global thresholds γ_j = sup_r −ΔL_j(r)/(2r) (the loss a unit saves at scale r, against the decay it
costs), eliminated greedily, then calibrates with a few short runs of your own training function. This
script

1. fits a 64-32-10 ReLU MLP on scikit-learn's digits (no decay);
2. asks ``suggest_decay`` for γ and the number of steps for a target of 8 hidden units (calibrated on this
   fit);
3. trains *fresh* models (new seeds) at the suggestion, exports them with ``ms.constrain.export`` and prints
   target vs reached width and test accuracy.

Run: ``python examples/dcs_target_width.py [--tiny] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import mirrorsym as ms  # noqa: E402

LR, MOMENTUM = 0.1, 0.9


def digits():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


def mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def fit(model, train, steps: int, gamma: float = 0.0, ramp: int = 0) -> nn.Module:
    """Full-batch SGD + momentum. gamma > 0: gate every unit, coupled weight_decay = 2γ on the gates and gated
    tensors, raised linearly over ``ramp`` steps (a large decay switched on at once can kill every unit)."""
    x, y = train
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    if gamma > 0:
        ms.constrain.apply(model, x[:8], kind="units")
        groups = ms.constrain.param_groups(model, weight_decay=ms.theory.torch_weight_decay(gamma))
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)
    for t in range(steps):
        if gamma > 0:
            opt.param_groups[0]["weight_decay"] = 2 * gamma * min(1.0, (t + 1) / max(ramp, 1))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("MIRRORSYM_TINY")),
                        help="test sizes (also set by the MIRRORSYM_TINY environment variable)")
    parser.add_argument("--out", type=Path, default=Path("out/dcs_target_width"), help="folder for the figure")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hidden, target, dense_steps, ramp, rounds, seeds = (16, 4, 150, 200, 2, 2) if args.tiny else (32, 8, 300, 400, 3, 3)

    train, test = digits()
    dense = fit(mlp(hidden, 0), train, dense_steps)                     # 1. a dense fit

    def calibrate(gamma, steps):                                        # your training function
        return fit(copy.deepcopy(dense), train, ramp + steps, gamma=gamma, ramp=ramp)

    suggestion = ms.constrain.suggest_decay(dense, F.cross_entropy, train, target, lr=LR, momentum=MOMENTUM,
                                            train=calibrate, rounds=rounds)   # 2. γ and steps for the target
    print(suggestion)
    th = suggestion.thresholds

    reached = []                                                        # 3. fresh seeds at the suggestion
    for seed in range(1, seeds + 1):
        fitted = fit(mlp(hidden, seed), train, dense_steps)
        model = fit(copy.deepcopy(fitted), train, ramp + suggestion.steps, gamma=suggestion.gamma, ramp=ramp)
        small, report = ms.constrain.export(model, train[0], tol=suggestion.tol)   # a plain, narrower MLP
        reached.append(small[0].out_features)
        print(f"seed {seed}: target {target}, reached {reached[-1]} of {hidden} units; test accuracy "
              f"{accuracy(small, test):.3f} (dense {accuracy(fitted, test):.3f}); "
              f"params {report.params_before} → {report.params_after}")

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].step(suggestion.gammas, suggestion.widths, where="post", label=f"predicted width ({th.threshold} thresholds)")
    for i, r in enumerate(suggestion.rounds):
        ax[0].plot(r.gamma, r.width, "o", color="C1", label="calibration runs" if i == 0 else None)
        ax[0].annotate(str(i), (r.gamma, r.width), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax[0].axhline(target, color="grey", ls=":", label=f"target {target}")
    ax[0].axvline(suggestion.gamma, color="C3", ls="--", label=f"suggested γ = {suggestion.gamma:.3g}")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("γ (torch weight_decay = 2γ)")
    ax[0].set_ylabel("live units")
    ax[0].set_title("Thresholds of the last evaluated model, and calibration")
    ax[0].legend(fontsize=8)
    ax[1].bar([str(s) for s in range(1, seeds + 1)], reached, color="C0")
    ax[1].axhline(target, color="grey", ls=":", label="target")
    ax[1].set_xlabel("fresh seed")
    ax[1].set_ylabel("width kept by export")
    ax[1].set_title(f"γ = {suggestion.gamma:.3g}, {ramp + suggestion.steps} steps")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "target_width.png", dpi=110)
    plt.close(fig)
    print(f"\nfigure written to {args.out}")


if __name__ == "__main__":
    main()
