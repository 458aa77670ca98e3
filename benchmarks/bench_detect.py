"""Benchmark: find_symmetries (+ verification) and SymmetryMap.verify against torch-pruning's dependency-graph
build on the same model in the same process; and agreement of the permutation unit groups with
torch-pruning's channel groups on CNNs.

Models: torchvision names (random init, batch 1, 224x224; needs the zoo environment) and Hugging Face
decoders built from configs (random init, nothing downloaded, 1 x --tokens token ids; main environment):
``gpt2`` (GPT-2 small's config, 124 M) and ``llama-100m`` (a Llama of 768 x 8 layers, 12 heads / 4 KV heads,
vocabulary 32000, untied: 99.5 M).

    pip install torch-pruning        # optional: without it only our side is timed
    python benchmarks/bench_detect.py --models gpt2,llama-100m
    .venv-zoo/bin/python benchmarks/bench_detect.py [--models resnet50,vit_b_16] [--agreement]
        [--per-group-verify resnet50]

Columns: "detect" = ``find_symmetries(..., verify=False)`` (torch.export trace, one run of the graph,
union-find, classification), "of which export" = ``torch.export.export`` alone (what the export-first
tracing adds per call), "find_symmetries" = with the default verification (every group alone, in float64;
block by block where that is cheaper, see ``mirrorsym.detect.find.verify_groups``), "torch-pruning" =
``DependencyGraph().build_dependency`` + ``get_all_groups``, the fastest of --tp-repeats runs (stopped after
--tp-timeout seconds). To time an older mirrorsym with the same script, put its ``src`` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

from mirrorsym.detect import find_symmetries
from mirrorsym.detect.trace import export

try:
    import torchvision
except ImportError:  # pragma: no cover  (the main environment: Hugging Face models only)
    torchvision = None

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover
    tp = None

HF_CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                                   n_positions=1024)),
    "llama-100m": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=768, intermediate_size=2048,
                                                           num_hidden_layers=8, num_attention_heads=12,
                                                           num_key_value_heads=4, vocab_size=32000,
                                                           max_position_embeddings=2048,
                                                           tie_word_embeddings=False)),
}


def build(name: str, size: int, tokens: int = 32):
    """(model, positional inputs, keyword inputs)."""
    torch.manual_seed(0)
    if name in HF_CONFIGS:
        import transformers as hf

        cfg_cls, model_cls, cfg = HF_CONFIGS[name]
        config = getattr(hf, cfg_cls)(**cfg, use_cache=False)
        model = getattr(hf, model_cls)(config).eval()
        ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
        return model, (ids,), {"use_cache": False}
    if torchvision is None:
        raise SystemExit(f"{name} needs torchvision: run bench_detect with .venv-zoo/bin/python")
    model = torchvision.models.get_model(name, weights=None).eval()
    head = _final_layer(model)
    torch.nn.init.normal_(head.weight, std=0.02)  # ViT's head is zero-initialised: make outputs non-trivial
    return model, (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),), {}


def _final_layer(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


class _Timeout(Exception):
    pass


def tp_groups(model, x, timeout: int = 0):
    """torch-pruning's graph and groups; raises _Timeout after ``timeout`` seconds (0: no limit)."""

    def stop(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(timeout)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
        return graph, list(
            graph.get_all_groups(ignored_layers=[_final_layer(model)],
                                 root_module_types=(torch.nn.Conv2d, torch.nn.Linear))
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


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
    parser.add_argument("--models", default="resnet50,vit_b_16" if torchvision is not None else "gpt2,llama-100m")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tokens", type=int, default=32, help="token ids per sequence (Hugging Face models)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tp-timeout", type=int, default=300, help="seconds before torch-pruning is stopped")
    parser.add_argument("--tp-repeats", type=int, default=3,
                        help="torch-pruning runs per model, the fastest reported (its time varies with the load)")
    parser.add_argument("--agreement", action="store_true", help="compare channel groups with torch-pruning")
    parser.add_argument(
        "--per-group-verify",
        default="",
        help="models (comma-separated) on which to also time SymmetryMap.verify (a forward per group)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    console.print(
        f"torch {torch.__version__}, torchvision {getattr(torchvision, '__version__', 'not installed')}, "
        f"torch-pruning {getattr(tp, '__version__', 'not installed')}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    table = Table(title="find_symmetries vs torch-pruning DependencyGraph (CPU, batch 1)")
    for col in (
        "model",
        "params",
        "groups",
        "detect, no verify [s]",
        "of which export [s]",
        "find_symmetries [s]",
        "per-group verify [s]",
        "torch-pruning [s]",
        "ratio detect/tp",
        "ratio find/tp",
        "load",
    ):
        table.add_column(col)
    with warnings.catch_warnings():  # one-time costs (torch.export's first call) out of the first model's row
        warnings.simplefilter("ignore")
        find_symmetries(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)),
                        torch.randn(2, 3))
    for name in args.models.split(","):
        model, x, kw = build(name, args.size, args.tokens)
        load = os.getloadavg()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_detect, _ = timed(lambda m=model, x=x, kw=kw: find_symmetries(m, x, kw, verify=False))
            t_export, _ = timed(lambda m=model, x=x, kw=kw: export(m, x, kw))
            t_find, smap = timed(lambda m=model, x=x, kw=kw: find_symmetries(m, x, kw))
        t_verify = float("nan")
        if name in args.per_group_verify.split(","):
            t_verify, _ = timed(lambda s=smap, m=model, x=x, kw=kw: s.verify(m, x, example_kwargs=kw))
        t_tp, tp_note = float("nan"), "not installed"
        if tp is not None:
            try:
                t_tp, (_, groups) = timed(lambda m=model, x=x: tp_groups(m, x[0], args.tp_timeout),
                                          args.tp_repeats)
                tp_note = f"{t_tp:.1f} ({len(groups)} groups)"
            except _Timeout:
                tp_note = f"stopped after {args.tp_timeout} s"
            except Exception as exc:  # torch-pruning's tracer fails on some models: say so
                tp_note = f"failed: {type(exc).__name__}: {str(exc)[:60]}"
        ok = t_tp == t_tp and t_tp > 0
        table.add_row(
            name,
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M",
            smap.summary(),
            f"{t_detect:.1f}",
            f"{t_export:.1f}",
            f"{t_find:.1f}",
            f"{t_verify:.1f}",
            tp_note,
            f"{t_detect / t_tp:.1f}" if ok else "-",
            f"{t_find / t_tp:.1f}" if ok else "-",
            f"{load:.1f} -> {os.getloadavg()[0]:.1f}",
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
        model, (x,), _ = build(name, 32)
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
