"""DCS parametrizations against independent references (docs/theory.md#dcs, closed forms A and C, scikit-learn)."""

import pytest
import torch
from sklearn.linear_model import Lasso, MultiTaskLasso
from torch import nn

import mirrorsym as ms
from mirrorsym.constrain import LinearConstraint

F64 = torch.float64


def _fit(module, loss_fn, steps, lr, weight_decay, opt=torch.optim.SGD, **kw):
    """Full-batch training with coupled decay λ = ``weight_decay`` on every parameter."""
    optimizer = opt(module.parameters(), lr=lr, weight_decay=weight_decay, **kw)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    return module


def _regression(n=200, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    beta = torch.zeros(d, dtype=F64)
    beta[:5] = torch.tensor([1.5, -2.0, 0.8, -0.5, 0.3], dtype=F64)
    return X, X @ beta + 0.1 * torch.randn(n, generator=g, dtype=F64)


# --------------------------------------------------------------------- registration keeps the function
CASES = [
    ("sparse", {}),
    ("group_sparse", {"dim": 0}),
    ("group_sparse", {"dim": 1}),
    ("low_rank", {}),
    ("linear", {"k": 3}),
]


@pytest.mark.parametrize("fn,kw", CASES)
@pytest.mark.parametrize("layer", ["linear", "conv", "mha_in", "mha_out"])
def test_registration_keeps_function_and_trains(fn, kw, layer):
    torch.manual_seed(0)
    if layer == "linear":
        model, x, target = nn.Linear(6, 5), torch.randn(4, 6), None
    elif layer == "conv":
        model, x, target = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 7, 7), None
    else:
        model, x = nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(2, 5, 8)
        target = (model, "in_proj_weight") if layer == "mha_in" else (model.out_proj, "weight")
    run = (lambda: model(x)) if target is None else (lambda: model(x, x, x)[0])
    module, name = target if target is not None else (model, "weight")
    before = run().detach()
    if fn == "linear":  # a random orthonormal O over the flattened tensor
        n = getattr(module, name).numel()
        kw = {"O": torch.linalg.qr(torch.randn(n, kw["k"], generator=torch.Generator().manual_seed(0))).Q}
    getattr(ms.constrain, fn)(module, name, **kw)
    assert "parametrizations" in "".join(model.state_dict())  # documented key change
    assert torch.allclose(run(), before, atol=1e-5, rtol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2)
    run().square().mean().backward()
    opt.step()
    after = run().detach()
    assert torch.isfinite(after).all() and not torch.allclose(after, before)


def test_state_dict_roundtrip_and_factor_count():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    ms.constrain.sparse(a)
    ms.constrain.sparse(b)
    assert set(a.state_dict()) == {
        "bias",
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    }
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight)
    u, v = a.parametrizations.weight.original0, a.parametrizations.weight.original1
    assert torch.equal(v, torch.ones_like(v)) and torch.equal(u * v, a.weight)  # unbalanced: v = c = 1


def test_dtype_follows_weight():
    m = nn.Linear(4, 3).to(F64)
    O = torch.linalg.qr(torch.randn(12, 2, dtype=torch.float32)).Q
    ms.constrain.linear(m, "weight", O)
    assert all(p.dtype == F64 for p in m.parameters()) and m.parametrizations.weight[0].O.dtype == F64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_follows_weight():
    m = nn.Linear(6, 4).cuda()
    x = torch.randn(3, 6, device="cuda")
    y0 = m(x)
    ms.constrain.low_rank(m, "weight")
    assert all(p.is_cuda for p in m.parameters())
    assert torch.allclose(m(x), y0, atol=1e-5)


# --------------------------------------------------------------------- closed form A: Lasso
@pytest.mark.parametrize("alpha", [0.03, 0.06, 0.1, 0.2, 0.4, 0.8])
def test_sparse_reaches_sklearn_lasso_with_sign_changes(alpha):
    X, y = _regression()
    ref = torch.as_tensor(
        Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(X.numpy(), y.numpy()).coef_
    )
    model = nn.Linear(X.shape[1], 1, bias=False).to(F64)
    g = torch.Generator().manual_seed(1)
    init = -ref + 0.05 * torch.randn(ref.shape, generator=g, dtype=F64)  # every support entry must flip sign
    with torch.no_grad():
        model.weight.copy_(init[None])
    ms.constrain.sparse(model, "weight")
    lam = ms.constrain.weight_decay_for(l1=2 * alpha)  # MSE loss: sklearn alpha = γ = λ/2
    _fit(model, lambda: (model(X).squeeze(1) - y).square().mean(), 3000, 0.02, lam, momentum=0.9)
    w = model.weight.detach().squeeze(0)
    support = ref != 0
    assert (w - ref).abs().max() <= 1e-3
    assert torch.equal(w.abs() > 1e-6, support)
    assert support.sum() >= 3 and (ref[support].abs() > 0.05).all()  # well-separated reference support
    flipped = torch.sign(w[support]) != torch.sign(init[support])
    assert flipped.all()


def test_balanced_split_would_freeze_signs():
    """Why the split is unbalanced (docs/theory.md#dcs): u = v = √θ sits on the mirror surface u = v, which GD
    never leaves, so θ = u·v ≥ 0 forever, while the unbalanced split crosses zero."""
    target = torch.tensor(-1.0, dtype=F64)
    for balanced, expect_negative in [(True, False), (False, True)]:
        u = torch.tensor(0.5, dtype=F64, requires_grad=True)
        v = torch.tensor(0.5 if balanced else 1.0, dtype=F64, requires_grad=True)
        if not balanced:
            u.data.fill_(0.25)
        opt = torch.optim.SGD([u, v], lr=0.05)
        for _ in range(500):
            opt.zero_grad()
            (u * v - target).square().backward()
            opt.step()
        assert ((u * v).item() < -0.5) == expect_negative


# --------------------------------------------------------------------- group lasso: MultiTaskLasso
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_group_sparse_matches_multitask_lasso(alpha):
    g = torch.Generator().manual_seed(1)
    n, d, T = 200, 10, 3
    X = torch.randn(n, d, generator=g, dtype=F64)
    B = torch.zeros(d, T, dtype=F64)
    B[:4] = torch.randn(4, T, generator=g, dtype=F64)
    Y = X @ B + 0.1 * torch.randn(n, T, generator=g, dtype=F64)
    ref = torch.as_tensor(
        MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=100_000)
        .fit(X.numpy(), Y.numpy())
        .coef_
    )  # (T, d): features are columns
    model = nn.Linear(d, T, bias=False).to(F64)
    ms.constrain.group_sparse(model, "weight", dim=1)
    lam = ms.constrain.weight_decay_for(group=2 * alpha)
    _fit(model, lambda: (model(X) - Y).square().sum(1).mean(), 2000, 0.02, lam, momentum=0.9)
    W = model.weight.detach()
    assert (W - ref).abs().max() <= 1e-3
    assert torch.equal(W.abs().amax(0) > 1e-6, ref.abs().amax(0) > 0)
    assert 0 < int((ref.abs().amax(0) > 0).sum()) < d


# --------------------------------------------------------------------- closed form C: nuclear norm
@pytest.mark.parametrize("gamma,rank", [(1.0, 3), (1.8, 2)])
def test_low_rank_reaches_singular_value_soft_threshold(gamma, rank):
    g = torch.Generator().manual_seed(1)
    m, n = 20, 15
    U = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=F64)).Q
    M = U @ torch.diag(torch.tensor([3.0, 2.0, 1.5], dtype=F64)) @ V.T + 0.05 * torch.randn(
        m, n, generator=g, dtype=F64
    )
    expected = (torch.linalg.svdvals(M) - gamma).clamp_min(0)
    assert int((expected > 0).sum()) == rank
    lin = nn.Linear(n, m, bias=False).to(F64)
    ms.constrain.low_rank(lin, "weight")
    lam = ms.constrain.weight_decay_for(nuclear=2 * gamma)  # sum-of-squares loss: ‖M − W‖² + 2γ‖W‖_*
    _fit(lin, lambda: (lin.weight - M).square().sum(), 1200, 0.02, lam, momentum=0.9)
    s = torch.linalg.svdvals(lin.weight.detach())
    assert (s - expected).abs().max() <= 1e-3
    assert int((s > 1e-8).sum()) == rank


# --------------------------------------------------------------------- linear constraint Oᵀθ = 0
def _constrained_ridge(X, y, O, lam):
    """Independent reference: min MSE(θ) + (λ/2)‖θ‖² over Oᵀθ = 0, in a basis N of ker Oᵀ."""
    d = X.shape[1]
    Q = torch.linalg.qr(torch.cat([O, torch.eye(d, dtype=F64)], 1)).Q
    N = Q[:, O.shape[1] : d]
    n = X.shape[0]
    A = N.T @ X.T @ X @ N / n + lam / 2 * torch.eye(N.shape[1], dtype=F64)
    theta = N @ torch.linalg.solve(A, N.T @ X.T @ y / n)
    grad = 2 * X.T @ (X @ theta - y) / n
    return theta, O.T @ grad


def test_linear_constraint_exact_above_threshold_not_below():
    g = torch.Generator().manual_seed(3)
    n, d, k = 300, 8, 2
    X = torch.randn(n, d, generator=g, dtype=F64)
    O = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64)).Q
    theta_star = torch.randn(d, generator=g, dtype=F64)
    theta_star = theta_star - O @ (O.T @ theta_star) + 0.3 * O[:, 0]  # a small push off the surface
    y = X @ theta_star + 0.1 * torch.randn(n, generator=g, dtype=F64)

    def train(lam):
        model = nn.Linear(d, 1, bias=False).to(F64)
        ms.constrain.linear(model, "weight", O)
        _fit(model, lambda: (model(X).squeeze(1) - y).square().mean(), 2500, 0.02, lam, momentum=0.9)
        return model.weight.detach().reshape(-1)

    lam_hi = 1.0
    ref, g_s = _constrained_ridge(X, y, O, lam_hi)
    assert g_s.abs().max() < 0.8 * lam_hi  # the premise: above the threshold (KKT strictly inside)
    theta = train(lam_hi)
    assert (O.T @ theta).norm() <= 1e-6
    assert (theta - ref).abs().max() <= 1e-6

    lam_lo = 1e-3
    _, g_s = _constrained_ridge(X, y, O, lam_lo)
    assert g_s.abs().max() > 10 * lam_lo  # below the threshold
    assert (O.T @ train(lam_lo)).norm() > 0.1


def test_linear_parametrization_formula():
    O = torch.linalg.qr(torch.randn(6, 2, dtype=F64)).Q
    p = LinearConstraint(O, torch.Size([2, 3]))
    theta = torch.randn(2, 3, dtype=F64)
    w, u, v = p.right_inverse(theta)
    assert torch.allclose(p(w, u, v), theta)
    assert torch.allclose(O.T @ w.reshape(-1), torch.zeros(2, dtype=F64), atol=1e-12)
    assert torch.allclose(p.coefficients(theta), O.T @ theta.reshape(-1))


# --------------------------------------------------------------------- bad input
def test_errors_name_the_culprit():
    m = nn.Linear(4, 3)
    with pytest.raises(KeyError, match="wieght"):
        ms.constrain.sparse(m, "wieght")
    with pytest.raises(ValueError, match=r"shape \(12, k\)"):
        ms.constrain.linear(m, "weight", torch.eye(5)[:, :2])
    with pytest.raises(ValueError, match="not orthonormal"):
        ms.constrain.linear(m, "weight", torch.ones(12, 2))
    with pytest.raises(ValueError, match="dim=2"):
        ms.constrain.group_sparse(m, "weight", dim=2)
    with pytest.raises(ValueError, match="rank"):
        ms.constrain.low_rank(m, "weight", rank=5)
    with pytest.raises(ValueError, match="scale"):
        ms.constrain.sparse(m, "weight", scale=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        ms.constrain.weight_decay_for(l1=-0.1)
    with pytest.raises(ValueError, match="param group"):
        ms.constrain.weight_decay_for(l1=0.1, nuclear=0.2)
    assert ms.constrain.weight_decay_for(l1=0.3, group=0.3) == 0.3
    ms.constrain.sparse(m, "weight")
    with pytest.raises(ValueError, match="already has a parametrization"):
        ms.constrain.low_rank(m, "weight")


def test_warns_when_optimizer_already_holds_the_tensor():
    m = nn.Linear(4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="optimizer"):
        ms.constrain.sparse(m, "weight", optimizer=opt)
    fresh = nn.Linear(4, 3)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms.constrain.sparse(fresh, "weight", optimizer=other)


def test_low_rank_truncation_warns():
    m = nn.Linear(6, 5)
    with pytest.warns(UserWarning, match="truncates"):
        ms.constrain.low_rank(m, "weight", rank=2)
    assert torch.linalg.matrix_rank(m.weight.detach()) == 2


def test_param_groups_split_factors_from_the_rest():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    ms.constrain.sparse(model[0], "weight")
    groups = ms.constrain.param_groups(model, weight_decay=0.1)
    factor_ids = {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) == 2 and groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in groups[1]["params"]}.isdisjoint(factor_ids) and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("opt", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_any_optimizer_produces_exact_zeros(opt):
    """Coupled or decoupled decay on the factors drives useless weights to (numerically) exact zero."""
    X, y = _regression(d=8)
    model = nn.Linear(8, 1, bias=False).to(F64)
    ms.constrain.sparse(model, "weight")
    _fit(model, lambda: (model(X).squeeze(1) - y).square().mean(), 1500, 0.01, 0.4)
    w = model.weight.detach().abs().squeeze(0)
    assert (w[5:] < 1e-4).all() and (w[:2] > 0.5).all()
