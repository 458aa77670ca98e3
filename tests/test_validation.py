"""Bad input is refused by name: non-finite models and data, malformed slice specs and bases, and
identity elements that would let a verification pass by accident."""

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import mirrorsym as ms
from mirrorsym.core.finite import NonFiniteError
from mirrorsym.core.slices import gather, parse_spec
from mirrorsym.detect.find import verify_groups
from mirrorsym.detect.groups import make_group, random_elements


def tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


# ---------------------------------------------------------------- non-finite values
def test_nan_weights_never_verify():
    model = tanh_mlp()
    with torch.no_grad():
        model[0].weight[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"0\.weight \(1 NaN of 24 entries\)"):
        ms.find_symmetries(model, torch.randn(5, 4))
    smap = ms.find_symmetries(tanh_mlp(), torch.randn(5, 4))
    with pytest.raises(NonFiniteError, match="0.weight"):
        smap.verify(model, torch.randn(5, 4))


def test_nan_or_inf_inputs_never_verify():
    x = torch.randn(5, 4)
    x[1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"input 0 \(1 Inf of 20 entries\)"):
        ms.find_symmetries(tanh_mlp(), x)


def test_check_invariance_refuses_nan_and_counts_new_nan_as_infinite():
    model = tanh_mlp().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    unit = {"0.weight": (0, [1]), "0.bias": (0, [1]), "2.weight": (1, [1])}
    x = torch.randn(5, 4, dtype=torch.float64)

    def fn(p):
        return torch.func.functional_call(model, p, (x,))

    assert ms.check_invariance(fn, params, ms.Mirror.sign_flip(unit)) < 1e-12
    bad = dict(params, **{"0.bias": params["0.bias"].clone().index_fill_(0, torch.tensor([1]), float("nan"))})
    with pytest.raises(NonFiniteError, match="0.bias"):
        ms.check_invariance(fn, bad, ms.Mirror.sign_flip(unit))

    def blows_up_when_reflected(p):  # finite at θ, NaN at Rθ: a broken symmetry, not a pass
        y = fn(p)
        return y if p["0.bias"][1] == params["0.bias"][1] else y * float("nan")

    assert ms.check_invariance(blows_up_when_reflected, params, ms.Mirror.sign_flip(unit)) == float("inf")


def test_critical_weight_decay_refuses_non_finite_curvature():
    u, w = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = ms.Mirror.sign_flip({"u": [0], "w": [0]})
    x = torch.randn(8, 2, dtype=torch.float64)

    def loss(p, batch):
        return ((batch @ (p["u"] * p["w"]) - 1.0) ** 2).mean()

    result = ms.theory.critical_weight_decay(loss, {"u": u, "w": w}, m, x)
    assert result.torch_weight_decay == 2 * result.gamma == 2 * float(result) and result.gamma >= 0.0
    with pytest.raises(NonFiniteError, match="u"):
        ms.theory.critical_weight_decay(loss, {"u": torch.tensor([0.0, float("nan")], dtype=torch.float64),
                                               "w": w}, m, x)
    x[0, 0] = float("nan")  # finite parameters, NaN data: the curvature is NaN
    with pytest.raises(NonFiniteError, match="projected Hessian"):
        ms.theory.critical_weight_decay(loss, {"u": u, "w": w}, m, x)


def test_diagnose_refuses_nan_weights_and_nan_probe_data():
    model = tanh_mlp()
    x = torch.randn(16, 4)
    bad_x = x.clone()
    bad_x[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="probe data batch 0 input 0"):
        ms.diagnose(model, x[:2], data=bad_x)
    monitor = ms.SymmetryMonitor(model, x[:2], every=1, data=x)
    monitor.step()
    with torch.no_grad():  # training diverged
        model[2].bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="2.bias"):
        ms.diagnose(model, x[:2], data=x)
    with pytest.raises(NonFiniteError, match="2.bias"):
        monitor.step()


# ---------------------------------------------------------------- non-identity elements
def _group(kind, size):
    return make_group(kind, size, [], [])


@pytest.mark.parametrize("kind", ["permutation", "sign_flip", "rescale", "scale", "bn_scale", "rotation"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_random_elements_are_never_the_identity(kind, size):
    if kind in ("permutation", "rotation") and size == 1:
        return  # no non-identity permutation of one unit; rotation groups have size >= 2
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        for e in (_group(kind, size).random_element(generator=gen), random_elements([_group(kind, size)], gen)[0]):
            if kind == "permutation":
                assert not torch.equal(e, torch.arange(size))
            elif kind == "rotation":
                assert not torch.allclose(e, torch.eye(size, dtype=e.dtype), atol=1e-6)
                torch.testing.assert_close(e @ e.T, torch.eye(size, dtype=e.dtype))
            else:
                assert not torch.equal(e, torch.ones(size, dtype=e.dtype))
                if kind in ("sign_flip", "scale"):
                    assert bool((e < 0).any()), "sign groups must flip at least one unit"


def test_each_group_is_verified_alone():
    """A wrong group (a 'rotation' of tanh units, which tanh breaks) is flagged by itself, while the true
    groups of the same model keep round-off errors."""
    model = tanh_mlp()
    x = torch.randn(5, 4)
    good = list(ms.find_symmetries(model, x))
    wrong = make_group("rotation", 6, [m for g in good if g.kind == "permutation" for m in g.members], ["0", "2"])
    wrong.shapes = {m.name: tuple(model.get_parameter(m.name).shape) for m in wrong.members}
    for m in wrong.members:
        m.role = "source" if m.name.startswith("0.") else "sink"
    errors = verify_groups(model, (x,), [*good, wrong])
    assert max(errors[:-1]) < 1e-12
    assert errors[-1] > 1e-3


# ---------------------------------------------------------------- slice specs
def test_a_tuple_is_dim_then_indices():
    (s,) = parse_spec({"fc1.weight": (1, 3)})
    assert (s.dim, s.indices) == (1, (3,))
    (s,) = parse_spec({"fc1.weight": (1, [3, 5])})
    assert (s.dim, s.indices) == (1, (3, 5))
    (s,) = parse_spec({"fc1.weight": [1, 3]})
    assert (s.dim, s.indices) == (0, (1, 3))
    (s,) = parse_spec({"w": (np.int64(1), np.array([2, 0]))})
    assert (s.dim, s.indices) == (1, (2, 0))
    (s,) = parse_spec({"w": torch.tensor([4, 1])})
    assert (s.dim, s.indices) == (0, (4, 1))


@pytest.mark.parametrize(
    "entry, error, match",
    [
        ((1, 3, 5), ValueError, "tuple must be"),
        ((1.0, [3]), ValueError, "tuple must be"),
        ([1.5, 2], TypeError, "integers"),
        ([True], TypeError, "integers"),
        (torch.tensor([1.0]), TypeError, "integer tensor"),
        (torch.tensor([[1]]), TypeError, "1-D"),
        ([1, -2], ValueError, ">= 0"),
        ((-1, [0]), ValueError, "dim must be >= 0"),
        ([], ValueError, "no indices"),
        ([2, 2], ValueError, "repeats"),
        ("0", TypeError, "indices must be ints"),
    ],
)
def test_malformed_specs_are_refused(entry, error, match):
    with pytest.raises(error, match=match):
        parse_spec({"w": entry})


def test_specs_are_checked_against_shapes_at_construction_with_like():
    like = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
    with pytest.raises(IndexError, match="out of range"):
        ms.Mirror.sign_flip({"w": (1, [4])}, like=like)
    with pytest.raises(ValueError, match="dim 2 does not exist"):
        ms.Mirror.swap({"w": (2, [0])}, {"w": (2, [1])}, like=like)
    with pytest.raises(KeyError, match="'v'"):
        ms.Mirror.sign_flip({"v": [0]}, like=like)


def test_bad_bases_are_refused():
    spec = {"w": (0, [0]), "b": [0]}  # 4 + 1 coordinates
    like = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
    with pytest.raises(NonFiniteError, match="basis O"):
        ms.Mirror.from_basis(torch.full((5, 1), float("nan")), spec)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        ms.Mirror.from_basis(torch.zeros(5, 0), spec)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        ms.Mirror.from_basis(torch.zeros(2, 3), {"b": [0]})
    with pytest.raises(ValueError, match="6 rows but the spec names 5"):
        ms.Mirror.from_basis(torch.eye(6)[:, :1], spec, like=like)
    m = ms.Mirror.from_basis(torch.eye(6)[:, :1], spec)  # without like: a clear error at first use
    with pytest.raises(ValueError, match=r"6 rows but the slices of \['w', 'b'\] hold 5"):
        m.reflect(like)


@st.composite
def spec_and_params(draw):
    """Random tensors and a random valid spec over a random subset of them (dims and indices drawn)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    params, spec = {}, {}
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
        params[f"t{i}"] = torch.randn(shape, generator=g, dtype=torch.float64)
        if i == 0 or draw(st.booleans()):
            dim = draw(st.integers(0, len(shape) - 1))
            idx = draw(st.lists(st.integers(0, shape[dim] - 1), min_size=1, unique=True))
            spec[f"t{i}"] = (dim, idx)
    return spec, params


def _dense_coordinates(spec, params) -> np.ndarray:
    """Reference: numpy fancy indexing, moved to the front, flattened row-major, in spec order."""
    parts = []
    for name, (dim, idx) in spec.items():
        a = params[name].numpy()
        parts.append(np.take(a, idx, axis=dim).reshape(-1))
    return np.concatenate(parts)


@settings(max_examples=80, deadline=None)
@given(spec_and_params(), st.integers(0, 10_000))
def test_random_specs_match_a_dense_reference(sp, seed):
    spec, params = sp
    ref = _dense_coordinates(spec, params)
    np.testing.assert_array_equal(gather(params, parse_spec(spec)).numpy(), ref)
    n = ref.size
    k = 1 + seed % n
    O = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q
    m = ms.Mirror.from_basis(O, spec, like=params)
    reflected = _dense_coordinates(spec, m.reflect(params))
    R = np.eye(n) - 2 * O.numpy() @ O.numpy().T
    np.testing.assert_allclose(reflected, R @ ref, atol=1e-12)
    for name in params:  # coordinates outside the spec never move
        if name not in spec:
            assert torch.equal(m.reflect(params)[name], params[name])


# ---------------------------------------------------------------- constrain, meta device, small samples
def relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_units_gates_are_not_stacked_twice():
    model, x = relu_mlp(), torch.randn(5, 4)
    ms.constrain.apply(model, x, kind="units")
    with pytest.raises(ValueError, match="already carry unit gates"):
        ms.constrain.apply(model, x, kind="units")
    other = relu_mlp()
    ms.constrain.apply(other, x, kind="sparse")
    with pytest.raises(ValueError, match="already has a parametrization"):
        ms.constrain.apply(other, x, kind="sparse")


def test_nothing_to_constrain_is_an_error_not_an_empty_list():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    for kind, match in (("sparse", "no Linear, Conv1d"), ("low_rank", "no Linear module")):
        with pytest.raises(ValueError, match=match):
            ms.constrain.apply(Scale(), torch.randn(2, 3), kind=kind)


def test_meta_device_models_are_refused_by_name():
    with torch.device("meta"):
        model = relu_mlp()
    x = torch.randn(5, 4)
    for call in (lambda: ms.find_symmetries(model, x), lambda: ms.diagnose(model, x),
                 lambda: ms.constrain.apply(model, x, kind="sparse")):
        with pytest.raises(ValueError, match=r"0\.weight, 0\.bias, 2\.weight and 1 more .* meta device"):
            call()


def test_too_few_probe_rows_are_said_not_counted_as_collapse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x, y = torch.randn(10, 64), torch.arange(10)
    with pytest.warns(UserWarning, match="64 dimensions but only 10 probe rows"):
        rep = ms.diagnose(model, x[:2], data=(x, y))
    line = next(ln for ln in rep.summary().splitlines() if ln.startswith("embedding covariance"))
    assert "0 of 9 measurable eigenvalues" in line and "the other 55 of 64 are 0 only because 10 rows" in line
