"""find_symmetries on torchvision models (random init, no download): exact group counts derived from the
architectures, no unread op, and every group function-preserving in float64.

torchvision is not in the main environment. Run with the zoo environment:
    python -m venv .venv-zoo && .venv-zoo/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        && .venv-zoo/bin/pip install -e ".[test]"
    .venv-zoo/bin/python -m pytest tests/test_detect_zoo.py
"""

import copy
import warnings

import pytest
import torch

from mirrorsym.detect import DetectWarning, find_symmetries

torchvision = pytest.importorskip(
    "torchvision", reason="torchvision is only in the zoo environment (.venv-zoo)"
)


def build(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def find_quiet(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectWarning)  # every op of these models must be understood
        return find_symmetries(model, x)


def rel_change(y0, y1) -> float:
    return float((y1 - y0).abs().max() / y0.abs().max())


def check_function_preserving(model, x, smap, individually: int = 1, tol: float = 1e-10):
    """All groups' random elements composed on one float64 copy (a composition of symmetries is a
    symmetry; one wrong group would show), plus the first ``individually`` groups of each kind alone."""
    base = copy.deepcopy(model).double().eval()
    xd = x.double()
    with torch.no_grad():
        y0 = base(xd)
        composed = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(0)
        for g in smap.groups:
            g.apply_(composed, g.random_element(generator=gen))
        assert rel_change(y0, composed(xd)) <= tol
        seen: dict[str, int] = {}
        for g in smap.groups:
            if seen.get(g.kind, 0) >= individually:
                continue
            seen[g.kind] = seen.get(g.kind, 0) + 1
            one = copy.deepcopy(base)
            g.apply_(one, g.random_element(generator=gen))
            assert rel_change(y0, one(xd)) <= tol, g.label


@pytest.mark.parametrize(
    "name, expected",
    [
        # 4 stage streams + 2 blocks x 4 stages inner; a bn_scale per BatchNorm (1 + 16 + 3 downsample)
        ("resnet18", {"permutation": 12, "rescale": 12, "bn_scale": 20}),
        # stem + 16 x 2 inner + 4 streams; 53 BatchNorms
        pytest.param("resnet50", {"permutation": 37, "rescale": 37, "bn_scale": 53}, marks=pytest.mark.slow),
        # stem/block0 + 16 expansions + 7 stage streams + last 1x1 conv; 52 BatchNorms; 7 projections
        # read linearly by the next block (no activation after the projection's BatchNorm)
        ("mobilenet_v2", {"permutation": 25, "bn_scale": 52, "scale": 7}),
    ],
)
def test_cnn_zoo(name, expected):
    model, x = build(name), torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smap = find_quiet(model, x)
    assert smap.counts() == expected
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    check_function_preserving(model, x, smap)


def test_resnet18_group_sizes_and_stream():
    model, x = build("resnet18"), torch.randn(1, 3, 32, 32)
    smap = find_quiet(model, x)
    assert sorted(g.size for g in smap.by_kind("permutation")) == [64] * 3 + [128] * 3 + [256] * 3 + [512] * 3
    stream = [g for g in smap.by_kind("permutation") if "fc.weight" in g.params][0]
    assert stream.params["fc.weight"][0] == 1 and stream.size == 512
    assert {"layer4.0.downsample.0.weight", "layer4.1.conv2.weight", "layer4.1.conv1.weight"} <= set(
        stream.params
    )


@pytest.mark.slow
def test_vgg11_flatten_into_classifier():
    model, x = build("vgg11"), torch.randn(1, 3, 32, 32)
    smap = find_quiet(model, x)
    assert smap.counts() == {"permutation": 10, "rescale": 10}  # 8 convs + 2 hidden Linear layers
    last_conv = [g for g in smap.by_kind("permutation") if "classifier.0.weight" in g.params][0]
    dim, idx = last_conv.params["classifier.0.weight"]
    assert last_conv.size == 512 and dim == 1 and len(idx) == 512 * 49  # each channel owns 7x7 columns
    assert [m.index.shape for m in last_conv.members if m.name == "classifier.0.weight"] == [(512, 49)]
    check_function_preserving(model, x, last_conv_only(smap, last_conv))


def last_conv_only(smap, g):
    from mirrorsym.detect import SymmetryMap

    return SymmetryMap([g])


@pytest.mark.slow
def test_vit_b_16():
    model, x = build("vit_b_16"), torch.randn(1, 3, 224, 224)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    smap = find_quiet(model, x)
    # per encoder layer: head permutation (12), MLP units (3072), 12 q.k and 12 v.o rotations (64),
    # LayerNorm affine -> Linear scalings (2); plus the residual stream (768) and the final LayerNorm
    assert smap.counts() == {"permutation": 25, "rotation": 288, "scale": 25}
    sizes = sorted({g.size for g in smap.by_kind("permutation")})
    assert sizes == [12, 768, 3072]
    assert all(g.size == 64 for g in smap.by_kind("rotation"))
    check_function_preserving(model, x, smap)


def test_readme_torchvision_commands_run(monkeypatch, tmp_path):
    """The README's commands on torchvision names (the main environment has no torchvision)."""
    import shlex

    from test_readme_commands import CLI_LINES, needs_torchvision
    from typer.testing import CliRunner

    from mirrorsym.cli import app

    lines = [c for c in CLI_LINES if needs_torchvision(c)]
    assert lines
    monkeypatch.chdir(tmp_path)
    for line in lines:
        result = CliRunner().invoke(app, shlex.split(line)[1:], env={"COLUMNS": "200"})
        assert result.exit_code == 0, f"{line}\n{result.output}"
        assert "symmetry groups" in result.output
