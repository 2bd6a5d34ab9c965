"""What UBMoE does to generation and to embeddings: held-out causal perplexity and Lee similarity Spearman.

The measures live in ``bidirlm_pl.evaluation`` (one home for evaluation code); this module keeps the
UBMoE-facing names. The caller picks the routing (``moe.set_routing`` / ``moe.mode``).

>>> from bidirlm_pl import load_backbone  # doctest: +SKIP
>>> model, tok = load_backbone("tiny-qwen3", bidirectional=False)  # doctest: +SKIP
>>> causal_perplexity(model, tok, ["Rates rose again."]), lee_spearman(model, tok)  # doctest: +SKIP
"""

from __future__ import annotations

from bidirlm_pl.evaluation.embedding import MeanPoolEncoder, embed_texts
from bidirlm_pl.evaluation.generation import causal_perplexity

__all__ = ["causal_perplexity", "embed_texts", "lee_spearman"]


def lee_spearman(model, tokenizer, *, max_length: int = 512, batch_size: int = 8) -> float:
    """Spearman correlation of cosine similarities of the 50 Lee documents with the human ratings (1225 pairs).

    Bidirectional attention, mean pooling, the model's current routing.
    """
    from bidirlm_pl.evaluation.embedding import lee_spearman as spearman_of_encoder

    return spearman_of_encoder(MeanPoolEncoder(model, tokenizer, max_length), batch_size=batch_size)
