"""Mirror semantics against direct tensor manipulation and exact invariance."""

import hypothesis.strategies as st
import pytest
import torch
from conftest import tanh_net, tanh_net_params, unit
from hypothesis import given, settings

import mirrorsym as ms


def test_sign_flip_negates_the_unit_and_nothing_else():
    p = tanh_net_params()
    r = ms.Mirror.sign_flip(unit(3)).reflect(p)
    exp = {k: v.clone() for k, v in p.items()}
    exp["fc1.weight"][3] *= -1
    exp["fc1.bias"][3] *= -1
    exp["fc2.weight"][:, 3] *= -1
    for k in p:
        torch.testing.assert_close(r[k], exp[k], rtol=0, atol=0)


def test_sign_flip_surface_is_the_dead_unit():
    p = tanh_net_params()
    m = ms.Mirror.sign_flip(unit(3))
    q = m.project(p)
    assert q["fc1.weight"][3].abs().max() == 0 and q["fc1.bias"][3] == 0 and q["fc2.weight"][:, 3].abs().max() == 0
    expected = torch.sqrt(p["fc1.weight"][3].pow(2).sum() + p["fc1.bias"][3] ** 2 + p["fc2.weight"][:, 3].pow(2).sum())
    torch.testing.assert_close(m.distance(p), expected)
    assert m.distance(p).dim() == 0


def test_swap_exchanges_units_and_surface_is_equality():
    p = tanh_net_params()
    s = ms.Mirror.swap(unit(3), unit(5))
    r = s.reflect(p)
    torch.testing.assert_close(r["fc1.weight"][3], p["fc1.weight"][5], rtol=0, atol=0)
    torch.testing.assert_close(r["fc2.weight"][:, 5], p["fc2.weight"][:, 3], rtol=0, atol=0)
    q = s.project(p)
    torch.testing.assert_close(q["fc1.weight"][3], q["fc1.weight"][5])
    torch.testing.assert_close(q["fc1.weight"][3], (p["fc1.weight"][3] + p["fc1.weight"][5]) / 2)
    diff = torch.cat([p["fc1.weight"][3] - p["fc1.weight"][5], (p["fc1.bias"][3] - p["fc1.bias"][5])[None],
                      p["fc2.weight"][:, 3] - p["fc2.weight"][:, 5]])
    torch.testing.assert_close(s.distance(p), diff.norm() / 2**0.5)


def test_from_basis_matches_dense_reflection():
    g = torch.Generator().manual_seed(1)
    O = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64)).Q
    p = {"u": torch.randn(4, generator=g, dtype=torch.float64), "w": torch.randn(5, generator=g, dtype=torch.float64)}
    m = ms.Mirror.from_basis(O, {"u": (0, [0, 1, 2]), "w": (0, [0, 1, 2])})
    theta = torch.cat([p["u"][:3], p["w"][:3]])
    R = torch.eye(6, dtype=torch.float64) - 2 * O @ O.T
    r = m.reflect(p)
    torch.testing.assert_close(torch.cat([r["u"][:3], r["w"][:3]]), R @ theta)
    torch.testing.assert_close(r["u"][3], p["u"][3])
    torch.testing.assert_close(r["w"][3:], p["w"][3:])
    torch.testing.assert_close(m.distance(p), (O.T @ theta).norm())


def test_invariance_of_tanh_net_under_sign_flip_and_swap():
    p = tanh_net_params()
    x = torch.randn(20, 3, dtype=torch.float64)
    fn = lambda q: tanh_net(q, x)  # noqa: E731
    assert ms.check_invariance(fn, p, ms.Mirror.sign_flip(unit(2))) < 1e-14
    assert ms.check_invariance(fn, p, ms.Mirror.swap(unit(1), unit(4))) < 1e-14
    half = ms.Mirror.sign_flip({"fc1.weight": (0, [2]), "fc1.bias": (0, [2])})  # incoming only: not a symmetry
    assert ms.check_invariance(fn, p, half) > 1e-3
    relu = lambda q: torch.relu(x @ q["fc1.weight"].T + q["fc1.bias"]) @ q["fc2.weight"].T  # noqa: E731
    assert ms.check_invariance(relu, p, ms.Mirror.sign_flip(unit(2))) > 1e-3


def test_offset_mirror_reflects_through_the_point():
    p = tanh_net_params()
    anchor = tanh_net_params(seed=7)
    m = ms.Mirror.sign_flip(unit(1)).through(anchor)
    r = m.reflect(p)
    torch.testing.assert_close(r["fc1.weight"][1], 2 * anchor["fc1.weight"][1] - p["fc1.weight"][1])
    assert m.distance(m.project(p)) < 1e-12
    torch.testing.assert_close(m.project(p)["fc1.bias"][1], anchor["fc1.bias"][1])
    assert m.distance(anchor) == 0


def test_compose_disjoint_mirrors():
    p = tanh_net_params()
    a, b = ms.Mirror.sign_flip(unit(0)), ms.Mirror.swap(unit(2), unit(3))
    both = a & b
    r = both.reflect(p)
    seq = b.reflect(a.reflect(p))
    for k in p:
        torch.testing.assert_close(r[k], seq[k])
    torch.testing.assert_close(both.distance(p) ** 2, a.distance(p) ** 2 + b.distance(p) ** 2)
    with pytest.raises(ValueError, match="overlap"):
        a & ms.Mirror.swap(unit(0), unit(1))


def test_batched_params_match_per_copy_results():
    copies = [tanh_net_params(seed=s) for s in range(4)]
    batched = {k: torch.stack([c[k] for c in copies]) for k in copies[0]}
    m = ms.Mirror.swap(unit(1), unit(2)) & ms.Mirror.sign_flip(unit(4))
    rb = m.reflect(batched, batch_dims=1)
    db = m.distance(batched, batch_dims=1)
    assert db.shape == (4,)
    for i, c in enumerate(copies):
        r = m.reflect(c)
        for k in c:
            torch.testing.assert_close(rb[k][i], r[k])
        torch.testing.assert_close(db[i], m.distance(c))


def test_float32_keeps_dtype():
    p = tanh_net_params(dtype=torch.float32)
    q = ms.Mirror.swap(unit(1), unit(2)).project(p)
    assert all(v.dtype == torch.float32 for v in q.values())


def test_input_is_not_mutated():
    p = tanh_net_params()
    before = {k: v.clone() for k, v in p.items()}
    m = ms.Mirror.sign_flip(unit(0))
    m.reflect(p), m.project(p)
    for k in p:
        assert torch.equal(p[k], before[k])


# ---------------------------------------------------------------- bad input
def test_errors_name_the_problem():
    p = tanh_net_params()
    with pytest.raises(ValueError, match="not orthonormal"):
        ms.Mirror.from_basis(torch.ones(6, 1), {"u": [0, 1, 2], "w": [0, 1, 2]})
    with pytest.raises(KeyError, match="fc9.weight"):
        ms.Mirror.sign_flip({"fc9.weight": [0]}).reflect(p)
    with pytest.raises(IndexError, match="out of range"):
        ms.Mirror.sign_flip({"fc1.weight": [99]}).reflect(p)
    with pytest.raises(ValueError, match="overlap"):
        ms.Mirror.sign_flip({"fc1.weight": (0, [1])}) & ms.Mirror.sign_flip({"fc1.weight": (1, [1])})
    with pytest.raises(ValueError, match="differ in shape"):
        ms.Mirror.swap({"fc1.weight": (0, [1])}, {"fc1.weight": (0, [2, 3])})
    with pytest.raises(ValueError, match="overlap"):
        ms.Mirror.swap({"fc1.weight": (0, [1])}, {"fc1.weight": (0, [1])})
    with pytest.raises(ValueError, match="basis"):
        ms.Mirror.from_basis(torch.eye(3)[:, :1], {"u": [0, 1, 2], "w": [0]}).reflect(
            {"u": torch.zeros(3), "w": torch.zeros(3)})


# ---------------------------------------------------------------- properties
@st.composite
def mirror_and_params(draw):
    rows = draw(st.integers(2, 6))
    cols = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    p = {"a": torch.randn(rows, cols, generator=g, dtype=torch.float64),
         "b": torch.randn(cols, rows, generator=g, dtype=torch.float64)}
    kind = draw(st.sampled_from(["sign", "swap", "basis"]))
    i, j = draw(st.lists(st.integers(0, rows - 1), min_size=2, max_size=2, unique=True))
    if kind == "sign":
        m = ms.Mirror.sign_flip({"a": (0, [i]), "b": (1, [j])})
    elif kind == "swap":
        m = ms.Mirror.swap({"a": (0, [i]), "b": (1, [i])}, {"a": (0, [j]), "b": (1, [j])})
    else:
        n = 2 * cols
        k = draw(st.integers(1, n))
        O = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
        m = ms.Mirror.from_basis(O, {"a": (0, [i]), "b": (1, [j])})
    if draw(st.booleans()):
        m = m.through({k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p.items()})
    return m, p


def _sq_norm(p, centre=None):
    return sum(((v - (centre[k] if centre else 0)) ** 2).sum() for k, v in p.items())


@settings(max_examples=60, deadline=None)
@given(mirror_and_params())
def test_properties(mp):
    m, p = mp
    r = m.reflect(p)
    rr = m.reflect(r)
    for k in p:
        torch.testing.assert_close(rr[k], p[k])  # involution
    centre = m.project(p)  # a point on S: R is an isometry fixing it
    torch.testing.assert_close(_sq_norm(r, centre), _sq_norm(p, centre))
    assert m.distance(centre) < 1e-10  # projection lands on the surface
    pp = m.project(centre)
    for k in p:
        torch.testing.assert_close(pp[k], centre[k])  # idempotent
        torch.testing.assert_close(m.reflect(centre)[k], centre[k])  # S is fixed by R
    torch.testing.assert_close(m.distance(r), m.distance(p))
