"""Checks on the real Gemma3-270M (converted once from its PyPI parts; about a minute the first time)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bidirlm_pl import load_backbone

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real(gemma3_270m):
    model, tok = load_backbone(gemma3_270m, bidirectional=True)
    model.eval()
    return gemma3_270m, model, tok


def test_real_model_loads(real):
    _, model, tok = real
    assert model.config.num_hidden_layers == 18
    assert model.config.hidden_size == 640
    assert tok.mask_token is not None or "<mask>" in tok.get_vocab()


@torch.no_grad()
def test_bidirectional_early_states_see_later_words(real):
    _, model, tok = real
    a = tok(["The bank by the river"], return_tensors="pt")
    b = tok(["The bank by the money"], return_tensors="pt")
    assert a["input_ids"].shape == b["input_ids"].shape
    bank = 2  # <bos> The bank
    ha = model(**a, output_hidden_states=True).hidden_states[-1][0, bank]
    hb = model(**b, output_hidden_states=True).hidden_states[-1][0, bank]
    assert (ha - hb).abs().max() > 1e-2
    ca = model(**a, output_hidden_states=True, is_causal=False).hidden_states[-1][0, bank]
    cb = model(**b, output_hidden_states=True, is_causal=True).hidden_states[-1][0, bank]
    hb_causal = model(**a, output_hidden_states=True, is_causal=True).hidden_states[-1][0, bank]
    assert torch.allclose(cb, hb_causal, atol=1e-5)  # causally, a later word changes nothing
    assert torch.equal(ca, ha)


@torch.no_grad()
def test_causal_mode_next_token_logits_equal_original(real):
    path, model, tok = real
    original = AutoModelForCausalLM.from_pretrained(path).eval()
    batch = tok(["The capital of France is"], return_tensors="pt")
    ours = model(**batch, is_causal=True).logits[0, -1]
    ref = original(**batch).logits[0, -1]
    assert torch.equal(ours, ref)
