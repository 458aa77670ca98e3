import pytest
import torch

from mirrorsym.core import single_threaded


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Deterministic seed; one intra-op thread, since the suite is tiny ops and threads only add waiting."""
    torch.manual_seed(0)
    with single_threaded():
        yield


def tanh_net_params(n_in=3, hidden=6, n_out=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(hidden, n_in, generator=g, dtype=dtype),
        "fc1.bias": torch.randn(hidden, generator=g, dtype=dtype),
        "fc2.weight": torch.randn(n_out, hidden, generator=g, dtype=dtype),
    }


def tanh_net(params, x):
    h = torch.tanh(x @ params["fc1.weight"].T + params["fc1.bias"])
    return h @ params["fc2.weight"].T


def unit(i):
    return {"fc1.weight": (0, [i]), "fc1.bias": (0, [i]), "fc2.weight": (1, [i])}


@pytest.fixture(params=["export", "fx"])
def trace(request, monkeypatch):
    """Run a test through torch.export and, with export made to fail, through the torch.fx fallback."""
    if request.param == "fx":
        import mirrorsym.detect.trace as tracing

        def no_export(*args, **kwargs):
            raise RuntimeError("export switched off for this test")

        monkeypatch.setattr(tracing, "export", no_export)
    return request.param
