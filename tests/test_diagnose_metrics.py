"""Collapse metrics (docs/theory.md#metrics) against numpy / scikit-learn and closed forms."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid

from mirrorsym.diagnose import metrics as M


def _matrices():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(30, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, 20, generator=g, dtype=torch.float64
    )
    decaying = torch.randn(25, 25, generator=g, dtype=torch.float64) * torch.logspace(
        0, -6, 25, dtype=torch.float64
    )
    return {
        "gauss": torch.randn(40, 12, generator=g, dtype=torch.float64),
        "rank4": low,
        "decaying": decaying,
        "wide32": torch.randn(7, 50, generator=g),
    }


def _np_ranks(A):
    s = np.linalg.svd(A, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    c2, c1 = np.cumsum(s**2), np.cumsum(s)
    return {
        "eff_rank": np.exp(-(p * np.log(p)).sum()),
        "approx_rank": int(np.searchsorted(c2, 0.99 * c2[-1]) + 1),
        "srank": int(np.searchsorted(c1, 0.99 * c1[-1]) + 1),
        "stable_rank": np.linalg.norm(A, "fro") ** 2 / np.linalg.norm(A, 2) ** 2,
        "num_rank": int(np.linalg.matrix_rank(A)),
    }


@pytest.mark.parametrize("name", ["gauss", "rank4", "decaying", "wide32"])
def test_rank_metrics_match_numpy(name):
    A = _matrices()[name]
    ref = _np_ranks(A.numpy())
    got = M.rank_metrics(A)
    rtol = 1e-5 if A.dtype == torch.float32 else 1e-10
    assert got["eff_rank"].item() == pytest.approx(ref["eff_rank"], rel=rtol)
    assert got["stable_rank"].item() == pytest.approx(ref["stable_rank"], rel=rtol)
    for k in ("approx_rank", "srank", "num_rank"):
        assert got[k].item() == ref[k], k
    # the single-metric functions agree with the bundle
    assert M.effective_rank(A).item() == pytest.approx(got["eff_rank"].item(), rel=1e-12)
    assert M.approx_rank(A).item() == got["approx_rank"].item()
    assert M.srank(A).item() == got["srank"].item()
    assert M.stable_rank(A).item() == pytest.approx(got["stable_rank"].item(), rel=1e-12)
    assert M.numerical_rank(A).item() == got["num_rank"].item()


def test_planted_rank_is_found_exactly():
    assert M.numerical_rank(_matrices()["rank4"]).item() == 4


def test_rank_closed_forms():
    eye = torch.eye(100, dtype=torch.float64)
    r = M.rank_metrics(eye)
    assert r["eff_rank"].item() == pytest.approx(100)
    assert r["stable_rank"].item() == pytest.approx(100)
    assert r["approx_rank"].item() == 99 and r["srank"].item() == 99  # k/100 ≥ 0.99 first at k = 99
    assert r["num_rank"].item() == 100
    one = torch.outer(torch.arange(1.0, 6.0), torch.arange(1.0, 4.0)).double()
    assert {k: round(v.item(), 9) for k, v in M.rank_metrics(one).items()} == {
        "eff_rank": 1.0,
        "approx_rank": 1,
        "srank": 1,
        "stable_rank": 1.0,
        "num_rank": 1,
    }
    zero = M.rank_metrics(torch.zeros(4, 3))
    assert all(v.item() == 0 for v in zero.values())


def test_numerical_rank_tolerance_is_stated_and_used():
    A = torch.diag(torch.tensor([1.0, 1e-3, 1e-9], dtype=torch.float64))
    assert M.numerical_rank(A).item() == 3
    assert M.numerical_rank(A, tol=1e-6).item() == 2
    assert M.numerical_rank(A, tol=1e-2).item() == 1


def test_rank_metrics_refuse_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        M.effective_rank(torch.ones(2, 3, 4))


def _planted_units(n=20, feats=11, dead=(3, 7, 15), dup_of=(0, 0, 5), dup_at=(1, 2, 9), eps=1e-9):
    g = torch.Generator().manual_seed(2)
    U = torch.randn(n, feats, generator=g, dtype=torch.float64)
    for i, j in zip(dup_of, dup_at, strict=True):
        U[j] = U[i] + eps * torch.randn(feats, generator=g, dtype=torch.float64)
    U[list(dead)] = 0
    return U


def test_dead_and_distinct_units_planted():
    U = _planted_units()
    dead = M.dead_units(U)
    assert sorted(torch.nonzero(dead).reshape(-1).tolist()) == [3, 7, 15]
    labels = M.unit_clusters(U)
    # 20 units: 3 dead ones form one cluster, units {0,1,2} and {5,9} are duplicates
    assert M.distinct_units(U) == 20 - 3 + 1 - 2 - 1
    assert labels[0] == labels[1] == labels[2] and labels[5] == labels[9]
    assert labels[3] == labels[7] == labels[15]
    assert len({labels[i] for i in (0, 3, 4, 5, 6)}) == 5
    assert list(labels[:5]) == [0, 0, 0, 1, 2]  # numbered by first appearance


def test_distinct_units_separates_above_tolerance():
    U = _planted_units(eps=1e-3)
    assert M.distinct_units(U) == 20 - 3 + 1  # duplicates differ by 1e-3 relative: distinct now
    assert M.distinct_units(U, rtol=1e-1) == 20 - 3 + 1 - 3


def test_distinct_units_single_linkage_chains():
    base = torch.zeros(4, 3, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    base[:, 1] = torch.tensor([0.0, 0.6e-2, 1.2e-2, 1.8e-2], dtype=torch.float64)  # steps 0.6 % apart
    assert M.distinct_units(base, rtol=1e-2) == 1  # chained through neighbours
    assert M.distinct_units(base, rtol=1e-3) == 4


def test_dead_units_relative_tolerance_float32():
    U = torch.ones(4, 5)
    U[2] = 1e-6  # ‖u‖ relative 1e-6 < √eps(float32) ≈ 3.5e-4
    assert torch.nonzero(M.dead_units(U)).reshape(-1).tolist() == [2]
    assert not M.dead_units(U, rtol=1e-8).any()


def test_activation_dead_dormant_and_redo():
    acts = torch.zeros(200, 4)
    acts[:, 0] = torch.rand(200) + 0.1  # always active
    acts[0, 1] = 5.0  # active on 1 of 200 inputs = 0.5 % < 1 %: dormant, not dead
    acts[:3, 2] = 1.0  # 1.5 %: neither
    assert M.dead_activations(acts).tolist() == [False, False, False, True]
    assert M.dormant_activations(acts).tolist() == [False, True, False, True]
    a = acts.numpy().astype(np.float64)
    ref = np.abs(a).mean(0) / np.abs(a).mean(0).mean()
    np.testing.assert_allclose(M.redo_scores(acts).numpy(), ref, rtol=1e-12)
    assert M.tau_dormant(acts, tau=0.1).tolist() == list(ref <= 0.1)
    with pytest.raises(ValueError, match="no rows"):
        M.unit_activity(torch.zeros(0, 3))


def _etf_features(C=5, D=8, per_class=6, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    etf = (torch.eye(C, dtype=torch.float64) - 1.0 / C) * np.sqrt(C / (C - 1))  # C×C, unit-norm rows
    means = scale * etf @ Q[:C]  # rows in span of Q[:C]
    offset = 2.0 * Q[C]  # global mean orthogonal to every centred mean
    y = torch.arange(C).repeat_interleave(per_class)
    return means[y] + offset, y, means


def test_neural_collapse_on_simplex_etf():
    H, y, means = _etf_features()
    C = 5
    W = 0.7 * means  # self-dual classifier, no bias needed: W·offset = 0
    nc = M.neural_collapse(H, y, W)
    assert abs(nc["nc1"].item()) < 1e-20
    assert nc["nc2_equinorm"].item() < 1e-12
    assert nc["nc2_equiangular"].item() < 1e-12 and nc["nc2_max_angle_dev"].item() < 1e-12
    assert nc["nc3"].item() < 1e-20
    assert nc["nc4"].item() == 0.0
    m = means / means.norm(dim=1, keepdim=True)
    cos = (m @ m.T)[~torch.eye(C, dtype=torch.bool)]
    torch.testing.assert_close(cos, torch.full_like(cos, -1 / (C - 1)))


def _np_nc(H, y, W, b):
    C = y.max() + 1
    mu = np.stack([H[y == c].mean(0) for c in range(C)])
    mg = H.mean(0)
    Sw = sum((H[y == c] - mu[c]).T @ (H[y == c] - mu[c]) for c in range(C)) / len(H)
    Sb = (mu - mg).T @ (mu - mg) / C
    nc1 = np.trace(Sw @ np.linalg.pinv(Sb, hermitian=True)) / C
    m = mu - mg
    norms = np.linalg.norm(m, axis=1)
    cos = (m @ m.T) / np.outer(norms, norms)
    dev = np.abs(cos[~np.eye(C, dtype=bool)] + 1 / (C - 1))
    nc3 = np.sum((W / np.linalg.norm(W) - m / np.linalg.norm(m)) ** 2)
    ncc = NearestCentroid().fit(H, y).predict(H)
    nc4 = np.mean((H @ W.T + b).argmax(1) != ncc)
    return nc1, norms.std() / norms.mean(), dev.mean(), nc3, nc4


def test_neural_collapse_on_random_features_matches_numpy_and_sklearn():
    g = torch.Generator().manual_seed(3)
    C, D = 4, 6
    y = torch.arange(C).repeat(30)
    H = (
        torch.randn(len(y), D, generator=g, dtype=torch.float64)
        + 0.8 * torch.randn(C, D, generator=g, dtype=torch.float64)[y]
    )
    W, b = (
        torch.randn(C, D, generator=g, dtype=torch.float64),
        torch.randn(C, generator=g, dtype=torch.float64),
    )
    nc = M.neural_collapse(H, y, W, b)
    ref = _np_nc(H.numpy(), y.numpy(), W.numpy(), b.numpy())
    got = [nc[k].item() for k in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4")]
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert nc["nc1"].item() > 0.1 and nc["nc4"].item() > 0  # far from collapse


def test_nc_errors_name_the_problem():
    H, y, _ = _etf_features()
    with pytest.raises(ValueError, match="classes"):
        M.nc1(H, y, num_classes=7)
    with pytest.raises(ValueError, match="shape"):
        M.nc3(H, y, torch.ones(3, 8))


def test_embedding_spectrum_matches_numpy_covariance():
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 9, generator=g, dtype=torch.float64
    )
    ev = M.embedding_spectrum(Z)
    ref = np.sort(np.linalg.eigvalsh(np.cov(Z.numpy().T)))[::-1]
    np.testing.assert_allclose(ev.numpy(), np.clip(ref, 0, None), atol=1e-10)
    assert (ev[3:] < 1e-10).all() and (ev[:3] > 1e-3).all()  # dimensional collapse to 3 directions
    assert M.embedding_spectrum(torch.randn(4, 10)).shape == (10,)


def test_posterior_collapse_kl_and_active_units():
    g = torch.Generator().manual_seed(5)
    N = 500
    mu = torch.zeros(N, 3, dtype=torch.float64)
    logvar = torch.zeros(N, 3, dtype=torch.float64)
    mu[:, 1] = torch.randn(N, generator=g, dtype=torch.float64)
    logvar[:, 1] = -2.0
    mu[:, 2] = 0.05 * torch.randn(N, generator=g, dtype=torch.float64)  # var ≈ 0.0025 < 0.01
    kl = M.gaussian_kl_per_latent(mu, logvar)
    assert kl[0].item() == 0.0  # posterior equals the prior: collapsed
    expected1 = 0.5 * ((mu[:, 1] ** 2).mean() + np.exp(-2.0) + 2.0 - 1.0)
    assert kl[1].item() == pytest.approx(expected1.item(), rel=1e-12)
    assert M.active_latents(mu).tolist() == [False, True, False]
    np.testing.assert_array_equal(M.active_latents(mu, threshold=1e-3).numpy(), mu.numpy().var(0) > 1e-3)


@pytest.mark.parametrize("activation,duplicates", [(torch.nn.Tanh, False), (torch.nn.ReLU, True)])
def test_canonical_units_quotient_only_the_groups_own_action(activation, duplicates):
    """Unit 1 = unit 0 with incoming weights × 2 and outgoing × ½: the same function for ReLU (a rescale is
    a symmetry), a different one for tanh (only sign flips are), so only ReLU makes them duplicates."""
    import mirrorsym as ms

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), activation(), torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[0].weight[1], net[0].bias[1] = 2 * net[0].weight[0], 2 * net[0].bias[0]
        net[2].weight[:, 1] = net[2].weight[:, 0] / 2
    x = torch.randn(64, 3, dtype=torch.float64)
    h = activation()(net[0](x))
    with torch.no_grad():
        same_function = torch.allclose(h[:, 1:2] * net[2].weight[:, 1], h[:, 0:1] * net[2].weight[:, 0])
    assert same_function == duplicates  # the premise, checked on activations
    kind = "rescale" if duplicates else "sign_flip"
    (group,) = ms.find_symmetries(net, x[:4]).by_kind(kind)
    units = group.canonical_units(net)
    assert torch.allclose(units[0], units[1], atol=1e-12) == duplicates
