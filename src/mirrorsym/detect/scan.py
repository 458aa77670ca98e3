"""``mirrorsym scan MODEL``: resolve a model by name/path, find its symmetries, show them."""

from __future__ import annotations

import importlib
import os
import warnings

import torch
from torch import nn

from .examples import EXAMPLES, example
from .find import find_symmetries
from .smap import SymmetryMap

DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ValueError(
            f"--input-shape must be comma-separated integers like 1,3,224,224, got {text!r}"
        ) from None
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def load_model(spec: str, input_shape: tuple[int, ...] | None = None):
    """``(model, example_inputs)`` from a built-in example name, a ``package.module:factory`` path,
    a ``torch.save``'d module file, or a torchvision model name (random init, never downloads)."""
    gen = torch.Generator().manual_seed(0)
    if spec in EXAMPLES:
        model, x = example(spec)
        return model, (torch.randn(*input_shape, generator=gen) if input_shape else x)
    if os.path.isfile(spec):
        model = torch.load(spec, weights_only=False, map_location="cpu")
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{spec} holds a {type(model).__name__}, not an nn.Module; save the module itself "
                "(torch.save(model, path)), not its state_dict"
            )
        return model, _inputs(spec, input_shape, gen)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load {spec!r}: {exc}") from exc
        out = factory()
        if isinstance(out, tuple):
            model, x = out
            return model, (torch.randn(*input_shape, generator=gen) if input_shape else x)
        return out, _inputs(spec, input_shape, gen)
    try:
        import torchvision
    except ImportError:
        raise ValueError(
            f"{spec!r} is not a built-in example ({', '.join(sorted(EXAMPLES))}), a file, or a "
            "package.module:factory path, and torchvision (for model names) is not installed"
        ) from None
    try:
        model = torchvision.models.get_model(spec, weights=None)
    except ValueError as exc:
        raise ValueError(f"unknown model {spec!r}: {exc}") from exc
    return model.eval(), torch.randn(*(input_shape or DEFAULT_IMAGE_SHAPE), generator=gen)


def _inputs(spec: str, input_shape, gen) -> torch.Tensor:
    if input_shape is None:
        raise ValueError(f"{spec}: give the input shape, e.g. --input-shape 1,3,224,224")
    return torch.randn(*input_shape, generator=gen)


def scan(spec: str, input_shape: str | None = None) -> tuple[SymmetryMap, list[str]]:
    """Run the detector on ``spec``; returns the map and the warnings it raised (as text)."""
    model, x = load_model(spec, parse_shape(input_shape))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smap = find_symmetries(model, x)
    return smap, [str(w.message) for w in caught]


def render(smap: SymmetryMap, spec: str, notes: list[str], console) -> None:
    """A rich table: kind, size, layers, parameters moved, verification error; then a total line."""
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
        "from the joint float64 check (SymmetryMap.verify measures each group alone)"
        + (f"; {len(smap.unknown_ops)} op types not understood" if smap.unknown_ops else "")
    )
