"""``mirrorsym diagnose MODEL [--checkpoint PATH] [--data digits|DIR] [--out DIR]``.

MODEL, ``--checkpoint`` and the example input follow :mod:`.loading`. ``--data``: ``digits``
(scikit-learn's 8×8 digits, pixels / 16, shaped (N, 64), or (N, 1, 8, 8) when the model's first parameter
is a 4-D convolution kernel), or a folder holding ``x.npy`` (and optionally ``y.npy``; read without
pickle) or one ``*.pt`` file (read weights-only) with a dict ``{"x": ..., "y": ...}``, a tuple ``(x, y)``
or a Tensor. The example input is ``--input-shape`` if given, else the first two data rows, else the
model's own. Writes the summary to the console and, to ``--out``, ``groups.csv``, ``activations.csv``
(with data), ``summary.txt`` and the PNG figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from torch import nn

from .errors import UserError, one_line, require_writable_dir
from .loading import CheckpointOpt, InputDtypeOpt, InputHighOpt, InputShapeOpt, InputSpec, ModelArg, TrustPickleOpt


def diagnose(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="Probe data: 'digits' or a folder with x.npy (+ y.npy) or one .pt file.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for tables and figures.")] = Path("diagnose"),
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    input_high: InputHighOpt = None,
    classifier: Annotated[str | None, typer.Option(
        "--classifier", help="Linear head for neural collapse (default: the last nn.Linear).")] = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """Diagnose dead, duplicated and low-rank structure: print a summary, write tables and figures to OUT.

    --input-shape is the full example-input shape including the batch dimension (e.g. 2,64); without it
    the first two rows of --data (or the model's own example input) are used."""
    from rich.console import Console

    from ..diagnose.report import default_symmetries
    from ..diagnose.report import diagnose as run_diagnose
    from .loading import check_forward, example_inputs, load

    net, own = load(model, checkpoint, trust_pickle)
    probe = load_data(data, net)
    rows = None
    if probe is not None:
        ref = next((p for p in net.parameters() if p.is_floating_point()), None)
        rows = probe[0][:2]
        if rows.is_floating_point() and ref is not None:
            rows = rows.to(ref.dtype)
    x = example_inputs(net, rows if rows is not None else own, InputSpec(input_shape, input_dtype, input_high))
    check_forward(net, x, model)
    probe_set = probe[0] if probe is not None and probe[1] is None else probe  # unlabelled: inputs only
    out = require_writable_dir(out, "--out")  # after the quick checks: a mistake leaves no empty folder
    console = Console()
    with console.status("finding symmetries ..."):
        smap = default_symmetries(net, x)
    rep = run_diagnose(net, x, data=probe_set, symmetries=smap, classifier=classifier, progress=True)
    rep.to_pandas().to_csv(out / "groups.csv", index=False)
    if rep.activations is not None:
        rep.activations.to_csv(out / "activations.csv", index=False)
    text = rep.summary()
    (out / "summary.txt").write_text(text + "\n")
    paths = rep.plot(out)
    console.print(text)
    console.print(f"wrote {len(paths)} figures and the tables to {out}/")


def load_data(spec: str | None, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(x, y or None)`` from ``--data`` (see the module docstring), or None without it."""
    if spec is None:
        return None
    y: torch.Tensor | None
    if spec == "digits":
        from ..experiments.data import digits

        x, y = digits()
        first = next(model.parameters(), None)
        if first is not None and first.dim() == 4:
            x = x.reshape(-1, 1, 8, 8)
        return x, y
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {spec}: neither 'digits' nor a folder (with x.npy [+ y.npy] or one .pt file)")
    if (root / "x.npy").is_file():
        try:  # allow_pickle=False: an object array would run pickle code
            x = torch.from_numpy(np.load(root / "x.npy", allow_pickle=False))
            y = (torch.from_numpy(np.load(root / "y.npy", allow_pickle=False))
                 if (root / "y.npy").is_file() else None)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"--data {spec}: x.npy / y.npy cannot be read as numeric arrays ({one_line(exc)})") from exc
        return x.float() if x.dtype == torch.float64 else x, y
    pts = sorted(root.glob("*.pt"))
    if len(pts) != 1:
        raise UserError(f"--data {spec}: expected x.npy (+ y.npy) or exactly one *.pt file, found {len(pts)} .pt")
    try:
        obj = torch.load(pts[0], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--data {pts[0]} cannot be read weights-only ({type(exc).__name__}: "
                        f"{one_line(exc)[:300]}); save tensors only: torch.save({{'x': x, 'y': y}}, path)") from exc
    if isinstance(obj, dict) and isinstance(obj.get("x"), torch.Tensor):
        return obj["x"], obj.get("y")
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], torch.Tensor):
        return obj[0], obj[1]
    if isinstance(obj, torch.Tensor):
        return obj, None
    raise UserError(f"--data {pts[0]}: expected a dict with 'x' (and 'y'), a tuple (x, y) or a Tensor")
