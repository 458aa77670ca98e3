"""Fault injection on the results stores: kill -9 at random moments, damaged files of every kind, changed
inputs, two processes on one sweep directory, ``--fresh`` and the reproduction cache key."""

import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import mirrorsym as ms
import mirrorsym.report.runner as runner
from mirrorsym.experiments import Claim
from mirrorsym.sweep import backends
from mirrorsym.sweep.store import ResultStore

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import assert_same_rows  # noqa: E402

N = 32
GRID = {"lr": [0.05, 0.2], "seed": [0, 1, 2], "momentum": 0.9, "batch_size": 8, "steps": 12}


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randn(N, 2, generator=g, dtype=torch.float64)


def mlp(seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return model


def make(factory=mlp, loss=nn.functional.mse_loss, xy=None):
    return ms.sweep.Sweep(factory, loss, data() if xy is None else xy, GRID, record_every=4)


def run(sweep, out, **kw):
    return sweep.run(out, chunk_size=2, progress=False, device="cpu", **kw)


@contextmanager
def quietly():
    """Any warning fails the test: a healthy store is read without complaint."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def by_id(df):
    """Rows in run_id order, as load_results returns them."""
    return df.sort_values("run_id", kind="stable").reset_index(drop=True)


def store_files(out: Path) -> set[str]:
    return {p.name for p in (out / "runs").iterdir()}


def assert_tidy(out: Path) -> None:
    """Only chunk files and their checksums: no temporaries, claims, orphans or damaged files."""
    names = store_files(out)
    chunks = {n for n in names if n.endswith(".parquet")}
    assert names == chunks | {n + ".sha256" for n in chunks}, sorted(names)


# ---------------------------------------------------------------- (a) kill -9 at random moments
def slow(seed):
    time.sleep(0.05)  # slow enough that kills land inside the sweep, not only before or after it
    return mlp(seed)


def slow_sweep():
    grid = {**GRID, "lr": [0.05, 0.1, 0.2], "steps": 40}
    return ms.sweep.Sweep(slow, nn.functional.mse_loss, data(), grid, record_every=5)


def fork(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child (torch already imported and warm: no interpreter start-up)
    that exits with 0 on success, 1 on an exception; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid) -> int:
    """The child's exit code, or -signal if a signal ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path):
    sweep = slow_sweep()
    clean = run(sweep, tmp_path / "clean")  # uninterrupted (and torch warmed up before forking)
    out, rnd, longest, progress = tmp_path / "killed", random.Random(12), 0.4, []
    while len(progress) < 6 or not any(0 < n < 5 for n in progress):
        assert len(progress) < 15, f"no kill landed mid-sweep: chunks stored after each kill {progress}"
        pid = fork(run, sweep, out)
        time.sleep(rnd.uniform(0.0, longest))
        os.kill(pid, signal.SIGKILL)
        if wait(pid) != -signal.SIGKILL:
            break  # this child finished the sweep before its kill
        chunks = len(list((out / "runs").glob("chunk-*.parquet")))
        if chunks == (progress or [0])[-1]:
            longest *= 1.5  # a busy machine: give the next child more time to get somewhere
        progress.append(chunks)
    assert any(0 < n < 5 for n in progress), f"no kill landed mid-sweep: chunks stored after each kill {progress}"
    with quietly():  # atomic writes: nothing damaged to report, no other inputs
        resumed = run(sweep, out)
    assert_same_rows(resumed, clean)
    assert_same_rows(ms.sweep.load_results(out), by_id(clean))
    assert_tidy(out)


# ---------------------------------------------------------------- (b) damaged files of every kind
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


CHUNK_DAMAGE = {
    "truncated chunk": lambda chunk: truncate(chunk),
    "flipped bytes": lambda chunk: flip(chunk),
    "deleted checksum": lambda chunk: chunk.with_name(chunk.name + ".sha256").unlink(),
    "garbled checksum": lambda chunk: truncate(chunk.with_name(chunk.name + ".sha256")),
    "chunk replaced by another": lambda chunk: shutil.copy(
        next(p for p in chunk.parent.glob("chunk-*.parquet") if p != chunk), chunk),
}


@pytest.mark.parametrize("damage", list(CHUNK_DAMAGE))
def test_a_damaged_chunk_is_reported_moved_aside_and_recomputed(tmp_path, damage):
    calls = []

    def counting(seed):
        calls.append(seed)
        return mlp(seed)

    sweep = make(counting)
    clean = run(sweep, tmp_path)
    chunk = sorted((tmp_path / "runs").glob("chunk-*.parquet"))[1]
    CHUNK_DAMAGE[damage](chunk)
    calls.clear()
    with pytest.warns(UserWarning, match=re.escape(str(chunk)) + ".*damaged.*moved it aside"):
        healed = run(sweep, tmp_path)
    assert_same_rows(healed, clean)
    assert len(calls) == 1 + 1 + 2  # fingerprint, trial, and the two runs of the damaged chunk only
    assert (chunk.parent / (chunk.name + ".corrupt")).exists()
    with quietly():
        assert_same_rows(run(sweep, tmp_path), clean)
        assert_same_rows(ms.sweep.load_results(tmp_path), by_id(clean))


@pytest.mark.parametrize("damage", [truncate, flip, lambda p: p.write_text("[1, 2]")])
def test_a_damaged_sweep_json_is_reported_moved_aside_and_rewritten(tmp_path, damage):
    sweep = make()
    clean = run(sweep, tmp_path)
    meta = tmp_path / "sweep.json"
    damage(meta)
    with pytest.raises(ValueError, match=re.escape(str(meta)) + ".*damaged"):
        ms.sweep.load_results(tmp_path)  # reading alone does not rewrite: it says what to do
    with pytest.warns(UserWarning, match=re.escape(str(meta)) + ".*damaged") as record:
        healed = run(sweep, tmp_path)
    assert len(record) == 1  # the chunks vouch for themselves: nothing else to report or retrain
    assert_same_rows(healed, clean)
    assert (tmp_path / "sweep.json.corrupt").exists()
    with quietly():
        assert_same_rows(ms.sweep.load_results(tmp_path), by_id(clean))


@dataclass(frozen=True)
class FakeConfig:
    value: float = 1.0


class Fake:
    """A stand-in experiment: one passing claim, no figure; counts its runs."""

    NAME, TITLE, CONFIGS = "fake", "A fake experiment", {"tiny": FakeConfig(), "quick": FakeConfig(2.0)}
    runs = 0

    @classmethod
    def run(cls, cfg, ctx):
        cls.runs += 1
        return {"value": cfg.value, "series": [0.1 * i for i in range(50)]}

    @staticmethod
    def plot(results, ctx):
        return []

    @staticmethod
    def claims(results, cfg):
        return [Claim("value is positive", "> 0", results["value"], results["value"] > 0)]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(runner, "registry", lambda: {"fake": Fake})
    Fake.runs = 0
    return Fake


@pytest.mark.parametrize("damage", [truncate, flip, lambda p: p.write_text('{"config": 1}')])
def test_a_damaged_results_json_is_reported_moved_aside_and_recomputed(tmp_path, fake, damage):
    assert runner.run_reproduction(["fake"], size="tiny", out=tmp_path, device="cpu") == 0
    store = tmp_path / "fake" / "results.json"
    clean = json.loads(store.read_text())
    damage(store)
    with pytest.warns(UserWarning, match=re.escape(str(store)) + ".*damaged"):
        code = runner.run_reproduction(["fake"], size="tiny", out=tmp_path, device="cpu")
    assert code == 0 and fake.runs == 2  # recomputed, not recorded as a failed experiment
    assert (tmp_path / "fake" / "results.json.corrupt").exists()
    assert json.loads(store.read_text())["results"] == clean["results"]
    with quietly():
        runner.run_reproduction(["fake"], size="tiny", out=tmp_path, device="cpu")
    assert fake.runs == 2  # served from the healed store


# ---------------------------------------------------------------- (c) changed inputs never return old rows
def rescaled(seed):
    return mlp(seed, scale=0.3)


def test_changed_inputs_never_return_old_rows(tmp_path):
    first = tmp_path / "first"
    base = run(make(), first)
    scale = [0.5]  # a list in a closure is state, not hashed: only the built parameters reveal the change

    def via_state(seed):
        return mlp(seed, scale[0])

    variants = {
        "data changed": lambda: make(xy=data(seed=1)),
        "model factory changed": lambda: make(rescaled),
        "loss changed": lambda: make(loss=nn.functional.l1_loss),
        "model factory changed (other initial parameters)": lambda: make(via_state),
    }
    for i, (message, build) in enumerate(variants.items()):
        shared = tmp_path / f"shared{i}"
        shutil.copytree(first, shared)
        if message.endswith("parameters)"):
            with pytest.warns(UserWarning, match=r"\(model factory changed\)"):
                run(build(), shared)  # scale 0.5: the numbers of base, under another factory's fingerprint
            scale[0] = 0.2
        with pytest.warns(UserWarning, match=re.escape(f"other inputs ({message})")):
            changed = run(build(), shared)
        reference = run(build(), tmp_path / f"fresh{i}")
        assert_same_rows(changed, reference)
        assert set(changed["run_id"]).isdisjoint(base["run_id"])
        assert (changed["loss"] != base["loss"]).all()
        assert_same_rows(ms.sweep.load_results(shared), by_id(reference))  # the latest inputs' rows

    broken = ms.sweep.Sweep(lambda seed: nn.Linear(5, 2).double(), nn.functional.mse_loss, data(), GRID,
                            record_every=4)
    with pytest.warns(UserWarning, match="other inputs"), pytest.raises(RuntimeError, match="one-step trial"):
        run(broken, first)
    assert_same_rows(ms.sweep.load_results(first), by_id(base))  # inputs that fail their trial leave no trace

    x, y = data()
    sweep = make(xy=(x, y))
    with pytest.warns(UserWarning, match=r"\(model factory changed\).*reusing 6 stored earlier"):
        assert_same_rows(run(sweep, shared), base)  # back to the first inputs: their rows are still there
    x[0, 0] += 1.0  # data changed in place
    with pytest.warns(UserWarning, match=r"\(data changed\)"):
        assert set(run(sweep, shared)["run_id"]).isdisjoint(base["run_id"])


def test_fingerprint_is_stable_and_hashes_closures_partials_and_objects():
    a, b = make(), make()
    assert a.fingerprint() == b.fingerprint() and a.run_ids == b.run_ids
    parts = [make(partial(mlp, scale=s)).fingerprint()["parts"] for s in (0.5, 0.6)]
    assert parts[0]["model_factory"] != parts[1]["model_factory"]

    class Weighted:
        def __init__(self, w):
            self.w, self.history = w, []

        def __call__(self, out, y):
            self.history.append(1)  # state: must not change the fingerprint
            return self.w * nn.functional.mse_loss(out, y)

    loss = Weighted(2.0)
    first = make(loss=loss).fingerprint()["parts"]["loss"]
    loss(torch.zeros(1), torch.zeros(1))
    assert make(loss=loss).fingerprint()["parts"]["loss"] == first
    assert make(loss=Weighted(3.0)).fingerprint()["parts"]["loss"] != first


# ---------------------------------------------------------------- (d) two processes on one directory
def test_two_processes_on_one_sweep_directory_split_the_work(tmp_path, monkeypatch):
    sweep, out, log = slow_sweep(), tmp_path / "shared", tmp_path / "trained.log"
    clean = run(sweep, tmp_path / "clean")
    train = backends.train_chunk

    def logged(problem, chunk, *args, **kwargs):  # one line per trained chunk: who trained how many runs
        rows = train(problem, chunk, *args, **kwargs)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {len(chunk)}\n")
        return rows

    monkeypatch.setattr(backends, "train_chunk", logged)

    def child():
        df = run(sweep, out)
        assert_same_rows(df, clean)  # each process returns the complete results

    pids = [fork(child), fork(child)]
    assert [wait(pid) for pid in pids] == [0, 0]
    trained = [line.split() for line in log.read_text().splitlines()]
    assert sum(int(k) for _, k in trained) == len(sweep)  # every run trained exactly once
    assert {int(pid) for pid, _ in trained} == set(pids), trained  # by both processes
    assert_same_rows(ms.sweep.load_results(out), by_id(clean))
    assert_tidy(out)


def test_a_claimed_chunk_is_waited_for_taken_over_when_freed_and_times_out(tmp_path, capfd):
    sweep = make()
    clean = run(sweep, tmp_path / "clean")
    store = ResultStore(tmp_path / "shared")
    store.runs.mkdir(parents=True)
    held = store.claim(clean["run_id"][:2])  # as if another live process trained the first chunk
    with pytest.raises(TimeoutError, match=f"pid {os.getpid()}.*wait_timeout"):
        run(sweep, store.root, wait_timeout=0.3)
    assert "waiting for 2 runs" in capfd.readouterr().err
    assert len(list(store.runs.glob("chunk-*.parquet"))) == 2  # the unclaimed chunks were trained

    threading.Timer(0.3, held.release).start()  # the other process dies: its claim is taken over
    assert_same_rows(run(sweep, store.root), clean)
    (store.runs / "chunk-0123456789abcdef.claim").write_text("999999999 elsewhere\n")  # left by a dead one
    with quietly():
        assert_same_rows(run(sweep, store.root), clean)
    assert_tidy(store.root)


def test_without_file_locks_a_sweep_still_runs_and_says_claims_are_off(tmp_path, monkeypatch):
    import errno

    import mirrorsym.sweep.store as store_module

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store_module.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock files.*claims are off"):
        df = run(make(), tmp_path)
    assert len(df) == 6 and (df["status"] == "ok").all()
    assert_tidy(tmp_path)


# ---------------------------------------------------------------- (e) --fresh, (f) the reproduction cache key
def test_fresh_removes_everything_the_experiment_wrote(tmp_path, fake):
    runner.run_reproduction(["fake"], size="tiny", out=tmp_path, device="cpu")
    stale = tmp_path / "fake" / "sweep" / "runs" / "chunk-0000000000000000.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"rows of an older configuration")
    runner.run_reproduction(["fake"], size="tiny", out=tmp_path, device="cpu")
    assert fake.runs == 1 and stale.exists()  # cached: the store is left alone
    assert runner.run_reproduction(["fake"], size="tiny", out=tmp_path, device="cpu", fresh=True) == 0
    assert fake.runs == 2 and not (tmp_path / "fake" / "sweep").exists()
    assert (tmp_path / "fake" / "results.json").exists() and (tmp_path / "claims.json").exists()


def test_reproduction_cache_follows_every_package_source_file(tmp_path, fake, monkeypatch):
    tree = tmp_path / "pkg"
    shutil.copytree(runner.PACKAGE_ROOT, tree, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner, "PACKAGE_ROOT", tree)
    out = tmp_path / "out"
    seen = {runner.package_source_hash()}
    runner.run_reproduction(["fake"], size="tiny", out=out, device="cpu")
    edits = [
        lambda: (tree / "core" / "mirror.py").write_text((tree / "core" / "mirror.py").read_text() + "\n# edit\n"),
        lambda: (tree / "theory" / "new_module.py").write_text("X = 1\n"),
        lambda: (tree / "theory" / "new_module.py").rename(tree / "theory" / "renamed.py"),
        lambda: (tree / "theory" / "renamed.py").unlink(),
    ]
    for i, edit in enumerate(edits, start=2):
        edit()
        seen.add(runner.package_source_hash())
        runner.run_reproduction(["fake"], size="tiny", out=out, device="cpu")
        assert fake.runs == i  # any source change recomputes
    assert len(seen) == 4  # the last edit brings back the tree of the first one
    (tree / "core" / "__pycache__").mkdir(exist_ok=True)
    (tree / "core" / "__pycache__" / "stale.py").write_text("ignored")
    runner.run_reproduction(["fake"], size="tiny", out=out, device="cpu")
    assert fake.runs == len(edits) + 1  # byte-code caches are not source
    key = runner.cache_key(Fake, Fake.CONFIGS["tiny"])
    assert f"|version {ms.__version__}" in key and runner.package_source_hash() in key
