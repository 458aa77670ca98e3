"""The reproduction runner and report: real experiments at tiny size, and a fake result set."""

import json
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

import mirrorsym.report.runner as runner
from mirrorsym.cli import app
from mirrorsym.experiments import Claim, finding, registry
from mirrorsym.experiments.base import VERDICTS, t_interval
from mirrorsym.experiments.plotting import figure, save

KEYS = {"experiment", "claim", "kind", "predicted", "measured", "passed", "verdict", "rule", "seeds", "mean",
        "ci95", "seconds"}


def well_formed(c: dict) -> bool:
    """A check has passed = True/False and no verdict; a finding has a verdict, a rule, seeds ≥ 1, and an
    interval only with two seeds or more."""
    if c["kind"] == "check":
        return isinstance(c["passed"], bool) and c["verdict"] is None
    return (c["kind"] == "finding" and c["passed"] is None and c["verdict"] in VERDICTS and bool(c["rule"])
            and c["seeds"] >= 1 and (c["seeds"] >= 2 or c["ci95"] is None))


@pytest.mark.parametrize("name", list(registry()))
def test_each_experiment_tiny_passes_its_checks(name, tmp_path):
    code = runner.run_reproduction([name], size="tiny", out=tmp_path, device="cpu")
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims and all(set(c) == KEYS and well_formed(c) for c in claims)
    failed = [c for c in claims if c["kind"] == "check" and not c["passed"]]
    assert code == 0 and not failed, failed  # findings may come out either way; checks may not
    assert list((tmp_path / name).glob("*.png"))
    ran = json.loads((tmp_path / name / "results.json").read_text())["execution"]
    assert ran["device"] == "cpu" and ran["backend"] == "local"
    swept = [p.parent.name for p in (tmp_path / name).glob("*/sweep.json")]
    assert sorted(s["store"] for s in ran["sweeps"]) == sorted(swept)  # every sweep store is recorded
    assert ran["engine"] == ("mirrorsym.sweep" if swept else "jobs" if ran["jobs"] else "in-process")
    assert ran["n_runs"] == sum(s["n_runs"] for s in ran["sweeps"] + ran["jobs"])
    assert (ran["n_runs"] > 0) == bool(swept or ran["jobs"])


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
    assert runner.run_reproduction(None, size="tiny", out=tmp_path, device="cpu") == 1  # a check failed
    assert FakeExperiment.runs == 1
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["passed"] for c in claims] == [True, False] and {c["kind"] for c in claims} == {"check"}
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "value is huge" in html and "NO" in html
    md = (tmp_path / "report.md").read_text()
    assert "fake/fake.png" in md and "1/2 checks passed" in md
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


class WithFinding(FakeExperiment):
    """One passing check and one empirical finding that does not reproduce (value 2 is not > 100)."""

    @staticmethod
    def claims(results, cfg):
        v = results["value"]
        return [Claim("value is positive", "> 0", v, v > 0),
                finding("value exceeds 100 (an empirical statement)", "> 100", v, [v], statistic="the value",
                        better="higher", threshold=100.0, contradict=0.0)]


def test_a_finding_that_does_not_reproduce_is_reported_and_exits_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "registry", lambda: {"fake": WithFinding})
    assert runner.run_reproduction(None, size="quick", out=tmp_path, device="cpu") == 0
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert all(set(c) == KEYS and well_formed(c) for c in claims)
    f = next(c for c in claims if c["kind"] == "finding")
    assert (f["verdict"], f["seeds"], f["mean"], f["ci95"], f["passed"]) == ("not reproduced", 1, 2.0, None, None)
    assert "otherwise not reproduced" in f["rule"] and "above 100" in f["rule"]
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Findings") < md.index("## Checks")  # the summary of findings comes first
    row = next(line for line in md.splitlines() if line.startswith("| fake | value exceeds 100"))
    assert "**not reproduced**" in row and "1 seed: no interval" in row
    assert "1 finding: 0 reproduced, 1 not reproduced, 0 contradicted. 1/1 checks passed." in md
    html = (tmp_path / "report.html").read_text()
    assert "<span class='meh'>not reproduced</span>" in html and html.index("Findings") < html.index("Checks")


def test_a_failing_check_exits_one_even_when_the_findings_reproduce(tmp_path, monkeypatch):
    class FailingCheck(FakeExperiment):
        @staticmethod
        def claims(results, cfg):
            v = results["value"]
            return [finding("value is positive", "> 0", v, [v], statistic="the value", better="higher",
                            threshold=0.0),
                    Claim("value equals 7 (an identity)", 7, v, v == 7)]

    monkeypatch.setattr(runner, "registry", lambda: {"fake": FailingCheck})
    assert runner.run_reproduction(None, size="tiny", out=tmp_path, device="cpu") == 1
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [(c["kind"], c["verdict"], c["passed"]) for c in claims] == [("finding", "reproduced", None),
                                                                         ("check", None, False)]


def test_finding_verdicts_and_intervals():
    from scipy import stats

    def verdict(values, **kw):
        kw = {"statistic": "e", "better": "higher", "threshold": 0.0, **kw}
        return finding("x", None, None, values, **kw).verdict

    assert verdict([0.3]) == "reproduced" and verdict([-0.3]) == "contradicted" and verdict([0.0]) == "not reproduced"
    assert verdict([0.3, 0.4, 0.35]) == "reproduced"
    assert verdict([0.3, -0.1, 0.2]) == "not reproduced"  # the interval straddles the threshold
    assert verdict([-0.3, -0.4, -0.35]) == "contradicted"
    assert verdict([0.05], threshold=0.1, contradict=0.0) == "not reproduced"  # an effect, too small
    assert verdict([-5.0], threshold=0.1, contradict=None) == "not reproduced"  # never contradicted
    assert verdict([3], better="lower", threshold=0.5) == "contradicted"
    assert verdict([0], better="lower", threshold=0.5) == "reproduced"
    assert verdict([2], threshold=2, inclusive=True) == "reproduced" and verdict([2], threshold=2) == "not reproduced"
    assert verdict([None]) == "not reproduced"  # a seed without a usable value decides nothing
    values = [1.0, 2.0, 4.0]
    mean, (lo, hi) = t_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert mean == pytest.approx(7 / 3) and (lo, hi) == pytest.approx(ref)
    c = finding("x", None, None, values, statistic="e", better="higher", threshold=0.0)
    assert c.seeds == 3 and c.ci95 == pytest.approx(list(ref)) and c.passed is None and not c.failed
    assert t_interval([1.5]) == (1.5, None) and t_interval([None]) == (None, None)


def test_claim_kinds_are_validated():
    assert Claim("identity", 0, 0, True).kind == "check" and Claim("identity", 0, 1, False).failed
    with pytest.raises(ValueError, match="passed"):
        Claim("a check without a result", 0, 0)
    with pytest.raises(ValueError, match="verdict"):
        Claim("f", 0, 0, kind="finding", verdict="maybe", rule="r", seeds=1)
    with pytest.raises(ValueError, match="rule"):
        Claim("f", 0, 0, kind="finding", verdict="reproduced", seeds=1)
    with pytest.raises(ValueError, match="seeds"):
        Claim("f", 0, 0, kind="finding", verdict="reproduced", rule="r", seeds=0)
    with pytest.raises(ValueError, match="passed"):
        Claim("f", 0, 0, True, kind="finding", verdict="reproduced", rule="r", seeds=1)
    with pytest.raises(ValueError, match="kind"):
        Claim("f", 0, 0, True, kind="guess")


def test_ray_tasks_ask_for_a_gpu_only_when_the_experiment_runs_on_cuda(tmp_path):
    from mirrorsym.experiments.base import Context

    assert Context(tmp_path, device=torch.device("cuda"), backend="ray").ray_options == {"num_gpus": 1}
    assert Context(tmp_path, device=torch.device("cpu"), backend="ray").ray_options is None
