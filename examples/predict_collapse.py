"""Tutorial: predict collapse with the critical weight decay γ_c and the critical learning rate.

Two predictions of the theory (docs/theory.md), each checked against training:

1. **Weight decay.** A dead tanh unit (w_j = 0, b_j = 0, a_j = 0) sits on the surface of a sign-flip mirror.
   ``ms.theory.critical_weight_decay`` computes γ_c = max(0, −λ_min(OᵀHO)/2) matrix-free; for this model it
   equals closed form B, ‖mean(r x̃)‖. Kicked off the surface, gradient descent returns to it iff γ > γ_c.
2. **Gradient noise.** For the double well ℓ_i(θ) = ½h_iθ² + ¼θ⁴ with h ∈ {+1, −3} and batch size 1, the
   surface θ = 0 is a maximum of the expected loss, yet SGD collapses onto it for η ∈ (2/3, (1 + √7)/3):
   the Lyapunov exponent Λ(η) = ½[log|1 − η| + log|1 + 3η|] is negative there.
   ``ms.theory.lyapunov_exponent`` / ``critical_learning_rate`` find that window; the second-order
   formula 2|μ|/(μ² + s²) = 0.4 does not.

Run: ``python examples/predict_collapse.py [--tiny] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import mirrorsym as ms  # noqa: E402


# ------------------------------------------------------------------------ part 1: a dead tanh unit
def tanh_problem(n: int = 64, hidden: int = 4):
    """f(x) = Σ_j a_j tanh(w_jᵀx + b_j) fitted to a smooth target, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = (torch.tanh(x @ torch.randn(2, 3, generator=g, dtype=torch.float64)).sum(1, keepdim=True)
         + 0.5 * torch.sin(2 * x[:, :1]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False)).double()
    return model, x, y


def gradient_descent(loss, params: dict, batch, gamma: float, lr: float, steps: int, mirror=None, record=False):
    """Full-batch GD on L + γ‖θ‖² (torch weight_decay = 2γ); optionally records the distance to ``mirror``."""
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(list(p.values()), lr=lr, weight_decay=ms.theory.torch_weight_decay(gamma))
    trace = []
    for _ in range(steps):
        if record:
            trace.append(mirror.distance({k: v.detach() for k, v in p.items()}).item())
        opt.zero_grad()
        loss(p, batch).backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}, trace


def closed_form_b(model, params, x, y) -> float:
    """γ_c of a dead unit of a tanh network with L = mean (y − f)²: ‖mean(r x̃)‖, x̃ = (x, 1)."""
    r = (y - functional_call(model, params, (x,))).squeeze(1)
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return (r[:, None] * xt).mean(0).norm().item()


# ------------------------------------------------------------------------ part 2: the double well
def double_well_loss(params, batch):
    """Mean over the batch of ½ h θ² + ¼ θ⁴ (the noise theory needs a mean of per-sample losses)."""
    (h,) = batch
    theta = params["theta"]
    return (0.5 * h * theta**2 + 0.25 * theta**4).mean()


def exact_lyapunov(eta: float) -> float:
    return 0.5 * (math.log(max(abs(1 - eta), 1e-300)) + math.log(abs(1 + 3 * eta)))


def simulate_sgd(eta: float, steps: int, theta0: float = 0.01, seed: int = 0) -> np.ndarray:
    """Batch-1 SGD on the double well from θ = ``theta0``: |θ_t|. (The quartic keeps the iterates bounded
    only for small steps; a run that leaves |θ| < 10⁶ is cut short and padded with NaN.)"""
    g = torch.Generator().manual_seed(seed)
    hs = torch.where(torch.rand(steps, generator=g) < 0.5, 1.0, -3.0).tolist()
    theta, out = theta0, []
    for h in hs:
        theta = theta - eta * (h * theta + theta**3)
        if not abs(theta) < 1e6:
            break
        out.append(abs(theta))
    return np.maximum(np.array(out + [math.nan] * (steps - len(out))), 1e-300)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("MIRRORSYM_TINY")),
                        help="test sizes (also set by the MIRRORSYM_TINY environment variable)")
    parser.add_argument("--out", type=Path, default=Path("out/predict_collapse"), help="folder for the figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    on_steps, off_steps, sgd_steps = (400, 600, 300) if args.tiny else (3000, 3000, 2000)

    # 1. Critical weight decay ---------------------------------------------------------------------------
    model, x, y = tanh_problem()
    params = {k: v.detach() for k, v in model.named_parameters()}   # 0.weight, 0.bias, 2.weight

    # the one loss convention: loss(params, batch); mean of squares (not F.mse_loss) keeps the fast HVP path
    loss = ms.loss_from_model(model, lambda out, target: ((out - target) ** 2).mean())
    data = (x, y)
    dead = ms.Mirror.sign_flip({"0.weight": (0, [0]), "0.bias": (0, [0]), "2.weight": (1, [0])})
    # Gradient descent started on the surface never leaves it (Theorem 1.1): train the other units there.
    base, _ = gradient_descent(loss, dead.project(params), data, 0.0, 0.1, on_steps)
    print(f"after {on_steps} GD steps from the surface: distance {dead.distance(base).item():.1e}")
    gc0 = ms.theory.critical_weight_decay(loss, base, dead, data)
    print(f"γ_c = {gc0.gamma:.4f} (matrix-free, {gc0.hvps} HVPs); closed form B ‖mean(r x̃)‖ = "
          f"{closed_form_b(model, base, x, y):.4f}; torch weight_decay = {gc0.torch_weight_decay:.4f}")
    # γ_c depends on where on the surface the other units sit, and decay moves them: so for each γ, first
    # train on the surface at that γ (θ_S(γ)), then compare γ with the threshold γ_c(θ_S(γ)) there.
    traces = {}
    for gamma in (0.01, 0.02, 0.03, 0.045):
        on, _ = gradient_descent(loss, base, data, gamma, 0.1, on_steps)     # θ_S(γ): the minimum on S
        gc = ms.theory.critical_weight_decay(loss, on, dead, data).gamma      # the threshold *there*
        op = ms.theory.projected_hessian(loss, on, dead, data).to_dense()
        softest = torch.linalg.eigh(op).eigenvectors[:, 0]                   # the direction γ_c is about
        kick = dead.direction(1e-3 * softest, on)
        start = {k: on[k] + kick[k] for k in on}
        _, trace = gradient_descent(loss, start, data, gamma, 0.1, off_steps, mirror=dead, record=True)
        traces[gamma / gc] = trace
        verdict = "returns" if trace[-1] < trace[0] else "escapes"
        print(f"γ = {gamma:.4f} = {gamma / gc:.2f} γ_c(θ_S(γ)): distance {trace[0]:.1e} → {trace[-1]:.1e} ({verdict})")

    # 2. Critical learning rate: the double well -----------------------------------------------------------
    h = torch.tensor([1.0, -3.0], dtype=torch.float64)          # two samples, batch size 1
    theta0 = {"theta": torch.zeros(1, dtype=torch.float64)}
    flip = ms.Mirror.sign_flip({"theta": (0, [0])})
    res = ms.theory.critical_learning_rate(double_well_loss, theta0, flip, (h,), batch_size=1)
    print(f"\ndouble well: collapse window ({res.value:.4f}, {res.upper:.4f}); exact (2/3, (1+√7)/3) = "
          f"({2 / 3:.4f}, {(1 + math.sqrt(7)) / 3:.4f}); second order 2|μ|/(μ²+s²) = {res.second_order:.3f} "
          f"(μ = {res.mu:g}, s² = {res.s2:g})")
    etas = np.linspace(0.05, 1.45, 15 if args.tiny else 57)
    curv = ms.theory.minibatch_curvature(double_well_loss, theta0, flip, (h,))   # per-sample blocks, once
    curve = curv.lyapunov_curve(etas.tolist(), batch_size=1)
    lam_09 = ms.theory.lyapunov_exponent(double_well_loss, theta0, flip, (h,), lr=0.9, batch_size=1)
    print(f"Λ(0.9) = {lam_09.value:.5f} ({lam_09.method}); exact {exact_lyapunov(0.9):.5f}")
    sims = {eta: simulate_sgd(eta, sgd_steps) for eta in (0.2, 0.4, 0.9, 1.1)}
    for eta, traj in sims.items():
        print(f"SGD at η = {eta}: |θ| after {sgd_steps} steps = {traj[-1]:.1e}")

    # Figures ----------------------------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for ratio, trace in traces.items():
        ax.semilogy(trace, label=f"γ = {ratio:.2f} γ_c")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("distance to the dead-unit surface")
    ax.set_title("Kicked off the surface: returns iff γ > γ_c")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "critical_weight_decay.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    fine = np.linspace(0.01, 1.5, 600)
    ax[0].plot(fine, [exact_lyapunov(e) for e in fine], color="gray", label="exact ½[log|1−η| + log|1+3η|]")
    ax[0].plot(etas, curve.values.numpy(), "o", ms=4, color="C0", label="ms.theory (per-sample curvature)")
    ax[0].axhline(0, color="k", lw=0.8)
    ax[0].axvspan(res.value, res.upper, color="C2", alpha=0.15, label="collapse window (critical_learning_rate)")
    ax[0].axvline(res.second_order, color="C3", ls="--", label=f"second order 2|μ|/(μ²+s²) = {res.second_order:.2f}")
    ax[0].set_ylim(-1.5, 1.0)
    ax[0].set_xlabel("learning rate η")
    ax[0].set_ylabel("Lyapunov exponent Λ")
    ax[0].set_title("Double well, batch 1: Λ < 0 ⇒ SGD collapses onto θ = 0")
    ax[0].legend(fontsize=7)
    for eta, traj in sims.items():
        ax[1].semilogy(traj, label=f"η = {eta}")
    ax[1].set_ylim(1e-40, 10)
    ax[1].set_xlabel("SGD step")
    ax[1].set_ylabel("|θ|")
    ax[1].set_title("Simulated SGD from θ = 0.01")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "critical_learning_rate.png", dpi=110)
    plt.close(fig)
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
