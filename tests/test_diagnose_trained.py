"""diagnose on really trained models: tanh and ReLU MLPs trained on digits with strong weight decay.

The counts are checked against an independent count written here from the weights alone (numpy, no
mirrorsym code): a unit's orbit representative under the group of its activation (balanced incoming and
outgoing norms; for tanh also the sign of its largest incoming weight), dead below 1e-3 of the layer's
largest unit, duplicates as connected components of "within 5 % relative distance" among living units.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mirrorsym as ms


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.tensor(d.data / 16, dtype=torch.float32), torch.tensor(d.target)


def train(act, x, y, weight_decay, steps=1500, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 32), act(), nn.Linear(32, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net


def independent_counts(net, odd: bool) -> tuple[int, int]:
    """(dead, distinct living clusters) from the weights, in numpy."""
    w_in = np.concatenate([net[0].weight.detach().double().numpy(), net[0].bias.detach().double().numpy()[:, None]], 1)
    w_out = net[2].weight.detach().double().numpy().T
    a, b = np.linalg.norm(w_in, axis=1), np.linalg.norm(w_out, axis=1)
    ok = (a > 0) & (b > 0)
    c = np.where(ok, np.sqrt(np.where(ok, b, 1) / np.where(ok, a, 1)), 0.0)
    units = np.concatenate([w_in * c[:, None], w_out * np.where(ok, 1 / np.where(ok, c, 1), 0)[:, None]], 1)
    if odd:
        lead = w_in[np.arange(len(w_in)), np.abs(w_in).argmax(1)]
        units *= np.where(lead < 0, -1.0, 1.0)[:, None]
    norms = np.linalg.norm(units, axis=1)
    dead = norms <= 1e-3 * norms.max()
    alive = np.flatnonzero(~dead)
    parent = {i: i for i in alive}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in alive:
        for j in alive:
            if i < j and np.linalg.norm(units[i] - units[j]) <= 0.05 * max(norms[i], norms[j]):
                parent[find(j)] = find(i)
    return int(dead.sum()), len({find(i) for i in alive})


# strong decay collapses both: tanh units merge into identical pairs (the swap mirror's surface), ReLU
# units die (the zero state of the rescaling)
@pytest.mark.parametrize("act, odd, weight_decay", [(nn.Tanh, True, 5e-2), (nn.ReLU, False, 2e-2)])
def test_counts_match_an_independent_count_and_the_activations(digits, act, odd, weight_decay):
    x, y = digits
    net = train(act, x, y, weight_decay)
    rep = ms.diagnose(net, x[:2], data=(x, y))
    groups = rep.to_pandas()
    dead, distinct = independent_counts(net, odd)
    assert 32 - distinct - dead > 0 if odd else dead > 0, "the test needs a collapsed model"
    assert (groups["dead"] == dead).all() and (groups["distinct"] == distinct).all()
    assert f"dead units: {dead} of 32" in rep.summary()
    # dead units are never distinct, and the activation probe agrees with the weights
    assert distinct <= 32 - dead
    assert int(rep.activations["dead"].iloc[0]) == dead
    # one naming: the activation row of the hidden layer carries the name of the group of its units
    assert rep.activations["layer"].iloc[0] == groups["layer"].iloc[0] == "0,2"
    assert rep.activations["module"].iloc[0] == "1"


def test_dcs_training_is_monitored_with_the_groups_of_the_plain_twin(digits):
    """ms.diagnose and SymmetryMonitor follow a model under ms.constrain: same groups as the plain model,
    and the monitor sees the gated units die as DCS trains."""
    x, y = digits
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    plain_groups = [(g.kind, g.size, sorted(g.params)) for g in ms.find_symmetries(net, x[:2])]
    ms.constrain.apply(net, x[:2], kind="units")
    assert [(g.kind, g.size, sorted(g.params)) for g in ms.find_symmetries(net, x[:2])] == plain_groups
    monitor = ms.SymmetryMonitor(net, x[:2], every=200, data=(x[:256], y[:256]))
    opt = torch.optim.SGD(ms.constrain.param_groups(net, weight_decay=2e-2), lr=0.1, momentum=0.9)
    for _ in range(801):
        monitor.step()
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    hist = monitor.history
    perm = hist[hist["kind"] == "permutation"]
    assert list(perm["step"]) == [0, 200, 400, 600, 800]
    assert perm["dead"].iloc[0] == 0 and perm["dead"].iloc[-1] > 0
    gates = net[0].parametrizations.weight[0].gate.detach().abs()
    assert int(perm["dead"].iloc[-1]) == int((gates <= 1e-3 * gates.max()).sum())
