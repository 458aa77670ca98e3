"""find_symmetries through torch.export: Hugging Face transformers (random init from tiny configs, nothing
downloaded) and torch's nn.Transformer family, with the exact groups derived by hand, every group exact in
float64 (<= 1e-10) under a non-identity element; the fx and export paths agree on the fx-traceable models.

Conventions in the derivations: d = hidden size (64 for the HF models), h = query heads (4), kv = key/value
heads, dh = head dim (16), ff = MLP width. "stream" = the residual stream: the embedding's columns, every
norm's weight, the rows of every projection that writes the stream and the columns of every one that reads
it, permuted together.
"""

import collections
import copy
import warnings

import pytest
import torch
import transformers as hf
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

from mirrorsym.core.mirror import output_change
from mirrorsym.detect import DetectWarning, UntraceableModelError, find_symmetries
from mirrorsym.detect.examples import EXAMPLES
from mirrorsym.detect.find import build_groups, restored
from mirrorsym.detect.trace import Detector

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- helpers


def find_quiet(model, args, kwargs=None):
    """find_symmetries, failing the test on any DetectWarning (every op of these models must be read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectWarning)
        return find_symmetries(model, args, kwargs)


def kinds(smap) -> dict:
    """{(kind, size): count}."""
    return dict(collections.Counter((g.kind, g.size) for g in smap))


def _rms_forward(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture
def float64_norms(monkeypatch):
    """Hugging Face's RMSNorms compute their statistics in float32 whatever the model's dtype
    (``hidden_states.to(torch.float32)``), so in a float64 check a group that permutes the normalised units
    (the residual stream) is only float32-exact (~1e-7: the mean of x² is summed in another order). For
    the 1e-10 check the norms compute in the input dtype: the same function, in float64."""
    for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, T5LayerNorm):
        monkeypatch.setattr(cls, "forward", _rms_forward)


def assert_exact(model, args, kwargs, smap, tol=1e-10):
    """Every group, alone, with a random element that moves at least one weight: outputs unchanged to
    ``tol`` relative in float64 (eval mode)."""
    base = copy.deepcopy(model).double().eval()
    xs = tuple(a.double() if a.is_floating_point() else a for a in args)
    kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        y0 = base(*xs, **kw)
    tensors = dict(base.named_parameters())
    for i, g in enumerate(smap):
        before = {m.name: tensors[m.name].detach().clone() for m in g.members if not m.buffer}
        with restored(base, [g]):
            for attempt in range(10):  # a random permutation of 2 units is the identity half of the time
                g.apply_(base, g.random_element(generator=torch.Generator().manual_seed(1000 * attempt + i)))
                if any(not torch.equal(tensors[name], t) for name, t in before.items()):
                    break
            else:
                raise AssertionError(f"{g.label}: no random element moved a weight")
            with torch.no_grad():
                err = output_change(y0, base(*xs, **kw))
        assert err <= tol, f"{g.label} changed the outputs by {err:.2e}"


def rows(start, n):
    return list(range(start, start + n))


def of(smap, kind, size, *names):
    """The groups of ``kind`` and ``size`` that move every tensor in ``names``."""
    return [g for g in smap if g.kind == kind and g.size == size and all(n in g.params for n in names)]


# ---------------------------------------------------------------------------- Hugging Face decoders


def llama(kv=2):
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=kv,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
        use_cache=False,
    )
    return hf.LlamaForCausalLM(cfg).eval()


def test_llama_grouped_query_attention(float64_norms):
    """Llama, d = 64, h = 4, kv = 2 (two query heads per KV head), dh = 16, ff = 128, 2 layers, untied.

    Per layer (x 2):
    * permutation 128: the SwiGLU units (gate rows, up rows, down columns);
    * scale 128: up rows x d, down columns / d (y = silu(gate) * up is linear in up); the gate rows only
      permute (silu);
    * permutation 2: the KV heads, each with its query heads (q rows of heads 2g, 2g+1; k, v rows; o columns);
    * permutation 2 x 2: the query heads within each KV group, one group per KV head (its q rows and o
      columns; the two KV groups permute independently);
    * rotation 16 x 2: per KV head, v rows and the o columns of both its query heads;
    * scale 64: input_layernorm weight x d, q/k/v columns / d;  scale 64: post_attention_layernorm weight
      with the gate/up columns.
    Global: permutation 64 (the stream), scale 64 (final norm weight with lm_head columns), sign_flip 64: the
    stream's signs. RMSNorm divides by rms(x), an even function of each coordinate, so flipping x_i flips
    the normalised x_i, which the norm weight w_i takes back (w_i → −w_i). The group flips the embedding's
    columns, the rows of every o_proj and down_proj (they write the stream) and every norm weight (5); the
    projections that read the norms' outputs do not change. (LayerNorm subtracts the mean: no sign flips.)
    No q/k rotation: RoPE rotates pairs of q/k coordinates by position-dependent angles (it pins the head dim).
    """
    model = llama()
    kw = {"use_cache": False}
    smap = find_quiet(model, (IDS,), kw)
    assert kinds(smap) == {
        ("permutation", 128): 2,
        ("scale", 128): 2,
        ("permutation", 2): 6,
        ("rotation", 16): 4,
        ("scale", 64): 5,
        ("permutation", 64): 1,
        ("sign_flip", 64): 1,
    }
    L = "model.layers.0."
    # no group touches q or k through a rotation (RoPE)
    assert not [g for g in smap.by_kind("rotation") if L + "self_attn.q_proj.weight" in g.params]
    kv_heads = of(smap, "permutation", 2, L + "self_attn.k_proj.weight")
    assert len(kv_heads) == 1
    assert kv_heads[0].params[L + "self_attn.q_proj.weight"] == (0, rows(0, 64))
    assert [m.index.shape for m in kv_heads[0].members if m.name == L + "self_attn.q_proj.weight"] == [(2, 32)]
    within = [g for g in of(smap, "permutation", 2, L + "self_attn.q_proj.weight") if g not in kv_heads]
    assert len(within) == 2
    for g, kv_head in zip(within, range(2), strict=True):  # q heads 2g, 2g+1 (32 rows), o columns alike
        assert set(g.params) == {L + "self_attn.q_proj.weight", L + "self_attn.o_proj.weight"}
        assert g.params[L + "self_attn.q_proj.weight"] == (0, rows(32 * kv_head, 32))
        assert g.params[L + "self_attn.o_proj.weight"] == (1, rows(32 * kv_head, 32))
    signs = of(smap, "sign_flip", 64)[0]
    norms = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    writers = {f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert set(signs.params) == {"model.embed_tokens.weight", "model.norm.weight"} | norms | writers
    assert signs.params["model.embed_tokens.weight"][0] == 1 and signs.params[L + "mlp.down_proj.weight"][0] == 0
    vo = of(smap, "rotation", 16, L + "self_attn.v_proj.weight")
    assert [g.params[L + "self_attn.v_proj.weight"] for g in vo] == [(0, rows(0, 16)), (0, rows(16, 16))]
    assert [g.params[L + "self_attn.o_proj.weight"] for g in vo] == [(1, rows(0, 32)), (1, rows(32, 32))]
    swiglu = of(smap, "scale", 128, L + "mlp.up_proj.weight")
    assert len(swiglu) == 1 and set(swiglu[0].params) == {L + "mlp.up_proj.weight", L + "mlp.down_proj.weight"}
    norm = of(smap, "scale", 64, L + "input_layernorm.weight")
    assert set(norm[0].params) == {L + "input_layernorm.weight"} | {f"{L}self_attn.{p}_proj.weight" for p in "qkv"}
    stream = of(smap, "permutation", 64)[0]
    assert stream.params["model.embed_tokens.weight"][0] == 1 and stream.params["lm_head.weight"][0] == 1
    assert stream.params[L + "self_attn.o_proj.weight"][0] == 0 and "model.norm.weight" in stream.params
    assert of(smap, "scale", 64, "model.norm.weight", "lm_head.weight")
    assert_exact(model, (IDS,), kw, smap)


def test_mistral_single_kv_head(float64_norms):
    """Mistral with one KV head (multi-query): as Llama, but the four query heads all share the KV head:
    per layer one permutation 4 of the query heads (q rows, o columns; k/v have nothing to permute) and one
    v/o rotation 16 (v rows, the o columns of all four query heads); no KV-head permutation. The stream's
    sign flip through the RMSNorms, as for Llama."""
    torch.manual_seed(0)
    cfg = hf.MistralConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
        use_cache=False,
    )
    model = hf.MistralForCausalLM(cfg).eval()
    kw = {"use_cache": False}
    smap = find_quiet(model, (IDS,), kw)
    assert kinds(smap) == {
        ("permutation", 128): 2,
        ("scale", 128): 2,
        ("permutation", 4): 2,
        ("rotation", 16): 2,
        ("scale", 64): 5,
        ("permutation", 64): 1,
        ("sign_flip", 64): 1,
    }
    heads = of(smap, "permutation", 4, "model.layers.1.self_attn.q_proj.weight")[0]
    assert set(heads.params) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"}
    vo = of(smap, "rotation", 16, "model.layers.1.self_attn.v_proj.weight")[0]
    assert vo.params["model.layers.1.self_attn.o_proj.weight"] == (1, rows(0, 64))
    assert_exact(model, (IDS,), kw, smap)


def test_qwen2_biases_and_tied_embeddings(float64_norms):
    """Qwen2: Llama's structure with q/k/v biases and the LM head tied to the embedding. The biases move
    with their rows (the v bias rotates with v). Tied: lm_head.weight is model.embed_tokens.weight, which
    both writes the stream (embedding) and reads the final norm's output, so the final norm's scale group
    would have to rescale the embedding too: it is not a symmetry and is not reported (6 scale groups, not
    7). The stream permutation moves the tied matrix once. The stream's sign flip (as for Llama) flips the
    tied matrix's columns, which also flips the LM head's reading of the final norm's output: so there the
    sign must pass through the final norm (its weight stays), while the layers' norm weights take it."""
    torch.manual_seed(0)
    cfg = hf.Qwen2Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        use_cache=False,
    )
    model = hf.Qwen2ForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kw = {"use_cache": False}
    smap = find_quiet(model, (IDS,), kw)
    assert kinds(smap) == {
        ("permutation", 128): 2,
        ("scale", 128): 2,
        ("permutation", 2): 6,
        ("rotation", 16): 4,
        ("scale", 64): 4,
        ("permutation", 64): 1,
        ("sign_flip", 64): 1,
    }
    assert not of(smap, "scale", 64, "model.norm.weight")
    signs = of(smap, "sign_flip", 64)[0]
    assert "model.embed_tokens.weight" in signs.params and "model.layers.1.input_layernorm.weight" in signs.params
    assert "model.norm.weight" not in signs.params
    vo = of(smap, "rotation", 16, "model.layers.0.self_attn.v_proj.bias")
    assert [g.params["model.layers.0.self_attn.v_proj.bias"] for g in vo] == [(0, rows(0, 16)), (0, rows(16, 16))]
    stream = of(smap, "permutation", 64)[0]
    assert stream.params["model.embed_tokens.weight"][0] == 1 and "lm_head.weight" not in stream.params
    assert_exact(model, (IDS,), kw, smap)


def test_gpt2_conv1d_gelu_new_tied():
    """GPT-2 (d = 64, h = 4, dh = 16, 2 layers, tied LM head): Conv1D layers are ``addmm`` with (in, out)
    weights, gelu_new is written out (pow / tanh / mul). Per layer: permutation 256 (MLP units, gelu_new:
    permutations only), permutation 4 (heads), rotations 16 x 4 for q.k (no RoPE: the full per-head
    rotation) and 16 x 4 for v -> c_proj, scale 64 for ln_1 -> c_attn and ln_2 -> c_fc. Global: the stream
    (64; wte and wpe columns, c_attn rows of the Conv1D weight = its dim 0). ln_f -> lm_head is tied to
    wte: no scale group."""
    torch.manual_seed(0)
    cfg = hf.GPT2Config(
        n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    model = hf.GPT2LMHeadModel(cfg).eval()
    kw = {"use_cache": False}
    smap = find_quiet(model, (IDS,), kw)
    assert kinds(smap) == {
        ("permutation", 256): 2,
        ("permutation", 4): 2,
        ("rotation", 16): 16,
        ("scale", 64): 4,
        ("permutation", 64): 1,
    }
    A = "transformer.h.0.attn."
    qk = [g for g in of(smap, "rotation", 16, A + "c_attn.weight") if A + "c_proj.weight" not in g.params]
    vo = of(smap, "rotation", 16, A + "c_attn.weight", A + "c_proj.weight")
    assert len(qk) == len(vo) == 4
    assert qk[1].params[A + "c_attn.weight"] == (1, rows(16, 16) + rows(80, 16))  # head 1: q and k columns
    assert vo[1].params[A + "c_attn.weight"] == (1, rows(144, 16)) and vo[1].params[A + "c_proj.weight"] == (
        0,
        rows(16, 16),
    )
    stream = of(smap, "permutation", 64)[0]
    assert stream.params["transformer.wte.weight"][0] == 1 and stream.params["transformer.wpe.weight"][0] == 1
    assert stream.params[A + "c_attn.weight"][0] == 0
    assert not of(smap, "scale", 64, "transformer.ln_f.weight")
    assert_exact(model, (IDS,), kw, smap)


# ---------------------------------------------------------------------------- Hugging Face encoders


def test_bert_model():
    """BertModel (d = 64, h = 4, dh = 16, ff = 128, 2 layers): the output is the last hidden state (the
    stream itself) and the pooler, so the stream is fixed: no stream permutation, and no LayerNorm scale
    group (post-LN: every LayerNorm output is also added into the residual). Per layer: permutation 4
    (heads), rotations 16 x 4 for q.k and 16 x 4 for v -> attention.output.dense, permutation 128 (GELU
    units)."""
    torch.manual_seed(0)
    cfg = hf.BertConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
    )
    model = hf.BertModel(cfg).eval()
    smap = find_quiet(model, (IDS,))
    assert kinds(smap) == {("permutation", 4): 2, ("rotation", 16): 16, ("permutation", 128): 2}
    S = "encoder.layer.1.attention."
    qk = of(smap, "rotation", 16, S + "self.query.weight")
    assert [g.params[S + "self.key.weight"] for g in qk] == [(0, rows(16 * h, 16)) for h in range(4)]
    vo = of(smap, "rotation", 16, S + "self.value.weight")
    assert [g.params[S + "output.dense.weight"] for g in vo] == [(1, rows(16 * h, 16)) for h in range(4)]
    assert_exact(model, (IDS,), {}, smap)


def test_t5_encoder_decoder_kwargs(float64_norms):
    """T5ForConditionalGeneration (d = 64, h = 4, d_kv = 16, d_ff = 128, 2 + 2 layers, tied), with the
    decoder inputs as keyword arguments. The output includes the encoder's last hidden state and the
    embedding is shared by encoder, decoder and LM head, so the whole stream is fixed: no stream
    permutation. Per-unit scalings that do not reach the output remain: scale 64 for every norm read by
    projections, encoder 2 per layer (self-attention q/k/v; FF wi), decoder 3 per layer (self-attention
    q/k/v; cross-attention q; FF wi): 10 (the encoder's final norm writes the output; the decoder's feeds the
    LM head, tied to the shared embedding). Sign flip 64: the stream's signs (RMSNorm), moving the shared
    embedding's columns, every writer's rows and every norm weight except the decoder's final norm, whose
    output the tied head reads with flipped columns; the encoder's final norm takes the flip back before
    the output. Heads: the relative position bias is computed by the first layer
    of a stack and added in every layer, so the heads of all encoder layers permute together with the
    bias table's columns (one permutation 4), likewise the decoder's self-attention heads, and the
    decoder's cross-attention heads share their (zero) bias tensor across layers (one more). Rotations:
    6 attention blocks x (4 q.k + 4 v.o), size 16 (T5 has no RoPE). MLP: 4 x (permutation 128 + ReLU
    rescale 128)."""
    torch.manual_seed(0)
    cfg = hf.T5Config(d_model=64, d_kv=16, num_heads=4, num_layers=2, d_ff=128, vocab_size=100, use_cache=False)
    model = hf.T5ForConditionalGeneration(cfg).eval()
    kw = {"decoder_input_ids": IDS.flip(1), "use_cache": False}
    smap = find_quiet(model, (IDS,), kw)
    assert kinds(smap) == {("permutation", 4): 3, ("rotation", 16): 48, ("permutation", 128): 4, ("rescale", 128): 4,
                           ("scale", 64): 10, ("sign_flip", 64): 1}
    signs = of(smap, "sign_flip", 64)[0]
    assert "encoder.final_layer_norm.weight" in signs.params and "decoder.final_layer_norm.weight" not in signs.params
    cross = "decoder.block.1.layer.1."
    assert of(smap, "scale", 64, cross + "layer_norm.weight", cross + "EncDecAttention.q.weight")
    enc = of(smap, "permutation", 4, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")[0]
    assert "encoder.block.1.layer.0.SelfAttention.q.weight" in enc.params
    assert enc.params["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (1, rows(0, 4))
    cross = of(smap, "permutation", 4, "decoder.block.0.layer.1.EncDecAttention.q.weight")[0]
    assert "decoder.block.1.layer.1.EncDecAttention.o.weight" in cross.params
    assert_exact(model, (IDS,), kw, smap)


# ---------------------------------------------------------------------------- torch's nn.Transformer family


class EncoderModel(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)))


class DecoderModel(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.inp, self.mem = nn.Linear(6, 16), nn.Linear(5, 16)
        layer = nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x, memory):
        return self.head(self.decoder(self.inp(x), self.mem(memory)))


class Seq2SeqModel(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.src_in, self.tgt_in = nn.Linear(6, 16), nn.Linear(6, 16)
        self.transformer = nn.Transformer(
            16, 4, 2, 2, dim_feedforward=24, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(16, 3)

    def forward(self, src, tgt):
        return self.head(self.transformer(self.src_in(src), self.tgt_in(tgt)))


SRC = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(2))
TGT = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
MEM = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize(
    "make, args, norm_first, expected",
    [
        # per attention block (MultiheadAttention, d = 16, 4 heads of 4): a head permutation and 4 q.k + 4 v.o
        # rotations of size 4; per layer a permutation 24 + ReLU rescale 24 (FF units); one stream (16).
        # Post-norm: only the last LayerNorm's affine output is read by a Linear alone (the head): scale 1.
        # Pre-norm: every norm feeds only its block's first Linear: norm1 -> in_proj, norm2 -> linear1 (x 2
        # layers); no final norm.
        (EncoderModel, (SRC,), False, {"p4": 2, "p24": 2, "r24": 2, "p16": 1, "rot": 16, "s16": 1}),
        (EncoderModel, (SRC,), True, {"p4": 2, "p24": 2, "r24": 2, "p16": 1, "rot": 16, "s16": 4}),
        # decoder layers: self- and cross-attention (4 attention blocks). Pre-norm: norm1 -> self in_proj and
        # norm3 -> linear1 per layer (4), plus one group for the cross-attention inputs: both norm2 outputs
        # (queries) and the memory Linear's rows (keys/values) scale with the columns of both layers'
        # packed in_proj (one matrix reads queries and memory): 5.
        (DecoderModel, (TGT, MEM), False, {"p4": 4, "p24": 2, "r24": 2, "p16": 1, "rot": 32, "s16": 1}),
        (DecoderModel, (TGT, MEM), True, {"p4": 4, "p24": 2, "r24": 2, "p16": 1, "rot": 32, "s16": 5}),
        # nn.Transformer: 2 encoder + 2 decoder layers (6 attention blocks), final norms on both stacks; one
        # stream (the packed cross-attention in_proj reads decoder and encoder units alike). Post-norm: the
        # decoder's final norm -> head. Pre-norm: 4 (encoder) + 4 (decoder norm1/norm3) + 1 (encoder's final
        # norm with both norm2 and both cross in_proj, as above) + 1 (decoder's final norm -> head) = 10.
        (Seq2SeqModel, (SRC, TGT), False, {"p4": 6, "p24": 4, "r24": 4, "p16": 1, "rot": 48, "s16": 1}),
        (Seq2SeqModel, (SRC, TGT), True, {"p4": 6, "p24": 4, "r24": 4, "p16": 1, "rot": 48, "s16": 10}),
    ],
)
def test_torch_transformers(make, args, norm_first, expected):
    torch.manual_seed(0)
    model = make(norm_first).eval()
    smap = find_quiet(model, args)
    names = {
        "p4": ("permutation", 4),
        "p24": ("permutation", 24),
        "r24": ("rescale", 24),
        "p16": ("permutation", 16),
        "rot": ("rotation", 4),
        "s16": ("scale", 16),
    }
    assert kinds(smap) == {names[k]: v for k, v in expected.items()}
    assert_exact(model, args, {}, smap)


# ---------------------------------------------------------------------------- paths, errors, fixes


def _signature(groups):
    return sorted((g.kind, g.size, sorted((n, d, tuple(i)) for n, (d, i) in g.params.items())) for g in groups)


@pytest.mark.parametrize("name", ["mlp-tanh", "cnn", "attention", "transformer", "lora", "gpt"])
def test_export_and_fx_agree_on_the_examples(name):
    """The fx-traceable examples give the same groups through torch.export (with modules that have a
    rule kept whole) as through torch.fx."""
    model, x = EXAMPLES[name]()
    fx_det = Detector(model)
    fx_det.run((x,))
    ex_det = Detector(model, (x,), {})
    ex_det.run((x,))
    assert fx_det.mode == "fx" and ex_det.mode == "export"
    assert _signature(build_groups(ex_det)) == _signature(build_groups(fx_det))


def test_falls_back_to_fx_when_export_fails(monkeypatch):
    import mirrorsym.detect.trace as trace

    def broken(*args, **kwargs):
        raise RuntimeError("export is broken today")

    monkeypatch.setattr(trace, "export", broken)
    model, x = EXAMPLES["mlp-tanh"]()
    det = Detector(model, (x,), {})
    assert det.mode == "fx" and "broken" in str(det.export_error)
    assert find_quiet(model, x).counts() == {"permutation": 2, "sign_flip": 2}


def test_untraceable_error_names_the_export_failure():
    """A causal LM returning its key/value cache: export cannot flatten the cache object and fx cannot
    trace the model; the error says both, and how to fix the first."""
    with pytest.raises(UntraceableModelError, match="torch.export failed with") as info:
        find_symmetries(llama(), IDS, {"use_cache": True})
    assert "DynamicCache" in str(info.value) and "use_cache" in str(info.value)
    assert "torch.fx failed with" in str(info.value)


def test_tril_pins_its_input():
    """tril/triu keep the entries on one side of the diagonal: the result depends on the positions of its
    input, so nothing may permute the units it reads (fx used to treat tril as a constant and report a
    permutation of `a` alone; both paths now report nothing)."""

    class Tril(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.tril(torch.tanh(self.a(x))))

    model, x = Tril(), torch.randn(6, 3)
    det = Detector(model)
    det.run((x,))
    assert build_groups(det) == []
    assert len(find_quiet(model, x)) == 0


def test_gated_product_scale_needs_a_nonlinear_gate():
    """y = act(g) * u scales with u (read back by the next Linear); y = u1 * u2 (both linear) only
    permutes, and the scale group never includes the gate's rows."""

    class GLU(nn.Module):
        def __init__(self, gated):
            super().__init__()
            self.gated = gated
            self.g, self.u, self.d = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            g = torch.nn.functional.silu(self.g(x)) if self.gated else self.g(x)
            return self.d(g * self.u(x))

    x = torch.randn(7, 4)
    gated = find_quiet(GLU(True), x)
    assert kinds(gated) == {("permutation", 5): 1, ("scale", 5): 1}
    assert set(gated.by_kind("scale")[0].params) == {"u.weight", "u.bias", "d.weight"}
    assert kinds(find_quiet(GLU(False), x)) == {("permutation", 5): 1}
    assert_exact(GLU(True), (x,), {}, gated)


class GQAttention(nn.Module):
    """4 query heads sharing 2 key/value heads (dh = 4), through SDPA's ``enable_gqa`` or an explicit
    expand + reshape of k and v (Hugging Face's ``repeat_kv``)."""

    def __init__(self, enable_gqa):
        super().__init__()
        self.enable_gqa = enable_gqa
        self.inp, self.q, self.k, self.v = nn.Linear(5, 16), nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        b, t, _ = x.shape
        h = torch.tanh(self.inp(x))
        q = self.q(h).view(b, t, 4, 4).transpose(1, 2)
        k = self.k(h).view(b, t, 2, 4).transpose(1, 2)
        v = self.v(h).view(b, t, 2, 4).transpose(1, 2)
        if self.enable_gqa:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            k = k[:, :, None].expand(b, 2, 2, t, 4).reshape(b, 4, t, 4)
            v = v[:, :, None].expand(b, 2, 2, t, 4).reshape(b, 4, t, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(torch.tanh(self.o(y.transpose(1, 2).reshape(b, t, 16))))


def test_sdpa_enable_gqa_reads_like_repeat_kv():
    """Per KV head: a q.k rotation (its k rows and the q rows of both its query heads) and a v.o rotation
    (its v rows, the o columns of both query heads); the KV heads permute with their query heads, and the
    query heads within each group permute (q rows, o columns; one permutation per KV head); tanh units of
    inp and o: permutation and sign flip each. enable_gqa=True gives exactly the groups of the explicit
    expand."""
    x = torch.randn(2, 5, 5)
    torch.manual_seed(0)
    model = GQAttention(True)
    smap = find_quiet(model, x)
    assert kinds(smap) == {("rotation", 4): 4, ("permutation", 2): 3, ("permutation", 16): 2, ("sign_flip", 16): 2}
    qk = of(smap, "rotation", 4, "q.weight")
    assert [g.params["k.weight"] for g in qk] == [(0, rows(0, 4)), (0, rows(4, 4))]
    assert [g.params["q.weight"] for g in qk] == [(0, rows(0, 8)), (0, rows(8, 8))]
    assert_exact(model, (x,), {}, smap)
    torch.manual_seed(0)
    explicit = find_quiet(GQAttention(False), x)
    assert _signature(explicit) == _signature(smap)


def test_a_users_rule_for_a_torch_function_reads_its_aten_op(monkeypatch):
    """register_rule(torch.cumsum, rule) also reads aten.cumsum on the export path (and only the user's
    rules are matched by name; the registry is restored after the test)."""
    from mirrorsym.detect import register_rule, registry

    monkeypatch.setattr(registry, "_FUNCTION_RULES", dict(registry._FUNCTION_RULES))
    monkeypatch.setattr(registry, "_USER", set(registry._USER))

    class CumsumOverBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.cumsum(torch.tanh(self.a(x)), dim=0))

    model, x = CumsumOverBatch(), torch.randn(5, 3)
    with pytest.warns(DetectWarning, match="cumsum"):
        assert len(find_symmetries(model, x)) == 0

    @register_rule(torch.cumsum)
    def _cumsum(ctx):  # order-dependent along `dim`, linear and unit by unit along the others
        x_, y = ctx.inputs[0], ctx.output
        d = ctx.arg(1, "dim") % x_.ndim
        for k in range(x_.ndim):
            if k == d:
                ctx.pin(x_, k)
                ctx.pin(y, k)
            else:
                ctx.elementwise(x_, k, y, k)

    smap = find_quiet(model, x)
    assert kinds(smap) == {("permutation", 6): 1, ("sign_flip", 6): 1}
    assert_exact(model, (x,), {}, smap)
