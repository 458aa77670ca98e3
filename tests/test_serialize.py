"""Save/load that composes: constrained models (parametrizations re-registered on a fresh plain model) and
exported models (architecture rebuilt from a tree of standard modules), both read weights-only; the CLI
diagnoses both formats."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import mirrorsym as ms
from mirrorsym.constrain.serialize import describe_module

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Sigmoid(), nn.Linear(6, 2)).to(F64)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding="same", bias=False), nn.BatchNorm2d(5), nn.Tanh(),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Dropout(0.1), nn.Linear(20, 3),
    ).to(F64)


def _x(*shape, seed=1):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)  # (baking re-inserts a parametrized tensor last: the order may differ)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _perturb(model: nn.Module, seed=3):
    """Move every parameter (factors, gates) away from its registration value, and zero some gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ------------------------------------------------------------------------------------------ constrained
def test_units_gates_round_trip_with_shared_and_stacked_gates(tmp_path):
    x = _x(16, 5)
    net = _mlp()
    ms.constrain.sparse(net[0], "weight")  # a chain: Sparse, then the unit gate
    ms.constrain.apply(net, x, kind="units")
    _perturb(net)
    with torch.no_grad():
        net[0].parametrizations.weight[1].gate[[1, 4]] = 0
    path = ms.constrain.save_constrained(net, tmp_path / "units.pt")
    raw = torch.load(path, weights_only=True)  # tensors and plain data only
    assert raw["mirrorsym_format"] == "constrained" and raw["parametrizations"][0]["chain"][0] == {
        "kind": "sparse", "scale": 1.0}
    with pytest.raises(RuntimeError):  # the reason for the format: a plain model does not take these keys
        _mlp().load_state_dict(raw["state_dict"])
    back = ms.constrain.load_constrained(_mlp, path)
    _same_state(net, back)
    assert torch.equal(back(x), net(x))
    # one Parameter per unit group, shared by every gated tensor of the group (as apply made it)
    g0 = back[0].parametrizations.weight[1].gate
    assert g0 is back[0].parametrizations.bias[0].gate is back[2].parametrizations.weight[0].gate
    assert g0 is not back[2].parametrizations.weight[1].gate
    assert len(ms.constrain.dcs_parameters(back)) == len(ms.constrain.dcs_parameters(net))
    # and it exports like the original: the zeroed gates drop two units
    small = ms.constrain.export(back, x).model
    assert small[0].out_features == 5


def test_sparse_low_rank_linear_and_offset_round_trip(tmp_path):
    x = _x(16, 5)
    net = _mlp()
    ms.constrain.apply(net, kind="low_rank")
    sparse = _cnn()
    ms.constrain.apply(sparse, kind="sparse")
    ms.constrain.group_sparse(sparse[10], "bias", dim=0)
    O = torch.linalg.qr(_x(sparse[1].weight.numel(), 2))[0]
    ms.constrain.linear(sparse[1], "weight", O)
    ms.remove_symmetries(sparse[5], sigma=0.1, seed=0)  # Offset parametrizations (mode="parametrize")
    truncated = _mlp()
    with pytest.warns(UserWarning, match="truncates"):
        ms.constrain.low_rank(truncated[2], rank=2)
    for model, make, inp in ((net, _mlp, x), (sparse, _cnn, _x(3, 1, 8, 8)), (truncated, _mlp, x)):
        _perturb(model)
        model.eval()
        path = ms.constrain.save_constrained(model, tmp_path / "c.pt")
        back = ms.constrain.load_constrained(make(), path).eval()
        _same_state(model, back)
        assert torch.equal(back(inp), model(inp))
        kinds = {type(p).__name__ for m in back.modules() for c in getattr(m, "parametrizations", {}).values()
                 for p in c}
        assert kinds == {type(p).__name__ for m in model.modules()
                         for c in getattr(m, "parametrizations", {}).values() for p in c}


def test_constrained_refusals(tmp_path):
    net = _mlp()
    with pytest.raises(ValueError, match="no parametrization"):
        ms.constrain.save_constrained(net, tmp_path / "x.pt")
    torch.nn.utils.parametrizations.orthogonal(net[2])
    with pytest.raises(TypeError, match=r"2\.weight.*_Orthogonal.*cannot"):
        ms.constrain.save_constrained(net, tmp_path / "x.pt")
    net = _mlp()
    ms.constrain.apply(net, kind="sparse")
    path = ms.constrain.save_constrained(net, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="already carries"):
        ms.constrain.load_constrained(net, path)
    with pytest.raises(ValueError, match="no submodule"):
        ms.constrain.load_constrained(nn.Sequential(nn.Linear(5, 7)), path)
    with pytest.raises(ValueError, match="load_constrained"):
        ms.constrain.load_exported(path)
    with pytest.warns(UserWarning, match="float64 tensors and the model torch.float32|cast"):
        ms.constrain.load_constrained(lambda: _mlp().float(), path)


# -------------------------------------------------------------------------------------------- exported
def _gated_export(model, x, dead):
    ms.constrain.apply(model, x, kind="units")
    _perturb(model)
    with torch.no_grad():
        for (path, name, i), units in dead.items():
            model.get_submodule(path).parametrizations[name][i].gate[units] = 0
    return ms.constrain.export(model.eval(), x)


def test_exported_mlp_round_trip_with_a_low_rank_split(tmp_path):
    x = _x(16, 5)
    res = _gated_export(_mlp(), x, {("0", "bias", 0): [1, 4], ("2", "bias", 0): [0]})
    small = res.model
    assert small[0].out_features == 5 and small[2].out_features == 5
    path = ms.constrain.save_exported(res, tmp_path / "small.pt", example_inputs=x)  # the result, or .model
    raw = torch.load(path, weights_only=True)
    assert raw["mirrorsym_format"] == "exported" and raw["report"]["params_after"] == res.report.params_after
    back = ms.constrain.load_exported(path)
    assert type(back) is nn.Sequential and str(back) == str(small)
    _same_state(small, back)
    assert torch.equal(back(x), small(x)) and back.training == small.training
    # low-rank Linears come back split: Sequential(Linear(in, r, bias=False), Linear(r, out)) inside
    lr = _mlp()
    ms.constrain.apply(lr, kind="low_rank")
    with torch.no_grad():
        lr[2].parametrizations.weight.original0[:, 2:] = 0
    small = ms.constrain.export(lr, x).model
    assert isinstance(small[2], nn.Sequential) and small[2][0].out_features == 2
    back = ms.constrain.load_exported(ms.constrain.save_exported(small, tmp_path / "lr.pt"))
    _same_state(small, back)
    assert torch.equal(back(x), small(x))


def test_exported_cnn_round_trip(tmp_path):
    x = _x(4, 1, 8, 8)
    net = _cnn()
    net.train()
    with torch.no_grad():
        net(_x(32, 1, 8, 8, seed=9))  # running statistics that are not the defaults
    res = _gated_export(net, x, {("0", "bias", 0): [2], ("4", "weight", 1): [0, 3]})
    small = res.model.eval()
    assert small[0].out_channels == 5 and small[4].out_channels == 3 and small[10].in_features == 12
    back = ms.constrain.load_exported(ms.constrain.save_exported(small, tmp_path / "cnn.pt", x))
    _same_state(small, back)
    assert torch.equal(back(x), small(x)) and not back.training
    assert back[4].padding == "same" and back[7].output_size == (2, 2) and back[9].p == 0.1


def test_exported_refusals_name_the_module(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x).relu()

    with pytest.raises(TypeError, match=r"<root>.*Net.*nn.Sequential"):
        ms.constrain.save_exported(Net(), tmp_path / "x.pt")

    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match=r"1 \(.*MyLinear\)"):
        describe_module(nn.Sequential(nn.Linear(3, 3), MyLinear(3, 2)))
    net = _mlp()
    ms.constrain.apply(net, kind="sparse")
    with pytest.raises(TypeError, match="parametrizations"):
        ms.constrain.save_exported(net, tmp_path / "x.pt")
    plain = _mlp()
    plain[0].register_forward_hook(lambda *a: None)
    with pytest.raises(TypeError, match="hooks"):
        ms.constrain.save_exported(plain, tmp_path / "x.pt")
    torch.save(_mlp().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a file written by"):
        ms.constrain.load_exported(tmp_path / "plain.pt")


class _Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_not_loaded(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"mirrorsym_format": "exported", "version": 1, "architecture": _Evil(marker), "state_dict": {}}
    path = tmp_path / "evil.pt"
    torch.save(payload, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match="weights-only"):
        ms.constrain.load_exported(path)
    with pytest.raises(ValueError, match="weights-only"):
        ms.constrain.load_constrained(_mlp, path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- CLI
MODEL_FILE = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
"""


def _dcs_trained(steps=20):
    """The MODEL_FILE architecture with unit gates trained by DCS on digits (decay kills units)."""
    from mirrorsym.experiments.data import digits

    x, y = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    ms.constrain.apply(net, x[:2], kind="units")
    opt = torch.optim.SGD(ms.constrain.param_groups(net, weight_decay=0.05), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:256]), y[:256]).backward()
        opt.step()
    with torch.no_grad():  # make a few units exactly dead, as a longer DCS run does
        net[0].parametrizations.weight[0].gate[:5] = 0
    return net, x


def test_cli_diagnoses_both_formats(tmp_path, monkeypatch):
    from mirrorsym.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(MODEL_FILE)
    net, x = _dcs_trained()
    small = ms.constrain.export(net, x[:8]).model
    assert small[0].out_features == 11
    ms.constrain.save_exported(small, tmp_path / "small.pt", x[:8])
    assert torch.load(tmp_path / "small.pt", weights_only=True)["mirrorsym_format"] == "exported"
    reloaded = ms.constrain.load_exported("small.pt")
    assert torch.equal(reloaded(x[:8]), small(x[:8]))
    ms.constrain.save_constrained(net, tmp_path / "dcs.pt")
    cli = CliRunner()
    result = cli.invoke(app, ["diagnose", "./small.pt", "--data", "digits", "--out", "d1"])
    assert result.exit_code == 0, result.output
    groups = (tmp_path / "d1" / "groups.csv").read_text()
    assert ",0,2,11," in groups.replace('"', "")  # layer "0,2": 11 units
    result = cli.invoke(app, ["diagnose", "net.py:make", "--checkpoint", "dcs.pt", "--data", "digits", "--out", "d2"])
    assert result.exit_code == 0, result.output
    assert "dead units: 5 of 16" in (tmp_path / "d2" / "summary.txt").read_text()
    # a constrained file names what it needs when given as MODEL
    result = cli.invoke(app, ["diagnose", "./dcs.pt", "--data", "digits"])
    assert result.exit_code == 2 and "--checkpoint" in result.output


def test_readme_save_and_load_block_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Save and load\s+.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    model = _mlp()
    x = _x(8, 5)
    ms.constrain.apply(model, x, kind="units")
    env = {"ms": ms, "model": model, "model_factory": _mlp, "example_inputs": x}
    exec(compile(block, "README.md", "exec"), env)  # noqa: S102
    assert torch.equal(env["small"](x), env["model"](x)) or torch.allclose(env["small"](x), env["model"](x))
