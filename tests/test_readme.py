"""The README's API tour runs as written (on a small concrete model), so its names stay true."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)

    def forward(self, x):  # an activation module, so that diagnose probes the hidden layer itself
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.filterwarnings("error::UserWarning")  # no fallback, no projection warning: the tour is the fast path
def test_api_tour_runs(tmp_path, monkeypatch):
    block = re.search(r"## API tour\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    model = Net()
    env = {
        "model": model, "x": x, "y": y, "example_inputs": x[:4],
        "O": torch.linalg.qr(torch.randn(6, 2)).Q,
        "loss_fn": lambda p, batch: ((torch.func.functional_call(model, p, (batch[0],)) - batch[1]) ** 2).mean(),
        "model_factory": Net, "net": Net(1),
    }
    exec(compile(block, str(README), "exec"), env)  # noqa: S102
    assert env["df"]["status"].eq("ok").all() and len(env["df"]) == 32
    assert env["lam"].value == env["lam"].value  # a number, not NaN
    assert sum(p.numel() for p in env["small"].parameters()) > 0
