"""The logic behind ``mirrorsym diagnose MODEL [--checkpoint PATH] [--data digits|DIR] [--out DIR]``.

MODEL is one of
* ``package.module:name`` or ``path/to/file.py:name``: ``name`` is an ``nn.Module`` or a callable that
  returns one when called without arguments;
* ``path/to/model.pt``: a whole pickled module saved with ``torch.save(model)`` (loaded with
  ``weights_only=False``: only load files you trust).

``--checkpoint PATH``: a state dict (or a dict holding one under ``state_dict`` / ``model``) loaded
strictly. ``--data``: ``digits`` (scikit-learn's 8×8 digits, pixels / 16, shaped (N, 64), or (N, 1, 8, 8)
when the model's first parameter is a 4-D convolution kernel), or a directory holding ``x.npy`` (and
optionally ``y.npy``) or one ``*.pt`` file with a dict ``{"x": ..., "y": ...}`` or a tuple ``(x, y)``.
The example inputs are the first two data rows, or zeros of ``--input-shape`` (e.g. ``64`` or
``3,32,32``, batch dim excluded) without data. Writes the summary to the console and, to ``--out``,
``groups.csv``, ``activations.csv`` (with data), ``summary.txt`` and the PNG figures.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn


class CliError(ValueError):
    """A user error: printed without a traceback."""


def load_model(spec: str) -> nn.Module:
    path = Path(spec)
    if path.suffix in (".pt", ".pth") and ":" not in path.name:
        if not path.is_file():
            raise CliError(f"model file {spec!r} does not exist")
        obj = torch.load(path, map_location="cpu", weights_only=False)
        return _as_module(obj, spec)
    if ":" not in spec:
        raise CliError(f"MODEL {spec!r}: give 'package.module:name', 'file.py:name' or a saved 'model.pt'")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        file = Path(where)
        if not file.is_file():
            raise CliError(f"MODEL {spec!r}: file {where!r} does not exist")
        mspec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise CliError(f"MODEL {spec!r}: cannot import {where!r} ({exc})") from exc
    if not hasattr(module, name):
        raise CliError(f"MODEL {spec!r}: {where!r} has no attribute {name!r}")
    obj = getattr(module, name)
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = obj()
    return _as_module(obj, spec)


def _as_module(obj, spec: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise CliError(f"MODEL {spec!r} gave a {type(obj).__name__}, not an nn.Module")
    return obj


def load_checkpoint(model: nn.Module, path: Path) -> None:
    if not Path(path).is_file():
        raise CliError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CliError(f"checkpoint {str(path)!r} does not fit the model: {exc}") from exc


def load_data(spec: str | None, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if spec is None:
        return None
    if spec == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        first = next(model.parameters(), None)
        if first is not None and first.dim() == 4:
            x = x.reshape(-1, 1, 8, 8)
        return x, torch.tensor(d.target, dtype=torch.long)
    root = Path(spec)
    if not root.is_dir():
        raise CliError(f"--data {spec!r}: not 'digits' and not a directory")
    if (root / "x.npy").is_file():
        x = torch.from_numpy(np.load(root / "x.npy"))
        y = torch.from_numpy(np.load(root / "y.npy")) if (root / "y.npy").is_file() else None
        return x.float() if x.dtype == torch.float64 else x, y
    pts = sorted(root.glob("*.pt"))
    if len(pts) != 1:
        raise CliError(
            f"--data {spec!r}: expected x.npy (+ y.npy) or exactly one *.pt file, found {len(pts)} .pt"
        )
    obj = torch.load(pts[0], map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "x" in obj:
        return obj["x"], obj.get("y")
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    if isinstance(obj, torch.Tensor):
        return obj, None
    raise CliError(f"--data {str(pts[0])!r}: expected a dict with 'x' (and 'y'), a tuple (x, y) or a Tensor")


def example_inputs_for(model: nn.Module, data, input_shape: str | None) -> torch.Tensor:
    ref = next(model.parameters(), None)
    dtype = ref.dtype if ref is not None else torch.float32
    if input_shape:
        try:
            shape = tuple(int(s) for s in input_shape.split(","))
        except ValueError as exc:
            raise CliError(f"--input-shape {input_shape!r}: give comma-separated ints, e.g. 3,32,32") from exc
        return torch.zeros((2, *shape), dtype=dtype)
    if data is None:
        raise CliError("give --data or --input-shape so that the model can be traced")
    x = data[0][:2]
    return x.to(dtype) if x.dtype.is_floating_point else x


def run(
    model: str,
    checkpoint: Path | None = None,
    data: str | None = None,
    out: Path = Path("diagnose"),
    input_shape: str | None = None,
    classifier: str | None = None,
    console=None,
):
    """Load, diagnose, print the summary and write tables and figures; returns the report."""
    from rich.console import Console

    from .report import default_symmetries, diagnose

    console = console or Console()
    net = load_model(model)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
    probe_data = load_data(data, net)
    example = example_inputs_for(net, probe_data, input_shape)
    if probe_data is not None and probe_data[1] is None:
        probe_data = probe_data[0]
    with console.status("finding symmetries ..."):
        smap = default_symmetries(net, example)
    rep = diagnose(net, example, data=probe_data, symmetries=smap, classifier=classifier, progress=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep.to_pandas().to_csv(out / "groups.csv", index=False)
    if rep.activations is not None:
        rep.activations.to_csv(out / "activations.csv", index=False)
    text = rep.summary()
    (out / "summary.txt").write_text(text + "\n")
    paths = rep.plot(out)
    console.print(text)
    console.print(f"wrote {len(paths)} figures and the tables to {out}/")
    return rep
