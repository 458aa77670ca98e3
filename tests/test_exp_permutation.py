"""permutation experiment: parameters out of sweep rows, ψ = θ − θ₀ of a syre model, planted dead and
duplicated channels counted against a numpy recomputation."""

import numpy as np
import torch

from mirrorsym.detect import find_symmetries
from mirrorsym.experiments import permutation as P
from mirrorsym.experiments.base import Context


def test_sweep_models_rebuild_each_seed_with_its_trained_parameters_and_offsets(tmp_path):
    cfg = P.Config(channels=(2, 3), steps=3, seeds=2, batch=8)
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    ctx = Context(out_dir=tmp_path)
    for sigma in (None, 0.01):
        runs = P.sweep_models(cfg, ctx, x, y, sigma, (cfg.weight_decay,), f"s{sigma}")
        assert sorted(r[1] for r in runs) == [0, 1] and all(r[2] == "ok" for r in runs)
        for _, seed, _, model in runs:
            init = P.cnn_factory(cfg.channels, sigma, seed)
            trained = dict(model.named_parameters())
            assert any(not torch.equal(p, trained[n]) for n, p in init.named_parameters())  # trained
            assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in init.named_buffers())  # same θ₀
        first = [dict(m.named_parameters()) for *_, m in runs]
        assert not all(torch.equal(first[0][n], first[1][n]) for n in first[0])  # each seed its own run


def test_split_trained_gives_offset_plus_learned_part():
    model = P.cnn_factory((3, 4), 0.01, 5)
    theta, psi = P.split_trained(model, (3, 4), 0.01)
    for name, p in theta.named_parameters():
        layer, _, t = name.rpartition(".")
        par = getattr(model.get_submodule(layer).parametrizations, t)
        np.testing.assert_array_equal(p.detach().numpy(), (par[0].offset + par.original).detach().numpy())
        np.testing.assert_array_equal(psi.get_parameter(name).detach().numpy(), par.original.detach().numpy())


def _numpy_counts(units: np.ndarray, dead_tol=1e-3, dup_tol=0.05):
    norms = np.linalg.norm(units, axis=1)
    dead = norms <= dead_tol * norms.max()
    alive = np.flatnonzero(~dead)
    parent = {i: i for i in alive}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a in alive:
        for b in alive:
            if a < b and np.linalg.norm(units[a] - units[b]) <= dup_tol * max(norms[a], norms[b]):
                parent[find(b)] = find(a)
    distinct = len({find(i) for i in alive})
    return int(dead.sum()), int(len(alive) - distinct)


def test_planted_dead_and_duplicated_channels_on_theta_and_psi():
    channels = (4, 6)
    model = P.cnn_factory(channels, 0.01, 1)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        conv = model[3].parametrizations
        conv.weight.original[1] = conv.weight.original[4]  # channel 1 duplicates channel 4 in ψ
        conv.bias.original[1] = conv.bias.original[4]
        conv.weight.original[2] = 0  # channel 2: ψ = 0, it sits on θ₀
        conv.bias.original[2] = 0
        model[7].parametrizations.weight.original[:, 1] = model[7].parametrizations.weight.original[:, 4]
        model[7].parametrizations.weight.original[:, 2] = 0
    theta, psi = P.split_trained(model, channels, 0.01)
    smap = find_symmetries(P.make_cnn(channels), x)
    got = P.weight_counts(psi, x, smap)
    layer = [lay for lay in got["layers"] if lay["units"] == channels[1]][0]
    # numpy reference on the rescale-balanced units of layer 2 of ψ (incoming filters + bias, outgoing column)
    w, b, v = (psi[3].weight.detach().double().numpy(), psi[3].bias.detach().double().numpy(),
               psi[7].weight.detach().double().numpy())
    src = np.concatenate([w.reshape(channels[1], -1), b[:, None]], 1)
    snk = v.T
    a, c = np.linalg.norm(src, axis=1), np.linalg.norm(snk, axis=1)
    scale = np.where((a > 0) & (c > 0), np.sqrt(c / np.where(a > 0, a, 1)), 0)
    units = np.concatenate([src * scale[:, None], snk / np.where(scale > 0, scale, 1)[:, None]], 1)
    assert (layer["dead"], layer["duplicated"]) == _numpy_counts(units) == (1, 1)
    # on θ = θ₀ + ψ the planted dead channel holds θ₀ (1 % of the init scale): not dead at the 1e-3 floor
    lay_theta = [lay for lay in P.weight_counts(theta, x, smap)["layers"] if lay["units"] == channels[1]][0]
    assert lay_theta["dead"] == 0


def test_activation_counts_against_numpy():
    model = P.make_cnn((3, 4))
    with torch.no_grad():
        model[3].weight[0] = 0
        model[3].bias[0] = -1.0  # never active: dead
        model[3].weight[2] = 2 * model[3].weight[1]  # a positive multiple: the same activation pattern
        model[3].bias[2] = 2 * model[3].bias[1]
    x = torch.randn(32, 1, 8, 8)
    got = P.activation_counts(model, x)
    acts = []
    h = model[1].register_forward_hook(lambda m, i, o: acts.append(o))
    h2 = model[4].register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        model(x)
    h.remove()
    h2.remove()
    dead = dup = 0
    for a in acts:
        A = a.transpose(0, 1).reshape(a.shape[1], -1).double().numpy()
        peak = np.abs(A).max(1)
        alive = peak > 1e-3 * peak.max()
        U = np.where(alive[:, None], A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-300), 0)
        d, k = _numpy_counts(U)
        dead, dup = dead + int((~alive).sum()), dup + k
    assert (got["dead"], got["duplicated"]) == (dead, dup)
    assert got["dead"] >= 1 and got["duplicated"] >= 1
