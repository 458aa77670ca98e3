"""Benchmark: find_symmetries (+ verification) and SymmetryMap.verify on torchvision models, against
torch-pruning's dependency-graph build on the same model in the same run; and agreement of the
permutation unit groups with torch-pruning's channel groups on CNNs.

Needs the zoo environment (torchvision; torch-pruning optional):
    .venv-zoo/bin/pip install torch-pruning
    .venv-zoo/bin/python benchmarks/bench_detect.py [--models resnet50,vit_b_16] [--agreement]
        [--per-group-verify resnet50]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

from mirrorsym.detect import find_symmetries

try:
    import torchvision
except ImportError as exc:  # pragma: no cover
    raise SystemExit("bench_detect needs torchvision: run it with .venv-zoo/bin/python") from exc

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover
    tp = None


def build(name: str, size: int):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    head = _final_layer(model)
    torch.nn.init.normal_(head.weight, std=0.02)  # ViT's head is zero-initialised: make outputs non-trivial
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def _final_layer(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def tp_groups(model, x):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    return graph, list(
        graph.get_all_groups(ignored_layers=[_final_layer(model)], root_module_types=(torch.nn.Conv2d, torch.nn.Linear))
    )


def our_channel_sets(model, smap) -> set[frozenset]:
    """Per permutation group: the (module, "out" | "in") of the Conv/Linear weights it moves."""
    mods = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and getattr(m, "groups", 1) == 1
    }  # depthwise convs are left out on both sides
    out = set()
    for g in smap.by_kind("permutation"):
        items = {
            (m.name[: -len(".weight")], "out" if m.dim == 0 else "in")
            for m in g.members
            if m.name.endswith(".weight") and m.name[: -len(".weight")] in mods
        }
        if items:
            out.add(frozenset(items))
    return out


def tp_channel_sets(model, groups) -> set[frozenset]:
    names = {m: n for n, m in model.named_modules()}
    out = set()
    for group in groups:
        items = set()
        for dep, _idxs in group:
            mod = dep.target.module
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and not (
                isinstance(mod, torch.nn.Conv2d) and mod.groups > 1
            ):
                fn = dep.handler.__name__
                items.add((names[mod], "out" if "out" in fn else "in"))
        if items:
            out.add(frozenset(items))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--agreement", action="store_true", help="compare channel groups with torch-pruning")
    parser.add_argument(
        "--per-group-verify",
        default="",
        help="models (comma-separated) on which to also time SymmetryMap.verify (a forward per group)",
    )
    args = parser.parse_args()
    console = Console()
    console.print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"torch-pruning {getattr(tp, '__version__', 'not installed')}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    table = Table(title="find_symmetries vs torch-pruning DependencyGraph (CPU, batch 1)")
    for col in (
        "model",
        "groups",
        "detect, no verify [s]",
        "find_symmetries [s]",
        "per-group verify [s]",
        "torch-pruning [s]",
        "ratio detect/tp",
        "ratio find/tp",
    ):
        table.add_column(col)
    for name in args.models.split(","):
        model, x = build(name, args.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_detect, _ = timed(lambda m=model, x=x: find_symmetries(m, x, verify=False))
            t_find, smap = timed(lambda m=model, x=x: find_symmetries(m, x))
        t_verify = float("nan")
        if name in args.per_group_verify.split(","):
            t_verify, _ = timed(lambda s=smap, m=model, x=x: s.verify(m, x))
        t_tp = float("nan")
        if tp is not None:
            t_tp, _ = timed(lambda m=model, x=x: tp_groups(m, x))
        table.add_row(
            name,
            smap.summary(),
            f"{t_detect:.1f}",
            f"{t_find:.1f}",
            f"{t_verify:.1f}",
            f"{t_tp:.1f}",
            f"{t_detect / t_tp:.1f}" if tp is not None else "-",
            f"{t_find / t_tp:.1f}" if tp is not None else "-",
        )
        console.print(f"{name}: done")
    console.print(table)
    if args.agreement and tp is not None:
        agreement(console)


def agreement(console) -> None:
    table = Table(title="Permutation unit groups vs torch-pruning channel groups (Conv/Linear weights)")
    for col in ("model", "ours", "torch-pruning", "identical", "only ours", "only tp"):
        table.add_column(col)
    for name in ("resnet18", "resnet50", "mobilenet_v2", "vgg11"):
        model, x = build(name, 32 if name != "vgg11" else 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            smap = find_symmetries(model, x)
        ours = our_channel_sets(model, smap)
        theirs = tp_channel_sets(model, tp_groups(model, x)[1])
        table.add_row(
            name,
            str(len(ours)),
            str(len(theirs)),
            str(len(ours & theirs)),
            str(len(ours - theirs)),
            str(len(theirs - ours)),
        )
    console.print(table)


if __name__ == "__main__":
    main()
