"""One home for evaluation: perplexity against a hand-computed loss, one encoder (mean pooling for plain folders) in both modes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bidirlm_pl import load_backbone
from bidirlm_pl.evaluation.generation import causal_perplexity
from bidirlm_pl.evaluation.suite import model_embedder
from bidirlm_pl.models.encoder import Encoder

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


def test_plain_folders_embed_mean_pooled_in_the_attention_asked(tiny_qwen3):
    """compare on a plain folder: mean pooling, no normalisation, the task's token limit, ``--attention`` per call."""
    model, tok = load_backbone(tiny_qwen3, bidirectional=False)
    causal = model_embedder(str(tiny_qwen3), model, tok, bidirectional=False, batch_size=8)
    bidirectional = model_embedder(str(tiny_qwen3), model, tok, bidirectional=True, batch_size=8)
    assert causal.own_max_length is None and not causal.encoder.normalize
    assert causal.encoder.prompts == {"query": "", "document": ""} and causal.encoder.default_prompt_name is None
    enc = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref_causal = model.model(**enc, is_causal=True).last_hidden_state.mean(1)[0].numpy()
        ref_bidirectional = model.model(**enc, is_causal=False).last_hidden_state.mean(1)[0].numpy()
    assert np.allclose(causal(TEXTS, 64)[0], ref_causal, atol=1e-5)
    assert np.allclose(bidirectional(TEXTS, 64)[0], ref_bidirectional, atol=1e-5)
    assert not np.allclose(ref_causal, ref_bidirectional, atol=1e-4)
    # the Encoder's attention argument overrides the model's own, which stays as it was
    assert np.allclose(Encoder(model, tok, normalize=False, bidirectional=True).encode(TEXTS[:1])[0], ref_bidirectional,
                       atol=1e-5)
    assert model.config.is_causal
