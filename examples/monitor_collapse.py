"""Tutorial: monitor collapse onto symmetric surfaces during training.

A student tanh network with 16 hidden units learns a teacher with 3. Every hidden unit has a sign-flip
mirror (w_in, b, w_out) → (−w_in, −b, −w_out), whose surface is the dead unit. Theorem 1 says the
surface attracts once the weight decay γ exceeds the unit's threshold γ_c = ‖mean(r x̃)‖, which is small
for a surplus unit once the teacher is fitted. ``ms.SymmetryMonitor`` records ``ms.diagnose`` every few
steps; this script

1. trains the same student with torch ``weight_decay`` λ ∈ {0, small, large} (γ = λ/2) and records the
   number of dead units and the distance to the nearest dead-unit surface;
2. adds the control that removes the symmetry (``ms.remove_symmetries``: decay towards a fixed random
   point θ₀ instead of 0) at the large λ: no unit dies;
3. runs a full ``ms.diagnose`` with probe data on the collapsed network and writes its figures.

Run: ``python examples/monitor_collapse.py [--tiny] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mirrorsym as ms  # noqa: E402

pd.set_option("display.width", 160)


def teacher_data(n: int = 256, d: int = 8, hidden: int = 3, seed: int = 0):
    """x ~ N(0, I); y = Σ_k a_k tanh(w_kᵀx) + 0.01 noise, with 3 teacher units."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = 2 * torch.randn(hidden, d, generator=g) / d**0.5
    a = torch.randn(1, hidden, generator=g)
    return x, torch.tanh(x @ w.T) @ a.T + 0.01 * torch.randn(n, 1, generator=g)


def student(width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))


def train(x, y, weight_decay: float, steps: int, every: int, syre: bool = False, lr: float = 0.5):
    """Full-batch SGD with coupled decay λ (or, with ``syre``, decay of strength λ towards θ₀);
    returns the model, the monitor and the per-unit norms at every record."""
    model = student()
    symmetries = ms.find_symmetries(model, x[:8])
    monitor = ms.SymmetryMonitor(model, x[:8], every=every, symmetries=symmetries)
    dead_group = symmetries.by_kind("sign_flip")[0]          # one sign flip per hidden unit
    if syre:
        # optimizer mode leaves the model's parameters (and names) alone and, after every step, pulls them
        # towards the fixed random point θ₀: φ ← φ − lr·λ·(φ − θ₀)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        ms.remove_symmetries(model, sigma=0.01, seed=0, mode="optimizer", weight_decay=weight_decay, optimizer=opt)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    norms = []
    for _ in range(steps + 1):
        if monitor.step() is not None:                        # a record was taken at this step
            norms.append(dead_group.unit_matrix(model).norm(dim=1))
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, monitor, torch.stack(norms), loss.item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("MIRRORSYM_TINY")),
                        help="test sizes (also set by the MIRRORSYM_TINY environment variable)")
    parser.add_argument("--out", type=Path, default=Path("out/monitor_collapse"), help="folder for the figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps, every = (400, 50) if args.tiny else (4000, 100)
    x, y = teacher_data()

    # 1-2. Train with three weight decays and the symmetry-removal control ------------------------------
    runs = {"λ = 0": (0.0, False), "λ = 0.005": (0.005, False), "λ = 0.02": (0.02, False),
            "λ = 0.02, symmetry removed": (0.02, True)}
    results = {}
    for label, (wd, syre) in runs.items():
        results[label] = train(x, y, wd, steps, every, syre=syre)
        model, monitor, norms, loss = results[label]
        last = monitor.history.query("kind == 'sign_flip'").iloc[-1]
        print(f"{label:28s} loss {loss:.2e}  dead units {int(last['dead']):2d}/16  "
              f"distance to the nearest dead-unit surface {last['distance']:.1e}")

    print("\nmonitor.history (last records of λ = 0.02):")
    print(results["λ = 0.02"][1].history.tail(4))

    # 3. A full diagnosis of the collapsed network, with probe data --------------------------------------
    collapsed = results["λ = 0.02"][0]
    rep = ms.diagnose(collapsed, x[:8], data=x)
    print("\n" + rep.summary())
    print(rep.activations)
    paths = rep.plot(args.out / "diagnose")
    print("diagnose figures:", [p.name for p in paths])

    # Figures --------------------------------------------------------------------------------------------
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
    for label, (_, monitor, _, _) in results.items():
        h = monitor.history.query("kind == 'sign_flip'")
        ax[0].plot(h["step"], h["dead"], marker=".", label=label)
        ax[1].semilogy(h["step"], h["distance"].clip(lower=1e-12), label=label)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("dead units (of 16)")
    ax[0].set_title("Dead units (diagnose: ‖unit‖ ≤ 10⁻³ · max over units)")
    ax[0].legend(fontsize=8)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("min over units of ‖θ_unit‖")
    ax[1].set_title("Distance to the nearest dead-unit surface")
    steps_axis = results["λ = 0.02"][1].history.query("kind == 'sign_flip'")["step"].to_numpy()
    for label, color in (("λ = 0.02", "tab:green"), ("λ = 0.02, symmetry removed", "tab:red")):
        norms = results[label][2]
        ax[2].semilogy(steps_axis, norms.clamp_min(1e-12).numpy(), color=color, lw=0.8, alpha=0.8)
        ax[2].plot([], [], color=color, label=label)
    ax[2].set_xlabel("step")
    ax[2].set_ylabel("‖(w_in, b, w_out)‖ per unit")
    ax[2].set_title("Every hidden unit: plain decay vs symmetry removed")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "collapse.png", dpi=110)
    plt.close(fig)
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
