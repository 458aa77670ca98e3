"""Rotation symmetry in attention ⇒ dead and low-rank heads under weight decay; symmetry removal as control.

Per head h the attention scores are x W_Q,h W_K,hᵀ xᵀ, unchanged by W_Q,h → W_Q,h Q, W_K,h → W_K,h Q for
every orthogonal Q (d_head × d_head): the rotation symmetry of docs/theory.md#rotation, whose reflections
Q = I − 2nnᵀ have the surfaces W_Q,h n = 0, W_K,h n = 0. With the penalty γ(‖W_Q,h‖² + ‖W_K,h‖²) (objective
L + γ‖θ‖², torch coupled ``weight_decay = λ = 2γ``, docs/theory.md#conventions) the minimum over the
factorisation is 2γ‖W_Q,h W_K,hᵀ‖_* (docs/theory.md#closed-form-c): larger γ should put more of those
surfaces' directions to zero — lower-rank score matrices, and at the extreme a whole head on W_Q,h = W_K,h = 0
(a *dead* head). Decay towards a fixed random θ₀ (``ms.remove_symmetries``, docs/theory.md#syre) leaves no
such surface absorbing.

Task: *associative recall*. Each sequence holds P (key, value) pairs, one position per pair embedded as
E_key[k] + E_val[v], and a final query position E_qry[q] with q one of the keys; the target is the value
paired with q. Model: embeddings, one attention block (4 heads, d_model 32, q/k/v/o Linear without bias, no
dropout, residual), linear read-out at the query position. One fixed data set; the seed sets the
initialisation, the minibatch order and θ₀.

Training runs on the sweep engine (``ctx.sweep``: vmapped copies, grid seeds × γ × optimizer):

* main run: SGD with heavy-ball momentum (rotation-equivariant: the update of a rotated model is the rotated
  update, so the mirror structure of L + γ‖θ‖² is all that acts), γ over ``gammas``;
* a separate run with Adam (coupled decay; Adam is *not* rotation-equivariant, its per-coordinate scaling
  can itself pick directions), γ over ``adam_gammas``;
* symmetry removal at the library default σ₀ = 0.01 × each tensor's init scale (``remove_symmetries(model,
  sigma=0.01)``, a parametrisation θ = θ₀ + ψ with the optimizer's decay on ψ) at γ = ``syre_gamma``, THE
  control; and a σ₀ sweep (``syre_sigmas`` × init scale) at the same γ, labelled as such.

Each σ₀ is a sweep of its own (the model factory receives only the seed, and a plain model and a parametrised
one cannot share a vmapped chunk); within a σ₀ the copies of seed s share the minibatches of seed s with the
plain runs, so differences plain − syre are paired per seed.

Measured per run, on the *learned part* ψ = θ − θ₀ (ψ = θ for plain decay): per head the singular values of
S_h = ψ_Q,h ψ_K,hᵀ (d_model × d_model, rank ≤ d_head). A head is **dead** when ‖S_h‖_F ≤ ``dead_floor`` ×
max_h' ‖S_h'‖_F (it sits on its surface, or on θ₀ under symmetry removal); the effective rank
exp(H(σ/‖σ‖₁)) is averaged over the **alive** heads only (a dead head is not a low-rank head). Functionally,
a head is dead when removing its learned q/k part (ψ_Q,h = ψ_K,h = 0: uniform attention for plain decay,
θ₀'s attention under symmetry removal) changes the test logits (RMS) by ≤ ``dead_floor`` × the largest such
change. Also: test accuracy, and what ``ms.find_symmetries`` reports for the model (one rotation group per
head on q/k). Every finding rests on one statistic per seed (``seeds``), its 95 % t-interval deciding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from ..theory import torch_weight_decay
from .base import Claim, Context, finding
from .plotting import figure, save

NAME = "transformer"
TITLE = "Attention heads under weight decay (SGD and Adam): dead heads, alive-head rank, symmetry removal"

OFFSET_SEED = 1000  # θ₀ of run seed s is drawn with seed s + OFFSET_SEED


@dataclass(frozen=True)
class Config:
    n_keys: int = 8
    n_values: int = 8
    pairs: int = 5
    d_model: int = 32
    heads: int = 4
    n_train: int = 4096
    n_test: int = 1024
    batch: int = 64
    steps: int = 600
    lr: float = 0.05  # SGD
    momentum: float = 0.9
    adam_lr: float = 3e-3
    gammas: tuple[float, ...] = (0.0, 3e-3, 1e-2)  # L + γ‖θ‖²; torch weight_decay = 2γ (SGD)
    adam_gammas: tuple[float, ...] = (0.0, 1e-2)
    syre_gamma: float = 1e-2  # γ of the symmetry-removal runs (SGD)
    syre_sigmas: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # σ₀ / each tensor's init scale
    control_sigma: float = 0.01  # the library default: the control's verdict
    dead_floor: float = 1e-3  # dead head: ‖S_h‖ ≤ floor × largest head's (and functionally, same floor)
    rank_margin: float = 0.75  # alive-head eff. rank at the largest γ ≤ margin × at γ = 0
    min_accuracy: float = 0.9  # γ = 0 must solve the task, or the ranks mean nothing
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    data_seed: int = 0


CONFIGS = {
    "tiny": Config(steps=100, n_train=1024, n_test=128, gammas=(0.0, 1e-2), adam_gammas=(0.0, 1e-2),
                   syre_sigmas=(0.01,), seeds=(0, 1), min_accuracy=0.5),
    "quick": Config(),
    "full": Config(steps=6000, d_model=64, heads=8, n_keys=16, n_values=16, pairs=8, n_train=32768,
                   gammas=(0.0, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2), adam_gammas=(0.0, 1e-3, 5e-3, 1e-2),
                   seeds=tuple(range(10))),
}


class RecallAttention(nn.Module):
    """Embeddings → one multi-head self-attention block (written with Linear + view + matmul, residual)
    → linear read-out of the last (query) position.

    Input: long tensor (B, T, 2): ``[..., 0]`` the key index (query position: ``n_keys + q``, so queries
    have their own embedding rows), ``[..., 1]`` the value index (query position: ``n_values``, a null).
    """

    def __init__(self, n_keys: int, n_values: int, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.heads, self.d_head = heads, d_model // heads
        self.key_embed = nn.Embedding(2 * n_keys, d_model)
        self.value_embed = nn.Embedding(n_values + 1, d_model)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.readout = nn.Linear(d_model, n_values)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.key_embed(tokens[..., 0]) + self.value_embed(tokens[..., 1])
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.d_head).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.d_head).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.d_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = x + self.o(y)
        return self.readout(h[:, -1])

    def score_matrices(self) -> torch.Tensor:
        """(heads, d_model, d_model): W_Q,h W_K,hᵀ in the convention score = x_i W_Q,h W_K,hᵀ x_jᵀ
        (W_Q,h = rows h·d_head:(h+1)·d_head of ``q.weight``, transposed)."""
        wq = self.q.weight.detach().view(self.heads, self.d_head, -1)
        wk = self.k.weight.detach().view(self.heads, self.d_head, -1)
        return wq.transpose(1, 2) @ wk


def make_data(cfg: Config, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` recall sequences (tokens (n, pairs + 1, 2), targets (n,)): distinct keys per sequence, values
    uniform, the query one of the sequence's keys."""
    keys = torch.rand(n, cfg.n_keys, generator=gen).argsort(1)[:, : cfg.pairs]
    values = torch.randint(0, cfg.n_values, (n, cfg.pairs), generator=gen)
    which = torch.randint(0, cfg.pairs, (n,), generator=gen)
    query = keys.gather(1, which[:, None])
    pair_tokens = torch.stack([keys, values], dim=-1)
    query_token = torch.stack([cfg.n_keys + query, torch.full_like(query, cfg.n_values)], dim=-1)
    return torch.cat([pair_tokens, query_token], dim=1), values.gather(1, which[:, None])[:, 0]


def build_model(n_keys: int, n_values: int, d_model: int, heads: int, sigma: float | None,
                seed: int) -> RecallAttention:
    """The sweep's model factory: torch's default initialisation from ``seed`` (the global RNG is left as
    it was); with ``sigma`` (σ₀ / init scale) not None, ``ms.remove_symmetries(model, sigma, seed + 1000)``:
    θ = θ₀ + ψ, the trained tensors are ψ and the optimizer's decay pulls θ towards θ₀."""
    from ..constrain.remove import remove_symmetries

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RecallAttention(n_keys, n_values, d_model, heads)
    if sigma is not None:
        remove_symmetries(model, sigma=sigma, seed=seed + OFFSET_SEED)
    return model


def make_model(cfg: Config, device="cpu", seed: int = 0, sigma: float | None = None) -> RecallAttention:
    return build_model(cfg.n_keys, cfg.n_values, cfg.d_model, cfg.heads, sigma, seed).to(device)


def learned(params: dict, name: str) -> torch.Tensor:
    """The trained tensor of ``<module>.weight``: the weight itself, or ψ = θ − θ₀ of a model passed through
    ``remove_symmetries`` (``<module>.parametrizations.weight.original``)."""
    if name in params:
        return params[name]
    module, _, leaf = name.rpartition(".")
    return params[f"{module}.parametrizations.{leaf}.original"]


def head_products(params: dict, heads: int) -> torch.Tensor:
    """(heads, d_model, d_model) float64: S_h = ψ_Q,h ψ_K,hᵀ from the learned parts of q and k."""
    wq, wk = learned(params, "q.weight").double(), learned(params, "k.weight").double()
    d_head = wq.shape[0] // heads
    return wq.reshape(heads, d_head, -1).transpose(1, 2) @ wk.reshape(heads, d_head, -1)


class HeadSingularValue:
    """Sweep metric: σ_i(S_h), the i-th largest singular value of head h's learned score matrix (vmappable;
    a class, so Ray can pickle it)."""

    def __init__(self, heads: int, head: int, index: int):
        self.heads, self.head, self.index = heads, head, index

    def __call__(self, params: dict, data) -> torch.Tensor:
        return torch.linalg.svdvals(head_products(params, self.heads)[self.head])[self.index]


class HeadEffect:
    """Sweep metric: RMS change of the test logits when head h's learned q/k part is removed
    (ψ_Q,h = ψ_K,h = 0, rows h·d_head:(h+1)·d_head)."""

    def __init__(self, heads: int, head: int):
        self.heads, self.head = heads, head

    def __call__(self, params: dict, data, forward) -> torch.Tensor:
        ablated = dict(params)
        for name in ("q.weight", "k.weight"):
            key = name if name in params else name.replace(".weight", ".parametrizations.weight.original")
            w = params[key]
            d_head = w.shape[0] // self.heads
            keep = torch.ones(w.shape[0], 1, dtype=w.dtype, device=w.device)
            keep[self.head * d_head:(self.head + 1) * d_head] = 0
            ablated[key] = w * keep
        diff = forward(ablated, data[0]) - forward(params, data[0])
        return diff.double().pow(2).mean().sqrt()


def metrics(cfg: Config) -> dict:
    d_head = cfg.d_model // cfg.heads
    out: dict = {"accuracy": "accuracy"}
    for h in range(cfg.heads):
        out.update({f"sv_{h}_{i}": HeadSingularValue(cfg.heads, h, i) for i in range(d_head)})
        out[f"effect_{h}"] = HeadEffect(cfg.heads, h)
    return out


def head_stats(svals, effects, floor: float) -> dict:
    """From per-head singular values (heads, d_head) and ablation effects (heads,): dead heads by norm
    (‖S_h‖_F ≤ floor × max), dead heads by function (effect ≤ floor × max), each head's effective rank
    exp(H(σ/‖σ‖₁)), and the mean effective rank over the alive heads (None when none is alive or the run
    produced non-finite values)."""
    sv = np.asarray(svals, dtype=float)
    eff = np.asarray(effects, dtype=float)
    if not (np.all(np.isfinite(sv)) and np.all(np.isfinite(eff))):
        return {"dead": None, "dead_functional": None, "alive_eff_rank": None, "eff_rank": None, "norms": None}
    norms = np.sqrt((sv**2).sum(1))
    alive = norms > floor * norms.max() if norms.max() > 0 else np.zeros(len(norms), bool)
    per_head: list[float] = []
    for s in sv:
        p = s / s.sum() if s.sum() > 0 else s
        p = p[p > 0]
        per_head.append(float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0)
    ranks = np.array(per_head)
    functional_alive = eff > floor * eff.max() if eff.max() > 0 else np.zeros(len(eff), bool)
    return {"dead": int((~alive).sum()), "dead_functional": int((~functional_alive).sum()),
            "alive_eff_rank": float(ranks[alive].mean()) if alive.any() else None,
            "eff_rank": ranks.tolist(), "norms": norms.tolist()}


def _rows(df, cfg: Config) -> list[dict]:
    d_head = cfg.d_model // cfg.heads
    out = []
    for _, r in df.iterrows():
        sv = [[r[f"sv_{h}_{i}"] for i in range(d_head)] for h in range(cfg.heads)]
        eff = [r[f"effect_{h}"] for h in range(cfg.heads)]
        stats = head_stats(sv, eff, cfg.dead_floor)
        acc = r["accuracy"] if r["status"] == "ok" and np.isfinite(r["accuracy"]) else None
        out.append({"seed": int(r["seed"]), "gamma": r["weight_decay"] / 2, "optimizer": r["optimizer"],
                    "status": r["status"], "accuracy": acc, "svals": sv, "effects": eff, **stats})
    return out


def _grid(cfg: Config, optimizer: str, gammas) -> list[dict]:
    lr = cfg.lr if optimizer == "sgd" else cfg.adam_lr
    base = {"lr": lr, "batch_size": cfg.batch, "steps": cfg.steps, "seed": list(cfg.seeds),
            "weight_decay": [torch_weight_decay(g) for g in gammas], "optimizer": optimizer}
    if optimizer == "sgd":
        base["momentum"] = cfg.momentum
    return [base]


def detected_heads(model: RecallAttention, example: torch.Tensor) -> dict:
    """What ``ms.find_symmetries`` reports: every group, and the rotation groups acting on q and k only."""
    import mirrorsym as ms

    smap = ms.find_symmetries(model, example)
    qk = [g for g in smap.by_kind("rotation") if set(g.params) == {"q.weight", "k.weight"}]
    rows = [{"kind": g.kind, "size": g.size, "tensors": sorted(g.params), "error": g.error,
             "q_rows": g.params.get("q.weight", (0, []))[1]} for g in smap.groups]
    return {"summary": smap.summary(), "groups": rows, "qk_rotations": len(qk),
            "qk_sizes": [g.size for g in qk],
            "qk_rows": sorted(tuple(g.params["q.weight"][1]) for g in qk)}


def run(cfg: Config, ctx: Context) -> dict:
    from ..sweep import Sweep

    gen = ctx.generator(cfg.data_seed)
    train, test = make_data(cfg, cfg.n_train, gen), make_data(cfg, cfg.n_test, gen)
    shape = (cfg.n_keys, cfg.n_values, cfg.d_model, cfg.heads)
    loss = nn.functional.cross_entropy

    def sweep(sigma, grid, name):
        s = Sweep(partial(build_model, *shape, sigma), loss, train, grid, metrics=metrics(cfg), eval_data=test,
                  record_every=10**9, name=f"transformer-{name}")
        return _rows(ctx.sweep(s, store=f"sweep-{name}"), cfg)

    plain = sweep(None, _grid(cfg, "sgd", cfg.gammas) + _grid(cfg, "adam", cfg.adam_gammas), "plain")
    syre = {}
    for sigma in ctx.track(cfg.syre_sigmas, "transformer: σ₀ sweep"):
        rows = sweep(sigma, _grid(cfg, "sgd", (cfg.syre_gamma,)), f"syre-{sigma:g}")
        syre[f"{sigma:g}"] = rows
    det = detected_heads(make_model(cfg), test[0][:4])
    return {"gammas": list(cfg.gammas), "adam_gammas": list(cfg.adam_gammas), "syre_gamma": cfg.syre_gamma,
            "syre_sigmas": list(cfg.syre_sigmas), "control_sigma": cfg.control_sigma, "seeds": list(cfg.seeds),
            "d_head": cfg.d_model // cfg.heads, "heads": cfg.heads, "n_values": cfg.n_values,
            "dead_floor": cfg.dead_floor, "plain": plain, "syre": syre, "detected": det}


# ------------------------------------------------------------------------------------------ analysis
def _select(rows: list[dict], optimizer: str, gamma: float) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if r["optimizer"] == optimizer and math.isclose(r["gamma"], gamma)}


def _per_seed(rows: dict[int, dict], key: str, seeds) -> list:
    return [rows[s][key] if s in rows else None for s in seeds]


def _diff(a: list, b: list) -> list:
    return [x - y if x is not None and y is not None else None for x, y in zip(a, b, strict=True)]


def _ratio(a: list, b: list) -> list:
    return [x / y if x is not None and y else None for x, y in zip(a, b, strict=True)]


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _summary(results: dict, optimizer: str, gammas, key: str) -> list:
    seeds = results["seeds"]
    return [_mean(_per_seed(_select(results["plain"], optimizer, g), key, seeds)) for g in gammas]


def _log_x(values, smallest_positive):
    """A log axis: 0 is drawn at a tenth of the smallest positive value (labelled)."""
    return [v if v > 0 else smallest_positive / 10 for v in values]


def plot(results: dict, ctx: Context) -> list:
    g, ga = results["gammas"], results["adam_gammas"]
    pos = min([x for x in g + ga if x > 0], default=1.0)
    fig, ax = figure(3)
    for opt, gs, style, label in (("sgd", g, "o-", "SGD+momentum"), ("adam", ga, "s--", "Adam")):
        ax[0, 0].plot(_log_x(gs, pos), _summary(results, opt, gs, "dead"), style, label=f"{label}: by ‖S_h‖")
        ax[0, 0].plot(_log_x(gs, pos), _summary(results, opt, gs, "dead_functional"), style, alpha=0.5,
                      label=f"{label}: by effect on the logits")
        ax[0, 1].plot(_log_x(gs, pos), _summary(results, opt, gs, "alive_eff_rank"), style, label=label)
    ctrl = results["syre"].get(f"{results['control_sigma']:g}", [])
    if ctrl:
        sg = results["syre_gamma"]
        ax[0, 0].plot([sg], [_mean([r["dead"] for r in ctrl])], "r*", ms=10,
                      label=f"syre σ₀={results['control_sigma']:g} (ψ)")
        ax[0, 1].plot([sg], [_mean([r["alive_eff_rank"] for r in ctrl])], "r*", ms=10,
                      label=f"syre σ₀={results['control_sigma']:g} (ψ)")
    ax[0, 0].set_ylim(-0.2, results["heads"] + 0.2)
    ax[0, 0].set_ylabel(f"dead heads (of {results['heads']}), mean over seeds")
    ax[0, 0].set_title(f"Dead heads (≤ {results['dead_floor']:g} × largest)")
    ax[0, 1].axhline(results["d_head"], color="k", ls=":", lw=0.8, label=f"d_head = {results['d_head']}")
    ax[0, 1].set_ylabel("effective rank of S_h, alive heads, mean")
    ax[0, 1].set_title("Alive-head rank of ψ_Q,h ψ_K,hᵀ")
    for a in ax[0, :2]:
        a.set_xscale("log")
        a.set_xlabel("weight decay γ (leftmost point: γ = 0)")
        a.legend(fontsize=6)
    sig = results["syre_sigmas"]
    rows = [results["syre"][f"{s:g}"] for s in sig]
    ax[0, 2].plot(sig, [_mean([r["dead"] for r in rs]) for rs in rows], "o-", label="dead heads (ψ norm)")
    ax[0, 2].plot(sig, [_mean([r["dead_functional"] for r in rs]) for rs in rows], "s--",
                  label="dead heads (effect)")
    plain = _select(results["plain"], "sgd", results["syre_gamma"])
    if plain:
        ax[0, 2].axhline(_mean([r["dead"] for r in plain.values()]), color="tab:blue", ls=":",
                         label="plain decay, same γ")
    ax[0, 2].axvline(results["control_sigma"], color="r", lw=0.8, label="library default σ₀")
    ax[0, 2].set_xscale("log")
    ax[0, 2].set_xlabel("σ₀ / init scale")
    ax[0, 2].set_ylabel("dead heads, mean over seeds")
    acc = ax[0, 2].twinx()
    acc.plot(sig, [_mean([r["accuracy"] for r in rs]) for rs in rows], "g^-", label="test accuracy")
    acc.set_ylim(0, 1.05)
    acc.set_ylabel("test accuracy", color="g")
    ax[0, 2].set_title(f"Symmetry removal vs σ₀ (SGD, γ={results['syre_gamma']:g})")
    ax[0, 2].legend(fontsize=6, loc="center left")
    return [save(fig, ctx.out_dir, "transformer")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    seeds, floor = results["seeds"], results["dead_floor"]
    out = []
    for opt, gammas, label in (("sgd", results["gammas"], "SGD+momentum"), ("adam", results["adam_gammas"], "Adam")):
        g_lo, g_hi = gammas[0], gammas[-1]
        lo, hi = _select(results["plain"], opt, g_lo), _select(results["plain"], opt, g_hi)
        acc = _per_seed(lo, "accuracy", seeds)
        out.append(finding(f"{label}: the task is solved at γ={g_lo:g} (test accuracy; a precondition of the "
                           f"{label} findings)", f"≥ {cfg.min_accuracy}", _mean(acc), acc,
                           statistic=f"test accuracy, {label}, γ={g_lo:g}", better="higher",
                           threshold=cfg.min_accuracy, inclusive=True, contradict=None))
        dead = _diff(_per_seed(hi, "dead", seeds), _per_seed(lo, "dead", seeds))
        out.append(finding(f"{label}: weight decay kills heads — more heads with ‖W_Q,h W_K,hᵀ‖ ≤ {floor:g} × the "
                           f"largest head's at γ={g_hi:g} than at γ={g_lo:g}", "> 0 more dead heads",
                           {"dead at high γ": _per_seed(hi, "dead", seeds),
                            "dead at γ=0": _per_seed(lo, "dead", seeds)}, dead,
                           statistic=f"dead heads at γ={g_hi:g} − at γ={g_lo:g} ({label})", better="higher",
                           threshold=0.0))
        ratio = _ratio(_per_seed(hi, "alive_eff_rank", seeds), _per_seed(lo, "alive_eff_rank", seeds))
        out.append(finding(f"{label}: the effective rank of the ALIVE heads' W_Q,h W_K,hᵀ falls — mean over alive "
                           f"heads at γ={g_hi:g} ≤ {cfg.rank_margin} × at γ={g_lo:g}", f"ratio ≤ {cfg.rank_margin}",
                           {"high γ": _per_seed(hi, "alive_eff_rank", seeds),
                            "γ=0": _per_seed(lo, "alive_eff_rank", seeds)}, ratio,
                           statistic=f"alive-head mean eff. rank at γ={g_hi:g} / at γ={g_lo:g} ({label})",
                           better="lower", threshold=cfg.rank_margin, contradict=1.0, inclusive=True))
    plain = _select(results["plain"], "sgd", results["syre_gamma"])
    sg = results["syre_gamma"]
    for sigma in sorted({results["control_sigma"], max(results["syre_sigmas"])}):
        rows = {r["seed"]: r for r in results["syre"].get(f"{sigma:g}", [])}
        if not rows:
            continue
        tag = (f"symmetry removal at the library default σ₀={sigma:g} × init (THE control)"
               if sigma == results["control_sigma"] else
               f"symmetry removal at a LARGER σ₀={sigma:g} × init ({sigma / results['control_sigma']:g} × the "
               "library default; not the control)")
        for key, what in (("dead", "dead heads by the learned part, ‖ψ_Q,h ψ_K,hᵀ‖ ≤ floor × largest"),
                          ("dead_functional", "dead heads by function, logit change on removing ψ_Q,h, ψ_K,h "
                                              "≤ floor × largest")):
            p, s = _per_seed(plain, key, seeds), _per_seed(rows, key, seeds)
            out.append(finding(f"SGD, γ={sg:g}: {tag} leaves fewer dead heads than plain decay ({what})",
                               "plain − syre > 0", {"plain": p, "syre": s}, _diff(p, s),
                               statistic=f"{key} heads, plain decay − syre σ₀={sigma:g}", better="higher",
                               threshold=0.0))
        p, s = _per_seed(plain, "alive_eff_rank", seeds), _per_seed(rows, "alive_eff_rank", seeds)
        out.append(finding(f"SGD, γ={sg:g}: {tag} keeps a higher alive-head effective rank of ψ_Q,h ψ_K,hᵀ than "
                           "plain decay", "syre − plain > 0", {"plain": p, "syre": s}, _diff(s, p),
                           statistic=f"alive-head mean eff. rank, syre σ₀={sigma:g} − plain decay",
                           better="higher", threshold=0.0))
    det = results["detected"]
    heads, d_head = cfg.heads, cfg.d_model // cfg.heads
    expected_rows = sorted(tuple(range(h * d_head, (h + 1) * d_head)) for h in range(heads))
    got_rows = sorted(tuple(r) for r in det["qk_rows"])
    out.append(Claim("find_symmetries reports one rotation group per head on (q, k), of size d_head, on that "
                     "head's rows (initialised model)", f"{heads} groups of size {d_head}",
                     f"{det['qk_rotations']} groups, sizes {det['qk_sizes']}",
                     det["qk_rotations"] == heads and got_rows == expected_rows))
    return out
