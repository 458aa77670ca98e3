"""Data flows down the layers; nothing imports upward (including imports inside functions).

core → detect → diagnose / theory → constrain → sweep → experiments / report → cli. A module may import
its own layer and any lower one. The package's ``__init__`` (the public surface) sits above everything.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mirrorsym"
RANK = {"core": 0, "detect": 1, "diagnose": 2, "theory": 2, "constrain": 3, "sweep": 4, "experiments": 5,
        "report": 5, "cli": 6}


def layer_of(module: str) -> str | None:
    """``mirrorsym.detect.find`` -> ``detect``; None for the package root and non-mirrorsym modules."""
    parts = module.split(".")
    if parts[0] != "mirrorsym" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (functions included)."""
    package = "mirrorsym." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    base = package.rsplit(".", 1)[0] if path.name != "__init__.py" else package
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if node.module is None or mod.count(".") == 1:  # "from .. import diagnose": names are modules
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        own = layer_of("mirrorsym." + ".".join(path.relative_to(SRC).with_suffix("").parts))
        if own is None:
            continue
        seen = set()
        for line, mod in imported_modules(path):
            target = layer_of(mod)
            if target is not None and RANK[target] > RANK[own] and line not in seen:
                seen.add(line)
                bad.append(f"{path.relative_to(SRC.parent)}:{line} ({own}) imports {mod} ({target})")
    return bad


def test_no_module_imports_a_higher_layer():
    assert violations() == []


def test_the_checker_sees_upward_imports(tmp_path, monkeypatch):
    """The checker must be able to fail: an upward import inside a function is found."""
    fake = tmp_path / "mirrorsym"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from ..sweep import Sweep\n    return Sweep\n")
    (fake / "core" / "ok.py").write_text("from .mirror import Mirror\nimport torch\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert violations() == ["mirrorsym/core/bad.py:2 (core) imports mirrorsym.sweep (sweep)"]


@pytest.mark.parametrize("layer", sorted(RANK))
def test_every_layer_exists(layer):
    assert (SRC / layer).is_dir(), f"layer {layer} is listed but has no package"
