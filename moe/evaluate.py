"""What UBMoE does to generation and to embeddings: held-out causal perplexity and Lee similarity Spearman.

Both functions take any transformers causal LM (plain or UBMoE); the caller picks the routing
(``moe.set_routing`` / ``moe.mode``). Perplexity always runs causal attention; embeddings always
run bidirectional attention with mean pooling.

>>> from bidirlm_pl import load_backbone  # doctest: +SKIP
>>> model, tok = load_backbone("tiny-qwen3", bidirectional=False)  # doctest: +SKIP
>>> causal_perplexity(model, tok, ["Rates rose again."]), lee_spearman(model, tok)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
from bidirlm_pl.moe.data import tokenize_documents

from bidirlm_pl import attention
from bidirlm_pl.backbone import decoder_of as _decoder
from bidirlm_pl.data.packing import collate_rows, pack_documents


@torch.no_grad()
def causal_perplexity(model, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 2) -> float:
    """exp(mean next-token loss) over ``texts`` packed into ``max_length`` rows (no cross-document attention)."""
    from bidirlm_pl.moe.stages import next_token_loss

    model.eval()
    rows = list(pack_documents(tokenize_documents(tokenizer, texts), max_length))
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate_rows(rows[start:start + batch_size], max_length=max_length,
                             pad_token_id=tokenizer.pad_token_id)
        kwargs = attention.model_inputs(model.config, seq_ids_BT=batch["seq_ids"], bidirectional=False)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs).logits
        loss, n = next_token_loss(logits, batch)
        total += float(loss) * int(n)
        count += int(n)
    return float(np.exp(total / max(count, 1)))


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], *, max_length: int = 512, batch_size: int = 8) -> torch.Tensor:
    """Mean-pooled last hidden states (N, D) with bidirectional attention, right padding."""
    from bidirlm_pl.pooling import mean_pool

    model.eval()
    decoder = _decoder(model)
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         is_causal=False).last_hidden_state
        out.append(mean_pool(hidden, enc["attention_mask"]).float())
    return torch.cat(out)


class _BidirectionalMeanEncoder:
    """Adapter for ``bidirlm_pl.evaluation.embedding``: ``encode(texts, batch_size)`` -> (N, D) array."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def encode(self, texts, batch_size: int = 8, **_):
        return embed_texts(self.model, self.tokenizer, list(texts), max_length=self.max_length,
                           batch_size=batch_size).numpy()


def lee_spearman(model, tokenizer, *, max_length: int = 512, batch_size: int = 8) -> float:
    """Spearman correlation of cosine similarities of the 50 Lee documents with the human ratings (1225 pairs).

    Bidirectional attention, mean pooling, the model's current routing.
    """
    from bidirlm_pl.evaluation.embedding import lee_spearman as spearman_of_encoder

    return spearman_of_encoder(_BidirectionalMeanEncoder(model, tokenizer, max_length), batch_size=batch_size)
