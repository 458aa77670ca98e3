"""Sweep engine: vmapped copies against plain PyTorch loops, divergence, resume, store, bad input."""

import os
import signal
import sys
import time
import traceback

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mirrorsym as ms
from mirrorsym.sweep import rng
from mirrorsym.sweep.config import OPTIONS
from mirrorsym.sweep.engine import record_steps

N, D_IN, D_OUT = 48, 3, 2


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    Y = torch.randn(N, D_OUT, generator=g, dtype=torch.float64)
    return X, Y


def tanh_mlp(seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, D_OUT)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model


PROBES = torch.randn(3, 5 * D_IN + 5 + D_OUT * 5 + D_OUT, generator=torch.Generator().manual_seed(7),
                     dtype=torch.float64)


def projection(j):
    """A random linear functional of all parameters: a sharp check of the whole trajectory."""
    def metric(params, data):
        flat = torch.cat([params[k].reshape(-1) for k in ("0.weight", "0.bias", "2.weight", "2.bias")])
        return flat @ PROBES[j]
    return metric


METRICS = {"loss": "loss", **{f"proj{j}": projection(j) for j in range(3)}}


def plain_loop(config, X, Y, record_every=1):
    """An independent single-model loop: torch.optim.SGD with momentum and coupled weight decay.

    Minibatches come from the documented rng.batch_indices(seed, step, n, B); options add their
    documented terms to p.grad. Returns the metric histories keyed like the sweep's columns."""
    model = tanh_mlp(config["seed"])
    lam, sigma0, noise = config.get("weight_decay", 0.0), config.get("decay_to_offset_sigma", 0.0), \
        config.get("noise", 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config.get("momentum", 0.0),
                          weight_decay=0.0 if sigma0 else lam)
    params = list(model.parameters())
    anchors = [sigma0 * rng.gaussian(config["seed"], rng.OFFSET, 0, i, p.shape, torch.float64)
               for i, p in enumerate(params)]
    hist = {k: [] for k in METRICS}

    def record():
        with torch.no_grad():
            hist["loss"].append(nn.functional.mse_loss(model(X), Y).item())
            flat = torch.cat([p.reshape(-1) for p in params])
            for j in range(3):
                hist[f"proj{j}"].append((flat @ PROBES[j]).item())

    record()
    for t in range(config["steps"]):
        idx = rng.batch_indices(config["seed"], t, N, config["batch_size"],
                                replace=config.get("sampling", "with_replacement") == "with_replacement")
        opt.zero_grad()
        nn.functional.mse_loss(model(X[idx]), Y[idx]).backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                if sigma0:
                    p.grad += lam * (p - anchors[i])
                if noise:
                    p.grad += noise * rng.gaussian(config["seed"], rng.NOISE, t, i, p.shape, torch.float64)
        opt.step()
        if (t + 1) % record_every == 0 or t + 1 == config["steps"]:
            record()
    return hist


def make_sweep(grid, **kw):
    kw.setdefault("metrics", METRICS)
    kw.setdefault("record_every", 1)
    return ms.sweep.Sweep(tanh_mlp, nn.functional.mse_loss, make_data(), grid, **kw)


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame, exact=True):
    assert list(a["run_id"]) == list(b["run_id"])
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        for x, y in zip(a[col], b[col], strict=True):
            if isinstance(x, (np.ndarray, list)):
                x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
                if exact:
                    np.testing.assert_array_equal(x, y, err_msg=col)
                else:
                    np.testing.assert_allclose(x, y, rtol=0, atol=1e-12, err_msg=col)
            elif isinstance(x, float):
                assert (np.isnan(x) and np.isnan(y)) or (x == y if exact else abs(x - y) <= 1e-12), col
            else:
                assert x == y, col


# ---------------------------------------------------------------- trajectory against plain PyTorch
@pytest.mark.parametrize("options", [{}, {"noise": 0.3}, {"decay_to_offset_sigma": 0.7},
                                     {"sampling": "without_replacement"}])
def test_vmapped_copies_follow_plain_torch_sgd(tmp_path, options):
    momentum = [0.0, 0.9] if not options else 0.9
    grid = {"lr": [0.05, 0.2], "momentum": momentum, "weight_decay": [0.0, 0.03], "seed": [0, 3],
            "batch_size": 8, "steps": 15, **options}
    sweep = make_sweep(grid)
    df = sweep.run(tmp_path, chunk_size=16, progress=False, device="cpu")
    assert len(df) == len(sweep) and (df["status"] == "ok").all()
    for config, (_, row) in zip(sweep.configs, df.iterrows(), strict=True):
        ref = plain_loop(config, *make_data())
        assert list(row["history_step"]) == list(range(16))
        for name in METRICS:
            np.testing.assert_allclose(row[f"history_{name}"], ref[name], rtol=0, atol=1e-5, err_msg=name)
            assert row[name] == row[f"history_{name}"][-1]


def test_options_change_the_trajectory(tmp_path):
    """Guard against options being silently ignored: each one moves the final loss."""
    base = {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.05, "batch_size": 8, "steps": 20}
    df = make_sweep([base, {**base, "noise": 0.3}, {**base, "decay_to_offset_sigma": 0.7}]).run(
        tmp_path, progress=False)
    assert len(set(df["loss"])) == 3


def test_batch_sizes_are_grouped_and_full_batch_is_gd(tmp_path):
    grid = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "batch_size": [4, N, 8], "seed": [1, 2],
            "steps": 12}
    sweep = make_sweep(grid, record_every=5)
    chunks = ms.sweep.plan_chunks(sweep.configs, chunk_size=100)
    assert [sorted({c["batch_size"] for c in ch}) for ch in chunks] == [[4], [N], [8]]
    df = sweep.run(tmp_path, progress=False)
    assert list(df["history_step"][0]) == [0, 5, 10, 12]
    for config, (_, row) in zip(sweep.configs, df.iterrows(), strict=True):
        ref = plain_loop(config, *make_data(), record_every=5)
        np.testing.assert_allclose(row["history_loss"], ref["loss"], rtol=0, atol=1e-5)
    full = rng.batch_indices(torch.tensor([5, 9]), 3, N, N)
    assert torch.equal(full, torch.arange(N).expand(2, N))


# ---------------------------------------------------------------- counter-based randomness
def test_batch_indices_depend_only_on_seed_and_step():
    seeds = torch.tensor([0, 1, 2, 2**32 - 1])
    together = rng.batch_indices(seeds, 17, 1000, 64)
    alone = torch.stack([rng.batch_indices(int(s), 17, 1000, 64) for s in seeds])
    assert together.shape == (4, 64) and torch.equal(together, alone)
    assert together.min() >= 0 and together.max() < 1000
    assert not torch.equal(rng.batch_indices(0, 17, 1000, 64), rng.batch_indices(0, 18, 1000, 64))
    assert not torch.equal(together[0], together[1])
    counts = torch.bincount(rng.batch_indices(torch.arange(200), 0, 10, 500).reshape(-1), minlength=10)
    chi2 = (((counts - 10_000) ** 2) / 10_000).sum().item()
    assert chi2 < 40  # 9 degrees of freedom: p < 1e-5 for a fair sampler


def test_gaussian_is_standard_normal_and_reproducible():
    z = rng.gaussian(torch.tensor([3, 4]), rng.NOISE, 5, 1, (50_000,), torch.float64)
    assert z.shape == (2, 50_000)
    assert torch.equal(z[1], rng.gaussian(4, rng.NOISE, 5, 1, (50_000,), torch.float64))
    for row in z:
        assert abs(row.mean().item()) < 0.02 and abs(row.std().item() - 1) < 0.02
    assert abs(torch.corrcoef(z)[0, 1].item()) < 0.02
    assert not torch.equal(z[0], rng.gaussian(3, rng.NOISE, 5, 2, (50_000,), torch.float64))



def test_gaussian_block_is_box_muller_of_the_documented_words():
    """The normals are √(−2 log u₁) cos(2π u₂) of u = (w + ½)/2³² for the first and second halves of the
    2n words of (seed, purpose, step, stream), evaluated here out of place in numpy (independent of the
    library's in-place evaluation), for a block of steps and for one step."""
    seeds, n, step0, count = torch.tensor([3, 0, 2**32 - 1]), 6, 9, 4
    block = rng.Streams(seeds).gaussian_block(rng.RANDOM_INPUTS, step0, count, 2, (2, 3), torch.float64)
    for t in range(count):
        w = rng.words(rng.step_key(rng.seed_key(seeds, rng.RANDOM_INPUTS), step0 + t, 2), 2 * n).numpy()
        u = (w.astype(np.float64) + 0.5) / 2.0**32
        z = np.sqrt(-2.0 * np.log(u[:, :n])) * np.cos(2.0 * np.pi * u[:, n:])
        np.testing.assert_allclose(block[t].reshape(3, n).numpy(), z, rtol=1e-13, atol=1e-14)
        one = rng.gaussian(seeds, rng.RANDOM_INPUTS, step0 + t, 2, (2, 3), torch.float64)
        assert torch.equal(one, block[t])

# ---------------------------------------------------------------- divergence
def test_diverged_copy_is_recorded_and_frozen_without_touching_the_others(tmp_path):
    grid = {"lr": [0.05, 3000.0, 0.2], "momentum": 0.9, "weight_decay": 0.01, "batch_size": 8, "steps": 45}
    sweep = make_sweep(grid)
    df = sweep.run(tmp_path / "together", chunk_size=3, progress=False)
    assert list(df["status"]) == ["ok", "diverged", "ok"]
    bad = df.iloc[1]
    d = int(bad["diverged_step"])
    assert 0 <= d < 45 and np.isnan(bad["loss"])
    hist = np.asarray(bad["history_loss"])
    assert np.isnan(hist[d + 1:]).all()
    ref = np.asarray(plain_loop(sweep.configs[1], *make_data())["loss"])
    assert np.isfinite(ref[:d]).all() and not np.isfinite(ref[d:d + 2]).all()
    np.testing.assert_allclose(hist[:d], ref[:d], rtol=1e-9)
    healthy = df.iloc[[0, 2]].reset_index(drop=True)
    without_bad = make_sweep({**grid, "lr": [0.05, 0.2]}).run(tmp_path / "without", progress=False)
    # vmapped matmuls may block differently for another K: equal up to round-off, not bit for bit
    assert_same_rows(healthy, without_bad, exact=False)
    alone = [make_sweep({**grid, "lr": lr}).run(tmp_path / f"alone{lr}", progress=False)
             for lr in (0.05, 0.2)]
    assert_same_rows(healthy, pd.concat(alone, ignore_index=True), exact=False)


# ---------------------------------------------------------------- store and resume
def test_rerun_skips_finished_runs_and_store_roundtrips(tmp_path):
    calls = []

    def counting_factory(seed):
        calls.append(seed)
        return tanh_mlp(seed)

    grid = {"lr": [0.1, 0.2], "seed": [0, 1], "batch_size": 8, "steps": 5}
    sweep = ms.sweep.Sweep(counting_factory, nn.functional.mse_loss, make_data(), grid, metrics=METRICS)
    first = sweep.run(tmp_path, chunk_size=3, progress=False)
    assert len(calls) == 1 + 1 + 4  # the fingerprint's initial state, the one-step trial, one build per copy
    calls.clear()
    second = sweep.run(tmp_path, chunk_size=3, progress=False)
    assert calls == [0]  # only the fingerprint's build: nothing is trained
    assert_same_rows(first, second)
    loaded = ms.sweep.load_results(tmp_path)
    assert sorted(loaded["run_id"]) == sorted(first["run_id"]) and loaded["run_id"].is_unique
    assert len(list((tmp_path / "runs").glob("chunk-*.parquet"))) == 2
    assert list(first["run_id"]) == sweep.run_ids
    assert sweep.run_ids == [ms.sweep.run_id(f"sweep#{sweep.fingerprint()['id']}", c) for c in sweep.configs]

    bigger = ms.sweep.Sweep(counting_factory, nn.functional.mse_loss, make_data(),
                            {**grid, "seed": [0, 1, 2]}, metrics=METRICS)
    calls.clear()
    third = bigger.run(tmp_path, chunk_size=3, progress=False)
    assert len(third) == 6 and len(calls) == 1 + 1 + 2  # only the two new seeds are trained
    with pytest.raises(ValueError, match="different sweep"):
        make_sweep(grid, metrics={"loss": "loss"}).run(tmp_path, progress=False)


def slow_factory(seed):
    time.sleep(0.3)  # slow enough that a kill lands between chunks
    return tanh_mlp(seed)


def interruptible_sweep():
    grid = {"lr": [0.05, 0.1, 0.2], "seed": [0, 1], "momentum": 0.9, "batch_size": 8, "steps": 30}
    return ms.sweep.Sweep(slow_factory, nn.functional.mse_loss, make_data(), grid, metrics=METRICS, record_every=7)


def fork_sweep(out_dir, progress=False, stderr=None) -> int:
    """Run the sweep in a forked child (torch already imported: no interpreter start-up); its stderr goes
    to the file ``stderr``. Returns the child's pid; it exits 0 on success, 1 on any exception."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if stderr is not None:
                sys.stderr = open(stderr, "w", buffering=1)  # closed by os._exit
            interruptible_sweep().run(out_dir, chunk_size=2, progress=progress, device="cpu")
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait_for_first_chunk(pid, out_dir):
    deadline = time.time() + 60
    while time.time() < deadline and not list((out_dir / "runs").glob("chunk-*.parquet")):
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child finished or crashed before its first chunk"
        time.sleep(0.01)


def exit_code(pid) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.mark.slow
def test_resume_after_kill_9_loses_and_duplicates_nothing(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    reference = interruptible_sweep().run(clean, chunk_size=2, progress=False, device="cpu")
    pid = fork_sweep(killed)
    wait_for_first_chunk(pid, killed)
    os.kill(pid, signal.SIGKILL)
    assert exit_code(pid) == -signal.SIGKILL
    written = len(list((killed / "runs").glob("chunk-*.parquet")))
    assert 1 <= written < 3, f"kill landed after {written} of 3 chunks: the test did not interrupt the sweep"
    assert exit_code(fork_sweep(killed)) == 0  # the resumed run, in another process
    resumed = ms.sweep.load_results(killed)
    assert len(resumed) == 6 and resumed["run_id"].is_unique
    assert_same_rows(resumed, reference.sort_values("run_id").reset_index(drop=True))
    assert not list((killed / "runs").glob(".*"))


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_finished_chunks_saved(tmp_path):
    out, err = tmp_path / "interrupted", tmp_path / "stderr.txt"
    pid = fork_sweep(out, progress=True, stderr=err)
    wait_for_first_chunk(pid, out)
    os.kill(pid, signal.SIGINT)
    assert exit_code(pid) != 0 and "sweep interrupted" in err.read_text()
    files = list((out / "runs").glob("chunk-*.parquet"))
    assert 1 <= len(files) < 3 and not list((out / "runs").glob(".*"))
    rows = ms.sweep.load_results(out)
    assert len(rows) == 2 * len(files) and rows["run_id"].is_unique and (rows["status"] == "ok").all()


# ---------------------------------------------------------------- option hook
def test_registered_option_transforms_the_model_and_keeps_old_ids(tmp_path):
    base = {"lr": 0.1, "batch_size": 8, "steps": 3}
    before = ms.sweep.run_id("s", ms.sweep.expand_grid(base)[0])

    def scale(module, factor, config):
        assert config["lr"] == 0.1
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(factor)
        return module

    ms.sweep.register_option("init_scale", 1.0, lambda v: None if v > 0 else "must be > 0",
                             transform_model=scale)
    try:
        assert ms.sweep.run_id("s", ms.sweep.expand_grid(base)[0]) == before
        df = make_sweep({**base, "init_scale": [1.0, 0.0001]}).run(tmp_path, progress=False)
        assert df["proj0"][1] != df["proj0"][0] and abs(df["history_proj0"][1][0]) < 1e-3
        with pytest.raises(ValueError, match="init_scale"):
            make_sweep({**base, "init_scale": -1.0})
    finally:
        OPTIONS.pop("init_scale")


# ---------------------------------------------------------------- bad input, before any work
GOOD = {"lr": 0.1, "batch_size": 8, "steps": 3}


@pytest.mark.parametrize("grid, error, match", [
    ({}, ValueError, "must set 'lr'"),
    ([], ValueError, "grid is empty"),
    ({**GOOD, "lr": []}, ValueError, "is empty"),
    ({**GOOD, "lr": 0.0}, ValueError, "lr"),
    ({**GOOD, "lr": [0.1, -1.0]}, ValueError, "lr"),
    ({**GOOD, "batch_size": 0}, ValueError, "batch_size"),
    ({**GOOD, "batch_size": N + 1}, ValueError, "larger than the data"),
    ({**GOOD, "batch_size": 2.5}, TypeError, "batch_size"),
    ({**GOOD, "momentum": 1.0}, ValueError, "momentum"),
    ({**GOOD, "seed": -1}, ValueError, "seed"),
    ({**GOOD, "steps": 0}, ValueError, "steps"),
    ({**GOOD, "lr": float("nan")}, ValueError, "not finite"),
    ({**GOOD, "dropout": 0.1}, ValueError, "unknown grid option"),
    ({**GOOD, "seed": [1, 1]}, ValueError, "repeats a config"),
])
def test_bad_grids_fail_before_any_work(grid, error, match):
    with pytest.raises(error, match=match):
        make_sweep(grid)


def test_bad_arguments_fail_before_any_work(tmp_path):
    X, Y = make_data()
    with pytest.raises(ValueError, match="same non-zero length"):
        ms.sweep.Sweep(tanh_mlp, nn.functional.mse_loss, (X, Y[:-1]), GOOD)
    with pytest.raises(ValueError, match="unknown built-in metric"):
        make_sweep(GOOD, metrics={"loss": "perplexity"})
    with pytest.raises(ValueError, match="clash"):
        make_sweep(GOOD, metrics={"lr": "loss"})
    with pytest.raises(ValueError, match="backend"):
        make_sweep(GOOD).run(tmp_path / "a", backend="slurm")
    with pytest.raises(ValueError, match="chunk_size"):
        make_sweep(GOOD).run(tmp_path / "b", chunk_size=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    broken = ms.sweep.Sweep(lambda seed: nn.Linear(5, 2).double(), nn.functional.mse_loss, (X, Y), GOOD)
    with pytest.raises(RuntimeError, match="one-step trial"):
        broken.run(tmp_path / "c", progress=False)
    assert not list((tmp_path / "c" / "runs").glob("chunk-*"))


def test_record_schedule_and_accuracy_metric(tmp_path):
    assert record_steps(10, 4) == [0, 4, 8, 10] and record_steps(8, 4) == [0, 4, 8]
    X, _ = make_data()
    labels = (X[:, 0] > 0).long()
    sweep = ms.sweep.Sweep(lambda s: tanh_mlp(s), nn.functional.cross_entropy, (X, labels),
                           {"lr": 0.5, "batch_size": 16, "steps": 40}, metrics={"acc": "accuracy"})
    df = sweep.run(tmp_path, progress=False)
    model = tanh_mlp(0)
    acc0 = (model(X).argmax(-1) == labels).double().mean().item()
    assert df["history_acc"][0][0] == pytest.approx(acc0) and df["acc"][0] > 0.8


# ---------------------------------------------------------------- traced blocks, refusals, store URLs
def test_traced_blocks_equal_eager_steps_and_freeze_at_the_same_step(tmp_path, monkeypatch):
    """Long blocks (few records) run traced and check divergence once per block; the replay freezes a
    diverging copy at the very step the eager per-step path does, and the other copies are unaffected."""
    grid = {"lr": [0.05, 3000.0, 0.2], "momentum": 0.9, "weight_decay": 0.01, "batch_size": 8, "steps": 60,
            "noise": [0.0, 0.1]}
    monkeypatch.setattr(ms.sweep.engine, "TRACE_MIN_STEPS", 0)
    traced = make_sweep(grid, record_every=20).run(tmp_path / "traced", progress=False)
    monkeypatch.setattr(ms.sweep.engine, "TRACE_MIN_STEPS", 10**9)
    eager = make_sweep(grid, record_every=1).run(tmp_path / "eager", progress=False)
    assert list(traced["status"]) == list(eager["status"]) and (traced["status"] == "diverged").sum() == 2
    assert list(traced["diverged_step"]) == list(eager["diverged_step"])
    for (_, a), (_, b) in zip(traced.iterrows(), eager.iterrows(), strict=True):
        assert list(a["history_step"]) == [0, 20, 40, 60]
        for name in METRICS:
            np.testing.assert_allclose(a[f"history_{name}"], np.asarray(b[f"history_{name}"])[[0, 20, 40, 60]],
                                       rtol=0, atol=1e-12)


def test_minibatches_without_replacement_are_uniform_subsets():
    seeds = torch.tensor([3, 0, 2**32 - 1])
    streams = rng.Streams(seeds)
    whole = streams.batch_indices_block(5, 30, 11, 4, replace=False)
    alone = torch.stack([torch.stack([rng.batch_indices(int(s), t, 11, 4, replace=False) for t in range(5, 35)])
                         for s in seeds], dim=1)
    assert torch.equal(whole, alone)  # the host-side block = the per-step function, bit for bit
    assert all(len(set(b.tolist())) == 4 for b in whole.reshape(-1, 4))  # no repeats inside a batch
    # n = 4, B = 2: each of the 6 subsets equally likely (chi-square over 6000 draws)
    draws = rng.Streams(7).batch_indices_block(0, 6000, 4, 2, replace=False)
    subsets = [tuple(sorted(b)) for b in draws.tolist()]
    counts = np.array([subsets.count(c) for c in sorted(set(subsets))])
    assert len(counts) == 6
    from scipy.stats import chisquare

    assert chisquare(counts).pvalue > 1e-4


def test_minibatch_blocks_do_not_depend_on_grouping():
    streams = rng.Streams(torch.tensor([3, 0, 2**32 - 1]))
    whole = streams.batch_indices_block(5, 30, 97, 7)
    parts = torch.cat([streams.batch_indices_block(a, b - a, 97, 7) for a, b in [(5, 6), (6, 21), (21, 35)]])
    alone = torch.stack([torch.stack([rng.batch_indices(s, t, 97, 7) for t in range(5, 35)])
                         for s in (3, 0, 2**32 - 1)], dim=1)
    assert torch.equal(whole, parts) and torch.equal(whole, alone)
    z = streams.gaussian_block(rng.NOISE, 4, 3, 1, (2, 5), torch.float64)
    assert torch.equal(z[2], rng.gaussian(torch.tensor([3, 0, 2**32 - 1]), rng.NOISE, 6, 1, (2, 5), torch.float64))


class BNNet(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.fc = nn.Linear(D_IN, 4).double()
        self.bn = nn.BatchNorm1d(4).double()
        self.out = nn.Linear(4, D_OUT).double()
        self.drop = nn.Dropout(0.2 if mode == "dropout" else 0.0)
        if mode in ("bn eval", "dropout"):
            self.bn.eval()

    def forward(self, x):
        return self.out(self.drop(self.bn(self.fc(x))))


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_IN, D_OUT).double()

    def forward(self, x):
        return nn.functional.dropout(self.fc(x), 0.1, training=True)


@pytest.mark.parametrize("factory, match", [
    (lambda seed: BNNet("bn train"), r"'bn' \(BatchNorm1d\).*train mode.*eval\(\)"),
    (lambda seed: BNNet("dropout"), r"'drop' \(Dropout\).*dropout.*p=0"),
    (lambda seed: nn.Sequential(nn.MultiheadAttention(4, 2, dropout=0.1)), r"MultiheadAttention.*dropout"),
    (lambda seed: FunctionalDropout(), r"draws random numbers.*dropout"),
])
def test_what_vmapped_copies_cannot_train_is_refused_by_name(tmp_path, factory, match):
    sweep = ms.sweep.Sweep(factory, nn.functional.mse_loss, make_data(), GOOD)
    with pytest.raises(ms.sweep.UnsupportedModel, match=match):
        sweep.run(tmp_path, progress=False)
    assert not list((tmp_path / "runs").glob("chunk-*"))


def test_eval_mode_batchnorm_trains_with_fixed_statistics(tmp_path):
    torch.manual_seed(0)
    sweep = ms.sweep.Sweep(lambda seed: BNNet("bn eval"), nn.functional.mse_loss, make_data(),
                           {"lr": 0.05, "batch_size": 8, "steps": 40, "seed": [0, 1]})
    df = sweep.run(tmp_path, progress=False)
    assert (df["status"] == "ok").all() and df["history_loss"][0][-1] < df["history_loss"][0][0]


def test_a_finished_sweep_says_so_instead_of_an_empty_progress_bar(tmp_path, capfd):
    sweep = make_sweep({**GOOD, "seed": [0, 1]})
    sweep.run(tmp_path, progress=False)
    capfd.readouterr()
    sweep.run(tmp_path, progress=True)
    err = capfd.readouterr().err
    assert "all 2 runs already stored" in err and "0/0" not in err and "%" not in err


def test_store_at_a_file_url_is_the_local_store(tmp_path):
    url = (tmp_path / "by url").as_uri()  # file:///.../by%20url
    sweep = make_sweep({**GOOD, "seed": [0, 1, 2]})
    first = sweep.run(url, chunk_size=2, progress=False)
    assert len(list((tmp_path / "by url" / "runs").glob("chunk-*.parquet"))) == 2
    assert_same_rows(sweep.run(str(tmp_path / "by url"), chunk_size=2, progress=False), first)  # resumed
    assert_same_rows(ms.sweep.load_results(url), first.sort_values("run_id").reset_index(drop=True))


def test_store_on_an_fsspec_filesystem_resumes_and_heals(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://mirrorsym-test/{tmp_path.name}"
    sweep = make_sweep({**GOOD, "seed": [0, 1, 2]})
    first = sweep.run(url, chunk_size=2, progress=False)
    fs = fsspec.filesystem("memory")
    chunks = sorted(p for p in fs.ls(f"/mirrorsym-test/{tmp_path.name}/runs", detail=False) if p.endswith(".parquet"))
    assert len(chunks) == 2
    with pytest.warns(UserWarning, match="damaged.*moved it aside"):
        fs.pipe(chunks[0], fs.cat(chunks[0])[:-8] + b"garbage!")
        healed = sweep.run(url, chunk_size=2, progress=False)
    assert_same_rows(healed, first)
    assert_same_rows(ms.sweep.load_results(url), first.sort_values("run_id").reset_index(drop=True))
    fs.rm(f"/mirrorsym-test/{tmp_path.name}", recursive=True)


def test_chunks_are_cut_for_the_workers():
    configs = ms.sweep.expand_grid({"lr": 0.1, "seed": list(range(60)), "batch_size": 8, "steps": 3})
    assert [len(c) for c in ms.sweep.plan_chunks(configs, 128)] == [60]
    assert [len(c) for c in ms.sweep.plan_chunks(configs, 128, workers=2)] == [30, 30]
    assert [len(c) for c in ms.sweep.plan_chunks(configs, 16, workers=3)] == [16, 16, 16, 12]  # as local
    assert [len(c) for c in ms.sweep.plan_chunks(configs[:5], 2, workers=4)] == [2, 1, 1, 1]
    assert [c["seed"] for ch in ms.sweep.plan_chunks(configs, 7, workers=5) for c in ch] == list(range(60))


def test_untraceable_or_uncompilable_steps_fall_back_with_a_warning(tmp_path, monkeypatch):
    import torch.fx.experimental.proxy_tensor as proxy_tensor

    grid = {"lr": [0.05, 0.2], "momentum": 0.9, "batch_size": 8, "steps": 40}
    reference = make_sweep(grid, record_every=10).run(tmp_path / "traced", progress=False)

    def no_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", no_compile)
    with pytest.warns(UserWarning, match="torch.compile of the training step failed.*no C.. compiler"):
        compiled = make_sweep(grid, record_every=10).run(tmp_path / "compiled", progress=False, compile=True)
    assert_same_rows(compiled, reference)  # the traced step, uncompiled

    def no_trace(fn, *args, **kwargs):
        raise NotImplementedError("an op the tracer does not know")

    monkeypatch.setattr(proxy_tensor, "make_fx", no_trace)
    with pytest.warns(UserWarning, match="could not trace the training step.*running it eagerly"):
        eager = make_sweep(grid, record_every=10).run(tmp_path / "eager", progress=False)
    assert_same_rows(eager, reference, exact=False)


def test_keep_params_stores_each_runs_trained_parameters(tmp_path):
    """The final parameters of every run equal the plain torch loop's, survive the store (a resumed
    run reads them back) and are refused with a clear error when not kept."""
    grid = {"lr": [0.05, 0.2], "momentum": 0.9, "weight_decay": 0.01, "seed": [0, 3], "batch_size": 8, "steps": 12}
    sweep = make_sweep(grid, keep_params=True)
    df = sweep.run(tmp_path, chunk_size=16, progress=False, device="cpu")
    for config, (_, row) in zip(sweep.configs, df.iterrows(), strict=True):
        model = tanh_mlp(config["seed"])
        opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=0.01)
        X, Y = make_data()
        for t in range(12):
            idx = rng.batch_indices(config["seed"], t, N, 8)
            opt.zero_grad()
            nn.functional.mse_loss(model(X[idx]), Y[idx]).backward()
            opt.step()
        got = ms.sweep.final_params(row)
        assert list(got) == [n for n, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            assert got[name].dtype == p.dtype and got[name].shape == p.shape
            torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=1e-10)
    again = ms.sweep.load_results(tmp_path)
    assert all(torch.equal(ms.sweep.final_params(a)["0.weight"], ms.sweep.final_params(b)["0.weight"])
               for (_, a), (_, b) in zip(again.iterrows(), df.sort_values("run_id").iterrows(), strict=True))
    plain = make_sweep(grid).run(tmp_path / "plain", chunk_size=16, progress=False, device="cpu")
    with pytest.raises(KeyError, match="keep_params=True"):
        ms.sweep.final_params(plain.iloc[0])
