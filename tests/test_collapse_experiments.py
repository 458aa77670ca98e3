"""Building blocks of the collapse experiments (plasticity, posterior, dimensional, neural_collapse),
checked against independent computations: numeric minimisation, Monte Carlo, explicit loops."""

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from mirrorsym.experiments import dimensional, neural_collapse, posterior
from mirrorsym.experiments.continual import MLP, ContinualBackprop, structure_metrics, unit_matrix


# ------------------------------------------------------------------------------------------- posterior
def _direction_loss(p, lam, beta, sigma2):
    """ℓ(a, b, s) of one latent on one eigen-direction, written from the docstring's definition."""
    a, b, logs2 = p
    s2 = math.exp(logs2)
    return ((1 - a * b) ** 2 * lam + s2 * a * a) / (2 * sigma2) + 0.5 * beta * (b * b * lam + s2 - logs2 - 1)


@pytest.mark.parametrize("lam,beta,sigma2", [(2.0, 1.0, 0.5), (0.3, 1.0, 0.5), (1.0, 2.0, 0.4), (0.7, 0.5, 1.2)])
def test_vae_threshold_matches_numeric_minimisation(lam, beta, sigma2):
    best = min((minimize(_direction_loss, x0, args=(lam, beta, sigma2), method="BFGS", options={"gtol": 1e-12})
                for x0 in ([1.0, 0.5, -0.5], [0.01, 0.01, 0.0], [2.0, 1.0, -2.0])), key=lambda r: r.fun)
    a, b, logs2 = best.x
    c = beta * sigma2
    assert a * a == pytest.approx(max(0.0, lam - c), abs=1e-5)
    pred = posterior.predicted([lam], 1, beta, sigma2)
    assert pred["active"] == int(lam > c)
    assert b * b * lam == pytest.approx(pred["variance"][0], abs=1e-5)  # Var_x E[z|x]
    kl = 0.5 * (b * b * lam + math.exp(logs2) - logs2 - 1)
    assert kl == pytest.approx(pred["kl"][0], abs=1e-5)


def test_linear_vae_loss_matches_monte_carlo_elbo():
    """The closed-form expectation over z equals a sampled β-ELBO (reconstruction + β·KL, constants dropped),
    for the engine's one-copy VAE (with a log s² anchor, which must not change the function) and the
    hand-batched LinearVAE alike."""
    g = torch.Generator().manual_seed(0)
    d, k, n = 5, 3, 50
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    beta, sigma2 = 0.7, 0.4
    vae = posterior.VAE(d, k, beta, sigma2, 3, logvar_anchor=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    with torch.no_grad():
        vae.logvar_raw.add_(torch.randn(k, generator=g, dtype=torch.float64) * 0.3)
        exact = vae(X)
    mu, logvar = vae.posterior(X)
    M = 20000
    eps = torch.randn(M, n, k, generator=g, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * eps
    rec = ((X - z @ vae.dec.detach().T) ** 2).sum(-1).mean() / (2 * sigma2)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert float(exact) == pytest.approx(float((rec + beta * kl).detach()), rel=5e-3)
    batched = posterior.LinearVAE(d, k, 2, g)
    with torch.no_grad():
        batched.enc[1], batched.dec[1], batched.logvar[1] = vae.enc, vae.dec, vae.logvar
        two = batched.loss(X.T @ X / n, torch.tensor([1.0, beta], dtype=torch.float64),
                           torch.tensor([1.0, sigma2], dtype=torch.float64))
    assert float(two[1]) == pytest.approx(float(exact), rel=1e-12)


def test_vae_data_has_the_exact_spectrum():
    cfg = posterior.Config(spectrum=(3.0, 1.0, 0.2), n=300)
    X = posterior.make_data(cfg, torch.Generator().manual_seed(1))
    assert torch.allclose(X.mean(0), torch.zeros(3, dtype=X.dtype), atol=1e-12)
    ev = torch.linalg.eigvalsh(X.T @ X / cfg.n)
    assert torch.allclose(ev.flip(0), torch.tensor(cfg.spectrum, dtype=X.dtype), atol=1e-10)


def test_collapsed_latent_surface_has_zero_gradient_and_is_a_mirror():
    """(E_j, D_:j) → −(E_j, D_:j) leaves the loss unchanged, and at E = D = 0 their gradient vanishes."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64)
    vae = posterior.VAE(4, 3, 1.0, 1.0, 5)
    before = vae(X)
    with torch.no_grad():
        vae.enc[1].neg_()
        vae.dec[:, 1].neg_()
    assert torch.allclose(vae(X), before, rtol=1e-13)
    flat = posterior.surface_vae(4, 3, 1.0, 1.0, 0.3, 9)
    flat(X).backward()
    assert flat.enc.grad.abs().max() == 0 and flat.dec.grad.abs().max() == 0
    assert flat.logvar.abs().max() == 0 and flat.logvar_anchor.abs().max() > 0  # starts at log s² = 0


def _sweep_final(factory, X, grid):
    """Train ``grid`` on the sweep engine (local, CPU); the trained models in grid order."""
    import tempfile

    from mirrorsym.sweep import Sweep, final_params

    sweep = Sweep(factory, posterior.loss_value, X, grid, record_every=10**9, keep_params=True, name="test")
    with tempfile.TemporaryDirectory() as out:
        df = sweep.run(out, device="cpu", progress=False)
    assert (df["status"] == "ok").all()
    return [factory(int(row["seed"])).load_params(final_params(row)) for _, row in df.iterrows()]


def _train_by_hand(model, X, beta, sigma2, lr, steps, weight_decay=0.0):
    """The experiment's former training loop, verbatim: full-batch Adam on a hand-batched LinearVAE with the
    learning rate set to lr·½(1 + cos(πt/steps)) before step t."""
    S = X.T @ X / X.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        loss = model.loss(S, beta, sigma2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_engine_adam_cosine_equals_the_hand_written_loop():
    """One vmapped chunk of grid cells (β, σ² per copy) = the hand loop on one batched LinearVAE with the
    same initialisation, to float round-off."""
    cfg = posterior.Config(spectrum=(3.0, 1.0, 0.2), latents=2, n=200, lr=0.03)
    X = posterior.make_data(cfg, torch.Generator().manual_seed(4))
    cells = ((1.0, 0.5), (2.0, 0.1), (0.5, 3.0))
    steps = 300
    factory = partial(posterior.grid_vae, 3, 2, cells, 11)
    engine = _sweep_final(factory, X, {**posterior.adam_cosine(cfg, X, steps), "seed": [0, 1, 2]})
    hand = posterior.LinearVAE(3, 2, len(cells), None)
    with torch.no_grad():
        for i in range(len(cells)):
            init = factory(i)
            hand.enc[i], hand.dec[i], hand.logvar[i] = init.enc, init.dec, init.logvar
    _train_by_hand(hand, X, torch.tensor([b for b, _ in cells], dtype=torch.float64),
                   torch.tensor([s for _, s in cells], dtype=torch.float64), cfg.lr, steps)
    for i, vae in enumerate(engine):
        moved = (vae.enc - factory(i).enc).abs().max()
        assert moved > 0.05  # it trained
        for ours, theirs in ((vae.enc, hand.enc[i]), (vae.dec, hand.dec[i]), (vae.logvar, hand.logvar[i])):
            torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-12)


def test_engine_cosine_schedule_is_the_hand_written_one():
    from mirrorsym.sweep.config import expand_grid
    from mirrorsym.sweep.engine import lr_schedule

    steps, lr = 37, 0.03
    configs = expand_grid({"lr": lr, "batch_size": 1, "steps": steps, "optimizer": "adam", "lr_schedule": "cosine"})
    got = lr_schedule(configs, 0, steps)[:, 0]
    want = [lr * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


def test_engine_single_cell_reaches_the_closed_form():
    """Trained from a generic init on the engine, the latents learn a² = max(0, λ − βσ²) (decoder column
    norms), Var_x E[z|x] = 1 − βσ²/λ and KL = ½ log(λ/βσ²) for the active ones, and collapse otherwise."""
    cfg = posterior.Config(spectrum=(3.0, 1.0, 0.2), latents=3, n=300)
    X = posterior.make_data(cfg, torch.Generator().manual_seed(6))
    beta, sigma2 = 1.0, 0.45
    vae, = _sweep_final(partial(posterior.grid_vae, 3, 3, ((beta, sigma2),), 21), X,
                        {**posterior.adam_cosine(cfg, X, 4000), "seed": 0})
    a2 = sorted(((vae.dec.detach() ** 2).sum(0)).tolist(), reverse=True)
    np.testing.assert_allclose(a2, [max(0.0, lam - beta * sigma2) for lam in cfg.spectrum], atol=1e-6)
    pred, got = posterior.predicted(cfg.spectrum, 3, beta, sigma2), posterior.measure(vae, X)
    assert pred["active"] == 2 and got["active"] == 2
    np.testing.assert_allclose(got["variance"], pred["variance"], atol=1e-6)
    np.testing.assert_allclose(got["kl"], pred["kl"], atol=1e-6)


def test_engine_decay_to_offset_equals_remove_symmetries_training():
    """From the collapsed surface, the engine's decay_to_offset_sigma (decay of every parameter towards its
    θ₀; the log s² anchor of surface_vae makes that decay towards 0 for log s²) = remove_symmetries on (E, D)
    (θ = θ₀ + ψ, Adam's coupled decay on ψ and on log s²) with the same θ₀, to round-off. And σ₀ means the
    same: remove_symmetries scales its θ₀ by the init scale, which is 1 for the all-zero E and D."""
    from mirrorsym import remove_symmetries
    from mirrorsym.sweep import rng

    cfg = posterior.Config(spectrum=(3.0, 1.0, 0.2), latents=2, n=200, lr=0.03)
    X = posterior.make_data(cfg, torch.Generator().manual_seed(8))
    sigma0, wd, steps, seeds = 0.3, 0.05, 300, [5, 6]
    beta, sigma2 = 1.0, 0.5
    engine = _sweep_final(partial(posterior.surface_vae, 3, 2, beta, sigma2, sigma0), X,
                          {**posterior.adam_cosine(cfg, X, steps), "seed": seeds, "weight_decay": wd,
                           "decay_to_offset_sigma": sigma0})
    for seed, vae in zip(seeds, engine, strict=True):
        hand = posterior.LinearVAE(3, 2, 1, None)
        handle = remove_symmetries(hand, sigma=sigma0, seed=seed, params=["enc", "dec"])
        assert handle.sigmas == {"enc": 1.0, "dec": 1.0}  # σ₀ = sigma × 1: absolute, as on the engine
        assert float(handle.offsets["enc"].std()) == pytest.approx(sigma0, rel=0.6)
        with torch.no_grad():  # the engine's θ₀ (its documented draw), then back onto E = D = 0
            for i, name in enumerate(("enc", "dec")):
                theta0 = sigma0 * rng.gaussian(seed, rng.OFFSET, 0, i, getattr(vae, name).shape, torch.float64)
                handle.offsets[name].copy_(theta0[None])
            hand.enc = torch.zeros(1, 2, 3, dtype=torch.float64)
            hand.dec = torch.zeros(1, 3, 2, dtype=torch.float64)
        assert hand.enc.abs().max() == 0
        _train_by_hand(hand, X, torch.tensor([beta], dtype=torch.float64), torch.tensor([sigma2], dtype=torch.float64),
                       cfg.lr, steps, weight_decay=wd)
        assert vae.enc.abs().max() > 0.1  # left the surface
        for ours, theirs in ((vae.enc, hand.enc[0]), (vae.dec, hand.dec[0]), (vae.logvar, hand.logvar[0])):
            torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------- continual backprop
def _mlp(seed=0, width=6):
    return MLP(5, width, 2, 3, torch.Generator().manual_seed(seed))


def test_cbp_reinit_zeroes_outgoing_and_only_removes_that_units_contribution():
    model = _mlp()
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    reference = _mlp()
    with torch.no_grad():
        reference.layers[1].weight[:, 2] = 0.0  # unit 2 of hidden layer 0 contributes nothing
        expected = reference(x)[0]
    old_in = model.layers[0].weight.detach().clone()
    cbp = ContinualBackprop(model, rate=0.0, generator=torch.Generator().manual_seed(3))
    cbp.reinit_units(0, torch.tensor([2]))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], expected, atol=1e-6)
    w = model.layers[0].weight.detach()
    assert not torch.equal(w[2], old_in[2]) and w[2].abs().max() <= 1 / math.sqrt(5)
    assert torch.equal(torch.cat([w[:2], w[3:]]), torch.cat([old_in[:2], old_in[3:]]))
    assert model.layers[1].weight[:, 2].abs().max() == 0
    assert cbp.replaced == [1, 0]


def test_cbp_replaces_the_lowest_utility_mature_unit_at_the_set_rate():
    model = _mlp(width=10)
    cbp = ContinualBackprop(model, rate=0.1, generator=torch.Generator().manual_seed(0), maturity=3)
    acts = [torch.ones(4, 10), torch.ones(4, 10)]
    acts[0][:, 7] = 0.0  # unit 7 of layer 0 never fires: zero utility
    for _ in range(3):  # immature: nothing replaced
        cbp.step(acts)
    assert cbp.replaced == [0, 0]
    before = model.layers[0].weight.detach().clone()
    cbp.step(acts)  # 10 mature units × 0.1 = one replacement per layer
    assert cbp.replaced == [1, 1]
    changed = (model.layers[0].weight.detach() != before).any(1).nonzero().reshape(-1).tolist()
    assert changed == [7]
    assert cbp.age[0][7] == 0 and cbp.utility[0][7] == 0


def test_structure_metrics_on_planted_dead_and_duplicated_units():
    model = _mlp(width=6)
    with torch.no_grad():
        model.layers[0].bias[0] = -100.0  # dead on every input in [0, 1]^5
        model.layers[1].weight[:, 4] = model.layers[1].weight[:, 3]
        model.layers[0].weight[4] = model.layers[0].weight[3]
        model.layers[0].bias[4] = model.layers[0].bias[3]
    probe = torch.rand(50, 5, generator=torch.Generator().manual_seed(0))
    m = structure_metrics(model, probe)
    assert m["dead"] >= 1
    assert m["distinct"] == 12 - 1  # units 3 and 4 of layer 0 are one cluster
    u = unit_matrix(model, 0)
    assert u.shape == (6, 5 + 1 + 6)
    total = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()))
    assert m["weight_norm"] == pytest.approx(total)


# ---------------------------------------------------------------------------------------- dimensional
def test_info_nce_matches_loop_and_is_rotation_invariant():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    tau = 0.7
    loop = 0.0
    for i in range(6):
        row = torch.tensor([float(z1[i] @ z2[j]) / tau for j in range(6)], dtype=torch.float64)
        col = torch.tensor([float(z1[j] @ z2[i]) / tau for j in range(6)], dtype=torch.float64)
        loop += 0.5 * (-(row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))) / 6
    assert float(dimensional.info_nce(z1, z2, tau)) == pytest.approx(float(loop), rel=1e-10)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert float(dimensional.info_nce(z1 @ Q, z2 @ Q, tau)) == pytest.approx(float(loop), rel=1e-10)


# ------------------------------------------------------------------------------------ neural collapse
def test_features_logits_and_criteria_match_the_module():
    net = neural_collapse.mlp(5, seed=0)
    x = torch.randn(7, 64)
    params = dict(net.named_parameters())
    feats, logits = neural_collapse.features_and_logits(params, x)
    assert torch.allclose(logits, net(x), atol=1e-6)
    assert torch.allclose(feats, net[:4](x), atol=1e-6)
    y = torch.randint(0, 10, (7,))
    mse = neural_collapse.CRITERIA["mse"](logits, y)
    assert torch.allclose(mse, ((logits - F.one_hot(y, 10)) ** 2).sum(1).mean())
    batched = torch.func.vmap(neural_collapse.one_hot_squared_error)(torch.stack([logits, 2 * logits]),
                                                                     torch.stack([y, y]))
    assert torch.allclose(batched[1], ((2 * logits - F.one_hot(y, 10)) ** 2).sum(1).mean())  # vmaps
    assert neural_collapse.CRITERIA["ce"] is F.cross_entropy
    stacked = torch.stack([logits, logits])
    assert torch.allclose(neural_collapse.data_loss(stacked, y, "mse"), mse.expand(2))
    assert torch.allclose(neural_collapse.data_loss(stacked, y, "ce"), F.cross_entropy(logits, y).expand(2))
    with pytest.raises(ValueError, match="mse"):
        neural_collapse.data_loss(stacked, y, "hinge")


def test_posterior_predicted_counts_are_capped_by_latents():
    pred = posterior.predicted(np.array([4.0, 2.0, 1.0, 0.5]), 2, 1.0, 0.1)
    assert pred["active"] == 2 and len(pred["variance"]) == 2


def test_plasticity_surface_counts_agree_with_monitor_and_structure_metrics_on_planted_duplicates():
    """SymmetryMonitor (detector's unit matrices), structure_metrics and the batched surface_counts of the
    plasticity experiment agree on a planted duplicate pair: swap-surface distance 0, 11 distinct units."""
    from torch import nn

    from mirrorsym.diagnose.monitor import SymmetryMonitor
    from mirrorsym.experiments.continual import BatchedMLP, batched_unit_matrices, surface_counts

    class LogitsOnly(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)[0]

    def perm_distance(monitor):
        groups = monitor.record().to_pandas()
        return float(groups[groups["kind"] == "permutation"]["distance"].min())

    model = _mlp(width=6)
    probe = torch.rand(30, 5, generator=torch.Generator().manual_seed(0))
    monitor = SymmetryMonitor(LogitsOnly(model), (probe[:4],), data=probe)
    assert perm_distance(monitor) > 0
    with torch.no_grad():
        model.layers[1].weight[:, 4] = model.layers[1].weight[:, 3]
        model.layers[0].weight[4] = model.layers[0].weight[3]
        model.layers[0].bias[4] = model.layers[0].bias[3]
    assert perm_distance(monitor) == pytest.approx(0.0, abs=1e-6)
    params = BatchedMLP.stack([model]).params()
    counts = [surface_counts(batched_unit_matrices(params, layer)) for layer in range(2)]
    assert min(c[2][0] for c in counts) == pytest.approx(0.0, abs=1e-7)
    assert 12 - sum(c[0][0] + c[1][0] for c in counts) == structure_metrics(model, probe)["distinct"] == 11
