"""Run every tutorial in ``examples/`` and collect its figures under ``docs/figures/<example>/``.

The tutorial pages include the scripts' code and these figures, so run this before ``mkdocs build``:

    python docs/build_examples.py [--tiny] [--only NAME ...]
    mkdocs build --strict

``--tiny`` runs the test sizes (seconds each; what CI does); without it the tutorials run at their normal
sizes (a few minutes in all on 2 CPU cores, most of it ``reproduce_paper``, which runs the whole quick
reproduction). Each example runs in its own process with ``--out docs/figures/<name>``; result stores and
reports go to a temporary folder. Exits non-zero if an example fails or does not write its figures.
``tests/test_examples.py`` uses :data:`EXAMPLES` to run the same scripts with ``--tiny``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"

#: example name -> (the figures it must write, relative to its --out folder; extra arguments given a scratch dir)
EXAMPLES: dict[str, tuple[tuple[str, ...], object]] = {
    "find_symmetries": (("groups.png", "residual.png"), lambda scratch: []),
    "monitor_collapse": (("collapse.png", "diagnose/dead_distinct.png"), lambda scratch: []),
    "constrain_and_export": (("sparse_low_rank.png", "units_export.png"), lambda scratch: []),
    "dcs_target_width": (("target_width.png",), lambda scratch: []),
    "predict_collapse": (("critical_weight_decay.png", "critical_learning_rate.png"), lambda scratch: []),
    "sweep_phase_diagram": (("phase_diagram.png",), lambda scratch: ["--runs", str(scratch / "runs")]),
    "reproduce_paper": (("claims_summary.png", "theorem1.png"), lambda scratch: ["--report", str(scratch / "report")]),
}


def example_env() -> dict[str, str]:
    """The environment the examples run in: non-interactive plots, one thread unless the caller chose."""
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_example(name: str, out: Path, scratch: Path, tiny: bool, timeout: float | None = None
                ) -> subprocess.CompletedProcess:
    """Run ``examples/<name>.py --out OUT [--tiny]`` in a fresh interpreter; returns the finished process."""
    figures, extra = EXAMPLES[name]
    cmd = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--out", str(out), *extra(scratch)]
    if tiny:
        cmd.append("--tiny")
    return subprocess.run(cmd, cwd=ROOT, env=example_env(), capture_output=True, text=True, timeout=timeout)


def missing_figures(name: str, out: Path) -> list[str]:
    return [f for f in EXAMPLES[name][0] if not (out / f).is_file()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the tutorials and collect their figures for the docs.")
    parser.add_argument("--tiny", action="store_true", help="test sizes (seconds per example)")
    parser.add_argument("--only", nargs="*", choices=sorted(EXAMPLES), default=None, help="run only these")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or list(EXAMPLES):
        out = FIGURES / name
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"mirrorsym-{name}-") as scratch:
            proc = run_example(name, out, Path(scratch), args.tiny)
        seconds = time.perf_counter() - start
        missing = missing_figures(name, out)
        if proc.returncode != 0 or missing:
            failed.append(name)
            print(f"FAILED {name} (exit {proc.returncode}, missing figures {missing}) after {seconds:.1f} s")
            print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        else:
            print(f"ok     {name:22s} {seconds:6.1f} s  -> {out.relative_to(ROOT)}")
    if failed:
        print(f"{len(failed)} example(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
