"""Small built-in models with known symmetries (used by ``mirrorsym scan NAME`` and the tests).

Each factory returns ``(model, example_inputs)`` with a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mlp(activation: type[nn.Module] = nn.Tanh, sizes: Sequence[int] = (784, 256, 256, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (or 1x1 conv-BN when the width changes)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = x if self.down is None else self.down(x)
        return F.relu(h + skip)


class SmallResNet(nn.Module):
    """stem (conv-BN-ReLU-maxpool), two residual blocks (8 -> 8, 8 -> 16), global pool, linear head."""

    def __init__(self, width: int = 8, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(h), 1))


class HandAttention(nn.Module):
    """Multi-head self-attention written with Linear + view + matmul (GPT style), pre-LN block."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln(x)
        q = self.q(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        y = att.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, t, d)
        return x + self.o(y)


class TinyTransformer(nn.Module):
    """Linear embedding, nn.TransformerEncoder (2 layers, 4 heads), mean pool, linear head."""

    def __init__(self, n_in: int = 6, dim: int = 16, heads: int = 4, layers: int = 2, n_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class LoRALinear(nn.Module):
    """y = W0 x + B(A x): a frozen-style base plus a rank-r factor pair."""

    def __init__(self, n_in: int = 12, n_out: int = 10, rank: int = 3) -> None:
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.A = nn.Linear(n_in, rank, bias=False)
        self.B = nn.Linear(rank, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.B(self.A(x))


class TinyGPT(nn.Module):
    """A GPT-2-style decoder block: token + position embeddings, pre-LN causal attention with one fused
    qkv Linear split into heads, GELU MLP, final LayerNorm and a linear head over the vocabulary."""

    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 4, context: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        q, k, v = self.c_attn(self.ln1(x)).split(x.shape[-1], dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, -1))
        x = x + self.proj(F.gelu(self.fc(self.ln2(x))))
        return self.head(self.ln_f(x))


class RMSNorm(nn.Module):
    """x / rms(x) ⊙ w, written out as Hugging Face writes it (the detector reads the ATen ops)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer: grouped-query causal attention (``rope``: rotary position embedding on q and
    k) and a SwiGLU MLP, each read through an RMSNorm and added to the residual stream."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, rope: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d_head, self.rope = heads, kv_heads, dim // heads, rope
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d_head, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d_head, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, self.heads, self.d_head).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.d_head).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.d_head).transpose(1, 2)
        if self.rope:
            freq = 10000.0 ** (-torch.arange(0, self.d_head, 2, device=x.device) / self.d_head)
            angle = torch.arange(t, device=x.device)[:, None] * freq[None, :]
            cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads  # each KV head serves `rep` query heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.d_head).reshape(b, self.heads, t, self.d_head)
        v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.d_head).reshape(b, self.heads, t, self.d_head)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    """A Llama-style decoder in plain torch (no ``transformers`` needed): token embedding, ``layers``
    LlamaBlocks (4 query heads sharing 2 KV heads, RoPE, SwiGLU), a final RMSNorm and an untied LM head.
    Its groups are derived by hand in docs/theory.md#llama-groups."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 64,
                 layers: int = 2, rope: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, hidden, rope) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():  # generic norm gains (all-ones gains would hide a wrong sign or scale)
            for m in self.modules():
                if isinstance(m, RMSNorm):
                    m.weight.uniform_(0.5, 1.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


Example = tuple[nn.Module, torch.Tensor]


def _seeded(factory: Callable[[], nn.Module], *shape: int) -> Callable[[], Example]:
    def make() -> Example:
        torch.manual_seed(0)
        model = factory()
        return model, torch.randn(*shape, generator=torch.Generator().manual_seed(1))

    return make


EXAMPLES: dict[str, Callable[[], Example]] = {
    "mlp-tanh": _seeded(lambda: mlp(nn.Tanh), 4, 784),
    "mlp-relu": _seeded(lambda: mlp(nn.ReLU), 4, 784),
    "cnn": _seeded(SmallResNet, 2, 3, 16, 16),
    "attention": _seeded(HandAttention, 2, 5, 16),
    "transformer": _seeded(TinyTransformer, 2, 5, 6),
    "lora": _seeded(LoRALinear, 4, 12),
    "gpt": lambda: (
        _seeded_model(TinyGPT),
        torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(1)),
    ),
    "llama": lambda: (
        _seeded_model(TinyLlama),
        torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1)),
    ),
}


def _seeded_model(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return factory()


def example(name: str) -> Example:
    """``(model, example_inputs)`` for a built-in example (see ``EXAMPLES``)."""
    try:
        return EXAMPLES[name]()
    except KeyError:
        raise KeyError(f"no built-in example {name!r}; choose one of {sorted(EXAMPLES)}") from None
