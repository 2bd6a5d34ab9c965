"""One home for evaluation: perplexity against a hand-computed loss, one mean-pooling encoder for both modes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bidirlm_pl import load_backbone
from bidirlm_pl.evaluation.embedding import MeanPoolEncoder
from bidirlm_pl.evaluation.generation import causal_perplexity

TEXTS = ["The bank by the river was muddy after the storm.", "Rates rose again on Tuesday."]


def test_perplexity_is_exp_of_the_hand_computed_mean_token_loss(tiny_path):
    model, tok = load_backbone(tiny_path, bidirectional=False)
    model.eval()
    losses = []
    with torch.no_grad():
        for text in TEXTS:  # each document alone, with the end-of-sequence token the packer appends
            ids = tok([text])["input_ids"][0] + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            losses.append(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none"))
    expected = math.exp(float(torch.cat(losses).mean()))
    assert causal_perplexity(model, tok, TEXTS, max_length=64) == pytest.approx(expected, rel=1e-5)
    assert causal_perplexity(model, tok, TEXTS, max_length=64, loss_chunk_size=3) == pytest.approx(expected, rel=1e-5)


def test_mean_pool_encoder_modes_match_the_model(tiny_qwen3):
    model, tok = load_backbone(tiny_qwen3, bidirectional=False)
    causal = MeanPoolEncoder(model, tok, 64, causal=True).encode(TEXTS)
    bidirectional = MeanPoolEncoder(model, tok, 64).encode(TEXTS)
    enc = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model.model(**enc, is_causal=True).last_hidden_state.mean(1)[0].numpy()
    assert np.allclose(causal[0], ref, atol=1e-5)
    assert not np.allclose(causal[0], bidirectional[0], atol=1e-4)
