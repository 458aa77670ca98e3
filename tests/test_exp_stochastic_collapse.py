"""stochastic_collapse: the swap mirror's Lyapunov exponent against a direct simulation of the linearised
SGD dynamics; planted duplicated units counted against numpy; the reference point is on the surface."""

import math

import numpy as np
import torch

from mirrorsym.detect import find_symmetries
from mirrorsym.experiments import stochastic_collapse as S
from mirrorsym.theory import lyapunov_exponent, minibatch_curvature

CFG = S.CONFIGS["tiny"]


def _problem():
    x, y = S.make_data(CFG)
    return x, y, S.reference_point(x, y, CFG)


def test_reference_point_is_stationary_and_on_the_swap_surface():
    x, y, theta = _problem()
    assert S.swap_mirror().distance(theta).item() == 0.0
    grad = torch.func.grad(S.batch_loss)(theta, (x, y))
    assert max(g.abs().max().item() for g in grad.values()) < 1e-7


def test_lyapunov_exponent_matches_a_direct_simulation_of_the_linearised_dynamics():
    x, y, theta = _problem()
    mirror, n = S.swap_mirror(), len(x)
    # independent reference: O from the swap's definition, per-sample Hessians by autograd, numpy product
    names = ["hidden.weight", "hidden.bias"]
    shapes = [theta[k].shape for k in names]
    flat = torch.cat([theta[k].reshape(-1) for k in names])

    def unflat(z):
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            m = int(np.prod(s))
            out[k] = z[i:i + m].reshape(s)
            i += m
        return out

    d = CFG.d
    O = np.zeros((flat.numel(), d + 1))
    for j in range(d):  # hidden.weight[0, j] − hidden.weight[1, j]
        O[j, j], O[d + j, j] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    O[2 * d, d], O[2 * d + 1, d] = 1 / math.sqrt(2), -1 / math.sqrt(2)  # the biases
    H = np.stack([O.T @ torch.autograd.functional.hessian(
        lambda z, i=i: S.batch_loss(unflat(z), (x[i:i + 1], y[i:i + 1])), flat).numpy() @ O for i in range(n)])
    for lr, b in ((0.3, 1), (0.05, 4)):
        rng = np.random.default_rng(0)
        z, log_norm, T = np.ones(d + 1) / math.sqrt(d + 1), 0.0, 40000
        for _ in range(T):
            idx = rng.choice(n, size=b, replace=False)
            z = z - lr * H[idx].mean(0) @ z
            s = np.linalg.norm(z)
            log_norm += math.log(s)
            z /= s
        res = lyapunov_exponent(S.batch_loss, theta, mirror, (x, y), lr=lr, batch_size=b, num_samples=40000)
        assert abs(res.value - log_norm / T) < 4 * res.stderr + 2e-4, (lr, b, res.value, log_norm / T)
    curv = minibatch_curvature(S.batch_loss, theta, mirror, (x, y))
    np.testing.assert_allclose(curv.blocks.numpy(), H, atol=1e-9)


def test_planted_duplicate_counted_like_numpy():
    x, y, theta = _problem()
    model = S.Student(CFG.d, 3)
    with torch.no_grad():
        model.hidden.weight.copy_(torch.tensor([[1.0], [1.02], [-0.7]], dtype=torch.float64))
        model.hidden.bias.copy_(torch.tensor([0.3, 0.3, 0.1], dtype=torch.float64))
    smap = find_symmetries(model, x[:1])
    got = S.weight_counts(model, x, smap)
    U = np.concatenate([model.hidden.weight.detach().numpy(), model.hidden.bias.detach().numpy()[:, None]], 1)
    norms = np.linalg.norm(U, axis=1)
    close = [(i, j) for i in range(3) for j in range(i + 1, 3)
             if np.linalg.norm(U[i] - U[j]) <= 0.05 * max(norms[i], norms[j])]
    assert got["duplicated"] == len(close) == 1 and got["dead"] == 0 and got["distinct"] == 2
    f = S.functional_counts(model, x)
    A = np.tanh(x.numpy() @ U[:, :1].T + U[:, 1]).T
    ref = sum(np.linalg.norm(A[i] - A[j]) <= 0.05 * max(np.linalg.norm(A[i]), np.linalg.norm(A[j]))
              for i in range(3) for j in range(i + 1, 3))
    assert f["duplicated"] == ref == 1


def test_initial_split_is_the_stated_relative_distance():
    x, y, theta = _problem()
    names = ["hidden.weight", "hidden.bias"]
    model = S.make_student(CFG.d, CFG.hidden, tuple(theta[n] for n in names), 0.2, 3)
    U = S.unit_matrix(dict(model.named_parameters())).detach()
    mid = (U[0] + U[1]) / 2
    assert abs((U[0] - U[1]).norm().item() - 0.2 * mid.norm().item()) < 1e-12
    np.testing.assert_allclose(mid.numpy(), S.unit_matrix(theta)[0].numpy(), atol=1e-14)
