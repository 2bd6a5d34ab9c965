"""Generation measures: causal perplexity on held-out text (packed, chunked loss), greedy continuations.

Any transformers causal LM works (plain, merged or UBMoE; the caller picks a UBMoE routing).

>>> from bidirlm_pl import load_backbone  # doctest: +SKIP
>>> model, tok = load_backbone("tiny-qwen3", bidirectional=False)  # doctest: +SKIP
>>> causal_perplexity(model, tok, ["Rates rose again."])  # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.load import decoder_of
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.packing import collate_rows, pack_documents, tokenize_documents
from bidirlm_pl.losses.token import causal_lm_loss, final_logit_softcap

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


@torch.no_grad()
@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """For each (context, continuation): the summed log-probability of the continuation's tokens, causally."""
    decoder = decoder_of(model)
    head, softcap = model.get_output_embeddings(), final_logit_softcap(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for context, text in pairs:
        context_ids = tokenizer(context)["input_ids"]
        encoded.append((len(context_ids), context_ids + tokenizer(text, add_special_tokens=False)["input_ids"]))
    scores = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        T = max(len(ids) for _, ids in chunk)
        ids_BT = torch.tensor([ids + [pad] * (T - len(ids)) for _, ids in chunk])
        mask_BT = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for _, ids in chunk])
        hidden_BTD = decoder(input_ids=ids_BT, attention_mask=mask_BT, is_causal=True).last_hidden_state
        rows = torch.cat([torch.full((len(ids) - n,), b) for b, (n, ids) in enumerate(chunk)])
        positions = torch.cat([torch.arange(n - 1, len(ids) - 1) for n, ids in chunk])  # the state before each token
        logits = head(hidden_BTD[rows, positions]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids_BT[rows, positions + 1].unsqueeze(1))[:, 0]
        scores += torch.zeros(len(chunk)).index_add_(0, rows, token_logprobs).tolist()
    return scores


def multiple_choice_accuracy(model, tokenizer, records: list[dict], batch_size: int = 32) -> float:
    """Share of records whose ``answer`` choice has the highest log-likelihood after its ``context``."""
    pairs, spans = [], []
    for i, r in enumerate(records):
        if not (isinstance(r["answer"], int) and 0 <= r["answer"] < len(r["choices"])):
            raise BidirLMError(f"multiple-choice record {i}: answer {r['answer']!r} is not an index into "
                               f"its {len(r['choices'])} choices")
        spans.append((len(pairs), len(r["choices"])))
        pairs += [(r["context"], c) for c in r["choices"]]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    correct = sum(int(max(range(n), key=lambda k: scores[s + k]) == r["answer"]) for (s, n), r in zip(spans, records))
    return correct / len(records)
