"""``mirrorsym scan MODEL``: find a model's parameter symmetries and show them as a table or JSON."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Annotated

import typer

from .loading import CheckpointOpt, InputDtypeOpt, InputHighOpt, InputShapeOpt, InputSpec, ModelArg, TrustPickleOpt

if TYPE_CHECKING:
    from rich.console import Console

    from ..detect.smap import SymmetryMap


def scan(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    input_high: InputHighOpt = None,
    checkpoint: CheckpointOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the SymmetryMap as JSON instead of a table.")] = False,
    fold_norms: Annotated[bool, typer.Option(
        "--fold-norms", help="Scan the model with its norm gains folded into the maps that read them and the "
        "folded RMS norms made gain-free (ms.detect.fold_norms(model, drop_gains=True)): the residual-stream "
        "rotations that exist only then are reported.")] = False,
) -> None:
    """Find MODEL's parameter symmetries: kind, size, layers, parameters moved, verification error.

    --input-shape is the full example-input shape including the batch dimension (e.g. 1,3,224,224)."""
    from rich.console import Console

    from ..detect import find_symmetries
    from .loading import prepare

    net, x = prepare(model, InputSpec(input_shape, input_dtype, input_high), checkpoint, trust_pickle)
    console = Console(stderr=json_)  # with --json, stdout holds nothing but the JSON
    if fold_norms:
        from ..detect import GainFreeRMSNorm
        from ..detect import fold_norms as fold

        net = fold(net, drop_gains=True)
        gain_free = sum(isinstance(m, GainFreeRMSNorm) for m in net.modules())
        console.print(f"--fold-norms: {gain_free} RMS norms folded into their readers and made gain-free"
                      + ("" if gain_free else " (none recognised: the model is scanned as it is)"))
    with console.status(f"tracing, classifying and verifying the symmetries of {model} ..."):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            smap = find_symmetries(net, x)
    notes = [str(w.message) for w in caught]
    if json_:
        for note in notes:
            typer.echo(f"warning: {note}", err=True)
        typer.echo(smap.to_json(indent=2))
    else:
        render(smap, model, notes, console)


def render(smap: SymmetryMap, spec: str, notes: list[str], console: Console) -> None:
    """A rich table: kind, size, layers, parameters moved, verification error; then the warnings and a
    total line."""
    from rich.table import Table

    table = Table(title=f"Symmetries of {spec}")
    for col in ("#", "kind", "size", "layers", "parameters moved", "verification error"):
        table.add_column(col, justify="right" if col in ("#", "size", "verification error") else "left")
    for i, g in enumerate(smap.groups):
        layers = ", ".join(g.layers[:3]) + (f" (+{len(g.layers) - 3})" if len(g.layers) > 3 else "")
        moved = f"{g.num_coordinates:,} in {len(g.params)} tensors"
        err = "-" if g.error is None else f"{g.error:.1e}"
        table.add_row(str(i), g.kind, str(g.size), layers, moved, err)
    console.print(table)
    for note in notes:
        console.print(f"[yellow]warning:[/yellow] {note}")
    total = sum(g.num_coordinates for g in smap.groups)
    console.print(
        f"Total: {smap.summary()}, moving {total:,} parameter coordinates (counted per group); errors "
        "from a float64 check of each group alone"
        + (f"; {len(smap.unknown_ops)} op types not understood" if smap.unknown_ops else "")
    )
