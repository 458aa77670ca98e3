"""`mirrorsym scan`: built-in examples, factory paths, saved files, JSON output, clear errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mirrorsym.cli import app
from mirrorsym.detect.examples import mlp

runner = CliRunner()


def make_tanh_mlp():
    torch.manual_seed(0)
    return mlp(torch.nn.Tanh, sizes=(5, 7, 3))


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user package on sys.path that holds a model factory: ``userpkg.nets:make_tanh_mlp``."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from test_detect_cli import make_tanh_mlp  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg.nets:make_tanh_mlp"


def test_scan_builtin_example_table():
    result = runner.invoke(app, ["scan", "mlp-tanh"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "permutation" in result.output and "sign_flip" in result.output
    assert "Total: 4 symmetry groups (2 permutation, 2 sign_flip)" in result.output


def test_scan_factory_path_json(factory_module):
    result = runner.invoke(app, ["scan", factory_module, "--input-shape", "2,5", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert sorted(g["kind"] for g in data["groups"]) == ["permutation", "sign_flip"]
    assert all(g["size"] == 7 for g in data["groups"])


def test_scan_saved_model_file(tmp_path):
    """A whole pickled module loads only with --trust-pickle; a state_dict goes with --checkpoint."""
    path = tmp_path / "model.pt"
    torch.save(make_tanh_mlp(), path)
    result = runner.invoke(app, ["scan", str(path), "--input-shape", "2,5", "--json", "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["groups"]) == 2


def test_scan_errors_are_clear(tmp_path, factory_module):
    result = runner.invoke(app, ["scan", factory_module])
    assert result.exit_code == 2 and "--input-shape" in result.output
    path = tmp_path / "state.pt"
    torch.save(make_tanh_mlp().state_dict(), path)
    result = runner.invoke(app, ["scan", str(path), "--input-shape", "2,5"])
    assert result.exit_code == 2 and "state_dict" in result.output and "--checkpoint" in result.output
    result = runner.invoke(app, ["scan", "mlp-tanh", "--input-shape", "two"])
    assert result.exit_code == 2 and "comma-separated" in result.output
    result = runner.invoke(app, ["scan", factory_module, "--checkpoint", str(path), "--input-shape", "2,5", "--json"])
    assert result.exit_code == 0, result.output
