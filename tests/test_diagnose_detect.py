"""diagnose, SymmetryMonitor and the CLI through the real detector (ms.find_symmetries)."""

import numpy as np
import pytest
import torch
from test_diagnose_report import DUPS, K_DEAD, Attention, H, planted_mlp
from torch import nn
from typer.testing import CliRunner

import mirrorsym as ms
from mirrorsym.cli import app


def test_planted_mlp_through_the_detector():
    net = planted_mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    df = ms.diagnose(net, x).to_pandas()
    assert set(df["kind"]) == {"permutation", "sign_flip"}  # tanh: permutations and sign flips
    assert (df["units"] == H).all() and (df["dead"] == len(K_DEAD)).all()
    assert (df["distinct"] == H - len(K_DEAD) - len(DUPS)).all()  # dead units are never distinct
    assert (df["distance"] == 0).all()  # two dead units coincide: on a swap surface and a sign surface


def test_relu_mlp_dead_units_and_rescale_groups():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        net[0].weight[[2, 5]] = 0
        net[0].bias[[2, 5]] = 0
        net[2].weight[:, [2, 5]] = 0
    df = ms.diagnose(net, torch.randn(2, 4)).to_pandas()
    assert "rescale" in set(df["kind"]) and "permutation" in set(df["kind"])
    assert (df["dead"] == 2).all() and (df["distinct"] == 8).all()


def planted_ov(r=2, head=0):
    torch.manual_seed(0)
    att = Attention(bias=False).double()
    g = torch.Generator().manual_seed(3)
    rows = slice(head * att.dh, (head + 1) * att.dh)
    with torch.no_grad():
        att.v_proj.weight[rows] = torch.randn(att.dh, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, 8, generator=g, dtype=torch.float64
        )
    return att


def _rotation_rows(df, layer_word):
    return df[(df["kind"] == "rotation") & df["group"].str.contains(layer_word)]


def test_planted_value_output_rank_through_the_detector():
    r, head = 2, 0
    att = planted_ov(r, head)
    df = ms.diagnose(att, torch.randn(1, 3, 8, dtype=torch.float64)).to_pandas()
    rot = _rotation_rows(df, "v_proj")
    assert len(rot) == att.heads and (rot["units"] == att.dh).all()
    assert sorted(rot["num_rank"].astype(int)) == [r, att.dh]
    # the low-rank group is the planted head: its product is W_O[:, h] W_V[h, :]
    rows = slice(head * att.dh, (head + 1) * att.dh)
    P = (att.out_proj.weight[:, rows] @ att.v_proj.weight[rows]).detach().numpy()
    low = rot[rot["num_rank"] == r].iloc[0]
    s = np.linalg.svd(P, compute_uv=False)
    assert low["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert low["num_rank"] == np.linalg.matrix_rank(P)
    assert (_rotation_rows(df, "q_proj")["num_rank"] == att.dh).all()


def test_planted_query_key_rank_through_the_detector():
    r, head = 1, 1
    torch.manual_seed(0)
    att = Attention(bias=False).double()
    rows = slice(head * att.dh, (head + 1) * att.dh)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        att.q_proj.weight[rows] = torch.randn(att.dh, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, 8, generator=g, dtype=torch.float64
        )
    df = ms.diagnose(att, torch.randn(1, 3, 8, dtype=torch.float64)).to_pandas()
    rot = _rotation_rows(df, "q_proj")
    assert len(rot) == att.heads and sorted(rot["num_rank"].astype(int)) == [r, att.dh]
    P = (att.q_proj.weight[rows].T @ att.k_proj.weight[rows]).detach().numpy()  # W_Q,hᵀ W_K,h
    s = np.linalg.svd(P, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    low = rot[rot["num_rank"] == r].iloc[0]
    assert low["eff_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)


def test_multihead_attention_value_output_groups_use_the_members():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = mha

        def forward(self, x):
            return self.a(x, x, x, need_weights=False)[0]

    with torch.no_grad():  # head 1's value rows (in_proj rows 20..23) of rank 1
        mha.in_proj_weight[20:24] = torch.outer(torch.arange(1.0, 5.0), torch.ones(8)).double()
    df = ms.diagnose(Wrap(), torch.randn(1, 3, 8, dtype=torch.float64)).to_pandas()
    ov = _rotation_rows(df, "out_proj")
    assert sorted(ov["num_rank"].astype(int)) == [1, 4]
    qk = df[(df["kind"] == "rotation") & ~df["group"].str.contains("out_proj")]  # packed q and k rows
    assert len(qk) == 2 and (qk["num_rank"] == 4).all()
    P = (mha.in_proj_weight[0:4].T @ mha.in_proj_weight[8:12]).detach()  # head 0: W_Qᵀ W_K
    assert sorted(qk["stable_rank"])[0] == pytest.approx(
        min(
            ms.diagnose.metrics.stable_rank(P).item(),
            ms.diagnose.metrics.stable_rank(
                (mha.in_proj_weight[4:8].T @ mha.in_proj_weight[12:16]).detach()
            ).item(),
        ),
        rel=1e-9,
    )


def test_monitor_finds_symmetries_itself():
    net = planted_mlp()
    mon = ms.SymmetryMonitor(net, torch.randn(2, 5, dtype=torch.float64), every=1)
    mon.step()
    mon.step()
    assert list(mon.history["step"].unique()) == [0, 1] and len(mon.history) == 4


MODEL_FILE = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
"""


def test_cli_diagnose_on_digits(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["diagnose", f"{tmp_path / 'net.py'}:make", "--data", "digits", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "symmetry groups" in res.output and "neural collapse" in res.output
    for name in ("groups.csv", "activations.csv", "summary.txt", "dead_distinct.png", "activity.png"):
        assert (out / name).is_file(), name
    # a checkpoint with dead units is loaded and seen
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        net[0].weight[:3] = 0
        net[0].bias[:3] = 0
        net[2].weight[:, :3] = 0
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    res = CliRunner().invoke(
        app,
        [
            "diagnose",
            f"{tmp_path / 'net.py'}:make",
            "--checkpoint",
            str(tmp_path / "ckpt.pt"),
            "--input-shape",
            "2,64",
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "dead units: 3 of 16" in res.output


def test_cli_errors_are_clear(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    runner = CliRunner()
    res = runner.invoke(app, ["diagnose", f"{tmp_path / 'net.py'}:nope", "--input-shape", "2,64"])
    assert res.exit_code == 2 and "has no attribute 'nope'" in res.output
    res = runner.invoke(app, ["diagnose", f"{tmp_path / 'net.py'}:make"])
    assert res.exit_code == 2 and "--input-shape" in res.output
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "x.npy", np.zeros((5, 7), dtype=np.float32))
    res = runner.invoke(
        app,
        [
            "diagnose",
            f"{tmp_path / 'net.py'}:make",
            "--data",
            str(tmp_path / "d"),
            "--input-shape",
            "2,64",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "cannot run on a probe batch" in res.output


def test_distances_agree_with_the_detectors_own():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3)).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    smap = ms.find_symmetries(net, x)
    df = ms.diagnose(net, x, symmetries=smap).to_pandas()
    assert len(df) == len(smap.groups) >= 4
    for g, d in zip(smap.groups, df["distance"], strict=True):
        assert d == pytest.approx(g.distance(net), rel=1e-9), g


def test_linear_linear_product_rank_through_the_detector():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4)).double()
    with torch.no_grad():  # W1 of rank 2, so the product W2 W1 (the invariant map) has rank 2
        net[0].weight.copy_(torch.randn(5, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64))
    df = ms.diagnose(net, torch.randn(2, 6, dtype=torch.float64)).to_pandas()
    rot = df[df["kind"] == "rotation"]
    assert len(rot) == 1 and rot["units"].iloc[0] == 5 and rot["num_rank"].iloc[0] == 2
    P = (net[1].weight @ net[0].weight).detach()
    assert rot["stable_rank"].iloc[0] == pytest.approx(ms.diagnose.metrics.stable_rank(P).item(), rel=1e-9)


def test_summary_counts_each_set_of_units_once():
    """A conv channel is moved by a permutation, a rescale and a BatchNorm-scale group over different
    layer lists: the summary counts its 4 channels once, not 12."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():
        m[0].weight[1], m[0].bias[1], m[1].weight[1], m[1].bias[1] = 0, 0, 0, 0
        m[4].weight[:, 16:32] = 0
    rep = ms.diagnose(m, torch.randn(2, 1, 6, 6))
    assert {"permutation", "rescale", "bn_scale"} <= set(rep.to_pandas()["kind"])
    assert "dead units: 1 of 4" in rep.summary() and "distinct units: 3 of 4" in rep.summary()
