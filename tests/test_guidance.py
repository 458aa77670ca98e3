"""ms.constrain.suggest_decay and its pieces, against independent references (closed forms, brute force,
simulated decay, a planted teacher)."""

import copy
import math

import pytest
import torch
from torch import nn

import mirrorsym as ms


def _one_unit_model(sigma_dir=1.0):
    """2 ReLU hidden units, unit 0 = (a, v) = (1, 1)/√2 · √2 (balanced), unit 1 dead; one sample x = 1."""
    m = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0], [0.0]]))
        m[2].weight.copy_(torch.tensor([[1.0, 0.0]]))
    return m


def _mse(out, y):
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_global_and_spinodal_thresholds_match_the_closed_forms(sigma):
    # f = a·v = r²/2 along the balanced direction, L(r) − L(0) = −σr² + r⁴/4:
    # γ_global = sup (σr² − r⁴/4)/(2r) = 2σ^{3/2}/(3√3), γ_spinodal = sup (2σr − r³)/2 = (2σ/3)^{3/2}
    m = _one_unit_model()
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), sigma, dtype=torch.float64)
    th = ms.constrain.unit_thresholds(m, _mse, (x, y), scales=torch.linspace(0.005, 4, 4000).tolist())
    assert th.global_[1] == 0 and th.spinodal[1] == 0  # the dead unit
    assert th.global_[0] == pytest.approx(2 * sigma**1.5 / (3 * math.sqrt(3)), rel=1e-4)
    assert th.spinodal[0] == pytest.approx((2 * sigma / 3) ** 1.5, rel=1e-3)
    assert th.removal[0] <= th.global_[0] <= th.spinodal[0]


def test_global_threshold_against_brute_force_minimisation_over_r():
    """γ_global is where min_r [L(r u) + 2γr] − L(0) changes sign, found by bisection over γ with a dense grid
    of r, scaling the weights of a copy directly (no code shared with unit_thresholds)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    y = torch.randn(64, 2, dtype=torch.float64)
    j = 2
    th = ms.constrain.unit_thresholds(m, _mse, (x, y), scales=torch.linspace(0.002, 4, 2000).tolist())
    norm = th.norms[j]
    radii = torch.linspace(0.002, 4, 2000, dtype=torch.float64) * norm

    def loss_at(c):
        mm = copy.deepcopy(m)
        with torch.no_grad():
            mm[0].weight[j] *= c
            mm[0].bias[j] *= c
            mm[2].weight[:, j] *= c
            return _mse(mm(x), y).item()

    base = loss_at(0.0)
    delta = torch.tensor([loss_at(float(r / norm)) - base for r in radii])

    def survives(gamma):
        return bool((delta + 2 * gamma * radii).min() < 0)

    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if survives(mid) else (lo, mid)
    assert th.global_[j] == pytest.approx(hi, rel=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_decay_steps_match_simulated_decay_of_a_dead_unit(momentum):
    """A gated unit with no loss gradient (its output weight sees no data): θ_j = s·w shrinks by pure decay."""
    gamma, lr, tol = 0.01, 0.1, 1e-6
    s = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    w = nn.Parameter(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    r0 = (s * w).norm().item()
    opt = torch.optim.SGD([s, w], lr=lr, momentum=momentum, weight_decay=2 * gamma)
    steps = 0
    while (s * w).norm().item() > tol:
        opt.zero_grad()
        (0.0 * (s.sum() + w.sum())).backward()
        opt.step()
        steps += 1
    predicted = ms.constrain.decay_steps(gamma, lr, momentum, r0=r0, tol=tol)
    assert abs(steps - predicted) <= max(2, 0.03 * predicted)


def test_decay_rate_closed_forms():
    from mirrorsym.constrain.guidance import decay_rate

    assert decay_rate(0.01, 0.1) == pytest.approx(1 - 0.1 * 0.02)
    assert decay_rate(1e-4, 0.1, 0.9) == pytest.approx(1 - 0.1 * 2e-4 / 0.1, rel=1e-5)  # small ηλ/(1 − μ)
    with pytest.raises(ValueError, match="contract"):
        ms.constrain.decay_steps(50.0, 1.0)


def _teacher(n=512, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    sigma = torch.tensor([3.0, 1.5, 0.75, 0.25, 0.08])
    return x, torch.relu(x) * sigma  # teacher unit i reads x_i and writes output i, strength σ_i


def _fit(model, data, steps, gamma=0.0, ramp=1):
    x, y = data
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    if gamma > 0:
        ms.constrain.apply(model, x[:8], kind="units")
        groups = ms.constrain.param_groups(model, 2 * gamma)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    for t in range(steps):
        if gamma > 0:
            opt.param_groups[0]["weight_decay"] = 2 * gamma * min(1.0, (t + 1) / ramp)
        opt.zero_grad()
        _mse(model(x), y).backward()
        opt.step()
    return model


def test_suggested_decay_reaches_the_planted_width():
    """A teacher with 5 ReLU units of strengths 3, 1.5, 0.75, 0.25, 0.08 (distinct inputs and outputs, so no
    student unit can serve two); a student of width 8 asked for 3 units keeps the three strongest."""
    data = _teacher()
    torch.manual_seed(0)
    dense = _fit(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 5)), data, 600)

    def train(gamma, steps):
        return _fit(copy.deepcopy(dense), data, 300 + steps, gamma=gamma, ramp=300)

    s = ms.constrain.suggest_decay(dense, _mse, data, 3, lr=0.05, momentum=0.9, train=train, rounds=3)
    assert s.torch_weight_decay == 2 * s.gamma and s.steps > 0
    assert s.width == 3 and s.reached
    model = train(s.gamma, s.steps)
    small, _ = ms.constrain.export(model, data[0], tol=s.tol)
    assert small[0].out_features == 3
    # each survivor reads mostly one of the three strongest teacher inputs
    strongest = small[0].weight.abs().argmax(1).sort().values.tolist()
    assert strongest == [0, 1, 2]


def test_predicted_width_is_monotone_and_brackets_the_suggestion():
    data = _teacher()
    torch.manual_seed(0)
    dense = _fit(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 5)), data, 600)
    s = ms.constrain.suggest_decay(dense, _mse, data, 3, lr=0.05)  # thresholds only, no calibration
    assert s.rounds == [] and s.reached is None
    assert s.predicted_width(s.gamma) == 3
    assert all(a >= b for a, b in zip(s.widths, s.widths[1:], strict=False))
    assert s.thresholds.path == sorted(s.thresholds.path)


def test_bad_inputs_raise_clear_errors():
    data = _teacher(n=32)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 5))
    for bad in (0, -1, 9):
        with pytest.raises(ValueError, match="between 1 and the group's width 8"):
            ms.constrain.suggest_decay(m, _mse, data, bad, lr=0.1)
    with pytest.raises(TypeError, match="int"):
        ms.constrain.suggest_decay(m, _mse, data, 2.5, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        ms.constrain.suggest_decay(m, _mse, data, 2, lr=0.0)
    deep = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    with pytest.raises(ValueError, match="group="):
        ms.constrain.unit_thresholds(deep, _mse, data)
    with pytest.raises(ValueError, match="threshold"):
        ms.constrain.unit_thresholds(m, _mse, data, threshold="local")


def test_local_threshold_of_a_dead_gated_unit_is_zero():
    """Why the guidance is global: at a dead gated unit the loss is cubic, so the projected Hessian on the
    unit's sign-flip mirror (gate, incoming row, outgoing column) vanishes and γ_c = 0."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    # unit 1 as three scalar-factor tensors: gate s, incoming row a, outgoing column v (a product s·a, s·v)
    params = {"s": torch.zeros(1, dtype=torch.float64), "a": torch.zeros(3, dtype=torch.float64),
              "v": torch.zeros(2, dtype=torch.float64)}

    def loss_fn(p, batch):
        w1 = m[0].weight.detach().clone()
        w2 = m[2].weight.detach().clone()
        w1 = torch.cat([w1[:1], (p["s"] * p["a"])[None], w1[2:]])
        w2 = torch.cat([w2[:, :1], (p["s"] * p["v"])[:, None], w2[:, 2:]], 1)
        return _mse(torch.relu(x @ w1.T) @ w2.T, y)

    mirror = ms.Mirror.sign_flip({"s": (0, torch.arange(1)), "a": (0, torch.arange(3)), "v": (0, torch.arange(2))})
    gc = ms.theory.critical_weight_decay(loss_fn, params, mirror)
    assert gc.gamma == 0.0 and abs(gc.lambda_min) < 1e-12
