"""diagnose / SymmetryMonitor against planted ground truth (dead, duplicated units, low-rank heads).

The symmetry groups here are small stand-ins with the SymmetryMap interface (.kind, .params, .distance);
tests that use the real detector are in test_diagnose_detect.py.
"""

import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import mirrorsym as ms
from mirrorsym.detect import Permutation, Rotation, SignFlip
from mirrorsym.diagnose import metrics as M

H, K_DEAD, DUPS = 12, (3, 7), (9, 10, 11)  # units 9, 10, 11 duplicate unit 0


def planted_mlp(eps=1e-9, act=nn.Tanh):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, H), act(), nn.Linear(H, 3)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for j in DUPS:
            net[0].weight[j] = net[0].weight[0] + eps * torch.randn(5, generator=g, dtype=torch.float64)
            net[0].bias[j] = net[0].bias[0] + eps * torch.randn((), generator=g, dtype=torch.float64)
            net[2].weight[:, j] = net[2].weight[:, 0] + eps * torch.randn(3, generator=g, dtype=torch.float64)
        for j in K_DEAD:
            net[0].weight[j] = 0
            net[0].bias[j] = 0
            net[2].weight[:, j] = 0
    return net


def mlp_spec(n=H):
    return {"0.weight": (0, list(range(n))), "0.bias": (0, list(range(n))), "2.weight": (1, list(range(n)))}


def mlp_map():
    return [
        Permutation.from_spec(mlp_spec(), H, label="perm:hidden"),
        SignFlip.from_spec(mlp_spec(), H, roles={"2.weight": "sink"}, label="sign:hidden"),
    ]


class Attention(nn.Module):
    def __init__(self, dim=8, heads=2, bias=True):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=bias), nn.Linear(dim, dim, bias=bias)
        self.v_proj, self.out_proj = nn.Linear(dim, dim, bias=bias), nn.Linear(dim, dim, bias=bias)

    def forward(self, x):
        B, T, D = x.shape
        split = lambda t: t.reshape(B, T, self.heads, self.dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(B, T, D))


def planted_attention(r=2, head=1):
    torch.manual_seed(0)
    att = Attention().double()
    g = torch.Generator().manual_seed(2)
    rows = slice(head * att.dh, (head + 1) * att.dh)
    with torch.no_grad():
        att.q_proj.weight[rows] = torch.randn(att.dh, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, 8, generator=g, dtype=torch.float64
        )
    return att


def attention_map(att):
    groups = []
    for h in range(att.heads):
        rows = list(range(h * att.dh, (h + 1) * att.dh))
        groups.append(
            Rotation.from_spec(
                {
                    "q_proj.weight": (0, rows),
                    "q_proj.bias": (0, rows),
                    "k_proj.weight": (0, rows),
                    "k_proj.bias": (0, rows),
                },
                att.dh,
                label=f"qk:{h}",
            )
        )
        groups.append(
            Rotation.from_spec(
                {"v_proj.weight": (0, rows), "v_proj.bias": (0, rows), "out_proj.weight": (1, rows)},
                att.dh,
                label=f"ov:{h}",
            )
        )
    return groups


# --------------------------------------------------------------------------------------- weights only
def test_planted_dead_and_duplicated_units_are_found_exactly():
    net = planted_mlp()
    df = ms.diagnose(net, torch.randn(2, 5, dtype=torch.float64), symmetries=mlp_map()).to_pandas()
    assert list(df.columns[:12]) == [
        "group",
        "kind",
        "layer",
        "units",
        "dead",
        "distinct",
        "distance",
        "eff_rank",
        "approx_rank",
        "srank",
        "stable_rank",
        "num_rank",
    ]
    for _, row in df.iterrows():
        assert row["units"] == H and row["dead"] == len(K_DEAD)
        # 12 units - 2 dead (never distinct) - 3 copies of unit 0 = 7 distinct
        assert row["distinct"] == H - len(K_DEAD) - len(DUPS)
        assert all(math.isnan(row[c]) for c in ("eff_rank", "approx_rank", "srank", "stable_rank", "num_rank"))
    perm, sign = df.iloc[0], df.iloc[1]
    U = torch.cat([net[0].weight, net[0].bias[:, None], net[2].weight.T], 1)
    # nearest swap surface: the closest pair of units (here two dead ones, distance 0)
    assert perm["distance"] == 0.0 and sign["distance"] == 0.0
    alive = [i for i in range(H) if i not in K_DEAD]
    assert M.distinct_units(U[alive]) == H - len(K_DEAD) - len(DUPS)


def test_duplicate_tolerance_is_separate_from_the_dead_floor():
    net = planted_mlp(eps=0.02)  # copies ~10 % apart: duplicates only under a looser duplicate_tol
    x = torch.randn(2, 5, dtype=torch.float64)
    tight = ms.diagnose(net, x, symmetries=mlp_map(), duplicate_tol=1e-3).to_pandas()
    loose = ms.diagnose(net, x, symmetries=mlp_map(), duplicate_tol=0.5).to_pandas()
    assert (tight["distinct"] == H - len(K_DEAD)).all() and (tight["dead"] == len(K_DEAD)).all()
    assert (loose["distinct"] < H - len(K_DEAD)).all() and (loose["dead"] == len(K_DEAD)).all()


def test_swap_distance_matches_the_mirror():
    net = planted_mlp()
    with torch.no_grad():  # no dead units: the closest pair is a planted duplicate
        for j in K_DEAD:
            net[0].weight[j] = torch.arange(5.0, dtype=torch.float64) + j
    params = dict(net.named_parameters())
    spec = mlp_spec()
    df = ms.diagnose(net, None, symmetries=[Permutation.from_spec(spec, H)]).to_pandas()
    pairs = [(i, j) for i in range(H) for j in range(i + 1, H)]
    unit = lambda i: {"0.weight": (0, [i]), "0.bias": (0, [i]), "2.weight": (1, [i])}  # noqa: E731
    ref = min(ms.Mirror.swap(unit(i), unit(j)).distance(params).item() for i, j in pairs)
    assert 0 < df["distance"][0] == pytest.approx(ref, rel=1e-6)


def test_distance_column_is_each_groups_own_distance():
    net = planted_mlp()
    with torch.no_grad():
        for j in K_DEAD:
            net[0].weight[j] = 0.1 * (j + 1)
    groups = mlp_map()
    df = ms.diagnose(net, None, symmetries=groups).to_pandas()
    assert list(df["distance"]) == [g.distance(net) for g in groups]


def test_attention_head_rank_is_found_exactly():
    r = 2
    att = planted_attention(r=r, head=1)
    df = ms.diagnose(att, torch.randn(1, 3, 8, dtype=torch.float64), symmetries=attention_map(att)).to_pandas()
    df = df.set_index("group")
    assert df.loc["qk:1", "num_rank"] == r and df.loc["qk:0", "num_rank"] == att.dh
    assert df.loc["ov:0", "num_rank"] == att.dh and df.loc["ov:1", "num_rank"] == att.dh
    # the other rank columns against numpy on the same product W_Q,hᵀ W_K,h
    rows = slice(att.dh, 2 * att.dh)
    P = (att.q_proj.weight[rows].T @ att.k_proj.weight[rows]).detach().numpy()
    s = np.linalg.svd(P, compute_uv=False)
    p = s / s.sum()
    p = p[p > 1e-300]
    assert df.loc["qk:1", "eff_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert df.loc["qk:1", "stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert np.isnan(df.loc["qk:1", "dead"]) and np.isnan(df.loc["qk:1", "distinct"])
    # distance to the nearest rotation surface: σ_min of the head's unit matrix
    U = attention_map(att)[2].unit_matrix(att)
    assert df.loc["qk:1", "distance"] == pytest.approx(torch.linalg.svdvals(U)[-1].item(), rel=1e-9)


def test_packed_projection_pieces_become_two_factors():
    mha = nn.MultiheadAttention(8, 2, bias=False).double()
    q_rows, k_rows = list(range(0, 4)), list(range(8, 12))
    spec = {"in_proj_weight": (0, q_rows + k_rows)}
    group = Rotation.from_spec(spec, 4)  # piece-major: unit u = query row u and key row 8 + u
    fs = group.factors(mha)
    assert list(fs) == ["in_proj_weight", "in_proj_weight[1]"]
    torch.testing.assert_close(fs["in_proj_weight[1]"], mha.in_proj_weight[8:12].detach())
    df = ms.diagnose(mha, None, symmetries=[group]).to_pandas()
    assert df["units"][0] == 4 and df["num_rank"][0] == 4
    P = mha.in_proj_weight[0:4].T @ mha.in_proj_weight[8:12]
    assert df["stable_rank"][0] == pytest.approx(M.stable_rank(P.detach()).item(), rel=1e-9)


def test_summary_and_plots(tmp_path):
    net = planted_mlp()
    att = planted_attention()
    rep = ms.diagnose(net, None, symmetries=mlp_map())
    text = rep.summary()
    assert "dead units: 2 of 12" in text and "distinct units: 7 of 12" in text
    assert len(text.splitlines()) <= 8
    paths = rep.plot(tmp_path / "out")
    names = {p.name for p in paths}
    assert {"correlation_heatmap.png", "dead_distinct.png", "singular_spectra.png"} <= names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the correlation heat map shows the duplicate block: four units correlate exactly 1
    corr = rep.correlations["perm:hidden"]
    assert (np.isclose(corr, 1.0, atol=1e-9).sum(1) >= 4).sum() >= 4
    rep2 = ms.diagnose(att, None, symmetries=attention_map(att))
    assert "lowest rank qk:1: num_rank 2 of 4" in rep2.summary()
    assert "singular_spectra.png" in {p.name for p in rep2.plot(tmp_path / "att")}


def test_report_refuses_a_map_of_another_model():
    with pytest.raises(KeyError, match="fc9.weight"):
        ms.diagnose(planted_mlp(), None, symmetries=[Permutation.from_spec({"fc9.weight": (0, [0, 1])}, 2)])
    with pytest.raises(TypeError, match="not a SymmetryGroup"):
        ms.diagnose(planted_mlp(), None, symmetries=[object()])


# ------------------------------------------------------------------------------------------- probe data
def relu_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        net[0].weight[0] = 0
        net[0].bias[0] = -1.0  # never active: dead on data (its parameters are not zero)
        net[0].weight[1] = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
        net[0].bias[1] = -5.0  # active only where x_0 > 5
    return net


def probe_inputs(n=400):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64).clamp(-3, 3)
    x[0, 0] = 10.0  # the one input that wakes unit 1: 1/400 = 0.25 % < 1 %
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def test_probe_dead_dormant_rank_and_nc_match_direct_computation():
    net = relu_net()
    x, y = probe_inputs()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    rep = ms.diagnose(net, x[:2], data=loader, symmetries=[], classifier="2")
    a = rep.activations.set_index("layer")
    assert list(a.index) == ["1"]  # the ReLU module
    assert a.loc["1", "rows"] == 400 and a.loc["1", "units"] == 6
    assert a.loc["1", "dead"] == 1 and a.loc["1", "dormant"] == 2
    h = torch.relu(net[0](x)).detach()
    assert a.loc["1", "eff_rank"] == pytest.approx(M.effective_rank(h).item(), rel=1e-7)
    assert a.loc["1", "redo_dormant"] == int(M.tau_dormant(h, 0.025).sum())
    ref = M.neural_collapse(h, y, net[2].weight.detach(), net[2].bias.detach())
    for k, v in ref.items():
        assert rep.neural_collapse[k] == pytest.approx(v.item(), rel=1e-9), k
    hc = (h - h.mean(0)).numpy()
    np.testing.assert_allclose(rep.embedding_spectrum, np.sort(np.linalg.eigvalsh(hc.T @ hc / 399))[::-1], atol=1e-10)
    assert rep.embedding_spectrum[0] > 0 and rep.embedding_spectrum[-1] < 1e-10  # the dead unit's direction
    assert "dormant 2" in rep.summary()


def test_probe_accepts_tensor_and_tuple_data_alike():
    net = relu_net()
    x, y = probe_inputs()
    a1 = ms.diagnose(net, x[:2], data=x, symmetries=[], nc=False).activations
    a2 = ms.diagnose(net, x[:2], data=(x, y), symmetries=[], batch_size=7).activations
    assert a1.drop(columns="eff_rank").equals(a2.drop(columns="eff_rank"))
    assert a1["eff_rank"][0] == pytest.approx(a2["eff_rank"][0], rel=1e-9)
    a3 = ms.diagnose(net, x[:2], data=[x[:200], x[200:]], symmetries=[], nc=False).activations  # two batches
    assert a3.drop(columns="eff_rank").equals(a1.drop(columns="eff_rank"))


def test_neural_collapse_end_to_end_on_a_simplex_etf():
    C, D = 4, 6
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    means = 2.0 * ((torch.eye(C, dtype=torch.float64) - 1 / C) * math.sqrt(C / (C - 1))) @ Q[:C]
    y = torch.arange(C).repeat(10)
    net = nn.Sequential(nn.Identity(), nn.Linear(D, C)).double()
    with torch.no_grad():
        net[1].weight.copy_(means)
        net[1].bias.zero_()
    rep = ms.diagnose(net, means[:1], data=(means[y], y), symmetries=[])
    nc = rep.neural_collapse
    assert abs(nc["nc1"]) < 1e-20 and nc["nc2_equiangular"] < 1e-12 and nc["nc3"] < 1e-20 and nc["nc4"] == 0
    assert rep.meta["classifier"] == "1"


def test_probe_restores_modes_and_does_not_touch_batchnorm_stats():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    net.train()
    net[3].eval()  # a mixed state must come back exactly as it was
    before = net[1].running_mean.clone()
    x = torch.randn(32, 4)
    ms.diagnose(net, x[:2], data=x, symmetries=[], nc=False)
    assert [m.training for m in net.modules()] == [True, True, True, True, False]
    torch.testing.assert_close(net[1].running_mean, before, rtol=0, atol=0)
    ms.diagnose(net, x[:2], data=x, symmetries=[], nc=False, mode="current")  # documented: updates stats
    assert not torch.equal(net[1].running_mean, before)


def test_reused_activation_module_is_probed_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 4), nn.Linear(4, 5), nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    rep = ms.diagnose(Twice(), None, data=torch.randn(10, 3), symmetries=[], nc=False)
    assert list(rep.activations["layer"]) == ["act", "act#2"]
    assert list(rep.activations["units"]) == [4, 5]


def test_conv_channels_are_units():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        net[0].weight[1] = 0
        net[0].bias[1] = -1.0
    rep = ms.diagnose(net, None, data=(torch.randn(8, 2, 5, 5), torch.arange(8) % 2), symmetries=[])
    a = rep.activations.iloc[0]
    assert a["units"] == 3 and a["rows"] == 8 and a["dead"] == 1
    assert rep.neural_collapse is None  # no linear head: no NC metrics, and no error


def test_posterior_columns():
    mu = torch.zeros(50, 2, dtype=torch.float64)
    mu[:, 0] = torch.linspace(-1, 1, 50, dtype=torch.float64)
    rep = ms.diagnose(planted_mlp(), None, symmetries=[], posterior=(mu, torch.zeros_like(mu)))
    assert rep.posterior["active"].tolist() == [True, False]
    assert rep.posterior["kl"][1] == 0.0
    assert "1 of 2 latents active" in rep.summary()


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors_are_clear():
    net = relu_net()
    with pytest.raises(ValueError, match=r"cannot run on a probe batch with input shapes \[\(5, 7\)\]"):
        ms.diagnose(net, torch.randn(2, 4), data=torch.randn(5, 7), symmetries=[])
    with pytest.raises(ValueError, match="no layer named 'relu'"):
        ms.diagnose(net, None, data=torch.randn(5, 4), symmetries=[], layers=["relu"])
    with pytest.raises(ValueError, match="no layer named 'head'"):
        ms.diagnose(net, None, symmetries=[], classifier="head")
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 4)), batch_size=4)
    with pytest.raises(ValueError, match="no samples"):
        ms.diagnose(net, None, data=empty, symmetries=[])
    with pytest.raises(ValueError, match="no samples"):
        ms.diagnose(net, None, data=torch.zeros(0, 4), symmetries=[])
    with pytest.raises(ValueError, match="mode"):
        ms.diagnose(net, None, data=torch.zeros(3, 4), symmetries=[], mode="train")


# ----------------------------------------------------------------------------------------------- monitor
def test_monitor_history_over_training_keeps_planted_structure():
    net = planted_mlp()
    x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mon = ms.SymmetryMonitor(net, x[:2], every=3, symmetries=mlp_map())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(7):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        mon.step()
    hist = mon.history
    assert sorted(set(hist["step"])) == [0, 3, 6] and len(hist) == 3 * 2
    assert list(hist.columns[:2]) == ["step", "group"]
    # THEORY §3: dead tanh units and planted duplicates are absorbing under GD
    assert (hist["dead"] == len(K_DEAD)).all() and (hist["distinct"] == H - len(K_DEAD) - len(DUPS)).all()
    with pytest.raises(ValueError, match="every"):
        ms.SymmetryMonitor(net, x[:2], every=0, symmetries=mlp_map())


def test_lightning_module_is_import_safe_and_callback_steps_the_monitor(monkeypatch):
    import mirrorsym.diagnose.lightning as lmod

    monkeypatch.delitem(lmod.__dict__, "SymmetryMonitorCallback", raising=False)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match=r"mirrorsym\[lightning\]"):
        lmod.SymmetryMonitorCallback  # noqa: B018
    fake = types.ModuleType("lightning.pytorch")
    fake.Callback = type("Callback", (), {})
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
    cb = lmod.SymmetryMonitorCallback(None, every=2, symmetries=mlp_map())
    assert isinstance(cb, fake.Callback) and cb.history is None
    net = planted_mlp()
    for i in range(5):
        cb.on_train_batch_end(None, net, None, None, i)
    assert sorted(set(cb.history["step"])) == [0, 2, 4]
    monkeypatch.delitem(lmod.__dict__, "SymmetryMonitorCallback", raising=False)


def test_product_spectrum_from_qr_cores_matches_the_explicit_product():
    from mirrorsym.diagnose.units import invariant_product, product_spectrum

    g = torch.Generator().manual_seed(7)
    fs = {
        "a": torch.randn(6, 40, generator=g, dtype=torch.float64),
        "b": torch.randn(6, 30, generator=g, dtype=torch.float64),
    }
    fs["a"][4:] = 0  # two unit directions unused by one factor: product rank 4
    sv, shape = product_spectrum(fs)
    dense = torch.linalg.svdvals(invariant_product(fs))
    assert shape == (40, 30)
    torch.testing.assert_close(sv, dense[:6], rtol=1e-10, atol=1e-12)
    assert (
        M.rank_metrics(sv=sv, shape=shape)["num_rank"].item()
        == np.linalg.matrix_rank(invariant_product(fs).numpy())
        == 4
    )
    assert product_spectrum({"a": fs["a"]}) is None
