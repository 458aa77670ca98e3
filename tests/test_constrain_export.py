"""export: bake DCS, drop exactly-zero units with every coupled slice, split low-rank Linears; the
function is preserved (checked against the constrained model) and the parameter count shrinks."""

import pytest
import torch
from torch import nn

import mirrorsym as ms
from mirrorsym.constrain import count_params
from mirrorsym.constrain.units import merged_members
from mirrorsym.detect import Permutation

F64 = torch.float64


def _rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _gates(model, path, name="weight"):
    """The UnitGate gates on ``model.<path>.<name>`` in chain order."""
    return [p.gate for p in model.get_submodule(path).parametrizations[name]]


# --------------------------------------------------------------------- MLP: units die in training
def test_trained_mlp_units_die_exactly_and_export_drops_them():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 5, generator=g, dtype=F64)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    with torch.no_grad():
        teacher[0].weight.mul_(4)
    y = 3 * teacher(X).detach()
    student = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)
    groups = ms.constrain.apply(student, X, kind="units")
    assert [g.size for g in groups] == [16]
    opt = torch.optim.SGD(
        student.parameters(), lr=0.1, momentum=0.9, weight_decay=ms.constrain.weight_decay_for(group=0.01)
    )
    for _ in range(1500):
        opt.zero_grad()
        (student(X) - y).square().mean().backward()
        opt.step()
    small, report = ms.constrain.export(student, X, tol=1e-8)
    width = small[0].out_features
    assert 1 <= width <= 4 and small[2].in_features == width  # 16 → about the teacher's 3 units, exactly dead
    assert (small(X) - y).square().mean() < 0.05 * y.var()  # the survivors still fit the teacher
    assert report.params_before == count_params(nn.Sequential(nn.Linear(5, 16), nn.Linear(16, 1)))
    assert report.params_after == count_params(small) < report.params_before
    assert _rel_err(student(X), small(X)) <= 1e-5
    assert not any(hasattr(m, "parametrizations") for m in small.modules())  # plain module
    assert hasattr(student[0], "parametrizations")  # the input model is untouched


def test_three_layer_mlp_overlapping_groups():
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=F64)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Sigmoid(), nn.Linear(6, 2)).to(F64)
    before = mlp(x).detach()
    ms.constrain.apply(mlp, x, kind="units")
    assert torch.equal(mlp(x), before)
    with torch.no_grad():
        _gates(mlp, "0")[0][[1, 4]] = 0  # group of layer 0's units
        _gates(mlp, "2")[1][[0, 3]] = 0  # group of layer 2's units (the middle weight has both gates)
    small, report = ms.constrain.export(mlp, x)
    assert (small[0].out_features, small[2].in_features, small[2].out_features, small[4].in_features) == (
        5,
        5,
        4,
        4,
    )
    assert _rel_err(mlp(x), small(x)) <= 1e-5
    assert report.params_after == count_params(small)


# --------------------------------------------------------------------- CNN with BatchNorm and Flatten
def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    ).to(F64)


@pytest.mark.parametrize("train_mode", [False, True])
def test_cnn_with_batchnorm_drops_channels_and_running_stats(train_mode):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8, dtype=F64)
    cnn = _cnn()
    for _ in range(3):
        cnn(torch.randn(8, 1, 8, 8, dtype=F64))  # non-trivial running stats
    cnn.train(train_mode)
    groups = ms.constrain.apply(cnn, x, kind="units")
    assert [g.size for g in groups] == [6, 8]
    assert groups[1].params["8.weight"] == (1, list(range(128)))  # a channel owns 16 Linear columns
    with torch.no_grad():
        _gates(cnn, "0")[0][[1, 4]] = 0
        _gates(cnn, "4")[1][[0, 2, 7]] = 0  # [0] is the gate of layer 0 (its input channels)
    small, report = ms.constrain.export(cnn, x)
    assert (small[0].out_channels, small[1].num_features, small[4].in_channels) == (4, 4, 4)
    assert (small[4].out_channels, small[5].running_mean.numel(), small[8].in_features) == (5, 5, 80)
    assert small.training == train_mode
    assert _rel_err(cnn(x), small(x)) <= 1e-5
    assert count_params(small) < report.params_before


# --------------------------------------------------------------------- residual CNN (coupled stream)
class ResBlock(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, h, 3, padding=1, bias=False), nn.BatchNorm2d(h)
        self.conv2, self.bn2 = nn.Conv2d(h, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, c=6, h=5):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList([ResBlock(c, h), ResBlock(c, h)])
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.fc(x.mean((2, 3)))


def _resnet_groups(c=6, h=5):
    """Hand-written coupled groups (what find_symmetries reports): the residual stream + inner channels."""
    cs, hs = list(range(c)), list(range(h))
    stream = {"stem.weight": (0, cs), "bn.weight": (0, cs), "bn.bias": (0, cs), "fc.weight": (1, cs)}
    inner = []
    for i in range(2):
        p = f"blocks.{i}."
        stream.update(
            {
                p + "conv1.weight": (1, cs),
                p + "conv2.weight": (0, cs),
                p + "bn2.weight": (0, cs),
                p + "bn2.bias": (0, cs),
            }
        )
        inner.append(
            Permutation.from_spec(
                {
                    p + "conv1.weight": (0, hs),
                    p + "bn1.weight": (0, hs),
                    p + "bn1.bias": (0, hs),
                    p + "conv2.weight": (1, hs),
                },
                h,
            )
        )
    return [Permutation.from_spec(stream, c), *inner]


def test_residual_cnn_drops_stream_and_inner_channels():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6, dtype=F64)
    net = ResNet().to(F64).eval()
    before = net(x).detach()
    ms.constrain.apply(net, x, kind="units", groups=_resnet_groups())
    assert torch.equal(net(x), before)
    with torch.no_grad():
        net.stem.parametrizations.weight[0].gate[[2, 5]] = 0  # one shared gate for the whole stream
        net.blocks[0].conv1.parametrizations.weight[1].gate[[0]] = 0  # conv1.weight: stream cols, then rows
    small, report = ms.constrain.export(net, x, groups=_resnet_groups())
    assert small.stem.out_channels == 4 and small.fc.in_features == 4
    assert small.blocks[1].conv2.out_channels == 4 and small.blocks[1].bn2.running_var.numel() == 4
    assert small.blocks[0].conv1.weight.shape == (4, 4, 3, 3) and small.blocks[0].bn1.num_features == 4
    assert _rel_err(net(x), small(x)) <= 1e-5
    assert count_params(small) < report.params_before


# --------------------------------------------------------------------- transformer block
class Block(nn.Module):
    def __init__(self, e=16, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(e, 4 * e), nn.GELU(), nn.Linear(4 * e, e))

    def forward(self, x):
        b, t, e = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (e // self.heads) ** 0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, e))
        return x + self.mlp(self.ln2(x))


def _zero_factor_columns(linear, keep):
    with torch.no_grad():
        linear.parametrizations.weight.original0[:, keep:] = 0
        linear.parametrizations.weight.original1[:, keep:] = 0


def test_transformer_block_low_rank_split_and_mlp_units():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=F64)
    block = Block().to(F64)
    before = block(x).detach()
    for lin in (block.q, block.k, block.v, block.o):
        ms.constrain.low_rank(lin, "weight")
    # the constrained block is detected as its plain twin: the head and the MLP-unit permutations
    detected = ms.constrain.unit_groups(block, x)
    assert sorted(g.size for g in detected) == [2, 64]
    mlp = [g for g in detected if "mlp.0.weight" in g.params]
    groups = ms.constrain.apply(block, x, kind="units", groups=mlp)
    assert [sorted(g.params) for g in groups] == [["mlp.0.bias", "mlp.0.weight", "mlp.2.weight"]]
    assert _rel_err(before, block(x)) <= 1e-12
    for lin, r in ((block.q, 2), (block.k, 2), (block.v, 3)):
        _zero_factor_columns(lin, r)
    with torch.no_grad():
        block.mlp[0].parametrizations.weight[0].gate[10:] = 0
    small, report = ms.constrain.export(block, x, groups=mlp)
    assert report.split == {"q": 2, "k": 2, "v": 3}  # o stays full rank: a split would not save
    assert isinstance(small.q, nn.Sequential) and small.q[0].weight.shape == (2, 16)
    assert isinstance(small.o, nn.Linear)
    assert small.mlp[0].out_features == 10 and small.mlp[2].in_features == 10
    assert report.params_after == count_params(small) < report.params_before
    assert _rel_err(block(x), small(x)) <= 1e-5


def test_multihead_attention_low_rank_is_refused_not_broken():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    ms.constrain.low_rank(mha.out_proj, "weight")
    ms.constrain.low_rank(mha, "in_proj_weight")

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x)[0]

    model = Wrap()
    with pytest.warns(UserWarning, match="MultiheadAttention"):  # its head/unit group is kept whole too
        small, report = ms.constrain.export(model, x)
    refused = "\n".join(report.refused)
    assert "mha.out_proj.weight" in refused and "mha.in_proj_weight" in refused
    assert report.split == {}
    assert _rel_err(model(x), small(x)) <= 1e-5


def test_layernorm_group_is_refused_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    group = Permutation.from_spec(
        {"0.weight": (0, range(6)), "1.weight": (0, range(6)), "1.bias": (0, range(6)), "2.weight": (1, range(6))},
        6,
    )
    with pytest.warns(UserWarning, match="LayerNorm"):
        small, report = ms.constrain.export(model, x, groups=[group])
    assert small[0].out_features == 6 and "LayerNorm" in report.refused[0]


def test_export_refuses_to_change_the_function():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="changed the function"):
        ms.constrain.export(mlp, x, tol=10.0)  # every entry counts as "zero": live units would go


def test_apply_kinds_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    y0 = model(x).detach()
    assert ms.constrain.apply(model, x, kind="sparse") == ["0", "2"]
    assert torch.allclose(model(x), y0, atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        ms.constrain.apply(model, x, kind="everything")
    with pytest.raises(ValueError, match="no permutation group"):
        ms.constrain.apply(nn.Linear(3, 2), torch.randn(2, 3), kind="units")


def test_transformer_block_with_detected_groups_refuses_heads():
    """find_symmetries also reports the attention-head permutation; gating heads is fine, but export
    refuses to drop a head (the forward code hard-codes their count) and says so."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=F64)
    block = Block().to(F64)
    groups = ms.constrain.apply(block, x, kind="units")
    assert sorted(g.size for g in groups) == [2, 64]  # heads, MLP units
    with torch.no_grad():
        block.mlp[0].parametrizations.weight[0].gate[:50] = 0
        block.q.parametrizations.weight[0].gate[1] = 0  # one head's gate
    with pytest.warns(UserWarning, match="heads"):
        small, report = ms.constrain.export(block, x)
    assert small.mlp[0].out_features == 14 and small.q.out_features == 16
    assert _rel_err(block(x), small(x)) <= 1e-5


def test_detected_groups_match_hand_written_resnet_groups():
    net = ResNet()
    x = torch.randn(2, 1, 6, 6)
    detected = ms.constrain.unit_groups(net, x)
    hand = _resnet_groups()

    def key(g):
        return {(n, d, tuple(i.reshape(-1).tolist())) for n, d, i, buf in merged_members(g) if not buf}

    assert sorted(map(sorted, map(key, detected))) == sorted(map(sorted, map(key, hand)))
    ms.constrain.apply(net, x, kind="units")  # auto: uses find_symmetries
    with torch.no_grad():
        net.stem.parametrizations.weight[0].gate[[0, 3]] = 0
    small, report = ms.constrain.export(net.eval(), x)
    assert small.stem.out_channels == 4 and small.fc.in_features == 4
    assert _rel_err(net(x), small(x)) <= 1e-5


@pytest.mark.parametrize(
    "unit_of_entry",
    [
        [0, 1, 2],
        [0, 0, 1, 1, 2, 2],
        [2, 3, 0, 1, 3, 3],
    ],  # fast path, chunked fast path, general (3 = no unit)
)
def test_unit_gate_factor_matches_a_dense_reference(unit_of_entry):
    from mirrorsym.constrain import UnitGate

    gate = nn.Parameter(torch.tensor([2.0, -3.0, 5.0], dtype=F64))
    idx = torch.tensor(unit_of_entry)
    p = UnitGate(gate, dim=1, ndim=2, unit_of_entry=idx)
    w = torch.randn(4, len(unit_of_entry), dtype=F64)
    expected = w * torch.cat([gate.detach(), torch.ones(1, dtype=F64)])[idx][None, :]
    assert torch.equal(p(w), expected)
    assert torch.allclose(p.right_inverse(p(w)), w)


def test_apply_units_warns_about_an_existing_optimizer():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="optimizer"):
        ms.constrain.apply(model, torch.randn(3, 4), kind="units", optimizer=opt)


def test_export_splits_a_low_rank_linear_that_is_the_whole_model():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10).to(F64)
    ms.constrain.low_rank(lin, "weight")
    _zero_factor_columns(lin, 2)
    x = torch.randn(4, 12, dtype=F64)
    small, report = ms.constrain.export(lin, x)
    assert isinstance(small, nn.Sequential) and small[0].weight.shape == (2, 12)
    assert report.split == {"": 2} and count_params(small) == report.params_after == 2 * 12 + 10 * 2 + 10
    assert _rel_err(lin(x), small(x)) <= 1e-12
