"""Theorem 1 quantities against closed forms A and B (docs/theory.md#theorem-1) and dense Hessians."""

import pytest
import torch
from conftest import tanh_net, tanh_net_params, unit

import mirrorsym as ms
from mirrorsym.theory import (
    critical_weight_decay,
    hessian_cross_norm,
    projected_curvature,
    stationarity_residual,
    torch_weight_decay,
)


def hadamard_problem(n=200, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)

    def loss(p, batch):
        X, y = batch
        return ((y - X @ (p["u"] * p["w"])) ** 2).mean()

    return X, y, loss


def test_closed_form_A_every_coordinate():
    X, y, loss = hadamard_problem()
    g = torch.Generator().manual_seed(1)
    p = {"u": torch.randn(6, generator=g, dtype=torch.float64), "w": torch.randn(6, generator=g, dtype=torch.float64)}
    for i in range(6):
        m = ms.Mirror.sign_flip({"u": [i], "w": [i]})
        q = m.project(p)  # β_i = 0, the others arbitrary
        beta = q["u"] * q["w"]
        g_i = (-2 * ((y - X @ beta) * X[:, i]).mean()).item()
        got = critical_weight_decay(loss, q, m, (X, y)).gamma
        assert got == pytest.approx(abs(g_i) / 2, rel=1e-6)


def test_closed_form_B_dead_tanh_neuron():
    g = torch.Generator().manual_seed(2)
    n, d, m_units = 100, 3, 5
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Xt = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    y = torch.sin(X.sum(1))
    p = {"w": torch.randn(m_units, d + 1, generator=g, dtype=torch.float64),
         "a": torch.randn(m_units, generator=g, dtype=torch.float64)}

    def f(q):
        return torch.tanh(Xt @ q["w"].T) @ q["a"]

    def loss(q, batch=None):  # closes over its data: ignores batch
        return ((y - f(q)) ** 2).mean()

    mirror = ms.Mirror.sign_flip({"w": [2], "a": [2]})
    q = mirror.project(p)
    r = y - f(q)
    expected = (r[:, None] * Xt).mean(0).norm().item()
    assert critical_weight_decay(loss, q, mirror).gamma == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("factor,leaves", [(0.8, True), (1.2, False)])
def test_gradient_descent_leaves_below_and_returns_above_threshold(factor, leaves):
    # orthogonal design (XᵀX/n = I): coordinate 0's threshold does not depend on the others
    n, d = 64, 4
    Q = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64)).Q * n**0.5
    y = Q @ torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64)
    loss = lambda p, batch: ((y - Q @ (p["u"] * p["w"])) ** 2).mean()  # noqa: E731
    m = ms.Mirror.sign_flip({"u": [0], "w": [0]})
    p = {"u": torch.full((d,), 0.5, dtype=torch.float64), "w": torch.full((d,), 0.5, dtype=torch.float64)}
    p = m.project(p)
    gamma = factor * critical_weight_decay(loss, p, m).gamma
    u = p["u"].clone().requires_grad_(True)
    w = p["w"].clone().requires_grad_(True)
    with torch.no_grad():
        u[0], w[0] = 1e-3, 2e-3  # near the surface
    opt = torch.optim.SGD([u, w], lr=0.05, weight_decay=torch_weight_decay(gamma))
    for _ in range(3000):
        opt.zero_grad()
        loss({"u": u, "w": w}, None).backward()
        opt.step()
    dist = m.distance({"u": u.detach(), "w": w.detach()}).item()
    if leaves:
        assert dist > 0.1
    else:
        assert dist < 1e-8


def tanh_loss(q, batch):
    x, y = batch
    return ((tanh_net(q, x) - y) ** 2).mean()


def test_stationarity_and_cross_block_vanish_only_at_symmetric_points():
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randn(40, 2, dtype=torch.float64)
    p = tanh_net_params()
    for m in [ms.Mirror.sign_flip(unit(1)), ms.Mirror.swap(unit(2), unit(4))]:
        on = m.project(p)
        assert stationarity_residual(tanh_loss, on, m, (x, y), project=False) < 1e-13
        assert hessian_cross_norm(tanh_loss, on, m, (x, y), project=False) < 1e-12
        assert stationarity_residual(tanh_loss, p, m, (x, y), project=False) > 1e-3
        assert hessian_cross_norm(tanh_loss, p, m, (x, y), project=False) > 1e-3


def _dense_projected(loss, p, m):  # loss: θ ↦ L (bound to its data)
    names = list(p)
    sizes = [p[k].numel() for k in names]
    flat = torch.cat([p[k].reshape(-1) for k in names])

    def unflat(v):
        out, i = {}, 0
        for k, s in zip(names, sizes, strict=True):
            out[k] = v[i : i + s].reshape(p[k].shape)
            i += s
        return out

    H = torch.autograd.functional.hessian(lambda v: loss(unflat(v)), flat)
    k = m.dim(p)
    eye = torch.eye(k, dtype=p[names[0]].dtype)
    O = torch.stack([torch.cat([t.reshape(-1) for t in m.direction(e, p).values()]) for e in eye], 1)
    return torch.linalg.eigvalsh(O.T @ H @ O)[0].item()


def test_matrix_free_matches_dense_hessian_small_model():
    x = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randn(30, 2, dtype=torch.float64)
    p = tanh_net_params(hidden=20)  # 3*20 + 20 + 40 = 140 parameters
    g = torch.Generator().manual_seed(3)
    O = torch.linalg.qr(torch.randn(15, 4, generator=g, dtype=torch.float64)).Q
    cases = [
        ms.Mirror.sign_flip(unit(5)),
        ms.Mirror.swap(unit(1), unit(7)),
        ms.Mirror.from_basis(O, {"fc1.weight": (0, [0, 1, 2, 3, 4])}),
        # k = 80 > 64: the Lanczos path
        ms.Mirror.sign_flip({"fc1.weight": (0, list(range(20))), "fc2.weight": (1, list(range(10)))}),
    ]
    for m in cases:
        res = projected_curvature(tanh_loss, p, m, (x, y), project=False)
        dense = _dense_projected(lambda q: tanh_loss(q, (x, y)), p, m)
        assert res.lambda_min == pytest.approx(dense, rel=1e-8, abs=1e-10)
    assert res.method == "lanczos"


@pytest.mark.slow
def test_lanczos_on_a_million_parameter_mlp_within_100_hvps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 512),
                                torch.nn.Tanh(), torch.nn.Linear(512, 1))
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000
    x, y = torch.randn(64, 512), torch.randn(64, 1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = ms.core.loss_from_model(model, lambda out, target: ((out - target) ** 2).mean())
    m = ms.Mirror.sign_flip({"0.weight": (0, [7]), "0.bias": (0, [7]), "2.weight": (1, [7])})
    res = projected_curvature(loss, params, m, (x, y), max_hvps=100)
    assert res.method == "lanczos" and res.hvps <= 100
    from scipy.sparse.linalg import eigsh

    op = ms.theory.projected_hessian(loss, params, m, (x, y))
    ref = eigsh(op.as_linear_operator(), k=1, which="SA", tol=1e-6)[0][0]
    assert res.lambda_min == pytest.approx(ref, rel=1e-4)


def test_bad_input():
    p = tanh_net_params()
    m = ms.Mirror.sign_flip(unit(0))
    with pytest.raises(ValueError, match="scalar"):
        critical_weight_decay(lambda q, batch: q["fc1.weight"].sum(1), p, m)
    with pytest.raises(TypeError, match=r"\(params, batch\)"):  # the old one-argument form is refused by name
        critical_weight_decay(lambda q: q["fc1.weight"].sum(), p, m)
    with pytest.raises(ValueError, match="gamma"):
        torch_weight_decay(-1.0)
    assert torch_weight_decay(0.25) == 0.5
