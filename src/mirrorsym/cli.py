"""The ``mirrorsym`` command line (typer + rich). Thin: parse, call the library, show progress."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="mirrorsym: find, diagnose, predict and control the parameter symmetries of PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def reproduce(
    names: Annotated[list[str] | None, typer.Argument(help="Experiments to run (default: all). See --list.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: everything in <= 10 min on 2 CPUs.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Paper-sized grids (for a GPU or a Ray cluster).")] = False,
    out: Annotated[Path, typer.Option("--out", help="Output directory for the report and figures.")] = Path("report"),
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    backend: Annotated[str, typer.Option("--backend", help="Sweep backend: local | ray")] = "local",
    address: Annotated[str | None, typer.Option("--address", help="Ray address (with --backend ray).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the experiments and exit.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore stored results and rerun everything.")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Folder with real data in torchvision's layout, used with --full: "
        "cifar-10-batches-py/ (permutation also trains ResNet-18 on CIFAR-10) and MNIST/raw/ (plasticity "
        "adds permuted MNIST). Nothing is downloaded.")] = None,
) -> None:
    """Reproduce the paper's claims: figures, report.html, report.md and claims.json in OUT."""
    from .experiments import registry
    from .report.runner import run_reproduction

    if list_:
        for name, exp in registry().items():
            typer.echo(f"{name:14s} {exp.TITLE}")
        return
    if quick and full:
        raise typer.BadParameter("choose one of --quick and --full")
    size = "full" if full else "quick"
    code = run_reproduction(names or None, size=size, out=out, device=device, backend=backend,
                            address=address, fresh=fresh, data_dir=data_dir)
    raise typer.Exit(code)


@app.command("diagnose")
def diagnose_command(
    model: Annotated[str, typer.Argument(help="package.module:name or file.py:name (a module or a factory), "
                                              "or a saved model.pt")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="State dict to load (strict).")] = None,
    data: Annotated[str, typer.Option("--data", help="Probe data: 'digits' or a directory "
                                                     "(x.npy [+ y.npy] or one .pt).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for tables and figures.")] = Path("diagnose"),
    input_shape: Annotated[str, typer.Option("--input-shape", help="Input shape without batch, e.g. 64 or "
                                             "3,32,32 (needed without --data).")] = None,
    classifier: Annotated[str, typer.Option("--classifier", help="Linear head for neural collapse "
                                                                 "(default: the last nn.Linear).")] = None,
) -> None:
    """Diagnose dead, duplicated and low-rank structure: print a summary, write tables and figures to OUT."""
    from .diagnose.cli import CliError, run

    try:
        run(model, checkpoint=checkpoint, data=data, out=out, input_shape=input_shape, classifier=classifier)
    except (CliError, ValueError, KeyError, TypeError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc


@app.command("scan")
def scan_command(
    model: str = typer.Argument(..., help="A built-in example (mlp-tanh, mlp-relu, cnn, attention, "
                                "transformer, gpt, lora), a torchvision model name (random init, no "
                                "download), a package.module:factory path, or a torch.save'd model file."),
    input_shape: str = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224."),
    json_: bool = typer.Option(False, "--json", help="Print the SymmetryMap as JSON instead of a table."),
) -> None:
    """Find MODEL's parameter symmetries: kind, size, layers, parameters moved, verification error."""
    from rich.console import Console

    from .detect.scan import render, scan

    console = Console(stderr=json_)
    try:
        with console.status(f"tracing, classifying and verifying the symmetries of {model} ..."):
            smap, notes = scan(model, input_shape)
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_:
        for note in notes:
            typer.echo(f"warning: {note}", err=True)
        typer.echo(smap.to_json(indent=2))
    else:
        render(smap, model, notes, console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
