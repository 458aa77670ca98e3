"""The discriminating cases: closed forms, the tiny run's checks, and that those checks can fail."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mirrorsym.cli import app
from mirrorsym.core.threads import single_threaded
from mirrorsym.experiments import discriminating as D
from mirrorsym.experiments import registry
from mirrorsym.experiments.base import Context, to_jsonable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("discriminating")
    ctx = Context(out_dir=out, size="tiny")
    cfg = D.CONFIGS["tiny"]
    with single_threaded():
        results = json.loads(json.dumps(to_jsonable(D.run(cfg, ctx))))  # the JSON form, as the runner stores it
    return results, cfg, ctx


def test_registered_and_listed():
    assert "discriminating" in registry()
    result = CliRunner().invoke(app, ["reproduce", "--list"])
    assert result.exit_code == 0 and "discriminating" in result.output


def test_double_well_closed_form():
    lo, hi = D.WINDOW
    assert D.exact_lyapunov([lo, hi]) == pytest.approx([0.0, 0.0], abs=1e-12)
    assert (D.exact_lyapunov([0.3, 0.4, 0.5, 1.3]) > 0).all() and (D.exact_lyapunov([0.7, 0.9, 1.2]) < 0).all()
    # the expected loss has a maximum at 0: mean curvature −1
    assert np.mean(D.H_VALUES) == -1.0 and np.var(D.H_VALUES) == 4.0


def test_depth3_closed_forms_solve_their_equations():
    gamma = 0.7
    th = D.depth3_thresholds(gamma)
    # at the existence threshold t⁴ − σt + γ has a double root t* = (σ/4)^{1/3}
    s = th["exist"]
    t = (s / 4) ** (1 / 3)
    assert t**4 - s * t + gamma == pytest.approx(0, abs=1e-12) and 4 * t**3 - s == pytest.approx(0, abs=1e-12)
    # at the global switch the non-zero branch t = γ^{1/4} is stationary and ties with s = 0
    s, t = th["global"], gamma**0.25
    assert t**4 - s * t + gamma == pytest.approx(0, abs=1e-12)
    assert (t**3 - s) ** 2 + 3 * gamma * t**2 == pytest.approx(s**2, rel=1e-12)
    assert D.depth3_branch(s * (1 + 1e-12), gamma) == pytest.approx(th["jump"], rel=1e-6)
    assert D.depth3_global(0.99 * s, gamma) == 0 and D.depth3_branch(0.99 * th["exist"], gamma) == 0
    bf = D.brute_force_thresholds(gamma, 100001)
    assert all(bf[k] == pytest.approx(th[k], rel=1e-3) for k in th)


def test_ppca_nll_is_the_likelihood_of_the_closed_form_solution():
    lam = np.array([5.0, 2.0, 0.9, 0.5, 0.3, 0.1])
    k = 2
    pred = D.ppca_prediction(lam, k)
    s2 = pred["sigma2"]
    assert s2 == pytest.approx(lam[k:].mean())
    W = np.zeros((6, k))
    W[np.arange(k), np.arange(k)] = np.sqrt(lam[:k] - s2)  # eigenbasis = identity
    C = W @ W.T + s2 * np.eye(6)
    nll = 0.5 * (6 * math.log(2 * math.pi) + np.linalg.slogdet(C)[1] + np.trace(np.linalg.solve(C, np.diag(lam))))
    assert pred["nll"] == pytest.approx(nll, rel=1e-12)
    assert pred["variance"] == pytest.approx(list(1 - s2 / lam[:k]))
    floor = D.ppca_prediction([4.0, 2.0, 1.0, 1.0, 1.0], 3)  # λ_3 on the flat floor: it collapses
    assert floor["sigma2"] == 1.0 and floor["active"] == 2 and floor["variance"][2] == 0.0


def test_learned_noise_vae_matches_the_posterior_module():
    """Its negative ELBO is posterior.LinearVAE's loss at β = 1 plus (d/2) log 2πσ²."""
    g = torch.Generator().manual_seed(0)
    vae = D.LearnedNoiseVAE(5, 2, 1, g)
    with torch.no_grad():
        vae.log_sigma2.fill_(math.log(0.7))
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    S = A @ A.T / 5
    ours = vae.neg_elbo(S[None])
    theirs = vae.loss(S, torch.ones(1, dtype=torch.float64), torch.full((1,), 0.7, dtype=torch.float64))
    assert ours.item() == pytest.approx(theirs.item() + 2.5 * math.log(2 * math.pi * 0.7), rel=1e-12)
    assert vae.marginal_nll(S[None]).item() <= ours.item()  # the ELBO bounds the likelihood


def test_tiny_run_passes_every_check_and_plots(tiny):
    results, cfg, ctx = tiny
    claims = D.claims(results, cfg)
    assert len(claims) == 11 and all(c.kind == "check" for c in claims)
    failed = [(c.claim, c.predicted, c.measured) for c in claims if not c.passed]
    assert not failed, failed
    paths = D.plot(results, ctx)
    assert [p.name for p in paths] == ["double_well.png", "depth3.png", "vae_ppca.png"]
    dw = results["double_well"]
    assert dw["second_order"] == pytest.approx(0.4) and dw["continuous_time"] == pytest.approx(0.5)
    assert dw["mu"] == pytest.approx(-1.0) and dw["s2"] == pytest.approx(4.0)


def test_the_checks_can_fail(tiny):
    results, cfg, _ = tiny
    cases = []
    r = copy.deepcopy(results)
    r["double_well"]["eta_c"] = r["double_well"]["second_order"]  # a library that returned the approximation
    cases.append((r, "critical_learning_rate"))
    r = copy.deepcopy(results)
    r["double_well"]["collapsed"] = [1.0] * len(r["double_well"]["lrs"])  # collapse everywhere
    cases.append((r, "nonlinear SGD"))
    r = copy.deepcopy(results)
    r["double_well"]["lambda_library"][0] += 1e-6
    cases.append((r, "lyapunov_exponent"))
    r = copy.deepcopy(results)
    r["depth3"]["gd"]["small"] = r["depth3"]["global_min"]  # GD that always found the global minimum
    cases.append((r, "small start"))
    r = copy.deepcopy(results)
    r["depth3"]["library"]["U-V"]["gamma_c"] = 0.1
    cases.append((r, "Theorem 1 threshold"))
    r = copy.deepcopy(results)
    r["depth3"]["brute_force"]["global"] *= 1.01
    cases.append((r, "brute-force"))
    r = copy.deepcopy(results)
    r["vae"]["cases"][1]["sigma2"] *= 1.01
    cases.append((r, "learned σ²"))
    r = copy.deepcopy(results)
    r["vae"]["cases"][1]["active"] = 3  # the collapsed latent counted as active
    cases.append((r, "active latents"))
    r = copy.deepcopy(results)
    r["vae"]["cases"][0]["neg_elbo"] += 1e-3
    cases.append((r, "−ELBO"))
    for broken, word in cases:
        failed = [c.claim for c in D.claims(broken, cfg) if not c.passed]
        assert len(failed) == 1 and word in failed[0], (word, failed)
