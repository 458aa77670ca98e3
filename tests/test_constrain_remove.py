"""Removing symmetries (docs/theory.md#syre): planted duplicated neurons stay duplicated under plain training
with weight decay (Theorem 1: the swap surface is absorbing) and separate under remove_symmetries."""

import pytest
import torch
from torch import nn

import mirrorsym as ms
from mirrorsym.core import Mirror

F64 = torch.float64


def _planted_mlp(seed=0):
    """tanh MLP 4 → 6 → 1 whose hidden units 0 and 1 are exact duplicates (row, bias, column)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
        model[2].weight[:, 1] = model[2].weight[:, 0]
    return model


SWAP = Mirror.swap(
    {"0.weight": (0, [0]), "0.bias": (0, [0]), "2.weight": (1, [0])},
    {"0.weight": (0, [1]), "0.bias": (0, [1]), "2.weight": (1, [1])},
)


def _gap(model):
    """Distance of the plain parameters to the duplicated-unit surface (the swap mirror's surface)."""
    params = {k: v.detach() for k, v in _plain(model).items()}
    return SWAP.distance(params).item()


def _plain(model):
    return {f"{i}.{n}": getattr(model[i], n) for i in (0, 2) for n in ("weight", "bias")}


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 4, generator=g, dtype=F64)
    return X, torch.sin(X @ torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=F64))[:, None]


def _train(model, opt, steps=400, extra=None):
    X, y = _data()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (32,), generator=g)
        opt.zero_grad()
        (model(X[idx]) - y[idx]).square().mean().backward()
        opt.step()
        if extra is not None:
            extra.step()
    return model


def test_duplicates_stay_duplicated_under_sgd_with_weight_decay():
    model = _planted_mlp()
    assert _gap(model) == 0.0
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2))
    assert _gap(model) <= 1e-10


def test_l2_init_keeps_duplicates_because_its_centre_is_symmetric():
    model = _planted_mlp()
    ms.constrain.l2_init(model)
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2))
    assert _gap(model) <= 1e-10


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
def test_remove_symmetries_parametrize_separates_duplicates(opt_name):
    model = _planted_mlp()
    X, _ = _data()
    before = model(X).detach()
    handle = ms.remove_symmetries(model, sigma=0.1, seed=0)
    assert torch.allclose(model(X), before, atol=1e-12)  # function unchanged at registration
    assert _gap(model) <= 1e-12
    lr = 0.1 if opt_name == "SGD" else 0.01
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=lr, weight_decay=1e-2)
    _train(model, opt)
    assert _gap(model) > 1e-4
    handle.remove()
    assert not hasattr(model[0], "parametrizations")


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
def test_remove_symmetries_optimizer_mode_separates_duplicates(opt_name):
    model = _planted_mlp()
    lr = 0.1 if opt_name == "SGD" else 0.01
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=lr, weight_decay=0.0)
    keys = list(model.state_dict())
    ms.remove_symmetries(model, sigma=0.1, seed=0, mode="optimizer", weight_decay=1e-2, optimizer=opt)
    assert list(model.state_dict()) == keys  # the model is not reparametrized
    _train(model, opt)
    assert _gap(model) > 1e-4


def test_optimizer_mode_step_is_decay_towards_the_offset():
    model = nn.Linear(3, 2).to(F64)
    handle = ms.remove_symmetries(
        model, sigma=0.5, seed=3, mode="optimizer", weight_decay=0.2, advanced_eps=0.3
    )
    w0 = model.weight.detach().clone()
    handle.step(lr=0.1)
    d2 = handle.scales["weight"].square()
    expected = w0 - 0.1 * 0.2 * d2 * (w0 - handle.offsets["weight"])
    assert torch.allclose(model.weight, expected)
    assert ((handle.scales["weight"] - 1).abs() <= 0.3).all() and not torch.all(handle.scales["weight"] == 1)


def test_offset_scale_and_reproducibility():
    torch.manual_seed(0)
    a = nn.Linear(50, 40)
    b = nn.Linear(50, 40)
    b.load_state_dict(a.state_dict())
    ha = ms.remove_symmetries(a, sigma=0.01, seed=7, mode="optimizer", weight_decay=0.1)
    hb = ms.remove_symmetries(b, sigma=0.01, seed=7, mode="optimizer", weight_decay=0.1)
    assert torch.equal(ha.offsets["weight"], hb.offsets["weight"])
    ratio = ha.offsets["weight"].std() / (0.01 * a.weight.detach().std())
    assert 0.9 < ratio < 1.1  # σ₀ = sigma × the layer's init std
    hc = ms.remove_symmetries(nn.Linear(50, 40), sigma=0.01, seed=8, mode="optimizer", weight_decay=0.1)
    assert not torch.equal(hc.offsets["weight"], ha.offsets["weight"])


def test_parametrize_mode_decay_pulls_towards_offset():
    """With the loss switched off, coupled decay on ψ drives φ to θ₀ exactly (the fixed point)."""
    model = nn.Linear(3, 2).to(F64)
    handle = ms.remove_symmetries(model, sigma=1.0, seed=0, advanced_eps=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1.0)
    for _ in range(400):
        opt.zero_grad()
        (0.0 * model.weight.sum()).backward()
        opt.step()
    assert torch.allclose(model.weight, handle.offsets["weight"], atol=1e-12)


def test_shrink_and_perturb_separates_duplicates():
    model = _planted_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ms.constrain.shrink_and_perturb(model, weight_decay=1e-2, noise=0.01, seed=0, optimizer=opt)
    _train(model, opt)
    assert _gap(model) > 1e-4


def test_remove_symmetries_bad_input():
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="sigma"):
        ms.remove_symmetries(m, sigma=-0.1)
    with pytest.raises(ValueError, match="advanced_eps"):
        ms.remove_symmetries(m, advanced_eps=-0.1)
    with pytest.raises(ValueError, match="advanced_eps"):
        ms.remove_symmetries(m, advanced_eps=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        ms.remove_symmetries(m, mode="optimizer", weight_decay=-1.0)
    with pytest.raises(ValueError, match="mode"):
        ms.remove_symmetries(m, mode="hook")
    with pytest.raises(ValueError, match="pass it to the optimizer"):
        ms.remove_symmetries(m, weight_decay=0.1)
    with pytest.warns(UserWarning, match="does nothing"):
        ms.remove_symmetries(nn.Linear(3, 2), mode="optimizer")
    with pytest.raises(KeyError, match="wieght"):
        ms.remove_symmetries(m, params=["wieght"])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="optimizer"):
        ms.remove_symmetries(m, optimizer=opt)
