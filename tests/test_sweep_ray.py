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
