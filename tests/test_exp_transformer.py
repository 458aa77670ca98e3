"""The transformer experiment's measurements against independent references: dead heads and alive-head
effective rank against a numpy SVD of planted weights, the learned part ψ = θ − θ₀ of a model built with
``remove_symmetries``, and the σ₀ sweep in the results."""

from dataclasses import replace

import numpy as np
import torch
from torch.func import functional_call

from mirrorsym.experiments import transformer
from mirrorsym.experiments.base import Context


def _entropy_rank(s):
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _measure(model, cfg, x):
    """The sweep metrics of ``transformer.metrics`` evaluated on one model, as the engine calls them."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def forward(p, inp):
        return functional_call(model, (p, buffers), (inp,))

    d_head = cfg.d_model // cfg.heads
    m = transformer.metrics(cfg)
    sv = [[float(m[f"sv_{h}_{i}"](params, (x,))) for i in range(d_head)] for h in range(cfg.heads)]
    eff = [float(m[f"effect_{h}"](params, (x,), forward)) for h in range(cfg.heads)]
    return sv, eff


def _plant(model, ranks, gen):
    """Head h gets W_Q,h, W_K,h (d_head × d_model rows) of rank ranks[h] (0: exactly zero, a dead head)."""
    d_head, d = model.d_head, model.q.weight.shape[1]
    with torch.no_grad():
        for h, r in enumerate(ranks):
            rows = slice(h * d_head, (h + 1) * d_head)
            for lin in (model.q, model.k):
                lin.weight[rows] = (torch.randn(d_head, r, generator=gen) @ torch.randn(r, d, generator=gen)
                                    if r else torch.zeros(d_head, d))


def test_dead_heads_and_alive_rank_match_a_numpy_svd_of_planted_weights():
    cfg = transformer.CONFIGS["tiny"]
    model = transformer.make_model(cfg).double()
    ranks = [0, 2, 0, 5]  # two dead heads, alive heads of rank 2 and 5
    _plant(model, ranks, torch.Generator().manual_seed(0))
    x, _ = transformer.make_data(cfg, 64, torch.Generator().manual_seed(1))
    sv, eff = _measure(model, cfg, x)
    stats = transformer.head_stats(sv, eff, cfg.dead_floor)
    # numpy reference: S_h = W_Q,hᵀ W_K,h, from the weights directly
    wq, wk = model.q.weight.detach().numpy(), model.k.weight.detach().numpy()
    d_head = model.d_head
    ref_sv = [np.linalg.svd(wq[h * d_head:(h + 1) * d_head].T @ wk[h * d_head:(h + 1) * d_head], compute_uv=False)
              for h in range(cfg.heads)]
    np.testing.assert_allclose(np.array(sv), np.array([s[:d_head] for s in ref_sv]), rtol=1e-5, atol=1e-9)
    norms = np.array([np.sqrt((s**2).sum()) for s in ref_sv])
    assert stats["dead"] == int((norms <= cfg.dead_floor * norms.max()).sum()) == 2
    alive_ref = np.mean([_entropy_rank(ref_sv[h][:d_head]) for h in (1, 3)])
    assert abs(stats["alive_eff_rank"] - alive_ref) < 1e-6
    assert [int((s > 1e-8 * s[0]).sum()) if s[0] > 0 else 0 for s in ref_sv] == ranks
    # the mean over ALL heads would count the dead heads as rank 0: not what is reported
    assert stats["alive_eff_rank"] > np.mean(stats["eff_rank"])
    # removing a zero head changes nothing; removing an alive one changes the logits
    assert eff[0] == 0 and eff[2] == 0 and eff[1] > 0 and eff[3] > 0
    assert stats["dead_functional"] == 2


def test_learned_part_of_a_symmetry_removal_model_is_theta_minus_offset():
    cfg = transformer.CONFIGS["tiny"]
    model = transformer.make_model(cfg, sigma=0.5, seed=3).double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert "q.weight" not in params  # parametrised: the trained tensor is ψ
    offset = model.q.parametrizations.weight[0].offset
    assert offset.abs().max() > 0
    psi = transformer.learned(params, "q.weight")
    assert torch.allclose(psi, model.q.weight.detach() - offset, atol=1e-12)
    # put head 1 exactly on θ₀ (ψ = 0) although θ = θ₀ ≠ 0 there: it must count as dead
    d_head = model.d_head
    with torch.no_grad():
        for lin in (model.q, model.k):
            lin.parametrizations.weight.original[d_head:2 * d_head] = 0
        assert model.q.weight[d_head:2 * d_head].abs().max() > 0
    x, _ = transformer.make_data(cfg, 32, torch.Generator().manual_seed(1))
    sv, eff = _measure(model, cfg, x)
    stats = transformer.head_stats(sv, eff, cfg.dead_floor)
    assert stats["dead"] == 1 and stats["norms"][1] == 0
    assert eff[1] == 0 and stats["dead_functional"] == 1
    # singular values of ψ_Q,h ψ_K,hᵀ against numpy, from ψ = θ − θ₀ computed from the module's tensors
    q = (model.q.weight - model.q.parametrizations.weight[0].offset).detach().numpy()
    k = (model.k.weight - model.k.parametrizations.weight[0].offset).detach().numpy()
    ref = np.linalg.svd(q[:d_head].T @ k[:d_head], compute_uv=False)[:d_head]
    np.testing.assert_allclose(sv[0], ref, rtol=1e-6)


def test_run_holds_the_sigma_sweep_and_the_default_sigma_control(tmp_path):
    cfg = replace(transformer.CONFIGS["tiny"], steps=40, syre_sigmas=(0.001, 0.01, 1.0), seeds=(0, 1),
                  adam_gammas=(0.0,), gammas=(0.0, 1e-2), n_train=256, n_test=64)
    results = transformer.run(cfg, Context(out_dir=tmp_path))
    assert sorted(results["syre"]) == sorted(f"{s:g}" for s in cfg.syre_sigmas)
    for rows in results["syre"].values():
        assert sorted(r["seed"] for r in rows) == list(cfg.seeds)
        assert all(abs(r["gamma"] - cfg.syre_gamma) < 1e-12 and r["optimizer"] == "sgd" for r in rows)
    assert {(r["optimizer"], r["gamma"]) for r in results["plain"]} == {("sgd", 0.0), ("sgd", 1e-2), ("adam", 0.0)}
    claims = transformer.claims(results, cfg)
    control = [c for c in claims if "library default σ₀=0.01" in c.claim]
    assert len(control) == 3 and all(c.kind == "finding" and c.seeds == 2 for c in control)
    assert any("LARGER σ₀=1" in c.claim for c in claims)
    assert [c for c in claims if c.kind == "check"][0].passed
