"""fold_norms: each pre-norm's weight (and LayerNorm bias) folded into the linear maps that read it, the
norm left at weight 1 / bias 0, the function unchanged in float64; norms where folding would not be exact
are left alone; after folding, a rotation of the whole residual stream is an exact symmetry of a Llama
(checked here by hand: the SliceGPT observation; find_symmetries does not report it)."""

import copy

import pytest
import torch
import transformers as hf
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mirrorsym.core.mirror import output_change
from mirrorsym.detect import fold_norms

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def _rms_forward(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture
def float64_norms(monkeypatch):
    """Hugging Face's RMSNorm computes its statistics in float32 whatever the dtype; for a 1e-10 check in
    float64 it computes in the input dtype (the same function)."""
    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_forward)


def randomise_norms(model):
    """Norm weights (and biases) away from their 1 / 0 initialisation, so that folding has work to do."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def run64(model, *args, **kwargs):
    """The models are folded in float64 (a float32 fold rounds W diag(γ) to float32: exact to ~1e-7)."""
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        return model.eval()(*args, **kwargs)


def llama(tie=False):
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=100, max_position_embeddings=32, use_cache=False,
                         tie_word_embeddings=tie)
    return randomise_norms(hf.LlamaForCausalLM(cfg).eval()).double()


def test_llama_norms_fold_exactly(float64_norms):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_norms(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    norms = [n for n in folded.state_dict() if n.endswith("norm.weight")]
    assert len(norms) == 5 and all(bool((folded.state_dict()[n] == 1).all()) for n in norms)
    L = "model.layers.0."
    q0, q1 = model.state_dict()[L + "self_attn.q_proj.weight"], folded.state_dict()[L + "self_attn.q_proj.weight"]
    torch.testing.assert_close(q1, q0 * model.state_dict()[L + "input_layernorm.weight"])
    y0, y1 = run64(model, IDS).logits, run64(folded, IDS).logits
    assert output_change(y0, y1) <= 1e-10


def test_tied_lm_head_keeps_the_final_norm(float64_norms):
    """lm_head is the embedding: folding the final norm into it would rescale the embedding too."""
    model = llama(tie=True)
    folded = fold_norms(model)
    sd, sd0 = folded.state_dict(), model.state_dict()
    assert torch.equal(sd["model.norm.weight"], sd0["model.norm.weight"])
    assert bool((sd["model.layers.1.input_layernorm.weight"] == 1).all())
    assert output_change(run64(model, IDS).logits, run64(folded, IDS).logits) <= 1e-10


def test_gpt2_layernorm_weight_and_bias_fold_into_conv1d():
    """GPT-2: ln_1 -> c_attn and ln_2 -> c_fc (Conv1D, weight (in, out)): weight into the rows, the bias
    into c_attn's / c_fc's bias (W β). ln_f stays: lm_head is tied to wte."""
    torch.manual_seed(0)
    cfg = hf.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=32, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    model = randomise_norms(hf.GPT2LMHeadModel(cfg).eval()).double()
    folded = fold_norms(model)
    sd = folded.state_dict()
    for i in range(2):
        for ln in ("ln_1", "ln_2"):
            assert bool((sd[f"transformer.h.{i}.{ln}.weight"] == 1).all())
            assert bool((sd[f"transformer.h.{i}.{ln}.bias"] == 0).all())
    assert torch.equal(sd["transformer.ln_f.weight"], model.state_dict()["transformer.ln_f.weight"])
    assert output_change(run64(model, IDS).logits, run64(folded, IDS).logits) <= 1e-10


def test_torch_transformer_pre_norm_only():
    """nn.TransformerEncoderLayer: norm_first=True folds norm1 into the packed q/k/v projection and
    norm2 into linear1 (biases absorbed); norm_first=False (post-norm: the norm's output is the stream)
    is left alone."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    for norm_first in (True, False):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        model = randomise_norms(nn.Sequential(layer, nn.Linear(16, 3)).eval()).double()
        folded = fold_norms(model)
        w = folded[0].norm1.weight
        assert bool((w == 1).all()) == norm_first
        assert output_change(run64(model, x.double()), run64(folded, x.double())) <= 1e-10


class OffsetRMSNorm(nn.Module):
    """Gemma-style: (1 + weight) * x / rms(x). Not ``weight * normalised``: must not be folded as such."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_norm_of_another_form_is_left_alone():
    block = nn.Module()
    block.input_layernorm = OffsetRMSNorm(8)
    block.self_attn = nn.Module()
    for p in "qkv":
        setattr(block.self_attn, f"{p}_proj", nn.Linear(8, 8))
    folded = fold_norms(block)
    assert torch.equal(folded.input_layernorm.weight, block.input_layernorm.weight)
    assert torch.equal(folded.self_attn.q_proj.weight, block.self_attn.q_proj.weight)


def test_after_folding_the_residual_stream_rotates(float64_norms):
    """The SliceGPT observation, checked by hand on the folded Llama in float64: one orthogonal Q (64 x 64)
    on the embedding's columns, the rows of every stream writer (o_proj, down_proj), the columns of every
    stream reader (q/k/v, gate/up, lm_head) leaves the logits unchanged; on the unfolded model it does
    not (diag(γ) does not commute with Q)."""
    model = llama()
    q = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).Q

    def rotate(m):
        m = copy.deepcopy(m)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name == "model.embed_tokens.weight":
                    p.copy_(p @ q)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.copy_(q.T @ p)
                elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                    "up_proj.weight", "lm_head.weight")):
                    p.copy_(p @ q)
        return m

    folded = fold_norms(model)
    assert output_change(run64(folded, IDS).logits, run64(rotate(folded), IDS).logits) <= 1e-10
    assert output_change(run64(model, IDS).logits, run64(rotate(model), IDS).logits) > 1e-3


def test_float32_fold_is_exact_to_float32_round_off():
    model = llama().float()
    folded = fold_norms(model)
    with torch.no_grad():
        assert output_change(model(IDS).logits, folded(IDS).logits) <= 1e-5
