"""The plasticity experiment's batched engine against independent references: planted dead and duplicated
units recounted with numpy on θ and on ψ = θ − θ₀, each method's batched update against the library's
optimizer hooks on single models (and a hand-written step), Spearman's ρ against scipy, and the claims'
verdicts on constructed results."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from mirrorsym.constrain.remove import l2_init, remove_symmetries, shrink_and_perturb
from mirrorsym.diagnose.metrics import count_units, representation_eff_rank
from mirrorsym.experiments import plasticity as P
from mirrorsym.experiments.continual import (
    MLP,
    BatchedMLP,
    ContinualBackprop,
    batched_unit_matrices,
    spearman,
    surface_counts,
)

CFG = replace(P.CONFIGS["tiny"], seeds=2, width=8, depth=2, weight_decay=0.05, sp_noise=0.3, cbp_rate=0.2,
              cbp_maturity=2)


# ------------------------------------------------------------------------------------ numpy references
def np_units(W, b, W_out):
    """Unit matrix from numpy arrays by an explicit loop: row i = [W[i, :], b[i], W_out[:, i]]."""
    return np.array([np.concatenate([W[i], [b[i]], W_out[:, i]]) for i in range(W.shape[0])])


def np_surface(U, dead_tol=1e-3, dup_tol=0.05):
    """(dead, duplicated, closest/√2) by union-find over all pairs."""
    n = len(U)
    norms = np.sqrt((U**2).sum(1))
    dead = norms <= dead_tol * norms.max()
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    closest = math.inf
    for i in range(n):
        for j in range(i + 1, n):
            d = math.sqrt(((U[i] - U[j]) ** 2).sum())
            closest = min(closest, d)
            if not dead[i] and not dead[j] and d <= dup_tol * max(norms[i], norms[j]):
                parent[find(i)] = find(j)
    clusters = len({find(i) for i in range(n) if not dead[i]})
    return int(dead.sum()), int((~dead).sum()) - clusters, closest / math.sqrt(2)


def test_planted_dead_and_duplicated_units_on_theta_and_psi_match_numpy():
    methods = P.Methods(CFG, ("plain", "syre_large"), 5, 3)
    net = methods.net
    k = methods.index("syre_large")[0]
    with torch.no_grad():
        th0 = methods.centres
        # unit 0 of layer 0: at the offset (ψ = 0: dead on ψ, alive on θ)
        net.weights[0][k, 0], net.biases[0][k, 0] = th0[0][k, 0], th0[1][k, 0]
        net.weights[1][k, :, 0] = th0[2][k, :, 0]
        # unit 1: θ = 0 (dead on θ, alive on ψ = −θ₀)
        net.weights[0][k, 1], net.biases[0][k, 1], net.weights[1][k, :, 1] = 0.0, 0.0, 0.0
        # units 2, 3 identical on θ; units 4, 5 identical on ψ (θ_5 = θ_4 − θ₀_4 + θ₀_5)
        for dst, src, off in ((3, 2, False), (5, 4, True)):
            for t, sl in ((net.weights[0], (k, dst)), (net.biases[0], (k, dst))):
                src_sl = (k, src)
                t[sl] = t[src_sl] - (th0[0 if t is net.weights[0] else 1][src_sl] - th0[0 if t is net.weights[0]
                                                                                     else 1][sl] if off else 0)
            net.weights[1][k, :, dst] = net.weights[1][k, :, src] - ((th0[2][k, :, src] - th0[2][k, :, dst])
                                                                     if off else 0)
        # copy 0 (plain): units 6, 7 of layer 1 are duplicates and unit 0 of layer 1 is 1e-5 of the others
        net.weights[1][0, 7], net.biases[1][0, 7] = net.weights[1][0, 6], net.biases[1][0, 6]
        net.weights[2][0, :, 7] = net.weights[2][0, :, 6]
        net.weights[1][0, 0] *= 1e-5
        net.biases[1][0, 0] *= 1e-5
        net.weights[2][0, :, 0] *= 1e-5
    theta, psi = [p.detach() for p in net.params()], methods.psi()
    for params, name in ((theta, "θ"), (psi, "ψ")):
        arrays = [p.double().numpy() for p in params]
        for layer in range(2):
            dead, dup, closest = surface_counts(batched_unit_matrices(params, layer))
            for c in range(len(methods.copies)):
                U = np_units(arrays[2 * layer][c], arrays[2 * layer + 1][c], arrays[2 * layer + 2][c])
                ref = np_surface(U)
                assert (dead[c], dup[c]) == ref[:2], (name, layer, c)
                assert closest[c] == pytest.approx(ref[2], rel=1e-9, abs=1e-12)
                lib = count_units(torch.from_numpy(U))
                assert (lib.dead, lib.duplicated) == ref[:2]
    # the planted structure itself: syre copy, layer 0
    d_t, u_t, _ = surface_counts(batched_unit_matrices(theta, 0)[k : k + 1])
    d_p, u_p, _ = surface_counts(batched_unit_matrices(psi, 0)[k : k + 1])
    assert (d_t[0], u_t[0]) == (1, 1) and (d_p[0], u_p[0]) == (1, 1)
    m = P.measure(methods, torch.rand(2, 6, 5), torch.zeros(2, 6, dtype=torch.int64), torch.rand(2, 7, 5), 2)
    assert m["surface_theta"][k] == pytest.approx(2 / 16) and m["surface_psi"][k] == pytest.approx(2 / 16)
    assert m["dead_theta"][0] == pytest.approx(1 / 16) and m["dup_theta"][0] == pytest.approx(1 / 16)


# ---------------------------------------------------------------------- each method's update vs the library
def _reference(method, cfg, s, d_in, d_out):
    """A single MLP and optimizer, the library's way (what the old per-method loop did)."""
    model = MLP(d_in, cfg.width, cfg.depth, d_out, torch.Generator().manual_seed(P._seed(cfg, s, 1)))
    lam = cfg.weight_decay
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=lam if method == "l2" else 0.0)
    hook = None
    if method == "l2_init":
        l2_init(model, mode="optimizer", weight_decay=lam, optimizer=opt)
    elif method in dict(P.SIGMA_SWEEP):
        sigma = getattr(cfg, dict(P.SIGMA_SWEEP)[method])
        remove_symmetries(model, sigma=sigma, seed=P._seed(cfg, s, 3), mode="optimizer", weight_decay=lam,
                          optimizer=opt)
    elif method == "shrink_perturb":
        shrink_and_perturb(model, weight_decay=lam, noise=cfg.sp_noise, seed=P._seed(cfg, s, 2), optimizer=opt)
    elif method == "cbp":
        hook = ContinualBackprop(model, cfg.cbp_rate, torch.Generator().manual_seed(P._seed(cfg, s, 4)),
                                 maturity=cfg.cbp_maturity)
    return model, opt, hook


def test_every_methods_batched_update_matches_the_library_on_single_models():
    d_in, d_out, lr, steps = 5, 3, 0.1, 8
    methods = P.Methods(CFG, P.METHODS, d_in, d_out)
    g = torch.Generator().manual_seed(7)
    xs = [torch.rand(CFG.seeds, 6, d_in, generator=g) for _ in range(steps)]
    ys = [torch.randint(0, d_out, (CFG.seeds, 6), generator=g) for _ in range(steps)]
    K = len(methods.copies)
    for x, y in zip(xs, ys, strict=True):
        logits, acts = methods.net(x[methods.seed_of])
        F.cross_entropy(logits.reshape(-1, d_out), y[methods.seed_of].reshape(-1), reduction="none").view(K, -1) \
            .mean(1).sum().backward()
        methods.step(lr, acts)
    for k, (m, s) in enumerate(methods.copies):
        model, opt, cbp = _reference(m, CFG, s, d_in, d_out)
        for x, y in zip(xs, ys, strict=True):
            logits, acts = model(x[s])
            opt.zero_grad()
            F.cross_entropy(logits, y[s]).backward()
            opt.step()
            if cbp is not None:
                cbp.step(acts)
        for ref, p in zip(model.parameters(), methods.net.params(), strict=True):
            assert torch.allclose(p[k].detach(), ref.detach(), atol=2e-6), (m, s)
        if m == "cbp":
            assert cbp.replaced == methods.cbp.replaced[methods.cbp.copies.index(k)] and sum(cbp.replaced) > 0


def test_one_step_of_each_method_by_hand():
    """φ' = (1 − lr·λ_c)φ − lr·g, then φ' − lr·λ_d(φ' − θ₀), then + lr·noise·σ·ξ (docstring of Methods)."""
    d_in, d_out, lr, lam = 5, 3, 0.1, CFG.weight_decay
    methods = P.Methods(CFG, P.METHODS, d_in, d_out)
    before = [p.detach().clone() for p in methods.net.params()]
    x = torch.rand(CFG.seeds, 4, d_in, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    K = len(methods.copies)
    logits, _ = methods.net(x[methods.seed_of])
    F.cross_entropy(logits.reshape(-1, d_out), y[methods.seed_of].reshape(-1), reduction="none").view(K, -1) \
        .mean(1).sum().backward()
    grads = [p.grad.clone() for p in methods.net.params()]
    methods.step(lr)
    noise_gen = {k: torch.Generator().manual_seed(P._seed(CFG, s, 2)) for k, (m, s) in enumerate(methods.copies)
                 if m == "shrink_perturb"}
    for k, (m, s) in enumerate(methods.copies):
        init = MLP(d_in, CFG.width, CFG.depth, d_out, torch.Generator().manual_seed(P._seed(CFG, s, 1)))
        gen0 = torch.Generator().manual_seed(P._seed(CFG, s, 3))
        sigma = {"syre": CFG.syre_sigma, "syre_large": CFG.syre_large_sigma, "syre_small": CFG.syre_small_sigma,
                 "syre_mid": CFG.syre_mid_sigma}.get(m)
        for (name, p0), b, g, p in zip(init.named_parameters(), before, grads, methods.net.params(), strict=True):
            assert torch.equal(b[k], p0.detach())  # every method starts from its seed's init
            std = float(p0.detach().double().std())
            phi = b[k].double() * (1 - lr * lam if m == "l2" else 1) - lr * g[k].double()
            if sigma is not None:  # θ₀ ~ N(0, (σ·std)²), then D's uniform draw (ε = 0): the library's order
                theta0 = torch.randn(p0.shape, generator=gen0, dtype=torch.float64) * sigma * std
                torch.rand(p0.shape, generator=gen0, dtype=torch.float64)
                phi = phi - lr * lam * (phi - theta0)
            elif m == "l2_init":
                phi = phi - lr * lam * (phi - p0.detach().double())
            if m != "shrink_perturb":  # its noise is checked below, tensor by tensor in the library's order
                assert torch.allclose(p[k].detach().double(), phi, atol=1e-6), (m, name)
    for k, gen in noise_gen.items():
        s = methods.copies[k][1]
        init = MLP(d_in, CFG.width, CFG.depth, d_out, torch.Generator().manual_seed(P._seed(CFG, s, 1)))
        for p0, b, g, p in zip(init.parameters(), before, grads, methods.net.params(), strict=True):
            std = float(p0.detach().double().std())
            xi = torch.randn(p0.shape, generator=gen, dtype=p0.dtype).double()
            phi = (b[k].double() - lr * g[k].double()) * (1 - lr * lam) + lr * CFG.sp_noise * std * xi
            assert torch.allclose(p[k].detach().double(), phi, atol=1e-6)


# --------------------------------------------------------------------------------------- other pieces
def test_spearman_matches_scipy_with_ties_and_is_nan_when_constant():
    g = np.random.default_rng(0)
    for _ in range(30):
        n = int(g.integers(3, 12))
        x, y = g.integers(0, 4, n).astype(float), g.normal(size=n)
        if np.ptp(x) == 0:
            continue
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4])) and math.isnan(spearman([1, 2], [2, 1]))


def test_rho_per_seed_is_scipy_spearman_across_methods():
    g = np.random.default_rng(1)
    ms_ = ["a", "b", "c", "d"]
    results = {"methods": ms_, "per_seed": {"random_labels": {
        m: {"final_acc": g.random((3, 6)).tolist(), "surface_psi": g.random((3, 6)).tolist()} for m in ms_}}}
    rho = P.rho_per_seed(results, "random_labels", "surface_psi", 2)
    for s in range(3):
        tr = [np.mean(results["per_seed"]["random_labels"][m]["final_acc"][s][-2:]) for m in ms_]
        mv = [np.mean(results["per_seed"]["random_labels"][m]["surface_psi"][s][-2:]) for m in ms_]
        assert rho[s] == pytest.approx(stats.spearmanr(mv, tr).statistic)


def test_batched_forward_and_effective_rank_match_single_models():
    models = [MLP(5, 7, 2, 3, torch.Generator().manual_seed(s)) for s in range(3)]
    net = BatchedMLP.stack(models)
    x = torch.rand(3, 9, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, acts = net(x)
    for k, model in enumerate(models):
        ref_logits, ref_acts = model(x[k])
        assert torch.allclose(logits[k], ref_logits, atol=1e-6)
        assert torch.allclose(acts[1][k], ref_acts[1], atol=1e-6)
        assert float(P.batched_eff_rank(acts[1])[k]) == pytest.approx(float(representation_eff_rank(acts[1][k])))
        assert torch.allclose(net.copy(k)(x[k].double())[0].float(), ref_logits, atol=1e-5)
    assert float(P.batched_eff_rank(torch.zeros(1, 4, 3))[0]) == 0.0


def _fake_results(acc: dict, surface: dict, seeds=5, tasks=6):
    g = np.random.default_rng(0)
    rows = {}
    for m in acc:
        r = {k: g.random((seeds, tasks)).tolist() for k in P.METRICS}
        r["final_acc"] = (np.full((seeds, tasks), acc[m]) + 0.01 * g.normal(size=(seeds, tasks))).tolist()
        r["surface_psi"] = r["surface_theta"] = (np.full((seeds, tasks), surface[m])
                                                 + 0.001 * g.normal(size=(seeds, tasks))).tolist()
        rows[m] = r
    return {"settings": ["random_labels"], "methods": list(acc), "seeds": seeds, "last": 2, "units": {},
            "per_seed": {"random_labels": rows}, "checks": {"random_labels": {"batched_vs_mlp": 0.0}}}


def test_claims_report_a_worse_syre_as_contradicted_and_the_mechanism_from_the_data():
    acc = {"plain": 0.2, "l2": 0.7, "l2_init": 0.8, "shrink_perturb": 0.75, "cbp": 0.9, "syre": 0.6,
           "syre_large": 0.85}
    surface = {"plain": 0.5, "l2": 0.2, "l2_init": 0.1, "shrink_perturb": 0.15, "cbp": 0.0, "syre": 0.3,
               "syre_large": 0.05}
    cfg = replace(P.CONFIGS["quick"], last=2)
    by = {c.claim: c for c in P.claims(json.loads(json.dumps(_fake_results(acc, surface))), cfg)}
    syre_l2 = next(c for t, c in by.items() if "(b)" in t and "vs L2:" in t)
    assert syre_l2.verdict == "contradicted" and syre_l2.seeds == 5 and syre_l2.mean == pytest.approx(-0.1, abs=0.02)
    mech = [c for t, c in by.items() if "(a) mechanism" in t]
    assert len(mech) == 2 and all(c.verdict == "reproduced" and c.mean == pytest.approx(1.0) for c in mech)
    # the opposite ordering contradicts the mechanism
    flipped = {m: 1 - v for m, v in surface.items()}
    mech = [c for c in P.claims(_fake_results(acc, flipped), cfg) if "(a) mechanism" in c.claim]
    assert all(c.verdict == "contradicted" for c in mech)


def test_sigma_sweep_finding_follows_the_trainability_order():
    base = {"plain": 0.2, "l2": 0.7, "l2_init": 0.8, "shrink_perturb": 0.75, "cbp": 0.9}
    surface = {m: 0.1 for m in (*base, "syre_small", "syre", "syre_mid", "syre_large")}
    cfg = replace(P.CONFIGS["quick"], last=2)
    rising = {**base, "syre_small": 0.3, "syre": 0.4, "syre_mid": 0.5, "syre_large": 0.6}
    (up,) = [c for c in P.claims(_fake_results(rising, surface), cfg) if "σ₀ sweep" in c.claim]
    assert up.verdict == "reproduced" and up.mean == pytest.approx(1.0) and up.seeds == 5
    falling = {**base, "syre_small": 0.6, "syre": 0.5, "syre_mid": 0.4, "syre_large": 0.3}
    (down,) = [c for c in P.claims(_fake_results(falling, surface), cfg) if "σ₀ sweep" in c.claim]
    assert down.verdict == "contradicted"


def test_any_cut_of_the_seeds_into_jobs_gives_the_same_per_seed_rows():
    """``run`` cuts the seeds into ``ctx.map`` jobs (one here, one per Ray worker there): each seed's rows
    must not depend on the cut, so a run on Ray reports the same numbers as one here."""
    cfg = replace(P.CONFIGS["tiny"], tasks=2, rl_epochs=4)
    whole = P.run_seeds("random_labels", cfg, range(3), None, "cpu")
    parts = [P.run_seeds("random_labels", cfg, r, None, "cpu") for r in (range(0, 1), range(1, 3))]
    for m, rows in whole["per_seed"].items():
        for k, v in rows.items():
            assert v == [row for p in parts for row in p["per_seed"][m][k]], (m, k)
    assert whole["cbp_replaced"] == [r for p in parts for r in p["cbp_replaced"]]
    assert whole["per_seed"]["plain"]["final_acc"][0] != whole["per_seed"]["plain"]["final_acc"][1]  # 2 seeds
