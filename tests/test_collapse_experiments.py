"""Building blocks of the collapse experiments (plasticity, posterior, dimensional, neural_collapse),
checked against independent computations: numeric minimisation, Monte Carlo, explicit loops."""

import math

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
    """The closed-form expectation over z equals a sampled β-ELBO (reconstruction + β·KL, constants dropped)."""
    g = torch.Generator().manual_seed(0)
    d, k, n = 5, 3, 50
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    vae = posterior.LinearVAE(d, k, 1, g)
    with torch.no_grad():
        vae.logvar.copy_(torch.randn(1, k, generator=g, dtype=torch.float64) * 0.3)
    beta, sigma2 = 0.7, 0.4
    S = X.T @ X / n
    with torch.no_grad():
        exact = vae.loss(S, torch.tensor([beta], dtype=torch.float64), torch.tensor([sigma2], dtype=torch.float64))
    mu, logvar = vae.posterior(X, 0)
    M = 20000
    eps = torch.randn(M, n, k, generator=g, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * eps
    rec = ((X - z @ vae.dec[0].detach().T) ** 2).sum(-1).mean() / (2 * sigma2)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert float(exact[0]) == pytest.approx(float((rec + beta * kl).detach()), rel=5e-3)


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
    S = X.T @ X / 40
    vae = posterior.LinearVAE(4, 3, 1, g)
    one = torch.ones(1, dtype=torch.float64)
    before = vae.loss(S, one, one)
    with torch.no_grad():
        vae.enc[0, 1].neg_()
        vae.dec[0, :, 1].neg_()
    assert torch.allclose(vae.loss(S, one, one), before, rtol=1e-13)
    flat = posterior.LinearVAE(4, 3, 1, None)
    flat.loss(S, one, one).sum().backward()
    assert flat.enc.grad.abs().max() == 0 and flat.dec.grad.abs().max() == 0


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
