"""Rotation symmetry in attention ⇒ low-rank heads under weight decay; symmetry removal keeps the rank.

Per head h the attention scores are x W_Q,h W_K,hᵀ xᵀ, unchanged by W_Q,h → W_Q,h Q, W_K,h → W_K,h Q for
every orthogonal Q (d_head × d_head): the rotation symmetry of docs/theory.md#common-symmetries, whose reflections
Q = I − 2nnᵀ have the surfaces W_Q,h n = 0, W_K,h n = 0. With decay γ(‖W_Q,h‖² + ‖W_K,h‖²) the minimum
over the factorisation is 2γ‖W_Q,h W_K,hᵀ‖_* (closed form C), so larger γ should give lower-rank score
matrices. Decay towards a fixed random offset θ₀ (``ms.remove_symmetries``, docs/theory.md#syre) has no such
surface through its minimiser, so at the same γ the heads should keep a higher rank.

Task (known structure): *associative recall with paired tokens*. Each sequence holds P (key, value)
pairs, one position per pair embedded as E_key[k] + E_val[v], and a final query position E_qry[q] with
q one of the keys; the model must output the value paired with q. One attention layer solves it: the
query must attend to the pair whose key matches, which needs a bilinear score E_qryᵀ W_Q W_Kᵀ E_key of
rank up to ``n_keys`` summed over heads, and W_V W_O must read the value. Model: embeddings, one pre-
activation-free attention block (4 heads, d_model 32, q/k/v/o Linear without bias, residual), linear read-
out at the query position. Trained with Adam and *coupled* ``weight_decay = λ = 2γ`` (its fixed points are
the stationary points of L + γ‖θ‖²), all runs from the same initialisation and data.

Measured: the per-head effective rank exp(H(σ/‖σ‖₁)) (``mirrorsym.diagnose.metrics.effective_rank``) of
W_Q,h W_K,hᵀ (d_model × d_model, rank ≤ d_head) vs γ, test accuracy, and what ``ms.find_symmetries``
reports for the model (one rotation group per head on q/k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..theory import torch_weight_decay
from .base import Claim, Context, finding
from .plotting import figure, save

NAME = "transformer"
TITLE = "Attention: per-head rank of W_Q W_Kᵀ falls with weight decay; symmetry removal keeps it"


@dataclass(frozen=True)
class Config:
    n_keys: int = 8
    n_values: int = 8
    pairs: int = 5
    d_model: int = 32
    heads: int = 4
    n_train: int = 4096
    n_test: int = 1024
    batch: int = 128
    steps: int = 1500
    lr: float = 3e-3
    gammas: tuple[float, ...] = (0.0, 5e-4, 2e-3, 5e-3)  # L + γ‖θ‖²; torch weight_decay = 2γ
    control_gammas: tuple[float, ...] = (2e-3, 5e-3)  # decay towards a random θ₀ (remove_symmetries)
    syre_sigma: float = 0.5  # σ₀ in units of each tensor's init std
    rank_margin: float = 0.75  # claim: mean eff. rank at the largest γ ≤ margin × at the smallest γ
    min_accuracy: float = 0.9  # the smallest γ must solve the task, or the ranks mean nothing
    seed: int = 0


CONFIGS = {
    "tiny": Config(steps=500, n_train=2048, n_test=512, gammas=(0.0, 5e-3), control_gammas=(5e-3,),
                   min_accuracy=0.5),
    "quick": Config(),
    "full": Config(steps=6000, d_model=64, heads=8, n_keys=16, n_values=16, pairs=8, n_train=32768,
                   gammas=(0.0, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2), control_gammas=(1e-3, 2e-3, 5e-3, 1e-2)),
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


def make_model(cfg: Config, device) -> RecallAttention:
    torch.manual_seed(cfg.seed)  # the same initial weights for every run
    return RecallAttention(cfg.n_keys, cfg.n_values, cfg.d_model, cfg.heads).to(device)


def train(cfg: Config, gamma: float, control: bool, data, ctx: Context) -> RecallAttention:
    """Adam with coupled weight_decay = 2γ; with ``control`` the decay pulls towards a random θ₀."""
    import mirrorsym as ms

    (x, y), _ = data
    model = make_model(cfg, x.device)
    removal = ms.remove_symmetries(model, sigma=cfg.syre_sigma, seed=cfg.seed + 1) if control else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=torch_weight_decay(gamma))
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # the same minibatches for every run
    label = f"{'syre' if control else 'decay'} γ={gamma:g}"
    for _ in ctx.track(range(cfg.steps), label):
        idx = torch.randint(0, len(x), (cfg.batch,), generator=gen).to(x.device)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    if removal is not None:
        removal.remove()  # back to plain parameters, keeping the trained values
    return model


def measure(model: RecallAttention, test) -> dict:
    from ..diagnose.metrics import effective_rank, singular_values

    x, y = test
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean()
    mats = model.score_matrices().double()
    return {"accuracy": acc,
            "eff_rank": torch.stack([effective_rank(m) for m in mats]),
            "svals": torch.stack([singular_values(m)[: model.d_head] for m in mats])}


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
    gen = ctx.generator(cfg.seed)
    data = (make_data(cfg, cfg.n_train, gen), make_data(cfg, cfg.n_test, gen))
    data = tuple((a.to(ctx.device), b.to(ctx.device)) for a, b in data)
    models = [train(cfg, g, False, data, ctx) for g in cfg.gammas]
    decay = [measure(m, data[1]) for m in models]
    control = [measure(train(cfg, g, True, data, ctx), data[1]) for g in cfg.control_gammas]
    det = detected_heads(models[0].cpu(), data[1][0][:4].cpu())  # on a trained model
    return {"gammas": list(cfg.gammas), "control_gammas": list(cfg.control_gammas), "d_head": cfg.d_model // cfg.heads,
            "n_values": cfg.n_values, "decay": decay, "control": control, "detected": det}


def _mean_rank(run: dict) -> float:
    return float(np.mean(run["eff_rank"]))


def _log_x(gammas, smallest_positive):
    """γ for a log axis: γ = 0 is drawn at a tenth of the smallest positive γ (labelled)."""
    return [g if g > 0 else smallest_positive / 10 for g in gammas]


def plot(results: dict, ctx: Context) -> list:
    g, gc = results["gammas"], results["control_gammas"]
    pos = min([x for x in g + gc if x > 0], default=1.0)
    xg, xc = _log_x(g, pos), _log_x(gc, pos)
    ranks = np.array([r["eff_rank"] for r in results["decay"]])
    fig, ax = figure(3)
    for h in range(ranks.shape[1]):
        ax[0, 0].plot(xg, ranks[:, h], ".", color="tab:blue", alpha=0.4, label="decay, per head" if h == 0 else None)
    ax[0, 0].plot(xg, ranks.mean(1), "o-", color="tab:blue", label="decay, mean over heads")
    if gc:
        ax[0, 0].plot(xc, [_mean_rank(r) for r in results["control"]], "s--", color="tab:red",
                      label="decay towards random θ₀ (syre), mean")
    ax[0, 0].axhline(results["d_head"], color="k", ls=":", lw=0.8, label=f"max rank = d_head = {results['d_head']}")
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("weight decay γ (leftmost point: γ = 0)")
    ax[0, 0].set_ylabel("effective rank of W_Q,h W_K,hᵀ")
    ax[0, 0].set_title("Per-head score-matrix rank vs weight decay")
    ax[0, 0].legend(fontsize=7)
    for i, r in enumerate(results["decay"]):
        sv = np.array(r["svals"])
        ax[0, 1].semilogy(np.arange(1, sv.shape[1] + 1), np.sort(sv, axis=1)[:, ::-1].mean(0) / sv.max(), "o-",
                          ms=3, label=f"decay γ={g[i]:g}")
    for i, r in enumerate(results["control"]):
        sv = np.array(r["svals"])
        ax[0, 1].semilogy(np.arange(1, sv.shape[1] + 1), np.sort(sv, axis=1)[:, ::-1].mean(0) / sv.max(), "s--",
                          ms=3, label=f"syre γ={gc[i]:g}")
    ax[0, 1].set_xlabel("singular value index i")
    ax[0, 1].set_ylabel("σ_i(W_Q,h W_K,hᵀ) / σ_max (mean over heads)")
    ax[0, 1].set_title("Score-matrix spectra")
    ax[0, 1].legend(fontsize=7)
    ax[0, 2].plot(xg, [r["accuracy"] for r in results["decay"]], "o-", color="tab:blue", label="decay")
    if gc:
        ax[0, 2].plot(xc, [r["accuracy"] for r in results["control"]], "s--", color="tab:red", label="syre")
    ax[0, 2].axhline(1 / results["n_values"], color="k", ls=":", lw=0.8, label="chance")
    ax[0, 2].set_xscale("log")
    ax[0, 2].set_ylim(0, 1.02)
    ax[0, 2].set_xlabel("weight decay γ (leftmost point: γ = 0)")
    ax[0, 2].set_ylabel("test accuracy (associative recall)")
    ax[0, 2].set_title("Task still solved")
    ax[0, 2].legend(fontsize=7, loc="lower right")
    return [save(fig, ctx.out_dir, "transformer")]


def claims(results: dict, cfg: Config) -> list[Claim]:
    decay = results["decay"]
    low, high = _mean_rank(decay[0]), _mean_rank(decay[-1])
    g_lo, g_hi = results["gammas"][0], results["gammas"][-1]
    out = [
        finding(f"mean per-head eff. rank of W_Q W_Kᵀ at γ={g_hi:g} ≤ {cfg.rank_margin} × that at γ={g_lo:g}",
                f"≤ {cfg.rank_margin * low:.2f}", round(high, 3), [high / low],
                statistic=f"mean per-head effective rank at γ={g_hi:g} / at γ={g_lo:g}", better="lower",
                threshold=cfg.rank_margin, contradict=1.0, inclusive=True),
        finding(f"the task is solved at γ={g_lo:g} (test accuracy; a precondition of the findings here)",
                f"≥ {cfg.min_accuracy}", decay[0]["accuracy"], [decay[0]["accuracy"]],
                statistic=f"test accuracy at γ={g_lo:g}", better="higher", threshold=cfg.min_accuracy,
                inclusive=True, contradict=None),
    ]
    by_gamma = dict(zip(results["gammas"], decay, strict=True))
    for g, ctrl in zip(results["control_gammas"], results["control"], strict=True):
        if g in by_gamma:
            plain, syre = _mean_rank(by_gamma[g]), _mean_rank(ctrl)
            out.append(finding(f"symmetry removal (σ₀={cfg.syre_sigma}) keeps a higher mean eff. rank at the same "
                               f"γ={g:g}", f"> {plain:.2f} (plain decay)", round(syre, 3), [syre - plain],
                               statistic=f"mean per-head effective rank at γ={g:g}, syre − plain decay",
                               better="higher", threshold=0.0))
    det = results["detected"]
    heads, d_head = cfg.heads, cfg.d_model // cfg.heads
    expected_rows = sorted(tuple(range(h * d_head, (h + 1) * d_head)) for h in range(heads))
    got_rows = sorted(tuple(r) for r in det["qk_rows"])
    out.append(Claim("find_symmetries reports one rotation group per head on (q, k), of size d_head, on that "
                     "head's rows", f"{heads} groups of size {d_head}",
                     f"{det['qk_rotations']} groups, sizes {det['qk_sizes']}",
                     det["qk_rotations"] == heads and got_rows == expected_rows))
    return out
