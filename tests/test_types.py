"""The type checker is clean on the whole package (issue 14: ``py.typed``, a typed public API).

mypy runs with the ``[tool.mypy]`` settings of pyproject.toml (``check_untyped_defs`` on every
``mirrorsym`` module) on ``src/mirrorsym``: every module, ``__init__``s included. A cold run reads torch's
stubs (about a minute); later runs reuse ``.mypy_cache``.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "src/mirrorsym"

CLEAN = [PKG]


def test_clean_paths_exist():
    missing = [p for p in CLEAN if not (ROOT / p).exists()]
    assert not missing, f"paths in the clean set that do not exist: {missing}"


def test_py_typed_ships():
    """PEP 561: the marker is in the package and declared as package data."""
    assert (ROOT / PKG / "py.typed").is_file()
    table = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?=^\[|\Z)",
                      (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert table is not None and re.search(r'^mirrorsym = \[.*"py\.typed".*\]', table.group(1), re.M)


@pytest.mark.slow
def test_mypy_clean():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", *CLEAN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"
