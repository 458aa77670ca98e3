"""Posterior collapse in a linear VAE: the exact per-direction threshold, and the mirror that traps it.

Model, as built (per sample x ∈ R^d, latent z ∈ R^k): encoder q(z|x) = N(Ex, diag(s²)) with a learned
per-latent variance s_j² (parameter ``logvar``), decoder p(x|z) = N(Dz, σ²I) with a *fixed* σ², prior
N(0, I). Loss = the β-weighted negative ELBO, a mean over the data, with the Gaussian expectation over z
in closed form (constant (d/2)·log 2πσ² dropped)::

    L = (1/2σ²)·[tr((I − DE) S (I − DE)ᵀ) + Σ_j s_j² ‖D_{:j}‖²] + (β/2)·Σ_j [(E S Eᵀ)_jj + s_j² − log s_j² − 1]

with S = (1/N) Σ x xᵀ the data second-moment matrix, here built to be exactly Q diag(λ) Qᵀ.

Derivation of the threshold. The loss decouples over eigen-directions of S: take latent j with
decoder column a·q_i and encoder row b·q_iᵀ (q_i the eigenvector of λ_i). Its part of L is
ℓ(a, b, s) = (1/2σ²)[(1 − ab)²λ + s²a²] + (β/2)[b²λ + s² − log s² − 1]. Minimising in closed form:
∂ℓ/∂s² = 0 gives s² = βσ²/(βσ² + a²); ∂ℓ/∂b = 0 gives b = a/(a² + βσ²). Substituting, with c = βσ²,
ℓ(a) = (β/2)·[λ/(a² + c) + log((a² + c)/c)], whose derivative in u = a² is (β/2)(u + c − λ)/(u + c)².
Hence **a² = max(0, λ − βσ²)**: direction i is learned iff λ_i > βσ² and otherwise the latent collapses
(a = b = 0, s² = 1: q(z|x) = prior). At the optimum, for λ > c:

* Var_x E[z_j|x] = b²λ = 1 − βσ²/λ (the active-unit statistic of docs/theory.md#metrics);
* per-latent KL = ½ log(λ/(βσ²)), and 0 for a collapsed latent.

So the number of active latents is min(k, #{λ_i > βσ²}). (β = 1 is the pPCA result of Lucas et al. 2019.)

The symmetry. (E_j, D_{:j}) → (−E_j, −D_{:j}) (latent j's encoder row and decoder column) leaves L
unchanged: a sign-flip mirror whose surface E_j = 0, D_{:j} = 0 *is* the collapsed latent. Theorem 1
makes it absorbing: started on it, gradient descent never leaves it even where λ_i > βσ² (a saddle), and
decay towards 0 (L2) keeps it too. Removing the symmetry (:func:`mirrorsym.remove_symmetries`: decay
towards a fixed random θ₀) makes the surface non-stationary, and the latents that should be active leave
it. Part 1 trains a grid of (β, σ²) from a generic init and compares active latents, latent variances and
KLs with the formulas above; part 2 starts every method on the collapsed surface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..constrain.remove import remove_symmetries
from ..diagnose.metrics import ACTIVE_LATENT_THRESHOLD, active_latents, gaussian_kl_per_latent
from .base import Claim, Context, finding
from .plotting import figure, save

NAME = "posterior"
TITLE = "Posterior collapse in a linear VAE: exact threshold λ > βσ², and the sign mirror that traps latents"

_MID = 2 * math.sqrt(2)  # thresholds at geometric midpoints between spectrum values 4·2^-i


@dataclass(frozen=True)
class Config:
    spectrum: tuple[float, ...] = tuple(4.0 * 0.5**i for i in range(8))
    latents: int = 8
    n: int = 2000
    betas: tuple[float, ...] = (0.5, 1.0, 2.0)
    sigma2s: tuple[float, ...] = (_MID * 0.5, _MID * 0.5**3, _MID * 0.5**5)
    lr: float = 0.03
    steps: int = 8000
    # part 2: start on the collapsed surface
    surface_beta: float = 1.0
    surface_sigma2: float = _MID * 0.5**3
    surface_steps: int = 3000
    syre_weight_decay: float = 1e-3  # torch λ on (E, D) for L2 and syre (γ = λ/2)
    syre_sigma: float = 0.01  # the library default σ₀
    syre_seeds: int = 5  # offsets θ₀ drawn per seed: the finding's seeds
    sigma_sweep: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # σ₀ sweep beside the default (first seed)
    kl_tol: float = 1e-3
    seed: int = 0


CONFIGS = {
    "tiny": Config(spectrum=tuple(4.0 * 0.5**i for i in range(4)), latents=4, n=400,
                   betas=(1.0,), sigma2s=(_MID * 0.5, _MID * 0.5**3), steps=3000, surface_steps=1500),
    "quick": Config(),
    "full": Config(spectrum=tuple(4.0 * 0.5**i for i in range(12)), latents=12, n=10000,
                   betas=(0.25, 0.5, 1.0, 2.0, 4.0), sigma2s=tuple(_MID * 0.5**k for k in range(0, 9, 2)),
                   steps=10000, surface_steps=10000),
}


def make_data(cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """X (N, d), exactly zero-mean, whose covariance XᵀX/N is exactly Q diag(λ) Qᵀ, Q a random orthogonal
    matrix (the columns of G are centred, then orthonormalised: they stay orthogonal to the ones vector)."""
    d = len(cfg.spectrum)
    G = torch.randn(cfg.n, d, generator=gen, dtype=torch.float64)
    G, _ = torch.linalg.qr(G - G.mean(0))
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.tensor(cfg.spectrum, dtype=torch.float64)
    return math.sqrt(cfg.n) * G * lam.sqrt() @ Q.T


def predicted(spectrum, latents: int, beta: float, sigma2: float) -> dict:
    """The closed forms of the module docstring, per latent, sorted by λ descending."""
    lam = np.sort(np.asarray(spectrum, dtype=float))[::-1][:latents]
    c = beta * sigma2
    on = lam > c
    return {"active": int(on.sum()), "threshold": c,
            "variance": np.where(on, 1 - c / lam, 0.0).tolist(),
            "kl": np.where(on, 0.5 * np.log(np.maximum(lam, 1e-300) / c), 0.0).tolist()}


class LinearVAE(nn.Module):
    """The linear VAE of the module docstring; ``batch`` leading copies (vectorised grid)."""

    def __init__(self, d: int, k: int, batch: int, gen: torch.Generator | None, dtype=torch.float64):
        super().__init__()
        shape_e, shape_d = (batch, k, d), (batch, d, k)
        if gen is None:  # on the collapsed surface
            self.enc = nn.Parameter(torch.zeros(shape_e, dtype=dtype))
            self.dec = nn.Parameter(torch.zeros(shape_d, dtype=dtype))
        else:
            self.enc = nn.Parameter(0.3 * torch.randn(shape_e, generator=gen, dtype=dtype))
            self.dec = nn.Parameter(0.3 * torch.randn(shape_d, generator=gen, dtype=dtype))
        self.logvar = nn.Parameter(torch.zeros(batch, k, dtype=dtype))

    def loss(self, S: torch.Tensor, beta: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
        """Per-copy loss (batch,) at data second moment S (d, d); β, σ² of shape (batch,)."""
        E, D, s2 = self.enc, self.dec, self.logvar.exp()
        R = torch.eye(S.shape[0], dtype=S.dtype) - D @ E
        rec = (R @ S * R).sum((1, 2)) + (s2 * (D**2).sum(1)).sum(1)
        ese = ((E @ S) * E).sum(2)
        kl = 0.5 * (ese + s2 - self.logvar - 1).sum(1)
        return rec / (2 * sigma2) + beta * kl

    @torch.no_grad()
    def posterior(self, X: torch.Tensor, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ (N, k), logvar (N, k)) of q(z|x) for one copy."""
        mu = X @ self.enc[copy].detach().T
        return mu, self.logvar[copy].detach().expand_as(mu)


def train(model: LinearVAE, X, beta, sigma2, lr, steps, weight_decay=0.0) -> None:
    S = X.T @ X / X.shape[0]
    """Full-batch Adam with a cosine learning-rate decay to 0 (so that the end point is converged)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        loss = model.loss(S, beta, sigma2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def measure(model: LinearVAE, X, copy: int) -> dict:
    mu, logvar = model.posterior(X, copy)
    var = mu.var(0, unbiased=False)
    kl = gaussian_kl_per_latent(mu, logvar)
    return {"active": int(active_latents(mu).sum()), "variance": sorted(var.tolist(), reverse=True),
            "kl": sorted(kl.tolist(), reverse=True)}


def run(cfg: Config, ctx: Context) -> dict:
    X = make_data(cfg, ctx.generator(cfg.seed))
    d = X.shape[1]
    grid = [(b, s) for b in cfg.betas for s in cfg.sigma2s]
    beta = torch.tensor([b for b, _ in grid], dtype=torch.float64)
    sigma2 = torch.tensor([s for _, s in grid], dtype=torch.float64)
    vae = LinearVAE(d, cfg.latents, len(grid), ctx.generator(cfg.seed + 1))
    train(vae, X, beta, sigma2, cfg.lr, cfg.steps)
    rows = [{"beta": b, "sigma2": s, "predicted": predicted(cfg.spectrum, cfg.latents, b, s),
             "measured": measure(vae, X, i)} for i, (b, s) in enumerate(grid)]
    surface = {m: surface_run(m, X, cfg) for m in ctx.track(("plain", "l2", "syre"), "posterior: from the surface")}
    syre_seeds = [surface["syre"]] + [surface_run("syre", X, cfg, offset_seed=cfg.seed + 7 + s)
                                      for s in range(1, cfg.syre_seeds)]
    sigma_sweep = [{"sigma": s, **surface_run("syre", X, cfg, sigma=s)} for s in cfg.sigma_sweep]
    return {"spectrum": list(cfg.spectrum), "grid": rows, "surface": surface, "syre_seeds": syre_seeds,
            "sigma_sweep": sigma_sweep,
            "surface_predicted": predicted(cfg.spectrum, cfg.latents, cfg.surface_beta, cfg.surface_sigma2)}


def surface_run(method: str, X: torch.Tensor, cfg: Config, offset_seed: int | None = None,
                sigma: float | None = None) -> dict:
    """Start with every latent collapsed (E = 0, D = 0) and train with plain Adam, L2 or syre (offset θ₀
    from ``offset_seed``, default ``cfg.seed + 7``, at σ₀ = ``sigma``, default ``cfg.syre_sigma``)."""
    vae = LinearVAE(X.shape[1], cfg.latents, 1, None)
    wd = 0.0
    if method in ("l2", "syre"):
        wd = cfg.syre_weight_decay
    if method == "syre":
        remove_symmetries(vae, sigma=cfg.syre_sigma if sigma is None else sigma,
                          seed=cfg.seed + 7 if offset_seed is None else offset_seed, params=["enc", "dec"])
    beta = torch.tensor([cfg.surface_beta], dtype=torch.float64)
    sigma2 = torch.tensor([cfg.surface_sigma2], dtype=torch.float64)
    train(vae, X, beta, sigma2, cfg.lr, cfg.surface_steps, weight_decay=wd)
    out = measure(vae, X, 0)
    with torch.no_grad():
        out["surface_distance"] = float(torch.sqrt((vae.enc**2).sum() + (vae.dec**2).sum()))
    return out


def plot(results: dict, ctx: Context) -> list:
    fig, ax = figure(3)
    grid = results["grid"]
    c = np.array([r["predicted"]["threshold"] for r in grid])
    lam = np.array(results["spectrum"])
    cs = np.geomspace(c.min() / 2, c.max() * 2, 200)
    ax[0, 0].plot(cs, [min(len(grid[0]["measured"]["variance"]), int((lam > x).sum())) for x in cs], "k-",
                  label="theory: #{λ_i > βσ²}")
    ax[0, 0].plot(c, [r["measured"]["active"] for r in grid], "o", label="measured active latents")
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("βσ² (β × decoder variance)")
    ax[0, 0].set_ylabel("active latents (Var_x E[z|x] > 0.01)")
    ax[0, 0].set_title("Collapse threshold λ = βσ²")
    ax[0, 0].legend()
    for r in grid:
        k = len(r["measured"]["variance"])
        x = lam[:k] / r["predicted"]["threshold"]
        ax[0, 1].plot(x, r["measured"]["variance"], "o", ms=3, color="C0")
        ax[0, 1].plot(x, r["measured"]["kl"], "s", ms=3, color="C1")
    xs = np.geomspace(1e-2, 1e2, 200)
    ax[0, 1].plot(xs, np.where(xs > 1, 1 - 1 / xs, 0), "C0-", lw=1, label="theory Var E[z|x] = 1 − βσ²/λ")
    ax[0, 1].plot(xs, np.where(xs > 1, 0.5 * np.log(np.maximum(xs, 1)), 0), "C1-", lw=1,
                  label="theory KL = ½ log(λ/βσ²)")
    ax[0, 1].set_xscale("log")
    ax[0, 1].set_xlabel("λ_i / (βσ²)")
    ax[0, 1].set_ylabel("per-latent statistic (sorted)")
    ax[0, 1].set_title("Per-latent variance and KL (dots: measured)")
    ax[0, 1].legend(fontsize=7)
    surf = results["surface"]
    k = len(surf["plain"]["variance"])
    for j, m in enumerate(surf):
        ax[0, 2].bar(np.arange(k) + 0.27 * (j - 1), surf[m]["variance"], width=0.27, label=m)
    ax[0, 2].plot(np.arange(k), results["surface_predicted"]["variance"], "k_", ms=14, mew=2, label="theory")
    ax[0, 2].axhline(ACTIVE_LATENT_THRESHOLD, color="gray", ls=":", lw=1, label="active-unit threshold 0.01")
    zero = [m for m in surf if max(surf[m]["variance"]) == 0]
    if zero:
        ax[0, 2].text(0.98, 0.5, f"{', '.join(zero)}: every latent exactly 0", transform=ax[0, 2].transAxes,
                      ha="right", fontsize=8)
    ax[0, 2].set_yscale("symlog", linthresh=1e-3)
    ax[0, 2].set_xlabel("latent (sorted by variance)")
    ax[0, 2].set_ylabel("Var_x E[z_j|x]")
    ax[0, 2].set_title("Started collapsed: only syre leaves the surface")
    ax[0, 2].legend(fontsize=7)
    return [save(fig, ctx.out_dir, "posterior")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    grid = results["grid"]
    pred = [r["predicted"]["active"] for r in grid]
    meas = [r["measured"]["active"] for r in grid]
    kl_err = max(float(np.max(np.abs(np.array(r["measured"]["kl"]) - np.array(r["predicted"]["kl"])))) for r in grid)
    var_err = max(float(np.max(np.abs(np.array(r["measured"]["variance"]) - np.array(r["predicted"]["variance"]))))
                  for r in grid)
    surf, sp = results["surface"], results["surface_predicted"]["active"]
    return [
        Claim(f"active latents = min(k, #{{λ_i > βσ²}}) at every (β, σ²) of the grid ({len(grid)} points)",
              pred, meas, pred == meas),
        Claim("per-latent KL = ½ log(λ/βσ²) (active), 0 (collapsed)", f"max error ≤ {cfg.kl_tol}", kl_err,
              kl_err <= cfg.kl_tol),
        Claim("per-latent Var_x E[z|x] = 1 − βσ²/λ (active), 0 (collapsed)", f"max error ≤ {cfg.kl_tol}",
              var_err, var_err <= cfg.kl_tol),
        Claim("started on the collapsed surface, plain training and L2 stay collapsed (Theorem 1)",
              {"plain": 0, "l2": 0}, {"plain": surf["plain"]["active"], "l2": surf["l2"]["active"]},
              surf["plain"]["active"] == 0 and surf["l2"]["active"] == 0),
        finding(f"started on the collapsed surface, syre at the default σ₀ = {cfg.syre_sigma:g} recovers the "
                "predicted active latents (one offset θ₀ per seed)", sp,
                {"per_seed": [r["active"] for r in results["syre_seeds"]],
                 "sigma_sweep": {str(r["sigma"]): r["active"] for r in results["sigma_sweep"]}},
                [abs(r["active"] - sp) for r in results["syre_seeds"]],
                statistic="|active latents after syre − predicted active latents|", better="lower",
                threshold=0.5, contradict=max(sp - 0.5, 0.5)),
    ]
