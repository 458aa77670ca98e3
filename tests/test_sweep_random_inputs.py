"""``Sweep(random_inputs=k)``: the forward gets k per-run N(0, 1) tensors shaped like the minibatch input.

Checked against independent references: a hand-written torch.optim loop that draws the documented
``rng.gaussian(seed, RANDOM_INPUTS, step, j, x_B.shape)`` (and the library's ``train_plain``), chunking
independence, the actual values the traced engine fed to the model (read back from an SGD step whose
gradient *is* ε), their distribution, and the run identity.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import mirrorsym as ms
from mirrorsym.sweep import rng
from mirrorsym.sweep.engine import TRACE_MIN_STEPS

N, D_IN, D_OUT = 40, 3, 2


def make_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randn(N, D_OUT, generator=g,
                                                                                 dtype=torch.float64)


class NoisyMLP(nn.Module):
    """Additive input noise 0.1·ε₀ and a dropout-like input mask (ε₁ > 0, kept features scaled by 2);
    without ε (metrics) the clean input."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(D_IN, 6).double(), nn.Linear(6, D_OUT).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x, *eps):
        if eps:
            x = (x + 0.1 * eps[0]) * (eps[1] > 0).to(x.dtype) * 2.0
        return self.l2(torch.tanh(self.l1(x)))


def proj(params, data):
    flat = torch.cat([params[k].reshape(-1) for k in ("l1.weight", "l1.bias", "l2.weight", "l2.bias")])
    return flat @ torch.linspace(-1.0, 1.0, flat.numel(), dtype=flat.dtype)


METRICS = {"loss": "loss", "proj": proj}


def make_sweep(grid, k=2, **kw):
    return ms.sweep.Sweep(NoisyMLP, nn.functional.mse_loss, make_data(), grid, metrics=METRICS, record_every=1,
                          random_inputs=k, **kw)


def hand_loop(config):
    """Independent reference: one model, torch.optim.SGD, the documented minibatches and random inputs."""
    X, Y = make_data()
    model = NoisyMLP(config["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"])
    hist = {"loss": [], "proj": []}

    def record():
        with torch.no_grad():
            hist["loss"].append(nn.functional.mse_loss(model(X), Y).item())
            hist["proj"].append(proj(dict(model.named_parameters()), None).item())

    record()
    for t in range(config["steps"]):
        idx = rng.batch_indices(config["seed"], t, N, config["batch_size"])
        e0 = rng.gaussian(config["seed"], rng.RANDOM_INPUTS, t, 0, (config["batch_size"], D_IN), torch.float64)
        e1 = rng.gaussian(config["seed"], rng.RANDOM_INPUTS, t, 1, (config["batch_size"], D_IN), torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(X[idx], e0, e1), Y[idx]).backward()
        opt.step()
        record()
    return hist


GRID = {"lr": [0.05, 0.2], "momentum": 0.9, "weight_decay": [0.0, 0.03], "seed": [0, 5], "batch_size": 8}


@pytest.mark.parametrize("steps", [12, TRACE_MIN_STEPS + 8])  # eager and traced step
def test_engine_equals_the_plain_loop_on_the_same_random_inputs(tmp_path, steps):
    sweep = make_sweep({**GRID, "steps": steps})
    df = sweep.run(tmp_path, chunk_size=16, progress=False, device="cpu")
    assert (df["status"] == "ok").all()
    for config, (_, row) in zip(sweep.configs, df.iterrows(), strict=True):
        ref = hand_loop(config)
        plain = ms.sweep.train_plain(sweep.problem, config)
        for name in METRICS:
            np.testing.assert_allclose(row[f"history_{name}"], ref[name], rtol=0, atol=1e-9, err_msg=name)
            np.testing.assert_allclose(row[f"history_{name}"], plain[f"history_{name}"], rtol=0, atol=1e-9)
    # the random inputs matter: without them (k = 0, clean inputs) the trajectory is another one
    clean = make_sweep({**GRID, "steps": steps}, k=0).run(tmp_path / "clean", progress=False, device="cpu")
    assert np.abs(np.asarray(clean["proj"]) - np.asarray(df["proj"])).max() > 1e-3


def test_rows_do_not_depend_on_the_chunking(tmp_path):
    grid = {**GRID, "steps": TRACE_MIN_STEPS + 4}
    one = make_sweep(grid).run(tmp_path / "one", chunk_size=1, progress=False, device="cpu")
    all_ = make_sweep(grid).run(tmp_path / "all", chunk_size=64, progress=False, device="cpu")
    assert list(one["run_id"]) == list(all_["run_id"])
    for col in ("history_loss", "history_proj"):
        for a, b in zip(one[col], all_[col], strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


class ReadOut(nn.Module):
    """loss = Σ w ⊙ ε₀ (+ 0·Σ w ⊙ ε₁ ...): the gradient w.r.t. w is ε₀ itself, so one SGD step with lr 1 and
    w₀ = 0 leaves w = −ε₀, the random input the engine actually fed to this copy."""

    def __init__(self, seed: int, shape=(N, D_IN), which=0):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        self.which = which

    def forward(self, x, *eps):
        return (self.w * (eps[self.which] if eps else x)).sum()


def _fed(seeds, which=0, k=2, tmp=None):
    data = torch.zeros(N, D_IN, dtype=torch.float64)
    sweep = ms.sweep.Sweep(lambda seed: ReadOut(seed, which=which), lambda out: out, (data,),
                           {"lr": 1.0, "seed": list(seeds), "batch_size": N, "steps": 1}, metrics={},
                           keep_params=True, random_inputs=k)
    df = sweep.run(tmp, chunk_size=64, progress=False, device="cpu")
    return [-ms.sweep.final_params(row)["w"] for _, row in df.iterrows()]


def test_engine_feeds_the_documented_standard_normals(tmp_path):
    seeds = list(range(12))
    eps0 = _fed(seeds, 0, tmp=tmp_path / "a")
    eps1 = _fed(seeds, 1, tmp=tmp_path / "b")
    for s, e0, e1 in zip(seeds, eps0, eps1, strict=True):  # the documented key (seed, RANDOM_INPUTS, t, j)
        assert torch.equal(e0, rng.gaussian(s, rng.RANDOM_INPUTS, 0, 0, (N, D_IN), torch.float64))
        assert torch.equal(e1, rng.gaussian(s, rng.RANDOM_INPUTS, 0, 1, (N, D_IN), torch.float64))
        assert not torch.allclose(e0, e1)  # streams j differ
    for a in range(len(seeds)):  # seeds differ
        for b in range(a + 1, len(seeds)):
            assert (eps0[a] - eps0[b]).abs().max() > 0.5
    z = torch.cat([e.reshape(-1) for e in eps0 + eps1])  # 2 × 12 × 120 draws
    m = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(m)
    assert abs(float(z.std()) - 1.0) < 4 / math.sqrt(2 * m)
    assert abs(float((z.abs() < 1).double().mean()) - 0.6827) < 4 * math.sqrt(0.6827 * 0.3173 / m)
    corr = float((eps0[0].reshape(-1) * eps0[1].reshape(-1)).mean())
    assert abs(corr) < 4 / math.sqrt(N * D_IN)


def test_random_inputs_are_not_the_gradient_noise_or_other_steps():
    a = rng.gaussian(3, rng.RANDOM_INPUTS, 0, 0, (500,), torch.float64)
    assert rng.RANDOM_INPUTS not in (rng.INDICES, rng.NOISE, rng.OFFSET)
    assert not torch.allclose(a, rng.gaussian(3, rng.NOISE, 0, 0, (500,), torch.float64))
    assert not torch.allclose(a, rng.gaussian(3, rng.RANDOM_INPUTS, 1, 0, (500,), torch.float64))
    block = rng.Streams(torch.tensor([3, 4])).gaussian_block(rng.RANDOM_INPUTS, 0, 2, 0, (500,), torch.float64)
    assert torch.equal(block[0, 0], a)


def test_k_enters_the_fingerprint_and_run_ids(tmp_path):
    grid = {**GRID, "steps": 3}
    ids = {k: make_sweep(grid, k=k).run_ids for k in (2, 3)}
    assert not set(ids[2]) & set(ids[3])
    assert make_sweep(grid, k=2).fingerprint()["parts"]["random_inputs"] == "2"
    make_sweep(grid, k=2).run(tmp_path, progress=False, device="cpu")
    with pytest.warns(UserWarning, match="random_inputs changed"):
        df = make_sweep(grid, k=3).run(tmp_path, progress=False, device="cpu")
    assert list(df["run_id"]) == ids[3]
    with pytest.raises(ValueError, match="random_inputs"):
        make_sweep(grid, k=-1)


def test_models_that_draw_their_own_randomness_are_still_refused(tmp_path):
    class Dropout(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.l = nn.Linear(D_IN, D_OUT).double()

        def forward(self, x, *eps):
            return nn.functional.dropout(self.l(x), 0.5, training=True)

    sweep = ms.sweep.Sweep(Dropout, nn.functional.mse_loss, make_data(), {**GRID, "steps": 3}, random_inputs=1)
    with pytest.raises(ms.sweep.UnsupportedModel, match="random_inputs"):
        sweep.run(tmp_path, progress=False, device="cpu")
