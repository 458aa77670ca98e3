"""The README's `mirrorsym scan` example on a local Hugging Face folder: a tiny random Llama saved with
save_pretrained, scanned with exactly the README's command, prints the groups derived in
tests/test_detect_export.py for the bare decoder (AutoModel loads LlamaModel, whose output is the last
hidden state, so the residual stream's order is fixed: no stream permutation, and no scale group for the
final norm, which writes the output; the other norms' scalings and the stream's sign flip remain)."""

import collections
import re
from pathlib import Path

import torch
import transformers as hf
from typer.testing import CliRunner

from mirrorsym.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND = "mirrorsym scan ./tiny-llama --input-shape 1,16 --input-dtype long"


def save_tiny_llama(folder: Path) -> None:
    """d = 64, 4 query heads sharing 2 KV heads (dh = 16), SwiGLU width 128, 2 layers, vocabulary 100."""
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=100, max_position_embeddings=32, use_cache=False)
    hf.LlamaForCausalLM(cfg).save_pretrained(folder)


def test_readme_shows_this_command():
    assert COMMAND in README.read_text()


def test_scan_a_saved_tiny_llama(tmp_path, monkeypatch):
    save_tiny_llama(tmp_path / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, COMMAND.split()[1:], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = re.findall(r"│\s*\d+\s*│\s*(\w+)\s*│\s*(\d+)\s*│.*│\s*([\d.e+-]+)\s*│", result.output)
    kinds = collections.Counter((kind, int(size)) for kind, size, _ in rows)
    # per layer: SwiGLU units (permutation 128, up/down scale 128), KV heads with their query heads
    # (permutation 2), query heads within each KV group (permutation 2, one per KV head), v.o rotation per
    # KV head (16 x 2), the two norms' scalings with their readers (scale 64); the stream's sign flip
    # (the final norm's weight takes it back before the output)
    assert kinds == {("permutation", 128): 2, ("scale", 128): 2, ("permutation", 2): 6, ("rotation", 16): 4,
                     ("scale", 64): 4, ("sign_flip", 64): 1}
    assert all(float(err) <= 1e-6 for _, _, err in rows)
    # a float64 rotation is never exact to the last bit: an error of exactly 0 meant the blocks ran on
    # something other than their weights (the ModuleList of layers once left them as meta tensors)
    assert all(float(err) > 0 for kind, _, err in rows if kind == "rotation")
    assert "Total: 19 symmetry groups (8 permutation, 4 rotation, 6 scale, 1 sign_flip)" in result.output
