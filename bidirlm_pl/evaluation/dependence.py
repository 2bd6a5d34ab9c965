"""Attention dependence (after the UBMoE paper): how much attention mass goes to earlier, own and later tokens.

For each text, every layer's queries and keys are captured while the model runs in its own mode
(causal for a decoder, bidirectional for an encoder); the attention each position *would* give every
position without a causal mask is the softmax of ``q k^T * scale`` over all positions (for a
bidirectional model, its actual attention). Averaged over heads and query positions:

* ``before`` — mass on earlier tokens (DP-before), ``main`` — on the token itself (DP-main),
  ``after`` — on later tokens (DP-after); in percent, summing to 100.

``masked=True`` reports the shares of the attention the model actually computed (a causal model's
DP-after is then 0). The scores are recomputed from q and k, so every backend works (sdpa and
flash return no weights). Reported per length bucket, overall, and per layer on request.

    bidirlm dependence --model runs/mntp/hf [--texts texts.txt] [--per-layer] [--json dp.json]
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from bidirlm_pl.backbone.load import decoder_of
from bidirlm_pl.core.errors import BidirLMError

CAPTURE_BACKEND = "bidirlm_dependence"
BUCKETS = (32, 64, 128, 256, 512, 1024)


def shares(attention_HTT: torch.Tensor) -> torch.Tensor:
    """(before, main, after) attention mass in % of an attention matrix (heads, queries, keys), mean over heads and queries."""
    T = attention_HTT.shape[-1]
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=attention_HTT.device), diagonal=-1)
    eye = torch.eye(T, dtype=torch.bool, device=attention_HTT.device)
    a = attention_HTT.float()
    before = (a * lower).sum(-1)
    main = (a * eye).sum(-1)
    after = (a * lower.T).sum(-1)
    return torch.stack([before.mean(), main.mean(), after.mean()]) * 100.0


def unmasked_attention(query_BHTD: torch.Tensor, key_BHSD: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """softmax(q k^T * scale) over all key positions, key heads repeated for GQA: (B, H, T, S)."""
    n_rep = query_BHTD.shape[1] // key_BHSD.shape[1]
    key = key_BHSD.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query_BHTD.shape[-1])
    return torch.softmax((query_BHTD.float() @ key.float().transpose(-1, -2)) * scale, dim=-1)


@contextmanager
def capture_attention(model, *, masked: bool):
    """Route the model's attention through a wrapper that records per-layer shares; yields the list."""
    configs = [model.config] + ([model.config.text_config] if getattr(model.config, "text_config", None) else [])
    original = [c._attn_implementation for c in configs]
    inner = ALL_ATTENTION_FUNCTIONS.get(original[0], sdpa_attention_forward) if original[0] != "eager" else None
    records: list[torch.Tensor] = []

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if masked:
            out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                   dropout=0.0, **kwargs)
            records.append(shares(weights[0]))
            return out, weights
        records.append(shares(unmasked_attention(query, key, scaling)[0]))
        fn = inner or eager_attention_forward
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    AttentionInterface.register(CAPTURE_BACKEND, record)
    AttentionMaskInterface.register(CAPTURE_BACKEND, eager_mask)  # an additive mask serves eager and sdpa alike
    for c in configs:
        c._attn_implementation = CAPTURE_BACKEND
    try:
        yield records
    finally:
        for c, name in zip(configs, original):
            c._attn_implementation = name


@dataclass
class DependenceReport:
    model: str
    masked: bool
    texts: int = 0
    overall: list[float] = field(default_factory=list)            # before, main, after (%)
    buckets: dict[str, list[float]] = field(default_factory=dict)  # "<=64": [before, main, after]
    bucket_counts: dict[str, int] = field(default_factory=dict)
    layers: list[list[float]] = field(default_factory=list)

    def table(self) -> str:
        kind = "actual (masked) attention" if self.masked else "attention without a causal mask"
        lines = [f"attention dependence of {self.model} ({kind}), {self.texts} texts",
                 f"{'tokens':<10}{'texts':>7}{'DP-before %':>13}{'DP-main %':>11}{'DP-after %':>12}"]
        rows = [(name, self.bucket_counts[name], v) for name, v in self.buckets.items()]
        rows.append(("all", self.texts, self.overall))
        for name, count, (b, m, a) in rows:
            lines.append(f"{name:<10}{count:>7}{b:>13.2f}{m:>11.2f}{a:>12.2f}")
        for i, (b, m, a) in enumerate(self.layers):
            lines.append(f"{'layer ' + str(i):<10}{'':>7}{b:>13.2f}{m:>11.2f}{a:>12.2f}")
        return "\n".join(lines)


def bucket_of(length: int) -> str:
    for edge in BUCKETS:
        if length <= edge:
            return f"<={edge}"
    return f">{BUCKETS[-1]}"


@torch.no_grad()
def dependence(model, tokenizer, texts: list[str], *, name: str = "model", max_length: int = 256,
               masked: bool = False, per_layer: bool = False, progress: bool = True,
               bidirectional: bool | None = None) -> DependenceReport:
    """Attention dependence of ``model`` on ``texts`` (one text per forward pass, no padding).

    The model runs in its own mode (its config's ``is_causal``) unless ``bidirectional`` says otherwise.
    """
    decoder = decoder_of(model)
    if bidirectional is None:
        bidirectional = not getattr(model.config, "is_causal", True)
    per_text, per_layer_sum, by_bucket = [], None, {}
    with capture_attention(model, masked=masked) as records:
        for text in tqdm(texts, desc=f"dependence {name}", disable=not progress or len(texts) < 8):
            enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            if enc["input_ids"].shape[1] < 2:
                continue
            records.clear()
            decoder(input_ids=enc["input_ids"], is_causal=not bidirectional)
            layers_LS = torch.stack(records)
            per_text.append(layers_LS.mean(0))
            by_bucket.setdefault(bucket_of(enc["input_ids"].shape[1]), []).append(layers_LS.mean(0))
            per_layer_sum = layers_LS if per_layer_sum is None else per_layer_sum + layers_LS
    if not per_text:
        raise BidirLMError("no text has two or more tokens; dependence needs real sentences")
    order = [bucket_of(e) for e in BUCKETS] + [f">{BUCKETS[-1]}"]
    report = DependenceReport(name, masked, texts=len(per_text),
                              overall=torch.stack(per_text).mean(0).tolist())
    for key in order:
        if key in by_bucket:
            report.buckets[key] = torch.stack(by_bucket[key]).mean(0).tolist()
            report.bucket_counts[key] = len(by_bucket[key])
    if per_layer:
        report.layers = (per_layer_sum / len(per_text)).tolist()
    return report
