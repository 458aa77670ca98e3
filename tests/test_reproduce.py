"""The reproduction runner and report: real experiments at tiny size, and a fake result set."""

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

import mirrorsym.report.runner as runner
from mirrorsym.cli import app
from mirrorsym.experiments import Claim, registry
from mirrorsym.experiments.plotting import figure, save

KEYS = {"experiment", "claim", "predicted", "measured", "passed", "seconds"}


@pytest.mark.parametrize("name", list(registry()))
def test_each_experiment_tiny_passes_its_claims(name, tmp_path):
    code = runner.run_reproduction([name], size="tiny", out=tmp_path, device="cpu")
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims and all(set(c) == KEYS for c in claims)
    failed = [c for c in claims if not c["passed"]]
    assert code == 0, failed
    assert list((tmp_path / name).glob("*.png"))


@dataclass(frozen=True)
class FakeConfig:
    value: float = 1.0


class FakeExperiment:
    """A stand-in experiment module: one passing and one failing claim, one figure; counts its runs."""

    NAME = "fake"
    TITLE = "A fake experiment"
    CONFIGS = {"tiny": FakeConfig(), "quick": FakeConfig(2.0), "full": FakeConfig(3.0)}
    runs = 0

    @classmethod
    def run(cls, cfg, ctx):
        cls.runs += 1
        return {"value": cfg.value, "nan": float("nan")}

    @staticmethod
    def plot(results, ctx):
        fig, ax = figure()
        ax[0, 0].plot([0, 1], [0, results["value"]])
        return [save(fig, ctx.out_dir, "fake")]

    @staticmethod
    def claims(results, cfg):
        assert results["nan"] is None  # NaN is stored as null, fresh or cached
        return [Claim("value is positive: | value | > 0", "> 0", results["value"], results["value"] > 0),
                Claim("value is huge", "> 100", results["value"], results["value"] > 100)]


def test_report_from_fake_results_resumes_and_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "registry", lambda: {"fake": FakeExperiment})
    FakeExperiment.runs = 0
    assert runner.run_reproduction(None, size="tiny", out=tmp_path, device="cpu") == 1  # a claim failed
    assert FakeExperiment.runs == 1
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["passed"] for c in claims] == [True, False]
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "value is huge" in html and "NO" in html
    md = (tmp_path / "report.md").read_text()
    assert "fake/fake.png" in md and "1/2 claims passed" in md
    row = next(line for line in md.splitlines() if "value is positive" in line)
    assert row.count(" | ") == 5  # the "|" in the claim text is escaped: still six cells
    runner.run_reproduction(None, size="tiny", out=tmp_path, device="cpu")
    assert FakeExperiment.runs == 1  # resumed from results.json
    runner.run_reproduction(None, size="quick", out=tmp_path, device="cpu")
    assert FakeExperiment.runs == 2  # a different config reruns


def test_a_crashing_experiment_is_a_failed_claim_not_a_crash(tmp_path, monkeypatch):
    class Broken(FakeExperiment):
        @classmethod
        def run(cls, cfg, ctx):
            raise RuntimeError("boom")

    monkeypatch.setattr(runner, "registry", lambda: {"fake": FakeExperiment, "broken": Broken})
    assert runner.run_reproduction(["broken", "fake"], size="tiny", out=tmp_path, device="cpu") == 1
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims[0]["experiment"] == "broken" and "boom" in claims[0]["measured"]
    assert "RuntimeError: boom" in (tmp_path / "report.md").read_text()
    assert {c["experiment"] for c in claims} == {"broken", "fake"}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        runner.run_reproduction(["nope"], out=tmp_path)
    with pytest.raises(ValueError, match="size"):
        runner.run_reproduction(None, size="medium", out=tmp_path)
    with pytest.raises(ValueError, match="device"):
        runner.run_reproduction(None, out=tmp_path, device="tpu")


def test_cli_list_names_every_experiment():
    result = CliRunner().invoke(app, ["reproduce", "--list"])
    assert result.exit_code == 0
    for name in registry():
        assert name in result.output
