"""Every tutorial in examples/ runs at its --tiny size and writes the figures its docs page shows."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_examples", ROOT / "docs" / "build_examples.py")
build_examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_examples)


def test_every_example_is_listed():
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py")}
    assert scripts == set(build_examples.EXAMPLES)


@pytest.mark.parametrize("name", list(build_examples.EXAMPLES))
def test_example_runs_tiny(name, tmp_path):
    out = tmp_path / "figures"
    proc = build_examples.run_example(name, out, tmp_path, tiny=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not build_examples.missing_figures(name, out), sorted(str(p) for p in out.rglob("*"))


def test_getting_started_block_runs(tmp_path, monkeypatch):
    """The Python block of docs/getting-started.md runs as written (its names stay true)."""
    import re

    text = (ROOT / "docs" / "getting-started.md").read_text()
    block = re.search(r"## Five minutes.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(block, "docs/getting-started.md", "exec"), env)  # noqa: S102
    assert env["gc"].gamma >= 0 and env["smap"].counts() == {"permutation": 1, "sign_flip": 1}
