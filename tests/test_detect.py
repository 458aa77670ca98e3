"""find_symmetries: exact group counts on models with known symmetries, exact invariance of every group
(float64) and of its core Mirrors, conservative handling of unknown ops, registry, errors, distances."""

import copy
import json
import warnings

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mirrorsym as ms
from mirrorsym.core import Mirror, check_invariance
from mirrorsym.detect import DetectWarning, UntraceableModelError, find_symmetries, register_rule
from mirrorsym.detect.examples import EXAMPLES, HandAttention, LoRALinear, SmallResNet, TinyTransformer, mlp

# ---------------------------------------------------------------------------- helpers


def rel_change(y0, y1) -> float:
    return float((y1 - y0).abs().max() / y0.abs().max())


def find_quiet(model, x, **kw):
    """find_symmetries, failing the test on any DetectWarning (standard models must be fully read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectWarning)
        return find_symmetries(model, x, **kw)


def assert_groups_preserve_outputs(model, x, smap, tol=1e-10):
    base = copy.deepcopy(model).double().eval()
    xd = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        y0 = base(xd)
    state0 = {k: v.clone() for k, v in base.state_dict().items()}
    for i, g in enumerate(smap.groups):
        for attempt in range(10):  # a random permutation of 2 units is the identity half of the time
            moved = copy.deepcopy(base)
            g.apply_(moved, g.random_element(generator=torch.Generator().manual_seed(1000 * attempt + i)))
            changed = [k for k, v in moved.state_dict().items() if not torch.equal(v, state0[k])]
            if changed:
                break
        assert changed, f"{g.label}: the random element did not move any weight"
        with torch.no_grad():
            err = rel_change(y0, moved(xd))
        assert err <= tol, f"{g.label} changed the outputs by {err:.2e}"


def assert_mirrors_invariant(model, x, g, count=4, tol=1e-10):
    base = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in list(base.named_parameters()) + list(base.named_buffers())}

    def fn(p):
        return torch.func.functional_call(base, p, (x.double(),))

    mirrors = g.mirrors(include_buffers=True, count=count, generator=torch.Generator().manual_seed(0))
    for mirror in mirrors:
        assert check_invariance(fn, params, mirror) <= tol, f"{g.label}: {mirror}"
        moved = mirror.reflect(params)
        assert any(not torch.equal(moved[k], params[k]) for k in params), "the mirror moved nothing"
    return mirrors


def kinds(smap) -> dict:
    return smap.counts()


# ---------------------------------------------------------------------------- MLPs


def test_mlp_784_256_256_10_tanh_exact_groups():
    model = mlp(nn.Tanh)
    smap = find_quiet(model, torch.randn(4, 784))
    assert kinds(smap) == {"permutation": 2, "sign_flip": 2}
    assert all(g.size == 256 for g in smap)
    perm = smap.by_kind("permutation")[0]
    assert perm.params == {
        "0.weight": (0, list(range(256))),
        "0.bias": (0, list(range(256))),
        "2.weight": (1, list(range(256))),
    }
    sign = smap.by_kind("sign_flip")[1]
    assert set(sign.params) == {"2.weight", "2.bias", "4.weight"}
    assert sign.params["4.weight"][0] == 1


def test_mlp_784_256_256_10_relu_exact_groups():
    smap = find_quiet(mlp(nn.ReLU), torch.randn(4, 784))
    assert kinds(smap) == {"permutation": 2, "rescale": 2}
    assert all(g.size == 256 for g in smap)
    assert all(g.mirrors() == [] for g in smap.by_kind("rescale"))  # no reflection in (0, inf)^n


@pytest.mark.parametrize(
    "act, second",
    [
        (nn.Tanh, "sign_flip"),
        (nn.Softsign, "sign_flip"),
        (nn.Hardtanh, "sign_flip"),
        (nn.Tanhshrink, "sign_flip"),
        (nn.ReLU, "rescale"),
        (nn.LeakyReLU, "rescale"),
        (nn.PReLU, "rescale"),
        (nn.GELU, None),
        (nn.SiLU, None),
        (nn.Sigmoid, None),
        (nn.ELU, None),
        (nn.Softplus, None),
        (nn.Mish, None),
        (nn.ReLU6, None),
        (nn.SELU, None),
        (nn.Hardswish, None),
        (nn.Identity, "rotation"),
    ],
)
def test_every_standard_activation(act, second):
    model = mlp(act, sizes=(5, 7, 6, 3))
    x = torch.randn(8, 5)
    smap = find_quiet(model, x)
    if second == "rotation":  # linear: the rotation contains the permutations and sign flips
        assert kinds(smap) == {"rotation": 2}
    elif second is None:
        assert kinds(smap) == {"permutation": 2}
    else:
        assert kinds(smap) == {"permutation": 2, second: 2}
    assert {g.size for g in smap} == {7, 6}
    assert_groups_preserve_outputs(model, x, smap)
    for g in smap:
        assert_mirrors_invariant(model, x, g, count=3)


def test_functional_activations_and_sin():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.sin(self.a(x)))))

    model, x = Net(), torch.randn(7, 4)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 2, "sign_flip": 1, "rescale": 1}
    assert smap.by_kind("sign_flip")[0].size == 6
    assert_groups_preserve_outputs(model, x, smap)


# ---------------------------------------------------------------------------- linear paths, residuals, LoRA


class TwoLinear(nn.Module):
    """U (2 · dropout(W x)): only linear ops between the two maps -> rotation."""

    def __init__(self):
        super().__init__()
        self.W, self.U, self.drop = nn.Linear(6, 5), nn.Linear(5, 4), nn.Dropout(0.2)

    def forward(self, x):
        return self.U(2.0 * self.drop(self.W(x)))


class ResidualPath(nn.Module):
    """f = U(W x + x): the residual path breaks the rotation (docs/theory.md#common-symmetries)."""

    def __init__(self, d=5):
        super().__init__()
        self.W, self.U = nn.Linear(d, d, bias=False), nn.Linear(d, 3, bias=False)

    def forward(self, x):
        return self.U(self.W(x) + x)


def test_two_linear_maps_with_linear_ops_between_give_a_rotation():
    model, x = TwoLinear(), torch.randn(9, 6)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"rotation": 1}
    g = smap.groups[0]
    assert g.size == 5 and set(g.params) == {"W.weight", "W.bias", "U.weight"}
    assert_groups_preserve_outputs(model, x, smap)
    assert len(assert_mirrors_invariant(model, x, g, count=3)) == 3


def test_residual_path_reports_no_rotation():
    model, x = ResidualPath(), torch.randn(9, 5)
    smap = find_quiet(model, x)
    assert smap.by_kind("rotation") == []
    # and it is not just luck: a rotation of W's rows and U's columns really changes the function
    rot = nn.init.orthogonal_(torch.empty(5, 5, dtype=torch.float64))
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        y0 = m(x.double())
        m.W.weight.copy_(rot @ m.W.weight)
        m.U.weight.copy_(m.U.weight @ rot.T)
        assert rel_change(y0, m(x.double())) > 1e-3


def test_lora_factor_pair_is_a_rotation_of_the_rank():
    model, x = LoRALinear(), torch.randn(4, 12)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"rotation": 1}
    g = smap.groups[0]
    assert g.size == 3 and g.params == {"A.weight": (0, [0, 1, 2]), "B.weight": (1, [0, 1, 2])}
    assert_groups_preserve_outputs(model, x, smap)
    assert_mirrors_invariant(model, x, g, count=3)


def test_parameter_product_is_a_rotation():
    class Factored(nn.Module):
        def __init__(self):
            super().__init__()
            self.B = nn.Parameter(torch.randn(4, 2))
            self.A = nn.Parameter(torch.randn(2, 6))

        def forward(self, x):
            return x @ (self.B @ self.A).T

    model, x = Factored(), torch.randn(3, 6)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"rotation": 1}
    assert smap.groups[0].params == {"B": (1, [0, 1]), "A": (0, [0, 1])}
    assert_groups_preserve_outputs(model, x, smap)


# ---------------------------------------------------------------------------- CNN with BatchNorm + residuals


def test_cnn_batchnorm_residual_groups():
    model, x = EXAMPLES["cnn"]()
    smap = find_quiet(model, x)
    # stream of stage 1 (stem + block1 skip), block1 inner, block2 inner, stream of stage 2:
    # each a permutation and a ReLU rescale; a bn_scale per BatchNorm (stem, 2 + 2 in blocks, downsample)
    assert kinds(smap) == {"permutation": 4, "rescale": 4, "bn_scale": 6}
    assert sorted(g.size for g in smap.by_kind("permutation")) == [8, 8, 16, 16]
    stream = [g for g in smap.by_kind("permutation") if "block1.conv2.weight" in g.params][0]
    assert stream.params["block1.conv2.weight"][0] == 0  # written by block1.conv2 ...
    assert stream.params["block1.conv1.weight"][0] == 1  # ... read by block1.conv1 (the residual stream)
    assert "stem.1.running_mean" in stream.buffers
    bn = [g for g in smap.by_kind("bn_scale") if "stem.1.weight" in g.params][0]
    assert set(bn.params) == {"stem.0.weight", "stem.1.weight"} and set(bn.buffers) == {
        "stem.1.running_mean",
        "stem.1.running_var",
    }
    model.train()
    for _ in range(2):  # non-trivial running statistics
        model(torch.randn(4, 3, 16, 16))
    assert_groups_preserve_outputs(model, x, smap)
    for g in smap.by_kind("bn_scale") + smap.by_kind("permutation"):
        assert_mirrors_invariant(model, x, g, count=2)


def test_find_symmetries_does_not_touch_the_model():
    model, x = SmallResNet(), torch.randn(2, 3, 16, 16)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_quiet(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- attention


def test_attention_written_with_linear_view_matmul():
    model, x = HandAttention(dim=16, heads=4), torch.randn(2, 5, 16)
    smap = find_quiet(model, x)
    # the stream x is the model's input and output (its order is fixed), but the LayerNorm's affine
    # parameters scale with the q/k/v columns that read them
    assert kinds(smap) == {"permutation": 1, "rotation": 8, "scale": 1}
    assert set(smap.by_kind("scale")[0].params) == {"ln.weight", "ln.bias", "q.weight", "k.weight", "v.weight"}
    heads = smap.by_kind("permutation")[0]
    assert heads.size == 4 and heads.params["o.weight"][0] == 1
    qk = [g for g in smap.by_kind("rotation") if "q.weight" in g.params]
    vo = [g for g in smap.by_kind("rotation") if "v.weight" in g.params]
    assert len(qk) == len(vo) == 4
    for h, g in enumerate(qk):
        assert g.size == 4 and g.params["q.weight"] == (0, list(range(4 * h, 4 * h + 4)))
        assert g.params["k.weight"] == (0, list(range(4 * h, 4 * h + 4))) and "v.weight" not in g.params
    for h, g in enumerate(vo):
        assert g.params["o.weight"] == (1, list(range(4 * h, 4 * h + 4)))
    assert_groups_preserve_outputs(model, x, smap)
    for g in qk[:1] + vo[:1] + [heads]:
        assert_mirrors_invariant(model, x, g, count=2)


def test_multihead_attention_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            a, _ = self.attn(x, x, x)
            return self.head(a)

    model, x = Block(), torch.randn(2, 4, 12)
    smap = find_quiet(model, x)
    # 3 heads of dim 4: head permutation, per head a q·k and a v·o rotation; the output units of
    # out_proj read by `head` are a Linear -> Linear pair: one more rotation (size 12)
    assert kinds(smap) == {"permutation": 1, "rotation": 7}
    assert smap.by_kind("permutation")[0].size == 3
    assert sorted(g.size for g in smap.by_kind("rotation")) == [4] * 6 + [12]
    assert_groups_preserve_outputs(model, x, smap)


def test_transformer_encoder():
    model, x = TinyTransformer(), torch.randn(2, 5, 6)
    smap = find_quiet(model, x)
    per_layer = {"permutation": 2, "rescale": 1, "rotation": 8}  # heads + FF units, FF ReLU, 2 x 4 heads
    expected = {k: 2 * v for k, v in per_layer.items()}
    expected["permutation"] += 1  # the residual stream (d_model = 16), through both LayerNorms
    expected["scale"] = 1  # last LayerNorm's affine output read by the (linear) head
    assert kinds(smap) == expected
    stream = [g for g in smap.by_kind("permutation") if g.size == 16][0]
    assert "encoder.layers.1.norm2.weight" in stream.params and stream.params["head.weight"][0] == 1
    assert_groups_preserve_outputs(model, x, smap)


# ---------------------------------------------------------------------------- unknown ops, registry, errors


class CumsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.cumsum(h, dim=-1)  # order-dependent: permuting h changes the result
        return self.c(torch.tanh(self.b(h)))


def test_unknown_op_warns_once_and_invents_nothing():
    model, x = CumsumNet(), torch.randn(5, 4)
    with pytest.warns(DetectWarning, match=r"cumsum.*\(at <root>\)|cumsum") as record:
        smap = find_symmetries(model, x)
    assert sum("cumsum" in str(w.message) for w in record) == 1
    moved = {name for g in smap for name in g.params}
    assert "a.weight" not in moved and "a.bias" not in moved  # nothing crosses the cumsum
    assert kinds(smap) == {"permutation": 1, "sign_flip": 1}  # the b -> c layer is still found
    assert smap.unknown_ops and any("cumsum" in k for k in smap.unknown_ops)
    assert_groups_preserve_outputs(model, x, smap)


class Even(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("fn", [torch.abs, torch.square, lambda x: x**2, lambda x: x.pow(4), torch.cos],
                         ids=["abs", "square", "pow2", "pow4", "cos"])
def test_even_activation_flips_the_incoming_weights_only(fn, trace):
    """f(−x) = f(x): flipping a unit's incoming row and bias changes nothing, and nothing after the even
    function moves (the next Linear's columns stay): a sign_flip of the first layer alone, beside the
    permutation of the units."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), Even(fn), nn.Linear(6, 2))
    x = torch.randn(5, 3)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 1, "sign_flip": 1}
    assert set(smap.by_kind("sign_flip")[0].params) == {"0.weight", "0.bias"}
    assert_groups_preserve_outputs(model, x, smap)


def test_odd_power_passes_sign_flips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), Even(lambda x: x**3), nn.Linear(6, 2))
    x = torch.randn(5, 3)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 1, "sign_flip": 1}
    assert set(smap.by_kind("sign_flip")[0].params) == {"0.weight", "0.bias", "2.weight"}
    assert_groups_preserve_outputs(model, x, smap)


class Residual(nn.Module):
    """A residual stream of width 6 through a norm: inp writes it, the norm reads it for f, out reads it."""

    def __init__(self, norm):
        super().__init__()
        self.inp, self.norm, self.f, self.out = nn.Linear(3, 6), norm, nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f(self.norm(h))
        return self.out(h)


def test_rms_norm_lets_the_stream_flip_signs_layer_norm_does_not(trace):
    """x / rms(x) is odd in each coordinate: the stream's sign flip moves inp's rows and bias, f's rows and
    bias (it writes the stream), out's columns (it reads it) and the RMSNorm weight, which takes the flip
    back so that f's columns stay. Without a weight any orthogonal Q goes through the norm (rms(Qh) = rms(h)):
    the stream rotates (inp's and f's rows and biases, f's and out's columns), its sign flips and
    permutations included, so no separate sign_flip. LayerNorm subtracts the mean of the coordinates: no
    sign flip."""
    x = torch.randn(5, 3)
    torch.manual_seed(0)
    model = Residual(nn.RMSNorm(6))
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    smap = find_quiet(model, x)
    stream = {"inp.weight", "inp.bias", "f.weight", "f.bias", "out.weight"}
    assert set(smap.by_kind("sign_flip")[0].params) == stream | {"norm.weight"}
    assert smap.by_kind("sign_flip")[0].params["f.weight"][0] == 0  # f's rows only: its columns stay
    assert_groups_preserve_outputs(model, x, smap)
    torch.manual_seed(0)
    bare = Residual(nn.RMSNorm(6, elementwise_affine=False))
    smap = find_quiet(bare, x)
    assert not smap.by_kind("sign_flip")
    (rot,) = smap.by_kind("rotation")
    assert set(rot.params) == stream and {m.dim for m in rot.members if m.name == "f.weight"} == {0, 1}
    assert_groups_preserve_outputs(bare, x, smap)
    torch.manual_seed(0)
    layer_norm = Residual(nn.LayerNorm(6))
    assert not find_quiet(layer_norm, x).by_kind("sign_flip")


class SignedSquare(nn.Module):
    """x|x| + sin(x)/2: odd, but built from a product of two activations, which the built-in rules only
    let permutations through."""

    def forward(self, x):
        return x * x.abs() + 0.5 * torch.sin(x)


def _signed_square_net():
    return nn.Sequential(nn.Linear(3, 6), SignedSquare(), nn.Linear(6, 2))


def test_register_rule_for_a_custom_layer():
    x = torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectWarning)
        before = find_symmetries(_signed_square_net(), x)  # no built-in rule sees that it is odd
    assert "sign_flip" not in kinds(before)

    class OddSignedSquare(SignedSquare):
        pass

    @register_rule(OddSignedSquare)
    def _odd(ctx):
        x_, y = ctx.inputs[0], ctx.output
        for d in range(y.ndim):
            ctx.elementwise(x_, d, y, d, ms.detect.NEG, linear=False)

    model = nn.Sequential(nn.Linear(3, 6), OddSignedSquare(), nn.Linear(6, 2))
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 1, "sign_flip": 1}
    assert_groups_preserve_outputs(model, x, smap)


def test_a_wrong_rule_is_caught_by_verification():
    class NotOdd(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    @register_rule(NotOdd)
    def _wrong(ctx):  # claims exp is odd: verification must drop the sign_flip group
        for d in range(ctx.output.ndim):
            ctx.elementwise(ctx.inputs[0], d, ctx.output, d, ms.detect.NEG, linear=False)

    model, x = nn.Sequential(nn.Linear(3, 6), NotOdd(), nn.Linear(6, 2)), torch.randn(5, 3)
    with pytest.warns(DetectWarning, match="dropped sign_flip"):
        smap = find_symmetries(model, x)
    assert kinds(smap) == {"permutation": 1}


def test_untraceable_model_gives_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.a(x)
            return x

    with pytest.raises(UntraceableModelError, match="register_rule"):
        find_symmetries(Branchy(), torch.randn(2, 3))


# ---------------------------------------------------------------------------- map API and distances


def test_public_api_and_tables():
    model, x = EXAMPLES["mlp-tanh"]()
    smap = ms.find_symmetries(model, x)
    assert isinstance(smap, ms.SymmetryMap) and ms.detect.find_symmetries is ms.find_symmetries
    df = smap.verify(model, x)
    assert isinstance(df, pd.DataFrame) and len(df) == len(smap.groups)
    assert (df["max_rel_change"] <= 1e-10).all()
    table = smap.to_pandas()
    assert list(table["kind"]) == [g.kind for g in smap]
    assert list(table["coordinates"]) == [785 * 256 + 256 * 256] * 2 + [257 * 256 + 10 * 256] * 2
    data = json.loads(smap.to_json())
    assert [g["kind"] for g in data["groups"]] == [g.kind for g in smap]
    assert data["groups"][0]["params"]["0.weight"] == [0, list(range(256))]


def test_coordinates_count():
    smap = find_quiet(mlp(nn.Tanh, sizes=(5, 7, 3)), torch.randn(2, 5))
    perm, sign = smap.by_kind("permutation")[0], smap.by_kind("sign_flip")[0]
    assert perm.num_coordinates == sign.num_coordinates == 7 * 5 + 7 + 3 * 7


def test_distances_match_core_mirrors():
    torch.manual_seed(3)
    model = mlp(nn.Tanh, sizes=(4, 6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    smap = find_quiet(model, x)
    perm, sign = smap.by_kind("permutation")[0], smap.by_kind("sign_flip")[0]
    params = dict(model.named_parameters())
    swaps = [Mirror.swap(_unit(i), _unit(j)) for i in range(6) for j in range(i + 1, 6)]
    assert perm.distance(model) == pytest.approx(
        min(float(m.distance(params).detach()) for m in swaps), rel=1e-12
    )
    flips = [Mirror.sign_flip(_unit(i)) for i in range(6)]
    assert sign.distance(model) == pytest.approx(
        min(float(m.distance(params).detach()) for m in flips), rel=1e-12
    )
    with torch.no_grad():  # plant a duplicate and a dead unit: both distances drop to 0
        for name in ("0.weight", "0.bias"):
            params[name][4] = params[name][1]
        params["2.weight"][:, 4] = params["2.weight"][:, 1]
        params["0.weight"][2] = 0
        params["0.bias"][2] = 0
        params["2.weight"][:, 2] = 0
    assert perm.distance(model) == 0.0 and sign.distance(model) == 0.0


def _unit(i):
    return {"0.weight": (0, [i]), "0.bias": (0, [i]), "2.weight": (1, [i])}


def test_rotation_distance_is_smallest_singular_value():
    model = LoRALinear().double()
    smap = find_quiet(model, torch.randn(2, 12, dtype=torch.float64))
    g = smap.groups[0]
    M = torch.cat([model.A.weight, model.B.weight.T], dim=1).detach()  # unit u: row u of A, column u of B
    assert g.distance(model) == pytest.approx(float(torch.linalg.svdvals(M)[-1]), rel=1e-10)
    with torch.no_grad():  # a rank-deficient pair: some direction v with A^T v = 0 and B v = 0
        v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        v = v / v.norm()
        model.A.weight -= torch.outer(v, v @ model.A.weight)
        model.B.weight -= torch.outer(model.B.weight @ v, v)
    assert g.distance(model) < 1e-12
    params = {k: p.detach() for k, p in model.named_parameters()}
    assert float(g.reflection(v).distance(params)) < 1e-12  # the mirror along v: we sit on its surface
    w = torch.tensor([0.3, 0.1, -1.0], dtype=torch.float64)
    M = torch.cat([model.A.weight, model.B.weight.T], dim=1).detach()
    assert float(g.reflection(w).distance(params)) == pytest.approx(
        float(((w / w.norm()) @ M).norm()), rel=1e-12
    )


def test_examples_all_scan_cleanly():
    for name, make in EXAMPLES.items():
        model, x = make()
        smap = find_quiet(model, x)
        assert len(smap) > 0, name
        if name in ("transformer",):
            continue
        assert_groups_preserve_outputs(model, x, smap)


def test_tiny_transformer_train_mode_untouched():
    model, x = TinyTransformer(), torch.randn(2, 5, 6)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_quiet(model, x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_output_model_warns_that_verification_is_vacuous():
    model = mlp(nn.Tanh, sizes=(3, 4, 2))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    with pytest.warns(DetectWarning, match="identically zero"):
        find_symmetries(model, torch.randn(2, 3))


class ConcatBranches(nn.Module):
    """Two branches concatenated along the units: each branch is its own family, read by one Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.cat([torch.tanh(self.a(x)), torch.relu(self.b(x))], dim=-1))


def test_concat_keeps_each_branch_a_family():
    model, x = ConcatBranches(), torch.randn(6, 4)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 2, "sign_flip": 1, "rescale": 1}
    perm_a = [g for g in smap.by_kind("permutation") if "a.weight" in g.params][0]
    perm_b = [g for g in smap.by_kind("permutation") if "b.weight" in g.params][0]
    assert perm_a.params["c.weight"] == (1, [0, 1, 2]) and perm_b.params["c.weight"] == (1, [3, 4, 5, 6, 7])
    assert_groups_preserve_outputs(model, x, smap)


class ChunkSum(nn.Module):
    """h = W x split in two halves that are added: unit u owns rows u and k + u of W."""

    def __init__(self, k=4):
        super().__init__()
        self.W, self.U = nn.Linear(3, 2 * k), nn.Linear(k, 2)

    def forward(self, x):
        h1, h2 = self.W(x).chunk(2, dim=-1)
        return self.U(torch.tanh(h1) + torch.tanh(h2))


def test_chunk_couples_the_two_halves():
    model, x = ChunkSum(), torch.randn(6, 3)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 1, "sign_flip": 1}
    perm = smap.by_kind("permutation")[0]
    assert perm.size == 4 and perm.params["W.weight"] == (0, list(range(8)))
    assert [m.index.tolist() for m in perm.members if m.name == "W.weight"] == [
        [[0, 4], [1, 5], [2, 6], [3, 7]]
    ]
    assert_groups_preserve_outputs(model, x, smap)


class StreamToItself(nn.Module):
    """h2 = h + W h: W maps the units to themselves (rows and columns in one family)."""

    def __init__(self):
        super().__init__()
        self.V, self.W, self.U = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.V(x))
        return self.U(h + self.W(h))


def test_linear_from_a_stream_to_itself():
    model, x = StreamToItself(), torch.randn(6, 3)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 1, "sign_flip": 1}
    perm = smap.by_kind("permutation")[0]
    assert sorted((m.name, m.dim) for m in perm.members if m.name == "W.weight") == [
        ("W.weight", 0),
        ("W.weight", 1),
    ]
    assert_groups_preserve_outputs(model, x, smap)  # apply_ moves W's rows and columns together
    for g in smap:
        with pytest.raises(ValueError, match="one dim only"):
            g.mirrors()


def test_pre_norm_transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, norm_first=True)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)
    )
    x = torch.randn(5, 2, 6)  # (seq, batch, features): batch_first=False
    smap = find_quiet(model, x)
    # per layer: heads, FF units (permutations), 2 x 4 head rotations, FF ReLU rescale, and the two
    # LayerNorm-affine -> Linear scalings; plus the residual stream
    assert kinds(smap) == {"permutation": 5, "rotation": 16, "rescale": 2, "scale": 4}
    assert_groups_preserve_outputs(model, x, smap)


class LoRAFromLinear(nn.Linear):
    """A Linear subclass with its own forward: must be traced through, not read as a plain Linear."""

    def __init__(self, n_in, n_out, rank=2):
        super().__init__(n_in, n_out)
        self.A = nn.Parameter(torch.randn(rank, n_in))
        self.B = nn.Parameter(torch.randn(n_out, rank))

    def forward(self, x):
        return super().forward(x) + (x @ self.A.T) @ self.B.T


def test_subclass_with_own_forward_is_traced_through():
    model, x = LoRAFromLinear(5, 3), torch.randn(4, 5)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"rotation": 1}
    assert smap.groups[0].params == {"A": (0, [0, 1]), "B": (1, [0, 1])}
    assert_groups_preserve_outputs(model, x, smap)


def test_unknown_module_is_named_with_its_path():
    class WithGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rnn, self.out = nn.Linear(3, 4), nn.GRU(4, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x):
            h, _ = self.rnn(torch.tanh(self.inp(x)))
            return self.out(h)

    with pytest.warns(DetectWarning, match=r"no rule for GRU \(at rnn\)"):
        smap = find_symmetries(WithGRU(), torch.randn(2, 3, 3))
    assert len(smap) == 0  # both hidden families touch the GRU: nothing is claimed


def test_register_rule_docstring_example():
    class FeatureScale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.s = nn.Parameter(torch.linspace(0.5, 2.0, n))

        def forward(self, x):
            return x * self.s

    @ms.detect.register_rule(FeatureScale)
    def _feature_scale(ctx):
        x, y = ctx.inputs[0], ctx.output
        for d in range(x.ndim - 1):
            ctx.same(x, d, y, d)
            ctx.stop(y, d)
        ctx.elementwise(x, -1, y, -1)
        ctx.passive(ctx.param("s"), 0, y, -1)

    model = nn.Sequential(nn.Linear(3, 5), FeatureScale(5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    smap = find_quiet(model, x)
    assert kinds(smap) == {"permutation": 1, "sign_flip": 1}
    assert "1.s" in smap.by_kind("permutation")[0].params and "1.s" not in smap.by_kind("sign_flip")[0].params
    assert_groups_preserve_outputs(model, x, smap)


def test_gpt_style_decoder():
    model, idx = EXAMPLES["gpt"]()
    smap = find_quiet(model, idx)
    # heads (4) with per-head q.k and v.o rotations (dim 4) through the fused qkv split + SDPA; MLP units
    # (GELU: permutation only); the residual stream (both embeddings, all LayerNorms, the head's
    # columns); three LayerNorm-affine -> Linear scalings
    assert kinds(smap) == {"permutation": 3, "rotation": 8, "scale": 3}
    stream = [g for g in smap.by_kind("permutation") if g.size == 16][0]
    assert stream.params["wte.weight"][0] == 1 and stream.params["wpe.weight"][0] == 1
    qk = [g for g in smap.by_kind("rotation") if set(g.params) == {"c_attn.weight", "c_attn.bias"}]
    vo = [g for g in smap.by_kind("rotation") if "c_proj.weight" in g.params]
    assert len(qk) == len(vo) == 4
    assert qk[0].params["c_attn.weight"] == (0, [0, 1, 2, 3, 16, 17, 18, 19])  # head 0: q rows and k rows
    assert vo[0].params["c_attn.weight"] == (0, [32, 33, 34, 35]) and vo[0].params["c_proj.weight"][0] == 1
    assert_groups_preserve_outputs(model, idx, smap)


_ACTS = [nn.Tanh, nn.ReLU, nn.GELU, nn.Identity, nn.LeakyReLU, nn.Sigmoid]


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    acts=st.lists(st.sampled_from(range(len(_ACTS))), min_size=3, max_size=3),
    bias=st.booleans(),
    norm=st.sampled_from(["none", "layer", "batch"]),
    seed=st.integers(0, 2**16),
)
def test_random_mlps_every_group_is_exact(widths, acts, bias, norm, seed):
    """Property: on random MLPs (width, activation, bias, norm layer), every group found preserves the
    outputs exactly, and the hidden layers are found as one permutation family each (none pinned)."""
    torch.manual_seed(seed)
    layers, n_in = [], 3
    for i, w in enumerate(widths):
        layers.append(nn.Linear(n_in, w, bias=bias))
        if norm == "layer":
            layers.append(nn.LayerNorm(w))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(w))
        layers.append(_ACTS[acts[i]]())
        n_in = w
    layers.append(nn.Linear(n_in, 2))
    model = nn.Sequential(*layers)
    if norm == "batch":
        model.train()
        model(torch.randn(16, 3))  # non-trivial running statistics
        model.eval()
    x = torch.randn(5, 3)
    smap = find_quiet(model, x)
    families = [g for g in smap if g.kind in ("permutation", "rotation")]
    assert {g.size for g in families} <= set(widths)
    n_perm = len(smap.by_kind("permutation"))
    n_linear_families = sum(1 for g in smap.by_kind("rotation"))
    assert n_perm + n_linear_families >= len(widths)
    assert_groups_preserve_outputs(model, x, smap)


def test_unsupported_variant_is_cut_with_a_warning_not_invented():
    """nn.Bilinear has a rule that declines (UnsupportedCall): nothing crosses it, and the user is told."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Bilinear(6, 6, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h, h)

    with pytest.warns(Warning, match="Bilinear"):
        smap = ms.find_symmetries(M(), torch.randn(2, 4))
    assert smap.groups == []


def test_depthwise_conv_between_batchnorms_keeps_both_bn_scale_groups():
    """An inverted-residual block (MobileNetV2): the depthwise conv reads channel c in one segment and
    writes it in the next. That is one multiplication, not a tie, so both BatchNorms absorb a scaling."""
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4),
    ).eval()
    smap = ms.find_symmetries(block, torch.randn(2, 3, 6, 6))
    bn = sorted(g.layers[0] for g in smap.by_kind("bn_scale"))
    # the last BatchNorm writes the model's output: its channels cannot be permuted, but the conv before
    # it still scales with it (the BatchNorm's output does not change)
    assert bn == ["0", "3", "6"]
    assert [g.size for g in smap.by_kind("permutation")] == [8]  # the depthwise conv ties both 8-channel layers
