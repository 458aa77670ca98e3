"""Real-data support (``--data-dir``): the CIFAR-10 / MNIST loaders on tiny fake files in torchvision's
layout, the runner's plumbing of the directory, and the ResNet-18 and permuted-MNIST code paths."""

import gzip
import json
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mirrorsym.report.runner as runner
from mirrorsym.cli import app
from mirrorsym.experiments import Claim, permutation, plasticity
from mirrorsym.experiments.base import Context
from mirrorsym.experiments.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    UnsafePickleError,
    available_datasets,
    check_cifar10,
    check_mnist,
    cifar10,
    has_cifar10,
    has_mnist,
    mnist,
    present_files,
    read_cifar10_batch,
    read_idx,
)

# ---------------------------------------------------------------------------------------------------------
# fake files


def write_cifar(root: Path, per_batch: int = 2, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch} with random uint8 rows; returns what was written.
    data_batch_2 uses bytes keys (as Python-2 pickles read with encoding='bytes' have)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"data": data, b"labels": labels} if i == 1 else {"data": data, "labels": labels,
                                                                  "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = (data, labels)
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    """LeCun's idx format, written independently of the reader: 0, 0, 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 24, n_test: int = 6, gz: bool = False, seed: int = 0):
    """root/MNIST/raw/ idx files (gzipped if ``gz``); returns {split: (images, labels)}."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        written[prefix] = (images, labels)
    return written


# ---------------------------------------------------------------------------------------------------------
# loaders


def test_cifar10_reads_torchvision_pickles_pixel_for_pixel(tmp_path):
    written = write_cifar(tmp_path)
    assert has_cifar10(tmp_path) and has_cifar10(tmp_path / "cifar-10-batches-py")
    assert available_datasets(tmp_path) == ["cifar10"]
    x, y = cifar10(tmp_path, train=True)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    rows = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert y.tolist() == labels
    # row layout: 1024 red values, then green, then blue, each row-major over 32×32
    for n, c, i, j in [(0, 0, 0, 0), (3, 1, 5, 7), (9, 2, 31, 30), (2, 0, 31, 0)]:
        raw = rows[n, c * 1024 + i * 32 + j]
        expected = (raw / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert x[n, c, i, j].item() == pytest.approx(expected, abs=1e-5)
    xt, yt = cifar10(tmp_path / "cifar-10-batches-py", train=False)
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == written["test_batch"][1]


def test_cifar10_wrong_directory_names_the_missing_file_and_layout(tmp_path):
    assert not has_cifar10(tmp_path) and not has_cifar10(None)
    with pytest.raises(FileNotFoundError, match=r"data_batch_1 not found.*cifar-10-batches-py/"):
        cifar10(tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    assert not has_cifar10(tmp_path)
    cifar10(tmp_path, train=True)  # the training batches are all there
    with pytest.raises(FileNotFoundError, match="test_batch not found"):
        cifar10(tmp_path, train=False)


class MarkerPayload:
    """Unpickling this with plain pickle.load would run exec and create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_cifar10_batches_are_read_without_running_pickle_code(tmp_path):
    written = write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "PWNED"
    # the payload hides inside an otherwise valid batch dict
    data, labels = written["data_batch_3"]
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": data, "labels": labels, "x": MarkerPayload(marker)}))
    with pytest.raises(UnsafePickleError, match=r"data_batch_3: refuses to unpickle the global builtins\.exec"):
        cifar10(tmp_path)
    with pytest.raises(ValueError, match="builtins.exec"):
        check_cifar10(tmp_path)
    assert not marker.exists()
    cifar10(tmp_path, train=False)  # the other files are untouched


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar10_batches_in_every_pickle_protocol(tmp_path, protocol):
    """The original batches are protocol-2 pickles from Python 2 (bytes keys); numpy writes arrays with
    _reconstruct (protocols 2-4) or _frombuffer (5), Python 3 writes bytes with _codecs.encode (2)."""
    written = write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    data, labels = written["test_batch"]
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
             b"filenames": [b"a.png", b"b.png"]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    x, y = cifar10(tmp_path, train=False)
    assert y.tolist() == labels and x.shape == (2, 3, 32, 32)
    check_cifar10(tmp_path)


def test_cifar10_batch_contents_are_checked(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    for batch, message in [([1, 2], "holds a list"),
                           ({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, r"uint8 array \(n, 3072\)"),
                           ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "float32"),
                           ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}, "integers in 0..9")]:
        path.write_bytes(pickle.dumps(batch))
        with pytest.raises(ValueError, match=message):
            read_cifar10_batch(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be read as a CIFAR-10 python batch"):
        check_cifar10(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files_plain_and_gzipped(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    assert has_mnist(tmp_path) and has_mnist(tmp_path / "MNIST" / "raw")
    x, y = mnist(tmp_path, train=True)
    images, labels = written["train"]
    assert x.shape == (24, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == labels.tolist()
    assert torch.equal(x, torch.from_numpy(images.reshape(24, 784).astype(np.float32) / 255.0))
    assert x[5, 3 * 28 + 17].item() == pytest.approx(images[5, 3, 17] / 255.0)
    xi, _ = mnist(tmp_path, train=False, flat=False)
    assert xi.shape == (6, 1, 28, 28)
    assert xi[4, 0, 27, 1].item() == pytest.approx(written["t10k"][0][4, 27, 1] / 255.0)


def test_mnist_wrong_directory_and_broken_files(tmp_path):
    assert not has_mnist(tmp_path) and not has_mnist(None)
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\] not found.*MNIST/raw/"):
        mnist(tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"\x00" * 8)  # float type code 0x0d
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match="do not match"):
        mnist(tmp_path)
    assert [p.name for p in present_files(tmp_path, "mnist")] == ["train-images-idx3-ubyte",
                                                                  "train-labels-idx1-ubyte"]
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):  # the test split is missing
        (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
        check_mnist(tmp_path)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(3, 10, np.uint8)))
    with pytest.raises(ValueError, match="labels .* go up to 10"):
        mnist(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# runner and CLI plumbing


@dataclass(frozen=True)
class FakeConfig:
    value: float = 1.0


class SeesDataDir:
    """A stand-in experiment that records the Context it ran in."""

    NAME, TITLE = "sees", "records its data_dir"
    CONFIGS = {"tiny": FakeConfig(), "quick": FakeConfig(), "full": FakeConfig()}
    seen: list = []

    @classmethod
    def run(cls, cfg, ctx):
        cls.seen.append(ctx.data_dir)
        return {"cifar": has_cifar10(ctx.data_dir)}

    @staticmethod
    def plot(results, ctx):
        return []

    @staticmethod
    def claims(results, cfg):
        return [Claim("ran", True, True, True)]


def test_runner_passes_data_dir_into_the_context_and_its_cache_key(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "registry", lambda: {"sees": SeesDataDir})
    SeesDataDir.seen = []
    data = tmp_path / "data"
    write_cifar(data)
    out = tmp_path / "out"
    assert runner.run_reproduction(["sees"], size="tiny", out=out, device="cpu", data_dir=data) == 0
    assert SeesDataDir.seen == [data.resolve()]
    assert json.loads((out / "sees" / "results.json").read_text())["results"] == {"cifar": True}
    runner.run_reproduction(["sees"], size="tiny", out=out, device="cpu", data_dir=data)
    assert len(SeesDataDir.seen) == 1  # same data_dir: loaded from the store
    runner.run_reproduction(["sees"], size="tiny", out=out, device="cpu")
    assert SeesDataDir.seen[-1] is None and len(SeesDataDir.seen) == 2  # without it: reruns
    runner.run_reproduction(["sees"], size="tiny", out=out, device="cpu", data_dir=data)
    assert len(SeesDataDir.seen) == 3
    write_mnist(data)
    runner.run_reproduction(["sees"], size="tiny", out=out, device="cpu", data_dir=data)
    assert len(SeesDataDir.seen) == 4  # MNIST added to the same folder: reruns
    with pytest.raises(ValueError, match="--data-dir .* is not a directory"):
        runner.run_reproduction(["sees"], size="tiny", out=out, device="cpu", data_dir=tmp_path / "nope")


def test_cli_data_dir_reaches_the_experiment(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "registry", lambda: {"sees": SeesDataDir})
    SeesDataDir.seen = []
    help_text = CliRunner().invoke(app, ["reproduce", "--help"]).output
    assert "--data-dir" in help_text
    result = CliRunner().invoke(app, ["reproduce", "sees", "--out", str(tmp_path / "out"), "--device", "cpu",
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert SeesDataDir.seen == [tmp_path.resolve()]


# ---------------------------------------------------------------------------------------------------------
# permutation: ResNet-18 on (fake) CIFAR-10


def test_resnet18_is_the_standard_cifar_network():
    model = permutation.ResNet18(64)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the CIFAR ResNet-18's known size
    assert permutation.ResNet18(4)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_augment_is_a_padded_crop_possibly_flipped():
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = permutation.augment(x, torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for n in range(len(x)):
        crops = [padded[n, :, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out[n], c) or torch.equal(out[n], c.flip(-1)) for c in crops)


def test_permutation_full_path_trains_resnet18_on_cifar_files(tmp_path):
    data = tmp_path / "data"
    write_cifar(data, per_batch=2)
    cfg = replace(permutation.CONFIGS["tiny"], seeds=2, resnet=True, resnet_width=4, resnet_epochs=1,
                  resnet_batch=4, resnet_probe=4, resnet_seeds=2)
    ctx = Context(out_dir=tmp_path / "out", size="full", data_dir=data)
    ctx.out_dir.mkdir()
    results = json.loads(json.dumps(permutation.run(cfg, ctx)))
    res = results["resnet18"]
    assert set(res) == set(permutation.METHODS)
    for method in permutation.METHODS:
        assert [r["seed"] for r in res[method]] == [0, 1]  # every seed of every method trained
        for run in res[method]:
            assert 0.0 <= run["accuracy"] <= 1.0
            layers = run["theta"]["layers"]
            units = [layer["units"] for layer in layers]
            # stem/stage residual streams and the inner channel of each of the 8 blocks: 4·(1, 2, 4, 8) channels
            assert sorted(set(units)) == [4, 8, 16, 32] and len(units) >= 8
            assert all(0 <= layer["dead"] <= layer["units"] and 1 <= layer["distinct"] <= layer["units"]
                       for layer in layers)
            assert run["theta"]["dead"] == sum(layer["dead"] for layer in layers)
    paths = permutation.plot(results, ctx)
    assert [Path(p).name for p in paths][-1] == "permutation_resnet18.png" and len(paths) >= 2
    claims = permutation.claims(results, cfg)
    resnet = [c for c in claims if "ResNet-18" in c.claim]
    assert len(resnet) == 4 and all(c.kind == "finding" and c.seeds == 2 for c in resnet)
    assert claims[-len(resnet):] == resnet
    # no CIFAR-10 under data_dir: the digits part alone runs
    assert "resnet18" not in permutation.run(cfg, Context(out_dir=ctx.out_dir, size="full", data_dir=tmp_path))


# ---------------------------------------------------------------------------------------------------------
# plasticity: permuted MNIST on (fake) MNIST files


def test_plasticity_full_path_runs_permuted_mnist_from_files(tmp_path):
    data = tmp_path / "data"
    write_mnist(data, n_train=24, gz=True)
    cfg = replace(plasticity.CONFIGS["tiny"], settings=(), methods=("plain", "syre"), mnist=True,
                  mnist_width=16, mnist_depth=3, mnist_n=20, mnist_tasks=2, mnist_batch=4, mnist_probe=12)
    ctx = Context(out_dir=tmp_path / "out", size="full", data_dir=data)
    ctx.out_dir.mkdir()
    results = json.loads(json.dumps(plasticity.run(cfg, ctx)))
    assert results["settings"] == ["permuted_mnist"] and results["units"] == {"permuted_mnist": 48}
    for method in ("plain", "syre"):
        rows = results["results"]["permuted_mnist"][method]
        assert len(rows["online_acc"]) == 2 and all(0 <= a <= 1 for a in rows["online_acc"])
        assert all(0 <= d <= 48 for d in rows["distinct"]) and all(0 <= d <= 48 for d in rows["dead"])
    paths = plasticity.plot(results, ctx)
    assert [Path(p).name for p in paths] == ["plasticity_permuted_mnist.png"]
    claims = plasticity.claims(results, cfg)
    assert claims and all(c.claim.startswith("permuted_mnist") for c in claims)
    # no MNIST under data_dir: the setting is skipped
    empty = Context(out_dir=ctx.out_dir, size="full", data_dir=tmp_path)
    assert plasticity.run(replace(cfg, settings=("random_labels",), tasks=1, rl_epochs=1),
                          empty)["settings"] == ["random_labels"]
