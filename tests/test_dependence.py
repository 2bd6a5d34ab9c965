"""Attention dependence (DP-before / main / after): hand-built patterns, causal vs bidirectional models, the CLI."""

import json

import pytest
import torch

from bidirlm_pl import load_backbone
from bidirlm_pl.cli.main import main
from bidirlm_pl.evaluation.dependence import capture_attention, dependence, shares

TEXTS = ["The bank by the river was muddy after the storm.", "Rates rose again on Tuesday, the bank said."]


def test_shares_of_hand_built_patterns():
    T = 4
    assert torch.allclose(shares(torch.eye(T)[None]), torch.tensor([0.0, 100.0, 0.0]))
    uniform = torch.full((1, T, T), 1 / T)  # each query: (i before, 1 self, T-1-i after) / T
    assert torch.allclose(shares(uniform), torch.tensor([37.5, 25.0, 37.5]))
    previous = torch.zeros(1, T, T)
    previous[0, 0, 0] = 1
    previous[0, torch.arange(1, T), torch.arange(0, T - 1)] = 1  # attend to the previous token
    assert torch.allclose(shares(previous), torch.tensor([75.0, 25.0, 0.0]))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_causal_masked_attention_has_no_after_and_bidirectional_has(tiny_path, backend):
    causal, tok = load_backbone(tiny_path, bidirectional=False, attn_implementation=backend)
    bidirectional, _ = load_backbone(tiny_path, bidirectional=True, attn_implementation=backend)
    masked = dependence(causal, tok, TEXTS, masked=True, progress=False)
    assert masked.overall[2] == pytest.approx(0.0, abs=1e-6)
    assert sum(masked.overall) == pytest.approx(100.0, abs=1e-3)
    assert dependence(causal, tok, TEXTS, progress=False).overall[2] > 0  # what it would attend to unmasked
    assert dependence(bidirectional, tok, TEXTS, masked=True, progress=False).overall[2] > 0


def test_capture_leaves_the_outputs_unchanged(tiny_path):
    model, tok = load_backbone(tiny_path, bidirectional=False)
    batch = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model.model(**batch).last_hidden_state
        with capture_attention(model, masked=False) as records:
            out = model.model(**batch).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-5) and len(records) == model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"  # restored


def test_cli_per_layer_and_json(tiny_qwen3, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "dp.json"
    assert main(["dependence", "--model", str(tiny_qwen3), "--texts", str(texts), "--per-layer",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["texts"] == 2 and len(report["layers"]) == 2 and "<=32" in report["buckets"]
    assert "DP-after" in capsys.readouterr().out
    assert main(["dependence", "--model", str(tiny_qwen3), "--texts", str(tmp_path / "none.txt")]) == 2
