"""Run experiment modules, keep their results, and build the report.

Each experiment writes into ``OUT/<name>/``: ``results.json``, its figures and whatever stores it keeps
(e.g. ``OUT/<name>/sweep/``, a resumable :class:`~mirrorsym.sweep.Sweep` store). ``results.json`` holds
the results with the key they were computed under, ``execution`` (engine, backend, device and number of
sweep runs, :meth:`~mirrorsym.experiments.base.Context.execution`) and a sha256 of its content. The key is the size's
config, the experiment module's source, a hash of every ``.py`` file of the mirrorsym package, the
package version and, with ``--data-dir``, the data sets found there: a rerun with the same key loads the
stored results instead of recomputing, any other key recomputes, so an interrupted reproduction resumes
where it stopped and an edited package never serves old numbers.

``fresh=True`` removes the whole ``OUT/<name>/`` directory of each chosen experiment (results.json, sweep
stores, figures) before rerunning it, so nothing from an older configuration survives.

A damaged ``results.json`` (truncated, not JSON, checksum mismatch) is reported by name, moved aside to
``results.json.corrupt`` and the experiment recomputed; it is not an experiment failure. Every JSON file
is written atomically and durably (:func:`mirrorsym.core.io.atomic_write`). An experiment that raises is
recorded as a failed check and the others still run.

Claims are checks (identities that must hold) or findings (empirical statements with a verdict, see
:mod:`mirrorsym.experiments.base`). The exit code is 0 iff every check passed; a finding that is not
reproduced or is contradicted is reported, never a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..core.io import atomic_write, move_aside, remove_stale_temporaries, source_tree_hash
from ..core.threads import single_threaded
from ..experiments import registry
from ..experiments.base import Claim, Context, config_key, to_jsonable
from ..experiments.data import available_datasets
from ..sweep.backends import ray_session
from .render import write_report

SIZES = ("tiny", "quick", "full")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/mirrorsym
RESULT_KEYS = ("config", "seconds", "results")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(to_jsonable(obj), indent=1))  # a kill never leaves a half file


def _source_hash(module) -> str:
    """Changing an experiment's code invalidates its stored results, like changing its config (also for
    experiment modules outside the package)."""
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:16]


def package_source_hash(root: Path | None = None) -> str:
    """Hash of every ``.py`` file under the mirrorsym package (``root``, default the installed one):
    an experiment's result depends on the whole library it calls, not only on its own module."""
    return source_tree_hash(PACKAGE_ROOT if root is None else root)[:16]


def cache_key(module, cfg, data_dir: Path | None = None) -> str:
    """The key results.json is stored under: config, experiment source, package source and version,
    and the real data sets in use."""
    from .. import __version__

    key = (config_key(cfg) + "|code " + _source_hash(module) + "|package " + package_source_hash()
           + "|version " + __version__)
    if data_dir is not None:  # real data sets change what a full-size run computes
        key += f"|data {data_dir} {available_datasets(data_dir)}"
    return key


def _checksum(saved: dict) -> str:
    keys = (*RESULT_KEYS, "execution") if "execution" in saved else RESULT_KEYS
    return hashlib.sha256(json.dumps({k: saved[k] for k in keys}, sort_keys=True).encode()).hexdigest()


def _write_results(path: Path, key: str, seconds: float, results, execution: dict) -> None:
    saved = {"config": key, "seconds": seconds, "results": results, "execution": execution}
    saved["sha256"] = _checksum(saved)
    _write_json(path, saved)


def _read_results(path: Path) -> dict | None:
    """The stored results, or None if there are none. A damaged file (not JSON, keys missing, checksum
    mismatch) is reported by name and moved aside, so the caller recomputes instead of failing."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        saved = json.loads(raw)
        if not isinstance(saved, dict) or any(k not in saved for k in (*RESULT_KEYS, "sha256")):
            raise ValueError("not the expected JSON object with config, seconds, results and sha256")
        if saved["sha256"] != _checksum(saved):
            raise ValueError("its content does not match its sha256")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        moved = move_aside(path)
        warnings.warn(f"mirrorsym reproduce: {path} is damaged ({exc}); moved it aside to {moved} and "
                      "recomputing the experiment", stacklevel=3)
        return None
    return saved


def run_experiment(module, size: str, ctx: Context, fresh: bool = False) -> dict:
    """Run (or load) one experiment; returns {results, claims, figures, seconds, cached, error}.

    ``fresh=True`` first removes ``ctx.out_dir`` with everything in it (results.json, sweep stores,
    figures): all of it was written by mirrorsym for this experiment, and any of it could be stale."""
    cfg = module.CONFIGS[size]
    if fresh and ctx.out_dir.is_dir():
        shutil.rmtree(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ctx.out_dir)
    store = ctx.out_dir / "results.json"
    key = cache_key(module, cfg, ctx.data_dir)
    cached = None
    saved = _read_results(store)
    if saved is not None and saved["config"] == key:
        cached = saved
    if cached is None:
        t0 = time.perf_counter()
        with single_threaded():  # experiments are many small ops: see single_threaded
            raw = module.run(cfg, ctx)
        # plot() and claims() always see the JSON form, whether fresh or loaded from the store
        results = json.loads(json.dumps(to_jsonable(raw)))
        seconds = time.perf_counter() - t0
        execution = ctx.execution()
        _write_results(store, key, seconds, results, execution)
    else:
        results, seconds = cached["results"], cached["seconds"]
        execution = cached.get("execution", {})
    figures = [Path(f) for f in module.plot(results, ctx)]
    claims = module.claims(results, cfg)
    return {"results": results, "claims": claims, "figures": figures, "seconds": seconds,
            "cached": cached is not None, "error": None, "execution": execution}


def run_reproduction(names: list[str] | None = None, size: str = "quick", out: Path | str = "report",
                     device: str = "auto", backend: str = "local", address: str | None = None,
                     fresh: bool = False, console: Console | None = None,
                     data_dir: Path | str | None = None) -> int:
    """Run the named experiments (all by default) and write the report; returns 0 iff every check passed
    (findings carry a verdict and never fail the run).
    ``data_dir``: a folder with CIFAR-10 and/or MNIST in torchvision's layout, used by the full size.
    ``fresh``: remove each chosen experiment's ``out/<name>/`` (results, sweep stores, figures) first."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if backend not in ("local", "ray"):
        raise ValueError(f"--backend must be local or ray, got {backend!r}")
    reg = registry()
    chosen = names or list(reg)
    unknown = [n for n in chosen if n not in reg]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; known: {list(reg)} (mirrorsym reproduce --list)")
    dev = resolve_device(device)
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir} is not a directory; point it at the folder holding "
                             "cifar-10-batches-py/ and/or MNIST/raw/ (torchvision's layout)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    console = console or Console(stderr=True)
    sections, all_claims = [], []
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with contextlib.ExitStack() as stack:
        if backend == "ray":  # one Ray connection for every sweep of every experiment
            stack.enter_context(ray_session(address))
        progress = stack.enter_context(Progress(*columns, console=console, transient=False))
        overall = progress.add_task("experiments", total=len(chosen))
        for name in chosen:
            module = reg[name]
            progress.update(overall, description=f"experiments: {name}")
            ctx = Context(out_dir=out / name, device=dev, backend=backend, address=address, size=size,
                          progress=progress, data_dir=data_dir)
            try:
                sec = run_experiment(module, size, ctx, fresh)
            except KeyboardInterrupt:
                console.print("[yellow]interrupted: finished experiments are saved; rerun to resume[/]")
                raise
            except Exception as exc:  # one broken experiment must not hide the others' results
                sec = {"results": {}, "figures": [], "seconds": 0.0, "cached": False,
                       "error": traceback.format_exc(),
                       "claims": [Claim(f"{name} runs to completion", "completes", f"error: {exc}", False)]}
            sec.update(name=name, title=module.TITLE, doc=(module.__doc__ or "").strip())
            sections.append(sec)
            for c in sec["claims"]:
                all_claims.append({"experiment": name, **c.to_dict(), "seconds": sec["seconds"]})
            progress.advance(overall)
    _write_json(out / "claims.json", all_claims)
    meta = run_metadata(size, dev, backend)
    write_report(out, sections, all_claims, meta)
    _print_summary(console, all_claims, out)
    return 0 if all(c["passed"] for c in all_claims if c["kind"] == "check") else 1


def run_metadata(size: str, device: torch.device, backend: str) -> dict:
    import platform

    import numpy
    import scipy
    import sklearn

    from .. import __version__

    return {
        "command": " ".join(["mirrorsym", *sys.argv[1:]]) if sys.argv and "mirrorsym" in sys.argv[0] else
        f"mirrorsym reproduce --{size}",
        "size": size,
        "device": str(device),
        "backend": backend,
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "versions": {"mirrorsym": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "numpy": numpy.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__},
        "seed": 0,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


VERDICT_STYLE = {"reproduced": "[green]reproduced[/]", "not reproduced": "[yellow]not reproduced[/]",
                 "contradicted": "[red]contradicted[/]"}


def _print_summary(console: Console, claims: list[dict], out: Path) -> None:
    findings = [c for c in claims if c["kind"] == "finding"]
    checks = [c for c in claims if c["kind"] == "check"]
    if findings:
        table = Table(title="findings (empirical; a verdict, never a failure)", show_lines=False)
        for col in ("experiment", "finding", "verdict", "seeds"):
            table.add_column(col)
        for c in findings:
            table.add_row(c["experiment"], c["claim"], VERDICT_STYLE[c["verdict"]], str(c["seeds"]))
        console.print(table)
    table = Table(title="checks (identities; each must pass)", show_lines=False)
    for col in ("experiment", "check", "passed"):
        table.add_column(col)
    for c in checks:
        table.add_row(c["experiment"], c["claim"], "[green]yes[/]" if c["passed"] else "[red]NO[/]")
    console.print(table)
    n_ok = sum(c["passed"] for c in checks)
    counts = ", ".join(f"{sum(c['verdict'] == v for c in findings)} {v}" for v in VERDICT_STYLE)
    console.print(f"{n_ok}/{len(checks)} checks passed; {len(findings)} finding{'' if len(findings) == 1 else 's'}: "
                  f"{counts}. "
                  f"Report: {out / 'report.html'} (also report.md, claims.json)")
