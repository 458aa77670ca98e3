"""The command line's security and error style: untrusted pickles never run without --trust-pickle, names
win over stray files, one model loader and one --input-shape convention, and every user mistake is one
line ``error: ...`` on stderr with exit code 2 (``--debug`` adds the traceback)."""

import importlib.util
import json
import pickle
import sys
import types

import pytest
import torch
from test_data_dir import write_cifar, write_mnist
from torch import nn
from typer.testing import CliRunner

import mirrorsym
import mirrorsym.report.runner as runner
from mirrorsym.cli import app
from mirrorsym.cli.loading import InputSpec, example_inputs, load_model, parse_shape

cli = CliRunner()

NET_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

def boom():
    raise RuntimeError("kaboom in the factory")

class BadForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        raise ValueError("broken forward")

def nan_weights():
    m = make()
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    return m

def not_a_model():
    return 42
"""


class Payload:
    """Unpickling this runs ``code`` (creates the marker file) and returns an nn.Linear(3, 2)."""

    def __init__(self, marker):
        self.code = f"(open({str(marker)!r}, 'w').close(), __import__('torch').nn.Linear(3, 2))[1]"

    def __reduce__(self):
        return (eval, (self.code,))


def check_one_line_error(result, *needles):
    """Exit code 2, exactly one non-empty stderr line starting with 'error:', no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with net.py (factories), a crafted pickle, checkpoints and a marker path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET_PY)
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), tmp_path / "evil.pt")
    torch.manual_seed(0)
    good = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.save(good.state_dict(), tmp_path / "state.pt")
    torch.save(good, tmp_path / "whole.pt")
    torch.save(nn.Linear(5, 5).state_dict(), tmp_path / "other.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "state.pt").read_bytes()[:100])
    (tmp_path / "afile").write_text("not a folder")
    return types.SimpleNamespace(path=tmp_path, marker=marker)


def test_version():
    result = cli.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"mirrorsym {mirrorsym.__version__}"


@pytest.mark.parametrize("command", ["scan", "diagnose"])
def test_help_states_the_conventions(command):
    result = cli.invoke(app, [command, "--help"], env={"COLUMNS": "100"})
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps help text in boxed columns
    assert result.exit_code == 0
    assert "FULL shape including the batch dimension" in text and "--input-dtype" in text
    assert "--trust-pickle" in text and "EXECUTES CODE FROM THE FILE" in text


# ---------------------------------------------------------------------------------------------------------
# untrusted files


@pytest.mark.parametrize("command", [["scan", "--input-shape", "1,3", "--json"],
                                     ["diagnose", "--input-shape", "2,3", "--out", "diag"]])
def test_crafted_pickle_runs_only_with_trust_pickle(work, command):
    name, *options = command
    result = cli.invoke(app, [name, "evil.pt", *options])
    check_one_line_error(result, "evil.pt", "--trust-pickle", "executes code")
    assert not work.marker.exists()
    result = cli.invoke(app, [name, "evil.pt", *options, "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert work.marker.exists()


def test_names_win_over_stray_files(work):
    # a stray crafted file named like a built-in example is never read when the name is given
    torch.save(Payload(work.marker), work.path / "mlp-tanh")
    result = cli.invoke(app, ["scan", "mlp-tanh", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["groups"]) == 4 and not work.marker.exists()
    # written as a path, the file is what is loaded (and, being a pickle, only with --trust-pickle)
    check_one_line_error(cli.invoke(app, ["scan", "./mlp-tanh", "--input-shape", "1,3"]), "--trust-pickle")
    assert not work.marker.exists()
    result = cli.invoke(app, ["scan", "./mlp-tanh", "--input-shape", "1,3", "--trust-pickle", "--json"])
    assert result.exit_code == 0 and work.marker.exists()
    work.marker.unlink()
    # a torchvision name: the architecture (random init) if torchvision is there, else an error that
    # points at ./resnet18 - never the stray file
    torch.save(Payload(work.marker), work.path / "resnet18")
    result = cli.invoke(app, ["scan", "resnet18", "--input-shape", "1,3,32,32", "--json"])
    if importlib.util.find_spec("torchvision") is None:
        check_one_line_error(result, "resnet18", "torchvision", "./resnet18")
    else:
        assert result.exit_code == 0, result.output
    assert not work.marker.exists()


def test_weights_only_files_load_without_the_flag(work):
    # a state_dict is weights-only: fine as --checkpoint, and as MODEL it says how to use it
    result = cli.invoke(app, ["scan", "net.py:make", "--checkpoint", "state.pt", "--input-shape", "2,3", "--json"])
    assert result.exit_code == 0, result.output
    check_one_line_error(cli.invoke(app, ["scan", "state.pt", "--input-shape", "2,3"]),
                         "state_dict", "--checkpoint state.pt")
    # a whole pickled (benign) module needs the flag too: torch.load cannot tell benign from crafted
    check_one_line_error(cli.invoke(app, ["scan", "whole.pt", "--input-shape", "2,3"]),
                         "torch.nn.modules.container.Sequential", "--trust-pickle")
    assert cli.invoke(app, ["scan", "whole.pt", "--input-shape", "2,3", "--trust-pickle"]).exit_code == 0


# ---------------------------------------------------------------------------------------------------------
# one line per mistake


@pytest.fixture
def no_experiments(monkeypatch):
    """reproduce must fail in validation: running an experiment is a test failure."""
    def never(*args, **kwargs):
        raise AssertionError("an experiment started before the arguments were validated")

    monkeypatch.setattr(runner, "run_reproduction", never)


BAD = {
    # scan: MODEL
    "unknown name": (["scan", "nonesuch"], ["'nonesuch'", "built-in example"]),
    "missing file": (["scan", "./missing.pt"], ["./missing.pt", "no such file"]),
    "missing .py": (["scan", "nothere.py:make"], ["nothere.py", "does not exist"]),
    "no such attribute": (["scan", "net.py:nope", "--input-shape", "1,3"], ["has no attribute 'nope'"]),
    "unimportable module": (["scan", "no_such_pkg.models:make"], ["cannot import no_such_pkg.models"]),
    "factory raises": (["scan", "net.py:boom"], ["calling boom()", "kaboom in the factory"]),
    "factory gives no model": (["scan", "net.py:not_a_model"], ["gave a int"]),
    "forward raises": (["scan", "net.py:BadForward", "--input-shape", "1,3"], ["broken forward", "(1, 3)"]),
    "forward shape mismatch": (["scan", "net.py:make", "--input-shape", "1,5"], ["(1, 5)", "batch dimension"]),
    "nan weights": (["scan", "net.py:nan_weights", "--input-shape", "1,3"], ["'0.weight'", "NaN/Inf"]),
    "no example input": (["scan", "net.py:make"], ["--input-shape", "batch dimension"]),
    "shape not ints": (["scan", "mlp-tanh", "--input-shape", "two"], ["'two'", "comma-separated"]),
    "shape without batch": (["scan", "net.py:make", "--input-shape", "3"], ["batch dimension", "1,3"]),
    "shape not positive": (["scan", "net.py:make", "--input-shape", "1,0"], ["positive"]),
    "long without embedding": (["scan", "net.py:make", "--input-shape", "1,3", "--input-dtype", "long"],
                               ["--input-high"]),
    "bad dtype choice": (["scan", "mlp-tanh", "--input-dtype", "int8"], ["--input-dtype", "int8"]),
    "unknown option": (["scan", "mlp-tanh", "--bogus"], ["--bogus"]),
    "missing argument": (["scan"], ["Missing argument"]),
    # --checkpoint
    "empty checkpoint": (["scan", "net.py:make", "--checkpoint", "empty.pt", "--input-shape", "1,3"],
                         ["empty.pt", "empty (0 bytes)"]),
    "truncated checkpoint": (["scan", "net.py:make", "--checkpoint", "truncated.pt", "--input-shape", "1,3"],
                             ["truncated.pt", "cannot be read"]),
    "missing checkpoint": (["scan", "net.py:make", "--checkpoint", "gone.pt"], ["gone.pt", "does not exist"]),
    "pickled checkpoint": (["scan", "net.py:make", "--checkpoint", "evil.pt"], ["evil.pt", "state_dict"]),
    "checkpoint does not fit": (["scan", "net.py:make", "--checkpoint", "other.pt"], ["does not fit MODEL"]),
    # diagnose
    "diagnose bad shape": (["diagnose", "net.py:make", "--input-shape", "1;3"], ["'1;3'"]),
    "diagnose factory raises": (["diagnose", "net.py:boom"], ["kaboom in the factory"]),
    "diagnose forward raises": (["diagnose", "net.py:BadForward", "--input-shape", "2,3"], ["broken forward"]),
    "diagnose nan weights": (["diagnose", "net.py:nan_weights", "--input-shape", "2,3"], ["NaN/Inf"]),
    "diagnose missing data": (["diagnose", "net.py:make", "--data", "nodata"], ["--data nodata"]),
    "diagnose unwritable out": (["diagnose", "net.py:make", "--input-shape", "2,3", "--out", "afile/sub"],
                                ["--out afile/sub", "not writable"]),
    "diagnose out is a file": (["diagnose", "net.py:make", "--input-shape", "2,3", "--out", "afile"],
                               ["not a directory"]),
    # reproduce (validated before any experiment starts: see the no_experiments fixture)
    "unknown experiment": (["reproduce", "theorem1", "nope"], ["unknown experiment(s) nope", "--list"]),
    "quick and full": (["reproduce", "--quick", "--full"], ["--quick", "--full"]),
    "unknown device": (["reproduce", "--device", "tpu"], ["--device", "'tpu'"]),
    "unknown backend": (["reproduce", "--backend", "spark"], ["--backend", "'spark'"]),
    "address without ray": (["reproduce", "--address", "auto"], ["--address", "--backend ray"]),
    "unwritable out": (["reproduce", "--out", "afile/report"], ["--out afile/report", "not writable"]),
    "missing data dir": (["reproduce", "--full", "--data-dir", "nowhere"], ["nowhere", "not a folder"]),
    "empty data dir": (["reproduce", "--full", "permutation", "--data-dir", "."], ["cifar-10-batches-py/"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_mistake_is_one_line_and_exit_2(work, no_experiments, case):
    args, needles = BAD[case]
    check_one_line_error(cli.invoke(app, args), *needles)
    # the default output folders are made only once everything checked out
    assert not (work.path / "report").exists() and not (work.path / "diagnose").exists()


def test_cuda_without_cuda_and_ray_without_ray(work, no_experiments, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_one_line_error(cli.invoke(app, ["reproduce", "--device", "cuda"]), "no CUDA device", "--device cpu")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    check_one_line_error(cli.invoke(app, ["reproduce", "--backend", "ray"]), "Ray", "pip install")


def test_debug_shows_the_traceback(work):
    result = cli.invoke(app, ["--debug", "scan", "net.py:boom"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "RuntimeError: kaboom in the factory" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: MODEL net.py:boom")
    # --debug is per command: the next run is one line again
    check_one_line_error(cli.invoke(app, ["scan", "net.py:boom"]), "kaboom")


# ---------------------------------------------------------------------------------------------------------
# reproduce: --data-dir checked before anything runs


def test_data_dir_contents_are_checked_before_any_experiment(work, no_experiments):
    data = work.path / "data"
    write_cifar(data)
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    intact = batch.read_bytes()
    batch.write_bytes(intact[:50])
    line = check_one_line_error(cli.invoke(app, ["reproduce", "permutation", "--full", "--data-dir", str(data)]),
                                "data_batch_3")
    assert "cannot be read as a CIFAR-10 python batch" in line
    batch.write_bytes(intact)
    (data / "cifar-10-batches-py" / "test_batch").unlink()
    check_one_line_error(cli.invoke(app, ["reproduce", "permutation", "--full", "--data-dir", str(data)]),
                         "not found")
    # a crafted batch is refused by name, and its code does not run
    batch.write_bytes(pickle.dumps(Payload(work.marker)))
    write_mnist(data)
    (data / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01garbage")
    check_one_line_error(cli.invoke(app, ["reproduce", "plasticity", "--full", "--data-dir", str(data)]),
                         "train-labels-idx1-ubyte")
    check_one_line_error(cli.invoke(app, ["reproduce", "--full", "--data-dir", str(data)]), "builtins.eval")
    assert not work.marker.exists()


def test_valid_data_dir_reaches_the_runner(work, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_reproduction", lambda names, **kw: calls.append((names, kw)) or 0)
    data = work.path / "data"
    write_mnist(data)  # MNIST only: plasticity uses it, permutation runs without CIFAR-10 (a warning)
    result = cli.invoke(app, ["reproduce", "permutation", "plasticity", "--full", "--data-dir", str(data),
                              "--out", "rep", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "permutation will run without cifar10" in result.stderr
    (names, kw), = calls
    assert names == ["permutation", "plasticity"] and kw["data_dir"] == data.resolve() and kw["size"] == "full"


# ---------------------------------------------------------------------------------------------------------
# the loader and the input convention


def test_input_shape_is_the_full_shape_and_dtype_follows_the_model():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224) and parse_shape("2x16") == (2, 16)
    gpt, own = load_model("gpt")
    x = example_inputs(gpt, own, InputSpec("1,16"))
    assert x.shape == (1, 16) and x.dtype == torch.long and int(x.max()) < gpt.wte.num_embeddings  # auto: long
    x = example_inputs(gpt, own, InputSpec("3,5", "long", 4))
    assert x.shape == (3, 5) and int(x.max()) < 4
    mlp, own = load_model("mlp-tanh")
    assert example_inputs(mlp, own, InputSpec()) is own  # the example's own input without --input-shape
    x = example_inputs(mlp.double(), own, InputSpec("2,784"))
    assert x.dtype == torch.float64  # default dtype: the parameters'
    assert example_inputs(mlp, own, InputSpec(None, "float64")).shape == own.shape  # shape from the example


def test_token_model_scans_with_long_inputs(work):
    result = cli.invoke(app, ["scan", "gpt", "--input-shape", "1,6", "--input-dtype", "long", "--input-high", "7",
                              "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["groups"]


def test_scan_fold_norms_reports_the_stream_rotation_only_after_folding(work):
    """--fold-norms scans fold_norms(model, drop_gains=True): on the built-in Llama the stream's permutation
    and sign flip become one rotation over embed … head and the 5 norm scalings go; a model without a
    recognised norm is scanned as it is, and says so."""
    def groups(*extra):
        result = cli.invoke(app, ["scan", "llama", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["groups"], result.stderr

    plain, _ = groups()
    folded, note = groups("--fold-norms")
    assert "5 RMS norms folded" in note  # 2 per layer and the final one and (len(plain), len(folded)) == (21, 15)
    stream = [g for g in folded if g["kind"] == "rotation" and g["size"] == 32]
    assert len(stream) == 1 and not [g for g in plain if g["kind"] == "rotation" and g["size"] == 32]
    result = cli.invoke(app, ["scan", "mlp-tanh", "--fold-norms"])
    assert result.exit_code == 0 and "none recognised" in " ".join(result.output.split())


def test_huggingface_folder(work, monkeypatch):
    hf = work.path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    check_one_line_error(cli.invoke(app, ["scan", "./hf"]), "Hugging Face", "pip install transformers")
    calls = []

    class AutoModel:  # records how it is called: local files only, nothing downloaded
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls.append((path, kwargs))
            return nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 2))

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoModel=AutoModel))
    result = cli.invoke(app, ["scan", "./hf", "--input-shape", "1,5", "--json"])
    assert result.exit_code == 0, result.output
    assert [(str(path), kwargs) for path, kwargs in calls] == [("hf", {"local_files_only": True})]
    check_one_line_error(cli.invoke(app, ["scan", "."]), "without config.json")
