"""Block-by-block verification (``verify_groups(..., blockwise=True)``; the default above 2 GiB of float64 and
wherever it is cheaper, see test_verify_fast.py):
no float64 copy of the whole model, the same verdicts as the whole-model check, groups that are only
symmetries of a larger module escalate to it, wrong groups are still caught, and the model is untouched."""

import copy

import pytest
import torch
import transformers as hf
from torch import nn

import mirrorsym.detect.find as find
from mirrorsym.detect import find_symmetries
from mirrorsym.detect.find import verify_groups
from mirrorsym.detect.groups import make_group

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
KW = {"use_cache": False}


def llama():
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=100, max_position_embeddings=32, use_cache=False)
    return hf.LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = hf.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=32, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    return hf.GPT2LMHeadModel(cfg).eval()


def no_whole_copy(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("blockwise verification made a float64 copy of the whole model")

    monkeypatch.setattr(find, "verification_baseline", refuse)


@pytest.mark.parametrize("build", [llama, gpt2])
def test_same_verdicts_as_the_whole_model_check(build, monkeypatch):
    """Every detected group passes blockwise too (block-level errors at float64 round-off; the residual
    stream, checked on the whole model, at float32 round-off of Hugging Face's float32 RMSNorm), no whole
    float64 copy is made, and the weights are bit-identical afterwards."""
    model = build()
    smap = find_symmetries(model, IDS, KW, verify=False)
    whole = verify_groups(model, (IDS,), smap.groups, kwargs=KW, blockwise=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as m:
        no_whole_copy(m)
        blocks = verify_groups(model, (IDS,), smap.groups, kwargs=KW, blockwise=True)
    assert max(whole) <= 1e-6 and max(blocks) <= 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    local = [e for g, e in zip(smap.groups, blocks, strict=True) if "permutation" != g.kind or g.size != 64]
    assert max(local) <= 1e-10


def test_fused_qk_rotation_escalates_to_the_attention_module(monkeypatch):
    """GPT-2's q.k rotations move only c_attn's columns: c_attn's own outputs change (q and k rotate), so
    the check climbs to the attention module, where q kᵀ is unchanged (an error at round-off, not 1)."""
    model = gpt2()
    smap = find_symmetries(model, IDS, KW, verify=False)
    qk = [g for g in smap.by_kind("rotation") if set(g.params) == {"transformer.h.0.attn.c_attn.weight",
                                                                  "transformer.h.0.attn.c_attn.bias"}]
    assert qk
    with monkeypatch.context() as m:
        no_whole_copy(m)
        errors = verify_groups(model, (IDS,), qk, kwargs=KW, blockwise=True)
    assert max(errors) <= 1e-10


def test_a_wrong_group_is_caught():
    """A 'rotation' of the SwiGLU units (silu breaks it) changes the MLP's outputs, its layer's and the
    model's: blockwise reports the model-level change, as the whole-model check does."""
    model = llama()
    smap = find_symmetries(model, IDS, KW, verify=False)
    perm = next(g for g in smap.by_kind("permutation") if "model.layers.0.mlp.gate_proj.weight" in g.params)
    wrong = make_group("rotation", perm.size, copy.deepcopy(perm.members), perm.layers)
    wrong.shapes = dict(perm.shapes)
    for m in wrong.members:
        m.role = "sink" if m.name.endswith("down_proj.weight") else "source"
    blocks = verify_groups(model, (IDS,), [wrong], kwargs=KW, blockwise=True)
    whole = verify_groups(model, (IDS,), [wrong], kwargs=KW, blockwise=False)
    assert blocks[0] > 1e-3
    assert blocks[0] == pytest.approx(whole[0], rel=1e-6)


def test_a_module_reading_another_modules_weights_falls_back_to_the_whole_copy():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: with blocks smaller than the
    attention module the shell meets a meta tensor, and verification uses the whole-model copy."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    model, x = Net().eval(), torch.randn(2, 5, 3)
    smap = find_symmetries(model, x, verify=False)
    assert find._verify_blockwise(model, (x,), smap.groups, 0, {}, budget=100) is None
    errors = verify_groups(model, (x,), smap.groups, blockwise=True)  # default blocks: whole attention
    assert max(errors) <= 1e-10


def test_blockwise_is_automatic_above_the_size_threshold(monkeypatch):
    model = llama()
    smap = find_symmetries(model, IDS, KW, verify=False)
    monkeypatch.setattr(find, "VERIFY_BLOCKWISE_BYTES", 1000)
    no_whole_copy(monkeypatch)
    kept = find_symmetries(model, IDS, KW)  # verification through find_symmetries, blockwise
    assert kept.summary() == smap.summary()
