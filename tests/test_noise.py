"""Gradient-noise theory (docs/theory.md#gradient-noise) against exact enumeration, closed forms A/B, dense Hessians and
simulated nonlinear SGD."""

import itertools
import math

import numpy as np
import pytest
import torch

import mirrorsym as ms
from mirrorsym.experiments import Context
from mirrorsym.experiments.noise import (
    dead_neuron_problem,
    first_index,
    hadamard_loss,
    hadamard_problem,
    measured_index,
    simulate_collapse,
    swap_problem,
    tanh_loss,
)
from mirrorsym.theory import critical_learning_rate, lyapunov_exponent, minibatch_curvature


def hadamard_g(problem) -> torch.Tensor:
    """Closed form A: at β₀ = 0 the per-sample block of (u₀, w₀) is [[0, g],[g, 0]], g = −2 r x₀."""
    x, y = problem.data
    p = problem.params
    return -2 * (y - x @ (p["u"] * p["w"])) * x[:, 0]


def batch_means(values: torch.Tensor, b: int) -> torch.Tensor:
    n = len(values)
    return torch.stack([values[list(c)].mean() for c in itertools.combinations(range(n), b)])


def exact_lambda(h_batches: torch.Tensor, lr: float, gamma: float = 0.0) -> float:
    return torch.log((1 - lr * (h_batches + 2 * gamma)).abs()).mean().item()


def hadamard_reference(problem, lr, b, gamma=0.0) -> float:
    """max over the eigendirections (1, ±1)/√2, whose curvatures are ±g_B, of E log|1 − η(h + 2γ)|."""
    gB = batch_means(hadamard_g(problem), b)
    return max(exact_lambda(gB, lr, gamma), exact_lambda(-gB, lr, gamma))


def call(problem, **kw):
    return lyapunov_exponent(problem.loss_fn, problem.params, problem.mirror, problem.data, **kw)


# ---------------------------------------------------------------------- closed form A, exact
@pytest.mark.parametrize("b,lr,gamma", [(1, 0.1, 0.0), (2, 0.3, 0.0), (3, 0.25, 0.1), (2, 1.5, 0.0)])
def test_hadamard_lambda_equals_enumeration_of_all_minibatches(b, lr, gamma):
    prob = hadamard_problem()
    lam = call(prob, lr=lr, batch_size=b, gamma=gamma)
    assert lam.method == "exact" and lam.stderr == 0.0 and lam.num_samples == math.comb(12, b)
    assert lam.value == pytest.approx(hadamard_reference(prob, lr, b, gamma), abs=1e-12)


def test_sampled_estimates_agree_with_enumeration_within_their_error():
    prob = hadamard_problem()
    g = torch.Generator().manual_seed(3)
    for b, lr in ((1, 0.14), (2, 0.3)):
        exact = hadamard_reference(prob, lr, b)
        for method in ("qr", "commuting"):
            lam = lyapunov_exponent(
                prob.loss_fn,
                prob.params,
                prob.mirror,
                prob.data,
                lr=lr,
                batch_size=b,
                gamma=0.0,
                num_samples=20000,
                generator=g,
                method=method,
            )
            assert 0 < lam.stderr < 0.01
            assert abs(lam.value - exact) <= 4 * lam.stderr, (method, b, lam, exact)


def test_one_dimensional_mirror_is_exact():
    """k = 1: the swap (u₀, w₀) → (w₀, u₀), normal (1, −1)/√2; along it the per-sample curvature is −g."""
    prob = hadamard_problem()
    mirror = ms.Mirror.from_basis(
        torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2), {"u": [0], "w": [0]}
    )
    lam = lyapunov_exponent(hadamard_loss, prob.params, mirror, prob.data, lr=0.2, batch_size=2)
    assert lam.method == "exact" and len(lam.spectrum) == 1
    assert lam.value == pytest.approx(exact_lambda(-batch_means(hadamard_g(prob), 2), 0.2), abs=1e-12)


def test_auto_method_samples_when_enumeration_is_too_large_and_follows_float32():
    prob = hadamard_problem()
    lam = call(
        prob,
        lr=0.3,
        batch_size=2,
        max_enumerate=10,
        num_samples=20000,
        generator=torch.Generator().manual_seed(1),
    )
    assert lam.method == "commuting" and lam.num_samples == 20000
    assert abs(lam.value - hadamard_reference(prob, 0.3, 2)) <= 4 * lam.stderr
    single = {k: v.float() for k, v in prob.params.items()}
    data32 = tuple(t.float() for t in prob.data)
    lam32 = lyapunov_exponent(hadamard_loss, single, prob.mirror, data32, lr=0.3, batch_size=2)
    assert lam32.value == pytest.approx(hadamard_reference(prob, 0.3, 2), abs=1e-5)


def test_critical_learning_rate_is_the_sign_change_and_second_order_matches_enumeration():
    prob = hadamard_problem()
    for b in (1, 2):
        eta = critical_learning_rate(
            prob.loss_fn, prob.params, prob.mirror, prob.data, batch_size=b, gamma=0.0
        )
        assert np.isfinite(eta.value) and eta.value > 0
        assert (
            hadamard_reference(prob, 0.98 * eta.value, b) > 0 > hadamard_reference(prob, 1.02 * eta.value, b)
        )
        assert abs(hadamard_reference(prob, eta.value, b)) < 1e-4
        # second order along the unstable expected direction: h_B = ±g_B with negative mean
        gB = batch_means(hadamard_g(prob), b)
        h = gB if gB.mean() < 0 else -gB
        mu, s2 = h.mean().item(), h.var(unbiased=False).item()
        assert eta.mu == pytest.approx(mu, rel=1e-10) and eta.s2 == pytest.approx(s2, rel=1e-10)
        assert eta.second_order == pytest.approx(2 * abs(mu) / (mu * mu + s2), rel=1e-10)


def test_no_saddle_means_collapse_at_every_small_lr():
    """Decay above the threshold (μ = E[h] + 2γ > 0): η_c = 0, no second-order estimate, Λ < 0 at small η."""
    prob = hadamard_problem()
    eta = critical_learning_rate(
        prob.loss_fn, prob.params, prob.mirror, prob.data, batch_size=2, gamma=0.5
    )
    assert eta.mu > 0 and eta.value == 0.0 and math.isnan(eta.second_order)
    assert hadamard_reference(prob, 0.01, 2, 0.5) < 0
    assert 0 < eta.upper and hadamard_reference(prob, 1.05 * eta.upper, 2, 0.5) > 0


# ---------------------------------------------------------------------- tanh networks
def dense_blocks(problem) -> torch.Tensor:
    """Oᵀ∇²ℓ_i O from the dense per-sample Hessian (torch.autograd.functional.hessian)."""
    p = problem.mirror.project(problem.params)
    names, shapes = list(p), [t.shape for t in p.values()]
    flat = torch.cat([t.reshape(-1) for t in p.values()])
    k = problem.mirror.dim(p)
    eye = torch.eye(k, dtype=torch.float64)
    O = torch.stack(
        [torch.cat([t.reshape(-1) for t in problem.mirror.direction(eye[j], p).values()]) for j in range(k)],
        1,
    )

    def unflat(v):
        out, i = {}, 0
        for name, s in zip(names, shapes, strict=True):
            out[name] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    x, y = problem.data
    H = [
        torch.autograd.functional.hessian(
            lambda v, i=i: problem.loss_fn(unflat(v), (x[i : i + 1], y[i : i + 1])), flat
        )
        for i in range(len(y))
    ]
    return torch.stack([O.T @ h @ O for h in H])


@pytest.mark.parametrize("make", [dead_neuron_problem, swap_problem])
def test_per_sample_blocks_equal_dense_hessians_and_the_loop(make):
    prob = make()
    curv = minibatch_curvature(prob.loss_fn, prob.params, prob.mirror, prob.data)
    torch.testing.assert_close(curv.blocks, dense_blocks(prob), atol=1e-12, rtol=1e-10)
    looped = minibatch_curvature(prob.loss_fn, prob.params, prob.mirror, prob.data, vectorize=False)
    torch.testing.assert_close(curv.blocks, looped.blocks, atol=1e-12, rtol=1e-10)
    assert not curv.commuting


def closed_form_b_blocks(problem) -> np.ndarray:
    """Closed form B at a dead unit: the (w, b, a) block of ℓ_i is [[0, −c_i],[−c_iᵀ, 0]],
    c_i = 2 y_i (x_i, 1)."""
    x, y = problem.data
    c = (2 * y[:, None] * torch.cat([x, torch.ones(len(y), 1, dtype=x.dtype)], 1)).numpy()
    H = np.zeros((len(y), 4, 4))
    H[:, :3, 3], H[:, 3, :3] = -c, -c
    return H


def test_dead_neuron_blocks_are_closed_form_B():
    prob = dead_neuron_problem()
    curv = minibatch_curvature(prob.loss_fn, prob.params, prob.mirror, prob.data)
    torch.testing.assert_close(curv.blocks, torch.from_numpy(closed_form_b_blocks(prob)), atol=1e-12, rtol=0)


def power_iteration_lambda(H: np.ndarray, lr: float, b: int, gamma: float, steps: int, seed: int):
    """Independent reference: one vector pushed through I − η(Ĥ_B + 2γI), renormalised every step."""
    rng = np.random.default_rng(seed)
    n, k = H.shape[0], H.shape[1]
    z = np.ones(k) / math.sqrt(k)
    logs = np.empty(steps)
    for t in range(steps):
        B = rng.choice(n, size=b, replace=False)
        z = z - lr * (H[B].mean(0) @ z + 2 * gamma * z)
        norm = np.linalg.norm(z)
        logs[t] = math.log(norm)
        z /= norm
    logs = logs[steps // 20 :]
    means = logs[: len(logs) // 20 * 20].reshape(20, -1).mean(1)
    return logs.mean(), means.std(ddof=1) / math.sqrt(20)


@pytest.mark.parametrize("b,lr", [(1, 0.2), (2, 0.45)])
def test_qr_lambda_matches_an_independent_power_iteration(b, lr):
    prob = dead_neuron_problem()
    H = closed_form_b_blocks(prob)
    ref, ref_err = power_iteration_lambda(H, lr, b, prob.gamma, 20000, seed=11)
    lam = call(
        prob,
        lr=lr,
        batch_size=b,
        gamma=prob.gamma,
        num_samples=20000,
        generator=torch.Generator().manual_seed(5),
    )
    assert lam.method == "qr" and len(lam.spectrum) == 4 and lam.spectrum[0] == pytest.approx(lam.value)
    assert abs(lam.value - ref) <= 4 * math.hypot(lam.stderr, ref_err), (lam, ref, ref_err)


def test_second_order_formula_deviates_where_the_noise_is_strong():
    """Swap surface, batch 1: 2|μ|/(μ² + s²) lies > 15 % below the root of Λ, and an independent power
    iteration confirms that SGD still escapes (Λ > 0) at the second-order estimate."""
    prob = swap_problem()
    eta = critical_learning_rate(
        prob.loss_fn,
        prob.params,
        prob.mirror,
        prob.data,
        batch_size=1,
        gamma=prob.gamma,
        generator=torch.Generator().manual_seed(2),
    )
    assert (eta.value - eta.second_order) / eta.value > 0.15, eta
    ref, err = power_iteration_lambda(
        closed_form_b_blocks(prob), eta.second_order, 1, prob.gamma, 20000, 4
    )
    assert ref > 4 * err, (ref, err)


def test_dead_duplicated_pair_has_the_dead_unit_blocks():
    """Swapping two dead units moves along (θ₁ − θ₂)/√2; to second order that is one dead unit."""
    prob = swap_problem()
    one = ms.Mirror.sign_flip({"w": [1], "b": [1], "a": [1]})
    swap = minibatch_curvature(prob.loss_fn, prob.params, prob.mirror, prob.data)
    dead = minibatch_curvature(prob.loss_fn, prob.params, one, prob.data)
    torch.testing.assert_close(swap.blocks, dead.blocks, atol=1e-12, rtol=0)


def test_estimates_are_reproducible_with_a_generator():
    prob = dead_neuron_problem()
    a, b = (
        call(
            prob,
            lr=0.2,
            batch_size=1,
            gamma=0.4,
            num_samples=2000,
            generator=torch.Generator().manual_seed(9),
        )
        for _ in range(2)
    )
    assert a == b


# ---------------------------------------------------------------------- simulated SGD
def test_hadamard_collapse_boundary_matches_simulated_sgd(tmp_path):
    """32 nonlinear SGD runs per lr on a 20-point grid (sweep engine): the first lr where half of them
    shrink ×10⁶ is within one grid step of the root of Λ = 0."""
    prob = hadamard_problem()
    eta = critical_learning_rate(prob.loss_fn, prob.params, prob.mirror, prob.data, batch_size=2)
    lrs = np.geomspace(0.3 * eta.value, 1.2 * eta.upper, 20)
    (sim,) = simulate_collapse("hadamard", lrs, [2], 32, 1500, Context(out_dir=tmp_path))
    got, want = measured_index(sim["collapsed"]), first_index(lrs, eta.value)
    assert got is not None and abs(got - want) <= 1, (sim, want)
    assert sim["collapsed"][0] == 0.0  # far below η_c SGD escapes the saddle


def test_kicked_model_starts_at_the_stated_distance_and_computes_the_problems_loss():
    from mirrorsym.experiments.noise import KickedModel, SurfaceDistance, squared_error

    for name, problem in (("hadamard", hadamard_problem()), ("swap", swap_problem())):
        model = KickedModel(name, 1e-3, seed=4)
        params = {k: v.detach() for k, v in model.named_parameters()}
        assert float(SurfaceDistance(name)(params, None)) == pytest.approx(1e-3, rel=1e-12)
        x, y = problem.data
        assert torch.allclose(squared_error(model(x), y), problem.loss_fn(params, (x, y)), rtol=1e-14, atol=0)
        onto = problem.mirror.project(params)  # the kick is along O only: θ_∥ is the problem's point
        base = problem.mirror.project(problem.params)
        assert all(torch.allclose(onto[k], base[k], atol=1e-15) for k in onto)


@pytest.mark.slow
def test_swap_boundary_at_batch_three_matches_simulated_sgd(tmp_path):
    prob = swap_problem()
    eta = critical_learning_rate(
        prob.loss_fn, prob.params, prob.mirror, prob.data, batch_size=3, gamma=prob.gamma
    )
    lrs = np.geomspace(0.3 * eta.value, 1.2 * eta.upper, 20)
    (sim,) = simulate_collapse("swap", lrs, [3], 32, 3000, Context(out_dir=tmp_path), seed=1)
    got, want = measured_index(sim["collapsed"]), first_index(lrs, eta.value)
    assert got is not None and abs(got - want) <= 1, (sim, want)


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_fail_clearly():
    prob = hadamard_problem()
    args = (prob.loss_fn, prob.params, prob.mirror, prob.data)
    with pytest.raises(ValueError, match="batch_size=13"):
        lyapunov_exponent(*args, lr=0.1, batch_size=13)
    with pytest.raises(ValueError, match="batch_size=13"):
        critical_learning_rate(*args, batch_size=13)
    for lr in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lr must be"):
            lyapunov_exponent(*args, lr=lr, batch_size=2)
    with pytest.raises(ValueError, match="scalar"):
        lyapunov_exponent(
            lambda p, batch: (batch[1] - batch[0] @ (p["u"] * p["w"])) ** 2,
            prob.params,
            prob.mirror,
            prob.data,
            lr=0.1,
            batch_size=2,
        )
    with pytest.raises(ValueError, match="mean of its per-sample losses"):
        lyapunov_exponent(
            lambda p, batch: ((batch[1] - batch[0] @ (p["u"] * p["w"])) ** 2).sum(),
            prob.params,
            prob.mirror,
            prob.data,
            lr=0.1,
            batch_size=2,
        )
    dead = dead_neuron_problem()
    with pytest.raises(ValueError, match="commute"):
        lyapunov_exponent(
            dead.loss_fn, dead.params, dead.mirror, dead.data, lr=0.1, batch_size=2, method="exact"
        )
    offset = prob.mirror.through(
        {"u": torch.ones(3, dtype=torch.float64), "w": torch.ones(3, dtype=torch.float64)}
    )
    with pytest.raises(ValueError, match="misses the origin"):
        lyapunov_exponent(
            prob.loss_fn,
            offset.project(prob.params),
            offset,
            prob.data,
            lr=0.1,
            batch_size=2,
            gamma=0.1,
        )


def test_a_point_off_the_surface_is_projected_with_a_warning():
    prob = hadamard_problem()
    off = {k: v.clone() for k, v in prob.params.items()}
    off["u"][0], off["w"][0] = 0.3, -0.2
    with pytest.warns(UserWarning, match="projection"):
        lam = lyapunov_exponent(prob.loss_fn, off, prob.mirror, prob.data, lr=0.3, batch_size=2)
    assert lam.value == pytest.approx(hadamard_reference(prob, 0.3, 2), abs=1e-12)


def test_tanh_loss_used_here_is_a_mean():
    """Guard for the fixtures: the per-sample decomposition the theory relies on holds for them."""
    prob = dead_neuron_problem()
    p = {k: torch.randn_like(v) for k, v in prob.params.items()}
    x, y = prob.data
    whole = tanh_loss(p, (x, y))
    assert whole == pytest.approx(
        torch.stack([tanh_loss(p, (x[i : i + 1], y[i : i + 1])) for i in range(len(y))]).mean().item(),
        rel=1e-12,
    )
