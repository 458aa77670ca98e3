"""Benchmark: find_symmetries on a Llama at TinyLlama-1.1B's size (random init from a config, float32,
nothing downloaded), CPU: wall time and peak resident memory of building the model, detection
(``find_symmetries(..., verify=False)``) and verification (``verify_groups`` on the detected groups, what
``find_symmetries`` runs by default), and optionally of the user's one call ``find_symmetries(...)``.

Each measurement runs in a fresh child process, so its peak resident set (``ru_maxrss``) is its own; the
peak is reported as the running maximum after each step (build, then detect, then verify), and as a
multiple of the model's float32 size.

    python benchmarks/bench_detect_llm.py                    # TinyLlama-1.1B config, 16 tokens
    python benchmarks/bench_detect_llm.py --config small     # a 4-layer, 512-wide Llama (seconds)
    python benchmarks/bench_detect_llm.py --whole            # also one child for find_symmetries(...)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings

CONFIGS = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json (architecture only)
    "tinyllama": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args) -> dict:
    import torch
    import transformers as hf

    from mirrorsym.detect import find_symmetries
    from mirrorsym.detect.find import verify_groups

    torch.set_num_threads(args.threads)
    out: dict = {"mode": args.mode, "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "transformers": hf.__version__, "start_gb": rss_gb()}
    t = time.perf_counter()
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(**CONFIGS[args.config], use_cache=False)
    model = hf.LlamaForCausalLM(cfg).eval()
    out["build_s"] = time.perf_counter() - t
    out["build_peak_gb"] = peak_gb()
    n = sum(p.numel() for p in model.parameters())
    out["params"] = n
    out["model_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    kw = {"use_cache": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.mode == "steps":
            t = time.perf_counter()
            smap = find_symmetries(model, ids, kw, verify=False)
            out["detect_s"] = time.perf_counter() - t
            out["detect_peak_gb"] = peak_gb()
            out["groups"] = smap.summary()
            if args.skip_verify:
                return out | {"warnings": sorted({str(w.message)[:200] for w in caught})}
            t = time.perf_counter()
            errors = verify_groups(model, (ids,), smap.groups, kwargs=kw)
            out["verify_s"] = time.perf_counter() - t
            out["verify_peak_gb"] = peak_gb()
            out["max_error"] = max(errors) if errors else None
            out["failed"] = sum(e > 1e-6 for e in errors)
        else:
            t = time.perf_counter()
            smap = find_symmetries(model, ids, kw)
            out["find_s"] = time.perf_counter() - t
            out["find_peak_gb"] = peak_gb()
            out["groups"] = smap.summary()
            out["max_error"] = max(g.error for g in smap.groups) if len(smap.groups) else None
    out["warnings"] = sorted({str(w.message)[:200] for w in caught})
    return out


def run_child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--config", args.config,
           "--tokens", str(args.tokens), "--threads", str(args.threads)]
    cmd += ["--skip-verify"] if args.skip_verify else []
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load"] = (load0, os.getloadavg()[0])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tinyllama", choices=sorted(CONFIGS))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", action="store_true", help="also time find_symmetries(...) in one call")
    ap.add_argument("--skip-verify", action="store_true", help="build and detect only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="steps", choices=["steps", "find"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, python {platform.python_version()}, "
          f"config {args.config}, 1 x {args.tokens} tokens, {args.threads} torch threads")
    modes = ["steps"] + (["find"] if args.whole else [])
    for mode in modes:
        r = run_child(args, mode)
        size = r["model_gb"]
        print(f"\n[{mode}] torch {r['torch']}, transformers {r['transformers']}; {r['params'] / 1e9:.3f} B "
              f"parameters = {size:.2f} GiB float32; 1-min load {r['load'][0]:.1f} -> {r['load'][1]:.1f}")
        print(f"  groups: {r['groups']}, max verification error {r.get('max_error')}")
        rows = [("build", "build")] + ([("detect (verify=False)", "detect"), ("verify_groups", "verify")]
                                       if mode == "steps" else [("find_symmetries (verify=True)", "find")])
        rows = [(label, key) for label, key in rows if f"{key}_s" in r]
        for label, key in rows:
            peak = r[f"{key}_peak_gb"]
            print(f"  {label:32s} {r[f'{key}_s']:8.1f} s   peak RSS so far {peak:6.2f} GiB = {peak / size:.2f}x model")
        total = sum(r[f"{k}_s"] for _, k in rows)
        print(f"  {'total':32s} {total:8.1f} s")
        if mode == "steps" and r.get("failed"):
            print(f"  {r['failed']} groups failed verification (> 1e-6)")
        for w in r["warnings"]:
            print(f"  warning: {w}")


if __name__ == "__main__":
    main()
