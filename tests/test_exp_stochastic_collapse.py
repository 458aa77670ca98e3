"""stochastic_collapse: planted dead and duplicated units counted against numpy; the start has every unit
distinct; identical units stay identical under SGD (the swap surface is invariant); the per-seed statistics
of the findings on a hand-made result set."""

import math

import numpy as np
import torch

from mirrorsym.detect import find_symmetries
from mirrorsym.experiments import stochastic_collapse as S

CFG = S.CONFIGS["tiny"]


def _numpy_weight_counts(model):
    """Canonical units (incoming row, bias, outgoing weight; sign fixed by the largest incoming coordinate),
    dead ≤ 1e-3 of the largest, duplicates within 5 % (single linkage)."""
    W = model.hidden.weight.detach().numpy()
    U = np.concatenate([W, model.hidden.bias.detach().numpy()[:, None], model.out.weight.detach().numpy().T], 1)
    k, d = W.shape
    lead = np.argmax(np.abs(U[:, : d + 1]), 1)
    s = np.sign(U[np.arange(k), lead])
    U = U * np.where(s == 0, 1, s)[:, None]
    norms = np.linalg.norm(U, axis=1)
    dead = norms <= 1e-3 * norms.max()
    alive = list(np.flatnonzero(~dead))
    parent = {i: i for i in alive}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a in alive:
        for b in alive:
            if a < b and np.linalg.norm(U[a] - U[b]) <= 0.05 * max(norms[a], norms[b]):
                parent[find(b)] = find(a)
    distinct = len({find(i) for i in alive})
    return int(dead.sum()), int(len(alive) - distinct), distinct


def test_planted_dead_and_duplicated_units_counted_like_numpy():
    x, _ = S.make_data(CFG)
    model = S.make_student(CFG.d, 5, 0)
    with torch.no_grad():
        h, a = model.hidden, model.out
        h.weight[1], h.bias[1], a.weight[0, 1] = h.weight[0] * 1.01, 0.0, a.weight[0, 0]  # unit 1 ≈ unit 0
        h.weight[3], h.bias[3], a.weight[0, 3] = -h.weight[2], -h.bias[2], -a.weight[0, 2]  # sign-flipped copy
        h.weight[4], h.bias[4], a.weight[0, 4] = 0.0, 0.0, 0.0  # dead
    got = S.weight_counts(model, x, find_symmetries(model, x[:1]))
    assert (got["dead"], got["duplicated"], got["distinct"]) == _numpy_weight_counts(model) == (1, 2, 2)
    f = S.functional_counts(model, x)
    A = np.tanh(x.numpy() @ h.weight.detach().numpy().T + h.bias.detach().numpy()).T
    A = A * np.sign(A[np.arange(5), np.abs(A).argmax(1)])[:, None]
    pairs = sum(np.linalg.norm(A[i] - A[j]) <= 0.05 * max(np.linalg.norm(A[i]), np.linalg.norm(A[j]))
                for i in range(4) for j in range(i + 1, 4))
    assert f["dead"] == 1 and f["duplicated"] == pairs == 2


def test_initial_students_have_every_unit_distinct():
    x, _ = S.make_data(CFG)
    model = S.make_student(CFG.d, CFG.hidden, 0)
    smap = find_symmetries(model, x[:1])
    for seed in range(CFG.seeds):
        m = S.make_student(CFG.d, CFG.hidden, seed)
        assert S.weight_counts(m, x, smap)["distinct"] == CFG.hidden
        assert m.hidden.bias.abs().max().item() == 0.0
    a, b = S.make_student(CFG.d, CFG.hidden, 1), S.make_student(CFG.d, CFG.hidden, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_identical_units_stay_identical_under_minibatch_sgd():
    x, y = S.make_data(CFG)
    model = S.make_student(CFG.d, 3, 2)
    with torch.no_grad():
        model.hidden.weight[1], model.hidden.bias[1] = model.hidden.weight[0], 0.3
        model.hidden.bias[0] = 0.3
        model.out.weight[0, 1] = model.out.weight[0, 0]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randperm(len(x), generator=g)[:1]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    U = torch.cat([model.hidden.weight, model.hidden.bias[:, None], model.out.weight.T], 1).detach()
    assert torch.equal(U[0], U[1]) and not torch.equal(U[0], U[2])


def _fake(cells):
    """results with hidden = 4, seeds = 1, lrs (0.1, 0.2, 0.4), batches (1, 4, 8); cells[(b, lr)] =
    (dead, duplicated, distinct) or None (diverged)."""
    runs = []
    for (b, lr), c in cells.items():
        w = None if c is None else {"units": 4, "dead": c[0], "duplicated": c[1], "distinct": c[2]}
        runs.append({"batch": b, "lr": lr, "seed": 0, "weights": w, "functional": w,
                     "status": "ok" if c else "diverged"})
    return {"runs": runs, "lrs": [0.1, 0.2, 0.4], "batches": [1, 4, 8], "seeds": 1, "hidden": 4}


def test_statistics_of_the_findings():
    ok = (0, 0, 4)
    res = _fake({(1, 0.1): ok, (1, 0.2): (1, 1, 2), (1, 0.4): None,
                 (4, 0.1): ok, (4, 0.2): ok, (4, 0.4): (0, 2, 2),
                 (8, 0.1): ok, (8, 0.2): ok, (8, 0.4): (0, 1, 3)})
    assert S.lost_units(res, 1, 0) == 2 and S.lost_units(res, 8, 0) == 1
    assert S.most(res, 0, "duplicated") == 2  # batch 8 = the largest batch is not an SGD cell
    assert S.most(res, 0, "dead") == 1
    assert S.onset(res, 1, 0) == 0.2 and S.onset(res, 4, 0) == 0.4
    assert S.onset(_fake({(1, 0.1): ok, (1, 0.2): ok, (1, 0.4): None}), 1, 0) is None
    assert S.lost_units(_fake({(1, lr): None for lr in (0.1, 0.2, 0.4)}), 1, 0) is None
    assert math.isclose(S._mean_over_seeds(res, 4, 0.4, "distinct"), 2.0)
