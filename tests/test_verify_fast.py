"""Fast verification: blockwise by default where it is cheaper, the leaf memo inside a block check, the
one-pass output comparison and SymmetryMap.verify on the same path. Every path keeps "every group alone,
a non-identity element, float64, the same tolerance": the verdicts and errors agree with the plain
whole-model check (to round-off), and a planted wrong group is caught in every path."""

import copy
import warnings

import pytest
import torch
import transformers as hf
from torch import nn

import mirrorsym.detect.find as find
from mirrorsym.core.mirror import OutputReference, output_change
from mirrorsym.detect import DetectWarning, find_symmetries
from mirrorsym.detect.find import VERIFY_TOL, verify_groups

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
KW = {"use_cache": False}


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return model, (torch.randn(5, 4),), {}


class Block(nn.Module):
    """A ResNet basic block: in-place ReLU and an in-place residual add, as torchvision writes them."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


def cnn():
    torch.manual_seed(0)
    model = CNN()
    g = torch.Generator().manual_seed(2)
    for m in model.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.3, generator=g)
    return model.eval(), (torch.randn(2, 3, 8, 8),), {}


def llama():
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=100, max_position_embeddings=32, use_cache=False)
    return hf.LlamaForCausalLM(cfg).eval(), (IDS,), KW


def gpt2():
    torch.manual_seed(0)
    cfg = hf.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=32, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    return hf.GPT2LMHeadModel(cfg).eval(), (IDS,), KW


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


def encoder():
    torch.manual_seed(0)
    return Encoder().eval(), (torch.randn(2, 5, 6),), {}


MODELS = [mlp, cnn, llama, gpt2, encoder]


def detected(build):
    model, x, kw = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectWarning)
        smap = find_symmetries(model, x, kw, verify=False)
    assert len(smap) > 0
    return model, x, kw, smap.groups


def wrong_copy(g):
    """``g`` without the members of its last layer (a permutation's reader, a scaling's compensation):
    not a symmetry."""
    bad = copy.deepcopy(g)
    last = bad.layers[-1]
    bad.members = [m for m in bad.members if (m.name.rpartition(".")[0] or "<root>") != last]
    assert bad.members and len(bad.members) < len(g.members)
    bad.label = "planted " + g.label
    return bad


def planted(groups):
    """One wrong group per kind of group found that has members in two layers or more."""
    out, seen = [], set()
    for g in groups:
        if g.kind not in seen and len(g.layers) >= 2 and g.kind in ("permutation", "rescale", "scale",
                                                                    "bn_scale", "rotation"):
            seen.add(g.kind)
            out.append(wrong_copy(g))
    assert out
    return out


PATHS = {
    "whole": lambda m, x, gs, kw: verify_groups(m, x, gs, kwargs=kw, blockwise=False),
    "default": lambda m, x, gs, kw: verify_groups(m, x, gs, kwargs=kw),
    "blockwise": lambda m, x, gs, kw: verify_groups(m, x, gs, kwargs=kw, blockwise=True),
    "blockwise, no memo": lambda m, x, gs, kw: find._verify_blockwise(m, x, gs, 0, kw, leaf_memo=False),
    "small blocks": lambda m, x, gs, kw: find._verify_blockwise(m, x, gs, 0, kw, budget=20_000),
}


@pytest.mark.parametrize("build", MODELS)
def test_every_path_gives_the_verdicts_of_the_whole_model_check(build):
    """All detected groups pass in every path (errors at round-off: 1e-10, or 1e-6 where Hugging Face's
    RMSNorm runs in float32), and a wrong group of each kind found fails in every path with the same
    model-level error as the whole-model check (blockwise escalates a block that changes to a whole pass,
    with the same element)."""
    model, x, kw, groups = detected(build)
    wrong = planted(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for name, path in PATHS.items():
        errors = path(model, x, groups + wrong, kw)
        if errors is None:  # this model cannot run block by block with these blocks: the caller's fallback
            assert name == "small blocks"
            continue
        results[name] = errors
        good, bad = errors[: len(groups)], errors[len(groups):]
        assert max(good) <= VERIFY_TOL, (name, max(good))
        assert min(bad) > 1e-3, (name, bad)
    tight = 1e-6 if build is llama else 1e-10
    for name, errors in results.items():
        assert max(errors[: len(groups)]) <= tight, name
        for e, e_whole in zip(errors[len(groups):], results["whole"][len(groups):], strict=True):
            assert e == pytest.approx(e_whole, rel=1e-6), name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("build", [cnn, llama])
def test_find_symmetries_drops_a_planted_group(build, monkeypatch):
    """A wrong group injected into find_symmetries' verification is dropped with a warning; the others
    are kept."""
    model, x, kw, groups = detected(build)
    wrong = planted(groups)
    real = find.build_groups
    monkeypatch.setattr(find, "build_groups", lambda det: real(det) + copy.deepcopy(wrong))
    with pytest.warns(DetectWarning, match="planted"):
        smap = find_symmetries(model, x, kw)
    assert len(smap) == len(groups)
    assert not any(g.label.startswith("planted") for g in smap)


def test_a_wrong_group_inside_a_block_is_not_hidden_by_the_memo():
    """A permutation of conv1's output channels without bn1's and conv2's: the memo runs conv1, cannot
    cut there (its outputs moved), and the change reaches the block's outputs; the in-place ReLU and
    residual add do not let a stale clean value through."""
    model, x, kw, groups = detected(cnn)
    perm = next(g for g in groups if g.kind == "permutation" and "layer1.0.conv1.weight" in g.params)
    bad = copy.deepcopy(perm)
    bad.members = [m for m in bad.members if m.name == "layer1.0.conv1.weight"]
    for errors in (verify_groups(model, x, [bad], blockwise=True),
                   find._verify_blockwise(model, x, [bad], 0, {}, budget=20_000)):
        assert errors[0] > 1e-3
    assert errors[0] == pytest.approx(verify_groups(model, x, [bad], blockwise=False)[0], rel=1e-6)


def test_the_memo_skips_work(monkeypatch):
    """On the CNN's in-block groups the block checks run fewer convolutions with the leaf memo than
    without it (a bn_scale group runs its conv, a rescale group its reader: 7 instead of 10 per block)."""
    model, x, kw, groups = detected(cnn)
    groups = [g for g in groups if all(layer.startswith("layer1.") for layer in g.layers)]
    assert len(groups) == 8
    calls = []
    conv = nn.Conv2d._conv_forward

    def counted(self, *args):
        calls.append(1)
        return conv(self, *args)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counted)
    with_memo = find._verify_blockwise(model, x, groups, 0, kw)
    n_memo = len(calls)
    calls.clear()
    without = find._verify_blockwise(model, x, groups, 0, kw, leaf_memo=False)
    assert max(with_memo) <= 1e-10 and max(without) <= 1e-10
    convs = 10  # in both: the float64 reference pass of the whole model and its check against the model itself
    assert n_memo - convs <= 0.7 * (len(calls) - convs)


def test_default_chooses_by_cost(monkeypatch):
    """Blockwise for the transformers (most groups live in one block), the whole-model copy for a small
    MLP and for the two-block CNN (most of their groups span the model: the residual stream, the stem)."""
    used = []
    baseline = find.verification_baseline

    def spy(*args, **kwargs):
        used.append(1)
        return baseline(*args, **kwargs)

    monkeypatch.setattr(find, "verification_baseline", spy)
    for build, whole in ((mlp, True), (cnn, True), (llama, False), (gpt2, False)):
        used.clear()
        model, x, kw, groups = detected(build)
        verify_groups(model, x, groups, kwargs=kw)
        assert bool(used) == whole, build.__name__


def test_symmetry_map_verify_takes_the_same_path(monkeypatch):
    """SymmetryMap.verify goes through verify_groups: blockwise on the Llama (no float64 copy of the
    whole model), every group at round-off, and a planted group reported."""
    model, x, kw, groups = detected(llama)
    smap = find_symmetries(model, x, kw)

    def refuse(*args, **kwargs):
        raise AssertionError("a float64 copy of the whole model")

    with monkeypatch.context() as m:
        m.setattr(find, "verification_baseline", refuse)
        df = smap.verify(model, x, example_kwargs=kw)
    assert len(df) == len(smap) and (df["max_rel_change"] <= VERIFY_TOL).all()
    smap.groups.append(planted(groups)[0])
    assert smap.verify(model, x, example_kwargs=kw)["max_rel_change"].iloc[-1] > 1e-3


def test_one_pass_comparison_equals_output_change():
    """The reference used by verification (clean outputs checked once) against an independent numpy
    computation of max|Δy| / max|y0| (integer outputs: 0 if equal, else ∞; non-finite after: ∞)."""
    torch.manual_seed(0)
    y0 = (torch.randn(3, 4, dtype=torch.float64), torch.arange(5), torch.zeros(0))
    ref = OutputReference(y0)
    noise = 1e-9 * torch.randn(3, 4, dtype=torch.float64)
    a0 = y0[0].numpy()
    cases = [
        ((y0[0] + noise, y0[1].clone(), y0[2]), float(abs(noise.numpy()).max() / abs(a0).max())),
        ((y0[0].clone(), y0[1] + 1, y0[2]), float("inf")),
        ((torch.full((3, 4), float("nan"), dtype=torch.float64), y0[1], y0[2]), float("inf")),
        ((y0[0] * float("inf"), y0[1], y0[2]), float("inf")),
    ]
    for y1, expected in cases:
        assert ref.change(y1) == pytest.approx(expected, rel=1e-12)
        assert output_change(y0, y1) == pytest.approx(expected, rel=1e-12)


def test_nonfinite_weights_are_still_refused():
    from mirrorsym.core.finite import NonFiniteError

    model, x, kw, groups = detected(cnn)
    with torch.no_grad():
        model.layer1[0].bn1.running_var[3] = float("nan")
    for blockwise in (None, True, False):
        with pytest.raises(NonFiniteError, match="running_var"):
            verify_groups(model, x, groups, blockwise=blockwise)


class Stacked(nn.Module):
    """Residual MLP blocks in an nn.ModuleList (never called itself, as in every Hugging Face model), each
    read through a gain-free RMS norm; ``tied``: the head reads the embedding's weight without calling it."""

    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(2))
        self.head = None if tied else nn.Linear(8, 20, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return nn.functional.linear(x, self.embed.weight) if self.head is None else self.head(x)


def test_blockwise_runs_blocks_inside_a_module_list_and_catches_what_the_whole_check_catches():
    """The block-by-block pass swaps a ModuleList's blocks in when each is called: the stream rotation (a
    true symmetry) passes and a planted one (the head's columns left out) fails, as in the whole-model
    check. Before, the blocks ran with meta weights, which F.linear turned into uninitialised memory."""
    torch.manual_seed(0)
    model, ids = Stacked(), torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    (stream,) = [g for g in find_symmetries(model, ids, verify=False) if g.kind == "rotation" and g.size == 8]
    planted = copy.deepcopy(stream)
    planted.members = [m for m in stream.members if m.name != "head.weight"]
    whole = verify_groups(model, (ids,), [stream, planted], blockwise=False)
    blocks = find._verify_blockwise(model, (ids,), [stream, planted], 0, {})
    assert blocks is not None and whole[0] <= 1e-12 and blocks[0] <= 1e-12
    assert whole[1] > 1e-3 and blocks[1] > 1e-3


def test_blockwise_falls_back_when_a_module_reads_weights_it_does_not_call():
    """The tied head reads the embedding's weight outside the embedding's call: there the block-by-block
    pass sees a meta tensor, so it declines (None) and the whole-model copy verifies instead."""
    torch.manual_seed(0)
    model, ids = Stacked(tied=True), torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    groups = find_symmetries(model, ids, verify=False)
    assert groups and find._verify_blockwise(model, (ids,), list(groups), 0, {}) is None
    assert max(verify_groups(model, (ids,), list(groups))) <= 1e-12
