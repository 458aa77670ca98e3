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
decay towards 0 (L2) keeps it too. Removing the symmetry (syre, docs/theory.md#syre: decay towards a
fixed random θ₀) makes the surface non-stationary, and the latents that should be active leave it. Part 1
trains a grid of (β, σ²) from a generic init and compares active latents, latent variances and KLs with the
formulas above; part 2 starts every method on the collapsed surface.

Training runs on the sweep engine (``ctx.sweep``: vmapped copies, local or Ray, any device), every run
full-batch Adam (torch's coupled ``weight_decay`` λ, γ = λ/2) with the cosine learning-rate decay to 0,
η_t = lr·½(1 + cos(πt/steps)), so that the end point is converged. The model's forward is L itself at
S = xᵀx/B (:class:`VAE`; B = N, so S is the data's), the criterion the identity.

* Part 1: one sweep, one run per grid cell; run ``seed`` i is cell i (β, σ² are buffers of the copy),
  initialised with 0.3·N(0, 1) entries of E and D from the generator of seed ``ctx.seed + cfg.seed + 1 + i``
  (formerly slices of one draw for a hand-batched model; same distribution, other values).
* Part 2: E = D = 0, log s² = 0. plain: λ = 0; L2: λ = ``syre_weight_decay`` on every parameter; syre:
  the same λ with ``decay_to_offset_sigma`` = σ₀, i.e. the gradient gets λ(θ − θ₀) with θ₀ ~ N(0, σ₀²I)
  drawn per run from its seed. With Adam's coupled decay this is exactly training θ = θ₀ + ψ with decay
  λψ on ψ, what ``remove_symmetries(vae, sigma=σ₀, params=["enc", "dec"])`` did (tested to round-off in
  tests/test_collapse_experiments.py). σ₀ means the same: ``remove_symmetries`` scales θ₀ by each
  tensor's init scale, which is 1 for the all-zero E and D, so its ``sigma`` was already an absolute σ₀.
  The engine decays *every* parameter towards its θ₀, log s² included, where syre had decayed log s²
  towards 0 (it was not in ``params``); :class:`VAE` therefore stores log s² + a with a = the engine's θ₀
  of that tensor (:func:`surface_vae`), which makes the engine's decay of log s² a decay towards 0 again.
  What differs from the former runs: θ₀ is the engine's counter-based draw of each run's seed
  (``ctx.seed + cfg.seed + 7 + s``) instead of ``torch.Generator(seed)``'s (same distribution, other
  values). Main control σ₀ = 0.01 (the library default) over ``syre_seeds`` seeds; the σ₀ sweep
  (``sigma_sweep``) on the first seed, one sweep per σ₀ (the factory needs σ₀ for the anchor a).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

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


def neg_elbo(E: torch.Tensor, D: torch.Tensor, logvar: torch.Tensor, S: torch.Tensor, beta, sigma2) -> torch.Tensor:
    """L of the module docstring at data second moment S (d, d). Leading batch dimensions broadcast: E
    (..., k, d), D (..., d, k), log s² (..., k), β and σ² scalars or (...,); returns (...)."""
    s2 = logvar.exp()
    R = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device) - D @ E
    rec = (R @ S * R).sum((-2, -1)) + (s2 * (D**2).sum(-2)).sum(-1)
    ese = ((E @ S) * E).sum(-1)
    kl = 0.5 * (ese + s2 - logvar - 1).sum(-1)
    return rec / (2 * sigma2) + beta * kl


class LinearVAE(nn.Module):
    """The linear VAE of the module docstring; ``batch`` leading copies, trained as one hand-batched model
    (used by :mod:`~mirrorsym.experiments.discriminating`; this experiment trains :class:`VAE` copies on
    the sweep engine)."""

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
        return neg_elbo(self.enc, self.dec, self.logvar, S, beta, sigma2)

    @torch.no_grad()
    def posterior(self, X: torch.Tensor, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ (N, k), logvar (N, k)) of q(z|x) for one copy."""
        mu = X @ self.enc[copy].detach().T
        return mu, self.logvar[copy].detach().expand_as(mu)


class VAE(nn.Module):
    """One copy of the linear VAE, as the sweep engine trains it: ``forward(x)`` is the loss L (see
    :func:`neg_elbo`) at S = xᵀx/B, the second moment of the minibatch x (B, d) — on the full batch the
    data's S — so the criterion is :func:`loss_value`. β and σ² are buffers (one value per copy).

    Parameters ``enc`` E (k, d), ``dec`` D (d, k) and ``logvar_raw`` = log s² + a, with a constant a
    (buffer ``logvar_anchor``; 0 unless given). Started at log s² = 0. The engine's decay with
    ``decay_to_offset_sigma`` pulls every parameter towards its own θ₀; passing a = θ₀ of this tensor
    (see :func:`surface_vae`) turns that pull into decay of log s² towards 0, so that only (E, D) are
    decayed towards a random point, as ``remove_symmetries(params=["enc", "dec"])`` does."""

    logvar_anchor: torch.Tensor  # buffers (typed for the checker: nn.Module's __getattr__ is untyped)
    beta: torch.Tensor
    sigma2: torch.Tensor

    def __init__(self, d: int, k: int, beta: float, sigma2: float, init_seed: int | None,
                 logvar_anchor: torch.Tensor | None = None, dtype=torch.float64):
        super().__init__()
        if init_seed is None:  # on the collapsed surface
            self.enc = nn.Parameter(torch.zeros(k, d, dtype=dtype))
            self.dec = nn.Parameter(torch.zeros(d, k, dtype=dtype))
        else:
            gen = torch.Generator().manual_seed(init_seed)
            self.enc = nn.Parameter(0.3 * torch.randn(k, d, generator=gen, dtype=dtype))
            self.dec = nn.Parameter(0.3 * torch.randn(d, k, generator=gen, dtype=dtype))
        anchor = torch.zeros(k, dtype=dtype) if logvar_anchor is None else logvar_anchor.to(dtype)
        self.logvar_raw = nn.Parameter(anchor.clone())
        self.register_buffer("logvar_anchor", anchor.clone())
        self.register_buffer("beta", torch.tensor(float(beta), dtype=dtype))
        self.register_buffer("sigma2", torch.tensor(float(sigma2), dtype=dtype))

    @property
    def logvar(self) -> torch.Tensor:
        """log s² (k,)."""
        return self.logvar_raw - self.logvar_anchor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.T @ x / x.shape[0]
        return neg_elbo(self.enc, self.dec, self.logvar, S, self.beta, self.sigma2)

    @torch.no_grad()
    def posterior(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ (N, k), logvar (N, k)) of q(z|x)."""
        mu = X @ self.enc.detach().T
        return mu, self.logvar.detach().expand_as(mu)

    def load_params(self, params: dict[str, torch.Tensor]) -> VAE:
        """Set the parameters (e.g. a sweep row's ``final_params``), keeping the buffers."""
        own = dict(self.named_parameters())
        if set(params) != set(own):
            raise KeyError(f"expected parameters {sorted(own)}, got {sorted(params)}")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(params[name])
        return self


def loss_value(out: torch.Tensor) -> torch.Tensor:
    """The sweep criterion: :class:`VAE`'s forward already is the loss (a mean over the batch)."""
    return out


def grid_vae(d: int, k: int, cells: tuple[tuple[float, float], ...], init_seed: int, seed: int) -> VAE:
    """Model factory of part 1: run ``seed`` is grid cell ``cells[seed]`` = (β, σ²), initialised with
    0.3·N(0, 1) entries from the generator of seed ``init_seed + seed``."""
    beta, sigma2 = cells[seed]
    return VAE(d, k, beta, sigma2, init_seed + seed)


def surface_vae(d: int, k: int, beta: float, sigma2: float, sigma0: float, seed: int) -> VAE:
    """Model factory of part 2: E = D = 0, log s² = 0. With ``sigma0`` > 0 (the run's
    ``decay_to_offset_sigma``), ``logvar_anchor`` is the engine's θ₀ of ``logvar_raw``, σ₀ ·
    ``rng.gaussian(seed, OFFSET, 0, i)`` with i its position in ``named_parameters()`` (the engine's
    documented draw), so that log s² decays towards 0 while E and D decay towards their θ₀."""
    from ..sweep import rng

    vae = VAE(d, k, beta, sigma2, None)
    if sigma0 > 0:
        i = list(dict(vae.named_parameters())).index("logvar_raw")
        anchor = sigma0 * rng.gaussian(seed, rng.OFFSET, 0, i, (k,), torch.float64)
        vae = VAE(d, k, beta, sigma2, None, logvar_anchor=anchor)
    return vae


def measure(vae: VAE, X: torch.Tensor) -> dict:
    mu, logvar = vae.posterior(X)
    var = mu.var(0, unbiased=False)
    kl = gaussian_kl_per_latent(mu, logvar)
    return {"active": int(active_latents(mu).sum()), "variance": sorted(var.tolist(), reverse=True),
            "kl": sorted(kl.tolist(), reverse=True)}


def adam_cosine(cfg: Config, X: torch.Tensor, steps: int) -> dict:
    """The grid settings every run shares: full-batch Adam, cosine learning-rate decay to 0 over ``steps``."""
    return {"lr": cfg.lr, "batch_size": X.shape[0], "steps": steps, "optimizer": "adam", "lr_schedule": "cosine"}


def trained(sweep, ctx: Context, store: str) -> list[VAE]:
    """Run ``sweep`` through ``ctx.sweep`` into ``store``; the trained models in grid order."""
    from ..sweep import final_params

    out = []
    for _, row in ctx.sweep(sweep, store).iterrows():
        if row["status"] != "ok":
            raise RuntimeError(f"posterior: run {dict(row)} diverged")
        out.append(sweep.problem.model_factory(int(row["seed"])).load_params(final_params(row)))
    return out


def run(cfg: Config, ctx: Context) -> dict:
    from ..sweep import Sweep

    X = make_data(cfg, ctx.generator(cfg.seed))
    d = X.shape[1]
    cells = tuple((b, s) for b in cfg.betas for s in cfg.sigma2s)
    sweep = Sweep(partial(grid_vae, d, cfg.latents, cells, ctx.seed + cfg.seed + 1), loss_value, X,
                  {**adam_cosine(cfg, X, cfg.steps), "seed": list(range(len(cells)))}, record_every=10**9,
                  name="posterior-grid", keep_params=True)
    rows = [{"beta": b, "sigma2": s, "predicted": predicted(cfg.spectrum, cfg.latents, b, s),
             "measured": measure(vae, X)} for vae, (b, s) in zip(trained(sweep, ctx, "sweep-grid"), cells, strict=True)]
    surface = surface_runs(X, cfg, ctx)
    return {"spectrum": list(cfg.spectrum), "grid": rows, **surface,
            "surface_predicted": predicted(cfg.spectrum, cfg.latents, cfg.surface_beta, cfg.surface_sigma2)}


def surface_runs(X: torch.Tensor, cfg: Config, ctx: Context) -> dict:
    """Part 2: every run starts with every latent collapsed (E = 0, D = 0, log s² = 0) and trains with
    plain Adam (λ = 0), L2 (λ = ``syre_weight_decay`` on every parameter) or syre (the same λ, with E and
    D decayed towards θ₀ ~ N(0, σ₀²I), the engine's ``decay_to_offset_sigma``, and log s² towards 0).
    Offset seeds ``ctx.seed + cfg.seed + 7 + s``, s < ``syre_seeds``, at σ₀ = ``syre_sigma``; the σ₀ sweep
    uses the first of them. One sweep per σ₀ (the factory needs σ₀ for the anchor of log s²)."""
    from ..sweep import Sweep

    d, k = X.shape[1], cfg.latents
    seeds = [ctx.seed + cfg.seed + 7 + s for s in range(cfg.syre_seeds)]
    base = adam_cosine(cfg, X, cfg.surface_steps)
    shape = (d, k, cfg.surface_beta, cfg.surface_sigma2)

    def sweep(sigma0: float, grid, name: str) -> list[dict]:
        s = Sweep(partial(surface_vae, *shape, sigma0), loss_value, X, grid, record_every=10**9,
                  name=f"posterior-{name}", keep_params=True)
        return [surface_measure(vae, X) for vae in trained(s, ctx, f"sweep-{name}")]

    plain, l2 = sweep(0.0, [{**base, "seed": seeds[0]},
                            {**base, "seed": seeds[0], "weight_decay": cfg.syre_weight_decay}], "surface")
    by_sigma = {}
    sigmas = sorted({cfg.syre_sigma, *cfg.sigma_sweep})
    for sigma0 in ctx.track(sigmas, "posterior: syre σ₀ sweep"):
        runs = seeds if sigma0 == cfg.syre_sigma else seeds[:1]
        by_sigma[sigma0] = sweep(sigma0, {**base, "seed": runs, "weight_decay": cfg.syre_weight_decay,
                                          "decay_to_offset_sigma": sigma0}, f"syre-{sigma0:g}")
    syre_seeds = by_sigma[cfg.syre_sigma]
    return {"surface": {"plain": plain, "l2": l2, "syre": syre_seeds[0]}, "syre_seeds": syre_seeds,
            "sigma_sweep": [{"sigma": s, **by_sigma[s][0]} for s in cfg.sigma_sweep]}


def surface_measure(vae: VAE, X: torch.Tensor) -> dict:
    out = measure(vae, X)
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
