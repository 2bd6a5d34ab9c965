"""The sparse-vocabulary MNTP loss equals the full-logits reference (loss and gradients), on real architectures."""

import pytest
import torch
import torch.nn.functional as F

from bidirlm_pl import load_backbone
from bidirlm_pl.backbone import attention
from bidirlm_pl.data.masking import Masker, MaskSpec
from bidirlm_pl.data.packing import pack_batches
from bidirlm_pl.losses.token import full_logits_mntp_loss, mntp_loss, prediction_mask


def _batch(vocab, mask_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [[1] + torch.randint(5, vocab, (int(n),), generator=g).tolist()
            for n in torch.randint(3, 30, (12,), generator=g)]
    batch = next(pack_batches(docs, max_length=32, batch_size=4, pad_token_id=0))
    masker = Masker(MaskSpec(ratio=0.3), mask_token_id=mask_id, special_ids=[0, 1, 2, 3, 4], vocab_size=vocab)
    return masker(batch, generator=g)


def _kwargs(model, batch):
    kw = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    kw.update(attention.model_inputs(model.config, seq_ids_BT=batch["seq_ids"], bidirectional=True))
    return kw


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_sparse_loss_equals_full_logits_reference(tiny_path, chunk_size):
    model, tok = load_backbone(tiny_path, bidirectional=True, attn_implementation="eager")
    batch = _batch(model.config.vocab_size, tok.mask_token_id)
    kw = _kwargs(model, batch)

    model.zero_grad()
    reference = full_logits_mntp_loss(model(**kw).logits, batch["labels"])
    reference.backward()
    expected = _grads(model)

    model.zero_grad()
    hidden_BTD = model.get_decoder()(**kw).last_hidden_state
    out = mntp_loss(hidden_BTD, batch["labels"], model.get_output_embeddings(), seq_ids_BT=batch["seq_ids"],
                    chunk_size=chunk_size)
    out.loss.backward()
    got = _grads(model)

    assert int(out.count) == int((batch["labels"] != -100).sum()) > 20
    assert abs(out.loss.item() - reference.item()) <= 1e-5
    assert got.keys() == expected.keys() and len(got) > 10
    worst = max((got[n] - expected[n]).abs().max().item() for n in got)
    assert worst <= 1e-5, worst


def test_softcapped_logits_match_the_model(tiny_qwen3):
    from bidirlm_pl.core import assets

    model, tok = load_backbone(assets.tiny_model("gemma3"), bidirectional=True, attn_implementation="eager")
    model.config.final_logit_softcapping = 0.05
    batch = _batch(model.config.vocab_size, tok.mask_token_id, seed=1)
    kw = _kwargs(model, batch)
    with torch.no_grad():
        reference = full_logits_mntp_loss(model(**kw).logits, batch["labels"])
        hidden = model.get_decoder()(**kw).last_hidden_state
        out = mntp_loss(hidden, batch["labels"], model.get_output_embeddings(), softcap=0.05)
        plain = mntp_loss(hidden, batch["labels"], model.get_output_embeddings())
    assert abs(out.loss.item() - reference.item()) <= 1e-5 and abs(plain.loss.item() - reference.item()) > 1e-3


def test_document_start_is_never_a_target():
    head = torch.nn.Linear(4, 10, bias=False)
    hidden = torch.randn(1, 6, 4, requires_grad=True)
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    labels = torch.tensor([[-100, 5, -100, 6, 7, 8]])  # 6 starts document 1, 8 is padding: both dropped
    assert prediction_mask(labels, seq_ids).tolist() == [[True, False, False, True, False]]
    out = mntp_loss(hidden, labels, head, seq_ids_BT=seq_ids)
    assert int(out.count) == 2
    out.loss.backward()
    # only the hidden states at 0 (predicts 5) and 3 (predicts 7) receive gradient
    assert hidden.grad[0].abs().sum(-1).nonzero().squeeze(1).tolist() == [0, 3]


def test_no_targets_gives_a_zero_loss_with_a_graph():
    head = torch.nn.Linear(4, 10)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    out = mntp_loss(hidden, torch.full((2, 5), -100), head)
    out.loss.backward()
    assert out.loss.item() == 0.0 and int(out.count) == 0


@pytest.mark.parametrize("layout", ["packed", "padded_right", "padded_left"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_chunked_causal_lm_loss_equals_full_logits(layout, chunk):
    """The causal-LM loss through the sparse, chunked path equals full-vocabulary logits, value and gradients."""
    from bidirlm_pl.losses.token import causal_lm_loss

    g = torch.Generator().manual_seed(1)
    B, T, D, V = 2, 9, 16, 50
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g)}
    if layout == "packed":
        batch["seq_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, -1, -1, -1]])
    else:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 6:] = 0
        batch["attention_mask"] = mask if layout == "padded_right" else mask.flip(1)
    head = torch.nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    sparse = causal_lm_loss(hidden, batch, head, chunk_size=chunk, softcap=30.0).loss
    grads = torch.autograd.grad(sparse, [hidden, head.weight])
    logits = torch.tanh(head(hidden) / 30.0) * 30.0
    full, _ = full_logits_causal_lm_loss(logits, batch)
    ref = torch.autograd.grad(full, [hidden, head.weight])
    assert torch.allclose(sparse, full, atol=1e-5)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-5)


def full_logits_causal_lm_loss(logits_BTV: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference causal-LM loss from full logits (mean, number of targets); no prediction across documents."""
    targets_BT = batch["input_ids"][:, 1:]
    if batch.get("seq_ids") is not None:
        seq = batch["seq_ids"]
        valid_BT = (seq[:, 1:] == seq[:, :-1]) & (seq[:, 1:] >= 0)
    elif batch.get("attention_mask") is not None:
        mask = batch["attention_mask"].bool()
        valid_BT = mask[:, 1:] & mask[:, :-1]
    else:
        valid_BT = torch.ones_like(targets_BT, dtype=torch.bool)
    logits_NV = logits_BTV[:, :-1][valid_BT]
    n = valid_BT.sum()
    loss = F.cross_entropy(logits_NV.float(), targets_BT[valid_BT], reduction="sum") / n.clamp(min=1)
    return loss, n

