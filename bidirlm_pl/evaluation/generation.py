"""Generation measures: causal perplexity on held-out text (packed, chunked loss), greedy continuations.

Any transformers causal LM works (plain, merged or UBMoE; the caller picks a UBMoE routing).

>>> from bidirlm_pl import load_backbone  # doctest: +SKIP
>>> model, tok = load_backbone("tiny-qwen3", bidirectional=False)  # doctest: +SKIP
>>> causal_perplexity(model, tok, ["Rates rose again."])  # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

from bidirlm_pl import attention
from bidirlm_pl.backbone import decoder_of
from bidirlm_pl.data.packing import collate_rows, pack_documents, tokenize_documents
from bidirlm_pl.mntp_loss import causal_lm_loss, final_logit_softcap

PROMPT = "The prime minister said on Tuesday that"


@torch.no_grad()
def causal_perplexity(model, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 2,
                      loss_chunk_size: int | None = 1024) -> float:
    """exp(mean next-token loss) over ``texts`` packed into ``max_length`` rows.

    Causal attention, no attention or prediction across documents; the output layer sees at most
    ``loss_chunk_size`` positions at a time (never full-vocabulary logits for a batch).
    """
    model.eval()
    decoder = decoder_of(model)
    head, softcap = model.get_output_embeddings(), final_logit_softcap(model)
    rows = list(pack_documents(tokenize_documents(tokenizer, texts), max_length))
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate_rows(rows[start:start + batch_size], max_length=max_length,
                             pad_token_id=tokenizer.pad_token_id)
        kwargs = attention.model_inputs(model.config, seq_ids_BT=batch["seq_ids"], bidirectional=False)
        hidden_BTD = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs).last_hidden_state
        out = causal_lm_loss(hidden_BTD, batch, head, chunk_size=loss_chunk_size, softcap=softcap)
        total += float(out.loss) * int(out.count)
        count += int(out.count)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def continuation(model, tokenizer, prompt: str = PROMPT, max_new_tokens: int = 16) -> str:
    """The greedy continuation of ``prompt`` with causal attention (the model's mode is restored)."""
    was_bidirectional = attention.is_bidirectional(model)
    attention.set_bidirectional(model, False)
    try:
        batch = tokenizer([prompt], return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        attention.set_bidirectional(model, was_bidirectional)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
