"""``mirrorsym reproduce [NAME ...]``: run the paper's experiments and write the report.

Everything the run depends on is validated BEFORE the first experiment starts, so that a mistake is one
line and not a failure after an hour of training: the experiment names, ``--device``, ``--backend`` (and
that Ray is importable for ``ray``), that ``--out`` is a writable folder, and the ``--data-dir`` files that
the chosen experiments would read at this size (they exist and are valid CIFAR-10 batches / MNIST idx
files; read without running any code from them).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import UserError, one_line, require_writable_dir

# experiment -> (its config flag that turns the real-data part on, the data set it then reads)
DATA_READERS = {"permutation": ("resnet", "cifar10"), "plasticity": ("mnist", "mnist")}
LAYOUTS = {"cifar10": "cifar-10-batches-py/ (the extracted 'CIFAR-10 python version' archive)",
           "mnist": "MNIST/raw/ (the four idx files, plain or .gz)"}


def reproduce(
    names: Annotated[list[str] | None, typer.Argument(help="Experiments to run (default: all). See --list.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: everything in <= 10 min on 2 CPUs.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Paper-sized grids (for a GPU or a Ray cluster).")] = False,
    out: Annotated[Path, typer.Option("--out", help="Output folder for the report and figures.")] = Path("report"),
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    backend: Annotated[str, typer.Option("--backend", help="Sweep backend: local | ray")] = "local",
    address: Annotated[str | None, typer.Option("--address", help="Ray address (with --backend ray).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the experiments and exit.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete OUT/<experiment>/ (results, sweep "
                                            "stores, figures) for the chosen experiments and rerun them.")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Folder with real data in torchvision's layout, used with --full: "
        "cifar-10-batches-py/ (permutation also trains ResNet-18 on CIFAR-10) and MNIST/raw/ (plasticity "
        "adds permuted MNIST). Nothing is downloaded; the files are checked before anything runs.")] = None,
) -> None:
    """Reproduce the paper's claims: figures, report.html, report.md and claims.json in OUT."""
    from ..report import runner

    if list_:
        for name, exp in runner.registry().items():
            typer.echo(f"{name:14s} {exp.TITLE}")
        return
    if quick and full:
        raise UserError("choose one of --quick and --full")
    size = "full" if full else "quick"
    chosen, out, data_dir, notes = validate(names, size, out, device, backend, address, data_dir)
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    code = runner.run_reproduction(chosen, size=size, out=out, device=device, backend=backend,
                                   address=address, fresh=fresh, data_dir=data_dir)
    raise typer.Exit(code)


def validate(
    names: Sequence[str] | None,
    size: str,
    out: Path,
    device: str,
    backend: str,
    address: str | None,
    data_dir: Path | None,
) -> tuple[list[str], Path, Path | None, list[str]]:
    """Check every argument of a reproduction (see the module docstring); ``(names, out, data_dir,
    warnings)`` or a UserError naming the argument and the fix."""
    from ..report import runner

    reg = runner.registry()
    chosen = list(names) if names else list(reg)
    unknown = [n for n in chosen if n not in reg]
    if unknown:
        raise UserError(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(reg)} "
                        "(mirrorsym reproduce --list)")
    try:
        runner.resolve_device(device)
    except ValueError as exc:
        raise UserError(one_line(exc)) from exc
    if backend not in ("local", "ray"):
        raise UserError(f"--backend must be local or ray, got {backend!r}")
    if backend == "ray" and not _importable("ray"):
        raise UserError("--backend ray needs Ray, which is not installed: pip install 'mirrorsym[distributed]' "
                        "(or use --backend local)")
    if address is not None and backend != "ray":
        raise UserError("--address is a Ray cluster address: use it with --backend ray")
    notes: list[str] = []
    if data_dir is not None:
        data_dir, notes = check_data_dir(Path(data_dir), chosen, reg, size)
    out = require_writable_dir(out, "--out")  # last: a mistake above leaves no empty folder behind
    return chosen, out, data_dir, notes


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked
    return importlib.util.find_spec(module) is not None


def check_data_dir(data_dir: Path, chosen: list[str], reg: dict[str, Any], size: str) -> tuple[Path, list[str]]:
    """Validate ``--data-dir`` for the chosen experiments at ``size``: ``(resolved folder, warnings)``.

    A data set that an experiment would read must be either absent (the experiment then skips that
    part: a warning) or complete and valid (every file read once with the library's own checks). If
    none of the data sets the chosen experiments read is there, the folder is wrong: an error."""
    from ..experiments.data import check_cifar10, check_mnist, present_files

    data_dir = data_dir.expanduser().resolve()
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder; point it at the folder holding "
                        f"{LAYOUTS['cifar10']} and/or {LAYOUTS['mnist']}")
    wanted: dict[str, list[str]] = {}  # data set -> the experiments that read it
    for name in chosen:
        reader = DATA_READERS.get(name)  # (config flag, data set) or None
        if reader is not None and getattr(reg[name].CONFIGS[size], reader[0], False):
            wanted.setdefault(reader[1], []).append(name)
    if not wanted:
        by = ", ".join(f"{e} ({d})" for e, (_, d) in DATA_READERS.items())
        return data_dir, [f"--data-dir is read only at --full size, by {by}; this run does not use it"]
    found = {d: present_files(data_dir, d) for d in wanted}
    if not any(found.values()):
        expected = " and/or ".join(f"{data_dir}/{LAYOUTS[d]}" for d in wanted)
        raise UserError(f"--data-dir {data_dir} holds none of the data sets that {', '.join(sum(wanted.values(), []))} "
                        f"would read: expected {expected}")
    checks = {"cifar10": check_cifar10, "mnist": check_mnist}
    notes = []
    for dataset, readers in wanted.items():
        if not found[dataset]:
            notes.append(f"--data-dir {data_dir} has no {LAYOUTS[dataset].split(' ')[0]}: "
                         f"{', '.join(readers)} will run without {dataset}")
            continue
        try:
            checks[dataset](data_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"--data-dir: {one_line(exc)}") from exc
    return data_dir, notes
