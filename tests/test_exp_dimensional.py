"""The dimensional experiment's building blocks against independent references: batched InfoNCE, the
learned part ψ = θ − θ₀ of the batched symmetry-removal model, collapse counts against numpy, and the σ₀
sweep in the results."""

import math
from dataclasses import replace

import numpy as np
import torch

from mirrorsym.experiments import dimensional
from mirrorsym.experiments.base import Context


def test_batched_info_nce_is_one_loss_per_copy():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 7, 4, generator=g, dtype=torch.float64), torch.randn(3, 7, 4, generator=g,
                                                                               dtype=torch.float64)
    batched = dimensional.info_nce(z1, z2, 0.5)
    assert batched.shape == (3,)
    for s in range(3):
        assert math.isclose(float(batched[s]), float(dimensional.info_nce(z1[s], z2[s], 0.5)), rel_tol=1e-12)


def test_offsets_are_the_library_offsets_scaled_per_copy_and_psi_is_theta_minus_offset():
    cfg = replace(dimensional.CONFIGS["tiny"], steps=0, seeds=(0, 1), syre_sigmas=(0.01, 1.0))
    X = torch.randn(50, 64, generator=torch.Generator().manual_seed(5))
    variants = ["projector", "syre σ₀=0.01", "syre σ₀=1"]
    out = dimensional.train_variants(variants, X, cfg)
    S, d = len(cfg.seeds), X.shape[1]
    init = torch.stack([torch.randn(cfg.rep_dim, d, generator=torch.Generator().manual_seed(cfg.seed + 1 + 100 * s))
                        / math.sqrt(d) for s in cfg.seeds])
    stacked = init.repeat(len(variants), 1, 1).double()
    # remove_symmetries(sigma=1): θ₀ = init std × N(0, 1) from its generator, encoder first
    xi = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(cfg.seed + 2), dtype=torch.float64)
    base = xi * stacked.std()
    for j, (v, sigma) in enumerate(zip(variants, (0.0, 0.01, 1.0), strict=True)):
        theta, psi = out[v]["theta"].double(), out[v]["psi"].double()
        assert torch.allclose(theta, init.double(), atol=1e-6)  # the function is unchanged at init
        assert torch.allclose(psi, theta - sigma * base[j * S:(j + 1) * S], atol=1e-6)
    assert torch.equal(out["projector"]["psi"], out["projector"]["theta"])  # plain decay: θ₀ = 0


def _numpy_collapsed(r, tol):
    ev = np.sort(np.linalg.eigvalsh(np.cov(r, rowvar=False)))[::-1]
    return int((ev <= tol * ev[0]).sum())


def test_collapse_counts_on_the_learned_part_cannot_be_passed_by_the_offset():
    cfg = replace(dimensional.CONFIGS["tiny"], zero_tol=1e-5, n_probe_train=300)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (500,), generator=g)
    k = 10
    psi = torch.randn(cfg.rep_dim, k, generator=g, dtype=torch.float64) @ torch.randn(k, 64, generator=g,
                                                                                      dtype=torch.float64)
    offset = 0.1 * torch.randn(cfg.rep_dim, 64, generator=g, dtype=torch.float64)
    m = dimensional.measure(psi + offset, psi, X, y, cfg)
    assert m["collapsed_psi"] == _numpy_collapsed((X @ psi.T).numpy(), cfg.zero_tol) == cfg.rep_dim - k
    assert m["collapsed"] == _numpy_collapsed((X @ (psi + offset).T).numpy(), cfg.zero_tol) == 0  # θ₀ fills it
    ev = np.sort(np.linalg.eigvalsh(np.cov((X @ psi.T).numpy(), rowvar=False)))[::-1]
    np.testing.assert_allclose(m["psi_spectrum"][:k], ev[:k], rtol=1e-9)
    assert 0.0 <= m["probe_accuracy"] <= 1.0


def test_run_holds_the_sigma_sweep_and_the_default_sigma_control(tmp_path):
    cfg = replace(dimensional.CONFIGS["tiny"], steps=20, seeds=(0, 1), syre_sigmas=(0.001, 0.01, 0.1, 1.0))
    results = dimensional.run(cfg, Context(out_dir=tmp_path))
    assert set(results["variants"]) == {"projector", "no_projector"} | {f"syre σ₀={s:g}" for s in cfg.syre_sigmas}
    assert all(len(rows) == 2 for rows in results["variants"].values())
    claims = dimensional.claims(results, cfg)
    control = [c for c in claims if "library default σ₀=0.01" in c.claim]
    assert len(control) == 2 and all(c.kind == "finding" and c.seeds == 2 for c in control)
    assert dimensional.plot(results, Context(out_dir=tmp_path))[0].exists()
