"""Ray backend against a local Ray instance: the same rows as the local backend, every worker busy."""

import os
import sys
import time
from functools import partial

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra 'distributed'")
from ray import cloudpickle  # noqa: E402  (Ray pickles tasks with its own copy)

import mirrorsym as ms  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import test_sweep as T  # noqa: E402
from test_sweep import tanh_mlp  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    this = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(T)  # the workers cannot import the tests directory
    cloudpickle.register_pickle_by_value(this)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(this)
    cloudpickle.unregister_pickle_by_value(T)


@pytest.mark.slow
def test_ray_backend_gives_the_same_rows_as_local(tmp_path, local_ray):
    grid = {"lr": [0.05, 0.2, 1e200], "seed": [0, 1], "momentum": 0.9, "weight_decay": 0.01,
            "batch_size": [8, 16], "steps": 30}
    sweep = T.make_sweep(grid, record_every=10)
    remote = sweep.run(tmp_path / "ray", backend="ray", device="cpu", chunk_size=4, progress=False)
    local = sweep.run(tmp_path / "local", backend="local", device="cpu", chunk_size=4, progress=False)
    assert len(remote) == 12 and (remote["status"] == "diverged").sum() == 4
    assert (remote.loc[remote["lr"] < 1, "status"] == "ok").all()
    T.assert_same_rows(remote, local)
    T.assert_same_rows(ms.sweep.load_results(tmp_path / "ray"), ms.sweep.load_results(tmp_path / "local"))
    again = sweep.run(tmp_path / "ray", backend="ray", device="cpu", chunk_size=4, progress=False)
    T.assert_same_rows(again, remote)  # resumed: nothing left to send


def logging_factory(log: str, seed: int):
    """The model factory, noting which process built each copy (it runs where the chunk trains)."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.01)
    return tanh_mlp(seed)


@pytest.mark.slow
def test_ray_splits_a_sweep_over_every_worker(tmp_path, local_ray):
    """60 runs, 2 CPUs, the default chunk_size 128: two chunks of 30, trained by two worker processes."""
    log = tmp_path / "pids.log"
    grid = {"lr": [0.02, 0.05, 0.1, 0.2, 0.3], "seed": list(range(12)), "batch_size": 8, "steps": 40}
    sweep = ms.sweep.Sweep(partial(logging_factory, str(log)), T.nn.functional.mse_loss, T.make_data(), grid,
                           metrics=T.METRICS, record_every=10)
    df = sweep.run(tmp_path / "out", backend="ray", device="cpu", progress=False)
    assert len(df) == 60 and (df["status"] == "ok").all()
    assert len(list((tmp_path / "out" / "runs").glob("chunk-*.parquet"))) == 2
    workers = {int(line) for line in log.read_text().split()} - {os.getpid()}
    assert len(workers) >= 2, workers


def _job(a, b):
    if b < 0:
        raise ValueError(f"job refused b={b}")
    return {"sum": a + b, "pid": os.getpid()}


@pytest.mark.slow
def test_map_jobs_on_ray_returns_the_local_results_in_order_and_raises_job_errors(local_ray):
    from mirrorsym.sweep.backends import map_jobs

    jobs = [(i, 10 * i) for i in range(6)]
    here = map_jobs(_job, jobs, backend="local")
    there = map_jobs(_job, jobs, backend="ray")
    assert [r["sum"] for r in there] == [r["sum"] for r in here] == [11 * i for i in range(6)]
    assert {r["pid"] for r in here} == {os.getpid()} and os.getpid() not in {r["pid"] for r in there}
    with pytest.raises(Exception, match="job refused b=-1"):
        map_jobs(_job, [(0, 1), (0, -1)], backend="ray")
    with pytest.raises(ValueError, match="backend must be 'local' or 'ray'"):
        map_jobs(_job, jobs, backend="dask")


@pytest.mark.slow
def test_context_splits_seeds_over_the_ray_workers_and_travels_without_its_progress_bar(tmp_path, local_ray):
    import pickle

    from mirrorsym.experiments.base import Context

    assert Context(tmp_path).split(5) == [range(5)]  # local: one job, batched code stays batched
    ctx = Context(tmp_path, backend="ray", progress=object())
    assert ctx.split(5) == [range(0, 2), range(2, 5)] and ctx.split(1) == [range(1)]
    ctx.sweeps.append({"n_runs": 3})
    sent = pickle.loads(pickle.dumps(ctx))
    assert sent.progress is None and sent.sweeps == [] and sent.out_dir == ctx.out_dir and sent.backend == "ray"
    assert ctx.progress is not None and ctx.sweeps  # the driver's context keeps both
    out = ctx.map(_job, [(1, 2), (3, 4)], "pairs", runs=6)
    assert [r["sum"] for r in out] == [3, 7]
    assert ctx.execution()["n_runs"] == 9 and ctx.execution()["jobs"] == [{"name": "pairs", "n_jobs": 2, "n_runs": 6}]
