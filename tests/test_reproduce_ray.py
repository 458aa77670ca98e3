"""`mirrorsym reproduce --backend ray` runs every grid experiment's sweeps (and the seeds of the experiments
with their own training loops, as jobs) through Ray and produces the same claims as the local backend
(issue 16), on a local Ray instance with 2 CPUs, at the tiny size."""

import json
import math

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra 'distributed'")

import mirrorsym.report.runner as runner  # noqa: E402
from mirrorsym.experiments import registry  # noqa: E402


def _same(a, b) -> bool:
    """Equal up to the round-off of a different chunking (vmapped matmuls may block differently)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_every_grid_experiment_gives_the_same_claims_on_ray(tmp_path, local_ray):
    local = tmp_path / "local"
    assert runner.run_reproduction(None, size="tiny", out=local, device="cpu") == 0
    engines = {name: json.loads((local / name / "results.json").read_text())["execution"]["engine"]
               for name in registry()}
    grids = [name for name, engine in engines.items() if engine in ("mirrorsym.sweep", "jobs")]
    assert {"sparsity", "lowrank", "noise", "permutation", "transformer", "posterior", "dimensional"} <= {
        name for name in grids if engines[name] == "mirrorsym.sweep"}
    assert {"plasticity", "dcs"} <= {name for name in grids if engines[name] == "jobs"}
    remote = tmp_path / "ray"
    assert runner.run_reproduction(grids, size="tiny", out=remote, device="cpu", backend="ray") == 0
    for name in grids:
        ran = json.loads((remote / name / "results.json").read_text())["execution"]
        assert ran["backend"] == "ray" and ran["n_runs"] > 0, name
    mine = [c for c in json.loads((local / "claims.json").read_text()) if c["experiment"] in grids]
    theirs = json.loads((remote / "claims.json").read_text())
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        for key in ("experiment", "claim", "kind", "passed", "verdict", "seeds", "predicted", "measured", "mean",
                    "ci95"):
            assert _same(a[key], b[key]), (a["experiment"], a["claim"], key, a[key], b[key])
