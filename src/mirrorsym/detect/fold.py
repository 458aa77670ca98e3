"""Fold normalisation weights into the linear maps that read them.

In a pre-norm transformer every block reads the residual stream through a norm, ``y = W (γ ⊙ n(x) + β) + b``
with ``n`` the RMS (or mean-and-variance) normalisation. The per-channel weight γ (and bias β) can move
into the reader: ``W' = W diag(γ)``, ``b' = b + W β``, leaving a norm with γ = 1, β = 0 and the same
function. This is the first step of SliceGPT-style methods: with γ folded away an RMSNorm is
``x / rms(x)``, which commutes with any orthogonal Q (``rms(Qx) = rms(x)``), so the whole residual
stream can then be rotated (Q on the embedding columns and on every stream writer's rows, Qᵀ on every
stream reader's columns). Before folding, only permutations of the stream commute with ``diag(γ)``.

That rotation is a symmetry of the *function*; it is a symmetry of the *parametrisation* only once the
gains are gone as parameters: while γ is a parameter (even one equal to 1), a rotation would have to
carry it to ``Q diag(γ) Qᵀ``, which no vector γ' gives. ``fold_norms(model, drop_gains=True)`` therefore
also replaces each folded RMS norm by a :class:`GainFreeRMSNorm` (``x / rms(x)``, no parameters), and
:func:`~mirrorsym.detect.find_symmetries` then reports the residual-stream rotation (one ``rotation``
group of size d_model). LayerNorms are folded but never made gain-free: their mean subtraction does not
commute with a rotation (only with maps that fix the all-ones vector), so no stream rotation holds there.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["GainFreeRMSNorm", "fold_norms"]


class GainFreeRMSNorm(nn.Module):
    """``x * rsqrt(mean(x², -1) + eps)`` over the last dim, computed in the input's dtype, with no
    parameters: what :func:`fold_norms` (``drop_gains=True``) puts in place of a folded RMS norm.
    ``eps=None`` means ``torch.finfo(x.dtype).eps`` (as ``nn.RMSNorm``)."""

    def __init__(self, eps: float | None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def fold_norms(model: nn.Module, drop_gains: bool = False) -> nn.Module:
    """A deep copy of ``model`` in which each recognised pre-norm's weight γ, and its bias β where that is
    exact, is folded into the linear maps that read the norm's output; the norm's weight is then all ones
    (its bias zero). ``model`` is not modified; the copy computes the same function (up to round-off).

    Recognised layouts (the norm's output must feed exactly these readers, which is what pre-norm means):

    * Hugging Face Llama-style decoder layers (Llama, Mistral, Qwen2, ...): ``input_layernorm`` →
      ``self_attn.{q,k,v}_proj``, ``post_attention_layernorm`` → ``mlp.{gate,up}_proj``;
    * GPT-2 blocks: ``ln_1`` → ``attn.c_attn``, ``ln_2`` → ``mlp.c_fc`` (``Conv1D``, weight ``(in, out)``);
    * torchvision ViT blocks: ``ln_1`` → ``self_attention`` (``nn.MultiheadAttention``'s packed input
      projection), ``ln_2`` → ``mlp[0]``; ``nn.TransformerEncoderLayer(norm_first=True)``: ``norm1`` →
      ``self_attn``, ``norm2`` → ``linear1``;
    * the final norm before the output head: ``model.norm`` / ``transformer.ln_f`` → ``lm_head``,
      ``encoder.ln`` → ``heads.head``;
    * the built-in example decoder (:class:`mirrorsym.detect.examples.TinyLlama`, ``mirrorsym scan llama``):
      ``attn_norm`` → ``q, k, v``, ``mlp_norm`` → ``gate, up``, ``norm`` → ``head``.

    A norm is left as it is when folding would not be exact: a reader whose weight is tied to another
    parameter (a final norm before an LM head tied to the input embedding: folding would change the
    embedding too), a norm whose output is not ``weight * normalised + bias`` (checked numerically,
    e.g. Gemma's ``(1 + weight)``), or a LayerNorm bias β ≠ 0 when a reader has no bias to absorb ``W β``
    (then β is kept as ``β / γ`` if γ has no zeros, else the norm is skipped).

    ``drop_gains=True``: each folded norm that is an RMS norm (checked numerically: with its weight at 1 it
    computes ``x / sqrt(mean(x², -1) + eps)`` with its own ``eps``, ``variance_epsilon`` or ``epsilon``)
    is then replaced by a parameter-free :class:`GainFreeRMSNorm` with the same eps, so that no per-channel
    multiply is left on the stream and its rotation becomes a symmetry of the parameters (see the module
    docstring). Norms that were not folded, and LayerNorms (mean subtraction), stay as they are. The state
    dict then lacks those norms' weights. Default False: the norms keep their (all-ones) weights.
    """
    folded = copy.deepcopy(model)
    tied = _tied_ids(folded)
    done = []
    for norm, readers in _pairs(folded):
        if _fold(norm, readers, tied):
            done.append(norm)
    if drop_gains:
        for norm in done:
            ok, eps = _rms_eps(norm)
            if ok:
                _replace(folded, norm, GainFreeRMSNorm(eps))
    return folded


def _rms_eps(norm: nn.Module) -> tuple[bool, float | None]:
    """(True, eps) if ``norm`` at its (folded, all-ones) weight is ``GainFreeRMSNorm(eps)`` with its own eps,
    else (False, None). Checked in float64 on random inputs with a non-zero mean (a LayerNorm differs) at
    two scales: order 1 and order sqrt(eps), where the statistic and eps are alike (eps added elsewhere,
    e.g. outside the square root, differs)."""
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        return False, None  # a LayerNorm-style bias (kept as β / γ when no reader could absorb W β)
    names = [a for a in ("eps", "variance_epsilon", "epsilon") if hasattr(norm, a)]
    eps = getattr(norm, names[0]) if names else False
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        return False, None
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False, None
    probe = copy.deepcopy(norm).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, weight.numel(), generator=gen, dtype=torch.float64) + 0.5
    scales = [1.0] + ([float(eps) ** 0.5] if eps else [])
    with torch.no_grad():
        for c in scales:
            if not torch.allclose(probe(c * x), GainFreeRMSNorm(eps)(c * x), rtol=1e-5, atol=1e-6):
                return False, None
    return True, (None if eps is None else float(eps))


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered as a submodule under ``root``."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if child is old:
                setattr(module, name, new)


# ---------------------------------------------------------------------------- layouts


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


_BLOCK_LAYOUTS = [
    # (norm, readers) relative to a block
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("ln_1", ["attn.c_attn"]),
    ("ln_2", ["mlp.c_fc"]),
    ("ln_1", ["self_attention"]),
    ("ln_2", ["mlp.0"]),
]

_HEAD_LAYOUTS = [
    # (norm, readers) relative to the root
    ("model.norm", ["lm_head"]),
    ("transformer.ln_f", ["lm_head"]),
    ("encoder.ln", ["heads.head"]),
]


def _pairs(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    from .examples import LlamaBlock, TinyLlama

    out: list[tuple[nn.Module, list[nn.Module]]] = []
    for _, block in model.named_modules():
        if isinstance(block, LlamaBlock):
            out += [(block.attn_norm, [block.q, block.k, block.v]), (block.mlp_norm, [block.gate, block.up])]
            continue
        if isinstance(block, nn.TransformerEncoderLayer):
            if block.norm_first:
                out += [(block.norm1, [block.self_attn]), (block.norm2, [block.linear1])]
            continue
        for norm_path, reader_paths in _BLOCK_LAYOUTS:
            norm = _get(block, norm_path)
            readers = [r for r in (_get(block, p) for p in reader_paths) if r is not None]
            if norm is not None and len(readers) == len(reader_paths):
                out.append((norm, readers))
    for norm_path, reader_paths in _HEAD_LAYOUTS:
        norm = _get(model, norm_path)
        readers = [r for r in (_get(model, p) for p in reader_paths) if r is not None]
        if norm is not None and len(readers) == len(reader_paths):
            out.append((norm, readers))
    if isinstance(model, TinyLlama):
        out.append((model.norm, [model.head]))
    return out


def _tied_ids(model: nn.Module) -> set[int]:
    """ids of the parameters registered under more than one name."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


# ---------------------------------------------------------------------------- folding


def _reader_tensors(reader: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """(weight, bias or None, the weight's input dim) of a linear map that reads the norm."""
    if isinstance(reader, nn.Linear):
        return reader.weight, reader.bias, 1
    if isinstance(reader, nn.MultiheadAttention):
        if reader.in_proj_weight is None:  # separate q/k/v weights (kdim/vdim differ): not a self-reader
            return None
        return reader.in_proj_weight, reader.in_proj_bias, 1
    if type(reader).__name__ == "Conv1D" and hasattr(reader, "nf"):  # transformers' GPT-2 Conv1D: x W + b
        weight, bias = reader.weight, reader.bias
        if isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor)):
            return weight, bias, 0
    return None


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, which the caller knows is a tensor (a parameter or buffer)."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def _affine_parts(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(γ, β or None) if ``norm(x) == γ ⊙ norm₁(x) + β`` with norm₁ the same norm at γ = 1, β = 0 (checked
    on a random input in float64), else None."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    probe = copy.deepcopy(norm).double().eval()
    unit = copy.deepcopy(probe)
    with torch.no_grad():
        _tensor(unit, "weight").fill_(1.0)
        if bias is not None:
            _tensor(unit, "bias").zero_()
        x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        expected = _tensor(probe, "weight") * unit(x) + (_tensor(probe, "bias") if bias is not None else 0.0)
        ok = torch.allclose(probe(x), expected, rtol=1e-5, atol=1e-6)  # RMSNorms may compute in float32
    return (weight, bias) if ok else None


def _fold(norm: nn.Module, readers: list[nn.Module], tied: set[int]) -> bool:
    parts = _affine_parts(norm)
    tensors = [t for t in (_reader_tensors(r) for r in readers) if t is not None]
    if parts is None or len(tensors) != len(readers):
        return False
    if any(id(w) in tied or (b is not None and id(b) in tied) for w, b, _ in tensors):
        return False
    gamma, beta = parts
    with torch.no_grad():
        g = gamma.detach().clone()
        fold_beta = beta is not None and bool(beta.any())
        keep_beta = fold_beta and any(b is None for _, b, _ in tensors)
        if keep_beta and not bool((g != 0).all()):
            return False
        for w, b, dim in tensors:
            if beta is not None and fold_beta and not keep_beta:
                # y = W (γ n + β) + b: the reader's bias absorbs W β (computed before W is scaled)
                assert b is not None  # not keep_beta: every reader has a bias
                shift = w @ beta.to(w.dtype) if dim == 1 else beta.to(w.dtype) @ w
                b.add_(shift)
            shape = [1, -1] if dim == 1 else [-1, 1]
            w.mul_(g.to(w.dtype).reshape(shape))
        if beta is not None and fold_beta and keep_beta:
            beta.div_(g.to(beta.dtype))
        elif beta is not None:
            beta.zero_()
        gamma.fill_(1.0)
    return True
