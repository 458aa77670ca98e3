"""The ONE model loader and the ONE example-input convention of every ``mirrorsym`` command.

MODEL is resolved in this order:

1. a name: a built-in example (:mod:`mirrorsym.detect.examples`: ``mlp-tanh``, ``cnn``, ``gpt``, ...) or a
   torchvision model name (``resnet18``; random init, never downloads). Names come first, and a bare
   word (no ``/``, no suffix) is only ever a name, so a stray file ``resnet18`` in the working directory
   is never read: write ``./resnet18`` to load such a file;
2. a path that exists: a folder holding ``config.json`` is a local Hugging Face model
   (``transformers.AutoModel.from_pretrained(path, local_files_only=True)``); a file is a ``torch.save``
   file read with ``torch.load(weights_only=True)``, which cannot run code. A whole pickled module needs
   full unpickling, which executes code from the file: only with ``--trust-pickle`` (then
   ``weights_only=False``). A plain state_dict is not a model: pass the architecture as MODEL and the file
   as ``--checkpoint``. A file written by ``ms.constrain.save_exported`` (marker ``mirrorsym_format:
   "exported"``) is a model: its architecture tree of standard torch modules is rebuilt;
3. ``package.module:name`` or ``path/to/file.py:name``: ``name`` is an ``nn.Module``, or a zero-argument
   factory (a function or class) returning an ``nn.Module`` or ``(model, example_inputs)``. Importing it
   runs that code: it is yours.

``--checkpoint PATH`` is a state dict (or a dict holding one under ``state_dict`` / ``model``), always read
with ``weights_only=True`` and loaded strictly. A file written by ``ms.constrain.save_constrained`` (marker
``mirrorsym_format: "constrained"``) first re-registers its DCS parametrizations on the plain MODEL.

Example inputs: ``--input-shape`` is the FULL shape including the batch dimension (``1,3,224,224`` for
images, ``1,16`` for 16 tokens). ``--input-dtype float32|float64|long`` (default: ``long`` when the model's
first layer with parameters is an ``nn.Embedding``, else the dtype of its parameters); floats are standard
normal, ``long`` are random token ids in ``[0, high)`` with ``high`` = ``--input-high`` or the
``num_embeddings`` of the model's first ``nn.Embedding``. Values come from a generator seeded with 0.
Without ``--input-shape`` a command uses the model's own example input (built-in examples, factories that
return one, torchvision: ``1,3,224,224``).

Every failure is a :class:`~.errors.UserError` naming MODEL, the file or the option and the fix.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer
from torch import nn

from .errors import UserError, one_line

if TYPE_CHECKING:
    from ..detect.smap import ExampleInputs

TORCHVISION_INPUT_SHAPE = (1, 3, 224, 224)

INPUT_SHAPE_HELP = ("Example input shape: the FULL shape including the batch dimension, comma-separated, "
                    "e.g. 1,3,224,224 (images) or 1,16 (16 tokens, with --input-dtype long). Default: the "
                    "model's own example input (built-in examples, factories returning one; torchvision: "
                    "1,3,224,224).")
MODEL_HELP = ("A built-in example (mlp-tanh, mlp-relu, cnn, attention, transformer, gpt, llama, lora) or a "
              "torchvision model name (random init, no download) - names come first, so write ./NAME for a "
              "file called NAME; package.module:factory or file.py:name (an nn.Module or a zero-argument "
              "factory, which may also return (model, example_inputs)); a torch.save'd file (read "
              "weights-only; a whole pickled model needs --trust-pickle); or a local Hugging Face model "
              "folder (config.json; needs transformers).")


class InputDtype(str, enum.Enum):
    """``--input-dtype``: the dtype of the generated example input."""

    float32 = "float32"
    float64 = "float64"
    long = "long"


TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "long": torch.long}

# The options every model-loading command takes, with one meaning and one help text each.
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="A state_dict file (torch.save(model.state_dict(), path), or a dict holding it "
    "under 'state_dict' or 'model') loaded strictly into MODEL; always read weights-only.")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow MODEL to be a whole pickled model (torch.save(model)). Unpickling it "
    "EXECUTES CODE FROM THE FILE: use only for files you trust. Without it, files are read weights-only.")]
InputShapeOpt = Annotated[str | None, typer.Option("--input-shape", help=INPUT_SHAPE_HELP)]
InputDtypeOpt = Annotated[InputDtype | None, typer.Option(
    "--input-dtype", help="dtype of the example input: float32, float64 or long (token ids). Default: long "
    "when the model's first layer is an nn.Embedding, else the dtype of the model's parameters.")]
InputHighOpt = Annotated[int | None, typer.Option(
    "--input-high", help="With --input-dtype long: token ids are drawn from [0, HIGH). Default: the "
    "num_embeddings of the model's first nn.Embedding.")]


@dataclass
class InputSpec:
    """The command line's description of the example input (any field may be None: not given)."""

    shape: str | None = None
    dtype: InputDtype | str | None = None
    high: int | None = None

    @property
    def given(self) -> bool:
        return self.shape is not None or self.dtype is not None or self.high is not None


# ---------------------------------------------------------------------------------------------------------
# MODEL


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is written as a path: it has a directory part, starts with ``.`` or ``~``, or has
    a suffix (``model.pt``). A bare word such as ``resnet18`` is always a model name."""
    return ("/" in spec or os.sep in spec or spec.startswith((".", "~")) or bool(Path(spec).suffix))


def _torchvision():
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision


def load_model(spec: str, trust_pickle: bool = False) -> tuple[nn.Module, ExampleInputs | None]:
    """``(model, example_inputs or None)`` for MODEL ``spec``, resolved as the module docstring says."""
    from ..detect.examples import EXAMPLES, example

    if spec in EXAMPLES:
        return example(spec)
    tv = _torchvision()
    if tv is not None and not looks_like_path(spec) and spec in tv.models.list_models():
        model = tv.models.get_model(spec, **_no_download(tv, spec))
        gen = torch.Generator().manual_seed(0)
        return model.eval(), torch.randn(*TORCHVISION_INPUT_SHAPE, generator=gen)
    path = Path(spec).expanduser()
    if looks_like_path(spec) and path.exists():
        if path.is_dir():
            return _from_huggingface_folder(path), None
        return _from_file(path, trust_pickle), None
    if ":" in spec:
        return _from_factory(spec)
    if looks_like_path(spec):
        raise UserError(f"MODEL {spec}: no such file or folder")
    names = ", ".join(sorted(EXAMPLES))
    if tv is None:
        tv_note = "torchvision (for model names like resnet18) is not installed"
    else:
        tv_note = "it is not a torchvision model name either (torchvision.models.list_models())"
    stray = f"; to load the file {spec} in this folder, write ./{spec}" if path.exists() else ""
    raise UserError(f"MODEL {spec!r} is not a built-in example ({names}) and {tv_note}{stray}; MODEL may "
                    "also be package.module:factory, file.py:name or a path")


def _no_download(tv, name: str) -> dict:
    """Builder arguments for random init without any download: ``weights=None``, and for detection and
    segmentation models also ``weights_backbone=None`` (its default is a pretrained backbone)."""
    import inspect

    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(tv.models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None
    return kwargs


def _weights_only_refusal(exc: BaseException) -> str | None:
    """What torch's weights-only unpickler refused ('the global X' or its own reason), or None if
    ``exc`` is not such a refusal (then the file is broken rather than untrusted)."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the global {found.group(1)}"
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return reason.group(1).strip() if reason else "a non-tensor object"


def _torch_load(path: Path, weights_only: bool):
    with warnings.catch_warnings():
        # torch warns about pickle protocols it did not write; the outcome is handled by the caller
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _is_state_dict(obj) -> bool:
    if not isinstance(obj, Mapping):
        return False
    if any(isinstance(obj.get(k), Mapping) for k in ("state_dict", "model")):
        return True
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_file(path: Path, trust_pickle: bool) -> nn.Module:
    if path.stat().st_size == 0:
        raise UserError(f"MODEL file {path} is empty (0 bytes); was the save interrupted?")
    try:
        obj = _torch_load(path, weights_only=not trust_pickle)
    except Exception as exc:
        refused = None if trust_pickle else _weights_only_refusal(exc)
        if refused is not None:
            raise UserError(
                f"MODEL file {path} is a pickled Python object (the weights-only reader refused {refused}); "
                "unpickling it executes code from the file. If you trust the file, add --trust-pickle; "
                "otherwise save a state_dict (torch.save(model.state_dict(), path)) and pass the "
                f"architecture as MODEL (package.module:factory or file.py:name) with --checkpoint {path}"
            ) from exc
        raise UserError(f"MODEL file {path} cannot be read by torch.load ({type(exc).__name__}: "
                        f"{one_line(exc)[:300]}); is it a complete torch.save file?") from exc
    if isinstance(obj, nn.Module):
        return obj
    fmt = _mirrorsym_format(obj)
    if fmt == "exported":
        return _rebuild_exported(obj, path)
    if fmt == "constrained":
        raise UserError(
            f"MODEL file {path} holds a constrained model's weights (ms.constrain.save_constrained), which "
            "need the plain architecture: pass it as MODEL (package.module:factory or file.py:name) and this "
            f"file as --checkpoint {path}")
    if _is_state_dict(obj):
        raise UserError(
            f"MODEL file {path} holds a state_dict (weights without the architecture): pass the architecture "
            f"as MODEL (package.module:factory or file.py:name) and this file as --checkpoint {path}")
    raise UserError(f"MODEL file {path} holds a {type(obj).__name__}, not an nn.Module; save the model "
                    "(torch.save(model, path), needs --trust-pickle) or its state_dict (with --checkpoint)")


def _from_huggingface_folder(path: Path) -> nn.Module:
    if not (path / "config.json").is_file():
        raise UserError(f"MODEL {path} is a folder without config.json; MODEL may be a local Hugging Face "
                        "model folder (save_pretrained), a file, a name or package.module:factory")
    try:
        import transformers
    except ImportError:
        raise UserError(f"MODEL {path} is a Hugging Face model folder (config.json), which needs the "
                        "transformers package: pip install transformers") from None
    try:
        # local_files_only: never reach the network; remote code stays off (transformers' default)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise UserError(f"MODEL {path}: transformers.AutoModel.from_pretrained failed ({type(exc).__name__}: "
                        f"{one_line(exc)[:300]})") from exc
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):  # a key/value cache is not a tensor output: trace without it
        model.config.use_cache = False
    return model.eval()


def _import_module(where: str, spec: str):
    if where.endswith(".py"):
        file = Path(where).expanduser()
        if not file.is_file():
            raise UserError(f"MODEL {spec}: file {where} does not exist")
        name = f"_mirrorsym_model_{file.stem}"
        mspec = importlib.util.spec_from_file_location(name, file)
        if mspec is None or mspec.loader is None:
            raise UserError(f"MODEL {spec}: {where} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module  # dataclasses and pickling look classes up by module name
        folder = str(file.resolve().parent)
        sys.path.insert(0, folder)  # the file imports its neighbours, as under `python file.py`
        try:
            mspec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"MODEL {spec}: running {where} raised {type(exc).__name__}: {one_line(exc)}") from exc
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
        return module
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", where):
        raise UserError(f"MODEL {spec}: {where!r} is neither a .py file nor a module path like "
                        "package.module; write package.module:factory or path/to/file.py:name")
    # the working folder goes last on sys.path: its modules are found, but never shadow installed ones
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise UserError(f"MODEL {spec}: cannot import {where} ({exc}); is the package installed, or is "
                        "the current folder the one that holds it?") from exc
    except Exception as exc:
        raise UserError(f"MODEL {spec}: importing {where} raised {type(exc).__name__}: {one_line(exc)}") from exc
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _from_factory(spec: str) -> tuple[nn.Module, ExampleInputs | None]:
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise UserError(f"MODEL {spec}: write package.module:name or path/to/file.py:name")
    module = _import_module(where, spec)
    if not hasattr(module, attr):
        raise UserError(f"MODEL {spec}: {where} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if not isinstance(obj, nn.Module) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise UserError(f"MODEL {spec}: calling {attr}() raised {type(exc).__name__}: {one_line(exc)}; "
                            "MODEL must be an nn.Module or a factory callable without arguments") from exc
    example = None
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        obj, example = obj
    if not isinstance(obj, nn.Module):
        raise UserError(f"MODEL {spec} gave a {type(obj).__name__}, not an nn.Module (or a tuple "
                        "(model, example_inputs))")
    return obj, example


# ---------------------------------------------------------------------------------------------------------
# mirrorsym's own save formats (ms.constrain.save_exported / save_constrained): a dict with a format marker


def _mirrorsym_format(obj) -> str | None:
    """``"exported"`` / ``"constrained"`` for a dict written by ``ms.constrain.save_exported`` /
    ``save_constrained`` (marker key ``mirrorsym_format``), else None."""
    from ..constrain.serialize import file_format

    return file_format(obj)


def _rebuild_exported(obj: Mapping, path: Path) -> nn.Module:
    """The exported model rebuilt from the file's architecture tree (standard torch modules only)."""
    from ..constrain.serialize import model_from_exported

    try:
        return model_from_exported(obj, f"MODEL file {path}")
    except ValueError as exc:
        raise UserError(one_line(exc)[:500]) from exc


def _constrain_like(model: nn.Module, obj: Mapping, path: Path) -> None:
    """Register on the plain MODEL the parametrizations the constrained checkpoint describes."""
    from ..constrain.serialize import VERSION, constrain_like

    if int(obj.get("version", 0)) > VERSION:
        raise UserError(f"--checkpoint {path} has mirrorsym format version {obj['version']}; this mirrorsym "
                        f"reads up to {VERSION}: upgrade mirrorsym")
    try:
        constrain_like(model, obj["parametrizations"], obj["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"--checkpoint {path} (a constrained model) does not fit MODEL: {one_line(exc)[:300]}") from exc


# ---------------------------------------------------------------------------------------------------------
# --checkpoint


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load the state dict in ``path`` (weights-only) strictly into ``model``; a UserError otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"--checkpoint {path} is empty (0 bytes); was the save interrupted?")
    try:
        state = _torch_load(path, weights_only=True)
    except Exception as exc:
        refused = _weights_only_refusal(exc)
        if refused is not None:
            raise UserError(
                f"--checkpoint {path} holds pickled Python objects (the weights-only reader refused "
                f"{refused}), not only tensors; --checkpoint takes a state_dict: torch.save(model.state_dict(), "
                "path). A whole pickled model goes as MODEL, with --trust-pickle if you trust it") from exc
        raise UserError(f"--checkpoint {path} cannot be read by torch.load ({type(exc).__name__}: "
                        f"{one_line(exc)[:300]}); is it a complete torch.save file?") from exc
    fmt = _mirrorsym_format(state)
    if fmt == "exported":
        raise UserError(f"--checkpoint {path} holds an exported model with its architecture "
                        "(ms.constrain.save_exported): pass the file as MODEL, without --checkpoint")
    if fmt == "constrained":
        _constrain_like(model, state, path)
        state = state["state_dict"]
    elif isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--checkpoint {path} holds a {type(state).__name__} that is not a state_dict (a "
                        "dict of tensors, possibly under 'state_dict' or 'model')")
    if not state:
        raise UserError(f"--checkpoint {path} holds an empty state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"--checkpoint {path} does not fit MODEL: {one_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------------------
# example inputs and checks


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``: the full shape with the batch
    dimension, so at least two positive integers."""
    try:
        shape = tuple(int(s) for s in re.split(r"[,x]", text.strip()))
    except ValueError:
        raise UserError(f"--input-shape {text!r}: give comma-separated integers, the full shape including "
                        "the batch dimension, e.g. 1,3,224,224") from None
    if any(n <= 0 for n in shape):
        raise UserError(f"--input-shape {text!r}: every dimension must be a positive integer")
    if len(shape) < 2:
        raise UserError(f"--input-shape {text!r} has {len(shape)} dimension(s); give the full shape including "
                        f"the batch dimension, e.g. 1,{text.strip() or '16'}")
    return shape


def first_embedding(model: nn.Module) -> nn.Embedding | None:
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def default_dtype(model: nn.Module) -> str:
    """``long`` when the first layer with parameters is an nn.Embedding, else the parameters' dtype."""
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, nn.Embedding):
        return "long"
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return "float64" if ref is not None and ref.dtype == torch.float64 else "float32"


def make_input(model: nn.Module, shape: tuple[int, ...], dtype: str | None, high: int | None) -> torch.Tensor:
    """A seeded random example input of ``shape`` (see the module docstring for dtype and ``high``)."""
    dtype = dtype or default_dtype(model)
    gen = torch.Generator().manual_seed(0)
    if dtype != "long":
        if high is not None:
            raise UserError("--input-high applies only to --input-dtype long (token ids)")
        return torch.randn(*shape, generator=gen, dtype=TORCH_DTYPES[dtype])
    if high is None:
        emb = first_embedding(model)
        if emb is None:
            raise UserError("--input-dtype long: MODEL has no nn.Embedding to take the vocabulary size from; "
                            "give --input-high (token ids are drawn from [0, HIGH))")
        high = emb.num_embeddings
    if high <= 0:
        raise UserError(f"--input-high {high}: must be a positive integer")
    return torch.randint(0, high, shape, generator=gen)


def example_inputs(
    model: nn.Module, default: ExampleInputs | None, inputs: InputSpec, what: str = "MODEL"
) -> ExampleInputs:
    """The example input: built from ``inputs`` if given (shape from ``default`` when only the dtype or
    ``high`` is given), else ``default``; a UserError when neither says what the model eats."""
    dtype = inputs.dtype.value if isinstance(inputs.dtype, InputDtype) else inputs.dtype
    if inputs.shape is not None:
        return make_input(model, parse_shape(inputs.shape), dtype, inputs.high)
    if inputs.given:
        if not isinstance(default, torch.Tensor):
            raise UserError("--input-dtype / --input-high need --input-shape (the full shape including the "
                            "batch dimension, e.g. 1,16)")
        return make_input(model, tuple(default.shape), dtype, inputs.high)
    if default is None:
        raise UserError(f"{what} gives no example input: pass --input-shape, the full shape including the "
                        "batch dimension, e.g. 1,3,224,224 (images) or 1,16 with --input-dtype long (tokens)")
    return default


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def check_weights(model: nn.Module, spec: str) -> None:
    """A UserError naming the first parameter or buffer holding NaN or Inf: symmetries, distances and
    ranks of such weights are meaningless."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise UserError(f"MODEL {spec}: {kind} {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}; "
                                "fix the weights (or --checkpoint) before analysing them")


def check_forward(model: nn.Module, inputs: ExampleInputs, spec: str) -> None:
    """Run ``model(*inputs)`` once (eval mode, no grad; the mode is restored) so that a wrong input shape
    or dtype, or a broken forward, is reported as one line before any analysis starts."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    desc = ", ".join(f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" if isinstance(a, torch.Tensor)
                     else type(a).__name__ for a in args)
    training = model.training
    model.eval()  # train-mode BatchNorm would update its running statistics
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as exc:
        raise UserError(f"MODEL {spec} fails on the example input {desc}: {type(exc).__name__}: "
                        f"{one_line(exc)[:400]}; --input-shape is the full shape including the batch dimension "
                        "(and --input-dtype long for token ids)") from exc
    finally:
        model.train(training)
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(out)):
        raise UserError(f"MODEL {spec}: its output on the example input {desc} holds NaN/Inf values")


def load(
    spec: str, checkpoint: Path | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, ExampleInputs | None]:
    """MODEL with ``--checkpoint`` loaded into it and its weights checked: ``(model, own example input)``."""
    model, own = load_model(spec, trust_pickle)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    check_weights(model, spec)
    return model, own


def prepare(spec: str, inputs: InputSpec, checkpoint: Path | None = None,
            trust_pickle: bool = False) -> tuple[nn.Module, ExampleInputs]:
    """:func:`load`, then the example input (:func:`example_inputs`), checked by one forward pass:
    ``(model, example_inputs)``."""
    model, own = load(spec, checkpoint, trust_pickle)
    x = example_inputs(model, own, inputs)
    check_forward(model, x, spec)
    return model, x
