"""The dimensional experiment's building blocks against independent references: batched InfoNCE, the model
against the library's symmetry removal (init, θ₀, ψ), the engine run against remove_symmetries + torch SGD on
the documented minibatches and random inputs, the views' distribution against ``augment``, collapse counts
against numpy, and the σ₀ sweep in the results."""

import math
from dataclasses import replace

import numpy as np
import torch

from mirrorsym.constrain.remove import remove_symmetries
from mirrorsym.experiments import dimensional
from mirrorsym.experiments.base import Context
from mirrorsym.sweep import rng


def test_batched_info_nce_is_one_loss_per_copy():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 7, 4, generator=g, dtype=torch.float64), torch.randn(3, 7, 4, generator=g,
                                                                               dtype=torch.float64)
    batched = dimensional.info_nce(z1, z2, 0.5)
    assert batched.shape == (3,)
    for s in range(3):
        assert math.isclose(float(batched[s]), float(dimensional.info_nce(z1[s], z2[s], 0.5)), rel_tol=1e-12)


def _plain_init(cfg, d, r, projector=True):
    """Independent of the module: V, W ~ N(0, 1/fan_in) from torch generator 1 + 100 r, V first."""
    g = torch.Generator().manual_seed(1 + 100 * r)
    v = torch.randn(cfg.rep_dim, d, generator=g) / math.sqrt(d)
    w = torch.randn(cfg.emb_dim, cfg.rep_dim, generator=g) / math.sqrt(cfg.rep_dim) if projector else None
    return v, w


def _library_syre(cfg, d, r, sigma):
    """The library's symmetry removal of the same copy: a plain module, remove_symmetries(parametrize)."""
    v, w = _plain_init(cfg, d, r)
    m = torch.nn.Module()
    m.encoder, m.projector = torch.nn.Parameter(v.clone()), torch.nn.Parameter(w.clone())
    removal = remove_symmetries(m, sigma=sigma, seed=2 + 100 * r)
    return m, removal


def test_model_is_the_library_symmetry_removal_at_init():
    cfg = dimensional.CONFIGS["tiny"]
    d, r = 64, 3
    v, w = _plain_init(cfg, d, r)
    for sigma in (0.0, 0.01, 1.0):
        model = dimensional.make_model(d, cfg.rep_dim, cfg.emb_dim, sigma, cfg.keep, cfg.noise, r)
        assert torch.allclose(model.encoder_offset + model.encoder, v, atol=1e-7)  # θ_init: same for every σ
        assert torch.allclose(model.projector_offset + model.projector, w, atol=1e-7)
        if sigma == 0:
            assert not model.encoder_offset.any() and torch.equal(model.encoder, v)  # plain decay: θ = ψ
            continue
        lib, removal = _library_syre(cfg, d, r, sigma)
        assert torch.equal(model.encoder_offset, removal.offsets["encoder"])
        assert torch.equal(model.projector_offset, removal.offsets["projector"])
        assert torch.equal(model.encoder, lib.parametrizations.encoder.original)  # ψ = θ_init − θ₀
        std = float(removal.offsets["encoder"].double().std())  # σ₀ = σ × init scale ≈ σ / √fan_in
        assert abs(std / (sigma / math.sqrt(d)) - 1) < 0.1


def test_engine_run_equals_library_symmetry_removal_trained_by_torch_sgd(tmp_path):
    """The engine's run of a syre variant = remove_symmetries(parametrize) + torch.optim.SGD(momentum,
    coupled decay) on the documented minibatches, with the views built from the documented random inputs
    by an independent augmentation (Bernoulli mask as uniform < keep through the normal CDF)."""
    cfg = replace(dimensional.CONFIGS["tiny"], steps=40, batch=16, seeds=(0, 1), lr=0.05)
    X = 0.3 * torch.randn(60, 64, generator=torch.Generator().manual_seed(5))  # digits-like scale
    variant, sigma = "syre σ₀=1", 1.0
    out = dimensional.train_variants([variant], X, cfg, Context(out_dir=tmp_path))
    normal = torch.distributions.Normal(0.0, 1.0)
    for i, s in enumerate(cfg.seeds):
        r = dimensional.run_seed(cfg, s)
        lib, removal = _library_syre(cfg, X.shape[1], r, sigma)
        opt = torch.optim.SGD(lib.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        for t in range(cfg.steps):
            x = X[rng.batch_indices(r, t, len(X), cfg.batch)]
            e = [rng.gaussian(r, rng.RANDOM_INPUTS, t, j, x.shape, x.dtype) for j in range(4)]
            views = [x * (normal.cdf(e[2 * a]) < cfg.keep).float() + cfg.noise * e[2 * a + 1] for a in (0, 1)]
            z = [v @ lib.encoder.T @ lib.projector.T for v in views]
            loss = dimensional.info_nce(z[0], z[1], cfg.tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            theta, psi = lib.encoder.detach(), lib.parametrizations.encoder.original.detach()
            torch.testing.assert_close(out[variant]["psi"][i], psi, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[variant]["theta"][i], theta, rtol=1e-4, atol=1e-5)
            assert (psi - removal.offsets["encoder"]).abs().max() > 1e-3  # it trained
            clean = lib.encoder @ X.T
            z = (lib.projector @ clean).T
            assert math.isclose(out[variant]["final_loss"][i], float(dimensional.info_nce(z, z, cfg.tau)),
                                rel_tol=1e-4)


def test_views_have_the_distribution_of_augment():
    """With V = I and no projector the model returns its two views: keep rate, noise std and independence
    against :func:`augment` (torch's generator) on the same images."""
    cfg = dimensional.CONFIGS["tiny"]
    d, B = 64, 4000
    model = dimensional.OffsetLinearSSL({"encoder": torch.eye(d)}, {"encoder": torch.zeros(d, d)}, cfg.keep,
                                        cfg.noise)
    x = torch.ones(B, d)
    eps = [rng.gaussian(7, rng.RANDOM_INPUTS, 0, j, x.shape) for j in range(4)]
    with torch.no_grad():
        v1, v2 = model(x, *eps)
    ref = dimensional.augment(x, cfg, torch.Generator().manual_seed(0))
    m = B * d
    for v in (v1, v2, ref):
        # a kept pixel is 1 + noise, a dropped one noise: P(v > 0.5) = keep·P(n > −0.5) + (1 − keep)·P(n > 0.5)
        frac = float((v > 0.5).double().mean())
        p_hi = float(torch.distributions.Normal(0.0, cfg.noise).cdf(torch.tensor(0.5)))
        expected = cfg.keep * p_hi + (1 - cfg.keep) * (1 - p_hi)
        assert abs(frac - expected) < 5 * math.sqrt(expected * (1 - expected) / m)
    mask1, noise1 = (0.5 * (1 + torch.erf(eps[0] / math.sqrt(2))) < cfg.keep).float(), cfg.noise * eps[1]
    assert torch.equal(v1, x * mask1 + noise1)
    assert abs(float(mask1.mean()) - cfg.keep) < 5 * math.sqrt(cfg.keep * (1 - cfg.keep) / m)
    assert abs(float(noise1.std()) / cfg.noise - 1) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([v1.reshape(-1), v2.reshape(-1)]))[0, 1])) < 5 / math.sqrt(m)
    with torch.no_grad():
        clean = model(x)
    assert torch.equal(clean[0], x) and torch.equal(clean[1], x)  # metrics: no augmentation


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
    ctx = Context(out_dir=tmp_path / "again")
    again = dimensional.run(cfg, ctx)
    assert ctx.execution()["engine"] == "mirrorsym.sweep" and ctx.execution()["n_runs"] == 2 * len(again["variants"])
    for v, rows in results["variants"].items():  # same inputs, same runs: identical measurements
        assert [r["collapsed_psi"] for r in rows] == [r["collapsed_psi"] for r in again["variants"][v]]
