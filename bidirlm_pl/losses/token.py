"""Token-prediction losses over the vocabulary: MNTP (masked next token) and causal next token, both sparse.

Only the positions that predict a token go through the output layer.

Masked next-token prediction predicts the masked token at position *i* from the hidden state at
*i - 1* with the model's own next-token head. Computing logits at every position (as LLM2Vec does)
costs ``B*T*V`` multiply-adds and a ``(B, T, V)`` tensor; with a 262k vocabulary that dominates a
small model's step. Here only the ``N`` hidden states that predict a masked token are gathered
(``N ~ ratio * B * T``) and projected, optionally in chunks whose logits are recomputed in backward
(activation checkpointing) so peak memory is ``chunk_size * V`` instead of ``N * V``.

A target whose predecessor belongs to another document (packed rows: ``seq_ids`` changes between
*i - 1* and *i*) is never predicted: the first token of a document is not a target.

>>> import torch
>>> head = torch.nn.Linear(8, 50, bias=False)
>>> hidden_BTD = torch.randn(2, 6, 8)
>>> labels_BT = torch.full((2, 6), -100); labels_BT[0, 3] = 7; labels_BT[1, 5] = 9
>>> out = mntp_loss(hidden_BTD, labels_BT, head)
>>> int(out.count), bool(torch.allclose(out.loss, full_logits_mntp_loss(head(hidden_BTD), labels_BT)))
(2, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bidirlm_pl.core.errors import BidirLMError

IGNORE_INDEX = -100


@dataclass
class MNTPOutput:
    """Mean loss over predicted tokens, masked-token accuracy, and how many tokens were predicted."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor
    kl: torch.Tensor | None = None  # mean KL(reference || model) over the same positions, when asked


def prediction_mask(labels_BT: torch.Tensor, seq_ids_BT: torch.Tensor | None = None,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Boolean (B, T-1): does the hidden state at ``i`` predict a target at ``i + 1``?

    True where ``labels[:, i + 1]`` is a target and, for packed rows, ``i`` and ``i + 1`` are in the
    same document.
    """
    valid_BT1 = labels_BT[:, 1:] != ignore_index
    if seq_ids_BT is not None:
        valid_BT1 &= (seq_ids_BT[:, 1:] == seq_ids_BT[:, :-1]) & (seq_ids_BT[:, 1:] >= 0)
    return valid_BT1


def _softcapped(logits_NV: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return logits_NV
    return torch.tanh(logits_NV / softcap) * softcap


def _chunk_sums(output_layer, softcap, hidden_ND, targets_N, reference_ND=None):
    logits_NV = _softcapped(output_layer(hidden_ND).float(), softcap)
    loss_sum = F.cross_entropy(logits_NV, targets_N, reduction="sum")
    correct = (logits_NV.detach().argmax(-1) == targets_N).sum()
    if reference_ND is None:
        return loss_sum, correct
    with torch.no_grad():
        reference_logp_NV = _softcapped(output_layer(reference_ND).float(), softcap).log_softmax(-1)
    kl_sum = F.kl_div(logits_NV.log_softmax(-1), reference_logp_NV, log_target=True, reduction="sum")
    return loss_sum, correct, kl_sum


def mntp_loss(
    hidden_BTD: torch.Tensor,
    labels_BT: torch.Tensor,
    output_layer: Callable[[torch.Tensor], torch.Tensor],
    *,
    seq_ids_BT: torch.Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    reference_BTD: torch.Tensor | None = None,
) -> MNTPOutput:
    """MNTP cross-entropy over masked positions only.

    Args:
        hidden_BTD: last hidden states (after the final norm) of the bidirectional decoder.
        labels_BT: original token at masked positions, ``ignore_index`` elsewhere.
        output_layer: the model's output layer (``model.get_output_embeddings()``), hidden -> logits.
        seq_ids_BT: document index per token (packed rows); targets that start a document are dropped.
        chunk_size: project at most this many positions at once, recomputing logits in backward.
        softcap: final logit soft-capping of the model (Gemma2-style ``final_logit_softcapping``).
        reference_BTD: hidden states of a reference model (no gradient) through the same output layer:
            the output's ``kl`` is then the mean KL(reference || model) over the predicted positions,
            computed in the same chunks (the model's logits are projected once for both terms).
    """
    valid_BT1 = prediction_mask(labels_BT, seq_ids_BT, ignore_index)
    hidden_ND = hidden_BTD[:, :-1][valid_BT1]
    targets_N = labels_BT[:, 1:][valid_BT1]
    reference_ND = None if reference_BTD is None else reference_BTD[:, :-1][valid_BT1].detach()
    n = int(targets_N.numel())
    if n == 0:
        zero = hidden_BTD.sum() * 0.0
        return MNTPOutput(zero, zero.detach(), torch.zeros((), dtype=torch.long, device=hidden_BTD.device),
                          None if reference_BTD is None else zero)
    size = n if chunk_size is None else chunk_size
    if size < 1:
        raise BidirLMError(f"chunk_size {chunk_size} must be a positive number of positions")
    sums = None
    for start in range(0, n, size):
        part = (hidden_ND[start:start + size], targets_N[start:start + size])
        if reference_ND is not None:
            part += (reference_ND[start:start + size],)
        if size >= n:
            part_sums = _chunk_sums(output_layer, softcap, *part)
        else:
            part_sums = checkpoint(_chunk_sums, output_layer, softcap, *part, use_reentrant=False)
        sums = part_sums if sums is None else tuple(a + b for a, b in zip(sums, part_sums))
    count = torch.tensor(n, device=hidden_BTD.device)
    kl = None if reference_ND is None else sums[2] / n
    return MNTPOutput(sums[0] / n, sums[1].float() / n, count, kl)


def full_logits_mntp_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The reference (LLM2Vec): logits at every position, shifted by one, cross-entropy on masked ones."""
    V = logits_BTV.shape[-1]
    return F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V).float(), labels_BT[:, 1:].reshape(-1),
                           ignore_index=ignore_index)


def next_token_labels(input_ids_BT: torch.Tensor, *, seq_ids_BT: torch.Tensor | None = None,
                      attention_mask_BT: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels of the causal-LM loss: every real token whose predecessor is a real token of its document."""
    labels_BT = input_ids_BT.clone()
    if seq_ids_BT is not None:
        labels_BT[seq_ids_BT < 0] = ignore_index  # prediction_mask drops document starts
    elif attention_mask_BT is not None:
        real_BT = attention_mask_BT.bool()
        labels_BT[~real_BT] = ignore_index
        labels_BT[:, 1:][~real_BT[:, :-1]] = ignore_index  # a real token after padding (left padding)
    return labels_BT


def causal_lm_loss(
    hidden_BTD: torch.Tensor,
    batch: dict,
    output_layer: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
    reference_BTD: torch.Tensor | None = None,
) -> MNTPOutput:
    """Mean next-token cross-entropy of a packed or padded batch without full-vocabulary logits for it.

    The causal LM loss is MNTP's loss with every position a target: the same sparse, chunked path,
    so peak memory holds ``chunk_size x V`` logits, never ``B x T x V``. ``reference_BTD`` adds the
    mean KL to a reference model's next-token distribution (``kl``), as :func:`mntp_loss`.
    """
    labels_BT = next_token_labels(batch["input_ids"], seq_ids_BT=batch.get("seq_ids"),
                                  attention_mask_BT=batch.get("attention_mask"))
    return mntp_loss(hidden_BTD, labels_BT, output_layer, seq_ids_BT=batch.get("seq_ids"),
                     chunk_size=chunk_size, softcap=softcap, reference_BTD=reference_BTD)


def final_logit_softcap(model) -> float | None:
    """The model's final logit soft-capping (Gemma), or None."""
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "final_logit_softcapping", None)
