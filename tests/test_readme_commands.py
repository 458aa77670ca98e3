"""Every shell command the README shows runs as written (issue 14).

* ``mirrorsym ...`` lines of every ``bash`` block and every ``$ mirrorsym ...`` line of a ``text`` block run
  through the CLI (in a folder holding what the README names: ``mypkg.models:make_net`` and ``net.pt``, a
  ``tiny-llama`` Hugging Face folder), except the quick reproduction itself, which CI runs verbatim;
* the two quick-start commands are exactly the ones ``.ci/run`` runs (install + report, install + tests),
  and the other shell lines (ruff, ``bash .ci/run``) are in ``.ci/run`` or are it.
"""

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mirrorsym.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def shell_lines() -> list[str]:
    """Commands of ``bash`` blocks (comments stripped) and ``$ `` lines of ``text`` blocks."""
    lines = []
    for lang, body in re.findall(r"```(bash|text)\n(.*?)```", README, re.S):
        for raw in body.splitlines():
            if lang == "text":
                if raw.startswith("$ "):
                    lines.append(raw[2:].strip())
                continue
            line = raw.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


LINES = shell_lines()
QUICK_START = LINES[:2]
CLI_LINES = [c for c in LINES[2:] if c.startswith("mirrorsym ")]


def needs_torchvision(line: str) -> bool:
    """A ``scan``/``diagnose`` of a torchvision model name: it runs in the zoo environment, where
    torchvision is installed (tests/test_detect_zoo.py::test_readme_torchvision_commands_run)."""
    args = shlex.split(line)[1:]
    named = len(args) > 1 and re.fullmatch(r"[a-z]+\d+[a-z0-9_]*", args[1]) is not None
    return named and args[0] in ("scan", "diagnose")


def test_the_readme_shows_commands():
    assert len(CLI_LINES) >= 5
    assert any("scan ./tiny-llama" in c for c in CLI_LINES)  # a small Llama, scanned from a local folder


def test_quick_start_is_what_ci_runs():
    install_report, install_tests = QUICK_START
    assert install_report == "pip install torch==2.13.0 -e . && mirrorsym reproduce --quick --out report"
    assert install_tests == 'pip install torch==2.13.0 -e ".[test]" && pytest'
    assert 'pip install -q torch==2.13.0 -e ".[test]"\n' in CI and "\npytest\n" in CI
    assert "mirrorsym reproduce --quick --out" in CI


def test_other_shell_lines_are_what_ci_runs():
    for line in LINES[2:]:
        if line.startswith("mirrorsym "):
            continue
        if line.startswith("pip install"):
            assert line == QUICK_START[1]
        elif line.startswith("bash "):
            assert line == "bash .ci/run"
        else:
            assert line in CI, f"README shows {line!r}, which .ci/run does not run"


MAKE_NET = '''
import torch
from torch import nn


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
'''


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """A working folder with the files the README's commands name."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(MAKE_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mypkg", None)
    sys.modules.pop("mypkg.models", None)
    import importlib

    net = importlib.import_module("mypkg.models").make_net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    from test_scan_llm import save_tiny_llama

    save_tiny_llama(tmp_path / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_every_readme_cli_command_runs(readme_folder):
    ran = []
    for line in CLI_LINES:
        args = shlex.split(line)[1:]
        if args[:2] == ["reproduce", "--quick"]:
            continue  # minutes of work: CI runs it verbatim (test_quick_start_is_what_ci_runs)
        if needs_torchvision(line):
            continue  # run by the zoo environment's test (see needs_torchvision)
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, f"{line}\n{result.output}"
        ran.append(line)
        if args[0] == "diagnose":
            assert list((readme_folder / "diag").glob("*.png"))
    assert len(ran) == len([c for c in CLI_LINES if not needs_torchvision(c)]) >= 5
