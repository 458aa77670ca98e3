"""The residual-stream rotation after ``fold_norms(model, drop_gains=True)`` (SliceGPT / QuaRot computational
invariance): with every RMSNorm gain folded into its readers and removed as a parameter, x / rms(x) commutes
with any orthogonal Q, so Q on the stream (embedding columns, writer rows, reader columns) is a symmetry of
the parameters. find_symmetries reports it as one ``rotation`` group of size d_model there, and nowhere
else: not while a gain is a parameter (or a buffer: Q diag(g) Qᵀ is not diagonal), not through a LayerNorm
(mean subtraction), not through a statistic that is not the sum of squares of the rotated axis itself.
References are independent of the detector: the groups' own Haar elements applied to float64 copies, and
rotations built here by hand."""

import collections
import copy
import warnings

import pytest
import torch
import transformers as hf
from test_fold import randomise_norms
from torch import nn

from mirrorsym.core.mirror import output_change
from mirrorsym.detect import DetectWarning, GainFreeRMSNorm, find_symmetries, fold_norms

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
KW = {"use_cache": False}


def quiet(model, args, kwargs=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectWarning)
        return find_symmetries(model, args, kwargs, **kw)


def kinds(smap) -> dict:
    return dict(collections.Counter((g.kind, g.size) for g in smap))


def llama():
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=100, max_position_embeddings=32, use_cache=False)
    return randomise_norms(hf.LlamaForCausalLM(cfg).eval())


def logits64(model):
    with torch.no_grad():
        return model.double().eval()(IDS, use_cache=False).logits


STREAM_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
STREAM_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def stream_rotations(smap, embed="model.embed_tokens.weight"):
    return [g for g in smap if g.kind == "rotation" and embed in g.params]


@pytest.fixture(scope="module")
def folded_llama():
    model = llama()
    return model, fold_norms(model, drop_gains=True)


def test_drop_gains_replaces_rms_norms_and_keeps_the_function(folded_llama):
    model, folded = folded_llama
    norms = [n for n, m in folded.named_modules() if isinstance(m, GainFreeRMSNorm)]
    assert len(norms) == 5  # 2 x (input, post-attention) + the final norm
    assert not [n for n in folded.state_dict() if "norm" in n]
    assert type(fold_norms(model).model.norm).__name__ == "LlamaRMSNorm"  # the default is unchanged
    # float64 function: the original computes its norms in float32 (Hugging Face), so compare in float32
    with torch.no_grad():
        assert output_change(model(IDS).logits, folded(IDS).logits) <= 1e-5


def test_folded_llama_reports_the_stream_rotation(folded_llama):
    _, folded = folded_llama
    smap = quiet(folded, (IDS,), KW)
    assert kinds(smap) == {
        ("rotation", 64): 1,  # the stream: its permutation and sign flips are elements of it
        ("permutation", 128): 2,
        ("scale", 128): 2,
        ("permutation", 2): 6,
        ("rotation", 16): 4,
    }
    (rot,) = stream_rotations(smap)
    expected = {"model.embed_tokens.weight": 1, "lm_head.weight": 1}
    for i in range(2):
        for p in STREAM_WRITERS:
            expected[f"model.layers.{i}.{p}.weight"] = 0
        for p in STREAM_READERS:
            expected[f"model.layers.{i}.{p}.weight"] = 1
    assert {name: dim for name, (dim, _) in rot.params.items()} == expected
    assert rot.error <= 1e-10

    # the group's own Haar element on a float64 copy: logits unchanged; the hand-built rotation below agrees
    ref = copy.deepcopy(folded).double()
    q = rot.random_element(torch.Generator().manual_seed(5)).double()
    assert q.shape == (64, 64) and torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert (q - torch.eye(64, dtype=torch.float64)).abs().max() > 0.1
    moved = rot.apply_(copy.deepcopy(ref), q)
    change = output_change(logits64(ref), logits64(moved))
    assert change <= 1e-10
    assert not torch.equal(moved.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def hand_rotate(model, q):
    """Q on the stream by hand (embedding E -> E Qᵀ, writers W -> Q W, readers W -> W Qᵀ)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("model.embed_tokens.weight", "lm_head.weight") or name.endswith(
                tuple(f"{r}.weight" for r in STREAM_READERS)
            ):
                p.copy_(p @ q.T)
            elif name.endswith(tuple(f"{w}.weight" for w in STREAM_WRITERS)):
                p.copy_(q @ p)
    return m


def test_the_hand_rotation_needs_the_gains_gone(folded_llama):
    """The independent reference: a hand rotation is exact on the gain-free model and changes the logits of
    the folded model only if a gain is not 1 (restore one gain in place: the rotation breaks)."""
    _, folded = folded_llama
    q = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).Q
    ref = copy.deepcopy(folded).double()
    assert output_change(logits64(ref), logits64(hand_rotate(ref, q))) <= 1e-10
    gained = copy.deepcopy(ref)
    gained.model.norm = ScaledRMSNorm(64, 1e-6, param=False).double()
    assert output_change(logits64(gained), logits64(hand_rotate(gained, q))) > 1e-3


def test_no_stream_rotation_while_gains_are_parameters():
    """Unfolded, and folded without drop_gains (all-ones gains, still parameters): no rotation of the stream
    is proposed at all (verify=False: not a candidate dropped by verification)."""
    model = llama()
    for m in (model, fold_norms(model)):
        smap = quiet(m, (IDS,), KW, verify=False)
        assert not stream_rotations(smap)
        assert kinds(smap)[("sign_flip", 64)] == 1 and kinds(smap)[("permutation", 64)] == 1


def test_gpt2_layernorm_is_left_alone():
    """GPT-2: drop_gains folds the LayerNorms but keeps them (mean subtraction: no rotation); no stream
    rotation is proposed."""
    torch.manual_seed(0)
    cfg = hf.GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=100, n_positions=32, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    model = randomise_norms(hf.GPT2LMHeadModel(cfg).eval())
    folded = fold_norms(model, drop_gains=True)
    assert isinstance(folded.transformer.h[0].ln_1, nn.LayerNorm)
    assert not any(isinstance(m, GainFreeRMSNorm) for m in folded.modules())
    smap = quiet(folded, (IDS,), KW, verify=False)
    assert not stream_rotations(smap, "transformer.wte.weight")


# ---------------------------------------------------------------------------- hand-built pre-norm nets


class ScaledRMSNorm(nn.Module):
    """x / rms(x) times a per-channel gain held as a buffer (``param=False``) or a parameter."""

    def __init__(self, d, eps=1e-6, param=False):
        super().__init__()
        g = torch.linspace(0.5, 1.5, d)
        if param:
            self.g = nn.Parameter(g)
        else:
            self.register_buffer("g", g)
        self.eps = eps

    def forward(self, x):
        return self.g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class QuarticNorm(nn.Module):
    """x / (mean x⁴)^(1/4): a norm, but not invariant under rotations (only signed permutations)."""

    def forward(self, x):
        return x * torch.rsqrt(torch.sqrt(x.pow(4).mean(-1, keepdim=True)) + 1e-6)


class OtherAxisNorm(nn.Module):
    """The sum of squares over the position axis, not the channel axis: per-channel statistics."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)


class SquareAlsoReadNorm(nn.Module):
    """x / rms(x) plus x² read elementwise: the square is not only summed."""

    def forward(self, x):
        s = x.pow(2)
        return x * torch.rsqrt(s.mean(-1, keepdim=True) + 1e-6) + 0.1 * s


class CenteredNorm(nn.Module):
    """LayerNorm without affine parameters, written out: the mean subtraction stops rotations."""

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)


class FunctionalRMSNorm(nn.Module):
    def forward(self, x):
        return nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6)


class Net(nn.Module):
    """embed -> 2 pre-norm residual tanh MLP blocks -> final norm -> head (no biases); d = 8."""

    def __init__(self, make_norm, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, d, bias=False)
        self.norms = nn.ModuleList([make_norm(d) for _ in range(3)])
        self.up = nn.ModuleList([nn.Linear(d, 16, bias=False) for _ in range(2)])
        self.down = nn.ModuleList([nn.Linear(16, d, bias=False) for _ in range(2)])
        self.head = nn.Linear(d, 2, bias=False)

    def forward(self, x):
        h = self.embed(x)
        for i in range(2):
            h = h + self.down[i](torch.tanh(self.up[i](self.norms[i](h))))
        return self.head(self.norms[2](h))


X = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(6))
ROTATING = {
    "gain_free": lambda d: GainFreeRMSNorm(1e-6),
    "nn_rmsnorm": lambda d: nn.RMSNorm(d, eps=1e-6, elementwise_affine=False),
    "f_rms_norm": lambda d: FunctionalRMSNorm(),
}
NOT_ROTATING = {
    "gain_buffer": lambda d: ScaledRMSNorm(d),
    "gain_param": lambda d: ScaledRMSNorm(d, param=True),
    "quartic": lambda d: QuarticNorm(),
    "other_axis": lambda d: OtherAxisNorm(),
    "square_also_read": lambda d: SquareAlsoReadNorm(),
    "centered": lambda d: CenteredNorm(),
    "nn_rmsnorm_affine": lambda d: with_gain(nn.RMSNorm(d, eps=1e-6)),
}


def with_gain(norm):
    """A norm weight away from 1 (at 1 the rotation would be a symmetry of the function, not of the
    parameters: the hand reference could not tell)."""
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.numel()))
    return norm


def rotate_net(net, q):
    m = copy.deepcopy(net)
    with torch.no_grad():
        m.embed.weight.copy_(q @ m.embed.weight)
        for i in range(2):
            m.down[i].weight.copy_(q @ m.down[i].weight)
            m.up[i].weight.copy_(m.up[i].weight @ q.T)
        m.head.weight.copy_(m.head.weight @ q.T)
    return m


def hand_change(net):
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)).Q
    ref = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        return output_change(ref(X.double()), rotate_net(ref, q)(X.double()))


@pytest.mark.parametrize("norm", sorted(ROTATING))
def test_gain_free_rms_norms_pass_rotations(norm, trace):
    net = Net(ROTATING[norm])
    assert hand_change(net) <= 1e-12  # the reference: the rotation is exact
    smap = quiet(net, (X,))
    rots = stream_rotations(smap, "embed.weight")
    assert len(rots) == 1 and rots[0].size == 8
    assert set(rots[0].params) == {"embed.weight", "head.weight"} | {
        f"{m}.{i}.weight" for m in ("up", "down") for i in range(2)
    }
    assert rots[0].error <= 1e-10


@pytest.mark.parametrize("norm", sorted(NOT_ROTATING))
def test_other_norms_stop_rotations(norm, trace):
    net = Net(NOT_ROTATING[norm])
    assert hand_change(net) > 1e-3  # the reference: the rotation is not a symmetry of these nets
    smap = find_symmetries(net, (X,), verify=False)  # not even proposed
    assert not stream_rotations(smap, "embed.weight")
    assert [g for g in smap if g.kind == "permutation" and "embed.weight" in g.params]  # the stream is read


class EpsOutsideNorm(nn.Module):
    """w ⊙ x / (rms(x) + eps): an RMS norm, but not x / sqrt(mean(x²) + eps) with its eps."""

    def __init__(self, d, eps=1e-2):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


@pytest.mark.parametrize("make, replaced", [(lambda: nn.RMSNorm(8, eps=1e-2), True),
                                            (lambda: EpsOutsideNorm(8), False),
                                            (lambda: nn.LayerNorm(8, bias=False), False)])
def test_drop_gains_replaces_only_what_it_reproduces(make, replaced):
    """A Llama-layout block: each norm is folded (its weight goes to 1); drop_gains replaces it only when
    the gain-free module computes the same function (checked here on inputs of both scales)."""
    torch.manual_seed(0)
    block = nn.Module()
    block.input_layernorm = make()
    with torch.no_grad():
        block.input_layernorm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    block.self_attn = nn.Module()
    for p in "qkv":
        setattr(block.self_attn, f"{p}_proj", nn.Linear(8, 8))
    folded = fold_norms(block.double(), drop_gains=True)
    assert isinstance(folded.input_layernorm, GainFreeRMSNorm) == replaced
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for c in (1.0, 0.1):
        with torch.no_grad():
            y0 = block.self_attn.q_proj(block.input_layernorm(c * x))
            y1 = folded.self_attn.q_proj(folded.input_layernorm(c * x))
        assert output_change(y0, y1) <= 1e-10
