"""Pooling modes: equal to sentence-transformers' Pooling, packed equals padded, instruction tokens excluded."""

import pytest
import torch

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.pooling import ST_MODES, Pooling, pool_mask


def _padded(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 7]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return torch.randn(3, 7, 8, generator=g), mask, lengths


@pytest.mark.parametrize("mode", sorted(ST_MODES))
def test_matches_sentence_transformers_pooling(mode):
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    hidden, mask, _ = _padded()
    st = STPooling(8, pooling_mode=ST_MODES[mode])
    theirs = st({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    assert torch.allclose(Pooling(mode)(hidden, mask), theirs, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean"])
def test_instruction_prefix_excluded_like_sentence_transformers(mode):
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    hidden, mask, _ = _padded()
    prefix = torch.tensor([2, 1, 3])
    st = STPooling(8, pooling_mode=ST_MODES[mode], include_prompt=False)
    theirs = st({"token_embeddings": hidden, "attention_mask": mask, "prompt_length": 2})["sentence_embedding"]
    ours = Pooling(mode)(hidden, pool_mask(mask, torch.tensor([2, 2, 2])))
    assert torch.allclose(ours, theirs, atol=1e-6)
    # the excluded tokens do not matter at all
    changed = hidden.clone()
    changed[0, :2] += 100
    m = pool_mask(mask, prefix)
    assert torch.allclose(Pooling(mode)(changed, m)[0], Pooling(mode)(hidden, m)[0])
    assert not torch.allclose(Pooling(mode)(changed, mask)[0], Pooling(mode)(hidden, mask)[0])


@pytest.mark.parametrize("mode", ["mean", "last", "weighted_mean", "latent_attention"])
def test_packed_rows_pool_like_padded_rows(mode):
    torch.manual_seed(0)
    hidden, mask, _ = _padded()
    pool = Pooling(mode, hidden_size=8, num_latents=4, num_heads=2)
    padded = pool(hidden, mask)
    # pack documents 0 and 1 into row 0, document 2 into row 1 (with padding)
    packed = torch.zeros(2, 9, 8)
    seq_ids = torch.full((2, 9), -1)
    packed[0, :5], seq_ids[0, :5] = hidden[0, :5], 0
    packed[0, 5:8], seq_ids[0, 5:8] = hidden[1, :3], 1
    packed[1, :7], seq_ids[1, :7] = hidden[2, :7], 0
    out = pool(packed, (seq_ids >= 0).long(), seq_ids)
    assert out.shape == (3, 8)
    assert torch.allclose(out, padded, atol=1e-6)


def test_last_token_with_left_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = Pooling("last")(hidden, mask)
    assert torch.equal(out, hidden[:, -1])


def test_latent_attention_is_trainable_and_needs_hidden_size():
    pool = Pooling("latent_attention", hidden_size=8, num_latents=4, num_heads=2)
    hidden, mask, _ = _padded()
    pool(hidden, mask).sum().backward()
    assert pool.latent.latents_LD.grad is not None and pool.latent.latents_LD.grad.abs().sum() > 0
    with pytest.raises(BidirLMError, match="hidden_size"):
        Pooling("latent_attention")
    with pytest.raises(BidirLMError, match="pooling 'max'"):
        Pooling("max")
